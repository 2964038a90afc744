"""Streaming latency: ``/v1/filter`` chunk by chunk (each chunk carrying the previous
answer's token, as a client does) and ``/v1/forecast``, over ``/healthz``, on one
``pyrosweep serve`` of an ``hmm`` (K=16) and an ``nnhmm`` (K=16) trained briefly on jsb.

Prints p50/p99 latency per chunk for chunks of 1 and 16 frames, with and without a lag,
the forecast's, and each p50 over the ``/healthz`` p50 of the same server, which is what
Serve's proxy and the HTTP round trip cost: compare within one run only.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_serve import free_port, measure, wait_until_up
from common import machine

CHUNKS = 200  # requests per measurement


def checkpoint(directory: Path, family: str) -> tuple[Path, list]:
    """A briefly trained checkpoint of ``family`` on jsb, and one test chorale."""
    from trainables.checkpoint import save_checkpoint
    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.settings import TrainConfig
    from trainables.svi import train

    data = load_dataset("jsb")
    model = build_model(family, data_dim=data.data_dim, hidden_dim=16)
    train(model, data, TrainConfig(epochs=3, seed=0))
    test = data.splits["test"]
    return save_checkpoint(model, directory / family), test.x[0, : int(test.lengths[0])].int().tolist()


def stream(port: int, frames: list, chunk: int, lag: int | None) -> np.ndarray:
    """Seconds per request of ``CHUNKS`` chunks of ``chunk`` frames, each with the last token."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    latencies, state = [], None
    for i in range(CHUNKS):
        start = (i * chunk) % max(1, len(frames) - chunk)
        body = {"frames": frames[start : start + chunk], **({"state": state} if state else {"lag": lag})}
        began = time.perf_counter()
        connection.request("POST", "/v1/filter", body=json.dumps(body), headers={"Content-Type": "application/json"})
        answer = json.loads(connection.getresponse().read())
        latencies.append(time.perf_counter() - began)
        state = answer["state"]
    return np.array(latencies)


def main() -> None:
    print(machine())
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        env = {**os.environ, "PYROSWEEP_HOME": str(home)}
        for family in ("hmm", "nnhmm"):
            source, chorale = checkpoint(home, family)
            port = free_port()
            server = subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", str(source), "--port", str(port)],
                                      env=env, stdout=open(home / f"{family}.log", "w"), stderr=subprocess.STDOUT,
                                      start_new_session=True)
            try:
                wait_until_up(port, "/healthz")
                stream(port, chorale, 1, None)  # warm up
                health = np.percentile(measure(port, "GET", "/healthz", None, 1, CHUNKS)[0], 50)
                print(f"{family} K=16, 88 keys; /healthz p50 {health * 1e3:.2f} ms")
                rows = {f"filter, {chunk} frame(s){f', lag {lag}' if lag else ''}": stream(port, chorale, chunk, lag)
                        for chunk, lag in ((1, None), (16, None), (1, 8), (16, 8))}
                for label, path, body in (("forecast, 16 frames, horizon 5", "/v1/forecast", {"frames": chorale[:16], "horizon": 5}),
                                          ("score, 16 frames (for comparison)", "/v1/score", {"sequences": [chorale[:16]]})):
                    rows[label] = measure(port, "POST", path, json.dumps(body).encode(), 1, CHUNKS)[0]
                for label, latencies in rows.items():
                    p50, p99 = np.percentile(latencies, [50, 99])
                    print(f"  {label:<36} p50 {p50 * 1e3:6.2f} ms  p99 {p99 * 1e3:6.2f} ms  p50/healthz {p50 / health:5.2f}x")
            finally:
                os.killpg(server.pid, signal.SIGTERM)
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
