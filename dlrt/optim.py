"""DLRTOptimizer: a torch optimizer that trains every low-rank layer of a model by DLRT.

    opt = DLRTOptimizer(model, lr=0.05, tau=0.15)          # rank-adaptive, plain SGD
    opt.zero_grad(); loss = crit(model(x), y); loss.backward(); opt.step()

Methods (dlrt.functional.METHODS): ``adaptive`` (the paper's rank-adaptive step, one forward and one backward
per batch), ``parallel`` (the parallel rank-adaptive integrator of Ceruti, Kusch, Lubich and Sulz, 2024; one
pass), ``fixed`` (fixed-rank KLS: its S-step is taken at the moved basis, so `step` needs a closure that
recomputes the loss and its gradients), ``s_only`` (U and V frozen, S trained) and ``vanilla`` (plain
factorised training W = U V^T, the paper's naive baseline; the singular values are absorbed into U and V when a
group takes it up).

As in torch.optim, every setting lives in `param_groups`, so a scheduler, or a fine-tuning phase, changes it in
place: the method; lr, tau (ϑ), absolute_tau, r_min, r_max, state_policy, basis_every (dlrt.basis_cycle); the update
rule's (optimizer: sgd, with momentum, or adam, with betas and eps; as in torch's SGD and Adam a group holds its
rule's keys only, so torch's schedulers cycle momentum or beta1 as they do there); and the implementation switches
svd_on, checked_shortcuts and layerwise (dlrt.placement). A group holds low-rank layers ("layers") and their current
factors ("params"). Groups may take different one-pass methods; `fixed`, which takes two passes, and the
implementation switches are the same in every group of a step. The parameters that are not low-rank (biases, dense
layers, norms) are stepped once per batch, with the S-step, by an ordinary torch optimizer (`dense_optimizer`, by
default the same rule with the same lr), whose groups follow the low-rank ones in `param_groups`, so torch's LR
schedulers drive both. The optimizer state of a layer (`state[layer]`) is the update rule's state of K, L and S, as
matrices in the layer's current bases; `state_policy` says what happens to it when the bases rotate
(dlrt.update_rules).

`step(closure)` calls the closure first, as torch documents: the closure zeroes the gradients, recomputes the loss,
calls backward and returns the loss. `fixed` calls it a second time, at the moved basis. How a step runs (batched
around one host read of the new ranks, layer by layer, or in two passes) is dlrt.step_paths; the mathematics of each
method is dlrt.functional.

Data parallel: when torch.distributed is initialised, `step` averages all gradients (and the adaptive step's
Ũ^T G Ṽ blocks) over the workers and takes rank 0's buffers (dlrt.distributed), so do not wrap the model in
DistributedDataParallel.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Iterable

import torch
from torch import nn

from . import basis_cycle
from . import functional
from . import optim_state
from . import step_paths
from .basis_cycle import BASIS_CLOCK, check_basis_every, is_basis_step
from .conversion import check_not_merged
from .distributed import all_reduce_mean, broadcast_buffers, world_size
from .groups import (bounds, check_hyperparameters, factors, groups_of, layers_of, make_defaults,
                     make_dense_optimizer, rule_key)
from .layers import StepInputs, LowRankLayer
from .optim_state import LOW_RANK_KEYS
from .placement import Placement
from .update_rules import make_rule

METHODS = tuple(functional.METHODS)


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
        """params: the model, or a list of groups {"params": a module or modules, <setting>: value, ...} whose
        low-rank layers form one param group each."""
        defaults = make_defaults(lr=lr, tau=tau, method=method, absolute_tau=absolute_tau, r_min=r_min, r_max=r_max,
                                 state_policy=state_policy, optimizer=optimizer, momentum=momentum, betas=betas,
                                 eps=eps, basis_every=basis_every, svd_on=svd_on, checked_shortcuts=checked_shortcuts,
                                 layerwise=layerwise)
        _check_group(defaults)
        groups, modules = groups_of(params)
        self._modules = modules
        self._layers: list[LowRankLayer] = []  # in the order given, whatever groups they move between
        self._set_up_for: dict[int, str] = {}  # id(group) -> the method its layers are set up for
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

    # --- groups and layers ---

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
        _check_group(group)
        self.param_groups.insert(len(self.low_rank_groups), group)
        self._layers += group["layers"]
        self._set_up(group)

    @property
    def low_rank_groups(self) -> list[dict]:
        return [group for group in self.param_groups if "layers" in group]

    @property
    def layers(self) -> list[LowRankLayer]:
        """Every low-rank layer, in the order they were given (the model's order)."""
        return list(self._layers)

    @property
    def method(self) -> str:
        """The method of the low-rank groups ('+'-joined where groups take different ones)."""
        return "+".join(dict.fromkeys(group["method"] for group in self.low_rank_groups)) or self.defaults["method"]

    @property
    def passes(self) -> int:
        """Forward/backward passes per step: 2 when the groups take method='fixed'."""
        return max((functional.METHODS[g["method"]].passes for g in self.low_rank_groups), default=1)

    @property
    def lr(self) -> float:
        """The learning rate of the first param group."""
        return self.param_groups[0]["lr"]

    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]

    def rank_bounds(self) -> list[tuple[int, int]]:
        """(r_min, r_max) of every layer, as the truncation applies them (its group's, capped by its size)."""
        return [bounds(layer, self._group_of(layer)) for layer in self._layers]

    def _group_of(self, layer: LowRankLayer) -> dict:
        return next(g for g in self.low_rank_groups if any(item is layer for item in g["layers"]))

    def set_rank_bounds(self, layer: LowRankLayer, r_min: int, r_max: int | None) -> None:
        """Give one layer its own rank bounds: it moves into a param group of its own (a copy of its group's
        settings) unless it is alone in its group already. Call it before making a scheduler, which counts the
        groups."""
        group = self._group_of(layer)
        if len(group["layers"]) > 1:
            group["layers"] = [item for item in group["layers"] if item is not layer]
            group["params"] = factors(group["layers"])
            own = {key: value for key, value in group.items() if key not in LOW_RANK_KEYS}
            own.update(layers=[layer], params=factors([layer]))
            self.param_groups.insert(self.param_groups.index(group) + 1, own)
            self._set_up_for[id(own)] = self._set_up_for.get(id(group), own["method"])
            group = own
        group["r_min"], group["r_max"] = r_min, r_max
        check_hyperparameters(group)

    def placement(self) -> Placement:
        return Placement.of(self.low_rank_groups)

    def takes_checked_shortcuts(self) -> bool:
        """Whether steps take the CPU's self-checking QR and SVD (checked_shortcuts, or by the factors' device)."""
        return self.placement().takes_checked_shortcuts(self.layers)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._take_up_settings()
        super().zero_grad(set_to_none)
        for layer in self.layers:
            if layer.step_inputs is not None:
                layer.step_inputs.clear()

    # --- the step ---

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One DLRT step. closure (as in torch.optim): zeroes the gradients, recomputes the loss, calls backward
        and returns the loss. It is called first; method='fixed' calls it again at the moved basis."""
        check_not_merged(self._layers)
        self._take_up_settings()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups, placement = self.low_rank_groups, self.placement()
        if self.passes == 2:
            plan = step_paths.two_pass(groups, self._state_of, placement, self._synchronise_workers, closure,
                                       self.zero_grad)
            self.finish_step(plan, None)
        elif step_paths.takes_layer_by_layer(groups, placement):
            coefficient_steps = step_paths.layer_by_layer(groups, self._state_of, placement,
                                                          self._synchronise_workers, self.warn_unhonoured_edits)
            self.finish_step(functional.StepPlan([], coefficient_steps=coefficient_steps), None)
        else:
            plan = self.prepare_step()
            with functional.part("rank_sync"):  # the step's one read of a device value on the host
                new_ranks = plan.new_ranks.tolist() if plan.new_ranks is not None else None
            self.warn_unhonoured_edits(plan.edits_unhonoured)
            self.finish_step(plan, new_ranks)
        self.schedule_next_step()
        return loss

    # The halves of a batched step, which dlrt.graphs calls one by one.

    @torch.no_grad()
    def prepare_step(self) -> functional.StepPlan:
        """The first half of a step: everything up to the truncation decisions (plan.new_ranks)."""
        plan = self.prepare_cores()
        self.decide_ranks(plan)
        return plan

    @torch.no_grad()
    def prepare_cores(self) -> functional.StepPlan:
        """The new directions and the S-step at the augmented bases (the cores) of every layer with a gradient.
        Nothing in it reads a device value on the host."""
        if self.passes == 2:
            raise RuntimeError(f"method={self.method!r} takes a second pass inside step(closure): it has no "
                               "prepare_step")
        check_not_merged(self._layers)
        self._refresh_factor_params()
        return step_paths.prepare_cores(self.low_rank_groups, self._state_of, self.placement(),
                                        self._synchronise_workers)

    @torch.no_grad()
    def decide_ranks(self, plan: functional.StepPlan) -> None:
        """The SVD of each core and all truncation decisions as one tensor (plan.new_ranks, left where the SVDs
        were taken). A no-op for the methods that keep ranks."""
        step_paths.decide_ranks(plan, self.placement())

    @torch.no_grad()
    def finish_step(self, plan: functional.StepPlan, new_ranks: list[int] | None) -> None:
        """The second half of a step: the factors at `new_ranks` (plan.new_ranks read on the host; None when no
        method changes ranks), the coefficient steps, and the dense parameters."""
        step_paths.finish(plan, new_ranks)
        with functional.part("dense_params_step"):
            self.dense_optimizer.step()
        for layer in self.layers:
            if layer.step_inputs is not None:
                layer.step_inputs.clear()
        self._refresh_factor_params()

    def schedule_next_step(self) -> None:
        """Count the step in every group's basis cycle and ready its layers for their next step. `step` calls it;
        dlrt.graphs calls it after a step replayed from a graph, which runs no Python."""
        for group in self.low_rank_groups:
            group[BASIS_CLOCK] = (group[BASIS_CLOCK] + 1) % group["basis_every"]
            self._ready_for_next_step(group)

    @torch.no_grad()
    def truncate(self) -> None:
        """Truncate now the layers of every group with basis_every > 1, which between basis steps hold the augmented
        bases of the last one (about twice their rank; dlrt.basis_cycle): before an evaluation, a checkpoint one
        reports from, or an export. The other groups' steps end truncated: nothing to do for them. A truncated group's
        next step is a basis step: a cycle starts afresh."""
        groups = [group for group in self.low_rank_groups if group["basis_every"] > 1]
        steps = [functional.LayerStep.of(layer, self._state_of(layer, group), group, *bounds(layer, group),
                                         in_cycle=True) for group in groups for layer in group["layers"]]
        if steps:  # the SVDs and rank decisions of a basis step's first half, one host read for all layers
            plan = functional.StepPlan(steps)
            self.decide_ranks(plan)
            for step, r1 in zip(steps, plan.new_ranks.tolist()):
                basis_cycle.truncate(step, r1)
            step_paths.write_new_factors(steps)
        for group in groups:
            group[BASIS_CLOCK] = 0
            self._ready_for_next_step(group)
        self._refresh_factor_params()

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

    # --- bookkeeping ---

    def _take_up_settings(self) -> None:
        """Check the groups' settings, which a user or a scheduler may have changed since the last step (about 10 µs
        a group), and set up the layers of a group whose method changed."""
        groups = self.low_rank_groups
        for group in groups:
            _check_group(group)
            if self._set_up_for.get(id(group)) != group["method"]:
                self._set_up(group)
        if len({functional.METHODS[g["method"]].passes for g in groups}) > 1:
            raise ValueError("method='fixed' takes a second forward/backward inside its step, so it cannot share a "
                             "step with one-pass methods: give every low-rank group method='fixed', or none")
        self._refresh_factor_params()

    def _set_up(self, group: dict) -> None:
        """Ready a group's layers for the method it takes: vanilla absorbs the singular values into U and V."""
        before, method = self._set_up_for.get(id(group)), group["method"]
        if before == "vanilla" and method != "vanilla":
            raise ValueError(f"a group cannot leave method='vanilla' for {method!r}: its U and V are not orthonormal "
                             "(the singular values were absorbed into them); make a new DLRTOptimizer after "
                             "converting the model anew")
        if method == "vanilla" and before != "vanilla":
            functional.absorb_singular_values(group["layers"])
        trains_bases = functional.METHODS[method].trains_bases
        trained_before = functional.METHODS[before].trains_bases if before else True  # a new group's factors train
        if trains_bases != trained_before:
            for layer in group["layers"]:  # s_only: the backward skips G V and G^T U
                for factor in (layer.U, layer.V):
                    factor.requires_grad_(trains_bases)
        self._set_up_for[id(group)] = method
        self._ready_for_next_step(group)

    def _ready_for_next_step(self, group: dict) -> None:
        """What the backward must give the group's next step: a basis step needs G V, G^T U (and, for `adaptive`, the
        recorded x and dy); a coefficient step only U^T G V, so U and V are frozen for it (requires_grad=False) and
        the backward skips their gradients, as for s_only."""
        basis, method = is_basis_step(group), functional.METHODS[group["method"]]
        for layer in group["layers"]:
            layer.step_inputs = StepInputs() if basis and method.records_step_inputs else None
            if group["basis_every"] > 1:
                layer.U.requires_grad_(basis)
                layer.V.requires_grad_(basis)

    def _refresh_factor_params(self) -> None:
        """Point each low-rank group at its layers' current factors (a rank change makes new Parameters)."""
        for group in self.low_rank_groups:
            group["params"] = factors(group["layers"])

    def _state_of(self, layer: LowRankLayer, group: dict) -> dict:
        """The layer's state, made (in its current bases) when it has none or the group's rule keeps other entries."""
        rule = make_rule(*rule_key(group))
        state = self.state.get(layer)
        if not state or set(state["S"]) != set(rule.state_keys):
            # K and L states have the shapes of U and V (n x r, m x r), the S state that of S
            state = {"K": rule.init_state(layer.U, rows_share_state=True),
                     "L": rule.init_state(layer.V, rows_share_state=True), "S": rule.init_state(layer.S)}
            self.state[layer] = state
        return state

    def _synchronise_workers(self) -> None:
        """Data parallel: average every gradient over the workers and take rank 0's buffers (dlrt.distributed)."""
        if world_size() <= 1:
            return
        all_reduce_mean([p.grad for group in self.param_groups for p in group["params"] if p.grad is not None])
        broadcast_buffers([b for module in self._modules for b in module.buffers()])

    # torch.optim.Optimizer pickles (and deep-copies) only defaults, state and param_groups; this optimizer also holds
    # its layers, modules and dense optimizer. The set-up record is keyed by group identity, so it travels in the
    # groups' order.
    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_set_up_for"] = [self._set_up_for.get(id(group)) for group in self.low_rank_groups]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._set_up_for = {id(group): method for group, method in zip(self.low_rank_groups, state["_set_up_for"])
                            if method is not None}

    def state_dict(self) -> dict:
        return optim_state.saved(self.layers, self.state, self.low_rank_groups, self.dense_optimizer.state_dict())

    def load_state_dict(self, state_dict: dict) -> None:
        groups, self.state = optim_state.restored(state_dict, self.layers, self.defaults)
        self.dense_optimizer.load_state_dict(state_dict["dense"])
        # new group dicts on both sides: the list schedulers read is made of the dicts the steps now use; the
        # layers hold the saved run's factors, so they are set up for the saved methods already
        self.param_groups = groups + self.dense_optimizer.param_groups
        for group in groups:
            self._set_up_for[id(group)] = group["method"]
            self._ready_for_next_step(group)


def check_settings(**settings) -> None:
    """Refuse, with DLRTOptimizer's own one-line messages, the settings it would refuse, before any model exists
    (dlrt-run checks its config with this). `settings`: DLRTOptimizer's keyword arguments but the model."""
    arguments = inspect.signature(DLRTOptimizer.__init__).bind(None, None, **settings)  # self and params
    arguments.apply_defaults()
    _check_group(make_defaults(**{key: value for key, value in arguments.arguments.items()
                                  if key not in ("self", "params", "dense_optimizer")}))


def _check_group(group: dict) -> None:
    """Refuse settings that cannot work, naming the key and what it takes."""
    if group["method"] not in functional.METHODS:
        raise ValueError(f"unknown method {group['method']!r}: choose one of {', '.join(METHODS)}")
    check_hyperparameters(group)
    check_basis_every(group["basis_every"], group["method"])
    Placement.check(group)
