"""Conditioning, one way end to end: a model, teacher or pairs folder is unconditional (None), class-
conditional ("class": integer labels) or text-conditional ("text": prompt embeddings), and the conditioning
travels as the keyword argument a diffusers UNet takes for it. Solvers never inspect it (see
``reflow.core.flow.Conditioned``)."""

from __future__ import annotations

from typing import Literal, get_args

import torch

Conditioning = Literal["class", "text"]
"""What a conditional model takes; ``Conditioning | None`` everywhere, None for unconditional."""
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)

KEYWORD: dict[str, str] = {"class": "class_labels", "text": "encoder_hidden_states"}
"""The UNet keyword each kind of conditioning travels as (UNet2DModel ``class_labels``,
UNet2DConditionModel ``encoder_hidden_states``)."""

DESCRIPTION: dict[str | None, str] = {None: "unconditional", "class": "class-conditional", "text": "text-conditional"}


def keywords(kind: Conditioning | None, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The model keywords for conditioning ``value`` of ``kind``: {} when unconditional or ``value`` is None."""
    if kind is None or value is None:
        return {}
    return {KEYWORD[kind]: value}
