"""row_noise / row_labels against the contract written out with a fresh Philox per row."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from reflow.core.noise import MAX_INDEX, MAX_SEED, row_labels, row_noise


def reference_noise(seed, indices, shape):
    return np.stack(
        [
            np.random.Generator(np.random.Philox(key=(seed << 64) | int(i))).standard_normal(shape, dtype=np.float32)
            for i in indices
        ]
    )


def reference_labels(seed, indices, choices):
    out = []
    for i in indices:
        rng = np.random.Generator(np.random.Philox(key=(seed << 64) | int(i), counter=[0, 0, 0, 1]))
        out.append(choices[int(rng.integers(len(choices)))])
    return np.array(out, dtype=np.int64)


SEEDS = [0, 1, 7, 12345, MAX_SEED]
INDICES = [0, 1, 2, 3, 1000, 2**32 - 1, 2**32, 2**62 + 17, MAX_INDEX]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("shape", [(2,), (1, 8, 8), (3, 5, 7), (4, 1, 2, 3)])
def test_row_noise_is_the_fresh_philox_contract_bit_for_bit(seed, shape):
    got = row_noise(seed, INDICES, shape)
    assert got.dtype == torch.float32 and got.shape == (len(INDICES), *shape)
    np.testing.assert_array_equal(got.numpy(), reference_noise(seed, INDICES, shape))


def test_row_noise_many_rows_and_containers():
    # Enough values that the ziggurat's slow paths (rejections, the tail) are taken many times.
    shape = (3, 16, 16)
    ref = reference_noise(3, range(300), shape)
    np.testing.assert_array_equal(row_noise(3, range(300), shape).numpy(), ref)
    picks = [299, 5, 5, 0, 17]
    for container in (picks, torch.tensor(picks), np.array(picks), tuple(picks)):
        np.testing.assert_array_equal(row_noise(3, container, shape).numpy(), ref[picks])


def test_row_noise_edge_shapes():
    assert row_noise(0, [], (1, 8, 8)).shape == (0, 1, 8, 8)
    assert row_noise(0, [3, 4], (0, 2)).shape == (2, 0, 2)
    scalar = row_noise(9, [3, 4], ())
    assert scalar.shape == (2,)
    np.testing.assert_array_equal(scalar.numpy(), [reference_noise(9, [i], ())[0] for i in (3, 4)])


def test_row_noise_is_thread_safe():
    shape = (1, 8, 8)
    ref = row_noise(11, range(512), shape)
    with ThreadPoolExecutor(max_workers=4) as pool:
        outs = list(pool.map(lambda b: row_noise(11, range(b, b + 64), shape), range(0, 512, 64)))
    torch.testing.assert_close(torch.cat(outs), ref, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 5, MAX_SEED])
def test_row_labels_is_the_fresh_philox_contract(seed):
    choices = [0, 3, 4, 9]
    got = row_labels(seed, INDICES + list(range(200)), choices)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), reference_labels(seed, INDICES + list(range(200)), choices))
    assert row_labels(seed, [], choices).shape == (0,)


def test_bad_seed_and_index():
    with pytest.raises(ValueError, match="seed"):
        row_noise(-1, [0], (2,))
    with pytest.raises(ValueError, match="seed"):
        row_noise(MAX_SEED + 1, [0], (2,))
    with pytest.raises(ValueError, match="row index"):
        row_noise(0, [0, -1], (2,))
    with pytest.raises(ValueError, match="row index"):
        row_noise(0, [MAX_INDEX + 1], (2,))
    with pytest.raises(ValueError, match="row index"):
        row_labels(0, [-3], [0, 1])
    with pytest.raises(ValueError, match="choices"):
        row_labels(0, [0], [])
