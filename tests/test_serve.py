"""Serving over real HTTP: a real Ray Serve app on loopback, real trained checkpoints.

One Ray + Serve instance for the module; each family is deployed as its own app under
``/<family>``, which exercises the same deployment ``pyrosweep serve`` runs at ``/``.
Streams, forecasts and monitoring come last, with apps of their own beside these.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from pathlib import Path

import numpy as np
import psutil
import pytest
import ray
import torch
from ray import serve

from cluster.local_ray import PROXY_ENV
from cluster.serving import ServeOptions, deployment
from helpers import free_port, get, post
from serve.app import AppArgs, build_app
from serve.limits import MAX_REQUEST_ID, BodyLimits
from serve.monitor import MIN_FRAMES, write_reference
from serve.schemas import (
    MAX_FRAMES,
    MAX_SEQUENCES,
    METHODS,
    STREAM_METHODS,
    GaussianPosteriorAnswer,
    LatentPathAnswer,
    MarginalsAnswer,
    SampleAnswer,
    ScoreAnswer,
    StatePathAnswer,
)
from serve.scoring import SCORE_SEED, Scores
from trainables import streaming
from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.contract import GaussianPosterior, LatentPath, Marginals, Samples, StatePath
from trainables.models.missing import observed_values
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.settings import TrainConfig
from trainables.svi import train

pytestmark = pytest.mark.slow

FAMILIES = {
    "hmm": ("synthetic-hmm", {}),
    "gaussian-hmm": ("synthetic-gaussian-hmm", {}),
    "categorical-hmm": ("synthetic-categorical-hmm", {}),
    "poisson-hmm": ("synthetic-poisson-hmm", {}),
    "arhmm": ("synthetic-hmm", {}),  # takes no missing values
    "gmm": ("synthetic-gmm", {}),
    "dmm": ("synthetic-hmm", {"emission_dim": 8, "transition_dim": 8, "rnn_dim": 8}),
}


# each Serve replica asks for one CPU (cluster.serving): a replica per family, plus the
# module's "guarded" app and one test's own app at a time ("built", "swap", "patient"),
# plus the second replica a hot swap starts beside the first; a replica Ray cannot place
# makes serve.run wait for ever
REPLICA_CPUS = len(FAMILIES) + 3 + 4  # and the stream apps' 4 replicas


def trained_checkpoint(directory: Path, family: str, seed: int = 0, epochs: int = 2) -> Path:
    data_name, hparams = FAMILIES[family]
    data = load_dataset(data_name, num_sequences=30, seed=seed)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=3, **hparams)
    train(model, data, TrainConfig(epochs=epochs, seed=seed))
    return save_checkpoint(model, directory / f"{family}-{seed}")


def request_inputs(family: str):
    data_name, _ = FAMILIES[family]
    split = load_dataset(data_name, num_sequences=30, seed=9).splits["test"]
    if family == "gmm":
        return {"points": split.x[:5].tolist()}, (split.x[:5], None)
    lengths = split.lengths[:4]
    x = split.x[:4, : int(lengths.max())]
    return {"sequences": [x[n, :length].tolist() for n, length in enumerate(lengths.tolist())]}, (x, lengths)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Every family deployed from a trained checkpoint; yields base URLs and checkpoints.
    Serve's proxies get the header guard a local ``pyrosweep serve`` gives them."""
    directory = tmp_path_factory.mktemp("checkpoints")
    metrics_port = free_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in PROXY_ENV.items():
            patch.setenv(name, value)
        ray.init(num_cpus=REPLICA_CPUS, include_dashboard=False, configure_logging=False, _metrics_export_port=metrics_port)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    checkpoints = {}
    for family in FAMILIES:
        checkpoints[family] = trained_checkpoint(directory, family)
        options = ServeOptions(model=str(checkpoints[family]), tracking_uri="")
        app = deployment(options, {"source": str(checkpoints[family]), "tracking_uri": ""})
        serve.run(app, name=family, route_prefix=f"/{family}")
    yield {"base": f"http://127.0.0.1:{port}", "port": port, "checkpoints": checkpoints, "directory": directory,
           "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve.shutdown()
    ray.shutdown()


def close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def same_fields(served: dict, result, lengths, observed: list[int]) -> None:
    """``served`` has exactly the fields of the contract ``result``, each equal to it
    (values with a time axis cut to each length), and ``observed_values``."""
    assert set(served) == {*result._fields, "observed_values"} and served["observed_values"] == observed
    for name, value in result._asdict().items():
        if lengths is None or value.dim() < 2:
            close(served[name], value.tolist())
        else:
            for n, length in enumerate(lengths.tolist()):
                close(served[name][n], value[n, :length].tolist())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_served_answers_equal_the_in_process_model(server, family):
    url = f"{server['base']}/{family}"
    model = load_checkpoint(server["checkpoints"][family])
    body, (x, lengths) = request_inputs(family)
    status, health = get(f"{url}/healthz")
    assert status == 200 and health["node_id"] == ray.get_runtime_context().get_node_id()
    assert {k: health[k] for k in ("status", "model", "version")} == {"status": "ok", "model": f"{family}-0", "version": None}
    status, described = get(f"{url}/v1/model")
    assert status == 200 and described["family"] == family and described["data_dim"] == model.data_dim
    assert [described[k] for k in ("data_kind", "observation", "latent")] == [model.data_kind, model.observation, model.latent]
    assert set(described["parameters"]) == set(model.get_parameters())

    status, scored = post(f"{url}/v1/score", body)
    assert status == 200 and scored["exact"] == model.exact
    steps = model.log_likelihood_steps(x, lengths).detach()
    if model.exact:
        close(scored["log_likelihood"], steps.sum(-1).tolist())
        if lengths is not None:
            for n, length in enumerate(lengths.tolist()):
                close(scored["per_step"][n], steps[n, :length].tolist())
    else:
        seeded = model.log_likelihood_steps(x, lengths, generator=torch.Generator().manual_seed(SCORE_SEED))
        close(scored["log_likelihood"], seeded.sum(-1).tolist())
        assert post(f"{url}/v1/score", body)[1] == scored, "the same request gets the same bound"

    observed = observed_values(x, lengths).tolist()
    assert scored["observed_values"] == observed
    for method in ("decode", "posterior"):
        status, served = post(f"{url}/v1/{method}", body)
        assert status == 200
        same_fields(served, getattr(model, method)(x, lengths), lengths, observed)

    status, sampled = post(f"{url}/v1/sample", {"num_sequences": 2, "length": 5, "seed": 3})
    x_sampled, z_sampled = model.sample(2, 5, seed=3)
    assert status == 200
    close(sampled["sequences"], x_sampled.tolist())
    close(sampled["states"], z_sampled.tolist())


def test_the_application_builder_of_serve_configs_serves_the_same_model(server):
    """``serve.app:build_app``, as a Serve config file or KubeRay's RayService runs it."""
    checkpoint = str(server["checkpoints"]["hmm"])
    serve.run(build_app(AppArgs(model=checkpoint, max_batch_size=4)), name="built", route_prefix="/built")
    body, _ = request_inputs("hmm")
    built = post(f"{server['base']}/built/v1/score", body)
    assert built == post(f"{server['base']}/hmm/v1/score", body) and built[0] == 200
    serve.delete("built")


def test_concurrent_requests_are_batched_and_answered_as_one_by_one(server):
    url = f"{server['base']}/hmm/v1/score"
    split = load_dataset("synthetic-hmm", num_sequences=40, seed=5).splits["test"]
    bodies = [{"sequences": [split.x[n, : int(split.lengths[n])].tolist()]} for n in range(8)]
    alone = [post(url, body)[1] for body in bodies]
    together: list = [None] * len(bodies)

    def send(i: int) -> None:
        together[i] = post(url, bodies[i])[1]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    eps = torch.finfo(torch.float32).eps
    for a, b in zip(alone, together):  # within float32 rounding (serve.app's docstring)
        scale = sum(abs(step) for step in a["per_step"][0])
        assert max(abs(x - y) for x, y in zip(a["per_step"][0], b["per_step"][0])) <= 4 * eps * scale
        assert abs(a["log_likelihood"][0] - b["log_likelihood"][0]) <= 4 * eps * scale


BAD_REQUESTS = [
    ("score", b'{"sequences": [[[0, 1, 0', 400, "malformed JSON"),
    ("score", [], 400, "body: expected a JSON object"),
    ("score", {}, 422, "sequences: missing"),
    ("score", {"sequences": []}, 422, "sequences: expected a non-empty list"),
    ("score", {"sequences": [[]]}, 422, "sequences[0]: expected a non-empty list of frames"),
    ("score", {"sequences": [[[0] * 8], [[0] * 8, [0] * 7]]}, 422, "sequences[1][1]: expected 8 values, got 7"),
    ("decode", {"sequences": [[[0] * 7 + ["a"]]]}, 422, "sequences[0][0][7]: expected a number"),
    ("score", {"sequences": [[[0] * 7 + [0.5]]]}, 422, "expected 0 or 1 for a Bernoulli model"),
    ("posterior", b'{"sequences": [[[0, 0, 0, 0, 0, 0, 0, 1e400]]]}', 400, "number is infinity when parsed as double: line 1 column 39"),
    ("posterior", {"sequences": [[[0] * 7 + [math.nan]]]}, 400, "unexpected character, expected a JSON value: line 1 column 39"),
    ("score", {"sequences": [[[0] * 8]], "comment": "x" * 1000}, 422, "'comment': unknown field"),
    ("sample", {"num_sequences": 1, "length": 2, "extra": 1}, 422, "'extra': unknown field"),
    ("score", {"sequences": [[[0] * 8]] * 513}, 413, "the limit is 512"),
    ("sample", {"num_sequences": 0, "length": 3}, 422, "num_sequences: expected an integer"),
    ("sample", {"num_sequences": 2}, 422, "length: missing"),
    ("sample", {"num_sequences": 500, "length": 10000}, 413, "frames; the limit"),
    # never a 500: nesting past 1,024 (bare and in a body), integers of 401 and 5,000
    # digits (beyond a float64), and a boolean is no number
    ("score", b"[" * 10_000 + b"]" * 10_000, 400, "depth limit exceeded"),
    ("score", b'{"sequences": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", 400, "depth limit exceeded"),
    ("score", b'{"sequences": [[[' + b"1" * 5000 + b"]]]}", 400, "number is infinity"),
    ("score", {"sequences": [[[0] * 7 + [10**400]]]}, 400, "number is infinity"),
    ("decode", {"sequences": [[[0] * 7 + [True]]]}, 422, "sequences[0][0][7]: expected a number, got True"),
    ("sample", {"num_sequences": 10**400, "length": 3}, 400, "number is infinity when parsed as double: line 1 column 19"),
    ("sample", {"num_sequences": 10**18, "length": 3}, 422, "num_sequences: expected an integer from 1 to 512"),
]


@pytest.mark.parametrize("method, body, status, detail", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_that_says_what_and_where(server, method, body, status, detail):
    url = f"{server['base']}/hmm"
    answer_status, answer = post(f"{url}/v1/{method}", body)
    assert answer_status == status and detail in answer["detail"], answer
    assert get(f"{url}/healthz")[0] == 200


OBSERVATION_REQUESTS = [
    ("categorical-hmm", [[0, 0, 1, 0, 0, 0], [0, 1, 1, 0, 0, 0]], "sequences[0][1]: expected one 1 among 6 values (a one-hot symbol), got 2"),
    ("categorical-hmm", [[0, 0, 0, 0, 0, 0]], "sequences[0][0]: expected one 1 among 6 values (a one-hot symbol), got 0"),
    ("categorical-hmm", [[0, 0, 2, 0, 0, 0]], "sequences[0][0][2]: expected 0 or 1 in a one-hot frame"),
    ("categorical-hmm", [3, 1], "sequences[0][0]: expected a list of 6 numbers, got int"),
    ("poisson-hmm", [[1, 0, 2], [1.5, 0, 2]], "sequences[0][1][0]: expected a non-negative integer count, got 1.5"),
    ("poisson-hmm", [[-1, 0, 2]], "sequences[0][0][0]: expected a non-negative integer count, got -1"),
]


@pytest.mark.parametrize("family, frames, detail", OBSERVATION_REQUESTS)
def test_symbols_and_counts_are_checked_where_they_are_wrong(server, family, frames, detail):
    """One-hot symbols and counts (the families' declared observation kinds): a 422 that
    says what and where; well-formed ones are answered."""
    url = f"{server['base']}/{family}"
    status, answer = post(f"{url}/v1/score", {"sequences": [frames]})
    assert status == 422 and detail in answer["detail"], answer
    width = 6 if family == "categorical-hmm" else 3
    good = [[1] + [0] * (width - 1), [0, 1] + [0] * (width - 2)]
    assert post(f"{url}/v1/score", {"sequences": [good]})[0] == 200


def with_nulls(family: str, body: dict) -> dict:
    """``body`` with values made null: a value and a whole frame (point) of the first item,
    and every frame of the second sequence (one-hot symbols: whole frames only)."""
    key = next(iter(body))
    items = [[list(frame) for frame in item] for item in body[key]] if key == "sequences" else [list(p) for p in body[key]]
    if key == "points":
        items[0][0], items[1] = None, [None] * len(items[1])
        return {key: items}
    first = items[0]
    first[0] = [None] * len(first[0])
    if family != "categorical-hmm":
        first[1][0] = None
    items[1] = [[None] * len(frame) for frame in items[1]]
    return {key: items}


@pytest.mark.parametrize("family", ["hmm", "gaussian-hmm", "categorical-hmm", "poisson-hmm", "gmm", "dmm"])
def test_null_values_are_missing_and_answered_as_in_process(server, family):
    """Nulls are missing values, integrated out: the answers equal the in-process model's
    on the frames with NaN there, a frame of nulls and a sequence of only nulls included,
    and say how many values each item had; a bad value beside a null is still a 422 that
    says where."""
    url = f"{server['base']}/{family}"
    model = load_checkpoint(server["checkpoints"][family])
    body, (x, lengths) = request_inputs(family)
    body = with_nulls(family, body)
    holey = x.clone()
    for n, item in enumerate(body[model.data_kind]):
        for t, frame in enumerate(item if lengths is not None else [item]):
            for d, value in enumerate(frame):
                if value is None:
                    holey[(n, t, d) if lengths is not None else (n, d)] = math.nan
    status, scored = post(f"{url}/v1/score", body)
    assert status == 200, scored
    observed = observed_values(holey, lengths).tolist()
    assert scored["observed_values"] == observed and observed[1] == 0
    generator = None if model.exact else torch.Generator().manual_seed(SCORE_SEED)
    steps = model.log_likelihood_steps(holey, lengths, **({} if model.exact else {"generator": generator})).detach()
    close(scored["log_likelihood"], steps.sum(-1).tolist())
    if model.exact:
        for method in ("decode", "posterior"):
            status, served = post(f"{url}/v1/{method}", body)
            assert status == 200
            same_fields(served, getattr(model, method)(holey, lengths), lengths, observed)
    key = model.data_kind
    bad = json.loads(json.dumps(body))
    if key == "points":
        bad[key][0][1], where = "x", "points[0][1]"
    else:
        bad[key][0][2][0], where = "x", "sequences[0][2][0]"
    status, refused = post(f"{url}/v1/score", bad)
    assert status == 422 and refused["detail"].startswith(where), refused


def test_a_family_that_takes_no_missing_values_refuses_a_null_where_it_is(server):
    body, _ = request_inputs("arhmm")
    body["sequences"][1][2][3] = None
    status, refused = post(f"{server['base']}/arhmm/v1/score", body)
    assert status == 422 and refused["detail"].startswith("sequences[1][2][3]: null (missing) is a value this family cannot take"), refused
    assert get(f"{server['base']}/arhmm/v1/model")[1]["missing_values"] is False
    assert get(f"{server['base']}/hmm/v1/model")[1]["missing_values"] is True


def test_non_finite_answers_are_written_as_pythons_json_writes_them(server):
    """A finite but extreme frame gives an exact log-likelihood of -inf in float32: every
    route writes it as ``-Infinity`` (a union answer too), never as null."""
    data_dim = load_checkpoint(server["checkpoints"]["gaussian-hmm"]).data_dim
    body = {"sequences": [[[1e30] * data_dim]]}
    url = f"{server['base']}/gaussian-hmm"
    expected = {"log_likelihood": [-math.inf], "per_step": [[-math.inf]], "exact": True, "observed_values": [data_dim]}
    assert post(f"{url}/v1/score", body) == (200, expected)
    status, decoded = post(f"{url}/v1/decode", body)
    assert status == 200 and decoded["log_joint"] == [-math.inf]


def test_the_answer_models_have_the_fields_of_the_contracts_results():
    """The JSON keys of an answer are the field names of the model's named result; an
    answer about given inputs adds ``observed_values``, a score ``exact`` (and ``pvalues``
    when asked: serve.monitor)."""
    pairs = [(Scores, ScoreAnswer), (StatePath, StatePathAnswer), (LatentPath, LatentPathAnswer),
             (Marginals, MarginalsAnswer), (GaussianPosterior, GaussianPosteriorAnswer), (Samples, SampleAnswer)]
    for result, answer in pairs:
        observed = [] if result is Samples else ["observed_values"]
        extra = ["exact", "pvalues"] if result is Scores else []
        assert sorted(answer.model_fields) == sorted([*result._fields, *observed, *extra])


def resolved(document: dict, schema: dict) -> dict:
    """The component a ``$ref`` names, or ``schema`` itself."""
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def has_fields(document: dict, schema: dict) -> bool:
    """A schema with properties, itself, through its ``$ref`` or in every option of its ``anyOf``."""
    schema = resolved(document, schema)
    if "anyOf" in schema:
        return all(has_fields(document, option) for option in schema["anyOf"])
    return bool(schema.get("properties"))


def test_openapi_declares_every_request_body_and_answer(server):
    url = f"{server['base']}/hmm"
    status, document = get(f"{url}/openapi.json")
    assert status == 200
    gets = [("get", f"/{path}") for path in ("healthz", "v1/model", "v1/shadow", "v1/monitor")]
    routes = [*gets, *(("post", f"/v1/{method}") for method in METHODS + STREAM_METHODS)]
    assert {(m, p) for p, operations in document["paths"].items() for m in operations} == set(routes)
    for method, path in routes:
        operation = document["paths"][path][method]
        answer = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in answer and has_fields(document, answer), (method, path, answer)
        if method == "post":
            body = operation["requestBody"]["content"]["application/json"]["schema"]
            assert has_fields(document, body), (path, body)
            problem = resolved(document, operation["responses"]["422"]["content"]["application/json"]["schema"])
            assert set(problem["properties"]) == {"detail"}
    score_body = document["paths"]["/v1/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    bodies = [resolved(document, option) for option in score_body["anyOf"]]
    assert [set(b["properties"]) for b in bodies] == [{"sequences", "pvalues"}, {"points", "pvalues"}]
    assert bodies[0]["properties"]["sequences"]["maxItems"] == MAX_SEQUENCES
    with urllib.request.urlopen(f"{url}/docs", timeout=30) as page:
        assert page.status == 200 and b"swagger" in page.read().lower()


def test_hot_swap_under_load_fails_no_request(server):
    first = server["checkpoints"]["hmm"]
    second = trained_checkpoint(server["directory"], "hmm", seed=1, epochs=3)
    url = f"{server['base']}/swap/v1/score"
    serve.run(deployment(ServeOptions(model=str(first), tracking_uri=""), {"source": str(first), "tracking_uri": ""}),
              name="swap", route_prefix="/swap")
    body, (x, lengths) = request_inputs("hmm")
    expected = {str(p): load_checkpoint(p).log_likelihood(x, lengths).sum().item() for p in (first, second)}
    seen, failures, stop = [], [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, answer = post(url, body)
            if status != 200:
                failures.append(answer)
            else:
                seen.append(sum(answer["log_likelihood"]))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    serve.run(deployment(ServeOptions(model=str(second), tracking_uri=""), {"source": str(second), "tracking_uri": ""}),
              name="swap", route_prefix="/swap")
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join()
    assert not failures
    assert seen[0] == pytest.approx(expected[str(first)], rel=1e-5)
    assert seen[-1] == pytest.approx(expected[str(second)], rel=1e-5)
    assert all(v == pytest.approx(expected[str(first)], rel=1e-5) or v == pytest.approx(expected[str(second)], rel=1e-5) for v in seen)
    serve.delete("swap")


GUARDED = BodyLimits(max_bytes=100_000, timeout_s=2.0)  # limits short enough to test


@pytest.fixture(scope="module")
def guarded(server):
    """The hmm checkpoint behind ``GUARDED``, at ``/guarded``; yields a raw-HTTP sender."""
    source = str(server["checkpoints"]["hmm"])
    options = ServeOptions(model=source, tracking_uri="", body_limits=GUARDED)
    serve.run(deployment(options, {"source": source, "tracking_uri": ""}), name="guarded", route_prefix="/guarded")
    yield partial(raw_http, server["port"])
    serve.delete("guarded")


def raw_http(port: int, head: str, body: bytes = b"", close_after: bool = False, timeout: float = 30):
    """Send ``head`` (request line and headers, CRLF-joined by this function) and ``body``
    exactly as given on a new connection; the answer's ``(status, headers, body)``, or
    None if the server closed the connection without one. ``close_after`` shuts the
    sending side at once, as a client that gives up mid-body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(wire(head) + body)
        if close_after:
            connection.shutdown(socket.SHUT_WR)
        response = http.client.HTTPResponse(connection)
        try:
            response.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError):
            return None
        return response.status, dict(response.getheaders()), response.read()


def wire(head: str) -> bytes:
    """``head`` as sent: CRLF line ends, and the empty line that ends the headers."""
    return head.replace("\n", "\r\n").encode() + b"\r\n"


def post_head(path: str, length: int | None, *extra: str) -> str:
    """The head of a POST of a JSON body to ``path``."""
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json", *extra]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return "\n".join(lines) + "\n"


CHUNKED = b"".join(b"%x\r\n%s\r\n" % (10_000, b" " * 10_000) for _ in range(20)) + b"0\r\n\r\n"
HOSTILE = [  # (what, head, body, close_after, statuses, detail)
    ("Content-Length over the limit", post_head("/guarded/v1/score", 10**9), b"", False, {413}, "body: 1000000000 bytes; the limit is 100000"),
    ("a chunked body over the limit", post_head("/guarded/v1/score", None, "Transfer-Encoding: chunked"), CHUNKED, False, {413}, "more than 100000 bytes"),
    ("2 of 100 bytes, then silence", post_head("/guarded/v1/score", 100), b'{"', False, {408}, "body: 2 of 100 bytes arrived in 2.0 s"),
    ("2 of 100 bytes, then the client leaves", post_head("/guarded/v1/score", 100), b'{"', True, {None}, ""),
    ("5,000 headers", post_head("/guarded/v1/score", 2, *(f"X-{i}: {i}" for i in range(5000))), b"{}", False, {431}, "headers; the limit is 64"),
    ("an 8 MB header", post_head("/guarded/v1/score", 2, "X-Big: " + "a" * 8_000_000), b"{}", False, {431}, "bytes; the limit is 16384"),
    ("a 1,000-character request id", post_head("/guarded/v1/score", 2, "X-Request-Id: " + "r" * 1000), b"{}", False, {431}, "x-request-id: 1000 characters"),
    ("/healthz/ with a foreign Host", "GET /guarded/healthz/ HTTP/1.1\nHost: evil.example\n", b"", False, {404}, ""),
]


@pytest.mark.parametrize("what, head, body, close_after, statuses, detail", HOSTILE, ids=[case[0] for case in HOSTILE])
def test_hostile_http_gets_a_4xx_or_a_closed_connection(guarded, server, what, head, body, close_after, statuses, detail):
    answer = guarded(head, body, close_after)
    status = None if answer is None else answer[0]
    assert status in statuses, (what, answer)
    if answer is not None:
        _, headers, content = answer
        assert "location" not in {name.lower() for name in headers}, headers
        assert all(len(value) <= MAX_REQUEST_ID for name, value in headers.items() if name.lower() == "x-request-id")
        assert detail in json.loads(content)["detail"], content
    assert get(f"{server['base']}/guarded/healthz")[0] == 200


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def test_slow_bodies_do_not_starve_the_server(server):
    """80 connections hold half-sent bodies for 15 s (more than Serve's default of 64
    ongoing requests per replica; a deployment that gives bodies 30 s to arrive, so all
    80 stay pending) while ``/healthz`` and a small score keep answering."""
    source = str(server["checkpoints"]["hmm"])
    options = ServeOptions(model=source, tracking_uri="", body_limits=BodyLimits(timeout_s=30))
    serve.run(deployment(options, {"source": source, "tracking_uri": ""}), name="patient", route_prefix="/patient")
    body, _ = request_inputs("hmm")
    url = f"{server['base']}/patient"
    held = []
    for _ in range(80):
        connection = socket.create_connection(("127.0.0.1", server["port"]), timeout=30)
        connection.sendall(wire(post_head("/patient/v1/score", 100)) + b'{"')
        held.append(connection)
    try:
        deadline = time.time() + 15
        while time.time() < deadline:
            for probe in (partial(get, f"{url}/healthz"), partial(post, f"{url}/v1/score", body)):
                seconds, (status, _) = timed(probe)
                assert status == 200 and seconds < 2.0, seconds
    finally:
        for connection in held:
            connection.close()
        serve.delete("patient")


def test_a_large_request_does_not_hold_a_small_one(server):
    """During one score of ``MAX_FRAMES`` frames (one sequence: the engine's slowest case),
    5-frame scores answer within 2 s each."""
    data_dim = load_checkpoint(server["checkpoints"]["gaussian-hmm"]).data_dim
    rng = np.random.default_rng(0)
    large = {"sequences": [rng.normal(size=(MAX_FRAMES, data_dim)).round(6).tolist()]}
    small = {"sequences": [rng.normal(size=(5, data_dim)).tolist()]}
    url = f"{server['base']}/gaussian-hmm/v1/score"
    answers: list = []
    sender = threading.Thread(target=lambda: answers.append(post(url, large, timeout=300)))
    sender.start()
    waits = []
    while sender.is_alive():
        seconds, (status, _) = timed(post, url, small)
        assert status == 200
        waits.append(seconds)
    sender.join()
    status, scored = answers[0]
    assert status == 200 and len(scored["per_step"][0]) == MAX_FRAMES
    assert len(waits) >= 3 and max(waits) < 2.0, waits


LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}
# what Ray 2.60 binds to every interface whatever it is told (README, "Security and
# limits"): each Serve replica's inter-deployment gRPC server, on "[::]:0"
RAYS_OWN = ("ray::ServeReplica",)


def listening_addresses(pid: int) -> list[tuple[str, int, str]]:
    """(address, port, process name) of every listening socket of ``pid`` and its descendants."""
    root = psutil.Process(pid)
    found = []
    for process in [root, *root.children(recursive=True)]:
        try:
            sockets = process.net_connections(kind="inet")
            found += [(s.laddr.ip, s.laddr.port, process.name()) for s in sockets if s.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            continue
    return found


def test_pyrosweep_serve_exits_cleanly_on_sigterm(tmp_path):
    checkpoint = trained_checkpoint(tmp_path, "gmm")
    port = free_port()
    env = {**os.environ, "PYROSWEEP_HOME": str(tmp_path / "home")}
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "serve", "--model", str(checkpoint), "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            time.sleep(1)
            try:
                if get(f"http://127.0.0.1:{port}/healthz")[0] == 200:
                    break
            except OSError:
                continue
        status, _ = post(f"http://127.0.0.1:{port}/v1/score", {"points": [[0.0, 1.0]]})
        assert status == 200, (tmp_path / "serve.log").read_text()
        listening = listening_addresses(process.pid)  # Ray's processes as well as Serve's
        exposed = [item for item in listening if item[0] not in LOOPBACK and not item[2].startswith(RAYS_OWN)]
        assert len(listening) > 5 and exposed == [], listening
        body = tmp_path / "body.json"
        body.write_text(json.dumps({"points": [[0.0, 1.0], [2.0, -1.0]]}))
        query = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "query", "decode", "--url", f"http://127.0.0.1:{port}", "--input", str(body)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert query.returncode == 0, query.stderr
        assert len(json.loads(query.stdout)["states"]) == 2
        table = tmp_path / "points.csv"
        table.write_text("x,y\n0.0,1.0\n,-1.0\n")  # a gap: missing, integrated out
        query = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "query", "score", "--url", f"http://127.0.0.1:{port}",
             "--input", str(table), "--points"],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert query.returncode == 0, query.stderr
        assert json.loads(query.stdout)["observed_values"] == [2, 1]
        body.write_text(json.dumps({"points": [[0.0]]}))
        refused = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "query", "score", "--url", f"http://127.0.0.1:{port}", "--input", str(body)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert refused.returncode == 2 and "422: points[0]: expected 2 values, got 1" in refused.stderr
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the port is closed"
    time.sleep(2)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


# Streams (/v1/filter, /v1/forecast) and monitoring (p-values, /v1/monitor, Prometheus),
# against the batch answers of the same model in float64 and direct computations from its
# parameters. Besides the module's apps: the hmm by two replicas (/hmm-streams), a second
# hmm version (/hmm-v2), both under one stream key (a fleet's), and the hmm with a
# reference of its own draws (/hmm-ref).
LAG = 3
FLEET_KEY = "one key for the stream apps"
REFERENCE_SEED, HELD_OUT_SEED = 11, 12  # draws from the hmm behind its reference, and new ones
F32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def streams(server):
    """The stream apps beside the module's; yields ``server``'s dict with their checkpoints."""
    directory = server["directory"]
    checkpoints = {"hmm-streams": server["checkpoints"]["hmm"], "hmm-v2": trained_checkpoint(directory, "hmm", seed=1),
                   "hmm-ref": shutil.copytree(server["checkpoints"]["hmm"], directory / "hmm-ref")}
    model = load_checkpoint(checkpoints["hmm-ref"])
    x, _ = model.sample(100, 10, seed=REFERENCE_SEED)
    write_reference(model, x, torch.full((100,), 10), checkpoints["hmm-ref"])
    for name, source in checkpoints.items():
        options = ServeOptions(model=str(source), tracking_uri="", replicas=2 if name == "hmm-streams" else 1, stream_key=FLEET_KEY)
        serve.run(deployment(options, {"source": str(source), "tracking_uri": ""}), name=name, route_prefix=f"/{name}")
    yield {**server, "checkpoints": {**server["checkpoints"], **checkpoints}}
    for name in checkpoints:
        serve.delete(name)


def sequence(family: str) -> list[list[float | None]]:
    """The longest test sequence of the family's data set, as JSON frames."""
    body, _ = request_inputs(family)
    return max(body["sequences"], key=len)


def streamed(url: str, frames: list, chunk: int, lag: int | None = LAG) -> dict[str, list]:
    """``frames`` sent to ``url``'s ``/v1/filter`` in chunks of ``chunk``: the answers'
    fields joined, and the replicas that answered."""
    joined = {"filtered": [], "per_step": [], "smoothed": [], "replicas": []}
    state = None
    for start in range(0, len(frames), chunk):
        body = {"frames": frames[start : start + chunk], **({"state": state} if state else {"lag": lag})}
        request = urllib_request(f"{url}/v1/filter", body)
        with request as response:
            answer = json.load(response)
            joined["replicas"].append(response.headers["x-pyrosweep-replica"])
        assert answer["frames_seen"] == min(start + chunk, len(frames)) and answer["lag"] == (lag or 0)
        for name in ("filtered", "per_step", "smoothed"):
            joined[name] += answer[name]
        state = answer["state"]
    joined["state"] = state
    return joined


def urllib_request(url: str, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=60)


def as_x(frames: list) -> torch.Tensor:
    """JSON frames (null: missing) as ``x`` ``(1, T, D)`` float64, NaN where missing."""
    return torch.tensor([[np.nan if v is None else v for v in frame] for frame in frames], dtype=torch.float64)[None]


def prefixes(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prefix ``x[:, :t+1]`` of one sequence ``(1, T, D)`` as a batch ``(T, T, D)`` with lengths."""
    T = x.shape[1]
    batch = x.expand(T, -1, -1).clone()
    return batch, torch.arange(1, T + 1)


@pytest.mark.parametrize("family", ["hmm", "arhmm", "gaussian-hmm"])
def test_chunks_of_any_size_give_the_batch_answers(streams, family):
    """Chunks of 1, 7 and all frames give the same filtered probabilities, increments and
    fixed-lag marginals, equal to the float64 batch answers: per_step to the score's
    steps, filtered to the posterior of each prefix at its last frame, smoothed to it at
    frame t - lag; and to the served (float32) score within its rounding."""
    url = f"{streams['base']}/{family}"
    frames = sequence(family)
    if family == "gaussian-hmm":  # missing values, integrated out exactly
        frames = [[None, frame[1]] if t % 4 == 1 else frame for t, frame in enumerate(frames)]
    runs = [streamed(url, frames, chunk) for chunk in (1, 7, len(frames))]
    for run in runs[1:]:
        for name in ("filtered", "per_step", "smoothed"):
            np.testing.assert_allclose(run[name], runs[0][name], rtol=0, atol=1e-9)

    model = load_checkpoint(streams["checkpoints"][family]).double()
    x = as_x(frames)
    T = x.shape[1]
    steps = model.log_likelihood_steps(x, torch.tensor([T]))[0].detach()
    np.testing.assert_allclose(runs[0]["per_step"], steps.tolist(), rtol=0, atol=1e-9)
    marginals = model.posterior(*prefixes(x)).marginals  # (T prefixes, T, K)
    ends = torch.arange(T)
    np.testing.assert_allclose(runs[0]["filtered"], marginals[ends, ends].tolist(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(runs[0]["smoothed"], marginals[ends[LAG:], ends[:-LAG]].tolist(), rtol=0, atol=1e-9)

    status, scored = post(f"{url}/v1/score", {"sequences": [frames]})
    assert status == 200
    scale = float(steps.detach().abs().sum())
    assert abs(scored["log_likelihood"][0] - sum(runs[0]["per_step"])) <= 8 * F32 * scale


def test_chunks_answered_by_either_replica_agree(streams):
    """One stream's chunks go to whichever replica Serve picks (no sticky sessions): both
    answer it, with the same results as one request."""
    url = f"{streams['base']}/hmm-streams"
    frames = sequence("hmm")
    chunked = streamed(url, frames * 3, 1)
    assert len(set(chunked["replicas"])) == 2, chunked["replicas"]
    whole = streamed(url, frames * 3, len(frames) * 3)
    for name in ("filtered", "per_step", "smoothed"):
        np.testing.assert_allclose(chunked[name], whole[name], rtol=0, atol=1e-9)


def test_tokens_are_bound_to_the_version_and_the_key(streams):
    frames = sequence("hmm")
    status, first = post(f"{streams['base']}/hmm-streams/v1/filter", {"frames": frames[:3]})
    assert status == 200
    token = first["state"]
    status, answer = post(f"{streams['base']}/hmm-v2/v1/filter", {"frames": frames[3:5], "state": token})
    assert status == 409 and "made by model" in answer["detail"], answer  # another version, the same key
    payload, signature = token.split(".")
    tampered = payload[:10] + ("A" if payload[10] != "A" else "B") + payload[11:]
    for bad in (f"{tampered}.{signature}", f"{payload}.{signature[::-1]}", "not-a-token", ""):
        status, answer = post(f"{streams['base']}/hmm-streams/v1/filter", {"frames": frames[3:5], "state": bad})
        assert status == 409 and "not a token this server signed" in answer["detail"], answer
    status, answer = post(f"{streams['base']}/hmm-streams/v1/filter", {"frames": frames[3:5], "state": token, "lag": 2})
    assert status == 422 and "this stream's lag is 0" in answer["detail"]
    assert post(f"{streams['base']}/hmm-streams/v1/filter", {"frames": frames[3:5], "state": token})[0] == 200


def test_a_signed_token_from_another_deployment_key_is_refused(streams):
    """The same checkpoint behind another key (another server of no fleet): 409."""
    source = str(streams["checkpoints"]["hmm"])
    options = ServeOptions(model=source, tracking_uri="", stream_key="another key")
    serve.run(deployment(options, {"source": source, "tracking_uri": ""}), name="other-key", route_prefix="/other-key")
    frames = sequence("hmm")
    token = post(f"{streams['base']}/hmm/v1/filter", {"frames": frames[:3]})[1]["state"]
    status, answer = post(f"{streams['base']}/other-key/v1/filter", {"frames": frames[3:], "state": token})
    serve.delete("other-key")
    assert status == 409 and "signed by another deployment's key" in answer["detail"]


BAD_STREAMS = [
    ("hmm", "filter", {}, 422, "body: expected a JSON object with 'frames'"),
    ("hmm", "filter", {"frames": []}, 422, "frames: expected a non-empty list"),
    ("hmm", "filter", {"frames": [[0] * 7]}, 422, "frames[0]: expected 8 values, got 7"),
    ("hmm", "filter", {"frames": [[0] * 8], "lag": 101}, 422, "lag: input should be less than or equal to 100"),
    ("hmm", "filter", {"frames": [[0] * 8], "state": 3}, 422, "state: input should be a valid string"),
    ("hmm", "filter", {"frames": [[0] * 8], "window": 3}, 422, "window: unknown field"),
    ("hmm", "forecast", {"horizon": 2}, 422, "frames: missing"),
    ("hmm", "forecast", {"frames": [[0] * 8], "horizon": 0}, 422, "horizon: input should be greater than or equal to 1"),
    ("hmm", "forecast", {"frames": [[0] * 8], "horizon": 1000, "num_samples": 1000}, 413, "the limit is"),
    ("dmm", "filter", {"frames": [[0] * 8]}, 422, "dmm: its latents are continuous"),
    ("gmm", "forecast", {"frames": [[0, 0]], "horizon": 1}, 422, "gmm: a model of points"),
]


@pytest.mark.parametrize("family, method, body, status, detail", BAD_STREAMS)
def test_bad_stream_requests_get_a_4xx_that_says_what(streams, family, method, body, status, detail):
    url = f"{streams['base']}/{family}"
    answer_status, answer = post(f"{url}/v1/{method}", body)
    assert answer_status == status and detail in answer["detail"], answer
    assert get(f"{url}/healthz")[0] == 200


def direct_forecast(params: dict, filtered: np.ndarray, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """State probabilities ``(H, K)`` and key probabilities ``(H, D)`` from the parameters
    of an ``hmm`` (``/v1/model``) and the filtering distribution at the last frame."""
    transition, emission = np.array(params["transition"]), np.array(params["emission_probs"])
    probs = [filtered @ transition]
    for _ in range(1, horizon):
        probs.append(probs[-1] @ transition)
    probs = np.stack(probs)
    return probs, probs @ emission


def test_forecasts_equal_a_direct_computation_from_the_parameters(streams):
    url = f"{streams['base']}/hmm"
    params = get(f"{url}/v1/model")[1]["parameters"]
    frames = sequence("hmm")
    filtered = np.array(streamed(url, frames, len(frames), lag=None)["filtered"][-1])
    for horizon in range(1, 6):
        status, answer = post(f"{url}/v1/forecast", {"frames": frames, "horizon": horizon})
        assert status == 200 and answer["mean_exact"] and "samples" not in answer
        probs, mean = direct_forecast(params, filtered, horizon)
        tolerance = 64 * F32  # the served parameters are float32
        np.testing.assert_allclose(answer["state_probs"], probs, rtol=0, atol=tolerance)
        np.testing.assert_allclose(answer["mean"], mean, rtol=0, atol=tolerance)
    token = post(f"{url}/v1/filter", {"frames": frames})[1]["state"]
    from_state = post(f"{url}/v1/forecast", {"state": token, "horizon": 5})[1]
    assert from_state["frames_seen"] == len(frames)
    np.testing.assert_allclose(from_state["state_probs"], answer["state_probs"], rtol=0, atol=1e-12)


def test_forecast_samples_are_seeded_and_follow_the_forecast(streams):
    url = f"{streams['base']}/hmm"
    frames = sequence("hmm")
    body = {"frames": frames, "horizon": 3, "num_samples": 1000, "seed": 7}
    first, again = post(f"{url}/v1/forecast", body)[1], post(f"{url}/v1/forecast", body)[1]
    other = post(f"{url}/v1/forecast", {**body, "seed": 8})[1]
    samples = np.array(first["samples"])
    assert samples.shape == (1000, 3, 8) and set(np.unique(samples)) <= {0.0, 1.0}
    assert first["samples"] == again["samples"] and first["samples"] != other["samples"]
    # seed 7's draws (fixed): each key's share of ones within 5 standard errors of its mean
    mean = np.array(first["mean"])
    error = np.sqrt(mean * (1 - mean) / 1000)
    assert np.all(np.abs(samples.mean(0) - mean) <= 5 * error + 1e-12)


def test_an_autoregressive_forecast_is_exact_one_step_ahead(streams):
    """arhmm's keys read the previous frame: its first step's mean is exact (given the
    last frame), later ones averages of draws, and it says so."""
    url = f"{streams['base']}/arhmm"
    params = get(f"{url}/v1/model")[1]["parameters"]
    frames = sequence("arhmm")
    filtered = np.array(streamed(url, frames, len(frames), lag=None)["filtered"][-1])
    answer = post(f"{url}/v1/forecast", {"frames": frames, "horizon": 2})[1]
    assert not answer["mean_exact"]
    emission = np.array(params["emission_probs"])  # (K, 2, D)
    last = np.array(frames[-1], dtype=int)
    step = filtered @ np.array(params["transition"])
    mean = step @ emission[:, last, np.arange(len(last))]
    np.testing.assert_allclose(answer["mean"][0], mean, rtol=0, atol=64 * F32)
    assert post(f"{url}/v1/forecast", {"frames": frames, "horizon": 1})[1]["mean_exact"]


def test_the_stream_engine_in_process_equals_the_served_answers(streams):
    """``trainables.streaming`` is what the route runs: the same numbers in process."""
    model = streaming.streaming_model(load_checkpoint(streams["checkpoints"]["hmm"]))
    frames = sequence("hmm")
    chunk = streaming.filter_chunk(model, as_x(frames)[0], streaming.start(model, LAG))
    served = streamed(f"{streams['base']}/hmm", frames, 5)
    np.testing.assert_allclose(served["filtered"], chunk.filtered.tolist(), rtol=0, atol=1e-9)
    np.testing.assert_allclose(served["smoothed"], chunk.smoothed.tolist(), rtol=0, atol=1e-9)


def test_query_filter_streams_a_file_and_prints_a_line_a_frame(streams, tmp_path):
    split = load_dataset("synthetic-hmm", num_sequences=30, seed=9).splits["test"]
    lengths = split.lengths[:2]
    path = tmp_path / "stream.npz"
    np.savez(path, x=split.x[:2, : int(lengths.max())].numpy(), lengths=lengths.numpy())
    command = [sys.executable, "-m", "cluster.cli", "query", "filter", "--url", f"{streams['base']}/hmm",
               "--input", str(path), "--chunk", "4", "--lag", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert [(line["sequence"], line["frame"]) for line in lines] == [(n, t) for n in range(2) for t in range(int(lengths[n]))]
    frames = split.x[0, : int(lengths[0])].tolist()
    whole = streamed(f"{streams['base']}/hmm", frames, len(frames), lag=2)
    first = [line for line in lines if line["sequence"] == 0]
    np.testing.assert_allclose([line["per_step"] for line in first], whole["per_step"], rtol=0, atol=1e-9)
    np.testing.assert_allclose([line["smoothed"] for line in first[2:]], whole["smoothed"], rtol=0, atol=1e-9)
    assert "smoothed" not in first[1]


def test_pvalues_of_frames_like_the_reference_are_uniform_and_drift_is_flagged(streams):
    """hmm-ref's reference: 1,000 frames drawn from the model. New draws get p-values
    about uniform and no drift; then a stream of flipped keys is flagged as drifted
    before it fills the window."""
    url = f"{streams['base']}/hmm-ref"
    model = load_checkpoint(streams["checkpoints"]["hmm-ref"])
    x, _ = model.sample(100, 10, seed=HELD_OUT_SEED)
    status, scored = post(f"{url}/v1/score", {"sequences": x.tolist(), "pvalues": True})
    assert status == 200
    pvalues = np.array(scored["pvalues"]).ravel()
    assert pvalues.shape == (1000,) and np.all((pvalues > 0) & (pvalues <= 1))
    for level in (0.1, 0.25, 0.5, 0.75):  # seeded draws: a fixed outcome, not a chance one
        assert abs(np.mean(pvalues <= level) - level) < 0.06, level
    monitor = get(f"{url}/v1/monitor")[1]
    assert monitor["window"] == 1000 and monitor["reference_frames"] == 1000 and not monitor["drifted"], monitor
    assert monitor["version"] == "hmm-ref"

    flipped = (1 - x[:30]).reshape(-1, x.shape[-1]).tolist()  # 300 frames of one stream
    answer = post(f"{url}/v1/filter", {"frames": flipped, "pvalues": True})[1]
    assert np.median(answer["pvalues"]) < 0.1  # half the flipped frames in the upper 10% tail
    monitor = get(f"{url}/v1/monitor")[1]
    assert monitor["window"] == 1300 < monitor["window_limit"] and monitor["drifted"], monitor
    assert monitor["recent_mean_nll"] > monitor["reference_mean_nll"]


def test_a_model_without_a_reference_says_so_and_its_monitor_reports_none(streams):
    url = f"{streams['base']}/gaussian-hmm"
    body, _ = request_inputs("gaussian-hmm")
    status, answer = post(f"{url}/v1/score", {**body, "pvalues": True})
    assert status == 422 and "has no reference distribution" in answer["detail"]
    assert post(f"{url}/v1/score", {**body, "pvalues": "yes"})[1]["detail"] == "pvalues: expected true or false, got 'yes'"
    assert "pvalues" not in post(f"{url}/v1/score", body)[1]
    status, monitor = get(f"{url}/v1/monitor")
    assert status == 200 and monitor["reference_frames"] == 0 and monitor["statistic"] is None and not monitor["drifted"]
    assert MIN_FRAMES <= monitor["window_limit"]


def test_requests_errors_latency_and_step_nll_reach_the_prometheus_endpoint(streams):
    """Ray exports the replicas' metrics every few seconds: wait for them."""
    url = f"{streams['base']}/hmm"
    body, _ = request_inputs("hmm")
    post(f"{url}/v1/score", body)
    post(f"{url}/v1/score", {})
    wanted = ['ray_pyrosweep_requests_total{', 'route="/v1/score"', 'ray_pyrosweep_errors_total{', 'status="422"',
              'ray_pyrosweep_latency_s_bucket{', 'ray_pyrosweep_step_nll_bucket{']
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(streams["metrics"], timeout=10).read().decode()
        if all(piece in text for piece in wanted):
            break
        time.sleep(2)
    missing = [piece for piece in wanted if piece not in text]
    assert not missing, missing
