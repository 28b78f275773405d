"""Evaluation: few-step quality in data and feature spaces, fidelity to the teacher, straightness, reports;
and drawing samples from any model folder."""

from reflow.eval.evaluate import EvalSettings, evaluate
from reflow.eval.report import write_report

__all__ = ["EvalSettings", "evaluate", "write_report"]
