"""Every command end to end through the Typer app, on tiny budgets."""

import json

import datasets
import numpy as np
import pytest
from helpers import assert_f32_close, one_error_line
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.core.noise import row_noise
from reflow.core.solvers import solve
from reflow.models.velocity import load_model

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.toml"
    path.write_text("hidden_dim = 32\nnum_layers = 2\ntime_embed_dim = 16\nlog_every = 5\n")
    return path


def test_full_loop(tmp_path, tiny_config):
    r = invoke(
        "train",
        "--data",
        "checkerboard",
        "--out",
        tmp_path / "1rf",
        "--max-steps",
        20,
        "--batch-size",
        64,
        "--lr",
        3e-3,
        "--seed",
        0,
        "--checkpoint-every",
        10,
        "--config",
        tiny_config,
    )
    assert r.exit_code == 0, r.output
    assert (tmp_path / "1rf" / "diffusion_pytorch_model.safetensors").is_file()

    r = invoke(
        "generate",
        "--teacher",
        tmp_path / "1rf",
        "--out",
        tmp_path / "pairs",
        "--num-pairs",
        200,
        "--nfe",
        5,
        "--solver",
        "heun",
        "--seed",
        4,
        "--batch-size",
        64,
    )
    assert r.exit_code == 0, r.output
    ds = datasets.load_from_disk(str(tmp_path / "pairs"))
    assert len(ds) == 200 and json.loads(ds.info.description)["teacher"]["solver"] == "heun"

    r = invoke(
        "train",
        "--pairs",
        tmp_path / "pairs",
        "--init",
        tmp_path / "1rf",
        "--out",
        tmp_path / "2rf",
        "--max-steps",
        10,
        "--batch-size",
        32,
        "--config",
        tiny_config,
    )
    assert r.exit_code == 0, r.output

    # sample: --num/--seed uses row_noise, --noise uses the given array; both match a direct solve.
    r = invoke("sample", "--model", tmp_path / "2rf", "--nfe", 2, "--num", 50, "--seed", 9, "--out", tmp_path / "s.npy")
    assert r.exit_code == 0, r.output
    model = load_model(tmp_path / "2rf").eval()
    z0 = row_noise(9, range(50), (2,))
    expected = solve(model, z0, 2, "euler").z1.numpy()
    got = np.load(tmp_path / "s.npy")
    assert got.dtype == np.float32 and got.shape == (50, 2)
    assert_f32_close(got, expected, steps=2)  # the CLI's batches against one direct solve
    np.save(tmp_path / "z0.npy", z0.numpy())
    r = invoke(
        "sample", "--model", tmp_path / "2rf", "--nfe", 2, "--noise", tmp_path / "z0.npy", "--out", tmp_path / "s2.npy"
    )
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(np.load(tmp_path / "s2.npy"), got)

    # eval: W2 in metrics.json equals an independent POT computation on the same samples.
    r = invoke(
        "eval",
        "--model",
        tmp_path / "2rf",
        "--reference",
        "checkerboard",
        "--nfe",
        "1,2",
        "--out",
        tmp_path / "report",
        "--num-samples",
        300,
        "--seeds",
        "1",
    )
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())["models"][0]
    import ot

    from reflow.folders.data import load_source

    ref = load_source("checkerboard").reference(300).numpy().astype(np.float64)
    for k in (1, 2):
        x = solve(model, row_noise(1, range(300), (2,)), k, "euler").z1.numpy().astype(np.float64)
        cost = ot.dist(x, ref)
        expected_w2 = np.sqrt(ot.emd2(ot.unif(300), ot.unif(300), cost))
        assert metrics["nfe"][str(k)]["w2"] == pytest.approx(expected_w2, rel=1e-4)
    assert metrics["reference_solve"]["solver"] == "adaptive" and metrics["reference_solve"]["nfe"] > 0
    assert metrics["straightness"] >= 0 and metrics["curvature"] >= 0


def test_bad_input_gives_one_line_and_exit_2(tmp_path, tiny_flow):
    one_error_line(invoke("train", "--data", tmp_path / "missing.npy", "--out", tmp_path / "m"), "no such file")
    np.save(tmp_path / "flat.npy", np.zeros(4, dtype=np.float32))
    one_error_line(invoke("train", "--data", tmp_path / "flat.npy", "--out", tmp_path / "m"), "shape")
    one_error_line(invoke("train", "--pairs", tmp_path / "nopairs", "--out", tmp_path / "m"), "no such pairs folder")
    one_error_line(
        invoke("generate", "--teacher", tmp_path / "nothing", "--out", tmp_path / "p", "--num-pairs", 5),
        "no such teacher",
    )
    one_error_line(
        invoke("sample", "--model", tmp_path / "nothing", "--nfe", 1, "--num", 3, "--out", tmp_path / "s.npy"),
        "no such model folder",
    )
    np.save(tmp_path / "bad_noise.npy", np.zeros((3, 5), dtype=np.float32))
    one_error_line(
        invoke("sample", "--model", tiny_flow, "--noise", tmp_path / "bad_noise.npy", "--out", tmp_path / "s.npy"),
        "needs (N, 2)",
    )
    assert not (tmp_path / "s.npy").exists()
    one_error_line(invoke("eval", "--model", tiny_flow, "--reference", "digits", "--out", tmp_path / "r"), "shape")
    one_error_line(
        invoke("eval", "--model", tiny_flow, "--reference", "moons", "--nfe", "1,x", "--out", tmp_path / "r"), "--nfe"
    )


def test_help_and_version():
    r = invoke("--help")
    assert r.exit_code == 0
    for cmd in ("train", "generate", "sample", "eval", "quickstart"):
        assert cmd in r.output
    assert "reflow 0.1.0" in invoke("--version").output


def test_generate_from_diffusers_checkpoint_and_verify(tmp_path):
    from ddpm_helpers import save, tiny_unet
    from diffusers import DDPMScheduler

    folder = save(tmp_path, "ddpm", tiny_unet(), DDPMScheduler(clip_sample=True))
    r = invoke(
        "generate",
        "--teacher",
        folder,
        "--out",
        tmp_path / "pairs",
        "--num-pairs",
        12,
        "--nfe",
        3,
        "--batch-size",
        4,
        "--dtype",
        "float16",
    )
    assert r.exit_code == 0, r.output
    prov = json.loads((tmp_path / "pairs" / "reflow_pairs.json").read_text())
    assert prov["teacher"]["solver"] == "ddim" and prov["teacher"]["nfe"] == 3 and prov["dtype"] == "float16"
    r = invoke("verify-pairs", tmp_path / "pairs", "--rows", 5)
    assert r.exit_code == 0 and "ok: within" in r.output, r.output
    # A rerun into the same folder with another nfe is refused with one line.
    one_error_line(
        invoke("generate", "--teacher", folder, "--out", tmp_path / "pairs", "--num-pairs", 12, "--nfe", 4),
        "other settings",
    )
    # Pickle-only weights: refused, naming the flag, and nothing is written.
    pk = save(tmp_path, "pickled", tiny_unet(), DDPMScheduler(), safe_serialization=False)
    one_error_line(invoke("generate", "--teacher", pk, "--out", tmp_path / "p2", "--num-pairs", 4), "--allow-pickle")
    assert not (tmp_path / "p2").exists() and not (tmp_path / "p2.partial").exists()
    one_error_line(invoke("generate", "--teacher", tmp_path, "--out", tmp_path / "p3", "--num-pairs", 4), "neither")
