"""Teachers map noise z0 to a sample z1. A teacher is deterministic: the same z0 gives the same z1.

Every teacher has ``sample_shape``, ``describe()`` (its provenance, recorded with the pairs) and
``__call__(z0) -> z1`` on batches of shape (B, *sample_shape).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Protocol

import torch

from .errors import ReflowError
from .models import load_model
from .solvers import SOLVERS, solve


class Teacher(Protocol):
    sample_shape: tuple[int, ...]
    device: torch.device

    def describe(self) -> dict[str, Any]: ...

    def __call__(self, z0: torch.Tensor) -> torch.Tensor: ...


def config_hash(folder: Path) -> str:
    """sha256 over every config JSON of a model folder (not the weights), to tell teachers apart."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.json")):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def weights_hash(folder: Path) -> str:
    """sha256 over the safetensors weight files of a model folder."""
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


class FlowTeacher:
    """One of our own flow models, solved from t = 0 to 1 with a fixed-grid or adaptive solver."""

    def __init__(
        self,
        path: str | Path,
        nfe: int = 100,
        solver: str = "euler",
        device: torch.device | str = "cpu",
        allow_pickle: bool = False,
    ):
        if solver not in SOLVERS:
            raise ReflowError(f"unknown solver {solver!r} (choose one of {', '.join(SOLVERS)})")
        if nfe < 1:
            raise ReflowError(f"--nfe must be at least 1, got {nfe}")
        self.path = Path(path)
        self.model = load_model(self.path, allow_pickle=allow_pickle).to(device).eval()
        self.model.requires_grad_(False)
        self.sample_shape = tuple(self.model.sample_shape)
        self.device = torch.device(device)
        self.nfe = nfe
        self.solver = solver

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "flow",
            "teacher": str(self.path.resolve()),
            "config_hash": config_hash(self.path),
            "weights_hash": weights_hash(self.path),
            "solver": self.solver,
            "nfe": self.nfe if self.solver != "adaptive" else "adaptive",
        }

    @torch.inference_mode()
    def __call__(self, z0: torch.Tensor) -> torch.Tensor:
        return solve(self.model, z0.to(self.device), self.nfe, self.solver).z1


def load_teacher(
    path: str | Path,
    *,
    nfe: int,
    solver: str,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    **overrides: Any,
) -> Teacher:
    """Open a teacher folder: one of our flow models (a ``config.json`` naming a reflow model class), or a
    diffusers pipeline folder (``model_index.json``; solvers "ddim", "dpm"; ``overrides`` such as
    ``timestep_spacing`` / ``clip_sample`` go to its scheduler, see ``reflow.diffusers_teacher``)."""
    path = Path(path)
    if not path.exists():
        raise ReflowError(
            f"no such teacher: {path} (pass a model folder written by `reflow train` or a diffusers pipeline folder)"
        )
    from .models import is_flow_pipeline

    if (path / "model_index.json").is_file() and not is_flow_pipeline(path):
        from .diffusers_teacher import DiffusersTeacher

        return DiffusersTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle, **overrides)
    if overrides:
        names = ", ".join(sorted(overrides))
        raise ReflowError(f"{names} only apply to diffusers teachers; drop them for {path}")
    if is_flow_pipeline(path):
        return FlowTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle)
    if (path / "config.json").is_file():
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
        from .models import MODEL_CLASSES

        if class_name in MODEL_CLASSES:
            return FlowTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle)
    raise ReflowError(
        f"{path} is neither a reflow flow model folder nor a diffusers pipeline folder "
        "(no model_index.json); pass a folder written by `reflow train` "
        "or by diffusers save_pretrained"
    )
