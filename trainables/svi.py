"""The one SVI training loop for every family, and best-of-N initialisation screening.

``train`` runs minibatch SVI (``Trace_ELBO``'s loss, computed directly for the MAP
families, whose discrete states the engine sums out exactly) with ``ClippedAdam`` and a
per-step learning rate decay, evaluates the validation NLL per frame after every epoch,
stops early after ``patience`` epochs without improvement and ends on the best epoch's
parameters. ``Trainer`` also trains several restarts of a MAP family as one batched
model.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyro
import torch

from . import inference, selection
from .data import Dataset, Split
from .held_out import HELD_OUT_SPLITS, HeldOutScores
from .models import MapModel, SequenceModel
from .models.contract import observation_problem
from .models.counting import free_parameters
from .models.missing import start_frames
from .settings import TrainConfig

@dataclass
class EpochRecord:
    """What one epoch measured; ``valid_nll`` and ``train_loss`` are nats per frame."""

    epoch: int
    train_loss: float
    valid_nll: float
    epoch_s: float


@dataclass
class TrainResult:
    history: list[EpochRecord]
    best_epoch: int
    best_valid_nll: float
    test_nll: float
    screening_losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ClippedAdam:
    """Pyro's ``ClippedAdam`` for a list of tensors, with the same arithmetic (the tests
    hold the two equal): every step multiplies the learning rate by ``lrd``, clamps each
    gradient elementwise to ``[-clip_norm, clip_norm]`` and takes an Adam step. Not a
    ``torch.optim.Optimizer``: the first use of one imports ``torch._dynamo``, measured at
    1.0-1.7 s of every trial's start here."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: float,
        betas: tuple[float, float],
        clip_norm: float,
        lrd: float,
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.clip_norm, self.lrd, self.eps = lr, betas, clip_norm, lrd, eps
        self.steps = [0] * len(self.params)  # per tensor, counted when it has a gradient
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.lr *= self.lrd
        beta1, beta2 = self.betas
        for index, (param, exp_avg, exp_avg_sq) in enumerate(zip(self.params, self.exp_avg, self.exp_avg_sq)):
            if param.grad is None:
                continue
            grad = param.grad.clamp_(-self.clip_norm, self.clip_norm)
            self.steps[index] += 1
            exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = self.steps[index]
            step_size = self.lr * math.sqrt(1 - beta2**step) / (1 - beta1**step)
            param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(self.eps), value=-step_size)

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "steps": list(self.steps), "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lr, self.steps = state["lr"], list(state["steps"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)


def engine_path(model, split: Split, device: torch.device) -> str | None:
    """The path of the exact engine (:func:`trainables.inference.path`) training ``model``
    on ``split`` takes on ``device``: by the family's state space and the longest
    sequence; ``None`` for a family without the recursions (``gmm``, ``dmm``)."""
    if not hasattr(model, "state_labels") or split.lengths is None:
        return None
    return inference.path(device, len(model.state_labels()), int(split.x.shape[1]))


def check_observations(model: SequenceModel | type[SequenceModel], split: Split, name: str) -> None:
    """Refuse a split whose real frames the family (a model, or its class: the check reads
    only class attributes) cannot score (counts that are not non-negative integers,
    frames that are not one-hot, missing values where the family takes none, ...),
    naming the first place."""
    real = None if split.lengths is None else inference.frame_mask(split.lengths, split.x.shape[1]).cpu().numpy()
    problem = observation_problem(split.x.detach().cpu().double().numpy(), model.observation, real, model.missing_values)
    if problem is not None:
        raise ValueError(f"{model.family}: the {name} split's x{problem}")


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; asking for CUDA where there is none is an error."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def num_frames(split: Split) -> int:
    """Real (unpadded) frames of a split; points count one each."""
    return int(split.lengths.sum()) if split.lengths is not None else split.x.shape[0]


def frame_counts(split: Split) -> list[int]:
    """Each sequence's real frames (one per point)."""
    return split.lengths.tolist() if split.lengths is not None else [1] * split.x.shape[0]


def batches(split: Split, batch_size: int, generator: torch.Generator | None = None):
    """Yield ``(x, lengths)`` minibatches, shuffled by ``generator`` when given, each
    trimmed to its longest sequence."""
    count = split.x.shape[0]
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, batch_size):
        index = order[start : start + batch_size].to(split.x.device)
        if split.lengths is None:
            yield split.x[index], None
        else:
            lengths = split.lengths[index]
            yield split.x[index, : int(lengths.max())], lengths


@torch.no_grad()
def split_nll(
    log_likelihood: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    split: Split,
    batch_size: int = 64,
) -> torch.Tensor:
    """``(...)`` negative log-likelihood in nats per frame of a whole split (float64), for
    ``log_likelihood(x, lengths)`` ``(..., N)``: one figure per candidate of a batch."""
    total = sum(log_likelihood(x, lengths).sum(-1).double() for x, lengths in batches(split, batch_size))
    return -total / num_frames(split)


@torch.no_grad()
def sequence_log_likelihoods(model: SequenceModel, split: Split, batch_size: int = 64) -> torch.Tensor:
    """``(N,)`` each sequence's (or point's) log-likelihood, float64, in the split's order."""
    return torch.cat([model.log_likelihood(x, lengths).double() for x, lengths in batches(split, batch_size)])


def evaluate_nll(model: SequenceModel, split: Split, batch_size: int = 64) -> float:
    """Negative log-likelihood in nats per frame of a whole split."""
    return float(split_nll(model.log_likelihood, split, batch_size))


def held_out_scores(model: SequenceModel, splits: dict[str, Split]) -> HeldOutScores:
    """Each validation and test sequence's NLL under ``model``, with the splits'
    fingerprints and whether the numbers are exact."""
    return HeldOutScores(
        nll={name: (-sequence_log_likelihoods(model, splits[name])).cpu().numpy() for name in HELD_OUT_SPLITS},
        frames={name: np.asarray(frame_counts(splits[name]), dtype=np.int64) for name in HELD_OUT_SPLITS},
        fingerprints={name: splits[name].fingerprint for name in HELD_OUT_SPLITS},
        exact=model.exact,
    )


@torch.no_grad()
def screen_initializations(
    model: MapModel,
    split: Split,
    num: int,
    generator: torch.Generator,
    keep: int = 1,
    chunk: int = 16,
) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    """Best-of-``num`` initialisation, as the GMM tutorial's 100-seed search: draw ``num``
    random initialisations and score each by the training objective (negative log prior
    plus negative log-likelihood of the whole split), batched ``chunk`` at a time through
    the family's batched likelihood. The model itself is left as it was.

    :returns: ``(num,)`` the loss of every draw, and the ``keep`` best draws, best first.
    """
    frames = start_frames(split.x.cpu(), _cpu(split.lengths))
    draws = [model.init_parameters(frames, _cpu(split.lengths), generator) for _ in range(num)]
    dtype, device = model._anchor.dtype, model._anchor.device
    losses = []
    for start in range(0, num, chunk):
        group = draws[start : start + chunk]
        params = {
            name: torch.stack([draw[name] for draw in group]).to(device, dtype) for name in group[0]
        }
        losses.append(model.training_loss_of(params, split.x, split.lengths))
    losses = torch.cat(losses).cpu()
    order = torch.nan_to_num(losses, nan=math.inf).argsort()[:keep]
    return losses, [draws[int(i)] for i in order]


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def _to(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), None if split.lengths is None else split.lengths.to(device))


@dataclass
class Candidate:
    """What a trainer records of one candidate: its epochs, and its best validation NLL so
    far with the epoch and the model's state dict there."""

    history: list[EpochRecord] = field(default_factory=list)
    best_valid: float = math.inf
    best_epoch: int = 0
    best_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.history)

    def done(self, config: TrainConfig) -> bool:
        patience = config.patience
        out_of_patience = patience is not None and self.epoch - self.best_epoch >= patience
        return self.epoch >= config.epochs or (self.epoch > 0 and out_of_patience) or self.converged(config)

    def converged(self, config: TrainConfig) -> bool:
        """EM: the last iteration changed the objective by less than ``tolerance``, relatively."""
        if config.method != "em" or len(self.history) < 2:
            return False
        before, after = self.history[-2].train_loss, self.history[-1].train_loss
        return abs(before - after) <= config.tolerance * abs(before)

    def state_dict(self) -> dict[str, Any]:
        return {**asdict(self), "history": [asdict(record) for record in self.history]}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Candidate:
        return cls(**{**state, "history": [EpochRecord(**record) for record in state["history"]]})


class Trainer:
    """SVI on one model, an epoch at a time, with a state that can be saved and resumed.

    A MAP family starts from ``initial_parameters`` if given, else from the best of
    ``config.screen`` random initialisations drawn from the training data. Given a list of
    ``R`` starts it trains ``R`` candidates (restarts) as one batched model: their
    unconstrained parameters stacked ``(R, ...)`` and the loss the sum of theirs. Every
    candidate sees the same minibatches and ``ClippedAdam`` clips and steps elementwise,
    so each follows the trajectory it would alone (the tests hold them equal) for about the
    cost of one run. Each keeps its own record and early stopping in ``candidates``; the
    record of one that has stopped is frozen while the others go on (its parameters still
    move, unused), and the trainer is done when all are. MAP families train on these
    stacked tensors even alone (``R = 1``); after every epoch ``model`` holds the first
    candidate's current parameters.
    """

    def __init__(
        self,
        model: SequenceModel,
        data: Dataset,
        config: TrainConfig,
        initial_parameters: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]] | None = None,
    ) -> None:
        if config.method == "em" and not type(model).supports_em():
            raise ValueError(f"{model.family}: EM is not available for this family; use method: svi")
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        pyro.set_rng_seed(config.seed)
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.config = config
        for name, split in data.splits.items():
            check_observations(model, split, name)
        self.splits = {name: _to(split, self.device) for name, split in data.splits.items()}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.screening: list[float] = []
        # unconstrained MAP parameters (R, ...) of the candidates; empty for other families
        self.stacked: dict[str, torch.Tensor] = {}
        count = 1
        if isinstance(model, MapModel):
            if initial_parameters is None:
                losses, initial_parameters = screen_initializations(
                    model, self.splits["train"], config.screen, self.generator
                )
                self.screening = losses.tolist()
            starts = [initial_parameters] if isinstance(initial_parameters, dict) else initial_parameters
            if len(starts) > 1 and model.network_parameters():
                raise ValueError(f"{model.family}: restarts would share its network weights; train them one each")
            self.stacked, count = self._stack(starts), len(starts)
            self.learnable = [*self.stacked.values(), *model.network_parameters()]
        elif config.screen > 1 or initial_parameters is not None:
            raise ValueError(f"{model.family}: best-of-N screening needs a MAP family (HMMs, gmm)")
        else:
            self.learnable = list(model.parameters())
        self.optimizer = ClippedAdam(
            self.learnable,
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            clip_norm=config.clip_norm,
            lrd=config.lr_decay,
        )
        self.candidates = [Candidate(best_state=self._state(index)) for index in range(count)]
        self._load(0)

    def _stack(self, starts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Leaf tensors ``(R, ...)`` of the starts' unconstrained values (checked and
        transformed by ``set_parameters``)."""
        rows = []
        for start in starts:
            self.model.set_parameters(**start)
            rows.append({name: value.detach().clone() for name, value in self.model.unconstrained().items()})
        return {name: torch.stack([row[name] for row in rows]).requires_grad_() for name in rows[0]}

    def _load(self, index: int) -> None:
        """Put candidate ``index``'s current parameters into ``model``."""
        if not self.stacked:
            return
        with torch.no_grad():
            for name, value in self.model.unconstrained().items():
                value.copy_(self.stacked[name][index])

    def _state(self, index: int) -> dict[str, torch.Tensor]:
        """The model's state dict with candidate ``index``'s current parameters."""
        self._load(index)
        return copy.deepcopy(self.model.state_dict())

    def _losses(self, x: torch.Tensor, lengths: torch.Tensor | None, scale: float, extra: dict) -> torch.Tensor:
        """``(R,)`` the candidates' training losses on a minibatch."""
        if self.stacked:
            return self.model.training_loss_of(self.model.constrain(self.stacked), x, lengths, scale)
        return self.model.training_loss(x, lengths, scale, **extra).unsqueeze(0)

    def _log_likelihoods(self, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        """``(R, N)`` log-likelihoods under every candidate."""
        if self.stacked:
            return self.model.log_likelihood_of(self.model.constrain(self.stacked), x, lengths)
        return self.model.log_likelihood(x, lengths).unsqueeze(0)

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return max(candidate.epoch for candidate in self.candidates)

    @property
    def done(self) -> bool:
        return all(candidate.done(self.config) for candidate in self.candidates)

    # The first candidate's record, the whole record of a single run.
    history = property(lambda self: self.candidates[0].history)
    best_valid = property(lambda self: self.candidates[0].best_valid)
    best_epoch = property(lambda self: self.candidates[0].best_epoch)
    best_state = property(lambda self: self.candidates[0].best_state)

    def train_epoch(self) -> torch.Tensor:
        """One pass over the shuffled training split, a ``ClippedAdam`` step per minibatch
        (or one EM iteration: :meth:`em_iteration`). A non-finite loss raises
        ``FloatingPointError`` naming the epoch and batch.

        :returns: ``(R,)`` every candidate's mean loss per frame (float64).
        """
        if self.config.method == "em":
            return self.em_iteration()
        model, train_split = self.model, self.splits["train"]
        extra = model.training_kwargs(self.epoch, self.config.epochs)
        total, num_batches = 0.0, 0
        for batch, (x, lengths) in enumerate(batches(train_split, self.config.batch_size, self.generator)):
            losses = self._losses(x, lengths, train_split.x.shape[0] / x.shape[0], extra)
            if not bool(torch.isfinite(losses).all()):
                raise FloatingPointError(
                    f"{model.family}: non-finite training loss ({losses.tolist()}) at epoch "
                    f"{self.epoch + 1}, batch {batch}; try a smaller lr"
                )
            self.optimizer.zero_grad()
            losses.sum().backward()
            self.optimizer.step()
            total, num_batches = total + losses.detach().double(), num_batches + 1
        return total / num_batches / num_frames(train_split)

    @torch.no_grad()
    def em_iteration(self) -> torch.Tensor:
        """One EM iteration of every candidate on the whole training split: the family's
        E-step and closed-form M-step (:meth:`MapModel.em_step`) replace its parameters.

        :returns: ``(R,)`` the objective per frame (negative log prior and log-likelihood,
            float64) at the parameters the iteration started from: it never increases.
        """
        model, split = self.model, self.splits["train"]
        params = model.constrain(self.stacked)
        new, log_likelihood = model.em_step(params, split.x, split.lengths, self.improve_networks)
        losses = -(model.log_prior_of(params).double() + log_likelihood.double().sum(-1))
        if not bool(torch.isfinite(losses).all()):
            raise FloatingPointError(f"{model.family}: non-finite EM objective ({losses.tolist()}) at iteration {self.epoch + 1}")
        for name, value in model.unconstrain(new).items():
            self.stacked[name].copy_(value)
        return losses / num_frames(split)

    def improve_networks(self, objective: Callable[[], torch.Tensor]) -> None:
        """Generalised EM's M-step for a family's networks: ``network_steps`` ClippedAdam
        steps on ``objective()`` (their expected complete-data loss per frame)."""
        with torch.enable_grad():
            for _ in range(self.config.network_steps):
                loss = objective()
                self.optimizer.zero_grad()
                loss.backward()
                self.optimizer.step()

    def run_epoch(self) -> list[EpochRecord]:
        """:meth:`train_epoch`, then the validation NLL per frame of every candidate.

        :returns: the records of the candidates that were still training.
        """
        started = time.perf_counter()
        train_loss = self.train_epoch()
        valid_nll = split_nll(self._log_likelihoods, self.splits["valid"])
        epoch_s = time.perf_counter() - started
        records = []
        for index, candidate in enumerate(self.candidates):
            if candidate.done(self.config):
                continue
            record = EpochRecord(candidate.epoch + 1, float(train_loss[index]), float(valid_nll[index]), epoch_s)
            candidate.history.append(record)
            if record.valid_nll < candidate.best_valid:
                candidate.best_valid, candidate.best_epoch = record.valid_nll, record.epoch
                candidate.best_state = self._state(index)
            records.append(record)
        self._load(0)
        return records

    def best_scores(self, index: int = 0) -> tuple[dict[str, float], HeldOutScores]:
        """Candidate ``index``'s figures at its best epoch: ``test_nll`` per frame, and for
        choosing the number of states (:mod:`trainables.selection`) ``num_parameters``, the
        ``valid_nll_se`` and, where the likelihood is exact, ``bic`` and ``aic`` of the
        training split; and every held-out sequence's NLL (:func:`held_out_scores`)."""
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.candidates[index].best_state)
        model, train = self.model, self.splits["train"]
        held_out = held_out_scores(model, self.splits)
        scores = {
            "test_nll": held_out.per_frame("test"),
            "num_parameters": float(free_parameters(model)),
            "valid_nll_se": selection.per_frame_standard_error(
                held_out.nll["valid"].tolist(), held_out.frames["valid"].tolist()
            ),
        }
        if model.exact:
            log_likelihood = float(sequence_log_likelihoods(model, train).sum())
            scores.update(selection.information_criteria(log_likelihood, int(scores["num_parameters"]), num_frames(train)))
        self.model.load_state_dict(current)
        return scores, held_out

    def result(self, index: int = 0) -> TrainResult:
        """Leave the model at candidate ``index``'s best epoch and summarise its run."""
        candidate = self.candidates[index]
        self.model.load_state_dict(candidate.best_state)
        return TrainResult(
            history=list(candidate.history),
            best_epoch=candidate.best_epoch,
            best_valid_nll=candidate.best_valid,
            test_nll=evaluate_nll(self.model, self.splits["test"]),
            screening_losses=self.screening,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on exactly where this trainer is (tensors and plain
        Python values only, so it loads with ``torch.load(weights_only=True)``)."""
        return {
            "model": self.model.state_dict(),
            "stacked": {name: value.detach() for name, value in self.stacked.items()},
            "optimizer": self.optimizer.state_dict(),
            "candidates": [candidate.state_dict() for candidate in self.candidates],
            "generator": self.generator.get_state(),
            "screening": self.screening,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        with torch.no_grad():
            for name, value in self.stacked.items():
                value.copy_(state["stacked"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        self.candidates = [Candidate.from_state_dict(candidate) for candidate in state["candidates"]]
        self.generator.set_state(state["generator"])
        self.screening = list(state["screening"])


def train(
    model: SequenceModel,
    data: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[EpochRecord, SequenceModel], None] | None = None,
) -> TrainResult:
    """Fit ``model`` to ``data["train"]`` by SVI, stopping early after ``config.patience``
    epochs without a better validation NLL, and end on the best epoch's parameters.

    ``on_epoch(record, model)`` runs after every epoch (reporting, checkpoints).
    """
    trainer = Trainer(model, data, config)
    while not trainer.done:
        (record,) = trainer.run_epoch()
        if on_epoch is not None:
            on_epoch(record, model)
    return trainer.result()

