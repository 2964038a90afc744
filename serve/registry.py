"""Registered model versions in the MLflow registry: parse ``models:/`` URIs, resolve
aliases to version numbers, and rebuild a version's model from its checkpoint.

No Ray here: this runs inside Serve replicas, in the pyfunc and on the command line.
A version is what ``cluster.promote`` registers: an MLflow pyfunc whose artifact
``checkpoint`` holds ``model.pt`` and ``config.json`` (``trainables.checkpoint``).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from trainables.models import SequenceModel
from trainables.checkpoint import ARTIFACT as CHECKPOINT_ARTIFACT
from trainables.checkpoint import describe, is_checkpoint, load_checkpoint

TRIAL_METRICS = ("best_valid_nll", "test_nll")
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))")
_NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> ``(NAME, ALIAS, None)``; ``models:/NAME/VERSION`` ->
    ``(NAME, None, VERSION)``; anything else raises ``ValueError``."""
    match = _MODEL_URI.fullmatch(uri.strip())
    if match is None:
        raise ValueError(
            f"not a registered model URI: {uri!r}; expected models:/NAME@ALIAS "
            "(e.g. models:/jsb-hmm@champion) or models:/NAME/VERSION (e.g. models:/jsb-hmm/3)"
        )
    return match["name"], match["alias"], match["version"]


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code not in _NOT_FOUND:
            raise
        raise ValueError(
            f"no registered model named {name!r} at {client.tracking_uri}; "
            "promote a sweep first (pyrosweep promote --experiment NAME)"
        ) from None


def _versions(client: MlflowClient, name: str) -> list[str]:
    found = client.search_model_versions(f"name = '{name}'")
    return sorted((str(version.version) for version in found), key=int)


def resolve_version(client: MlflowClient, uri: str) -> ModelVersion:
    """The registered version ``uri`` points to, its alias resolved to a number."""
    name, alias, version = parse_model_uri(uri)
    registered = _registered_model(client, name)
    if alias is not None:
        aliases = registered.aliases
        if alias not in aliases:
            known = ", ".join(f"@{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
            raise ValueError(f"model {name!r} has no alias {alias!r} (its aliases: {known})")
        version = str(aliases[alias])
    try:
        return client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code not in _NOT_FOUND:
            raise
        known = ", ".join(_versions(client, name)) or "none"
        raise ValueError(f"model {name!r} has no version {version} (its versions: {known})") from None


def pin_source(model: str, tracking_uri: str) -> dict[str, Any]:
    """A replica's ``user_config`` for ``model``: a registry URI pinned to a version number
    (so that moving the alias later is an explicit swap), or an absolute checkpoint path."""
    if model.startswith("models:/"):
        version = resolve_version(MlflowClient(tracking_uri, registry_uri=tracking_uri), model)
        source = f"models:/{version.name}/{version.version}"
    else:
        path = Path(model).expanduser().absolute()
        if not is_checkpoint(path):
            raise FileNotFoundError(f"{model}: not a models:/ URI nor a checkpoint directory (no model.pt)")
        source = str(path)
    return {"source": source, "tracking_uri": tracking_uri}


def download_checkpoint(client: MlflowClient, version: ModelVersion, directory: str, file: str | None = None) -> str:
    """Download the ``checkpoint`` artifact of a registered pyfunc version (or only its
    ``file``) into ``directory``; returns the local path. (A ``models:/`` URI would be
    resolved against the process-wide registry URI, not ``client``'s.)"""
    model_directory = client.get_model_version_download_uri(version.name, version.version)
    return mlflow.artifacts.download_artifacts(
        artifact_uri=f"{model_directory.rstrip('/')}/artifacts/{CHECKPOINT_ARTIFACT}{'/' + file if file else ''}",
        dst_path=directory,
        tracking_uri=client.tracking_uri,
    )


def load_reference(tracking_uri: str, name: str, version: str | int) -> np.ndarray | None:
    """The per-step NLL reference stored with a registered version at promotion
    (:mod:`serve.monitor`); None for a version promoted without one."""
    from .monitor import REFERENCE_FILE

    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    found = resolve_version(client, f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory() as scratch:
        try:
            return np.load(download_checkpoint(client, found, scratch, REFERENCE_FILE))
        except (MlflowException, OSError):
            return None


def load_model_version(
    tracking_uri: str, name: str, version: str | int, device: str = "cpu"
) -> tuple[SequenceModel, dict[str, Any]]:
    """The model of a registered version, in eval mode on ``device``, and what is known
    about it: ``name``, ``version``, ``run_id`` (the trial run), ``family``, ``data_dim``,
    ``hidden_dim``, ``hyperparameters``, the trial's ``metrics`` and the version's
    ``aliases``."""
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    found = resolve_version(client, f"models:/{name}/{version}")
    with tempfile.TemporaryDirectory() as scratch:
        model = load_checkpoint(download_checkpoint(client, found, scratch), device=device)
    model.eval()
    metrics = client.get_run(found.run_id).data.metrics if found.run_id else {}
    return model, {
        "name": name,
        "version": int(found.version),
        "run_id": found.run_id,
        **describe(model),
        "metrics": {key: metrics[key] for key in TRIAL_METRICS if key in metrics},
        "aliases": sorted(found.aliases),
    }
