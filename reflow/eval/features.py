"""Feature spaces for the Fréchet distance and KID of images: a small CNN on scikit-learn's 8x8 digits (the
digits space) and Inception-v3 (see :func:`reflow.eval.metrics.inception_features`).

Digit images are float (N, 1, 8, 8) in model space [-1, 1] (pixel = value / 8 - 1 from sklearn's 0..16 scale,
as returned by :func:`reflow.folders.data.load_digits_array`). :meth:`DigitsNet.features` gives the 64-d
penultimate activations used for Fréchet distance / KID on generated digits; :meth:`DigitsNet.forward`
gives the 10 class logits used for classifier agreement on class-conditional samples.
:func:`extract_features` and :func:`classify` evaluate it in float64, so their results do not depend on
the batch size.

This is a tiny digits classifier, not an Inception network: distances in its feature space are not
comparable to FID figures in papers.

The bundled weights live in ``data/features/digits-cnn`` (``model.safetensors`` + ``config.json``) and are
produced by ``python data/train_digits_features.py``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from reflow.core.sampling import is_image
from reflow.errors import ReflowError
from reflow.folders.data import load_digits_array
from reflow.folders.files import BUNDLED
from reflow.folders.io import atomic_dir

BUNDLED_DIGITS_FEATURES = BUNDLED / "features" / "digits-cnn"

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_TRAIN_HINT = "train it with `python data/train_digits_features.py`"


class DigitsNet(nn.Module):
    """conv(1->c1)-act-conv(c1->c2)-act-maxpool2 -> conv(c2->c2)-act -> linear(c2*4*4 -> feature_dim)-act -> linear.

    Input (N, 1, 8, 8) float in [-1, 1]; all convolutions are 3x3 with padding 1 and GELU activations.
    ``features`` returns the (N, feature_dim) penultimate activations, ``forward`` the (N, num_classes) logits.
    """

    def __init__(self, channels: tuple[int, int] | list[int] = (32, 64), feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        c1, c2 = (int(c) for c in channels)
        self.channels = (c1, c2)
        self.feature_dim = int(feature_dim)
        self.num_classes = int(num_classes)
        self.conv = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.GELU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(c2, c2, 3, padding=1),
            nn.GELU(),
            nn.Flatten(),
        )  # (N, 1, 8, 8) -> (N, c2 * 16)
        self.proj = nn.Linear(c2 * 4 * 4, self.feature_dim)
        self.act = nn.GELU()
        self.head = nn.Linear(self.feature_dim, self.num_classes)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, JSON-serialisable."""
        return {"channels": list(self.channels), "feature_dim": self.feature_dim, "num_classes": self.num_classes}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) in [-1, 1] -> (N, feature_dim) penultimate activations."""
        return self.act(self.proj(self.conv(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, 8, 8) in [-1, 1] -> (N, num_classes) logits."""
        return self.head(self.features(x))


def save_feature_net(
    model: DigitsNet,
    folder: str | os.PathLike,
    info: dict[str, Any] | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` and ``folder/config.json`` (constructor args + ``info``) atomically.

    ``extra_files`` maps file names to text written alongside (e.g. a ``README.md`` model card). Everything
    is written into a temporary folder beside ``folder`` which is renamed into place when complete; an
    existing ``folder`` is replaced only then. Returns the folder path.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    config = {**model.config(), "info": dict(info or {})}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        os.chmod(tmp / WEIGHTS_NAME, 0o644)  # safetensors creates it 0600; the weights are meant to be shared
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return folder


def load_feature_net(folder: str | os.PathLike) -> DigitsNet:
    """Load a :class:`DigitsNet` saved by :func:`save_feature_net` (safetensors only), on the CPU in eval mode.

    Raises :class:`ReflowError` with a one-line message if the folder or one of its files is missing or unreadable.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    if not folder.is_dir():
        raise ReflowError(f"feature network folder {folder} not found; {_TRAIN_HINT}")
    config_path, weights_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for path in (weights_path, config_path):
        if not path.is_file():
            needs = f"a feature network folder needs {CONFIG_NAME} and {WEIGHTS_NAME}"
            pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
            if pickles and path == weights_path:
                needs += f"; pickle files such as {pickles[0]} are never loaded"
            raise ReflowError(f"{path} not found ({needs}); {_TRAIN_HINT}")
    try:
        config = json.loads(config_path.read_text())
        model = DigitsNet(
            channels=config["channels"], feature_dim=config["feature_dim"], num_classes=config["num_classes"]
        )
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ReflowError(f"{config_path} is not a DigitsNet config ({type(e).__name__}: {e}); {_TRAIN_HINT}") from None
    from reflow.folders.weights import check_weights

    check_weights(folder)  # a folder with reflow_weights.json: its bytes are the ones written
    try:
        state = load_file(str(weights_path))
        model.load_state_dict(state)
    except (SafetensorError, RuntimeError, OSError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ReflowError(f"cannot load {weights_path}: {msg}; {_TRAIN_HINT}") from None
    return model.eval()


def bundled_digits_net() -> DigitsNet:
    """The shipped digits feature network (``data/features/digits-cnn``), in eval mode."""
    return load_feature_net(BUNDLED_DIGITS_FEATURES)


def _as_image_tensor(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``images`` as a real-valued tensor of shape (N, 1, 8, 8) (dtype kept), else a one-line ReflowError."""
    if not isinstance(images, torch.Tensor):
        images = np.asarray(images)
        if images.dtype.kind not in "biuf":
            raise ReflowError(f"expected numeric digit images (N, 1, 8, 8) in [-1, 1], got dtype {images.dtype}")
        images = torch.from_numpy(images)
    if images.is_complex():
        raise ReflowError(f"expected real digit images (N, 1, 8, 8) in [-1, 1], got dtype {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != (1, 8, 8):
        raise ReflowError(f"expected digit images of shape (N, 1, 8, 8) in [-1, 1], got shape {tuple(images.shape)}")
    return images.detach()


def _float64_batches(
    net: DigitsNet, images: torch.Tensor | np.ndarray, batch_size: int, device: str | torch.device
) -> Iterator[tuple[DigitsNet, torch.Tensor]]:
    """Validate ``images`` and yield (float64 eval copy of ``net`` on ``device``, float64 batch) pairs.

    Everything runs in float64: float32 CPU kernels (oneDNN convolutions, GEMMs) switch algorithms with the
    batch size, which moves float32 features by ~1e-5; in float64 the batch size changes them by ~1e-13.
    The caller's ``net`` is not modified.
    """
    x = _as_image_tensor(images)
    if batch_size < 1:
        raise ReflowError(f"batch_size must be >= 1, got {batch_size}")
    net64 = copy.deepcopy(net).to(device=device, dtype=torch.float64).eval()
    for i in range(0, len(x), batch_size):
        yield net64, x[i : i + batch_size].to(device=device, dtype=torch.float64)


@torch.inference_mode()
def extract_features(
    net: DigitsNet,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Penultimate features of ``images`` (N, 1, 8, 8) in [-1, 1] as a float64 (N, feature_dim) array.

    Computed in float64 by an eval-mode copy of ``net`` on ``device``, in batches of ``batch_size``: the
    result does not depend on ``batch_size`` (to ~1e-12) and matches ``net.features`` to float32 precision.
    """
    out = [net64.features(x).cpu() for net64, x in _float64_batches(net, images, batch_size, device)]
    if not out:
        return np.zeros((0, net.feature_dim), dtype=np.float64)
    return torch.cat(out).numpy()


@torch.inference_mode()
def classify(
    net: DigitsNet,
    images: torch.Tensor | np.ndarray,
    batch_size: int = 1024,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predicted labels of ``images`` (N, 1, 8, 8) in [-1, 1] as an int64 (N,) array.

    The argmax of the logits, computed in float64 like :func:`extract_features` (batch-size independent).
    """
    out = [net64(x).argmax(dim=1).cpu() for net64, x in _float64_batches(net, images, batch_size, device)]
    if not out:
        return np.zeros((0,), dtype=np.int64)
    return torch.cat(out).numpy().astype(np.int64)


FeatureSpace = Callable[[torch.Tensor], np.ndarray]  # images (N, C, H, W) in [-1, 1] -> features (N, D)

#: What each feature space is, as the evaluation record describes it.
FEATURE_SPACES = {
    "digits": "reflow's bundled digits CNN (64-d penultimate layer, scaled to unit mean variance on the real digits)",
    "inception": "Inception-v3 pool3 (2048-d)",
}


def digits_feature_extractor() -> FeatureSpace:
    """f(images (N, 1, 8, 8) in [-1, 1]) -> (N, 64) features of the bundled digits network, scaled by one
    constant so that the 1797 real digits have unit variance per dimension on average (FD and KID then
    read in units of the real digits' spread rather than of the network's arbitrary activation scale)."""
    net = bundled_digits_net()
    real = extract_features(net, load_digits_array())
    scale = 1.0 / float(np.sqrt(real.var(axis=0, ddof=1).mean()))
    return lambda x: extract_features(net, x) * scale


def digits_classifier() -> Callable[[torch.Tensor], np.ndarray]:
    """f(images (N, 1, 8, 8) in [-1, 1]) -> (N,) int64 digit labels predicted by the bundled network."""
    net = bundled_digits_net()
    return lambda x: classify(net, x)


def feature_spaces(shape: tuple[int, ...], inception_weights: str | None = None) -> dict[str, FeatureSpace]:
    """The feature spaces for images of ``shape`` (C, H, W), by name: "digits" for (1, 8, 8) samples,
    "inception" when the Inception weights file is given; {} for vectors."""
    spaces: dict[str, FeatureSpace] = {}
    if not is_image(shape):
        return spaces
    if shape == (1, 8, 8):
        spaces["digits"] = digits_feature_extractor()
    if inception_weights is not None:
        from reflow.eval.metrics import inception_features

        spaces["inception"] = lambda x: inception_features(x, inception_weights)
    return spaces
