"""The stages of a run, each a plain function of a :class:`RunContext`: held-out pairs, a round's pairs,
student and report, the distilled students and their reports.

:func:`run_stage` runs a stage unless the manifest records it done or its output is complete (every output
appears complete by rename or is written atomically; training resumes from its last checkpoint), then
records its wall and CPU time, so a run killed at any point and rerun skips what is finished.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from reflow.errors import ReflowError
from reflow.eval import EvalSettings, evaluate, write_report
from reflow.folders.io import atomic_write_json
from reflow.folders.kinds import is_diffusers_checkpoint
from reflow.pairs import generate_pairs
from reflow.rounds.manifest import Manifest
from reflow.rounds.recipe import Recipe
from reflow.student import TrainConfig, latest_checkpoint, train
from reflow.teachers import load_teacher

Progress = Callable[..., None]
"""``progress(stage, done, total, info="")``."""

# A stage's output is complete once it holds this file.
PAIRS_DONE, MODEL_DONE, REPORT_DONE = "reflow_pairs.json", "README.md", "metrics.json"


@dataclass
class RunContext:
    """What every stage of one run needs. ``state``: accelerate's PartialState (this process's rank, and the
    barrier every process waits at)."""

    run: Path
    recipe: Recipe
    manifest: Manifest
    state: Any
    device: Any = "cpu"
    progress: Progress | None = None
    prompts: list[str] | None = None  # a text-to-image teacher's prompts, read once

    @property
    def heldout(self) -> Path | None:
        """The held-out pairs every report measures fidelity on (None when the recipe asks for none)."""
        return self.run / "heldout" if self.recipe.pairs.heldout > 0 else None

    def progress_of(self, stage: str) -> StageProgress:
        return StageProgress(self.progress, stage)


@dataclass(frozen=True)
class StageProgress:
    """Passes one stage's progress on as ``progress(stage, done, total, info)``, whichever way the library
    function at work reports it."""

    progress: Progress | None
    stage: str

    def note(self, done: int, total: int, info: str = "") -> None:
        if self.progress:
            self.progress(self.stage, done, total, info)

    def pairs(self, done: int, total: int) -> None:
        self.note(done, total)

    def eval(self, _stage: str, done: int, total: int) -> None:
        self.note(done, total)

    def train(self, step: int, total: int, loss: float, _samples_per_second: float) -> None:
        self.note(step, total, f"loss {loss:.4g}")


class Row(NamedTuple):
    """A model of the table across rounds: its name, and the run folder of its stages (``prefix/report``)."""

    name: str
    prefix: str


def run_stage(
    ctx: RunContext, name: str, output: Path, done_file: str, work: Callable[..., dict[str, Any] | None], *args: Any
) -> None:
    """Run ``work(ctx, *args)`` unless stage ``name`` is recorded done or ``output`` holds ``done_file``, then
    record it: its output, wall and CPU seconds, and what ``work`` returns."""
    if (output / done_file).is_file():
        if not ctx.manifest.done(name) and ctx.state.is_main_process:
            # finished but killed before the manifest was written: keep it, time unknown
            ctx.manifest.record(name, output, None, None, resumed=True)
        return
    wall, cpu = time.perf_counter(), time.process_time()
    info = work(ctx, *args) or {}
    ctx.state.wait_for_everyone()
    if ctx.state.is_main_process:
        ctx.manifest.record(name, output, time.perf_counter() - wall, time.process_time() - cpu, **info)


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


def pairs_stage(ctx: RunContext, name: str, job: PairsJob) -> None:
    run_stage(ctx, name, job.dest, PAIRS_DONE, make_pairs, job)


def make_pairs(ctx: RunContext, job: PairsJob) -> None:
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
        progress=ctx.progress_of(f"{job.dest.parent.name}/{job.dest.name}").pairs,
    )


def heldout_stage(ctx: RunContext, teacher: str, solver: str, nfe: int) -> None:
    """The held-out pairs of the starting teacher (from data: of 1-RF), from other noise than every round's."""
    if ctx.heldout is not None:
        job = PairsJob(teacher, solver, nfe, ctx.heldout, ctx.recipe.pairs.heldout, ctx.recipe.seed + 1, 1)
        pairs_stage(ctx, "heldout", job)


# --- students and reports ------------------------------------------------------------------------------


def train_stage(ctx: RunContext, name: str, config: TrainConfig, label: str) -> None:
    run_stage(ctx, name, Path(config.out), MODEL_DONE, train_model, config, label)


def train_model(ctx: RunContext, config: TrainConfig, label: str) -> dict[str, Any]:
    """Train (resuming from the last checkpoint of a killed run); progress as ``label``."""
    config.resume = latest_checkpoint(Path(config.out)) is not None
    result = train(config, progress=ctx.progress_of(label).train)
    return {"steps": result.steps, "final_loss": result.loss}


def report_stage(
    ctx: RunContext, name: str, model: Path, report: Path, label: str, teacher_nfe: int | None = None
) -> None:
    run_stage(ctx, name, report, REPORT_DONE, write_model_report, model, report, label, teacher_nfe)


def write_model_report(ctx: RunContext, model: Path, report: Path, label: str, teacher_nfe: int | None) -> None:
    """Evaluate ``model`` with the recipe's [eval] (a diffusers checkpoint with the teacher's solver at
    ``teacher_nfe``) into ``report``, on the main process."""
    settings = EvalSettings(**ctx.recipe.eval, heldout=None if ctx.heldout is None else str(ctx.heldout))
    if teacher_nfe is not None:
        settings.teacher_nfe = teacher_nfe
        settings.teacher_solver = ctx.recipe.teacher.solver
    if ctx.state.is_main_process:
        result = evaluate([model], settings, device=ctx.device, progress=ctx.progress_of(label).eval)
        write_report(report, result)


# --- the run's stages, in order ------------------------------------------------------------------------


def teacher_stages(ctx: RunContext) -> list[Row]:
    """A starting checkpoint's held-out pairs and, for a diffusers checkpoint, its own report at its solver's
    NFEs; returns its row of the table (none for data or a flow of ours)."""
    start = ctx.recipe.teacher
    if start.checkpoint is None:
        return []
    heldout_stage(ctx, start.checkpoint, start.solver, start.nfe)
    if not is_diffusers_checkpoint(start.checkpoint):
        return []
    report = ctx.run / "teacher" / "report"
    report_stage(ctx, "teacher/report", Path(start.checkpoint), report, "eval teacher", teacher_nfe=start.nfe)
    return [Row("teacher", "teacher")]


def round_stages(ctx: RunContext, k: int, teacher: str | None) -> Path:
    """Round k: pairs of ``teacher`` (None: round 1 from data, which has none), the student, its report and
    ``round-k/manifest.json``; returns the student, the teacher of round k + 1."""
    folder = ctx.run / f"round-{k}"
    folder.mkdir(exist_ok=True)
    if teacher is not None:
        round_pairs_stage(ctx, k, teacher, folder / "pairs")
    config = round_config(ctx, k, teacher, folder)
    student = Path(config.out)
    train_stage(ctx, f"round-{k}/student", config, f"train round {k}")
    if teacher is None:
        # Round 1 from data has no teacher to be faithful to; 1-RF is the teacher of every later round,
        # so its held-out pairs (the [pairs] solver and NFE, seeds apart from round 2's) are theirs.
        heldout_stage(ctx, str(student), ctx.recipe.pairs.solver, ctx.recipe.pairs.nfe)
    report_stage(ctx, f"round-{k}/report", student, folder / "report", f"eval round {k}")
    if ctx.state.is_main_process:
        stages = ctx.manifest.stages_under(f"round-{k}/")
        atomic_write_json(folder / "manifest.json", {"round": k, "teacher": teacher, "stages": stages})
    return student


def round_pairs_stage(ctx: RunContext, k: int, teacher: str, dest: Path) -> None:
    """Round k's pairs: round 1's with the starting checkpoint's pairs solver and NFE, later rounds' with the
    [pairs] solver and NFE of the previous student."""
    recipe = ctx.recipe
    solver, nfe = recipe.teacher.round1_pairs() if k == 1 else (recipe.pairs.solver, recipe.pairs.nfe)
    pairs_stage(ctx, f"round-{k}/pairs", PairsJob(teacher, solver, nfe, dest, recipe.pairs.num_pairs, recipe.seed, k))


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


def distill_stages(ctx: RunContext) -> list[Row]:
    """The last round's student distilled on its pairs, per k, and each distilled student's report."""
    spec, last = ctx.recipe.distill, ctx.run / f"round-{ctx.recipe.rounds}"
    if spec is None:
        return []
    if not (last / "pairs").exists():
        raise ReflowError("[distill] needs pairs: the last round must train on pairs (rounds >= 2 from data)")
    rows = []
    for k in spec.k:
        prefix = spec.folder(k)
        student = ctx.run / prefix / "student"
        student.parent.mkdir(exist_ok=True)
        pairs, init = str(last / "pairs"), str(last / "student")
        config = TrainConfig(out=str(student), pairs=pairs, init=init, distill_k=k, **spec.train)
        config.extra = {"recipe": ctx.recipe.name, "round": f"distill k={k}"}
        train_stage(ctx, f"{prefix}/student", config, "distill")
        report_stage(ctx, f"{prefix}/report", student, ctx.run / prefix / "report", "eval distill")
        rows.append(Row(f"distill-k{k}", prefix))
    return rows
