"""The peak memory of a training step and its parts, measured exactly (no RSS).

On a CPU: the warm-up steps and the measured one run inside one torch.profiler session with profile_memory=True,
so torch's allocator reports every allocation and free (address, size) of tensor storage; replaying them in
time order gives the peak of live bytes during the measured step, net of what was live when it began. The bytes
live at the peak are then split by what holds them:

- parameters, gradients, optimizer state: the model's and optimizer's storages (read directly, before and after
  the step, and from gradient hooks as autograd accumulates them);
- saved for the backward: every tensor a forward saves (torch.autograd.graph.saved_tensors_hooks), parameters
  excluded;
- temporaries: everything else the step allocated and still held at the peak (augmented bases, cores, the
  inputs kept for Ũ^T G Ṽ, workspaces), with the aten op that made each (`top_temporaries`).

On a GPU: torch.cuda.max_memory_allocated after resetting it, for the measured step; parts as before the step.
Not seen on a CPU: memory allocated outside torch's allocator (MKL/oneDNN scratch).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile, record_function

_MARK = "dlrt_bench_memory#"
PARTS = ("parameters", "gradients", "optimizer state", "saved for backward", "temporaries")


def _storage(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def state_storages(model, optimizer) -> dict[str, dict[int, int]]:
    """{part: {storage address: bytes}} for parameters, gradients and optimizer state (a DLRTOptimizer's per-layer
    states and its dense optimizer's included); a storage counts once, in the first part that holds it."""
    params = list(model.parameters()) if model is not None else []
    state = _tensors(list(getattr(optimizer, "state", {}).values())) if optimizer is not None else []
    dense = getattr(optimizer, "dense_optimizer", None)
    if dense is not None:
        state += _tensors(list(dense.state.values()))
    parts = {"parameters": [p.detach() for p in params], "gradients": [p.grad for p in params if p.grad is not None],
             "optimizer state": state}
    seen, found = set(), {}
    for name, tensors in parts.items():
        found[name] = {}
        for t in tensors:
            if t is None or t.untyped_storage().nbytes() == 0:
                continue
            ptr, nbytes = _storage(t)
            if ptr not in seen:
                seen.add(ptr)
                found[name][ptr] = nbytes
    return found


@dataclass
class StepMemory:
    """What a step holds at its peak, in bytes: `peak` = everything live then; `parts` by PARTS."""

    peak: int
    parts: dict[str, int]
    saved_for_backward: int = 0  # all the step's forwards saved (distinct storages, parameters excluded), peak or not
    top_temporaries: list[tuple[str, int]] = field(default_factory=list)  # (aten op, bytes), largest first


@dataclass
class _Allocation:
    ptr: int
    size: int
    t_alloc: int
    op: str
    t_free: int | None = None
    part: str = "temporaries"

    def live_at(self, t: int) -> bool:
        return self.t_alloc <= t and (self.t_free is None or self.t_free > t)


class _Tags:
    """Storages named during the step (saved tensors, gradients), with a profiler mark for when."""

    def __init__(self):
        self.tags: list[tuple[str, int]] = []

    def __call__(self, part: str, tensor: torch.Tensor) -> None:
        if tensor.untyped_storage().nbytes():
            with record_function(f"{_MARK}tag{len(self.tags)}"):
                self.tags.append((part, _storage(tensor)[0]))


def peak_step_memory(step: Callable[[], object], model=None, optimizer=None, warmup: int = 2) -> StepMemory:
    """Run `step` `warmup` times and once more, and measure the last call (see the module's docstring)."""
    device = next(model.parameters()).device if model is not None else torch.device("cpu")
    if device.type == "cuda":
        return _cuda_peak(step, model, optimizer, warmup)
    tags = _Tags()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(warmup):
            step()
        start = state_storages(model, optimizer)
        with record_function(f"{_MARK}start"):
            pass
        grads = [p.register_post_accumulate_grad_hook(lambda p: tags("gradients", p.grad))
                 for p in (model.parameters() if model is not None else []) if p.requires_grad]
        try:
            with torch.autograd.graph.saved_tensors_hooks(lambda t: (tags("saved for backward", t), t)[1], lambda t: t):
                step()
        finally:
            for handle in grads:
                handle.remove()
        with record_function(f"{_MARK}end"):
            pass
        end = state_storages(model, optimizer)
    return _analyse(prof.profiler.kineto_results.experimental_event_tree(), tags, start, end)


def _walk(nodes):
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.children))


def _op_of(node) -> str:
    parent = node.parent
    while parent is not None and (not str(parent.tag).endswith("TorchOp") or parent.name.startswith(_MARK)):
        parent = parent.parent
    return parent.name if parent is not None else "?"


def _analyse(tree, tags: _Tags, start: dict, end: dict) -> StepMemory:
    marks, events = {}, []
    for node in _walk(tree):
        if node.name.startswith(_MARK):
            marks[node.name[len(_MARK):]] = node.start_time_ns
        elif str(node.tag).endswith("Allocation") and node.typed[1].device.type == "cpu":
            events.append(node)
    events.sort(key=lambda n: n.start_time_ns)
    t0, t1 = marks["start"], marks["end"]
    live, allocations, level, base, peak, peak_t = {}, [], 0, None, 0, t0
    for node in events:
        t, fields = node.start_time_ns, node.typed[1]
        if t > t1:
            break
        if base is None and t >= t0:
            base = peak = level
        if fields.alloc_size > 0:
            allocation = _Allocation(fields.ptr, fields.alloc_size, t, _op_of(node) if t >= t0 else "")
            live[fields.ptr] = allocation
            allocations.append(allocation)
            level += fields.alloc_size
        elif (allocation := live.pop(fields.ptr, None)) is not None:  # frees only of what the profile saw made
            allocation.t_free = t
            level -= allocation.size
        if base is not None and level > peak:
            peak, peak_t = level, t
    base = level if base is None else base
    in_step = [a for a in allocations if a.t_alloc >= t0]
    before_step = {a.ptr: a for a in allocations if a.t_alloc < t0 and a.live_at(t0)}
    # what the step made: the state it holds at its end, else a tag given while it was live
    holders = {ptr: part for part, storages in end.items() for ptr in storages}
    by_ptr = defaultdict(list)
    for a in in_step:
        by_ptr[a.ptr].append(a)
        if a.t_free is None and a.ptr in holders:
            a.part = holders[a.ptr]
    for index, (part, ptr) in enumerate(tags.tags):
        t = marks.get(f"tag{index}")
        for a in by_ptr.get(ptr, ()):
            if t is not None and a.live_at(t) and a.part == "temporaries":
                a.part = part
    parts = dict.fromkeys(PARTS, 0)
    for part, storages in start.items():  # what existed before the step and was not freed by the peak
        parts[part] += sum(n for ptr, n in storages.items() if before_step.get(ptr) is None or before_step[ptr].live_at(peak_t))
    top = defaultdict(int)
    for a in in_step:
        if a.live_at(peak_t):
            parts[a.part] += a.size
            if a.part == "temporaries":
                top[a.op] += a.size
    saved = {id(a): a.size for a in in_step if a.part == "saved for backward"}
    total = sum(sum(s.values()) for s in start.values()) + (peak - base)
    return StepMemory(total, parts, sum(saved.values()), sorted(top.items(), key=lambda item: -item[1])[:8])


def _cuda_peak(step, model, optimizer, warmup: int) -> StepMemory:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    before = {part: sum(storages.values()) for part, storages in state_storages(model, optimizer).items()}
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    parts = dict.fromkeys(PARTS, 0) | before
    parts["temporaries"] = max(0, peak - sum(before.values()))  # activations included: no split on a GPU
    return StepMemory(peak, parts)
