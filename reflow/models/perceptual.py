"""Frozen feature networks for the perceptual losses (``--loss lpips`` / ``lpips_huber``), read from disk.

One generic network described by JSON serves both the bundled digits network (``data/perceptual/digits-lpips``,
trained by ``data/train_digits_perceptual.py``) and real LPIPS networks converted by the user; nothing is
downloaded. A folder holds ``config.json`` and ``model.safetensors`` (never pickle):

    {"_class_name": "PerceptualNet", "in_channels": 3,
     "input_shift": [-0.030, -0.088, -0.188], "input_scale": [0.458, 0.448, 0.450],    (optional: (x - shift) / scale)
     "layers": [{"conv": [64, 11, 4, 2]}, "relu", "tap", {"maxpool": [3, 2]},
                {"conv": [192, 5, 1, 2]}, "relu", "tap", {"maxpool": [3, 2]},
                {"conv": [384, 3, 1, 1]}, "relu", "tap", {"conv": [256, 3, 1, 1]}, "relu", "tap",
                {"conv": [256, 3, 1, 1]}, "relu", "tap"],
     "calibrated": true}

is LPIPS's AlexNet (``lpips.LPIPS(net="alex")``: its ScalingLayer's shift and scale, a tap after every ReLU).
``{"conv": [out, kernel, stride, padding]}`` is a Conv2d with bias, ``{"maxpool": [kernel, stride]}`` (an optional
third number pads) a MaxPool2d, ``"relu"`` a ReLU, ``"tap"`` hands the current map to the loss. Taps take no index,
so ``layers.K.weight`` / ``layers.K.bias`` are torchvision's ``features.K.*`` unchanged; with ``calibrated`` the
per-tap channel weights are ``lin.K.weight`` of shape (1, C_K, 1, 1), non-negative, LPIPS's ``linK.model.1.weight``.
Conversion is a renaming: ``safetensors.torch.save_file({new: old_state[old], ...}, "model.safetensors")``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reflow.errors import ReflowError
from reflow.folders.files import PICKLE_SUFFIXES, first_line, read_json
from reflow.folders.weights import check_weights, record_weights

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CLASS_NAME = "PerceptualNet"
_FIX = "pass a folder with config.json and model.safetensors (e.g. data/perceptual/digits-lpips)"


def _ints(value: Any, lengths: tuple[int, ...], what: str) -> list[int]:
    """``value`` as a list of non-negative ints of one of ``lengths``, else a ValueError naming ``what``."""
    if not isinstance(value, list) or len(value) not in lengths or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"{what} must be a list of {' or '.join(map(str, lengths))} non-negative integers")
    return value


def _build_layer(item: Any, channels: int, where: str) -> tuple[nn.Module | None, int]:
    """The module of one ``layers`` entry (None for ``"tap"``) and the channel count after it."""
    if item == "tap":
        return None, channels
    if item == "relu":
        return nn.ReLU(), channels
    if isinstance(item, dict) and len(item) == 1 and "conv" in item:
        out, kernel, stride, padding = _ints(item["conv"], (4,), f"{where} conv [out, kernel, stride, padding]")
        if out < 1 or kernel < 1 or stride < 1:
            raise ValueError(f"{where} conv needs out, kernel and stride >= 1")
        return nn.Conv2d(channels, out, kernel, stride, padding), out
    if isinstance(item, dict) and len(item) == 1 and "maxpool" in item:
        kernel, stride, *padding = _ints(item["maxpool"], (2, 3), f"{where} maxpool [kernel, stride]")
        if kernel < 1 or stride < 1:
            raise ValueError(f"{where} maxpool needs kernel and stride >= 1")
        return nn.MaxPool2d(kernel, stride, *padding), channels
    raise ValueError(f'{where} is {item!r}; use {{"conv": [...]}}, "relu", {{"maxpool": [...]}} or "tap"')


def _per_channel(config: dict[str, Any], key: str, channels: int, default: float) -> torch.Tensor:
    """``config[key]`` (one number per input channel) as a (1, C, 1, 1) tensor; ``default`` when absent."""
    value = config.get(key, [default] * channels)
    if not isinstance(value, list) or len(value) != channels or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"{key} must be a list of {channels} numbers (one per input channel)")
    if key == "input_scale" and not all(v > 0 for v in value):
        raise ValueError("input_scale must be positive")
    return torch.tensor(value, dtype=torch.float32).reshape(1, channels, 1, 1)


class PerceptualNet(nn.Module):
    """A feed-forward feature network built from its JSON config (see the module docstring).

    ``forward(x)`` maps images (B, in_channels, H, W) to the list of tapped feature maps (B, C_l, H_l, W_l);
    ``channel_weights`` is the list of per-tap channel weights (C_l,) when ``calibrated``, else None (the loss
    then averages over channels). This is the ``features`` callable of ``reflow.core.perceptual``.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        self.in_channels = config.get("in_channels")
        if type(self.in_channels) is not int or self.in_channels < 1:
            raise ValueError("in_channels must be a positive integer")
        for key, default in (("input_shift", 0.0), ("input_scale", 1.0)):  # not weights: they live in the config
            self.register_buffer(key, _per_channel(config, key, self.in_channels, default), persistent=False)
        items = config.get("layers")
        if not isinstance(items, list) or "tap" not in items:
            raise ValueError('layers must be a list with at least one "tap"')
        self.layers = nn.ModuleList()
        self.plan: list[int | None] = []  # per config entry: its index in self.layers, or None for a tap
        tap_channels, channels = [], self.in_channels
        for i, item in enumerate(items):
            module, channels = _build_layer(item, channels, f"layers[{i}]")
            if module is None:
                tap_channels.append(channels)
            else:
                self.layers.append(module)
            self.plan.append(None if module is None else len(self.layers) - 1)
        self.calibrated = config.get("calibrated", False)
        if not isinstance(self.calibrated, bool):
            raise ValueError("calibrated must be true or false")
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in tap_channels) if self.calibrated else None

    @property
    def channel_weights(self) -> list[torch.Tensor] | None:
        """The calibrated channel weights of each tap, (C_l,) each, or None."""
        return None if self.lin is None else [lin.weight.reshape(-1) for lin in self.lin]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = (x - self.input_shift.to(x.dtype)) / self.input_scale.to(x.dtype)
        maps = []
        for index in self.plan:
            if index is None:
                maps.append(h)
            else:
                h = self.layers[index](h)
        return maps


def save_perceptual(
    net: PerceptualNet,
    folder: str | os.PathLike,
    info: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``folder`` (config.json with ``info``, model.safetensors, reflow_weights.json, ``extra_files``)
    atomically, replacing an existing one only once the new one is complete. Returns the folder."""
    from safetensors.torch import save_file

    from reflow.folders.io import atomic_dir

    config = {"_class_name": CLASS_NAME, **net.config, **({"info": info} if info is not None else {})}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        os.chmod(tmp / WEIGHTS_NAME, 0o644)  # safetensors creates it 0600; the weights are meant to be shared
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        record_weights(tmp)
    return Path(folder)


def _locate(path: str | os.PathLike) -> tuple[Path, Path]:
    """(folder holding config.json, safetensors file) of ``--perceptual-weights PATH``."""
    path = Path(path)
    if not path.exists():
        raise ReflowError(f"--perceptual-weights {path}: no such file or folder; {_FIX}")
    if path.is_file():
        if path.name.endswith(".safetensors"):
            return path.parent, path
        raise ReflowError(f"--perceptual-weights {path} is not a .safetensors file (pickle is never loaded); {_FIX}")
    weights = path / WEIGHTS_NAME
    if weights.is_file():
        return path, weights
    pickles = sorted(f.name for f in path.iterdir() if f.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ReflowError(
            f"--perceptual-weights {path} has only pickle weights ({pickles[0]}), which reflow never loads; "
            f"convert them to {WEIGHTS_NAME} with safetensors.torch.save_file"
        )
    raise ReflowError(f"--perceptual-weights {path} has no {WEIGHTS_NAME}; {_FIX}")


def _check_state(net: PerceptualNet, state: dict[str, torch.Tensor], file: Path) -> None:
    """Every weight ``net`` needs is in ``state`` with its shape, nothing else is, and lin weights are >= 0."""
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = [k for k in expected if k not in state]
    if missing:
        raise ReflowError(f"{file} lacks {missing[0]} {expected[missing[0]]} ({len(missing)} missing); {_FIX}")
    unexpected = sorted(k for k in state if k not in expected)
    if unexpected:
        raise ReflowError(f"{file} holds {unexpected[0]}, which its {CONFIG_NAME} has no layer for; {_FIX}")
    for k, shape in expected.items():
        if tuple(state[k].shape) != shape or not state[k].is_floating_point():
            got = f"{tuple(state[k].shape)} {state[k].dtype}"
            raise ReflowError(f"{file}: {k} is {got}, its {CONFIG_NAME} needs a float {shape}; {_FIX}")
        if k.startswith("lin.") and bool((state[k] < 0).any()):
            raise ReflowError(f"{file}: {k} has negative channel weights (LPIPS's are >= 0); {_FIX}")


def load_perceptual(path: str | os.PathLike) -> PerceptualNet:
    """The frozen :class:`PerceptualNet` of ``path`` (a folder with config.json + model.safetensors, or the
    .safetensors file with config.json beside it), on the CPU, in eval mode, every weight requires_grad False.

    Safetensors and JSON only; anything missing, misshapen or pickled is one ReflowError line naming the fix.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder, weights_file = _locate(path)
    config_file = folder / CONFIG_NAME
    config = read_json(config_file, fix=_FIX)
    if config.get("_class_name", CLASS_NAME) != CLASS_NAME:
        raise ReflowError(f"{config_file} describes a {config['_class_name']}, not a {CLASS_NAME}; {_FIX}")
    try:
        net = PerceptualNet(config)
    except ValueError as e:
        raise ReflowError(f"{config_file}: {e}; {_FIX}") from None
    check_weights(folder)
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError) as e:
        raise ReflowError(f"cannot read {weights_file} ({first_line(e)}); {_FIX}") from None
    _check_state(net, state, weights_file)
    net.load_state_dict(state)
    return net.eval().requires_grad_(False)


def check_perceptual(net: PerceptualNet, sample_shape: tuple[int, ...] | torch.Size) -> None:
    """Refuse data the network cannot compare: not images (C, H, W), another channel count, or images too small
    for its layers (one ReflowError line). Runs one zero image through it to find the last."""
    shape = tuple(sample_shape)
    if len(shape) != 3:
        raise ReflowError(
            f"a perceptual loss compares images (C, H, W), this data has samples of shape {shape}; "
            "use --loss l2 or pseudo_huber"
        )
    if shape[0] != net.in_channels:
        raise ReflowError(
            f"the perceptual network takes {net.in_channels}-channel images, the data has {shape[0]} channels "
            f"{shape}; pass --perceptual-weights for a {shape[0]}-channel network"
        )
    device = next((p.device for p in net.parameters()), torch.device("cpu"))
    try:
        with torch.no_grad():
            net(torch.zeros(1, *shape, device=device))
    except RuntimeError as e:
        raise ReflowError(
            f"images of shape {shape} are too small for the perceptual network ({first_line(e)}); "
            "pass --perceptual-weights for a network made for this size"
        ) from None
