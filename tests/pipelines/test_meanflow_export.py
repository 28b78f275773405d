"""A mean-flow image student exports as a pipeline folder with its own pipeline.py that stock diffusers runs
(trust_remote_code) and that makes, from the same noise, the samples `reflow sample` makes: k jumps on the same
grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ddpm_helpers import tiny_unet
from diffusers import DiffusionPipeline
from helpers import assert_f32_close, f32_atol

from reflow.core.sampling import sample
from reflow.core.solvers import solve
from reflow.eval.draw import sample as draw_sample
from reflow.folders.kinds import folder_kind, is_flow_pipeline
from reflow.models.velocity import UNetFlow, init_model, load_model, to_mean_flow
from reflow.pipelines.export import save_student
from reflow.pipelines.meanflow import ReflowMeanFlowPipeline

SHAPE = (1, 8, 8)
ATTENTION_UNET = dict(
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")
)


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A tiny mean-flow UNet whose s - t embedding is awake (random, not the zero it starts at), saved."""
    model = to_mean_flow(UNetFlow(tiny_unet(seed=4, **ATTENTION_UNET))).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.unet.class_embedding.linear_2.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    folder = tmp_path_factory.mktemp("meanflow") / "student"
    folder.mkdir()
    save_student(model, folder)
    return folder


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_the_folder_is_a_flow_pipeline_with_our_pipeline_code(student):
    index = json.loads((student / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline", "ReflowMeanFlowPipeline"]
    source = Path(__file__).parents[2] / "pipelines" / "meanflow.py"
    assert (student / "pipeline.py").read_text() == source.read_text()
    assert is_flow_pipeline(student) and folder_kind(student) == "flow-pipeline"
    for model in (load_model(student), init_model(student)):
        assert isinstance(model, UNetFlow) and model.mean_flow and model.conditioning is None


def test_stock_diffusers_samples_what_reflow_samples(student):
    pipe = DiffusionPipeline.from_pretrained(student, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe).__name__ == "ReflowMeanFlowPipeline"
    model = load_model(student).eval()
    for k in (1, 2, 3):
        z0 = noise(5, k)
        ours = sample(model, z0, k).z1
        # the pipeline draws the same noise from the same generator; k UNet calls, float32 (tests/README.md)
        images = pipe(batch_size=5, num_inference_steps=k, generator=torch.Generator().manual_seed(k), output_type="pt")
        assert_f32_close(images.images, ours, steps=k)
        drawn = draw_sample(student, k, noise=z0, device="cpu").samples
        assert_f32_close(drawn, ours, steps=k)
        # What it catches: integrating the instantaneous velocity u(x, t, t) (a pipeline that drops the gap, like a
        # stock DDPMPipeline) lands far outside the tolerance.
        with torch.no_grad():
            velocity_solve = solve(lambda x, t: model(x, t), z0, k).z1.clamp(-1, 1)
        assert float((velocity_solve - ours).abs().max()) > 1e3 * f32_atol(ours, steps=k)


def test_the_pipeline_class_loads_with_reflow_and_gives_numpy_and_pil(student):
    pipe = ReflowMeanFlowPipeline.from_pretrained(student)
    pipe.set_progress_bar_config(disable=True)
    z0 = noise(2, 7)
    out = pipe(latents=z0, num_inference_steps=2, output_type="np").images
    ours = sample(load_model(student).eval(), z0, 2).z1
    assert out.shape == (2, 8, 8, 1)
    assert_f32_close(out, (ours.numpy() / 2 + 0.5).clip(0, 1).transpose(0, 2, 3, 1), steps=2)
    assert len(pipe(batch_size=3, num_inference_steps=1, output_type="pil").images) == 3
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(batch_size=3, latents=z0)
    (images,) = pipe(latents=z0, return_dict=False)
    assert len(images) == 2  # PIL images, one per latent
