"""Where pyrosweep keeps things on the user's machine, and the embedded defaults.

The project home is ``$PYROSWEEP_HOME`` (default ``~/.pyrosweep``):

- ``mlflow.db``: the embedded MLflow store (SQLite, one writer: the sweep driver);
- ``mlartifacts/``: its artifacts;
- ``ray_results/``: Ray Tune storage (checkpoints, trial state) for ``--resume``;
- ``checkpoints/``: ``pyrosweep train`` outputs;
- ``logs/``: one log file per run of ``sweep``, ``serve``, ``submit`` and ``demo`` (the
  libraries' logs; :mod:`cluster.console`).
"""

from __future__ import annotations

import os
from pathlib import Path


def project_home() -> Path:
    """``$PYROSWEEP_HOME`` or ``~/.pyrosweep``, absolute."""
    return Path(os.environ.get("PYROSWEEP_HOME", Path.home() / ".pyrosweep")).expanduser().absolute()


def tracking_uri(given: str | None = None) -> str:
    """The MLflow tracking URI: ``given``, else ``$MLFLOW_TRACKING_URI``, else the embedded
    SQLite store as an absolute ``sqlite:///`` URI (MLflow's own default is relative to
    the current directory, which is a different one inside every Tune trial)."""
    uri = given or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = project_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment keeps artifacts: next to an embedded SQLite store, or
    ``None`` to let a tracking server decide."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / experiment).as_uri()


def storage_path(given: str | None = None) -> str:
    """Ray Tune storage: ``given`` (a path or a ``s3://``/``gs://`` URI) or the home's
    ``ray_results``; local paths are made absolute."""
    if given and "://" in given:
        return given
    path = Path(given).expanduser().absolute() if given else project_home() / "ray_results"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)
