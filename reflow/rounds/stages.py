"""The stages of a run, planned up front as :class:`Stage` s (held-out pairs, a round's pairs, student and
report, the distilled students and their reports), then run in order.

:func:`run_stage` runs a stage unless the manifest records it done or its output is complete (every output
appears complete by rename or is written atomically; training resumes from its last checkpoint), so a run
killed at any point and rerun skips what is finished. Its wall and CPU time go into the manifest as it
runs (every ``CLOCK_SECONDS``), so a killed and resumed stage records the time of every run that worked
on it. Its progress reaches the caller as :class:`reflow.core.progress.Update` s named after the stage,
with its place in the run and the fraction of the run's estimated work done (:class:`RunProgress`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from reflow.core.progress import Progress, StageProgress, Update
from reflow.eval import EvalSettings, evaluate, write_report
from reflow.eval.evaluate import planned_calls
from reflow.folders.io import atomic_write_json
from reflow.folders.kinds import is_diffusers_checkpoint
from reflow.pairs import generate_pairs
from reflow.rounds.manifest import Manifest
from reflow.rounds.recipe import Recipe
from reflow.student import TrainConfig, latest_checkpoint, train
from reflow.teachers import load_teacher

# A stage's output is complete once it holds this file.
PAIRS_DONE, MODEL_DONE, REPORT_DONE = "reflow_pairs.json", "README.md", "metrics.json"
CLOCK_SECONDS = 10.0  # how often a running stage's time so far goes into the manifest, at most
TRAIN_CALLS = 3  # a training step's forward and backward cost about three forward calls per sample


@dataclass(frozen=True)
class Stage:
    """One stage: ``work(ctx, *args)`` makes ``output``, complete once it holds ``done_file``. Its progress
    counts ``total`` ``unit`` (steps, pairs, calls); ``cost`` is its estimated work in network calls (one
    call advancing one sample), its weight in the run's overall progress. ``after(ctx)`` runs once it is
    done or found done (a round's own manifest)."""

    name: str
    output: Path
    done_file: str
    work: Callable[..., dict[str, Any] | None]
    args: tuple[Any, ...]
    total: int
    unit: str
    cost: float
    after: Callable[[RunContext], None] | None = None


@dataclass
class RunProgress:
    """Passes each stage's progress on as Updates with the stage's place in the run (``index`` of the
    stages' ``costs``) and the fraction of the run's estimated work done; on the main process, records
    the running stage's time in the manifest every ``CLOCK_SECONDS`` (see :class:`StageClock`)."""

    sink: Progress | None
    costs: list[float]
    index: int = 0
    clock: StageClock | None = None

    def overall(self, done: int, total: int) -> float:
        finished = sum(self.costs[: self.index])
        share = min(1.0, done / total) if total > 0 else 1.0
        return (finished + self.costs[self.index] * share) / max(sum(self.costs), 1e-12)

    def update(self, update: Update) -> None:
        if self.clock is not None:
            self.clock.tick()
        if self.sink is not None:
            overall = self.overall(update.done, update.total)
            self.sink(replace(update, index=self.index + 1, count=len(self.costs), overall=overall))


@dataclass
class StageClock:
    """A stage's wall and CPU seconds: ``before`` (recorded by killed earlier runs of it) plus this run's,
    written to the manifest as the stage runs (``tick``, at most every ``CLOCK_SECONDS``)."""

    manifest: Manifest
    stage: Stage
    before: tuple[float, float] = (0.0, 0.0)
    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    saved: float = field(default_factory=time.monotonic)

    def spent(self) -> tuple[float, float]:
        return (
            self.before[0] + time.perf_counter() - self.wall,
            self.before[1] + time.process_time() - self.cpu,
        )

    def tick(self) -> None:
        if time.monotonic() - self.saved >= CLOCK_SECONDS:
            self.saved = time.monotonic()
            self.manifest.running(self.stage.name, self.stage.output, *self.spent())


@dataclass
class RunContext:
    """What every stage of one run needs. ``state``: accelerate's PartialState (this process's rank, and the
    barrier every process waits at)."""

    run: Path
    recipe: Recipe
    manifest: Manifest
    state: Any
    device: Any = "cpu"
    prompts: list[str] | None = None  # a text-to-image teacher's prompts, read once
    tracker: RunProgress = field(default_factory=lambda: RunProgress(None, [1.0]))

    @property
    def heldout(self) -> Path | None:
        """The held-out pairs every report measures fidelity on (None when the recipe asks for none)."""
        return self.run / "heldout" if self.recipe.pairs.heldout > 0 else None

    def progress_of(self, stage: str) -> StageProgress:
        return StageProgress(self.tracker.update, stage)


class Row(NamedTuple):
    """A model of the table across rounds: its name, and the run folder of its stages (``prefix/report``)."""

    name: str
    prefix: str


def run_stage(ctx: RunContext, stage: Stage, index: int) -> None:
    """Run ``stage`` (the ``index``-th of the run) unless it is recorded done or its output holds its
    ``done_file``, then record it: its output, wall and CPU seconds (with those of killed earlier runs of
    it), and what its work returns."""
    tracker, main = ctx.tracker, ctx.state.is_main_process
    tracker.index, tracker.clock = index, None
    before = ctx.manifest.spent(stage.name)
    if (stage.output / stage.done_file).is_file():
        if not ctx.manifest.done(stage.name) and main:
            # finished but killed before the manifest was written: keep it, with the time recorded so far
            wall, cpu = before if before is not None else (None, None)
            ctx.manifest.record(stage.name, stage.output, wall, cpu, resumed=True)
        tracker.update(Update(stage.name, stage.total, stage.total, stage.unit, "already done"))
    else:
        stage.output.parent.mkdir(parents=True, exist_ok=True)
        clock = StageClock(ctx.manifest, stage, before or (0.0, 0.0))
        tracker.clock = clock if main else None
        info = stage.work(ctx, *stage.args) or {}
        ctx.state.wait_for_everyone()
        if main:
            ctx.manifest.record(
                stage.name, stage.output, *clock.spent(), **info, **({"resumed": True} if before else {})
            )
    tracker.clock = None
    if stage.after is not None:
        stage.after(ctx)


# --- pairs ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairsJob:
    """``num_pairs`` pairs of ``teacher`` (its ``solver`` and ``nfe``) into ``dest``, from noise ``seed``."""

    teacher: str
    solver: str
    nfe: int
    dest: Path
    num_pairs: int
    seed: int
    round: int


def pairs_stage(name: str, job: PairsJob) -> Stage:
    return Stage(name, job.dest, PAIRS_DONE, make_pairs, (name, job), job.num_pairs, "pairs", job.num_pairs * job.nfe)


def make_pairs(ctx: RunContext, name: str, job: PairsJob) -> None:
    start = ctx.recipe.teacher
    # guidance is the starting checkpoint's; a student of ours has it baked in
    guidance = start.guidance() if job.teacher == start.checkpoint else {}
    teacher = load_teacher(job.teacher, nfe=job.nfe, solver=job.solver, device=ctx.device, **guidance)
    spec = ctx.recipe.pairs
    generate_pairs(
        teacher,
        job.dest,
        job.num_pairs,
        seed=job.seed,
        batch_size=spec.batch_size,
        dtype=spec.dtype,
        round_=job.round,
        labels=spec.labels,
        prompts=ctx.prompts,
        store_embeddings=spec.store_embeddings,
        store_z0=spec.store_z0,
        progress=ctx.progress_of(name).pairs,
    )


def heldout_stages(ctx: RunContext, teacher: str, solver: str, nfe: int) -> list[Stage]:
    """The held-out pairs of the starting teacher (from data: of 1-RF), from other noise than every round's."""
    if ctx.heldout is None:
        return []
    job = PairsJob(teacher, solver, nfe, ctx.heldout, ctx.recipe.pairs.heldout, ctx.recipe.seed + 1, 1)
    return [pairs_stage("heldout", job)]


# --- students and reports ------------------------------------------------------------------------------


def train_stage(name: str, config: TrainConfig) -> Stage:
    calls = config.max_steps * config.batch_size * TRAIN_CALLS * (config.distill_k or 1)
    return Stage(name, Path(config.out), MODEL_DONE, train_model, (name, config), config.max_steps, "steps", calls)


def train_model(ctx: RunContext, name: str, config: TrainConfig) -> dict[str, Any]:
    """Train (resuming from the last checkpoint of a killed run)."""
    config.resume = latest_checkpoint(Path(config.out)) is not None
    result = train(config, progress=ctx.progress_of(name).steps)
    return {"steps": result.steps, "final_loss": result.loss}


def report_stage(
    ctx: RunContext,
    name: str,
    model: Path,
    report: Path,
    teacher_nfe: int | None = None,
    after: Callable[[RunContext], None] | None = None,
) -> Stage:
    """The report of ``model`` (a diffusers checkpoint at its own solver with ``teacher_nfe`` steps)."""
    settings = eval_settings(ctx, teacher_nfe)
    fidelity = ctx.recipe.pairs.heldout if ctx.heldout is not None else 0
    plan = planned_calls(settings, checkpoint=teacher_nfe is not None, adaptive=bool(settings.adaptive),
                         fidelity=min(fidelity, settings.num_fidelity), grid=0)  # fmt: skip
    calls = sum(plan.values())
    return Stage(name, report, REPORT_DONE, write_model_report, (name, model, report, teacher_nfe), calls, "calls",
                 calls, after)  # fmt: skip


def eval_settings(ctx: RunContext, teacher_nfe: int | None) -> EvalSettings:
    """The recipe's [eval] with the run's held-out pairs (a diffusers checkpoint: the teacher's solver at
    ``teacher_nfe``)."""
    settings = EvalSettings(**ctx.recipe.eval, heldout=None if ctx.heldout is None else str(ctx.heldout))
    if teacher_nfe is not None:
        settings.teacher_nfe = teacher_nfe
        settings.teacher_solver = ctx.recipe.teacher.solver
    return settings


def write_model_report(ctx: RunContext, name: str, model: Path, report: Path, teacher_nfe: int | None) -> None:
    """Evaluate ``model`` into ``report``, on the main process."""
    if ctx.state.is_main_process:
        settings = eval_settings(ctx, teacher_nfe)
        result = evaluate([model], settings, device=ctx.device, progress=ctx.progress_of(name).renamed)
        write_report(report, result)


# --- the run's stages, in order ------------------------------------------------------------------------


def plan_run(ctx: RunContext) -> tuple[list[Stage], list[Row]]:
    """Every stage of the run in order, and the rows of the table across rounds."""
    stages, rows = teacher_stages(ctx)
    teacher = ctx.recipe.teacher.checkpoint  # None: round 1 learns from data
    for k in range(1, ctx.recipe.rounds + 1):
        stages += round_stages(ctx, k, teacher)
        rows.append(Row(f"round-{k}", f"round-{k}"))
        teacher = str(ctx.run / f"round-{k}" / "student")  # the teacher of round k + 1
    distill, distill_rows = distill_stages(ctx)
    return stages + distill, rows + distill_rows


def teacher_stages(ctx: RunContext) -> tuple[list[Stage], list[Row]]:
    """A starting checkpoint's held-out pairs and, for a diffusers checkpoint, its own report at its solver's
    NFEs, with its row of the table (none for data or a flow of ours)."""
    start = ctx.recipe.teacher
    if start.checkpoint is None:
        return [], []
    stages = heldout_stages(ctx, start.checkpoint, start.solver, start.nfe)
    if not is_diffusers_checkpoint(start.checkpoint):
        return stages, []
    report = ctx.run / "teacher" / "report"
    stages.append(report_stage(ctx, "teacher/report", Path(start.checkpoint), report, teacher_nfe=start.nfe))
    return stages, [Row("teacher", "teacher")]


def round_stages(ctx: RunContext, k: int, teacher: str | None) -> list[Stage]:
    """Round k: pairs of ``teacher`` (None: round 1 from data, which has none), the student, its report and
    then ``round-k/manifest.json``."""
    folder = ctx.run / f"round-{k}"
    stages = [round_pairs_stage(ctx, k, teacher, folder / "pairs")] if teacher is not None else []
    config = round_config(ctx, k, teacher, folder)
    stages.append(train_stage(f"round-{k}/student", config))
    if teacher is None:
        # Round 1 from data has no teacher to be faithful to; 1-RF is the teacher of every later round,
        # so its held-out pairs (the [pairs] solver and NFE, seeds apart from round 2's) are theirs.
        stages += heldout_stages(ctx, config.out, ctx.recipe.pairs.solver, ctx.recipe.pairs.nfe)
    after = partial(write_round_manifest, k=k, teacher=teacher)
    stages.append(report_stage(ctx, f"round-{k}/report", Path(config.out), folder / "report", after=after))
    return stages


def write_round_manifest(ctx: RunContext, k: int, teacher: str | None) -> None:
    """``round-k/manifest.json``: the round's teacher and the records of its stages (main process)."""
    if ctx.state.is_main_process:
        stages = ctx.manifest.stages_under(f"round-{k}/")
        atomic_write_json(ctx.run / f"round-{k}" / "manifest.json", {"round": k, "teacher": teacher, "stages": stages})


def round_pairs_stage(ctx: RunContext, k: int, teacher: str, dest: Path) -> Stage:
    """Round k's pairs: round 1's with the starting checkpoint's pairs solver and NFE, later rounds' with the
    [pairs] solver and NFE of the previous student."""
    recipe = ctx.recipe
    solver, nfe = recipe.teacher.round1_pairs() if k == 1 else (recipe.pairs.solver, recipe.pairs.nfe)
    return pairs_stage(f"round-{k}/pairs", PairsJob(teacher, solver, nfe, dest, recipe.pairs.num_pairs, recipe.seed, k))


def round_config(ctx: RunContext, k: int, teacher: str | None, folder: Path) -> TrainConfig:
    """Round k's training: from data (no teacher: independent coupling) or on its pairs, initialised from
    ``teacher`` unless the recipe says fresh."""
    recipe = ctx.recipe
    settings, init = recipe.train.for_round(k, seed=recipe.seed + k - 1)
    student = str(folder / "student")
    if teacher is None:
        config = TrainConfig(out=student, data=recipe.teacher.data, **settings)
    else:
        pairs = str(folder / "pairs")
        config = TrainConfig(out=student, pairs=pairs, init=None if init == "fresh" else teacher, **settings)
    config.extra = {"recipe": recipe.name, "round": k}
    return config


def distill_stages(ctx: RunContext) -> tuple[list[Stage], list[Row]]:
    """The last round's student distilled on its pairs, per k (the recipe made sure it has pairs), and each
    distilled student's report."""
    spec, last = ctx.recipe.distill, ctx.run / f"round-{ctx.recipe.rounds}"
    if spec is None:
        return [], []
    stages, rows = [], []
    for k in spec.k:
        prefix = spec.folder(k)
        student = ctx.run / prefix / "student"
        pairs, init = str(last / "pairs"), str(last / "student")
        config = TrainConfig(out=str(student), pairs=pairs, init=init, distill_k=k, **spec.train)
        config.extra = {"recipe": ctx.recipe.name, "round": f"distill k={k}"}
        stages.append(train_stage(f"{prefix}/student", config))
        stages.append(report_stage(ctx, f"{prefix}/report", student, ctx.run / prefix / "report"))
        rows.append(Row(f"distill-k{k}", prefix))
    return stages, rows
