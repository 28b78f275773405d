"""Image students: a DDPM initialises them, they train, distill and export as a stock diffusers pipeline
that samples exactly what `reflow sample` samples from the same noise."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ddpm_helpers import save, tiny_unet
from diffusers import DDPMScheduler, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from helpers import F32_C_ELEMENTWISE, assert_f32_close, f32_atol, f32_tol
from safetensors.torch import load_file
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.models.velocity import UNetFlow, init_model, load_model
from reflow.pairs import generate_pairs
from reflow.pipelines.export import student_scheduler
from reflow.student import TrainConfig, train
from reflow.teachers import load_teacher

runner = CliRunner()
TRAIN = dict(batch_size=16, log_every=2, checkpoint_every=1000, lr=1e-3)


@pytest.fixture(scope="module")
def ddpm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddpm")
    return save(tmp, "ddpm", tiny_unet(seed=3), DDPMScheduler(num_train_timesteps=1000, clip_sample=False))


@pytest.fixture(scope="module")
def pairs(ddpm, tmp_path_factory):
    teacher = load_teacher(ddpm, nfe=4, solver="ddim")
    return generate_pairs(teacher, tmp_path_factory.mktemp("pairs") / "pairs", 64, batch_size=32)


@pytest.fixture(scope="module")
def student(ddpm, pairs, tmp_path_factory):
    out = tmp_path_factory.mktemp("students") / "2rf"
    train(TrainConfig(out=str(out), pairs=str(pairs), init=str(ddpm), max_steps=6, **TRAIN))
    return out


def test_flow_match_euler_default_grid_wastes_a_call_and_ours_is_uniform():
    """Why the export does not use FlowMatchEulerDiscreteScheduler's default grid."""
    fm = FlowMatchEulerDiscreteScheduler()
    fm.set_timesteps(2)
    # float32 sigmas: one rounding each (tests/README.md)
    assert fm.sigmas.tolist() == pytest.approx([1.0, 0.001, 0.0], abs=f32_atol(1.0, c=F32_C_ELEMENTWISE))
    for k in (1, 2, 3, 4, 7):
        nodes, query = UNetFlow(tiny_unet()).euler_grid(k)
        steps = np.diff(nodes.numpy())
        # nodes are 1 - sigma of float32 sigmas below 1: half an ulp each, a step (a difference of two) one ulp
        assert len(steps) == k and nodes[-1] == 1.0 and nodes[0] == pytest.approx(1e-3, abs=f32_atol(1.0, c=1))
        np.testing.assert_allclose(steps, 0.999 / k, **f32_tol(1.0, c=F32_C_ELEMENTWISE))
        # The UNet is queried at the scheduler's (integer) timesteps.
        scheduler = student_scheduler(1000)
        scheduler.set_timesteps(k)
        # float64 arithmetic on float32 timesteps of at most 1000: a few float64 roundings (eps64 1000 = 2e-13)
        np.testing.assert_allclose((1 - query.numpy()) * 1000, scheduler.timesteps.numpy(), atol=1e-9)


def test_init_from_ddpm_keeps_weights_and_maps_time(ddpm):
    model = init_model(ddpm)
    assert isinstance(model, UNetFlow) and model.sample_shape == (1, 8, 8)
    teacher = load_file(str(ddpm / "unet" / "diffusion_pytorch_model.safetensors"))
    for name, value in model.unet.state_dict().items():
        torch.testing.assert_close(value, teacher[name], rtol=0, atol=0)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0.0, 0.25, 1.0])
    with torch.no_grad():
        expected = -model.unet(x, torch.tensor([1000.0, 750.0, 0.0])).sample
        torch.testing.assert_close(model(x, t), expected, atol=0, rtol=0)  # the same UNet call: bit for bit


def test_student_folder_is_a_stock_diffusers_pipeline_matching_reflow_sample(student, tmp_path):
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == "DDPMPipeline"
    assert "init" in (student / "README.md").read_text()
    pipe = DiffusionPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    prev = None
    for k in (1, 2, 4):
        images = pipe(batch_size=5, generator=torch.Generator().manual_seed(k), num_inference_steps=k, output_type="np")
        z0 = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(k))
        np.save(tmp_path / "z0.npy", z0.numpy())
        result = runner.invoke(
            app,
            [
                "sample",
                "--model",
                str(student),
                "--nfe",
                str(k),
                "--noise",
                str(tmp_path / "z0.npy"),
                "--out",
                str(tmp_path / f"s{k}.npy"),
            ],
        )
        assert result.exit_code == 0, result.output
        ours = np.load(tmp_path / f"s{k}.npy")
        # diffusers' scheduler loop against ours: float32 noise of a k-step solve (tests/README.md)
        assert_f32_close((ours / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1), images.images, steps=k)
        # and the samples differ between step counts (the test would pass vacuously on a constant model)
        if prev is not None:
            assert np.abs(ours - prev).max() > 1e-3
        prev = ours


def test_student_is_a_teacher_for_the_next_round(student, tmp_path):
    teacher = load_teacher(student, nfe=3, solver="euler")
    assert teacher.describe()["kind"] == "flow"
    pairs = generate_pairs(teacher, tmp_path / "round2", 16, batch_size=8)
    assert pairs.is_dir()


def test_distill_one_step_improves_fidelity_to_the_teacher(student, pairs, tmp_path):
    from reflow.core.sampling import sample
    from reflow.pairs import load_pairs

    data = load_pairs(pairs)

    def one_step_mse(folder):
        model = load_model(folder).eval()
        return torch.mean((sample(model, data.z0, 1).z1 - data.z1.clamp(-1, 1)) ** 2).item()

    result = runner.invoke(
        app,
        [
            "distill",
            "--pairs",
            str(pairs),
            "--init",
            str(student),
            "--out",
            str(tmp_path / "d1"),
            "--k",
            "1",
            "--max-steps",
            "30",
            "--batch-size",
            "32",
            "--lr",
            "1e-3",
            "--ema-decay",
            "0",
            "--log-with",
            "none",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "distillation" in (tmp_path / "d1" / "README.md").read_text()
    before, after = one_step_mse(student), one_step_mse(tmp_path / "d1")
    assert after < 0.7 * before, (before, after)


def test_fresh_unet_from_config_and_default(pairs, ddpm, tmp_path):
    train(
        TrainConfig(
            out=str(tmp_path / "same-arch"),
            pairs=str(pairs),
            model_config=str(ddpm / "unet" / "config.json"),
            max_steps=2,
            **TRAIN,
        )
    )
    fresh = load_model(tmp_path / "same-arch")
    taught = load_file(str(ddpm / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(fresh.unet.state_dict()) == set(taught)
    assert not torch.equal(fresh.unet.conv_out.weight, taught["conv_out.weight"])
    train(TrainConfig(out=str(tmp_path / "default"), data="digits", max_steps=1, batch_size=4, log_every=1))
    assert isinstance(load_model(tmp_path / "default"), UNetFlow)
    (tmp_path / "bad.json").write_text(
        json.dumps({"_class_name": "UNet2DModel", "sample_size": 16, "in_channels": 1, "out_channels": 1})
    )
    with pytest.raises(ReflowError, match="sample_size"):
        train(
            TrainConfig(
                out=str(tmp_path / "bad"),
                pairs=str(pairs),
                model_config=str(tmp_path / "bad.json"),
                max_steps=1,
                **TRAIN,
            )
        )


def test_ddpm_is_refused_where_a_flow_is_needed(ddpm):
    with pytest.raises(ReflowError, match="DDPM pipeline"):
        load_model(ddpm)
