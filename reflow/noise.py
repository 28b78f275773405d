"""Reproducible starting noise: z0 of row i is a function of (seed, i) alone.

Each row draws from its own counter-based generator, NumPy's Philox keyed with the 128-bit integer
(seed << 64) | i, so a row's noise does not depend on the batch size, the number of processes, the
device or which rows were drawn before it, and no two (seed, i) share a stream. (torch's CPU generator
is no use here: it keeps only 32 bits of a seed.)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

MAX_SEED = 2**32 - 1
MAX_INDEX = 2**63 - 1


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def row_noise(seed: int, indices: Iterable[int] | torch.Tensor, sample_shape: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian noise for the given row indices, shape (len(indices), *sample_shape), float32, CPU."""
    check_seed(seed)
    indices = [int(i) for i in indices]
    out = np.empty((len(indices), *sample_shape), dtype=np.float32)
    for k, i in enumerate(indices):
        if not 0 <= i <= MAX_INDEX:
            raise ValueError(f"row index must be in [0, {MAX_INDEX}], got {i}")
        rng = np.random.Generator(np.random.Philox(key=(seed << 64) | i))
        out[k] = rng.standard_normal(tuple(sample_shape), dtype=np.float32)
    return torch.from_numpy(out)


def row_labels(seed: int, indices: Iterable[int] | torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
    """A class label per row, uniform over ``choices``, a function of (seed, i) alone (int64, CPU).

    It uses the row's Philox key with the counter's top word set to 1, a stream disjoint from the noise.
    """
    check_seed(seed)
    if len(choices) == 0:
        raise ValueError("choices must not be empty")
    indices = [int(i) for i in indices]
    out = np.empty(len(indices), dtype=np.int64)
    for k, i in enumerate(indices):
        rng = np.random.Generator(np.random.Philox(key=(seed << 64) | i, counter=[0, 0, 0, 1]))
        out[k] = choices[int(rng.integers(len(choices)))]
    return torch.from_numpy(out)
