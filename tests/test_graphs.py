"""Graphed DLRT steps (dlrt.graphs) on the CPU stand-in for CUDA graphs: the same training as eager steps."""

import copy
import csv

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import dlrt.experiments.runtime
from dlrt import optim as dlrt_optim
from dlrt import step_paths
from dlrt.experiments.run_folder import RunFolder
from dlrt.experiments import train as trainer
from dlrt.experiments.validate import ConfigError, validate
from dlrt.graphs import GraphedStep, ReplayGraph, ReplayGraphs

from helpers import QUICK, batch_for, compose_config, pin_ranks, plain_step, seeded, small_cnn, small_mlp


def DLRTOptimizer(model, **kwargs):
    """Graphs need the GPU's code path: no host-checked shortcuts."""
    return dlrt_optim.DLRTOptimizer(model, **{"checked_shortcuts": False, **kwargs})


def test_replay_recomputes_from_the_captured_tensors_and_keeps_python_numbers():
    x = torch.ones(3)
    scale = 2.0
    graph = ReplayGraph()
    with graph.capture():
        y = torch.exp(x * scale)
        y.add_(1)
    x.copy_(torch.tensor([0.0, 1.0, 2.0]))
    scale = 5.0  # a graph does not see this: the 2.0 of the capture is kept
    graph.replay()
    torch.testing.assert_close(y, torch.exp(torch.tensor([0.0, 2.0, 4.0])) + 1)


@pytest.mark.parametrize("work,message", [
    (lambda: bool(torch.ones(2).sum() > 0), "reads a device value on the host"),
    (lambda: torch.tensor([1, 2]), "makes a tensor from Python data"),
    (lambda: torch.arange(4)[torch.arange(4) > 1], "boolean mask"),
    (lambda: torch.arange(4).nonzero(), "depends on the data"),
    # what torch 2.11 could not capture on an H100 (results/bench/gpu/capture.txt)
    (lambda: torch.linalg.svd(torch.eye(3)), "checks its result on the host"),
    (lambda: torch.linalg.svdvals(torch.eye(3)), "checks its result on the host"),
    (lambda: torch.linalg.eigh(torch.eye(3)), "checks its result on the host"),
])
def test_what_a_cuda_graph_cannot_hold_is_refused(work, message):
    graph = ReplayGraph()
    with pytest.raises(RuntimeError, match=message), graph.capture():
        work()


def test_what_a_cuda_graph_can_hold_is_captured_and_replayed():
    """The QR, Cholesky and triangular solves, which the H100 captured (results/bench/gpu/capture.txt): a replay
    recomputes them from the input's new values."""
    A = torch.randn(6, 3, dtype=torch.float64)
    graph = ReplayGraph()
    with graph.capture():
        Q, R = torch.linalg.qr(A)
        L, _ = torch.linalg.cholesky_ex(A.T @ A)
        solved = torch.linalg.solve_triangular(L, A.T, upper=False)
    A.copy_(torch.randn(6, 3, dtype=torch.float64))
    graph.replay()
    torch.testing.assert_close(Q @ R, A)
    torch.testing.assert_close(L @ L.T, A.T @ A)
    torch.testing.assert_close(L @ solved, A.T)


def train(model, opt, batches, graphed: bool, halve_lr_at: int, grow_ranks_at: int | None):
    """Eager or graphed steps over the batches; the learning rate halves at one step (a new graph key), and
    the ranks may be allowed to grow by one at another (a new key too: the ranks change in its eager step)."""
    step = GraphedStep(model, opt, F.cross_entropy, graphs=ReplayGraphs()) if graphed else None
    losses, ranks = [], []
    for n, (x, y) in enumerate(batches):
        if n == halve_lr_at:
            for group in opt.param_groups:
                group["lr"] *= 0.5
        if n == grow_ranks_at:
            pin_ranks(opt, opt.ranks(), [r + 1 for r in opt.ranks()])
        losses.append(step(x, y)[0].item() if graphed else plain_step(model, opt, x, y))
        ranks.append(opt.ranks())
    return losses, ranks


@pytest.mark.parametrize("factory", [small_mlp, small_cnn], ids=["linear", "conv"])
@pytest.mark.parametrize("method,optimizer,tau,grow_ranks_at", [
    ("adaptive", "sgd", 0.2, None), ("adaptive", "adam", 0.2, None), ("adaptive", "sgd", 0.0, 4),
    ("parallel", "sgd", 0.2, None), ("parallel", "adam", 0.0, 4), ("s_only", "sgd", 0.2, None),
    ("vanilla", "adam", 0.2, None),
])
def test_graphed_steps_train_exactly_like_eager_steps(factory, method, optimizer, tau, grow_ranks_at):
    """Ranks pinned (r_min = r_max), so that graphs are replayed; where they grow, the graphs are dropped."""
    model = seeded(factory)
    batches = [batch_for(model, seed=s) for s in [0, 1, 2, 3] * 3]
    kwargs = dict(lr=0.05 if optimizer == "sgd" else 1e-2, tau=tau, method=method, optimizer=optimizer, momentum=0.9)
    runs = {}
    for graphed in (False, True):
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, **kwargs)
        pin_ranks(opt, opt.ranks(), opt.ranks())
        runs[graphed] = (copy_, *train(copy_, opt, batches, graphed, halve_lr_at=7, grow_ranks_at=grow_ranks_at))
    (eager, eager_losses, eager_ranks), (graphed, graphed_losses, graphed_ranks) = runs[False], runs[True]
    assert graphed_ranks == eager_ranks
    torch.testing.assert_close(graphed_losses, eager_losses)
    for p, q in zip(graphed.parameters(), eager.parameters()):
        torch.testing.assert_close(p, q)
    if grow_ranks_at is not None:
        assert eager_ranks[grow_ranks_at] == [r + 1 for r in eager_ranks[0]]


def test_a_batch_of_another_shape_between_graphed_steps_is_taken_eagerly():
    """As the last, smaller batch of an epoch: an eager step in between, then graphs again from fresh state."""
    model = seeded(small_mlp)
    batches = [batch_for(model, n=8 if s % 4 == 3 else 16, seed=s) for s in range(12)]
    runs = {}
    for graphed in (False, True):
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, lr=0.05, tau=0.2, momentum=0.9)
        pin_ranks(opt, opt.ranks(), opt.ranks())
        runs[graphed] = (copy_, *train(copy_, opt, batches, graphed, halve_lr_at=-1, grow_ranks_at=None))
    torch.testing.assert_close(runs[True][1], runs[False][1])
    for p, q in zip(runs[True][0].parameters(), runs[False][0].parameters()):
        torch.testing.assert_close(p, q)


def test_the_output_is_returned_and_a_failing_loss_check_stops_before_the_update():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.05)
    pin_ranks(opt, opt.ranks(), opt.ranks())
    seen = []
    step = GraphedStep(model, opt, F.cross_entropy, graphs=ReplayGraphs(), check_loss=lambda loss: seen.append(loss.item()))
    x, y = batch_for(model)
    for _ in range(3):  # eager, captured, replayed
        before = model(x).detach()
        loss, output = step(x, y)
        torch.testing.assert_close(output, before)  # the output of the forward, before the update
        assert seen[-1] == loss.item()
    step.check_loss = lambda loss: (_ for _ in ()).throw(FloatingPointError("loss is nan"))
    weights = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError):
        step(x, y)
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_rank_change_found_by_a_replayed_graph_is_finished_eagerly(optimizer, monkeypatch):
    """The ranks may change at an unchanged key: graph 1 replays, the host sees new ranks, the second half
    runs eagerly from the states graph 1 left. Here r_max is raised inside the device tensor graph 1 reads
    (the eager run raises it the ordinary way), so that ϑ = 0 grows every rank by one at step 4."""
    model = seeded(small_mlp)
    batches = [batch_for(model, seed=s) for s in range(7)]
    runs = {}
    for graphed in (False, True):
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, lr=0.05 if optimizer == "sgd" else 1e-2, tau=0.0, optimizer=optimizer, momentum=0.9)
        start = opt.ranks()
        pin_ranks(opt, start, start)
        step = GraphedStep(copy_, opt, F.cross_entropy, graphs=ReplayGraphs())
        losses = []
        for n, (x, y) in enumerate(batches):
            if n == 4:
                if graphed:
                    assert replaying(step)
                    made = step_paths.truncation_settings
                    monkeypatch.setattr(step_paths, "truncation_settings",
                                        lambda *key: (*made(*key)[:3], made(*key)[3] + 1))
                else:
                    pin_ranks(opt, start, [r + 1 for r in start])
            losses.append(step(x, y)[0].item() if graphed else plain_step(copy_, opt, x, y))
        assert opt.ranks() == [r + 1 for r in start]
        runs[graphed] = (copy_, losses)
    torch.testing.assert_close(runs[True][1], runs[False][1])
    for p, q in zip(runs[True][0].parameters(), runs[False][0].parameters()):
        torch.testing.assert_close(p, q)


def replaying(step: GraphedStep) -> bool:
    """Whether a basis step's two graphs have been captured (the second is captured at its first use)."""
    return any(graphs.second is not None for graphs in step._captured.values())


def test_graphs_are_replayed_at_unchanged_ranks_and_dropped_when_they_change():
    model = seeded(small_mlp)
    opt = DLRTOptimizer(model, lr=0.05, tau=0.2)
    pin_ranks(opt, opt.ranks(), opt.ranks())
    step = GraphedStep(model, opt, F.cross_entropy, graphs=ReplayGraphs())
    x, y = batch_for(model)
    step(x, y)  # eager warm-up
    assert not step._captured
    step(x, y)  # captured
    (first,) = step._captured.values()
    step(x, y)
    assert list(step._captured.values()) == [first] and replaying(step)  # replayed, not captured again
    assert step.counts == {"eager": 1, "captured": 1, "replayed": 1}
    pin_ranks(opt, opt.ranks(), [r + 1 for r in opt.ranks()])  # let the ranks grow: a new key after this step
    for _ in range(3):
        step(x, y)
    assert first not in step._captured.values()


def test_a_capture_that_fails_raises_or_falls_back_to_eager_steps():
    """A loss that reads a value on the host cannot be captured: 'raise' says so at the capture (the second
    step), 'eager' warns and trains on exactly as eager steps do."""
    def loss_fn(output, y):
        return F.cross_entropy(output, y) + 0.0 * float(output.abs().max() > 1e9)

    model = seeded(small_mlp)
    batches = [batch_for(model, seed=s) for s in range(5)]

    def fresh():
        copy_ = copy.deepcopy(model)
        opt = DLRTOptimizer(copy_, lr=0.05, tau=0.2, momentum=0.9)
        pin_ranks(opt, opt.ranks(), opt.ranks())
        return copy_, opt

    eager_model, eager_opt = fresh()
    expected = [plain_step(eager_model, eager_opt, x, y) for x, y in batches]

    raising = GraphedStep(*fresh(), loss_fn, graphs=ReplayGraphs(), on_failure="raise")
    raising(*batches[0])  # the eager warm-up
    with pytest.raises(RuntimeError, match="reads a device value on the host"):
        raising(*batches[1])

    falling_back = GraphedStep(*fresh(), loss_fn, graphs=ReplayGraphs(), on_failure="eager")
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off"):
        losses = [falling_back(x, y)[0].item() for x, y in batches]
    assert falling_back.gave_up
    torch.testing.assert_close(losses, expected)
    for p, q in zip(falling_back.model.parameters(), eager_model.parameters()):
        torch.testing.assert_close(p, q)


def test_fixed_rank_steps_cannot_be_graphed():
    model = seeded(small_mlp)
    with pytest.raises(ValueError, match="fixed"):
        GraphedStep(model, DLRTOptimizer(model, lr=0.1, method="fixed"), F.cross_entropy, graphs=ReplayGraphs())


def test_the_cpu_shortcuts_are_refused():
    model = seeded(small_mlp)
    step = GraphedStep(model, DLRTOptimizer(model, lr=0.05, checked_shortcuts=True), F.cross_entropy,
                       graphs=ReplayGraphs())
    x, y = batch_for(model)
    step(x, y)
    with pytest.raises(RuntimeError, match="shortcuts"):
        step(x, y)


def test_the_bench_times_graphed_steps_on_cuda_only():
    from dlrt.bench import cases, steps, timing_study

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert "adaptive_graphed" not in steps.step_methods(cpu) + tuple(timing_study.timing_methods(cpu, "only"))
    assert "adaptive_graphed" in steps.step_methods(cuda) and "adaptive_graphed" in timing_study.timing_methods(cuda)
    assert "adaptive_graphed" not in (steps.step_methods(cuda, "without")
                                      + tuple(timing_study.timing_methods(cuda, "without")))
    assert steps.step_methods(cuda, "only") == ("dense", "adaptive_graphed")  # dense first: the reference
    assert timing_study.timing_methods(cuda, "only") == ["adaptive_graphed"]
    case = cases.step_cases(quick=True)[0]  # LeNet5 at its ranks, batch 16
    runner = cases.make_runner("adaptive_graphed", case, torch.device("cpu"))
    assert not runner.opt.takes_checked_shortcuts()  # graphed steps take the GPU's path, also on a CPU
    runner.step.graphs = ReplayGraphs()  # the stand-in, on the CPU
    batches = cases.synthetic_batches(case, torch.device("cpu"), 2)
    for i in range(4):
        runner.step(*batches[i % 2])
    assert replaying(runner.step)  # warmed up, captured, replayed
    assert runner.ranks() == case.rank


def test_a_failed_capture_is_recorded_once_in_the_timing_study(tmp_path, monkeypatch):
    """As on a GPU whose QR or SVD cannot be captured: here CudaGraphs fails on a CPU-only machine. The error
    is written in the graphed rows of the first rank, the method is not tried again, the others are measured."""
    from dlrt.bench import cli, timing_study

    monkeypatch.setattr(timing_study, "timing_methods",
                        lambda device, graphs: [*timing_study.TIMING_METHODS, "adaptive_graphed"])
    monkeypatch.setattr(torch.cuda, "Stream", lambda: (_ for _ in ()).throw(RuntimeError("no CUDA here")))
    code = cli.main(["--quick", "--device", "cpu", "--suite", "timing_study", "--ranks", "2,4", "--threads", "1",
                     "--out", str(tmp_path)])
    assert code == 0
    with open(tmp_path / "timing_study.csv") as f:
        rows = list(csv.DictReader(f))
    graphed = [r for r in rows if r["method"] == "adaptive_graphed"]
    assert [r["rank"] for r in graphed] == ["2"] and "no CUDA here" in graphed[0]["error"]
    assert {r["rank"] for r in rows if r["method"] == "adaptive" and not r["error"]} == {"2", "4"}
    assert "crossover (adaptive_graphed, train)" in (tmp_path / "timing_study.txt").read_text()


def test_dlrt_run_with_cuda_graphs_trains_like_without(tmp_path, monkeypatch, capsys):
    """The trainer with cuda_graphs=true, on the CPU stand-in: the same epochs as without, batch for batch
    (700 samples in batches of 128: five full batches, graphed after the first, and a smaller last one)."""
    replays = []
    monkeypatch.setattr(dlrt.experiments.runtime, "CudaGraphs", ReplayGraphs)
    monkeypatch.setattr(ReplayGraph, "replay", lambda self, original=ReplayGraph.replay: replays.append(1) or original(self))
    epochs = {}
    for graphs in (False, True):
        overrides = [*QUICK, "data.n_train=700", "epochs=2", "tau=0.3", "optim.momentum=0.9", "model.rank=4",
                     "method.r_min=4", "method.r_max=4", f"cuda_graphs={str(graphs).lower()}"]  # pinned ranks: replayed
        cfg = compose_config(overrides)
        validate(compose_config(overrides[:-1]))  # all but cuda_graphs, which a CPU refuses
        folder = RunFolder(tmp_path / str(graphs))
        with folder.claim():
            trainer.train(cfg, folder)
        epochs[graphs] = pd.read_csv(tmp_path / str(graphs) / "epochs.csv")
        assert ("CUDA graphs so far" in capsys.readouterr().err) == graphs  # the epoch lines count the steps
    assert replays  # some steps were replayed
    columns = ["train_loss", "train_acc", "val_loss", "test_acc", "ranks"]
    pd.testing.assert_frame_equal(epochs[True][columns], epochs[False][columns])


def test_cuda_graphs_are_refused_where_they_cannot_work():
    for overrides, message in ((["method=fixed"], "method=fixed"), (["precision=bf16"], "precision=fp32"),
                               (["device=cpu"], "needs a CUDA device")):
        cfg = compose_config(["cuda_graphs=true", *overrides])
        with pytest.raises(ConfigError, match=message):
            validate(cfg)
