"""reflow: rectified-flow distillation of diffusion models into few-step generators."""

__version__ = "0.1.0"

from .errors import ReflowError  # noqa: E402

__all__ = ["ReflowError", "__version__"]
