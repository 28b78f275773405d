import json

import pytest
import torch

from reflow.errors import ReflowError
from reflow.models.velocity import MLPVelocity, load_model


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)])
def test_save_load_round_trip(tmp_path, shape):
    torch.manual_seed(0)
    model = MLPVelocity(sample_shape=list(shape), hidden_dim=16, num_layers=2, time_embed_dim=8).eval()
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_model(tmp_path / "m").eval()
    assert type(loaded) is MLPVelocity and loaded.sample_shape == shape
    x, t = torch.randn(3, *shape), torch.rand(3)
    torch.testing.assert_close(loaded(x, t), model(x, t), rtol=0, atol=0)
    assert model(x, t).shape == x.shape


def test_load_refuses_bad_folders(tmp_path):
    with pytest.raises(ReflowError, match="no such model folder"):
        load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReflowError, match="no config.json"):
        load_model(tmp_path / "empty")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ReflowError, match="not a reflow velocity model"):
        load_model(other)


def test_pickle_weights_need_opt_in(tmp_path):
    model = MLPVelocity(hidden_dim=8, num_layers=1, time_embed_dim=4)
    model.save_pretrained(tmp_path / "p", safe_serialization=False)
    with pytest.raises(ReflowError, match="--allow-pickle"):
        load_model(tmp_path / "p")
    assert isinstance(load_model(tmp_path / "p", allow_pickle=True), MLPVelocity)
