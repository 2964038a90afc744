"""The cluster's tracking server for real: ``pyrosweep tracking-server`` (``mlflow server``
on PostgreSQL with proxied artifacts), and a sweep, a promotion and a served query that
know it only by ``--tracking-uri http://...``.

PostgreSQL comes from ``.ci/postgres`` (run by ``.ci/run``), which prints the URL this
module reads from ``$PYROSWEEP_TEST_POSTGRES``.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import sqlalchemy
import torch

from cluster.promote import promote
from cluster.remote import ray_session
from cluster.serving import ServeOptions, serving
from cluster.sweep import run_sweep
from cluster.sweep_file import load_sweep_file
from helpers import PYROSWEEP, free_port, mlflow_runs, post, tracking_server, write_sweep
from serve.registry import load_model_version

pytestmark = pytest.mark.slow
POSTGRES = os.environ.get("PYROSWEEP_TEST_POSTGRES")


@pytest.fixture(scope="module")
def postgres_server(tmp_path_factory):
    """A fresh database behind a real ``pyrosweep tracking-server``; yields its URL and
    the artifacts directory it proxies."""
    if not POSTGRES:
        pytest.skip("no PostgreSQL: run `.ci/postgres` and set PYROSWEEP_TEST_POSTGRES to the URL it prints")
    engine = sqlalchemy.create_engine(POSTGRES)
    with engine.begin() as connection:  # the tables of an earlier run go
        connection.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    artifacts = tmp_path_factory.mktemp("artifacts")
    with tracking_server(POSTGRES, artifacts) as url:
        yield url, artifacts


def test_sweep_promote_and_serve_through_the_tracking_server(tmp_path, postgres_server):
    url, artifacts = postgres_server
    spec = load_sweep_file(write_sweep(tmp_path, "pg-sweep", epochs=3))
    outcome = run_sweep(spec, tracking=url, storage=str(tmp_path / "ray"))
    client, parents, children = mlflow_runs(url, "pg-sweep")
    assert parents[0].info.status == "FINISHED" and len(outcome.leaderboard) == 2
    assert {child.info.status for child in children} == {"FINISHED"}
    for child in children:
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied, no local path
        assert {"checkpoint", "loss_curve.png"} <= {a.path for a in client.list_artifacts(child.info.run_id)}
    assert list(artifacts.rglob("model.pt"))  # written by the server, not by the driver

    promoted = promote(url, "pg-sweep")
    assert int(promoted["version"]) == 1
    model, info = load_model_version(url, "pg-sweep", 1)
    sequence = torch.randint(0, 2, (7, model.data_dim)).float()
    expected = float(model.log_likelihood(sequence[None], torch.tensor([7]))[0])
    port = free_port()
    options = ServeOptions(model="models:/pg-sweep@champion", tracking_uri=url, port=port)
    with ray_session(None, url), serving(options) as user_config:
        status, answer = post(f"http://127.0.0.1:{port}/v1/score", {"sequences": [sequence.tolist()]})
    assert user_config["source"] == "models:/pg-sweep/1"
    assert status == 200 and answer["log_likelihood"][0] == pytest.approx(expected, rel=1e-5)
    assert info["run_id"] == promoted["run_id"]


def test_a_database_that_cannot_be_reached_is_one_clear_line():
    unreachable = "postgresql://pyrosweep:secret@127.0.0.1:1/pyrosweep"
    done = subprocess.run(
        [PYROSWEEP, "tracking-server", "--backend-store-uri", unreachable, "--artifacts-destination", "/tmp/x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert "cannot reach the backend store postgresql://pyrosweep:***@127.0.0.1:1/pyrosweep" in done.stderr
    assert "secret" not in done.stderr
