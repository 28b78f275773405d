"""The student: conditional flow matching and k-step distillation on Accelerate, with safe checkpoints."""

from reflow.student.loop import TrainConfig, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "train"]
