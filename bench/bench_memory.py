"""Peak memory (RSS) of one ``hmm`` trial on ``jsb`` at K=64, against the 2 GiB target.

Two measurements: a fresh process that loads the data and runs ``Trainer`` for a few
epochs (its peak RSS as the parent sees it; next to it, a process that only imports the
same modules), and one real Tune trial on a local Ray, whose worker reports its own peak
RSS as the ``peak_rss_mb`` metric. Prints the figures and the machine.
"""

from __future__ import annotations

import multiprocessing
import resource
import tempfile

import ray
from common import machine, setup_threads
from ray import tune

HIDDEN_DIM, EPOCHS = 64, 5
TRAIN = {"epochs": EPOCHS, "batch_size": 20, "patience": None}


def import_only() -> None:
    import trainables.svi  # noqa: F401


def train_directly() -> None:
    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.settings import TrainConfig
    from trainables.svi import train

    data = load_dataset("jsb")
    train(build_model("hmm", data_dim=88, hidden_dim=HIDDEN_DIM), data, TrainConfig(lr=0.05, **TRAIN))


def peak_mb_of(target) -> float:
    """Peak RSS in MiB of a fresh (spawned) process running ``target``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    process = multiprocessing.get_context("spawn").Process(target=target)
    process.start()
    process.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if process.exitcode != 0 or after <= before:
        raise RuntimeError(f"the measured process failed or was not the largest child ({process.exitcode})")
    return after / 1024


def tune_trial_peak_mb() -> float:
    from trainables.data import load_dataset
    from trainables.trainable import TrialSetup, run_trial

    setup = TrialSetup("hmm", load_dataset("jsb"), TRAIN)
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as storage:
            tuner = tune.Tuner(
                tune.with_resources(tune.with_parameters(run_trial, setup=setup), {"cpu": 1, "gpu": 0}),
                param_space={"hidden_dim": HIDDEN_DIM, "lr": 0.05, "seed": 0},
                run_config=tune.RunConfig(name="bench-memory", storage_path=storage, verbose=0),
            )
            (result,) = tuner.fit()
    finally:
        ray.shutdown()
    return result.metrics["peak_rss_mb"]


def main() -> None:
    setup_threads()
    baseline = peak_mb_of(import_only)
    direct = peak_mb_of(train_directly)
    trial = tune_trial_peak_mb()
    print(machine())
    print(f"hmm K={HIDDEN_DIM} on jsb, batch 20, {EPOCHS} epochs with validation and test NLL")
    print(f"peak RSS: Trainer in a fresh process {direct:.0f} MiB (importing the modules alone: {baseline:.0f} MiB); "
          f"one Tune trial's worker {trial:.0f} MiB; target < 2048 MiB")


if __name__ == "__main__":
    main()
