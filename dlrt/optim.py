"""DLRTOptimizer: a torch optimizer that trains every low-rank layer of a model by DLRT.

    opt = DLRTOptimizer(model, lr=0.05, tau=0.15)          # rank-adaptive, plain SGD
    opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()

Methods (dlrt.functional.METHODS): ``adaptive`` (the paper's rank-adaptive step, one forward and one backward
per batch), ``parallel`` (the parallel rank-adaptive integrator of Ceruti, Kusch, Lubich and Sulz, 2024; one
pass), ``fixed`` (fixed-rank KLS: its S-step is taken at the moved basis, so `step` needs a closure that
recomputes the loss and its gradients), ``s_only`` (U and V frozen, S trained) and ``vanilla`` (plain
factorised training W = U V^T, the paper's naive baseline; the singular values are absorbed into U and V at
construction; s_only sets requires_grad=False on U and V, so the backward skips their gradients).

As in torch.optim, every hyperparameter lives in `param_groups`: lr, tau (ϑ), absolute_tau, r_min, r_max,
state_policy, basis_every (dlrt.basis_cycle) and the update rule's (optimizer: sgd, with momentum, or adam, with
betas and eps; as in torch's SGD and Adam a group holds its rule's keys only, so torch's schedulers cycle momentum or
beta1 as they do there). A group holds low-rank layers ("layers") and their current factors ("params"); per-group values are honoured, so convs and linears
can have their own ϑ, and a scheduler can drive any of them. The parameters that are not low-rank (biases,
dense layers, norms) are stepped once per batch, with the S-step, by an ordinary torch optimizer
(`dense_optimizer`, by default the same rule with the same lr), whose groups follow the low-rank ones in
`param_groups`, so torch's LR schedulers drive both. The optimizer state of a layer (`state[layer]`) is the
update rule's state of K, L and S, as matrices in the layer's current bases; `state_policy` says what happens
to it when the bases rotate (dlrt.update_rules).

`step(closure)` calls the closure first, as torch documents: the closure zeroes the gradients, recomputes
the loss, calls backward and returns the loss. `fixed` calls it a second time, at the moved basis.

A step is `prepare_step` (everything up to the truncation decisions), one read of the new ranks on the
host, and `finish_step`; prepare_step is `prepare_cores` then `decide_ranks` (the SVDs). dlrt.graphs replays
prepare_cores and finish_step from CUDA graphs and runs decide_ranks eagerly, because torch's CUDA SVD checks
its result on the host.

`svd_on`: where the cores' SVDs are taken, "device", "host" (LAPACK on one CPU thread, the cores copied over
and back in one copy each) or "auto": on the host for a GPU step whose cores are all at most
HOST_SVD_MAX_SIZE. `checked_shortcuts`: whether to take the CPU's self-checking QRs (dlrt.linalg); None chooses by
device. `layerwise`: whether a rank-adaptive step runs one layer at a time (less memory, the same results); None: on
a CPU for large factors (dlrt.functional.LAYERWISE_MIN_BYTES).

Data parallel: when torch.distributed is initialised, `step` averages all gradients (and the adaptive step's
Ũ^T G Ṽ blocks) over the workers and takes rank 0's buffers (dlrt.distributed), so do not wrap the model in
DistributedDataParallel.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Callable, Iterable

import torch
from torch import nn

from . import basis_cycle
from . import functional as fns
from .basis_cycle import BASIS_CLOCK, check_basis_every, is_basis_step
from . import linalg
from .conversion import check_not_merged
from .distributed import all_reduce_mean, broadcast_buffers, world_size
from .groups import (bounds, check_hyperparameters, factors, groups_of, layers_of, make_defaults,
                     make_dense_optimizer, rule_key)
from .layers import StepInputs, _LowRankLayer
from .update_rules import make_rule

METHODS = tuple(fns.METHODS)
SVD_PLACES = ("auto", "device", "host")
# svd_on="auto" takes the SVDs of a GPU step's cores on the host when none is larger than this. On an H100 the
# host was quicker at LeNet5's (18-56) and the FC net's (70-106) cores, the GPU at the timing study's 160 and up
# (results/bench/gpu/README.md).
HOST_SVD_MAX_SIZE = 128
LOW_RANK_KEYS = ("layers", "params")  # the keys of a low-rank group that are not hyperparameters


class DLRTOptimizer(torch.optim.Optimizer):
    def __init__(
        self,
        params: nn.Module | Iterable[dict],
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
        basis_every: int = 1,
        dense_optimizer: torch.optim.Optimizer | Callable[[list], torch.optim.Optimizer] | None = None,
        svd_on: str = "auto",
        checked_shortcuts: bool | None = None,
        layerwise: bool | None = None,
    ):
        """params: the model, or a list of groups {"params": a module or modules, <hyperparameter>: value, ...}
        whose low-rank layers form one param group each."""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
        if svd_on not in SVD_PLACES:
            raise ValueError(f"unknown svd_on {svd_on!r}: choose one of {', '.join(SVD_PLACES)}")
        self.method, self._method = method, fns.METHODS[method]
        self.svd_on, self.checked_shortcuts, self.layerwise = svd_on, checked_shortcuts, layerwise
        self.world_size = world_size()
        defaults = make_defaults(lr=lr, tau=tau, absolute_tau=absolute_tau, r_min=r_min, r_max=r_max,
                                 state_policy=state_policy, optimizer=optimizer, momentum=momentum, betas=betas, eps=eps,
                                 basis_every=basis_every)
        check_hyperparameters(defaults)
        check_basis_every(defaults["basis_every"], method)
        groups, modules = groups_of(params)
        self._modules = modules
        self._layers: list[_LowRankLayer] = []  # in the order given, whatever groups they move between
        super().__init__(groups, defaults)
        factor_ids = {id(p) for layer in self.layers for p in (layer.U, layer.S, layer.V)}
        seen, dense_params = set(factor_ids), []
        for module in modules:
            for p in module.parameters():
                if id(p) not in seen and p.requires_grad:
                    seen.add(id(p))
                    dense_params.append(p)
        self.dense_optimizer = make_dense_optimizer(dense_optimizer, dense_params, defaults)
        self.param_groups = self.param_groups + self.dense_optimizer.param_groups
        if method == "vanilla":
            fns.absorb_singular_values(self.layers)
        if method == "s_only":  # U and V stay: the backward need not compute their gradients
            for layer in self.layers:
                layer.U.requires_grad_(False)
                layer.V.requires_grad_(False)

    # ------------------------------------------------------------------------------------------
    # groups, layers and their bounds
    # ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict) -> None:
        """A group with "layers" (low-rank layers, or modules holding them) is stepped by DLRT; any other group
        (plain tensors in "params") by the dense optimizer."""
        if "layers" not in param_group:
            self.dense_optimizer.add_param_group(param_group)
            self.param_groups = self.low_rank_groups + self.dense_optimizer.param_groups
            return
        group = dict(param_group)
        group["layers"] = layers_of(group["layers"])
        taken = {id(layer) for g in self.low_rank_groups for layer in g["layers"]}
        if any(id(layer) in taken for layer in group["layers"]):
            raise ValueError("a low-rank layer is in more than one param group")
        group["params"] = factors(group["layers"])
        for key, value in self.defaults.items():
            group.setdefault(key, value)
        group.setdefault(BASIS_CLOCK, 0)
        check_hyperparameters(group)
        check_basis_every(group["basis_every"], self.method)
        self.param_groups.insert(len(self.low_rank_groups), group)
        self._ready_for_next_step(group)
        self._layers += group["layers"]

    @property
    def low_rank_groups(self) -> list[dict]:
        return [group for group in self.param_groups if "layers" in group]

    @property
    def layers(self) -> list[_LowRankLayer]:
        """Every low-rank layer, in the order they were given (the model's order)."""
        return list(self._layers)

    @property
    def lr(self) -> float:
        """The learning rate of the first param group."""
        return self.param_groups[0]["lr"]

    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def rank_bounds(self) -> list[tuple[int, int]]:
        """(r_min, r_max) of every layer, as the truncation applies them (its group's, capped by its size)."""
        return [bounds(layer, self._group_of(layer)) for layer in self._layers]

    def _group_of(self, layer: _LowRankLayer) -> dict:
        return next(g for g in self.low_rank_groups if any(item is layer for item in g["layers"]))

    def set_rank_bounds(self, layer: _LowRankLayer, r_min: int, r_max: int | None) -> None:
        """Give one layer its own rank bounds: it moves into a param group of its own (a copy of its group's
        hyperparameters) unless it is alone in its group already. Call it before making a scheduler, which
        counts the groups."""
        group = self._group_of(layer)
        if len(group["layers"]) > 1:
            group["layers"] = [item for item in group["layers"] if item is not layer]
            group["params"] = factors(group["layers"])
            own = {key: value for key, value in group.items() if key not in LOW_RANK_KEYS}
            own.update(layers=[layer], params=factors([layer]))
            self.param_groups.insert(self.param_groups.index(group) + 1, own)
            group = own
        group["r_min"], group["r_max"] = r_min, r_max
        check_hyperparameters(group)

    def _refresh_factor_params(self) -> None:
        """Point each low-rank group at its layers' current factors (a rank change makes new Parameters)."""
        for group in self.low_rank_groups:
            group["params"] = factors(group["layers"])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._refresh_factor_params()
        super().zero_grad(set_to_none)
        for layer in self.layers:
            if layer.step_inputs is not None:
                layer.step_inputs.clear()

    # ------------------------------------------------------------------------------------------
    # the step
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One DLRT step. closure (as in torch.optim): zeroes the gradients, recomputes the loss, calls backward
        and returns the loss. It is called first; method='fixed' calls it again at the moved basis."""
        check_not_merged(self._layers)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._method.passes == 2:
            self._two_pass_step(closure)
        elif self._steps_layer_by_layer():
            self._layer_by_layer_step()
        else:
            plan = self.prepare_step()
            with fns.part("rank_sync"):  # the step's one read of a device value on the host
                new_ranks = plan.new_ranks.tolist() if plan.new_ranks is not None else None
            self.warn_unhonoured_edits(plan.edits_unhonoured)
            self.finish_step(plan, new_ranks)
        self.schedule_next_step()
        return loss

    @torch.no_grad()
    def truncate(self) -> None:
        """Truncate now the layers of every group with basis_every > 1, which between basis steps hold the augmented
        bases of the last one (about twice their rank; dlrt.basis_cycle): before an evaluation, a checkpoint one
        reports from, or an export. The other groups' steps end truncated: nothing to do for them. A truncated group's
        next step is a basis step: a cycle starts afresh."""
        groups = [group for group in self.low_rank_groups if group["basis_every"] > 1]
        steps = [fns.LayerStep(layer, self._state_of(layer, group), group, *bounds(layer, group), in_cycle=True)
                 for group in groups for layer in group["layers"]]
        if steps:  # the SVDs and rank decisions of a basis step's first half, one host read for all layers
            plan = fns.StepPlan(steps)
            self.decide_ranks(plan)
            for step, r1 in zip(steps, plan.new_ranks.tolist()):
                basis_cycle.truncate(step, r1)
        for group in groups:
            group[BASIS_CLOCK] = 0
            self._ready_for_next_step(group)
        self._refresh_factor_params()

    def schedule_next_step(self) -> None:
        """Count the step in every group's basis cycle and ready its layers for their next step. `step` calls it;
        dlrt.graphs calls it after a step replayed from a graph, which runs no Python."""
        for group in self.low_rank_groups:
            group[BASIS_CLOCK] = (group[BASIS_CLOCK] + 1) % group["basis_every"]
            self._ready_for_next_step(group)

    def _ready_for_next_step(self, group: dict) -> None:
        """What the backward must give the group's next step: a basis step needs G V, G^T U (and, for `adaptive`, the
        recorded x and dy); a coefficient step only U^T G V, so U and V are frozen for it (requires_grad=False) and
        the backward skips their gradients, as for s_only."""
        basis = is_basis_step(group)
        for layer in group["layers"]:
            layer.step_inputs = StepInputs() if basis and self._method.records_step_inputs else None
            if group["basis_every"] > 1:
                layer.U.requires_grad_(basis)
                layer.V.requires_grad_(basis)

    def warn_unhonoured_edits(self, edits_unhonoured: torch.Tensor | None) -> None:
        """Warn once when a layer's S.grad was edited other than by a uniform rescaling (note_gradient_edits)."""
        if edits_unhonoured is None or self.__dict__.get("_warned_edits") or not bool(edits_unhonoured):
            return
        self._warned_edits = True
        warnings.warn("DLRTOptimizer: the S gradient of a low-rank layer was changed since the backward other than by "
                      "rescaling all of it (a gradient hook, clip_grad_value_?): its rank-adaptive step forms Ũ^T G Ṽ "
                      "from the inputs the backward recorded, scaled by the best uniform factor, so that block of the "
                      "step is approximate. Rescalings (clip_grad_norm_, GradScaler.unscale_) are honoured exactly; "
                      "method='parallel' uses the gradients alone.", RuntimeWarning, stacklevel=3)

    def _steps_layer_by_layer(self) -> bool:
        """Whether a rank-adaptive step is taken one layer at a time (on a CPU, when the factors are large): the
        same results bit for bit with less memory (docs/performance.md); the factors' gradients are None after it."""
        if not self._method.changes_ranks or not any(map(is_basis_step, self.low_rank_groups)):
            return False
        return self.layerwise if self.layerwise is not None else fns.large_cpu_factors(self.layers)

    def _layer_by_layer_step(self) -> None:
        self._refresh_factor_params()
        steps, coefficient_steps = self._layer_steps()
        edits_unhonoured = fns.note_gradient_edits(steps)
        self._synchronise_workers()
        self.warn_unhonoured_edits(edits_unhonoured)
        # Smallest factors first: a layer's step makes temporaries in proportion to its factors, so the largest run
        # last, when the most recorded x and dy and gradients are freed (timing study, rank 640: 298 MiB, 324 with
        # its first layer, the smallest, last; VGG16: the convs' records go before the classifier's step).
        steps = sorted(steps, key=lambda step: -fns.factor_numel(step.layer))
        while steps:  # popped from the end, so that a finished layer's bases, core and SVD are freed with its plan
            plan = fns.StepPlan([steps.pop()], self.takes_checked_shortcuts())
            layer = plan.steps[0].layer
            factors = (layer.U, layer.S, layer.V)  # at a new rank `finish` replaces them
            self._method.prepare(plan, self.world_size)
            if layer.step_inputs is not None and not plan.steps[0].in_cycle:  # x and dy are read (a cycle's
                layer.step_inputs.clear()                                     # basis step reads them in finish)
            self.decide_ranks(plan)
            self._method.finish(plan, plan.new_ranks.tolist())
            for factor in factors:
                factor.grad = None
        self.finish_step(fns.StepPlan([], coefficient_steps=coefficient_steps), None)

    @torch.no_grad()
    def prepare_step(self) -> fns.StepPlan:
        """The first half of a step: everything up to the truncation decisions (plan.new_ranks)."""
        plan = self.prepare_cores()
        self.decide_ranks(plan)
        return plan

    @torch.no_grad()
    def prepare_cores(self) -> fns.StepPlan:
        """The new directions and the S-step at the augmented bases (the cores) of every layer with a gradient.
        Nothing in it reads a device value on the host."""
        if self._method.passes == 2:
            raise RuntimeError(f"method={self.method!r} takes a second pass inside step(closure): it has no prepare_step")
        check_not_merged(self._layers)
        self._refresh_factor_params()
        steps, coefficient_steps = self._layer_steps()
        edits_unhonoured = fns.note_gradient_edits(steps)  # before the gradients are averaged over workers
        self._synchronise_workers()
        plan = fns.StepPlan(steps, self.takes_checked_shortcuts(), coefficient_steps=coefficient_steps,
                            edits_unhonoured=edits_unhonoured)
        if plan.steps:
            self._method.prepare(plan, self.world_size)
        return plan

    @torch.no_grad()
    def decide_ranks(self, plan: fns.StepPlan) -> None:
        """The SVD of each core and all truncation decisions as one tensor (plan.new_ranks, left where the SVDs
        were taken). A no-op for the methods that keep ranks."""
        if not plan.steps or not self._method.changes_ranks:
            return
        on_host = self._svds_on_host(plan)
        device = torch.device("cpu") if on_host else fns.decomposed(plan.steps[0]).device
        fns.decide_ranks(plan, on_host, self._truncation_settings(plan, device))

    @torch.no_grad()
    def finish_step(self, plan: fns.StepPlan, new_ranks: list[int] | None) -> None:
        """The second half of a step: the factors at `new_ranks` (one per layer step, from plan.new_ranks; None
        for the methods that keep ranks), the coefficient steps, and the dense parameters."""
        if plan.steps:
            self._method.finish(plan, new_ranks)
        fns.s_steps(plan.coefficient_steps)
        with fns.part("dense_params_step"):
            self.dense_optimizer.step()
        for layer in self.layers:
            if layer.step_inputs is not None:
                layer.step_inputs.clear()
        self._refresh_factor_params()

    def _two_pass_step(self, closure) -> None:
        if closure is None:
            raise RuntimeError(f"method={self.method!r} needs step(closure): its S-step is taken at the moved basis, "
                               "so the closure must zero the gradients, recompute the loss and call backward()")
        self._refresh_factor_params()
        self._synchronise_workers()
        steps, _ = self._layer_steps()  # basis_every is 1 for `fixed`: every step is a basis step
        if not steps and any(layer.U.requires_grad for layer in self.layers):
            raise RuntimeError(f"method={self.method!r}: no low-rank layer has a gradient after the closure; the "
                               "closure must compute the loss and call backward()")
        self._method.basis_update(steps, self.takes_checked_shortcuts())
        self.zero_grad()
        # The second pass needs only S.grad (and the dense parameters' gradients): with U and V frozen the
        # backward skips G V and G^T U, a third of a low-rank layer's backward.
        with torch.enable_grad(), fns.frozen([p for s in steps for p in (s.layer.U, s.layer.V)]):
            closure()
        if any(s.layer.S.grad is None for s in steps):
            raise RuntimeError(f"method={self.method!r}: the closure's second call gave S no gradient, so the S-step "
                               "cannot be taken; the closure must zero the gradients, recompute the loss and call "
                               "backward() every time it is called")
        self._synchronise_workers()
        self._method.finish(fns.StepPlan(steps), None)
        with fns.part("dense_params_step"):
            self.dense_optimizer.step()
        self._refresh_factor_params()

    def _layer_steps(self) -> tuple[list[fns.LayerStep], list[fns.LayerStep]]:
        """LayerSteps, with their states, for the layers that have a gradient (of U at a basis step; of S at a
        coefficient step and for s_only): those of groups at a basis step, and those of groups at a coefficient
        step."""
        basis, coefficient = [], []
        for group in self.low_rank_groups:
            at_basis = is_basis_step(group)
            for layer in group["layers"]:
                grad = layer.U.grad if at_basis and self.method != "s_only" else layer.S.grad
                if grad is not None:
                    step = fns.LayerStep(layer, self._state_of(layer, group), group, *bounds(layer, group),
                                         in_cycle=group["basis_every"] > 1)
                    (basis if at_basis else coefficient).append(step)
        return basis, coefficient

    def _state_of(self, layer: _LowRankLayer, group: dict) -> dict:
        """The layer's state, made (in its current bases) when it has none or the group's rule keeps other entries."""
        rule = make_rule(*rule_key(group))
        state = self.state.get(layer)
        if not state or set(state["S"]) != set(rule.state_keys):
            # K and L states have the shapes of U and V (n x r, m x r), the S state that of S
            state = {"K": rule.init_state(layer.U, rows_share_state=True),
                     "L": rule.init_state(layer.V, rows_share_state=True), "S": rule.init_state(layer.S)}
            self.state[layer] = state
        return state

    def takes_checked_shortcuts(self) -> bool:
        """Whether steps take the CPU's self-checking QR and SVD (checked_shortcuts, or by the factors' device)."""
        if self.checked_shortcuts is not None:
            return self.checked_shortcuts
        return bool(self.layers) and linalg.checked_shortcuts_by_default(self.layers[0].U)

    def _svds_on_host(self, plan: fns.StepPlan) -> bool:
        if self.svd_on != "auto":
            return self.svd_on == "host"
        cores = [fns.decomposed(step) for step in plan.steps]
        return cores[0].is_cuda and max(core.shape[0] for core in cores) <= HOST_SVD_MAX_SIZE

    def _truncation_settings(self, plan: fns.StepPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
        """ϑ, relative, r_min and r_max of the plan's layers as tensors on `device`, made once per setting."""
        key = (device, tuple((s.group["tau"], not s.group["absolute_tau"], s.r_min, s.r_max) for s in plan.steps))
        cache = self.__dict__.setdefault("_settings_cache", {})  # one entry per layer in a layer-by-layer step
        if key not in cache:
            if len(cache) > 2 * len(self.layers):  # settings changed over training: drop the old ones
                cache.clear()
            taus, relative, r_min, r_max = zip(*key[1])
            cache[key] = (torch.tensor(taus, dtype=torch.float64, device=device), torch.tensor(relative, device=device),
                          torch.tensor(r_min, device=device), torch.tensor(r_max, device=device))
        return cache[key]

    def _synchronise_workers(self) -> None:
        """Data parallel: average every gradient over the workers and take rank 0's buffers (dlrt.distributed)."""
        if self.world_size <= 1:
            return
        all_reduce_mean([p.grad for group in self.param_groups for p in group["params"] if p.grad is not None])
        broadcast_buffers([b for module in self._modules for b in module.buffers()])

    # ------------------------------------------------------------------------------------------
    # state_dict
    # ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        index = {id(layer): i for i, layer in enumerate(self.layers)}
        return {
            "state": {index[id(layer)]: {part: dict(entries) for part, entries in state.items()}
                      for layer, state in self.state.items() if id(layer) in index},
            "param_groups": [{**{k: v for k, v in group.items() if k not in LOW_RANK_KEYS},
                              "layers": [index[id(layer)] for layer in group["layers"]]}
                             for group in self.low_rank_groups],
            "dense": self.dense_optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        if "layer_states" in state_dict:  # dlrt 0.1's format
            state_dict = self._upgraded(state_dict)
        layers = self.layers
        saved_groups = state_dict["param_groups"]
        if sum(len(g["layers"]) for g in saved_groups) != len(layers):
            raise ValueError(f"the optimizer state holds {sum(len(g['layers']) for g in saved_groups)} low-rank "
                             f"layers, this optimizer {len(layers)}")
        groups = []
        for saved in saved_groups:
            group = {key: value for key, value in saved.items() if key != "layers"}
            group["layers"] = [layers[i] for i in saved["layers"]]
            group["params"] = factors(group["layers"])
            groups.append(group)
        self.state = defaultdict(dict)
        for i, state in state_dict["state"].items():
            layer = layers[int(i)]
            self.state[layer] = {part: {name: value.to(layer.U.device) if isinstance(value, torch.Tensor) else value
                                        for name, value in entries.items()} for part, entries in state.items()}
        self.dense_optimizer.load_state_dict(state_dict["dense"])
        # new group dicts on both sides: the list schedulers read is made of the dicts the steps now use
        self.param_groups = groups + self.dense_optimizer.param_groups
        for group in groups:
            for key, value in self.defaults.items():  # a state saved before a hyperparameter existed
                group.setdefault(key, value)
            group.setdefault(BASIS_CLOCK, 0)
            self._ready_for_next_step(group)

    def _upgraded(self, old: dict) -> dict:
        group = {key: value for key, value in self.low_rank_groups[0].items() if key not in LOW_RANK_KEYS}
        group.update(lr=old["low_rank_lr"], layers=list(range(len(old["layer_states"]))))
        return {"state": dict(enumerate(old["layer_states"])), "param_groups": [group], "dense": old["dense"]}
