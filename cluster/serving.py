"""``pyrosweep serve``: deploy a model with Ray Serve in the foreground.

The process runs until SIGINT or SIGTERM, then shuts Serve (and the Ray it started)
down. SIGHUP (``pyrosweep swap --port PORT``) resolves the model URI again and moves the
running deployment to the alias's new version through its ``user_config``: ``serve.run``
starts replicas of the new version beside the old ones and no request fails. With ``--follow-alias`` the registry
is polled and the same swap runs whenever the alias moves (:mod:`cluster.follow`).

With ``--shadow URI`` the application holds a second deployment, the challenger
(:mod:`serve.shadow`), that the champion mirrors score requests to; its comparison is
logged to the challenger's registry version before each swap (which replaces it) and
when the server stops, and printed then.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import ray
from ray import serve

from serve.app import ModelServer
from serve.limits import BodyLimits
from serve.registry import pin_source
from serve.streams import default_stream_key
from serve.shadow import DEPLOYMENT as SHADOW_DEPLOYMENT
from serve.shadow import ShadowScorer

from .follow import AliasFollower, check_followable
from .home import project_home
from .remote import ray_session

APP_NAME = "pyrosweep"


@dataclass
class ServeOptions:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory
    tracking_uri: str
    host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    autoscale: tuple[int, int] | None = None
    num_gpus: float = 0.0
    max_batch_size: int = 16
    address: str | None = None
    # where Serve runs HTTP proxies: "EveryNode" (Ray's default) or "HeadOnly"
    proxy_location: str = "EveryNode"
    body_limits: BodyLimits = field(default_factory=BodyLimits)
    # Serve's own HTTP options, None for Serve's defaults: a whole request's time limit (a
    # 408 from the proxy; none), how long an idle keep-alive connection stays open (90 s)
    request_timeout_s: float | None = None
    keep_alive_timeout_s: int | None = None
    # signs stream state tokens: one per server (or $PYROSWEEP_STREAM_KEY, shared by a fleet),
    # kept across swaps (a token of the old version gets a 409 all the same)
    stream_key: str = field(default_factory=default_stream_key, repr=False)

    metrics_port: int | None = None  # a local Ray's Prometheus endpoint (default: a port Ray picks)
    follow_alias: bool = False  # swap whenever the alias of ``model`` moves, polled every poll_s
    poll_s: float = 10.0
    shadow: str | None = None  # the challenger, as ``model``: mirrored score requests, GET /v1/shadow
    shadow_fraction: float = 1.0  # of score requests mirrored

    def __post_init__(self) -> None:
        """Refuse what cannot be served, before Ray starts."""
        if self.follow_alias:
            check_followable(self.model)
        if not self.poll_s > 0:
            raise ValueError(f"--poll-s: expected seconds > 0, got {self.poll_s}")
        if not 0.0 < self.shadow_fraction <= 1.0:
            raise ValueError(f"--shadow-fraction: expected 0 < F <= 1, got {self.shadow_fraction}")


def metrics_export_port() -> int:
    """The port this process's Ray node serves its Prometheus metrics on (the replicas'
    ``pyrosweep_*`` metrics among them: :mod:`serve.monitor`)."""
    node = ray.get_runtime_context().get_node_id()
    return next(int(info["MetricsExportPort"]) for info in ray.nodes() if info["NodeID"] == node)


def pid_file(port: int) -> Path:
    return project_home() / f"serve-{port}.pid"


def deployment(options: ServeOptions, user_config: dict[str, Any]):
    """The bound application for ``serve.run``; with ``options.shadow``, the challenger
    pinned to the version its URI resolves to now."""
    shadow: dict[str, Any] = {}
    if options.shadow is not None:
        challenger = ShadowScorer.options(user_config=pin_source(options.shadow, options.tracking_uri)).bind()
        shadow = {"shadow": challenger, "shadow_fraction": options.shadow_fraction}
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale is not None:
        low, high = options.autoscale
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high}}
    return ModelServer.options(
        **scaling,
        user_config=user_config,
        ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": 1},
    ).bind(options.max_batch_size, options.body_limits.model_dump(), stream_key=options.stream_key, **shadow)


def http_options(options: ServeOptions) -> dict[str, Any]:
    """Serve's ``http_options`` for ``options``: where its proxies listen, and the timeouts
    that are set (Serve's own defaults for the others)."""
    timeouts = {"request_timeout_s": options.request_timeout_s, "keep_alive_timeout_s": options.keep_alive_timeout_s}
    return {"host": options.host, "port": options.port, **{k: v for k, v in timeouts.items() if v is not None}}


def _run(options: ServeOptions, user_config: dict[str, Any]) -> None:
    """``serve.run`` the deployment. Serve's error for a deployment that fails to start
    names only the deployment; the replicas' exception (the last line of its status
    message) is added, since their output is in the Ray session's logs, not on screen."""
    try:
        serve.run(deployment(options, user_config), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:
        app = serve.status().applications.get(APP_NAME)
        messages = [d.message.strip() for d in app.deployments.values()] if app else []
        causes = "; ".join(message.splitlines()[-1] for message in messages if message)
        raise RuntimeError(f"{error} Its replicas failed with: {causes}" if causes else str(error)) from error


def swap(options: ServeOptions, user_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Move the running deployment to ``user_config`` (default: what ``options.model``
    resolves to now)."""
    user_config = user_config or pin_source(options.model, options.tracking_uri)
    publish_shadow(options)  # the redeploy replaces the shadow's replica, and its pairs with it
    _run(options, user_config)
    return user_config


def publish_shadow(options: ServeOptions) -> None:
    """Log the shadow's comparison so far to the challenger's version, and print it."""
    if options.shadow is None:
        return
    try:
        report = serve.get_deployment_handle(SHADOW_DEPLOYMENT, APP_NAME).publish.remote().result(timeout_s=60)
    except Exception as error:  # whatever Serve raised: the server stops or swaps all the same
        print(f"shadow: the comparison was not logged ({error!r})", file=sys.stderr, flush=True)
        return
    if report is not None:
        print(f"shadow: {report['challenger']} minus {report['champion']} on {report['n']} sequences: "
              f"{report['difference']:+.4f} [{report['low']:+.4f}, {report['high']:+.4f}] nats per frame "
              f"(95% CI, {report['kinds']})", flush=True)


@contextmanager
def serving(options: ServeOptions) -> Iterator[dict[str, Any]]:
    """Serve ``options.model`` on the running Ray for the duration of the block; yields
    the deployment's ``user_config``; Serve is shut down after."""
    user_config = pin_source(options.model, options.tracking_uri)
    try:
        serve.start(proxy_location=options.proxy_location, http_options=http_options(options))
        _run(options, user_config)
        try:
            yield user_config
        finally:
            publish_shadow(options)
    finally:
        serve.shutdown()


def run_server(options: ServeOptions, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP (and, with ``follow_alias``, a moved alias) swaps
    to the URI's current version."""
    stop, reload = threading.Event(), threading.Event()
    pid = pid_file(options.port)
    with ray_session(options.address, options.tracking_uri, options.metrics_port):
        # after ray.init (it installs handlers of its own), before anything is served
        previous = {
            signal.SIGINT: signal.signal(signal.SIGINT, lambda *_: stop.set()),
            signal.SIGTERM: signal.signal(signal.SIGTERM, lambda *_: stop.set()),
            signal.SIGHUP: signal.signal(signal.SIGHUP, lambda *_: reload.set()),
        }
        try:
            with serving(options) as user_config:
                pid.parent.mkdir(parents=True, exist_ok=True)
                pid.write_text(str(os.getpid()))
                if on_ready is not None:
                    on_ready(user_config)
                follower = None
                if options.follow_alias:
                    follower = AliasFollower(options.model, options.tracking_uri, user_config["source"], options.poll_s, reload)
                    follower.start()
                while not stop.wait(0.2):
                    if reload.is_set():
                        reload.clear()
                        moved = follower.take() if follower else None
                        if moved is not None and moved["source"] == user_config["source"]:
                            continue  # polled while the last swap ran
                        user_config = swap(options, moved)
                        if follower:
                            follower.served = user_config["source"]
                        print(f"swapped to {user_config['source']}", flush=True)
                if follower:
                    follower.stopped.set()
        finally:
            pid.unlink(missing_ok=True)
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def request_swap(port: int) -> int:
    """Ask the ``pyrosweep serve`` on ``port`` to move to its URI's current version."""
    pid = pid_file(port)
    if not pid.exists():
        raise RuntimeError(f"no pyrosweep serve is running on port {port} (no {pid})")
    process = int(pid.read_text())
    os.kill(process, signal.SIGHUP)
    return process
