"""Beyond one machine, on this one: two torchrun "nodes" meeting over loopback (c10d rendezvous), and a sweep
through hydra-submitit-launcher's local executor (each job a process of its own, as on SLURM), with a job killed
mid-epoch that resumes when the sweep is submitted again. The SLURM launcher's config differs from the local one
only in the cluster keys README lists."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import QUICK, compose_config, dlrt_run, start_dlrt_run

# a small FC net without fine-tuning; each test says how many examples and epochs
SMALL_FC = [*QUICK, "model=fc", "model.width=32", "finetune.epochs=0", "batch_size=64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def only(pattern: str, folder: Path) -> Path:
    (path,) = folder.glob(pattern)
    return path


# --- multi-node torchrun -------------------------------------------------------------------------


def test_two_nodes_over_loopback_train_one_run_folder_like_one_process(tmp_path):
    """torchrun --nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d, both "nodes" on this machine: one run folder,
    the numbers of one process (449 examples: the last global batch holds one, so rank 1 steps on a stand-in)."""
    args = [*SMALL_FC, "data.n_train=449", "epochs=2", "tau=0.3", "optim=sgd", "lr=0.1"]
    port = free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
                               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=loopback",
                               "--local-addr=127.0.0.1", "-m", "dlrt.experiments", *args, f"out_dir={tmp_path / 'nodes'}"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    single = dlrt_run(*args, f"out_dir={tmp_path / 'single'}", cwd=tmp_path)
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert single.returncode == 0, single.stderr
    assert sum("done: " in output for output in outputs) == 1  # one rank 0, which alone writes the folder
    ours, theirs = (pd.read_csv(only("*/epochs.csv", tmp_path / name)) for name in ("nodes", "single"))
    assert only("*/", tmp_path / "nodes").name == only("*/", tmp_path / "single").name
    assert list(ours["ranks"]) == list(theirs["ranks"])
    for column in ("train_loss", "val_loss", "test_loss"):
        pd.testing.assert_series_equal(ours[column], theirs[column], rtol=1e-5)
    assert '"workers": 2' in only("*/summary.json", tmp_path / "nodes").read_text()


# --- sweeps through submitit ---------------------------------------------------------------------


def job_process(sweep_dir: Path, run_folder: str) -> int:
    """The pid of the process that trains `run_folder` under submitit's local executor: the child of the job's
    controller process, whose pid names the job's folder under .submitit/."""
    for log in (sweep_dir / ".submitit").glob("*/*_log.err"):
        if run_folder in log.read_text():
            controller = log.parent.name
            children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
            return int(children[0])
    raise AssertionError(f"no submitit job trains {run_folder}")


def test_submitit_local_sweep_runs_jobs_apart_and_a_killed_job_resumes_when_resubmitted(tmp_path):
    sweep = ["-m", "hydra/launcher=submitit_local", *SMALL_FC, "data.n_train=4096", "epochs=6", "tau=0.1,0.3",
             f"out_dir={tmp_path / 'sweep'}"]
    first = start_dlrt_run(*sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list((tmp_path / "sweep").glob("*tau0.3*/checkpoint.pt")):  # the job of tau=0.3 is in epoch 2
        assert time.time() < deadline and first.poll() is None, first.communicate()
        time.sleep(0.05)
    victim = only("*tau0.3*/", tmp_path / "sweep")
    os.kill(job_process(tmp_path / "sweep", victim.name), signal.SIGKILL)  # pre-empted without warning
    out, err = first.communicate(timeout=300)
    assert first.returncode != 0 and not (victim / "summary.json").exists() and (victim / "checkpoint.pt").exists()
    assert "the launcher lost a job" in err and "Traceback" not in err  # said in our words
    import torch

    killed_at = torch.load(victim / "checkpoint.pt", weights_only=False)["epoch"] + 1  # epochs in its checkpoint
    assert 1 <= killed_at < 6

    again = dlrt_run(*sweep, cwd=tmp_path)  # the same command again
    assert again.returncode == 0, again.stderr
    logs = "".join(log.read_text() for log in (tmp_path / "sweep" / ".submitit").glob("*/*_log.err"))
    assert "skipping" in logs and "already finished" in logs  # the finished job
    assert f"resuming {victim} after epoch {killed_at}" in logs  # the killed one, from its checkpoint
    assert len(list((tmp_path / "sweep").glob("*/summary.json"))) == 2

    # each job's folder is the folder, with the numbers, of an ordinary run of its settings
    ordinary = dlrt_run(*[a for a in sweep if a not in ("-m", "hydra/launcher=submitit_local", "tau=0.1,0.3")], "tau=0.3",
                    f"out_dir={tmp_path / 'ordinary'}", cwd=tmp_path)
    assert ordinary.returncode == 0, ordinary.stderr
    reference = only("*/", tmp_path / "ordinary")
    assert reference.name == victim.name
    ours, theirs = pd.read_csv(victim / "epochs.csv"), pd.read_csv(reference / "epochs.csv")
    assert list(ours["epoch"]) == [1, 2, 3, 4, 5, 6]  # each epoch once
    columns = ["train_loss", "val_loss", "test_acc", "ranks", "params_eval_honest"]
    pd.testing.assert_frame_equal(ours[columns], theirs[columns])  # bit-identical on a CPU


# --- the SLURM launcher's config -----------------------------------------------------------------

# The keys in which hydra/launcher=submitit_slurm differs from submitit_local (README, "Sweeps on a cluster").
SLURM_KEYS = {"_target_", "partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu",
              "gpus_per_task", "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "max_num_timeout",
              "additional_parameters", "array_parallelism", "setup"}


def launcher_config(name: str) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose_config([f"hydra/launcher={name}"], with_hydra=True).hydra.launcher)


def test_the_slurm_launcher_differs_from_the_local_one_only_in_cluster_keys():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    local, slurm = launcher_config("submitit_local"), launcher_config("submitit_slurm")
    differing = {key for key in set(local) | set(slurm) if local.get(key, object()) != slurm.get(key, object())}
    assert differing == SLURM_KEYS
    assert compose_config(["hydra/launcher=submitit_slurm"]).model.name == "lenet5"  # composes with dlrt-run's config
