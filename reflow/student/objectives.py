"""What a training minimises on one micro-batch: the loss of its objective, built once before the loop.

- flow matching (round 1 from data, reflow on pairs): ``reflow.core.flow.flow_matching_loss``;
- k-step distillation (``distill_k``): ``reflow.core.flow.distillation_loss``;
- MeanFlow (``objective = "meanflow"``): ``reflow.core.meanflow.meanflow_loss`` on the intervals (t, s).

Perceptual losses (``lpips``, ``lpips_huber``) compare images, so they apply where the student predicts one:
the k-step output of distillation against the teacher's z1, and the end point x_t + (s - t) u of a MeanFlow
jump against the end point its target implies. With MeanFlow the velocity itself is still regressed (l2
under ``lpips``, pseudo-Huber under ``lpips_huber``): the rows with s = t have no jump to compare.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from reflow.core.flow import distillation_loss, flow_matching_loss
from reflow.core.meanflow import meanflow_loss
from reflow.core.perceptual import perceptual_distance, perceptual_loss
from reflow.student.batches import MicroBatch
from reflow.student.config import PERCEPTUAL, TrainConfig

StepLoss = Callable[[torch.nn.Module, MicroBatch], torch.Tensor]
"""``loss(model, micro_batch)``: the scalar loss of one micro-batch."""
Grid = tuple[list[float], list[float]]
"""A k-step Euler grid: its k + 1 nodes and the k times the model is queried at."""


def load_features(config: TrainConfig, sample_shape: tuple[int, ...], device: torch.device) -> torch.nn.Module | None:
    """The frozen feature network of a perceptual loss (``--perceptual-weights``) on ``device``, checked
    against the data's sample shape; None for the other losses."""
    if config.loss not in PERCEPTUAL:
        return None
    from reflow.models.perceptual import check_perceptual, load_perceptual

    net = load_perceptual(config.perceptual_weights)
    check_perceptual(net, sample_shape)
    return net.to(device)


def step_loss(
    config: TrainConfig, grid: Grid | None, features: torch.nn.Module | None, raw: torch.nn.Module
) -> StepLoss:
    """The loss of one micro-batch for ``config`` (its ``loss`` already resolved from ``auto``); ``raw`` is
    the model unwrapped from Accelerate's distributed wrapper (MeanFlow takes its target's JVP through it)."""
    kind, c = config.loss, config.huber_c
    if config.objective == "meanflow":
        base = kind if kind not in PERCEPTUAL else "pseudo_huber" if kind == "lpips_huber" else "l2"
        endpoint = None if features is None else partial(perceptual_distance, features)

        def mean_flow(model: torch.nn.Module, b: MicroBatch) -> torch.Tensor:
            return meanflow_loss(model, b.z0, b.z1, b.t, b.s, base, c, b.cond, endpoint_loss=endpoint, jvp_model=raw)

        return mean_flow
    if grid is not None:
        per_sample = None if features is None else partial(perceptual_loss, kind=kind, huber_c=c, features=features)

        def distill(model: torch.nn.Module, b: MicroBatch) -> torch.Tensor:
            return distillation_loss(model, b.z0, b.z1, *grid, kind, c, b.cond, loss_fn=per_sample)

        return distill

    def flow_matching(model: torch.nn.Module, b: MicroBatch) -> torch.Tensor:
        return flow_matching_loss(model, b.z0, b.z1, b.t, kind, c, b.cond)

    return flow_matching
