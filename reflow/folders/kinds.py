"""What a path holds, decided in one place.

=================  ===========================================================================
kind               what it is
=================  ===========================================================================
``flow``           one of our velocity models saved with ``save_pretrained`` (``config.json``)
``flow-pipeline``  an image student of ours: a diffusers pipeline folder whose scheduler is a
                   flow-matching one (``prediction_type = "flow_prediction"``)
``ddpm``           a diffusers pipeline folder with a UNet2DModel and a DDPM-family scheduler
``text-to-image``  a diffusers pipeline folder with a UNet2DConditionModel (Stable Diffusion
                   layout); a text student of ours is a ``text-to-image`` folder whose scheduler
                   is a flow one (see :func:`is_flow_pipeline`)
``pairs``          a pairs folder written by ``reflow generate`` (``reflow_pairs.json``)
``missing``        nothing there
``other``          anything else
=================  ===========================================================================
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from reflow.errors import ReflowError
from reflow.folders.files import read_json

FolderKind = Literal["flow", "flow-pipeline", "ddpm", "text-to-image", "pairs", "missing", "other"]
PAIRS_RECORD = "reflow_pairs.json"


def _config(file: Path) -> dict[str, Any]:
    return read_json(file, "re-save the model") if file.is_file() else {}


def is_pipeline(path: str | Path) -> bool:
    """A diffusers pipeline folder (``model_index.json``)."""
    return (Path(path) / "model_index.json").is_file()


def is_text_pipeline(path: str | Path) -> bool:
    """A diffusers pipeline folder whose UNet is a UNet2DConditionModel (text-to-image)."""
    path = Path(path)
    return is_pipeline(path) and _config(path / "unet" / "config.json").get("_class_name") == "UNet2DConditionModel"


def is_flow_pipeline(path: str | Path) -> bool:
    """A diffusers pipeline folder that holds a flow (a flow-matching scheduler), not a DDPM."""
    path = Path(path)
    if not is_pipeline(path):
        return False
    config = _config(path / "scheduler" / "scheduler_config.json")
    return str(config.get("_class_name", "")).startswith("FlowMatch") or config.get("prediction_type") == (
        "flow_prediction"
    )


def is_diffusers_checkpoint(path: str | Path) -> bool:
    """A diffusers DDPM-family or text-to-image checkpoint (sampled with its own scheduler), not a flow of ours."""
    return is_pipeline(path) and not is_flow_pipeline(path)


def folder_kind(path: str | Path) -> FolderKind:
    """What ``path`` holds (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        return "missing"
    if not path.is_dir():
        return "other"
    if (path / PAIRS_RECORD).is_file():
        return "pairs"
    if is_text_pipeline(path):
        return "text-to-image"
    if is_pipeline(path):
        return "flow-pipeline" if is_flow_pipeline(path) else "ddpm"
    if (path / "config.json").is_file():
        return "flow"
    return "other"


def read_index(path: str | Path) -> dict[str, Any]:
    """A pipeline folder's ``model_index.json`` ({} when there is none or it is unreadable)."""
    try:
        return read_json(Path(path) / "model_index.json") if is_pipeline(path) else {}
    except ReflowError:
        return {}
