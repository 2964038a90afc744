"""Ray for a command: a local one, or an existing cluster that the project's code and
settings reach.

With ``--address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``) the driver joins a
running cluster and ships this checkout's packages to every worker as ``py_modules``, so
trials and Serve replicas run the same code as the driver even where an older pyrosweep
is installed; ``MLFLOW_TRACKING_URI`` travels with them so every process names the same
tracking store.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import cluster
import serve
import trainables
from trainables.engines import ENGINE_ENV

from . import console

PROJECT_PACKAGES = (trainables, serve, cluster)
HEAD_RESOURCE = "node:__internal_head__"  # every head node has this resource
JOB_DRIVER_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray Jobs for a job's driver


def is_client(address: str | None) -> bool:
    """Ray Client (``ray://``): the driver's Tune loop then runs on the head node."""
    return bool(address) and address.startswith("ray://")


def runtime_env(tracking_uri: str | None) -> dict[str, Any]:
    """The runtime env of every worker of a cluster job: the project's packages and its
    tracking URI (when given)."""
    # the Tune loop may run on the head node (Ray Client): quiet there too
    env_vars = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", **console.QUIET_ENV}
    if tracking_uri:
        env_vars["MLFLOW_TRACKING_URI"] = tracking_uri
    if os.environ.get(ENGINE_ENV):  # pyrosweep --engine
        env_vars[ENGINE_ENV] = os.environ[ENGINE_ENV]
    return {
        "py_modules": [str(Path(package.__file__).parent) for package in PROJECT_PACKAGES],
        "env_vars": env_vars,
    }


def check_tracking_uri(address: str | None, tracking_uri: str) -> None:
    """Refuse a tracking store the cluster's side of a Ray Client session cannot reach."""
    if is_client(address) and tracking_uri.startswith(("sqlite:", "file:")):
        raise ValueError(
            f"--address {address}: with Ray Client the sweep's Tune loop (and its MLflow logging) "
            f"runs on the cluster's head node, which cannot write this machine's store "
            f"{tracking_uri}; start a tracking server (pyrosweep tracking-server) and pass "
            f"--tracking-uri http://HOST:PORT"
        )


def _driver_logging() -> dict[str, Any]:
    """``ray.init``'s logging options: the "ray" logger left to :mod:`cluster.console`,
    workers' output forwarded unless the command logs to a file without ``-v``."""
    return {"configure_logging": False, "log_to_driver": console.forward_worker_output()}


@contextmanager
def ray_session(address: str | None, tracking_uri: str, metrics_port: int | None = None) -> Iterator[None]:
    """Ray for the block: the cluster at ``address`` (joined with the project's runtime
    env), a Ray already initialised in this process, or a local one started (and stopped)
    here, exporting Prometheus metrics on ``metrics_port`` (a cluster's nodes export on
    the port they were started with)."""
    if ray.is_initialized():
        yield
        return
    check_tracking_uri(address, tracking_uri)
    if is_client(address):  # Ray Client takes no dashboard or logging options
        ray.init(address=address, runtime_env=runtime_env(tracking_uri))
    elif address and not os.environ.get(JOB_DRIVER_ENV):
        ray.init(address=address, runtime_env=runtime_env(tracking_uri), **_driver_logging())
    elif address:  # a Ray Job's driver: the job's runtime env already carries the project
        ray.init(address=address, **_driver_logging())
    else:  # "local": never join a Ray that happens to run on this machine
        ray.init(address="local", include_dashboard=False, _metrics_export_port=metrics_port, **_driver_logging())
    try:
        yield
    finally:
        ray.shutdown()


def on_node(node_id: str, function):
    """``function`` as a zero-CPU Ray task pinned to ``node_id``: call ``.remote(*args)``."""
    task = ray.remote(num_cpus=0, max_retries=0)(function)
    return task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


def controller_node(client: bool) -> str:
    """The node Tune's loop runs on: the head under Ray Client, else this driver's node."""
    if client:
        return next(node["NodeID"] for node in ray.nodes() if node["Alive"] and HEAD_RESOURCE in node["Resources"])
    return ray.get_runtime_context().get_node_id()
