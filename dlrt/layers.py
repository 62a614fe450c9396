"""Low-rank layers W = U S V^T that never form W in the forward or backward pass.

A layer holds U (n_out x r), S (r x r) and V (n_in x r) as parameters. Its backward does not
produce the plain autograd gradients of U, S and V; it produces the three quantities the DLRT
integrators need, all taken at the current weight W0 with G = dL/dW:

    U.grad = G V      (the K-step gradient, dL/dK at K = U S)
    V.grad = G^T U    (the L-step gradient, dL/dL at L = V S^T)
    S.grad = U^T G V  (the S-step gradient in the current basis)

These are linear in G, so gradient accumulation and data-parallel averaging work on them as on
ordinary gradients. A layer whose `step_inputs` is a StepInputs (DLRTOptimizer gives one to each layer it
trains by a method that needs it) also records, in every backward, the input x and the output gradient dy:
from them `project_gradient` forms Ũ^T G Ṽ for bases Ũ, Ṽ chosen only after the backward. That is what
makes the rank-adaptive step a single forward/backward.

The layers know nothing of training: the optimizer swaps in new factors with `set_factors`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight


EXACT_SVD_MAX_DIM = 1024  # above this a full SVD takes minutes on a CPU (VGG16's 4096x25088: 84 s)

# How a new layer's factors are drawn:
#   svd      the truncated SVD of the weight torch's nn.Linear / nn.Conv2d would draw (the default)
#   authors  the published code's (COMPiLELab/DLRT-Net, optimizer_KLS/Linear_layer_lr_new.py and my_conv.py):
#            random orthonormal U and V, and S = diag of the r largest of 2r draws of |N(0, 1)|
INITS = ("svd", "authors")


def random_orthonormal(rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
    """A rows x cols matrix with orthonormal columns, uniformly distributed (Haar): the Q of a Gaussian
    matrix's QR with the signs of R's diagonal moved into Q."""
    Q, R = torch.linalg.qr(torch.randn(rows, cols, dtype=like.dtype, device=like.device))
    return Q * torch.sgn(R.diagonal()).where(R.diagonal() != 0, 1)


def sorted_half_normal(count: int, keep: int, like: torch.Tensor) -> torch.Tensor:
    """The `keep` largest of `count` draws of |N(0, 1)|, in descending order."""
    draws = torch.randn(count, dtype=like.dtype, device=like.device).abs()
    return draws.sort(descending=True).values[:keep]


def _authors_factors(n: int, m: int, rank: int, like: torch.Tensor):
    """The published code's initial factors at rank r: U, V random orthonormal, S the r largest of 2r |N(0,1)|."""
    if like.is_meta:
        return like.new_empty(n, rank), like.new_empty(rank, rank), like.new_empty(m, rank)
    U, V = random_orthonormal(n, rank, like), random_orthonormal(m, rank, like)
    return U, torch.diag(sorted_half_normal(2 * rank, rank, like)), V


def _orthonormal_factors(weight: torch.Tensor, rank: int):
    """Truncated SVD of a dense weight matrix: its best rank-r factors.

    Exact for matrices up to EXACT_SVD_MAX_DIM on the short side; above that a randomized SVD
    (oversampled, 4 power iterations) that finds the leading subspace to high accuracy in a second.
    """
    weight = weight.detach().float() if weight.dtype in (torch.float16, torch.bfloat16) else weight.detach()
    if weight.is_meta:  # shapes only: lets a model be checked without doing any arithmetic
        n, m = weight.shape
        return weight.new_empty(n, rank), weight.new_empty(rank, rank), weight.new_empty(m, rank)
    if min(weight.shape) <= EXACT_SVD_MAX_DIM or rank > min(weight.shape) // 2:
        U, sigma, Vh = torch.linalg.svd(weight, full_matrices=False)
        return U[:, :rank], torch.diag(sigma[:rank]), Vh[:rank].T
    U, sigma, V = torch.svd_lowrank(weight, q=min(rank + 10, min(weight.shape)), niter=4)
    return U[:, :rank], torch.diag(sigma[:rank]), V[:, :rank]


class StepInputs:
    """What a layer's backward records for project_gradient: (x, dy) of each backward pass of the current step, and
    `reference_S`, the sum of the S gradients those backwards gave (U^T G V before anyone edited S.grad): comparing it
    with S.grad at the step tells how the gradients were rescaled since (clipping, a GradScaler's unscale_).

    The records of a step start afresh in two ways, both explicit: `clear()` (DLRTOptimizer.zero_grad calls it),
    and a backward that finds the layer's U.grad None, i.e. after any zero_grad that set gradients to None
    (model.zero_grad() too). A zero_grad(set_to_none=False) other than the optimizer's leaves them: call
    clear() then. Several backwards between zero_grads accumulate, as their gradients do.
    """

    def __init__(self):
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reference_S: torch.Tensor | None = None

    def record(self, layer: "LowRankLayer", x: torch.Tensor, dy: torch.Tensor, grad_S: torch.Tensor | None) -> None:
        if layer.U.grad is None:  # the gradients were set to None since the last backward: a new step
            self.clear()
        self.records.append((x, dy))
        if grad_S is not None:
            grad_S = grad_S.detach().to(layer.S.dtype)
            self.reference_S = grad_S.clone() if self.reference_S is None else self.reference_S + grad_S

    def clear(self) -> None:
        self.records.clear()
        self.reference_S = None


def _in_forward_precision(saved, dy):
    """The backward computes in the forward's precision (bf16 under autocast, where h came out in bf16);
    autograd returns the gradients of the float32 factors in float32."""
    x, h, U, S, V = saved
    dtype = h.dtype
    return (x.to(dtype), h, U.to(dtype), S.to(dtype), V.to(dtype)), dy.to(dtype)


class LowRankLayer(nn.Module):
    """The base type of LowRankLinear and LowRankConv2d: factors, rank changes, state_dict with any rank."""

    out_dim: int  # n: rows of the weight matrix
    in_dim: int  # m: columns of the weight matrix

    def _init_factors(self, weight_matrix: torch.Tensor, rank: int, bias: torch.Tensor | None, init: str = "svd"):
        max_rank = min(self.out_dim, self.in_dim)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= max_rank:
            raise ValueError(
                f"rank {rank!r} is not possible for a {self.out_dim}x{self.in_dim} weight: "
                f"choose an integer 1 <= rank <= {max_rank}"
            )
        if init not in INITS:
            raise ValueError(f"unknown init {init!r}: choose one of {', '.join(INITS)}")
        if init == "authors":
            U, S, V = _authors_factors(self.out_dim, self.in_dim, rank, weight_matrix)
        else:
            U, S, V = _orthonormal_factors(weight_matrix, rank)
        self.U = nn.Parameter(U.contiguous())
        self.S = nn.Parameter(S.contiguous())
        self.V = nn.Parameter(V.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self.step_inputs: StepInputs | None = None  # None: the backward keeps nothing

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def max_rank(self) -> int:
        return min(self.out_dim, self.in_dim)

    weight_shape: tuple[int, ...]  # the dense layer's weight: (out_dim, in_dim), or a conv's kernels

    def dense_weight(self) -> torch.Tensor:
        """U S V^T in the shape of the dense layer's weight (nn.Linear's or nn.Conv2d's; `.flatten(1)` is the
        out_dim x in_dim matrix W). Formed for tests, metrics and export only: training never forms it."""
        return (self.U @ self.S @ self.V.T).reshape(self.weight_shape)

    @torch.no_grad()
    def set_factors(self, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> None:
        """Replace the factors, possibly at a new rank.

        At the same rank the Parameter objects stay and take the new values. At a new rank they are
        replaced by new Parameters: autograd caches a parameter's shape in its gradient accumulator,
        which lives as long as any old graph does, so resizing a parameter in place can break the next
        backward. Whoever holds the old Parameters (an optimizer) must take the new ones.
        """
        for name, value in (("U", U), ("S", S), ("V", V)):
            param = getattr(self, name)
            if param.shape == value.shape:
                param.copy_(value)
            else:
                setattr(self, name, nn.Parameter(value.contiguous(), requires_grad=param.requires_grad))

    # --- the inputs recorded by the backward for the rank-adaptive S-step ---------------------

    def project_gradient(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """left^T G right for the G of the backward passes recorded in `step_inputs`.

        Costs a projection of each recorded input and output gradient, never G.
        """
        if self.step_inputs is None or not self.step_inputs.records:
            raise RuntimeError(
                "project_gradient needs the inputs recorded by a backward pass: give the layer a StepInputs "
                "(layer.step_inputs = StepInputs(); DLRTOptimizer does so for method='adaptive') and call "
                "backward() first"
            )
        if not left.shape[1] or not right.shape[1]:  # a layer at full rank has no new directions to add
            return left.new_zeros(left.shape[1], right.shape[1])
        return sum(self._project(x, dy, left, right) for x, dy in self.step_inputs.records)

    # --- state_dict at whatever rank it was saved ----------------------------------------------

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The saved rank may differ from ours: take the saved shapes before copying values.
        shapes = {name: state_dict.get(prefix + name) for name in ("U", "S", "V")}
        if all(t is not None for t in shapes.values()):
            self.set_factors(*(getattr(self, name).new_empty(t.shape) for name, t in shapes.items()))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------


class _LowRankLinearFunction(torch.autograd.Function):
    """y = x V S^T U^T + b, with the DLRT gradients of the module docstring."""

    @staticmethod
    def forward(ctx, x, U, S, V, bias, layer):
        h = x @ V  # (B, r)
        # F.linear, not h @ K^T + bias: under autocast that would promote to float32. The cheaper order:
        # K = U S costs n r^2, h S^T costs B r^2 (at rank 1280 of 5120 and batch 500, 8.4 against 0.8 GMAC)
        if h.shape[0] < U.shape[0]:
            y = F.linear(F.linear(h, S), U, bias)
        else:
            y = F.linear(h, U @ S, bias)
        ctx.save_for_backward(x, h, U, S, V)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, h, U, S, V), dy = _in_forward_precision(ctx.saved_tensors, dy)
        needs_x, needs_U, needs_S, needs_V = ctx.needs_input_grad[:4]  # x: not for a first layer
        dz = dy @ U  # (B, r): gradient at z = h S^T
        grad_x = (dz @ S) @ V.T if needs_x else None
        grad_U = dy.T @ h if needs_U else None  # G V
        grad_V = x.T @ dz if needs_V else None  # G^T U
        grad_S = dz.T @ h if needs_S else None  # U^T G V
        grad_b = dy.sum(0) if ctx.has_bias else None
        if ctx.layer.step_inputs is not None:
            ctx.layer.step_inputs.record(ctx.layer, x, dy, grad_S)
        return grad_x, grad_U, grad_S, grad_V, grad_b, None


class LowRankLinear(LowRankLayer):
    """A linear layer y = x W^T + b with W = U S V^T of adaptable rank.

    init="svd": W drawn as nn.Linear would, then its best rank-r part (a sensible scale at any rank);
    init="authors": the published code's random factors (INITS). The bias is nn.Linear's either way.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, init: str = "svd"):
        self._factor(nn.Linear(in_features, out_features, bias=bias), rank, init)

    @classmethod
    def from_linear(cls, layer: nn.Linear, rank: int) -> "LowRankLinear":
        """The truncated SVD of an existing layer's weight; the bias is copied."""
        new = cls.__new__(cls)
        new._factor(layer, rank)
        return new.to(layer.weight.device, layer.weight.dtype)

    def _factor(self, dense: nn.Linear, rank: int, init: str = "svd") -> None:
        super().__init__()
        self.in_features, self.out_features = dense.in_features, dense.out_features
        self.out_dim, self.in_dim = dense.out_features, dense.in_features
        self.weight_shape = (self.out_features, self.in_features)
        self._init_factors(dense.weight.detach(), rank, dense.bias, init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = _LowRankLinearFunction.apply(x.reshape(-1, self.in_features), self.U, self.S, self.V, self.bias, self)
        return y.reshape(*lead, self.out_features)

    @staticmethod
    def _project(x, dy, left, right):
        x, dy = x.to(left.dtype), dy.to(left.dtype)  # kept in bf16 under autocast; the step is float32
        return (dy @ left).T @ (x @ right)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


# ---------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------


class _LowRankConv2dFunction(torch.autograd.Function):
    """y = (U S) * (V^T * x) + b: a k x k conv to r channels, then a 1x1 conv (never unfold)."""

    @staticmethod
    def forward(ctx, x, U, S, V, bias, layer):
        h = F.conv2d(x, layer._kernel(V), None, layer.stride, layer.padding, layer.dilation)
        y = F.conv2d(h, (U @ S)[:, :, None, None], bias)
        ctx.save_for_backward(x, h, U, S, V)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        (x, h, U, S, V), dy = _in_forward_precision(ctx.saved_tensors, dy)
        layer = ctx.layer
        # channels x pixels views: the 1x1 maps are batched matmuls (einsum would copy to permute)
        dy_flat, h_flat = dy.flatten(2), h.flatten(2)  # (B, C_out, L), (B, r, L)
        needs_x, needs_U, needs_S, needs_V = ctx.needs_input_grad[:4]  # x: not for a first layer
        dz = U.T @ dy_flat  # gradient at z = S h
        grad_x = grad_U = grad_S = grad_V = None
        if needs_x:
            dh = (S.T @ dz).view(h.shape)
            grad_x = conv2d_input(x.shape, layer._kernel(V), dh, layer.stride, layer.padding, layer.dilation)
        h_t = h_flat.transpose(1, 2)
        if needs_U:
            grad_U = (dy_flat @ h_t).sum(0)  # G V
        if needs_S:
            grad_S = (dz @ h_t).sum(0)  # U^T G V
        if needs_V:
            grad_V = conv2d_weight(x, (V.shape[1], *layer._kernel_shape), dz.view(h.shape), layer.stride,
                                   layer.padding, layer.dilation).reshape(V.shape[1], -1).T  # G^T U
        grad_b = dy.sum((0, 2, 3)) if ctx.has_bias else None
        if layer.step_inputs is not None:
            layer.step_inputs.record(layer, x, dy, grad_S)
        return grad_x, grad_U, grad_S, grad_V, grad_b, None


class LowRankConv2d(LowRankLayer):
    """A Conv2d whose kernel, read as the C_out x (C_in k k) matrix, is U S V^T of adaptable rank.

    init: as for LowRankLinear ("svd" of nn.Conv2d's draw, or the published code's "authors" factors)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, rank: int,
                 stride=1, padding=0, dilation=1, bias: bool = True, groups: int = 1,
                 padding_mode: str = "zeros", init: str = "svd"):
        dense = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode)
        self._factor(dense, rank, init)

    @classmethod
    def from_conv(cls, layer: nn.Conv2d, rank: int) -> "LowRankConv2d":
        """The truncated SVD of an existing conv's kernel matrix; the bias is copied."""
        new = cls.__new__(cls)
        new._factor(layer, rank)
        return new.to(layer.weight.device, layer.weight.dtype)

    def _factor(self, dense: nn.Conv2d, rank: int, init: str = "svd") -> None:
        if dense.groups != 1:
            raise ValueError(f"LowRankConv2d supports groups=1 only (got groups={dense.groups}): keep grouped convs dense")
        if dense.padding_mode != "zeros":
            raise ValueError(f"LowRankConv2d supports padding_mode='zeros' only (got {dense.padding_mode!r})")
        if isinstance(dense.padding, str):
            raise ValueError(f"LowRankConv2d needs numeric padding (got {dense.padding!r})")
        super().__init__()
        self.in_channels, self.out_channels = dense.in_channels, dense.out_channels
        self.kernel_size, self.stride = dense.kernel_size, dense.stride
        self.padding, self.dilation = dense.padding, dense.dilation
        self.out_dim, self.in_dim = dense.out_channels, dense.in_channels * math.prod(dense.kernel_size)
        self.weight_shape = (self.out_channels, self.in_channels, *self.kernel_size)
        self._init_factors(dense.weight.detach().reshape(dense.out_channels, -1), rank, dense.bias, init)

    @property
    def _kernel_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.kernel_size)

    def _kernel(self, V: torch.Tensor) -> torch.Tensor:
        """The r output channels of the k x k conv: V^T read as r kernels of shape C_in x k x k."""
        return V.T.reshape(V.shape[1], *self._kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LowRankConv2dFunction.apply(x, self.U, self.S, self.V, self.bias, self)

    def _project(self, x, dy, left, right):
        x, dy = x.to(left.dtype), dy.to(left.dtype)  # kept in bf16 under autocast; the step is float32
        dy_left = left.T @ dy.flatten(2)  # (B, r, L)
        x_right = F.conv2d(x, self._kernel(right), None, self.stride, self.padding, self.dilation).flatten(2)
        return (dy_left @ x_right.transpose(1, 2)).sum(0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, rank={self.rank}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")


def low_rank_layers(model: nn.Module) -> list[LowRankLayer]:
    """The low-rank layers of a model, in module order."""
    return [m for m in model.modules() if isinstance(m, LowRankLayer)]


