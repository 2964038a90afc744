"""Promotion (docs/design.md, "MLflow layout"): the best trial of a sweep becomes a new version of a
registered MLflow model, and an alias (``champion``) moves to it.

The version is a pyfunc "model from code" (``serve/pyfunc_model.py``) logged in the
trial's own run, with the trial's checkpoint as the artifact ``checkpoint``, the
``trainables`` and ``serve`` packages as code, pinned pip requirements, a signature and
an input example from the data's test split. Its lineage is on the version as tags:
``pyrosweep.sweep_run_id``, ``pyrosweep.trial_run_id``, ``pyrosweep.metric``,
``pyrosweep.metric_value`` and ``pyrosweep.previous_version`` (where the alias pointed
before), which is what ``rollback`` follows. Where the alias's version has held-out
scores on the same test sequences, the new version also gets the paired comparison
with it (``pyrosweep.vs_previous``: NLL per frame of the new minus the old, ``..._low``,
``..._high``: its 95% bootstrap interval, ``..._n``: the sequences); with
``require_better`` a version that does not beat it (the interval excluding 0) is not
registered at all (:class:`PromotionRefused`). Its states are renumbered to match the
alias's version on the validation split (:mod:`trainables.alignment`), so a served state
keeps its meaning from version to version: ``pyrosweep.aligned_to`` (that version),
``pyrosweep.state_order`` (served state ``i`` is the trial's state ``order[i]``) and
``pyrosweep.state_agreement`` go on the version, or ``pyrosweep.not_aligned`` with why.

MLflow, torch and Ray load inside the functions: ``pyrosweep`` builds its parser (with
``add_promote_arguments``) for every command, and importing them costs seconds.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .home import tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion
    from mlflow.models.model import ModelInfo
    from mlflow.tracking import MlflowClient

    from trainables.comparison import Comparison
    from trainables.data import Dataset
    from trainables.models import SequenceModel

    from .mlflow_layout import SweepTracker

logger = logging.getLogger(__name__)

CHILD_METRICS = {"valid_nll": "best_valid_nll"}
SWEEP_RUN_TAG = "pyrosweep.sweep_run_id"
TRIAL_RUN_TAG = "pyrosweep.trial_run_id"
METRIC_TAG = "pyrosweep.metric"
VALUE_TAG = "pyrosweep.metric_value"
PREVIOUS_TAG = "pyrosweep.previous_version"
VERSUS_TAG = "pyrosweep.vs_previous"  # and _low, _high, _n: the paired comparison on the test split
ALIGNED_TAG = "pyrosweep.aligned_to"
ORDER_TAG = "pyrosweep.state_order"
AGREEMENT_TAG = "pyrosweep.state_agreement"
NOT_ALIGNED_TAG = "pyrosweep.not_aligned"
REFERENCE_TAG = "pyrosweep.reference_frames"  # validation frames behind served p-values and drift
NO_REFERENCE_TAG = "pyrosweep.no_reference"
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


def load_sweep_data(data: dict[str, Any]) -> Dataset | str:
    """The data set of a sweep's spec ``data``, or why it did not load here."""
    from trainables.data import load_dataset

    try:
        return load_dataset(**data)
    except (KeyError, ValueError, OSError) as error:
        return str(error)


def example_body(model: SequenceModel, dataset: Dataset | str) -> dict[str, Any]:
    """A request body of one real test sequence (one point for a model of points) of the
    sweep's ``dataset``, or of one sequence sampled from the model where it did not load
    (``dataset`` is then why)."""
    from serve.scoring import answer

    key = model.data_kind
    if isinstance(dataset, str):
        logger.warning("input example sampled from the model: the trial's data did not load (%s)", dataset)
        return {key: answer(model, "sample", {"num_sequences": 1, "length": 16, "seed": 0})["sequences"]}
    test = dataset.splits["test"]
    item = test.x[0] if test.lengths is None else test.x[0, : int(test.lengths[0])]
    return {key: [item.tolist()]}


def _store_reference(checkpoint: str, dataset: Dataset | str) -> dict[str, str]:
    """Write the per-step NLL of the validation frames into ``checkpoint`` (what served
    p-values and drift compare with: :mod:`serve.monitor`); the version's tag."""
    from serve.monitor import write_reference
    from trainables.checkpoint import load_checkpoint

    if isinstance(dataset, str):
        return {NO_REFERENCE_TAG: f"the sweep's data did not load here ({dataset})"}
    valid = dataset.splits["valid"]
    model = load_checkpoint(checkpoint)
    return {REFERENCE_TAG: str(write_reference(model, valid.x, valid.lengths, checkpoint))}


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


def _log_pyfunc(trial: Run, checkpoint: str, name: str, dataset: Dataset | str) -> ModelInfo:
    """Log the pyfunc into the trial's run (reopened, and FINISHED again after) through
    the fluent API, with an input example from the sweep's ``dataset``."""
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
            input_example=(example_body(model, dataset), {"method": DEFAULT_METHOD}),
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


class PromotionRefused(ValueError):
    """``--require-better``: the winner does not beat the version under the alias."""


def _versus_previous(
    tracker: SweepTracker, trial: Run, name: str, previous: str | None, require_better: bool
) -> Comparison | None:
    """The winner minus version ``previous`` of ``name`` on the same test sequences (None
    where there is no previous version or nothing to compare). With ``require_better``
    anything short of a paired interval wholly below 0 raises :class:`PromotionRefused`
    with the reason."""
    if previous is None:
        return None
    keep = f"{name} stays at version {previous}"

    def refuse(reason: str) -> None:
        if require_better:
            raise PromotionRefused(f"not promoted (--require-better): {reason}; {keep}")

    champion_run = tracker.client.get_run(tracker.client.get_model_version(name, previous).run_id)
    champion, winner = tracker.held_out(champion_run), tracker.held_out(trial)
    if champion is None or winner is None:
        which = f"version {previous}'s trial" if champion is None else f"trial run {trial.info.run_id}"
        refuse(f"{which} has no held-out scores to compare (it was trained before pyrosweep recorded them)")
        return None
    try:
        comparison = winner.compare(champion, "test")
    except ValueError as error:
        refuse(f"the winner and version {previous} of {name}: {error}; promote under another --name")
        return None
    if not champion.exact and winner.exact:
        refuse(f"version {previous}'s test NLL is a bound, so beating it does not show the winner is better")
    elif not comparison.better:
        verdict = "tied: the interval covers 0" if comparison.tied else "worse"
        refuse(
            f"the winner (trial run {trial.info.run_id}) minus version {previous} on the same {comparison.n} test "
            f"sequences is {comparison.describe()} nats per frame (95% CI), {verdict}"
        )
    return comparison


def _align_to_previous(tracking_uri: str, checkpoint: str, name: str, previous: str | None, dataset: Dataset | str) -> dict[str, str]:
    """Renumber the states of the model in ``checkpoint`` (in place) to match version
    ``previous`` of ``name`` on the validation split of the sweep's ``dataset``; the
    version's tags that say how, or why not."""
    from serve.registry import load_model_version
    from trainables.alignment import align
    from trainables.checkpoint import load_checkpoint, read_config, save_checkpoint

    if previous is None:
        return {}
    model = load_checkpoint(checkpoint)
    reference, _ = load_model_version(tracking_uri, name, previous)
    problem = model.relabel_problem()
    if not problem and (theirs := reference.relabel_problem()):
        problem = f"version {previous}: {theirs}"
    if not problem and (reference.data_kind, reference.data_dim) != (model.data_kind, model.data_dim):
        problem = f"version {previous} takes other data ({reference.data_dim} values per frame, not {model.data_dim})"
    if not problem and isinstance(dataset, str):
        problem = f"the sweep's data did not load here ({dataset})"
    if problem:
        return {NOT_ALIGNED_TAG: problem}
    alignment = align(model, reference, dataset.splits["valid"])
    model.relabel(alignment.order)
    extra = {key: value for key, value in read_config(checkpoint).items() if key not in ("model", "module")}
    save_checkpoint(model, checkpoint, **extra)
    return {ALIGNED_TAG: previous, ORDER_TAG: json.dumps(alignment.order), AGREEMENT_TAG: repr(alignment.agreement)}


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
    require_better: bool = False,
) -> dict[str, Any]:
    """Register the best FINISHED trial of the latest sweep of ``experiment`` (or of the
    parent run ``sweep``) by the lowest ``metric`` (``valid_nll`` is the trial's
    ``best_valid_nll``; other names are child metrics as they are) as a new version of
    ``name`` (default: the experiment's name) and move ``alias`` to it; with
    ``require_better`` only if it beats the alias's version on the same test sequences
    (else :class:`PromotionRefused`, and nothing is registered).

    :returns: ``name``, ``version``, ``alias``, ``run_id`` (the trial run),
        ``sweep_run_id``, ``metric``, ``value``, ``previous_version`` (where the alias
        pointed before, or None), ``versus`` (the comparison with it, or None) and
        ``alignment`` (the version's alignment tags).
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
    versus = _versus_previous(tracker, trial, name, previous, require_better)
    lineage = {
        SWEEP_RUN_TAG: sweep_run.info.run_id,
        TRIAL_RUN_TAG: trial.info.run_id,
        METRIC_TAG: child_metric,
        VALUE_TAG: repr(value),
        **({PREVIOUS_TAG: previous} if previous else {}),
        **(_versus_tags(versus) if versus else {}),
    }
    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = _download_checkpoint(client, trial, scratch)
        dataset = load_sweep_data(data)
        lineage.update(_align_to_previous(tracking_uri, checkpoint, name, previous, dataset))
        lineage.update(_store_reference(checkpoint, dataset))
        version = register_checkpoint(client, trial, checkpoint, name, dataset, lineage)
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
        "versus": versus,
        "alignment": {key: value for key, value in lineage.items() if key in (ALIGNED_TAG, ORDER_TAG, AGREEMENT_TAG, NOT_ALIGNED_TAG)},
    }


def register_checkpoint(
    client: MlflowClient, run: Run, checkpoint: str, name: str, dataset: Dataset | str, tags: dict[str, str]
) -> ModelVersion:
    """Log ``checkpoint`` as the pyfunc in ``run`` (an input example from ``dataset``,
    :func:`load_sweep_data`'s) and register it as a new version of ``name`` with ``tags``. The pyfunc's
    artifact takes the directory's name, so a directory named otherwise is logged from a
    copy named ``checkpoint``."""
    from trainables.checkpoint import ARTIFACT as CHECKPOINT_ARTIFACT

    # the SQL registry looks the logged model up through the fluent tracking URI
    with tempfile.TemporaryDirectory() as scratch, _fluent_tracking(client.tracking_uri):
        if Path(checkpoint).name != CHECKPOINT_ARTIFACT:
            checkpoint = shutil.copytree(checkpoint, Path(scratch) / CHECKPOINT_ARTIFACT)
        info = _log_pyfunc(run, str(checkpoint), name, dataset)
        _ensure_registered(client, name)
        return client.create_model_version(name, info.model_uri, run_id=run.info.run_id, tags=tags, model_id=info.model_id)


def _versus_tags(versus: Comparison) -> dict[str, str]:
    return {
        VERSUS_TAG: repr(versus.difference),
        f"{VERSUS_TAG}_low": repr(versus.low),
        f"{VERSUS_TAG}_high": repr(versus.high),
        f"{VERSUS_TAG}_n": str(versus.n),
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
    parser.add_argument(
        "--require-better", action="store_true",
        help="register only if the winner beats the alias's version on the same test sequences (95%% paired "
        "bootstrap interval below 0); otherwise say why and exit 2",
    )


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
    done = promote(uri, args.experiment, args.sweep, args.metric, args.name, args.alias, args.require_better)
    before = f"was version {done['previous_version']}" if done["previous_version"] else "first version under it"
    print(f"registered {done['name']} version {done['version']} as @{done['alias']} ({before})")
    print(f"  trial run {done['run_id']} of sweep run {done['sweep_run_id']}: {done['metric']} = {done['value']:.4f}")
    if ORDER_TAG in done["alignment"]:
        print(f"  states renumbered to match version {done['previous_version']}: served state i is the trial's state "
              f"{done['alignment'][ORDER_TAG]}[i] ({float(done['alignment'][AGREEMENT_TAG]):.1%} of validation frames agree)")
    elif NOT_ALIGNED_TAG in done["alignment"]:
        print(f"  states not renumbered: {done['alignment'][NOT_ALIGNED_TAG]}")
    if (versus := done["versus"]) is not None:
        print(f"  vs version {done['previous_version']} on the same {versus.n} test sequences: "
              f"{versus.describe()} nats per frame (95% CI)")
    print(f"  load: mlflow.pyfunc.load_model('models:/{done['name']}@{done['alias']}') with MLFLOW_TRACKING_URI={uri}")
    print(f"  serve: pyrosweep serve --model models:/{done['name']}@{done['alias']} --tracking-uri {uri}")
