"""The one interface every teacher implements. A teacher maps noise z0 to a sample z1 and is deterministic:
the same z0 (and conditioning) gives the same z1.

Conditioning travels as one tensor, ``cond``, whatever the teacher: None for an unconditional teacher, the
class labels (B,) of a class-conditional one, the prompt embeddings (B, *embed_shape) of a text-to-image one
(see ``reflow.core.conditioning``). Callers read what a teacher takes from its attributes, never by probing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from reflow.core.conditioning import Conditioning
from reflow.core.progress import OnCall
from reflow.errors import ReflowError


class Teacher(ABC):
    """A teacher: ``teacher(z0, cond) -> z1`` on batches z0 of shape (B, *sample_shape).

    Attributes (the defaults describe an unconditional teacher):

    - ``path``: the folder it was opened from; ``device``: where it runs;
    - ``sample_shape``: one sample's shape, (C, H, W) for images and latents, (D,) for vectors;
    - ``conditioning``: None, "class" or "text";
    - ``num_classes``: the class count of a class-conditional teacher (its null class included), else None;
    - ``label_choices``: the classes a pair's label may be drawn from (the null class left out), else None;
    - ``embed_shape``: the shape of one prompt embedding (seq, dim) of a text teacher, else None.
    """

    path: Path
    device: torch.device
    sample_shape: tuple[int, ...]
    conditioning: Conditioning | None = None
    num_classes: int | None = None
    label_choices: list[int] | None = None
    embed_shape: tuple[int, ...] | None = None

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The teacher's provenance (JSON-ready), recorded with the pairs it makes and compared on resume."""

    @abstractmethod
    def __call__(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None, *, on_call: OnCall | None = None
    ) -> torch.Tensor:
        """z1 (B, *sample_shape) from the unit Gaussian z0 (B, *sample_shape) and the conditioning ``cond``:
        class labels (B,) for "class", prompt embeddings (B, *embed_shape) for "text", None otherwise.
        ``on_call(B)`` is called after each network call (progress from inside a batch)."""

    @property
    def network_calls(self) -> int | None:
        """The network calls one batch takes (None when unknown ahead, as for an adaptive solver)."""
        return None

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, *embed_shape) prompt embeddings for a text teacher; any other teacher refuses."""
        raise ReflowError(f"{self.path} is not a text-to-image model; it takes no prompts")
