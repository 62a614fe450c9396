"""Facts written once (issue 25): each helper, formula and protocol fact below has one home, and the code that
used to hold a copy of it reads that home instead."""

from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent


# --- atomic writes ------------------------------------------------------------------------------------------------


def test_one_module_renames_files_into_place():
    """dlrt.atomic is the one writer that renames a temporary file over the real one; the method's export and the
    harness's run folders, bench and plots all go through it."""
    renaming = [str(path.relative_to(REPO)) for path in sorted((REPO / "dlrt").rglob("*.py"))
                if "os.replace(" in path.read_text()]
    assert renaming == ["dlrt/atomic.py"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_one(tmp_path):
    from dlrt.atomic import atomic_write
    from dlrt.experiments.run_folder import RunFolderError, atomic_write as run_folder_write

    path = tmp_path / "f.txt"
    atomic_write(path, lambda tmp: tmp.write_text("old"))

    def fails(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(path, fails)
    with pytest.raises(RunFolderError, match="No space left on device.*the previous one is kept"):
        run_folder_write(path, fails)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_export_writes_through_the_atomic_writer(tmp_path, monkeypatch):
    import dlrt.export
    from test_export import TinyNet

    written = []
    real = dlrt.export.atomic_write
    monkeypatch.setattr(dlrt.export, "atomic_write", lambda path, write: written.append(path) or real(path, write))
    path = dlrt.export.save_model(TinyNet(), tmp_path / "net.safetensors")
    assert written == [path] and dlrt.export.load_exported(path)


# --- the device, its name, threads ----------------------------------------------------------------------------


def test_the_bench_and_the_runs_resolve_and_name_devices_alike():
    from dlrt.bench import cli, output
    from dlrt.experiments import devices, train, validate  # noqa: F401  (validate imports it where it is used)

    assert cli.resolve_device is devices.resolve_device and train.resolve_device is devices.resolve_device
    assert output.device_name is devices.device_name and train.device_name is devices.device_name
    cpu = torch.device("cpu")
    assert output.Meta(cpu, "dlrt-bench", False).fields["device_name"] == devices.device_name(cpu)
    assert devices.resolve_device("cpu") == cpu


def test_a_cpu_name_says_how_many_threads_torch_uses():
    from dlrt.experiments.devices import device_name
    from dlrt.linalg import torch_threads

    with torch_threads(1):
        assert device_name(torch.device("cpu")).endswith(", 1 thread")
    with torch_threads(2):
        assert device_name(torch.device("cpu")).endswith(", 2 threads")


def test_torch_threads_sets_the_count_inside_and_restores_it_after():
    from dlrt.linalg import torch_threads

    before = torch.get_num_threads()
    with torch_threads(before + 1):
        assert torch.get_num_threads() == before + 1
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(before + 1):
        raise RuntimeError
    assert torch.get_num_threads() == before


# --- update rule -> torch optimizer ---------------------------------------------------------------------------


@pytest.mark.parametrize("case_index", [0, 1])  # LeNet5's SGD, the FC net's Adam
def test_the_benchs_dense_baseline_is_the_optimizer_dlrt_gives_dense_parameters(case_index):
    from dlrt import DLRTOptimizer, LowRankLinear
    from dlrt.bench.cases import dense_optimizer, step_cases

    case = step_cases(quick=True)[case_index]
    model = nn.Sequential(LowRankLinear(8, 6, rank=2), nn.Linear(6, 3))
    theirs = DLRTOptimizer(model, lr=case.lr, optimizer=case.optimizer).dense_optimizer
    fused, default = (dense_optimizer(model[1].parameters(), case, fused) for fused in (True, False))
    settings = lambda opt: {k: v for k, v in opt.param_groups[0].items() if k not in ("params", "fused", "capturable")}
    for ours in (fused, default):
        assert type(ours) is type(theirs) and settings(ours) == settings(theirs)
    assert fused.param_groups[0]["fused"] is True and default.param_groups[0]["fused"] is None
