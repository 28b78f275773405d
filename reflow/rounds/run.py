"""Iterated reflow from one recipe (:mod:`reflow.rounds.recipe`): teacher -> pairs -> student -> report, round
after round, then the distilled students and one table across them all.

Layout of RUN: ``round-k/{pairs, student, report, manifest.json}`` (round 1 from data has no pairs),
``heldout/`` (the starting teacher's held-out pairs; from data, 1-RF's with the [pairs] solver),
``teacher/report`` (a checkpoint teacher at its own solver's NFEs), ``distill/{student, report}``
(``distill-kK/`` per K for a list of k), ``report/`` (one table across rounds) and ``manifest.json``. The
student of round k is the teacher of round k + 1. Every stage writes its output atomically or resumes
itself (pairs by shard, training from its last checkpoint), so a run killed at any point and rerun with
the same command skips what is finished and resumes what is not (:mod:`reflow.rounds.stages`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reflow.core.progress import Progress
from reflow.eval import Evaluation, write_report
from reflow.folders.io import claim_output, mark_output
from reflow.folders.prompts import read_prompts
from reflow.folders.runtime import partial_state
from reflow.rounds.manifest import Manifest
from reflow.rounds.recipe import Recipe
from reflow.rounds.stages import Row, RunContext, RunProgress, plan_run, run_stage


def run_rounds(
    recipe: Recipe | str | Path,
    out: str | Path,
    *,
    device: Any = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Run (or resume) a recipe into ``out``; returns the metrics of the table across rounds
    (``out/report/metrics.json``). ``progress`` receives :class:`reflow.core.progress.Update` s named after
    the stages (``round-1/pairs``, ``round-1/student``, ``round-1/report``, ...), each with its place in
    the run and the fraction of the run's estimated work done."""
    if not isinstance(recipe, Recipe):
        recipe = Recipe.from_toml(recipe)
    run, state = Path(out), partial_state()
    _claim(run, recipe, state)
    manifest = Manifest.open(run, recipe, state)
    prompts = None if recipe.pairs.prompts is None else read_prompts(recipe.pairs.prompts)
    ctx = RunContext(run, recipe, manifest, state, device=device, prompts=prompts)
    # The starting teacher's held-out pairs (fidelity of every round to it) and its own report, then
    # each round's pairs, student and report, then the distilled students.
    stages, rows = plan_run(ctx)
    ctx.tracker = RunProgress(progress, [stage.cost for stage in stages])
    for index, stage in enumerate(stages):
        run_stage(ctx, stage, index)
    return _write_table(ctx, rows)


def _claim(run: Path, recipe: Recipe, state: Any) -> None:
    """Use ``run`` only when it is new or a run of ours (its marker; manifest.json before markers)."""
    if state.is_main_process:
        inputs = [recipe.teacher.checkpoint, recipe.teacher.data]
        claim_output(run, "rounds", inputs=[i for i in inputs if i and Path(i).exists()], legacy=("manifest.json",))
        run.mkdir(parents=True, exist_ok=True)
        mark_output(run, "rounds", recipe=recipe.name)
    state.wait_for_everyone()


def _write_table(ctx: RunContext, rows: list[Row]) -> dict[str, Any]:
    """RUN/report: one table across the rows' reports; the manifest then records the run complete."""
    table = ctx.run / "report"
    if ctx.state.is_main_process:
        names, prefixes = [row.name for row in rows], [row.prefix for row in rows]
        reports = [ctx.run / prefix / "report" for prefix in prefixes]
        combined = combine_reports(reports, names, ctx.manifest.data, prefixes)
        write_report(table, Evaluation(metrics=combined, pictures={"models": {}}))
        ctx.manifest.complete(table)
    ctx.state.wait_for_everyone()
    return json.loads((table / "metrics.json").read_text())


def combine_reports(
    reports: list[Path], names: list[str], manifest: dict[str, Any], prefixes: list[str] | None = None
) -> dict[str, Any]:
    """One table across rounds from the per-round reports (same noise, reference and held-out pairs), each
    model renamed after its round, with ``cpu_minutes``: the CPU time spent making it (pairs and training
    of its round and of every round before it; a distilled student adds its own distillation to the
    rounds', not another distillation's; None for the starting teacher or when a stage was finished by a
    run that was killed before it could record its time). ``prefixes``: each row's stage-name prefix in
    the manifest (default: its name; "distill" for a row named distill-kK)."""
    if prefixes is None:
        prefixes = ["distill" if n.startswith("distill") else n for n in names]
    combined: dict[str, Any] | None = None
    rounds_spent: float | None = 0.0
    for report, name, prefix in zip(reports, names, prefixes, strict=True):
        metrics = json.loads((report / "metrics.json").read_text())
        model = dict(metrics["models"][0], name=name)
        if name == "teacher":
            model["cpu_minutes"] = None
        else:
            spent = [
                s.get("cpu_seconds")
                for n, s in manifest["stages"].items()
                if n.startswith(f"{prefix}/") and not n.endswith("/report")
            ]
            total = None if rounds_spent is None or None in spent else rounds_spent + sum(spent) / 60
            if not name.startswith("distill"):
                rounds_spent = total
            model["cpu_minutes"] = total
        if combined is None:
            combined = {k: v for k, v in metrics.items() if k not in ("models", "figures")}
            combined["models"] = []
        combined["models"].append(model)
    assert combined is not None
    return combined
