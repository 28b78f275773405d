"""The data of a training and the batch of each step.

The batch of step s is a function of (seed, s) alone: every process draws the same global batch from a
generator seeded by (seed, s) (from data: coupled by ``--coupling`` on the whole global batch; from pairs: the
same rows whether they are read from memory or from the files) and keeps its own slice, split into
micro-batches for gradient accumulation.
So a resumed run and an N-process run see exactly the rows an uninterrupted one-process run sees. The
loop draws the batch of step s + 1 on a background thread while step s runs (:meth:`StepBatches.draw`
only touches the CPU, with its own generator), into pinned memory on CUDA so the copy to the device
overlaps the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from reflow.core.coupling import couple
from reflow.core.meanflow import sample_interval
from reflow.core.timesteps import sample_time
from reflow.errors import ReflowError
from reflow.folders.data import DataSource, load_source
from reflow.pairs import PairsReader
from reflow.student.config import TrainConfig


@dataclass
class TrainData:
    """What a training learns from: a data ``source`` (round 1: z0 ~ N(0, I), z1 ~ data, coupled
    independently or by minibatch OT) or stored teacher ``pairs`` (round k, distillation), and the shape of
    one sample."""

    source: DataSource | None
    pairs: PairsReader | None
    sample_shape: tuple[int, ...]


def open_data(config: TrainConfig) -> TrainData:
    """The data of ``config``: ``--data`` resolved, or ``--pairs`` opened, read into memory or streamed from
    Arrow as ``--pairs-in-memory`` says (text pairs stored as prompts only get their prompt embeddings first)."""
    if config.data is not None:
        source = load_source(config.data)
        return TrainData(source=source, pairs=None, sample_shape=tuple(source.sample_shape))
    pairs = PairsReader(
        config.pairs, max_rows=config.max_pairs, drop_farthest=config.drop_farthest, in_memory=config.pairs_in_memory
    )
    if pairs.conditioning == "text" and not pairs.has_embeddings:
        attach_prompt_embeddings(pairs, config.allow_pickle)
    return TrainData(source=None, pairs=pairs, sample_shape=pairs.sample_shape)


def attach_prompt_embeddings(pairs: PairsReader, allow_pickle: bool) -> None:
    """Text pairs stored as prompts only: encode each distinct prompt once with the teacher's text encoder
    (on the CPU), keep the table, and free the encoder before the UNet is built."""
    from reflow.models.text import PromptEncoder

    teacher = (pairs.provenance.get("teacher") or {}).get("teacher")
    if not teacher:
        raise ReflowError(f"{pairs.path} stores prompts only and records no teacher; regenerate with embeddings")
    encoder = PromptEncoder(teacher, allow_pickle=allow_pickle)
    pairs.attach_prompt_embeddings(encoder(pairs.unique_prompts()))
    del encoder


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step``'s batch: seeded by (seed, step) alone."""
    return torch.Generator().manual_seed((seed << 32) + step)


class MicroBatch(NamedTuple):
    """One micro-batch on the device: the pair (z0, z1), the time t, the conditioning keywords ``cond`` and,
    for a MeanFlow student, the end ``s >= t`` of the interval (None otherwise)."""

    z0: torch.Tensor
    z1: torch.Tensor
    t: torch.Tensor
    cond: dict[str, torch.Tensor]
    s: torch.Tensor | None = None


class StepBatch(NamedTuple):
    """One process's part of a step's batch, split into micro-batches: ``z0``, ``z1`` (micro, local,
    *sample_shape), ``t`` (micro, local), the conditioning keywords ``cond``, each (micro, local, ...), and
    a MeanFlow student's interval ends ``s`` (micro, local) or None."""

    z0: torch.Tensor
    z1: torch.Tensor
    t: torch.Tensor
    cond: dict[str, torch.Tensor]
    s: torch.Tensor | None = None

    def micro(self, m: int, device: torch.device) -> MicroBatch:
        """Micro-batch ``m`` on ``device``, copied without waiting (from pinned memory)."""
        z0 = self.z0[m].to(device, non_blocking=True)
        z1 = self.z1[m].to(device, non_blocking=True)
        cond = {k: v[m].to(device, non_blocking=True) for k, v in self.cond.items()}
        s = None if self.s is None else self.s[m].to(device, non_blocking=True)
        return MicroBatch(z0, z1, self.t[m].to(device, non_blocking=True), cond, s)


class StepBatches:
    """The batch of every step for process ``rank`` of ``world``: ``draw(s)`` is a function of (seed, s).

    ``config.batch_size`` is the global batch of one optimizer step: each process keeps
    ``batch_size / world`` rows of it, split into ``gradient_accumulation_steps`` micro-batches.
    """

    def __init__(self, data: TrainData, config: TrainConfig, world: int, rank: int, pin_memory: bool = False):
        self.micro = config.gradient_accumulation_steps
        if config.batch_size % (world * self.micro):
            raise ReflowError(
                f"--batch-size {config.batch_size} must divide evenly over {world} process(es) "
                f"x {self.micro} accumulation step(s)"
            )
        self.data, self.seed, self.batch_size = data, config.seed, config.batch_size
        self.time_sampler = config.time_sampler
        self.coupling, self.sinkhorn_reg = config.coupling, config.sinkhorn_reg
        self.mean_flow = config.objective == "meanflow"
        self.equal_fraction = config.equal_fraction
        self.local = config.batch_size // (world * self.micro)
        self.mine = slice(rank * self.micro * self.local, (rank + 1) * self.micro * self.local)
        self.pin_memory = pin_memory

    def draw(self, step: int) -> StepBatch:
        """This process's micro-batches of step ``step`` (on the CPU; pinned when ``pin_memory``)."""
        g = step_generator(self.seed, step)
        cond: dict[str, torch.Tensor] = {}
        pairs, n = self.data.pairs, self.batch_size
        if pairs is not None:
            z0, z1, cond = pairs.batch(torch.randint(0, len(pairs), (n,), generator=g))
        else:
            z1 = self.data.source.sample(n, g)
            z0 = torch.randn(n, *self.data.sample_shape, generator=g)
            z1 = couple(z0, z1, self.coupling, reg=self.sinkhorn_reg, generator=g)  # on the whole global batch
        cond = {k: self._split(v) for k, v in cond.items()}
        if self.mean_flow:
            t, s = sample_interval(n, self.time_sampler, equal_fraction=self.equal_fraction, generator=g)
            return StepBatch(self._split(z0), self._split(z1), self._split(t), cond, self._split(s))
        t = sample_time(n, self.time_sampler, generator=g)
        return StepBatch(self._split(z0), self._split(z1), self._split(t), cond)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch ``x`` as (micro, local, ...)."""
        x = x[self.mine].reshape(self.micro, self.local, *x.shape[1:])
        return x.pin_memory() if self.pin_memory else x
