"""Export of a text-to-image student: a stock ``StableDiffusionPipeline`` folder.

The student's ``UNet2DConditionModel`` (flow-matching convention, see ``reflow.core.flow``) goes with the
k-step Euler scheduler of ``reflow.pipelines.export.student_scheduler`` and the teacher's own VAE, text
encoder and tokenizer, so

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)     # or DiffusionPipeline.from_pretrained
    image = pipe(prompt, num_inference_steps=k, guidance_scale=1.0).images[0]

samples in k UNet calls and decodes with the VAE, in stock diffusers. The teacher's classifier-free
guidance (scale and negative prompt) is baked into the pairs the student learned from, so the student
runs with ``guidance_scale=1.0`` (no unconditional batch); the scale it was distilled with is in the
model card. ``reflow sample`` runs the same Euler grid on the same noise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from reflow.errors import ReflowError


def save_text_to_image(unet: Any, scheduler: Any, folder: str | Path, components: str | Path | None) -> None:
    """Write a ``StableDiffusionPipeline`` folder: ``unet`` and ``scheduler`` with the VAE, text encoder and
    tokenizer of the Stable Diffusion folder ``components``."""
    from diffusers import StableDiffusionPipeline

    from reflow.models.text import load_text_encoder, load_vae

    if components is None:
        raise ReflowError("a text-to-image student needs its teacher's folder for the VAE and text encoder")
    text_encoder, tokenizer = load_text_encoder(components)
    pipe = StableDiffusionPipeline(
        vae=load_vae(components),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(folder), safe_serialization=True)
