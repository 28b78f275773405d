"""Rounds: a recipe of teacher -> pairs -> student -> report, iterated; the quickstart."""

from reflow.rounds.quickstart import run_quickstart
from reflow.rounds.recipe import Recipe
from reflow.rounds.run import combine_reports, run_rounds

__all__ = ["Recipe", "combine_reports", "run_quickstart", "run_rounds"]
