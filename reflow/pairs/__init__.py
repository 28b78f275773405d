"""Pairs on disk: generate (sharded, resumable), read, verify.

Modules, each using only those listed before it: ``schema`` (columns, features, the provenance record and
its integrity fields), ``plan`` (the shard plan), ``card`` (the dataset card), ``writer`` (shards, the
final join, the Hub), ``z0`` (z0 rebuilt from the seed and each row's index: ``with_z0``, ``z0_of``),
``reader`` (opening with its checks, ``load_pairs``, ``PairsReader``), ``resume`` (the lock, run.json,
resuming), ``pipeline`` (the batch pipeline around the teacher), ``generate`` (``generate_pairs``),
``verify`` (``verify_pairs``).
"""

from reflow.pairs.generate import check_generate_args, generate_pairs
from reflow.pairs.reader import IN_MEMORY, InMemory, Pairs, PairsReader, load_pairs, memory_budget
from reflow.pairs.schema import read_provenance
from reflow.pairs.verify import verify_pairs
from reflow.pairs.z0 import with_z0, z0_of

__all__ = [
    "IN_MEMORY",
    "InMemory",
    "Pairs",
    "PairsReader",
    "check_generate_args",
    "generate_pairs",
    "load_pairs",
    "memory_budget",
    "read_provenance",
    "verify_pairs",
    "with_z0",
    "z0_of",
]
