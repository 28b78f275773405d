"""Velocity models (MLP, UNet flows) and the diffusers components they are built from."""

from reflow.models.velocity import load_model

__all__ = ["load_model"]
