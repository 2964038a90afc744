"""A validated search space as Ray Tune needs it, and the number of trials it makes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .schema import SweepSpec

SEARCH_FORMS = ("grid", "choice", "uniform", "loguniform", "randint")


def search_form(spec: Any) -> str | None:
    """The search form of ``spec`` (``grid``, ``choice``, ...), or ``None`` for a fixed value."""
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_FORMS:
        return next(iter(spec))
    return None


def param_space(spec: SweepSpec) -> dict[str, Any]:
    """The Tuner ``param_space`` of ``spec.search``: Tune search objects for searched keys
    (``grid`` -> ``tune.grid_search``, ...; ``randint`` excludes ``high``), fixed values as is."""
    from ray import tune

    builders = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda bounds: tune.uniform(*bounds),
        "loguniform": lambda bounds: tune.loguniform(*bounds),
        "randint": lambda bounds: tune.randint(*bounds),
    }
    space = {}
    for key, spec_value in spec.search.items():
        form = search_form(spec_value)
        space[key] = spec_value if form is None else builders[form](spec_value[form])
    return space


def searched_keys(spec: SweepSpec) -> list[str]:
    """The ``search`` keys that vary between trials (not fixed values)."""
    return [key for key, value in spec.search.items() if search_form(value) is not None]


def num_trials(spec: SweepSpec) -> int:
    """How many trials the sweep runs: ``num_samples`` times the grid size for the random
    search (Tune repeats the whole grid per sample), ``num_samples`` for optuna."""
    if spec.search_alg.type == "optuna":
        return spec.num_samples
    return spec.num_samples * grid_size(spec)


def grid_size(spec: SweepSpec) -> int:
    """The number of points of the grid (1 without grid entries)."""
    return math.prod(len(value["grid"]) for value in spec.search.values() if search_form(value) == "grid")
