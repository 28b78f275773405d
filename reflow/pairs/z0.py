"""z0 of pairs stored without it, rebuilt from the seed of their provenance and each row's ``index``.

Row i's z0 is ``row_noise(seed, index[i], sample_shape)`` (``reflow.core.noise``), a function of (seed, index)
alone, so ``reflow generate`` stores it only with ``--store-z0``: z0 has z1's shape, so storing it doubles the
pairs. The rebuilt z0 is bit for bit the float32 noise the teacher was fed (a stored float16 z0 is that noise
rounded to float16). ``PairsReader``, ``load_pairs`` and ``verify_pairs`` rebuild it themselves; code that
opens the folder with ``datasets.load_from_disk`` calls :func:`with_z0` (or :func:`z0_of` for given rows)::

    import datasets
    from reflow.pairs import with_z0

    pairs = with_z0(datasets.load_from_disk("PAIRS"))
    batch = pairs[:8]  # {"z0": (8, *shape), "z1": (8, *shape), "index": (8,), ...} torch tensors
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch

from reflow.core.noise import MAX_SEED, row_noise
from reflow.errors import ReflowError


def recorded_seed(provenance: Mapping[str, Any], where: str = "these pairs") -> int:
    """The noise seed recorded in a pairs provenance; one ReflowError line when there is none."""
    seed = provenance.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ReflowError(f"{where} store no z0 and record no valid noise seed to rebuild it from; regenerate them")
    return seed


def z0_of(provenance: Mapping[str, Any], index: Iterable[int] | torch.Tensor) -> torch.Tensor:
    """The z0 of the rows with seed indices ``index`` of pairs with this ``provenance`` (``reflow_pairs.json``
    or the dataset's ``info.description``): (len(index), *sample_shape) float32 on the CPU."""
    shape = provenance.get("sample_shape")
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s > 0 for s in shape):
        raise ReflowError("these pairs record no sample_shape; take it from z1: row_noise(seed, index, shape)")
    return row_noise(recorded_seed(provenance), index, shape)


def dataset_provenance(dataset: Any) -> dict[str, Any]:
    """The provenance ``reflow generate`` keeps in a dataset's ``info.description`` ({} when none)."""
    try:
        record = json.loads(dataset.info.description or "{}")
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


class _AddZ0:
    """The transform of :func:`with_z0`: a batch (python lists, as ``datasets`` hands it) as torch tensors,
    with z0 rebuilt from its ``index`` rows. Strings (prompts) stay lists."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, batch: dict[str, list]) -> dict[str, Any]:
        out = {name: _tensor(values) for name, values in batch.items()}
        if "index" in out and "z1" in out:
            out = {"z0": row_noise(self.seed, out["index"], tuple(out["z1"].shape[1:])), **out}
        return out


def _tensor(values: list) -> Any:
    """A column of a batch as ``with_format("torch")`` gives it: floats as float32, strings as a list."""
    if values and isinstance(values[0], str):
        return values
    array = np.asarray(values)
    return torch.from_numpy(array.astype(np.float32) if array.dtype.kind == "f" else array)


def with_z0(dataset: Any, seed: int | None = None) -> Any:
    """A pairs ``datasets.Dataset`` (from ``datasets.load_from_disk``) whose rows read as torch tensors with
    ``z0``: as stored (``with_format("torch")``) when the pairs keep it, else rebuilt on access from ``seed``
    (default: the one recorded in ``dataset.info.description``) and each row's ``index``. Index rows or
    slices (``pairs[i]``, ``pairs[a:b]``); the rebuilt z0 is float32, the teacher's exact input."""
    if "z0" in dataset.column_names:
        return dataset.with_format("torch")
    if "index" not in dataset.column_names:
        raise ReflowError("these pairs have neither a z0 nor an index column: z0 cannot be rebuilt")
    if seed is None:
        seed = recorded_seed(dataset_provenance(dataset))
    return dataset.with_transform(_AddZ0(recorded_seed({"seed": seed})))
