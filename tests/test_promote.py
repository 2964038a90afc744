"""Promotion end to end: two real tiny sweeps on a local Ray into a real SQLite MLflow store,
then promote, rollback, the registry loader and the pyfunc, outside Ray.

Ray is only up while the module's sweeps run; everything after works on the store alone.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import ray
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cluster.cli import main
from cluster.promote import (
    AGREEMENT_TAG, ALIGNED_TAG, ORDER_TAG, PREVIOUS_TAG, REFERENCE_TAG, VERSUS_TAG, PromotionRefused,
    add_promote_arguments, cmd_promote, example_body, load_sweep_data, promote, rollback,
)
from cluster.sweep import run_sweep
from cluster.sweep_file import load_sweep_file
from cluster.mlflow_layout import PARENT_TAG, SweepTracker
from serve.pyfunc_model import request_body
from serve.monitor import reference_nll
from serve.registry import load_model_version, load_reference, parse_model_uri, resolve_version
from serve.errors import RequestError
from serve.scoring import answer
from trainables.data import load_dataset
from trainables.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

EXPERIMENT = "promote-hmm"
DATA = {"name": "synthetic-hmm", "num_sequences": 30, "length": 12, "hidden_dim": 2}
SWEEP = """
name: {name}
model: hmm
data: {{name: synthetic-hmm, num_sequences: 30, length: 12, hidden_dim: 2}}
train: {{epochs: 3, batch_size: 10, patience: 50}}
search:
  hidden_dim: {{grid: [2, 3]}}
  lr: {{loguniform: [0.01, 0.1]}}
  seed: {{randint: [0, 1000]}}
num_samples: 1
resources: {{cpu: 1, gpu: 0}}
max_concurrent: 2
"""


GATE_SWEEP = """
name: gate-{kind}
model: hmm
data: {{name: synthetic-hmm, num_sequences: 200, length: 30, hidden_dim: 3, seed: {seed}}}
train: {{method: em, epochs: 15}}
search: {{hidden_dim: {states}, seed: 0}}
num_samples: 1
resources: {{cpu: 1, gpu: 0}}
"""
GATES = {"weak": (1, 0), "strong": (3, 0), "other": (3, 1)}  # kind: (states, data seed)


@dataclass
class Store:
    uri: str
    directory: Path
    sweeps: list[str]  # parent run ids, oldest first
    gates: dict[str, str]  # GATES kind: its experiment's one sweep

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(self.uri, registry_uri=self.uri)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Two sweeps of the same experiment, one after the other; and the GATES sweeps."""
    directory = tmp_path_factory.mktemp("promote")
    uri = f"sqlite:///{directory}/mlflow.db"
    config = directory / "sweep.yaml"
    config.write_text(SWEEP.format(name=EXPERIMENT))
    gates = {}
    for kind, (states, seed) in GATES.items():
        gates[kind] = directory / f"gate-{kind}.yaml"
        gates[kind].write_text(GATE_SWEEP.format(kind=kind, states=states, seed=seed))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    try:
        outcomes = [run_sweep(load_sweep_file(config), tracking=uri, storage=str(directory / "ray")) for _ in range(2)]
        gated = {kind: run_sweep(load_sweep_file(path), tracking=uri, storage=str(directory / "ray")) for kind, path in gates.items()}
    finally:
        ray.shutdown()
    return Store(uri, directory, [outcome.parent_run_id for outcome in outcomes], {k: o.parent_run_id for k, o in gated.items()})


@pytest.fixture(scope="module")
def promoted(store) -> tuple[dict, dict]:
    """The first sweep promoted by its id, then the latest one."""
    return promote(store.uri, EXPERIMENT, sweep=store.sweeps[0]), promote(store.uri, EXPERIMENT)


def best_child(store: Store, parent: str) -> tuple[str, float]:
    runs = store.client.search_runs(
        [store.client.get_experiment_by_name(EXPERIMENT).experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent}'"
    )
    scored = [(r.data.metrics["best_valid_nll"], r.info.run_id) for r in runs if r.info.status == "FINISHED"]
    assert len(scored) == 2
    value, run_id = min(scored)
    return run_id, value


def trial_model(store: Store, run_id: str):
    return load_checkpoint(store.client.download_artifacts(run_id, "checkpoint", str(store.directory / run_id)))


def test_promotion_registers_the_best_finished_trial_with_alias_and_lineage(store, promoted):
    first, _ = promoted
    run_id, value = best_child(store, store.sweeps[0])
    assert first == {
        "name": EXPERIMENT, "version": 1, "alias": "champion", "run_id": run_id, "sweep_run_id": store.sweeps[0],
        "metric": "best_valid_nll", "value": value, "previous_version": None, "versus": None, "alignment": {},
    }
    version = store.client.get_model_version(EXPERIMENT, "1")
    assert version.run_id == run_id
    assert version.tags["pyrosweep.sweep_run_id"] == store.sweeps[0]
    assert version.tags["pyrosweep.trial_run_id"] == run_id
    assert version.tags["pyrosweep.metric"] == "best_valid_nll"
    assert float(version.tags["pyrosweep.metric_value"]) == value
    assert PREVIOUS_TAG not in version.tags
    assert store.client.get_run(run_id).info.status == "FINISHED", "the reopened trial run ends FINISHED again"


def test_a_second_promotion_takes_the_latest_sweep_and_rollback_moves_the_alias_back(store, promoted):
    _, second = promoted
    run_id, _ = best_child(store, store.sweeps[1])
    assert (second["version"], second["previous_version"], second["run_id"]) == (2, 1, run_id)
    assert store.client.get_model_version(EXPERIMENT, "2").tags[PREVIOUS_TAG] == "1"
    assert int(resolve_version(store.client, f"models:/{EXPERIMENT}@champion").version) == 2

    moved = rollback(store.uri, EXPERIMENT)
    assert (moved["version"], moved["rolled_back_from"]) == (1, 2)
    assert int(resolve_version(store.client, f"models:/{EXPERIMENT}@champion").version) == 1
    with pytest.raises(ValueError, match="version 1 was the first promoted"):
        rollback(store.uri, EXPERIMENT)


def test_the_command_prints_name_version_alias_and_rolls_back(store, promoted, capsys):
    parser = argparse.ArgumentParser()
    add_promote_arguments(parser)
    cmd_promote(parser.parse_args(["--experiment", EXPERIMENT, "--alias", "challenger", "--tracking-uri", store.uri]))
    printed = capsys.readouterr().out
    assert f"registered {EXPERIMENT} version 3 as @challenger" in printed
    assert f"sweep run {store.sweeps[1]}" in printed
    with pytest.raises(ValueError, match="no registered model named 'nothing'"):
        cmd_promote(parser.parse_args(["--rollback", "--name", "nothing", "--tracking-uri", store.uri]))
    with pytest.raises(ValueError, match="needs --experiment"):
        cmd_promote(parser.parse_args(["--tracking-uri", store.uri]))


def test_require_better_accepts_a_clearly_better_model_only_and_says_why_not(store, capsys):
    def gate(kind: str) -> dict:
        return promote(store.uri, f"gate-{kind}", sweep=store.gates[kind], name="gate", require_better=True)

    first = gate("weak")
    assert (first["version"], first["versus"]) == (1, None), "nothing to beat yet"
    with pytest.raises(PromotionRefused, match=r"same \d+ test sequences is \+0\.0000 \[\+0\.0000, \+0\.0000\].*tied.*gate stays at version 1"):
        gate("weak")
    better = gate("strong")
    assert better["version"] == 2 and better["versus"].better
    tags = store.client.get_model_version("gate", "2").tags
    assert float(tags[VERSUS_TAG]) == better["versus"].difference < float(tags[f"{VERSUS_TAG}_high"]) < 0
    assert float(tags[f"{VERSUS_TAG}_low"]) < float(tags[VERSUS_TAG]) and int(tags[f"{VERSUS_TAG}_n"]) == better["versus"].n
    with pytest.raises(PromotionRefused, match=r"minus version 2 .*worse; gate stays at version 2"):
        gate("weak")
    with pytest.raises(PromotionRefused, match="the winner and version 2 of gate: .*different test sequences.*other data"):
        gate("other")
    assert sorted(int(v.version) for v in store.client.search_model_versions("name = 'gate'")) == [1, 2], "none refused is registered"
    code = main(["promote", "--experiment", "gate-weak", "--name", "gate", "--require-better", "--tracking-uri", store.uri])
    assert code == 2 and "not promoted (--require-better)" in capsys.readouterr().err


def test_load_model_version_rebuilds_the_trials_model(store, promoted):
    first, _ = promoted
    model, info = load_model_version(store.uri, EXPERIMENT, 1)
    reference = trial_model(store, first["run_id"])
    test = load_dataset(**DATA).splits["test"]
    assert torch.equal(model.log_likelihood(test.x, test.lengths), reference.log_likelihood(test.x, test.lengths))
    assert not model.training
    assert info["name"] == EXPERIMENT and info["version"] == 1 and info["run_id"] == first["run_id"]
    assert (info["family"], info["data_dim"], info["hidden_dim"]) == ("hmm", 8, reference.hidden_dim)
    assert info["hyperparameters"] == reference.config
    assert info["metrics"]["best_valid_nll"] == first["value"] and math.isfinite(info["metrics"]["test_nll"])
    assert isinstance(info["aliases"], list)


def test_each_version_stores_the_per_step_nll_of_its_validation_frames(store, promoted):
    """What served p-values and drift compare with (serve.monitor), stored at promotion."""
    model, _ = load_model_version(store.uri, EXPERIMENT, 1)
    valid = load_dataset(**DATA).splits["valid"]
    stored = load_reference(store.uri, EXPERIMENT, 1)
    assert np.array_equal(stored, reference_nll(model, valid.x, valid.lengths))
    assert len(stored) == int(valid.lengths.sum()) and np.all(np.diff(stored) >= 0)
    assert store.client.get_model_version(EXPERIMENT, "1").tags[REFERENCE_TAG] == str(len(stored))


def test_a_promotion_under_an_alias_renumbers_its_states_to_match_the_version_before(store, promoted):
    _, second = promoted
    tags = store.client.get_model_version(EXPERIMENT, "2").tags
    assert tags[ALIGNED_TAG] == "1" and second["alignment"][ORDER_TAG] == tags[ORDER_TAG]
    assert 0.0 < float(tags[AGREEMENT_TAG]) <= 1.0
    served, _ = load_model_version(store.uri, EXPERIMENT, 2)
    trial = trial_model(store, second["run_id"])
    trial.relabel(json.loads(tags[ORDER_TAG]))
    for name, value in trial.get_parameters().items():
        torch.testing.assert_close(served.get_parameters()[name], value, rtol=0, atol=0)


def test_the_pyfunc_loads_by_alias_outside_ray_and_answers_like_scoring(store, promoted, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert not ray.is_initialized()
    champion = resolve_version(store.client, f"models:/{EXPERIMENT}@champion")
    reference = trial_model(store, champion.tags["pyrosweep.trial_run_id"]).eval()
    pyfunc = mlflow.pyfunc.load_model(f"models:/{EXPERIMENT}@champion")
    assert [p.name for p in pyfunc.metadata.get_params_schema().params] == ["method"]

    test = load_dataset(**DATA).splits["test"]
    ragged = {"sequences": [test.x[n, : int(test.lengths[n])].tolist() for n in range(3)]}
    assert len({len(s) for s in ragged["sequences"]}) > 1
    for method in ("score", "decode", "posterior"):
        assert pyfunc.predict(ragged, params={"method": method}) == answer(reference, method, ragged)
    assert pyfunc.predict(ragged) == answer(reference, "score", ragged)
    draw = {"num_sequences": 2, "length": 5, "seed": 3}
    assert pyfunc.predict(draw, params={"method": "sample"}) == answer(reference, "sample", draw)

    with pytest.raises(MlflowException, match=r"sequences\[0\]\[1\]: expected 8 values, got 3") as raised:
        pyfunc.predict({"sequences": [[[0] * 8, [0, 1, 0]]]})
    assert isinstance(raised.value.__cause__, RequestError)


def test_the_input_example_is_a_test_sequence_or_else_a_sample(store, promoted):
    model = trial_model(store, promoted[0]["run_id"])
    data = SweepTracker(store.uri, EXPERIMENT, create=False).sweep_spec(store.sweeps[0])["data"]
    assert data == DATA, "the parent run stores the sweep's spec"
    test = load_dataset(**DATA).splits["test"]
    assert example_body(model, load_sweep_data(data)) == {"sequences": [test.x[0, : int(test.lengths[0])].tolist()]}
    moved = load_sweep_data({"path": str(store.directory / "gone.npz")})
    assert "gone.npz" in moved and np.array(example_body(model, moved)["sequences"]).shape == (1, 16, 8)


def test_the_body_comes_back_from_what_mlflow_hands_over():
    body = {"sequences": [[[0.0, 1.0], [1.0, 1.0]]]}
    served = pd.DataFrame({"sequences": [np.array(body["sequences"])], "seed": [np.int64(3)]})
    assert request_body(served) == {**body, "seed": 3}
    records = pd.DataFrame([{"num_sequences": 2, "length": 4}, {"num_sequences": 1}])
    with pytest.raises(RequestError, match="one request body"):
        request_body(records)
    assert request_body(records.iloc[1:]) == {"num_sequences": 1}
    assert request_body([body]) == body
    with pytest.raises(RequestError, match="expected a JSON object"):
        request_body("sequences")


def test_model_uris_parse_or_say_what_is_expected():
    assert parse_model_uri("models:/jsb-hmm@champion") == ("jsb-hmm", "champion", None)
    assert parse_model_uri("models:/jsb-hmm/12") == ("jsb-hmm", None, "12")
    for bad in ("models:/jsb-hmm", "runs:/abc/model", "models:/a/b/c", "models:/x@"):
        with pytest.raises(ValueError, match=r"expected models:/NAME@ALIAS"):
            parse_model_uri(bad)


def test_bad_promotions_and_lookups_are_clear_errors(store, promoted):
    with pytest.raises(ValueError, match=f"no experiment named 'nope'.*{EXPERIMENT}"):
        promote(store.uri, "nope")
    with pytest.raises(ValueError, match="is not a sweep of experiment"):
        promote(store.uri, EXPERIMENT, sweep=promoted[0]["run_id"])
    with pytest.raises(ValueError, match="alias 'v3' cannot be used.*MLflow reserves"):
        promote(store.uri, EXPERIMENT, alias="v3")
    with pytest.raises(ValueError, match="no FINISHED trial with a finite best_valid_nll.*1 FAILED"):
        promote(store.uri, failed_sweep(store))
    with pytest.raises(ValueError, match="no FINISHED trial with a finite accuracy.*metrics logged: .*best_valid_nll"):
        promote(store.uri, EXPERIMENT, metric="accuracy")
    with pytest.raises(ValueError, match="has no alias 'staging'.*champion"):
        resolve_version(store.client, f"models:/{EXPERIMENT}@staging")
    with pytest.raises(ValueError, match="has no version 99 .*1, 2"):
        load_model_version(store.uri, EXPERIMENT, 99)


def failed_sweep(store: Store) -> str:
    """An experiment whose only sweep has one trial, which failed."""
    tracker = SweepTracker(store.uri, "all-failed")
    sweep_file = store.directory / "sweep.yaml"
    parent = tracker.start_parent("all-failed-1", load_sweep_file(sweep_file), {"model": "hmm"}, sweep_file)
    child = tracker.child_for(parent, "trial-0", {"hidden_dim": 2}, {})
    tracker.client.set_terminated(child, "FAILED")
    tracker.client.set_terminated(parent, "FINISHED")
    return "all-failed"


def test_a_running_server_swaps_to_the_alias_new_version_without_failing_a_request(store, promoted, tmp_path):
    import json
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.error
    import urllib.request

    store.client.set_registered_model_alias(EXPERIMENT, "live", "1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYROSWEEP_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "cluster.cli"]
    server = subprocess.Popen(
        [*command, "serve", "--model", f"models:/{EXPERIMENT}@live", "--tracking-uri", store.uri, "--port", str(port)],
        env=env, stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"

    def version() -> int | None:
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=10) as response:
                return json.load(response)["version"]
        except OSError:
            return None

    def wait_for(expected: int) -> None:
        deadline = time.time() + 120
        while time.time() < deadline and version() != expected:
            time.sleep(0.2)
        assert version() == expected, (tmp_path / "serve.log").read_text()

    body = json.dumps({"sequences": [[[0.0] * 8, [1.0] * 8]]}).encode()
    failures, answered, stop = [], [], threading.Event()

    def load() -> None:
        while not stop.is_set():
            request = urllib.request.Request(f"{base}/v1/score", data=body, headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    answered.append(json.load(response)["log_likelihood"][0])
            except urllib.error.URLError as error:
                failures.append(str(error))
            # three clients still keep requests in flight throughout the swap; unpaced they
            # held both cores (~90 answers/s) and slowed the swap they were there to watch
            stop.wait(0.02)

    try:
        wait_for(1)
        workers = [threading.Thread(target=load) for _ in range(3)]
        for worker in workers:
            worker.start()
        store.client.set_registered_model_alias(EXPERIMENT, "live", "2")
        swap = subprocess.run([*command, "swap", "--port", str(port)], env=env, capture_output=True, text=True, timeout=60)
        assert swap.returncode == 0, swap.stderr
        wait_for(2)
        time.sleep(1)
        stop.set()
        for worker in workers:
            worker.join()
        assert not failures and len(set(answered)) == 2, "answers switched from version 1 to version 2"
    finally:
        stop.set()
        # the server alone: it shuts Serve and its Ray down itself (a SIGTERM to its whole
        # process group killed that Ray under it, and Serve's shutdown waited 30 s for it)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        finally:
            try:
                os.killpg(server.pid, signal.SIGKILL)  # anything of it still left
            except ProcessLookupError:
                pass
