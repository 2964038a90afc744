"""Comparing trials on the same held-out sequences: the paired bootstrap's coverage, ties,
the held-out scores file and the leaderboard's verdicts. numpy only, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cluster.mlflow_layout import versus_best
from trainables.comparison import paired_bootstrap
from trainables.held_out import HeldOutScores


def synthetic_pair(rng: np.random.Generator, count: int, difference: float) -> tuple[np.ndarray, ...]:
    """Two models' NLL of ``count`` sequences whose per-frame difference is ``difference``
    in expectation: B's NLL is 3 nats a frame plus noise, A's is B's plus ``difference``
    a frame plus noise that grows with the sequence's length."""
    frames = rng.integers(20, 200, count).astype(np.float64)
    nll_b = 3.0 * frames + rng.normal(0.0, 2.0, count) * np.sqrt(frames)
    nll_a = nll_b + difference * frames + rng.normal(0.0, 0.5, count) * np.sqrt(frames)
    return nll_a, nll_b, frames


def test_the_interval_covers_a_known_difference_at_its_nominal_rate():
    rng = np.random.default_rng(7)
    covered = sum(
        (c := paired_bootstrap(*synthetic_pair(rng, 73, 0.02), seed=replication)).low <= 0.02 <= c.high
        for replication in range(100)
    )
    assert covered >= 90, f"a 95% interval covered the true difference in {covered} of 100 replications"


def test_identical_trials_are_tied_and_a_clearly_better_one_is_better():
    nll_a, nll_b, frames = synthetic_pair(np.random.default_rng(0), 73, 0.0)
    same = paired_bootstrap(nll_b, nll_b, frames)
    assert same.tied and same.difference == same.low == same.high == 0.0 and same.n == 73
    clearly = paired_bootstrap(nll_b - 0.1 * frames, nll_b, frames)
    assert clearly.better and not clearly.tied and clearly.difference == pytest.approx(-0.1)
    assert paired_bootstrap(nll_a, nll_b, frames, seed=3) == paired_bootstrap(nll_a, nll_b, frames, seed=3), "seeded"


def test_a_paired_comparison_needs_the_same_sequences():
    with pytest.raises(ValueError, match="the same sequences"):
        paired_bootstrap(np.ones(3), np.ones(4), np.ones(3))


def held_out(nll: np.ndarray, frames: np.ndarray, exact: bool = True, test_fingerprint: str = "t") -> HeldOutScores:
    return HeldOutScores(
        nll={"valid": nll, "test": nll}, frames={"valid": frames, "test": frames},
        fingerprints={"valid": "v", "test": test_fingerprint}, exact=exact,
    )


def test_held_out_scores_round_trip_and_refuse_other_data(tmp_path):
    nll_a, nll_b, frames = synthetic_pair(np.random.default_rng(1), 10, 0.0)
    scores = held_out(nll_a, frames.astype(np.int64), exact=False)
    back = HeldOutScores.read(scores.write(tmp_path))
    assert back.exact is False and back.fingerprints == scores.fingerprints
    for split in ("valid", "test"):
        np.testing.assert_array_equal(back.nll[split], nll_a)
        np.testing.assert_array_equal(back.frames[split], frames)
    assert back.per_frame("valid") == nll_a.sum() / frames.sum()
    with pytest.raises(ValueError, match="different test sequences.*other data"):
        back.compare(held_out(nll_b, frames, test_fingerprint="other"), "test")


def test_the_leaderboard_says_best_tied_worse_and_flags_a_bound():
    nll, _, frames = synthetic_pair(np.random.default_rng(2), 73, 0.0)
    scores = {
        "best": held_out(nll, frames), "same": held_out(nll.copy(), frames),
        "worse": held_out(nll + 0.05 * frames, frames), "bound": held_out(nll.copy(), frames, exact=False),
        "failed": None,
    }
    rows = [{"run_id": run, "status": "FINISHED", "best_valid_nll": 1.0 + i} for i, run in enumerate(scores)]
    rows[-1]["status"] = "FAILED"
    verdicts = {row["run_id"]: row["verdict"] for row in versus_best(rows, scores)}
    assert verdicts == {"best": "best", "same": "tied", "worse": "worse", "bound": "tied (bound vs exact)", "failed": ""}
    assert rows[2]["vs_best"] == pytest.approx(0.05) and rows[2]["ci_low"] > 0
    assert math.isnan(rows[-1]["vs_best"]) and rows[-1]["exact"] == ""
