"""Teachers map noise z0 to a sample z1. A teacher is deterministic: the same z0 gives the same z1.

Every teacher has ``sample_shape``, ``describe()`` (its provenance, recorded with the pairs) and
``__call__(z0) -> z1`` on batches of shape (B, *sample_shape).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import torch

from reflow.core.flow import Conditioned
from reflow.core.solvers import SOLVERS, solve
from reflow.errors import ReflowError
from reflow.folders.files import config_hash, weights_hash
from reflow.folders.kinds import is_diffusers_checkpoint, is_flow_pipeline, is_text_pipeline, read_index
from reflow.models.velocity import load_model


class Teacher(Protocol):
    sample_shape: tuple[int, ...]
    device: torch.device

    def describe(self) -> dict[str, Any]: ...

    def __call__(self, z0: torch.Tensor) -> torch.Tensor: ...


class FlowTeacher:
    """One of our own flow models, solved from t = 0 to 1 with a fixed-grid or adaptive solver.

    A conditional student teaches conditionally: ``__call__(z0, y)`` with y the class labels (B,) of a
    class-conditional model or the prompt embeddings (B, seq, dim) of a text-to-image one
    (``encode_prompts`` runs the text encoder stored in its folder, on the CPU).
    """

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
        self.allow_pickle = allow_pickle
        self.model = load_model(self.path, allow_pickle=allow_pickle).to(device).eval()
        self.model.requires_grad_(False)
        self.sample_shape = tuple(self.model.sample_shape)
        self.device = torch.device(device)
        self.nfe = nfe
        self.solver = solver
        self.conditioning = getattr(self.model, "conditioning", None)
        self.num_classes = getattr(self.model, "num_classes", None)
        self.label_choices = None
        if self.num_classes is not None:
            null = read_index(self.path).get("_reflow_null_class")
            self.label_choices = [c for c in range(self.num_classes) if c != null]
        self._encoder = None
        if self.conditioning == "text":
            self.embed_shape = (
                int(self._prompt_encoder().max_length),
                int(self.model.unet.config.cross_attention_dim),
            )

    def _prompt_encoder(self):
        if self._encoder is None:
            from reflow.models.text import PromptEncoder

            self._encoder = PromptEncoder(self.path, allow_pickle=self.allow_pickle)
        return self._encoder

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        if self.conditioning != "text":
            raise ReflowError(f"{self.path} is not a text-to-image model; it takes no prompts")
        return self._prompt_encoder()(prompts)

    def describe(self) -> dict[str, Any]:
        out = {
            "kind": "flow",
            "teacher": str(self.path.resolve()),
            "config_hash": config_hash(self.path),
            "weights_hash": weights_hash(self.path),
            "solver": self.solver,
            "nfe": self.nfe if self.solver != "adaptive" else "adaptive",
        }
        if self.conditioning is not None:  # absent for unconditional teachers: their records stay as they were
            out["conditioning"] = self.conditioning
            out["num_classes"] = self.num_classes
            nulls = sorted(set(range(self.num_classes)) - set(self.label_choices)) if self.num_classes else []
            if nulls:
                out["null_label"] = nulls[0]
        return out

    @torch.inference_mode()
    def __call__(self, z0: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        velocity = self.model
        if self.conditioning == "class":
            if y is None:
                raise ReflowError(f"{self.path} is class-conditional: pass labels")
            velocity = Conditioned(self.model, class_labels=torch.as_tensor(y).to(self.device, torch.long))
        elif self.conditioning == "text":
            if y is None:
                raise ReflowError(f"{self.path} is text-conditional: pass prompt embeddings")
            velocity = Conditioned(self.model, encoder_hidden_states=y.to(self.device))
        elif y is not None:
            raise ReflowError(f"{self.path} is unconditional; drop the labels / prompts")
        return solve(velocity, z0.to(self.device), self.nfe, self.solver).z1


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
    ``timestep_spacing`` / ``clip_sample`` go to its scheduler, see ``reflow.teachers.ddpm``)."""
    path = Path(path)
    if not path.exists():
        raise ReflowError(
            f"no such teacher: {path} (pass a model folder written by `reflow train` or a diffusers pipeline folder)"
        )

    if is_diffusers_checkpoint(path):
        if is_text_pipeline(path):
            from reflow.teachers.text import TextToImageTeacher

            for name in ("null_label", "clipped_model_output"):
                if name in overrides:
                    flag = "--" + name.replace("_", "-")
                    raise ReflowError(f"{flag} applies to pixel-space DDPM teachers; drop it for a text-to-image one")
            return TextToImageTeacher(
                path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle, **overrides
            )
        from reflow.teachers.ddpm import DiffusersTeacher

        if "negative_prompt" in overrides:
            raise ReflowError("--negative-prompt applies to text-to-image teachers; drop it")
        return DiffusersTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle, **overrides)
    if overrides:
        names = ", ".join(sorted(overrides))
        raise ReflowError(f"{names} only apply to diffusers teachers; drop them for {path}")
    if is_flow_pipeline(path):
        return FlowTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle)
    if (path / "config.json").is_file():
        class_name = json.loads((path / "config.json").read_text()).get("_class_name")
        from reflow.models.velocity import MODEL_CLASSES

        if class_name in MODEL_CLASSES:
            return FlowTeacher(path, nfe=nfe, solver=solver, device=device, allow_pickle=allow_pickle)
    raise ReflowError(
        f"{path} is neither a reflow flow model folder nor a diffusers pipeline folder "
        "(no model_index.json); pass a folder written by `reflow train` "
        "or by diffusers save_pretrained"
    )
