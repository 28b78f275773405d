"""How the command line shows progress (cli/progress.py): timestamped lines while a run goes to a file, a live
bar on a terminal, --quiet and --log-file, one process of many, and output that fits 80 columns."""

import json
import os
import pty
import re
import struct
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from reflow.cli.app import app, report_tables
from reflow.cli.progress import Reporter, count, hms
from reflow.core.progress import Update

# a progress line with a rate and an ETA: "2026-01-01 12:00:00 [4/7] round-1/student: 1/4 steps (25%), ..."
ETA_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (\[\d+/\d+\] )?\S+: .*/s, elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d"
)


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text("hidden_dim = 32\nnum_layers = 2\ntime_embed_dim = 16\nlog_with = 'none'\n")
    return path


def cli_env(**extra):
    """The environment of a `reflow` subprocess: ours, without settings that would change how rich renders."""
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TTY_COMPATIBLE", "COLUMNS")}
    return {**env, **extra}


def test_a_run_into_a_file_logs_timestamped_progress_with_an_eta_while_it_runs(tmp_path):
    """Quickstart-sized stages (tiny settings) with stdout and stderr to a file, as under nohup or Slurm: the file
    holds timestamped lines with a rate and an ETA while the run goes on, not only at its end."""
    log, out = tmp_path / "log", tmp_path / "qs"
    args = ["quickstart", "--out", out, "--steps", 4, "--num-pairs", 32, "--eval-samples", 32]
    seen_while_running: list[str] = []
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reflow.cli.app", *map(str, args)], stdout=f, stderr=subprocess.STDOUT, env=cli_env()
        )
        while proc.poll() is None:
            time.sleep(0.25)
            if proc.poll() is None:  # read only while it still runs
                seen_while_running = [ln for ln in log.read_text().splitlines() if ETA_LINE.match(ln)]
    text = log.read_text()
    assert proc.returncode == 0, text[-3000:]
    assert len(seen_while_running) >= 5, text
    # the stages of the run, each with its place in it and the run's own ETA
    stages = {m.group(1) for m in (re.search(r"\] (\S+): ", ln) for ln in seen_while_running) if m}
    assert {"heldout", "teacher/report", "round-1/report"} <= stages, stages
    assert all("; run " in ln and ln.count("ETA") == 2 for ln in seen_while_running)
    # spread over the run, not written at its end
    stamps = [time.mktime(time.strptime(ETA_LINE.match(ln).group(1), "%Y-%m-%d %H:%M:%S")) for ln in seen_while_running]
    assert max(stamps) - min(stamps) >= 5
    assert "\x1b[" not in text and "\r" not in text  # nothing that moves the cursor
    assert re.search(r"\[4/7\] round-1/student: done, 4 steps in \d+:\d\d:\d\d", text)
    assert re.search(r"run: 7 stages done in \d+:\d\d:\d\d", text)
    # then the final figures and pictures
    assert "distill-k1" in text and "picture:" in text
    assert (out / "distill" / "report" / "samples_student.png").is_file()
    assert max(len(line) for line in text.splitlines() if line[:1] in "┏┃┡│└") <= 80  # the tables


def test_a_terminal_gets_a_live_bar(tmp_path, tiny_toml):
    """The same command on a terminal (an 80x24 pty): rich's live bar, redrawn in place, with an ETA."""
    master, slave = pty.openpty()
    import fcntl
    import termios

    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    args = ["train", "--data", "moons", "--out", tmp_path / "m", "--max-steps", 30, "--batch-size", 64]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reflow.cli.app", *map(str, args), "--config", str(tiny_toml)],
        stdin=slave, stdout=slave, stderr=slave, env=cli_env(TERM="xterm-256color"),
    )  # fmt: skip
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait() == 0
    screen = b"".join(chunks).decode(errors="replace")
    assert "\x1b[" in screen and "━" in screen  # redrawn in place: cursor control and a bar
    assert re.search(r"30/30 steps", screen) and "done" in screen
    assert not any(ETA_LINE.match(ln) for ln in screen.splitlines())  # no log lines on a terminal
    assert "wrote" in screen


def invoke(*args, **env):
    return CliRunner(env=env or None).invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_quiet_log_file_and_other_processes(tmp_path, tiny_toml):
    train = ["train", "--data", "moons", "--max-steps", 6, "--batch-size", 32, "--config", tiny_toml]
    # not a terminal: timestamped lines on stderr, then the result
    r = invoke(*train, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert re.match(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train: started: 6 steps$", lines[0]), r.output
    assert any(re.search(r"train: done, 6 steps in", ln) for ln in lines) and "wrote" in lines[-1]
    # --quiet: the result only; --log-file: the lines and the result, appended
    log = tmp_path / "reflow.log"
    r = invoke("--quiet", "--log-file", log, *train, "--out", tmp_path / "b")
    assert r.exit_code == 0 and r.output.startswith(f"wrote {tmp_path / 'b'}: 6 steps") and r.output.count("\n") == 1
    first = log.read_text()
    assert "train: started: 6 steps" in first and "train: done" in first and f"wrote {tmp_path / 'b'}" in first
    r = invoke("-q", "--log-file", log, "train", "--data", tmp_path / "missing.npy", "--out", tmp_path / "c")
    assert r.exit_code == 2 and r.output.startswith("error:")
    assert log.read_text().startswith(first) and "error: no such file" in log.read_text()
    # a process other than the main one prints nothing (its result goes to rank 0's output): local rank 1,
    # or local rank 0 of another node (rank 1 of two one-process nodes)
    r = invoke(*train, "--out", tmp_path / "d", LOCAL_RANK="1")
    assert r.exit_code == 0 and r.output == ""
    r = invoke(*train, "--out", tmp_path / "e", LOCAL_RANK="0", RANK="1")
    assert r.exit_code == 0 and r.output == ""


def test_line_log_cadence():
    """Lines: a stage's start, its first rate, every tenth, its end; a stage found done says so; a run of
    several stages adds its own share and ETA, and a closing line."""
    import io

    stream = io.StringIO()
    report = Reporter(None, [stream])
    report(Update("heldout", 8, 8, "pairs", "already done", index=1, count=2, overall=0.2))
    report(Update("round-1/student", 0, 100, "steps", index=2, count=2, overall=0.2))
    for step in range(1, 101):
        time.sleep(0.001)
        report(
            Update(
                "round-1/student",
                step,
                100,
                "steps",
                f"loss {1 / step:.3g}",
                index=2,
                count=2,
                overall=0.2 + 0.008 * step,
            )
        )
    report.close(finished=True)
    lines = [ln.split(" ", 2)[2] for ln in stream.getvalue().splitlines()]  # without the date and time
    assert lines[0] == "[1/2] heldout: already done" and lines[1] == "[2/2] round-1/student: started: 100 steps"
    assert lines[2].startswith("[2/2] round-1/student: 1/100 steps (1%), ") and "ETA 0:00:0" in lines[2]
    percents = [int(m.group(1)) for ln in lines[3:-2] for m in [re.search(r"\((\d+)%\)", ln)]]
    assert percents == [11, 21, 31, 41, 51, 61, 71, 81, 91]
    assert lines[-2].startswith("[2/2] round-1/student: done, 100 steps in 0:00:0") and "loss 0.01" in lines[-2]
    assert "; run 100%, ETA 0:00:00" in lines[-2] and re.match(r"run: 2 stages done in 0:00:0\d$", lines[-1])


def test_counts_and_times_read_at_a_glance():
    assert [count(n) for n in (7, 8192, 99_999, 412_345, 1_234_567)] == ["7", "8,192", "99,999", "412.3k", "1.23M"]
    assert [hms(s) for s in (None, 0, 59.6, 3725)] == ["-:--:--", "0:00:00", "0:01:00", "1:02:05"]


def test_report_tables_fit_80_columns():
    """Five NFEs with spreads, long solver names and the CPU column: every table fits 80 columns with its
    headers whole (no ellipsis)."""
    from io import StringIO

    from rich.console import Console

    nfes = [1, 2, 4, 8, 16]
    cell = {"w2": 2.4725, "w2_std": 0.012, "fd_digits": 1.12, "fd_digits_std": 0.03, "mse_teacher": 0.0244}
    models = [
        {"name": name, "nfe": {str(k): cell for k in nfes}, "solver": solver, "straightness": 0.41, "curvature": 16.3,
         "adaptive_nfe": 74, "cpu_minutes": 5.6, "reference_solve": {"solver": "ddim", "nfe": 50, **cell}}
        for name, solver in [("teacher", "ddim (the checkpoint's scheduler), guidance 1.5"),
                             ("round-1", "euler (its scheduler's grid)"), ("distill-k1", "euler (uniform grid)")]
    ]  # fmt: skip
    metrics = {"settings": {"nfes": nfes}, "models": models}
    out = StringIO()
    console = Console(file=out, width=80, color_system=None)
    for table in report_tables(metrics):
        console.print(table)
    text = out.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text, text
    for header in ("NFE 16", "reference", "adaptive", "CPU min", "(total)", "distill-k1", "2.4725", "± 0.012"):
        assert header in text, (header, text)


@pytest.mark.parametrize("command", [[], ["train"], ["distill"], ["generate"], ["verify-pairs"], ["sample"],
                                     ["eval"], ["rounds"], ["quickstart"]])  # fmt: skip
def test_help_reads_at_80_columns(command):
    r = invoke(*command, "--help", COLUMNS="80")
    assert r.exit_code == 0, r.output
    assert max(len(line) for line in r.output.splitlines()) <= 80, r.output
    assert "<bool>" not in r.output and "…" not in r.output
    options = re.findall(r"--[a-z][a-z-]+", r.output)
    assert "--help" in options
    if command == ["generate"]:
        assert {"--clipped-model-output", "--store-embeddings", "--store-prompts-only"} <= set(options)
    if not command:
        assert {"--quiet", "--log-file", "--version"} <= set(options)


def test_eval_takes_the_diagnostics_sample_count(tmp_path, tiny_flow):
    r = invoke("eval", "--model", tiny_flow, "--reference", "moons", "--nfe", "1", "--num-samples", 50, "--seeds", "1",
               "--diagnostics-samples", 20, "--no-adaptive", "--no-figures", "--out", tmp_path / "r")  # fmt: skip
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["settings"]["diagnostics_samples"] == 20 and metrics["models"][0]["straightness_samples"] == 20
    assert re.search(r"eval: done, [\d,]+ calls in", r.output)
