"""dlrt.export: a saved model rebuilds from its file alone (a converted torchvision net, a model of the user's
own class), and save_model refuses, before writing, what the loader could not rebuild."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from dlrt import DLRTOptimizer, LowRankLinear, convert, low_rank_layers
from dlrt.export import load_exported, save_model


class TinyNet(nn.Module):
    """A user's model, made without arguments, with its own low-rank layers."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(LowRankLinear(20, 16, 2), nn.ReLU(), LowRankLinear(16, 12, 2), nn.ReLU())
        self.head = nn.Linear(12, 4)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("fmt", ["factored", "dense"])
def test_a_converted_torchvision_model_rebuilds(tmp_path, fmt):
    torch.manual_seed(0)
    model, _ = convert(torchvision.models.resnet18(num_classes=10), rank=0.25, exclude=["layer4.*"])
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    path = save_model(model, tmp_path / "net.safetensors", fmt, builder="torchvision.models:resnet18", num_classes=10)
    loaded = load_exported(path)
    assert [layer.rank for layer in low_rank_layers(loaded)] == ([layer.rank for layer in low_rank_layers(model)]
                                                                 if fmt == "factored" else [])
    torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=1e-4)


def test_a_model_of_an_importable_class_needs_no_builder(tmp_path):
    torch.manual_seed(0)
    model = TinyNet()
    opt = DLRTOptimizer(model, lr=0.1, tau=0.0)  # tau = 0: the ranks double, away from the class's own
    x, y = torch.randn(8, 20), torch.randint(0, 4, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    loaded = load_exported(save_model(model, tmp_path / "tiny.safetensors"))
    assert [layer.rank for layer in low_rank_layers(loaded)] == [4, 4]
    torch.testing.assert_close(loaded(x), model(x))


@pytest.mark.parametrize("make,kwargs,message", [
    (lambda: nn.Sequential(LowRankLinear(8, 6, 2), nn.Linear(6, 2)), {},
     "could not rebuild this model from its class torch.nn.modules.container:Sequential without a builder"),
    (lambda: convert(torchvision.models.resnet18(num_classes=10), rank=0.25)[0], {},
     r"could not rebuild this model from its class torchvision.models.resnet:ResNet without a builder \(TypeError"),
    (lambda: convert(torchvision.models.resnet18(num_classes=10), rank=0.25)[0],
     dict(builder="torchvision.models:resnet18"), "differs from this model"),
    (lambda: nn.Sequential(LowRankLinear(8, 6, 2)), dict(builder="__main__:make_net"), "defined in a script"),
    (lambda: nn.Sequential(LowRankLinear(8, 6, 2)), dict(builder="nowhere.at_all:make_net"), "ModuleNotFoundError"),
    (lambda: TinyNet(), dict(builder=f"{__name__}:TinyNet", width=object()), "must be JSON values"),
])
def test_what_could_not_be_loaded_is_refused_before_writing(tmp_path, make, kwargs, message):
    path = tmp_path / "net.safetensors"
    with pytest.raises(ValueError, match=message) as error:
        save_model(make(), path, **kwargs)
    assert "\n" not in str(error.value)
    assert "builder=" in str(error.value) or "JSON" in str(error.value)
    assert not path.exists()


def test_the_file_stores_a_convert_config_and_the_harness_stores_a_dense_builder(tmp_path):
    """dlrt-export's builder makes the dense network (low_rank=False) and the stored ConvertConfig its low-rank
    layers at their trained ranks: nothing of the harness's own low-rank choice is needed to load."""
    import json

    from safetensors import safe_open

    from dlrt import ConvertConfig
    from dlrt.experiments.export import BUILDER
    from dlrt.experiments.models import build_model

    kwargs = {"name": "lenet5", "input_shape": [1, 28, 28], "num_classes": 10}
    torch.manual_seed(0)
    model = build_model(**kwargs, rank=[3, 5, 7]).eval()
    path = save_model(model, tmp_path / "net.safetensors", builder=BUILDER, **kwargs, low_rank=False)
    with safe_open(str(path), framework="pt") as f:
        stored = ConvertConfig.from_dict(json.loads(f.metadata()["conversion"]))
    assert stored == ConvertConfig.of(model) and sorted(stored.rank.values()) == [3, 5, 7]
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(load_exported(path)(x), model(x))


def test_a_file_that_names_no_conversion_is_refused_in_one_line(tmp_path):
    """Files of an older dlrt, whose builder made the low-rank layers: export them again from their run folder."""
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "old.safetensors"),
              metadata={"format": "factored", "builder": "dlrt.experiments.models:build_model", "low_rank": "True"})
    with pytest.raises(ValueError, match=r"older dlrt.*export the model again \(dlrt-export RUN_DIR") as error:
        load_exported(tmp_path / "old.safetensors")
    assert "\n" not in str(error.value)
