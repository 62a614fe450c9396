"""dlrt-bench runs end to end on tiny settings and writes well-formed CSVs (no timing assertions)."""

import csv
import math
import os

import pytest
import torch

from dlrt import bench


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _positive(value: str) -> bool:
    return math.isfinite(float(value)) and float(value) > 0


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    code = bench.main(["--quick", "--device", "cpu", "--out", str(out), "--threads", "1"])
    assert torch.get_num_threads() == threads  # main() gives the thread count back
    return code, out


META = ("device", "device_name", "torch", "threads", "flush_denormal", "date", "command", "code_version")


def test_writes_every_file(quick_run):
    code, out = quick_run
    assert code == 0
    for name in ("steps.csv", "timing_study.csv", "breakdown.csv", "linalg.csv", "timing_study.png", "steps.txt", "timing_study.txt", "breakdown.txt", "linalg.txt"):
        assert os.path.getsize(out / name) > 0, name
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]  # atomic writes leave no temp files


def test_steps_csv(quick_run):
    rows = _rows(quick_run[1] / "steps.csv")
    for column in ("case", "method", "phase", "batch", "ranks_start", "ranks_end", "median_ms",
                   "ratio_to_dense", "others_cpu_pct", *META):
        assert column in rows[0], column
    cases = {r["case"] for r in rows}
    assert cases == {"lenet5_t0.15", "fc500_t0.09", "fc500_r40"}
    for case in cases:
        methods = {(r["method"], r["phase"]) for r in rows if r["case"] == case}
        assert methods == {(m, p) for m in bench.STEP_METHODS for p in ("train", "infer")}
    assert all(_positive(r["median_ms"]) and _positive(r["ratio_to_dense"]) for r in rows)
    assert all(float(r["ratio_to_dense"]) == 1 for r in rows if r["method"] == "dense")
    lenet = [r for r in rows if r["case"] == "lenet5_t0.15" and r["method"] == "adaptive_pinned"]
    assert all(r["ranks_start"] == r["ranks_end"] == "[9,16,28]" for r in lenet)
    assert all(r["threads"] == "1" and r["device"] == "cpu" for r in rows)


def test_timing_study_csv(quick_run):
    rows = _rows(quick_run[1] / "timing_study.csv")
    for column in ("rank", "layer_ranks", "method", "phase", "batch", "median_ms", "ratio_to_dense", *META):
        assert column in rows[0], column
    assert {(r["method"], r["phase"]) for r in rows} == {
        ("dense", "train"), ("dense", "infer"), ("fixed", "train"), ("adaptive", "train"), ("low_rank", "infer")}
    assert {r["rank"] for r in rows if r["method"] != "dense"} == {str(r) for r in bench.QUICK_TIMING_RANKS}
    for r in rows:
        assert _positive(r["median_ms"]) and _positive(r["ratio_to_dense"])
        if r["method"] in ("fixed", "adaptive"):  # r_min = r_max = r keeps the rank put
            assert set(r["layer_ranks"].strip("[]").split(",")) == {r["rank"]}


def test_breakdown_csv(quick_run):
    rows = _rows(quick_run[1] / "breakdown.csv")
    adaptive = {r["part"]: r for r in rows if r["case"] == "lenet5_t0.15" and r["method"] == "adaptive"}
    for part in ("forward+loss", "backward", "qr", "svd", "truncation+sync", "step_other", "total"):
        assert part in adaptive, part
    # one QR per factor of 3 layers, a second where a batch of 16 leaves the step fewer directions than the rank
    assert 6 <= float(adaptive["qr"]["calls_per_step"]) <= 12
    assert float(adaptive["svd"]["calls_per_step"]) == 3
    assert abs(float(adaptive["total"]["pct"]) - 100) < 1e-6
    assert all(_positive(r["mean_ms"]) for r in adaptive.values() if r["part"] != "step_other")


def test_linalg_csv(quick_run):
    rows = _rows(quick_run[1] / "linalg.csv")
    assert {"variant", "median_ms", "qr_shapes", "svd_sizes", *META} <= set(rows[0])
    now = [r for r in rows if r["variant"].endswith("(now)")]
    assert all(_positive(r["median_ms"]) for r in now)
    steps = [r["case"] for r in now if r["qr_shapes"]]
    cores = [r["case"] for r in now if not r["qr_shapes"]]
    assert len(steps) == 4 and len(set(steps)) == 2  # a QR and an SVD for each step case
    assert cores == ["timing_study_r4"]  # the SVD of the timing study's cores


def test_patches_are_undone(quick_run):
    assert torch.linalg.qr.__module__ != bench.__name__ and torch.linalg.svd.__module__ != bench.__name__
    from dlrt import integrators, layers
    assert integrators.truncation_ranks.__module__ == integrators.__name__
    assert layers._LowRankLayer.project_gradient.__qualname__.startswith("_LowRankLayer")


def test_bad_arguments():
    with pytest.raises(SystemExit):
        bench.parse_args(["--suite", "nope"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--ranks", "0,5"])


def test_crossover():
    rows = [{"method": "fixed", "phase": "train", "rank": r, "ratio_to_dense": q}
            for r, q in ((10, 0.5), (20, 0.8), (40, 1.25))]
    text = bench.crossover(rows, "fixed", "train")
    assert text.startswith("~") and 20 < float(text[1:].split()[0]) < 40
    assert bench.crossover(rows[:2], "fixed", "train").startswith("> 20")


def test_outputs_are_readable_by_others(quick_run):
    mode = os.stat(quick_run[1] / "steps.csv").st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
