"""Choosing the number of states: free parameters counted by hand for every family, the
held-out standard error against its textbook form, and the one-standard-error rule.
(BIC and AIC against hmmlearn's: tests/test_references.py; the whole path through a
sweep, its K curve and ``pyrosweep runs --by hidden_dim``: tests/test_sweep.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainables.models import build_model
from trainables.models.counting import free_parameters
from trainables.selection import best_per_value, per_frame_standard_error, recommend

# (family, hyperparameters, D, K, the count by hand)
HAND_COUNTS = [
    # initial K - 1, transition K (K - 1), Bernoulli K D
    ("hmm", {}, 4, 3, 2 + 6 + 12),
    # emission per state, previous value and key: K 2 D
    ("arhmm", {}, 3, 2, 1 + 2 + 12),
    # initial over pairs K^2 - 1, transition K K (K - 1), emission K D
    ("hmm2", {}, 3, 2, 3 + 4 + 6),
    # two chains of 2 states (K = 4): initials 1 + 1, transitions 2 + 2, emission 2 2 D
    ("fhmm", {}, 3, 4, 2 + 4 + 12),
    # the second chain's initial and transition depend on the first's state: 1 + 2, 2 + 4
    ("pfhmm", {}, 3, 4, 3 + 6 + 12),
    ("gaussian-hmm", {"covariance": "diag"}, 3, 2, 1 + 2 + 6 + 6),
    ("gaussian-hmm", {"covariance": "spherical"}, 3, 2, 1 + 2 + 6 + 2),
    ("gaussian-hmm", {"covariance": "full"}, 3, 2, 1 + 2 + 6 + 2 * 6),
    ("gaussian-hmm", {"covariance": "tied"}, 3, 2, 1 + 2 + 6 + 6),
    # symbols: K (V - 1)
    ("categorical-hmm", {}, 5, 3, 2 + 6 + 12),
    ("poisson-hmm", {}, 4, 3, 2 + 6 + 12),
    # weights K - 1, locations K D, scales per component and dimension K D
    ("gmm", {"variance": "component-dimension"}, 3, 2, 1 + 6 + 6),
    ("gmm", {"variance": "global"}, 3, 2, 1 + 6 + 1),
    # topologies, masked entries excluded: left-right starts in state 0 (initial: none free),
    # rows 0 -> {0, 1}, 1 -> {1, 2}, 2 -> {2}: 1 + 1 + 0
    ("hmm", {"topology": "left-right"}, 4, 3, 0 + 2 + 12),
    # banded (bandwidth 1) over 4 states: rows of 2, 3, 3, 2 allowed entries; initial free
    ("gaussian-hmm", {"topology": "banded", "bandwidth": 1}, 2, 4, 3 + 6 + 8 + 8),
]


@pytest.mark.parametrize("family, hparams, D, K, expected", HAND_COUNTS)
def test_free_parameters_are_counted_as_by_hand(family, hparams, D, K, expected):
    assert free_parameters(build_model(family, data_dim=D, hidden_dim=K, **hparams)) == expected


def test_networks_count_every_weight():
    nnhmm = build_model("nnhmm", data_dim=3, hidden_dim=2, nn_dim=4, nn_channels=2)
    weights = sum(p.numel() for p in nnhmm.network_parameters())
    assert weights > 0 and free_parameters(nnhmm) == 1 + 2 + weights
    dmm = build_model("dmm", data_dim=3, hidden_dim=2, emission_dim=4, transition_dim=4, rnn_dim=4)
    assert free_parameters(dmm) == sum(p.numel() for p in dmm.parameters())


def test_equal_lengths_give_the_standard_error_of_the_mean():
    rng = np.random.default_rng(0)
    nll = rng.uniform(10, 20, 12)
    expected = np.std(nll / 5, ddof=1) / math.sqrt(12)
    assert per_frame_standard_error(nll.tolist(), [5] * 12) == pytest.approx(expected, rel=1e-12)
    assert math.isnan(per_frame_standard_error([3.0], [2]))


def test_ragged_lengths_follow_the_ratio_estimator():
    """With unequal lengths the per-frame NLL is a ratio; its delta-method standard error."""
    nll, frames = np.array([10.0, 31.0, 4.0, 22.0]), np.array([5, 15, 2, 10])
    ratio = nll.sum() / frames.sum()
    expected = math.sqrt(4 / 3 * ((nll - ratio * frames) ** 2).sum()) / frames.sum()
    assert per_frame_standard_error(nll.tolist(), frames.tolist()) == pytest.approx(expected, rel=1e-12)


def rows(*entries):
    return [{"hidden_dim": k, "best_valid_nll": nll, "valid_nll_se": se, "status": status, "trial": f"t{n}"}
            for n, (k, nll, se, status) in enumerate(entries)]


def test_the_best_trial_per_k_and_the_fewest_states_within_one_standard_error():
    board = sorted(rows((3, 2.00, 0.05, "FINISHED"), (4, 1.98, 0.04, "FINISHED"), (2, 2.50, 0.05, "FINISHED"),
                        (3, 2.10, 0.05, "FINISHED"), (5, 1.97, 0.04, "FINISHED"), (1, math.nan, 0.1, "FAILED")),
                   key=lambda row: row["best_valid_nll"] if math.isfinite(row["best_valid_nll"]) else math.inf)
    per_k = best_per_value(board, "hidden_dim")
    assert [row["hidden_dim"] for row in per_k] == [2, 3, 4, 5]
    assert [row["best_valid_nll"] for row in per_k] == [2.50, 2.00, 1.98, 1.97]
    # the best is K=5 at 1.97 +- 0.04: K=3's 2.00 is within 2.01, K=2's 2.50 is not
    assert recommend(per_k)["hidden_dim"] == 3
    assert recommend([]) is None
