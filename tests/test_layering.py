"""The layering rule: the method (dlrt) imports torch only, never the harness (dlrt.experiments, dlrt.report,
dlrt.bench) nor what only the harness needs; `import dlrt` itself imports nothing heavy."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_import_contract_of_pyproject_holds():
    result = subprocess.run([Path(sys.executable).parent / "lint-imports"], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_import_dlrt_is_cheap_and_the_method_needs_no_harness():
    code = ("import sys, dlrt; cheap = not {'torch', 'torchvision', 'hydra', 'omegaconf'} & set(sys.modules); "
            "from dlrt import DLRTOptimizer, LowRankLinear, convert; dlrt.export; dlrt.metrics; "
            "print(cheap, sorted({'torchvision', 'hydra', 'omegaconf', 'pandas', 'dlrt.experiments'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.stdout.split() == ["True", "[]"], out.stderr
