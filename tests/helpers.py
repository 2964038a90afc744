"""What several test modules share: sweep files, MLflow look-ups, free ports and JSON
over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from mlflow.tracking import MlflowClient

from cluster.mlflow_layout import SWEEP_TAG
from cluster.tracking_server import wait_until_up

PYROSWEEP = str(Path(sys.executable).parent / "pyrosweep")

SWEEP = """
name: {name}
model: hmm
data: {{name: synthetic-hmm, num_sequences: {sequences}, length: 20, hidden_dim: 2}}
train: {{epochs: {epochs}, batch_size: 10, patience: 50}}
search:
  hidden_dim: {hidden_dim}
  lr: {{loguniform: [0.01, 0.05]}}
  seed: {{randint: [0, 1000]}}
restarts: {{screen: 4, keep: 1}}
num_samples: {num_samples}
resources: {{cpu: 1, gpu: {gpu}}}
max_concurrent: 2
max_failures: 1
checkpoint_every: 2
"""


def write_sweep(
    tmp_path: Path,
    name: str,
    epochs: int = 4,
    num_samples: int = 1,
    gpu: float = 0,
    hidden_dim: str = "{grid: [2, 3]}",
    sequences: int = 30,
) -> Path:
    path = tmp_path / f"{name}.yaml"
    text = SWEEP.format(
        name=name, epochs=epochs, num_samples=num_samples, gpu=gpu, hidden_dim=hidden_dim, sequences=sequences
    )
    path.write_text(text)
    return path


def mlflow_runs(uri: str, name: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(SWEEP_TAG) == "parent"]
    children = [r for r in runs if r.data.tags.get(SWEEP_TAG) == "trial"]
    return client, parents, children


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body, timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def get(url: str) -> tuple[int, dict]:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.status, json.load(response)


@contextmanager
def tracking_server(backend_store_uri: str, artifacts: Path) -> Iterator[str]:
    """A real ``pyrosweep tracking-server`` on a free loopback port for the block; yields
    its URL."""
    port = free_port()
    server = subprocess.Popen(
        [PYROSWEEP, "tracking-server", "--backend-store-uri", backend_store_uri,
         "--artifacts-destination", str(artifacts), "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        # no MLflow job runner (a second process importing MLflow as the server starts)
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, timeout_s=180)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def knock_out(data, fraction: float, seed: int, whole_frames: bool = False):
    """``data`` (a ``Dataset``) with each value of its real frames (each whole frame, for
    one-hot symbols) missing (NaN) with probability ``fraction``, at random from ``seed``."""
    import torch

    from trainables.data import Dataset, Split
    from trainables.inference import frame_mask

    generator = torch.Generator().manual_seed(seed)
    splits = {}
    for name, split in data.splits.items():
        x = split.x.clone()
        real = torch.ones(x.shape[:-1], dtype=torch.bool) if split.lengths is None else frame_mask(split.lengths, x.shape[1])
        gone = (torch.rand(x.shape[:-1] if whole_frames else x.shape, generator=generator) < fraction)
        gone = (gone.unsqueeze(-1) if whole_frames else gone) & real.unsqueeze(-1)
        x[gone.expand_as(x)] = float("nan")
        splits[name] = Split(x, split.lengths)
    return Dataset(data.name, splits, data.data_dim, truth=data.truth)
