"""A DLRT training step replayed from CUDA graphs: two graphs per set of ranks, around the rank decision.

On a GPU a DLRT step is bound by the host, not by arithmetic (results/bench/gpu/README.md): hundreds of small
operations, each launched from Python. A CUDA graph records the kernels of a piece of work once and launches
them all again with one call. A whole DLRT step cannot be one graph, because the number of columns each
factor keeps is decided on the host from the singular values, and because torch's CUDA SVD checks its
result on the host, which no graph can hold (scripts/probe_graph_capture.py; its QR can be captured). So a
step is

    graph 1: zero the gradients in place, forward, loss, backward, DLRTOptimizer.prepare_cores
             (new directions, augmented cores)
    eager:   DLRTOptimizer.decide_ranks (the cores' SVDs, written into the tensors graph 2 reads, and the new
             ranks as a device tensor), and the host reads the new ranks
    graph 2: at unchanged ranks, DLRTOptimizer.finish_step (factors copied into the same Parameters, the
             dense parameters stepped), and the optimizer states copied back into the tensors graph 1 reads

A coefficient step (DLRTOptimizer(basis_every=k): the k-1 steps between two basis steps) has nothing for the
host to decide: it is ONE graph, zero_grad to the dense parameters' step, with no eager part at all.

When the ranks change, the second half runs eagerly (it makes new Parameters), the graphs are dropped, and
the next step is taken eagerly once more (a warm-up) before graphs are captured for the new ranks. A graph
keeps the Python numbers it was captured with, so everything of that kind that a step reads (ranks, learning
rates, ϑ, rank bounds: `step_settings`) and the input shapes are the settings of the graphs held; at the same
settings a basis step and a coefficient step are graphs of their own (`basis_steps`). The first step of each
kind at new settings is always eager, so a graph never captures lazily made state (momentum buffers, the bounds
cache); its new optimizer states are copied into the tensors that the other kind's graphs read.

Backends: `CudaGraphs` (torch.cuda.CUDAGraph, warm-up on a side stream) and `ReplayGraphs`, a CPU stand-in
that records the aten calls of a captured run and replays them on the same tensors, so that the tests can
check on a CPU that graphed steps equal eager ones and that a graph holds nothing a CUDA graph cannot.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import step_paths
from .basis_cycle import BASIS_CLOCK, is_basis_step
from .optim import DLRTOptimizer
from .optim_state import LOW_RANK_KEYS


class GraphedStep:
    """`loss, output = step(x, y)`: zero_grad, output = model(x), loss_fn(output, y), backward, optimizer
    step; replayed from graphs.

    loss and output are tensors that the next call overwrites (`.item()` them, or clone them). Inputs must
    keep their shape and dtype for graphs to be reused; a new shape is a new key. `check_loss(loss)`, if
    given, is called before the factors change (a host sync): raise in it to stop a diverging run. (A
    coefficient step is one graph: there it is called after the step.)

    When a capture fails (an operation that cannot be captured), `on_failure="raise"` raises, and "eager"
    warns once and takes this and every later step eagerly, from the state as it was before the capture.
    """

    def __init__(self, model: torch.nn.Module, optimizer: DLRTOptimizer,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], graphs=None,
                 check_loss: Callable[[torch.Tensor], None] | None = None, on_failure: str = "raise"):
        if optimizer.passes == 2:
            raise ValueError("method='fixed' takes a second forward/backward inside its step; graph 'adaptive', "
                             "'parallel', 's_only' or 'vanilla'")
        if on_failure not in ("raise", "eager"):
            raise ValueError(f"on_failure={on_failure!r}: choose 'raise' or 'eager'")
        self.model, self.opt, self.loss_fn = model, optimizer, loss_fn
        self.check_loss, self.on_failure = check_loss, on_failure
        self.graphs = graphs if graphs is not None else CudaGraphs()
        self.gave_up = False  # a capture failed with on_failure="eager": every step is eager from then on
        self._settings = None  # the settings and input shapes of the graphs held
        self._captured: dict[tuple, _KeyGraphs] = {}  # at these settings, the graphs of each kind of step
        self._warmed: set[tuple] = set()  # keys an eager step was taken at without changing ranks: ready to capture
        self.counts = {"replayed": 0, "captured": 0, "eager": 0}  # steps by how graph 1's half was taken

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.gave_up:
            return self._eager_step(x, y)
        settings = step_settings(self.opt), x.shape, x.dtype, y.shape, y.dtype
        if settings != self._settings:  # graphs of other settings will not be replayed again: their memory goes
            self._drop()
            self._settings = settings
        key = basis_steps(self.opt)  # a basis step and a coefficient step are graphs of their own
        if key in self._captured:
            graphs = self._captured[key]
            graphs.x.copy_(x)
            graphs.y.copy_(y)
            graphs.first.replay()
            self.counts["replayed"] += 1
            return self._finish(graphs)
        if key in self._warmed:
            self._check_shortcuts()
            states = _state_tensors(self.opt)
            try:
                graphs = self._capture_first(x, y, key)
            except RuntimeError as error:
                _put(self.opt, states)  # the Python side of the capture is undone: eager from the start
                self._give_up(error)
                return self._eager_step(x, y)
            self.counts["captured"] += 1
            return self._finish(graphs)
        return self._warm_up(x, y, key)

    def _warm_up(self, x, y, key) -> tuple[torch.Tensor, torch.Tensor]:
        """A new key: one eager step first. At unchanged ranks its new optimizer states are copied back into the
        tensors the graphs of other keys read (a basis step and a coefficient step alternate); at new ranks (new
        Parameters) every graph is dropped."""
        parameters, states = _factor_ids(self.opt), _state_tensors(self.opt)
        result = self.graphs.warm_up(lambda: self._eager_step(x, y))
        if _factor_ids(self.opt) == parameters:
            _copy_back(self.opt, states)
            self._warmed.add(key)
        else:
            self._drop()
        return result

    def _eager_step(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        self.counts["eager"] += 1
        self.opt.zero_grad()
        with torch.enable_grad():
            output = self.model(x)
            loss = self.loss_fn(output, y)
            loss.backward()
        if self.check_loss is not None:
            self.check_loss(loss.detach())
        self.opt.step()
        return loss.detach(), output.detach()

    def _check_shortcuts(self) -> None:
        if self.opt.takes_checked_shortcuts():
            raise RuntimeError("the CPU's QR and SVD shortcuts check themselves on the host, which a graph cannot "
                               "do: graphed steps run the GPU's path (on a CPU only for tests, with "
                               "DLRTOptimizer(..., checked_shortcuts=False))")

    def _capture_first(self, x, y, key) -> _KeyGraphs:
        """Graph 1 of a key; at a step where no group takes a basis step (a coefficient step) the whole step."""
        graphs = _KeyGraphs(self.graphs.new_graph(shared_with=None))
        graphs.x, graphs.y = x.clone(), y.clone()
        # the states as graph 1 reads them: graph 2 copies the new states back into these tensors
        graphs.states = _state_tensors(self.opt)
        with graphs.first.capture(), torch.enable_grad():
            self.opt.zero_grad(set_to_none=False)  # gradients stay where graph 1 accumulates them
            output = self.model(graphs.x)
            loss = self.loss_fn(output, graphs.y)
            loss.backward()
            graphs.plan = self.opt.prepare_cores()
            if not graphs.plan.steps:  # nothing for the host to decide: the step's second half joins the graph
                self.opt.finish_step(graphs.plan, None)
                graphs.whole_step = True
        graphs.states_between = _state_tensors(self.opt)  # as graph 1 leaves them (the S states lifted to 2r)
        graphs.loss, graphs.output = loss.detach(), output.detach()
        if not self.graphs.runs_during_capture:
            graphs.first.replay()
        self._captured[key] = graphs
        return graphs

    def _finish(self, graphs: _KeyGraphs) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's decision, then graph 2 (captured at its first use) or, at new ranks, the eager half."""
        if self.check_loss is not None:
            self.check_loss(graphs.loss)
        if graphs.whole_step:
            self.opt.schedule_next_step()
            return graphs.loss, graphs.output
        plan = graphs.plan
        self.opt.decide_ranks(plan)
        if graphs.svds is not None:  # graph 2 reads the SVDs from where they were at its capture
            for step, static in zip(step_paths.ranked_steps(plan.steps), graphs.svds):
                for into, fresh in zip(static, step.svd):
                    into.copy_(fresh)
                step.svd = static
        new_ranks = plan.new_ranks.tolist() if plan.new_ranks is not None else None
        self.opt.warn_unhonoured_edits(plan.edits_unhonoured)
        old_ranks = [step.layer.rank for step in step_paths.ranked_steps(plan.steps)]
        if new_ranks is not None and step_paths.ranks_after(plan, new_ranks) != old_ranks:
            _put(self.opt, graphs.states_between)  # after a replay the dict holds the states graph 1 reads
            self.opt.finish_step(plan, new_ranks)  # new Parameters: every graph is done
            self.opt.schedule_next_step()
            result = graphs.loss.clone(), graphs.output.clone()
            self._drop()
            return result
        if graphs.second is not None:
            graphs.second.replay()
            self.opt.schedule_next_step()
            return graphs.loss, graphs.output
        graphs.second = self.graphs.new_graph(shared_with=graphs.first)
        graphs.svds = [step.svd for step in step_paths.ranked_steps(plan.steps)] if plan.new_ranks is not None else None
        try:
            with graphs.second.capture():
                self.opt.finish_step(plan, new_ranks)
                _copy_back(self.opt, graphs.states)
        except RuntimeError as error:
            _put(self.opt, graphs.states_between)  # graph 1 has run: its second half, eagerly
            result = graphs.loss.clone(), graphs.output.clone()
            self._give_up(error)
            self.opt.finish_step(plan, new_ranks)
            self.opt.schedule_next_step()
            return result
        if not self.graphs.runs_during_capture:
            graphs.second.replay()
        self.opt.schedule_next_step()
        return graphs.loss, graphs.output

    def _give_up(self, error: RuntimeError) -> None:
        self._drop()
        if self.on_failure == "raise":
            raise error
        self.gave_up = True
        warnings.warn(f"CUDA graphs are off from here on, every step runs eagerly: capturing a step failed "
                      f"({type(error).__name__}: {str(error).splitlines()[0][:200]})", RuntimeWarning, stacklevel=3)

    def _drop(self) -> None:
        self._settings = None
        self._captured.clear()
        self._warmed.clear()


class _KeyGraphs:
    """The graphs of one key, in a memory pool of their own, and what they read and write."""

    def __init__(self, first):
        self.first, self.second = first, None
        self.whole_step = False  # graph 1 holds the whole step (a coefficient step)
        self.x = self.y = self.plan = self.loss = self.output = None
        self.states = self.states_between = None
        self.svds = None  # the SVD results graph 2 was captured reading; later SVDs are copied into them


def step_settings(opt: DLRTOptimizer) -> tuple:
    """Every Python number a step reads: the ranks and every param group's settings (its method, learning rate,
    ϑ, rank bounds, the update rule's). A graph keeps the numbers it was captured with, so it is captured anew
    whenever this changes."""
    plain = (int, float, bool, str, tuple, type(None))
    skipped = LOW_RANK_KEYS + (BASIS_CLOCK,)  # the clock: basis_steps says what of it a step reads
    groups = tuple(tuple(sorted((k, v) for k, v in group.items() if k not in skipped and isinstance(v, plain)))
                   + (len(group.get("layers", ())),) for group in opt.param_groups)
    return tuple(opt.ranks()), groups


def basis_steps(opt: DLRTOptimizer) -> tuple[bool, ...]:
    """Which low-rank groups take a basis step next (the others a coefficient step)."""
    return tuple(map(is_basis_step, opt.low_rank_groups))


def _factor_ids(opt: DLRTOptimizer) -> list[int]:
    return [id(p) for layer in opt.layers for p in (layer.U, layer.S, layer.V)]


def _state_tensors(opt: DLRTOptimizer) -> dict:
    return {(layer, part, name): tensor for layer, layer_state in opt.state.items()
            for part, entries in layer_state.items() for name, tensor in entries.items()}


def _put(opt: DLRTOptimizer, states: dict) -> None:
    for (layer, part, name), tensor in states.items():
        opt.state[layer][part][name] = tensor


def _copy_back(opt: DLRTOptimizer, before: dict) -> None:
    """Put each state's new value into the tensor it had before the step (same shape at unchanged ranks)."""
    for (layer, part, name), old in before.items():
        new = opt.state[layer][part][name]
        if new is not old:
            old.copy_(new)
            opt.state[layer][part][name] = old


# ---------------------------------------------------------------------------------------------
# backends
# ---------------------------------------------------------------------------------------------


class CudaGraphs:
    """torch.cuda.CUDAGraph; the two graphs of a key share a memory pool (replayed in capture order)."""

    runs_during_capture = False

    def warm_up(self, step: Callable[[], torch.Tensor]) -> torch.Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            result = step()
        torch.cuda.current_stream().wait_stream(stream)
        return result

    def new_graph(self, shared_with=None) -> _CudaGraph:
        return _CudaGraph(shared_with.pool if shared_with is not None else torch.cuda.graph_pool_handle())


class _CudaGraph:
    def __init__(self, pool):
        self.graph, self.pool = torch.cuda.CUDAGraph(), pool

    def capture(self):
        return torch.cuda.graph(self.graph, pool=self.pool)

    def replay(self) -> None:
        self.graph.replay()


class ReplayGraphs:
    """A CPU stand-in for CUDA graphs, for tests: a captured run is executed (and recorded); a replay executes
    the recorded aten calls again with the same arguments, writing each result into the tensor the captured
    run produced. Like a CUDA graph, it keeps the Python numbers of the capture and follows no Python logic;
    unlike one, it executes during capture. What a CUDA graph cannot capture raises (see _Recorder)."""

    runs_during_capture = True

    def warm_up(self, step):
        return step()

    def new_graph(self, shared_with=None) -> ReplayGraph:
        return ReplayGraph()


class ReplayGraph:
    def __init__(self):
        self.calls: list[tuple] = []

    @contextlib.contextmanager
    def capture(self):
        with _Recorder(self.calls):
            yield

    @torch.no_grad()  # the calls were recorded below autograd: run them again without it
    def replay(self) -> None:
        for func, args, kwargs, recorded in self.calls:
            fresh = func(*args, **kwargs)
            for old, new in zip(_tensors(recorded), _tensors(fresh)):
                if old.untyped_storage().data_ptr() != new.untyped_storage().data_ptr():
                    old.copy_(new)  # a new result: into the captured run's tensor, which later calls read


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


class _Recorder(TorchDispatchMode):
    """Records every aten call; refuses those a CUDA graph cannot hold: reading a device value on the host
    (item, bool of a tensor), making a tensor from Python data (torch.tensor(list, device=...), a copy from
    pageable host memory on a GPU), results whose size depends on the data (nonzero, masked_select,
    indexing with a boolean mask: on a GPU the size is read on the host), and the SVD and eigh, whose CUDA
    versions check their results on the host (found on an H100 by scripts/probe_graph_capture.py)."""

    aten = torch.ops.aten
    REFUSED = {aten._local_scalar_dense.default: "reads a device value on the host",
               aten.lift_fresh.default: "makes a tensor from Python data (a host-to-device copy on a GPU)",
               aten.nonzero.default: "has a size that depends on the data",
               aten.masked_select.default: "has a size that depends on the data",
               aten._linalg_svd.default: "checks its result on the host on a GPU",
               aten._linalg_eigh.default: "checks its result on the host on a GPU"}

    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = self.REFUSED.get(func)
        if func is self.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            reason = "indexes with a boolean mask: its size depends on the data"
        if reason is not None:
            raise RuntimeError(f"{func} {reason} inside a graph capture: a CUDA graph cannot hold it")
        result = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, result))
        return result
