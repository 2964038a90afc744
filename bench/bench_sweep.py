"""Sweep efficiency: the same trials with 2 running at once on 2 cores against one after
another, and what a trial costs before its first SVI step.

Four ``hmm`` trials on ``jsb`` (K=16, 300 epochs, 1 CPU each, seeds 0-3), the trainable a
sweep runs (``tune.with_parameters(run_trial)`` with its resources) on one local Ray,
under a ``Tuner`` with ``max_concurrent_trials`` 1 and then 2 (worker processes reused
between trials, as ``pyrosweep sweep`` does; the MLflow logging
callback of ``pyrosweep sweep`` is left out: it runs in the driver). Efficiency is the
speed-up over the ideal 2: ``serial / (2 * parallel)`` of the ``Tuner.fit`` wall times.
Also each trial's own run time (Tune's ``time_total_s``) alone and two at once, and the
ceiling without Ray: the same training in two plain processes at once against one.
Overheads: each trial's own ``setup_s`` (from entering ``Trial`` to its first SVI step:
building the model, screening, restoring) and the launch cost per trial, the serial wall
time less the trials' own run times, over the number of trials.
"""

from __future__ import annotations

import multiprocessing
import tempfile
import time

import ray
from common import machine, setup_threads
from ray import tune

from trainables.data import load_dataset
from trainables.trainable import TrialSetup, run_trial

# trials of ~15 s each, as in a real sweep: with 3-s trials (60 epochs) Tune's fixed cost
# per trial weighs in (measured 70% efficiency); lr 0.01 as lr 0.05 diverges by epoch ~84
TRIALS, EPOCHS, LR = 4, 300, 0.01


def sweep(setup: TrialSetup, concurrent: int, storage: str) -> tuple[float, list[dict]]:
    """Wall seconds of ``Tuner.fit`` and every trial's last result."""
    trainable = tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 1, "gpu": 0})
    tuner = tune.Tuner(
        trainable,
        param_space={"hidden_dim": 16, "lr": LR, "seed": tune.grid_search(list(range(TRIALS)))},
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, reuse_actors=True),  # as cluster/sweep.py
        run_config=tune.RunConfig(name=f"bench-{concurrent}", storage_path=storage, verbose=0),
    )
    started = time.perf_counter()
    results = tuner.fit()
    seconds = time.perf_counter() - started
    if results.errors:
        raise RuntimeError(f"trials failed: {results.errors}")
    return seconds, [result.metrics for result in results]


def train_plainly(_: int) -> float:
    """One trial's training without Ray (a fresh process): seconds."""
    from trainables.models import build_model
    from trainables.settings import TrainConfig
    from trainables.svi import train

    data = load_dataset("jsb")
    started = time.perf_counter()
    train(build_model("hmm", data_dim=88, hidden_dim=16), data, TrainConfig(epochs=EPOCHS, lr=LR, patience=None))
    return time.perf_counter() - started


def plain_efficiency() -> float:
    """Two plain processes training at once against one: ``alone / together``."""
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        alone = min(pool.map(train_plainly, [0]) + pool.map(train_plainly, [1]))
        together = max(pool.map(train_plainly, [0, 1]))
    return alone / together


def main() -> None:
    setup_threads()
    plain = plain_efficiency()
    data = load_dataset("jsb")
    setup = TrialSetup("hmm", data, {"epochs": EPOCHS, "batch_size": 20, "patience": None})
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            sweep(setup, 2, storage)  # warm-up: worker processes and imports
            serial, serial_results = sweep(setup, 1, storage)
            parallel, parallel_results = sweep(setup, 2, storage)
    finally:
        ray.shutdown()
    launch = (serial - sum(r["time_total_s"] for r in serial_results)) / TRIALS
    alone, shared = (sum(r["time_total_s"] for r in results) / TRIALS for results in (serial_results, parallel_results))
    setup_s = [r["setup_s"] for r in serial_results + parallel_results]
    print(machine())
    print(f"{TRIALS} hmm trials on jsb, K=16, {EPOCHS} epochs, 1 CPU each, on {ray.__version__} Ray")
    print(f"one after another {serial:.1f} s, 2 at once {parallel:.1f} s: speed-up {serial / parallel:.2f}x, "
          f"efficiency {serial / (2 * parallel):.0%} (two plain processes without Ray: {plain:.0%})")
    print(f"per trial: setup (Trial start to first SVI step) {min(setup_s) * 1e3:.0f}-{max(setup_s) * 1e3:.0f} ms, "
          f"launch by Tune {launch:.2f} s; a trial's own run time {alone:.1f} s alone, {shared:.1f} s two at once")


if __name__ == "__main__":
    main()
