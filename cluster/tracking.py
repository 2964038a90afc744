"""MLflow tracking of a running sweep, from the driver only, into the layout of
:mod:`cluster.mlflow_layout`.

A ``tune.Callback`` does all the logging in the driver, so the embedded SQLite store has a
single writer and a trial that is stopped or killed can never leave its run RUNNING: the
driver ends it FINISHED or FAILED with the error. :func:`finish_parent` and
:func:`interrupt_parent` end a sweep's runs.
"""

from __future__ import annotations

import csv
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag
from ray import tune

from trainables.data import Dataset, load_dataset
from trainables.checkpoint import load_checkpoint
from trainables.trainable import seed_directory, seed_key
from trainables.selection import SELECTION_METRICS, best_per_value, recommend

from .mlflow_layout import INTERRUPTED_TAG, TRIAL_TAG, SweepTracker, is_scored
from .plots import k_curve_png, loss_curve_png, model_picture_png, sweep_plot_png

__all__ = ["MLflowTrialLogger", "finish_parent", "interrupt_parent", "write_leaderboard_csv"]

EPOCH_METRICS = (
    "train_loss", "valid_nll", "epoch_s", "best_valid_nll", "test_nll", "screen_best", "screen_worst",
    "setup_s",  # trial start to its first SVI step
    "peak_rss_mb",  # the peak of the worker process (of every trial it ran: Tune reuses workers)
    *SELECTION_METRICS,  # at the best epoch, for choosing the number of states
    "restart_ari",  # at the end: the kept restarts' agreement (trainables.alignment.restart_agreement)
)  # fmt: skip
ERROR_TAG_LIMIT = 5000


def _trial_error(trial) -> str:
    if trial.error_file and Path(trial.error_file).exists():
        return Path(trial.error_file).read_text()
    return "the trial failed without an error file"


class MLflowTrialLogger(tune.Callback):
    """Logs every trial of a sweep into its child run, from the driver.

    Tune pickles its callbacks with the experiment state (for ``Tuner.restore``), so this
    holds only what it needs to reconnect: the MLflow client and the data set (for the
    model pictures) are made again on first use.
    """

    def __init__(
        self, tracking_uri: str, experiment: str, parent_run_id: str, fixed_params: dict[str, Any], data_spec: dict[str, Any]
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parent_run_id = parent_run_id
        self.fixed_params = fixed_params
        self.data_spec = data_spec
        self._cache: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}}

    @property
    def tracker(self) -> SweepTracker:
        if "tracker" not in self._cache:
            self._cache["tracker"] = SweepTracker(self.tracking_uri, self.experiment)
        return self._cache["tracker"]

    @property
    def data(self) -> Dataset:
        if "data" not in self._cache:
            self._cache["data"] = load_dataset(**self.data_spec)
        return self._cache["data"]

    def _run_id(self, trial) -> str:
        run_ids = self._cache.setdefault("run_ids", {})
        if trial.trial_id not in run_ids:
            run_ids[trial.trial_id] = self.tracker.child_for(
                self.parent_run_id, trial.trial_id, trial.config, self.fixed_params
            )
        return run_ids[trial.trial_id]

    def _seed_run_ids(self, trial) -> list[str]:
        """The seed runs of ``trial`` (``seeds: N``; none otherwise), member ``S`` seeded
        ``seed + S``."""
        seeds = self._cache.setdefault("seed_runs", {})
        if trial.trial_id not in seeds:
            first = trial.config.get("seed", self.fixed_params.get("seed", 0))
            seeds[trial.trial_id] = [
                self.tracker.seed_run_for(
                    self.parent_run_id, self._run_id(trial), trial.trial_id, seed, {**trial.config, "seed": first + seed}
                )
                for seed in range(self.seeds if self.seeds > 1 else 0)
            ]
        return seeds[trial.trial_id]

    @property
    def seeds(self) -> int:
        return int(self.fixed_params.get("seeds", 1))

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._run_id(trial)
        self._seed_run_ids(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        run_id = self._run_id(trial)
        step, now = int(result["epoch"]), int(time.time() * 1000)
        metrics = [Metric(k, float(result[k]), now, step) for k in (*EPOCH_METRICS, "seed_se") if k in result]
        metrics.append(Metric("epoch", float(step), now, step))
        tags = [RunTag("ray.node_id", str(result.get("node_id", ""))), RunTag("hostname", str(result.get("hostname", "")))]
        if "engine" in result:  # the engine's path: compiled, torch or scan (pyrosweep --engine)
            tags.append(RunTag("engine", str(result["engine"])))
        self.tracker.client.log_batch(run_id, metrics=metrics, tags=tags)
        for seed, seed_run in enumerate(self._seed_run_ids(trial)):
            own = [Metric(k, float(result[seed_key(seed, k)]), now, step) for k in EPOCH_METRICS if seed_key(seed, k) in result]
            self.tracker.client.log_batch(seed_run, metrics=[*own, Metric("epoch", float(step), now, step)])

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        client = self.tracker.client
        try:
            self._log_artifacts(run_id, trial)
        except Exception as error:  # the run still ends, with what went wrong
            client.set_tag(run_id, "artifact_error", f"{type(error).__name__}: {error}"[:ERROR_TAG_LIMIT])
        for seed_run in self._seed_run_ids(trial):
            client.set_terminated(seed_run, "FINISHED")
        client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        run_id = self._run_id(trial)
        error = _trial_error(trial)
        for failed in (*self._seed_run_ids(trial), run_id):
            self.tracker.client.set_tag(failed, "error", error[-ERROR_TAG_LIMIT:])
            self.tracker.client.set_terminated(failed, "FAILED")
        self.tracker.client.log_text(run_id, error, "error.txt")

    def _log_artifacts(self, run_id: str, trial) -> None:
        client = self.tracker.client
        client.log_dict(run_id, trial.config, "trial_config.json")
        with tempfile.TemporaryDirectory() as scratch:
            history = self._history(run_id)
            client.log_artifact(run_id, str(loss_curve_png(history, Path(scratch) / "loss_curve.png")))
            if trial.checkpoint is None:
                return
            with trial.checkpoint.as_directory() as directory:
                for path in sorted(Path(directory).iterdir()):  # the best member's; each seed's goes to its run
                    if path.is_file():
                        client.log_artifact(run_id, str(path), "checkpoint")
                for seed, seed_run in enumerate(self._seed_run_ids(trial)):
                    client.log_artifacts(seed_run, str(Path(directory) / seed_directory(seed)), "checkpoint")
                model = load_checkpoint(directory)
            picture = model_picture_png(model, self.data.splits["valid"], Path(scratch) / "model.png")
            client.log_artifact(run_id, str(picture))

    def _history(self, run_id: str) -> list[dict[str, float]]:
        client = self.tracker.client
        series = {key: client.get_metric_history(run_id, key) for key in ("train_loss", "valid_nll")}
        by_epoch: dict[int, dict[str, float]] = {}
        for key, points in series.items():
            for point in points:
                by_epoch.setdefault(point.step, {"epoch": point.step})[key] = point.value
        return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def write_leaderboard_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def interrupt_parent(tracker: SweepTracker, parent_run_id: str, reason: str) -> None:
    """End an interrupted sweep's runs FAILED with ``reason`` (``--resume`` reopens them)."""
    client = tracker.client
    for run in [*tracker.seed_runs(parent_run_id), *tracker.children(parent_run_id), client.get_run(parent_run_id)]:
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, INTERRUPTED_TAG, reason)
            client.set_terminated(run.info.run_id, "FAILED")


def finish_parent(
    tracker: SweepTracker, parent_run_id: str, searched: list[str], trial_errors: dict[str, str]
) -> list[dict[str, Any]]:
    """End the sweep: every child ends FINISHED or FAILED (whatever happened to the driver
    before), the parent gets the leaderboard CSV, the search plot and the best trial."""
    client = tracker.client
    for run in [*tracker.seed_runs(parent_run_id), *tracker.children(parent_run_id)]:
        if run.info.status == "RUNNING":
            error = trial_errors.get(run.data.tags.get(TRIAL_TAG, ""))
            if error:
                client.set_tag(run.info.run_id, "error", error[-ERROR_TAG_LIMIT:])
            client.set_terminated(run.info.run_id, "FAILED" if error else "FINISHED")
    rows = tracker.leaderboard(parent_run_id, searched)
    with tempfile.TemporaryDirectory() as scratch:
        client.log_artifact(parent_run_id, str(write_leaderboard_csv(rows, Path(scratch) / "leaderboard.csv")))
        plot_rows = [{**row, "valid_nll": row["best_valid_nll"]} for row in rows]
        client.log_artifact(parent_run_id, str(sweep_plot_png(plot_rows, searched, "valid_nll", Path(scratch) / "search.png")))
        if "hidden_dim" in searched:
            _log_k_selection(client, parent_run_id, rows, Path(scratch))
    best = rows[0] if rows and is_scored(rows[0]) else None
    if best is not None:
        client.log_batch(
            parent_run_id,
            metrics=[
                Metric("best_valid_nll", best["best_valid_nll"], int(time.time() * 1000), 0),
                Metric("best_test_nll", best["test_nll"], int(time.time() * 1000), 0),
            ],
            tags=[RunTag("best_trial_id", best["trial"]), RunTag("best_run_id", best["run_id"])],
        )
    client.set_terminated(parent_run_id, "FINISHED")
    return rows


def _log_k_selection(client, parent_run_id: str, rows: list[dict[str, Any]], scratch: Path) -> None:
    """A sweep over ``hidden_dim``: the best trial per number of states (``k_selection.csv``),
    their curves (``k_curve.png``) and the one-standard-error pick (tag and metric
    ``recommended_hidden_dim``)."""
    per_k = best_per_value(rows, "hidden_dim")
    recommended = recommend(per_k)
    if per_k:
        client.log_artifact(parent_run_id, str(write_leaderboard_csv(per_k, scratch / "k_selection.csv")))
    client.log_artifact(parent_run_id, str(k_curve_png(per_k, recommended, scratch / "k_curve.png")))
    if recommended is not None:
        client.set_tag(parent_run_id, "recommended_hidden_dim", str(recommended["hidden_dim"]))
        client.log_metric(parent_run_id, "recommended_hidden_dim", float(recommended["hidden_dim"]))
