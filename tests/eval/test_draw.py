"""The library's `sample` (reflow.eval.draw): noise from seeds, arrays or files, labels cycling, the checks
on bad input, and the files `write_samples` writes, against a direct solve and against `reflow sample`."""

import json

import numpy as np
import pytest
import torch
from helpers import cli_ok

from reflow.core.flow import Conditioned
from reflow.core.noise import row_noise
from reflow.core.solvers import solve
from reflow.errors import ReflowError
from reflow.eval import check_sample_output, sample, write_samples
from reflow.folders.io import output_owner
from reflow.models.velocity import load_model


@pytest.fixture(scope="module")
def class_flow(tmp_path_factory):
    """A class-conditional image flow: the bundled conditional DDPM's UNet as a flow (no training)."""
    from reflow.models.velocity import init_model
    from reflow.pipelines.export import save_student

    folder = tmp_path_factory.mktemp("draw") / "class-flow"
    save_student(init_model("data/teachers/digits-cond-ddpm"), folder)
    return folder


def direct(model, z0, nfe, **cond):
    """The Euler solve of the loaded model from z0, written without reflow.eval."""
    m = load_model(model).eval()
    field = Conditioned(m, **cond) if cond else m  # keeps an exported student's Euler grid
    with torch.inference_mode():
        return solve(field, z0, nfe, "euler").z1


def test_seeded_noise_is_row_noise(tiny_flow):
    result = sample(tiny_flow, 2, num=5, seed=3, device="cpu")
    want = direct(tiny_flow, row_noise(3, range(5), (2,)), 2)
    assert result.samples.dtype == np.float32 and result.samples.shape == (5, 2)
    np.testing.assert_array_equal(result.samples, want.numpy())
    assert result.nfe == 2 and result.labels is None and result.prompts is None
    assert result.record == {"model": str(tiny_flow), "nfe": 2, "solver": "euler", "seed": 3, "noise": None}


def test_array_tensor_and_file_noise_agree(tmp_path, tiny_flow):
    z0 = np.random.default_rng(0).standard_normal((7, 2)).astype(np.float32)
    np.save(tmp_path / "z0.npy", z0)
    from_array = sample(tiny_flow, 1, noise=z0, device="cpu")
    from_tensor = sample(tiny_flow, 1, noise=torch.from_numpy(z0), device="cpu")
    from_file = sample(tiny_flow, 1, noise=tmp_path / "z0.npy", device="cpu")
    np.testing.assert_array_equal(from_array.samples, direct(tiny_flow, torch.from_numpy(z0), 1).numpy())
    np.testing.assert_array_equal(from_array.samples, from_tensor.samples)
    np.testing.assert_array_equal(from_array.samples, from_file.samples)
    assert from_file.record["noise"] == str(tmp_path / "z0.npy") and from_file.record["seed"] is None
    assert from_array.record["noise"] == "<array>"
    # float64 noise is read as float32
    wide = sample(tiny_flow, 1, noise=z0.astype(np.float64), device="cpu")
    np.testing.assert_array_equal(wide.samples, from_array.samples)


def test_labels_cycle_over_the_samples(class_flow):
    z0 = row_noise(0, range(5), (1, 8, 8))
    result = sample(class_flow, 1, num=5, labels=[2, 0], device="cpu")
    assert result.labels.dtype == np.int64 and result.labels.tolist() == [2, 0, 2, 0, 2]
    want = direct(class_flow, z0, 1, class_labels=torch.tensor([2, 0, 2, 0, 2])).clamp(-1, 1)
    np.testing.assert_array_equal(result.samples, want.numpy())
    assert result.samples.min() >= -1 and result.samples.max() <= 1
    again = sample(class_flow, 1, num=5, labels="2,0", device="cpu")  # the command line's form
    np.testing.assert_array_equal(again.samples, result.samples)
    with pytest.raises(ReflowError, match="class-conditional"):
        sample(class_flow, 1, num=2, device="cpu")
    with pytest.raises(ReflowError, match=r"--labels \[11\] out of range"):
        sample(class_flow, 1, num=2, labels=[1, 11], device="cpu")
    with pytest.raises(ReflowError, match="comma-separated integers"):
        sample(class_flow, 1, num=2, labels="1,x", device="cpu")
    with pytest.raises(ReflowError, match="--decode"):
        sample(class_flow, 1, num=2, labels=[1], decode=True, device="cpu")


@pytest.mark.parametrize(
    "noise, words",
    [
        (np.zeros((3, 5), np.float32), "needs (N, 2)"),
        (np.zeros((0, 2), np.float32), "no rows"),
        (np.array([[0.0, np.nan]], np.float32), "NaN or inf"),
        (np.array([[1, 2]], np.complex64), "real-valued"),
        (np.array(["a", "b"]).reshape(1, 2), "real-valued"),
    ],
)
def test_bad_noise_arrays(tiny_flow, noise, words):
    with pytest.raises(ReflowError, match=words.replace("(", r"\(").replace(")", r"\)")):
        sample(tiny_flow, 1, noise=noise, device="cpu")


def test_bad_settings(tmp_path, tiny_flow):
    with pytest.raises(ReflowError, match="no such file"):
        sample(tiny_flow, 1, noise=tmp_path / "missing.npy", device="cpu")
    (tmp_path / "text.npy").write_text("not an array")
    with pytest.raises(ReflowError, match="not a plain numeric"):
        sample(tiny_flow, 1, noise=tmp_path / "text.npy", device="cpu")
    with pytest.raises(ReflowError, match="exactly one of"):
        sample(tiny_flow, 1, device="cpu")
    with pytest.raises(ReflowError, match="exactly one of"):
        sample(tiny_flow, 1, num=3, noise=np.zeros((3, 2), np.float32), device="cpu")
    with pytest.raises(ReflowError, match="--num must be at least 1"):
        sample(tiny_flow, 1, num=0, device="cpu")
    with pytest.raises(ReflowError, match="--nfe"):
        sample(tiny_flow, 0, num=3, device="cpu")
    with pytest.raises(ReflowError, match="--solver"):
        sample(tiny_flow, 1, num=3, solver="rk9", device="cpu")
    with pytest.raises(ReflowError, match="unconditional"):
        sample(tiny_flow, 1, num=3, labels=[1], device="cpu")
    with pytest.raises(ReflowError, match="no such model"):
        sample(tmp_path / "nothing", 1, num=3, device="cpu")


def test_write_samples_is_what_the_command_writes(tmp_path, class_flow):
    cli_ok("sample", "--model", class_flow, "--nfe", 2, "--num", 6, "--seed", 4, "--labels", "3,1,2", "--out",
           tmp_path / "cli.npy")  # fmt: skip
    ours = tmp_path / "lib.npy"
    check_sample_output(ours, class_flow)
    result = sample(class_flow, 2, num=6, seed=4, labels=[3, 1, 2], device="cpu")
    assert write_samples(result, ours) == ours
    assert ours.read_bytes() == (tmp_path / "cli.npy").read_bytes()
    assert (tmp_path / "lib.labels.npy").read_bytes() == (tmp_path / "cli.labels.npy").read_bytes()
    mine, theirs = (json.loads((tmp_path / f"{n}.reflow.json").read_text()) for n in ("lib", "cli"))
    assert mine == theirs and mine["count"] == 6 and output_owner(ours, "file") == "sample"
    # the output checks: never an input, never a file another command wrote
    with pytest.raises(ReflowError, match=r"\.npy"):
        check_sample_output(tmp_path / "x.txt", class_flow)
    with pytest.raises(ReflowError, match="input"):
        check_sample_output(class_flow / "x.npy", class_flow)
    np.save(tmp_path / "foreign.npy", np.ones(2))
    with pytest.raises(ReflowError, match="not written by"):
        check_sample_output(tmp_path / "foreign.npy", class_flow)
    np.save(tmp_path / "z.labels.npy", np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ReflowError, match="the --noise input"):
        check_sample_output(tmp_path / "z.npy", class_flow, tmp_path / "z.labels.npy")


def test_a_diffusers_checkpoint_samples_with_its_own_ddim_and_a_grid_shows_the_images(tmp_path):
    """`reflow sample` on a DDPM checkpoint: its own DDIM at --nfe, as eval samples it (the same samples as the
    teacher's solve of the same batch), with the PNG grid beside; a flow's solvers are refused for it."""
    from ddpm_helpers import save, tiny_unet
    from diffusers import DDPMScheduler
    from matplotlib.image import imread

    from reflow.teachers import load_teacher

    folder = save(tmp_path, "ddpm", tiny_unet(), DDPMScheduler(clip_sample=True))
    result = sample(folder, 3, num=5, seed=2, device="cpu")
    teacher = load_teacher(folder, nfe=3, solver="ddim")
    want = teacher(row_noise(2, range(5), teacher.sample_shape)).clamp(-1, 1)
    np.testing.assert_array_equal(result.samples, want.numpy())  # the same batch through the same loop
    assert result.record["solver"] == "ddim" and result.nfe == 3
    out, grid = tmp_path / "s.npy", tmp_path / "s.png"
    cli_ok("sample", "--model", folder, "--nfe", 3, "--num", 5, "--seed", 2, "--out", out, "--grid", grid)
    np.testing.assert_array_equal(np.load(out), result.samples)
    picture = imread(grid)
    assert picture.shape[:2] == (64, 5 * 65 - 1)  # one row of five 8x8 images drawn 64x64, 1-pixel gaps
    assert output_owner(grid, "file") == "sample"
    with pytest.raises(ReflowError, match="ddim or dpm, not heun"):
        sample(folder, 2, num=2, solver="heun", device="cpu")


def test_a_grid_of_non_image_samples_is_refused_with_one_line(tmp_path, tiny_flow):
    from typer.testing import CliRunner

    from reflow.cli.app import app

    out = tmp_path / "s.npy"
    args = ["sample", "--model", tiny_flow, "--num", 4, "--out", out, "--grid", tmp_path / "s.png"]
    r = CliRunner().invoke(app, [str(a) for a in args])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "--grid draws image samples" in lines[0], r.output
    assert not out.exists() and not (tmp_path / "s.png").exists()
    with pytest.raises(ReflowError, match="euler, heun, adaptive, not ddim"):
        sample(tiny_flow, 1, num=2, solver="ddim", device="cpu")
