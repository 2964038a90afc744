"""The champion's side of shadow traffic (``pyrosweep serve --shadow``): after a score
request is answered, its sequences and the champion's log-likelihoods go to the shadow
deployment (:mod:`serve.shadow`) without the request waiting for it.

A mirror is a ``DeploymentHandle`` call that is never awaited in the request path: a task
awaits it on the side, so its errors are logged and counted (``failed``), not lost. At
most ``max_in_flight`` mirrors are pending per replica: beyond that a request is not
mirrored and its sequences are counted as ``dropped`` (a slow challenger cannot grow the
champion's memory without bound). ``fraction`` of score requests are mirrored, chosen by
a seeded generator.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 64  # pending mirrors per champion replica


class Mirror:
    """Mirrors score requests to the shadow deployment behind ``handle``."""

    def __init__(self, handle: Any, fraction: float = 1.0, seed: int = 0, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.handle, self.fraction, self.max_in_flight = handle, fraction, max_in_flight
        self._rng = random.Random(seed)
        self._in_flight: set[asyncio.Task] = set()
        self.dropped = 0  # sequences not mirrored: max_in_flight mirrors were pending
        self.failed = 0  # mirrored requests whose challenger call raised (logged)

    def offer(self, model: torch.nn.Module, inputs: list[np.ndarray], log_likelihood: list[float]) -> None:
        """Mirror one answered score request (its items and the champion's ``(N,)``
        log-likelihoods) unless it is not chosen or too many mirrors are pending. Call from
        the replica's event loop; returns at once."""
        if self._rng.random() >= self.fraction:
            return
        if len(self._in_flight) >= self.max_in_flight:
            self.dropped += len(inputs)
            return
        response = self.handle.pair.remote(model.served_as, model.exact, log_likelihood, inputs)
        task = asyncio.get_running_loop().create_task(self._settle(response))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _settle(self, response: Any) -> None:
        try:
            await response
        except Exception:  # whatever the challenger raised: the champion's answer is already out
            self.failed += 1
            logger.exception("a shadow mirror failed")

    async def report(self, model: torch.nn.Module) -> dict[str, Any]:
        """The shadow's report on ``model`` (the champion this replica serves) with this
        replica's counters: ``pending``, ``dropped``, ``failed``."""
        report = await self.handle.report.remote(model.served_as)
        return {**report, "pending": len(self._in_flight), "dropped": self.dropped, "failed": self.failed}
