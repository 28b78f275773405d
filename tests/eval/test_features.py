"""The digits feature network (reflow/features.py) and its shipped weights (data/features/digits-cnn)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import f32_tol, f64_tol
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from reflow.errors import ReflowError
from reflow.eval.features import (
    BUNDLED_DIGITS_FEATURES,
    DigitsNet,
    bundled_digits_net,
    classify,
    extract_features,
    load_feature_net,
    save_feature_net,
)
from reflow.folders.data import load_digits_array


@pytest.fixture(scope="module")
def net() -> DigitsNet:
    return load_feature_net(BUNDLED_DIGITS_FEATURES)


@pytest.fixture(scope="module")
def test_split() -> tuple[np.ndarray, np.ndarray]:
    """The held-out 20% of the digits, recomputed exactly as data/train_digits_features.py splits them."""
    images, labels = load_digits_array(), load_digits().target
    _, x_te, _, y_te = train_test_split(images, labels, test_size=0.2, stratify=labels, random_state=0)
    return x_te, y_te


def assert_one_line_reflow_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    for fragment in fragments:
        assert fragment in msg, msg


def test_shipped_net_loads_and_classifies_held_out_digits(net, test_split):
    assert not net.training
    assert net.config() == {"channels": [32, 64], "feature_dim": 64, "num_classes": 10}
    x_te, y_te = test_split
    assert len(x_te) == 360
    pred = classify(net, x_te)
    assert pred.shape == (360,) and np.issubdtype(pred.dtype, np.integer)
    assert (pred == y_te).mean() >= 0.97
    info = json.loads((BUNDLED_DIGITS_FEATURES / "config.json").read_text())["info"]
    assert info["test_accuracy"] >= 0.97 and info["test_size"] == 360 and info["split_seed"] == 0
    assert (BUNDLED_DIGITS_FEATURES / "model.safetensors").stat().st_size < 1_000_000
    card = (BUNDLED_DIGITS_FEATURES / "README.md").read_text()
    assert "train_digits_features.py" in card and "not an Inception network" in card


def test_bundled_digits_net_matches_load_feature_net(net, test_split):
    x = torch.from_numpy(test_split[0][:32])
    with torch.no_grad():
        assert torch.equal(bundled_digits_net()(x), net(x))


def test_extract_features_shape_determinism_and_batching(net, test_split):
    x = test_split[0]
    feats = extract_features(net, x)
    assert feats.shape == (360, 64) and feats.dtype == np.float64 and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, extract_features(net, x))
    # computed in float64: other batch sizes differ by float64 noise (the rule with eps64, tests/README.md)
    np.testing.assert_allclose(extract_features(net, torch.from_numpy(x), batch_size=7), feats, **f64_tol(feats))
    np.testing.assert_allclose(extract_features(net, x, batch_size=1)[:5], feats[:5], **f64_tol(feats))
    assert feats.std(axis=0).max() > 0  # not a collapsed feature space
    # float64 evaluation agrees with the float32 network, and leaves the caller's net untouched.
    with torch.no_grad():
        f32 = net.features(torch.from_numpy(x)).double().numpy()
    np.testing.assert_allclose(feats, f32, **f32_tol(feats))  # one pass of the float32 network
    assert next(net.parameters()).dtype == torch.float32
    np.testing.assert_array_equal(classify(net, x, batch_size=1), classify(net, x))


@pytest.mark.parametrize("shape", [(4, 8, 8), (4, 64), (4, 3, 8, 8), (4, 1, 28, 28), (1, 8, 8)])
def test_wrong_input_shape_is_a_one_line_reflow_error(net, shape):
    images = np.zeros(shape, dtype=np.float32)
    with pytest.raises(ReflowError) as excinfo:
        extract_features(net, images)
    assert_one_line_reflow_error(excinfo, "(N, 1, 8, 8)", str(shape))
    with pytest.raises(ReflowError):
        classify(net, torch.from_numpy(images))


def test_non_numeric_input_is_a_one_line_reflow_error(net):
    with pytest.raises(ReflowError) as excinfo:
        extract_features(net, np.full((2, 1, 8, 8), "x", dtype=object))
    assert_one_line_reflow_error(excinfo, "dtype")


def test_save_load_roundtrip_reproduces_logits(tmp_path):
    torch.manual_seed(0)
    fresh = DigitsNet(channels=(8, 16), feature_dim=12, num_classes=10).eval()
    x = torch.from_numpy(load_digits_array()[:50])
    folder = save_feature_net(fresh, tmp_path / "net", {"note": "roundtrip"})
    loaded = load_feature_net(folder)
    assert not loaded.training and loaded.config() == fresh.config()
    with torch.no_grad():
        assert torch.equal(loaded(x), fresh(x))
    assert extract_features(loaded, x).shape == (50, 12)
    assert json.loads((folder / "config.json").read_text())["info"] == {"note": "roundtrip"}
    # Saving again replaces the folder as a whole and leaves no temporary folders behind.
    save_feature_net(DigitsNet(channels=(8, 16), feature_dim=12), folder, {"note": "second"})
    assert json.loads((folder / "config.json").read_text())["info"] == {"note": "second"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net"]


def test_missing_folder_is_a_one_line_reflow_error(tmp_path):
    with pytest.raises(ReflowError) as excinfo:
        load_feature_net(tmp_path / "nope")
    assert_one_line_reflow_error(excinfo, "not found", "train_digits_features.py")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_missing_file_is_a_one_line_reflow_error(tmp_path, missing):
    folder = tmp_path / "net"
    shutil.copytree(BUNDLED_DIGITS_FEATURES, folder)
    (folder / missing).unlink()
    with pytest.raises(ReflowError) as excinfo:
        load_feature_net(folder)
    assert_one_line_reflow_error(excinfo, missing, "not found", "train_digits_features.py")


def test_pickle_only_folder_is_refused(tmp_path):
    """A folder holding only a pickled .bin state dict is not loaded (safetensors only, never unpickled)."""
    folder = tmp_path / "net"
    folder.mkdir()
    torch.save(DigitsNet().state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ReflowError) as excinfo:
        load_feature_net(folder)
    assert_one_line_reflow_error(excinfo, "model.safetensors not found", "pytorch_model.bin", "train_digits")
    # Even with a config, a .bin is never unpickled; and a pickle renamed to .safetensors is refused too.
    shutil.copy(BUNDLED_DIGITS_FEATURES / "config.json", folder / "config.json")
    with pytest.raises(ReflowError):
        load_feature_net(folder)
    (folder / "pytorch_model.bin").rename(folder / "model.safetensors")
    with pytest.raises(ReflowError) as excinfo:
        load_feature_net(folder)
    assert_one_line_reflow_error(excinfo, "model.safetensors", "train_digits_features.py")


def test_bad_config_is_a_one_line_reflow_error(tmp_path):
    folder = tmp_path / "net"
    shutil.copytree(BUNDLED_DIGITS_FEATURES, folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ReflowError) as excinfo:
        load_feature_net(folder)
    assert_one_line_reflow_error(excinfo, "config.json")
    # A config that disagrees with the weights (other feature_dim) is refused, not half-loaded.
    cfg = {"channels": [32, 64], "feature_dim": 32, "num_classes": 10}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ReflowError) as excinfo:
        load_feature_net(folder)
    assert_one_line_reflow_error(excinfo, "model.safetensors")


def test_module_path_points_into_the_checkout():
    assert BUNDLED_DIGITS_FEATURES == Path(__file__).resolve().parents[2] / "data" / "features" / "digits-cnn"
