"""Perceptual (LPIPS-style) distances between images, and the distillation losses built on them.

Pixel distances reward blur: a one-step student that averages the teacher's possible outputs has a small L2
error and looks nothing like a sample. LPIPS (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep
Features as a Perceptual Metric", eq. 1) compares images in the feature maps of a frozen network instead:

    d(x, y) = sum_l  1 / (H_l W_l)  sum_{h, w}  sum_c  w_lc (xhat_lchw - yhat_lchw)^2

with xhat_l = f_l(x) / ||f_l(x)||, tap l's feature map unit-normalised over its channels at every position
(eps 1e-10 added to the norm, as LPIPS does), and w_lc >= 0 the network's calibrated channel weights (LPIPS's
``lin`` layers), or 1 when it has none: the sum over channels, as the ``lpips`` package computes it with
``lpips=False``. (1 / C_l would make the term 32-96 times smaller on the digits network, about 1% of the
pseudo-Huber gradient in ``lpips_huber``: too small to matter.) Rectified Flow, InstaFlow and 2-RF++
distil their one-step students with it.

A feature network is any callable ``features(images) -> [maps]`` returning tensors (2B, C_l, H_l, W_l) for a
batch of 2B images, with an attribute ``channel_weights`` (one tensor of C_l non-negative weights per tap) when
it is calibrated; ``reflow.models.perceptual.PerceptualNet`` is one, loaded frozen from disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, get_args

import torch

from reflow.core.flow import default_huber_c, per_sample_sq_norm
from reflow.errors import ReflowError

Features = Callable[[torch.Tensor], Sequence[torch.Tensor]]
"""A frozen feature network: images (B, C, H, W) -> its tapped feature maps [(B, C_l, H_l, W_l), ...]."""

PerceptualLoss = Literal["lpips", "lpips_huber"]
"""Losses that compare images in a feature network's space (``--loss``, with ``--perceptual-weights``)."""
PERCEPTUAL_LOSSES: tuple[str, ...] = get_args(PerceptualLoss)

LPIPS_EPS = 1e-10
"""Added to the channel norm before dividing (LPIPS's ``normalize_tensor``)."""


def unit_normalize(f: torch.Tensor) -> torch.Tensor:
    """A feature map (B, C, H, W) divided by its L2 norm over channels at every position (plus LPIPS_EPS).

    ``vector_norm``, not ``sqrt(sum f^2)``: its gradient at an all-zero feature vector (common after a ReLU) is
    0, where the gradient of sqrt at 0 is inf and turns into NaN."""
    return f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + LPIPS_EPS)


def perceptual_distance(features: Features, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The LPIPS distance d(x_i, y_i) of each pair of images (B, C, H, W), in ``features``' space; shape (B,).

    x and y go through the network in one batched forward (their concatenation), and the distance is summed
    in float32 (float64 for float64 maps). Gradients flow to both x and y (the network's own weights are frozen by
    its loader)."""
    b = x.shape[0]
    maps = features(torch.cat([x, y.to(x.dtype)]))
    weights = getattr(features, "channel_weights", None)
    if weights is not None and len(weights) != len(maps):
        raise ValueError(f"the feature network has {len(weights)} channel weights for {len(maps)} taps")
    dtype = torch.promote_types(maps[0].dtype, torch.float32)
    distance = torch.zeros(b, dtype=dtype, device=x.device)
    for tap, f in enumerate(maps):
        f = unit_normalize(f.to(dtype))
        sq = (f[:b] - f[b:]).pow(2)  # (B, C_l, H_l, W_l)
        if weights is None:
            per_position = sq.sum(dim=1)
        else:
            per_position = (sq * weights[tap].to(sq).reshape(1, -1, 1, 1)).sum(dim=1)
        distance = distance + per_position.mean(dim=(1, 2))
    return distance


def perceptual_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    kind: str = "lpips",
    huber_c: float | None = None,
    features: Features | None = None,
) -> torch.Tensor:
    """Per-sample perceptual loss between predicted and target images (B, C, H, W) in model space; shape (B,).

    - ``lpips``: the LPIPS distance d(p, y) of :func:`perceptual_distance`.
    - ``lpips_huber``: the LPIPS-Huber loss of 2-RF++ (Lee et al. 2024, "Improving the Training of Rectified
      Flows", NeurIPS 2024), pseudo-Huber in pixels plus LPIPS:

          (1 - t) (sqrt(||p - y||^2 + c^2) - c) + d(p, y),      c = 0.00054 sqrt(dim) unless ``huber_c`` is given

      (``reflow.core.flow.default_huber_c``). In their reflow loss the pixel term carries a time weight
      (1 - t); a one-step distilled student is queried once, from the noise (t = 0), where that weight is 1.

    The pixel term keeps colours and positions anchored where a small feature network is blind; the LPIPS term
    penalises the blur a pixel loss rewards. ``features`` is required (``--perceptual-weights``).
    """
    if kind not in PERCEPTUAL_LOSSES:
        raise ValueError(f"unknown perceptual loss {kind!r} (choose {' or '.join(PERCEPTUAL_LOSSES)})")
    if features is None:
        raise ReflowError(
            f"--loss {kind} needs --perceptual-weights PATH (a folder with config.json and model.safetensors, "
            "e.g. data/perceptual/digits-lpips)"
        )
    p, y = prediction.float(), target.float()
    distance = perceptual_distance(features, p, y)
    if kind == "lpips":
        return distance
    c = default_huber_c(prediction.shape[1:]) if huber_c is None else huber_c
    return torch.sqrt(per_sample_sq_norm(p - y) + c * c) - c + distance
