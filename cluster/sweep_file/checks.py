"""Checks of a sweep file's values against their declarations: every ``search`` entry
(fixed values, every ``grid`` / ``choice`` value and both ends of every range) against
the family's hyperparameters and the training settings, and the data options against
their loader's signature."""

from __future__ import annotations

import inspect
import itertools
import math
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainables.data import DATASETS, named_loader
from trainables.data.files import READERS, file_reader
from trainables.declared import is_integer, value_problem
from trainables.models import FAMILIES
from trainables.models.topology import load_mask
from trainables.settings import TrainSettings

from .problems import KeyPath, Problem, problems_error, raise_any, unknown
from .space import SEARCH_FORMS, search_form

RANGE_CONDITIONS = {
    "uniform": "low < high",
    "loguniform": "0 < low < high",
    "randint": "integers low < high (high excluded)",
}


def key_types(family: str | None) -> dict[str, Any]:
    """The type (an annotation with constraints) of every key ``search`` may hold: the
    training settings and, when the family is known, its declared hyperparameters
    (``hidden_dim`` among them)."""
    types = {name: TrainSettings.annotation(name) for name in TrainSettings.model_fields}
    if family is not None:
        declared = FAMILIES[family].hyperparameters
        types.update({name: declared.annotation(name) for name in declared.model_fields})
    return types


def _value_problems(path: KeyPath, value: Any, annotation: Any) -> list[Problem]:
    """``value`` checked strictly against ``annotation``."""
    problem = value_problem(value, annotation)
    return [] if problem is None else [(path, problem)]


def _list_problems(path: KeyPath, values: Any, annotation: Any) -> list[Problem]:
    """A ``grid`` or ``choice``: a non-empty list of valid values."""
    if not isinstance(values, list) or not values:
        return [(path, f"expected a non-empty list of values, got {values!r}")]
    problems: list[Problem] = []
    for i, value in enumerate(values):
        problems += _value_problems((*path, i), value, annotation)
    return problems


def _range_problems(path: KeyPath, form: str, bounds: Any, annotation: Any) -> list[Problem]:
    """A ``uniform``, ``loguniform`` or ``randint`` range ``[low, high]`` whose values are
    valid for the key."""
    key = path[-2]
    if form != "randint" and is_integer(annotation):
        return [(path, f"{key} is an integer: use randint: [low, high] (high excluded), grid or choice")]
    number = int if form == "randint" else (int, float)
    well_formed = (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(b, number) and not isinstance(b, bool) and math.isfinite(b) for b in bounds)
        and bounds[0] < bounds[1]
        and (form != "loguniform" or bounds[0] > 0)
    )
    if not well_formed:
        return [(path, f"expected [low, high] with {RANGE_CONDITIONS[form]}, got {bounds!r}")]
    low, high = bounds
    largest = high - 1 if form == "randint" else high
    return _value_problems((*path, 0), low, annotation) + _value_problems((*path, 1), largest, annotation)


def _spec_problems(key: str, spec: Any, annotation: Any) -> list[Problem]:
    """One ``search`` entry: a fixed value or a one-key mapping of a search form."""
    form = search_form(spec)
    if form is None and isinstance(spec, (dict, list)):
        forms = "|".join(SEARCH_FORMS)
        return [((key,), f"expected a fixed value or a one-key mapping {{{forms}: ...}}, got {spec!r}")]
    if form is None:
        return _value_problems((key,), spec, annotation)
    if form in ("grid", "choice"):
        return _list_problems((key, form), spec[form], annotation)
    return _range_problems((key, form), form, spec[form], annotation)


def search_problems(
    search: dict[str, Any], family: str | None, train: TrainSettings | None
) -> list[Problem]:
    """Every problem of ``search`` (paths below ``search``). Without a valid ``family`` its
    hyperparameters cannot be told from unknown keys, which are then left alone."""
    types = key_types(family)
    problems: list[Problem] = []
    if "hidden_dim" not in search:
        message = "missing: give it fixed (hidden_dim: 16) or searched (hidden_dim: {grid: [8, 16]})"
        problems.append((("hidden_dim",), message))
    for key, spec in search.items():
        if key not in types:
            if family is not None:
                problems.append(((key,), unknown(f"key for model {family}", key, types)))
            continue
        if train is not None and key in train.model_fields_set:
            problems.append(((key,), f"also set as train.{key}; give it in one place"))
        problems += _spec_problems(key, spec, types[key])
    if "method" in search:
        spec = search["method"]
        form = search_form(spec)
        problems += method_problems(spec[form] if form in ("grid", "choice") else [spec], family)
    return problems


def method_problems(methods: list[Any], family: str | None) -> list[Problem]:
    """EM among ``methods`` for a family without an M-step (at key ``method``)."""
    if family is None or "em" not in methods or FAMILIES[family].supports_em():
        return []
    able = ", ".join(name for name, cls in FAMILIES.items() if cls.supports_em())
    return [(("method",), f"{family} cannot be trained by EM (EM trains {able}); use svi")]


def resolve_data(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``data`` checked against its loader, with a path made absolute against ``base_dir``."""
    if ("name" in data) == ("path" in data):
        raise problems_error(
            [((), f"give exactly one of name (one of: {', '.join(DATASETS)}) or path (a data file)")]
        )
    options = {key: value for key, value in data.items() if key not in ("name", "path")}
    if "name" in data:
        name = data["name"]
        if not isinstance(name, str) or name not in DATASETS:
            raise problems_error([(("name",), unknown(f"data set {name!r}", name, DATASETS))])
        resolved, label, loader = {"name": name}, name, named_loader(name)
    else:
        path = _resolve_path(data["path"], base_dir)
        resolved, label, loader = {"path": str(path)}, f"a {path.suffix.lower()} file", file_reader(path)
    raise_any(_option_problems(options, label, loader))
    return {**resolved, **options}


def _resolve_path(path: Any, base_dir: Path) -> Path:
    """The absolute path of an existing data file of a known type."""
    if not isinstance(path, str):
        raise problems_error([(("path",), f"expected a file path, got {path!r}")])
    file = (base_dir / Path(path).expanduser()).resolve()
    if file.suffix.lower() not in READERS:
        message = f"unknown file type {file.suffix or '(none)'!r} (expected one of: {', '.join(READERS)})"
        raise problems_error([(("path",), message)])
    if not file.is_file():
        raise problems_error([(("path",), f"no such file: {file}")])
    return file


def _option_problems(options: dict[str, Any], label: str, loader: Callable[..., Any]) -> list[Problem]:
    """Loader options checked against the loader's keyword parameters and their types."""
    accepted = inspect.signature(loader).parameters
    hints = typing.get_type_hints(getattr(loader, "func", loader))
    problems: list[Problem] = []
    for key, value in options.items():
        if not accepted:
            problems.append(((key,), f"unknown option: {label} takes none"))
        elif key not in accepted:
            problems.append(((key,), unknown(f"option for {label}", key, accepted)))
        else:
            problems += _value_problems((key,), value, hints.get(key, Any))
    return problems


#: the keys whose values a chain's topology is checked across (it needs hidden_dim)
TOPOLOGY_KEYS = ("hidden_dim", "topology", "bandwidth", "transition_mask")


def inline_mask(search: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``search`` with a fixed ``transition_mask`` file (resolved against ``base_dir``, as
    data paths are) replaced by its K x K 0/1 lists, so trials carry the mask itself."""
    path = search.get("transition_mask")
    if not isinstance(path, str):
        return search
    try:
        return {**search, "transition_mask": load_mask(base_dir / Path(path).expanduser())}
    except ValueError as error:
        raise problems_error([(("transition_mask",), str(error))]) from None


def topology_problems(search: dict[str, Any], family: str | None) -> list[Problem]:
    """The chain topology built for every combination of the fixed, ``grid`` and
    ``choice`` values of :data:`TOPOLOGY_KEYS` (ranges are not enumerated): an empty row,
    an unreachable state, a mask of the wrong shape or a topology on a family without a
    single chain is reported at ``topology``."""
    declared = FAMILIES[family].hyperparameters if family is not None else None
    if declared is None or "topology" not in declared.model_fields:
        return []
    choices = {}
    for key in TOPOLOGY_KEYS:
        spec = search.get(key)
        form = search_form(spec)
        if form in ("grid", "choice"):
            choices[key] = spec[form]
        elif form is None and key in search:
            choices[key] = [spec]
    for values in itertools.product(*choices.values()):
        try:
            declared.build(family, dict(zip(choices, values)))
        except ValueError as error:
            return [(("topology",), str(error))]
    return []
