"""One of our own flow models as a teacher: its velocity solved from t = 0 (noise) to t = 1 (data), or a
MeanFlow model's nfe jumps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reflow.core.conditioning import DESCRIPTION, keywords
from reflow.core.flow import Conditioned
from reflow.core.progress import OnCall
from reflow.core.sampling import solve_model
from reflow.core.solvers import SOLVERS, heun_steps_for_nfe
from reflow.errors import ReflowError
from reflow.folders.files import config_hash, weights_hash
from reflow.folders.kinds import read_index
from reflow.models.velocity import load_model
from reflow.teachers.base import Teacher


class FlowTeacher(Teacher):
    """One of our own flow models, solved from t = 0 to 1 with a fixed-grid or adaptive solver.

    A conditional student teaches conditionally: ``__call__(z0, cond)`` with cond the class labels (B,) of a
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
        if getattr(self.model, "mean_flow", False) and solver != "euler":
            raise ReflowError(f"{self.path} is a MeanFlow model: it samples in jumps (solver euler), not {solver}")
        self.sample_shape = tuple(self.model.sample_shape)
        self.device = torch.device(device)
        self.nfe = nfe
        self.solver = solver
        # MLP flows have no conditioning attributes: they are unconditional
        self.conditioning = getattr(self.model, "conditioning", None)
        self.num_classes = getattr(self.model, "num_classes", None)
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
            return super().encode_prompts(prompts)
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

    def _velocity(self, cond: torch.Tensor | None):
        """The velocity the solver integrates: the model, its conditioning bound as the UNet keyword."""
        if self.conditioning is None:
            if cond is not None:
                raise ReflowError(f"{self.path} is unconditional; drop the labels / prompts")
            return self.model
        if cond is None:
            what = "labels" if self.conditioning == "class" else "prompt embeddings"
            raise ReflowError(f"{self.path} is {DESCRIPTION[self.conditioning]}: pass {what}")
        if self.conditioning == "class":
            cond = torch.as_tensor(cond).to(self.device, torch.long)
        else:
            cond = cond.to(self.device)
        return Conditioned(self.model, **keywords(self.conditioning, cond))

    @property
    def network_calls(self) -> int | None:
        if self.solver == "adaptive":
            return None
        return self.nfe if self.solver == "euler" else 2 * heun_steps_for_nfe(self.nfe) - 1

    @torch.inference_mode()
    def __call__(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None, *, on_call: OnCall | None = None
    ) -> torch.Tensor:
        # a MeanFlow student teaches with its nfe jumps, any other flow with its ODE solve
        velocity = self._velocity(cond)
        return solve_model(velocity, z0.to(self.device), self.nfe, self.solver, on_call=on_call).z1
