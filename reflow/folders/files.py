"""Reading what a folder holds: JSON files, the first line of a library's error."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from reflow.errors import ReflowError

BUNDLED = Path(__file__).resolve().parents[2] / "data"
"""The repository's data/ folder: the bundled teachers, feature networks and recipes."""


def read_json(file: Path, fix: str = "re-save the checkpoint") -> dict[str, Any]:
    """A JSON object from ``file``, or one line naming the file and ``fix``."""
    if not file.is_file():
        raise ReflowError(f"{file.parent} has no {file.name}; {fix}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReflowError(f"{file} is not valid JSON ({type(e).__name__}); {fix}") from None
    if not isinstance(data, dict):
        raise ReflowError(f"{file} is not a JSON object; {fix}")
    return data


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def json_clean(value: Any) -> Any:
    """Strict-JSON values (inf/nan as strings), round-tripped so describe() compares equal to what is read
    back from run.json when a generation run resumes."""

    def strict(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v

    return json.loads(json.dumps(strict(value), sort_keys=True, default=str, allow_nan=False))


def sha256_file(path: Path) -> str:
    """The sha256 of one file, read in 1 MiB blocks (about 1 GB/s on one core)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tree_hash(root: Path, files: list[Path]) -> str:
    """16 hex digits of sha256 over each file's path relative to ``root`` and its bytes, in sorted order:
    the one fingerprint of a set of files (renaming or moving a file inside ``root`` changes it too)."""
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(f).encode())
    return h.hexdigest()[:16]


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def config_hash(folder: Path) -> str:
    """Fingerprint of every config JSON under ``folder`` (not the weights), to tell teachers apart."""
    return tree_hash(folder, list(folder.rglob("*.json")))


def weights_hash(folder: Path, components: tuple[str, ...] = ("",)) -> str:
    """Fingerprint of the weights under ``folder``'s ``components`` (sub-folders; "" is the folder itself):
    each component's safetensors files, or its pickle files where it has none."""
    files: list[Path] = []
    for name in components:
        part = folder / name if name else folder
        found = sorted(part.rglob("*.safetensors"))
        files += found or sorted(f for f in part.rglob("*") if f.is_file() and f.name.endswith(PICKLE_SUFFIXES))
    return tree_hash(folder, files)
