"""Shadow traffic's paired scores: the champion's and the challenger's log-likelihood of
the same mirrored sequences, their comparison and the registry tags that record it.

The unit is the sequence (a point, for a model of points: one frame): each mirrored one
adds the champion's NLL, the challenger's NLL and its frames. The comparison is
:func:`trainables.comparison.paired_bootstrap` of challenger minus champion: the
difference of NLL per frame (nats), **negative when the challenger is better**, with its
95% bootstrap interval over sequences. Where either model's score is a bound (a DMM's
IWAE bound, ``exact`` false) the comparison is not like for like (``like_for_like``
false, ``kinds`` e.g. "bound vs exact", as the leaderboard flags it): a bound's NLL is an
upper bound, so a bound "losing" to an exact score does not show it is worse.

numpy only, no Ray: the shadow deployment (:mod:`serve.shadow`) holds one
:class:`PairedScores` per champion version.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trainables.comparison import Comparison, paired_bootstrap

SHADOW_TAG = "pyrosweep.shadow_vs_champion"  # and _low, _high, _n: on the challenger's version
SHADOW_CHAMPION_TAG = "pyrosweep.shadow_champion"  # the champion it was compared with (NAME/VERSION)
SHADOW_KINDS_TAG = "pyrosweep.shadow_kinds"  # "exact vs exact", "bound vs exact", ...


def kinds(challenger_exact: bool, champion_exact: bool) -> str:
    """``"exact vs exact"``, ``"bound vs exact"``...: the challenger's score, then the champion's."""
    return " vs ".join("exact" if exact else "bound" for exact in (challenger_exact, champion_exact))


@dataclass
class PairedScores:
    """What was mirrored against one champion version: per sequence the champion's and the
    challenger's NLL (nats, the sequence's total) and its frames, in arrival order."""

    champion_exact: bool
    champion_nll: list[float] = field(default_factory=list)
    challenger_nll: list[float] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)

    def add(self, champion_log_likelihood: list[float], challenger_log_likelihood: list[float], frames: list[int]) -> None:
        """One mirrored request: ``(N,)`` log-likelihoods of its sequences by both models and their frames."""
        if not len(champion_log_likelihood) == len(challenger_log_likelihood) == len(frames):
            raise ValueError(
                f"a mirrored request pairs the same sequences: got {len(champion_log_likelihood)} champion, "
                f"{len(challenger_log_likelihood)} challenger scores and {len(frames)} frame counts"
            )
        self.champion_nll += [-value for value in champion_log_likelihood]
        self.challenger_nll += [-value for value in challenger_log_likelihood]
        self.frames += frames

    def snapshot(self) -> PairedScores:
        """A copy that later :meth:`add` calls leave as it is."""
        return PairedScores(self.champion_exact, list(self.champion_nll), list(self.challenger_nll), list(self.frames))

    def compare(self) -> Comparison | None:
        """Challenger minus champion (None before the first pair)."""
        if not self.frames:
            return None
        return paired_bootstrap(np.array(self.challenger_nll), np.array(self.champion_nll), np.array(self.frames))


def shadow_report(pairs: PairedScores | None, champion: str, challenger: str, challenger_exact: bool) -> dict[str, Any]:
    """The fields of :class:`serve.schemas.ShadowReport` (without the mirror's counters)."""
    comparison = None if pairs is None else pairs.compare()
    champion_exact = True if pairs is None else pairs.champion_exact
    return {
        "champion": champion,
        "challenger": challenger,
        "n": 0 if comparison is None else comparison.n,
        "frames": 0 if pairs is None else int(sum(pairs.frames)),
        "difference": None if comparison is None else comparison.difference,
        "low": None if comparison is None else comparison.low,
        "high": None if comparison is None else comparison.high,
        "level": None if comparison is None else comparison.level,
        "kinds": kinds(challenger_exact, champion_exact),
        "like_for_like": challenger_exact and champion_exact,
    }


def shadow_tags(report: dict[str, Any]) -> dict[str, str]:
    """The challenger version's tags for a :func:`shadow_report` with pairs, in the style
    of promotion's ``pyrosweep.vs_previous``."""
    return {
        SHADOW_TAG: repr(report["difference"]),
        f"{SHADOW_TAG}_low": repr(report["low"]),
        f"{SHADOW_TAG}_high": repr(report["high"]),
        f"{SHADOW_TAG}_n": str(report["n"]),
        SHADOW_CHAMPION_TAG: report["champion"],
        SHADOW_KINDS_TAG: report["kinds"],
    }
