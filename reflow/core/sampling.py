"""Drawing samples from a velocity model: noise z0 (t = 0) to samples (t = 1)."""

from __future__ import annotations

import torch

from reflow.core.flow import Conditioned, Velocity
from reflow.core.progress import OnCall
from reflow.core.solvers import ODESolution, solve


def is_image(sample_shape: tuple[int, ...]) -> bool:
    return len(sample_shape) == 3


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
    batch-weighted straightness and curvature when asked. ``on_call(rows)``: after each network call."""
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
        sol = solve(field, chunk, nfe, solver, measure_straightness=measure_straightness, on_call=on_call)
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
