"""One declaration per family and for training: the sweep-file checks and the
``pyrosweep train`` flags are generated from it. The table of bad values is generated
from the declarations too, so a new family or hyperparameter is covered as it lands."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path
from typing import Any, Literal

import annotated_types
import pytest
import yaml

from cluster.cli import main
from trainables.declared import is_integer
from trainables.models import FAMILIES
from trainables.settings import TrainSettings

DATA = {"name": "synthetic-gmm"}  # the data set does not matter for these checks


def _bounds(field) -> dict[str, Any]:
    """The numeric bounds of a declared field (``gt``, ``ge``, ``lt``, ``le``)."""
    found = {}
    for item in field.metadata:
        for name in ("gt", "ge", "lt", "le"):
            if isinstance(item, getattr(annotated_types, name.capitalize())):
                found[name] = getattr(item, name)
    return found


def bad_value(field) -> Any:
    """A value outside the field's declared constraint, of the field's own type."""
    if typing.get_origin(field.annotation) is Literal:
        return "bogus"
    integer = is_integer(field.annotation)
    bounds = _bounds(field)
    if "gt" in bounds:
        return bounds["gt"] if integer else float(bounds["gt"])
    if "ge" in bounds:
        return bounds["ge"] - (1 if integer else 0.5)
    if "lt" in bounds:
        return bounds["lt"] if integer else float(bounds["lt"])
    return bounds["le"] + 1


def bad_range(field) -> tuple[str, list, int] | None:
    """A search range with one end outside the constraint: ``(form, [low, high], index
    of the bad end)``; None for a field with no numeric bound."""
    bounds = _bounds(field)
    if not bounds:
        return None
    integer = is_integer(field.annotation)
    form = "randint" if integer else "uniform"
    bad, good = bad_value(field), field.default
    if "gt" in bounds or "ge" in bounds:
        return form, [bad, good + 1 if integer else good + 0.5], 0
    return form, [good - 1 if integer else good - 0.5, bad + 1 if integer else bad], 1


def _constrained(fields: dict) -> list[str]:
    return [name for name, field in fields.items() if _bounds(field) or typing.get_origin(field.annotation) is Literal]


CASES = [
    (family, name) for family, cls in sorted(FAMILIES.items()) for name in _constrained(cls.hyperparameters.model_fields)
] + [("hmm", name) for name in _constrained(TrainSettings.model_fields)]


def _field(family: str, name: str):
    return {**TrainSettings.model_fields, **FAMILIES[family].hyperparameters.model_fields}[name]


def dry_run(tmp_path: Path, family: str, search: dict[str, Any], capsys) -> tuple[int, str]:
    """``pyrosweep sweep FILE --dry-run`` in this process: its exit status and stderr."""
    path = tmp_path / "sweep.yaml"
    settings = {"name": "checks", "model": family, "data": DATA, "search": {"hidden_dim": 4, **search}}
    path.write_text(yaml.safe_dump(settings, sort_keys=False))
    status = main(["sweep", str(path), "--dry-run"])
    return status, capsys.readouterr().err


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("PYROSWEEP_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("family, name", CASES)
def test_a_bad_fixed_value_is_refused_with_its_key_path(tmp_path, capsys, family, name):
    status, err = dry_run(tmp_path, family, {name: bad_value(_field(family, name))}, capsys)
    assert status == 2 and f"search.{name}: " in err, err


@pytest.mark.parametrize("family, name", CASES)
def test_a_bad_choice_is_refused_with_its_key_path(tmp_path, capsys, family, name):
    field = _field(family, name)
    status, err = dry_run(tmp_path, family, {name: {"choice": [field.default, bad_value(field)]}}, capsys)
    assert status == 2 and f"search.{name}.choice[1]: " in err, err
    assert f"search.{name}.choice[0]" not in err


@pytest.mark.parametrize("family, name", [case for case in CASES if bad_range(_field(*case))])
def test_a_range_outside_the_constraint_is_refused_with_its_key_path(tmp_path, capsys, family, name):
    form, bounds, bad_end = bad_range(_field(family, name))
    status, err = dry_run(tmp_path, family, {name: {form: bounds}}, capsys)
    assert status == 2 and f"search.{name}.{form}[{bad_end}]: " in err, err


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_declared_defaults_pass(tmp_path, capsys, family):
    declared = FAMILIES[family].hyperparameters.model_fields
    search = {name: {"choice": [field.default]} for name, field in declared.items() if name != "hidden_dim"}
    search["hidden_dim"] = declared["hidden_dim"].default
    status, err = dry_run(tmp_path, family, search, capsys)
    assert status == 0, err


def test_the_reported_bugs_are_caught_before_ray(tmp_path, capsys):
    status, err = dry_run(tmp_path, "gmm", {"variance": {"choice": ["global", "bogus"]}}, capsys)
    assert status == 2 and "search.variance.choice[1]: should be 'global'" in err
    status, err = dry_run(tmp_path, "dmm", {"rnn_dropout_rate": {"uniform": [0.5, 1.5]}}, capsys)
    assert status == 2 and "search.rnn_dropout_rate.uniform[1]: should be less than 1" in err
    status, err = dry_run(tmp_path, "fhmm", {"hidden_dim": {"grid": [4, 8]}}, capsys)
    assert status == 2 and "search.hidden_dim.grid[1]: must be a perfect square" in err


def test_train_help_lists_every_familys_hyperparameters(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", "--help"], capture_output=True, text=True, timeout=120,
        env={"PYROSWEEP_HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
    ).stdout  # fmt: skip
    built_in = {family: cls for family, cls in FAMILIES.items() if cls.__module__.startswith("trainables.")}
    for family, cls in built_in.items():  # (test modules may have registered more here)
        (line,) = [line for line in shown.splitlines() if line.startswith(f"  {family}: ")]
        for name, field in cls.hyperparameters.model_fields.items():
            assert f"--{name.replace('_', '-')} {field.default}" in line
    for name in TrainSettings.model_fields:
        assert f"--{name.replace('_', '-')}" in shown
