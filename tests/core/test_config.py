"""params.yaml: every shipped params file loads; unknown keys and wrong types fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.conftest import PROJECT_ROOT

from medlora.core.config import ConfigError, Params, load_params, parse_params

SHIPPED_PARAMS = sorted([PROJECT_ROOT / "params.yaml", *(PROJECT_ROOT / "configs").glob("*.yaml")])


@pytest.mark.parametrize("path", SHIPPED_PARAMS, ids=lambda p: p.name)
def test_every_shipped_params_file_loads(path: Path):
    params = load_params(path)
    assert isinstance(params, Params)
    # Every key in the file made it into the typed object (nothing silently dropped).
    raw = yaml.safe_load(path.read_text())
    for section, values in raw.items():
        for key, value in (values or {}).items():
            parsed = getattr(getattr(params, section), key)
            assert parsed == (tuple(value) if isinstance(value, list) else value), f"{section}.{key}"


def test_misspelled_key_is_named():
    with pytest.raises(ConfigError, match=r"train: unknown key 'learning_rat'"):
        parse_params({"train": {"learning_rat": 1e-4}}, "params.yaml")


def test_unknown_section_is_named():
    with pytest.raises(ConfigError, match=r"unknown key 'trian'"):
        parse_params({"trian": {}})


def test_wrong_type_is_named_with_file():
    with pytest.raises(ConfigError, match=r"custom.yaml: lora.r: expected an integer, got 'sixteen'"):
        parse_params({"lora": {"r": "sixteen"}}, "custom.yaml")


def test_literal_values_are_checked():
    with pytest.raises(ConfigError, match=r"train.backend: 'tensorflow' is not one of"):
        parse_params({"train": {"backend": "tensorflow"}})


def test_int_is_accepted_where_float_expected_and_lists_become_tuples():
    params = parse_params({"train": {"learning_rate": 1}, "lora": {"target_modules": ["q_proj"]}})
    assert params.train.learning_rate == 1.0 and isinstance(params.train.learning_rate, float)
    assert params.lora.target_modules == ("q_proj",)


def test_params_are_frozen():
    params = parse_params({})
    with pytest.raises(AttributeError):
        params.train.learning_rate = 1.0  # type: ignore[misc]


def test_params_hash_changes_with_any_value_and_flat_names_match_dvc():
    base = parse_params({})
    changed = parse_params({"lora": {"r": 8}})
    assert base.params_hash() != changed.params_hash()
    assert base.params_hash() == parse_params({}).params_hash()
    assert changed.flat()["lora.r"] == 8


def test_missing_params_file_says_where(tmp_path):
    with pytest.raises(ConfigError, match="no such params file"):
        load_params(tmp_path / "params.yaml")


def test_tracking_store_follows_the_project_not_the_previous_one(tmp_path, monkeypatch):
    # mlflow.set_tracking_uri writes MLFLOW_TRACKING_URI into the environment; that must not pin later projects.
    from medlora.core.tracking import configure_tracking, tracking_uri

    first, second = (parse_params({"paths": {"mlruns_dir": str(tmp_path / name)}}) for name in ("a", "b"))
    configure_tracking(first)
    assert tracking_uri(second.paths.mlruns_dir).endswith("/b/mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")  # a user's shared server wins
    assert tracking_uri(second.paths.mlruns_dir) == "http://127.0.0.1:5999"


def test_git_commit_tag_ignores_dvc_lock_but_not_code(tmp_path):
    import subprocess

    from medlora.core.tracking import git_commit

    def git(*args):
        subprocess.run(
            ["git", "-c", "user.email=ci@example.com", "-c", "user.name=ci", *args], cwd=tmp_path, check=True
        )

    git("init", "-q")
    (tmp_path / "params.yaml").write_text("train: {}\n")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    git("add", ".")
    git("commit", "-qm", "init")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")  # what `dvc repro` itself rewrites
    assert not git_commit(tmp_path).endswith("-dirty")
    (tmp_path / "params.yaml").write_text("train: {max_steps: 1}\n")
    assert git_commit(tmp_path).endswith("-dirty")


# Keys whose shipped value differs from the code default on purpose (none today): each default has one home.
DIFFERENT_ON_PURPOSE: dict[str, str] = {}


def test_shipped_params_equal_the_dataclass_defaults():
    from conftest import PROJECT_ROOT
    from medlora.core.config import Params, load_params

    shipped, defaults = load_params(PROJECT_ROOT / "params.yaml").flat(), Params().flat()
    assert set(shipped) == set(defaults)
    differing = {key for key in defaults if shipped[key] != defaults[key]}
    assert differing == set(DIFFERENT_ON_PURPOSE), {key: (shipped[key], defaults[key]) for key in differing}
