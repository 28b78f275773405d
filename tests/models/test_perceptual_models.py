"""reflow.models.perceptual: PerceptualNet from JSON + safetensors on disk, its load-time checks, LPIPS's AlexNet
converted by renaming, and the shipped digits network (data/perceptual/digits-lpips)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import F32_C_ELEMENTWISE, assert_f32_close
from safetensors.torch import load_file, save_file
from torch import nn

from reflow.core.perceptual import perceptual_distance
from reflow.errors import ReflowError
from reflow.folders.data import load_digits_array
from reflow.folders.files import BUNDLED
from reflow.models.perceptual import PerceptualNet, check_perceptual, load_perceptual, save_perceptual

SHIPPED = BUNDLED / "perceptual" / "digits-lpips"

# conv(2 -> 3) - relu - tap - maxpool - conv(3 -> 4, no padding) - tap: indices 0 (conv), 1 (relu), 2 (pool), 3 (conv)
SMALL = {
    "_class_name": "PerceptualNet",
    "in_channels": 2,
    "input_shift": [0.5, -0.25],
    "input_scale": [2.0, 0.5],
    "layers": [{"conv": [3, 3, 1, 1]}, "relu", "tap", {"maxpool": [2, 2]}, {"conv": [4, 3, 1, 0]}, "tap"],
    "calibrated": True,
}


def small_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "layers.0.weight": torch.randn(3, 2, 3, 3, generator=g),
        "layers.0.bias": torch.randn(3, generator=g),
        "layers.3.weight": torch.randn(4, 3, 3, 3, generator=g),
        "layers.3.bias": torch.randn(4, generator=g),
        "lin.0.weight": torch.rand(1, 3, 1, 1, generator=g),
        "lin.1.weight": torch.rand(1, 4, 1, 1, generator=g),
    }


def write_folder(folder, config=SMALL, weights=None):
    """A perceptual network folder as a user would write it: json.dump + safetensors.torch.save_file."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(small_weights() if weights is None else weights, str(folder / "model.safetensors"))
    return folder


def test_loads_from_disk_and_computes_what_its_config_says(tmp_path):
    folder = write_folder(tmp_path / "net")
    net = load_perceptual(folder)
    w = small_weights()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.randn(5, 2, 8, 8)
    # the same network written out with torch.nn.functional
    h = (x - torch.tensor([0.5, -0.25]).view(1, 2, 1, 1)) / torch.tensor([2.0, 0.5]).view(1, 2, 1, 1)
    tap0 = F.relu(F.conv2d(h, w["layers.0.weight"], w["layers.0.bias"], padding=1))
    tap1 = F.conv2d(F.max_pool2d(tap0, 2, 2), w["layers.3.weight"], w["layers.3.bias"])
    maps = net(x)
    assert [m.shape for m in maps] == [(5, 3, 8, 8), (5, 4, 2, 2)]
    assert_f32_close(maps[0], tap0, steps=1)
    assert_f32_close(maps[1], tap1, steps=2)
    assert [cw.tolist() for cw in net.channel_weights] == [
        w["lin.0.weight"].flatten().tolist(),
        w["lin.1.weight"].flatten().tolist(),
    ]
    # the .safetensors file itself, with config.json beside it, loads the same network
    by_file = load_perceptual(folder / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(by_file(x), maps, strict=True))


def test_frozen_but_gradients_reach_the_images(tmp_path):
    net = load_perceptual(write_folder(tmp_path / "net"))
    x = torch.randn(3, 2, 8, 8, requires_grad=True)
    perceptual_distance(net, x, torch.randn(3, 2, 8, 8)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_save_perceptual_round_trip_and_changed_bytes_are_refused(tmp_path):
    net = PerceptualNet(SMALL)
    with torch.no_grad():
        for lin in net.lin:
            lin.weight.abs_()
    folder = save_perceptual(net, tmp_path / "saved", info={"seed": 3}, extra_files={"README.md": "hi\n"})
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "reflow_weights.json",
    ]
    loaded = load_perceptual(folder)
    x = torch.randn(2, 2, 8, 8)
    assert all(torch.equal(a, b) for a, b in zip(loaded(x), net(x), strict=True))
    assert json.loads((folder / "config.json").read_text())["info"] == {"seed": 3}
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (folder / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ReflowError, match="changed after it was written"):
        load_perceptual(folder)


def _drop(w, key):
    return {k: v for k, v in w.items() if k != key}


BAD_WEIGHTS = {
    "missing weight": (lambda w: _drop(w, "layers.3.bias"), r"lacks layers\.3\.bias \(4,\)"),
    "wrong shape": (
        lambda w: {**w, "layers.0.weight": torch.zeros(3, 1, 3, 3)},
        r"layers\.0\.weight is \(3, 1, 3, 3\)",
    ),
    "integer weight": (lambda w: {**w, "layers.0.bias": torch.zeros(3, dtype=torch.int64)}, "needs a float"),
    "unexpected weight": (lambda w: {**w, "layers.9.weight": torch.zeros(1)}, "has no layer for"),
    "negative lin": (lambda w: {**w, "lin.1.weight": -torch.ones(1, 4, 1, 1)}, "negative channel weights"),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_weights_that_do_not_fit_the_config_are_one_line_errors(tmp_path, case):
    change, message = BAD_WEIGHTS[case]
    folder = write_folder(tmp_path / "net", weights=change(small_weights()))
    with pytest.raises(ReflowError, match=message) as e:
        load_perceptual(folder)
    assert "\n" not in str(e.value)


BAD_CONFIGS = {
    "another model's folder": ({"_class_name": "UNet2DModel"}, "describes a UNet2DModel, not a PerceptualNet"),
    "unknown layer": ({"layers": [{"conv": [3, 3, 1, 1]}, "gelu", "tap"]}, r"layers\[1\] is 'gelu'"),
    "no tap": ({"layers": [{"conv": [3, 3, 1, 1]}, "relu"]}, 'at least one "tap"'),
    "bad conv": ({"layers": [{"conv": [3, 3, 1]}, "tap"]}, r"layers\[0\] conv \[out, kernel, stride, padding\]"),
    "bad shift": ({"input_shift": [0.5]}, "input_shift must be a list of 2 numbers"),
    "zero scale": ({"input_scale": [1.0, 0.0]}, "input_scale must be positive"),
    "bad channels": ({"in_channels": "2"}, "in_channels must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_configs_are_one_line_errors(tmp_path, case):
    change, message = BAD_CONFIGS[case]
    folder = write_folder(tmp_path / "net", config={**SMALL, **change})
    with pytest.raises(ReflowError, match=message) as e:
        load_perceptual(folder)
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


def test_missing_paths_and_pickle_weights_are_one_line_errors(tmp_path, monkeypatch):
    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle weights were opened")

    monkeypatch.setattr(torch, "load", no_unpickling)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(SMALL))
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    no_config = tmp_path / "no-config"
    no_config.mkdir()
    save_file(small_weights(), str(no_config / "model.safetensors"))
    corrupt = write_folder(tmp_path / "corrupt")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tmp_path / "nowhere", "no such file or folder; pass a folder with config.json and model.safetensors"),
        (pickled, r"only pickle weights \(pytorch_model\.bin\), which reflow never loads"),
        (pickled / "pytorch_model.bin", r"not a \.safetensors file \(pickle is never loaded\)"),
        (no_config, "has no config.json"),
        (corrupt, "cannot read"),
        (empty, "has no model.safetensors"),
    ]
    for path, message in cases:
        with pytest.raises(ReflowError, match=message) as e:
            load_perceptual(path)
        assert "\n" not in str(e.value), path
        assert "data/perceptual/digits-lpips" in str(e.value) or "safetensors.torch.save_file" in str(e.value)


# LPIPS's AlexNet (lpips.LPIPS(net="alex")), as the module docstring converts it
ALEX = {
    "_class_name": "PerceptualNet",
    "in_channels": 3,
    "input_shift": [-0.030, -0.088, -0.188],
    "input_scale": [0.458, 0.448, 0.450],
    "layers": [
        *({"conv": [64, 11, 4, 2]}, "relu", "tap", {"maxpool": [3, 2]}),
        *({"conv": [192, 5, 1, 2]}, "relu", "tap", {"maxpool": [3, 2]}),
        *({"conv": [384, 3, 1, 1]}, "relu", "tap", {"conv": [256, 3, 1, 1]}, "relu", "tap"),
        *({"conv": [256, 3, 1, 1]}, "relu", "tap"),
    ],
    "calibrated": True,
}


def torchvision_alexnet_features() -> nn.Sequential:
    """torchvision.models.alexnet().features, written out (its state dict names are ``K.weight`` / ``K.bias``)."""
    return nn.Sequential(
        *(nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2)),
        *(nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2)),
        *(nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(), nn.Conv2d(384, 256, 3, padding=1), nn.ReLU()),
        *(nn.Conv2d(256, 256, 3, padding=1), nn.ReLU()),
    )


def test_lpips_alexnet_converted_by_renaming_gives_lpips(tmp_path):
    torch.manual_seed(0)
    features = torchvision_alexnet_features().eval()
    lins = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1) for k, c in enumerate((64, 192, 384, 256, 256))}
    # the conversion the module docstring describes: features.K -> layers.K, linK.model.1.weight -> lin.K.weight
    state = {f"layers.{k}": v for k, v in features.state_dict().items()}
    state |= {f"lin.{k}.weight": lins[f"lin{k}.model.1.weight"] for k in range(5)}
    folder = tmp_path / "alex"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(ALEX))
    save_file(state, str(folder / "model.safetensors"))
    net = load_perceptual(folder)
    x, y = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    ours = perceptual_distance(net, x, y)

    def lpips_taps(img):  # LPIPS's ScalingLayer, then the outputs of relu1..relu5 (slices [0:2], [2:5], ...)
        h = (img - torch.tensor(ALEX["input_shift"]).view(1, 3, 1, 1)) / torch.tensor(ALEX["input_scale"]).view(
            1, 3, 1, 1
        )
        taps = []
        with torch.no_grad():
            for i, layer in enumerate(features):
                h = layer(h)
                if i in (1, 4, 7, 9, 11):
                    taps.append(h.double().numpy())
        return taps

    reference = np.zeros(2)
    for k, (fx, fy) in enumerate(zip(lpips_taps(x), lpips_taps(y), strict=True)):
        fx = fx / (np.sqrt((fx**2).sum(axis=1, keepdims=True)) + 1e-10)
        fy = fy / (np.sqrt((fy**2).sum(axis=1, keepdims=True)) + 1e-10)
        w = lins[f"lin{k}.model.1.weight"].double().numpy()
        reference += (w * (fx - fy) ** 2).sum(axis=1).mean(axis=(1, 2))
    assert (reference > 0.05).all()
    assert_f32_close(ours, reference, steps=5)
    check_perceptual(net, (3, 64, 64))
    with pytest.raises(ReflowError, match="too small for the perceptual network"):
        check_perceptual(net, (3, 8, 8))


def test_check_perceptual_refuses_data_the_network_cannot_compare(tmp_path):
    net = load_perceptual(write_folder(tmp_path / "net"))
    check_perceptual(net, (2, 8, 8))
    check_perceptual(net, torch.Size([2, 6, 6]))
    for shape, message in [
        ((2,), r"compares images \(C, H, W\)"),
        ((1, 8, 8), "takes 2-channel images, the data has 1 channels"),
        ((4, 8, 8), "takes 2-channel images, the data has 4 channels"),
    ]:
        with pytest.raises(ReflowError, match=message) as e:
            check_perceptual(net, shape)
        assert "\n" not in str(e.value)


def blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([1.0, 2.0, 1.0]) / 4
    return F.conv2d(F.pad(x, (1, 1, 1, 1), value=-1.0), (k[:, None] * k[None, :])[None, None])


def test_shipped_digits_network_is_perceptual():
    net = load_perceptual(SHIPPED)
    check_perceptual(net, (1, 8, 8))
    assert net.in_channels == 1 and net.channel_weights is None
    assert not any(p.requires_grad for p in net.parameters())
    x = torch.from_numpy(load_digits_array()[:100])
    same = perceptual_distance(net, x, x)
    assert_f32_close(same, torch.zeros(100), steps=3, c=F32_C_ELEMENTWISE)
    g = torch.Generator().manual_seed(0)
    faint = perceptual_distance(net, x, x + 0.01 * torch.randn(x.shape, generator=g))
    blurred = perceptual_distance(net, x, blur(x))
    shifted = perceptual_distance(net, x, F.pad(x, (1, 0, 0, 0), value=-1.0)[..., :8])  # one pixel right
    assert (faint > 0).all()
    assert (blurred > 10 * faint).all() and (shifted > 10 * faint).all()


def test_shipped_digits_network_is_not_the_fd_network():
    """The loss must not optimise the metric's own features: no tensor of digits-cnn (reflow eval's FD network) is
    in digits-lpips, and the folder documents how it was made."""
    ours = load_file(str(SHIPPED / "model.safetensors"))
    theirs = load_file(str(BUNDLED / "features" / "digits-cnn" / "model.safetensors"))
    for a in ours.values():
        assert not any(a.shape == b.shape and torch.equal(a, b) for b in theirs.values())
    assert sum(f.stat().st_size for f in SHIPPED.iterdir()) < 1 << 20
    readme = (SHIPPED / "README.md").read_text()
    assert "python data/train_digits_perceptual.py --out data/perceptual/digits-lpips --seed 1" in readme
    assert "independent of `data/features/digits-cnn`" in readme
    info = json.loads((SHIPPED / "config.json").read_text())["info"]
    assert info["seed"] == 1 and info["test_accuracy"] > 0.95
