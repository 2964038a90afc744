"""``pyrosweep serve --follow-alias`` and ``--shadow`` as a user runs them: the real command
in a subprocess (its own local Ray and Serve), a real SQLite MLflow registry of three tiny
hmm versions with different parameters, real HTTP on loopback under load from a few
client threads.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from cluster.mlflow_layout import SweepTracker
from cluster.promote import load_sweep_data, register_checkpoint
from helpers import free_port, get
from serve.app import MODEL_HEADER
from serve.pairing import SHADOW_CHAMPION_TAG, SHADOW_KINDS_TAG, SHADOW_TAG
from serve.schemas import write_answer
from serve.scoring import answer
from test_serve import trained_checkpoint
from trainables.checkpoint import load_checkpoint
from trainables.data import load_dataset

pytestmark = pytest.mark.slow

NAME = "follow"
EXAMPLE_DATA = {"name": "synthetic-hmm", "num_sequences": 30, "seed": 0}  # the pyfunc's input example
EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


@dataclass
class Registry:
    uri: str
    client: MlflowClient
    bodies: list[dict]  # score bodies of two test sequences each
    scores: dict[int, list[dict]]  # version -> its in-process score answer of each body


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Registry:
    """Versions 1, 2, 3 of ``NAME``: hmm checkpoints trained from seeds 0, 1, 2."""
    directory = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{directory}/mlflow.db"
    tracker = SweepTracker(uri, "versions")  # an experiment whose artifacts live beside the store
    client, experiment = tracker.client, tracker.experiment_id
    split = load_dataset("synthetic-hmm", num_sequences=60, seed=9).splits["test"]
    sequences = [split.x[n, : int(length)].tolist() for n, length in enumerate(split.lengths[:8])]
    bodies = [{"sequences": sequences[n : n + 2]} for n in range(0, 8, 2)]
    scores = {}
    for version, seed in enumerate((0, 1, 2), start=1):
        checkpoint = trained_checkpoint(directory, "hmm", seed=seed)
        registered = register_checkpoint(client, client.create_run(experiment), str(checkpoint), NAME, load_sweep_data(EXAMPLE_DATA), {})
        assert int(registered.version) == version
        model = load_checkpoint(checkpoint)
        scores[version] = [answer(model, "score", body) for body in bodies]
    return Registry(uri, client, bodies, scores)


@contextmanager
def pyrosweep_serve(tmp_path: Path, registry: Registry, *options: str) -> Iterator[tuple[str, Path]]:
    """``pyrosweep serve --model models:/NAME@champion OPTIONS`` on a free port until the
    block ends (then SIGTERM, as a user's Ctrl-C); yields its base URL and its log."""
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "PYROSWEEP_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "cluster.cli", "serve", "--model", f"models:/{NAME}@champion",
               "--tracking-uri", registry.uri, "--port", str(port), *options]
    server = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and server.poll() is None:
            try:
                if get(f"{base}/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        assert get(f"{base}/healthz")[0] == 200, log.read_text()
        yield base, log
    finally:
        # the server alone: it shuts Serve and its Ray down itself
        server.send_signal(signal.SIGTERM)
        try:
            assert server.wait(timeout=90) == 0, log.read_text()
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)  # anything of it still left
            except ProcessLookupError:
                pass


@dataclass
class Answered:
    started: float
    ended: float
    body: int  # index into Registry.bodies
    status: int
    model: str | None  # the MODEL_HEADER
    text: str


class Load:
    """``clients`` threads posting the bodies in turn to ``/v1/score`` until stopped,
    each paced by ``pause_s`` (unpaced they held both cores and slowed the swaps)."""

    def __init__(self, base: str, bodies: list[dict], clients: int = 3, pause_s: float = 0.02) -> None:
        self.url, self.bodies, self.pause_s = f"{base}/v1/score", [json.dumps(b).encode() for b in bodies], pause_s
        self.answers: list[Answered] = []
        self.stop = threading.Event()
        self.workers = [threading.Thread(target=self._client, args=(k,)) for k in range(clients)]

    def _client(self, k: int) -> None:
        turn = k
        while not self.stop.is_set():
            index = turn % len(self.bodies)
            request = urllib.request.Request(self.url, data=self.bodies[index], headers={"Content-Type": "application/json"})
            started = time.monotonic()
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    status, model, text = response.status, response.headers.get(MODEL_HEADER), response.read().decode()
            except urllib.error.HTTPError as error:
                status, model, text = error.code, None, error.read().decode()
            except OSError as error:
                status, model, text = 0, None, repr(error)
            self.answers.append(Answered(started, time.monotonic(), index, status, model, text))
            turn += 1
            self.stop.wait(self.pause_s)

    def __enter__(self) -> Load:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *_) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join()

    def wait_for(self, model: str, timeout_s: float = 120) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline and not any(a.model == model for a in self.answers[-20:]):
            time.sleep(0.2)
        assert any(a.model == model for a in self.answers), f"no answer from {model}"


def versions_never_go_back(answers: list[Answered]) -> list[tuple[int, int]]:
    """(version seen, version that answered later) for every request answered by an older
    version than one that had already answered before the request started."""
    ended = sorted(answers, key=lambda a: a.ended)
    newest, k, backwards = 0, 0, []
    for request in sorted(answers, key=lambda a: a.started):
        while k < len(ended) and ended[k].ended < request.started:
            newest = max(newest, int(ended[k].model.split("/")[1]))
            k += 1
        if int(request.model.split("/")[1]) < newest:
            backwards.append((newest, int(request.model.split("/")[1])))
    return backwards


def test_the_server_follows_the_alias_under_load_and_no_request_fails(registry, tmp_path):
    registry.client.set_registered_model_alias(NAME, "champion", "1")
    with pyrosweep_serve(tmp_path, registry, "--follow-alias", "--poll-s", "0.5") as (base, log):
        with Load(base, registry.bodies) as load:
            load.wait_for(f"{NAME}/1")
            registry.client.set_registered_model_alias(NAME, "champion", "2")
            load.wait_for(f"{NAME}/2")
            # the alias gone for a few polls: said, and the server keeps serving version 2
            registry.client.delete_registered_model_alias(NAME, "champion")
            time.sleep(2.0)
            registry.client.set_registered_model_alias(NAME, "champion", "3")
            load.wait_for(f"{NAME}/3")
            time.sleep(1.0)
        status, problem = get_problem(f"{base}/v1/shadow")
        assert status == 404 and "--shadow" in problem["detail"]
    printed = log.read_text()
    assert f"swapped to models:/{NAME}/2" in printed and f"swapped to models:/{NAME}/3" in printed, printed
    assert f"follow-alias: could not resolve models:/{NAME}@champion" in printed, printed
    answers = load.answers
    assert [a for a in answers if a.status != 200] == []
    assert {a.model for a in answers} == {f"{NAME}/1", f"{NAME}/2", f"{NAME}/3"}
    for a in answers:  # batched answers: within 4 eps of each sequence's sum |per_step| (serve/app.py)
        expected = registry.scores[int(a.model.split("/")[1])][a.body]
        served = json.loads(a.text)
        for value, wanted, steps in zip(served["log_likelihood"], expected["log_likelihood"], expected["per_step"]):
            assert abs(value - wanted) <= 4 * EPS32 * np.abs(steps).sum(), (a.model, value, wanted)
    assert versions_never_go_back(answers) == []


def get_problem(url: str) -> tuple[int, dict]:
    try:
        return get(url)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_shadow_traffic_leaves_answers_alone_and_reports_the_paired_difference(registry, tmp_path):
    registry.client.set_registered_model_alias(NAME, "champion", "1")
    registry.client.set_registered_model_alias(NAME, "challenger", "2")
    # one request per batch: answers then equal the in-process ones to the last bit
    with pyrosweep_serve(tmp_path, registry, "--shadow", f"models:/{NAME}@challenger", "--max-batch-size", "1") as (base, log):
        status, empty = get(f"{base}/v1/shadow")
        assert status == 200 and (empty["n"], empty["difference"]) == (0, None)
        with Load(base, registry.bodies) as load:
            time.sleep(4.0)
        sent = sum(len(registry.bodies[a.body]["sequences"]) for a in load.answers)
        deadline = time.time() + 60
        while time.time() < deadline and ((report := get(f"{base}/v1/shadow")[1])["pending"] or report["n"] < sent):
            time.sleep(0.2)
    champion, challenger = registry.scores[1], registry.scores[2]
    assert [a for a in load.answers if a.status != 200] == [] and len(load.answers) > 20
    assert all(a.model == f"{NAME}/1" for a in load.answers)
    assert all(a.text == write_answer("score", champion[a.body]) for a in load.answers), "the same JSON, to the byte"
    assert (report["n"], report["dropped"], report["failed"]) == (sent, 0, 0), report
    # challenger NLL minus champion NLL per frame over every sequence answered
    gaps = [c - d for a in load.answers for c, d in zip(champion[a.body]["log_likelihood"], challenger[a.body]["log_likelihood"])]
    frames = sum(len(s) for a in load.answers for s in registry.bodies[a.body]["sequences"])
    assert report["frames"] == frames
    direct = sum(gaps) / frames
    assert abs(report["difference"] - direct) <= len(gaps) * EPS64 * np.abs(gaps).sum() / frames, (report, direct)
    assert report["low"] <= report["difference"] <= report["high"] and report["level"] == 0.95
    assert (report["champion"], report["challenger"]) == (f"{NAME}/1", f"{NAME}/2")
    assert (report["kinds"], report["like_for_like"], report["logged_to"]) == ("exact vs exact", True, f"models:/{NAME}/2")
    # logged when the server stopped: the final report
    tags = registry.client.get_model_version(NAME, "2").tags
    assert tags[f"{SHADOW_TAG}_n"] == str(sent) and tags[SHADOW_CHAMPION_TAG] == f"{NAME}/1", tags
    assert float(tags[SHADOW_TAG]) == report["difference"] and tags[SHADOW_KINDS_TAG] == "exact vs exact"
    assert float(tags[f"{SHADOW_TAG}_low"]) == report["low"] and float(tags[f"{SHADOW_TAG}_high"]) == report["high"]
    assert f"shadow: {NAME}/2 minus {NAME}/1 on {sent} sequences" in log.read_text()


@pytest.mark.parametrize("options, refused", [
    (["--model", f"models:/{NAME}/1", "--follow-alias"], "--follow-alias follows a registry alias"),
    (["--model", "some/checkpoint", "--follow-alias"], "--follow-alias follows a registry alias"),
    (["--model", f"models:/{NAME}@champion", "--follow-alias", "--poll-s", "0"], "--poll-s: expected seconds > 0"),
    (["--model", f"models:/{NAME}@champion", "--shadow", f"models:/{NAME}@challenger", "--shadow-fraction", "1.5"],
     "--shadow-fraction: expected 0 < F <= 1"),
])
def test_options_that_cannot_be_served_are_refused_before_ray_starts(tmp_path, options, refused):
    result = subprocess.run([sys.executable, "-m", "cluster.cli", "serve", *options], capture_output=True, text=True,
                            env={**os.environ, "PYROSWEEP_HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 2 and refused in result.stderr, result.stderr
    assert "logs:" not in result.stdout, "refused before the log file (and Ray)"
