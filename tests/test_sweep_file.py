"""Sweep files: the shipped configs load, and bad files are refused before Ray starts with
every problem's key path in the message."""

from __future__ import annotations

import math
import runpy
import shutil
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform

from cluster.sweep_file import (
    SweepFileError,
    SweepSpec,
    describe_plan,
    load_sweep_file,
    num_trials,
    param_space,
    searched_keys,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
VALID: dict[str, Any] = {
    "name": "test-sweep",
    "model": "hmm",
    "data": {"name": "synthetic-hmm"},
    "search": {"hidden_dim": 4},
}


def write(directory: Path, settings: dict[str, Any] | str, name: str = "sweep.yaml") -> Path:
    """A sweep file in ``directory`` from a mapping (dumped as YAML) or raw text."""
    path = directory / name
    path.write_text(settings if isinstance(settings, str) else yaml.safe_dump(settings, sort_keys=False))
    return path


def refusal(path: Path, **overrides: Any) -> SweepFileError:
    """The error loading ``path`` raises."""
    with pytest.raises(SweepFileError) as caught:
        load_sweep_file(path, overrides or None)
    return caught.value


def is_loguniform(domain: Any, lower: float, upper: float) -> bool:
    """Whether ``domain`` is ``tune.loguniform(lower, upper)``."""
    return isinstance(domain, Float) and isinstance(domain.get_sampler(), LogUniform) and (
        (domain.lower, domain.upper) == (lower, upper)
    )


def is_choice(domain: Any, categories: list[Any]) -> bool:
    """Whether ``domain`` is ``tune.choice(categories)``."""
    return isinstance(domain, Categorical) and domain.categories == categories


# config file -> (checks of its param_space, number of trials)
EXPECTED_CONFIGS = {
    "hmm-jsb.yaml": (
        {
            "hidden_dim": lambda d: d == {"grid_search": [8, 16]},
            "lr": lambda d: is_loguniform(d, 0.01, 0.1),
            "seed": lambda d: isinstance(d, Integer) and (d.lower, d.upper) == (0, 1000000),
        },
        4,
    ),
    "gaussian-hmm-synthetic.yaml": (
        {"hidden_dim": lambda d: is_choice(d, [2, 3, 4]), "lr": lambda d: is_loguniform(d, 0.005, 0.1)},
        6,
    ),
    "dmm-jsb.yaml": (
        {
            "hidden_dim": lambda d: d == 16,
            "rnn_dim": lambda d: d == 128,
            "elbo": lambda d: d == {"grid_search": ["trace", "mean-field"]},
        },
        2,
    ),
    **{
        name: (
            {
                "hidden_dim": lambda d: d == {"grid_search": [36, 48]},
                "nn_dim": lambda d: d == {"grid_search": [192, 256]},
                "lr": lambda d: d == {"grid_search": [0.005, 0.01]},
            },
            8,
        )
        for name in ("nnhmm-jsb.yaml", "nnhmm-jsb-c.yaml")
    },
    "demo-nnhmm.yaml": ({"hidden_dim": lambda d: d == 16, "nn_dim": lambda d: d == 96}, 1),
    "demo.yaml": (
        {"hidden_dim": lambda d: d == {"grid_search": [8, 16]}, "lr": lambda d: d == 0.05, "seed": lambda d: d == 0},
        2,
    ),
    "gaussian-hmm-states.yaml": ({"hidden_dim": lambda d: d == {"grid_search": [1, 2, 3, 4, 5]}}, 5),
    "categorical-hmm-synthetic.yaml": (
        {"hidden_dim": lambda d: d == {"grid_search": [2, 3, 4]}, "seed": lambda d: d == {"grid_search": [0, 1]}},
        6,
    ),
    "poisson-hmm-synthetic.yaml": (
        {"hidden_dim": lambda d: d == {"grid_search": [2, 3, 4]}, "method": lambda d: d == {"grid_search": ["svi", "em"]}},
        6,
    ),
    "readings.yaml": (
        {"hidden_dim": lambda d: d == {"grid_search": [1, 2, 3, 4]},
         "topology": lambda d: d == {"grid_search": ["ergodic", "left-right"]}},
        8,
    ),
    "gmm-synthetic.yaml": (
        {"variance": lambda d: is_choice(d, ["global", "component", "dimension", "component-dimension"])},
        4,
    ),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED_CONFIGS)


def config_beside_its_data(file_name: str, directory: Path) -> Path:
    """The shipped config ``file_name``, copied into ``directory`` beside the table it
    reads when it reads one that a script of configs/ writes (readings.parquet)."""
    path = CONFIGS / file_name
    if file_name != "readings.yaml":
        return path
    from pyarrow import parquet

    parquet.write_table(runpy.run_path(str(CONFIGS / "sensor_readings.py"))["readings_table"](), directory / "readings.parquet")
    return Path(shutil.copy(path, directory))


@pytest.mark.parametrize("file_name", sorted(EXPECTED_CONFIGS))
def test_config_loads(file_name, tmp_path):
    checks, trials = EXPECTED_CONFIGS[file_name]
    path = CONFIGS / file_name
    spec = load_sweep_file(config_beside_its_data(file_name, tmp_path))
    space = param_space(spec)
    for key, check in checks.items():
        assert check(space[key]), (key, space[key])
    assert num_trials(spec) == trials
    plan = describe_plan(spec)
    assert spec.name in plan
    assert any(line.startswith("trials") and line.split()[1] == str(trials) for line in plan.splitlines())
    header = path.read_text().splitlines()[0]
    assert header.startswith("# ")
    assert f"pyrosweep sweep configs/{file_name}" in path.read_text()
    assert not ray.is_initialized()


def test_defaults_and_spec_fields(tmp_path):
    spec = load_sweep_file(write(tmp_path, VALID))
    assert isinstance(spec, SweepSpec)
    assert spec.source == str(tmp_path / "sweep.yaml")
    assert (spec.restarts.screen, spec.restarts.keep) == (1, 1)
    assert (spec.num_samples, spec.max_concurrent, spec.max_failures, spec.checkpoint_every) == (1, None, 1, 5)
    assert (spec.metric, spec.mode) == ("valid_nll", "min")
    assert (spec.scheduler.type, spec.search_alg.type, spec.search_alg.seed) == ("fifo", "random", None)
    assert (spec.resources.cpu, spec.resources.gpu) == (1.0, 0.0)
    assert (spec.train.epochs, spec.train.lr, spec.train.patience) == (100, 0.01, 10)
    assert searched_keys(spec) == [] and param_space(spec) == {"hidden_dim": 4}


def test_search_space_and_trial_count(tmp_path):
    settings = {
        **VALID,
        "search": {
            "hidden_dim": {"grid": [2, 4, 8]},
            "batch_size": {"grid": [10, 20]},
            "lr_decay": {"uniform": [0.9, 1.0]},
            "seed": {"randint": [0, 10]},
            "prior_sticky": 0.5,
        },
        "num_samples": 3,
    }
    spec = load_sweep_file(write(tmp_path, settings))
    assert searched_keys(spec) == ["hidden_dim", "batch_size", "lr_decay", "seed"]
    assert num_trials(spec) == 3 * 3 * 2
    space = param_space(spec)
    assert (space["lr_decay"].lower, space["lr_decay"].upper) == (0.9, 1.0)
    assert space["prior_sticky"] == 0.5
    plan = describe_plan(spec)
    assert "18 = 3 samples x 6 grid points" in plan
    assert "randint [0, 10)" in plan
    train_line = next(line for line in plan.splitlines() if line.startswith("train"))
    assert "lr_decay" not in train_line and "batch_size" not in train_line and "epochs=100" in train_line


def test_optuna_counts_samples(tmp_path):
    settings = {**VALID, "search": {"hidden_dim": {"choice": [2, 3]}}, "num_samples": 5}
    spec = load_sweep_file(write(tmp_path, {**settings, "search_alg": {"type": "optuna", "seed": 1}}))
    assert num_trials(spec) == 5 and spec.search_alg.seed == 1


def test_data_path_is_resolved_against_the_sweep_file(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.npz").write_bytes(b"")
    spec = load_sweep_file(write(tmp_path, {**VALID, "data": {"path": "data/mine.npz"}}))
    assert spec.data == {"path": str((tmp_path / "data" / "mine.npz").resolve())}


def test_exponent_floats_and_duplicates(tmp_path):
    text = "name: t\nmodel: hmm\ndata: {name: jsb}\ntrain: {lr: 1e-3}\nsearch: {hidden_dim: 2}\n"
    spec = load_sweep_file(write(tmp_path, text))
    assert spec.train.lr == 0.001
    error = refusal(write(tmp_path, "name: t\nname: u\n"))
    assert str(error) == f"{tmp_path / 'sweep.yaml'}: invalid YAML at line 2, column 1: duplicate key 'name'"


def case(case_id: str, key_path: str, fragment: str, /, **changes: Any):
    """A bad file: VALID with ``changes``, refused at ``key_path`` with ``fragment``."""
    return pytest.param({**VALID, **changes}, key_path, fragment, id=case_id)


def search(**specs: Any) -> dict[str, Any]:
    """A ``search`` mapping with a fixed hidden_dim unless given."""
    return {"hidden_dim": 2, **specs}


BAD_FILES = [
    case("unknown top-level key", "trian", "did you mean 'train'", trian={"epochs": 3}),
    case("unknown nested key", "scheduler.grace", "unknown key", scheduler={"type": "asha", "grace": 5}),
    case("unknown family", "model", "unknown model family 'hmmm'", model="hmmm"),
    case("unknown data name", "data.name", "unknown data set 'jsbb'", data={"name": "jsbb"}),
    case("unknown data option", "data.max_chorale", "max_chorales", data={"name": "jsb", "max_chorale": 3}),
    case("bad data option", "data.length", "integer", data={"name": "synthetic-hmm", "length": "long"}),
    case("name and path", "data", "exactly one of name", data={"name": "jsb", "path": "x.npz"}),
    case("missing data file", "data.path", "no such file", data={"path": "missing.npz"}),
    case("data file type", "data.path", "unknown file type '.txt'", data={"path": "data.txt"}),
    case("search key unknown to the family", "search.variance", "model hmm", search=search(variance="global")),
    case("screen under train", "train.screen", "set it as restarts.screen", train={"screen": 4}),
    case(
        "key in train and search",
        "search.lr",
        "also set as train.lr",
        train={"lr": 0.1},
        search=search(lr={"choice": [0.1, 0.2]}),
    ),
    case(
        "loguniform low <= 0",
        "search.lr.loguniform",
        "expected [low, high] with 0 < low < high, got [0, 0.1]",
        search=search(lr={"loguniform": [0, 0.1]}),
    ),
    case("uniform low >= high", "search.lr.uniform", "low < high", search=search(lr={"uniform": [0.1, 0.1]})),
    case("uniform to infinity", "search.lr.uniform", "low < high", search=search(lr={"uniform": [0, math.inf]})),
    case(
        "uniform out of range",
        "search.lr_decay.uniform[1]",
        "less than or equal to 1",
        search=search(lr_decay={"uniform": [0.5, 1.5]}),
    ),
    case("uniform on hidden_dim", "search.hidden_dim.uniform", "integer", search={"hidden_dim": {"uniform": [2, 9]}}),
    case(
        "loguniform on an integer hyperparameter",
        "search.rnn_dim.loguniform",
        "integer",
        model="dmm",
        search=search(rnn_dim={"loguniform": [8, 64]}),
    ),
    case("randint of floats", "search.seed.randint", "integers", search=search(seed={"randint": [0, 1.5]})),
    case("empty grid", "search.hidden_dim.grid", "non-empty", search={"hidden_dim": {"grid": []}}),
    case("bad grid value", "search.hidden_dim.grid[1]", "equal to 1", search={"hidden_dim": {"grid": [4, 0]}}),
    case(
        "bad choice type",
        "search.prior_sticky.choice[1]",
        "valid number",
        search=search(prior_sticky={"choice": [0.5, "x"]}),
    ),
    case("two search forms", "search.hidden_dim", "one-key mapping", search={"hidden_dim": {"grid": [2], "x": 1}}),
    case("missing hidden_dim", "search.hidden_dim", "missing", search={"lr": 0.1}),
    case("bad fixed train value", "train.lr", "greater than 0, got -1", train={"lr": -1}),
    case("negative gpu", "resources.gpu", "greater than or equal to 0", resources={"gpu": -1}),
    case("keep > screen", "restarts.keep", "<= screen (2)", restarts={"screen": 2, "keep": 3}),
    case("screening a DMM", "restarts.screen", "MAP family", model="dmm", restarts={"screen": 4}),
    case("EM of a DMM", "train.method", "dmm cannot be trained by EM", model="dmm", train={"method": "em"}),
    case("EM searched for dmm", "search.method", "EM trains hmm, arhmm", model="dmm",
         search={"hidden_dim": 4, "method": {"choice": ["svi", "em"]}}),
    case("unknown method", "train.method", "'svi' or 'em'", train={"method": "newton"}),
    case(
        "optuna with a grid",
        "search_alg.type",
        "optuna cannot search grid entries (search.hidden_dim)",
        search={"hidden_dim": {"grid": [2, 4]}},
        search_alg={"type": "optuna"},
    ),
    case("asha option on fifo", "scheduler.grace_period", "only with type: asha", scheduler={"grace_period": 3}),
    case(
        "grace beyond epochs",
        "scheduler.grace_period",
        "train.epochs (3)",
        train={"epochs": 3},
        scheduler={"type": "asha", "grace_period": 5},
    ),
    case(
        "epochs searched under asha",
        "scheduler.type",
        "epochs cannot be in search",
        search=search(epochs={"choice": [5, 10]}),
        scheduler={"type": "asha"},
    ),
    case("bad name characters", "name", "not a valid experiment name", name="my sweep!"),
    case("name too long", "name", "at most 100 characters", name="x" * 101),
    case("string number", "num_samples", "valid integer, got '8'", num_samples="8"),
    case("other metric", "metric", "'valid_nll'", metric="test_nll"),
    case("source in the file", "source", "unknown key", source="elsewhere.yaml"),
    pytest.param({key: VALID[key] for key in ("model", "data", "search")}, "name", "missing", id="missing name"),
]


@pytest.mark.parametrize(("settings", "key_path", "fragment"), BAD_FILES)
def test_bad_file_is_refused_with_its_key_path(tmp_path, settings, key_path, fragment):
    path = write(tmp_path, settings)
    error = refusal(path)
    line = next((line for line in str(error).splitlines() if line.startswith(f"{path}: {key_path}: ")), None)
    assert line is not None, str(error)
    assert fragment in line
    assert not ray.is_initialized()


def test_several_problems_are_reported_together(tmp_path):
    settings = {
        **VALID,
        "trian": {},
        "data": {"name": "jsb", "max_chorale": 3},
        "search": {"hidden_dim": {"uniform": [2, 8]}, "lr": {"loguniform": [0.1, 0.01]}},
        "resources": {"gpu": -1},
    }
    path = write(tmp_path, settings)
    error = refusal(path)
    assert [key_path for key_path, _ in error.problems] == [
        "data.max_chorale",
        "search.hidden_dim.uniform",
        "search.lr.loguniform",
        "resources.gpu",
        "trian",
    ]
    assert len(str(error).splitlines()) == 5
    assert all(line.startswith(f"{path}: ") for line in str(error).splitlines())
    expected = "search.lr.loguniform: expected [low, high] with 0 < low < high, got [0.1, 0.01]"
    assert f"{path}: {expected}" in str(error)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [x\n", "invalid YAML at line 2, column 1"),
        ("name: x\n  model: hmm\n", "invalid YAML at line 2"),
        ("", "the file is empty"),
        ("- name\n", "expected a mapping of settings, got list"),
    ],
    ids=["unclosed bracket", "bad indentation", "empty", "list"],
)
def test_unreadable_yaml_names_the_file(tmp_path, text, fragment):
    path = write(tmp_path, text)
    error = refusal(path)
    assert str(error).startswith(f"{path}: ") and fragment in str(error)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.yaml"
    assert str(refusal(path)) == f"{path}: no such file"


def test_overrides(tmp_path):
    settings = {**VALID, "search": {"hidden_dim": {"grid": [2, 4]}}, "num_samples": 2, "max_concurrent": 1}
    path = write(tmp_path, settings)
    spec = load_sweep_file(path, {"num_samples": 5, "max_concurrent": None})
    assert (spec.num_samples, spec.max_concurrent, num_trials(spec)) == (5, 1, 10)
    assert load_sweep_file(path, {"max_concurrent": 3}).max_concurrent == 3
    assert "num_samples: should be greater than or equal to 1, got 0" in str(refusal(path, num_samples=0))
    assert "epochs: cannot be overridden" in str(refusal(path, epochs=3))
