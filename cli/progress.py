"""Progress on the command line: a live bar on a terminal, plain timestamped lines anywhere else (a file, a
pipe, a cluster job's log), nothing on screen with ``--quiet``; ``--log-file`` gets the lines whatever the
screen shows. Only the main process of the whole launch shows progress (``RANK`` 0, which torchrun and
accelerate launch set; ``LOCAL_RANK`` when only that is set), so a run on eight GPUs prints one bar, not
eight, and a run on two nodes one, not two.

The library reports :class:`reflow.core.progress.Update` s. A stage's rate is measured from its first
update, which comes when its work starts (a resumed stage: where it resumes), so its ETA is there from
the second update on, seconds into the stage. A run of several stages (rounds, quickstart) also shows
the run as a whole: stage i of n, and an ETA from the rate of its overall fraction of work done.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Column
from rich.text import Text

from reflow.core.progress import Update

LINE_SECONDS = 30.0  # a progress line at least this often
LINE_PERCENT = 10  # and at every tenth of a stage


def is_main() -> bool:
    """Whether this process shows progress and results: the only process, or rank 0 of a launch (every node
    has a local rank 0; a cluster gathers the nodes' output into one log)."""
    return os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) == "0"


def hms(seconds: float | None) -> str:
    """``1:02:03``; ``-:--:--`` when unknown."""
    if seconds is None:
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def count(n: float) -> str:
    """A count that fits a bar: ``8,192``, ``412.3k``, ``1.23M``."""
    if n < 100_000:
        return f"{int(n):,}"
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1e6:.2f}M" if n < 1e9 else f"{n / 1e9:.2f}G"


def rate_text(rate: float | None, unit: str) -> str:
    if rate is None:
        return f"- {unit}/s"
    return f"{rate:,.1f} {unit}/s" if rate < 100 else f"{count(rate)} {unit}/s"


@dataclass
class Clock:
    """A growing count's rate, measured from its first value, and what is left at that rate."""

    value0: float
    start: float = field(default_factory=time.monotonic)
    value: float = 0.0
    now: float = 0.0

    def __post_init__(self) -> None:
        self.value, self.now = self.value0, self.start

    def add(self, value: float) -> None:
        self.value, self.now = value, time.monotonic()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    @property
    def rate(self) -> float | None:
        moved, took = self.value - self.value0, self.now - self.start
        return moved / took if moved > 0 and took > 0 else None

    def eta(self, total: float) -> float | None:
        rate = self.rate
        return None if rate is None else max(0.0, total - self.value) / rate


@dataclass
class StageState:
    """What the reporter keeps of the stage at work: its clock and when it last wrote a line."""

    update: Update
    clock: Clock
    line_at: float = field(default_factory=time.monotonic)
    line_percent: int = 0
    rated: bool = False  # a line with a rate (and so an ETA) has been written
    ended: bool = False


class EtaColumn(ProgressColumn):
    """``ETA 0:01:23`` from the stage's own measured rate (rich's estimate needs many samples to start)."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("done", style="progress.remaining")
        return Text(f"ETA {task.fields.get('eta', hms(None))}", style="progress.remaining")


class LiveBar:
    """Rich's live progress on a terminal: a row per stage, and a first row for the run as a whole."""

    def __init__(self, console: Console):
        self.progress = Progress(
            TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
            BarColumn(bar_width=12, table_column=Column(no_wrap=True)),
            TextColumn("{task.fields[count]}", markup=False, table_column=Column(no_wrap=True, justify="right")),
            TimeElapsedColumn(table_column=Column(no_wrap=True)),
            EtaColumn(table_column=Column(no_wrap=True)),
            # the note takes what is left of the line (cut short with an ellipsis), so rows fit 80 columns
            TextColumn(
                "{task.fields[info]}", markup=False, table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)
            ),
            console=console,
            expand=True,
        )
        self.run_task = None
        self.task = None
        self.stage: str | None = None

    def show(self, state: StageState, run: Clock | None) -> None:
        u = state.update
        if self.task is None and self.run_task is None:
            self.progress.start()
        if run is not None and u.overall is not None:
            self._show_run(u, run)
        shown = f"{count(u.done)}/{count(u.total)} {u.unit}"
        fields = {"count": shown, "eta": hms(state.clock.eta(u.total)), "info": u.info}
        if u.stage != self.stage:
            self.stage = u.stage
            self.task = self.progress.add_task(u.stage, total=max(u.total, 1), completed=u.done, **fields)
        self.progress.update(self.task, total=max(u.total, 1), completed=min(u.done, max(u.total, 1)), **fields)

    def _show_run(self, u: Update, run: Clock) -> None:
        fields = {"count": f"{100 * u.overall:.0f}%", "eta": hms(run.eta(1.0)), "info": ""}
        label = f"stage {u.index}/{u.count}"
        if self.run_task is None:
            self.run_task = self.progress.add_task(label, total=1000, completed=0, **fields)
        self.progress.update(self.run_task, description=label, completed=int(1000 * u.overall), **fields)

    def close(self) -> None:
        if self.task is not None or self.run_task is not None:
            self.progress.stop()


class LineLog:
    """Timestamped lines for files and logs: a stage's start, its progress every ``LINE_PERCENT`` % or
    ``LINE_SECONDS`` (and as soon as it has a rate), its end; nothing that moves the cursor."""

    def __init__(self, streams: list[TextIO]):
        self.streams = streams

    def write(self, text: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n"
        for stream in self.streams:
            stream.write(line)
            stream.flush()

    def show(self, state: StageState, run: Clock | None, first: bool) -> None:
        u, clock = state.update, state.clock
        where = f"[{u.index}/{u.count}] " if u.count > 1 else ""
        if state.ended:
            return
        if first and u.total > 0 and u.done >= u.total:
            state.ended = True
            self.write(f"{where}{u.stage}: {u.info or 'already done'}")
            return
        if first:
            at = f"resumed at {count(u.done)}/" if u.done > 0 else "started: "
            self.write(f"{where}{u.stage}: {at}{count(u.total)} {u.unit}")
            return
        percent = int(100 * u.done / u.total) if u.total > 0 else 100
        if u.done >= u.total and not state.ended:
            state.ended = True
            took = f"{count(u.done - clock.value0)} {u.unit} in {hms(clock.elapsed)}"
            self.write(f"{where}{u.stage}: done, {took} ({rate_text(clock.rate, u.unit)}){_note(u)}{_run(u, run)}")
            return
        due = time.monotonic() - state.line_at >= LINE_SECONDS or percent >= state.line_percent + LINE_PERCENT
        if clock.rate is not None and (due or not state.rated):
            state.rated, state.line_at, state.line_percent = True, time.monotonic(), percent
            self.write(
                f"{where}{u.stage}: {count(u.done)}/{count(u.total)} {u.unit} ({percent}%), "
                f"{rate_text(clock.rate, u.unit)}, elapsed {hms(clock.elapsed)}, ETA {hms(clock.eta(u.total))}"
                f"{_note(u)}{_run(u, run)}"
            )


def _note(u: Update) -> str:
    return f", {u.info}" if u.info else ""


def _run(u: Update, run: Clock | None) -> str:
    """The run as a whole, for a stage line of a run of several stages."""
    if run is None or u.overall is None or u.count < 2:
        return ""
    return f"; run {100 * u.overall:.0f}%, ETA {hms(run.eta(1.0))}"


class Reporter:
    """Shows the Updates of one command: on ``live`` (a terminal's console) as a live bar, and as lines on
    ``streams`` (stderr when it is not a terminal, a --log-file). ``reporter(update)``; ``close(finished)``
    at the end (a finished run of several stages then logs its total time)."""

    def __init__(self, live: Console | None, streams: list[TextIO]):
        self.bar = LiveBar(live) if live is not None else None
        self.lines = LineLog(streams) if streams else None
        self.state: StageState | None = None
        self.run: Clock | None = None
        self.count = 1

    def __call__(self, update: Update) -> None:
        first = self.state is None or update.stage != self.state.update.stage
        if first:
            self.state = StageState(update, Clock(update.done))
        else:
            self.state.update = update
            self.state.clock.add(update.done)
        if update.overall is not None:
            self.count = update.count
            if self.run is None:
                self.run = Clock(update.overall)
            self.run.add(update.overall)
        if self.bar is not None:
            self.bar.show(self.state, self.run)
        if self.lines is not None:
            self.lines.show(self.state, self.run, first)

    def close(self, finished: bool) -> None:
        if self.bar is not None:
            self.bar.close()
        if finished and self.lines is not None and self.run is not None and self.count > 1:
            self.lines.write(f"run: {self.count} stages done in {hms(self.run.elapsed)}")
