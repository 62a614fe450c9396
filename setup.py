"""The package list, and configs/ carried inside the wheel (the rest of the build is pyproject.toml).

configs/ at the top of the repository is the one source of dlrt-run's Hydra configs. A wheel carries it as the
folder dlrt/experiments/conf (a package-dir mapping), so that an installed dlrt-run finds its configs without a
checkout; dlrt.experiments.schema.CONFIG_DIR says which of the two a process reads. pyproject.toml cannot add a
mapped folder to the packages it finds, hence this file.
"""

from setuptools import find_namespace_packages, setup

setup(
    # hydra_plugins is a namespace package (Hydra's plugin discovery asks that it has no __init__.py)
    packages=find_namespace_packages(include=["dlrt*", "hydra_plugins*"],
                                     exclude=["*__pycache__", "dlrt.experiments.conf*"]) + ["dlrt.experiments.conf"],
    package_dir={"dlrt.experiments.conf": "configs"},
    package_data={"dlrt.experiments.conf": ["*.yaml", "*/*.yaml"]},
)
