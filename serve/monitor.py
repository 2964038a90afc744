"""Anomaly scores and drift for a served version, and its Prometheus metrics
(docs/design.md, "Monitoring").

At promotion the per-step NLL ``-log p(x_t | x_<t)`` of every observed frame of the
validation split is stored with the version (``REFERENCE_FILE`` in its checkpoint). A
frame's *p-value* is its upper tail under that reference, ``(1 + #{ref >= nll}) / (n + 1)``:
small for a frame less likely than the validation frames (uniform for frames like
them). Each replica keeps the per-step NLL of the last ``WINDOW`` frames it scored or
filtered and compares them with the reference by the two-sample Kolmogorov-Smirnov test
(``GET /v1/monitor``): ``drifted`` once the window holds ``MIN_FRAMES`` and the test's
p-value is below ``DRIFT_PVALUE``.

Metrics go through Ray's metrics API (Prometheus, on each node's metrics export port,
prefixed ``ray_``): ``pyrosweep_requests`` and ``pyrosweep_errors`` by route (and
status), ``pyrosweep_latency_s`` by route, ``pyrosweep_step_nll`` (a histogram of
per-step NLL, of up to ``WINDOW`` frames a request).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from scipy.stats import ks_2samp

from trainables.models import SequenceModel
from trainables.models.missing import observed_frames

from .errors import RequestError

REFERENCE_FILE = "per_step_reference.npy"  # in a checkpoint directory: sorted float64 (n,)
WINDOW = 2000  # recent frames a replica compares with the reference
MIN_FRAMES = 100  # before, a window is too small to call drift
DRIFT_PVALUE = 1e-3
LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
# Ray takes positive boundaries only: a density's NLL at or below 0.5 (it may be negative) is in the first bucket
NLL_BUCKETS = [0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500]


@torch.no_grad()
def reference_nll(model: SequenceModel, x: torch.Tensor, lengths: torch.Tensor | None) -> np.ndarray:
    """The sorted per-step NLL ``(n,)`` of the frames (points) of ``x`` with an observed
    value, as ``/v1/score`` computes it (a bound's particles seeded alike)."""
    from .scoring import scores

    steps = -scores(model, x, lengths).per_step
    return np.sort(steps[observed_frames(x, lengths)].double().cpu().numpy())


def write_reference(model: SequenceModel, x: torch.Tensor, lengths: torch.Tensor | None, directory: str | Path) -> int:
    """Store :func:`reference_nll` of ``x`` in a checkpoint ``directory``; how many frames it holds."""
    reference = reference_nll(model, x, lengths)
    np.save(Path(directory) / REFERENCE_FILE, reference)
    return len(reference)


def read_reference(directory: str | Path) -> np.ndarray | None:
    """The reference of a checkpoint directory, None where it has none."""
    path = Path(directory) / REFERENCE_FILE
    return np.load(path) if path.exists() else None


def upper_tail(reference: np.ndarray, nll: np.ndarray) -> np.ndarray:
    """``(1 + #{reference >= nll}) / (n + 1)`` for each value of ``nll`` (any shape); NaN
    stays NaN (a frame with nothing observed)."""
    above = len(reference) - np.searchsorted(reference, nll, side="left")
    return np.where(np.isnan(nll), np.nan, (1 + above) / (len(reference) + 1))


def pvalues_flag(body: object) -> tuple[object, bool]:
    """A score or filter body without its ``pvalues`` field, and the field (default false)."""
    if not isinstance(body, dict) or "pvalues" not in body:
        return body, False
    flag = body["pvalues"]
    if not isinstance(flag, bool):
        raise RequestError(422, f"pvalues: expected true or false, got {flag!r:.40}")
    return {key: value for key, value in body.items() if key != "pvalues"}, flag


class Monitor:
    """A replica's window of recent per-step NLL against its version's reference."""

    def __init__(self, reference: np.ndarray | None, version: str) -> None:
        self.reference, self.version = reference, version
        self._recent: deque[float] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()  # routes record from worker threads

    def pvalues(self, nll: np.ndarray) -> np.ndarray:
        """:func:`upper_tail` against the reference; a 422 where the version has none."""
        if self.reference is None:
            raise RequestError(422, f"pvalues: {self.version} has no reference distribution of per-step NLL "
                               "(pyrosweep promote stores one with each version it registers)")
        return upper_tail(self.reference, nll)

    def record(self, nll: np.ndarray) -> None:
        """Add the per-step NLL of observed frames (NaN: none observed, skipped) to the
        window and to the ``pyrosweep_step_nll`` histogram."""
        values = nll[~np.isnan(nll)].tolist()
        with self._lock:
            self._recent.extend(values)
        for value in values[-WINDOW:]:  # the last WINDOW of a request: a histogram takes one value a call
            METRICS.step_nll.observe(value)

    def report(self) -> dict[str, object]:
        """The ``MonitorAnswer`` fields: window, reference size, KS statistic and p-value,
        the two means and ``drifted``."""
        with self._lock:
            recent = np.array(self._recent)
        report = {"version": self.version, "window": len(recent), "window_limit": WINDOW,
                  "reference_frames": 0 if self.reference is None else len(self.reference),
                  "recent_mean_nll": float(recent.mean()) if len(recent) else None,
                  "reference_mean_nll": None if self.reference is None else float(self.reference.mean()),
                  "statistic": None, "pvalue": None, "drifted": False}
        if self.reference is not None and len(recent):
            test = ks_2samp(recent, self.reference)
            report.update(statistic=float(test.statistic), pvalue=float(test.pvalue),
                          drifted=bool(len(recent) >= MIN_FRAMES and test.pvalue < DRIFT_PVALUE))
        return report


class _Metrics:
    """The replica's Ray metrics, made once per process (on first use: Ray must be up)."""

    @cached_property
    def requests(self):
        from ray.util.metrics import Counter

        return Counter("pyrosweep_requests", description="requests answered, by route", tag_keys=("route",))

    @cached_property
    def errors(self):
        from ray.util.metrics import Counter

        return Counter("pyrosweep_errors", description="requests answered 4xx or 5xx, by route and status", tag_keys=("route", "status"))

    @cached_property
    def latency_s(self):
        from ray.util.metrics import Histogram

        return Histogram("pyrosweep_latency_s", description="seconds from request to answer, by route",
                         boundaries=LATENCY_BUCKETS_S, tag_keys=("route",))

    @cached_property
    def step_nll(self):
        from ray.util.metrics import Histogram

        return Histogram("pyrosweep_step_nll", description="per-step NLL of the frames scored and filtered (nats)",
                         boundaries=NLL_BUCKETS)

    def request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(1, tags={"route": route})
        self.latency_s.observe(seconds, tags={"route": route})
        if status >= 400:
            self.errors.inc(1, tags={"route": route, "status": str(status)})


METRICS = _Metrics()


class Measured:
    """ASGI middleware: every answer counted and timed in :data:`METRICS` by the route it
    matched (its path template, so labels stay few whatever paths clients send), errors
    by status too."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            METRICS.request(route, status, time.perf_counter() - start)
