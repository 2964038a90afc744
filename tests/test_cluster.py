"""Cluster mode on a real multi-node Ray inside this machine (``ray.cluster_utils.Cluster``):
a head with no CPUs (so every trial and replica runs on a worker node) and two 1-CPU
worker nodes, each its own raylet. The driver joins it by ``--address`` as it would a
remote cluster: the project's code reaches the workers as ``py_modules``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.remote import ray_session
from cluster.serving import ServeOptions, serving
from cluster.sweep import run_sweep
from cluster.sweep_file import load_sweep_file
from helpers import free_port, get, mlflow_runs, post, tracking_server, write_sweep
from trainables.models import build_model
from trainables.checkpoint import save_checkpoint

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def three_nodes():
    """A head with 0 CPUs (with the Jobs API and a Ray Client server) and two worker nodes
    of 1 CPU each. The
    cluster's ``python`` is this virtual environment's, as on a cluster built from the
    project's image."""
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{BIN}{os.pathsep}{path}"
    dashboard_port, client_port = free_port(), free_port()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard_port,
            "ray_client_server_port": client_port,
        },
    )  # fmt: skip
    cluster.jobs_url = f"http://127.0.0.1:{dashboard_port}"
    cluster.client_address = f"ray://127.0.0.1:{client_port}"
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    yield cluster, workers
    cluster.shutdown()
    os.environ["PATH"] = path


def worker_ids(workers) -> set[str]:
    return {node.node_id for node in workers}


def test_a_sweep_spreads_its_trials_over_both_worker_nodes(tmp_path, three_nodes):
    cluster, workers = three_nodes
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "shared"
    # trials of a few seconds: Tune reuses a finished trial's worker, so trials shorter than
    # a worker's start-up could all run on the first node up
    spec = load_sweep_file(
        write_sweep(tmp_path, "spread", epochs=60, hidden_dim="{grid: [2, 3, 4, 5]}", sequences=200)
    )
    started = time.perf_counter()
    outcome = run_sweep(spec, address=cluster.address, tracking=uri, storage=str(storage))
    print(f"4 trials on 2 worker nodes: {time.perf_counter() - started:.1f} s")
    client, parents, children = mlflow_runs(uri, "spread")
    assert parents[0].info.status == "FINISHED" and len(outcome.leaderboard) == 4
    assert {child.info.status for child in children} == {"FINISHED"}
    assert {child.data.tags["ray.node_id"] for child in children} == worker_ids(workers)
    for child in children:  # checkpoints written on a worker node reach MLflow
        assert "checkpoint" in {artifact.path for artifact in client.list_artifacts(child.info.run_id)}
    run_dir = storage / json.loads((storage / "spread.sweep.json").read_text())["run_name"]
    assert len(list(run_dir.glob("*/checkpoint_*/model.pt"))) >= 4


def test_a_worker_node_lost_mid_sweep_has_its_trials_retried_on_the_other(tmp_path, three_nodes):
    cluster, workers = three_nodes
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "shared"
    # long enough for both trials to start on their own node (see the test above)
    spec = load_sweep_file(write_sweep(tmp_path, "lost", epochs=100, hidden_dim="{grid: [2, 3]}", sequences=200))
    doomed, removed, stop = workers[1], threading.Event(), threading.Event()

    def remove_once_a_trial_reports_from_it() -> None:
        while not stop.wait(0.5):
            try:
                children = mlflow_runs(uri, "lost")[2]
            except Exception:  # noqa: BLE001 - the store is still being created
                continue
            if any(child.data.tags.get("ray.node_id") == doomed.node_id for child in children):
                cluster.remove_node(doomed)
                removed.set()
                return

    remover = threading.Thread(target=remove_once_a_trial_reports_from_it)
    remover.start()
    try:
        run_sweep(spec, address=cluster.address, tracking=uri, storage=str(storage))
    finally:
        stop.set()
        remover.join()
        if removed.is_set():  # the next tests want two workers again
            workers[1] = cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
    assert removed.is_set(), "the sweep ended before a trial reported from the node to remove"
    client, parents, children = mlflow_runs(uri, "lost")
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {child.info.status for child in children} == {"FINISHED"}
    assert {child.data.tags["ray.node_id"] for child in children} == {workers[0].node_id}
    for child in children:
        steps = {point.step for point in client.get_metric_history(child.info.run_id, "valid_nll")}
        assert steps == set(range(1, max(steps) + 1))  # every epoch, up to its end or early stop


def test_a_sweep_through_ray_client_logs_to_the_tracking_server(tmp_path, three_nodes):
    """With ``ray://`` the Tune loop runs on the head node: its MLflow store must be a
    server (a local SQLite file is refused), and the trials still spread."""
    cluster, workers = three_nodes
    spec = load_sweep_file(write_sweep(tmp_path, "client", epochs=60, sequences=200))  # spread: see above
    local = f"sqlite:///{tmp_path}/mlflow.db"
    with pytest.raises(ValueError, match="start a tracking server"):
        run_sweep(spec, address=cluster.client_address, tracking=local, storage=str(tmp_path / "shared"))
    with tracking_server(local, tmp_path / "artifacts") as url:
        run_sweep(spec, address=cluster.client_address, tracking=url, storage=str(tmp_path / "shared"))
        _, parents, children = mlflow_runs(url, "client")
    assert parents[0].info.status == "FINISHED"
    assert {child.info.status for child in children} == {"FINISHED"}
    assert {child.data.tags["ray.node_id"] for child in children} == worker_ids(workers)


def test_serve_with_two_replicas_answers_from_both_worker_nodes(tmp_path, three_nodes):
    cluster, workers = three_nodes
    model = build_model("hmm", data_dim=3, hidden_dim=2)
    x = torch.randint(0, 2, (4, 6, 3)).float()
    lengths = torch.tensor([6, 5, 3, 1])
    model.set_parameters(**model.init_parameters(x, lengths, torch.Generator().manual_seed(0)))
    checkpoint = save_checkpoint(model, tmp_path / "checkpoint")
    expected = model.log_likelihood(x, lengths).tolist()
    body = {"sequences": [x[n, : int(lengths[n])].tolist() for n in range(4)]}
    port = free_port()
    options = ServeOptions(
        model=str(checkpoint), tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", port=port, replicas=2,
        proxy_location="HeadOnly",
    )  # fmt: skip
    with ray_session(cluster.address, options.tracking_uri), serving(options):
        url = f"http://127.0.0.1:{port}"
        answering = {get(f"{url}/healthz")[1]["node_id"] for _ in range(40)}
        scores = [post(f"{url}/v1/score", body)[1]["log_likelihood"] for _ in range(6)]
    assert answering == worker_ids(workers)
    for score in scores:
        assert score == pytest.approx(expected, rel=1e-5)


def test_pyrosweep_submit_runs_a_sweep_as_a_ray_job(tmp_path, three_nodes):
    cluster, _ = three_nodes
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "shared"
    sweep_file = write_sweep(tmp_path, "job", epochs=2)
    command = [
        str(BIN / "pyrosweep"), "submit", str(sweep_file), "--address", cluster.jobs_url,
        "--tracking-uri", uri, "--storage", str(storage), "--follow",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "submitted sweep job as Ray Job pyrosweep-job-" in done.stdout
    assert "sweep job finished" in done.stdout and "SUCCEEDED" in done.stdout
    _, parents, children = mlflow_runs(uri, "job")
    assert parents[0].info.status == "FINISHED"
    assert len(children) == 2 and {child.info.status for child in children} == {"FINISHED"}


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a node blind to the storage needs a private mount namespace (root and unshare)",
)
def test_a_sweep_whose_storage_a_node_cannot_see_is_refused_up_front(tmp_path, three_nodes):
    """A third worker node runs in a mount namespace where the storage directory is an
    empty tmpfs: the same path, a different disk, as on a node without the NFS mount."""
    cluster, _ = three_nodes
    uri, storage = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "shared"
    storage.mkdir()
    blind = subprocess.Popen([
        "unshare", "--mount", "--propagation", "private", "sh", "-c",
        f"mount -t tmpfs none {storage} && exec {BIN / 'ray'} start --address {cluster.address} "
        f"--num-cpus 1 --block",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    spec = load_sweep_file(write_sweep(tmp_path, "blind"))
    try:
        with ray_session(cluster.address, uri):
            before = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            deadline = time.monotonic() + 60
            while len(before) < 4 and time.monotonic() < deadline:
                time.sleep(0.5)
                before = {node["NodeID"] for node in ray.nodes() if node["Alive"]}
            blind_id = (before - {cluster.head_node.node_id} - worker_ids(three_nodes[1])).pop()
            started = time.perf_counter()
            with pytest.raises(RuntimeError, match="is not shared by every node") as refused:
                run_sweep(spec, address=cluster.address, tracking=uri, storage=str(storage))
            print(f"refused in {time.perf_counter() - started:.1f} s:\n{refused.value}")
    finally:
        blind.terminate()
        blind.wait(timeout=60)
    message = str(refused.value)
    assert f"node {blind_id}" in message and "does not see the files the driver writes there" in message
    assert all(f"node {node_id}" not in message for node_id in worker_ids(three_nodes[1]))
    assert "NFS at the same path" in message
    assert not (storage / "blind.sweep.json").exists()  # refused before any run was opened
