"""The bundled digits DDPM (data/teachers/digits-ddpm) loads in stock diffusers and as our teacher."""

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from helpers import assert_f32_close

from reflow.core.noise import row_noise
from reflow.teachers import load_teacher

BUNDLED = Path(__file__).resolve().parents[2] / "data" / "teachers" / "digits-ddpm"


@pytest.fixture(scope="module")
def pipe():
    return DiffusionPipeline.from_pretrained(BUNDLED, use_safetensors=True)


def test_stock_diffusers_loads_it(pipe):
    assert type(pipe).__name__ == "DDPMPipeline"
    cfg = pipe.scheduler.config
    assert cfg.prediction_type == "epsilon" and cfg.clip_sample and cfg.beta_schedule == "linear"
    assert pipe.unet.config.sample_size == 8 and pipe.unet.config.in_channels == 1
    card = (BUNDLED / "README.md").read_text()
    assert "DDIM | 50" in card and "train_digits_teacher.py" in card


def test_teacher_pairs_match_a_plain_ddim_loop(pipe):
    teacher = load_teacher(BUNDLED, nfe=5, solver="ddim")
    z0 = row_noise(0, range(6), (1, 8, 8))
    got = teacher(z0)
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(5)
    x = z0.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(pipe.unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert_f32_close(got, x, steps=5)  # our teacher against a plain loop: float32 noise (tests/README.md)
    assert got.abs().max() <= 1.0
