"""Promotion (docs/design.md, "MLflow layout"): the best trial of a sweep becomes a new version of a
registered MLflow model, and an alias (``champion``) moves to it.

The version is a pyfunc "model from code" (``serve/pyfunc_model.py``) logged in the
trial's own run, with the trial's checkpoint as the artifact ``checkpoint``, the
``trainables`` and ``serve`` packages as code, pinned pip requirements, a signature and
an input example from the data's test split. Its lineage is on the version as tags:
``pyrosweep.sweep_run_id``, ``pyrosweep.trial_run_id``, ``pyrosweep.metric``,
``pyrosweep.metric_value`` and ``pyrosweep.previous_version`` (where the alias pointed
before), which is what ``rollback`` follows.

MLflow, torch and Ray load inside the functions: ``pyrosweep`` builds its parser (with
``add_promote_arguments``) for every command, and importing them costs seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import logging
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .home import tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.models.model import ModelInfo
    from mlflow.tracking import MlflowClient

    from trainables.models import SequenceModel

logger = logging.getLogger(__name__)

CHILD_METRICS = {"valid_nll": "best_valid_nll"}
SWEEP_RUN_TAG = "pyrosweep.sweep_run_id"
TRIAL_RUN_TAG = "pyrosweep.trial_run_id"
METRIC_TAG = "pyrosweep.metric"
VALUE_TAG = "pyrosweep.metric_value"
PREVIOUS_TAG = "pyrosweep.previous_version"
PINNED_PACKAGES = ("torch", "pyro-ppl", "mlflow", "numpy", "music21")  # music21: trainables.data imports it
_ALIAS = re.compile(r"[A-Za-z0-9_-]+")
_RESERVED_ALIAS = re.compile(r"latest|v[0-9]+", re.IGNORECASE)


def _source(module: str) -> Path:
    """Where ``module`` lives, without importing it."""
    return Path(importlib.util.find_spec(module).origin)


def pip_requirements() -> list[str]:
    """The installed versions of what the pyfunc imports, pinned (local tags such as
    ``+cpu`` dropped: they are not on PyPI)."""
    return [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in PINNED_PACKAGES]


def check_alias(alias: str) -> None:
    """Refuse an alias MLflow would refuse, before anything is logged."""
    if not _ALIAS.fullmatch(alias) or _RESERVED_ALIAS.fullmatch(alias):
        raise ValueError(
            f"alias {alias!r} cannot be used: aliases are letters, digits, '_' and '-', "
            "and MLflow reserves 'latest' and v<number> (e.g. v3); try champion or challenger"
        )


def _download_checkpoint(client: MlflowClient, run: Run, directory: str) -> str:
    from trainables.checkpoint import ARTIFACT as CHECKPOINT_ARTIFACT
    from trainables.checkpoint import WEIGHTS as CHECKPOINT_WEIGHTS

    listed = {artifact.path for artifact in client.list_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT)}
    if f"{CHECKPOINT_ARTIFACT}/{CHECKPOINT_WEIGHTS}" not in listed:
        problem = run.data.tags.get("artifact_error", "nothing was logged")
        raise RuntimeError(
            f"trial run {run.info.run_id} has no {CHECKPOINT_ARTIFACT}/ artifact ({problem}); "
            "pass --sweep or --metric to promote another one"
        )
    return client.download_artifacts(run.info.run_id, CHECKPOINT_ARTIFACT, directory)


def example_body(model: SequenceModel, data: dict[str, Any]) -> dict[str, Any]:
    """A request body of one real test sequence (one point for a model of points) from the
    data set ``data`` (the sweep spec's), or of one sequence sampled from the model where
    the data cannot be loaded."""
    from serve.scoring import answer
    from trainables.data import load_dataset

    key = model.data_kind
    try:
        test = load_dataset(**data).splits["test"]
    except (KeyError, ValueError, OSError) as error:
        logger.warning("input example sampled from the model: the trial's data did not load (%s)", error)
        return {key: answer(model, "sample", {"num_sequences": 1, "length": 16, "seed": 0})["sequences"]}
    item = test.x[0] if test.lengths is None else test.x[0, : int(test.lengths[0])]
    return {key: [item.tolist()]}


@contextmanager
def _fluent_tracking(uri: str) -> Iterator[None]:
    """MLflow's fluent API (``start_run``, ``log_model``) on ``uri`` for the block; the
    process's own setting (an explicit URI or ``$MLFLOW_TRACKING_URI``) comes back after."""
    import mlflow

    explicit = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    environment = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(explicit)
        if environment is not None:
            os.environ["MLFLOW_TRACKING_URI"] = environment


def _log_pyfunc(trial: Run, checkpoint: str, name: str, data: dict[str, Any]) -> ModelInfo:
    """Log the pyfunc into the trial's run (reopened, and FINISHED again after) through
    the fluent API, with an input example from the data set ``data``."""
    import mlflow

    from serve.pyfunc_model import DEFAULT_METHOD, signature
    from trainables.checkpoint import ARTIFACT as CHECKPOINT_ARTIFACT
    from trainables.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint)
    mlflow.start_run(run_id=trial.info.run_id)
    try:
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(_source("serve.pyfunc_model")),
            artifacts={CHECKPOINT_ARTIFACT: checkpoint},
            code_paths=[str(_source(package).parent) for package in ("trainables", "serve")],
            pip_requirements=pip_requirements(),
            signature=signature(model.data_kind),
            input_example=(example_body(model, data), {"method": DEFAULT_METHOD}),
        )
    finally:
        mlflow.end_run("FINISHED")


def _alias_target(client: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` of ``name`` points to, if the model and the alias exist."""
    from mlflow.exceptions import MlflowException

    try:
        target = client.get_registered_model(name).aliases.get(alias)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return None
    return None if target is None else str(target)


def _ensure_registered(client: MlflowClient, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="pyrosweep: promoted sweep winners")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def promote(
    tracking_uri: str,
    experiment: str,
    sweep: str | None = None,
    metric: str = "valid_nll",
    name: str | None = None,
    alias: str = "champion",
) -> dict[str, Any]:
    """Register the best FINISHED trial of the latest sweep of ``experiment`` (or of the
    parent run ``sweep``) by the lowest ``metric`` (``valid_nll`` is the trial's
    ``best_valid_nll``; other names are child metrics as they are) as a new version of
    ``name`` (default: the experiment's name) and move ``alias`` to it.

    :returns: ``name``, ``version``, ``alias``, ``run_id`` (the trial run),
        ``sweep_run_id``, ``metric``, ``value`` and ``previous_version`` (where the alias
        pointed before, or None).
    """
    from .mlflow_layout import SweepTracker

    check_alias(alias)
    tracker = SweepTracker(tracking_uri, experiment, create=False)
    client = tracker.client
    sweep_run = tracker.sweep_run(sweep)
    child_metric = CHILD_METRICS.get(metric, metric)
    trial, value = tracker.best_child(sweep_run, child_metric)
    data = tracker.sweep_spec(sweep_run.info.run_id)["data"]
    name = name or experiment
    previous = _alias_target(client, name, alias)
    lineage = {
        SWEEP_RUN_TAG: sweep_run.info.run_id,
        TRIAL_RUN_TAG: trial.info.run_id,
        METRIC_TAG: child_metric,
        VALUE_TAG: repr(value),
        **({PREVIOUS_TAG: previous} if previous else {}),
    }
    # the SQL registry looks the logged model up through the fluent tracking URI
    with tempfile.TemporaryDirectory() as scratch, _fluent_tracking(tracking_uri):
        info = _log_pyfunc(trial, _download_checkpoint(client, trial, scratch), name, data)
        _ensure_registered(client, name)
        version = client.create_model_version(
            name, info.model_uri, run_id=trial.info.run_id, tags=lineage, model_id=info.model_id
        )
    client.set_registered_model_alias(name, alias, version.version)
    return {
        "name": name,
        "version": int(version.version),
        "alias": alias,
        "run_id": trial.info.run_id,
        "sweep_run_id": sweep_run.info.run_id,
        "metric": child_metric,
        "value": value,
        "previous_version": int(previous) if previous else None,
    }


def rollback(tracking_uri: str, name: str, alias: str = "champion") -> dict[str, Any]:
    """Move ``alias`` of ``name`` back to the version it pointed to before the promotion
    of its current version (that version's ``pyrosweep.previous_version``).

    :returns: ``name``, ``version`` (now under the alias), ``alias``, ``run_id`` (its
        trial run) and ``rolled_back_from`` (the version the alias left).
    """
    from mlflow.tracking import MlflowClient

    from serve.registry import resolve_version

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    current = resolve_version(client, f"models:/{name}@{alias}")
    previous = current.tags.get(PREVIOUS_TAG)
    if not previous:
        raise ValueError(
            f"cannot roll back {name}@{alias}: version {current.version} was the first promoted "
            f"under this alias (no {PREVIOUS_TAG} tag)"
        )
    target = resolve_version(client, f"models:/{name}/{previous}")
    client.set_registered_model_alias(name, alias, target.version)
    return {
        "name": name,
        "version": int(target.version),
        "alias": alias,
        "run_id": target.run_id,
        "rolled_back_from": int(current.version),
    }


def add_promote_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``pyrosweep promote``."""
    parser.add_argument("--experiment", default=None, help="the sweep's name (required unless --rollback with --name)")
    parser.add_argument("--sweep", default=None, metavar="PARENT_RUN_ID", help="a sweep's parent run (default: the latest sweep)")
    parser.add_argument(
        "--metric", default="valid_nll", help="lowest wins: valid_nll is a trial's best_valid_nll; other child metrics as named"
    )
    parser.add_argument("--name", default=None, metavar="REGISTERED_NAME", help="registered model (default: the experiment name)")
    parser.add_argument("--alias", default="champion", help="the alias to move (default: champion)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or the embedded store)")
    parser.add_argument("--rollback", action="store_true", help="move the alias back to the version it pointed to before")


def cmd_promote(args: argparse.Namespace) -> None:
    """``pyrosweep promote``: promote the best trial, or ``--rollback``; print the outcome."""
    uri = tracking_uri(args.tracking_uri)
    if args.rollback:
        if not (args.name or args.experiment):
            raise ValueError("--rollback needs --name REGISTERED_NAME (or --experiment NAME)")
        moved = rollback(uri, args.name or args.experiment, args.alias)
        print(f"{moved['name']}@{moved['alias']} is version {moved['version']} again (was {moved['rolled_back_from']})")
        print(f"  trial run {moved['run_id']}")
        return
    if not args.experiment:
        raise ValueError("promote needs --experiment NAME (the sweep's name)")
    done = promote(uri, args.experiment, args.sweep, args.metric, args.name, args.alias)
    before = f"was version {done['previous_version']}" if done["previous_version"] else "first version under it"
    print(f"registered {done['name']} version {done['version']} as @{done['alias']} ({before})")
    print(f"  trial run {done['run_id']} of sweep run {done['sweep_run_id']}: {done['metric']} = {done['value']:.4f}")
    print(f"  load: mlflow.pyfunc.load_model('models:/{done['name']}@{done['alias']}') with MLFLOW_TRACKING_URI={uri}")
    print(f"  serve: pyrosweep serve --model models:/{done['name']}@{done['alias']} --tracking-uri {uri}")
