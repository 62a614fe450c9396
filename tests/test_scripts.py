"""The scripts: parallel_runs.sh runs a file of commands a few at a time, with an optional deadline;
count_ops.py counts the operations of a training step; probe_graph_capture.py finds what a CUDA graph can hold;
gpu_checks.sh packs the GPU benchmarks; published_fixed_rank.py (beside its results in
results/diagnostics/dlrt_vs_uv_sigma1) sums up the runs of ERRATA finding 2."""
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from helpers import python

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
SCRIPT = SCRIPTS / "parallel_runs.sh"
FIXED_RANK = SCRIPTS.parent / "results" / "diagnostics" / "dlrt_vs_uv_sigma1" / "published_fixed_rank.py"


def _run(tmp_path, lines, *args):
    commands = tmp_path / "commands.txt"
    commands.write_text("\n".join(lines) + "\n")
    env = {**os.environ, "LOG_DIR": str(tmp_path / "logs")}
    started = time.perf_counter()
    result = subprocess.run(["bash", str(SCRIPT), str(commands), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    return result, time.perf_counter() - started


def test_runs_every_command_with_its_own_log(tmp_path):
    lines = ["# a comment", "", "echo \"it's one\" > one.txt", "sleep 1; echo two > two.txt", "exit 3"]
    result, _ = _run(tmp_path, lines, "2")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "one.txt").read_text() == "it's one\n"  # quotes reach the command intact
    assert (tmp_path / "two.txt").read_text() == "two\n"
    assert "END   #5 rc=3" in result.stdout  # numbered by the line of the file
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["3.log", "4.log", "5.log"]


def test_jobs_run_at_the_same_time(tmp_path):
    """The first job waits (up to 5 s) for a file the second writes: run one after the other, it would give up."""
    wait_for_b = "for i in $(seq 50); do [ -e b ] && exit 0; sleep 0.1; done; exit 1"
    result, _ = _run(tmp_path, [wait_for_b, "touch b"], "2")
    assert "END   #1 rc=0" in result.stdout, result.stdout


def test_deadline_stops_running_commands_and_skips_the_rest(tmp_path):
    result, seconds = _run(tmp_path, ["sleep 30", "sleep 30; echo late > late.txt"], "1", "2")
    assert seconds < 10
    assert "END   #1 rc=124 (stopped at the deadline)" in result.stdout
    assert "SKIP  #2 (deadline)" in result.stdout
    assert not (tmp_path / "late.txt").exists()


def test_count_ops_sees_the_gpu_path_skip_the_cpus_checks():
    counts = {}
    for flag in ([], ["--gpu-path"]):
        result = python(SCRIPTS / "count_ops.py", *flag, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        out = result.stdout
        counts[bool(flag)] = {(case, method): (int(total), int(kernels)) for case, method, total, kernels in
                              re.findall(r"^(\S+)\s+(dense|adaptive)\s+total (\d+) \((\d+) not views\)", out, re.M)}
    for path in (False, True):
        assert set(counts[path]) == {(c, m) for c in ("lenet5_t0.15", "fc500_t0.09") for m in ("dense", "adaptive")}
        for case in ("lenet5_t0.15", "fc500_t0.09"):
            assert counts[path][case, "adaptive"][1] > counts[path][case, "dense"][1] > 0
    assert counts[True]["lenet5_t0.15", "dense"] == counts[False]["lenet5_t0.15", "dense"]
    assert counts[True]["lenet5_t0.15", "adaptive"][0] < counts[False]["lenet5_t0.15", "adaptive"][0]


def test_gpu_checks_packs_every_suite_even_when_one_fails(tmp_path):
    """--quick runs it on the CPU; a timing study stopped at its time limit fails, and the rest still comes back."""
    # one thread and a generous limit for the suites that must finish: a busy machine slows them, never fails them
    env = {**os.environ, "PYTHON": sys.executable, "RANKS": "2,4", "TIMING_SECONDS": "1", "STEPS_SECONDS": "500",
           "MEMORY_SECONDS": "500"}
    result = subprocess.run(["bash", str(SCRIPTS / "gpu_checks.sh"), str(tmp_path / "out"), "--quick", "--threads", "1"],
                            cwd=SCRIPTS.parent, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    log = (tmp_path / "out" / "gpu_checks.log").read_text()
    assert "timing study: exit status 124" in log  # the failure is said, not hidden
    listing = subprocess.run(["tar", "-tzf", str(tmp_path / "out" / "gpu_bench.tar.gz")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert {f"./{suite}.{ext}" for suite in ("steps", "memory") for ext in ("csv", "txt")} <= set(listing)
    subprocess.run(["tar", "-xzf", str(tmp_path / "out" / "gpu_bench.tar.gz"), "-C", str(tmp_path), "./steps.txt"],
                   check=True)
    assert "adaptive_k10" in (tmp_path / "steps.txt").read_text()  # issue 26: k = 10 beside k = 1


def test_probe_graph_capture_checks_each_call_and_fails_on_a_wrong_result(tmp_path, monkeypatch):
    """On a CPU the probe only runs the calls and checks their results; a wrong result is a failure."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import probe_graph_capture as probe

    assert probe.main(["--device", "cpu", "--out", str(tmp_path)]) == 0
    lines = (tmp_path / "capture.csv").read_text().splitlines()
    assert len(lines) == 1 + len(probe.PROBES) and all(line.split(",")[3] == "True" for line in lines[1:])
    make, _, right = probe.PROBES["linalg.qr 500x56"]
    monkeypatch.setitem(probe.PROBES, "linalg.qr 500x56", (make, lambda A: torch.linalg.qr(A + 1), right))
    assert probe.main(["--device", "cpu"]) == 1


def test_published_fixed_rank_summary_pools_the_epoch_one_accuracies_of_each_label(tmp_path):
    """The summary behind results/diagnostics/dlrt_vs_uv_sigma1: JSON lines of the published code's runs, and
    dlrt-run folders under globs, one row per label (the same label twice pools its runs), beside the paper's."""
    (tmp_path / "published.jsonl").write_text('{"decay": 1.0, "seed": 1, "test_acc": [70.0]}\n'
                                              '{"decay": 1.0, "seed": 0, "test_acc": [50.0]}\n')
    for folder, seed, acc in (("table/run-a", 0, 20.0), ("table/run-b-pow2", 1, 99.0), ("extra/run-c", 2, 40.0)):
        run = tmp_path / folder
        run.mkdir(parents=True)
        run.joinpath("epochs.csv").write_text(f"epoch,test_acc,val_loss,ranks\n1,{acc},0.5,2 2\n2,99.9,0.1,2 2\n")
        run.joinpath("summary.json").write_text(f'{{"status": "completed", "seed": {seed}}}')
    result = python(FIXED_RANK, "summary", "--published", "published.jsonl", "--dlrt", "ours", "table/run-a", "--dlrt",
                    "ours", "extra/*", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "| published code, decay 1 | 2 | 50.0, 70.0 | 60.00 ± 14.14 |" in out  # in seed order
    assert "| ours | 2 | 20.0, 40.0 | 30.00 ± 14.14 |" in out  # epoch 1 only, the unmatched folder left out
    assert "| the paper (the authors' 10 result files) | 10 | | 80.96 ± 6.95 |" in out


def test_published_fixed_rank_says_in_one_line_when_repo_is_not_a_clone(tmp_path):
    result = python(FIXED_RANK, "train", "--repo", tmp_path, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith(f"--repo {tmp_path}: cannot read UV_vanilla/Lenet5_dlrt.py at HEAD")
    assert "Traceback" not in result.stderr
