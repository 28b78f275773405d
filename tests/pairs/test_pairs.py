import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import datasets
import numpy as np
import pytest
import torch
from helpers import assert_f32_close, f32_atol, free_port

from reflow.core.noise import row_noise
from reflow.errors import ReflowError
from reflow.models.velocity import load_model
from reflow.pairs import generate_pairs, load_pairs, with_z0
from reflow.teachers import FlowTeacher


def plain_euler(model, z0, steps):
    """An independent Euler loop: x <- x + v(x, i/N) / N."""
    x = z0.clone()
    with torch.no_grad():
        for i in range(steps):
            x = x + model(x, torch.full((len(x),), i / steps)) / steps
    return x


def test_row_noise_depends_on_seed_and_index_only():
    a = row_noise(3, range(10), (2,))
    b = row_noise(3, [7, 2], (2,))
    torch.testing.assert_close(b, a[[7, 2]], rtol=0, atol=0)
    assert not torch.equal(row_noise(4, [7], (2,)), a[[7]])
    assert a.mean().abs() < 1.0


def test_pairs_are_teacher_outputs_of_stored_noise(tiny_flow, tmp_path):
    teacher = FlowTeacher(tiny_flow, nfe=8, solver="euler")
    out = generate_pairs(teacher, tmp_path / "pairs", 300, seed=5, batch_size=64, shard_size=128, store_z0=True)
    ds = datasets.load_from_disk(str(out)).with_format("torch")[:]
    assert list(ds) == ["z0", "z1", "index"] and len(ds["z0"]) == 300
    assert ds["z0"].shape == (300, 2)
    torch.testing.assert_close(ds["index"], torch.arange(300))
    torch.testing.assert_close(ds["z0"], row_noise(5, range(300), (2,)), rtol=0, atol=0)
    expected = plain_euler(load_model(tiny_flow).eval(), ds["z0"], 8)
    assert_f32_close(ds["z1"], expected, steps=8)  # generated in batches of 64, checked as one of 300
    info = json.loads(datasets.load_from_disk(str(out)).info.description)
    assert info["seed"] == 5 and info["teacher"]["nfe"] == 8 and info["teacher"]["solver"] == "euler"
    assert info["dtype"] == "float32" and info["round"] == 1 and "reflow_version" in info
    assert info["store_z0"] is True
    assert "Provenance" in (out / "README.md").read_text()
    assert not (tmp_path / "pairs.partial").exists()
    pairs = load_pairs(out)
    assert len(pairs) == 300 and pairs.sample_shape == (2,)


def test_float16_storage(tiny_flow, tmp_path):
    teacher = FlowTeacher(tiny_flow, nfe=2)
    out = generate_pairs(teacher, tmp_path / "p16", 50, dtype="float16", batch_size=16)
    ds = datasets.load_from_disk(str(out))
    assert ds.features["z1"].feature.dtype == "float16"
    assert load_pairs(out).z1.dtype == torch.float32


def test_rerun_with_other_settings_is_refused(tiny_flow, tmp_path):
    teacher = FlowTeacher(tiny_flow, nfe=2)
    generate_pairs(teacher, tmp_path / "p", 40, seed=0, batch_size=16)
    generate_pairs(teacher, tmp_path / "p", 40, seed=0, batch_size=16)  # same settings: complete, no-op
    with pytest.raises(ReflowError, match="seed"):
        generate_pairs(teacher, tmp_path / "p", 40, seed=1, batch_size=16)
    with pytest.raises(ReflowError, match="teacher"):
        generate_pairs(FlowTeacher(tiny_flow, nfe=3), tmp_path / "p", 40, seed=0, batch_size=16)


KILLER = textwrap.dedent(
    """
    import os, signal, sys
    from reflow.pairs import generate_pairs
    from reflow.teachers import FlowTeacher
    model, out, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def progress(done, total):
        if done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    generate_pairs(FlowTeacher(model, nfe=4), out, 1000, seed=2, batch_size=50, shard_size=100, progress=progress)
    """
)


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
def test_sigkill_then_rerun_gives_the_uninterrupted_rows(tiny_flow, tmp_path):
    clean = generate_pairs(
        FlowTeacher(tiny_flow, nfe=4), tmp_path / "clean", 1000, seed=2, batch_size=50, shard_size=100
    )
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", KILLER, str(tiny_flow), str(out), "550"], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    partial = tmp_path / "killed.partial"
    assert not out.exists() and partial.is_dir()
    done = sorted(p.name for p in partial.iterdir() if p.name.startswith("shard-"))
    assert 1 <= len(done) < 10
    generate_pairs(FlowTeacher(tiny_flow, nfe=4), out, 1000, seed=2, batch_size=50, shard_size=100)
    a = datasets.load_from_disk(str(clean)).with_format("numpy")[:]
    b = datasets.load_from_disk(str(out)).with_format("numpy")[:]
    assert len(b["z1"]) == 1000
    for col in ("z1", "index"):
        np.testing.assert_array_equal(a[col], b[col])
    assert not partial.exists()


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
@pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="no torchrun",
)
def test_two_processes_write_the_same_rows_as_one(tiny_flow, tmp_path):
    one = generate_pairs(FlowTeacher(tiny_flow, nfe=4), tmp_path / "one", 500, seed=3, batch_size=50, shard_size=100)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    reflow = os.path.join(os.path.dirname(sys.executable), "reflow")
    cmd = [
        torchrun,
        "--nproc_per_node",
        "2",
        "--master_port",
        free_port(),
        reflow,
        "generate",
        "--teacher",
        str(tiny_flow),
        "--out",
        str(tmp_path / "two"),
        "--num-pairs",
        "500",
        "--nfe",
        "4",
        "--seed",
        "3",
        "--batch-size",
        "50",
        "--shard-size",
        "100",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = datasets.load_from_disk(str(one)).with_format("numpy")[:]
    b = datasets.load_from_disk(str(tmp_path / "two")).with_format("numpy")[:]
    np.testing.assert_array_equal(a["index"], b["index"])
    assert "z0" not in a and "z0" not in b  # rebuilt from (seed, index): the same for one process or two
    assert_f32_close(b["z1"], a["z1"], steps=4)  # other processes, other batches: float32 noise


def test_load_pairs_errors(tmp_path):
    with pytest.raises(ReflowError, match="no such pairs folder"):
        load_pairs(tmp_path / "none")
    datasets.Dataset.from_dict({"a": [1, 2]}).save_to_disk(str(tmp_path / "nocols"))
    with pytest.raises(ReflowError, match="z0"):
        load_pairs(tmp_path / "nocols")
    datasets.Dataset.from_dict({"z0": np.zeros((3, 2)), "z1": np.zeros((3, 3))}).save_to_disk(str(tmp_path / "shape"))
    with pytest.raises(ReflowError, match="must match"):
        load_pairs(tmp_path / "shape")


def test_class_conditional_pairs_labels_and_verify(tmp_path):
    from ddpm_helpers import ddim_reference, save, tiny_unet
    from diffusers import DDPMScheduler

    from reflow.pairs import verify_pairs
    from reflow.teachers import load_teacher

    unet = tiny_unet(num_class_embeds=10)
    folder = save(tmp_path, "cond", unet, DDPMScheduler(clip_sample=True))
    teacher = load_teacher(folder, nfe=4, solver="ddim")
    out = generate_pairs(teacher, tmp_path / "pairs", 40, seed=7, batch_size=16, labels=[2, 5])
    cols = with_z0(datasets.load_from_disk(str(out)))[:]  # z0 rebuilt from (seed, index)
    assert set(cols["label"].tolist()) == {2, 5}
    from reflow.core.noise import row_labels

    torch.testing.assert_close(cols["label"], row_labels(7, range(40), [2, 5]))
    # The reference runs the teacher's first batch (rows 0-15) as one batch, as generation did.
    expected = ddim_reference(folder, unet, cols["z0"][:16], nfe=4, labels=cols["label"][:16])
    assert_f32_close(cols["z1"][:16], expected, steps=4)
    assert load_pairs(out).label is not None
    report = verify_pairs(out, rows=6)
    assert (
        report["rows"] == 6
        and report["z0_stored"] is False
        and report["max_abs_diff_z0"] is None
        and report["max_abs_diff_z1"] <= f32_atol(cols["z1"], steps=4)
    )
    with pytest.raises(ReflowError, match="out of range"):
        generate_pairs(teacher, tmp_path / "bad", 4, labels=[12])


def test_verify_detects_tampering_and_changed_teacher(tiny_flow, tmp_path):
    from reflow.pairs import verify_pairs

    out = generate_pairs(FlowTeacher(tiny_flow, nfe=3), tmp_path / "p", 30, seed=1, batch_size=8)
    assert verify_pairs(out, rows=30)["max_abs_diff_z1"] <= f32_atol(load_pairs(out).z1, steps=3)
    ds = datasets.load_from_disk(str(out))
    tampered = ds.map(lambda r: {"z1": [v + 0.5 for v in r["z1"]]}, features=ds.features)
    tampered.info.description = ds.info.description
    tampered.save_to_disk(str(tmp_path / "t"))
    shutil.copy(out / "reflow_pairs.json", tmp_path / "t" / "reflow_pairs.json")
    # The recorded hashes catch it first; a folder without them (an older one) by the numbers.
    with pytest.raises(ReflowError, match="does not match its recorded sha256"):
        verify_pairs(tmp_path / "t", rows=30)
    record = json.loads((out / "reflow_pairs.json").read_text())
    old = {k: v for k, v in record.items() if k not in ("files", "num_rows")}
    (tmp_path / "t" / "reflow_pairs.json").write_text(json.dumps(old))
    assert verify_pairs(tmp_path / "t", rows=30)["max_abs_diff_z1"] == pytest.approx(
        0.5, abs=f32_atol(load_pairs(out).z1, steps=3)
    )
    copy = tmp_path / "teacher-copy"
    shutil.copytree(tiny_flow, copy)
    moved = json.loads((out / "reflow_pairs.json").read_text())
    moved["teacher"]["teacher"] = str(copy)
    moved["teacher"]["weights_hash"] = "0" * 16
    (out / "reflow_pairs.json").write_text(json.dumps(moved))
    with pytest.raises(ReflowError, match="changed"):
        verify_pairs(out)


def test_push_to_hub_is_called_with_the_repo(tiny_flow, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: calls.append((repo, len(self))))
    generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "p", 20, batch_size=8, push_to_hub="me/pairs")
    assert calls == [("me/pairs", 20)]

    def offline(self, repo, **kw):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(datasets.Dataset, "push_to_hub", offline)
    with pytest.raises(ReflowError, match="pairs are complete on disk"):
        generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "q", 20, batch_size=8, push_to_hub="me/pairs")
    assert (tmp_path / "q" / "reflow_pairs.json").is_file()
    # Rerunning the same command after the failed upload pushes the finished pairs.
    monkeypatch.setattr(datasets.Dataset, "push_to_hub", lambda self, repo, **kw: calls.append((repo, len(self))))
    generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "q", 20, batch_size=8, push_to_hub="me/pairs")
    assert calls == [("me/pairs", 20), ("me/pairs", 20)]


def test_progress_comes_from_inside_a_batch(tiny_flow, tmp_path):
    """One batch of 64 rows through an 8-call teacher reports rows before the batch ends (its share of the calls
    made), never backwards, and never the whole batch before it is stored."""
    seen = []
    generate_pairs(
        FlowTeacher(tiny_flow, nfe=8), tmp_path / "p", 64, batch_size=64, progress=lambda d, t: seen.append(d)
    )
    assert seen[0] == 0 and seen[-1] == 64 and seen == sorted(seen)
    assert 8 in seen and all(d < 64 for d in seen[:-1])  # after the first of 8 calls: an eighth of the rows


def test_verify_reports_the_rows_it_re_runs(tiny_flow, tmp_path):
    from reflow.pairs import verify_pairs

    out = generate_pairs(FlowTeacher(tiny_flow, nfe=4), tmp_path / "p", 20, batch_size=20)
    updates = []
    report = verify_pairs(out, 6, batch_size=4, progress=updates.append)
    assert report["rows"] == 6 and all((u.stage, u.unit, u.total) == ("verify", "rows", 6) for u in updates)
    done = [u.done for u in updates]
    assert done[0] == 0 and 4 in done and done[-1] == 6 and done == sorted(done)
