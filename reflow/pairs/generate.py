"""Generating coupled pairs (z0, z1) as a Hugging Face ``datasets`` dataset (columns: ``reflow.pairs.schema``;
z0 is rebuilt from the seed and each row's index unless stored with ``store_z0``).

Generation is sharded (``reflow.pairs.plan``). Work goes to ``PAIRS.partial/``: ``run.json`` (the settings)
and one folder per finished shard, each written to a temporary name and renamed. A killed run rerun with
the same settings keeps its finished shards and makes the rest (``reflow.pairs.resume``); when all exist,
they are joined into ``PAIRS`` (again through a temporary name, ``reflow.pairs.writer``) and
``PAIRS.partial`` is removed. Processes (Accelerate) split the shards round-robin, so one process or many
write the same rows. One run at a time: the main process holds the lock ``.PAIRS.lock`` beside ``PAIRS``
from the start to the end.

The provenance (teacher, solver, nfe, seed, dtype, round, store_z0, reflow version) is JSON in the dataset info's
``description``, in ``reflow_pairs.json`` (with the row count and each file's size and sha256) and in the
README.md dataset card beside the Arrow files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.noise import check_seed
from reflow.errors import ReflowError
from reflow.folders.runtime import partial_state
from reflow.pairs.pipeline import RowInputs, make_shards
from reflow.pairs.plan import ShardPlan, default_shard_size
from reflow.pairs.resume import begin, software, work_dir
from reflow.pairs.schema import DTYPES, pair_features
from reflow.pairs.writer import join_shards, push_pairs
from reflow.teachers.base import Teacher
from reflow.version import __version__


def check_generate_args(
    *, num_pairs: int, batch_size: int, shard_size: int | None = None, dtype: str = "float32", seed: int = 0
) -> None:
    """Refuse impossible ``generate`` settings with one line each, before any file is made."""
    for flag, value in (("--num-pairs", num_pairs), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if value is None and flag == "--shard-size":
            continue  # the default, from the sample size
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ReflowError(f"{flag} must be at least 1, got {value}")
    if dtype not in DTYPES:
        raise ReflowError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    try:
        check_seed(seed)
    except ValueError as e:
        raise ReflowError(str(e)) from None


def class_labels(teacher: Teacher, labels: list[int] | None) -> list[int] | None:
    """The labels rows draw from: ``labels`` (sorted, checked against the teacher's classes) or every class
    of a class-conditional teacher; None for a teacher without classes."""
    num_classes = teacher.num_classes
    if num_classes is None:
        if labels:
            raise ReflowError("--labels needs a class-conditional teacher; this one is unconditional")
        return None
    choices = list(teacher.label_choices or range(num_classes))
    labels = sorted(set(labels)) if labels else choices
    bad = [c for c in labels if c not in choices]
    if bad:
        null = sorted(set(range(num_classes)) - set(choices))
        also = f" (class {null[0]} is its unconditional label)" if null else ""
        raise ReflowError(f"--labels {bad} out of range: this teacher has classes 0..{num_classes - 1}{also}")
    return labels


def text_prompts(teacher: Teacher, prompts: list[str] | None) -> list[str] | None:
    """``prompts``, checked, for a text-to-image teacher (which needs them); None for any other teacher."""
    if teacher.conditioning != "text":
        if prompts:
            raise ReflowError(
                "--prompts needs a text-to-image teacher (a Stable Diffusion folder); this one takes none"
            )
        return None
    if not prompts:
        raise ReflowError("a text-to-image teacher needs prompts: pass --prompts FILE (one per line)")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ReflowError(f"prompts must be strings; entry {bad[0]} is {type(prompts[bad[0]]).__name__}")
    return prompts


def run_settings(
    teacher: Teacher, rows: RowInputs, plan: ShardPlan, *, dtype: str, round_: int, batch_size: int, device: str
) -> dict[str, Any]:
    """Everything that decides the rows, as ``run.json`` and the provenance record them (in this order:
    a resume refused for other settings names the differences in it)."""
    settings = {
        "teacher": teacher.describe(),
        "num_pairs": plan.num_pairs,
        "seed": rows.seed,
        "dtype": dtype,
        "shard_size": plan.shard_size,
        "sample_shape": list(rows.shape),
        "round": round_,
        "labels": rows.labels,
        "store_z0": rows.store_z0,
        "batch_size": batch_size,
        "device": device,
        "software": software(),
    }
    if rows.prompts is not None:  # only for text teachers, so unconditional runs keep their recorded settings
        settings["prompts"] = {
            "count": len(rows.prompts),
            "sha256": hashlib.sha256("\n".join(rows.prompts).encode()).hexdigest()[:16],
            "rule": "row i: prompt i mod count",
        }
        settings["embed_shape"] = list(teacher.embed_shape)
        settings["store_embeddings"] = rows.store_embeddings
    return settings


def _features(teacher: Teacher, rows: RowInputs, dtype: str):
    """The ``datasets`` features of the rows: z1 (and z0 when stored), index, and the teacher's conditioning
    columns."""
    text = rows.prompts is not None
    embed_shape = tuple(teacher.embed_shape) if text and rows.store_embeddings else None
    labels = rows.labels is not None
    return pair_features(rows.shape, dtype, labels, text, embed_shape, store_z0=rows.store_z0)


def generate_pairs(
    teacher: Teacher,
    out: str | Path,
    num_pairs: int,
    *,
    seed: int = 0,
    batch_size: int = 1024,
    dtype: str = "float32",
    shard_size: int | None = None,
    round_: int = 1,
    labels: list[int] | None = None,
    prompts: list[str] | None = None,
    store_embeddings: bool = True,
    store_z0: bool = False,
    push_to_hub: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Run the teacher on rows 0..num_pairs-1 and write the pairs dataset to ``out``.

    Row i's noise z0 = row_noise(seed, i) is not stored unless ``store_z0``: readers rebuild it from the
    seed and the row's ``index`` (``reflow.pairs.z0``), bit for bit the float32 noise the teacher was fed.

    A class-conditional teacher (``teacher.num_classes`` set) gets a label per row, uniform over
    ``labels`` (default: every class) and a function of (seed, row) alone; it is stored in ``label``.
    A text-to-image teacher (``teacher.conditioning == "text"``) takes ``prompts``: row i gets prompt
    ``i mod len(prompts)``, stored in ``prompt``, with its embeddings in ``prompt_embeds`` unless
    ``store_embeddings`` is False (then training recomputes them with the teacher's text encoder).
    ``push_to_hub`` names a Hub dataset repo to upload the finished pairs to.

    One run at a time writes ``out`` (the lock ``.NAME.lock`` beside it, taken by the main process); a
    killed run resumes only with the settings it started with, batch size, device and software included
    (the teacher's outputs depend on them at ~1e-6). A complete ``out`` is checked (files, rows) and
    returned as it is.

    ``progress(done_rows, total_rows)`` is called on this process at the start, as batches finish, and
    from inside a batch as the teacher's network calls finish (its share so far). Returns ``out``.
    Under Accelerate (torchrun / accelerate launch) every process must call this with the same arguments.
    """
    check_generate_args(num_pairs=num_pairs, batch_size=batch_size, shard_size=shard_size, dtype=dtype, seed=seed)
    out = Path(out)
    shape = tuple(teacher.sample_shape)
    labels = class_labels(teacher, labels)
    prompts = text_prompts(teacher, prompts)
    rows = RowInputs(seed, shape, labels, prompts, bool(store_embeddings), bool(store_z0))
    if shard_size is None:
        shard_size = default_shard_size(shape, dtype, batch_size)
    plan = ShardPlan(num_pairs, shard_size)
    device = torch.device(teacher.device)
    settings = run_settings(teacher, rows, plan, dtype=dtype, round_=round_, batch_size=batch_size, device=device.type)
    state = partial_state()
    lock, complete = begin(state, out, settings)
    try:
        if not complete:
            work, process = work_dir(out), (state.process_index, state.num_processes)
            features = _features(teacher, rows, dtype)
            make_shards(
                teacher,
                rows,
                plan,
                work,
                features=features,
                dtype=dtype,
                batch_size=batch_size,
                device=device,
                process=process,
                progress=progress,
            )
            state.wait_for_everyone()
            if state.is_main_process:
                join_shards(work, out, plan, {**settings, "reflow_version": __version__})
            state.wait_for_everyone()
        if push_to_hub and state.is_main_process:  # also a rerun of a complete folder, e.g. after a failed upload
            push_pairs(out, push_to_hub)
        return out
    finally:
        if lock is not None:
            lock.release()
