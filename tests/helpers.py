"""Small models and data, and the ways to run dlrt-run, shared by the tests."""

import contextlib
import subprocess
import sys

import torch
from torch import nn

from dlrt import LowRankConv2d, LowRankLinear


def small_mlp(low_rank: bool = True) -> nn.Sequential:
    """20 -> 16 -> 12 -> 4; the first two layers low-rank (ranks 4 and 3), the last dense."""
    if not low_rank:
        return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    return nn.Sequential(LowRankLinear(20, 16, 4), nn.ReLU(), LowRankLinear(16, 12, 3), nn.ReLU(), nn.Linear(12, 4))


def small_cnn(low_rank: bool = True) -> nn.Sequential:
    """3x8x8 -> conv3x3 pad 1 -> conv3x3 stride 2 -> linear; both convs low-rank with bias."""
    if not low_rank:
        convs = [nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 8, 3, stride=2)]
    else:
        convs = [LowRankConv2d(3, 6, 3, 2, padding=1), LowRankConv2d(6, 8, 3, 3, stride=2)]
    return nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), nn.Flatten(), nn.Linear(8 * 3 * 3, 4))


def batch_for(model: nn.Module, n: int = 16, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    first = model[0]
    shape = (n, 3, 8, 8) if isinstance(first, (nn.Conv2d, LowRankConv2d)) else (n, 20)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randint(0, 4, (n,), generator=g)


def plain_step(model, opt, x, y) -> float:
    """zero_grad, cross-entropy, backward, step: one training step as a torch loop takes it; the loss."""
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    return loss.item()


def closure_step(model, opt, x, y) -> float:
    """One step as torch documents it for closures: the optimizer calls the closure (twice for method='fixed')."""
    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return opt.step(closure).item()


def seeded(factory, seed: int = 0, dtype=torch.float64):
    """A model built with `dtype` as the default, so its factors are orthonormal to that precision."""
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return factory()
    finally:
        torch.set_default_dtype(previous)


@contextlib.contextmanager
def hydra_on_our_configs():
    """Hydra initialised on dlrt-run's configs, as in a job: hydra.compose() inside composes them."""
    from hydra import initialize_config_dir

    from dlrt.experiments.cli import CONFIG_DIR, register

    register()
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        yield


def compose_config(overrides: list[str], with_hydra: bool = False, config_dir=None):
    """dlrt-run's resolved config for these overrides, as Hydra composes it (with_hydra: and Hydra's own, under
    `hydra`, e.g. the launcher's; config_dir: a user's own config folder beside ours, as `dlrt-run -cd` adds it)."""
    from hydra import compose

    search = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    with hydra_on_our_configs():
        return compose("config", overrides=[*search, *overrides], return_hydra_config=with_hydra)


def pin_ranks(opt, r_min: list[int], r_max: list[int]) -> None:
    """Per-layer rank bounds (each layer then has a param group of its own)."""
    for layer, low, high in zip(opt.layers, r_min, r_max):
        opt.set_rank_bounds(layer, low, high)


# --- dlrt-run and other processes, as a user starts them ------------------------------------------------------------

# A run of seconds on synthetic data: the overrides every end-to-end test starts from (a later override of the same
# key wins, so a test adds what it needs after these).
QUICK = ["data=synthetic", "data.n_train=256", "data.n_val=64", "data.n_test=64", "epochs=1", "progress=false",
         "threads=1"]


def python(*args, cwd=None, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """This interpreter (the venv's) in a process of its own: `python ARGS`, its output captured as text."""
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def dlrt_run(*args, cwd, env=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """dlrt-run ARGS in a process of its own, run from `cwd`."""
    return python("-m", "dlrt.experiments", *args, cwd=cwd, env=env, timeout=timeout)


def start_dlrt_run(*args, cwd, **popen) -> subprocess.Popen:
    """dlrt-run ARGS started and left running (to stop it, or to start a second beside it); text output."""
    return subprocess.Popen([sys.executable, "-m", "dlrt.experiments", *map(str, args)], cwd=cwd, text=True, **popen)


def run_in_process(args, cwd, monkeypatch, capsys) -> tuple[int, str]:
    """dlrt-run in this process (as the console script calls it): exit code and stderr."""
    from dlrt.experiments import cli

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["dlrt-run", *args])
    try:
        cli.run()
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err
