"""Where a sweep lives in MLflow (docs/design.md, "MLflow layout"): the one module that writes and
reads that layout.

One experiment per sweep name; one parent run per sweep (tag ``pyrosweep.sweep`` =
``parent``) that stores the validated sweep spec as the artifact ``sweep/spec.json``
(beside the sweep file itself); one child run per trial (tags ``mlflow.parentRunId``,
``pyrosweep.sweep`` = ``trial``, ``ray.trial_id``, and the trial's config as JSON in
``pyrosweep.config``) that keeps its run across retries and resumes (found again by its
trial id). A sweep with ``seeds: N`` also gives each trial run N nested seed runs
(``pyrosweep.sweep`` = ``seed``, ``pyrosweep.seed``, ``pyrosweep.sweep_run``), each with
its member's metrics and checkpoint; the trial run has their means and the best member's
checkpoint. Every hyperparameter is also an MLflow param, for the UI; readers take typed
values from the spec and the config tag, never from params.

Only MLflow is imported here: ``pyrosweep runs`` and promotion need no Ray or torch.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Param, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainables.held_out import HELD_OUT_ARTIFACT, HeldOutScores
from trainables.selection import SELECTION_METRICS

from .home import artifact_location

if TYPE_CHECKING:
    from .sweep_file import SweepSpec

PARENT_TAG = "mlflow.parentRunId"
TRIAL_TAG = "ray.trial_id"
SWEEP_TAG = "pyrosweep.sweep"
CONFIG_TAG = "pyrosweep.config"
INTERRUPTED_TAG = "pyrosweep.interrupted"
SEED_TAG = "pyrosweep.seed"  # a seed run's outer seed index (sweeps with seeds: N)
SWEEP_RUN_TAG = "pyrosweep.sweep_run"  # a seed run's sweep (its parent is its trial's run)
SPEC_ARTIFACT = "sweep/spec.json"


class SweepTracker:
    """The sweeps of one experiment in MLflow: parent runs and their spec, child runs,
    the best child and the leaderboard.

    :param create: make the experiment if there is none (a sweep starting); without it a
        missing experiment is a ``ValueError`` naming the experiments there are (a reader).
    """

    def __init__(self, tracking_uri: str, experiment: str, *, create: bool = True) -> None:
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.uri = tracking_uri
        self.experiment = experiment
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            self.experiment_id = found.experiment_id
        elif create:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location(tracking_uri, experiment))
        else:
            known = sorted(e.name for e in self.client.search_experiments())
            raise ValueError(
                f"no experiment named {experiment!r} at {tracking_uri} (the experiment is the "
                f"sweep's name); experiments there: {', '.join(known) or 'none'}"
            )

    def start_parent(self, run_name: str, spec: SweepSpec, params: dict[str, Any], sweep_file: Path) -> str:
        """A new parent run with ``params``, the sweep file and ``spec`` as JSON; its id."""
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags={SWEEP_TAG: "parent"}).info.run_id
        self.log_params(run_id, params)
        self.client.log_artifact(run_id, str(sweep_file), "sweep")
        self.client.log_dict(run_id, spec.model_dump(mode="json"), SPEC_ARTIFACT)
        return run_id

    def sweep_spec(self, parent_run_id: str) -> dict[str, Any]:
        """The spec the sweep ran, as ``SweepSpec.model_dump(mode="json")`` wrote it (not
        validated again: its data file need not be on this machine)."""
        with tempfile.TemporaryDirectory() as scratch:
            try:
                path = self.client.download_artifacts(parent_run_id, SPEC_ARTIFACT, scratch)
            except MlflowException as error:
                raise ValueError(f"sweep run {parent_run_id} has no {SPEC_ARTIFACT}: {error.message}") from None
            return json.loads(Path(path).read_text())

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in sorted(params.items())])

    def sweep_run(self, parent_run_id: str | None = None) -> Run:
        """The parent run ``parent_run_id``, checked to be a sweep of the experiment, or
        the latest sweep's."""
        if parent_run_id is None:
            latest = self.client.search_runs(
                [self.experiment_id],
                filter_string=f"tags.`{SWEEP_TAG}` = 'parent'",
                order_by=["attributes.start_time DESC"],
                max_results=1,
            )
            if not latest:
                raise ValueError(f"experiment {self.experiment!r} has no sweep yet: run pyrosweep sweep first")
            return latest[0]
        try:
            run = self.client.get_run(parent_run_id)
        except MlflowException as error:
            raise ValueError(f"no run {parent_run_id!r} at {self.uri}: {error.message}") from None
        if run.info.experiment_id != self.experiment_id or run.data.tags.get(SWEEP_TAG) != "parent":
            raise ValueError(
                f"run {parent_run_id} is not a sweep of experiment {self.experiment!r}; give the parent run id "
                f"that pyrosweep runs --experiment {self.experiment} prints"
            )
        return run

    def children(self, parent_run_id: str) -> list[Run]:
        """The trial runs of the sweep ``parent_run_id``."""
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=5000
        )

    def reopen(self, run: Run) -> None:
        """A run that goes on (a retried or resumed trial, a resumed sweep) is RUNNING again."""
        if run.info.status != "RUNNING":
            self.client.update_run(run.info.run_id, status="RUNNING")
        if INTERRUPTED_TAG in run.data.tags:
            self.client.delete_tag(run.info.run_id, INTERRUPTED_TAG)

    def child_for(self, parent_run_id: str, trial_id: str, config: dict[str, Any], fixed_params: dict[str, Any]) -> str:
        """The child run of ``trial_id``: found again after a retry or a resume, else
        created with the trial's ``config`` as its config tag and, with ``fixed_params``,
        as params."""
        for run in self.children(parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == trial_id:
                self.reopen(run)
                return run.info.run_id
        tags = {PARENT_TAG: parent_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: "trial", CONFIG_TAG: json.dumps(config)}
        run_id = self.client.create_run(self.experiment_id, run_name=f"trial-{trial_id}", tags=tags).info.run_id
        self.log_params(run_id, {**fixed_params, **config})
        return run_id

    def seed_runs(self, parent_run_id: str) -> list[Run]:
        """The seed runs of the sweep ``parent_run_id`` (none without ``seeds: N``)."""
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{SWEEP_TAG}` = 'seed' and tags.`{SWEEP_RUN_TAG}` = '{parent_run_id}'",
            max_results=50000,
        )

    def seed_run_for(self, parent_run_id: str, trial_run_id: str, trial_id: str, seed: int, config: dict[str, Any]) -> str:
        """The run of outer seed ``seed`` of ``trial_id`` (nested under ``trial_run_id``):
        found again after a retry or a resume, else created with the member's ``config``."""
        for run in self.seed_runs(parent_run_id):
            if run.data.tags.get(TRIAL_TAG) == trial_id and run.data.tags.get(SEED_TAG) == str(seed):
                self.reopen(run)
                return run.info.run_id
        tags = {
            PARENT_TAG: trial_run_id, TRIAL_TAG: trial_id, SWEEP_TAG: "seed", SEED_TAG: str(seed),
            SWEEP_RUN_TAG: parent_run_id, CONFIG_TAG: json.dumps(config),
        }  # fmt: skip
        run_name = f"trial-{trial_id}-seed-{seed}"
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self.log_params(run_id, config)
        return run_id

    def best_child(self, parent: Run, metric: str) -> tuple[Run, float]:
        """The FINISHED child of ``parent`` with the lowest finite ``metric``, and that value."""
        children = self.children(parent.info.run_id)
        scored = [
            (run.data.metrics[metric], run)
            for run in children
            if run.info.status == "FINISHED" and math.isfinite(run.data.metrics.get(metric, math.nan))
        ]
        if not scored:
            statuses = Counter(run.info.status for run in children)
            seen = sorted({name for run in children for name in run.data.metrics})
            raise ValueError(
                f"sweep {parent.info.run_name} ({parent.info.run_id}) has no FINISHED trial with a finite "
                f"{metric} (trials: {', '.join(f'{n} {s}' for s, n in sorted(statuses.items())) or 'none'}; "
                f"metrics logged: {', '.join(seen) or 'none'})"
            )
        value, best = min(scored, key=lambda pair: pair[0])
        return best, value

    def held_out(self, run: Run) -> HeldOutScores | None:
        """A finished trial's held-out scores (:mod:`trainables.held_out`), or None where
        it logged none."""
        if run.info.status != "FINISHED":
            return None
        with tempfile.TemporaryDirectory() as scratch:
            try:
                path = self.client.download_artifacts(run.info.run_id, HELD_OUT_ARTIFACT, scratch)
            except (MlflowException, OSError):
                return None
            return HeldOutScores.read(path)

    def leaderboard(self, parent_run_id: str, searched: list[str]) -> list[dict[str, Any]]:
        """One row per trial (its ``searched`` hyperparameters typed, from its config tag),
        best ``best_valid_nll`` first (failed and unscored last), each compared with the
        best on the validation sequences (:func:`versus_best`). With ``seeds: N`` a row's
        figures are its seeds' means, ``seed_se`` the standard error of ``best_valid_nll``
        over them, and the comparison is of each sequence's NLL averaged over the seeds."""
        rows, scores, seeded = [], {}, {}
        for run in self.seed_runs(parent_run_id):
            seeded.setdefault(run.data.tags[PARENT_TAG], []).append(self.held_out(run))
        for run in self.children(parent_run_id):
            members = seeded.get(run.info.run_id)
            scores[run.info.run_id] = HeldOutScores.mean(members) if members else self.held_out(run)
            metrics, config = run.data.metrics, json.loads(run.data.tags[CONFIG_TAG])
            rows.append(
                {
                    "trial": run.data.tags.get(TRIAL_TAG, ""),
                    "status": run.info.status,
                    **{key: config.get(key, "") for key in searched},
                    "best_valid_nll": metrics.get("best_valid_nll", math.nan),
                    "test_nll": metrics.get("test_nll", math.nan),
                    **{key: metrics.get(key, math.nan) for key in SELECTION_METRICS},
                    **({"seeds": int(metrics.get("seeds", len(seeded.get(run.info.run_id, [])))), "seed_se": metrics.get("seed_se", math.nan)}
                       if seeded else {}),
                    "epochs": int(metrics.get("epoch", 0)),
                    "run_id": run.info.run_id,
                }
            )
        return versus_best(sorted(rows, key=_rank), scores)


#: the leaderboard's comparison columns: NLL per frame minus the best's, its 95% CI, the verdict
VERSUS_COLUMNS = ("exact", "vs_best", "ci_low", "ci_high", "verdict")


def versus_best(rows: list[dict[str, Any]], scores: dict[str, HeldOutScores | None]) -> list[dict[str, Any]]:
    """Add :data:`VERSUS_COLUMNS` to leaderboard ``rows`` (best first): each trial's
    validation NLL per frame minus the best trial's with a 95% paired-bootstrap interval
    over the same sequences (:meth:`HeldOutScores.compare`), and a ``verdict``: ``best``,
    ``tied`` (the interval covers 0), ``worse`` or ``better``; ``(bound vs exact)`` where
    one of the two is a bound, so a bound is never ranked as an equal of a likelihood
    unflagged. ``scores`` maps run ids to held-out scores (None where there are none)."""
    best = rows[0] if rows and is_scored(rows[0]) else None
    reference = scores.get(best["run_id"]) if best else None
    for row in rows:
        own = scores.get(row["run_id"])
        row.update(exact="" if own is None else own.exact, vs_best=math.nan, ci_low=math.nan, ci_high=math.nan, verdict="")
        if own is None or reference is None:
            continue
        if row is best:
            row.update(vs_best=0.0, ci_low=0.0, ci_high=0.0, verdict="best")
            continue
        try:
            comparison = own.compare(reference, "valid")
        except ValueError:
            row["verdict"] = "other data"
            continue
        verdict = "tied" if comparison.tied else "worse" if comparison.low > 0 else "better"
        if own.exact != reference.exact:
            verdict += " (bound vs exact)"
        row.update(vs_best=comparison.difference, ci_low=comparison.low, ci_high=comparison.high, verdict=verdict)
    return rows


def is_scored(row: dict[str, Any]) -> bool:
    """Whether a leaderboard row is a FINISHED trial with a finite ``best_valid_nll``."""
    return row["status"] == "FINISHED" and math.isfinite(row["best_valid_nll"])


def _rank(row: dict[str, Any]) -> tuple[bool, float]:
    scored = is_scored(row)
    return (not scored, row["best_valid_nll"] if scored else math.inf)
