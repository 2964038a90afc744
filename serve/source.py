"""The model a Ray actor answers with (a Serve replica, a batch-scoring actor): loaded
from a pinned source (``serve.registry.pin_source``) and placed on the actor's device.

Light on purpose (no Serve, no FastAPI): Ray Data's scoring actors import it at start.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from trainables.checkpoint import describe, load_checkpoint, read_config

from .monitor import read_reference
from .registry import load_model_version, load_reference, parse_model_uri


def load_source(config: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of ``config["source"]`` (a registered version or a checkpoint directory)
    and what ``/v1/model`` says about it."""
    source = config["source"]
    if source.startswith("models:/"):
        name, _, version = parse_model_uri(source)
        return load_model_version(config["tracking_uri"], name, version)
    model = load_checkpoint(source).eval()
    saved = {key: value for key, value in read_config(source).items() if key not in ("model", "module")}
    return model, {"name": Path(source).name, "version": None, "run_id": None, **saved, **describe(model)}


def served_as(info: dict[str, Any]) -> str:
    """How answers name the model of ``info`` (:func:`load_source`'s): NAME/VERSION, or a
    checkpoint directory's name."""
    return info["name"] if info["version"] is None else f"{info['name']}/{info['version']}"


def source_reference(config: dict[str, Any]) -> np.ndarray | None:
    """The per-step NLL reference stored with ``config["source"]`` (:mod:`serve.monitor`),
    None where it has none."""
    source = config["source"]
    if source.startswith("models:/"):
        name, _, version = parse_model_uri(source)
        return load_reference(config["tracking_uri"], name, version)
    return read_reference(source)


def actor_device() -> str:
    """Where this Ray actor (a replica, a batch scorer) puts its model: ``cuda`` when Ray
    gave it a GPU that torch sees, else ``cpu``."""
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
