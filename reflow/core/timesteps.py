"""Distributions of the training time t in [0, 1] (t = 0 noise, t = 1 data).

- ``uniform``: t ~ U(0, 1), the original rectified flow.
- ``logit_normal``: t = sigmoid(m + s n), n ~ N(0, 1) (Esser et al. 2024, SD3); mass in the middle.
- ``u_shaped``: density p(t) proportional to exp(a t) + exp(a (1 - t)) = 2 e^(a/2) cosh(a (t - 1/2)),
  more mass near both ends (Lee et al. 2024, "Improving the Training of Rectified Flows", a = 4).
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch

TimeSampler = Literal["uniform", "logit_normal", "u_shaped"]
"""Training-time distributions p(t) on [0, 1]."""
TIME_SAMPLERS: tuple[str, ...] = get_args(TimeSampler)


def sample_time(
    n: int,
    kind: str = "uniform",
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    u_shape_a: float = 4.0,
) -> torch.Tensor:
    """Draw n training times in [0, 1], shape (n,), float32 on ``device``.

    Random numbers are drawn on the generator's device (CPU by default) and moved, so a seeded
    generator gives the same times on every device.
    """
    gen_device = generator.device if generator is not None else "cpu"
    u = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64)
    if kind == "uniform":
        t = u
    elif kind == "logit_normal":
        z = torch.randn(n, generator=generator, device=gen_device, dtype=torch.float64)
        t = torch.sigmoid(logit_mean + logit_std * z)
    elif kind == "u_shaped":
        if u_shape_a <= 0:
            raise ValueError("u_shape_a must be positive")
        # Inverse CDF of the density a e^(a t) / (e^a - 1) on [0, 1], then mirror half of the draws:
        # the equal mixture of e^(a t) and e^(a (1 - t)) is the U-shaped density.
        flip = torch.rand(n, generator=generator, device=gen_device, dtype=torch.float64) < 0.5
        t = torch.log1p(u * math.expm1(u_shape_a)) / u_shape_a
        t = torch.where(flip, 1 - t, t)
    else:
        raise ValueError(f"unknown time sampler {kind!r} (choose one of {', '.join(TIME_SAMPLERS)})")
    return t.clamp(0.0, 1.0).to(device=device, dtype=torch.float32)
