"""Serving latency and throughput: ``pyrosweep serve`` against ``mlflow models serve`` of
the same registered version, side by side in one run.

Runs the demo sweep (``configs/demo.yaml``) into a scratch home, promotes the winner,
starts both servers on loopback and scores one test chorale at concurrency 1, 8 and 32
(keep-alive connections, one per client thread). Prints p50/p99 latency and requests per
second for both, their ratios, and ``/v1/score`` p50 over ``/healthz`` p50. The client
threads share the machine's cores with the servers: compare within one run only.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(port: int, path: str, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", path)
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"nothing answered on port {port}{path} within {timeout} s")


def measure(port: int, method: str, path: str, body: bytes | None, concurrency: int, total: int):
    """Latencies (s) of ``total`` requests from ``concurrency`` threads, and the wall time."""
    latencies: list[float] = []
    lock = threading.Lock()
    per_thread = max(1, total // concurrency)

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        mine = []
        for _ in range(per_thread):
            started = time.perf_counter()
            connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"{path}: HTTP {response.status}")
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return np.array(latencies), time.perf_counter() - started


def summary(latencies: np.ndarray, wall: float) -> tuple[float, float, float]:
    return float(np.percentile(latencies, 50) * 1e3), float(np.percentile(latencies, 99) * 1e3), len(latencies) / wall


def prepare(home: Path) -> tuple[str, str, list]:
    """Run the demo sweep, promote its winner; the registered URI and one test chorale."""
    os.environ["PYROSWEEP_HOME"] = str(home)
    from cluster.home import tracking_uri
    from cluster.promote import promote
    from cluster.sweep import run_sweep
    from cluster.sweep_file import load_sweep_file
    from trainables.data import load_dataset

    spec = load_sweep_file(ROOT / "configs" / "demo.yaml")
    run_sweep(spec)
    promoted = promote(tracking_uri(), spec.name)
    test = load_dataset("jsb").splits["test"]
    chorale = test.x[0, : int(test.lengths[0])].int().tolist()
    return f"models:/{promoted['name']}/{promoted['version']}", tracking_uri(), chorale


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        home = Path(scratch)
        model_uri, uri, chorale = prepare(home)
        env = {**os.environ, "PYROSWEEP_HOME": str(home), "MLFLOW_TRACKING_URI": uri,
               "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        ours_port, theirs_port = free_port(), free_port()
        servers = [
            subprocess.Popen([sys.executable, "-m", "cluster.cli", "serve", "--model", model_uri, "--port", str(ours_port)],
                             env=env, stdout=open(home / "ours.log", "w"), stderr=subprocess.STDOUT, start_new_session=True),
            subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                              "-h", "127.0.0.1", "-p", str(theirs_port), "-w", "1"],
                             env=env, stdout=open(home / "theirs.log", "w"), stderr=subprocess.STDOUT, start_new_session=True),
        ]
        try:
            wait_until_up(ours_port, "/healthz")
            wait_until_up(theirs_port, "/ping")
            ours_body = json.dumps({"sequences": [chorale]}).encode()
            theirs_body = json.dumps({"dataframe_records": [{"sequences": [chorale]}], "params": {"method": "score"}}).encode()
            print(f"machine: {platform.machine()} {os.cpu_count()} cores, {platform.platform()}")
            print(f"model: {model_uri}; one chorale of {len(chorale)} frames x 88 keys per request")
            print(f"{'concurrency':>11}  {'server':<22} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
            for concurrency in CONCURRENCY:
                total = max(100, 20 * concurrency)
                rows = {}
                for label, port, path, body in (("pyrosweep serve", ours_port, "/v1/score", ours_body),
                                                 ("mlflow models serve", theirs_port, "/invocations", theirs_body)):
                    measure(port, "POST", path, body, min(concurrency, 4), 8)  # warm up
                    rows[label] = summary(*measure(port, "POST", path, body, concurrency, total))
                    print(f"{concurrency:>11}  {label:<22} {rows[label][0]:8.1f} {rows[label][1]:8.1f} {rows[label][2]:8.1f}")
                ours, theirs = rows["pyrosweep serve"], rows["mlflow models serve"]
                print(f"{'':>11}  ratio mlflow/ours: p50 {theirs[0] / ours[0]:.2f}x, p99 {theirs[1] / ours[1]:.2f}x, "
                      f"throughput ours/mlflow {ours[2] / theirs[2]:.2f}x")
            health = summary(*measure(ours_port, "GET", "/healthz", None, 1, 200))
            score = summary(*measure(ours_port, "POST", "/v1/score", ours_body, 1, 200))
            print(f"pyrosweep /v1/score p50 {score[0]:.1f} ms over /healthz p50 {health[0]:.1f} ms: {score[0] / health[0]:.2f}x")
        finally:
            for server in servers:
                os.killpg(server.pid, signal.SIGTERM)
            for server in servers:
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
