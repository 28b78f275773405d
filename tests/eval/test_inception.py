"""Inception features for FID/KID: the error paths always run; the network paths need the optional extra "fid"
(torch-fidelity, torchmetrics) and run on a randomly initialised Inception saved to a file, as nothing can be
downloaded here."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_f32_close, import_or_skip

from reflow.errors import ReflowError
from reflow.eval.metrics import images_to_uint8, inception_features


class _Payload:
    """Any class: a pickle of it is what torch.load(weights_only=True) must refuse."""


def test_no_weights_path_is_one_line_error_naming_the_flag():
    with pytest.raises(ReflowError) as info:
        inception_features(torch.zeros(2, 3, 8, 8), None)
    message = str(info.value)
    assert "\n" not in message
    assert "--inception-weights" in message and "6726825d.pth" in message and "download" in message


def test_missing_weights_file(tmp_path):
    with pytest.raises(ReflowError, match="no such Inception weights file") as info:
        inception_features(torch.zeros(2, 3, 8, 8), tmp_path / "absent.pth")
    assert "\n" not in str(info.value)


def test_weights_are_loaded_safely_and_checked(tmp_path):
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"w": _Payload()}, unsafe)
    with pytest.raises(ReflowError, match="cannot read Inception weights") as info:
        inception_features(torch.zeros(2, 3, 8, 8), unsafe)
    assert "\n" not in str(info.value)
    not_a_state_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_a_state_dict)
    with pytest.raises(ReflowError, match="not a state dict"):
        inception_features(torch.zeros(2, 3, 8, 8), not_a_state_dict)


def test_bad_images_are_rejected(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save({}, weights)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        inception_features(torch.zeros(2, 2, 8, 8), weights)
    with pytest.raises(ValueError, match="floating point"):
        inception_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), weights)


def test_images_to_uint8_convention():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5]).reshape(1, 1, 2, 3)
    u8 = images_to_uint8(x)
    assert u8.dtype == torch.uint8 and u8.shape == (1, 3, 2, 3)
    # round((x + 1) * 127.5), clipped: -0.999 -> 0.1275 -> 0, 0 -> 127.5 -> 128, 0.5 -> 191.25 -> 191.
    assert u8[0, 0].flatten().tolist() == [0, 0, 128, 191, 255, 255]
    assert torch.equal(u8[0, 0], u8[0, 2])


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A state dict file of torch-fidelity's FeatureExtractorInceptionV3 with He-initialised random weights.

    The constructor always loads weights (downloading them when given no path), so it is built with both the
    download and load_state_dict stubbed out; the random init is variance-preserving so the 2048 pool features of
    the 40-odd layers stay O(1) instead of vanishing."""
    tfi = import_or_skip("torch_fidelity.feature_extractor_inceptionv3")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 4:  # conv weights
                p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / p[0].numel()))
            elif name.endswith("bn.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    return path


@pytest.mark.parametrize("shape", [(4, 1, 8, 8), (4, 3, 16, 16)])
def test_features_match_torchmetrics_fid_feature_path(random_inception_weights, shape):
    fid_module = import_or_skip("torchmetrics.image.fid")
    images = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    feats = inception_features(images, random_inception_weights)
    assert feats.shape == (4, 2048) and feats.dtype == np.float64
    assert np.isfinite(feats).all() and feats.std() > 1e-3  # not a dead network
    assert not np.allclose(feats[0], feats[1])
    # Batching does not matter beyond float32 noise (tests/README.md). Inception-v3's longest path is ~47 conv layers,
    # about 2.5 of the <= 20-layer networks F32_C was set on: steps=3. Mixed-up rows would differ by O(1).
    assert_f32_close(inception_features(images, random_inception_weights, batch_size=3), feats, steps=3)
    # torchmetrics' FID feature network on the same uint8 images and the same weights file. antialias=False selects
    # torch-fidelity's TF1-compatible resize (the original FID's); torchmetrics' default antialias=True does not.
    metric = fid_module.FrechetInceptionDistance(
        feature=2048, feature_extractor_weights_path=str(random_inception_weights), antialias=False
    )
    with torch.inference_mode():
        reference = metric.inception(images_to_uint8(images)).double().numpy()
    # The same network code on the same uint8 images in one batch of 4 on both sides: no batch or kernel change, so
    # nothing but the weights' file round trip could differ; kept tight.
    np.testing.assert_allclose(feats, reference, rtol=1e-5, atol=1e-6)


def test_weights_of_another_network_are_rejected(tmp_path):
    import_or_skip("torch_fidelity.feature_extractor_inceptionv3")
    wrong = tmp_path / "wrong.pth"
    torch.save(torch.nn.Linear(2, 2).state_dict(), wrong)
    with pytest.raises(ReflowError, match="does not hold FID Inception-v3 weights") as info:
        inception_features(torch.zeros(2, 3, 8, 8), wrong)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500
