import os

# Tiny models: one thread is fastest, and on a busy 2-core machine OpenMP barriers between two
# threads cost more than the arithmetic. Subprocesses (torchrun, kill tests) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_flow(tmp_path_factory):
    """A tiny 2-D flow model trained for a few steps through the real training code."""
    from reflow.training import TrainConfig, train

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
