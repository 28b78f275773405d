"""Velocity models: v(x, t) with t in [0, 1] (t = 0 noise, t = 1 data).

A velocity model is any module whose ``forward(x, t)`` takes x of shape (B, *sample_shape) and t of
shape (B,) and returns a tensor shaped like x. Every model is a diffusers ``ModelMixin`` +
``ConfigMixin``, so a folder written by ``save_pretrained`` (safetensors) is the unit of exchange.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .errors import ReflowError


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as in DDPM), shape (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb


class MLPVelocity(ModelMixin, ConfigMixin):
    """An MLP velocity field for small data (2-D toys, 8x8 digits): flattens x, concatenates a
    sinusoidal embedding of t, and maps back to x's shape."""

    @register_to_config
    def __init__(
        self,
        sample_shape: tuple[int, ...] | list[int] = (2,),
        hidden_dim: int = 256,
        num_layers: int = 4,
        time_embed_dim: int = 64,
    ):
        super().__init__()
        dim = math.prod(sample_shape)
        layers: list[nn.Module] = [nn.Linear(dim + time_embed_dim, hidden_dim), nn.SiLU()]
        for _ in range(num_layers - 1):
            layers += [nn.Linear(hidden_dim, hidden_dim), nn.SiLU()]
        layers.append(nn.Linear(hidden_dim, dim))
        self.net = nn.Sequential(*layers)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.config.sample_shape)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.config.time_embed_dim).to(x.dtype)
        h = torch.cat([x.flatten(1), emb], dim=1)
        return self.net(h).view_as(x)


MODEL_CLASSES: dict[str, type[ModelMixin]] = {"MLPVelocity": MLPVelocity}


def load_model(path: str | Path, *, allow_pickle: bool = False) -> ModelMixin:
    """Load a velocity model folder written by ``save_pretrained`` (safetensors unless ``allow_pickle``)."""
    path = Path(path)
    config_file = path / "config.json"
    if not path.is_dir():
        raise ReflowError(f"no such model folder: {path} (pass a folder written by `reflow train`)")
    if not config_file.is_file():
        raise ReflowError(f"{path} has no config.json: not a model folder (pass a folder written by `reflow train`)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as e:
        raise ReflowError(f"{config_file} is not valid JSON ({e}); re-export the model") from None
    cls = MODEL_CLASSES.get(class_name)
    if cls is None:
        known = ", ".join(MODEL_CLASSES)
        raise ReflowError(f"{path}: model class {class_name!r} is not a reflow velocity model (known: {known})")
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        raise ReflowError(f"{path} has no .safetensors weights; pass --allow-pickle to load pickle weights you trust")
    try:
        return cls.from_pretrained(path, use_safetensors=has_safetensors, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ReflowError(f"could not load model from {path}: {first}") from None


def model_card(title: str, provenance: dict[str, Any]) -> str:
    """A model card (README.md) that records how the model was made."""
    lines = [
        "---",
        "library_name: diffusers",
        "tags: [reflow, rectified-flow]",
        "---",
        f"# {title}",
        "",
        "Made by [reflow](https://pypi.org/project/reflow/). Velocity convention: t = 0 noise, t = 1 data,"
        " x_t = (1 - t) z0 + t z1, target z1 - z0.",
        "",
        "## Provenance",
        "",
        "```json",
        json.dumps(provenance, indent=2, sort_keys=True, default=str),
        "```",
        "",
    ]
    return "\n".join(lines)
