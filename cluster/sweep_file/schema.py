"""The sweep file's schema: its sections as pydantic models and :func:`load_sweep_file`,
which turns every problem pydantic or the checks find into a key path and a message."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from trainables.declared import STRICT, error_phrase
from trainables.models import FAMILIES, MapModel
from trainables.settings import TrainSettings

from .checks import inline_mask, method_problems, resolve_data, search_problems, topology_problems
from .problems import PROBLEMS_ERROR, KeyPath, Problem, SweepFileError, problems_error, raise_any, unknown
from .reading import apply_overrides, read_yaml
from .space import search_form

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX_LENGTH = 100


class _Section(BaseModel):
    """A mapping of the sweep file: unknown keys refused, values not coerced."""

    model_config = ConfigDict(extra="forbid", **STRICT)


class Restarts(_Section):
    """Best-of-``screen`` initialisations per trial, of which the best ``keep`` are trained."""

    screen: int = Field(1, ge=1)
    keep: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _keep_at_most_screen(self) -> Restarts:
        if self.keep > self.screen:
            raise problems_error([(("keep",), f"must be <= screen ({self.screen}), got {self.keep}")])
        return self


class Scheduler(_Section):
    """Trial scheduler: ``fifo`` runs every trial to the end, ``asha`` stops poor ones early
    (``max_t`` is always ``train.epochs``)."""

    type: Literal["fifo", "asha"] = "fifo"
    grace_period: int = Field(1, ge=1)
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _asha_options_only_for_asha(self) -> Scheduler:
        misplaced = sorted(self.model_fields_set & {"grace_period", "reduction_factor"})
        if self.type != "asha" and misplaced:
            raise problems_error([((key,), "only with type: asha") for key in misplaced])
        return self


class SearchAlg(_Section):
    """``random``: Tune's BasicVariantGenerator (grid x random); ``optuna``: OptunaSearch."""

    type: Literal["random", "optuna"] = "random"
    seed: int | None = None


class Resources(_Section):
    """Resources reserved per trial; fractions share a device."""

    cpu: float = Field(1.0, gt=0)
    gpu: float = Field(0.0, ge=0)


class SweepSpec(_Section):
    """A validated sweep file. ``search`` keeps the raw specs (``{"lr": {"loguniform":
    [0.001, 0.1]}, "prior_sticky": 0.5}``); ``data`` is ``{"name": NAME, **options}`` or
    ``{"path": ABSOLUTE_PATH}``; ``source`` is the sweep file's path."""

    name: str
    model: str
    data: dict[str, Any]
    train: TrainSettings = Field(default_factory=TrainSettings)
    search: dict[str, Any]
    restarts: Restarts = Field(default_factory=Restarts)
    num_samples: int = Field(1, ge=1)
    seeds: int = Field(1, ge=1, le=100)  # outer seeds per configuration: the searcher and ASHA see their mean
    metric: Literal["valid_nll"] = "valid_nll"
    scheduler: Scheduler = Field(default_factory=Scheduler)
    search_alg: SearchAlg = Field(default_factory=SearchAlg)
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    max_failures: int = Field(1, ge=0)
    checkpoint_every: int = Field(5, ge=1)
    source: str = ""

    @property
    def mode(self) -> str:
        """Every metric is minimised."""
        return "min"

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name) or len(name) > NAME_MAX_LENGTH:
            message = (
                f"{name!r} is not a valid experiment name: use letters, digits, '_', '.' and '-', "
                f"start with a letter or digit, at most {NAME_MAX_LENGTH} characters"
            )
            raise problems_error([((), message)])
        return name

    @field_validator("model")
    @classmethod
    def _check_model(cls, model: str) -> str:
        if model not in FAMILIES:
            raise problems_error([((), unknown(f"model family {model!r}", model, FAMILIES))])
        return model

    @field_validator("data")
    @classmethod
    def _check_data(cls, data: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return resolve_data(data, Path((info.context or {}).get("base_dir", ".")))

    @field_validator("train")
    @classmethod
    def _check_train(cls, train: TrainSettings, info: ValidationInfo) -> TrainSettings:
        raise_any(method_problems([train.method], info.data.get("model")))
        return train

    @field_validator("search")
    @classmethod
    def _check_search(cls, search: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        raise_any(search_problems(search, info.data.get("model"), info.data.get("train")))
        search = inline_mask(search, Path((info.context or {}).get("base_dir", ".")))
        raise_any(topology_problems(search, info.data.get("model")))
        return search

    @field_validator("restarts")
    @classmethod
    def _check_restarts(cls, restarts: Restarts, info: ValidationInfo) -> Restarts:
        family = info.data.get("model")
        if family is not None and restarts.screen > 1 and not issubclass(FAMILIES[family], MapModel):
            message = f"{family} cannot screen initialisations (best-of-N needs a MAP family); use 1"
            raise problems_error([(("screen",), message)])
        return restarts

    @field_validator("scheduler")
    @classmethod
    def _check_scheduler(cls, scheduler: Scheduler, info: ValidationInfo) -> Scheduler:
        train, search = info.data.get("train"), info.data.get("search")
        problems: list[Problem] = []
        grace = scheduler.grace_period
        if scheduler.type == "asha" and train is not None and grace > train.epochs:
            problems.append((("grace_period",), f"must be <= train.epochs ({train.epochs}), got {grace}"))
        if scheduler.type == "asha" and search is not None and "epochs" in search:
            message = "asha stops trials at train.epochs, so epochs cannot be in search; set train.epochs"
            problems.append((("type",), message))
        raise_any(problems)
        return scheduler

    @field_validator("search_alg")
    @classmethod
    def _check_search_alg(cls, search_alg: SearchAlg, info: ValidationInfo) -> SearchAlg:
        search = info.data.get("search")
        grids = [f"search.{key}" for key, spec in (search or {}).items() if search_form(spec) == "grid"]
        if search_alg.type == "optuna" and grids:
            message = f"optuna cannot search grid entries ({', '.join(grids)}); use choice, or type: random"
            raise problems_error([(("type",), message)])
        return search_alg


def _pydantic_problems(error: ValidationError) -> list[Problem]:
    """Each pydantic error as problems with their key paths."""
    problems: list[Problem] = []
    for e in error.errors():
        path = tuple(e["loc"])
        if e["type"] == PROBLEMS_ERROR:
            problems += [((*path, *sub), message) for sub, message in e["ctx"]["problems"]]
        elif e["type"] == "missing":
            problems.append((path, "missing (required)"))
        elif e["type"] == "extra_forbidden":
            problems.append((path, unknown("key", path[-1], _fields_at(path[:-1]))))
        else:
            problems.append((path, error_phrase(e)))
    return problems


def _fields_at(path: KeyPath) -> list[str]:
    """The keys a sweep file may give at ``path`` (a mapping of :class:`SweepSpec`)."""
    model: type[BaseModel] = SweepSpec
    for part in path:
        model = model.model_fields[part].annotation
    return [name for name in model.model_fields if name != "source"]


def load_sweep_file(path: str | Path, overrides: dict[str, Any] | None = None) -> SweepSpec:
    """Read and validate the sweep file at ``path``; ``overrides`` (``num_samples``,
    ``max_concurrent``; ``None`` values ignored) replace the file's settings first.

    :raises SweepFileError: for a missing or unreadable file, invalid YAML, or any invalid
        setting; all problems are reported together.
    """
    source = str(path)
    raw = apply_overrides(read_yaml(Path(path), source), overrides, source)
    problems: list[Problem] = []
    if "source" in raw:
        problems.append((("source",), "unknown key: pyrosweep sets the source to the sweep file's path"))
    settings = {key: value for key, value in raw.items() if key != "source"}
    try:
        spec = SweepSpec.model_validate(
            {**settings, "source": source}, strict=True, context={"base_dir": Path(path).absolute().parent}
        )
    except ValidationError as error:
        problems += _pydantic_problems(error)
    if problems:
        raise SweepFileError(source, problems)
    return spec
