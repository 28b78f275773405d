"""Writing pairs: one shard at a time, then the final join into the pairs folder, then (optionally) the Hub.

Each shard and the joined folder are written to a temporary name and renamed when complete, so a failed
write (a full disk, a kill) leaves no half shard or half folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from reflow.errors import ReflowError
from reflow.folders.files import first_line
from reflow.folders.io import atomic_dir, atomic_write_json, atomic_write_text
from reflow.folders.kinds import PAIRS_RECORD
from reflow.folders.runtime import quiet_datasets
from reflow.pairs.card import dataset_card
from reflow.pairs.plan import ShardPlan, shard_dir
from reflow.pairs.schema import CARD, file_records


def write_shard(path: Path, columns: dict[str, np.ndarray], features) -> None:
    """Save one shard's ``columns`` with ``features`` to ``path`` (through a temporary name)."""
    import datasets

    ds = datasets.Dataset.from_dict(columns, features=features)
    with atomic_dir(path) as tmp, quiet_datasets():
        ds.save_to_disk(str(tmp))


def _load_shards(work: Path, plan: ShardPlan) -> list[Any]:
    """Every shard of ``work``, each checked to open with its number of rows."""
    import datasets

    parts = []
    for k in range(plan.num_shards):
        shard, want = shard_dir(work, k), len(plan.rows(k))
        try:
            part = datasets.load_from_disk(str(shard))
            why = None if len(part) == want else f"{len(part)} rows, expected {want}"
        except Exception as e:  # a shard we wrote that no longer opens
            why = type(e).__name__
        if why:
            raise ReflowError(f"{shard} is damaged ({why}); delete that folder and rerun to remake it")
        parts.append(part)
    return parts


def join_shards(work: Path, out: Path, plan: ShardPlan, provenance: dict[str, Any]) -> None:
    """Join the finished shards of ``work`` into ``out`` (through a temporary name), recording the row count
    and each file's size and sha256 in ``reflow_pairs.json`` and writing the dataset card; then remove
    ``work``."""
    import datasets

    ds = datasets.concatenate_datasets(_load_shards(work, plan))
    ds.info.description = json.dumps(provenance, sort_keys=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()  # an empty folder the user made for the output
    with atomic_dir(out) as tmp, quiet_datasets():
        ds.save_to_disk(str(tmp), num_shards=plan.num_shards)
        record = {**provenance, "num_rows": len(ds), "files": file_records(tmp)}
        atomic_write_json(tmp / PAIRS_RECORD, record)
        card = dataset_card(out.name, provenance, len(ds), ds.column_names)
        atomic_write_text(tmp / CARD, card.content)
    shutil.rmtree(work, ignore_errors=True)


def push_pairs(path: str | Path, repo_id: str) -> None:
    """Upload a finished pairs folder to the Hub as a dataset repo (with its card)."""
    import datasets

    ds = datasets.load_from_disk(str(path))
    try:
        with quiet_datasets():
            ds.push_to_hub(repo_id, private=True)
    except Exception as e:  # network, auth or repo errors from huggingface_hub
        raise ReflowError(
            f"could not push {path} to the Hub as {repo_id} ({first_line(e)}); the pairs are complete on disk, "
            "log in with `hf auth login` and rerun"
        ) from None
