"""The environment of the Ray a command starts on this machine (no ``--address``).

Set before Ray is imported (Ray reads these variables once, at import, in this process
and in every Ray process it starts):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: Ray's single-machine mode (its default on macOS
  and Windows). Ray 2.60 turns a node address of 127.0.0.1 given to ``ray.init`` into the
  machine's own address (``services.resolve_ip_for_localhost``), and its GCS, raylet,
  object manager and workers then listen on every interface; in single-machine mode the
  node address is 127.0.0.1 and they, the dashboard agent, the runtime-env agent and the
  metrics exporter listen on loopback only.
- ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``: Serve's HTTP proxies add
  :class:`serve.limits.HeaderGuard` in front of everything else.
"""

from __future__ import annotations

import os
import sys

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serve.limits:proxy_middlewares"}


def prepare_local_ray() -> None:
    """Set :data:`LOOPBACK_ENV` and :data:`PROXY_ENV` where the user has not, unless
    ``RAY_ADDRESS`` points at a cluster, or Ray is imported already (a test calling the
    CLI in process: this process would then disagree with the Ray it starts)."""
    if "ray" in sys.modules or os.environ.get("RAY_ADDRESS"):
        return
    for name, value in {**LOOPBACK_ENV, **PROXY_ENV}.items():
        os.environ.setdefault(name, value)
