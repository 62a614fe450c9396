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


# --- spectra ----------------------------------------------------------------------------------------------------


def test_the_spectra_are_defined_once_and_every_label_comes_from_them():
    from dlrt.experiments import models, protocols, schema

    assert models.SPECTRA is protocols.SPECTRA
    assert [s.value for s in schema.Spectrum] == list(protocols.SPECTRA)
    assert protocols.SPECTRUM_LABELS == {"one": "1", "pow2": "2^-k", "pow10": "10^-k"}  # as the paper writes them
    plots = (REPO / "dlrt/report/plots.py").read_text()
    assert "pow10" not in plots and "10^{-k}" not in plots


def test_a_spectrum_start_decays_by_its_d():
    from dlrt.experiments.models import spectrum_values
    from dlrt.experiments.protocols import SPECTRA

    for name, d in SPECTRA.items():
        values = spectrum_values(name, 3, "svd", torch.zeros(1, dtype=torch.float64))
        torch.testing.assert_close(values, torch.tensor([1.0, 1 / d, 1 / d**2], dtype=torch.float64))


# --- counting conventions ---------------------------------------------------------------------------------------


def test_the_fc_tables_count_in_dlrt_metrics_fc_convention():
    """PAPER.md §4: the FC tables count eval Σ (n+m) r + dense, train Σ (2 (n+m) r + 4 r²) + dense; written out here
    by hand for the paper's width-500 ranks at ϑ = 0.09."""
    from dlrt.metrics import low_rank_layer_count
    from dlrt.report.fc import fc_counts

    ranks = [35, 53, 51, 46]
    eval_params = (500 + 784) * 35 + 1000 * (53 + 51 + 46) + 10 * 500
    train_params = 2 * (500 + 784) * 35 + 2 * 1000 * (53 + 51 + 46) + 4 * sum(r * r for r in ranks) + 2 * 10 * 500
    dense = 500 * 784 + 3 * 500 * 500 + 10 * 500
    counts = fc_counts(500, "[35,53,51,46]")
    assert (counts["eval_params_fc"], counts["train_params_fc"]) == (eval_params, train_params)
    assert counts["cr_eval_fc"] == pytest.approx(100 * (1 - eval_params / dense))
    assert counts["cr_train_fc"] == pytest.approx(100 * (1 - train_params / (2 * dense)))
    assert fc_counts(500, "full")["cr_train_fc"] == 0
    assert low_rank_layer_count(500, 784, 35, "fc", "eval") == (500 + 784) * 35
    source = (REPO / "dlrt/report/fc.py").read_text()
    assert "4 * r * r" not in source and "(n + m) * r" not in source  # the convention is not written twice


def test_run_records_keep_the_two_conventions_they_always_held():
    from dlrt import LowRankLinear
    from dlrt.metrics import parameter_report

    report = parameter_report(nn.Sequential(LowRankLinear(8, 6, rank=2), nn.Linear(6, 3)))
    assert {key.rsplit("_", 1)[1] for key in report if key.startswith("cr_")} == {"honest", "paper"}


# --- the paper's protocols ----------------------------------------------------------------------------------------


def flat(tree: dict, prefix: str = "") -> dict:
    found = {}
    for key, value in tree.items():
        found.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return found


def test_no_experiment_config_writes_a_value_of_its_tables_protocol():
    """The experiment configs read their table's settings (lr, epochs, model.rank, ...) from protocols.py."""
    import yaml

    from dlrt.experiments.protocols import EXPERIMENTS

    for name, (protocol, _) in EXPERIMENTS.items():
        written = flat(yaml.safe_load((REPO / "configs" / "experiment" / f"{name}.yaml").read_text()))
        for key in protocol.expected("any").keys() & written.keys():
            assert str(written[key]).startswith(f"${{dlrt.protocol:{name},"), (name, key, written[key])


def test_the_imagenet_rows_are_one_experiment_and_a_model():
    from omegaconf import OmegaConf

    for model in ("resnet50", "vgg16"):
        config = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "experiment" / f"imagenet_{model}.yaml"))
        assert config == {"defaults": ["imagenet", {"override /model": model}]}


def test_the_dense_lenet5_accuracy_is_the_tables():
    from dlrt.experiments.protocols import PAPER_LENET5, PAPER_LENET5_DENSE_ACC

    assert PAPER_LENET5["dense"][0] == "98.8 ± 0.06" and PAPER_LENET5_DENSE_ACC == 98.8
