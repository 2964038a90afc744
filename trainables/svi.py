"""The one SVI training loop for every family, best-of-N initialisation screening, and
checkpoints.

``train`` runs minibatch SVI (``Trace_ELBO``; the HMM families' discrete states are
already summed out exactly by the engine) with ``ClippedAdam`` and a per-step learning
rate decay, evaluates the validation NLL per frame after every epoch, stops early after
``patience`` epochs without improvement and ends on the best epoch's parameters.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyro
import torch
from pyro.infer import Trace_ELBO
from pyro.optim.clipped_adam import ClippedAdam

from .data import Dataset, Split
from .models import MapModel, SequenceModel, build_model

CHECKPOINT_WEIGHTS = "model.pt"
CHECKPOINT_CONFIG = "config.json"


@dataclass
class TrainConfig:
    """Training settings; every field can be swept."""

    epochs: int = 100
    batch_size: int = 20
    lr: float = 0.01
    lr_decay: float = 1.0  # multiplies the learning rate after every step (ClippedAdam lrd)
    clip_norm: float = 10.0
    beta1: float = 0.9
    beta2: float = 0.999
    patience: int | None = 10  # epochs without a better valid NLL before stopping
    seed: int = 0
    screen: int = 1  # initialisations screened before training (best-of-N)
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    # CPU threads for torch. The engine's ops are small: more threads than cores (two
    # trials, or another busy process) made an epoch 400x slower here, so default to one.
    threads: int = 1

    def __post_init__(self) -> None:
        checks = {
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
            "lr_decay": 0 < self.lr_decay <= 1,
            "clip_norm": self.clip_norm > 0,
            "patience": self.patience is None or self.patience >= 1,
            "screen": self.screen >= 1,
            "threads": self.threads >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            values = ", ".join(f"{name}={getattr(self, name)!r}" for name in bad)
            raise ValueError(f"invalid training settings: {values}")


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


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; asking for CUDA where there is none is an error."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for but CUDA is not available here")
    return device


def num_frames(split: Split) -> int:
    """Real (unpadded) frames of a split; points count one each."""
    return int(split.lengths.sum()) if split.lengths is not None else split.x.shape[0]


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
def evaluate_nll(model: SequenceModel, split: Split, batch_size: int = 64) -> float:
    """Negative log-likelihood in nats per frame of a whole split."""
    total = sum(float(model.log_likelihood(x, lengths).sum()) for x, lengths in batches(split, batch_size))
    return -total / num_frames(split)


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
    draws = [model.init_parameters(split.x.cpu(), _cpu(split.lengths), generator) for _ in range(num)]
    dtype, device = model._anchor.dtype, model._anchor.device
    losses = []
    for start in range(0, num, chunk):
        group = draws[start : start + chunk]
        params = {
            name: torch.stack([draw[name] for draw in group]).to(device, dtype) for name in group[0]
        }
        log_likelihood = model.log_likelihood_of(params, split.x, split.lengths).sum(-1)
        losses.append(-(model.log_prior_of(params) + log_likelihood))
    losses = torch.cat(losses).cpu()
    order = torch.nan_to_num(losses, nan=math.inf).argsort()[:keep]
    return losses, [draws[int(i)] for i in order]


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def _to(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), None if split.lengths is None else split.lengths.to(device))


class Trainer:
    """SVI on one model, an epoch at a time, with a state that can be saved and resumed.

    On construction a MAP family starts from ``initial_parameters`` if given, else from
    the best of ``config.screen`` random initialisations drawn from the training data.
    """

    def __init__(
        self,
        model: SequenceModel,
        data: Dataset,
        config: TrainConfig,
        initial_parameters: dict[str, torch.Tensor] | None = None,
    ) -> None:
        torch.set_num_threads(config.threads)
        torch.manual_seed(config.seed)
        pyro.set_rng_seed(config.seed)
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.config = config
        self.splits = {name: _to(split, self.device) for name, split in data.splits.items()}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.screening: list[float] = []
        if isinstance(model, MapModel):
            if initial_parameters is None:
                losses, (initial_parameters,) = screen_initializations(
                    model, self.splits["train"], config.screen, self.generator
                )
                self.screening = losses.tolist()
            model.set_parameters(**initial_parameters)
        elif config.screen > 1 or initial_parameters is not None:
            raise ValueError(f"{model.family}: best-of-N screening needs a MAP family (HMMs, gmm)")
        self.optimizer = ClippedAdam(
            model.parameters(),
            lr=config.lr,
            betas=(config.beta1, config.beta2),
            clip_norm=config.clip_norm,
            lrd=config.lr_decay,
        )
        self.elbo = Trace_ELBO()
        self.history: list[EpochRecord] = []
        self.best_valid, self.best_epoch = math.inf, 0
        self.best_state = copy.deepcopy(model.state_dict())

    @property
    def epoch(self) -> int:
        """Epochs completed."""
        return len(self.history)

    @property
    def done(self) -> bool:
        patience = self.config.patience
        out_of_patience = patience is not None and self.epoch - self.best_epoch >= patience
        return self.epoch >= self.config.epochs or (self.epoch > 0 and out_of_patience)

    def run_epoch(self) -> EpochRecord:
        """One pass over the shuffled training split, then the validation NLL per frame.
        A non-finite loss raises ``FloatingPointError`` naming the epoch and batch."""
        model, train_split = self.model, self.splits["train"]
        epoch = self.epoch + 1
        started = time.perf_counter()
        extra = model.training_kwargs(self.epoch, self.config.epochs)
        epoch_loss, num_batches = 0.0, 0
        for batch, (x, lengths) in enumerate(batches(train_split, self.config.batch_size, self.generator)):
            scale = train_split.x.shape[0] / x.shape[0]
            # Data were checked at load and the loss is checked here: Pyro's per-site
            # argument validation would only turn a diverging step into a less clear error.
            with pyro.validation_enabled(False):
                loss = self.elbo.differentiable_loss(model.model, model.guide, x, lengths, scale=scale, **extra)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{model.family}: non-finite training loss ({loss.item()}) at epoch {epoch}, "
                    f"batch {batch}; try a smaller lr"
                )
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            epoch_loss += float(loss.detach())
            num_batches += 1
        valid_nll = evaluate_nll(model, self.splits["valid"])
        record = EpochRecord(
            epoch=epoch,
            train_loss=epoch_loss / num_batches / num_frames(train_split),
            valid_nll=valid_nll,
            epoch_s=time.perf_counter() - started,
        )
        self.history.append(record)
        if valid_nll < self.best_valid:
            self.best_valid, self.best_epoch = valid_nll, epoch
            self.best_state = copy.deepcopy(model.state_dict())
        return record

    def best_test_nll(self) -> float:
        """Test NLL per frame of the parameters at the best validation epoch."""
        current = copy.deepcopy(self.model.state_dict())
        self.model.load_state_dict(self.best_state)
        test_nll = evaluate_nll(self.model, self.splits["test"])
        self.model.load_state_dict(current)
        return test_nll

    def result(self) -> TrainResult:
        """Leave the model at its best epoch and summarise the run."""
        self.model.load_state_dict(self.best_state)
        return TrainResult(
            history=list(self.history),
            best_epoch=self.best_epoch,
            best_valid_nll=self.best_valid,
            test_nll=evaluate_nll(self.model, self.splits["test"]),
            screening_losses=self.screening,
        )

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to go on exactly where this trainer is (tensors and plain
        Python values only, so it loads with ``torch.load(weights_only=True)``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": [asdict(record) for record in self.history],
            "best_valid": self.best_valid,
            "best_epoch": self.best_epoch,
            "best_state": self.best_state,
            "generator": self.generator.get_state(),
            "screening": self.screening,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.history = [EpochRecord(**record) for record in state["history"]]
        self.best_valid, self.best_epoch = state["best_valid"], state["best_epoch"]
        self.best_state = state["best_state"]
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
        record = trainer.run_epoch()
        if on_epoch is not None:
            on_epoch(record, model)
    return trainer.result()


def save_checkpoint(model: SequenceModel, directory: str | Path, **extra: Any) -> Path:
    """Write ``model.pt`` (the state dict) and ``config.json`` (``model.config`` plus
    ``extra``) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / CHECKPOINT_WEIGHTS)
    (directory / CHECKPOINT_CONFIG).write_text(json.dumps({"model": model.config, **extra}, indent=2))
    return directory


def load_checkpoint(directory: str | Path, device: str = "cpu") -> SequenceModel:
    """Rebuild a model from ``save_checkpoint``'s files (weights loaded with
    ``weights_only=True``: plain tensors only)."""
    directory = Path(directory)
    config = json.loads((directory / CHECKPOINT_CONFIG).read_text())["model"]
    model = build_model(**config)
    state = torch.load(directory / CHECKPOINT_WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device)
