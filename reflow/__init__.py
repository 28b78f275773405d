"""reflow: rectified-flow distillation of diffusion models into few-step generators.

Every command of the CLI is a function here too (imported on first use, so ``import reflow`` stays cheap)::

    from reflow import TrainConfig, train, load_teacher, generate_pairs, sample, EvalSettings, evaluate

Time convention everywhere: t = 0 is noise, t = 1 is data.
"""

from __future__ import annotations

import importlib
from typing import Any

from reflow.errors import ReflowError
from reflow.version import __version__

# public name -> the module that defines it
_API = {
    "TrainConfig": "reflow.student",
    "TrainResult": "reflow.student",
    "train": "reflow.student",
    "load_teacher": "reflow.teachers",
    "generate_pairs": "reflow.pairs",
    "verify_pairs": "reflow.pairs",
    "PairsReader": "reflow.pairs",
    "load_pairs": "reflow.pairs",
    "with_z0": "reflow.pairs",
    "load_model": "reflow.models",
    "sample": "reflow.eval",
    "EvalSettings": "reflow.eval",
    "evaluate": "reflow.eval",
    "write_report": "reflow.eval",
    "Recipe": "reflow.rounds",
    "run_rounds": "reflow.rounds",
    "run_quickstart": "reflow.rounds",
}

__all__ = ["ReflowError", "__version__", *_API]


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'reflow' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
