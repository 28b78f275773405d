import numpy as np
import pytest
import torch
from helpers import F32_C_ELEMENTWISE, f32_tol

from reflow.errors import ReflowError
from reflow.folders.data import BUILTINS, load_source


@pytest.mark.parametrize("name", BUILTINS)
def test_builtins(name):
    src = load_source(name)
    x = src.sample(500, torch.Generator().manual_seed(0))
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert tuple(x.shape[1:]) == src.sample_shape
    again = src.sample(500, torch.Generator().manual_seed(0))
    assert torch.equal(x, again)


def test_checkerboard_occupies_alternate_squares():
    x = load_source("checkerboard").sample(20_000, torch.Generator().manual_seed(0))
    assert x.abs().max() <= 2
    parity = (torch.floor(x[:, 0]) + torch.floor(x[:, 1])).remainder(2)
    assert torch.all(parity == parity[0])


def test_digits_range_and_shape():
    src = load_source("digits")
    assert src.sample_shape == (1, 8, 8) and len(src.data) == 1797
    assert src.data.min() == -1 and src.data.max() == 1


def test_npy_and_datasets_folder(tmp_path):
    import datasets

    arr = np.random.default_rng(0).normal(size=(50, 3)).astype(np.float32)
    np.save(tmp_path / "x.npy", arr)
    src = load_source(str(tmp_path / "x.npy"))
    assert src.sample_shape == (3,) and torch.equal(src.data, torch.from_numpy(arr))
    datasets.Dataset.from_dict({"x": arr}).save_to_disk(str(tmp_path / "ds"))
    src = load_source(str(tmp_path / "ds"))
    np.testing.assert_array_equal(src.data.numpy(), arr)
    assert len(src.reference(20)) == 20


def test_bad_sources(tmp_path):
    with pytest.raises(ReflowError, match="no such file"):
        load_source(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "flat.npy", np.zeros(5))
    with pytest.raises(ReflowError, match="shape"):
        load_source(str(tmp_path / "flat.npy"))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ReflowError, match="numeric"):
        load_source(str(tmp_path / "obj.npy"))
    with pytest.raises(ReflowError, match="unknown data source"):
        load_source("swissroll")
    (tmp_path / "notds").mkdir()
    with pytest.raises(ReflowError, match="save_to_disk"):
        load_source(str(tmp_path / "notds"))


def test_image_folder_dataset_and_pairs_folder_as_source(tmp_path):
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(6, 4, 5), dtype=np.uint8)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(p, mode="L") for p in pixels], "y": list(range(6))})
    ds = ds.cast_column("image", datasets.Image())
    ds.save_to_disk(str(tmp_path / "imgs"))
    src = load_source(str(tmp_path / "imgs"))
    assert src.sample_shape == (1, 4, 5)
    # float32 against float64: a few roundings of values in [-1, 1]; /128 for /127.5 would be 8e-3 off
    np.testing.assert_allclose(src.data.numpy()[:, 0], pixels / 127.5 - 1, **f32_tol(1.0, c=F32_C_ELEMENTWISE))
    # A pairs folder is a source of its z1 column (e.g. the teacher's samples as a reference).
    z = rng.normal(size=(7, 2)).astype(np.float32)
    datasets.Dataset.from_dict({"z0": z * 0, "z1": z, "index": np.arange(7)}).save_to_disk(str(tmp_path / "pairs"))
    np.testing.assert_array_equal(load_source(str(tmp_path / "pairs")).data.numpy(), z)
