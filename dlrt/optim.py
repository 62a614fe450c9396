"""DLRTOptimizer: a torch optimizer that trains every low-rank layer of a model by DLRT.

    opt = DLRTOptimizer(model, lr=0.05, tau=0.15)          # rank-adaptive, plain SGD
    opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()

Methods (`METHODS`):
- ``adaptive``: the rank-adaptive augmented step (PAPER.md §1, the paper's default). All three
  gradients are taken at W0, so it needs one forward and one backward per batch.
- ``parallel``: the parallel rank-adaptive integrator (Ceruti, Kusch, Lubich, Sulz 2024): K, L and S
  updates from the same point, augmented core [[S̄, L1^T Ṽ], [Ũ^T K1, 0]]. One pass.
- ``fixed``: fixed-rank KLS. Its basis update moves W, so its S-step needs a second pass: give
  `step` a closure that recomputes the loss and its gradients.
- ``s_only``: U and V frozen, S trained (the fine-tuning phase of the paper's ImageNet protocol).
- ``vanilla``: plain factorised training W = U V^T by simultaneous gradient steps on U and V (the
  naive baseline of the paper); the singular values are absorbed into U and V at construction.

`svd_on`: where the SVDs of the augmented cores are taken, "device" (with the factors), "host" (LAPACK on
one CPU thread, the cores copied over and back in one copy each) or "auto": on the host for a GPU step whose
cores are all at most HOST_SVD_MAX_SIZE, else on the device. On a GPU, torch's SVD synchronises twice per
call; small cores cost LAPACK less than that (dlrt-bench --svd-on compares them).

Parameters that are not low-rank (biases, dense layers, norms) are stepped once per batch, with the
S-step, by an ordinary torch optimizer (`dense_optimizer`), by default the same rule with the same lr.
The low-rank learning rate is `param_groups[0]["lr"]`; the dense optimizer's groups follow it in
`param_groups`, so torch's LR schedulers drive both.

A step is `prepare_step` (everything up to the truncation decisions), one read of the new ranks on the
host, and `finish_step`. prepare_step is `prepare_cores` (the augmented cores) and
`decide_ranks` (their SVDs and the new ranks): dlrt.graphs replays prepare_cores and finish_step from CUDA
graphs and runs decide_ranks eagerly, because torch's CUDA SVD checks its result on the host.

Data parallel: when torch.distributed is initialised, `step` averages all gradients (and the adaptive
step's Ũ^T G Ṽ blocks) over the workers and takes rank 0's buffers, so do not wrap the model in
DistributedDataParallel (a rank change replaces parameters, which DDP cannot follow).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from . import integrators as ig
from .layers import low_rank_layers
from .update_rules import STATE_POLICIES, change_basis, lift_state, make_rule

METHODS = ("adaptive", "parallel", "fixed", "s_only", "vanilla")
SVD_PLACES = ("auto", "device", "host")
# svd_on="auto" takes the SVDs of a GPU step's cores on the host when none is larger than this. On an H100 the
# host was quicker at LeNet5's (18-56) and the FC net's (70-106) cores, the GPU at the timing study's 160 and up
# (results/bench/gpu/README.md).
HOST_SVD_MAX_SIZE = 128


class DLRTOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        model: nn.Module,
        lr: float,
        tau: float = 0.1,
        method: str = "adaptive",
        optimizer: str = "sgd",
        momentum: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        absolute_tau: bool = False,
        r_min: int = 2,
        r_max: int | None = None,
        state_policy: str = "project",
        dense_optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer] | None = None,
        svd_on: str = "auto",
    ):
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if state_policy not in STATE_POLICIES:
            raise ValueError(f"unknown state_policy {state_policy!r}: choose one of {', '.join(STATE_POLICIES)}")
        if not lr >= 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if absolute_tau and not tau >= 0:
            raise ValueError(f"an absolute tau must be >= 0, got {tau}")
        if not absolute_tau and not 0 <= tau < 1:
            raise ValueError(f"tau (relative truncation tolerance) must be in [0, 1), got {tau}")
        if svd_on not in SVD_PLACES:
            raise ValueError(f"unknown svd_on {svd_on!r}: choose one of {', '.join(SVD_PLACES)}")
        if r_min < 1 or (r_max is not None and r_max < r_min):
            raise ValueError(f"need 1 <= r_min <= r_max, got r_min={r_min}, r_max={r_max}")

        self.layers = low_rank_layers(model)
        self._model = model
        dist = torch.distributed
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.method, self.tau, self.absolute_tau = method, tau, absolute_tau
        self.state_policy = state_policy
        self.svd_on = svd_on
        self.rule = make_rule(optimizer, momentum, betas, eps)
        self._r_min = [min(r_min, layer.max_rank) for layer in self.layers]
        self._r_max = [layer.max_rank // 2 if r_max is None else min(r_max, layer.max_rank) for layer in self.layers]
        self._bounds_cache = None  # (key, r_min, r_max tensors), see _rank_bounds

        factors = [p for layer in self.layers for p in (layer.U, layer.S, layer.V)]
        factor_ids = {id(p) for p in factors}
        dense_params = [p for p in model.parameters() if id(p) not in factor_ids and p.requires_grad]
        super().__init__([{"params": factors, "name": "low_rank"}], {"lr": lr})
        self.dense_optimizer = self._make_dense_optimizer(dense_optimizer, dense_params, optimizer, lr, momentum, betas, eps)
        self.param_groups.extend(self.dense_optimizer.param_groups)

        for layer in self.layers:
            layer.keep_step_inputs = method == "adaptive"
        if method == "vanilla":
            self._absorb_singular_values()
        self.layer_states = [self._fresh_layer_state(layer) for layer in self.layers]

    # ------------------------------------------------------------------------------------------
    # set-up
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _make_dense_optimizer(given, params, rule, lr, momentum, betas, eps):
        if isinstance(given, torch.optim.Optimizer):
            return given
        if given is not None:
            return given(params)
        # torch refuses an empty parameter list; a placeholder keeps the code paths uniform
        params = params or [torch.zeros(0, requires_grad=True)]
        # Fused kernels step all the small tensors (biases, a classifier) in one call: on a CPU that is
        # 0.06 against 0.15 ms (foreach) for the FC net's. Torch has them for floating tensors on a CPU or GPU.
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        if rule == "adam":  # capturable: its step counts stay on the GPU, so a CUDA graph can hold the step
            capturable = fused and all(p.is_cuda for p in params)
            return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps, fused=fused, capturable=capturable)
        return torch.optim.SGD(params, lr=lr, momentum=momentum, fused=fused)

    @torch.no_grad()
    def _absorb_singular_values(self):
        """W = U S V^T -> (U √S)(V √S)^T with S = I: the factorisation vanilla training steps on."""
        for layer in self.layers:
            P, sigma, Qh = torch.linalg.svd(layer.S)
            root = sigma.sqrt()
            layer.set_factors(layer.U @ P * root, torch.eye(layer.rank, dtype=layer.S.dtype, device=layer.S.device),
                              layer.V @ Qh.T * root)

    def _fresh_layer_state(self, layer) -> dict:
        # K and L states have the shapes of U and V (n x r, m x r), the S state that of S
        return {"K": self.rule.init_state(layer.U, rows_share_state=True),
                "L": self.rule.init_state(layer.V, rows_share_state=True),
                "S": self.rule.init_state(layer.S)}

    @property
    def lr(self) -> float:
        return self.param_groups[0]["lr"]

    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def step_settings(self) -> tuple:
        """Every Python number a step reads: the ranks, ϑ, the rank bounds, the update rule's and every param
        group's settings (learning rates included). A graphed step (dlrt.graphs) keeps the numbers it was
        captured with, so it is captured anew whenever this changes."""
        plain = (int, float, bool, str, tuple, type(None))
        groups = tuple(tuple(sorted((k, v) for k, v in group.items() if k != "params" and isinstance(v, plain)))
                       for group in self.param_groups)
        return (tuple(self.ranks()), self.method, self.tau, self.absolute_tau, tuple(self._r_min),
                tuple(self._r_max), tuple(sorted(vars(self.rule).items())), self.state_policy, groups)

    def _refresh_factor_params(self) -> None:
        """Point the low-rank group at the layers' current factors (a rank change makes new Parameters)."""
        self.param_groups[0]["params"] = [p for layer in self.layers for p in (layer.U, layer.S, layer.V)]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._refresh_factor_params()
        super().zero_grad(set_to_none)
        for layer in self.layers:
            layer.clear_step_inputs()

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------

    def _has_gradients(self) -> bool:
        return any(p.grad is not None for group in self.param_groups for p in group["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One DLRT step from the gradients of the last backward.

        closure: recomputes the loss and calls backward (zeroing gradients first). Required by
        method='fixed' for its second pass; for the other methods it is called only when no
        gradients are present yet.
        """
        self._refresh_factor_params()
        loss = None
        if closure is not None and not self._has_gradients():
            with torch.enable_grad():
                loss = closure()
        if self.method == "fixed":
            if closure is None:
                raise RuntimeError("method='fixed' needs step(closure): its S-step is taken at the moved basis")
            self._synchronise_workers()
            return self._fixed_rank_step(closure)
        plan = self.prepare_step()
        self.finish_step(plan, plan.new_ranks.tolist() if plan.new_ranks is not None else None)
        return loss

    @torch.no_grad()
    def prepare_step(self) -> StepPlan:
        """The first half of a step: everything up to the truncation decisions (plan.new_ranks).

        `step` is prepare_step, one read of the new ranks (`plan.new_ranks.tolist()`), finish_step.
        prepare_step is prepare_cores then decide_ranks. They are public for graphed steps (dlrt.graphs).
        Not for 'fixed'.
        """
        plan = self.prepare_cores()
        self.decide_ranks(plan)
        return plan

    @torch.no_grad()
    def prepare_cores(self) -> StepPlan:
        """Phases 1-2 of the rank-adaptive step for all active layers: the new directions, and the S-step at
        the augmented bases (the cores). Nothing in it reads a device value on the host."""
        if self.method == "fixed":
            raise RuntimeError("method='fixed' takes a second pass inside step(closure): it has no prepare_step")
        self._refresh_factor_params()
        self._synchronise_workers()
        plan = StepPlan(active=[i for i, layer in enumerate(self.layers) if layer.U.grad is not None])
        if self.method in ("adaptive", "parallel") and plan.active:
            self._plan_cores(plan)
        return plan

    @torch.no_grad()
    def decide_ranks(self, plan: StepPlan) -> None:
        """Phase 3: the SVD of each core and all truncation decisions as one tensor (plan.svds,
        plan.new_ranks; the ranks stay where the SVDs were taken, see svd_on). A no-op for the methods that keep
        ranks."""
        if not plan.cores:
            return
        if self._svds_on_host(plan):
            self._decide_ranks_on_host(plan)
            return
        plan.svds = {i: ig.gram_svd(S1) if plan.via_gram else ig.svd(S1) for i, S1 in plan.cores.items()}
        plan.new_ranks = ig.truncation_rank_tensor(
            [plan.svds[i][1] for i in plan.active], self.tau, not self.absolute_tau,
            *self._rank_bounds(plan.active, plan.cores[plan.active[0]].device))

    def _svds_on_host(self, plan: StepPlan) -> bool:
        if self.svd_on != "auto":
            return self.svd_on == "host"
        cores = [plan.cores[i] for i in plan.active]
        return cores[0].is_cuda and max(core.shape[0] for core in cores) <= HOST_SVD_MAX_SIZE

    def _decide_ranks_on_host(self, plan: StepPlan) -> None:
        """decide_ranks with the SVDs (ig.svds_on_host) and the truncation on the host: the copy of the cores
        is the step's one host sync, and the ranks are read for free."""
        svds, sigmas = ig.svds_on_host([plan.cores[i] for i in plan.active])
        plan.svds = dict(zip(plan.active, svds))
        plan.new_ranks = ig.truncation_rank_tensor(sigmas, self.tau, not self.absolute_tau,
                                                   *self._rank_bounds(plan.active, sigmas[0].device))

    @torch.no_grad()
    def finish_step(self, plan: StepPlan, new_ranks: list[int] | None) -> None:
        """The second half of a step: the factors at `new_ranks` (one per active layer, from
        plan.new_ranks; None for the methods that keep ranks), the S-, U- and V-steps, the dense parameters."""
        if self.method in ("adaptive", "parallel"):
            if plan.active:
                self._truncate(plan, new_ranks)
        elif self.method == "s_only":
            self._s_steps(plan.active)
        else:
            self._vanilla_step(plan.active)
        self.dense_optimizer.step()
        for layer in self.layers:
            layer.clear_step_inputs()
        self._refresh_factor_params()

    def _synchronise_workers(self) -> None:
        """Data parallel: average every gradient over the workers and take rank 0's buffers (BatchNorm
        statistics), as DistributedDataParallel would. Every worker then computes the same step and takes
        the same truncation decisions from the same numbers."""
        if self.world_size <= 1:
            return
        _all_reduce_mean([p.grad for group in self.param_groups for p in group["params"] if p.grad is not None])
        buffers = [b for b in self._model.buffers() if b.is_floating_point() or b.dtype == torch.long]
        if buffers:
            flat = torch.cat([b.reshape(-1).to(torch.float64) for b in buffers])
            torch.distributed.broadcast(flat, src=0)
            for b, value in zip(buffers, flat.split([b.numel() for b in buffers])):
                b.copy_(value.reshape(b.shape))

    def _directions(self, active: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """dK, dL per active layer, from the gradients G V0 (in U.grad) and G^T U0 (in V.grad)."""
        states = [self.layer_states[i]["K"] for i in active] + [self.layer_states[i]["L"] for i in active]
        grads = [self.layers[i].U.grad for i in active] + [self.layers[i].V.grad for i in active]
        found = self.rule.directions(states, grads)
        return dict(zip(active, zip(found[: len(active)], found[len(active):])))

    def _s_directions(self, active: list[int], grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.rule.directions([self.layer_states[i]["S"] for i in active], grads)

    def _plan_cores(self, plan: StepPlan) -> None:
        active = plan.active
        factor = self.layers[active[0]].U
        on_cpu = takes_host_checked_shortcuts(factor)
        # The Gram route, in float64, is as accurate as a float32 SVD, not as a float64 one.
        plan.via_gram = on_cpu and factor.dtype != torch.float64
        steps = self._directions(active)
        for i in active:  # phase 1: the new directions Ũ, Ṽ from the K- and L-step directions
            layer, (dK, dL) = self.layers[i], steps[i]
            count = ig.augmentation_size(layer.rank, layer.out_dim, layer.in_dim)
            plan.new_bases[i] = (ig.new_directions(layer.U.detach(), dK, count, projected=on_cpu),
                                 ig.new_directions(layer.V.detach(), dL, count, projected=on_cpu))
        plan.cores = self._augmented_cores(active, steps, plan.new_bases)  # phase 2: the S-step

    def _truncate(self, plan: StepPlan, new_ranks: list[int]) -> None:
        """Phase 4: new factors and state in the new bases."""
        for i, r1 in zip(plan.active, new_ranks):
            layer, state = self.layers[i], self.layer_states[i]
            r0 = layer.rank
            P, sigma, Qh = plan.svds[i]
            if plan.via_gram and not ig.gram_svd_accurate(sigma, r1):
                P, sigma, Qh = ig.svd(plan.cores[i])
            P1, Q1 = P[:, :r1], Qh[:r1].T
            U_new, V_new = plan.new_bases[i]
            layer.set_factors(ig.rotate(layer.U.detach(), U_new, P1), torch.diag(sigma[:r1]),
                              ig.rotate(layer.V.detach(), V_new, Q1))
            policy = self.state_policy
            state["K"] = change_basis(state["K"], self.rule, policy, None, Q1[:r0])  # V0^T V1
            state["L"] = change_basis(state["L"], self.rule, policy, None, P1[:r0])  # U0^T U1
            state["S"] = change_basis(state["S"], self.rule, policy, P1, Q1)

    def _augmented_cores(self, active: list[int], steps: dict, new_bases: dict) -> dict[int, torch.Tensor]:
        """S1 per layer, the S-step at the augmented bases [U0, Ũ], [V0, Ṽ]; lifts the S states to them."""
        layers, states, lr = self.layers, self.layer_states, self.lr
        if self.method == "adaptive":  # the gradient at the augmented basis, Ũ^T G Ṽ from the backward's inputs
            blocks = [layers[i].project_gradient(*new_bases[i]) for i in active]
            if self.world_size > 1:
                _all_reduce_mean(blocks)
            grads = [ig.augmented_gradient(layers[i].S.grad, layers[i].U.grad, layers[i].V.grad, *new_bases[i], block)
                     for i, block in zip(active, blocks)]
            for i, grad in zip(active, grads):
                states[i]["S"] = lift_state(states[i]["S"], grad.shape[0])
            return {i: ig.augmented_core(layers[i].S.detach(), grad.shape[0]) - lr * dS
                    for i, grad, dS in zip(active, grads, self._s_directions(active, grads))}
        cores = {}  # parallel: S̄ in the old basis, bordered by the K- and L-steps
        for i, dS in zip(active, self._s_directions(active, [layers[i].S.grad for i in active])):
            cores[i] = ig.parallel_core(layers[i].S.detach() - lr * dS, *steps[i], *new_bases[i], lr)
            states[i]["S"] = lift_state(states[i]["S"], cores[i].shape[0])
        return cores

    def _rank_bounds(self, active: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """r_min and r_max of the active layers as tensors on the device, made once (no copy per step)."""
        key = (tuple(active), tuple(self._r_min[i] for i in active), tuple(self._r_max[i] for i in active), device)
        if self._bounds_cache is None or self._bounds_cache[0] != key:
            self._bounds_cache = (key, torch.tensor(key[1], device=device), torch.tensor(key[2], device=device))
        return self._bounds_cache[1], self._bounds_cache[2]

    def _fixed_rank_step(self, closure):
        lr, policy = self.lr, self.state_policy
        active = [i for i, layer in enumerate(self.layers) if layer.U.grad is not None]
        directions = self._directions(active)
        for i in active:  # basis update from the first pass
            layer, state = self.layers[i], self.layer_states[i]
            U0, S0, V0 = layer.U.detach(), layer.S.detach(), layer.V.detach()
            dK, dL = directions[i]
            U1, S_tilde, V1, U_overlap, V_overlap = ig.fixed_rank_basis(
                U0, S0, V0, ig.k_step(U0, S0, dK, lr), ig.l_step(V0, S0, dL, lr))
            layer.set_factors(U1, S_tilde, V1)
            state["K"] = change_basis(state["K"], self.rule, policy, None, V_overlap)
            state["L"] = change_basis(state["L"], self.rule, policy, None, U_overlap)
            state["S"] = change_basis(state["S"], self.rule, policy, U_overlap, V_overlap)
        self.zero_grad()
        # Second pass, at the new bases. It needs only S.grad (and the dense parameters' gradients):
        # with U and V frozen the backward skips G V and G^T U, a third of a low-rank layer's backward.
        with torch.enable_grad(), _frozen([p for i in active for p in (self.layers[i].U, self.layers[i].V)]):
            loss = closure()
        self._synchronise_workers()
        self._s_steps(active)
        self.dense_optimizer.step()
        self._refresh_factor_params()
        return loss

    def _s_steps(self, active: list[int]) -> None:
        active = [i for i in active if self.layers[i].S.grad is not None]
        for i, dS in zip(active, self._s_directions(active, [self.layers[i].S.grad for i in active])):
            self.layers[i].S.sub_(self.lr * dS)

    def _vanilla_step(self, active: list[int]) -> None:
        # With S = I the layer's U.grad = G V and V.grad = G^T U are exactly dL/dU and dL/dV.
        for i, (dU, dV) in self._directions(active).items():
            self.layers[i].U.sub_(self.lr * dU)
            self.layers[i].V.sub_(self.lr * dV)

    # ------------------------------------------------------------------------------------------
    # state_dict
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "low_rank_lr": self.lr,
            "layer_states": [{k: dict(v) for k, v in s.items()} for s in self.layer_states],
            "dense": self.dense_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if len(state_dict["layer_states"]) != len(self.layers):
            raise ValueError(
                f"optimizer state has {len(state_dict['layer_states'])} low-rank layers, this model {len(self.layers)}"
            )
        self.param_groups[0]["lr"] = state_dict["low_rank_lr"]
        device = self.layers[0].U.device if self.layers else None
        self.layer_states = [
            {k: {name: v.to(device) if isinstance(v, torch.Tensor) else v for name, v in entry.items()}
             for k, entry in s.items()}
            for s in state_dict["layer_states"]
        ]
        self.dense_optimizer.load_state_dict(state_dict["dense"])


@dataclass
class StepPlan:
    """What the first half of a step hands to the second: the active layers and, for the rank-adaptive
    methods, their new directions, augmented cores, SVDs and the new ranks as a device tensor."""

    active: list[int]
    new_bases: dict = field(default_factory=dict)
    cores: dict = field(default_factory=dict)
    svds: dict = field(default_factory=dict)
    via_gram: bool = False
    new_ranks: torch.Tensor | None = None


def takes_host_checked_shortcuts(factor: torch.Tensor) -> bool:
    """Whether the rank-adaptive step uses the QR and SVD variants that check their own accuracy
    (`new_directions(projected=True)`, `gram_svd`). The checks need a host sync each: free on a CPU, where
    these variants are faster. On a GPU the plain calls were faster (results/bench/gpu/linalg.txt), and the
    QR's checks could not be held by a CUDA graph."""
    return factor.device.type == "cpu"


@contextlib.contextmanager
def _frozen(params: list[nn.Parameter]):
    """requires_grad off for these parameters inside the block, back to what it was after."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _all_reduce_mean(tensors: list[torch.Tensor]) -> None:
    """Average tensors over the workers in place, with one collective for all of them."""
    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    for t, value in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(value.reshape(t.shape))
