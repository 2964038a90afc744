"""Launch (or resume) a sweep: a Ray Tune ``Tuner`` over ``trainables.trainable`` with
MLflow tracking from the driver.

State for ``--resume`` lives next to the Tune storage: ``{storage}/{name}.sweep.json``
names the latest run directory of the sweep and its MLflow parent run. Storage may be a
local path, a shared mount or an ``s3://`` / ``gs://`` URI; on a cluster, every node must
see it (checked before the first trial).
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
from trainables.models import FAMILIES
from trainables.svi import check_observations
from trainables.trainable import TrialSetup, run_trial

from . import storage as shared_storage
from .home import storage_path, tracking_uri
from .mlflow_layout import SweepTracker
from .progress import SweepView
from .remote import controller_node, is_client, on_node, ray_session
from .sweep_file import SweepSpec, num_trials, param_space, searched_keys
from .tracking import MLflowTrialLogger, finish_parent, interrupt_parent


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


def _state_name(spec: SweepSpec) -> str:
    return f"{spec.name}.sweep.json"


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
    """Everything a trial's hyperparameters do not say, logged on every child run: the
    family's declared hyperparameters at their defaults where the sweep leaves them out,
    the training settings, restarts, outer seeds and resources."""
    declared = FAMILIES[spec.model].hyperparameters.model_fields
    return {
        "model": spec.model,
        "data": json.dumps(spec.data, sort_keys=True),
        **{name: field.default for name, field in declared.items() if name not in spec.search},
        **spec.train.model_dump(),
        "restarts_screen": spec.restarts.screen,
        "restarts_keep": spec.restarts.keep,
        "seeds": spec.seeds,
        "resources_cpu": spec.resources.cpu,
        "resources_gpu": spec.resources.gpu,
    }


def _interrupted_state(spec: SweepSpec, storage: str) -> dict[str, Any]:
    """The saved state of the sweep's interrupted last run, for ``--resume``."""
    saved = shared_storage.read_text(storage, _state_name(spec))
    if saved is None:
        raise RuntimeError(f"nothing to resume: no sweep named {spec.name!r} under {storage}")
    state = json.loads(saved)
    if state["finished"]:
        raise RuntimeError(f"nothing to resume: the last {spec.name!r} sweep ({state['run_name']}) finished")
    return state


def _open_sweep(
    spec: SweepSpec, tracker: SweepTracker, storage: str, sweep_file: Path, resumed: dict[str, Any] | None
) -> dict[str, Any]:
    """The sweep's state (``run_name``, ``parent_run_id``, ``finished``): the ``resumed``
    one with its MLflow parent run reopened, or a new parent run (which stores ``spec``)."""
    if resumed is not None:
        tracker.reopen(tracker.client.get_run(resumed["parent_run_id"]))
        return resumed
    run_name = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    params = {**fixed_params(spec), "search_space": json.dumps(spec.search)}
    parent = tracker.start_parent(run_name, spec, params, sweep_file)
    state = {"run_name": run_name, "parent_run_id": parent, "finished": False}
    shared_storage.write_text(storage, _state_name(spec), json.dumps(state))
    return state


@dataclass
class FitOutcome:
    """What the driver needs of Tune's results: trials left unfinished (Ctrl-C) and the
    error of each failed trial by trial id."""

    unfinished: int
    errors: dict[str, str]


def _fit(
    spec: SweepSpec,
    setup: TrialSetup,
    uri: str,
    storage: str,
    state: dict[str, Any],
    resume: bool,
    extra_space: dict[str, Any] | None,
) -> FitOutcome:
    """Run (or restore and finish) the sweep's Tuner on the Ray this process is in."""
    trainable = _trainable(spec, setup)
    run_dir = shared_storage.join(storage, state["run_name"])
    if resume:
        tuner = tune.Tuner.restore(run_dir, trainable, resume_unfinished=True, resume_errored=False)
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
                reuse_actors=True,  # a new worker process per trial cost ~3.7 s of imports
            ),
            run_config=tune.RunConfig(
                name=state["run_name"],
                storage_path=storage,
                # both restored with the experiment on --resume
                callbacks=[
                    MLflowTrialLogger(uri, spec.name, state["parent_run_id"], fixed_params(spec), spec.data),
                    SweepView(searched_keys(spec)),
                ],
                verbose=0,  # SweepView reports instead of Tune's status tables
                failure_config=tune.FailureConfig(max_failures=spec.max_failures),
                # 5 kept: Tune snapshots its state whenever a trial has written num_to_keep
                # checkpoints since the last; with 2, fast trials snapshotted all the time
                # and a resume once found its checkpoint already deleted
                checkpoint_config=tune.CheckpointConfig(num_to_keep=5),
            ),
        )
    results = tuner.fit()
    # After Ctrl-C, Tune returns with trials cut short (their last result is not ``done``)
    # or never started.
    cut_short = sum(1 for result in results if result.error is None and not result.metrics.get("done"))
    return FitOutcome(
        unfinished=cut_short + max(0, num_trials(spec) - len(results)),
        errors={
            result.metrics.get("trial_id", ""): str(result.error) for result in results if result.error is not None
        },
    )


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
    resumed = _interrupted_state(spec, storage) if resume else None
    sweep_file = Path(spec.source).absolute()  # before ray.init: a Ray Job's driver changes directory
    data = load_dataset(**spec.data)
    for split_name, split in data.splits.items():  # values the family cannot score: refused before Ray starts
        check_observations(FAMILIES[spec.model], split, split_name)
    setup = TrialSetup(
        family=spec.model,
        data=data,
        train=spec.train.model_dump(),
        screen=spec.restarts.screen,
        keep=spec.restarts.keep,
        checkpoint_every=spec.checkpoint_every,
        seeds=spec.seeds,
        module=FAMILIES[spec.model].__module__,
    )
    tracker = SweepTracker(uri, spec.name)
    with ray_session(address, uri):
        if shared_storage.needs_check(storage):  # before any run is opened
            shared_storage.check_shared(storage, controller_node(is_client(address)))
        state = _open_sweep(spec, tracker, storage, sweep_file, resumed)
        arguments = (spec, setup, uri, storage, state, resume, extra_space)
        if is_client(address):  # Tune's own Ray Client mode loses tune.with_parameters data
            outcome = ray.get(on_node(controller_node(client=True), _fit).remote(*arguments))
        else:
            outcome = _fit(*arguments)
    if outcome.unfinished:
        reason = f"interrupted with {outcome.unfinished} trial(s) unfinished: pyrosweep sweep {spec.source} --resume"
        interrupt_parent(tracker, state["parent_run_id"], reason)
        raise RuntimeError(f"sweep {spec.name} {reason}")
    leaderboard = finish_parent(tracker, state["parent_run_id"], searched_keys(spec), outcome.errors)
    shared_storage.write_text(storage, _state_name(spec), json.dumps({**state, "finished": True}))
    return SweepOutcome(spec.name, state["parent_run_id"], uri, leaderboard, time.perf_counter() - started)
