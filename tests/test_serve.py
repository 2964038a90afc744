"""Serving over real HTTP: a real Ray Serve app on loopback, real trained checkpoints.

One Ray + Serve instance for the module; each family is deployed as its own app under
``/<family>``, which exercises the same deployment ``pyrosweep serve`` runs at ``/``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import ray
import torch
from ray import serve

from cluster.serving import ServeOptions, deployment
from helpers import free_port, get, post
from serve.app import AppArgs, build_app
from serve.schemas import (
    MAX_SEQUENCES,
    METHODS,
    GaussianPosteriorAnswer,
    LatentPathAnswer,
    MarginalsAnswer,
    SampleAnswer,
    ScoreAnswer,
    StatePathAnswer,
)
from serve.scoring import SCORE_SEED, Scores
from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.contract import GaussianPosterior, LatentPath, Marginals, Samples, StatePath
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.settings import TrainConfig
from trainables.svi import train

pytestmark = pytest.mark.slow

FAMILIES = {
    "hmm": ("synthetic-hmm", {}),
    "gaussian-hmm": ("synthetic-gaussian-hmm", {}),
    "gmm": ("synthetic-gmm", {}),
    "dmm": ("synthetic-hmm", {"emission_dim": 8, "transition_dim": 8, "rnn_dim": 8}),
}


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
    """Every family deployed from a trained checkpoint; yields base URLs and checkpoints."""
    directory = tmp_path_factory.mktemp("checkpoints")
    ray.init(num_cpus=8, include_dashboard=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    checkpoints = {}
    for family in FAMILIES:
        checkpoints[family] = trained_checkpoint(directory, family)
        options = ServeOptions(model=str(checkpoints[family]), tracking_uri="")
        app = deployment(options, {"source": str(checkpoints[family]), "tracking_uri": ""})
        serve.run(app, name=family, route_prefix=f"/{family}")
    yield {"base": f"http://127.0.0.1:{port}", "checkpoints": checkpoints, "directory": directory}
    serve.shutdown()
    ray.shutdown()


def close(a, b):
    torch.testing.assert_close(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def same_fields(served: dict, result, lengths) -> None:
    """``served`` has exactly the fields of the contract ``result``, each equal to it;
    values with a time axis cut to each length."""
    assert set(served) == set(result._fields)
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

    for method in ("decode", "posterior"):
        status, served = post(f"{url}/v1/{method}", body)
        assert status == 200
        same_fields(served, getattr(model, method)(x, lengths), lengths)

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
    for a, b in zip(alone, together):
        close(a["log_likelihood"], b["log_likelihood"])
        close(a["per_step"], b["per_step"])


BAD_REQUESTS = [
    ("score", b'{"sequences": [[[0, 1, 0', 400, "malformed JSON"),
    ("score", [], 400, "body: expected a JSON object"),
    ("score", {}, 422, "sequences: missing"),
    ("score", {"sequences": []}, 422, "sequences: expected a non-empty list"),
    ("score", {"sequences": [[]]}, 422, "sequences[0]: expected a non-empty list of frames"),
    ("score", {"sequences": [[[0] * 8], [[0] * 8, [0] * 7]]}, 422, "sequences[1][1]: expected 8 values, got 7"),
    ("decode", {"sequences": [[[0] * 7 + ["a"]]]}, 422, "sequences[0][0][7]: expected a number"),
    ("score", {"sequences": [[[0] * 7 + [0.5]]]}, 422, "expected 0 or 1 for a Bernoulli model"),
    ("posterior", {"sequences": [[[0] * 7 + [1e400]]]}, 422, "expected a finite number"),
    ("score", {"sequences": [[[0] * 8]] * 513}, 413, "the limit is 512"),
    ("sample", {"num_sequences": 0, "length": 3}, 422, "num_sequences: expected an integer"),
    ("sample", {"num_sequences": 2}, 422, "length: missing"),
    ("sample", {"num_sequences": 500, "length": 10000}, 413, "frames; the limit"),
    # what json and math raise on (never a 500): nesting past the recursion limit, an
    # integer over 4,300 digits, one too large for a float; and a boolean is no number
    ("score", b"[" * 100_000 + b"]" * 100_000, 400, "malformed JSON"),
    ("score", b'{"sequences": [[[' + b"1" * 5000 + b"]]]}", 400, "malformed JSON"),
    ("score", {"sequences": [[[0] * 7 + [10**400]]]}, 422, "sequences[0][0][7]: expected a finite number"),
    ("decode", {"sequences": [[[0] * 7 + [True]]]}, 422, "sequences[0][0][7]: expected a number, got True"),
    ("sample", {"num_sequences": 10**400, "length": 3}, 422, "num_sequences: expected an integer from 1 to 512"),
]


@pytest.mark.parametrize("method, body, status, detail", BAD_REQUESTS)
def test_bad_requests_get_a_4xx_that_says_what_and_where(server, method, body, status, detail):
    url = f"{server['base']}/hmm"
    answer_status, answer = post(f"{url}/v1/{method}", body)
    assert answer_status == status and detail in answer["detail"], answer
    assert get(f"{url}/healthz")[0] == 200


def test_non_finite_answers_are_written_as_pythons_json_writes_them(server):
    """A finite but extreme frame gives an exact log-likelihood of -inf in float32: every
    route writes it as ``-Infinity`` (a union answer too), never as null."""
    data_dim = load_checkpoint(server["checkpoints"]["gaussian-hmm"]).data_dim
    body = {"sequences": [[[1e30] * data_dim]]}
    url = f"{server['base']}/gaussian-hmm"
    assert post(f"{url}/v1/score", body) == (200, {"log_likelihood": [-math.inf], "per_step": [[-math.inf]], "exact": True})
    status, decoded = post(f"{url}/v1/decode", body)
    assert status == 200 and decoded["log_joint"] == [-math.inf]


def test_the_answer_models_have_the_fields_of_the_contracts_results():
    """The JSON keys of an answer are the field names of the model's named result (a score
    adds ``exact``)."""
    pairs = [(Scores, ScoreAnswer), (StatePath, StatePathAnswer), (LatentPath, LatentPathAnswer),
             (Marginals, MarginalsAnswer), (GaussianPosterior, GaussianPosteriorAnswer), (Samples, SampleAnswer)]
    for result, answer in pairs:
        assert list(answer.model_fields) == [*result._fields, *(["exact"] if result is Scores else [])]


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
    routes = [("get", "/healthz"), ("get", "/v1/model"), *(("post", f"/v1/{method}") for method in METHODS)]
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
    assert [set(b["properties"]) for b in bodies] == [{"sequences"}, {"points"}]
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
        body = tmp_path / "body.json"
        body.write_text(json.dumps({"points": [[0.0, 1.0], [2.0, -1.0]]}))
        query = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "query", "decode", "--url", f"http://127.0.0.1:{port}", "--input", str(body)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert query.returncode == 0, query.stderr
        assert len(json.loads(query.stdout)["states"]) == 2
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
