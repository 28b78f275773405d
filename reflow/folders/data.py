"""Data sources: where round-1 training draws z1 from, and what evaluation compares against.

A SOURCE is a built-in name (``checkerboard``, ``moons``, ``8gaussians``, ``digits``), a ``.npy`` array
file of shape (N, ...), or a folder written by ``datasets``' ``save_to_disk``. Samples live in model
space: 2-D points as (N, 2), images as (N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reflow.errors import ReflowError

TOYS = ("checkerboard", "moons", "8gaussians")
BUILTINS = (*TOYS, "digits")


def _checkerboard(n: int, g: torch.Generator) -> torch.Tensor:
    # 8 squares of side 1 on [-2, 2]^2 (Grathwohl et al. 2019's toy at half scale).
    x1 = torch.rand(n, generator=g) * 4 - 2
    x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g).float() * 2
    x2 = x2 + torch.floor(x1).remainder(2)
    return torch.stack([x1, x2], dim=1)


def _moons(n: int, g: torch.Generator, noise: float = 0.05) -> torch.Tensor:
    # scikit-learn's make_moons, drawn with a torch generator, centred and scaled by 1.5.
    theta = torch.rand(n, generator=g) * math.pi
    upper = torch.rand(n, generator=g) < 0.5
    x = torch.where(upper, torch.cos(theta), 1 - torch.cos(theta))
    y = torch.where(upper, torch.sin(theta), 0.5 - torch.sin(theta))
    pts = torch.stack([x, y], dim=1) + noise * torch.randn(n, 2, generator=g)
    return (pts - torch.tensor([0.5, 0.25])) * 1.5


def _eight_gaussians(n: int, g: torch.Generator) -> torch.Tensor:
    angles = torch.arange(8) * (2 * math.pi / 8)
    centers = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * 2.0
    idx = torch.randint(0, 8, (n,), generator=g)
    return centers[idx] + 0.25 * torch.randn(n, 2, generator=g)


_TOY_SAMPLERS = {"checkerboard": _checkerboard, "moons": _moons, "8gaussians": _eight_gaussians}


def load_digits_array() -> np.ndarray:
    """scikit-learn's 1797 handwritten 8x8 digits as float32 (N, 1, 8, 8) in [-1, 1]."""
    from sklearn.datasets import load_digits

    images = load_digits().images.astype(np.float32)  # values 0..16
    return (images / 8.0 - 1.0)[:, None]


@dataclass
class DataSource:
    """Samples of one distribution. Toys are sampled afresh; finite sources hold all their rows."""

    name: str
    sample_shape: tuple[int, ...]
    data: torch.Tensor | None = None  # the rows of a finite source, (N, *sample_shape) float32
    labels: torch.Tensor | None = None  # class labels of the rows (int64), where the source has them

    @property
    def finite(self) -> bool:
        return self.data is not None

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """n samples (with replacement for finite sources), float32 on the CPU."""
        if self.data is None:
            return _TOY_SAMPLERS[self.name](n, generator)
        idx = torch.randint(0, len(self.data), (n,), generator=generator)
        return self.data[idx]

    def reference(self, n: int, seed: int = 10_000) -> torch.Tensor:
        """Up to n samples to evaluate against: fresh draws for toys (held out from training, which
        uses other seeds), else n rows without replacement (all rows if there are fewer)."""
        g = torch.Generator().manual_seed(seed)
        if self.data is None:
            return _TOY_SAMPLERS[self.name](n, g)
        if n >= len(self.data):
            return self.data
        return self.data[torch.randperm(len(self.data), generator=g)[:n]]

    def reference_labels(self, n: int, seed: int = 10_000) -> torch.Tensor | None:
        """The class labels of ``reference(n, seed)``'s rows, or None when the source has no labels."""
        if self.labels is None:
            return None
        if n >= len(self.labels):
            return self.labels
        g = torch.Generator().manual_seed(seed)
        return self.labels[torch.randperm(len(self.labels), generator=g)[:n]]


def _from_array(name: str, arr: np.ndarray) -> DataSource:
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise ReflowError(f"{name}: expected an array of shape (N, ...) with N >= 1, got shape {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ReflowError(f"{name}: expected a numeric array, got dtype {arr.dtype}")
    data = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    if not torch.isfinite(data).all():
        raise ReflowError(f"{name}: the array holds NaN or inf values; clean it first")
    return DataSource(name=name, sample_shape=tuple(data.shape[1:]), data=data)


_PREFERRED_COLUMNS = ("z1", "image", "images", "img", "x", "sample", "samples", "data")


def _open_dataset(path: Path):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises FileNotFoundError / ValueError on foreign folders
        raise ReflowError(f"{path} is not a folder written by datasets' save_to_disk ({type(e).__name__})") from None
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train" if "train" in ds else next(iter(ds))]
    return ds


def _sample_column(path: Path, ds, column: str | None) -> str:
    """The column that holds the samples: the one named, else z1 / image / x, else the only column."""
    if column is None:
        column = next((c for c in _PREFERRED_COLUMNS if c in ds.column_names), None)
    if column is None and len(ds.column_names) == 1:
        column = ds.column_names[0]
    if column is None or column not in ds.column_names:
        raise ReflowError(
            f"{path}: cannot tell which column holds the samples (columns: {', '.join(ds.column_names)}); "
            "name one with a column called z1, image or x"
        )
    return column


def _column_array(path: Path, ds, column: str) -> np.ndarray:
    """The column as one float array: images to [-1, 1] NCHW, arrays as stored."""
    import datasets

    if isinstance(ds.features[column], datasets.Image):
        arrs = [np.asarray(im.convert("L" if im.mode in ("L", "1", "P") else "RGB")) for im in ds[column]]
        arr = np.stack(arrs).astype(np.float32) / 127.5 - 1.0
        return arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2)
    try:
        arr = np.asarray(ds.with_format("numpy")[column])
    except Exception as e:
        raise ReflowError(f"{path}: column {column!r} is not a fixed-shape numeric array ({e})") from None
    if arr.dtype == object:
        raise ReflowError(f"{path}: column {column!r} has rows of different shapes; samples need one shape")
    return arr


def _from_datasets_folder(path: Path, column: str | None) -> DataSource:
    ds = _open_dataset(path)
    column = _sample_column(path, ds, column)
    out = _from_array(f"{path}[{column}]", _column_array(path, ds, column))
    if "label" in ds.column_names and column != "label":
        labels = np.asarray(ds.with_format("numpy")["label"])
        if labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer):
            out.labels = torch.from_numpy(labels.astype(np.int64))
    return out


def load_source(source: str, column: str | None = None) -> DataSource:
    """Resolve SOURCE: a built-in name, a ``.npy`` file or a ``save_to_disk`` folder."""
    if source in TOYS:
        return DataSource(name=source, sample_shape=(2,))
    if source == "digits":
        from sklearn.datasets import load_digits

        digits = _from_array("digits", load_digits_array())
        digits.labels = torch.from_numpy(load_digits().target.astype(np.int64))
        return digits
    path = Path(source)
    if path.suffix == ".npy":
        if not path.is_file():
            raise ReflowError(
                f"no such file: {path} (pass an existing .npy array or a built-in: {', '.join(BUILTINS)})"
            )
        try:
            arr = np.load(path, allow_pickle=False)
        except ValueError as e:
            raise ReflowError(f"{path}: not a plain numeric .npy array ({e})") from None
        return _from_array(str(path), arr)
    if path.is_dir():
        return _from_datasets_folder(path, column)
    raise ReflowError(
        f"unknown data source {source!r}: use a built-in ({', '.join(BUILTINS)}), a .npy file "
        "or a folder written by datasets' save_to_disk"
    )
