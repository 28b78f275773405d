"""Pair generation and verification under abuse: concurrent runs, kills at every step, resumes with other
settings, impossible options, damaged folders, a full disk. Each failure the user can fix is one line."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import datasets
import numpy as np
import pytest
from helpers import f32_atol, one_error_line
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.folders.locks import acquire
from reflow.pairs import PairsReader, generate_pairs, load_pairs, verify_pairs
from reflow.teachers import FlowTeacher

runner = CliRunner()
HOST = socket.gethostname().replace("-", "_")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def teacher(model):
    return FlowTeacher(model, nfe=2)


def rows(path):
    return datasets.load_from_disk(str(path)).with_format("numpy")[:]


class Stop(Exception):
    pass


def stop_after(n):
    def progress(done, total):
        if done >= n:
            raise Stop

    return progress


def debris(folder):
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name or p.name.endswith(".lock"))


# 1. concurrent runs --------------------------------------------------------------------------------------

SLOW = textwrap.dedent(
    """
    import pathlib, sys, time
    from reflow.pairs import generate_pairs
    from reflow.teachers import FlowTeacher
    model, out, flag = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3])
    def progress(done, total):
        flag.touch()
        time.sleep(120)
    generate_pairs(FlowTeacher(model, nfe=2), out, 200, batch_size=50, shard_size=100, progress=progress)
    """
)


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
def test_second_run_is_refused_while_the_first_holds_the_lock_then_takes_over_when_it_dies(tiny_flow, tmp_path):
    out, flag = tmp_path / "p", tmp_path / "started"
    proc = subprocess.Popen([sys.executable, "-c", SLOW, str(tiny_flow), str(out), str(flag)], stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline
            time.sleep(0.1)
        lock = tmp_path / ".p.lock"
        assert json.loads(lock.read_text())["pid"] == proc.pid
        r = invoke("generate", "--teacher", tiny_flow, "--out", out, "--num-pairs", 200, "--nfe", 2)
        one_error_line(r, f"pid {proc.pid} on host {HOST}", "wait for it to finish", str(lock))
        with pytest.raises(ReflowError, match=f"pid {proc.pid}"):
            generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    finally:
        proc.kill()
        proc.wait()
    # The owner is dead: the next run takes its lock over, finishes, and releases it.
    generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    assert len(rows(out)["z1"]) == 200
    assert debris(tmp_path) == [] and not (tmp_path / "p.partial").exists()


def test_stale_lock_is_taken_over_and_a_live_or_remote_one_is_not(tiny_flow, tmp_path):
    out, lock = tmp_path / "p", tmp_path / ".p.lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": HOST, "started": time.time(), "command": "generate"}))
    generate_pairs(teacher(tiny_flow), out, 20, batch_size=8)
    assert not lock.exists()
    # Another host: it cannot be checked from here, so it is respected and the message names the fix.
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time(), "command": "generate"}))
    with pytest.raises(ReflowError, match=f"pid 1 on host elsewhere.*delete {lock}"):
        generate_pairs(teacher(tiny_flow), tmp_path / "p", 20, batch_size=8)
    # Our own pid, not held by us: a restarted container gave us the dead owner's pid.
    lock.write_text(json.dumps({"pid": os.getpid(), "host": HOST, "started": 0, "token": "old"}))
    generate_pairs(teacher(tiny_flow), out, 20, batch_size=8)
    assert not lock.exists()
    # An empty lock is being written by its owner (refused for a while), or was left by one killed then.
    lock.write_text("")
    with pytest.raises(ReflowError, match=f"could not take the lock {lock}.*delete it if no run is going"):
        _acquire_quickly(lock)
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    with acquire(lock, "p", "generate") as held:
        assert json.loads(lock.read_text())["token"] == held.token
        with pytest.raises(ReflowError, match=f"pid {os.getpid()}"):
            acquire(lock, "p", "generate")  # one run per output, even within one process
    assert not lock.exists()


def _acquire_quickly(lock):
    import reflow.folders.locks as locks

    sleep, locks.time.sleep = locks.time.sleep, lambda s: None
    try:
        return acquire(lock, "p", "generate")
    finally:
        locks.time.sleep = sleep


def test_lock_is_released_when_a_run_fails(tiny_flow, tmp_path):
    out = tmp_path / "p"
    with pytest.raises(Stop):
        generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100, progress=stop_after(150))
    assert (tmp_path / "p.partial" / "shard-00000").is_dir()
    assert debris(tmp_path) == []
    generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    assert len(rows(out)["z1"]) == 200 and debris(tmp_path) == []


# 2. leftovers of killed runs ------------------------------------------------------------------------------

KILL_AT = textwrap.dedent(
    """
    import os, shutil, signal, sys
    import reflow.pairs.writer
    from reflow.pairs import generate_pairs
    from reflow.teachers import FlowTeacher
    model, out, where = sys.argv[1], sys.argv[2], sys.argv[3]
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    if where == "join":  # inside the final join, after the data files are written
        reflow.pairs.writer.atomic_write_text = die
    else:  # after the final rename, before PAIRS.partial is removed
        rmtree = shutil.rmtree
        shutil.rmtree = lambda p, *a, **k: die() if str(p).endswith(".partial") else rmtree(p, *a, **k)
    generate_pairs(FlowTeacher(model, nfe=2), out, 200, batch_size=50, shard_size=100)
    """
)


@pytest.mark.slow  # SIGKILL / torchrun: runs in CI's second step (pytest -m slow)
@pytest.mark.parametrize("where", ["join", "after-rename"])
def test_a_kill_in_the_final_join_leaves_nothing_the_next_run_trips_on(tiny_flow, tmp_path, where):
    out = tmp_path / "p"
    proc = subprocess.run([sys.executable, "-c", KILL_AT, str(tiny_flow), str(out), where], capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert (tmp_path / ".p.lock").exists()  # the killed owner's, now stale
    if where == "join":
        assert not out.exists() and any(p.name.startswith(".p.tmp-") for p in tmp_path.iterdir())
    else:
        assert (out / "reflow_pairs.json").is_file() and (tmp_path / "p.partial" / "run.json").is_file()
    generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]
    assert len(rows(out)["z1"]) == 200 and verify_pairs(out, rows=4)["max_abs_diff_z1"] <= f32_atol(
        rows(out)["z1"], steps=4
    )


def test_resume_removes_dead_writers_half_shards_and_keeps_live_ones(tiny_flow, tmp_path):
    out, work = tmp_path / "p", tmp_path / "p.partial"
    with pytest.raises(Stop):
        generate_pairs(teacher(tiny_flow), out, 300, batch_size=50, shard_size=100, progress=stop_after(150))
    dead = work / f".shard-00001.tmp-{HOST}-{dead_pid()}-0123abcd"
    live = work / f".shard-00002.tmp-{HOST}-{os.getppid()}-0123abcd"
    for d in (dead, live):
        d.mkdir()
        (d / "data-00000-of-00001.arrow").write_bytes(b"half")
    with pytest.raises(Stop):
        generate_pairs(teacher(tiny_flow), out, 300, batch_size=50, shard_size=100, progress=stop_after(250))
    assert not dead.exists() and live.is_dir()
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-00000", "shard-00001"]


# 3. a resume continues only the run it was ---------------------------------------------------------------


def test_resume_with_other_batch_size_or_device_is_refused_and_a_complete_folder_is_kept(tiny_flow, tmp_path):
    clean = generate_pairs(teacher(tiny_flow), tmp_path / "clean", 200, batch_size=50, shard_size=100)
    out, work = tmp_path / "p", tmp_path / "p.partial"
    with pytest.raises(Stop):
        generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100, progress=stop_after(150))
    with pytest.raises(ReflowError, match="batch_size: recorded 50, now 25.*delete .*p.partial to start over"):
        generate_pairs(teacher(tiny_flow), out, 200, batch_size=25, shard_size=100)
    run = json.loads((work / "run.json").read_text())
    assert run["batch_size"] == 50 and run["device"] == "cpu" and "torch" in run["software"]
    for key, value in (("device", "cuda"), ("software", {**run["software"], "torch": "0.0"}), ("batch_size", None)):
        (work / "run.json").write_text(json.dumps({**run, key: value}))
        with pytest.raises(ReflowError, match=f"other settings \\({key}"):
            generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    (work / "run.json").write_text(json.dumps(run))
    generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    a, b = rows(clean), rows(out)
    for col in ("z1", "index"):
        np.testing.assert_array_equal(a[col], b[col])
    # A complete folder does no work on a rerun, so another batch size (and so shard size) returns it as it is.
    before = {f.name: f.stat().st_mtime_ns for f in out.iterdir()}
    assert generate_pairs(teacher(tiny_flow), out, 200, batch_size=25) == out
    assert {f.name: f.stat().st_mtime_ns for f in out.iterdir()} == before
    with pytest.raises(ReflowError, match="other settings \\(seed"):
        generate_pairs(teacher(tiny_flow), out, 200, seed=1, batch_size=50)


def test_partial_without_run_json_or_with_a_damaged_one_is_refused(tiny_flow, tmp_path):
    out, work = tmp_path / "p", tmp_path / "p.partial"
    with pytest.raises(Stop):
        generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100, progress=stop_after(150))
    (work / "run.json").write_text("{")
    with pytest.raises(ReflowError, match="run.json is damaged; delete"):
        generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)
    (work / "run.json").unlink()
    with pytest.raises(ReflowError, match="holds shards but no run.json"):
        generate_pairs(teacher(tiny_flow), out, 200, batch_size=50, shard_size=100)


# 4. impossible options, refused before any file is made --------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ("--shard-size", -4),
        ("--shard-size", 0),
        ("--nfe", 0),
        ("--num-pairs", 0),
        ("--num-pairs", -3),
        ("--batch-size", 0),
    ],
)
def test_impossible_options_are_one_line_before_any_file(tiny_flow, tmp_path, option):
    args = {"--teacher": tiny_flow, "--out": tmp_path / "p", "--num-pairs": 20, "--nfe": 2, **dict([option])}
    r = invoke("generate", *[x for kv in args.items() for x in kv])
    one_error_line(r, option[0], "at least 1", f"got {option[1]}")
    assert list(tmp_path.iterdir()) == []


def test_library_refuses_the_same_options(tiny_flow, tmp_path):
    for kwargs in ({"shard_size": 0}, {"shard_size": -4}, {"batch_size": 0}, {"num_pairs": 0}):
        with pytest.raises(ReflowError, match="at least 1"):
            generate_pairs(teacher(tiny_flow), tmp_path / "p", **{"num_pairs": 20, **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_out_inside_or_equal_to_the_teacher_is_refused(tiny_flow, tmp_path):
    import shutil

    model = shutil.copytree(tiny_flow, tmp_path / "model")
    before = sorted(p.name for p in model.iterdir())
    for out in (model, model / "pairs"):
        r = invoke("generate", "--teacher", model, "--out", out, "--num-pairs", 20, "--nfe", 2)
        one_error_line(r, "input", "pick an output outside")
    assert sorted(p.name for p in model.iterdir()) == before
    # A folder of someone else's files is not ours to write.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    r = invoke("generate", "--teacher", model, "--out", tmp_path / "mine", "--num-pairs", 20, "--nfe", 2)
    one_error_line(r, "not written by `reflow generate`")
    # An empty folder made for the output is used.
    (tmp_path / "empty").mkdir()
    generate_pairs(teacher(model), tmp_path / "empty", 20, batch_size=8)
    assert len(load_pairs(tmp_path / "empty")) == 20


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_out_is_refused_first(tiny_flow, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        r = invoke("generate", "--teacher", tiny_flow, "--out", ro / "p", "--num-pairs", 20, "--nfe", 2)
        one_error_line(r, "cannot write")
    finally:
        ro.chmod(0o700)


# 5. a complete folder is checked before it is trusted ----------------------------------------------------


@pytest.fixture
def pairs(tiny_flow, tmp_path):
    return generate_pairs(teacher(tiny_flow), tmp_path / "p", 300, batch_size=50, shard_size=100)


def data_files(path):
    return sorted(path.glob("data-*.arrow"))


def test_records_row_count_and_file_hashes(pairs):
    record = json.loads((pairs / "reflow_pairs.json").read_text())
    assert record["num_rows"] == 300 and record["batch_size"] == 50
    names = {f.name for f in data_files(pairs)} | {"state.json", "dataset_info.json"}
    assert set(record["files"]) == names
    f = data_files(pairs)[1]
    assert record["files"][f.name]["bytes"] == f.stat().st_size and len(record["files"][f.name]["sha256"]) == 64
    assert verify_pairs(pairs, rows=4)["files_checked"] == len(names)


def test_truncated_or_missing_data_file_is_damage_not_a_finished_run(tiny_flow, pairs):
    f = data_files(pairs)[1]
    size = f.stat().st_size
    with open(f, "r+b") as fh:
        fh.truncate(1000)
    damaged = f"{pairs} is damaged: file {f.name} has 1000 bytes, expected {size}"
    r = invoke("generate", "--teacher", tiny_flow, "--out", pairs, "--num-pairs", 300, "--nfe", 2, "--batch-size", 50)
    one_error_line(r, damaged, "rerun `reflow generate`")
    for open_ in (PairsReader, load_pairs, verify_pairs):
        with pytest.raises(ReflowError, match=damaged):
            open_(pairs)
    for g in data_files(pairs):
        g.unlink()  # shard-less
    with pytest.raises(ReflowError, match="is damaged: file data-00000-of-00003.arrow is missing"):
        generate_pairs(teacher(tiny_flow), pairs, 300, batch_size=50, shard_size=100)


def test_older_folders_without_records_still_load(tiny_flow, pairs):
    record = json.loads((pairs / "reflow_pairs.json").read_text())
    old = {k: v for k, v in record.items() if k not in ("files", "num_rows", "batch_size", "device", "software")}
    (pairs / "reflow_pairs.json").write_text(json.dumps(old))
    assert len(PairsReader(pairs)) == 300
    assert generate_pairs(teacher(tiny_flow), pairs, 300, batch_size=50, shard_size=100) == pairs
    assert verify_pairs(pairs, rows=4)["files_checked"] == 0
    # Without sizes to compare, the rows still are: a rerun does not call a short folder complete.
    f = data_files(pairs)[2]
    f.unlink()
    state = json.loads((pairs / "state.json").read_text())
    state["_data_files"] = state["_data_files"][:2]
    (pairs / "state.json").write_text(json.dumps(state))
    with pytest.raises(ReflowError, match="holds 200 rows, expected 300"):
        generate_pairs(teacher(tiny_flow), pairs, 300, batch_size=50, shard_size=100)


def test_same_size_corruption_is_caught_by_verify(pairs):
    f = data_files(pairs)[0]
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    assert len(PairsReader(pairs)) == 300  # the cheap check at open: sizes and rows
    r = invoke("verify-pairs", pairs)
    one_error_line(r, f"file {f.name} does not match its recorded sha256")


# 6. verify-pairs on broken folders: one line each -------------------------------------------------------


def test_verify_pairs_broken_folders_are_one_line(pairs, tmp_path):
    import shutil

    def broken(name, damage):
        path = shutil.copytree(pairs, tmp_path / name)
        damage(path)
        return path

    def truncate(path):
        with open(data_files(path)[0], "r+b") as fh:
            fh.truncate(500)

    def strip_records(path):
        record = json.loads((path / "reflow_pairs.json").read_text())
        (path / "reflow_pairs.json").write_text(json.dumps({k: v for k, v in record.items() if k != "files"}))

    def write_record(text):
        return lambda path: (path / "reflow_pairs.json").write_text(text)

    record = json.loads((pairs / "reflow_pairs.json").read_text())
    cases = {
        "truncated": (truncate, "has 500 bytes, expected"),
        "deleted": (lambda p: data_files(p)[1].unlink(), "file data-00001-of-00003.arrow is missing"),
        "invalid-json": (write_record("{not json"), "reflow_pairs.json is not valid JSON"),
        "empty-json": (write_record(""), "reflow_pairs.json is not valid JSON"),
        "list-json": (write_record("[]"), "reflow_pairs.json is not valid JSON"),
        "no-teacher": (
            write_record(json.dumps({k: v for k, v in record.items() if k != "teacher"})),
            "reflow_pairs.json lacks teacher",
        ),
        "old-truncated": (lambda p: (strip_records(p), truncate(p)), "does not open"),
        "old-deleted": (lambda p: (strip_records(p), data_files(p)[1].unlink()), "does not open"),
        "no-record": (lambda p: (p / "reflow_pairs.json").unlink(), "has no reflow_pairs.json"),
    }
    for name, (damage, needle) in cases.items():
        path = broken(name, damage)
        one_error_line(invoke("verify-pairs", path), needle)
    one_error_line(invoke("verify-pairs", tmp_path / "nothing"), "no such pairs folder")
    r = invoke("verify-pairs", pairs, "--rows", 4)
    assert r.exit_code == 0 and "files: 5 match their recorded sha256" in r.output, r.output


# 7. a full disk during a shard write ---------------------------------------------------------------------


def test_full_disk_during_a_shard_leaves_no_half_shard_and_releases_the_lock(tiny_flow, tmp_path, monkeypatch):
    save = datasets.Dataset.save_to_disk
    calls = []

    def full_on_second(self, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            with open(os.path.join(path, "data-00000-of-00001.arrow"), "wb") as f:
                f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, path, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "save_to_disk", full_on_second)
    out, work = tmp_path / "p", tmp_path / "p.partial"
    r = invoke(
        "generate", "--teacher", tiny_flow, "--out", out, "--num-pairs", 300, "--nfe", 2, "--batch-size", 50,
        "--shard-size", 100,
    )  # fmt: skip
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]  # after the progress bar
    assert len(errors) == 1 and "No space left on device" in errors[0] and "rerun the same command" in errors[0]
    assert sorted(p.name for p in work.iterdir()) == ["run.json", "shard-00000"]
    assert debris(tmp_path) == [] and not out.exists()
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save)
    generate_pairs(teacher(tiny_flow), out, 300, batch_size=50, shard_size=100)
    assert len(PairsReader(out)) == 300 and sorted(p.name for p in tmp_path.iterdir()) == ["p"]
