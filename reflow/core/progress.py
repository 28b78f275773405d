"""Progress of long work as the library reports it, for a front end to show (the library never prints).

A stage reports :class:`Update` s in units a user feels: training steps, pairs, rows, or network calls
(one call advancing one sample; what sampling for an evaluation costs). Solvers and teachers take an
``on_call(rows)`` hook, called after each network call with the number of samples it advanced, which is
how a long batch reports from inside. :class:`Throttle` keeps such reports from flooding the caller.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

OnCall = Callable[[int], None]
"""``on_call(rows)``: a network call just advanced ``rows`` samples."""


@dataclass(frozen=True)
class Update:
    """One report of a stage's progress: ``done`` of ``total`` ``unit`` (steps, pairs, rows, calls).

    ``stage`` names what runs ("train", "round-1/pairs"); ``info`` is a short note (the last logged
    loss, the NFE being drawn). A run of several stages adds ``index`` of ``count`` (this stage's place
    in it, from 1) and ``overall``: the fraction of the run's estimated work done, in [0, 1].
    """

    stage: str
    done: int
    total: int
    unit: str
    info: str = ""
    index: int = 1
    count: int = 1
    overall: float | None = None


Progress = Callable[[Update], None]


@dataclass(frozen=True)
class StageProgress:
    """Turns the progress calls of the library's stages into Updates named ``stage`` for ``sink``: training's
    ``steps(step, total, loss, samples_per_second)``, generation's ``pairs(done, total)``, and Updates of
    another name (an evaluation's) renamed."""

    sink: Progress
    stage: str

    def steps(self, step: int, total: int, loss: float, _samples_per_second: float) -> None:
        self.sink(Update(self.stage, step, total, "steps", "" if math.isnan(loss) else f"loss {loss:.4g}"))

    def pairs(self, done: int, total: int) -> None:
        self.sink(Update(self.stage, done, total, "pairs"))

    def renamed(self, update: Update) -> None:
        self.sink(replace(update, stage=self.stage))


class Throttle:
    """``throttle()`` is True at its first call and then at most once every ``seconds``."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.last = -math.inf

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.seconds:
            return False
        self.last = now
        return True


class RowsProgress:
    """Updates of ``stage`` counting ``total`` rows: ``tell(done)`` as batches finish, and ``in_batch``'s
    ``on_call`` for a teacher or solver working on a batch (its share so far, at most every
    ``seconds``). Does nothing without a ``sink``."""

    def __init__(self, sink: Progress | None, stage: str, total: int, unit: str = "rows", seconds: float = 0.5):
        self.sink, self.stage, self.total, self.unit = sink, stage, total, unit
        self.tick = Throttle(seconds)

    def __call__(self, done: int) -> None:
        if self.sink is not None:
            self.sink(Update(self.stage, done, self.total, self.unit))

    def in_batch(self, done: int, rows: int, planned: int | None) -> OnCall | None:
        """:func:`batch_calls` for a batch of ``rows`` rows after ``done`` finished ones."""
        return None if self.sink is None else batch_calls(self, self.tick, done, rows, planned)


def batch_calls(
    report: Callable[[int], None], tick: Throttle, done: int, rows: int, planned: int | None
) -> OnCall | None:
    """The ``on_call`` of a batch of ``rows`` rows, after ``done`` finished ones, that takes ``planned``
    network calls: ``report(rows so far)`` (:func:`rows_in_flight`) when ``tick`` allows. None when the
    calls are not known ahead (an adaptive solver): the batch's end reports it."""
    if not planned:
        return None
    calls = 0

    def on_call(_rows: int) -> None:
        nonlocal calls
        calls += 1
        if tick():
            report(rows_in_flight(done, rows, calls, planned))

    return on_call


def rows_in_flight(done: int, rows: int, calls: int, planned: int | None) -> int:
    """Rows to report while a batch of ``rows`` rows is ``calls`` network calls into its ``planned`` ones
    (None: unknown, as for an adaptive solver), after ``done`` finished rows: its share in proportion,
    always short of the whole batch (the batch's end reports that)."""
    if not planned or rows < 1:
        return done
    return done + min(rows - 1, rows * calls // planned)
