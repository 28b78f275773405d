"""Open a teacher folder as the teacher that samples it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.files import read_json
from reflow.folders.kinds import is_diffusers_checkpoint, is_flow_pipeline, is_text_pipeline
from reflow.models.velocity import MODEL_CLASSES
from reflow.teachers.base import Teacher
from reflow.teachers.ddpm import DiffusersTeacher
from reflow.teachers.flow import FlowTeacher
from reflow.teachers.text import TextToImageTeacher

DEFAULT_DIFFUSERS_NFE = 50
DEFAULT_FLOW_NFE = 100


def _diffusers_teacher(path: Path, **settings: Any) -> Teacher:
    """A text-to-image or a pixel-space DDPM teacher; each refuses the other's settings."""
    if is_text_pipeline(path):
        for name in ("null_label", "clipped_model_output"):
            if name in settings:
                flag = "--" + name.replace("_", "-")
                raise ReflowError(f"{flag} applies to pixel-space DDPM teachers; drop it for a text-to-image one")
        return TextToImageTeacher(path, **settings)
    if "negative_prompt" in settings:
        raise ReflowError("--negative-prompt applies to text-to-image teachers; drop it")
    return DiffusersTeacher(path, **settings)


def _is_flow_model(path: Path) -> bool:
    """A folder of one of our flow models: a flow pipeline, or a ``config.json`` naming a reflow model class."""
    if is_flow_pipeline(path):
        return True
    if (path / "config.json").is_file():
        return read_json(path / "config.json", "re-save the model").get("_class_name") in MODEL_CLASSES
    return False


def load_teacher(
    path: str | Path,
    *,
    nfe: int | None = None,
    solver: str | None = None,
    device: torch.device | str = "cpu",
    allow_pickle: bool = False,
    **overrides: Any,
) -> Teacher:
    """Open a teacher folder: one of our flow models (a ``config.json`` naming a reflow model class), or a
    diffusers pipeline folder (``model_index.json``; solvers "ddim", "dpm"; ``overrides`` such as
    ``timestep_spacing`` / ``clip_sample`` go to its scheduler, see ``reflow.teachers.scheduler``).
    Defaults: a diffusers checkpoint runs DDIM (eta = 0) in 50 steps, a flow Euler in 100."""
    path = Path(path)
    if not path.exists():
        raise ReflowError(
            f"no such teacher: {path} (pass a model folder written by `reflow train` or a diffusers pipeline folder)"
        )
    diffusers = is_diffusers_checkpoint(path)
    solver = solver if solver is not None else ("ddim" if diffusers else "euler")
    nfe = nfe if nfe is not None else (DEFAULT_DIFFUSERS_NFE if diffusers else DEFAULT_FLOW_NFE)
    if diffusers:
        return _diffusers_teacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle, **overrides)
    if overrides:
        names = ", ".join(sorted(overrides))
        raise ReflowError(f"{names} only apply to diffusers teachers; drop them for {path}")
    if _is_flow_model(path):
        return FlowTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle)
    raise ReflowError(
        f"{path} is neither a reflow flow model folder nor a diffusers pipeline folder "
        "(no model_index.json); pass a folder written by `reflow train` "
        "or by diffusers save_pretrained"
    )
