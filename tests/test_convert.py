"""dlrt.convert / merge on torchvision models, and one DLRT step of VGG16 and ResNet-50."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import copy

from dlrt import ConvertConfig, DLRTOptimizer, LowRankConv2d, LowRankLinear, convert, low_rank_layers, merge
from dlrt.conversion import check_not_merged
from dlrt.metrics import dense_reference, weight_shapes
from dlrt.experiments.models import build_model


def weight_count(model):
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d)))


def test_convert_keeps_first_conv_and_classifier_and_reports():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    full = weight_count(net)
    net, report = convert(net, rank=0.25, exclude=["layer4.*"])
    kept = {e.name: e.note for e in report.entries if e.rank is None}
    assert "first conv" in kept["conv1"] and "classifier" in kept["fc"]
    assert all(name.startswith("layer4") for name in kept if name not in ("conv1", "fc"))
    assert isinstance(net.layer1[0].conv1, LowRankConv2d) and isinstance(net.layer4[0].conv1, nn.Conv2d)
    entry = next(e for e in report.entries if e.name == "layer2.0.conv2")
    assert entry.shape == (128, 128 * 9) and entry.rank == 32
    assert "converted" in str(report)
    assert dense_reference(weight_shapes(net)) == full


def test_convert_then_merge_gives_the_same_outputs():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    converted, _ = convert(net, rank=0.5)
    converted.eval()
    y = converted(x)
    merged = merge(converted)
    assert not low_rank_layers(merged)
    torch.testing.assert_close(merged(x), y, atol=1e-4, rtol=1e-4)


def test_merge_works_in_place_and_returns_the_model():
    model = nn.Sequential(LowRankLinear(8, 6, 2), nn.ReLU(), nn.Linear(6, 2))
    assert merge(model) is model and type(model[0]) is nn.Linear
    layer = LowRankLinear(8, 6, 2)  # a model that is one low-rank layer cannot change class in place
    x = torch.randn(3, 8)
    merged = merge(layer)
    assert type(merged) is nn.Linear and not merged._modules
    torch.testing.assert_close(merged(x), layer(x))
    converted, _ = convert(nn.Linear(8, 6), keep_classifier=False)
    assert type(converted) is LowRankLinear


def test_an_optimizer_whose_layers_were_merged_is_told():
    model = nn.Sequential(LowRankLinear(8, 6, 2), nn.ReLU(), LowRankLinear(6, 4, 2), nn.ReLU(), nn.Linear(4, 2))
    opt = DLRTOptimizer(model, lr=0.1)
    merge(copy.deepcopy(model))  # merging a copy leaves this model and its optimizer as they are
    check_not_merged(opt.layers)
    merge(model)
    with pytest.raises(RuntimeError, match=r"2 of this optimizer's 2 low-rank layers were replaced by dense ones "
                                           r"\(dlrt.merge\).*train the merged model with a new optimizer"):
        check_not_merged(opt.layers)


def test_ranks_given_by_name():
    net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    model, report = convert(net, rank={"0": 3, "2": 2})
    assert [(e.name, e.rank) for e in report.entries] == [("0", 3), ("2", 2), ("4", None)]
    with pytest.raises(ValueError, match=r"the rank dict names layers that are not converted \(4\)"):
        convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)), rank={"0": 3, "4": 2})
    with pytest.raises(ValueError, match="the rank dict gives no rank for 1: add it, or leave it out with exclude"):
        convert(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 6), nn.Linear(6, 2)), rank={"0": 3})


def test_a_convert_config_is_the_arguments_as_json_and_remakes_a_model():
    import json

    config = ConvertConfig(rank=0.25, exclude=["layer4.*"], keep_classifier=False)
    assert ConvertConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    torch.manual_seed(0)
    by_config, report = convert(torchvision.models.resnet18(num_classes=10), config=config)
    torch.manual_seed(0)
    by_arguments, _ = convert(torchvision.models.resnet18(num_classes=10), rank=0.25, exclude=["layer4.*"],
                              keep_classifier=False)
    assert [l.rank for l in low_rank_layers(by_config)] == [l.rank for l in low_rank_layers(by_arguments)]
    assert isinstance(by_config.fc, LowRankLinear) and isinstance(by_config.layer4[0].conv1, nn.Conv2d)
    # of(model): the layers by name at their ranks now, which remake the model from the dense network
    remade, _ = convert(torchvision.models.resnet18(num_classes=10), from_weights=False,
                        config=ConvertConfig.from_dict(json.loads(json.dumps(ConvertConfig.of(by_config).to_dict()))))
    assert [(n, type(m), getattr(m, "rank", None)) for n, m in remade.named_modules()] == \
           [(n, type(m), getattr(m, "rank", None)) for n, m in by_config.named_modules()]


@pytest.mark.parametrize("call,message", [
    (lambda: convert(nn.Linear(4, 4), rank=2, config=ConvertConfig()), "give one of them"),
    (lambda: ConvertConfig.from_dict({"rank": 2, "ranks": 3}), "unknown ConvertConfig key.s. ranks"),
    (lambda: ConvertConfig(rank=lambda name, n, m: 1).to_dict(), "a rank function cannot be stored"),
])
def test_a_convert_config_that_cannot_be_used_is_refused_in_one_line(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_full_rank_conversion_is_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 16, 3, stride=2, padding=2, dilation=2), nn.Flatten(), nn.LazyLinear(4))
    x = torch.randn(2, 3, 16, 16)
    y = net(x)
    converted, _ = convert(net, rank=1.0, keep_first_conv=False, keep_classifier=False)
    assert isinstance(converted[1], LowRankConv2d) and isinstance(converted[3], LowRankLinear)
    torch.testing.assert_close(converted(x), y, atol=1e-5, rtol=1e-4)


def test_grouped_convs_stay_dense():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 8, 3))
    _, report = convert(net)
    assert [e.rank is None for e in report.entries] == [True, True, False]
    assert "grouped" in report.entries[1].note


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
@pytest.mark.parametrize("input_shape,num_classes,batch_shape", [
    ((3, 32, 32), 10, (2, 3, 32, 32)),         # CIFAR-shaped: the small-image variant
    ((3, 224, 224), 1000, (2, 3, 64, 64)),     # the ImageNet variant, fed a small spatial size
], ids=["cifar", "imagenet"])
def test_one_dlrt_step_of_the_paper_nets(name, input_shape, num_classes, batch_shape):
    torch.manual_seed(0)
    torch_reference = getattr(torchvision.models, name)(num_classes=num_classes)
    model = build_model(name, input_shape, num_classes, rank=8)
    opt = DLRTOptimizer(model, lr=0.01, tau=0.1, momentum=0.9)
    x, y = torch.randn(batch_shape), torch.randint(0, num_classes, (batch_shape[0],))
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    opt.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(bn.num_batches_tracked.item() == 1 for bn in batchnorms)  # one forward per batch
    for layer, (_, r_max) in zip(low_rank_layers(model), opt.rank_bounds()):
        assert 2 <= layer.rank <= r_max
    if input_shape[1] == 224:  # the ImageNet variants are torchvision's nets, full-rank counts unchanged
        assert dense_reference(weight_shapes(model)) == weight_count(torch_reference)
        assert sum(p.numel() for p in merge(model).parameters()) == sum(p.numel() for p in torch_reference.parameters())
