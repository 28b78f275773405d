"""The output folder of a training: claimed before any work, recognised when already finished, and written
at the end (EMA weights, model card, marker) in one rename.

A finished output carries the marker ``.reflow-output.json`` (``reflow.folders.io.mark_output``) with the
run settings, steps and final loss, so a rerun of the same training finds it complete and a rerun with
other settings is refused. Outputs from before the marker are recognised by their model card.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch

from reflow.errors import ReflowError
from reflow.folders.io import atomic_dir, atomic_write_text, claim_output, mark_output, read_marker
from reflow.pairs import PairsReader
from reflow.student.card import model_card, recorded_train_config
from reflow.student.checkpoints import check_resumable, checkpoint_root, latest_checkpoint
from reflow.student.config import TrainConfig, TrainResult, config_from_record, differences, local_path, run_settings


def finished_run(out: Path) -> dict[str, Any] | None:
    """What a finished training in ``out`` recorded (``settings``, ``steps``, ``loss``; ``settings`` None when
    unknown), or None when ``out`` is not a finished reflow training (absent, someone else's, empty)."""
    if not out.is_dir():
        return None
    marker = read_marker(out)
    if marker is not None and marker.get("command") == "train":
        return marker
    # written before outputs carried a marker: our model card over a model folder
    try:
        card = (out / "README.md").read_text()
    except (OSError, UnicodeDecodeError):
        return None
    if not ((out / "config.json").is_file() or (out / "model_index.json").is_file()):
        return None
    try:
        recorded = recorded_train_config(card)
        if recorded is None:
            return None
        config = config_from_record(recorded)
        return {"settings": run_settings(config), "steps": config.max_steps, "loss": float("nan")}
    except (IndexError, KeyError, TypeError, ValueError, ReflowError):
        return {"settings": None, "steps": 0, "loss": float("nan")}


def already_complete(out: Path, finished: dict[str, Any], settings: dict[str, Any]) -> TrainResult:
    """The result of a rerun of the finished training in ``out``; its stale checkpoints are removed. A
    finished training with other run ``settings`` is refused."""
    from reflow.folders.runtime import partial_state

    recorded = finished.get("settings")
    diffs = differences(recorded, settings) if recorded is not None else []
    if diffs:
        raise ReflowError(
            f"{out} holds a finished training with other settings: {', '.join(diffs)}; pick a new --out "
            f"(or delete {out} to train again)"
        )
    if partial_state().is_main_process:
        shutil.rmtree(checkpoint_root(out), ignore_errors=True)
    loss = finished.get("loss")
    return TrainResult(
        out=out,
        steps=int(finished.get("steps") or 0),
        loss=float("nan") if loss is None else float(loss),
        seconds=0.0,
        samples_per_second=0.0,
        already_complete=True,
    )


def claim(config: TrainConfig, settings: dict[str, Any]) -> Path | None:
    """Check, before any work, that this training may write ``config.out`` (not into an input, not over
    someone else's folder, writable; a killed save's debris goes), and find the checkpoint it resumes:
    None to start fresh. Checkpoints of an earlier run are refused without ``--resume``, and any made by
    other settings or not ours to load are refused."""
    out = Path(config.out)
    inputs = [config.data, config.pairs, config.init, config.perceptual_weights]
    claim_output(out, "train", inputs=[local_path(p) for p in inputs])
    ckpt = latest_checkpoint(out)
    if ckpt is not None and not config.resume:
        raise ReflowError(f"{checkpoint_root(out)} holds checkpoints of an earlier run; pass --resume to continue it")
    if ckpt is not None:
        check_resumable(ckpt, settings, config.allow_pickle)
    return ckpt


def save_output(
    raw: torch.nn.Module,
    ema: Any,
    config: TrainConfig,
    pairs: PairsReader | None,
    *,
    settings: dict[str, Any],
    steps: int,
    loss: float,
) -> None:
    """Write the EMA weights of ``raw`` (float32) to ``config.out`` with its model card and the marker a
    rerun reads, all in one rename, then remove the checkpoints. Call it on the main process only.

    ``pairs``: the ``PairsReader`` trained on (its provenance goes into the card; a text student gets its
    teacher's VAE and text encoder, and the teacher's unconditional class is recorded), or None."""
    from reflow.pipelines.export import save_student

    out = Path(config.out)
    final = copy.deepcopy(raw).float()
    ema.copy_to(final.parameters())
    teacher = (pairs.provenance.get("teacher") or {}) if pairs is not None else {}
    card = model_card(out.name, final, config, pairs.provenance if pairs is not None else None)
    empty = out.is_dir() and not any(out.iterdir())  # an empty folder given as --out counts as new
    with atomic_dir(out, overwrite=empty) as tmp:
        # the VAE / text encoder of the pairs' teacher; its unconditional class, if it had one
        components = teacher.get("teacher") if getattr(final, "conditioning", None) == "text" else None
        save_student(final, tmp, components=components, null_label=teacher.get("null_label"))
        atomic_write_text(tmp / "README.md", str(card))  # our writer: the card is on disk before the rename
        # a rerun of this very training finds it complete (and one with other settings is refused)
        mark_output(tmp, "train", settings=settings, steps=steps, loss=loss)
    shutil.rmtree(checkpoint_root(out), ignore_errors=True)
