"""The layers: factored forward equals the dense one, and the backward gives the DLRT gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dlrt import LowRankConv2d, LowRankLayer, LowRankLinear, low_rank_layers
from dlrt.layers import StepInputs


@pytest.fixture(autouse=True)
def float64():
    torch.manual_seed(0)


@pytest.mark.parametrize("lead", [(7, 3), (2, 3)], ids=["batch above n", "batch below n"])  # both orders of S
def test_linear_forward_and_gradients_match_dense(lead):
    layer = LowRankLinear(30, 20, 5).double()
    x = torch.randn(*lead, 30, dtype=torch.float64, requires_grad=True)  # leading dims are kept
    W = layer.dense_weight().detach().requires_grad_()
    y, y_ref = layer(x), F.linear(x, W, layer.bias)
    assert y.shape == (*lead, 20)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    grad_x = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
    grad_x_ref, G = torch.autograd.grad(y_ref, (x, W), dy)
    torch.testing.assert_close(grad_x, grad_x_ref)
    y.backward(dy)
    torch.testing.assert_close(layer.U.grad, G @ layer.V)  # dL/dK
    torch.testing.assert_close(layer.V.grad, G.T @ layer.U)  # dL/dL
    torch.testing.assert_close(layer.S.grad, layer.U.T @ G @ layer.V)
    torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)))


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2), (2, 3, 2)])
def test_conv_forward_and_gradients_match_dense(stride, padding, dilation):
    layer = LowRankConv2d(3, 8, (3, 5), 4, stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 3, 11, 13, dtype=torch.float64, requires_grad=True)
    W = layer.dense_weight().detach().requires_grad_()
    y = layer(x)
    y_ref = F.conv2d(x, W, layer.bias, stride, padding, dilation)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(y, nn.Conv2d(3, 8, (3, 5), stride, padding, dilation).double()._conv_forward(x, W, layer.bias))
    dy = torch.randn_like(y)
    grad_x = torch.autograd.grad(y, x, dy, retain_graph=True)[0]
    grad_x_ref, G = torch.autograd.grad(y_ref, (x, W), dy)
    torch.testing.assert_close(grad_x, grad_x_ref)
    y.backward(dy)
    G = G.reshape(8, -1)
    torch.testing.assert_close(layer.U.grad, G @ layer.V)
    torch.testing.assert_close(layer.V.grad, G.T @ layer.U)
    torch.testing.assert_close(layer.S.grad, layer.U.T @ G @ layer.V)


@pytest.mark.parametrize("make", [lambda: LowRankLinear(12, 9, 3), lambda: LowRankConv2d(2, 5, 3, 2, padding=1)])
def test_project_gradient_is_left_G_right(make):
    layer = make().double()
    x = torch.randn(4, 12) if isinstance(layer, LowRankLinear) else torch.randn(4, 2, 6, 6)
    x = x.double()
    layer.step_inputs = StepInputs()
    W = layer.dense_weight().detach().requires_grad_()
    loss_fn = lambda y: (y**2).sum()
    for _ in range(2):  # two backwards accumulate, like .grad
        loss_fn(layer(x)).backward()
    y_ref = F.linear(x, W) if isinstance(layer, LowRankLinear) else F.conv2d(x, W, None, 1, 1)
    bias = layer.bias if isinstance(layer, LowRankLinear) else layer.bias[:, None, None]
    G = 2 * torch.autograd.grad(loss_fn(y_ref + bias), W)[0].reshape(layer.out_dim, -1)
    left, right = torch.randn(layer.out_dim, 2).double(), torch.randn(layer.in_dim, 3).double()
    torch.testing.assert_close(layer.project_gradient(left, right), left.T @ G @ right)


class _CountProducts(TorchDispatchMode):
    """Counts the matrix products and convolution gradients dispatched inside the block."""

    PRODUCTS = {"mm", "bmm", "addmm", "convolution", "convolution_backward"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket.__name__ in self.PRODUCTS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("make", [lambda: LowRankLinear(12, 10, 3), lambda: LowRankConv2d(2, 5, 3, 3, padding=1)],
                         ids=["linear", "conv"])
def test_frozen_factors_get_no_gradient_and_the_others_are_unchanged(make):
    """The fixed-rank step's second pass freezes U and V: the backward skips G V and G^T U."""
    layer = make().double()
    x = torch.randn(4, 12) if isinstance(layer, LowRankLinear) else torch.randn(4, 2, 6, 6)
    x = x.double().requires_grad_()
    (layer(x) ** 2).sum().backward()
    expected = (x.grad.clone(), layer.S.grad.clone(), layer.bias.grad.clone())
    x.grad = None
    layer.zero_grad()
    layer.U.requires_grad_(False)
    layer.V.requires_grad_(False)
    with _CountProducts() as frozen:
        (layer(x) ** 2).sum().backward()
    assert layer.U.grad is None and layer.V.grad is None
    for got, want in zip((x.grad, layer.S.grad, layer.bias.grad), expected):
        torch.testing.assert_close(got, want)
    layer.U.requires_grad_(True)
    layer.V.requires_grad_(True)
    with _CountProducts() as trained:
        (layer(x) ** 2).sum().backward()
    assert frozen.count < trained.count  # the skipped products were not computed


def test_from_linear_and_from_conv_are_truncated_svds():
    dense = nn.Linear(10, 8)
    low = LowRankLinear.from_linear(dense, 3)
    U, s, Vh = torch.linalg.svd(dense.weight.detach())
    torch.testing.assert_close(low.dense_weight(), U[:, :3] @ torch.diag(s[:3]) @ Vh[:3])
    torch.testing.assert_close(low.bias, dense.bias)
    torch.testing.assert_close(LowRankLinear.from_linear(dense, 8).dense_weight(), dense.weight, atol=1e-5, rtol=1e-5)
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1)
    low_conv = LowRankConv2d.from_conv(conv, 6)
    torch.testing.assert_close(low_conv.dense_weight(), conv.weight, atol=1e-5, rtol=1e-5)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(low_conv(x), conv(x), atol=1e-5, rtol=1e-5)
    assert (low_conv.stride, low_conv.padding) == (conv.stride, conv.padding)


def test_the_layers_share_a_public_base_type_and_one_dense_weight():
    conv, linear = LowRankConv2d(3, 6, 3, 2), LowRankLinear(10, 8, 3)
    model = nn.Sequential(conv, nn.ReLU(), linear)
    assert low_rank_layers(model) == [conv, linear] and all(isinstance(m, LowRankLayer) for m in (conv, linear))
    assert conv.dense_weight().shape == (6, 3, 3, 3) and linear.dense_weight().shape == (8, 10)
    torch.testing.assert_close(conv.dense_weight().flatten(1), conv.U @ conv.S @ conv.V.T)


def test_factors_are_orthonormal_at_init():
    layer = LowRankLinear(40, 30, 7).double()
    eye = torch.eye(7, dtype=torch.float64)
    torch.testing.assert_close(layer.U.T @ layer.U, eye, atol=1e-6, rtol=0)  # SVD taken in float32
    torch.testing.assert_close(layer.V.T @ layer.V, eye, atol=1e-6, rtol=0)
    assert layer.rank == 7


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(ValueError, match="groups=1"):
        LowRankConv2d(4, 4, 3, 2, groups=2)
    with pytest.raises(ValueError, match="rank 9 is not possible for a 8x10"):
        LowRankLinear(10, 8, 9)
    with pytest.raises(ValueError, match="rank 0"):
        LowRankLinear(10, 8, 0)


def test_state_dict_loads_at_another_rank():
    a, b = LowRankLinear(10, 8, 3), LowRankLinear(10, 8, 5)
    b.load_state_dict(a.state_dict())
    assert b.rank == 3
    torch.testing.assert_close(b.dense_weight(), a.dense_weight())


def test_bf16_autocast_keeps_factors_and_their_gradients_in_float32():
    torch.manual_seed(0)
    layers = [LowRankLinear(30, 20, 5), LowRankConv2d(3, 8, 3, 4, padding=1)]
    inputs = [torch.randn(16, 30), torch.randn(4, 3, 8, 8)]
    for layer, x in zip(layers, inputs):
        layer.step_inputs = StepInputs()
        layer(x).square().sum().backward()
        reference = [p.grad.clone() for p in (layer.U, layer.S, layer.V)]
        layer.zero_grad(), layer.step_inputs.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        for p, ref in zip((layer.U, layer.S, layer.V), reference):
            assert p.dtype == p.grad.dtype == torch.float32
            assert torch.linalg.norm(p.grad - ref) <= 0.05 * torch.linalg.norm(ref)
        block = layer.project_gradient(torch.eye(layer.out_dim)[:, :2], torch.eye(layer.in_dim)[:, :2])
        assert block.dtype == torch.float32
