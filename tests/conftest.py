"""Shared test setup: thread counts, offline Hugging Face, the tiny 2-D flow fixture.

How the numerical tolerances are chosen (float32: ``c * eps32 * max|values| * steps``; exact comparisons only for
the same batch, kernels and thread count on both sides), how to run the fast and the slow suite, and the thread-count
notes: tests/README.md. The tolerance helpers are in tests/helpers.py (f32_tol, f32_atol, assert_f32_close).

Threads: torch runs ``REFLOW_TEST_THREADS`` threads (default 1), and subprocesses (torchrun, kill tests) get
``OMP_NUM_THREADS`` from the environment, or the same count when it is unset. The suite passes at any count; one
is fastest for these tiny models, as on a busy 2-core machine OpenMP barriers between two threads cost more than
the arithmetic.
"""

import sys
from pathlib import Path

# Tests live in one folder per package (tests/core, tests/pairs, ...), as the code does; the helpers they share
# (helpers.py, ddpm_helpers.py, tiny_sd.py) stay here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import os

from helpers import threads_for_tests

THREADS = threads_for_tests()
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_flow(tmp_path_factory):
    """A tiny 2-D flow model trained for a few steps through the real training code."""
    from reflow.student import TrainConfig, train

    out = tmp_path_factory.mktemp("models") / "tiny-1rf"
    train(
        TrainConfig(
            out=str(out),
            data="checkerboard",
            max_steps=30,
            batch_size=64,
            hidden_dim=32,
            num_layers=2,
            time_embed_dim=16,
            checkpoint_every=1000,
            log_every=10,
        )
    )
    return out
