"""Process and device setup shared by every stage (Accelerate)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def accelerator_available() -> bool:
    """True when torch sees a GPU-like accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    if hasattr(torch, "accelerator"):
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def use_cpu() -> bool:
    """Run on the CPU when there is no accelerator. Accelerate needs this flag to set up a multi-process
    CPU (gloo) group under torchrun / accelerate launch; without it each process would run alone."""
    return not accelerator_available()


def partial_state():
    """Accelerate's process state (rank, world size, device) for stages that are not training."""
    from accelerate import PartialState

    return PartialState(cpu=use_cpu())


@contextlib.contextmanager
def quiet_datasets() -> Iterator[None]:
    """Silence datasets' progress bars inside library calls (the library never prints)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()
