"""The student's objectives through the real training code: MeanFlow, perceptual distillation, their checks."""

import numpy as np
import pytest
import torch

from reflow.errors import ReflowError
from reflow.student import TrainConfig, check_config

TINY = dict(batch_size=32, hidden_dim=16, num_layers=2, time_embed_dim=8, log_with="none")


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(objective="meanflows"), "--objective must be one of velocity, meanflow"),
        (dict(objective="meanflow", equal_fraction=1.5), "--equal-fraction must be in"),
        (dict(objective="meanflow", distill_k=1, pairs="p", init="m", data=None), "needs no distillation"),
        (dict(loss="lpips"), "compares images"),
        (dict(loss="lpips", objective="meanflow"), "needs --perceptual-weights"),
        (dict(loss="lpips_huber", distill_k=1, pairs="p", init="m", data=None), "needs --perceptual-weights"),
        (dict(loss="lpip"), "--loss must be one of auto, l2, pseudo_huber, lpips, lpips_huber"),
        (dict(drop_farthest=0.1), "needs --pairs"),
    ],
)
def test_bad_student_settings_are_one_line(tmp_path, kw, msg):
    base = dict(out=str(tmp_path / "m"), data="moons", max_steps=2, **TINY)
    base.update(kw)
    with pytest.raises(ReflowError, match=msg):
        check_config(TrainConfig(**base))


PERCEPTUAL = "data/perceptual/digits-lpips"


@pytest.fixture(scope="module")
def ddpm_and_pairs(tmp_path_factory):
    """A tiny 8x8 DDPM checkpoint and 64 of its DDIM-2 pairs, made by the real generate path."""
    from ddpm_helpers import save, tiny_unet
    from diffusers import DDPMScheduler

    from reflow.pairs import generate_pairs
    from reflow.teachers import load_teacher

    root = tmp_path_factory.mktemp("objectives")
    ddpm = save(root, "ddpm", tiny_unet(seed=3), DDPMScheduler(num_train_timesteps=100))
    pairs = generate_pairs(load_teacher(ddpm, nfe=2), root / "pairs", 64, batch_size=32)
    return ddpm, pairs


def test_a_meanflow_student_from_a_ddpm_samples_in_diffusers_as_reflow_sample(ddpm_and_pairs, tmp_path):
    import numpy as np
    from diffusers import DiffusionPipeline
    from helpers import assert_f32_close, cli_ok

    from reflow.models.velocity import load_model
    from reflow.student import train

    ddpm, pairs = ddpm_and_pairs
    out = tmp_path / "mf"
    cfg = dict(pairs=str(pairs), init=str(ddpm), objective="meanflow", equal_fraction=0.5, max_steps=3)
    cfg |= dict(loss="lpips_huber", perceptual_weights=PERCEPTUAL, drop_farthest=0.25, batch_size=16, lr=1e-3)
    result = train(TrainConfig(out=str(out), log_with="none", **cfg))
    assert result.steps == 3 and np.isfinite(result.loss)
    assert load_model(out).mean_flow
    card = (out / "README.md").read_text()
    assert "trust_remote_code=True" in card and "MeanFlow on" in card and '"dropped": 16' in card
    z0 = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    np.save(tmp_path / "z0.npy", z0.numpy())
    for k in (1, 2):
        cli_ok("sample", "--model", out, "--nfe", k, "--noise", tmp_path / "z0.npy", "--out", tmp_path / f"s{k}.npy")
        ours = torch.from_numpy(np.load(tmp_path / f"s{k}.npy"))
        pipe = DiffusionPipeline.from_pretrained(str(out), trust_remote_code=True)
        theirs = pipe(latents=z0, num_inference_steps=k, output_type="pt").images
        assert_f32_close(ours, theirs, steps=k)
    # the same training, rerun, is complete; another interval split is another training
    assert train(TrainConfig(out=str(out), log_with="none", **cfg)).already_complete
    with pytest.raises(ReflowError, match="equal-fraction 0.5 \\(now 0.75\\)"):
        train(TrainConfig(out=str(out), log_with="none", **(cfg | dict(equal_fraction=0.75))))


def test_a_meanflow_student_on_pairs_learns_the_teachers_jump(tiny_flow, tmp_path):
    from reflow.core.sampling import sample
    from reflow.models.velocity import load_model
    from reflow.pairs import PairsReader, generate_pairs
    from reflow.student import train
    from reflow.teachers import FlowTeacher

    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=8), tmp_path / "pairs", 2048, batch_size=1024)
    losses = []
    cfg = TrainConfig(out=str(tmp_path / "mf"), pairs=str(pairs), init=str(tiny_flow), objective="meanflow")
    cfg.max_steps, cfg.lr, cfg.log_with, cfg.batch_size, cfg.ema_decay = 300, 3e-3, "none", 256, 0.9
    train(cfg, progress=lambda step, total, loss, sps: losses.append(loss) if loss == loss else None)
    assert max(losses) < 1.5 * losses[0]  # stable
    z0, z1, _ = PairsReader(pairs).batch(torch.arange(1024))

    def mse(model):
        return (sample(model, z0, 1).z1 - z1).pow(2).mean().item()

    student, start = load_model(tmp_path / "mf"), load_model(tiny_flow)
    assert student.mean_flow and not start.mean_flow
    # one jump lands nearer the teacher's 8-step z1 than the velocity it started from does in one Euler step
    assert mse(student) < 0.5 * mse(start)


def test_distillation_with_a_perceptual_loss_minimises_it(ddpm_and_pairs, tmp_path):
    from reflow.core.flow import distillation_loss
    from reflow.core.perceptual import perceptual_loss
    from reflow.models.perceptual import load_perceptual
    from reflow.models.velocity import init_model
    from reflow.student import train

    ddpm, pairs = ddpm_and_pairs
    net = load_perceptual(PERCEPTUAL)
    model = init_model(ddpm)
    z0, z1 = torch.randn(4, 1, 8, 8), torch.rand(4, 1, 8, 8) * 2 - 1
    fn = lambda p, y: perceptual_loss(p, y, "lpips", features=net)  # noqa: E731
    with torch.no_grad():
        got = distillation_loss(model, z0, z1, [0.0, 1.0], [0.0], loss_fn=fn)
        x1 = z0 + model(z0, torch.zeros(4))
        assert torch.allclose(got, fn(x1, z1).mean())
    cfg = dict(pairs=str(pairs), init=str(ddpm), distill_k=1, loss="lpips", perceptual_weights=PERCEPTUAL)
    losses = []
    train(
        TrainConfig(out=str(tmp_path / "d"), max_steps=20, lr=1e-3, log_every=1, **cfg, **TINY),
        progress=lambda step, total, loss, sps: losses.append(loss) if loss == loss else None,
    )
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert '"loss": "lpips"' in (tmp_path / "d" / "README.md").read_text()
    with pytest.raises(ReflowError, match="--perceptual-weights .*no such file"):
        train(TrainConfig(out=str(tmp_path / "e"), max_steps=2, **(cfg | dict(perceptual_weights="nowhere")), **TINY))


MEANFLOW_RUN = """
import os, signal, sys
from reflow.student import TrainConfig, train
out, kill_at = sys.argv[1], int(sys.argv[2])
def progress(step, total, loss, sps):
    if kill_at and step >= kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
cfg = TrainConfig(out=out, data="moons", objective="meanflow", equal_fraction=0.5, max_steps=40, checkpoint_every=10,
                  resume=True, lr=3e-3, hidden_dim=32, num_layers=2, time_embed_dim=16, batch_size=64, log_every=1,
                  ema_decay=0.9, log_with="none")
train(cfg, progress=progress)
"""


@pytest.mark.slow  # SIGKILL: runs in CI's second step (pytest -m slow)
def test_a_killed_meanflow_training_resumes_to_the_uninterrupted_weights(tmp_path):
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    from reflow.student import latest_checkpoint

    def run(out, kill_at):
        return subprocess.run(
            [sys.executable, "-c", MEANFLOW_RUN, str(out), str(kill_at)], capture_output=True, text=True
        )

    clean = run(tmp_path / "clean", 0)
    assert clean.returncode == 0, clean.stderr[-2000:]
    assert run(tmp_path / "resumed", 25).returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000020"
    resumed = run(tmp_path / "resumed", 0)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "clean" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)
