import json
import math
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_f32_close, free_port
from safetensors.torch import load_file

from reflow.errors import ReflowError
from reflow.pairs import generate_pairs
from reflow.student import TrainConfig, checkpoint_root, latest_checkpoint, train
from reflow.teachers import FlowTeacher

TINY = dict(hidden_dim=32, num_layers=2, time_embed_dim=16, batch_size=64, log_every=5)


def weights(folder):
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_round1_learns_and_writes_a_model_folder(tmp_path):
    losses = []
    result = train(
        TrainConfig(out=str(tmp_path / "m"), data="8gaussians", max_steps=200, lr=3e-3, **TINY),
        progress=lambda step, total, loss, sps: losses.append(loss),
    )
    losses = [loss for loss in losses if not math.isnan(loss)]  # the calls before the first log step carry NaN
    assert result.steps == 200 and (tmp_path / "m" / "config.json").is_file()
    assert losses[-1] < 0.8 * losses[0]
    card = (tmp_path / "m" / "README.md").read_text()
    assert "8gaussians" in card and "EMA" in card
    assert '"loss": "l2"' in card  # auto: from data, the mean velocity is the flow's, so L2
    assert not checkpoint_root(tmp_path / "m").exists()
    with pytest.raises(ReflowError, match=r"other settings: --data 8gaussians \(now moons\)"):
        train(TrainConfig(out=str(tmp_path / "m"), data="moons", max_steps=1, **TINY))
    # the same training again: already complete, nothing trained, the finished model untouched
    before = weights(tmp_path / "m")
    again = train(
        TrainConfig(out=str(tmp_path / "m"), data="8gaussians", max_steps=200, lr=3e-3, log_with="none", **TINY)
    )
    assert again.already_complete and again.steps == 200 and again.loss == pytest.approx(losses[-1])
    after = weights(tmp_path / "m")
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_reflow_round_from_pairs_with_init(tiny_flow, tmp_path):
    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=4), tmp_path / "pairs", 256, batch_size=128)
    result = train(
        TrainConfig(
            out=str(tmp_path / "2rf"),
            pairs=str(pairs),
            init=str(tiny_flow),
            max_steps=5,
            time_sampler="u_shaped",
            loss="pseudo_huber",
            **TINY,
        )
    )
    assert result.steps == 5
    card = (tmp_path / "2rf" / "README.md").read_text()
    assert '"nfe": 4' in card and "u_shaped" in card
    # auto on pairs: one target per z0, so the robust loss (chosen by the digits study)
    train(TrainConfig(out=str(tmp_path / "auto"), pairs=str(pairs), max_steps=2, **TINY))
    assert '"loss": "pseudo_huber"' in (tmp_path / "auto" / "README.md").read_text()


def test_model_card_is_a_hub_card_with_the_provenance(tiny_flow):
    from huggingface_hub import ModelCard

    card = ModelCard.load(tiny_flow / "README.md")
    assert card.data.tags == ["reflow", "rectified-flow", "diffusers"]
    assert card.data.library_name is None  # an MLP: not a diffusers pipeline
    assert card.text.lstrip().startswith(f"# reflow velocity model {tiny_flow.name}\n")
    assert f"reflow sample --model {tiny_flow.name} --nfe 4" in card.text
    provenance = json.loads(card.text.split("```json\n", 1)[1].split("\n```", 1)[0])
    assert provenance["round"] == "1 (independent coupling)" and provenance["weights"] == "EMA"
    assert provenance["train_config"]["data"] == "checkerboard" and provenance["train_config"]["max_steps"] == 30


def test_image_student_card_says_how_to_load_it_in_diffusers():
    from reflow.models.velocity import build_model
    from reflow.student.card import model_card

    model = build_model((1, 8, 8), None)
    card = model_card("digits-2rf", model, TrainConfig(out="digits-2rf", pairs="p", init="m", distill_k=2), None)
    assert (card.data.library_name, card.data.pipeline_tag) == ("diffusers", "unconditional-image-generation")
    assert 'DiffusionPipeline.from_pretrained("digits-2rf")' in card.text
    assert "pipe(num_inference_steps=2)" in card.text
    assert "2-step distillation of m on p" in card.text


def test_an_output_from_before_the_marker_is_known_by_its_card(tiny_flow, tmp_path):
    """A model folder written before outputs carried a marker: its card (the old hand-written one) records
    the training, so the same training finds it complete and another is refused."""
    import shutil

    from reflow.folders.io import MARKER

    out = tmp_path / "old"
    shutil.copytree(tiny_flow, out)
    (out / MARKER).unlink()
    provenance = (out / "README.md").read_text().split("```json\n", 1)[1].split("\n```", 1)[0]
    (out / "README.md").write_text(
        "---\nlibrary_name: diffusers\ntags: [reflow, rectified-flow]\n---\n# reflow velocity model old\n\n"
        f"Made by reflow.\n\n## Provenance\n\n```json\n{provenance}\n```\n"
    )
    same = dict(data="checkerboard", max_steps=30, batch_size=64, hidden_dim=32, num_layers=2, time_embed_dim=16)
    again = train(TrainConfig(out=str(out), log_with="none", **same))
    assert again.already_complete and again.steps == 30
    with pytest.raises(ReflowError, match=r"other settings: --max-steps 30 \(now 31\)"):
        train(TrainConfig(out=str(out), log_with="none", **{**same, "max_steps": 31}))


def test_the_batch_of_a_step_depends_on_seed_and_step_only():
    from reflow.student.batches import StepBatches, open_data

    config = TrainConfig(out="m", data="moons", batch_size=8, gradient_accumulation_steps=2, seed=3)
    data = open_data(config)
    whole = StepBatches(data, config, world=1, rank=0).draw(5)
    halves = [StepBatches(data, config, world=2, rank=r).draw(5) for r in (0, 1)]
    assert whole.z1.shape == (2, 4, 2) and whole.t.shape == (2, 4)
    # process r keeps rows [4r, 4r + 4) of the same global batch, as micro-batches of 2
    assert torch.equal(torch.cat([h.z1.flatten(0, 1) for h in halves]), whole.z1.flatten(0, 1))
    assert torch.equal(StepBatches(data, config, world=1, rank=0).draw(5).z0, whole.z0)
    assert not torch.equal(StepBatches(data, config, world=1, rank=0).draw(6).z0, whole.z0)


RUN = textwrap.dedent(
    """
    import os, signal, sys
    from reflow.student import TrainConfig, train
    out, kill_at = sys.argv[1], int(sys.argv[2])
    def progress(step, total, loss, sps):
        if kill_at and step >= kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    cfg = TrainConfig(out=out, data="moons", max_steps=40, checkpoint_every=10, resume=True, lr=3e-3,
                      hidden_dim=32, num_layers=2, time_embed_dim=16, batch_size=64, log_every=1, ema_decay=0.9)
    train(cfg, progress=progress)
    """
)


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
def test_sigkill_and_resume_equals_uninterrupted(tmp_path):
    clean = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "clean"), "0"], capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-2000:]
    killed = subprocess.run([sys.executable, "-c", RUN, str(tmp_path / "resumed"), "25"], capture_output=True)
    assert killed.returncode == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "resumed").name == "step-0000020"
    resumed = subprocess.run(
        [sys.executable, "-c", RUN, str(tmp_path / "resumed"), "0"], capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = weights(tmp_path / "clean"), weights(tmp_path / "resumed")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0)


def test_checkpoints_need_resume_flag(tmp_path):
    root = checkpoint_root(tmp_path / "m") / "step-0000010"
    root.mkdir(parents=True)
    (root / "reflow_step.json").write_text(json.dumps({"step": 10}))
    with pytest.raises(ReflowError, match="--resume"):
        train(TrainConfig(out=str(tmp_path / "m"), data="moons", max_steps=20, **TINY))


def test_nan_loss_stops_with_one_line(tmp_path):
    np.save(tmp_path / "huge.npy", np.full((16, 2), 3e38, dtype=np.float32))
    with pytest.raises(ReflowError, match="loss became"):
        train(TrainConfig(out=str(tmp_path / "m"), data=str(tmp_path / "huge.npy"), max_steps=3, **TINY))
    assert not (tmp_path / "m").exists()


def test_toml_config_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('max-steps = 7\nlr = 0.01\ntime_sampler = "logit_normal"\n')
    cfg = TrainConfig.from_toml(cfg_file, out="x", data="moons", lr=0.5, max_steps=None)
    assert (cfg.max_steps, cfg.lr, cfg.time_sampler, cfg.data) == (7, 0.5, "logit_normal", "moons")
    cfg_file.write_text('loss = "l1"\n')  # the type is checked here, the choice by train, in its words
    with pytest.raises(ReflowError, match="^--loss must be one of auto, l2, pseudo_huber, lpips, lpips_huber$"):
        train(TrainConfig.from_toml(cfg_file, out=str(tmp_path / "m"), data="moons"))
    cfg_file.write_text("learning_rate = 1\n")
    with pytest.raises(ReflowError, match="unknown setting"):
        TrainConfig.from_toml(cfg_file)


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(data=None), "exactly one of"),
        (dict(max_steps=0), "max-steps"),
        (dict(loss="l1"), "--loss"),
        (dict(time_sampler="beta"), "--time-sampler"),
        (dict(batch_size=63, gradient_accumulation_steps=2), "divide evenly"),
    ],
)
def test_bad_settings(tmp_path, kw, msg):
    base = dict(out=str(tmp_path / "m"), data="moons", max_steps=2, **TINY)
    base.update(kw)
    with pytest.raises(ReflowError, match=msg):
        train(TrainConfig(**base))


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
def test_two_processes_match_one_process_of_the_same_global_batch(tmp_path):
    import os

    bindir = os.path.dirname(sys.executable)
    cfg = tmp_path / "tiny.toml"
    cfg.write_text("hidden_dim = 32\nnum_layers = 2\ntime_embed_dim = 16\nema_decay = 0.5\n")
    args = ["train", "--data", "moons", "--max-steps", "15", "--batch-size", "64", "--lr", "3e-3", "--config", str(cfg)]
    one = subprocess.run(
        [os.path.join(bindir, "reflow"), *args, "--out", str(tmp_path / "one")], capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [
            os.path.join(bindir, "torchrun"),
            "--nproc_per_node",
            "2",
            "--master_port",
            free_port(),
            os.path.join(bindir, "reflow"),
            *args,
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert_f32_close(b[k], a[k], steps=15)  # two processes' all-reduce sums in another order


def test_tensorboard_logs_and_max_pairs(tiny_flow, tmp_path):
    pytest.importorskip("tensorboard")
    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "pairs", 64, batch_size=32)
    out = tmp_path / "m"
    train(TrainConfig(out=str(out), pairs=str(pairs), max_steps=4, max_pairs=8, log_with="tensorboard", **TINY))
    events = list((tmp_path / "m.logs").rglob("events.out.tfevents*"))
    assert events and events[0].stat().st_size > 0
    card = (out / "README.md").read_text()
    assert '"max_pairs": 8' in card


def test_pairs_reader_gathers_exactly_the_stored_rows(tiny_flow, tmp_path):
    import datasets

    from reflow.pairs import PairsReader

    pairs = generate_pairs(
        FlowTeacher(tiny_flow, nfe=2), tmp_path / "pairs", 100, batch_size=32, shard_size=32, store_z0=True
    )
    stored = datasets.load_from_disk(str(pairs)).with_format("numpy")
    reader = PairsReader(pairs, in_memory="no")
    assert reader._views is not None and len(reader._views["z0"]) > 1  # several Arrow chunks, viewed in place
    idx = torch.tensor([99, 0, 31, 32, 64, 5, 5])
    z0, z1, cond = reader.batch(idx)
    np.testing.assert_array_equal(z0.numpy(), stored[idx.tolist()]["z0"])
    np.testing.assert_array_equal(z1.numpy(), stored[idx.tolist()]["z1"])
    assert cond == {} and len(PairsReader(pairs, max_rows=10)) == 10


def test_progress_comes_when_the_loop_starts_and_at_the_first_step_not_only_at_log_steps(tmp_path):
    """A long log window still shows progress from the start: the loop's start (step 0) and its first step, with
    the loss NaN until the first log step (between log steps the loss is not read back from the device)."""
    calls = []
    config = TrainConfig(out=str(tmp_path / "m"), data="moons", max_steps=6, **{**TINY, "log_every": 1000})
    train(config, progress=lambda step, total, loss, sps: calls.append((step, total, loss)))
    assert [step for step, _, _ in calls[:2]] == [0, 1] and calls[-1][0] == 6
    assert all(total == 6 for _, total, _ in calls)
    assert math.isnan(calls[0][2]) and math.isnan(calls[1][2]) and math.isfinite(calls[-1][2])
