"""Drawing samples from a velocity model: noise z0 (t = 0) to samples (t = 1).

A MeanFlow model (``mean_flow`` True, ``reflow.core.meanflow``) is not integrated: it jumps, k = nfe calls of its
average velocity over a k-step grid (see :func:`solve_model`).
"""

from __future__ import annotations

import torch

from reflow.core.flow import Conditioned, Velocity
from reflow.core.meanflow import mean_flow_jumps
from reflow.core.progress import OnCall
from reflow.core.solvers import ODESolution, solve, time_grid
from reflow.errors import ReflowError


def is_image(sample_shape: tuple[int, ...]) -> bool:
    return len(sample_shape) == 3


def solve_model(
    velocity: Velocity,
    z0: torch.Tensor,
    nfe: int,
    solver: str = "euler",
    *,
    measure_straightness: bool = False,
    on_call: OnCall | None = None,
) -> ODESolution:
    """One batch from z0: ``solve`` for a velocity field; for a mean flow, nfe jumps
    x_{i+1} = x_i + (g_{i+1} - g_i) u(x_i, g_i, g_{i+1}) over the model's own grid (the nodes of
    ``velocity.euler_grid(nfe)``, e.g. an exported student's scheduler grid, else the uniform ``time_grid``).

    A mean flow samples with ``euler`` only (Heun and adaptive solvers integrate a velocity, not jumps). Its
    straightness and curvature, when asked, are those of its instantaneous velocity u(x, t, t) = v(x, t) along
    an nfe-step Euler solve, as for any flow; those calls are not counted in ``nfe``. ``on_call(rows)``: after
    each network call.
    """
    if not getattr(velocity, "mean_flow", False):
        return solve(velocity, z0, nfe, solver, measure_straightness=measure_straightness, on_call=on_call)
    if solver != "euler":
        raise ReflowError(f"a MeanFlow model samples in jumps (solver euler), not {solver}; drop --solver")
    if nfe < 1:
        raise ReflowError(f"a MeanFlow model needs at least one jump, got --nfe {nfe}")
    model_grid = getattr(velocity, "euler_grid", None)
    grid = model_grid(nfe)[0] if model_grid is not None else time_grid(nfe)
    z1 = mean_flow_jumps(velocity, z0, grid, on_call=on_call)
    if not measure_straightness:
        return ODESolution(z1=z1, nfe=nfe)
    sol = solve(velocity, z0, nfe, "euler", measure_straightness=True, on_call=on_call)
    return ODESolution(z1=z1, nfe=nfe, straightness=sol.straightness, curvature=sol.curvature)


@torch.inference_mode()
def sample(
    velocity: Velocity,
    z0: torch.Tensor,
    nfe: int,
    solver: str = "euler",
    *,
    batch_size: int = 4096,
    device: torch.device | str = "cpu",
    measure_straightness: bool = False,
    clamp: bool = True,
    cond: dict[str, torch.Tensor | None] | None = None,
    on_call: OnCall | None = None,
) -> ODESolution:
    """Solve from z0 in batches; images (C, H, W) are clamped to [-1, 1] unless ``clamp`` is False (latents).
    ``cond``: per-sample conditioning for a conditional model (``class_labels`` (N,), ``encoder_hidden_states``
    (N, seq, dim)), batched with z0. Returns z1 on the CPU, the largest NFE of any batch and the
    batch-weighted straightness and curvature when asked. A mean flow jumps (:func:`solve_model`).
    ``on_call(rows)``: after each network call."""
    cond = {k: v for k, v in (cond or {}).items() if v is not None}
    for name, value in cond.items():
        if len(value) != len(z0):
            raise ValueError(f"{name} has {len(value)} rows for {len(z0)} noise rows")
    outs, nfe_used, s_total, k_total = [], 0, 0.0, 0.0
    for b in range(0, len(z0), batch_size):
        chunk = z0[b : b + batch_size].to(device)
        field = velocity
        if cond:
            field = Conditioned(velocity, **{k: v[b : b + batch_size].to(device) for k, v in cond.items()})
        sol = solve_model(field, chunk, nfe, solver, measure_straightness=measure_straightness, on_call=on_call)
        outs.append(sol.z1.float().cpu())
        nfe_used = max(nfe_used, sol.nfe)
        if sol.straightness is not None:
            s_total += sol.straightness * len(chunk)
            k_total += sol.curvature * len(chunk)
    z1 = torch.cat(outs)
    if clamp and is_image(tuple(z0.shape[1:])):
        z1 = z1.clamp(-1, 1)
    if not measure_straightness:
        return ODESolution(z1=z1, nfe=nfe_used)
    return ODESolution(z1=z1, nfe=nfe_used, straightness=s_total / len(z0), curvature=k_total / len(z0))
