"""Export: a student folder that stock diffusers loads and samples with no code of ours.

An image student (``reflow.models.velocity.UNetFlow``) is written as a ``DDPMPipeline`` folder: its ``unet/`` (a
``UNet2DModel`` in the flow-matching convention, see ``reflow.core.flow``) and a ``scheduler/`` that is
``DPMSolverMultistepScheduler`` of order 1 with flow sigmas. Why that scheduler:

- DPM-Solver++ of order 1 is DDIM, and DDIM on the straight path x_t = (1 - t) z0 + t z1 is exactly an
  Euler step: x_s = x_t + (s - t) v. With ``final_sigmas_type="zero"`` the last step lands on t = 1.
- Its k-step grid is uniform: sigma_i = (1 - 1/T)(1 - i/k), i < k, then 0 (T = num_train_timesteps), so each
  of the k calls moves the sample by the same amount. FlowMatchEulerDiscreteScheduler's default grid is
  linspace(1, 1/T, k) then 0: for k = 2 it steps 1.0 -> 0.001 -> 0, spending a whole call on the last
  thousandth; no setting of it makes the grid uniform for every k (its last nonzero sigma is a constant).
- It accepts ``generator=``, which ``DDPMPipeline`` passes to ``step``.

So ``DiffusionPipeline.from_pretrained(MODEL)`` then ``pipe(num_inference_steps=k)`` runs k Euler steps on
that grid, and ``reflow sample --nfe k`` runs the same grid (``UNetFlow.euler_grid``): the same noise gives
the same images. The UNet also works unchanged with ``FlowMatchEulerDiscreteScheduler`` (same convention).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from reflow.models.velocity import student_scheduler


def save_student(
    model: nn.Module, folder: str | Path, *, components: str | Path | None = None, null_label: int | None = None
) -> None:
    """Write a velocity model into ``folder`` (which must exist and be empty, e.g. an ``atomic_dir``):

    - an unconditional image ``UNetFlow``: a stock ``DDPMPipeline`` folder;
    - a class-conditional one: a ``ReflowClassConditionalPipeline`` folder whose ``pipeline.py`` is
      ``reflow/pipelines/class_conditional.py`` (``DiffusionPipeline.from_pretrained(folder,
      trust_remote_code=True)`` loads it with no reflow installed); ``null_label``, the class its teacher
      used for "no label" in guidance, is recorded as ``"_reflow_null_class"`` in model_index.json so the
      student, teaching the next round, never draws it;
    - a text-conditional one (``UNet2DConditionModel``): a stock ``StableDiffusionPipeline`` folder with the
      VAE, text encoder and tokenizer of ``components`` (the teacher's Stable Diffusion folder); it samples
      with ``pipe(prompt, num_inference_steps=k, guidance_scale=1.0)`` (guidance is baked into the pairs);
    - an unconditional mean flow (``UNetFlow.mean_flow``, see ``reflow.core.meanflow``): a ``ReflowMeanFlowPipeline``
      folder whose ``pipeline.py`` is ``reflow/pipelines/meanflow.py`` (``DiffusionPipeline.from_pretrained(folder,
      trust_remote_code=True)``; ``pipe(num_inference_steps=k)`` makes k jumps on the grid of ``reflow sample
      --nfe k``);
    - anything else (an MLP, a mean-flow MLP too): a ``save_pretrained`` folder.

    Every one gets ``reflow_weights.json`` (``reflow.folders.weights.WEIGHTS_RECORD``): the size and sha256 of each
    weights file, which reflow checks on every load, so weights whose bytes changed never load silently.
    """
    from reflow.folders.weights import record_weights

    folder = Path(folder)
    _save_folder(model, folder, components=components, null_label=null_label)
    record_weights(folder)


def _save_folder(model: nn.Module, folder: Path, *, components: str | Path | None, null_label: int | None) -> None:
    from diffusers import DDPMPipeline

    from reflow.models.velocity import UNetFlow

    if not isinstance(model, UNetFlow):
        model.save_pretrained(str(folder), safe_serialization=True)
        return
    scheduler = student_scheduler(model.num_train_timesteps)
    if model.mean_flow:
        from reflow.pipelines.meanflow import ReflowMeanFlowPipeline

        pipe = ReflowMeanFlowPipeline(unet=model.unet, scheduler=scheduler)
        _save_remote_code(pipe, folder, "meanflow.py")
    elif model.conditioning == "class":
        from reflow.pipelines.class_conditional import ReflowClassConditionalPipeline

        pipe = ReflowClassConditionalPipeline(unet=model.unet, scheduler=scheduler)
        _save_remote_code(pipe, folder, "class_conditional.py", null_label=null_label)
    elif model.conditioning == "text":
        from reflow.pipelines.text_to_image import save_text_to_image

        save_text_to_image(model.unet, scheduler, folder, components)
    else:
        DDPMPipeline(unet=model.unet, scheduler=scheduler).save_pretrained(str(folder), safe_serialization=True)


def _save_remote_code(pipe: Any, folder: Path, source: str, *, null_label: int | None = None) -> None:
    """Save a pipeline of ours with its own code: ``source`` (a file of this folder) copied in as
    ``pipeline.py`` and named in model_index.json, with ``"_reflow_null_class"`` when ``null_label`` is given."""
    pipe.save_pretrained(str(folder), safe_serialization=True)
    shutil.copyfile(Path(__file__).with_name(source), folder / "pipeline.py")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = ["pipeline", type(pipe).__name__]
    if null_label is not None:
        index["_reflow_null_class"] = int(null_label)
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
