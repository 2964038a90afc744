"""``pyrosweep tracking-server``: the MLflow tracking server a cluster shares.

``mlflow server`` with a database backend (PostgreSQL for clusters) and proxied artifacts
(``--serve-artifacts``): every process (the sweep driver, Ray Jobs, Serve replicas) talks
to it over HTTP by ``--tracking-uri http://HOST:PORT`` and none needs the database driver
or bucket credentials. The database is checked before the server starts, so a wrong URL
or a database that is down is one clear line, not a server that fails on its first request.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass


@dataclass
class ServerOptions:
    backend_store_uri: str  # postgresql://USER:PASSWORD@HOST:PORT/DB (or sqlite:///ABS/PATH)
    artifacts_destination: str  # a local directory or s3:// / gs:// URI the server writes to
    host: str = "127.0.0.1"
    port: int = 5000
    workers: int = 2
    allowed_hosts: str | None = None  # the Host headers clients use, beyond localhost/private IPs


def check_backend(uri: str, timeout_s: int = 5) -> None:
    """Connect to the backend database once; raise ``RuntimeError`` saying what failed."""
    import sqlalchemy

    connect_args = {"connect_timeout": timeout_s} if uri.startswith("postgresql") else {}
    try:
        engine = sqlalchemy.create_engine(uri, connect_args=connect_args)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
        engine.dispose()
    except Exception as error:  # noqa: BLE001 - any driver error becomes one clear line
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RuntimeError(f"tracking server: cannot reach the backend store {_redact(uri)}: {first_line}") from None


def _redact(uri: str) -> str:
    """``uri`` with its password replaced by ``***``."""
    scheme, sep, rest = uri.partition("://")
    credentials, at, location = rest.rpartition("@")
    if not at or ":" not in credentials:
        return uri
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{location}"


def server_command(options: ServerOptions) -> list[str]:
    """The ``mlflow server`` command line for ``options``."""
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    command = [
        mlflow, "server",
        "--backend-store-uri", options.backend_store_uri,
        "--artifacts-destination", options.artifacts_destination,
        "--serve-artifacts",
        "--host", options.host,
        "--port", str(options.port),
        "--workers", str(options.workers),
    ]  # fmt: skip
    if options.allowed_hosts:
        command += ["--allowed-hosts", options.allowed_hosts]
    return command


def wait_until_up(url: str, timeout_s: float = 120.0) -> None:
    """Block until ``{url}/health`` answers, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no MLflow tracking server answered at {url} within {timeout_s:.0f} s")
        time.sleep(0.5)


def run(options: ServerOptions) -> None:
    """Check the backend, then replace this process by ``mlflow server``."""
    check_backend(options.backend_store_uri)
    command = server_command(options)
    print(f"MLflow tracking server on http://{options.host}:{options.port} (backend {_redact(options.backend_store_uri)})", flush=True)
    os.execvp(command[0], command)
