"""A Stable Diffusion folder (``StableDiffusionPipeline`` layout: ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) as a deterministic latent text-to-image teacher.

``TextToImageTeacher(z0, prompt_embeds) -> z1`` runs the loop ``StableDiffusionPipeline.__call__`` runs with
``latents=z0, output_type="latent"`` (and eta = 0), on the checkpoint's own scheduler config turned into a
deterministic solver as in ``reflow.diffusers_teacher`` ("ddim": DDIM with eta = 0; "dpm": DPM-Solver++):

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

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .diffusers_teacher import (
    _autocast_dtype,
    _first_line,
    _json_clean,
    _read_json,
    build_solver,
    solver_overrides,
)
from .errors import ReflowError
from .models import load_unet
from .teachers import config_hash

TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
VAE_CLASSES = ("AutoencoderKL",)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_LOAD_ERRORS = (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError)
_LAYOUT = "a Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/)"


def is_text_to_image_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers pipeline folder whose UNet is a ``UNet2DConditionModel`` (a text-to-image
    checkpoint, or a reflow text-to-image student exported as a ``StableDiffusionPipeline``)."""
    path = Path(path)
    if not (path / "model_index.json").is_file() or not (path / "unet" / "config.json").is_file():
        return False
    try:
        return _read_json(path / "unet" / "config.json").get("_class_name") == "UNet2DConditionModel"
    except ReflowError:
        return False


def _check_folder(path: str | Path, names: Sequence[str]) -> Path:
    """``path`` as a Path, checked to be a pipeline folder holding the component folders ``names``."""
    if path is None or str(path) == "":
        raise ReflowError(f"no text-to-image teacher folder given; pass {_LAYOUT}")
    path = Path(path)
    if not path.exists():
        raise ReflowError(f"no such text-to-image teacher: {path} (pass {_LAYOUT})")
    if not path.is_dir() or not (path / "model_index.json").is_file():
        raise ReflowError(f"{path} is not a diffusers pipeline folder (no model_index.json); pass {_LAYOUT}")
    for name in names:
        if not (path / name).is_dir():
            raise ReflowError(f"{path} has no {name}/ folder; pass {_LAYOUT}")
    return path


def _component_class(path: Path, name: str, config_key: str | None = None) -> str | None:
    """The class model_index.json names for component ``name`` (else the one its config names)."""
    entry = _read_json(path / "model_index.json").get(name)
    if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    if config_key is not None and (path / name / "config.json").is_file():
        value = _read_json(path / name / "config.json").get(config_key)
        if isinstance(value, list):
            value = value[0] if value else None
        return None if value is None else str(value)
    return None


def _use_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """True to load ``folder``'s safetensors weights; False for pickle weights (only with ``allow_pickle``)."""
    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):
        return True
    if not any(f.name.endswith(PICKLE_SUFFIXES) for f in files):
        raise ReflowError(f"{folder} holds no weights (.safetensors); re-save the checkpoint with save_pretrained")
    if not allow_pickle:
        raise ReflowError(f"{folder} has only pickle (.bin) weights; pass --allow-pickle to load weights you trust")
    return False


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ReflowError("text-to-image teachers need transformers: pip install transformers") from None
    return transformers


def load_text_encoder(path: str | Path, *, allow_pickle: bool = False) -> tuple[Any, Any]:
    """The (CLIP text encoder, CLIP tokenizer) of a Stable Diffusion folder, on the CPU, in eval mode."""
    path = _check_folder(path, ("text_encoder", "tokenizer"))
    transformers = _transformers()
    encoder_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    if not (encoder_dir / "config.json").is_file():
        raise ReflowError(f"{encoder_dir} has no config.json; re-save the checkpoint with save_pretrained")
    encoder_class = _component_class(path, "text_encoder", "architectures")
    if encoder_class not in TEXT_ENCODER_CLASSES:
        raise ReflowError(
            f"{encoder_dir} holds a {encoder_class} text encoder; only CLIPTextModel (Stable Diffusion 1.x / 2.x) "
            "is supported"
        )
    tokenizer_class = _component_class(path, "tokenizer") or "CLIPTokenizer"
    if tokenizer_class not in TOKENIZER_CLASSES:
        raise ReflowError(f"{tokenizer_dir} holds a {tokenizer_class}; only CLIPTokenizer tokenizers are supported")
    use_safetensors = _use_safetensors(encoder_dir, allow_pickle)
    try:
        text_encoder = transformers.CLIPTextModel.from_pretrained(
            str(encoder_dir), use_safetensors=use_safetensors, local_files_only=True
        )
    except _LOAD_ERRORS as e:
        raise ReflowError(f"could not load the text encoder from {encoder_dir}: {_first_line(e)}") from None
    try:
        # The concrete class, never AutoTokenizer's auto_map: no tokenizer code from the folder runs.
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except _LOAD_ERRORS as e:
        raise ReflowError(f"could not load the tokenizer from {tokenizer_dir}: {_first_line(e)}") from None
    max_length = tokenizer.model_max_length
    positions = int(text_encoder.config.max_position_embeddings)
    if not isinstance(max_length, int) or not 1 <= max_length <= positions:
        raise ReflowError(
            f"{tokenizer_dir}: model_max_length {max_length!r} does not fit the text encoder "
            f"({positions} positions); set model_max_length in its tokenizer_config.json"
        )
    text_encoder.eval().requires_grad_(False)
    return text_encoder, tokenizer


def load_vae(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """The ``AutoencoderKL`` of a Stable Diffusion folder, on the CPU, in eval mode."""
    from diffusers import AutoencoderKL

    path = _check_folder(path, ("vae",))
    vae_dir = path / "vae"
    if not (vae_dir / "config.json").is_file():
        raise ReflowError(f"{vae_dir} has no config.json; re-save the checkpoint with save_pretrained")
    vae_class = _read_json(vae_dir / "config.json").get("_class_name")
    if vae_class not in VAE_CLASSES:
        raise ReflowError(f"{vae_dir} holds a {vae_class}; only AutoencoderKL VAEs are supported")
    use_safetensors = _use_safetensors(vae_dir, allow_pickle)
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), use_safetensors=use_safetensors, local_files_only=True)
    except _LOAD_ERRORS as e:
        raise ReflowError(f"could not load the VAE from {vae_dir}: {_first_line(e)}") from None
    vae.eval().requires_grad_(False)
    return vae


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent a side, as StableDiffusionPipeline computes it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _check_prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ReflowError(f"prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


class PromptEncoder:
    """The CLIP tokenizer and text encoder of a Stable Diffusion folder: ``encoder(prompts)`` is the
    (B, max_length, hidden_size) float32 CPU tensor ``StableDiffusionPipeline.encode_prompt`` returns as
    ``prompt_embeds`` (no clip skip). The encoder lives on the CPU; with ``device`` it is moved there for each
    call and back to the CPU afterwards. Prompts are encoded ``batch_size`` at a time."""

    def __init__(
        self,
        path: str | Path,
        allow_pickle: bool = False,
        *,
        device: torch.device | str | None = None,
        batch_size: int = 64,
    ):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ReflowError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.path = Path(path) if path is not None else path
        self.text_encoder, self.tokenizer = load_text_encoder(path, allow_pickle=allow_pickle)
        self.max_length = int(self.tokenizer.model_max_length)
        self.hidden_size = int(self.text_encoder.config.hidden_size)
        self.embed_shape = (self.max_length, self.hidden_size)
        # As diffusers: the attention mask only goes in when the text encoder's config asks for it.
        self.use_attention_mask = bool(getattr(self.text_encoder.config, "use_attention_mask", False))
        self.device = torch.device(device) if device is not None else None
        self.batch_size = batch_size

    @torch.inference_mode()
    def __call__(self, prompts: Sequence[str] | str) -> torch.Tensor:
        prompts = _check_prompts(prompts)
        if not prompts:
            return torch.zeros((0, *self.embed_shape), dtype=torch.float32)
        device = self.device or torch.device("cpu")
        moved = device.type != "cpu"
        if moved:
            self.text_encoder.to(device)
        try:
            outs = []
            for b in range(0, len(prompts), self.batch_size):
                inputs = self.tokenizer(
                    prompts[b : b + self.batch_size],
                    padding="max_length",
                    max_length=self.max_length,
                    truncation=True,
                    return_tensors="pt",
                )
                mask = inputs.attention_mask.to(device) if self.use_attention_mask else None
                hidden = self.text_encoder(inputs.input_ids.to(device), attention_mask=mask)[0]
                outs.append(hidden.float().cpu())
        finally:
            if moved:
                self.text_encoder.to("cpu")
        return torch.cat(outs)


@torch.inference_mode()
def _decode(vae: Any, latents: torch.Tensor, batch_size: int, device: torch.device | str | None) -> torch.Tensor:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ReflowError(f"batch_size must be a positive integer, got {batch_size!r}")
    latents = torch.as_tensor(latents)
    channels = int(vae.config.latent_channels)
    if latents.ndim != 4 or latents.shape[1] != channels:
        raise ReflowError(f"latents have shape {tuple(latents.shape)}; the VAE decodes (B, {channels}, H, W)")
    device = torch.device(device) if device is not None else torch.device("cpu")
    moved = device.type != "cpu"
    if moved:
        vae.to(device)
    try:
        scaling = vae.config.scaling_factor
        outs = []
        for b in range(0, len(latents), batch_size):
            chunk = latents[b : b + batch_size].to(device, vae.dtype)
            outs.append(vae.decode(chunk / scaling).sample.float().clamp(-1, 1).cpu())
    finally:
        if moved:
            vae.to("cpu")
    if not outs:
        factor = vae_scale_factor(vae)
        shape = (0, int(vae.config.out_channels), latents.shape[2] * factor, latents.shape[3] * factor)
        return torch.zeros(shape, dtype=torch.float32)
    return torch.cat(outs)


def decode_latents(
    path: str | Path,
    latents: torch.Tensor,
    *,
    allow_pickle: bool = False,
    batch_size: int = 8,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) float32 on the CPU from latents in model space (multiplied by the VAE's
    scaling_factor), with the VAE of the Stable Diffusion folder ``path`` (on the CPU unless ``device``)."""
    return _decode(load_vae(path, allow_pickle=allow_pickle), latents, batch_size, device)


def _weights_hash(path: Path) -> str:
    """sha256 over what decides a teacher's z1 besides its configs: the UNet and text encoder weights
    (safetensors, or pickle files where a component has none) and the tokenizer's non-JSON files."""
    h = hashlib.sha256()
    files: list[Path] = []
    for name in ("unet", "text_encoder"):
        folder = path / name
        weights = sorted(folder.rglob("*.safetensors"))
        files += weights or sorted(f for f in folder.rglob("*") if f.is_file() and f.name.endswith(PICKLE_SUFFIXES))
    files += sorted(f for f in (path / "tokenizer").rglob("*") if f.is_file() and f.suffix != ".json")
    for f in files:
        h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


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
