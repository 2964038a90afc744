"""Comparing two models on the same held-out sequences: the difference of their NLL per
frame with a 95% paired-bootstrap confidence interval. numpy only (``pyrosweep runs``
and promotion read it without torch).

Sequences, not frames, are the independent units: a bootstrap replicate draws ``N``
sequence indices with replacement and recomputes both models' ratio estimates
``sum(nll) / sum(frames)`` over the same draw, so the interval reflects how much the
difference depends on which sequences happened to be held out. Two models whose
interval covers 0 are ``tied``: these sequences cannot tell them apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95
DRAWS_AT_ONCE = 1 << 21  # indices drawn per chunk of replicates (16 MB): a server's shadow pairs grow without end


@dataclass(frozen=True)
class Comparison:
    """``difference`` = NLL per frame of A minus B (negative: A is better), its
    ``level`` percentile-bootstrap interval ``[low, high]``, over ``n`` sequences."""

    difference: float
    low: float
    high: float
    n: int
    level: float = LEVEL

    @property
    def tied(self) -> bool:
        """The interval covers 0."""
        return self.low <= 0.0 <= self.high

    @property
    def better(self) -> bool:
        """A is better than B: the whole interval is below 0."""
        return self.high < 0.0

    def describe(self) -> str:
        """``+0.0123 [+0.0040, +0.0201]``: nats per frame."""
        return f"{self.difference:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def paired_bootstrap(
    nll_a: np.ndarray,
    nll_b: np.ndarray,
    frames: np.ndarray,
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
) -> Comparison:
    """Compare model A with model B on the same ``N`` sequences.

    :param nll_a: ``(N,)`` A's NLL of each sequence (nats, the sequence's total).
    :param nll_b: ``(N,)`` B's, of the same sequences in the same order.
    :param frames: ``(N,)`` each sequence's frames (1 for points).
    :param seed: the resampling is seeded: the same inputs give the same interval.

    Replicates are drawn in chunks of at most ``DRAWS_AT_ONCE`` indices, so memory stays
    bounded for any ``N`` (time is ``O(resamples N)``); the chunks take the generator's
    stream in order, so the draws equal one ``(resamples, N)`` draw.
    """
    nll_a, nll_b, frames = (np.asarray(values, dtype=np.float64) for values in (nll_a, nll_b, frames))
    if not (nll_a.shape == nll_b.shape == frames.shape) or nll_a.ndim != 1:
        raise ValueError(
            f"a paired comparison needs the same sequences: got {nll_a.shape}, {nll_b.shape} and {frames.shape} frames"
        )
    count = nll_a.shape[0]
    if count == 0:
        raise ValueError("a paired comparison needs at least one sequence")
    gap = nll_a - nll_b
    difference = float(gap.sum() / frames.sum())
    rng, rows = np.random.default_rng(seed), max(1, DRAWS_AT_ONCE // count)
    replicates = np.empty(resamples)
    for start in range(0, resamples, rows):
        draws = rng.integers(0, count, size=(min(rows, resamples - start), count))
        replicates[start : start + len(draws)] = gap[draws].sum(axis=1) / frames[draws].sum(axis=1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return Comparison(difference, float(low), float(high), count, level)
