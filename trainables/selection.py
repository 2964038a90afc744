"""Choosing the number of states: information criteria and the one-standard-error rule on
held-out NLL. Plain Python (``pyrosweep runs`` reads it without torch); a model's free
parameters are counted by :func:`trainables.models.counting.free_parameters`.

- :func:`information_criteria`: BIC and AIC of a training split as hmmlearn defines them
  (``-2 log L + p log n`` and ``-2 log L + 2 p``, ``n`` the frames, or points).
- :func:`per_frame_standard_error`: the standard error of a split's NLL per frame over its
  sequences.
- :func:`best_per_value` and :func:`recommend`: the best trial per number of states, and the
  smallest number of states whose held-out NLL is within one standard error of the best.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

#: the leaderboard columns a trial's K-selection figures go in
SELECTION_METRICS = ("num_parameters", "valid_nll_se", "bic", "aic")


def information_criteria(log_likelihood: float, parameters: int, frames: int) -> dict[str, float]:
    """``bic`` and ``aic`` of a split with total ``log_likelihood`` over ``frames`` frames."""
    return {
        "bic": -2.0 * log_likelihood + parameters * math.log(frames),
        "aic": -2.0 * log_likelihood + 2.0 * parameters,
    }


def per_frame_standard_error(nll: Sequence[float], frames: Sequence[float]) -> float:
    """Standard error of ``sum(nll) / sum(frames)`` over the sequences, the ratio
    estimator's: ``sqrt(N / (N - 1) * sum((nll_n - r T_n)^2)) / sum(T_n)``.

    :param nll: each sequence's total NLL, ``N`` of them.
    :param frames: their frames ``T_n`` (one each for points).
    :returns: nats per frame; NaN for a single sequence.
    """
    count, total = len(nll), math.fsum(frames)
    if count < 2:
        return math.nan
    ratio = math.fsum(nll) / total
    spread = math.fsum((value - ratio * length) ** 2 for value, length in zip(nll, frames))
    return math.sqrt(count / (count - 1) * spread) / total


def best_per_value(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The best scored row (finite ``best_valid_nll``) for each value of ``key``, ordered
    by that value; ``rows`` are leaderboard rows, best first."""
    best: dict[Any, dict[str, Any]] = {}
    for row in rows:
        scored = row.get("status", "FINISHED") == "FINISHED" and math.isfinite(row.get("best_valid_nll", math.nan))
        if scored and key in row and row[key] not in best:
            best[row[key]] = row
    return [best[value] for value in sorted(best)]


def recommend(per_k: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The one-standard-error rule: of the best rows per ``hidden_dim`` (:func:`best_per_value`),
    the one with the fewest states whose ``best_valid_nll`` is within the best row's
    ``valid_nll_se`` of the best; None without rows."""
    if not per_k:
        return None
    best = min(per_k, key=lambda row: row["best_valid_nll"])
    spread = best.get("valid_nll_se", math.nan)
    threshold = best["best_valid_nll"] + (spread if math.isfinite(spread) else 0.0)
    return min((row for row in per_k if row["best_valid_nll"] <= threshold), key=lambda row: row["hidden_dim"])
