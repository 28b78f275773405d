"""The rectified-flow path, its target and the training losses, in the words of the math.

Convention (fixed project-wide): t = 0 is noise z0 ~ N(0, I), t = 1 is data z1.

    x_t      = (1 - t) z0 + t z1
    velocity = z1 - z0            (the regression target, constant along each straight path)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, get_args

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A velocity field ``v(x, t)``: x of shape (B, ...), t of shape (B,) in [0, 1]; returns (B, ...)."""


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample tensor of shape (B,) to (B, 1, ..., 1) so it broadcasts against x."""
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


def interpolate(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point x_t = (1 - t) z0 + t z1 on the straight path; t has shape (B,)."""
    t = expand_like(t, z0).to(z0.dtype)
    return (1 - t) * z0 + t * z1


def target_velocity(z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """The time derivative of the straight path, dx_t/dt = z1 - z0."""
    return z1 - z0


def per_sample_sq_norm(x: torch.Tensor) -> torch.Tensor:
    """||x_i||^2 summed over every non-batch dimension; shape (B,)."""
    return x.flatten(1).pow(2).sum(dim=1)


def default_huber_c(sample_shape: tuple[int, ...] | torch.Size) -> float:
    """c = 0.00054 sqrt(d), the pseudo-Huber constant of "Improving the Training of Rectified Flows"
    (Lee et al. 2024, after iCT), for data of dimension d = prod(sample_shape)."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


def regression_loss(
    prediction: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float | None = None
) -> torch.Tensor:
    """Per-sample loss between predicted and target velocities, shape (B,).

    - ``l2``: mean over dimensions of the squared error, ||p - y||^2 / d.
    - ``pseudo_huber``: sqrt(||p - y||^2 + c^2) - c, with c = 0.00054 sqrt(d) unless given.
    """
    diff = (prediction - target).float()
    if kind == "l2":
        return diff.flatten(1).pow(2).mean(dim=1)
    if kind == "pseudo_huber":
        c = default_huber_c(prediction.shape[1:]) if huber_c is None else huber_c
        return torch.sqrt(per_sample_sq_norm(diff) + c * c) - c
    raise ValueError(f"unknown loss {kind!r} (choose l2 or pseudo_huber)")


Loss = Literal["l2", "pseudo_huber"]
"""Regression losses of flow matching and distillation."""
LOSSES: tuple[str, ...] = get_args(Loss)


def flow_matching_loss(
    velocity: Velocity,
    z0: torch.Tensor,
    z1: torch.Tensor,
    t: torch.Tensor,
    kind: str = "l2",
    huber_c: float | None = None,
    cond: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Conditional flow matching: E_t || v(x_t, t) - (z1 - z0) ||, averaged over the batch (a scalar).
    ``cond``: the model's conditioning keywords (``class_labels`` / ``encoder_hidden_states``), if any."""
    x_t = interpolate(z0, z1, t)
    return regression_loss(velocity(x_t, t, **(cond or {})), target_velocity(z0, z1), kind, huber_c).mean()


# diffusers' flow-matching convention runs the other way (FlowMatchEulerDiscreteScheduler, DPM-Solver with
# flow sigmas): sigma = 1 - t (sigma = 1 is noise), timestep = sigma * num_train_timesteps, and the model
# predicts noise - data = z0 - z1 = -v. Every conversion between the two lives here.


def to_diffusers_timestep(t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The timestep a flow-matching scheduler feeds the model at flow time t: (1 - t) * num_train_timesteps."""
    return (1 - t) * num_train_timesteps


def from_diffusers_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Flow time t = 1 - sigma of a flow-matching scheduler's sigma."""
    return 1 - sigma


def velocity_from_diffusers(model_output: torch.Tensor) -> torch.Tensor:
    """Our velocity v = z1 - z0 from a flow-matching model's prediction of z0 - z1 (and back: it is its own
    inverse)."""
    return -model_output


def distillation_loss(
    velocity: Velocity,
    z0: torch.Tensor,
    z1: torch.Tensor,
    nodes: list[float],
    query: list[float],
    kind: str = "l2",
    huber_c: float | None = None,
    cond: dict[str, torch.Tensor] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """k-step distillation: the k-step Euler solve from z0 over ``nodes`` (velocity read at ``query``
    times, k = len(query)) regressed onto the teacher's z1, averaged over the batch (a scalar).
    ``loss_fn(prediction, target) -> (B,)`` replaces :func:`regression_loss` when given (a perceptual loss)."""
    x = z0
    for i, tq in enumerate(query):
        t = torch.full((x.shape[0],), tq, dtype=torch.float32, device=x.device)
        x = x + (nodes[i + 1] - nodes[i]) * velocity(x, t, **(cond or {}))
    if loss_fn is not None:
        return loss_fn(x, z1).mean()
    return regression_loss(x, z1, kind, huber_c).mean()


class Conditioned:
    """A conditional velocity model with its conditioning bound: ``Conditioned(model, class_labels=y)(x, t)``
    is ``model(x, t, class_labels=y)``, so solvers that call ``velocity(x, t)`` need not know about it. The
    model's own Euler grid (``euler_grid``) and its ``mean_flow`` flag are kept; a mean flow's end time
    passes through: ``(x, t, s=s)`` is ``model(x, t, s=s, class_labels=y)``."""

    def __init__(self, model: Callable[..., torch.Tensor], **cond: torch.Tensor | None):
        self.model = model
        self.cond = {k: v for k, v in cond.items() if v is not None}
        if hasattr(model, "euler_grid"):
            self.euler_grid = model.euler_grid
        if hasattr(model, "mean_flow"):
            self.mean_flow = model.mean_flow

    def __call__(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        if s is not None:
            return self.model(x, t, s=s, **self.cond)
        return self.model(x, t, **self.cond)
