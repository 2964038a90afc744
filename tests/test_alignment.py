"""Stable state labels: renumbering a model's states, finding a known permutation back
from posterior co-occupancy, the served answers after it, and restarts' agreement.
In-process, real training on small seeded data."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from serve.scoring import answer
from trainables.alignment import align, restart_agreement
from trainables.data import load_dataset
from trainables.models import build_model
from trainables.settings import TrainConfig
from trainables.svi import train

PERMUTATION = [2, 0, 3, 1]
CASES = {  # family: (data set, hyperparameters)
    "hmm": ("synthetic-hmm", {}),
    "nnhmm": ("synthetic-hmm", {"nn_dim": 8}),
    "gaussian-hmm": ("synthetic-gaussian-hmm", {"covariance": "tied"}),
    "gmm": ("synthetic-gmm", {"variance": "dimension"}),
}


def fit(family: str, states: int = 4, seed: int = 0):
    """``family`` trained briefly on its CASES data set (4 true states); the model and the data."""
    name, hyperparameters = CASES[family]
    data = load_dataset(name=name, num_sequences=80, length=25, hidden_dim=4, seed=3)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=states, **hyperparameters)
    train(model, data, TrainConfig(epochs=8, lr=0.05, seed=seed))
    return model.eval(), data


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request):
    return fit(request.param)


def permuted(model, order):
    other = copy.deepcopy(model)
    other.relabel(order)
    return other


def body(model, split):
    if split.lengths is None:
        return {"points": split.x[:6].tolist()}
    return {"sequences": [split.x[n, : int(split.lengths[n])].tolist() for n in range(6)]}


def test_a_known_permutation_is_found_and_undone(trained):
    champion, data = trained
    challenger = permuted(champion, PERMUTATION)
    found = align(challenger, champion, data.splits["valid"])
    assert found.order == np.argsort(PERMUTATION).tolist() and found.agreement == 1.0
    challenger.relabel(found.order)
    # relabelling goes through the parameters' constrained values: float32 round trips
    for name, value in champion.get_parameters().items():
        torch.testing.assert_close(challenger.get_parameters()[name], value, rtol=1e-5, atol=1e-6)
    request = body(champion, data.splits["test"])
    decoded, posterior = answer(challenger, "decode", request), answer(champion, "posterior", request)
    assert decoded["states"] == answer(champion, "decode", request)["states"]
    served = answer(permuted(champion, PERMUTATION), "posterior", request)["marginals"]
    for mine, theirs in zip(served, posterior["marginals"]):  # the permuted model's state i is state PERMUTATION[i]
        np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs)[..., PERMUTATION], atol=1e-5)


def test_more_or_fewer_states_than_the_reference_are_matched_as_far_as_they_go():
    champion, data = fit("hmm")
    bigger, smaller = fit("hmm", states=5, seed=1)[0], fit("hmm", states=3, seed=1)[0]
    for model in (bigger, smaller):
        found = align(model, champion, data.splits["valid"])
        assert sorted(found.order) == list(range(model.hidden_dim)) and 0 < found.agreement <= 1
        model.relabel(found.order)
        again = align(model, champion, data.splits["valid"])
        assert again.order == list(range(model.hidden_dim)), "aligned once, it stays put"


def test_restarts_that_agree_up_to_labels_have_an_adjusted_rand_index_of_one():
    states = np.random.default_rng(0).integers(0, 4, 500)
    assert restart_agreement([states, np.asarray(PERMUTATION)[states]]) == pytest.approx(1.0)
    assert abs(restart_agreement([states, np.random.default_rng(1).integers(0, 4, 500)])) < 0.05


@pytest.mark.parametrize(
    "family, hyperparameters, message",
    [
        ("fhmm", {}, "tuples of a product"),
        ("hmm", {"topology": "left-right"}, "structural zeros"),
        ("dmm", {}, "not labelled states"),
    ],
)
def test_models_whose_states_cannot_be_renumbered_say_why(family, hyperparameters, message):
    model = build_model(family, data_dim=3, hidden_dim=4, **hyperparameters)
    assert message in model.relabel_problem()
    if hasattr(model, "relabel"):
        with pytest.raises(ValueError, match=message):
            model.relabel([1, 0, 3, 2])


def test_a_relabelling_must_be_a_permutation():
    with pytest.raises(ValueError, match="a permutation of 0..3"):
        build_model("hmm", data_dim=3, hidden_dim=4).relabel([0, 0, 1, 2])
