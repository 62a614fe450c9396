"""dlrt installs as users install packages: a wheel, installed outside the checkout, runs dlrt-run from another
folder. Its configs are the checkout's configs/, which the wheel carries as dlrt/experiments/conf (setup.py)."""

import shutil
import subprocess
import sysconfig
import zipfile
from pathlib import Path

from helpers import QUICK, python

REPO = Path(__file__).resolve().parent.parent


def succeeded(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def installed(program: Path, *args, cwd=None) -> subprocess.CompletedProcess:
    """A program of the fresh environment (its python, its dlrt-run): not helpers.python, whose interpreter is
    this one and imports dlrt from the checkout."""
    return succeeded(subprocess.run([str(program), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                                    timeout=600))


def test_the_wheel_runs_dlrt_run_from_another_folder(tmp_path):
    source = tmp_path / "source"  # a copy: setuptools builds in the source tree, and must not leave build/ in ours
    kept = {"pyproject.toml", "setup.py", "README.md", "configs", "dlrt", "hydra_plugins"}
    shutil.copytree(REPO, source, symlinks=True, ignore=lambda folder, names: [
        n for n in names if n == "__pycache__" or (Path(folder) == REPO and n not in kept)])
    succeeded(python("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist", source))
    (wheel,) = (tmp_path / "dist").glob("dlrt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    configs = sorted(str(p.relative_to(REPO / "configs")) for p in (REPO / "configs").rglob("*.yaml"))
    assert sorted(n.removeprefix("dlrt/experiments/conf/") for n in names if n.startswith("dlrt/experiments/conf/")) \
        == configs  # every config, once, and nothing else
    assert "hydra_plugins/dlrt_sweeper/checking_sweeper.py" in names

    # a fresh environment that sees this one's torch, Hydra and so on, but not the checkout
    succeeded(python("-m", "venv", tmp_path / "env"))
    env_python, env_dlrt_run = tmp_path / "env" / "bin" / "python", tmp_path / "env" / "bin" / "dlrt-run"
    site = installed(env_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed(env_python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = installed(env_python, "-c", "import dlrt.experiments.schema as s; print(s.CONFIG_DIR)",
                      cwd=elsewhere).stdout
    assert where.startswith(site)  # the installed package, not the checkout
    job = installed(env_dlrt_run, "--cfg", "job", "experiment=lenet5_mnist", cwd=elsewhere).stdout
    assert "init: authors" in job and "name: adaptive" in job  # the experiment's and the method's configs were found
    result = installed(env_dlrt_run, *QUICK, cwd=elsewhere)
    assert "done: runs/lenet5-synthetic-adaptive" in result.stderr
    assert list((elsewhere / "runs").glob("*/summary.json"))
