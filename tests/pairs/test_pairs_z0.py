"""z0 not stored by default: every reader rebuilds it from (seed, index), bit for bit the noise the teacher was
fed, checked against the z0 a --store-z0 run of the same seed stores; old folders (with z0) read unchanged."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from helpers import cli_ok

from reflow.core.noise import row_noise
from reflow.errors import ReflowError
from reflow.pairs import PairsReader, generate_pairs, load_pairs, verify_pairs, with_z0, z0_of
from reflow.teachers import FlowTeacher


def columns(path):
    return datasets.load_from_disk(str(path)).with_format("numpy")[:]


@pytest.fixture(scope="module", params=["float32", "float16"])
def both(request, tiny_flow, tmp_path_factory):
    """The same pairs (seed 5, 3 shards) made with z0 stored and without, in float32 or float16."""
    root, dtype = tmp_path_factory.mktemp(f"z0-{request.param}"), request.param
    kw = dict(seed=5, batch_size=64, shard_size=128, dtype=dtype)
    stored = generate_pairs(FlowTeacher(tiny_flow, nfe=4), root / "stored", 300, store_z0=True, **kw)
    rebuilt = generate_pairs(FlowTeacher(tiny_flow, nfe=4), root / "rebuilt", 300, **kw)
    return stored, rebuilt, dtype


def test_z0_is_not_stored_by_default_and_the_record_says_so(both):
    stored, rebuilt, dtype = both
    assert list(columns(rebuilt)) == ["z1", "index"] and list(columns(stored)) == ["z0", "z1", "index"]
    for path, flag in ((stored, True), (rebuilt, False)):
        assert json.loads((path / "reflow_pairs.json").read_text())["store_z0"] is flag
        assert json.loads(datasets.load_from_disk(str(path)).info.description)["store_z0"] is flag
    assert "rebuilt from (seed, index), not stored" in (rebuilt / "README.md").read_text()
    assert "with_z0" in (rebuilt / "README.md").read_text()
    # the teacher saw the same noise: the same z1, bit for bit
    np.testing.assert_array_equal(columns(stored)["z1"], columns(rebuilt)["z1"])
    # without z0, a row costs z1 and the index only
    size = {p: sum(f.stat().st_size for f in p.glob("*.arrow")) for p in (stored, rebuilt)}
    per_value = 4 if dtype == "float32" else 2
    assert size[stored] - size[rebuilt] >= 300 * 2 * per_value


def test_every_reader_rebuilds_the_z0_the_teacher_was_fed(both):
    stored, rebuilt, dtype = both
    z0_stored = columns(stored)["z0"]  # what the teacher was fed, rounded to the storage dtype
    teacher_input = row_noise(5, range(300), (2,))  # exactly what the teacher was fed (float32)
    rebuilt_z0 = {
        "load_pairs": load_pairs(rebuilt).z0,
        "with_z0": with_z0(datasets.load_from_disk(str(rebuilt)))[:]["z0"],
        "z0_of": z0_of(json.loads((rebuilt / "reflow_pairs.json").read_text()), range(300)),
        "reader yes": PairsReader(rebuilt, in_memory="yes").batch(torch.arange(300))[0],
        "reader no": PairsReader(rebuilt, in_memory="no").batch(torch.arange(300))[0],
    }
    for name, z0 in rebuilt_z0.items():
        assert z0.dtype == torch.float32, name
        torch.testing.assert_close(z0, teacher_input, rtol=0, atol=0, msg=name)
        np.testing.assert_array_equal(z0.numpy().astype(dtype), z0_stored, err_msg=name)
    if dtype == "float32":  # stored exactly: rebuilding changes nothing
        np.testing.assert_array_equal(teacher_input.numpy(), z0_stored)
    else:  # stored rounded to float16: rebuilding gives back the unrounded noise (|diff| <= half an fp16 ulp)
        diff = np.abs(teacher_input.numpy() - z0_stored.astype(np.float32))
        assert 0 < diff.max() <= 2.0**-11 * np.abs(teacher_input.numpy()).max()
    # with z0 stored, the readers read it as stored (a float16 z0 rounded, as before)
    np.testing.assert_array_equal(load_pairs(stored).z0.numpy(), z0_stored.astype(np.float32))
    np.testing.assert_array_equal(PairsReader(stored).batch(torch.arange(300))[0].numpy(), z0_stored.astype(np.float32))


def test_with_z0_rows_slices_and_an_explicit_seed(both):
    stored, rebuilt, _ = both
    pairs = with_z0(datasets.load_from_disk(str(rebuilt)))
    row = pairs[7]
    assert set(row) == {"z0", "z1", "index"} and row["z0"].shape == (2,) and int(row["index"]) == 7
    torch.testing.assert_close(row["z0"], row_noise(5, [7], (2,))[0], rtol=0, atol=0)
    sliced = pairs[10:13]
    torch.testing.assert_close(sliced["z0"], row_noise(5, [10, 11, 12], (2,)), rtol=0, atol=0)
    plain = datasets.load_from_disk(str(stored))
    assert with_z0(plain)[3]["z0"].shape == (2,)  # stored: read as it is
    other = with_z0(datasets.load_from_disk(str(rebuilt)), seed=6)[:2]["z0"]
    torch.testing.assert_close(other, row_noise(6, [0, 1], (2,)), rtol=0, atol=0)


def test_verify_pairs_rebuilds_z0_and_reports_it(both, tmp_path):
    stored, rebuilt, dtype = both
    tol = 1e-4 if dtype == "float32" else 2e-3
    report = verify_pairs(rebuilt, rows=8)
    assert report["z0_stored"] is False and report["max_abs_diff_z0"] is None and report["max_abs_diff_z1"] <= tol
    report = verify_pairs(stored, rows=8)
    assert report["z0_stored"] is True and report["max_abs_diff_z0"] == 0
    r = cli_ok("verify-pairs", rebuilt, "--rows", 4)
    assert "not stored (rebuilt)" in r.output and "ok: within" in r.output


def test_old_folders_with_z0_read_unchanged_and_resume_keeps_the_layout(tiny_flow, both, tmp_path):
    stored, _, _ = both
    old = tmp_path / "old"
    shutil.copytree(stored, old)
    record = json.loads((old / "reflow_pairs.json").read_text())
    del record["store_z0"]  # a folder from before z0 became optional
    (old / "reflow_pairs.json").write_text(json.dumps(record))
    np.testing.assert_array_equal(load_pairs(old).z0.numpy(), load_pairs(stored).z0.numpy())
    assert PairsReader(old).z0_stored
    # such a folder stored z0: rerunning it without --store-z0 is refused, with it, it is complete
    teacher, kw = FlowTeacher(tiny_flow, nfe=4), dict(seed=5, batch_size=64, shard_size=128, dtype=record["dtype"])
    with pytest.raises(ReflowError, match="store_z0: recorded true, now false"):
        generate_pairs(teacher, old, 300, **kw)
    assert generate_pairs(teacher, old, 300, store_z0=True, **kw) == old


def test_pairs_without_z0_need_an_index_and_a_seed(tmp_path):
    z1 = np.zeros((4, 2), dtype=np.float32)
    datasets.Dataset.from_dict({"z1": z1}).save_to_disk(str(tmp_path / "noindex"))
    with pytest.raises(ReflowError, match="neither a z0 column nor an index"):
        load_pairs(tmp_path / "noindex")
    datasets.Dataset.from_dict({"z1": z1, "index": np.arange(4)}).save_to_disk(str(tmp_path / "noseed"))
    for read in (load_pairs, PairsReader):
        with pytest.raises(ReflowError, match="no valid noise seed"):
            read(tmp_path / "noseed")
    with pytest.raises(ReflowError, match="no valid noise seed"):
        with_z0(datasets.load_from_disk(str(tmp_path / "noseed")))
    ds = datasets.Dataset.from_dict({"z1": z1, "index": np.arange(4)})
    ds.info.description = json.dumps({"seed": 3})
    ds.save_to_disk(str(tmp_path / "seeded"))  # made by hand, with a seed: z0 rebuilt from it
    torch.testing.assert_close(load_pairs(tmp_path / "seeded").z0, row_noise(3, range(4), (2,)), rtol=0, atol=0)


def test_class_conditional_pairs_without_z0(tmp_path):
    from ddpm_helpers import save, tiny_unet
    from diffusers import DDPMScheduler

    from reflow.teachers import load_teacher

    folder = save(tmp_path, "cond", tiny_unet(num_class_embeds=10), DDPMScheduler(clip_sample=True))
    teacher = load_teacher(folder, nfe=2, solver="ddim")
    kw = dict(seed=7, batch_size=16, labels=[2, 5])
    with_stored = generate_pairs(teacher, tmp_path / "stored", 24, store_z0=True, **kw)
    rebuilt = generate_pairs(teacher, tmp_path / "rebuilt", 24, **kw)
    idx = torch.tensor([23, 0, 5, 5])
    for mode in ("yes", "no"):
        z0, z1, cond = PairsReader(rebuilt, in_memory=mode).batch(idx)
        z0s, z1s, conds = PairsReader(with_stored, in_memory=mode).batch(idx)
        assert torch.equal(z0, z0s) and torch.equal(z1, z1s)  # float32: the stored z0 is the teacher's input
        assert torch.equal(cond["class_labels"], conds["class_labels"])
    rows = with_z0(datasets.load_from_disk(str(rebuilt)))[:]
    assert set(rows["label"].tolist()) <= {2, 5} and rows["z0"].shape == (24, 1, 8, 8)
