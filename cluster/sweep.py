"""Launch (or resume) a sweep: a Ray Tune ``Tuner`` over ``trainables.trainable`` with
MLflow tracking from the driver.

State for ``--resume`` lives next to the Tune storage: ``{storage}/{name}.sweep.json``
names the latest run directory of the sweep and its MLflow parent run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from trainables.data import load_dataset
from trainables.trainable import TrialSetup, run_trial

from .home import storage_path, tracking_uri
from .sweep_file import SweepSpec, num_trials, param_space, searched_keys
from .tracking import MLflowTrialLogger, SweepTracker, finish_parent, interrupt_parent


@dataclass
class SweepOutcome:
    """What a finished sweep found; ``leaderboard`` is best first."""

    experiment: str
    parent_run_id: str
    tracking_uri: str
    leaderboard: list[dict[str, Any]]
    seconds: float

    @property
    def best(self) -> dict[str, Any] | None:
        first = self.leaderboard[0] if self.leaderboard else None
        return first if first and first["status"] == "FINISHED" else None


def _state_file(storage: str, name: str) -> Path:
    return Path(storage) / f"{name}.sweep.json"


def _scheduler(spec: SweepSpec):
    if spec.scheduler.type == "asha":
        return ASHAScheduler(
            time_attr="epoch",
            max_t=spec.train.epochs,
            grace_period=spec.scheduler.grace_period,
            reduction_factor=spec.scheduler.reduction_factor,
        )
    return FIFOScheduler()


def _search_alg(spec: SweepSpec):
    if spec.search_alg.type == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=spec.search_alg.seed)
    return None


def _trainable(spec: SweepSpec, setup: TrialSetup):
    """The trial function with the sweep's data and resources (a new wrapper each call:
    ``tune.with_resources`` sets an attribute on the function it is given)."""
    resources = {"cpu": spec.resources.cpu, "gpu": spec.resources.gpu}
    return tune.with_resources(tune.with_parameters(run_trial, setup=setup), resources)


def fixed_params(spec: SweepSpec) -> dict[str, Any]:
    """Everything a trial's hyperparameters do not say: logged on every child run."""
    return {
        "model": spec.model,
        "data": json.dumps(spec.data, sort_keys=True),
        **spec.train.model_dump(),
        "restarts_screen": spec.restarts.screen,
        "restarts_keep": spec.restarts.keep,
        "resources_cpu": spec.resources.cpu,
        "resources_gpu": spec.resources.gpu,
    }


def run_sweep(
    spec: SweepSpec,
    *,
    address: str | None = None,
    tracking: str | None = None,
    storage: str | None = None,
    resume: bool = False,
    extra_space: dict[str, Any] | None = None,
) -> SweepOutcome:
    """Run ``spec`` on a local Ray (started and stopped here) or the cluster at
    ``address``; with ``resume``, finish the sweep's latest interrupted run instead.
    ``extra_space`` adds keys to every trial's config (tests inject faults with it)."""
    started = time.perf_counter()
    uri, storage = tracking_uri(tracking), storage_path(storage)
    state_file = _state_file(storage, spec.name)
    data = load_dataset(**spec.data)
    tracker = SweepTracker(uri, spec.name)
    if resume:
        if not state_file.exists():
            raise RuntimeError(f"nothing to resume: no sweep named {spec.name!r} under {storage}")
        state = json.loads(state_file.read_text())
        if state["finished"]:
            raise RuntimeError(f"nothing to resume: the last {spec.name!r} sweep ({state['run_name']}) finished")
        tracker.reopen(tracker.client.get_run(state["parent_run_id"]))
    else:
        run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        parent = tracker.start_parent(run_name, {**fixed_params(spec), "search_space": json.dumps(spec.search)}, Path(spec.source))
        state = {"run_name": run_name, "parent_run_id": parent, "finished": False}
        state_file.write_text(json.dumps(state))
    setup = TrialSetup(
        family=spec.model,
        data=data,
        train=spec.train.model_dump(),
        screen=spec.restarts.screen,
        keep=spec.restarts.keep,
        checkpoint_every=spec.checkpoint_every,
    )
    trainable = _trainable(spec, setup)
    own_ray = not ray.is_initialized()
    if own_ray:
        ray.init(address=address, include_dashboard=False, configure_logging=False)
    try:
        run_dir = Path(storage) / state["run_name"]
        if resume:
            tuner = tune.Tuner.restore(str(run_dir), trainable, resume_unfinished=True, resume_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={**param_space(spec), **(extra_space or {})},
                tune_config=tune.TuneConfig(
                    metric=spec.metric,
                    mode="min",
                    num_samples=spec.num_samples,
                    scheduler=_scheduler(spec),
                    search_alg=_search_alg(spec),
                    max_concurrent_trials=spec.max_concurrent,
                ),
                run_config=tune.RunConfig(
                    name=state["run_name"],
                    storage_path=storage,
                    # restored with the experiment on --resume
                    callbacks=[
                        MLflowTrialLogger(uri, spec.name, state["parent_run_id"], fixed_params(spec), spec.data)
                    ],
                    failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                ),
            )
        results = tuner.fit()
    finally:
        if own_ray:
            ray.shutdown()
    # After Ctrl-C, Tune returns with trials cut short (their last result is not ``done``)
    # or never started.
    cut_short = sum(1 for result in results if result.error is None and not result.metrics.get("done"))
    unfinished = cut_short + max(0, num_trials(spec) - len(results))
    if unfinished:
        reason = f"interrupted with {unfinished} trial(s) unfinished: pyrosweep sweep {spec.source} --resume"
        interrupt_parent(tracker, state["parent_run_id"], reason)
        raise RuntimeError(f"sweep {spec.name} {reason}")
    errors = {
        result.metrics.get("trial_id", ""): str(result.error)
        for result in results
        if result.error is not None
    }
    leaderboard = finish_parent(tracker, state["parent_run_id"], searched_keys(spec), errors)
    state_file.write_text(json.dumps({**state, "finished": True}))
    return SweepOutcome(spec.name, state["parent_run_id"], uri, leaderboard, time.perf_counter() - started)
