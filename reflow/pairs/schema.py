"""What a pairs folder holds: its columns, their ``datasets`` features, and the provenance record
``reflow_pairs.json`` with its integrity fields.

Columns: ``z1`` (the teacher's sample), a fixed-shape float32 or float16 array, and ``index`` (the row's
seed index: its z0, the unit Gaussian the teacher started from, is row_noise(seed, index), rebuilt by
``reflow.pairs.z0``); ``z0`` itself, of z1's shape and dtype, only when generated with ``store_z0`` (and in
folders written before z0 became optional); ``label`` for class-conditional teachers; ``prompt`` (and
``prompt_embeds``) for text teachers.

``reflow_pairs.json`` holds the provenance (teacher, solver, nfe, seed, dtype, round, ``store_z0``, reflow
version), the row count ``num_rows`` and ``files``: each file's size and sha256. Opening the pairs checks the sizes and
the rows, ``verify_pairs`` the hashes too. Folders written before these records existed are not checked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.files import read_json, sha256_file
from reflow.folders.kinds import PAIRS_RECORD, folder_kind

DTYPES = {"float32": torch.float32, "float16": torch.float16}
"""The dtypes z1 (and a stored z0) may be stored in, by name."""

CARD = "README.md"
"""The dataset card beside the Arrow files (not in the file records: it is written after them)."""


def array_feature(shape: tuple[int, ...], dtype: str):
    """A fixed-shape ``datasets`` feature for one row of ``shape`` (1 to 5 dimensions)."""
    import datasets

    if len(shape) == 1:
        return datasets.Sequence(datasets.Value(dtype), length=shape[0])
    if 2 <= len(shape) <= 5:
        return getattr(datasets, f"Array{len(shape)}D")(shape=tuple(shape), dtype=dtype)
    raise ReflowError(f"samples of shape {shape} are not supported (1 to 5 dimensions)")


def pair_features(
    sample_shape: tuple[int, ...],
    dtype: str,
    labels: bool = False,
    prompts: bool = False,
    embed_shape: tuple[int, int] | None = None,
    store_z0: bool = False,
):
    """Fixed-shape ``datasets`` features for z1 (and z0 with ``store_z0``) so ``with_format('torch')``
    returns stacked tensors, plus ``index``; for class-conditional teachers ``label``; for text teachers
    ``prompt`` and, when ``embed_shape`` is given, ``prompt_embeds`` (the text encoder's output for the
    prompt)."""
    import datasets

    array = array_feature(tuple(sample_shape), dtype)
    columns = {"z0": array} if store_z0 else {}
    columns |= {"z1": array, "index": datasets.Value("int64")}
    if labels:
        columns["label"] = datasets.Value("int64")
    if prompts:
        columns["prompt"] = datasets.Value("string")
        if embed_shape is not None:
            columns["prompt_embeds"] = array_feature(tuple(embed_shape), dtype)
    return datasets.Features(columns)


def damaged(path: Path, what: str) -> ReflowError:
    """The one-line error for a pairs folder whose files or record are not as written."""
    return ReflowError(f"{path} is damaged: {what}; delete it and rerun `reflow generate` to regenerate it")


def read_provenance(path: str | Path) -> dict[str, Any]:
    """The provenance recorded with a pairs folder by ``generate_pairs`` (its ``reflow_pairs.json``)."""
    path = Path(path)
    if not path.is_dir():
        raise ReflowError(f"no such pairs folder: {path}")
    if folder_kind(path) != "pairs":
        raise ReflowError(f"{path} has no {PAIRS_RECORD}: not written by `reflow generate`")
    try:
        return read_json(path / PAIRS_RECORD)
    except ReflowError:  # empty, cut short, not UTF-8, not an object
        raise damaged(path, f"{PAIRS_RECORD} is not valid JSON") from None


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of each file of a saved dataset, the integrity fields that ``check_files`` checks."""
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.name not in (PAIRS_RECORD, CARD))
    return {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)} for f in files}


def check_files(path: Path, record: dict[str, Any], full: bool) -> None:
    """Check the files recorded in ``reflow_pairs.json`` are there with their sizes (and, with ``full``,
    their sha256). Folders written before these records existed are not checked."""
    files = record.get("files")
    if files is None:
        return
    if not isinstance(files, dict):
        raise damaged(path, f"{PAIRS_RECORD} has no valid file list")
    for name, want in sorted(files.items()):
        try:
            size, digest = int(want["bytes"]), str(want["sha256"])
        except (TypeError, KeyError, ValueError):
            raise damaged(path, f"{PAIRS_RECORD} has no valid record of {name}") from None
        f = path / name
        if Path(name).name != name or not f.is_file():
            raise damaged(path, f"file {name} is missing")
        got = f.stat().st_size
        if got != size:
            raise damaged(path, f"file {name} has {got} bytes, expected {size}")
        if full and sha256_file(f) != digest:
            raise damaged(path, f"file {name} does not match its recorded sha256")
