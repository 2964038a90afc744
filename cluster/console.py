"""Where the output of the commands that run Ray goes: ``sweep``, ``serve``, ``submit``
and ``demo`` print their own story; the logs of Ray, Tune, Serve, MLflow and the other
libraries go to a file per command run, ``$PYROSWEEP_HOME/logs/COMMAND-DATE-TIME-PID.log``
(with ``-v``, to stderr as well, and Ray's workers' output is forwarded to the driver as
usual; without it, that output stays in the Ray session's own log files).

Library use (tests, notebooks) is untouched until :func:`setup_logging` is called.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from .home import project_home

# Set before Ray or MLflow is imported: both read them once, at import.
QUIET_ENV = {
    # MLflow's loggers get no terminal handler of their own: their records reach the file
    "MLFLOW_CONFIGURE_LOGGING": "false",
    # Tune's default output engine prints its experiment box even with verbose=0; the
    # older one prints nothing then (pyrosweep's SweepView reports instead)
    "RAY_AIR_NEW_OUTPUT": "0",
    # serve.shutdown() waits on the Serve controller's graceful_shutdown task, which ends
    # when the controller kills itself; Ray then tells the driver, on every normal
    # shutdown, "Task ServeController.graceful_shutdown failed ... killed by `ray.kill`"
    "RAY_DEDUP_LOGS_SKIP_REGEX": r"ServeController\.graceful_shutdown failed",
    # the raylet's messages to the driver (a worker died, ...) without colour codes
    "RAY_COLOR_PREFIX": "0",
}
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# their warnings say the run cannot go on as asked (it waits for resources the cluster
# lacks), so they are shown on stderr too
SHOWN_LOGGERS = ("ray.tune.execution.insufficient_resources_manager",)

_session: dict = {"log_file": None, "verbose": False}


def quiet_environment() -> None:
    """Set :data:`QUIET_ENV` (where the user has not set those variables)."""
    for name, value in QUIET_ENV.items():
        os.environ.setdefault(name, value)


def setup_logging(command: str, verbose: bool = False) -> Path:
    """Send every logger's records (INFO and above) to a new log file for ``command``,
    and to stderr with ``verbose``; returns the file's path.

    Call it once the command has imported Ray (and Serve): they give their loggers
    terminal handlers of their own at import, which are removed here."""
    directory = project_home() / "logs"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    handlers: list[logging.Handler] = [logging.FileHandler(path, encoding="utf-8")]
    if verbose:
        handlers.append(_Stderr())
    for handler in handlers:
        handler.setLevel(logging.INFO)  # records of DEBUG loggers (Ray Data's) stop here
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)
    if not verbose:
        shown = _Stderr()
        shown.setLevel(logging.WARNING)
        shown.addFilter(lambda record: record.name.startswith(SHOWN_LOGGERS))
        shown.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
        logging.root.addHandler(shown)
    logging.captureWarnings(True)
    _route_library_loggers()
    _session.update(log_file=path, verbose=verbose)
    return path


class _Stderr(logging.StreamHandler):
    """A handler writing to ``sys.stderr`` as it is at each record (the live view of a
    sweep replaces it, to print above its table)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _route_library_loggers() -> None:
    """Take the terminal handlers off every logger that has one (Ray's, Ray Data's,
    Serve's) and let its records propagate to the root logger's handlers."""
    for logger in logging.root.manager.loggerDict.values():
        if not isinstance(logger, logging.Logger):
            continue
        kept = [handler for handler in logger.handlers if not _prints_to_terminal(handler)]
        if len(kept) < len(logger.handlers):
            logger.handlers = kept
            logger.propagate = True


def _prints_to_terminal(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


def log_file() -> Path | None:
    """This command run's log file, once :func:`setup_logging` has made it."""
    return _session["log_file"]


def forward_worker_output() -> bool:
    """``ray.init``'s ``log_to_driver``: Ray's default (yes) unless the command logs to
    a file without ``-v``."""
    return log_file() is None or _session["verbose"]


def live_terminal() -> bool:
    """Whether to draw live views: stdout is a terminal and no log records stream to it."""
    return sys.stdout.isatty() and not _session["verbose"]


def print_table(rows: list[dict], columns: list[str]) -> None:
    """``rows`` as plain aligned columns (floats to 4 significant digits)."""
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
