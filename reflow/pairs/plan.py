"""The shard plan: which rows each shard holds, which shards each process makes, and in which batches.

Rows 0..num_pairs-1 are cut into shards of ``shard_size`` rows (the last one shorter); shard k is
written to ``PAIRS.partial/shard-0000k``. Processes split the shards round-robin, so one process or many
write the same rows; a shard whose folder exists is finished (it appears by rename) and is not remade.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

SHARD_BYTES = 64 * 2**20
"""The default shard holds about this many bytes of z0 and z1."""


def default_shard_size(sample_shape: tuple[int, ...], dtype: str, batch_size: int) -> int:
    """About ``SHARD_BYTES`` of z0 and z1 per shard, a whole number of batches."""
    row_bytes = 2 * math.prod(sample_shape) * (4 if dtype == "float32" else 2)
    rows = max(batch_size, SHARD_BYTES // row_bytes)
    return max(batch_size, rows // batch_size * batch_size)


@dataclass(frozen=True)
class ShardPlan:
    """Rows 0..``num_pairs``-1 in shards of ``shard_size`` rows."""

    num_pairs: int
    shard_size: int

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_pairs / self.shard_size)

    def rows(self, k: int) -> range:
        """The rows of shard ``k``."""
        return range(k * self.shard_size, min((k + 1) * self.shard_size, self.num_pairs))

    def shards_of(self, process_index: int, num_processes: int) -> list[int]:
        """The shards one process makes (round-robin)."""
        return [k for k in range(self.num_shards) if k % num_processes == process_index]

    def batches(self, shards: list[int], batch_size: int) -> list[tuple[int, range]]:
        """(shard, rows) of each teacher call that makes ``shards``, in order; no batch spans two shards."""
        return [
            (k, range(b, min(b + batch_size, self.rows(k).stop)))
            for k in shards
            for b in range(self.rows(k).start, self.rows(k).stop, batch_size)
        ]


def shard_dir(work: Path, k: int) -> Path:
    """The folder of shard ``k`` of an unfinished run in ``work``."""
    return work / f"shard-{k:05d}"


def unfinished(work: Path, shards: list[int]) -> list[int]:
    """The ``shards`` not yet written to ``work``."""
    return [k for k in shards if not shard_dir(work, k).is_dir()]
