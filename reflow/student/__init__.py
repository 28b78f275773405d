"""The student: conditional flow matching and k-step distillation on Accelerate, with safe checkpoints.

- ``config``: :class:`TrainConfig` (every setting, typed), its checks, the run settings a resume must keep;
- ``batches``: the data, and the batch of step s as a function of (seed, s);
- ``checkpoints``: safetensors + JSON checkpoints (never unpickled), saved and resumed;
- ``output``: the output folder, claimed before any work, recognised when finished, written at the end;
- ``card``: the model card (huggingface_hub's ``ModelCard``);
- ``loop``: :func:`train`, the loop itself.
"""

from reflow.student.checkpoints import checkpoint_root, latest_checkpoint
from reflow.student.config import TrainConfig, TrainResult, check_config, read_toml
from reflow.student.loop import train

__all__ = ["TrainConfig", "TrainResult", "check_config", "checkpoint_root", "latest_checkpoint", "read_toml", "train"]
