"""Teachers: map noise z0 to samples z1 (diffusers DDPM and text-to-image checkpoints, our flows)."""

from reflow.teachers.base import Teacher, load_teacher

__all__ = ["Teacher", "load_teacher"]
