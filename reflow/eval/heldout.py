"""Held-out pairs: the teacher's own (z0, z1) rows that fidelity is measured on, with their conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from reflow.core.sampling import is_image
from reflow.errors import ReflowError
from reflow.folders.kinds import folder_kind
from reflow.pairs import PairsReader


@dataclass
class Heldout:
    """The first rows of a pairs folder, in model space: noise ``z0`` and the teacher's samples ``z1``
    (images clamped to [-1, 1], latents not), with the rows' conditioning ``cond`` (class labels (N,) or
    prompt embeddings (N, seq, dim); None for unconditional pairs)."""

    path: str
    z0: torch.Tensor
    z1: torch.Tensor
    provenance: dict[str, Any]
    cond: torch.Tensor | None
    conditioning: str | None

    @property
    def teacher(self) -> dict[str, Any]:
        """The record of the teacher that made the pairs ({} when none was recorded)."""
        return self.provenance.get("teacher") or {}


def is_pairs(path: str | Path) -> bool:
    """A folder written by `reflow generate` (its reflow_pairs.json), or a pairs dataset with z0 and z1
    columns made elsewhere; a damaged `reflow generate` folder is opened later and refused with its own line
    rather than taken for a data source."""
    p = Path(path)
    if not p.is_dir():
        return False
    if folder_kind(p) == "pairs":
        return True
    try:
        PairsReader(p, max_rows=1, in_memory="no")
    except ReflowError:
        return False
    return True


def load_heldout(path: str, shape: tuple[int, ...], *, max_rows: int, allow_pickle: bool = False) -> Heldout:
    """The first ``max_rows`` pairs of ``path``, checked to hold samples of ``shape``. Text pairs stored
    without embeddings get their prompts encoded with the text encoder of the teacher that made them."""
    reader = PairsReader(path, max_rows=max_rows, in_memory="no")  # read once, below
    if tuple(reader.sample_shape) != shape:
        raise ReflowError(
            f"held-out pairs {path} hold samples of shape {tuple(reader.sample_shape)}, the models make {shape}"
        )
    if reader.conditioning == "text" and not reader.has_embeddings:
        from reflow.models.text import PromptEncoder

        teacher = (reader.provenance.get("teacher") or {}).get("teacher", "")
        encoder = PromptEncoder(teacher, allow_pickle=allow_pickle)
        reader.attach_prompt_embeddings(encoder(reader.unique_prompts()))
    z0, z1, cond = reader.batch(torch.arange(len(reader)))
    if is_image(shape) and reader.conditioning != "text":
        z1 = z1.clamp(-1, 1)
    value = next(iter(cond.values())) if cond else None
    return Heldout(path, z0, z1, reader.provenance, value, reader.conditioning)
