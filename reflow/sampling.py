"""Drawing samples from a velocity model: noise z0 (t = 0) to samples (t = 1)."""

from __future__ import annotations

import torch

from .flow import Velocity
from .solvers import ODESolution, solve


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
) -> ODESolution:
    """Solve from z0 in batches; images (C, H, W) are clamped to [-1, 1]. Returns z1 on the CPU, the
    largest NFE of any batch and the batch-weighted straightness and curvature when asked."""
    outs, nfe_used, s_total, k_total = [], 0, 0.0, 0.0
    for b in range(0, len(z0), batch_size):
        chunk = z0[b : b + batch_size].to(device)
        sol = solve(velocity, chunk, nfe, solver, measure_straightness=measure_straightness)
        outs.append(sol.z1.float().cpu())
        nfe_used = max(nfe_used, sol.nfe)
        if sol.straightness is not None:
            s_total += sol.straightness * len(chunk)
            k_total += sol.curvature * len(chunk)
    z1 = torch.cat(outs)
    if is_image(tuple(z0.shape[1:])):
        z1 = z1.clamp(-1, 1)
    if not measure_straightness:
        return ODESolution(z1=z1, nfe=nfe_used)
    return ODESolution(z1=z1, nfe=nfe_used, straightness=s_total / len(z0), curvature=k_total / len(z0))
