"""--pairs-in-memory: pairs read into contiguous tensors or streamed from the Arrow files give the same rows."""

import types

import numpy as np
import pytest
import torch

import reflow.pairs.reader as reader_module
from reflow.errors import ReflowError
from reflow.pairs import PairsReader, generate_pairs
from reflow.teachers import FlowTeacher


@pytest.fixture(scope="module")
def pairs(tiny_flow, tmp_path_factory):
    """Pairs in several Arrow chunks (shards of 64), with and without z0 stored."""
    root = tmp_path_factory.mktemp("memory")
    kw = dict(seed=3, batch_size=32, shard_size=64, dtype="float16")
    return {
        stored: generate_pairs(FlowTeacher(tiny_flow, nfe=2), root / str(stored), 203, store_z0=stored, **kw)
        for stored in (True, False)
    }


@pytest.mark.parametrize("stored", [True, False])
def test_memory_and_streaming_give_the_same_batches(pairs, stored):
    memory, stream = PairsReader(pairs[stored], in_memory="yes"), PairsReader(pairs[stored], in_memory="no")
    assert memory.in_memory and not stream.in_memory and stream._views is not None
    assert memory._memory["z1"].is_contiguous() and memory._memory["z0"].shape == (203, 2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(0, 203, (64,), generator=g)
        for a, b in zip(memory.batch(idx)[:2], stream.batch(idx)[:2], strict=True):
            assert a.dtype == b.dtype == torch.float32
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # max_rows and the filter keep the same rows either way
    m = PairsReader(pairs[stored], max_rows=100, drop_farthest=0.3, in_memory="yes")
    s = PairsReader(pairs[stored], max_rows=100, drop_farthest=0.3, in_memory="no")
    assert len(m) == len(s) == 70 and m._memory["z0"].shape == (70, 2)
    idx = torch.tensor([69, 0, 3, 3])
    torch.testing.assert_close(m.batch(idx)[1], s.batch(idx)[1], rtol=0, atol=0)


def test_auto_reads_into_memory_what_fits_the_budget(pairs, monkeypatch):
    need = PairsReader(pairs[False], in_memory="no").memory_bytes()
    assert need == 203 * 2 * 2 * 4  # float32 z0 and z1, whatever the storage dtype
    monkeypatch.setattr(reader_module, "memory_budget", lambda: need)
    assert PairsReader(pairs[False]).in_memory
    monkeypatch.setattr(reader_module, "memory_budget", lambda: need - 1)
    assert not PairsReader(pairs[False]).in_memory


def test_the_budget_is_a_quarter_of_the_available_memory_per_local_process(monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=8 * 2**30))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert reader_module.memory_budget() == 2 * 2**30
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert reader_module.memory_budget() == 2**29


def test_yes_is_refused_when_the_pairs_do_not_fit_and_bad_values_are_refused(pairs, monkeypatch):
    import psutil

    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=1000))
    with pytest.raises(ReflowError, match="--pairs-in-memory yes: .* more than the .* available; use auto or no"):
        PairsReader(pairs[True], in_memory="yes")
    assert not PairsReader(pairs[True]).in_memory  # auto streams instead
    with pytest.raises(ReflowError, match="--pairs-in-memory must be one of auto, yes, no"):
        PairsReader(pairs[True], in_memory="maybe")


def test_streaming_rebuilds_z0_per_batch_in_order(pairs):
    stream = PairsReader(pairs[False], in_memory="no")
    idx = np.array([202, 7, 7, 64])
    from reflow.core.noise import row_noise

    torch.testing.assert_close(stream.batch(torch.from_numpy(idx))[0], row_noise(3, idx, (2,)), rtol=0, atol=0)
