"""The shadow deployment of ``pyrosweep serve --shadow models:/NAME@challenger``: the
challenger (pinned to a version, like the champion) scores the sequences the champion's
replicas mirror to it (:mod:`serve.mirror`) and accumulates the paired differences
(:mod:`serve.pairing`), one set per champion version. One replica, so they accumulate in
one place; it asks Ray for no CPU (it must never keep a champion replica from being
placed: a swap starts the new champion replica beside the old one) and shares the cores.

Its answers go to ``GET /v1/shadow`` (through the champion). The report is also written
to the challenger's registry version as tags (:func:`serve.pairing.shadow_tags`): when
``GET /v1/shadow`` is asked, at most every ``PUBLISH_EVERY_S``, and by :meth:`publish`,
which ``pyrosweep serve`` calls before each swap (a swap redeploys the application, so
this replica and its pairs are replaced) and when it shuts down. A challenger given as a
checkpoint directory has no version: nothing is logged.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray import serve

from .app import load_source, served_as
from .mirror import MAX_IN_FLIGHT
from .pairing import PairedScores, shadow_report, shadow_tags
from .registry import parse_model_uri
from .scoring import compute

logger = logging.getLogger(__name__)

DEPLOYMENT = "shadow"
PUBLISH_EVERY_S = 30.0


@serve.deployment(name=DEPLOYMENT, num_replicas=1, max_ongoing_requests=MAX_IN_FLIGHT, ray_actor_options={"num_cpus": 0})
class ShadowScorer:
    """The challenger of ``user_config`` (as :class:`serve.app.ModelServer`'s) and the
    paired scores of what was mirrored to it."""

    def __init__(self) -> None:
        self.pairs: dict[str, PairedScores] = {}  # champion (NAME/VERSION) -> its pairs
        self.latest: str | None = None  # the champion of the last mirror
        self._published_at = -math.inf

    def reconfigure(self, config: dict[str, Any]) -> None:
        model, info = load_source(config)
        self.model, self.label, self.config, self.pairs = model, served_as(info), config, {}

    async def pair(self, champion: str, champion_exact: bool, log_likelihood: list[float], inputs: list[np.ndarray]) -> None:
        """Score one mirrored request's items (as the champion parsed them: ``(T_i, D)``
        sequences or ``(D,)`` points) and pair them with the champion's ``(N,)``
        ``log_likelihood``."""
        model = self.model
        shape = (2 if model.data_kind == "sequences" else 1, model.data_dim)
        if any((item.ndim, item.shape[-1]) != shape for item in inputs):
            raise ValueError(
                f"the challenger {self.label} takes {model.data_kind} of {model.data_dim} values; "
                f"the champion {champion} was sent items of shape {inputs[0].shape}"
            )
        fields = await asyncio.to_thread(compute, model, "score", inputs)
        frames = [len(item) if model.data_kind == "sequences" else 1 for item in inputs]
        self.pairs.setdefault(champion, PairedScores(champion_exact)).add(log_likelihood, fields["log_likelihood"], frames)
        self.latest = champion

    async def report(self, champion: str) -> dict[str, Any]:
        """The comparison with ``champion`` so far (:class:`serve.schemas.ShadowReport`,
        less the mirror's counters), logged to the registry at most every ``PUBLISH_EVERY_S``."""
        pairs = self.pairs.get(champion)
        snapshot = None if pairs is None else pairs.snapshot()  # pair() appends on this loop meanwhile
        report = await asyncio.to_thread(shadow_report, snapshot, champion, self.label, self.model.exact)
        if report["n"] and time.monotonic() - self._published_at >= PUBLISH_EVERY_S:
            await asyncio.to_thread(self._log, report)
        return {**report, "logged_to": self._version_uri()}

    async def publish(self) -> dict[str, Any] | None:
        """Log the comparison with the latest champion now; returns its report (None before any pair)."""
        if self.latest is None:
            return None
        report = await asyncio.to_thread(shadow_report, self.pairs[self.latest].snapshot(), self.latest, self.label, self.model.exact)
        await asyncio.to_thread(self._log, report)
        return report

    def _version_uri(self) -> str | None:
        source = self.config["source"]
        return source if source.startswith("models:/") else None

    def _log(self, report: dict[str, Any]) -> None:
        """Write ``report`` as tags on the challenger's version; a registry that cannot be
        reached is logged and tried again at the next chance."""
        self._published_at = time.monotonic()
        if self._version_uri() is None:
            return
        name, _, version = parse_model_uri(self._version_uri())
        uri = self.config["tracking_uri"]
        client = MlflowClient(uri, registry_uri=uri)
        try:
            for key, value in shadow_tags(report).items():
                client.set_model_version_tag(name, version, key, value)
        except (MlflowException, OSError) as error:
            self._published_at = -math.inf
            logger.warning("the shadow comparison was not logged to %s: %s", self._version_uri(), error)
