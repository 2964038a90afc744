"""Missing values (NaN) integrated out exactly (``trainables/models/missing.py``).

Brute force over the states with the missing values integrated out, for every family that
takes them, on every path of the engine (fully and partly missing frames, missing first
and last frames, a sequence of missing values only): ``tests/test_exact.py``. Here:
gradients against finite differences, EM's monotone objective, the mixture's closed form,
the DMM's masked bound, parameter recovery with 30% of the values missing, and the
refusals. Over HTTP: ``tests/test_serve.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment
from scipy.stats import norm
from test_em import CASES as EM_CASES
from test_em import em_trainer
from test_exact import CASES, make_model
from helpers import knock_out

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.dmm import bernoulli_log_prob
from trainables.settings import TrainConfig
from trainables.svi import Trainer

MISSING_FAMILIES = [family for family, missing in CASES if missing]


@pytest.mark.parametrize("family", MISSING_FAMILIES)
def test_gradients_equal_finite_differences_whatever_is_missing(family):
    """The training loss (log prior + log-likelihood of the observed values) in the
    unconstrained parameters: finite, and its gradient equal to finite differences."""
    model, x, lengths = make_model(family, seed=5, missing=True)
    names = model.parameter_names
    start = tuple(model.unconstrained()[name].detach().clone().requires_grad_() for name in names)

    def loss(*values):
        return model.training_loss_of(model.constrain(dict(zip(names, values))), x, lengths)

    assert torch.isfinite(loss(*start))
    assert torch.autograd.gradcheck(loss, start)


@pytest.mark.parametrize("case", [case for case, (family, _, _) in EM_CASES.items() if family != "arhmm"])
def test_em_with_missing_values_never_decreases_its_objective(case):
    """EM's E-step and M-steps over the observed values (full and tied covariances: EM over
    the missing values too, their conditional expectations under each state)."""
    trainer = em_trainer(case, epochs=15, missing=0.2)
    losses = []
    while not trainer.done:
        trainer.run_epoch()
        losses.append([candidate.history[-1].train_loss for candidate in trainer.candidates])
    losses = np.array(losses)  # (iterations, restarts)
    assert np.isfinite(losses).all() and losses.shape[0] >= 5
    assert (losses[1:] <= losses[:-1] + 1e-12 * np.abs(losses[:-1])).all(), np.diff(losses, axis=0).max()


@pytest.mark.parametrize("variance", ["global", "component-dimension"])
def test_a_mixture_scores_the_observed_dimensions_of_each_point(variance):
    """``gmm``: log sum_k w_k prod_{d observed} N(x_d; mu_kd, s_kd), a point of nothing
    observed scoring 0; float64 against scipy."""
    model = build_model("gmm", data_dim=3, hidden_dim=2, variance=variance).double()
    points = torch.tensor([[0.5, math.nan, -1.0], [math.nan] * 3, [2.0, 1.0, math.nan]], dtype=torch.float64)
    weights, locs, scales = (value.numpy() for value in model.components())
    expected = []
    for point in points.numpy():
        seen = ~np.isnan(point)
        per_component = [np.log(w) + norm.logpdf(point[seen], loc[seen], scale[seen]).sum()
                         for w, loc, scale in zip(weights, locs, scales)]
        expected.append(np.logaddexp.reduce(per_component))
    np.testing.assert_allclose(model.log_likelihood(points).detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    (responsibilities,) = model.posterior(points)
    torch.testing.assert_close(responsibilities[1], model.get_parameters()["weights"])


def test_the_dmm_masks_missing_values_out_of_its_emission_and_its_bound_stays_finite():
    x = torch.tensor([[1.0, math.nan, 0.0], [math.nan, math.nan, math.nan]])
    logits = torch.tensor([0.3, -1.2, 2.0])
    expected = torch.distributions.Bernoulli(logits=logits[[0, 2]]).log_prob(x[0, [0, 2]]).sum()
    torch.testing.assert_close(bernoulli_log_prob(x, logits), torch.stack([expected, torch.tensor(0.0)]))
    data = knock_out(load_dataset("synthetic-hmm", num_sequences=10, length=8, seed=0), 0.3, seed=1)
    model = build_model("dmm", data_dim=data.data_dim, hidden_dim=2, emission_dim=4, transition_dim=4, rnn_dim=4)
    train = data.splits["train"]
    loss = model.training_loss(train.x, train.lengths)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.isfinite(model.log_likelihood(train.x, train.lengths)).all()


#: family -> (emission parameter, its tolerance, the transitions' tolerance): the largest
#: difference between the fits with 30% of the values missing and with none, from the
#: same screened start (measured 0.089 of means spread over +-6 / 0.043, and 0.067 of
#: rates in 0.5-10 / 0.012, at 200 sequences of 25-50 frames)
RECOVERY = {"gaussian-hmm": ("means", 0.15, 0.06), "poisson-hmm": ("rates", 0.15, 0.03)}


@pytest.mark.parametrize("family", list(RECOVERY))
def test_a_fit_with_30_percent_missing_recovers_the_complete_data_fit(family):
    key, emission_tolerance, transition_tolerance = RECOVERY[family]
    complete = load_dataset(f"synthetic-{family}", num_sequences=200, length=50, seed=0)
    fits = []
    for data in (complete, knock_out(complete, 0.3, seed=1)):
        model = build_model(family, data_dim=data.data_dim, hidden_dim=3)
        trainer = Trainer(model, data, TrainConfig(method="em", epochs=300, screen=10, patience=20, seed=0))
        while not trainer.done:
            trainer.run_epoch()
        trainer.result()
        fits.append(model.get_parameters())
    full, holey = fits
    _, matched = linear_sum_assignment(torch.cdist(holey[key].double(), full[key].double()).numpy())
    order = torch.from_numpy(np.argsort(matched))
    assert (holey[key][order] - full[key]).abs().max() <= emission_tolerance
    assert (holey["transition"][order][:, order] - full["transition"]).abs().max() <= transition_tolerance


@pytest.mark.parametrize("family", ["arhmm", "nnhmm"])
def test_families_that_condition_on_the_previous_frame_refuse_missing_values(family):
    data = knock_out(load_dataset("synthetic-hmm", num_sequences=10, length=8, seed=0), 0.1, seed=2)
    hparams = {"nn_dim": 4, "nn_channels": 1} if family == "nnhmm" else {}
    with pytest.raises(ValueError, match=r"the train split's x\[\d+, \d+, \d+\] is missing \(NaN\); a value this family cannot take missing"):
        Trainer(build_model(family, data_dim=data.data_dim, hidden_dim=2, **hparams), data, TrainConfig(epochs=1))


def test_a_partly_missing_symbol_is_refused_where_it_is():
    data = load_dataset("synthetic-categorical-hmm", num_sequences=10, length=8, seed=0)
    data.splits["valid"].x[1, 2, 0] = math.nan
    with pytest.raises(ValueError, match=r"the valid split's x\[1, 2\] is partly missing; a one-hot frame is missing whole"):
        Trainer(build_model("categorical-hmm", data_dim=data.data_dim, hidden_dim=2), data, TrainConfig(epochs=1))
