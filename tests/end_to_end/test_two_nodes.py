"""Two nodes simulated on this machine (two `torchrun --nnodes 2 --nproc_per_node 1` launches that meet on
localhost, as a cluster's two hosts would): generate and train give what one process gives. Each node's
process is its node's local main, so anything done "once per node" would happen twice here."""

import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
from helpers import assert_f32_close, free_port
from safetensors.torch import load_file

BIN = os.path.dirname(sys.executable)


def two_nodes(*args, timeout=300):
    """``reflow ARGS`` as two torchrun nodes of one process each; both must exit 0."""
    port = free_port()
    launches = [
        subprocess.Popen(
            [
                os.path.join(BIN, "torchrun"),
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
                os.path.join(BIN, "reflow"),
                *map(str, args),
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=timeout) for p in launches]
    for p, (out, err) in zip(launches, outputs, strict=True):
        assert p.returncode == 0, (out + err)[-3000:]
    return outputs


def one_process(*args):
    r = subprocess.run([os.path.join(BIN, "reflow"), *map(str, args)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # torchrun: runs in CI's second step (pytest -m slow)
def test_two_nodes_generate_the_same_pairs_and_train_the_same_weights(tiny_flow, tmp_path):
    gen = ("generate", "--teacher", tiny_flow, "--num-pairs", 200, "--nfe", 4, "--batch-size", 32, "--shard-size", 64)
    one_process(*gen, "--out", tmp_path / "p1")
    two_nodes(*gen, "--out", tmp_path / "p2")
    a = datasets.load_from_disk(str(tmp_path / "p1")).with_format("numpy")[:]
    b = datasets.load_from_disk(str(tmp_path / "p2")).with_format("numpy")[:]
    assert a.keys() == b.keys()
    for column in a:
        np.testing.assert_array_equal(np.asarray(a[column]), np.asarray(b[column]))  # bit for bit

    cfg = tmp_path / "tiny.toml"
    cfg.write_text("hidden_dim = 32\nnum_layers = 2\ntime_embed_dim = 16\nema_decay = 0.5\nlog_with = 'none'\n")
    train = ("train", "--pairs", tmp_path / "p1", "--init", tiny_flow, "--max-steps", 12, "--batch-size", 64)
    one_process(*train, "--config", cfg, "--out", tmp_path / "m1")
    outputs = two_nodes(*train, "--config", cfg, "--out", tmp_path / "m2")
    w1 = load_file(tmp_path / "m1" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(tmp_path / "m2" / "diffusion_pytorch_model.safetensors")
    for k in w1:
        assert_f32_close(w2[k], w1[k], steps=12)  # the all-reduce sums in another order
    # one result line in all: the second node's process is its node's local main, not the job's main
    assert sum("wrote" in out for out, _ in outputs) == 1


RECIPE = """
name = "two-nodes"
rounds = 2
[teacher]
data = "moons"
[pairs]
num_pairs = 256
solver = "euler"
nfe = 4
batch_size = 64
[train]
max_steps = 8
batch_size = 64
hidden_dim = 32
num_layers = 2
time_embed_dim = 16
checkpoint_every = 4
log_with = "none"
[eval]
nfes = [1]
num_samples = 128
seeds = [1]
diagnostics_samples = 32
"""


@pytest.mark.slow  # torchrun: runs in CI's second step (pytest -m slow)
def test_rounds_on_two_nodes_equal_one_process(tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    one_process("rounds", "--config", recipe, "--out", tmp_path / "one")
    two_nodes("rounds", "--config", recipe, "--out", tmp_path / "two", timeout=600)
    a = datasets.load_from_disk(str(tmp_path / "one" / "round-2" / "pairs")).with_format("numpy")[:]
    b = datasets.load_from_disk(str(tmp_path / "two" / "round-2" / "pairs")).with_format("numpy")[:]
    # round 2's teacher is round 1's student, whose weights two nodes sum in another order (last bits)
    np.testing.assert_array_equal(a["index"], b["index"])
    assert_f32_close(b["z1"], a["z1"], steps=8 * 4)
    for model in ("round-1/student", "round-2/student"):
        w1, w2 = (load_file(tmp_path / run / model / "diffusion_pytorch_model.safetensors") for run in ("one", "two"))
        for k in w1:
            assert_f32_close(w2[k], w1[k], steps=8)
