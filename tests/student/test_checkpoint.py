"""Training checkpoints: safetensors + JSON, never unpickled; a resume continues only the run that wrote them."""

import json
import os
import pickle
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_f32_close, cli_ok, free_port
from safetensors.torch import load_file
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.models.velocity import MLPVelocity
from reflow.pairs import generate_pairs
from reflow.student import TrainConfig, checkpoint_root, latest_checkpoint, train
from reflow.student.checkpoints import (
    checkpoint_kind,
    flatten,
    load_rng_state,
    load_training_state,
    read_meta,
    save_rng_state,
    save_training_state,
    unflatten,
)
from reflow.teachers import FlowTeacher

TINY = dict(hidden_dim=32, num_layers=2, time_embed_dim=16, batch_size=64, log_every=1, log_with="none")
TINY_TOML = "hidden_dim = 32\nnum_layers = 2\ntime_embed_dim = 16\nlog_every = 1\n"


class Stop(Exception):
    """Stands for a kill: the run ends after its last checkpoint, leaving it behind."""


def stop_at(n):
    def progress(step, *rest):
        if step >= n:
            raise Stop

    return progress


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


# --- the format ---------------------------------------------------------------------------------------


def parts(seed=0, decay=0.9):
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    torch.manual_seed(seed)
    model = MLPVelocity(sample_shape=[2], hidden_dim=16, num_layers=2, time_embed_dim=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=2, num_training_steps=20)
    ema = EMAModel(model.parameters(), decay=decay, foreach=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    return model, optimizer, scheduler, ema, scaler


def step(model, optimizer, scheduler, ema, scaler):
    x, t = torch.randn(8, 2), torch.rand(8)
    loss = (model(x, t) - x).pow(2).mean()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    ema.step(model.parameters())


def test_round_trip_restores_every_state_and_continues_exactly(tmp_path):
    a = parts()
    for _ in range(5):
        step(*a)
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    save_training_state(
        tmp_path, model=a[0], optimizer=a[1], scheduler=a[2], ema=a[3], scaler=a[4], step=5, info={"k": [1, 2]}
    )
    save_rng_state(tmp_path, 0)
    assert {p.suffix for p in tmp_path.iterdir()} == {".json", ".safetensors"}  # nothing pickled
    assert checkpoint_kind(tmp_path) == "safe" and read_meta(tmp_path)["info"] == {"k": [1, 2]}

    b = parts(seed=1, decay=0.5)
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    meta = load_training_state(tmp_path, model=b[0], optimizer=b[1], scheduler=b[2], ema=b[3], scaler=b[4])
    assert meta["step"] == 5 and load_rng_state(tmp_path, 0) and not load_rng_state(tmp_path, 1)
    drawn = (torch.rand(3), random.random(), np.random.rand(3))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    assert torch.equal(drawn[0], torch.rand(3)) and drawn[1] == random.random()
    np.testing.assert_array_equal(drawn[2], np.random.rand(3))

    for x, y in zip(a[0].state_dict().values(), b[0].state_dict().values(), strict=True):
        assert torch.equal(x, y)
    sa, sb = a[1].state_dict(), b[1].state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i in sa["state"]:
        for k in sa["state"][i]:
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    assert a[2].state_dict() == b[2].state_dict()
    ea, eb = a[3].state_dict(), b[3].state_dict()
    assert {k: v for k, v in ea.items() if k != "shadow_params"} == {
        k: v for k, v in eb.items() if k != "shadow_params"
    }
    assert all(torch.equal(x, y) for x, y in zip(ea["shadow_params"], eb["shadow_params"], strict=True))
    assert a[4].state_dict() == b[4].state_dict()
    # and the two go on identically
    for objs in (a, b):
        torch.manual_seed(3)
        for _ in range(4):
            step(*objs)
    for x, y in zip(a[0].parameters(), b[0].parameters(), strict=True):
        assert torch.equal(x, y)
    assert all(torch.equal(x, y) for x, y in zip(a[3].shadow_params, b[3].shadow_params, strict=True))


def test_flatten_keeps_types_and_keys():
    t = torch.arange(3.0)
    obj = {"a": (1, 2.5, None), "b": {0: t, 1: [True, "x", float("inf")]}, "c": t.view(3, 1), "d.e": torch.ones(())}
    tensors = {}
    skeleton = flatten(obj, "s", tensors)
    back = unflatten(json.loads(json.dumps(skeleton)), tensors)
    assert back["a"] == (1, 2.5, None) and back["b"][1] == [True, "x", float("inf")]
    assert list(back["b"]) == [0, 1] and torch.equal(back["b"][0], t) and back["c"].shape == (3, 1)
    assert back["d.e"].shape == ()
    with pytest.raises(TypeError, match="set"):
        flatten({"x": {1, 2}}, "s", {})


# --- planted pickles ----------------------------------------------------------------------------------

PICKLE_NAMES = (
    "custom_checkpoint_0.pkl",
    "custom_checkpoint_1.pkl",
    "random_states_0.pkl",
    "random_states_1.pkl",
    "optimizer.bin",
    "scheduler.bin",
    "scaler.pt",
    "pytorch_model.bin",
    "sampler.bin",
)


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pickle ran')",)


def plant(root, marker):
    """A malicious pickle under every name Accelerate (or torch.load) would read, in every checkpoint."""
    payload = pickle.dumps(Payload(marker))
    folders = [p for p in root.iterdir() if p.is_dir()]
    assert folders
    for folder in folders:
        for name in PICKLE_NAMES:
            (folder / name).write_bytes(payload)
    return payload


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PWNED"
    pickle.loads(pickle.dumps(Payload(path)))  # the payload is live: unpickling it writes the marker
    assert path.read_text() == "pickle ran"
    path.unlink()
    return path


def test_train_resume_never_unpickles(tmp_path, marker, monkeypatch):
    out = tmp_path / "m"
    cfg = dict(out=str(out), data="moons", max_steps=12, checkpoint_every=4, **TINY)
    with pytest.raises(Stop):
        train(TrainConfig(**cfg), progress=stop_at(10))
    assert latest_checkpoint(out).name == "step-0000008"
    plant(checkpoint_root(out), marker)
    (tmp_path / "tiny.toml").write_text(TINY_TOML + 'log_with = "none"\n')

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the resume unpickled something")

    # not even a weights-only torch.load: the resume reads JSON and safetensors only
    for module, name in [(torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")]:
        monkeypatch.setattr(module, name, no_unpickling)
    r = cli_ok(
        "train", "--data", "moons", "--out", out, "--max-steps", 12, "--checkpoint-every", 4, "--batch-size", 64,
        "--config", tmp_path / "tiny.toml", "--resume",
    )  # fmt: skip
    assert not marker.exists(), "a planted pickle ran"
    assert "12 steps" in r.output and not checkpoint_root(out).exists()
    clean = tmp_path / "clean"
    train(TrainConfig(**{**cfg, "out": str(clean)}))
    a, b = weights(clean), weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


def test_distill_resume_never_unpickles(tiny_flow, tmp_path, marker):
    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "pairs", 128, batch_size=64)
    out = tmp_path / "d"
    cfg = dict(out=str(out), pairs=str(pairs), init=str(tiny_flow), distill_k=1, max_steps=6, checkpoint_every=3)
    with pytest.raises(Stop):
        train(TrainConfig(**cfg, **TINY), progress=stop_at(4))
    plant(checkpoint_root(out), marker)
    args = ["--pairs", pairs, "--init", tiny_flow, "--out", out, "--k", 1, "--max-steps", 6, "--checkpoint-every", 3]
    cli_ok("distill", *args, "--batch-size", 64, "--log-with", "none", "--resume")
    assert not marker.exists(), "a planted pickle ran"
    assert json.loads((out / ".reflow-output.json").read_text())["steps"] == 6


ROUNDS = """
rounds = 1
[teacher]
data = "moons"
[pairs]
heldout = 0
[train]
max_steps = 12
batch_size = 64
hidden_dim = 32
num_layers = 2
time_embed_dim = 16
checkpoint_every = 4
log_with = "none"
[eval]
nfes = [1]
num_samples = 64
seeds = [1]
adaptive = false
diagnostics_samples = 16
"""


def test_rounds_rerun_never_unpickles(tmp_path, marker):
    from reflow.rounds.run import run_rounds

    recipe, run = tmp_path / "recipe.toml", tmp_path / "run"
    recipe.write_text(ROUNDS)

    def progress(update):
        if update.stage == "round-1/student" and update.done >= 10:
            raise Stop

    with pytest.raises(Stop):
        run_rounds(recipe, run, progress=progress)
    student = run / "round-1" / "student"
    assert latest_checkpoint(student).name == "step-0000008" and not student.exists()
    plant(checkpoint_root(student), marker)
    cli_ok("rounds", "--config", recipe, "--out", run)
    assert not marker.exists(), "a planted pickle ran"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["complete"] and manifest["stages"]["round-1/student"]["steps"] == 12


def test_an_older_pickle_checkpoint_is_refused_in_one_line(tmp_path, marker):
    out = tmp_path / "m"
    old = checkpoint_root(out) / "step-0000010"
    old.mkdir(parents=True)
    (old / "reflow_step.json").write_text('{"step": 10}')
    plant(checkpoint_root(out), marker)
    r = CliRunner().invoke(app, ["train", "--data", "moons", "--out", str(out), "--max-steps", "20", "--resume"])
    assert r.exit_code == 2 and "older reflow with pickle state" in r.output and "--allow-pickle" in r.output
    assert not marker.exists() and not out.exists()


def test_allow_pickle_resumes_an_older_accelerate_checkpoint(tmp_path):
    """A checkpoint as reflow wrote it before (Accelerate's save_state) resumes with --allow-pickle, to the
    weights of an uninterrupted run."""
    from accelerate import Accelerator
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel

    cfg = dict(data="moons", max_steps=12, checkpoint_every=4, lr=3e-3, ema_decay=0.9, **TINY)
    out = tmp_path / "m"
    with pytest.raises(Stop):
        train(TrainConfig(out=str(out), **cfg), progress=stop_at(10))
    ckpt = latest_checkpoint(out)
    # rewrite it as the old code did: model and optimizer prepared, scheduler and EMA registered
    accelerator = Accelerator(cpu=True)
    model = MLPVelocity(sample_shape=[2], hidden_dim=32, num_layers=2, time_embed_dim=16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=1, num_training_steps=12)
    model, optimizer = accelerator.prepare(model, optimizer)
    ema = EMAModel(model.parameters(), decay=0.9, foreach=True)
    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_for_checkpointing(ema)
    load_training_state(ckpt, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema)
    load_rng_state(ckpt, 0)
    for p in ckpt.iterdir():
        if p.name != "reflow_step.json":
            p.unlink()
    accelerator.save_state(str(ckpt))
    assert checkpoint_kind(ckpt) == "pickle"

    with pytest.raises(ReflowError, match="--allow-pickle"):
        train(TrainConfig(out=str(out), resume=True, **cfg))
    train(TrainConfig(out=str(out), resume=True, allow_pickle=True, **cfg))
    train(TrainConfig(out=str(tmp_path / "clean"), **cfg))
    a, b = weights(tmp_path / "clean"), weights(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)


# --- resume only what it was ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A run stopped after its step-4 checkpoint; tests copy it."""
    out = tmp_path_factory.mktemp("stopped") / "m"
    with pytest.raises(Stop):
        train(TrainConfig(out=str(out), data="moons", max_steps=8, checkpoint_every=4, **TINY), progress=stop_at(6))
    return out


def copy_run(stopped, tmp_path):
    import shutil

    shutil.copytree(checkpoint_root(stopped), checkpoint_root(tmp_path / "m"))
    return tmp_path / "m"


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(lr=5e-4), "--lr 0.001 (now 0.0005)"),
        (dict(max_steps=9), "--max-steps 8 (now 9)"),
        (dict(seed=1), "--seed 0 (now 1)"),
        (dict(data="8gaussians"), "--data moons (now 8gaussians)"),
        (dict(hidden_dim=64), "--hidden-dim 32 (now 64)"),
        (dict(loss="pseudo_huber", ema_decay=0.5), "--ema-decay 0.999 (now 0.5), --loss l2 (now pseudo_huber)"),
        (dict(mixed_precision="bf16"), "--mixed-precision no (now bf16)"),
    ],
)
def test_resume_with_other_settings_is_refused(stopped, tmp_path, change, named):
    out = copy_run(stopped, tmp_path)
    base = dict(out=str(out), data="moons", max_steps=8, checkpoint_every=4, resume=True, **TINY)
    with pytest.raises(ReflowError, match="other settings") as e:
        train(TrainConfig(**{**base, **change}))
    assert named in str(e.value) and "\n" not in str(e.value)
    # what may change: how often it checkpoints and logs
    train(TrainConfig(**{**base, "checkpoint_every": 3, "log_every": 2}))
    assert (out / "config.json").is_file()


def test_resume_from_pairs_instead_of_data_is_refused(stopped, tiny_flow, tmp_path):
    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "pairs", 64, batch_size=64)
    out = copy_run(stopped, tmp_path)
    with pytest.raises(ReflowError, match=r"--data moons \(now none\).*--pairs none \(now /"):
        train(TrainConfig(out=str(out), pairs=str(pairs), max_steps=8, loss="l2", resume=True, **TINY))


def test_resume_onto_another_architecture_is_one_line(tmp_path):
    """Another --init at the same path, another shape: one line, no torch size-mismatch traceback."""
    import shutil

    init = tmp_path / "init"
    for hidden, where in [(32, init), (16, tmp_path / "other")]:
        train(TrainConfig(out=str(where), data="moons", max_steps=2, **{**TINY, "hidden_dim": hidden}))
    out = tmp_path / "m"
    cfg = dict(out=str(out), data="moons", init=str(init), max_steps=8, checkpoint_every=4, **TINY)
    with pytest.raises(Stop):
        train(TrainConfig(**cfg), progress=stop_at(6))
    shutil.rmtree(init)
    shutil.copytree(tmp_path / "other", init)
    r = CliRunner().invoke(
        app, ["train", "--data", "moons", "--init", str(init), "--out", str(out), "--max-steps", "8", "--batch-size",
              "64", "--checkpoint-every", "4", "--resume"]
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert "another model architecture: hidden_dim 32 (now 16)" in r.output and "Traceback" not in r.output


def test_rerun_of_a_finished_training_is_complete_and_removes_stale_checkpoints(tmp_path):
    out = tmp_path / "m"
    cfg = dict(out=str(out), data="moons", max_steps=8, checkpoint_every=4, **TINY)
    first = train(TrainConfig(**cfg))
    stale = checkpoint_root(out) / "step-0000004"
    stale.mkdir(parents=True)  # killed between the final rename and the clean-up
    (stale / "reflow_step.json").write_text('{"step": 4}')
    for resume in (True, False):
        again = train(TrainConfig(**cfg, resume=resume))
        assert again.already_complete and again.steps == 8 and again.loss == pytest.approx(first.loss)
        assert not checkpoint_root(out).exists()
    with pytest.raises(ReflowError, match=r"finished training with other settings: --max-steps 8 \(now 10\)"):
        train(TrainConfig(**{**cfg, "max_steps": 10}))


def test_out_must_be_new_ours_or_empty_and_outside_the_inputs(tiny_flow, tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(ReflowError, match="not written by `reflow train`"):
        train(TrainConfig(out=str(theirs), data="moons", max_steps=2, **TINY))
    assert (theirs / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    train(TrainConfig(out=str(empty), data="moons", max_steps=2, **TINY))
    assert (empty / "config.json").is_file()
    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "pairs", 64, batch_size=64)
    with pytest.raises(ReflowError, match="inside"):
        train(TrainConfig(out=str(pairs / "student"), pairs=str(pairs), max_steps=2, **TINY))
    with pytest.raises(ReflowError, match="inside"):
        train(TrainConfig(out=str(tiny_flow / "student"), data="moons", init=str(tiny_flow), max_steps=2, **TINY))


def test_debris_of_a_killed_final_save_is_removed(tmp_path):
    debris = tmp_path / f".m.tmp-{__import__('socket').gethostname().replace('-', '_')}-99999999-abcd1234"
    debris.mkdir()
    (debris / "half.safetensors").write_bytes(b"x")
    train(TrainConfig(out=str(tmp_path / "m"), data="moons", max_steps=2, **TINY))
    assert not debris.exists() and (tmp_path / "m" / "config.json").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_location_fails_before_step_one(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    steps = []
    try:
        with pytest.raises(ReflowError, match="cannot write"):
            train(
                TrainConfig(out=str(ro / "m"), data="moons", max_steps=2, **TINY),
                progress=lambda s, *_: steps.append(s),
            )
    finally:
        ro.chmod(0o755)
    assert not steps


def test_unwritable_location_fails_before_step_one(tmp_path):
    (tmp_path / "a_file").write_text("x")
    steps = []
    with pytest.raises(ReflowError, match="is a file, not a folder"):
        train(
            TrainConfig(out=str(tmp_path / "a_file" / "m"), data="moons", max_steps=2, **TINY),
            progress=lambda s, *_: steps.append(s),
        )
    assert not steps


def test_a_failed_checkpoint_write_leaves_no_half_folder(tmp_path, monkeypatch):
    import errno

    import reflow.student.checkpoints

    def full_disk(folder, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reflow.student.checkpoints, "save_training_state", full_disk)
    out = tmp_path / "m"
    with pytest.raises(OSError, match="No space"):
        train(TrainConfig(out=str(out), data="moons", max_steps=8, checkpoint_every=4, **TINY))
    assert list(checkpoint_root(out).iterdir()) == [] and not out.exists()


# --- many processes -------------------------------------------------------------------------------------

TORCHRUN = textwrap.dedent(
    """
    import os, sys
    from reflow.student import TrainConfig, train
    out, stop = sys.argv[1], int(sys.argv[2])
    def progress(step, total, loss, sps):
        if stop and step >= stop:
            os._exit(3)  # a crash of rank 0: torchrun ends the other one
    cfg = TrainConfig(out=out, data="moons", max_steps=16, checkpoint_every=5, resume=True, lr=3e-3, hidden_dim=32,
                      num_layers=2, time_embed_dim=16, batch_size=64, log_every=1, ema_decay=0.9, log_with="none")
    train(cfg, progress=progress)
    """
)


@pytest.mark.slow  # two torchrun launches, about a minute on two cores
def test_two_process_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path):
    bindir = os.path.dirname(sys.executable)
    script = tmp_path / "run.py"
    script.write_text(TORCHRUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def torchrun(out, stop):
        cmd = [os.path.join(bindir, "torchrun"), "--nproc_per_node", "2", "--master_port", free_port()]
        return subprocess.run(
            [*cmd, str(script), str(out), str(stop)], capture_output=True, text=True, timeout=300, env=env
        )

    out = tmp_path / "two"
    stopped = torchrun(out, 12)
    assert stopped.returncode != 0
    ckpt = latest_checkpoint(out)
    assert ckpt.name == "step-0000010"
    assert {p.name for p in ckpt.glob("rng_state_*")} == {
        f"rng_state_{r}.{e}" for r in (0, 1) for e in ("json", "safetensors")
    }
    resumed = torchrun(out, 0)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "one"), "0"], capture_output=True, text=True, env=env
    )
    assert one.returncode == 0, one.stderr[-2000:]
    a, b = weights(tmp_path / "one"), weights(out)
    for k in a:
        assert_f32_close(b[k], a[k], steps=12)  # two processes' all-reduce sums in another order


def test_differences_name_each_setting_and_both_values():
    from reflow.student.config import differences

    recorded = {"lr": 0.001, "max_pairs": None, "model_config": {"layers_per_block": 2, "sample_size": 8}}
    now = {"lr": 0.001, "max_pairs": 100, "model_config": {"layers_per_block": 1, "sample_size": 8}}
    assert differences(recorded, now) == ["--max-pairs none (now 100)", "--model-config layers_per_block 2 (now 1)"]
