"""One model under evaluation, a candidate: a flow of ours or a diffusers checkpoint, with its conditioning,
and the ways an evaluation samples it (t = 0 noise, t = 1 data).

Flows sample with Euler on their own grid (an exported student's scheduler grid); a diffusers DDPM
checkpoint samples with its own scheduler (DDIM with eta = 0 by default) at k steps, so the teacher's
row shows what its own solver does with the same budget of k network calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.conditioning import keywords
from reflow.core.flow import Conditioned
from reflow.core.progress import OnCall
from reflow.core.sampling import is_image, sample
from reflow.core.solvers import solve
from reflow.errors import ReflowError
from reflow.folders.kinds import is_diffusers_checkpoint, is_text_pipeline, read_index
from reflow.models.velocity import load_model


class Candidate:
    """One model under evaluation: a flow of ours, or a diffusers checkpoint sampled with its solver.

    ``conditioning`` is None, "class" or "text"; the sampling methods then take ``cond``, the rows' class
    labels (N,) or prompt embeddings (N, seq, dim). Images are clamped to [-1, 1]; latent (text-to-image)
    samples are not. ``batch_size`` rows are solved at a time; ``teacher_nfe`` and ``teacher_solver`` are a
    checkpoint's reference solve, ``guidance`` its guidance settings (see :func:`checkpoint_guidance`), and
    ``adaptive_tol`` the rtol = atol of every adaptive (dopri5) solve of a flow. ``on_call(rows)`` is
    called after every network call of its solves (progress; see ``reflow.core.progress``).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        device: torch.device | str = "cpu",
        batch_size: int = 1024,
        teacher_nfe: int = 50,
        teacher_solver: str = "ddim",
        guidance: dict[str, Any] | None = None,
        adaptive_tol: float = 1e-4,
        allow_pickle: bool = False,
        on_call: OnCall | None = None,
    ):
        self.path = Path(path)
        self.on_call = on_call
        self.device = device
        self.batch_size = batch_size
        self.teacher_nfe = teacher_nfe
        self.teacher_solver = teacher_solver
        self.adaptive_tol = adaptive_tol
        if not self.path.exists():
            raise ReflowError(
                f"no such model: {self.path} (pass a `reflow train` folder or a diffusers pipeline folder)"
            )
        if is_diffusers_checkpoint(self.path):
            self._load_checkpoint(guidance or {}, allow_pickle)
        else:
            self._load_flow(allow_pickle)
        self.clamp = is_image(self.sample_shape) and self.conditioning != "text"

    def _load_checkpoint(self, guidance: dict[str, Any], allow_pickle: bool) -> None:
        from reflow.teachers import load_teacher

        self.kind = "diffusers"
        self.teacher = load_teacher(
            self.path,
            nfe=self.teacher_nfe,
            solver=self.teacher_solver,
            device=self.device,
            allow_pickle=allow_pickle,
            **guidance,
        )
        self.conditioning = self.teacher.conditioning
        self.num_classes = self.teacher.num_classes
        self.label_choices = self.teacher.label_choices
        self.sample_shape = tuple(self.teacher.sample_shape)
        self.solver = f"{self.teacher_solver} (the checkpoint's scheduler)"
        if guidance.get("guidance_scale") is not None:
            self.solver += f", guidance {guidance['guidance_scale']:g}"

    def _load_flow(self, allow_pickle: bool) -> None:
        self.kind = "flow"
        self.model = load_model(self.path, allow_pickle=allow_pickle).to(self.device).eval()
        self.conditioning = getattr(self.model, "conditioning", None)
        self.num_classes = getattr(self.model, "num_classes", None)
        self.label_choices = None
        if self.conditioning == "class":
            null = read_index(self.path).get("_reflow_null_class")
            self.label_choices = [c for c in range(self.model.num_classes) if c != null]
        self.sample_shape = tuple(self.model.sample_shape)
        grid = "its scheduler's grid" if hasattr(self.model, "euler_grid") else "uniform grid"
        self.solver = f"euler ({grid})"

    def _finish(self, z1: torch.Tensor) -> torch.Tensor:
        return z1.clamp(-1, 1) if self.clamp else z1

    def sample(self, z0: torch.Tensor, k: int, cond: torch.Tensor | None = None) -> torch.Tensor:
        """z1 from z0 in k network calls (k-step Euler for a flow, k-step DDPM solver for a checkpoint);
        ``cond``: the rows' class labels or prompt embeddings for a conditional model."""
        bs = self.batch_size
        if self.kind == "flow":
            kw = keywords(self.conditioning, cond)
            return sample(
                self.model, z0, k, "euler", batch_size=bs, device=self.device, clamp=self.clamp, cond=kw,
                on_call=self.on_call,
            ).z1  # fmt: skip
        self.teacher.nfe = k  # the teacher resets its scheduler to self.nfe steps on every call
        outs = []
        for b in range(0, len(z0), bs):
            args = (z0[b : b + bs],) if cond is None else (z0[b : b + bs], cond[b : b + bs])
            outs.append(self.teacher(*args, on_call=self.on_call).float().cpu())
        return self._finish(torch.cat(outs))

    def _field(self, cond: torch.Tensor | None, b: int, e: int):
        kw = keywords(self.conditioning, None if cond is None else cond[b:e].to(self.device))
        return Conditioned(self.model, **kw) if kw else self.model

    def adaptive(self, z0: torch.Tensor, cond: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """A flow's z1 from z0 solved adaptively (dopri5, rtol = atol = ``adaptive_tol``), and the most
        network calls any batch needed."""
        outs, nfe = [], 0
        bs, tol = self.batch_size, self.adaptive_tol
        for b in range(0, len(z0), bs):
            field = self._field(cond, b, b + bs)
            sol = solve(field, z0[b : b + bs].to(self.device), 0, "adaptive", rtol=tol, atol=tol, on_call=self.on_call)
            outs.append(sol.z1.float().cpu())
            nfe = max(nfe, sol.nfe)
        return self._finish(torch.cat(outs)), nfe

    def reference_solve(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None, adaptive: bool | None = None
    ) -> tuple[torch.Tensor, int, str] | None:
        """(z1, network calls, solver) of the model's best solve: a checkpoint's own solver at
        ``teacher_nfe`` steps; for a flow the adaptive solve when ``adaptive`` (None: for vectors, not
        images, since it costs ~100 calls per sample), else None."""
        if self.kind == "diffusers":
            return self.sample(z0, self.teacher_nfe, cond), self.teacher_nfe, self.teacher_solver
        if adaptive is False or (adaptive is None and is_image(self.sample_shape)):
            return None
        z1, nfe = self.adaptive(z0, cond)
        return z1, nfe, "adaptive"

    def diagnostics(
        self, z0: torch.Tensor, cond: torch.Tensor | None = None, steps: int = 100
    ) -> dict[str, Any] | None:
        """A flow's straightness S and curvature K along a ``steps``-step Euler solve from z0 (see
        ``reflow.core.solvers``) and the calls its adaptive solve needs; None for a checkpoint."""
        if self.kind != "flow":
            return None
        sol = sample(
            self.model, z0, steps, "euler", batch_size=self.batch_size, device=self.device,
            measure_straightness=True, clamp=self.clamp, cond=keywords(self.conditioning, cond), on_call=self.on_call,
        )  # fmt: skip
        _, nfe = self.adaptive(z0, cond)
        return {
            "straightness": sol.straightness,
            "curvature": sol.curvature,
            "adaptive_nfe": nfe,
            "steps": steps,
            "samples": len(z0),
        }

    @torch.inference_mode()
    def trajectories(self, z0: torch.Tensor, steps: int = 50) -> np.ndarray | None:
        """(steps + 1, n, 2) paths of a 2-D flow, for the trajectory plot; None for a checkpoint."""
        if self.kind != "flow":
            return None
        sol = solve(self.model, z0.to(self.device), steps, "euler", return_trajectory=True)
        return torch.stack([x.float().cpu() for x in sol.trajectory]).numpy()


def checkpoint_guidance(path: str | Path, given: dict[str, Any], teacher: dict[str, Any]) -> dict[str, Any]:
    """The guidance settings a diffusers checkpoint is sampled with: those ``given`` (guidance_scale,
    null_label, negative_prompt; None where not given), else those recorded in ``teacher``, the held-out
    pairs' teacher record (so the teacher row is the teacher the student learned from). {} for a flow."""
    if not is_diffusers_checkpoint(path):
        return {}
    recorded = {**(teacher.get("overrides") or {})}
    for key in ("guidance_scale", "negative_prompt"):
        if key in teacher:
            recorded.setdefault(key, teacher[key])
    keys = ("guidance_scale", "negative_prompt") if is_text_pipeline(path) else ("guidance_scale", "null_label")
    out = {}
    for key in keys:
        value = given.get(key) if given.get(key) is not None else recorded.get(key)
        if value is not None:
            out[key] = value
    return out
