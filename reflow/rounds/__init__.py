"""Rounds: a recipe of teacher -> pairs -> student -> report, iterated; the quickstart."""

from reflow.rounds.quickstart import run_quickstart
from reflow.rounds.run import Recipe, run_rounds

__all__ = ["Recipe", "run_quickstart", "run_rounds"]
