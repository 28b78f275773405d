"""A cheap stand-in teacher for the pair benchmarks (``pairs.py``, ``scale.py``): z1 = tanh(z0).

It runs through the real ``generate_pairs`` path like any teacher, but costs next to nothing, so what those
benchmarks measure is the pipeline around it: the noise, the shards, the Arrow files and the reading.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reflow.core.progress import OnCall
from reflow.teachers.base import Teacher


class StandIn(Teacher):
    """A teacher that costs nothing: z1 = tanh(z0). Only the bytes, the writing and the reading are measured."""

    def __init__(self, shape: tuple[int, ...]):
        self.path, self.device, self.sample_shape = Path("stand-in"), torch.device("cpu"), tuple(shape)

    def describe(self) -> dict[str, Any]:
        return {"teacher": "stand-in: tanh(z0)", "solver": "none", "nfe": 0}

    def __call__(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None, *, on_call: OnCall | None = None
    ) -> torch.Tensor:
        z1 = torch.tanh(z0)
        if on_call is not None:
            on_call(len(z0))
        return z1
