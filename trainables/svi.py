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
    model: MapModel, split: Split, num: int, generator: torch.Generator, chunk: int = 16
) -> torch.Tensor:
    """Best-of-``num`` initialisation, as the GMM tutorial's 100-seed search: draw ``num``
    random initialisations, score each by the training objective (negative log prior plus
    negative log-likelihood of the whole split), batched ``chunk`` at a time through the
    family's batched likelihood, and set the model to the best one.

    :returns: ``(num,)`` the loss of every initialisation.
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
    losses = torch.cat(losses)
    model.set_parameters(**draws[int(torch.nan_to_num(losses, nan=math.inf).argmin())])
    return losses.cpu()


def _cpu(tensor: torch.Tensor | None) -> torch.Tensor | None:
    return None if tensor is None else tensor.cpu()


def _to(split: Split, device: torch.device) -> Split:
    return Split(split.x.to(device), None if split.lengths is None else split.lengths.to(device))


def train(
    model: SequenceModel,
    data: Dataset,
    config: TrainConfig,
    on_epoch: Callable[[EpochRecord, SequenceModel], None] | None = None,
) -> TrainResult:
    """Fit ``model`` to ``data["train"]`` by SVI and return its history.

    ``on_epoch(record, model)`` runs after every epoch (reporting, checkpoints). A non-finite
    loss raises ``FloatingPointError`` naming the epoch and batch.
    """
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    pyro.set_rng_seed(config.seed)
    device = resolve_device(config.device)
    model.to(device)
    train_split, valid_split, test_split = (_to(data.splits[s], device) for s in ("train", "valid", "test"))
    generator = torch.Generator().manual_seed(config.seed)

    screening: list[float] = []
    if isinstance(model, MapModel):
        screening = screen_initializations(model, train_split, config.screen, generator).tolist()
    elif config.screen > 1:
        raise ValueError(f"{model.family}: best-of-N screening needs a MAP family (HMMs, gmm)")

    optimizer = ClippedAdam(
        model.parameters(),
        lr=config.lr,
        betas=(config.beta1, config.beta2),
        clip_norm=config.clip_norm,
        lrd=config.lr_decay,
    )
    elbo = Trace_ELBO()
    train_count, train_frames = train_split.x.shape[0], num_frames(train_split)
    history: list[EpochRecord] = []
    best_valid, best_epoch, best_state = math.inf, 0, copy.deepcopy(model.state_dict())
    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        extra = model.training_kwargs(epoch - 1, config.epochs)  # epochs completed so far
        epoch_loss, num_batches = 0.0, 0
        for batch, (x, lengths) in enumerate(batches(train_split, config.batch_size, generator)):
            scale = train_count / x.shape[0]
            # Data were checked at load and the loss is checked here: Pyro's per-site
            # argument validation would only turn a diverging step into a less clear error.
            with pyro.validation_enabled(False):
                loss = elbo.differentiable_loss(model.model, model.guide, x, lengths, scale=scale, **extra)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{model.family}: non-finite training loss ({float(loss)}) at epoch {epoch}, "
                    f"batch {batch}; try a smaller lr"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += float(loss.detach())
            num_batches += 1
        valid_nll = evaluate_nll(model, valid_split)
        record = EpochRecord(
            epoch=epoch,
            train_loss=epoch_loss / num_batches / train_frames,
            valid_nll=valid_nll,
            epoch_s=time.perf_counter() - started,
        )
        history.append(record)
        if valid_nll < best_valid:
            best_valid, best_epoch, best_state = valid_nll, epoch, copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(record, model)
        if config.patience is not None and epoch - best_epoch >= config.patience:
            break
    model.load_state_dict(best_state)
    return TrainResult(
        history=history,
        best_epoch=best_epoch,
        best_valid_nll=best_valid,
        test_nll=evaluate_nll(model, test_split),
        screening_losses=screening,
    )


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
