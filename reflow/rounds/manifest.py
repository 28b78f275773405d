"""RUN/manifest.json: the recipe of a run, and per stage its output, status and the time it took.

A stage's record is "running" while it runs (its wall and CPU seconds so far, rewritten as it goes), then
"done". A run killed in a stage leaves the running record, and the rerun that resumes the stage adds its
own time to it, so a stage's time counts every run that worked on it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from reflow.errors import ReflowError
from reflow.folders.io import atomic_write_json
from reflow.rounds.recipe import Recipe
from reflow.version import __version__


class Manifest:
    """A run's manifest, read back when it exists (and refused when another recipe made it), else started."""

    def __init__(self, run: Path, recipe: Recipe):
        self.path = run / "manifest.json"
        if self.path.is_file():
            self.data = json.loads(self.path.read_text())
            if self.data.get("recipe_digest") != recipe.digest():
                raise ReflowError(f"{run} was made with another recipe; rerun with the same recipe or pick a new --out")
        else:
            self.data = {
                "reflow_version": __version__,
                "recipe": recipe.as_dict(),
                "recipe_digest": recipe.digest(),
                "stages": {},
                "complete": False,
            }
            self.save()

    @classmethod
    def open(cls, run: Path, recipe: Recipe, state: Any) -> Manifest:
        """The main process reads or starts it; then every other process reads what the main process wrote
        (``state``: accelerate's PartialState)."""
        manifest = cls(run, recipe) if state.is_main_process else None
        state.wait_for_everyone()
        return cls(run, recipe) if manifest is None else manifest

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def done(self, stage: str) -> bool:
        return self.data["stages"].get(stage, {}).get("status") == "done"

    def spent(self, stage: str) -> tuple[float, float] | None:
        """The (wall, CPU) seconds killed runs spent on ``stage`` so far, or None when none was recorded."""
        rec = self.data["stages"].get(stage, {})
        if rec.get("status") != "running":
            return None
        return float(rec["wall_seconds"]), float(rec["cpu_seconds"])

    def running(self, stage: str, output: Path, wall: float, cpu: float) -> None:
        """``stage`` is running and has taken ``wall`` and ``cpu`` seconds so far (earlier runs of it included)."""
        self.data["stages"][stage] = {
            "status": "running",
            "output": str(output),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
        }
        self.save()

    def record(self, stage: str, output: Path, wall: float | None, cpu: float | None, **info: Any) -> None:
        """``stage`` is done: its output, wall and CPU seconds over every run that worked on it (None: finished
        by a run killed before it recorded any) and what else the stage reports."""
        self.data["stages"][stage] = {
            "status": "done",
            "output": str(output),
            "wall_seconds": wall,
            "cpu_seconds": cpu,
            **info,
        }
        self.save()

    def stages_under(self, prefix: str) -> dict[str, Any]:
        """The records of the stages whose names start with ``prefix`` (``round-2/``)."""
        return {name: record for name, record in self.data["stages"].items() if name.startswith(prefix)}

    def complete(self, report: Path) -> None:
        """Every stage is done; ``report`` holds the table across rounds."""
        self.data["complete"] = True
        self.data["report"] = str(report)
        self.save()
