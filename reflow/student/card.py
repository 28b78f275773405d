"""The model card (README.md) of a trained student, made with huggingface_hub's ``ModelCard``.

Its metadata (``ModelCardData``) tags it for the Hub; its text gives the title ``reflow velocity model
NAME``, the velocity convention, how to load and sample it, and its provenance: a JSON block with the
reflow version, the round, the pairs' own provenance and the whole ``train_config``. Outputs written before
reflow marked its outputs are recognised by that title and ``train_config`` (:func:`recorded_train_config`).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from reflow.student.config import TrainConfig
from reflow.version import __version__

TITLE = "reflow velocity model"
TAGS = ["reflow", "rectified-flow", "diffusers"]
CONVENTION = (
    "Made by [reflow](https://pypi.org/project/reflow/). Velocity convention: t = 0 noise, t = 1 data,"
    " x_t = (1 - t) z0 + t z1, target z1 - z0."
)


COUPLING_NAMES = {"independent": "independent", "ot": "minibatch OT", "sinkhorn": "minibatch Sinkhorn OT"}


def provenance(config: TrainConfig, pairs_provenance: dict[str, Any] | None) -> dict[str, Any]:
    """How the model was made: reflow's version, the round, the pairs' provenance, every setting (and
    ``config.extra``, e.g. the recipe of ``reflow rounds``), and which weights were saved (EMA)."""
    if config.distill_k is not None:
        kind = f"{config.distill_k}-step distillation of {config.init} on {config.pairs}"
    elif config.objective == "meanflow":
        kind = f"MeanFlow on {config.pairs or config.data}"
    elif config.pairs is None:
        kind = f"1 ({COUPLING_NAMES[config.coupling]} coupling)"
    else:
        kind = f"reflow on {config.pairs}"
    return {
        "reflow_version": __version__,
        "round": kind,
        "init": config.init,
        "pairs_provenance": pairs_provenance,
        "train_config": {k: v for k, v in asdict(config).items() if k != "extra"} | config.extra,
        "weights": "EMA",
    }


def model_card(name: str, model: nn.Module, config: TrainConfig, pairs_provenance: dict[str, Any] | None) -> Any:
    """The ``huggingface_hub.ModelCard`` of ``model``, trained with ``config``, saved in a folder ``name``."""
    from huggingface_hub import ModelCard, ModelCardData

    kind = _model_kind(model)
    image = kind != "mlp"
    init = config.init
    data = ModelCardData(
        library_name="diffusers" if image else None,
        pipeline_tag={
            "image": "unconditional-image-generation",
            "meanflow": "unconditional-image-generation",
            "text": "text-to-image",
        }.get(kind),
        tags=TAGS,
        base_model=init if init is not None and not Path(init).exists() else None,  # a Hub id
    )
    record = json.dumps(provenance(config, pairs_provenance), indent=2, sort_keys=True, default=str)
    text = "\n".join(
        [
            f"# {TITLE} {name}",
            "",
            CONVENTION,
            "",
            "## Usage",
            "",
            *_usage(kind, name, config.distill_k or (1 if config.objective == "meanflow" else 4)),
            "",
            "## Provenance",
            "",
            "```json",
            record,
            "```",
            "",
        ]
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text}")


def _model_kind(model: nn.Module) -> str:
    """How an exported student loads (``reflow.pipelines.export.save_student``): ``image`` (a DDPMPipeline
    folder), ``class`` or ``meanflow`` (a remote-code pipeline), ``text`` (a Stable Diffusion folder) or ``mlp``."""
    from reflow.models.velocity import UNetFlow

    if not isinstance(model, UNetFlow):
        return "mlp"
    if getattr(model, "mean_flow", False):
        return "meanflow"
    return {"class": "class", "text": "text"}.get(model.conditioning, "image")


def _usage(kind: str, name: str, k: int) -> list[str]:
    """Markdown lines: how to sample ``k`` steps from the folder ``name``."""
    cli = f"reflow sample --model {name} --nfe {k} --num 16 --seed 0 --out samples.npy"
    if kind == "mlp":
        return ["With reflow installed (samples in model space, float32):", "", "```bash", cli, "```"]
    intro = "In stock diffusers, k Euler steps of the flow (k network calls):"
    load, call = f'DiffusionPipeline.from_pretrained("{name}")', f"pipe(num_inference_steps={k})"
    if kind == "meanflow":
        intro = "In diffusers, with the folder's own pipeline.py, k MeanFlow jumps (k network calls):"
        load = f'DiffusionPipeline.from_pretrained("{name}", trust_remote_code=True)'
        call = f"pipe(batch_size=4, num_inference_steps={k})"
    elif kind == "class":
        intro = "In diffusers, with the folder's own pipeline.py, k Euler steps of the flow (k network calls):"
        load = f'DiffusionPipeline.from_pretrained("{name}", trust_remote_code=True)'
        call = f"pipe(class_labels=[0, 0, 0, 0], num_inference_steps={k})"
        cli += " --labels 0"
    elif kind == "text":  # guidance is baked into the pairs: the student runs without it
        call = f'pipe("a photo of a cat", num_inference_steps={k}, guidance_scale=1.0)'
    lines = [intro, "", "```python", "from diffusers import DiffusionPipeline", ""]
    lines += [f"pipe = {load}", f"images = {call}.images", "```"]
    if kind != "text":
        lines += ["", "With reflow (float32 arrays in model space, pixels in [-1, 1]):", "", "```bash", cli, "```"]
    return lines


def recorded_train_config(card: str) -> dict[str, Any] | None:
    """The ``train_config`` a reflow model card records; None when ``card`` is not a reflow model card.
    Raises ValueError (or KeyError, IndexError, TypeError) on a reflow card without a readable one."""
    if f"\n# {TITLE} " not in card:
        return None
    record = json.loads(card.split("```json\n", 1)[1].split("\n```", 1)[0])
    return record["train_config"]
