"""Safe weight loading: safetensors unless the user opts in to pickle, and a record of what was written so
changed bytes are refused on load."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reflow.errors import ReflowError
from reflow.folders.files import PICKLE_SUFFIXES, sha256_file


def use_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """True to load ``folder``'s safetensors weights; False for its pickle weights, only with ``allow_pickle``
    (the one place that decides: UNets, our models, text encoders and VAEs all ask it)."""
    files = [f for f in folder.iterdir() if f.is_file()]
    if any(f.name.endswith(".safetensors") for f in files):
        return True
    if not any(f.name.endswith(PICKLE_SUFFIXES) for f in files):
        raise ReflowError(f"{folder} holds no weights (.safetensors); re-save the checkpoint with save_pretrained")
    if not allow_pickle:
        raise ReflowError(f"{folder} has only pickle (.bin) weights; pass --allow-pickle to load weights you trust")
    return False


WEIGHTS_RECORD = "reflow_weights.json"
"""Written at a model folder's root when reflow saves it: ``{relative path: {"size": bytes, "sha256": hex}}``
for every weights file under the folder. Loading checks the files against it (:func:`check_weights`)."""
WEIGHTS_SUFFIXES = (".safetensors", ".bin")


def record_weights(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Write ``folder/reflow_weights.json``: the size and sha256 of every weights file under ``folder``."""
    from reflow.folders.io import atomic_write_json

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHTS_SUFFIXES)
    record = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files}
    atomic_write_json(folder / WEIGHTS_RECORD, record)
    return record


def check_weights(weights_dir: str | Path) -> None:
    """Refuse weights whose bytes changed after reflow wrote them (bit rot, a truncated copy, an edit).

    The record is ``weights_dir/reflow_weights.json`` or, for a pipeline's component folder such as ``unet/``,
    the one in its parent; only the files it lists inside ``weights_dir`` are checked. A folder without a
    record (a diffusers checkpoint from elsewhere, a model of an older reflow) passes unchecked. Cost: every
    load reads each weights file once more for its sha256 (about 1 GB/s on one core: milliseconds for the
    digits and toy models, a few seconds for a Stable Diffusion UNet); sizes are compared first, for free.
    """
    weights_dir = Path(weights_dir)
    root = next((d for d in (weights_dir, weights_dir.parent) if (d / WEIGHTS_RECORD).is_file()), None)
    if root is None:
        return
    record_file = root / WEIGHTS_RECORD
    try:
        record = json.loads(record_file.read_text())
        inside = "" if root == weights_dir else weights_dir.name + "/"
        listed = {
            root / name: (int(e["size"]), str(e["sha256"])) for name, e in record.items() if name.startswith(inside)
        }
    except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError):
        raise ReflowError(f"{record_file} is not a valid weights record; re-export or re-train the model") from None
    for file, (size, _) in listed.items():
        if not file.is_file():
            raise ReflowError(f"{file} is missing ({record_file.name} lists it); re-export or re-train the model")
        if file.stat().st_size != size:
            raise ReflowError(
                f"{file} changed after it was written ({file.stat().st_size} bytes, {size} recorded); "
                "re-export or re-train the model"
            )
    for file, (_, sha256) in listed.items():
        if sha256_file(file) != sha256:
            raise ReflowError(f"{file} changed after it was written (sha256 mismatch); re-export or re-train the model")
