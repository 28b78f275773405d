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


def _row_indices(indices: Iterable[int] | torch.Tensor) -> list[int]:
    if isinstance(indices, (torch.Tensor, np.ndarray)):
        indices = indices.tolist()
    indices = [int(i) for i in indices]
    for i in indices:
        if not 0 <= i <= MAX_INDEX:
            raise ValueError(f"row index must be in [0, {MAX_INDEX}], got {i}")
    return indices


class _RowStreams:
    """One Philox bit generator re-keyed per row: setting its state to key (seed << 64) | i, counter
    ``counter`` and an empty buffer is exactly a fresh ``Philox(key=(seed << 64) | i, counter=counter)``,
    without the ~12 us a new one costs (it draws OS entropy for a seed it then ignores).

    Not shared between calls, so concurrent calls (e.g. a prefetch thread) never touch the same state.
    """

    def __init__(self, seed: int, counter: Sequence[int] = (0, 0, 0, 0)):
        self.bit_generator = np.random.Philox(key=0)
        self.generator = np.random.Generator(self.bit_generator)
        # A 128-bit key is stored as two little-endian 64-bit words: [i, seed].
        self._key = np.array([0, seed], dtype=np.uint64)
        self._state = {
            "bit_generator": "Philox",
            "state": {"counter": np.array(counter, dtype=np.uint64), "key": self._key},
            "buffer": np.zeros(4, dtype=np.uint64),
            "buffer_pos": 4,
            "has_uint32": 0,
            "uinteger": 0,
        }

    def row(self, i: int) -> np.random.Generator:
        self._key[0] = i
        self.bit_generator.state = self._state  # copied into the generator: the dict stays unchanged
        return self.generator


def row_noise(seed: int, indices: Iterable[int] | torch.Tensor, sample_shape: Sequence[int]) -> torch.Tensor:
    """Unit Gaussian noise for the given row indices, shape (len(indices), *sample_shape), float32, CPU.

    Row i is ``np.random.Generator(np.random.Philox(key=(seed << 64) | i)).standard_normal(sample_shape,
    dtype=np.float32)``, bit for bit.
    """
    check_seed(seed)
    indices = _row_indices(indices)
    shape = tuple(int(s) for s in sample_shape)
    out = np.empty((len(indices), *shape), dtype=np.float32)
    if indices:
        rows = out.reshape(len(indices), -1)  # a view: row k filled in C order, as a fresh array would be
        streams = _RowStreams(seed)
        for k, i in enumerate(indices):
            streams.row(i).standard_normal(dtype=np.float32, out=rows[k])
    return torch.from_numpy(out)


def row_labels(seed: int, indices: Iterable[int] | torch.Tensor, choices: Sequence[int]) -> torch.Tensor:
    """A class label per row, uniform over ``choices``, a function of (seed, i) alone (int64, CPU).

    It uses the row's Philox key with the counter's top word set to 1, a stream disjoint from the noise.
    """
    check_seed(seed)
    if len(choices) == 0:
        raise ValueError("choices must not be empty")
    indices = _row_indices(indices)
    out = np.empty(len(indices), dtype=np.int64)
    if indices:
        streams = _RowStreams(seed, counter=(0, 0, 0, 1))
        n = len(choices)
        for k, i in enumerate(indices):
            out[k] = choices[int(streams.row(i).integers(n))]
    return torch.from_numpy(out)
