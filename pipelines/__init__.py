"""Diffusers-facing code of reflow (sampling pipelines, export), installed as ``reflow.pipelines``."""
