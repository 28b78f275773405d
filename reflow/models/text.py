"""The components of a Stable Diffusion folder a text-to-image student needs besides its UNet: the CLIP
text encoder and tokenizer (prompt embeddings, exactly ``StableDiffusionPipeline.encode_prompt``'s) and the
VAE (latents to images). Loaded by their known classes from local files, safetensors unless ``allow_pickle``;
no remote or custom code. They stay on the CPU unless asked otherwise and go back after each use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.files import first_line as _first_line
from reflow.folders.files import read_json as _read_json
from reflow.folders.weights import use_safetensors

TEXT_ENCODER_CLASSES = ("CLIPTextModel",)
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
VAE_CLASSES = ("AutoencoderKL",)
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
    safe = use_safetensors(encoder_dir, allow_pickle)
    try:
        text_encoder = transformers.CLIPTextModel.from_pretrained(
            str(encoder_dir), use_safetensors=safe, local_files_only=True
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
    safe = use_safetensors(vae_dir, allow_pickle)
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), use_safetensors=safe, local_files_only=True)
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
