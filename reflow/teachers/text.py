"""A Stable Diffusion folder (``StableDiffusionPipeline`` layout: ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) as a deterministic latent text-to-image teacher.

``TextToImageTeacher(z0, prompt_embeds) -> z1`` runs the loop ``StableDiffusionPipeline.__call__`` runs with
``latents=z0, output_type="latent"`` (and eta = 0), on the checkpoint's own scheduler config turned into a
deterministic solver as in ``reflow.teachers.ddpm`` ("ddim": DDIM with eta = 0; "dpm": DPM-Solver++):

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
from reflow.folders.files import PICKLE_SUFFIXES, config_hash, tree_hash
from reflow.folders.files import json_clean as _json_clean
from reflow.folders.files import read_json as _read_json
from reflow.models.text import (
    _LAYOUT,
    PromptEncoder,
    _check_folder,
    _decode,
    load_vae,
    vae_scale_factor,
)
from reflow.models.velocity import load_unet
from reflow.teachers.ddpm import (
    _autocast_dtype,
    build_solver,
    solver_overrides,
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


class TextToImageTeacher:
    """A Stable Diffusion folder sampled in latent space with a deterministic ODE solver.

    ``__call__(z0, prompt_embeds) -> z1``: z0 (B, *sample_shape) unit Gaussian latents, prompt_embeds
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

    conditioning = "text"
    num_classes = None
    label_choices = None

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
        unet_dir, scheduler_dir = path / "unet", path / "scheduler"
        if not (unet_dir / "config.json").is_file():
            raise ReflowError(f"{path} has no unet/config.json; pass {_LAYOUT}")
        if not (scheduler_dir / "scheduler_config.json").is_file():
            raise ReflowError(f"{path} has no scheduler/scheduler_config.json; add the checkpoint's scheduler config")
        overrides = solver_overrides(solver, nfe, timestep_spacing, clip_sample)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise ReflowError(f"--guidance-scale must be a number, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 1:
            raise ReflowError(
                f"--guidance-scale must be a finite number >= 1 for a text-to-image teacher (1: no guidance), "
                f"got {guidance_scale}"
            )
        if not isinstance(negative_prompt, str):
            raise ReflowError(f"--negative-prompt must be a string, got {type(negative_prompt).__name__}")
        autocast_dtype = _autocast_dtype(autocast)

        model_index = _read_json(path / "model_index.json")
        if model_index.get("text_encoder_2") not in (None, [None, None]):
            raise ReflowError(f"{path} has two text encoders (Stable Diffusion XL?); only SD 1.x / 2.x are supported")
        unet_config = _read_json(unet_dir / "config.json")
        unet_class = unet_config.get("_class_name")
        if unet_class != "UNet2DConditionModel":
            raise ReflowError(
                f"{unet_dir} holds a {unet_class}; a text-to-image teacher needs a UNet2DConditionModel "
                "(use a DiffusersTeacher for UNet2DModel checkpoints)"
            )
        for key, what in (
            ("time_cond_proj_dim", "a guidance-embedding (LCM) UNet"),
            ("addition_embed_type", "extra conditioning (SDXL-style added_cond_kwargs)"),
            ("class_embed_type", "class conditioning (an upscaler?)"),
            ("num_class_embeds", "class conditioning"),
            ("encoder_hid_dim_type", "an encoder projection"),
        ):
            if unet_config.get(key) is not None:
                raise ReflowError(f"{unet_dir}: {key} is set ({what}); only plain text-to-image UNets are supported")
        in_channels, out_channels = unet_config.get("in_channels", 4), unet_config.get("out_channels", 4)
        if in_channels != out_channels:
            raise ReflowError(
                f"{unet_dir}: in_channels {in_channels} differs from out_channels {out_channels} (an inpainting or "
                "depth UNet?); only text-to-image UNets are supported"
            )
        _check_folder(path, ("text_encoder", "tokenizer", "vae"))
        scheduler, checkpoint_scheduler = build_solver(path, solver, nfe, overrides)

        # Components, each by its known class: safetensors unless pickle is allowed; never custom code.
        self.encoder = PromptEncoder(path, allow_pickle=allow_pickle, device=text_encoder_device)
        self.vae = load_vae(path, allow_pickle=allow_pickle)
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

        self.device = torch.device(device)
        self.unet = unet.to(self.device).eval()
        self.unet.requires_grad_(False)
        self.channels_last = self.device.type == "cuda" if channels_last is None else bool(channels_last)
        if self.channels_last:
            self.unet.to(memory_format=torch.channels_last)
        self.autocast_dtype = autocast_dtype
        self._forward = torch.compile(self.unet) if compile else self.unet
        self.scheduler = scheduler
        self._timesteps = scheduler.timesteps.clone()
        self._unet_timesteps = self._timesteps.to(self.device)
        self.path = path
        self.nfe = nfe
        self.solver = solver
        self.guidance_scale = float(guidance_scale)
        self.negative_prompt = negative_prompt
        self.scheduler_overrides = overrides
        # What describe() records and load_teacher(**overrides) takes back (verify-pairs reruns with it).
        self.overrides = {"guidance_scale": self.guidance_scale, "negative_prompt": negative_prompt, **overrides}
        if autocast_dtype is not None:
            self.overrides["autocast"] = str(autocast_dtype).removeprefix("torch.")
        self.checkpoint_scheduler = checkpoint_scheduler
        self.components = {
            k: v[1] for k, v in sorted(model_index.items()) if not k.startswith("_") and isinstance(v, list) and v[-1]
        }

        size = unet.config.sample_size
        if isinstance(size, int):
            height = width = size
        elif isinstance(size, (list, tuple)) and len(size) == 2:
            height, width = (int(s) for s in size)
        else:
            raise ReflowError(f"{unet_dir}: sample_size {size!r} is neither an int nor (height, width)")
        self.sample_shape = (int(unet.config.in_channels), height, width)
        self.embed_shape = self.encoder.embed_shape
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.image_shape = (
            int(self.vae.config.out_channels),
            height * self.vae_scale_factor,
            width * self.vae_scale_factor,
        )

        # diffusers guides only above 1 (do_classifier_free_guidance); the negative prompt is encoded once.
        self.guided = self.guidance_scale > 1
        self._negative_embeds: torch.Tensor | None = None
        if self.guided:
            self._negative_embeds = self.encoder([negative_prompt]).to(self.device, self.unet.dtype)
        self._hashes: tuple[str, str] | None = None

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, *embed_shape) float32 CPU prompt embeddings, as ``StableDiffusionPipeline.encode_prompt``."""
        return self.encoder(prompts)

    def decode(
        self, latents: torch.Tensor, batch_size: int = 8, device: torch.device | str | None = None
    ) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) float32 on the CPU from scaled latents (the VAE on the CPU unless
        ``device``; it goes back to the CPU afterwards)."""
        return _decode(self.vae, latents, batch_size, device)

    def describe(self) -> dict[str, Any]:
        if self._hashes is None:
            self._hashes = (config_hash(self.path), _weights_hash(self.path))
        solver_config = {k: v for k, v in dict(self.scheduler.config).items() if not k.startswith("_")}
        return _json_clean(
            {
                "kind": "diffusers-text",
                "teacher": str(self.path.resolve()),
                "config_hash": self._hashes[0],
                "weights_hash": self._hashes[1],
                "solver": self.solver,
                "solver_scheduler": type(self.scheduler).__name__,
                "nfe": self.nfe,
                "eta": 0.0 if self.solver == "ddim" else None,
                "checkpoint_scheduler": self.checkpoint_scheduler,
                "guidance_scale": self.guidance_scale,
                "negative_prompt": self.negative_prompt,
                "overrides": self.overrides,
                "solver_config": solver_config,
                "timesteps": [int(t) for t in self.scheduler.timesteps],
                "conditioning": self.conditioning,
                "num_classes": None,
                "embed_shape": list(self.embed_shape),
                "sample_shape": list(self.sample_shape),
                "scaling_factor": self.scaling_factor,
                "vae_scale_factor": self.vae_scale_factor,
                "components": self.components,
            }
        )

    def _check_embeds(self, prompt_embeds: torch.Tensor | None, batch: int) -> torch.Tensor:
        if prompt_embeds is None:
            raise ReflowError("this teacher is text-to-image: pass prompt embeddings (teacher.encode_prompts(prompts))")
        prompt_embeds = torch.as_tensor(prompt_embeds)
        want = (batch, *self.embed_shape)
        if tuple(prompt_embeds.shape) != want:
            raise ReflowError(
                f"prompt embeddings have shape {tuple(prompt_embeds.shape)}; this teacher takes {want} "
                "(one row of encode_prompts per sample)"
            )
        if not prompt_embeds.dtype.is_floating_point:
            raise ReflowError(f"prompt embeddings must be floating point, got dtype {prompt_embeds.dtype}")
        non_blocking = self.device.type == "cuda" and prompt_embeds.device.type == "cpu" and prompt_embeds.is_pinned()
        return prompt_embeds.to(self.device, self.unet.dtype, non_blocking=non_blocking)

    @torch.inference_mode()
    def __call__(self, z0: torch.Tensor, prompt_embeds: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(z0.shape[1:]) != self.sample_shape:
            want = ", ".join(map(str, self.sample_shape))
            raise ReflowError(f"z0 has shape {tuple(z0.shape)}; this teacher takes (B, {want})")
        embeds = self._check_embeds(prompt_embeds, z0.shape[0])
        scheduler = self.scheduler
        # Every call starts fresh (this also resets the multistep solver's state); nfe may have been changed.
        scheduler.set_timesteps(self.nfe)
        if not torch.equal(scheduler.timesteps, self._timesteps):
            self._timesteps = scheduler.timesteps.clone()
            self._unet_timesteps = self._timesteps.to(self.device)
        non_blocking = self.device.type == "cuda" and z0.device.type == "cpu" and z0.is_pinned()
        x = z0.to(self.device, self.unet.dtype, non_blocking=non_blocking) * scheduler.init_noise_sigma
        if self.guided:  # as StableDiffusionPipeline: one UNet call on [negative; prompt]
            embeds = torch.cat([self._negative_embeds.expand(len(embeds), -1, -1), embeds])
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        step_kwargs = {"eta": 0.0} if self.solver == "ddim" else {}
        for t, unet_t in zip(scheduler.timesteps, self._unet_timesteps, strict=True):
            # The pipeline's order: duplicate, then scale_model_input.
            model_input = torch.cat([x, x]) if self.guided else x
            model_input = scheduler.scale_model_input(model_input, t)
            if self.channels_last:
                model_input = model_input.contiguous(memory_format=memory_format)
            if self.autocast_dtype is not None:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                    out = self._forward(model_input, unet_t, encoder_hidden_states=embeds).sample
            else:
                out = self._forward(model_input, unet_t, encoder_hidden_states=embeds).sample
            if self.guided:
                uncond, cond = out.chunk(2)
                out = uncond + self.guidance_scale * (cond - uncond)
            if out.dtype != x.dtype:  # autocast: step the solver in the latents' precision
                out = out.to(x.dtype)
            x = scheduler.step(out, t, x, **step_kwargs).prev_sample
        x = x.contiguous() if self.channels_last else x
        return x.float()
