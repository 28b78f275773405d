"""The student options of `reflow train` / `distill` through the Typer app: MeanFlow, pair truncation,
perceptual losses; their errors are one line."""

import numpy as np
from helpers import cli_ok, one_error_line
from typer.testing import CliRunner

from reflow.cli.app import app

TINY = ("--batch-size", 32, "--log-with", "none")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_train_help_names_the_student_options():
    text = invoke("train", "--help").output
    for flag in ("--objective", "--equal-fraction", "--drop-farthest", "--perceptual-weights"):
        assert flag in text
    text = invoke("distill", "--help").output
    assert "--perceptual-weights" in text and "--drop-farthest" in text and "--equal-fraction" not in text


def test_meanflow_through_the_cli_and_its_errors(tmp_path, tiny_flow):
    from reflow.pairs import generate_pairs
    from reflow.teachers import FlowTeacher

    pairs = generate_pairs(FlowTeacher(tiny_flow, nfe=2), tmp_path / "pairs", 128, batch_size=64)
    out = tmp_path / "mf"
    r = cli_ok(
        "train", "--pairs", pairs, "--init", tiny_flow, "--out", out, "--objective", "meanflow", "--max-steps", 3,
        "--drop-farthest", 0.25, "--equal-fraction", 0.5, *TINY,
    )  # fmt: skip
    assert "3 steps" in r.output
    cli_ok("sample", "--model", out, "--nfe", 1, "--num", 8, "--seed", 0, "--out", tmp_path / "s.npy")
    one_error_line(
        invoke("distill", "--pairs", pairs, "--init", out, "--out", tmp_path / "k1", *TINY), "needs no distillation"
    )
    assert not (tmp_path / "k1").exists()
    assert np.load(tmp_path / "s.npy").shape == (8, 2)
    one_error_line(
        invoke("sample", "--model", out, "--nfe", 2, "--solver", "heun", "--num", 4, "--out", tmp_path / "h.npy"),
        "MeanFlow model: it samples in jumps",
    )
    base = ("train", "--pairs", pairs, "--out", tmp_path / "x", "--max-steps", 2, *TINY)
    one_error_line(invoke(*base, "--objective", "mean"), "--objective must be one of velocity, meanflow")
    one_error_line(invoke(*base, "--drop-farthest", 1), "--drop-farthest must be in [0, 1)")
    one_error_line(invoke(*base, "--loss", "lpips"), "compares images")
    one_error_line(invoke(*base, "--objective", "meanflow", "--loss", "lpips"), "needs --perceptual-weights")
    one_error_line(
        invoke(*base, "--objective", "meanflow", "--loss", "lpips", "--perceptual-weights", tmp_path / "none"),
        "no such file",
    )
    # 2-D pairs are no images: the perceptual network says so before any step
    one_error_line(
        invoke(
            "distill",
            "--pairs",
            pairs,
            "--init",
            tiny_flow,
            "--out",
            tmp_path / "d",
            "--loss",
            "lpips_huber",
            "--perceptual-weights",
            "data/perceptual/digits-lpips",
            *TINY,
        ),  # fmt: skip
        "compares images (C, H, W)",
    )
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()


def test_coupling_pairs_in_memory_and_store_z0_through_the_cli(tmp_path, tiny_flow):
    out = tmp_path / "ot"
    cli_ok("train", "--data", "moons", "--coupling", "ot", "--max-steps", 2, "--out", out, *TINY)
    assert "minibatch OT coupling" in (out / "README.md").read_text()
    one_error_line(
        invoke("train", "--data", "moons", "--coupling", "exact", "--max-steps", 2, "--out", tmp_path / "x", *TINY),
        "--coupling must be one of independent, ot, sinkhorn",
    )
    pairs = tmp_path / "pairs"
    cli_ok("generate", "--teacher", tiny_flow, "--out", pairs, "--num-pairs", 64, "--nfe", 2, "--store-z0")
    assert (pairs / "reflow_pairs.json").read_text().count('"store_z0": true') == 1
    for mode in ("yes", "no"):
        cli_ok("train", "--pairs", pairs, "--pairs-in-memory", mode, "--max-steps", 2, "--out", tmp_path / mode, *TINY)
    cli_ok("distill", "--pairs", pairs, "--init", tmp_path / "yes", "--pairs-in-memory", "no", "--max-steps", 1,
           "--out", tmp_path / "d", *TINY)  # fmt: skip
    one_error_line(
        invoke("train", "--pairs", pairs, "--pairs-in-memory", "maybe", "--out", tmp_path / "m", *TINY),
        "--pairs-in-memory must be one of auto, yes, no",
    )
