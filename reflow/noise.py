"""Reproducible starting noise: z0 of row i is a function of (seed, i) alone.

Each row draws from its own CPU generator seeded with (seed << 32) | i, so a row's noise does not
depend on the batch size, the number of processes, the device or which rows were drawn before it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_SEED = 2**32 - 1


def check_seed(seed: int) -> int:
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {seed}")
    return seed


def row_noise(seed: int, indices: Sequence[int] | torch.Tensor, sample_shape: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian noise for the given row indices, shape (len(indices), *sample_shape), float32, CPU."""
    check_seed(seed)
    indices = [int(i) for i in indices]
    out = torch.empty(len(indices), *sample_shape, dtype=torch.float32)
    g = torch.Generator()
    for k, i in enumerate(indices):
        if not 0 <= i <= MAX_SEED:
            raise ValueError(f"row index must be in [0, {MAX_SEED}], got {i}")
        g.manual_seed((seed << 32) | i)
        torch.randn(tuple(sample_shape), generator=g, out=out[k])
    return out
