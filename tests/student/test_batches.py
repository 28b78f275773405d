"""The batch of step s: a function of (seed, s) whether pairs are read from memory or streamed, and with
--coupling ot a minibatch-OT pairing of the same noise and data; a short checkerboard run shows OT's
straighter flow."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from reflow.errors import ReflowError
from reflow.pairs import generate_pairs
from reflow.student import TrainConfig, train
from reflow.student.batches import StepBatches, open_data
from reflow.student.config import run_settings
from reflow.teachers import FlowTeacher

TINY = dict(hidden_dim=32, num_layers=2, time_embed_dim=16, batch_size=64, log_every=5, log_with="none")


def draws(config: TrainConfig, steps=(0, 1, 7), world: int = 1, rank: int = 0):
    batches = StepBatches(open_data(config), config, world, rank)
    return [batches.draw(s) for s in steps]


def sorted_rows(z: torch.Tensor) -> torch.Tensor:
    return z[np.lexsort(z.numpy().T)]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip((a.z0, a.z1, a.t), (b.z0, b.z1, b.t), strict=True))


@pytest.mark.parametrize("store_z0", [True, False])
def test_pairs_in_memory_or_streamed_give_the_same_batch_of_each_step(tiny_flow, tmp_path, store_z0):
    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "p", 150, batch_size=50, store_z0=store_z0)
    base = dict(out=str(tmp_path / "m"), pairs=str(pairs), drop_farthest=0.1, **TINY)
    memory, stream = (draws(TrainConfig(pairs_in_memory=mode, **base)) for mode in ("yes", "no"))
    assert all(same(a, b) for a, b in zip(memory, stream, strict=True))
    assert not same(memory[0], memory[1])
    # ... and so do the trained weights (same data, same steps)
    for mode in ("yes", "no"):
        train(TrainConfig(**{**base, "out": str(tmp_path / mode)}, pairs_in_memory=mode, max_steps=3))
    a, b = (load_file(str(tmp_path / m / "diffusion_pytorch_model.safetensors")) for m in ("yes", "no"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "pairs_in_memory" not in run_settings(TrainConfig(**base))  # the same run either way: no resume refused


def test_ot_coupling_pairs_the_same_noise_and_data_at_least_cost(tmp_path):
    base = dict(out=str(tmp_path / "m"), data="checkerboard", **TINY)
    independent, ot = draws(TrainConfig(**base)), draws(TrainConfig(coupling="ot", **base))
    assert all(same(a, b) for a, b in zip(ot, draws(TrainConfig(coupling="ot", **base)), strict=True))  # (seed, s)
    for a, b in zip(independent, ot, strict=True):
        assert torch.equal(a.z0, b.z0) and torch.equal(a.t, b.t)
        z1a, z1b = a.z1.reshape(-1, 2), b.z1.reshape(-1, 2)
        assert torch.equal(sorted_rows(z1a), sorted_rows(z1b))  # the same data rows, paired otherwise
        z0 = a.z0.reshape(-1, 2)
        assert ((z0 - z1b) ** 2).sum() < 0.5 * ((z0 - z1a) ** 2).sum()
    # two processes: the coupling is made on the global batch, each keeps its slice
    halves = [draws(TrainConfig(coupling="ot", **base), steps=(7,), world=2, rank=r)[0] for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h.z1[0] for h in halves]), ot[2].z1[0], rtol=0, atol=0)


def test_coupling_settings_are_checked_and_recorded(tmp_path, tiny_flow):
    base = dict(out=str(tmp_path / "m"), max_steps=1, **TINY)
    with pytest.raises(ReflowError, match="--coupling must be one of independent, ot, sinkhorn"):
        train(TrainConfig(data="moons", coupling="exact", **base))
    with pytest.raises(ReflowError, match="--coupling ot pairs noise with data in round 1"):
        train(TrainConfig(pairs=str(tmp_path), coupling="ot", **base))
    with pytest.raises(ReflowError, match="--sinkhorn-reg must be positive"):
        train(TrainConfig(data="moons", coupling="sinkhorn", sinkhorn_reg=0.0, **base))
    assert "coupling" not in run_settings(TrainConfig(data="moons", **base))  # earlier runs still resume
    assert run_settings(TrainConfig(data="moons", coupling="ot", **base))["coupling"] == "ot"
    train(TrainConfig(data="moons", coupling="sinkhorn", **{**base, "max_steps": 2}))
    card = (tmp_path / "m" / "README.md").read_text()
    assert "minibatch Sinkhorn OT coupling" in card and '"sinkhorn_reg": 0.05' in card


def one_step_w2(model_dir, n=1000):
    from reflow.eval.metrics import w2
    from reflow.folders.data import load_source
    from reflow.models.velocity import load_model

    model = load_model(model_dir).eval()
    z0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(123))
    with torch.no_grad():
        z1 = z0 + model(z0, torch.zeros(n))  # one Euler step from t = 0
    return w2(z1, load_source("checkerboard").sample(n, torch.Generator().manual_seed(7)))


def test_ot_coupling_learns_a_straighter_flow_in_the_same_steps(tmp_path):
    base = dict(data="checkerboard", max_steps=300, batch_size=256, lr=3e-3, hidden_dim=64, num_layers=3)
    base |= dict(time_embed_dim=16, log_with="none", log_every=100, warmup_steps=10)
    for coupling in ("independent", "ot"):
        train(TrainConfig(out=str(tmp_path / coupling), coupling=coupling, **base))
    independent, ot = one_step_w2(tmp_path / "independent"), one_step_w2(tmp_path / "ot")
    assert ot < 0.6 * independent, (ot, independent)
