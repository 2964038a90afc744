"""Checkpoints: the one place that knows their files, their MLflow artifact name and
what is said about a model wherever one is shown (``/v1/model``, the registry).

A checkpoint is a directory holding ``model.pt`` (the model's ``state_dict``, plain
tensors) and ``config.json`` (``{"model": model.config, "module": ..., **extra}``, where
``module`` is the Python module that registers the family, imported on load when the
family is not known yet). A trial's checkpoint also holds ``trial_state.pt`` (every
candidate's trainer state, for resuming) and ``held_out.parquet`` (every validation and
test sequence's NLL, :mod:`trainables.held_out`). In MLflow a trial's checkpoint is the artifact
directory ``checkpoint``, and so is the checkpoint inside a promoted pyfunc model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .models import SequenceModel, build_model, family_class

WEIGHTS = "model.pt"
CONFIG = "config.json"
TRIAL_STATE = "trial_state.pt"
ARTIFACT = "checkpoint"


def save_checkpoint(model: SequenceModel, directory: str | Path, **extra: Any) -> Path:
    """Write ``model.pt`` and ``config.json`` (``model.config``, the family's module and
    ``extra``) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / WEIGHTS)
    saved = {"model": model.config, "module": type(model).__module__, **extra}
    (directory / CONFIG).write_text(json.dumps(saved, indent=2))
    return directory


def is_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / WEIGHTS).is_file() and (Path(directory) / CONFIG).is_file()


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint: ``model`` (the model's config), ``module`` and
    whatever was saved with it."""
    return json.loads((Path(directory) / CONFIG).read_text())


def load_checkpoint(directory: str | Path, device: str = "cpu") -> SequenceModel:
    """Rebuild a model from ``save_checkpoint``'s files (weights loaded with
    ``weights_only=True``: plain tensors only)."""
    saved = read_config(directory)
    family_class(saved["model"]["family"], saved.get("module"))
    model = build_model(**saved["model"])
    state = torch.load(Path(directory) / WEIGHTS, map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device)


def describe(model: SequenceModel) -> dict[str, Any]:
    """What is said about a model wherever it is shown: its family and declared kinds,
    dimensions and every hyperparameter (defaults included)."""
    return {
        "family": model.family,
        "data_kind": model.data_kind,
        "observation": model.observation,
        "latent": model.latent,
        "exact": model.exact,
        "missing_values": model.missing_values,
        "data_dim": model.data_dim,
        "hidden_dim": model.hidden_dim,
        "hyperparameters": model.config,
    }
