"""Weights whose bytes changed after reflow wrote them never load silently: a saved model records the size and
sha256 of each weights file (reflow_weights.json) and every loader checks them; a damaged file without a
record (a checkpoint from elsewhere, an older model) gives one line instead of a safetensors traceback."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from ddpm_helpers import tiny_unet
from helpers import one_error_line
from safetensors.torch import load_file
from typer.testing import CliRunner

from reflow.cli.app import app
from reflow.errors import ReflowError
from reflow.eval.features import DigitsNet, load_feature_net, save_feature_net
from reflow.folders.weights import WEIGHTS_RECORD, record_weights
from reflow.models.velocity import UNetFlow, init_model, load_model
from reflow.pipelines.export import save_student
from reflow.teachers import load_teacher

runner = CliRunner()
CHANGED = "changed after it was written (sha256 mismatch); re-export or re-train the model"


def flip_byte(file: Path) -> None:
    """Flip one bit of the last tensor's last byte: the file stays valid safetensors."""
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))


def truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def weights_of(folder: Path) -> Path:
    (file,) = folder.rglob("*.safetensors")
    return file


@pytest.fixture
def mlp(tiny_flow, tmp_path) -> Path:
    """A copy of the session's tiny trained flow (trained and saved by the real training code)."""
    return Path(shutil.copytree(tiny_flow, tmp_path / "mlp"))


@pytest.fixture
def image(tmp_path) -> Path:
    """An image student exported as a diffusers pipeline folder (weights in unet/)."""
    folder = tmp_path / "image"
    folder.mkdir()
    save_student(UNetFlow(tiny_unet()), folder)
    return folder


def test_saved_models_record_every_weights_file(mlp, image):
    for folder in (mlp, image):
        record = json.loads((folder / WEIGHTS_RECORD).read_text())
        files = sorted(folder.rglob("*.safetensors"))
        assert sorted(record) == [f.relative_to(folder).as_posix() for f in files]
        for f in files:
            entry = record[f.relative_to(folder).as_posix()]
            assert entry == {"size": len(f.read_bytes()), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert list(json.loads((image / WEIGHTS_RECORD).read_text())) == ["unet/diffusion_pytorch_model.safetensors"]


def test_unchanged_models_load(mlp, image, tmp_path):
    from diffusers import DiffusionPipeline

    load_model(mlp)
    init_model(mlp)
    assert isinstance(load_model(image), UNetFlow) and isinstance(init_model(image), UNetFlow)
    DiffusionPipeline.from_pretrained(str(image))  # the record beside the pipeline does not disturb diffusers
    r = runner.invoke(
        app, ["sample", "--model", str(mlp), "--nfe", "1", "--num", "4", "--out", str(tmp_path / "s.npy")]
    )
    assert r.exit_code == 0, r.output


def test_flipped_byte_is_refused(mlp, image):
    for folder in (mlp, image):
        weights = weights_of(folder)
        flip_byte(weights)
        load_file(str(weights))  # still valid safetensors: only the record tells
        for load in (load_model, init_model):
            with pytest.raises(ReflowError) as e:
                load(folder)
            assert str(e.value) == f"{weights} {CHANGED}"
    with pytest.raises(ReflowError, match="sha256 mismatch"):
        load_teacher(mlp, nfe=1, solver="euler")


def test_cli_refuses_changed_weights(mlp, image, tmp_path):
    flip_byte(weights_of(mlp))
    flip_byte(weights_of(image))
    for model in (mlp, image):
        out = tmp_path / f"{model.name}.npy"
        r = runner.invoke(app, ["sample", "--model", str(model), "--nfe", "1", "--num", "2", "--out", str(out)])
        assert one_error_line(r) == f"error: {weights_of(model)} {CHANGED}"
        assert not out.exists()
    student = tmp_path / "student"
    args = ["train", "--data", "checkerboard", "--init", str(mlp), "--out", str(student), "--max-steps", "2"]
    r = runner.invoke(app, [*args, "--batch-size", "8"])
    assert one_error_line(r) == f"error: {weights_of(mlp)} {CHANGED}"
    assert not list(tmp_path.glob("student*/**/*.safetensors"))


def test_truncated_weights_one_line(mlp, image):
    for folder, what in ((mlp, "model"), (image, "the UNet")):
        weights = weights_of(folder)
        size = weights.stat().st_size
        truncate(weights)
        with pytest.raises(ReflowError) as e:
            load_model(folder)
        assert str(e.value) == (
            f"{weights} changed after it was written ({size // 2} bytes, {size} recorded); "
            "re-export or re-train the model"
        )
        # without a record (a model of an older reflow, a checkpoint from elsewhere) still one line
        (folder / WEIGHTS_RECORD).unlink()
        with pytest.raises(ReflowError) as e:
            load_model(folder)
        assert f"could not load {what} from" in str(e.value) and "damaged or truncated" in str(e.value)
        assert "\n" not in str(e.value)


def test_models_without_a_record_load_as_before(mlp, image):
    for folder in (mlp, image):
        (folder / WEIGHTS_RECORD).unlink()
        flip_byte(weights_of(folder))  # nothing to tell it from the original: loads, as before records existed
        load_model(folder)


def test_bad_record_or_missing_file_one_line(mlp):
    weights = weights_of(mlp)
    record = mlp / WEIGHTS_RECORD
    text = record.read_text()
    record.write_text("{not json")
    with pytest.raises(ReflowError, match=f"^{record} is not a valid weights record; re-export"):
        load_model(mlp)
    record.write_text(json.dumps({**json.loads(text), "extra.safetensors": {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(ReflowError, match=f"^{mlp / 'extra.safetensors'} is missing"):
        load_model(mlp)
    record.write_text(text)
    load_model(mlp)
    assert weights.is_file()


def test_feature_net_checked(tmp_path):
    folder = save_feature_net(DigitsNet(channels=(2, 2), feature_dim=4), tmp_path / "features")
    load_feature_net(folder)  # no record: loads as before
    record_weights(folder)
    load_feature_net(folder)
    flip_byte(folder / "model.safetensors")
    with pytest.raises(ReflowError) as e:
        load_feature_net(folder)
    assert str(e.value) == f"{folder / 'model.safetensors'} {CHANGED}"
