"""Sweep files (DESIGN.md section 4): parse and validate a sweep YAML before Ray starts.

``load_sweep_file("configs/hmm-jsb.yaml")`` returns a :class:`SweepSpec`, or raises a
:class:`SweepFileError` listing every problem found, one per line, each naming the file
and the key path::

    configs/x.yaml: search.lr.loguniform: expected [low, high] with 0 < low < high, got [0.1, 0.01]
    configs/x.yaml: trian: unknown key (expected one of: checkpoint_every, data, ...); did you mean 'train'?

:func:`param_space`, :func:`num_trials` and :func:`describe_plan` turn a spec into what the
launcher and ``pyrosweep sweep --dry-run`` need. Only :func:`param_space` imports Ray.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
import typing
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from trainables.data import DATASETS, load_file, named_loader
from trainables.data.files import READERS
from trainables.models import FAMILIES, MapModel
from trainables.svi import TrainConfig

__all__ = [
    "SweepFileError",
    "SweepSpec",
    "TrainSettings",
    "Restarts",
    "Scheduler",
    "SearchAlg",
    "Resources",
    "load_sweep_file",
    "param_space",
    "searched_keys",
    "num_trials",
    "describe_plan",
]

#: a key path inside the sweep file (mapping keys and list indices) and what is wrong there
KeyPath = tuple[str | int, ...]
Problem = tuple[KeyPath, str]

SEARCH_FORMS = ("grid", "choice", "uniform", "loguniform", "randint")
RANGE_CONDITIONS = {
    "uniform": "low < high",
    "loguniform": "0 < low < high",
    "randint": "integers low < high (high excluded)",
}
OVERRIDABLE = ("num_samples", "max_concurrent")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
NAME_MAX_LENGTH = 100
#: TrainConfig fields a sweep file sets elsewhere
SET_ELSEWHERE = {"screen": "restarts.screen", "device": "resources.gpu", "threads": "resources.cpu"}
PROBLEMS_ERROR = "sweep_problems"
#: YAML gives typed values: no coercion of "8" to 8 or of 1.5 to an int, no inf or nan
STRICT = ConfigDict(strict=True, allow_inf_nan=False)

_TRAIN_DEFAULTS = TrainConfig()


class SweepFileError(ValueError):
    """A sweep file that cannot be run; ``problems`` holds ``(key path, message)`` pairs
    and the message has one ``FILE: KEY.PATH: message`` line per problem."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = [(format_key_path(path), message) for path, message in problems]
        super().__init__(
            "\n".join(
                f"{source}: {path}: {message}" if path else f"{source}: {message}"
                for path, message in self.problems
            )
        )


def format_key_path(path: Iterable[str | int]) -> str:
    """``("search", "lr", "choice", 2)`` -> ``search.lr.choice[2]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def _problems_error(problems: list[Problem]) -> PydanticCustomError:
    """One pydantic error carrying several problems below the validated field's path."""
    return PydanticCustomError(
        PROBLEMS_ERROR, "{count} problem(s)", {"count": len(problems), "problems": problems}
    )


def _raise_any(problems: list[Problem]) -> None:
    """Raise ``problems`` together, if there are any."""
    if problems:
        raise _problems_error(problems)


def _unknown(what: str, key: Any, choices: Iterable[str]) -> str:
    """``unknown key (expected one of: a, b); did you mean 'a'?``."""
    choices = sorted(choices)
    message = f"unknown {what} (expected one of: {', '.join(choices)})"
    if key in SET_ELSEWHERE:
        return f"{message}; set it as {SET_ELSEWHERE[key]}"
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message


def _value_error_message(error: dict[str, Any]) -> str:
    """A pydantic error as a short phrase that shows the offending value."""
    if error["type"] in ("model_type", "dict_type"):
        return f"expected a mapping, got {error['input']!r}"
    message = error["msg"].replace("Input should be", "should be")
    return f"{message}, got {error['input']!r}"


class _Section(BaseModel):
    """A mapping of the sweep file: unknown keys refused, values not coerced."""

    model_config = ConfigDict(extra="forbid", **STRICT)


class TrainSettings(_Section):
    """The fixed :class:`~trainables.svi.TrainConfig` fields of every trial; defaults and
    range checks are TrainConfig's (``screen``, ``device`` and ``threads`` come from
    ``restarts`` and ``resources``)."""

    epochs: int = Field(_TRAIN_DEFAULTS.epochs, ge=1)
    batch_size: int = Field(_TRAIN_DEFAULTS.batch_size, ge=1)
    lr: float = Field(_TRAIN_DEFAULTS.lr, gt=0)
    lr_decay: float = Field(_TRAIN_DEFAULTS.lr_decay, gt=0, le=1)
    clip_norm: float = Field(_TRAIN_DEFAULTS.clip_norm, gt=0)
    beta1: float = Field(_TRAIN_DEFAULTS.beta1, ge=0, lt=1)
    beta2: float = Field(_TRAIN_DEFAULTS.beta2, ge=0, lt=1)
    patience: int | None = Field(_TRAIN_DEFAULTS.patience, ge=1)
    seed: int = _TRAIN_DEFAULTS.seed


class Restarts(_Section):
    """Best-of-``screen`` initialisations per trial, of which the best ``keep`` are trained."""

    screen: int = Field(1, ge=1)
    keep: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _keep_at_most_screen(self) -> Restarts:
        if self.keep > self.screen:
            raise _problems_error([(("keep",), f"must be <= screen ({self.screen}), got {self.keep}")])
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
            raise _problems_error([((key,), "only with type: asha") for key in misplaced])
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
            raise _problems_error([((), message)])
        return name

    @field_validator("model")
    @classmethod
    def _check_model(cls, model: str) -> str:
        if model not in FAMILIES:
            raise _problems_error([((), _unknown(f"model family {model!r}", model, FAMILIES))])
        return model

    @field_validator("data")
    @classmethod
    def _check_data(cls, data: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _resolve_data(data, Path((info.context or {}).get("base_dir", ".")))

    @field_validator("search")
    @classmethod
    def _check_search(cls, search: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        _raise_any(_search_problems(search, info.data.get("model"), info.data.get("train")))
        return search

    @field_validator("restarts")
    @classmethod
    def _check_restarts(cls, restarts: Restarts, info: ValidationInfo) -> Restarts:
        family = info.data.get("model")
        if family is not None and restarts.screen > 1 and not issubclass(FAMILIES[family], MapModel):
            message = f"{family} cannot screen initialisations (best-of-N needs a MAP family); use 1"
            raise _problems_error([(("screen",), message)])
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
        _raise_any(problems)
        return scheduler

    @field_validator("search_alg")
    @classmethod
    def _check_search_alg(cls, search_alg: SearchAlg, info: ValidationInfo) -> SearchAlg:
        search = info.data.get("search")
        grids = [f"search.{key}" for key, spec in (search or {}).items() if _form(spec) == "grid"]
        if search_alg.type == "optuna" and grids:
            message = f"optuna cannot search grid entries ({', '.join(grids)}); use choice, or type: random"
            raise _problems_error([(("type",), message)])
        return search_alg


def _hparam_types(family: str) -> dict[str, Any]:
    """Each keyword hyperparameter of ``family`` typed by its default (``Any`` without one)."""
    types: dict[str, Any] = {}
    for klass in reversed(FAMILIES[family].__mro__):
        if "__init__" in vars(klass):
            for name, parameter in inspect.signature(klass.__init__).parameters.items():
                default = parameter.default
                if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                    types[name] = Any if default is None or default is parameter.empty else type(default)
    return {name: types[name] for name in FAMILIES[family].hparam_names()}


def _key_types(family: str | None) -> dict[str, Any]:
    """The type (an annotation with constraints) of every key ``search`` may hold: the
    hidden dimension, the TrainSettings fields and, when known, the family's hyperparameters
    (typed by their defaults)."""
    types: dict[str, Any] = {"hidden_dim": Annotated[int, Field(ge=1)]}
    types.update({name: _constrained(f) for name, f in TrainSettings.model_fields.items()})
    if family is not None:
        types.update(_hparam_types(family))
    return types


def _constrained(field: FieldInfo) -> Any:
    """A model field's annotation with its constraints (``Annotated[int, Ge(1)]``)."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def _is_integer(annotation: Any) -> bool:
    """Whether values of ``annotation`` are integers (``int``, ``int | None``, constrained)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation is int or int in typing.get_args(annotation)


def _value_problems(path: KeyPath, value: Any, annotation: Any) -> list[Problem]:
    """``value`` checked strictly against ``annotation``."""
    try:
        TypeAdapter(annotation, config=STRICT).validate_python(value)
    except ValidationError as error:
        return [(path, _value_error_message(error.errors()[0]))]
    return []


def _form(spec: Any) -> str | None:
    """The search form of ``spec`` (``grid``, ``choice``, ...), or ``None`` for a fixed value."""
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in SEARCH_FORMS:
        return next(iter(spec))
    return None


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
    if form != "randint" and _is_integer(annotation):
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
    form = _form(spec)
    if form is None and isinstance(spec, (dict, list)):
        forms = "|".join(SEARCH_FORMS)
        return [((key,), f"expected a fixed value or a one-key mapping {{{forms}: ...}}, got {spec!r}")]
    if form is None:
        return _value_problems((key,), spec, annotation)
    if form in ("grid", "choice"):
        return _list_problems((key, form), spec[form], annotation)
    return _range_problems((key, form), form, spec[form], annotation)


def _search_problems(
    search: dict[str, Any], family: str | None, train: TrainSettings | None
) -> list[Problem]:
    """Every problem of ``search`` (paths below ``search``). Without a valid ``family`` its
    hyperparameters cannot be told from unknown keys, which are then left alone."""
    types = _key_types(family)
    problems: list[Problem] = []
    if "hidden_dim" not in search:
        message = "missing: give it fixed (hidden_dim: 16) or searched (hidden_dim: {grid: [8, 16]})"
        problems.append((("hidden_dim",), message))
    for key, spec in search.items():
        if key not in types:
            if family is not None:
                problems.append(((key,), _unknown(f"key for model {family}", key, types)))
            continue
        if train is not None and key in train.model_fields_set:
            problems.append(((key,), f"also set as train.{key}; give it in one place"))
        problems += _spec_problems(key, spec, types[key])
    return problems


def _resolve_data(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """``data`` checked against its loader, with a path made absolute against ``base_dir``."""
    if ("name" in data) == ("path" in data):
        raise _problems_error(
            [((), f"give exactly one of name (one of: {', '.join(DATASETS)}) or path (a data file)")]
        )
    options = {key: value for key, value in data.items() if key not in ("name", "path")}
    if "name" in data:
        name = data["name"]
        if not isinstance(name, str) or name not in DATASETS:
            raise _problems_error([(("name",), _unknown(f"data set {name!r}", name, DATASETS))])
        resolved, label, loader = {"name": name}, name, named_loader(name)
    else:
        path = _resolve_path(data["path"], base_dir)
        resolved, label, loader = {"path": str(path)}, "a data file", partial(load_file, path)
    _raise_any(_option_problems(options, label, loader))
    return {**resolved, **options}


def _resolve_path(path: Any, base_dir: Path) -> Path:
    """The absolute path of an existing data file of a known type."""
    if not isinstance(path, str):
        raise _problems_error([(("path",), f"expected a file path, got {path!r}")])
    file = (base_dir / Path(path).expanduser()).resolve()
    if file.suffix.lower() not in READERS:
        message = f"unknown file type {file.suffix or '(none)'!r} (expected one of: {', '.join(READERS)})"
        raise _problems_error([(("path",), message)])
    if not file.is_file():
        raise _problems_error([(("path",), f"no such file: {file}")])
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
            problems.append(((key,), _unknown(f"option for {label}", key, accepted)))
        else:
            problems += _value_problems((key,), value, hints.get(key, Any))
    return problems


class _Loader(yaml.SafeLoader):
    """YAML 1.1 ``SafeLoader`` that reads ``1e-3`` as a float (not a string) and refuses
    duplicate keys instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key in (key for key, _ in node.value if isinstance(key, yaml.ScalarNode)):
            if key.value in seen:
                problem = f"duplicate key {key.value!r}"
                raise yaml.constructor.ConstructorError(None, None, problem, key.start_mark)
            seen.add(key.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(file: Path, source: str) -> dict[str, Any]:
    """The top-level mapping of a sweep file."""
    try:
        raw = yaml.load(file.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise SweepFileError(source, [((), "no such file")]) from None
    except OSError as error:
        raise SweepFileError(source, [((), f"cannot read: {error.strerror}")]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SweepFileError(source, [((), f"invalid YAML{where}: {problem}")]) from None
    if raw is None:
        raise SweepFileError(source, [((), "the file is empty")])
    if not isinstance(raw, dict):
        raise SweepFileError(source, [((), f"expected a mapping of settings, got {type(raw).__name__}")])
    return raw


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """``raw`` with the command line's settings (those not ``None``) on top."""
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise SweepFileError(
            source, [((key,), f"cannot be overridden (only: {', '.join(OVERRIDABLE)})") for key in unknown]
        )
    return {**raw, **given}


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
            problems.append((path, _unknown("key", path[-1], _fields_at(path[:-1]))))
        else:
            problems.append((path, _value_error_message(e)))
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
    raw = _apply_overrides(_read_yaml(Path(path), source), overrides, source)
    problems: list[Problem] = []
    if "source" in raw:
        problems.append((("source",), "unknown key: pyrosweep sets the source to the sweep file's path"))
    settings = {key: value for key, value in raw.items() if key != "source"}
    try:
        spec = SweepSpec.model_validate(
            {**settings, "source": source}, context={"base_dir": Path(path).absolute().parent}
        )
    except ValidationError as error:
        problems += _pydantic_problems(error)
    if problems:
        raise SweepFileError(source, problems)
    return spec


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
        form = _form(spec_value)
        space[key] = spec_value if form is None else builders[form](spec_value[form])
    return space


def searched_keys(spec: SweepSpec) -> list[str]:
    """The ``search`` keys that vary between trials (not fixed values)."""
    return [key for key, value in spec.search.items() if _form(value) is not None]


def num_trials(spec: SweepSpec) -> int:
    """How many trials the sweep runs: ``num_samples`` times the grid size for the random
    search (Tune repeats the whole grid per sample), ``num_samples`` for optuna."""
    if spec.search_alg.type == "optuna":
        return spec.num_samples
    return spec.num_samples * _grid_size(spec)


def _grid_size(spec: SweepSpec) -> int:
    """The number of points of the grid (1 without grid entries)."""
    return math.prod(len(value["grid"]) for value in spec.search.values() if _form(value) == "grid")


def _describe_spec(value: Any) -> str:
    """``grid [8, 16]``, ``randint [0, 10)``, ``0.5 (fixed)``."""
    form = _form(value)
    if form is None:
        return f"{value!r} (fixed)"
    if form == "randint":
        low, high = value[form]
        return f"randint [{low}, {high})"
    return f"{form} {value[form]!r}"


def _describe_data(data: dict[str, Any]) -> str:
    """``jsb (max_chorales=60)`` or the file path."""
    head = data.get("name", data.get("path"))
    options = ", ".join(f"{key}={value!r}" for key, value in data.items() if key not in ("name", "path"))
    return f"{head} ({options})" if options else str(head)


def _describe_restarts(restarts: Restarts) -> str:
    """``best of 10 initialisations, keep 1`` or ``none (one initialisation)``."""
    if restarts.screen == 1:
        return "none (one initialisation per trial)"
    return f"best of {restarts.screen} initialisations, keep {restarts.keep}"


def _describe_trials(spec: SweepSpec) -> str:
    """``8 = 2 samples x 4 grid points``."""
    total = num_trials(spec)
    if spec.search_alg.type == "optuna" or _grid_size(spec) == 1:
        return str(total)
    return f"{total} = {spec.num_samples} samples x {_grid_size(spec)} grid points"


def _describe_scheduler(spec: SweepSpec) -> str:
    """``asha (grace_period 5, reduction_factor 2, max_t 30 epochs)`` or ``fifo``."""
    scheduler = spec.scheduler
    if scheduler.type == "fifo":
        return "fifo (every trial runs to the end or its early stop)"
    return (
        f"asha (grace_period {scheduler.grace_period}, reduction_factor {scheduler.reduction_factor:g}, "
        f"max_t {spec.train.epochs} epochs)"
    )


def _describe_search_alg(spec: SweepSpec) -> str:
    """``random (grid x random sampling), seed 0``."""
    kind = "optuna (OptunaSearch)" if spec.search_alg.type == "optuna" else "random (grid x random sampling)"
    return kind if spec.search_alg.seed is None else f"{kind}, seed {spec.search_alg.seed}"


def describe_plan(spec: SweepSpec) -> str:
    """The dry-run plan: one aligned ``label  text`` line per setting, one per search key."""
    train = spec.train.model_dump().items()
    fixed = " ".join(f"{key}={value}" for key, value in train if key not in spec.search)
    width = max((len(key) for key in spec.search), default=0)
    search_lines = [f"{key.ljust(width)}  {_describe_spec(value)}" for key, value in spec.search.items()]
    resources = spec.resources
    concurrency = "decided by Ray" if spec.max_concurrent is None else str(spec.max_concurrent)
    per_trial = f"{resources.cpu:g} cpu, {resources.gpu:g} gpu per trial, max_concurrent {concurrency}"
    rows = [
        ("sweep", f"{spec.name} ({spec.source})" if spec.source else spec.name),
        ("model", spec.model),
        ("data", _describe_data(spec.data)),
        ("train", fixed),
        ("search", search_lines[0] if search_lines else "(nothing)"),
        *(("", line) for line in search_lines[1:]),
        ("restarts", _describe_restarts(spec.restarts)),
        ("trials", _describe_trials(spec)),
        ("metric", f"{spec.metric} ({spec.mode})"),
        ("scheduler", _describe_scheduler(spec)),
        ("search_alg", _describe_search_alg(spec)),
        ("resources", per_trial),
        ("checkpoints", f"every {spec.checkpoint_every} epochs; max_failures {spec.max_failures}"),
    ]
    label_width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(label_width)}  {text}".rstrip() for label, text in rows)
