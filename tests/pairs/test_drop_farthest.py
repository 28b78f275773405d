"""--drop-farthest: the fraction of pairs with the largest |z1 - z0| left out, decided once, recorded."""

import datasets
import numpy as np
import pytest
import torch

from reflow.errors import ReflowError
from reflow.pairs import PairsReader, generate_pairs, with_z0
from reflow.teachers import FlowTeacher


@pytest.fixture(scope="module")
def pairs(tiny_flow, tmp_path_factory):
    out = tmp_path_factory.mktemp("drop") / "pairs"
    return generate_pairs(FlowTeacher(tiny_flow, nfe=2), out, 203, batch_size=64, shard_size=64)


def stored(pairs):
    ds = with_z0(datasets.load_from_disk(str(pairs)))[:]  # z0 rebuilt from (seed, index)
    return ds["z0"].numpy(), ds["z1"].numpy()


@pytest.mark.parametrize("in_memory", ["yes", "no"])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_the_farthest_rows_are_dropped_and_the_rest_kept_in_order(pairs, fraction, in_memory):
    z0, z1 = stored(pairs)
    # independent: numpy's norm in float64, the kept rows are the (1 - fraction) nearest
    distance = np.linalg.norm((z1.astype(np.float64) - z0.astype(np.float64)).reshape(len(z0), -1), axis=1)
    dropped = int(np.floor(fraction * len(z0)))
    keep = np.sort(np.argsort(distance, kind="stable")[: len(z0) - dropped])
    reader = PairsReader(pairs, drop_farthest=fraction, in_memory=in_memory)
    assert len(reader) == len(keep) and reader.in_memory == (in_memory == "yes")
    a, b, cond = reader.batch(torch.arange(len(reader)))
    np.testing.assert_array_equal(a.numpy(), z0[keep])
    np.testing.assert_array_equal(b.numpy(), z1[keep])
    assert distance[keep].max() <= np.delete(distance, keep).min()
    record = reader.provenance["pair_filter"]
    assert record["dropped"] == dropped and record["kept"] == len(keep) and record["drop_farthest"] == fraction
    assert record["max_kept_distance"] == pytest.approx(distance[keep].max(), rel=1e-12)


def test_the_filter_applies_after_max_pairs_and_is_deterministic(pairs):
    z0, z1 = stored(pairs)
    first = PairsReader(pairs, max_rows=100, drop_farthest=0.2)
    second = PairsReader(pairs, max_rows=100, drop_farthest=0.2)
    assert len(first) == 80
    np.testing.assert_array_equal(first._keep, second._keep)
    assert first._keep.max() < 100
    idx = torch.tensor([79, 0, 3, 3])
    np.testing.assert_array_equal(first.batch(idx)[1].numpy(), z1[first._keep[idx.numpy()]])
    assert "pair_filter" not in PairsReader(pairs).provenance  # no filter, nothing recorded


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_a_fraction_outside_0_1_is_refused(pairs, fraction):
    with pytest.raises(ReflowError, match="--drop-farthest must be in"):
        PairsReader(pairs, drop_farthest=fraction)


def test_training_records_the_filter_in_the_model_card(pairs, tmp_path):
    from reflow.student import TrainConfig, train

    tiny = dict(batch_size=32, hidden_dim=16, num_layers=2, time_embed_dim=8, log_with="none")
    train(TrainConfig(out=str(tmp_path / "m"), pairs=str(pairs), max_steps=2, drop_farthest=0.25, **tiny))
    card = (tmp_path / "m" / "README.md").read_text()
    assert '"pair_filter"' in card and '"dropped": 50' in card and '"drop_farthest": 0.25' in card
    with pytest.raises(ReflowError, match="drop-farthest 0.25 \\(now 0.5\\)"):
        train(TrainConfig(out=str(tmp_path / "m"), pairs=str(pairs), max_steps=2, drop_farthest=0.5, **tiny))
    with pytest.raises(ReflowError, match="needs --pairs"):
        train(TrainConfig(out=str(tmp_path / "d"), data="moons", max_steps=2, drop_farthest=0.5, **tiny))
