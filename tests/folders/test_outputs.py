"""The output rule (reflow/io.py) and the commands that follow it: an output never equals an input, an
existing output is used only when this command wrote it, writability is checked before the work, a killed
run's debris is removed, and a full disk or read-only file system is one line with exit code 2."""

import errno
import os
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.folders.io import MARKER, atomic_dir, check_writable, claim_output, clean_debris, mark_output

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_line_error(r, *words):
    """Exit code 2, one error line naming ``words``, no traceback."""
    assert r.exit_code == 2, r.output
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.output.rstrip().splitlines()[-1].startswith("error:"), r.output
    assert "Traceback" not in r.output
    text = " ".join(r.output.split())
    for w in words:
        assert w in text, (w, r.output)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs (real ENOSPC / EROFS); skipped where mounting is not allowed."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# --- the rule itself ---------------------------------------------------------------------------------


def test_claim_output_rules(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    with pytest.raises(ReflowError, match="is \\(inside\\) the input"):
        claim_output(model, "eval", inputs=[model])
    with pytest.raises(ReflowError, match="is \\(inside\\) the input"):
        claim_output(model / "report", "eval", inputs=[model])
    with pytest.raises(ReflowError, match="was not written by `reflow eval`"):
        claim_output(model, "eval")  # exists, not ours
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ReflowError, match="is a file"):
        claim_output(tmp_path / "file.txt", "eval")
    with pytest.raises(ReflowError, match="is a folder"):
        claim_output(model, "sample", kind="file")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim_output(empty, "eval") == empty  # an empty folder counts as new
    assert claim_output(tmp_path / "new" / "deeper", "eval")  # parents are made later
    mark_output(empty, "eval")
    (empty / "metrics.json").write_text("{}")
    claim_output(empty, "eval")  # our own earlier output
    with pytest.raises(ReflowError, match="not written by `reflow rounds`"):
        claim_output(empty, "rounds")  # another command's output
    samples = tmp_path / "s.npy"
    np.save(samples, np.zeros(3))
    with pytest.raises(ReflowError, match="not written by `reflow sample`"):
        claim_output(samples, "sample", kind="file")
    (tmp_path / "t.reflow.json").write_text("my notes")  # a file of the user's where t.npy's marker would go
    with pytest.raises(ReflowError, match="is not reflow's record"):
        claim_output(tmp_path / "t.npy", "sample", kind="file")
    assert (tmp_path / "t.reflow.json").read_text() == "my notes"
    mark_output(samples, "sample", kind="file")
    assert (tmp_path / "s.reflow.json").is_file()
    claim_output(samples, "sample", kind="file")
    legacy = tmp_path / "old-run"
    legacy.mkdir()
    (legacy / "manifest.json").write_text("{}")
    claim_output(legacy, "rounds", legacy=("manifest.json",))
    with pytest.raises(ReflowError, match="is a file, not a folder"):
        check_writable(tmp_path / "file.txt" / "below")


def test_check_writable_fails_before_work(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):
        if "w" in mode and "write-probe" in str(file):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", read_only)
    with pytest.raises(ReflowError, match="cannot write in .*Read-only file system"):
        check_writable(tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_read_only_mount_is_refused_before_work(small_fs, tiny_flow):
    subprocess.run(["mount", "-o", "remount,ro", str(small_fs)], check=True)
    r = run("sample", "--model", tiny_flow, "--num", 10, "--out", small_fs / "s.npy")
    one_line_error(r, "cannot write in", "Read-only file system")
    r = run("eval", "--model", tiny_flow, "--reference", "checkerboard", "--out", small_fs / "r")
    one_line_error(r, "cannot write in", "Read-only file system")


def test_clean_debris_removes_dead_writers_only(tmp_path):
    out = tmp_path / "pairs"
    host = __import__("socket").gethostname().replace("-", "_")
    dead = tmp_path / f".pairs.tmp-{host}-{dead_pid()}-abcd1234"
    live = tmp_path / f".pairs.tmp-{host}-{os.getpid()}-abcd1234"
    old_style = tmp_path / ".pairs.tmp.png"
    other_host = tmp_path / ".pairs.tmp-elsewhere-1-abcd1234"
    unrelated = tmp_path / ".pairsX.tmp-x-1-y"
    for p in (dead, live, other_host):
        p.mkdir()
    old_style.write_text("x")
    unrelated.write_text("x")
    removed = clean_debris(out)
    assert sorted(removed) == sorted([dead, old_style])
    assert live.exists() and other_host.exists() and unrelated.exists()


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


# --- sample ------------------------------------------------------------------------------------------


def test_sample_never_overwrites_inputs_or_foreign_files(tmp_path, tiny_flow):
    noise = tmp_path / "z0.npy"
    np.save(noise, np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32))
    before = noise.read_bytes()
    one_line_error(run("sample", "--model", tiny_flow, "--noise", noise, "--out", noise), "input")
    assert noise.read_bytes() == before
    one_line_error(run("sample", "--model", tiny_flow, "--num", 5, "--out", tiny_flow / "x.npy"), "input")
    foreign = tmp_path / "mine.npy"
    np.save(foreign, np.ones(4))
    one_line_error(run("sample", "--model", tiny_flow, "--num", 5, "--out", foreign), "not written by")
    assert np.load(foreign).tolist() == [1, 1, 1, 1]
    folder = tmp_path / "d.npy"
    folder.mkdir()
    one_line_error(run("sample", "--model", tiny_flow, "--num", 5, "--out", folder), "is a folder")
    out = tmp_path / "s.npy"
    assert run("sample", "--model", tiny_flow, "--noise", noise, "--out", out).exit_code == 0
    assert run("sample", "--model", tiny_flow, "--num", 3, "--out", out).exit_code == 0  # its own output
    assert np.load(out).shape == (3, 2)


def test_sample_rejects_bad_noise_and_settings(tmp_path, tiny_flow):
    out = tmp_path / "s.npy"
    empty = tmp_path / "empty.npy"
    np.save(empty, np.zeros((0, 2), np.float32))
    one_line_error(run("sample", "--model", tiny_flow, "--noise", empty, "--out", out), "no rows")
    nan = tmp_path / "nan.npy"
    np.save(nan, np.array([[0.0, np.nan], [1.0, 2.0]], np.float32))
    one_line_error(run("sample", "--model", tiny_flow, "--noise", nan, "--out", out), "NaN or inf")
    one_line_error(run("sample", "--model", tiny_flow, "--num", 4, "--batch-size", 0, "--out", out), "--batch-size")
    assert not out.exists()
    r = run("sample", "--model", tiny_flow, "--num", 4, "--allow-pickle", "--out", out)
    assert r.exit_code == 0, r.output


def test_disk_full_is_one_line(tmp_path, tiny_flow, monkeypatch):
    import reflow.folders.io

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(reflow.folders.io, "atomic_write_bytes", full)
    r = run("sample", "--model", tiny_flow, "--num", 4, "--out", tmp_path / "s.npy")
    one_line_error(r, "No space left on device", "rerun")


def test_full_disk_sample_and_eval_leave_no_debris(small_fs, tiny_flow):
    out = small_fs / "s.npy"
    r = run("sample", "--model", tiny_flow, "--num", 200_000, "--out", out)  # 1.6 MB > 256 KiB
    one_line_error(r, "No space left on device")
    assert list(small_fs.iterdir()) == []
    ballast = small_fs / "ballast"
    ballast.write_bytes(b"\0" * (256 * 1024 - 12 * 1024))  # leave room for the probe, the marker, not a PNG
    report = small_fs / "report"
    r = run(
        "eval",
        "--model",
        tiny_flow,
        "--reference",
        "checkerboard",
        "--out",
        report,
        "--nfe",
        "1",
        "--num-samples",
        50,
        "--seeds",
        1,
        "--no-adaptive",
    )
    one_line_error(r, "No space left on device")
    leftovers = [p.name for p in report.rglob(".*") if p.name != MARKER] if report.exists() else []
    assert leftovers == []


# --- eval and rounds ---------------------------------------------------------------------------------


def test_eval_checks_its_output_before_the_work(tmp_path, tiny_flow):
    before = sorted(p.name for p in tiny_flow.iterdir())
    r = run("eval", "--model", tiny_flow, "--reference", "checkerboard", "--out", tiny_flow)
    one_line_error(r, "input")
    assert sorted(p.name for p in tiny_flow.iterdir()) == before
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    one_line_error(run("eval", "--model", tiny_flow, "--reference", "checkerboard", "--out", a_file), "is a file")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "report.md").write_text("someone's notes")
    one_line_error(run("eval", "--model", tiny_flow, "--reference", "checkerboard", "--out", theirs), "not written")
    assert (theirs / "report.md").read_text() == "someone's notes"
    mine = tmp_path / "mine"
    args = ("--reference", "checkerboard", "--nfe", "1", "--num-samples", 50, "--seeds", 1, "--no-figures")
    for _ in range(2):  # the second run replaces its own earlier report
        r = run("eval", "--model", tiny_flow, *args, "--out", mine, "--allow-pickle")
        assert r.exit_code == 0, r.output
    assert (mine / "metrics.json").is_file() and (mine / MARKER).is_file()


def test_rounds_refuses_an_unrelated_folder(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('rounds = 1\n[teacher]\ndata = "moons"\n[train]\nmax_steps = 2\n[eval]\nnfes = [1]\n')
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "holiday.jpg").write_text("x")
    one_line_error(run("rounds", "--config", recipe, "--out", unrelated), "not written by `reflow rounds`")
    assert [p.name for p in unrelated.iterdir()] == ["holiday.jpg"]


def test_full_disk_during_training_is_one_line(small_fs):
    (small_fs / "ballast").write_bytes(b"\0" * (256 * 1024 - 48 * 1024))
    out = small_fs / "m"
    args = ("--data", "moons", "--max-steps", 6, "--batch-size", 16, "--checkpoint-every", 3, "--log-with", "none")
    r = run("train", *args, "--out", out)  # a 256-wide MLP checkpoint (~0.8 MB) does not fit
    one_line_error(r, "No space left on device", "rerun")
    leftovers = [p.name for p in small_fs.rglob("*") if p.name != "ballast"]
    assert all(".tmp" not in name for name in leftovers), leftovers
    assert not out.exists()
