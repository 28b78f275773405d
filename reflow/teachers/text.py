"""A Stable Diffusion folder (``StableDiffusionPipeline`` layout: ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) as a deterministic latent text-to-image teacher.

``TextToImageTeacher(z0, prompt_embeds) -> z1`` runs the loop ``StableDiffusionPipeline.__call__`` runs with
``latents=z0, output_type="latent"`` (and eta = 0), on the checkpoint's own scheduler config turned into a
deterministic solver as in ``reflow.teachers.scheduler`` ("ddim": DDIM with eta = 0; "dpm": DPM-Solver++):

- latents = z0 * init_noise_sigma (z0 is the unit Gaussian, see the conventions);
- classifier-free guidance as diffusers does it: only when ``guidance_scale > 1``, one UNet call on the batch
  [latents; latents] with [negative embeddings; prompt embeddings], then
  eps = eps_uncond + guidance_scale * (eps_text - eps_uncond); the negative prompt ("" by default) is
  encoded once;
- z1 is the final latent, already multiplied by the VAE's ``scaling_factor`` (what ``output_type="latent"``
  returns), float32, never clamped. ``decode`` turns latents into images in [-1, 1].

Prompt embeddings are exactly ``StableDiffusionPipeline.encode_prompt``'s ``prompt_embeds`` (no clip skip):
the CLIP tokenizer padded to ``model_max_length`` and truncated, the CLIP text encoder's last hidden state.
The text encoder and the VAE stay on the CPU unless asked otherwise (``text_encoder_device``, ``decode(...,
device=)``) and then go back to the CPU after each use: only the UNet is kept on the accelerator.

Weights are read from safetensors unless ``allow_pickle``, from local files only, and no remote or custom
code is run (components are loaded by their known classes, never through ``DiffusionPipeline``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.files import PICKLE_SUFFIXES, read_json, tree_hash
from reflow.models.text import (
    _LAYOUT,
    PromptEncoder,
    _check_folder,
    _decode,
    load_vae,
    vae_scale_factor,
)
from reflow.models.velocity import load_unet
from reflow.teachers.scheduler import (
    SchedulerTeacher,
    autocast_dtype,
    require_scheduler_config,
    solver_overrides,
    unet_sample_shape,
)

# UNet config keys that mean more than text conditioning, with what they mean.
_UNSUPPORTED_UNET_KEYS = (
    ("time_cond_proj_dim", "a guidance-embedding (LCM) UNet"),
    ("addition_embed_type", "extra conditioning (SDXL-style added_cond_kwargs)"),
    ("class_embed_type", "class conditioning (an upscaler?)"),
    ("num_class_embeds", "class conditioning"),
    ("encoder_hid_dim_type", "an encoder projection"),
)


def _weights_hash(path: Path) -> str:
    """Fingerprint of what decides a text teacher's z1 besides its configs: the UNet and text encoder weights
    (safetensors, or pickle files where a component has none) and the tokenizer's non-JSON files."""
    files: list[Path] = []
    for name in ("unet", "text_encoder"):
        folder = path / name
        weights = sorted(folder.rglob("*.safetensors"))
        files += weights or sorted(f for f in folder.rglob("*") if f.is_file() and f.name.endswith(PICKLE_SUFFIXES))
    files += sorted(f for f in (path / "tokenizer").rglob("*") if f.is_file() and f.suffix != ".json")
    return tree_hash(path, files)


def _check_guidance(guidance_scale: Any, negative_prompt: Any) -> None:
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ReflowError(f"--guidance-scale must be a number, got {guidance_scale!r}")
    if not math.isfinite(guidance_scale) or guidance_scale < 1:
        raise ReflowError(
            f"--guidance-scale must be a finite number >= 1 for a text-to-image teacher (1: no guidance), "
            f"got {guidance_scale}"
        )
    if not isinstance(negative_prompt, str):
        raise ReflowError(f"--negative-prompt must be a string, got {type(negative_prompt).__name__}")


def _check_unet_config(path: Path, model_index: dict[str, Any]) -> None:
    """Refuse what is not a plain SD 1.x / 2.x text-to-image UNet (SDXL, LCM, inpainting, upscalers, ...)."""
    if model_index.get("text_encoder_2") not in (None, [None, None]):
        raise ReflowError(f"{path} has two text encoders (Stable Diffusion XL?); only SD 1.x / 2.x are supported")
    unet_dir = path / "unet"
    unet_config = read_json(unet_dir / "config.json")
    unet_class = unet_config.get("_class_name")
    if unet_class != "UNet2DConditionModel":
        raise ReflowError(
            f"{unet_dir} holds a {unet_class}; a text-to-image teacher needs a UNet2DConditionModel "
            "(use a DiffusersTeacher for UNet2DModel checkpoints)"
        )
    for key, what in _UNSUPPORTED_UNET_KEYS:
        if unet_config.get(key) is not None:
            raise ReflowError(f"{unet_dir}: {key} is set ({what}); only plain text-to-image UNets are supported")
    in_channels, out_channels = unet_config.get("in_channels", 4), unet_config.get("out_channels", 4)
    if in_channels != out_channels:
        raise ReflowError(
            f"{unet_dir}: in_channels {in_channels} differs from out_channels {out_channels} (an inpainting or "
            "depth UNet?); only text-to-image UNets are supported"
        )


class TextToImageTeacher(SchedulerTeacher):
    """A Stable Diffusion folder sampled in latent space with a deterministic ODE solver.

    ``__call__(z0, cond) -> z1``: z0 (B, *sample_shape) unit Gaussian latents, cond the prompt embeddings
    (B, *embed_shape) from ``encode_prompts``; z1 the scaled latents ``StableDiffusionPipeline`` returns for
    ``latents=z0, output_type="latent"`` with the same scheduler, steps, guidance scale and negative prompt.

    ``guidance_scale`` (default 7.5, diffusers' default) applies classifier-free guidance when above 1
    (1 means none: one UNet call per step); values below 1 are refused, since diffusers silently ignores
    them. ``negative_prompt`` is the unconditional prompt of guidance. ``timestep_spacing`` / ``clip_sample``
    override the checkpoint's scheduler config; ``autocast`` runs the UNet in bf16 / fp16. All of these are
    recorded in ``describe()["overrides"]``, so ``load_teacher(path, **overrides)`` rebuilds this teacher.
    ``channels_last`` (None: on for CUDA) and ``compile`` are speed settings, not recorded.
    ``text_encoder_device``: where ``encode_prompts`` runs the text encoder (default: the CPU).
    """

    kind = "diffusers-text"
    conditioning = "text"

    def __init__(
        self,
        path: str | Path,
        nfe: int = 50,
        solver: str = "ddim",
        device: torch.device | str = "cpu",
        allow_pickle: bool = False,
        *,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        timestep_spacing: str | None = None,
        clip_sample: bool | None = None,
        autocast: str | torch.dtype | None = None,
        channels_last: bool | None = None,
        compile: bool = False,
        text_encoder_device: torch.device | str | None = None,
    ):
        path = _check_folder(path, ())
        if not (path / "unet" / "config.json").is_file():
            raise ReflowError(f"{path} has no unet/config.json; pass {_LAYOUT}")
        require_scheduler_config(path)
        overrides = solver_overrides(solver, nfe, timestep_spacing, clip_sample)
        _check_guidance(guidance_scale, negative_prompt)
        dtype = autocast_dtype(autocast)
        model_index = read_json(path / "model_index.json")
        _check_unet_config(path, model_index)
        _check_folder(path, ("text_encoder", "tokenizer", "vae"))
        self._init_solver(path, solver, nfe, overrides)
        unet = self._load_components(allow_pickle, text_encoder_device)
        self._init_unet(unet, device, channels_last=channels_last, autocast=dtype, compile=compile)
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        # What describe() records and load_teacher(**overrides) takes back (verify-pairs reruns with it).
        self.overrides = {"guidance_scale": self.guidance_scale, "negative_prompt": negative_prompt, **overrides}
        self._record_autocast()
        self.components = {
            k: v[1] for k, v in sorted(model_index.items()) if not k.startswith("_") and isinstance(v, list) and v[-1]
        }
        self._init_shapes()
        self._init_guidance()

    def _load_components(self, allow_pickle: bool, text_encoder_device: torch.device | str | None) -> Any:
        """The text encoder and VAE (kept here) and the UNet (returned), checked to belong together. Each by
        its known class: safetensors unless pickle is allowed; never custom code."""
        unet_dir = self.path / "unet"
        self.encoder = PromptEncoder(self.path, allow_pickle=allow_pickle, device=text_encoder_device)
        self.vae = load_vae(self.path, allow_pickle=allow_pickle)
        unet = load_unet(unet_dir, allow_pickle=allow_pickle)
        cross = unet.config.cross_attention_dim
        if isinstance(cross, int) and cross != self.encoder.hidden_size:
            raise ReflowError(
                f"{unet_dir}: cross_attention_dim {cross} does not match the text encoder's hidden size "
                f"{self.encoder.hidden_size}; the folder mixes components of different models"
            )
        latent_channels = int(self.vae.config.latent_channels)
        if unet.config.in_channels != latent_channels:
            raise ReflowError(
                f"{unet_dir}: in_channels {unet.config.in_channels} does not match the VAE's {latent_channels} "
                "latent channels; the folder mixes components of different models"
            )
        return unet

    def _init_shapes(self) -> None:
        """Latent, prompt-embedding and decoded image shapes."""
        self.sample_shape = unet_sample_shape(self.unet.config, self.path / "unet")
        _, height, width = self.sample_shape
        self.embed_shape = self.encoder.embed_shape
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.image_shape = (
            int(self.vae.config.out_channels),
            height * self.vae_scale_factor,
            width * self.vae_scale_factor,
        )

    def _init_guidance(self) -> None:
        """diffusers guides only above 1 (do_classifier_free_guidance); the negative prompt is encoded once."""
        self.guided = self.guidance_scale > 1
        self._negative_embeds: torch.Tensor | None = None
        if self.guided:
            self._negative_embeds = self.encoder([self.negative_prompt]).to(self.device, self.unet.dtype)

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, *embed_shape) float32 CPU prompt embeddings, as ``StableDiffusionPipeline.encode_prompt``."""
        return self.encoder(prompts)

    def decode(
        self, latents: torch.Tensor, batch_size: int = 8, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) float32 on the CPU from scaled latents (the VAE on the CPU unless
        ``device``; it goes back to the CPU afterwards)."""
        return _decode(self.vae, latents, batch_size, device)

    def _weights_hash(self) -> str:
        return _weights_hash(self.path)

    def _settings_record(self) -> dict[str, Any]:
        return {"guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt}

    def _model_record(self) -> dict[str, Any]:
        return {
            "conditioning": self.conditioning,
            "num_classes": None,
            "embed_shape": list(self.embed_shape),
            "sample_shape": list(self.sample_shape),
            "scaling_factor": self.scaling_factor,
            "vae_scale_factor": self.vae_scale_factor,
            "components": self.components,
        }

    def _check_cond(self, cond: torch.Tensor | None, batch: int) -> torch.Tensor:
        """The prompt embeddings (B, *embed_shape) in the UNet's dtype on the device."""
        if cond is None:
            raise ReflowError("this teacher is text-to-image: pass prompt embeddings (teacher.encode_prompts(prompts))")
        prompt_embeds = torch.as_tensor(cond)
        want = (batch, *self.embed_shape)
        if tuple(prompt_embeds.shape) != want:
            raise ReflowError(
                f"prompt embeddings have shape {tuple(prompt_embeds.shape)}; this teacher takes {want} "
                "(one row of encode_prompts per sample)"
            )
        if not prompt_embeds.dtype.is_floating_point:
            raise ReflowError(f"prompt embeddings must be floating point, got dtype {prompt_embeds.dtype}")
        return self._upload(prompt_embeds, self.unet.dtype)

    def _null_cond(self, cond: torch.Tensor) -> torch.Tensor:
        """The negative prompt's embeddings, as StableDiffusionPipeline batches them: [negative; prompt]."""
        return self._negative_embeds.expand(len(cond), -1, -1)

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        """Latents are returned in float32, whatever the UNet's dtype."""
        return super()._finish(x).float()
