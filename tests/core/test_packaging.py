"""What pip is told: the requirements that decide which machines the project installs on."""

from __future__ import annotations

import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from conftest import PROJECT_ROOT

PROJECT = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]


def requirement(name: str, group: list[str]) -> Requirement:
    return next(Requirement(line) for line in group if Requirement(line).name == name)


def test_transformers_admits_only_releases_with_native_nemotron_h():
    """NemotronH is in transformers from 5.3 (5.0 and 5.2 have no models/nemotron_h)."""
    allowed = requirement("transformers", PROJECT["dependencies"]).specifier
    assert "5.2.0" not in allowed and "5.0.0" not in allowed and "5.3.0" in allowed and "5.17.0" in allowed
    from transformers import NemotronHForCausalLM  # the installed one has it

    assert NemotronHForCausalLM.__module__.startswith("transformers.models.nemotron_h")


def test_installs_on_python_3_11_to_3_13():
    python = SpecifierSet(PROJECT["requires-python"])
    assert all(version in python for version in ("3.11.7", "3.12.3", "3.13.1")) and "3.14.0" not in python


def test_gpu_extra_has_the_mamba_kernels_and_bitsandbytes():
    names = {Requirement(line).name for line in PROJECT["optional-dependencies"]["gpu"]}
    assert names == {"bitsandbytes", "mamba-ssm", "causal-conv1d"}
    assert "import-linter" in {Requirement(line).name for line in PROJECT["optional-dependencies"]["dev"]}
