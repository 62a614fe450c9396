"""dlrt-bench runs end to end on tiny settings and writes well-formed CSVs (no timing assertions), without Hydra."""

import csv
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dlrt.bench import breakdown, cli, steps, timing_study

from helpers import python

ROOT = Path(__file__).resolve().parents[1]
# as on a GPU machine that has torch but neither Hydra nor OmegaConf: importing them fails
WITHOUT_HYDRA = "import sys; sys.modules.update(hydra=None, omegaconf=None); "


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    return math.isfinite(float(value)) and float(value) > 0


def _python(code: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return python("-c", code, *args, cwd=ROOT, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Every suite with --quick, in a process where Hydra and OmegaConf cannot be imported."""
    out = tmp_path_factory.mktemp("bench")
    code = WITHOUT_HYDRA + (
        "import torch; from dlrt.bench.cli import main; threads = torch.get_num_threads(); code = main(sys.argv[1:]); "
        "assert torch.get_num_threads() == threads, 'main() gives the thread count back'; sys.exit(code)")
    result = _python(code, "--quick", "--device", "cpu", "--out", str(out), "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return result, out


def test_the_entry_point_imports_neither_hydra_nor_omegaconf():
    result = _python("import sys, dlrt.bench.cli; print(sorted({'hydra', 'omegaconf'} & set(sys.modules)))")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_python_m_dlrt_bench_runs_without_hydra():
    result = _python(WITHOUT_HYDRA + "import runpy; sys.argv = ['dlrt-bench', '--help']; "
                                     "runpy.run_module('dlrt.bench', run_name='__main__')", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--suite" in result.stdout


META = ("device", "device_name", "torch", "threads", "flush_denormal", "date", "command", "code_version")


def test_writes_every_file(quick_run):
    result, out = quick_run
    for name in ("steps.csv", "timing_study.csv", "breakdown.csv", "linalg.csv", "timing_study.png", "steps.txt",
                 "timing_study.txt", "breakdown.txt", "linalg.txt"):
        assert os.path.getsize(out / name) > 0, name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files
    assert "FAILED" not in result.stdout


def test_steps_csv(quick_run):
    rows = _rows(quick_run[1] / "steps.csv")
    for column in ("case", "method", "phase", "batch", "ranks_start", "ranks_end", "median_ms",
                   "ratio_to_dense", "others_cpu_pct", *META):
        assert column in rows[0], column
    cases = {r["case"] for r in rows}
    assert cases == {"lenet5_t0.15", "fc500_t0.09", "fc500_r40"}
    for case in cases:
        methods = {(r["method"], r["phase"]) for r in rows if r["case"] == case}
        assert methods == {(m, p) for m in steps.STEP_METHODS for p in ("train", "infer")}
    assert all(_positive(r["median_ms"]) and _positive(r["ratio_to_dense"]) for r in rows)
    # each ratio is to the dense step of its own case and phase (not dense_fused's, not another case's)
    dense = {(r["case"], r["phase"]): float(r["median_ms"]) for r in rows if r["method"] == "dense"}
    for r in rows:  # the CSV holds 4 significant digits
        ratio = float(r["median_ms"]) / dense[r["case"], r["phase"]]
        assert float(r["ratio_to_dense"]) == pytest.approx(ratio, rel=2e-3), r
    assert not any(r["error"] for r in rows)
    lenet = [r for r in rows if r["case"] == "lenet5_t0.15" and r["method"] == "adaptive_pinned"]
    assert all(r["ranks_start"] == r["ranks_end"] == "[9,16,28]" for r in lenet)
    fixed = [r for r in rows if r["case"] == "fc500_t0.09" and r["method"] == "fixed"]
    assert all(r["ranks_start"] == r["ranks_end"] == "[35,53,51,46]" for r in fixed)
    assert all(r["threads"] == "1" and r["device"] == "cpu" for r in rows)


def test_timing_study_csv(quick_run):
    rows = _rows(quick_run[1] / "timing_study.csv")
    for column in ("rank", "layer_ranks", "method", "phase", "batch", "median_ms", "ratio_to_dense", *META):
        assert column in rows[0], column
    assert {(r["method"], r["phase"]) for r in rows} == {
        ("dense", "train"), ("dense", "infer"), ("fixed", "train"), ("adaptive", "train"), ("low_rank", "infer")}
    assert {r["rank"] for r in rows if r["method"] != "dense"} == {str(r) for r in timing_study.QUICK_TIMING_RANKS}
    for r in rows:
        assert _positive(r["median_ms"]) and _positive(r["ratio_to_dense"])
        if r["method"] in ("fixed", "adaptive"):  # r_min = r_max = r keeps the rank put
            assert set(r["layer_ranks"].strip("[]").split(",")) == {r["rank"]}


def test_breakdown_csv(quick_run):
    rows = _rows(quick_run[1] / "breakdown.csv")
    assert not any(r.get("error") for r in rows)
    for case, layers in (("lenet5_t0.15", 3), ("fc500_t0.09", 4)):
        adaptive = {r["part"]: r for r in rows if r["case"] == case and r["method"] == "adaptive"}
        for part in ("zero_grad", "forward+loss", "backward", "qr", "svd", "truncation", "rank_sync",
                     "project_gradient", "set_factors", "update_rule", "state_moves", "dense_params_step",
                     "step_other", "total"):
            assert part in adaptive, (case, part)
        assert set(adaptive) - {"zero_grad", "forward+loss", "backward", "step_other", "total"} <= set(breakdown.STEP_PARTS)
        # the labels: a set_factors range per layer, one QR range for all new directions (same-shaped ones in one
        # batched call) and one SVD range for all cores
        assert float(adaptive["set_factors"]["calls_per_step"]) == layers
        assert float(adaptive["qr"]["calls_per_step"]) == float(adaptive["svd"]["calls_per_step"]) == 1
        assert abs(float(adaptive["total"]["pct"]) - 100) < 1e-6
        assert abs(sum(float(r["mean_ms"]) for p, r in adaptive.items() if p != "total")
                   - float(adaptive["total"]["mean_ms"])) < 1e-2 * float(adaptive["total"]["mean_ms"])
        assert float(adaptive["step_other"]["mean_ms"]) >= 0
        assert all(_positive(r["mean_ms"]) for r in adaptive.values() if r["part"] != "step_other")
        dense = {r["part"] for r in rows if r["case"] == case and r["method"] == "dense"}
        assert dense == {"zero_grad", "forward+loss", "backward", "opt.step", "total"}


def test_labelled_parts_are_summed_per_step_and_a_label_inside_another_counts_for_the_outer():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with record_function(breakdown.STEP_LABEL):
                for _ in range(2):
                    with record_function("dlrt::qr"):
                        torch.ones(4).sum()
                with record_function("dlrt::svd"), record_function("dlrt::qr"):
                    torch.ones(4).sum()
                with record_function("not a part"), record_function("dlrt::truncation"):
                    torch.ones(4).sum()
        with record_function("dlrt::qr"):  # outside the steps: not counted
            torch.ones(4).sum()
    parts = breakdown.labelled_parts(prof.events())
    assert len(parts) == 2
    for step in parts:
        assert {name: count for name, (_, _, count) in step.items()} == {"qr": 2, "svd": 1, "truncation": 1}
        assert all(host_ms > 0 and device_ms == 0 for host_ms, device_ms, _ in step.values())


def test_linalg_csv(quick_run):
    rows = _rows(quick_run[1] / "linalg.csv")
    assert {"variant", "median_ms", "qr_shapes", "svd_sizes", *META} <= set(rows[0])
    now = [r for r in rows if r["variant"].endswith("(now)")]
    assert all(_positive(r["median_ms"]) for r in now)
    cases = [r["case"] for r in now if r["qr_shapes"]]
    cores = [r["case"] for r in now if not r["qr_shapes"]]
    assert len(cases) == 4 and len(set(cases)) == 2  # a QR and an SVD for each step case
    assert cores == ["timing_study_r4"]  # the SVD of the timing study's cores


def test_bad_arguments():
    with pytest.raises(SystemExit):
        cli.parse_args(["--suite", "nope"])
    with pytest.raises(SystemExit):
        cli.parse_args(["--ranks", "0,5"])


def test_an_option_left_out_takes_its_quick_or_full_size_and_its_help_states_the_full_one(capsys):
    quick, full = cli.parse_args(["--quick"]), cli.parse_args([])
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    usage = " ".join(capsys.readouterr().out.split())
    for name, (small, large) in cli.DEFAULTS.items():
        assert (getattr(quick, name), getattr(full, name)) == (small, large), name  # filled in, not left None
        assert small <= large, name  # --quick never runs the larger size
        flag = "--" + name.replace("_", "-")
        assert re.search(rf"{flag} [A-Z_]+ (?:(?!--)[^[])*\[{large:g}\]", usage), f"{flag}'s help lacks [{large:g}]"
    assert cli.parse_args(["--quick", "--steps", "7"]).steps == 7  # what is given wins over --quick
    assert cli.parse_args(["--suite", "linalg, steps"]).suites == ("linalg", "steps")
    assert full.suites == tuple(cli.SUITES)


def test_crossover():
    rows = [{"method": "fixed", "phase": "train", "rank": r, "ratio_to_dense": q}
            for r, q in ((10, 0.5), (20, 0.8), (40, 1.25))]
    text = timing_study.crossover(rows, "fixed", "train")
    assert text.startswith("~") and 20 < float(text[1:].split()[0]) < 40
    assert timing_study.crossover(rows[:2], "fixed", "train").startswith("> 20")


def test_outputs_are_readable_by_others(quick_run):
    mode = os.stat(quick_run[1] / "steps.csv").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_the_memory_measurement_is_exact_on_tensors_of_known_size():
    """4 MiB, then 8 MiB (12 live), free the 4, then 2 MiB: the peak is 12 MiB to the byte; and a small net's
    parts at its peak are its parameters, gradients, optimizer state and the optimizer's temporaries."""
    from dlrt.bench.memory import peak_step_memory

    mib = 2 ** 20

    def step():
        a = torch.empty(4 * mib, dtype=torch.uint8)
        b = torch.empty(8 * mib, dtype=torch.uint8)
        del a
        return b, torch.empty(2 * mib, dtype=torch.uint8)

    measured = peak_step_memory(step, warmup=1)
    assert measured.peak == 12 * mib
    net = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(64, 256)

    def train():
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()

    measured = peak_step_memory(train, net, opt)
    weights = sum(p.numel() for p in net.parameters()) * 4
    assert measured.parts["parameters"] == weights and measured.parts["optimizer state"] == weights
    # the ReLU saves its output (which the second linear saves too: one storage), square its input; x is older
    assert measured.saved_for_backward == (64 * 512 + 64 * 10) * 4
    assert measured.peak == sum(measured.parts.values())


def test_the_memory_suite_writes_dense_beside_each_method(tmp_path):
    assert cli.main(["--quick", "--device", "cpu", "--suite", "memory", "--out", str(tmp_path), "--threads", "1"]) == 0
    rows = _rows(tmp_path / "memory.csv")
    study = [r for r in rows if r["case"] == "timing_study_r8" and r["optimizer"] == "adam"]
    assert [r["method"] for r in study] == ["dense", "adaptive", "fixed", "parallel"]
    assert all(_positive(r["peak_mib"]) for r in study) and float(study[0]["pct_of_dense"]) == 100
    assert (tmp_path / "memory.png").read_bytes()[:4] == b"\x89PNG"


def test_basis_every_times_whole_cycles_and_measures_a_coefficient_step(tmp_path):
    """--basis-every 3: adaptive_k3 beside the k = 1 rows; a timed call is one cycle (three steps,
    the ranks kept by the basis step), and the memory suite measures a coefficient step, which holds less than the
    basis step (no recorded x and dy, no G V or G^T U)."""
    args = ["--quick", "--device", "cpu", "--out", str(tmp_path), "--threads", "1", "--basis-every", "1,3"]
    assert cli.main(args + ["--suite", "steps,memory", "--memory-cases", "timing_study_r8"]) == 0
    steps = [r for r in _rows(tmp_path / "steps.csv") if r["case"] == "fc500_r40" and r["phase"] == "train"]
    assert [r["method"] for r in steps][:4] == ["dense", "dense_fused", "adaptive", "adaptive_k3"]
    assert all(_positive(r["median_ms"]) for r in steps)
    rows = _rows(tmp_path / "memory.csv")
    assert {r["case"] for r in rows} == {"timing_study_r8"}  # --memory-cases
    memory = {r["method"]: r for r in rows if r["optimizer"] == "sgd"}
    assert float(memory["adaptive_k3"]["peak_mib"]) < float(memory["adaptive"]["peak_mib"])


def test_the_suites_run_only_when_named_are_left_out_of_all():
    assert set(cli.parse_args([]).suites) == set(cli.SUITES)
    assert not set(cli.SUITES) & set(cli.NAMED_ONLY)
    assert cli.parse_args(["--suite", "profile,steps"]).suites == ("profile", "steps")
    for args in (["--suite", "throughput", "--tp-precisions", "fp16"], ["--suite", "throughput", "--tp-images", "5"],
                 ["--suite", "torchvision", "--tv-models", "vgg11"], ["--suite", "torchvision", "--tv-steps", "0"],
                 ["--suite", "profile", "--profile-method", "adaptive_graphed", "--device", "cpu"],
                 ["--suite", "profile", "--profile-steps", "0"]):
        with pytest.raises(SystemExit):
            cli.parse_args(args)
    assert cli.parse_args(["--suite", "steps", "--profile-steps", "0"]).suites == ("steps",)  # checked when it runs


def test_the_profile_suite_times_then_profiles_a_small_timing_study(tmp_path, capsys):
    args = ["--suite", "profile", "--profile-case", "timing_study", "--profile-rank", "4", "--width", "32",
            "--ts-batch", "8", "--profile-method", "fixed", "--profile-rows", "40", "--device", "cpu", "--threads", "1"]
    assert cli.main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"timing_study fixed, ranks \[4,4,4,4\], batch 8, 1 thread\(s\): median step [0-9.]+ ms", out)
    rows = _rows(tmp_path / "profile.csv")
    operations = {r["operation"] for r in rows}
    assert "aten::linalg_qr" in operations and "dlrt::qr" in operations  # the fixed-rank basis update, labelled
    assert all(float(r["self_cpu_ms"]) >= 0 and int(r["calls"]) >= 1 for r in rows)
    assert [float(r["self_cpu_ms"]) for r in rows] == sorted((float(r["self_cpu_ms"]) for r in rows), reverse=True)


def test_the_torchvision_suite_counts_and_times_resnet50(tmp_path):
    args = ["--suite", "torchvision", "--tv-models", "resnet50", "--tv-batch", "1", "--tv-steps", "1", "--device", "cpu",
            "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    (row,) = _rows(tmp_path / "torchvision.csv")
    # the committed figures (results/bench/torchvision_nets.csv): 52 layers converted of 25502912 weights
    assert (row["model"], row["converted_layers"], row["full_rank_weight_params"]) == ("resnet50", "52", "25502912")
    assert _positive(row["dense_step_ms"]) and _positive(row["adaptive_step_ms"])
    assert float(row["ratio"]) == pytest.approx(float(row["adaptive_step_ms"]) / float(row["dense_step_ms"]), rel=1e-3)


def test_the_throughput_suite_counts_every_image_of_one_and_two_processes(tmp_path):
    args = ["--suite", "throughput", "--tp-images", "40", "--tp-image-size", "32", "--tp-batch", "8",
            "--tp-loader-workers", "0", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows = _rows(tmp_path / "throughput.csv")
    assert [(r["processes"], r["phase"], r["precision"]) for r in rows] == [
        ("1", "input", "-"), ("1", "train", "fp32"), ("2", "input", "-"), ("2", "train", "fp32")]
    # 40 generated, 4 held out: an epoch reads every training image once, in one process or two
    assert {r["images"] for r in rows} == {"36"}
    assert all(_positive(r["images_per_s"]) for r in rows)
