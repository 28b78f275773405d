"""The batch pipeline: draw each batch's inputs, run the teacher, collect the outputs into shards.

The host never makes the teacher wait:

- the next batch's noise (and labels, or prompt embeddings) is drawn on a background thread while the
  teacher runs (pinned, on CUDA, so the teacher's upload can be asynchronous);
- on CUDA a batch's output is copied back asynchronously and only waited for after the next batch has
  been queued, so the GPU has work while the host checks and stores the previous batch;
- Arrow writes run on another background thread (each shard to a temporary name, renamed when complete,
  so a failed write such as a full disk leaves no half shard).

Rows, their order and the values stored are the same as one batch at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reflow.core.noise import row_labels, row_noise
from reflow.core.progress import OnCall, Throttle, batch_calls
from reflow.errors import ReflowError
from reflow.pairs.plan import ShardPlan, shard_dir, unfinished
from reflow.pairs.schema import DTYPES
from reflow.pairs.writer import write_shard
from reflow.teachers.base import Teacher

Progress = Callable[[int, int], None]
IN_BATCH_SECONDS = 0.5  # how often a batch reports from inside, at most


@dataclass(frozen=True)
class RowInputs:
    """What the teacher is given for row i: z0 = row_noise(seed, i, shape), stored only with ``store_z0``;
    for class teachers (``labels`` set) the label row_labels(seed, i, labels); for text teachers
    (``prompts`` set) prompt ``i mod len(prompts)``, whose embeddings are stored unless
    ``store_embeddings`` is False."""

    seed: int
    shape: tuple[int, ...]
    labels: list[int] | None = None
    prompts: list[str] | None = None
    store_embeddings: bool = True
    store_z0: bool = False

    def prompt(self, i: int) -> str:
        return self.prompts[i % len(self.prompts)]


@dataclass
class Batch:
    """One teacher call: shard ``shard``'s rows ``idx``, their noise ``z0``, conditioning ``y`` (labels or
    prompt embeddings) and the teacher's output ``z1`` (``ready`` once a CUDA copy of it has landed)."""

    shard: int
    idx: range
    z0: torch.Tensor
    y: torch.Tensor | None
    z1: torch.Tensor | None = None
    ready: Any = None


def draw(teacher: Teacher, rows: RowInputs, idx: range, pin: bool):
    """(z0, y) for the rows, and the copies handed to the teacher (pinned with ``pin``); y is the rows'
    labels (class teachers) or prompt embeddings (text teachers, encoded here, off the teacher's path)."""
    z0 = row_noise(rows.seed, idx, rows.shape)
    if rows.labels is not None:
        y = row_labels(rows.seed, idx, rows.labels)
    elif rows.prompts is not None:
        y = teacher.encode_prompts([rows.prompt(i) for i in idx])
    else:
        y = None
    if not pin:
        return z0, y, z0, y
    return z0, y, z0.pin_memory(), (y.pin_memory() if y is not None else None)


def call_teacher(
    teacher: Teacher, z0: torch.Tensor, y: torch.Tensor | None, on_call: OnCall | None = None
) -> torch.Tensor:
    """The teacher's samples from ``z0`` (with the conditioning ``y`` of conditional teachers)."""
    return (teacher(z0, y, on_call=on_call) if y is not None else teacher(z0, on_call=on_call)).detach()


@dataclass
class ShardSink:
    """Collects finished batches, in order, into shards and hands each complete shard to the ``writer``
    thread; ``progress(done_rows, total_rows)`` is called as batches finish, and from inside a batch
    (:meth:`in_batch`) with its share so far."""

    writer: ThreadPoolExecutor
    plan: ShardPlan
    work: Path
    features: Any
    rows: RowInputs
    dtype: torch.dtype
    done_rows: int
    total_rows: int
    progress: Progress | None = None
    pending: Future | None = None
    parts: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"z0": [], "z1": [], "y": []})
    tick: Throttle = field(default_factory=lambda: Throttle(IN_BATCH_SECONDS))

    def in_batch(self, rows: int, planned: int | None) -> OnCall | None:
        """The teacher's ``on_call`` for a batch of ``rows`` rows taking ``planned`` network calls: reports
        the batch's share as its calls finish (at most every ``IN_BATCH_SECONDS``)."""
        if self.progress is None:
            return None
        progress, total = self.progress, self.total_rows
        return batch_calls(lambda done: progress(done, total), self.tick, self.done_rows, rows, planned)

    def check(self) -> None:
        """Raise now the error of a shard write that failed (a full disk stops the run)."""
        if self.pending is not None and self.pending.done():
            self.pending.result()

    def add(self, batch: Batch) -> None:
        """Store a batch whose ``z1`` is on the host (or on its way: ``ready``)."""
        if batch.ready is not None:
            batch.ready.synchronize()
        if not torch.isfinite(batch.z1).all():
            raise ReflowError(f"the teacher produced NaN/inf on rows {batch.idx.start}-{batch.idx.stop - 1}; check it")
        if self.rows.store_z0:
            self.parts["z0"].append(batch.z0.to(self.dtype).numpy())
        self.parts["z1"].append(batch.z1.to(self.dtype).numpy())
        if batch.y is not None:
            self.parts["y"].append(batch.y.to(self.dtype).numpy() if self.rows.prompts is not None else batch.y.numpy())
        self.done_rows += len(batch.idx)
        if self.progress:
            self.progress(self.done_rows, self.total_rows)
        if batch.idx.stop == self.plan.rows(batch.shard).stop:  # the shard's last batch
            self._hand_over(batch.shard)

    def _hand_over(self, k: int) -> None:
        """Give shard ``k``'s columns to the writer thread (after the previous shard is written)."""
        if self.pending is not None:
            self.pending.result()
        columns = self._columns(self.plan.rows(k))
        self.pending = self.writer.submit(write_shard, shard_dir(self.work, k), columns, self.features)
        self.parts = {"z0": [], "z1": [], "y": []}

    def _columns(self, rows: range) -> dict[str, Any]:
        columns = {"z0": np.concatenate(self.parts["z0"])} if self.rows.store_z0 else {}
        columns["z1"] = np.concatenate(self.parts["z1"])
        columns["index"] = np.arange(rows.start, rows.stop, dtype=np.int64)
        if self.rows.prompts is not None:
            columns["prompt"] = [self.rows.prompt(i) for i in rows]
            if self.rows.store_embeddings:
                columns["prompt_embeds"] = np.concatenate(self.parts["y"])
        elif self.parts["y"]:
            columns["label"] = np.concatenate(self.parts["y"])
        return columns

    def wait(self) -> None:
        """Wait for the last shard write."""
        if self.pending is not None:
            self.pending.result()


def run_batches(
    teacher: Teacher, rows: RowInputs, batches: list[tuple[int, range]], sink: ShardSink, on_cuda: bool
) -> None:
    """Run the teacher on ``batches`` ((shard, rows) in order), drawing each next batch on a background
    thread, and give each finished batch to ``sink``."""
    with ThreadPoolExecutor(max_workers=1) as drawer:
        queued: Batch | None = None  # a CUDA batch whose output is still on its way to the host
        upcoming = drawer.submit(draw, teacher, rows, batches[0][1], on_cuda) if batches else None
        for j, (k, idx) in enumerate(batches):
            sink.check()
            z0, y, z0_feed, y_feed = upcoming.result()
            if j + 1 < len(batches):
                upcoming = drawer.submit(draw, teacher, rows, batches[j + 1][1], on_cuda)
            on_call = sink.in_batch(len(idx), teacher.network_calls)
            batch = Batch(k, idx, z0, y, call_teacher(teacher, z0_feed, y_feed, on_call))
            if on_cuda and batch.z1.device.type == "cuda":
                batch.z1 = batch.z1.to("cpu", non_blocking=True)  # into pinned memory, in stream order
                batch.ready = torch.cuda.Event()
                batch.ready.record()
                if queued is not None:
                    sink.add(queued)
                queued = batch
            else:
                batch.z1 = batch.z1.to("cpu")
                sink.add(batch)
        if queued is not None:
            sink.add(queued)


def make_shards(
    teacher: Teacher,
    rows: RowInputs,
    plan: ShardPlan,
    work: Path,
    *,
    features: Any,
    dtype: str,
    batch_size: int,
    device: torch.device,
    process: tuple[int, int],
    progress: Progress | None = None,
) -> None:
    """Make the shards of ``plan`` that process ``process`` = (index, count) owns and that ``work`` lacks."""
    mine = plan.shards_of(*process)
    todo = unfinished(work, mine)
    total_rows = sum(len(plan.rows(k)) for k in mine)
    done_rows = total_rows - sum(len(plan.rows(k)) for k in todo)
    if progress:
        progress(done_rows, total_rows)
    on_cuda = device.type == "cuda"
    with ThreadPoolExecutor(max_workers=1) as writer:
        sink = ShardSink(writer, plan, work, features, rows, DTYPES[dtype], done_rows, total_rows, progress)
        run_batches(teacher, rows, plan.batches(todo, batch_size), sink, on_cuda)
        sink.wait()
