"""Tiny diffusers DDPM checkpoints and the plain diffusers loops our teachers are checked against (shared by
the teacher, pairs, export, CLI, rounds and end-to-end tests)."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

NFE = 6


def tiny_unet(seed: int = 0, **kw) -> UNet2DModel:
    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    config.update(kw)
    unet = UNet2DModel(**config).eval()
    # Random but not tiny outputs: scale the last conv so predictions matter in every step.
    with torch.no_grad():
        unet.conv_out.weight.mul_(5.0)
    return unet


def save(tmp_path, name, unet, scheduler, **kw):
    folder = tmp_path / name
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder, **kw)
    return folder


def noise(shape, n=3, seed=1):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def reference_loop(unet, scheduler, z0, nfe, labels=None, **step_kwargs):
    """The plain loop DDIMPipeline runs, written out here independently of reflow."""
    scheduler.set_timesteps(nfe)
    x = z0 * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        eps = unet(scheduler.scale_model_input(x, t), t, class_labels=labels).sample
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x


def ddim_reference(folder, unet, z0, nfe=NFE, labels=None, **overrides):
    scheduler = DDIMScheduler.from_pretrained(folder, subfolder="scheduler", **overrides)
    return reference_loop(unet, scheduler, z0, nfe, labels, eta=0.0)
