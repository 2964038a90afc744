"""The serving request path in process: one 76 x 88 binary chorale (jsb test sequence 0)
against ``hmm`` K=16, through the functions the deployment calls, stage by stage:

- read: ``serve.scoring.read_json`` of the raw body;
- validate: ``parse_inputs`` (the vectorised check); side by side, the value-by-value
  check it falls back on to say what and where (how every body was checked before);
- compute: ``compute`` + ``complete`` (batch, the model's method, fields cut to length);
- write: ``serve.schemas.write_answer`` (the route's answer model validates the answer
  and writes its JSON).

Prints the median of N requests in ms for ``decode``, ``score`` and ``posterior``.
``--http`` adds a real Ray Serve deployment of the same model on loopback: the median
latency of ``POST /v1/decode`` and of ``GET /healthz`` from one keep-alive client.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import machine, setup_threads, timings

from cluster.local_ray import PROXY_ENV
from serve import scoring
from serve.schemas import write_answer
from trainables.data import load_dataset
from trainables.models import build_model

METHODS = ("decode", "score", "posterior")


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """The median of ``repeats`` calls of ``fn`` in ms, after one untimed call."""
    return statistics.median(timings(fn, repeats)) * 1e3


def value_by_value(model, body: dict) -> list[np.ndarray]:
    """The body's sequences checked by ``scoring._frame`` alone (the fallback's check)."""
    declared = model.data_dim, model.observation, model.missing_values
    return [
        np.stack([scoring._frame(frame, f"sequences[{n}][{t}]", *declared) for t, frame in enumerate(sequence)])
        for n, sequence in enumerate(body["sequences"])
    ]


def in_process(model, raw: bytes, repeats: int) -> None:
    body = scoring.read_json(raw)
    items = scoring.parse_inputs(model, body)
    print(f"{'method':<10} {'read':>7} {'validate':>9} {'(by value)':>10} {'compute':>8} {'write':>7} {'total':>7}  ms")
    for method in METHODS:
        answer = scoring.complete(model, method, scoring.compute(model, method, items))

        def request() -> str:
            inputs = scoring.parse_inputs(model, scoring.read_json(raw))
            return write_answer(method, scoring.complete(model, method, scoring.compute(model, method, inputs)))

        figures = (
            median_ms(lambda: scoring.read_json(raw), repeats),
            median_ms(lambda: scoring.parse_inputs(model, body), repeats),
            median_ms(lambda: value_by_value(model, body), repeats),
            median_ms(lambda: scoring.complete(model, method, scoring.compute(model, method, items)), repeats),
            median_ms(lambda: write_answer(method, answer), repeats),
            median_ms(request, repeats),
        )
        print(f"{method:<10} " + " ".join(f"{v:>{w}.3f}" for v, w in zip(figures, (7, 9, 10, 8, 7, 7))))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def over_http(model, raw: bytes, repeats: int) -> None:
    """``POST /v1/decode`` and ``GET /healthz`` medians through a real Serve deployment."""
    import ray
    from ray import serve

    from serve.app import AppArgs, build_app
    from trainables.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = save_checkpoint(model, Path(scratch) / "hmm-k16")
        os.environ.update(PROXY_ENV)  # Serve's proxies as a local `pyrosweep serve` has them
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            serve.run(build_app(AppArgs(model=str(checkpoint))), name="bench", route_prefix="/")
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

            def send(method: str, path: str, body: bytes | None) -> None:
                connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                payload = response.read()
                if response.status != 200:
                    raise RuntimeError(f"{path}: HTTP {response.status}: {payload[:200]!r}")

            for _ in range(3):  # alternated: this machine's speed drifts
                decode = median_ms(lambda: send("POST", "/v1/decode", raw), repeats)
                score = median_ms(lambda: send("POST", "/v1/score", raw), repeats)
                health = median_ms(lambda: send("GET", "/healthz", None), repeats)
                print(f"over HTTP (Ray Serve, loopback, 1 client): POST /v1/decode {decode:.2f} ms, "
                      f"/v1/score {score:.2f} ms, GET /healthz {health:.2f} ms (median of {repeats}): "
                      f"score / healthz {score / health:.2f}x")
        finally:
            serve.shutdown()
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--http", action="store_true", help="also time the deployment over loopback HTTP")
    args = parser.parse_args()
    setup_threads()
    test = load_dataset("jsb").splits["test"]
    chorale = test.x[0, : int(test.lengths[0])]
    raw = json.dumps({"sequences": [chorale.int().tolist()]}).encode()
    torch.manual_seed(0)
    model = build_model("hmm", data_dim=test.x.shape[-1], hidden_dim=16).eval()
    print(machine())
    print(f"one chorale of {tuple(chorale.shape)} (0/1 ints), hmm K=16, median of {args.repeats} in ms")
    in_process(model, raw, args.repeats)
    if args.http:
        over_http(model, raw, args.repeats)


if __name__ == "__main__":
    main()
