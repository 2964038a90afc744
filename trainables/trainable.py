"""The Ray Tune function trainable: a thin adapter around :mod:`trainables.svi`.

One trial builds the family's model from the trial's hyperparameters, screens
``screen`` initialisations and trains the ``keep`` best together as one batched model
(one model each, an epoch each in turn, for a family with network weights), reports
after every epoch the metrics of the candidate the training objective prefers (with
``setup_s``, the seconds from the trial's start to its first SVI step, and
``peak_rss_mb``, the worker's peak memory), checkpoints every ``checkpoint_every`` epochs
and at the end, and resumes from ``tune.get_checkpoint()`` after a failure or an
interrupted sweep. With ``seeds: N`` a trial is N such members, seeded one after the
other, and reports their means (:func:`combined_metrics`).
"""

from __future__ import annotations

import math
import os
import resource
import signal
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from .checkpoint import TRIAL_STATE, save_checkpoint
from .alignment import decoded_states, restart_agreement
from .data import Dataset
from .held_out import HeldOutScores
from .models import MapModel, SequenceModel, build_model, family_class
from .settings import TrainConfig, TrainSettings
from .svi import Candidate, Trainer, engine_path, screen_initializations

FAULT_KEY = "_fault"  # test hook: {"kind": "raise" | "nan" | "kill", "epoch": E}


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a sweep shares; travels once through ``tune.with_parameters``."""

    family: str
    data: Dataset
    train: dict[str, Any]  # fixed TrainSettings fields
    screen: int = 1
    keep: int = 1
    checkpoint_every: int = 5
    seeds: int = 1  # outer seeds: members of one trial, each with its own restarts
    module: str | None = None  # the module that registers the family, imported in the worker


def split_config(setup: TrialSetup, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a trial's hyperparameters into model keyword arguments (``hidden_dim`` and
    the family's hyperparameters) and ``TrainSettings`` fields."""
    family = setup.family
    model_keys = set(family_class(family, setup.module).hyperparameters.model_fields)
    train_keys = set(TrainSettings.model_fields)
    unknown = sorted(set(config) - model_keys - train_keys - {FAULT_KEY})
    if unknown:
        raise ValueError(f"{family}: unknown trial hyperparameter(s) {unknown}")
    model_kwargs = {k: v for k, v in config.items() if k in model_keys}
    train_kwargs = {k: v for k, v in config.items() if k in train_keys}
    return model_kwargs, train_kwargs


def trial_device(gpus: float) -> str:
    """``cuda`` when Ray gave this trial a GPU (it sets ``CUDA_VISIBLE_DEVICES``), else ``cpu``."""
    if gpus <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"this trial was given {gpus} GPU by Ray but CUDA is not available on "
            f"{socket.gethostname()}: request gpu: 0 or run on a node with a CUDA device"
        )
    return "cuda"


def _inject_fault(fault: dict[str, Any] | None, epoch: int, restored: bool, trainer: Trainer) -> None:
    """Test hook: fail on purpose at ``fault["epoch"]`` (``kill`` only before any restore)."""
    if not fault or fault["epoch"] != epoch:
        return
    if fault["kind"] == "raise":
        raise RuntimeError(f"injected fault at epoch {epoch}")
    if fault["kind"] == "nan":
        with torch.no_grad():
            for parameter in trainer.learnable:
                parameter.fill_(math.nan)
    if fault["kind"] == "kill" and not restored:
        os.kill(os.getpid(), signal.SIGKILL)


class Trial:
    """The candidates of one trial and their reporting."""

    def __init__(self, config: dict[str, Any], setup: TrialSetup, saved: list[dict[str, Any]] | None = None) -> None:
        started = time.perf_counter()
        model_kwargs, train_kwargs = split_config(setup, config)
        resources = tune.get_context().get_trial_resources().required_resources
        self.config = TrainConfig(
            **{**setup.train, **train_kwargs},
            device=trial_device(resources.get("GPU", 0)),
            threads=max(1, int(resources.get("CPU", 1))),
        )
        self.setup = setup
        self.fault = config.get(FAULT_KEY)
        self.screening: list[float] = []
        self.trainers = self._trainers(model_kwargs)
        # every candidate as (trainer, index in that trainer)
        self.candidates = [(t, i) for t in self.trainers for i in range(len(t.candidates))]
        self.restored = saved is not None
        for trainer, state in zip(self.trainers, saved or []):
            trainer.load_state_dict(state)
        self._best_scores: tuple[tuple[int, int], tuple[dict[str, float], HeldOutScores]] | None = None
        first = self.trainers[0]
        self.engine = engine_path(first.model, first.splits["train"], first.device)
        self.setup_s = time.perf_counter() - started

    def _trainers(self, model_kwargs: dict[str, Any]) -> list[Trainer]:
        """One trainer for the ``keep`` best of ``screen`` draws, batched, or one per
        candidate for a family with network weights."""
        setup = self.setup

        def trainer(starts: Any) -> Trainer:
            model = build_model(setup.family, data_dim=setup.data.data_dim, **model_kwargs)
            return Trainer(model, setup.data, self.config, initial_parameters=starts)

        if setup.screen == 1 and setup.keep == 1:
            return [trainer(None)]
        model = build_model(setup.family, data_dim=setup.data.data_dim, **model_kwargs)
        if not isinstance(model, MapModel):
            raise ValueError(f"{setup.family}: restarts (best-of-N screening) need a MAP family")
        generator = torch.Generator().manual_seed(self.config.seed)
        losses, starts = screen_initializations(
            model, setup.data.splits["train"], setup.screen, generator, keep=setup.keep
        )
        self.screening = [loss for loss in losses.tolist() if math.isfinite(loss)]
        return [trainer(start) for start in starts] if model.network_parameters() else [trainer(starts)]

    @property
    def epoch(self) -> int:
        return max(trainer.epoch for trainer in self.trainers)

    def record(self, index: int) -> Candidate:
        """Candidate ``index``'s record."""
        trainer, local = self.candidates[index]
        return trainer.candidates[local]

    def chosen(self) -> int:
        """Index of the candidate the training objective prefers (lowest last train loss)."""
        return min(range(len(self.candidates)), key=lambda i: self.record(i).history[-1].train_loss)

    def best_scores(self, index: int) -> tuple[dict[str, float], HeldOutScores]:
        """Test NLL and K-selection figures of candidate ``index`` at its best epoch, and
        its held-out sequences' NLL (:meth:`Trainer.best_scores`, computed once per best)."""
        trainer, local = self.candidates[index]
        key = (index, self.record(index).best_epoch)
        if self._best_scores is None or self._best_scores[0] != key:
            self._best_scores = (key, trainer.best_scores(local))
        return self._best_scores[1]

    def metrics(self) -> dict[str, Any]:
        index = self.chosen()
        candidate = self.record(index)
        last = candidate.history[-1]
        metrics = {
            "epoch": self.epoch,
            "train_loss": last.train_loss,
            "valid_nll": last.valid_nll,
            "setup_s": self.setup_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "best_valid_nll": candidate.best_valid,
            "best_epoch": candidate.best_epoch,
            **self.best_scores(index)[0],
            "candidate": index,
            "node_id": ray.get_runtime_context().get_node_id(),
            "hostname": socket.gethostname(),
        }
        if self.engine:
            metrics["engine"] = self.engine
        if self.screening:
            metrics.update(screen_best=min(self.screening), screen_worst=max(self.screening))
        return metrics

    def best_model(self, index: int) -> SequenceModel:
        """Candidate ``index``'s model at its best epoch (a model of its own)."""
        model = build_model(**self.candidates[index][0].model.config)
        model.load_state_dict(self.record(index).best_state)
        return model.to(self.candidates[index][0].device)

    def stability(self) -> dict[str, float]:
        """``restart_ari``: how alike the kept restarts' Viterbi paths of the validation
        split are to the chosen one's, whatever their labels (the mean adjusted Rand index);
        nothing with one candidate or continuous latents."""
        if len(self.candidates) < 2 or self.trainers[0].model.latent == "continuous":
            return {}
        chosen, valid = self.chosen(), self.trainers[0].splits["valid"]  # on the trial's device
        order = [chosen, *(index for index in range(len(self.candidates)) if index != chosen)]
        return {"restart_ari": restart_agreement([decoded_states(self.best_model(index), valid) for index in order])}

    @property
    def done(self) -> bool:
        return all(trainer.done for trainer in self.trainers)

    def run_epoch(self) -> None:
        """An epoch of every candidate still training."""
        for trainer in self.trainers:
            if not trainer.done:
                _inject_fault(self.fault, trainer.epoch + 1, self.restored, trainer)
                trainer.run_epoch()

    def state(self) -> list[dict[str, Any]]:
        """Every trainer's state, to go on from (``saved``)."""
        return [trainer.state_dict() for trainer in self.trainers]

    def save(self, directory: str | Path) -> None:
        """The chosen candidate's best model as a plain checkpoint (``model.pt``,
        ``config.json``) with its held-out scores (``held_out.parquet``)."""
        index = self.chosen()
        candidate = self.record(index)
        save_checkpoint(self.best_model(index), directory, best_epoch=candidate.best_epoch, valid_nll=candidate.best_valid)
        self.best_scores(index)[1].write(directory)


def seed_directory(seed: int) -> str:
    """Where outer seed ``seed``'s model is in a trial checkpoint of ``seeds: N``."""
    return f"seed_{seed}"


def seed_key(seed: int, key: str) -> str:
    """Outer seed ``seed``'s metric ``key`` in a trial's result."""
    return f"{seed_directory(seed)}/{key}"


def combined_metrics(members: list[Trial]) -> dict[str, Any]:
    """The result of a trial of ``seeds: N`` (N members): every number the members share
    is their mean (what the searcher and ASHA see), ``seed_se`` is the standard error of
    ``best_valid_nll`` over the seeds, ``seeds`` is N, and each member's own numbers are
    there as ``seed_S/KEY``; words (node, engine) are the first member's."""
    each = [member.metrics() for member in members]
    metrics = dict(each[0])
    for key, value in each[0].items():
        if type(value) is float and all(key in m for m in each):
            metrics[key] = sum(m[key] for m in each) / len(each)
    best = [m["best_valid_nll"] for m in each]
    mean = sum(best) / len(best)
    metrics.update(seeds=len(each), seed_se=math.sqrt(sum((b - mean) ** 2 for b in best) / (len(best) - 1) / len(best)))
    for seed, own in enumerate(each):
        metrics.update({seed_key(seed, key): value for key, value in own.items() if isinstance(value, (int, float))})
    return metrics


def _saved_states() -> Any:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return torch.load(Path(directory) / TRIAL_STATE, weights_only=True, map_location="cpu")


def run_trial(config: dict[str, Any], setup: TrialSetup) -> None:
    """The function trainable: ``tune.with_parameters(run_trial, setup=...)``. A trial of
    ``seeds: N`` trains N members, seeded ``seed, seed + 1, ...``, an epoch each in turn,
    and reports :func:`combined_metrics`; its checkpoint holds the best member's model at
    the top and each member's under ``seed_S/``."""
    saved = _saved_states()
    if setup.seeds == 1:
        members = [Trial(config, setup, saved)]
    else:
        first = config.get("seed", setup.train.get("seed", 0))
        members = [
            Trial({**config, "seed": first + seed}, setup, saved[seed] if saved else None) for seed in range(setup.seeds)
        ]
    while not all(member.done for member in members):
        started = time.perf_counter()
        for member in members:
            if not member.done:
                member.run_epoch()
        finished = all(member.done for member in members)
        metrics = members[0].metrics() if len(members) == 1 else combined_metrics(members)
        metrics["epoch"] = max(member.epoch for member in members)
        metrics["epoch_s"] = time.perf_counter() - started
        if finished:
            metrics.update(members[0].stability() if len(members) == 1 else {})
        if not (finished or metrics["epoch"] % setup.checkpoint_every == 0):
            tune.report(metrics)
            continue
        with tempfile.TemporaryDirectory() as directory:
            states = members[0].state() if len(members) == 1 else [member.state() for member in members]
            torch.save(states, Path(directory) / TRIAL_STATE)
            best = min(members, key=lambda member: member.record(member.chosen()).best_valid)
            best.save(directory)
            if len(members) > 1:
                for seed, member in enumerate(members):
                    member.save(Path(directory) / seed_directory(seed))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
