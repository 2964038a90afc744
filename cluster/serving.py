"""``pyrosweep serve``: deploy a model with Ray Serve in the foreground.

The process runs until SIGINT or SIGTERM, then shuts Serve (and the Ray it started)
down. SIGHUP (``pyrosweep swap --port PORT``) resolves the model URI again and moves the
running deployment to the alias's new version through its ``user_config``: the replicas
call ``reconfigure`` in place and no request fails.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ray import serve

from serve.app import ModelServer
from serve.limits import BodyLimits
from serve.registry import pin_source
from serve.streams import default_stream_key

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


def pid_file(port: int) -> Path:
    return project_home() / f"serve-{port}.pid"


def deployment(options: ServeOptions, user_config: dict[str, Any]):
    """The bound application for ``serve.run``."""
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.autoscale is not None:
        low, high = options.autoscale
        scaling = {"autoscaling_config": {"min_replicas": low, "max_replicas": high}}
    return ModelServer.options(
        **scaling,
        user_config=user_config,
        ray_actor_options={"num_gpus": options.num_gpus, "num_cpus": 1},
    ).bind(options.max_batch_size, options.body_limits.model_dump(), options.stream_key)


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


def swap(options: ServeOptions) -> dict[str, Any]:
    """Move the running deployment to what ``options.model`` resolves to now."""
    user_config = pin_source(options.model, options.tracking_uri)
    _run(options, user_config)
    return user_config


@contextmanager
def serving(options: ServeOptions) -> Iterator[dict[str, Any]]:
    """Serve ``options.model`` on the running Ray for the duration of the block; yields
    the deployment's ``user_config``; Serve is shut down after."""
    user_config = pin_source(options.model, options.tracking_uri)
    try:
        serve.start(proxy_location=options.proxy_location, http_options=http_options(options))
        _run(options, user_config)
        yield user_config
    finally:
        serve.shutdown()


def run_server(options: ServeOptions, on_ready: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP swaps to the URI's current version."""
    stop, reload = threading.Event(), threading.Event()
    pid = pid_file(options.port)
    with ray_session(options.address, options.tracking_uri):
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
                while not stop.wait(0.2):
                    if reload.is_set():
                        reload.clear()
                        user_config = swap(options)
                        print(f"swapped to {user_config['source']}", flush=True)
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
