"""Evaluation: few-step quality in data and feature spaces, fidelity to the teacher, straightness, reports;
and drawing samples from any model folder."""

from reflow.eval.draw import SampleResult, check_sample_output, check_sample_settings, sample, write_samples
from reflow.eval.evaluate import EvalSettings, Evaluation, evaluate
from reflow.eval.report import write_report

__all__ = [
    "EvalSettings",
    "Evaluation",
    "SampleResult",
    "check_sample_output",
    "check_sample_settings",
    "evaluate",
    "sample",
    "write_report",
    "write_samples",
]
