"""The layering rule: the method (dlrt) imports torch only, never the harness (dlrt.experiments, dlrt.report,
dlrt.bench) nor what only the harness needs; `import dlrt` itself imports nothing heavy."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

from helpers import python

REPO = Path(__file__).resolve().parent.parent


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """import-linter on the package and pyproject.toml under `root` (the checkout or a copy of it); its console
    script, as import-linter has no `python -m`."""
    return subprocess.run([Path(sys.executable).parent / "lint-imports", "--no-cache"], cwd=root, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(root)})


def test_the_import_contract_of_pyproject_holds():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_the_contract_covers_every_module_of_the_method_new_ones_included(tmp_path):
    """On a copy of the package: a new module, one the old hand-written list left out (basis_cycle), and one that
    reaches the harness through the dlrt.cli shim each break the contract, which names no module of the method."""
    shutil.copytree(REPO / "dlrt", tmp_path / "dlrt", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    (tmp_path / "dlrt" / "brand_new.py").write_text("import dlrt.experiments.cli\n")
    with open(tmp_path / "dlrt" / "basis_cycle.py", "a") as f:
        f.write("\nfrom dlrt.report import tables\n")
    (tmp_path / "dlrt" / "via_shim.py").write_text("import dlrt.cli\n")
    (tmp_path / "dlrt" / "needs_hydra.py").write_text("import hydra\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0 and "0 kept, 1 broken" in result.stdout, result.stdout + result.stderr
    for link in ("dlrt.brand_new -> dlrt.experiments.cli", "dlrt.basis_cycle -> dlrt.report.tables",
                 "dlrt.via_shim -> dlrt.cli", "dlrt.needs_hydra -> hydra"):
        assert link in result.stdout, result.stdout


def test_import_dlrt_is_cheap_and_the_method_needs_no_harness():
    code = ("import sys, dlrt; cheap = not {'torch', 'torchvision', 'hydra', 'omegaconf'} & set(sys.modules); "
            "from dlrt import DLRTOptimizer, LowRankLinear, convert; dlrt.export; dlrt.metrics; "
            "print(cheap, sorted({'torchvision', 'hydra', 'omegaconf', 'pandas', 'dlrt.experiments'} & set(sys.modules)))")
    out = python("-c", code, cwd="/", timeout=120)
    assert out.stdout.split() == ["True", "[]"], out.stderr


def test_python_m_runs_dlrt_run_from_the_harness_and_under_its_old_name(tmp_path):
    """`python -m dlrt.experiments` is dlrt-run; `python -m dlrt.cli`, the name the run records print, still is."""
    outputs = [python("-m", module, "--cfg", "job", "model=fc", "tau=0.25", cwd=tmp_path, timeout=120)
               for module in ("dlrt.experiments", "dlrt.cli")]
    for out in outputs:
        assert out.returncode == 0, out.stderr
    assert "tau: 0.25" in outputs[0].stdout and outputs[0].stdout == outputs[1].stdout


def test_the_harness_uses_only_hydras_public_api():
    """hydra._internal may change in any Hydra release (the sweeper is written on hydra.plugins.sweeper.Sweeper)."""
    private = []
    for path in sorted([*(REPO / "dlrt").rglob("*.py"), *(REPO / "hydra_plugins").rglob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            private += [f"{path.relative_to(REPO)}: {name}" for name in names if name.startswith("hydra._internal")]
    assert private == []
