"""Packaging glue that pyproject.toml cannot express: ship the top-level ``configs/`` folder in the wheel as
the package data ``lightning_robust/configs/*.yaml`` (read by ``lightning-robust configs``), while the
repository keeps ``configs/`` at its root where the README and the tests point."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["lightning_robust*"]), "lightning_robust.configs"],
    package_dir={"lightning_robust.configs": "configs"},
    package_data={"lightning_robust.configs": ["*.yaml"]},
)
