"""The engine against independent implementations: Pyro's classic enumeration
(``TraceEnum_ELBO``), hmmlearn's ``GaussianHMM`` and the closed-form mixture density;
every test on every path of the engine (compiled, PyTorch, scan)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hmmlearn.hmm import CategoricalHMM as HmmlearnCategoricalHMM
from hmmlearn.hmm import GaussianHMM as HmmlearnGaussianHMM
from hmmlearn.hmm import PoissonHMM as HmmlearnPoissonHMM
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from scipy.stats import multivariate_normal

from trainables.models import build_model
from trainables.models.classic import classic_gmm_model, classic_hmm_model, classic_nnhmm_model
from trainables.models.counting import free_parameters
from trainables.selection import information_criteria

CLASSIC = {"hmm": classic_hmm_model, "nnhmm": classic_nnhmm_model}
pytestmark = pytest.mark.usefixtures("engine")  # conftest


def random_hmm(dtype, seed=0, N=7, T=12, D=6, K=4, family="hmm"):
    torch.manual_seed(seed)
    x = (torch.rand(N, T, D) < 0.3).to(dtype)
    lengths = torch.randint(1, T + 1, (N,))
    lengths[0] = T
    model = build_model(family, data_dim=D, hidden_dim=K).to(dtype)
    model.set_parameters(**model.init_parameters(x, lengths, torch.Generator().manual_seed(seed)))
    return model, x, lengths


@pytest.mark.parametrize("family", list(CLASSIC))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hmm_loss_and_gradients_equal_classic_trace_enum(dtype, family):
    """``hmm`` against examples/hmm.py's model_1, ``nnhmm`` (its network's weights too)
    against model_5."""
    model, x, lengths = random_hmm(dtype, family=family)
    ours = Trace_ELBO().differentiable_loss(model.model, model.guide, x, lengths, scale=3.0)
    ours_grads = torch.autograd.grad(ours, list(model.parameters()))
    classic = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(
        CLASSIC[family](model), model.guide, x, lengths, scale=3.0
    )
    classic_grads = torch.autograd.grad(classic, list(model.parameters()))
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(ours, classic, rtol=rtol, atol=0)
    for a, b in zip(ours_grads, classic_grads):
        torch.testing.assert_close(a, b, rtol=rtol * 10, atol=rtol * 10 * float(b.abs().max()))


def gaussian_case(seed=0, K=3, D=2, lengths=(9, 4, 1, 7)):
    torch.manual_seed(seed)
    model = build_model("gaussian-hmm", data_dim=D, hidden_dim=K).double()
    model.set_parameters(
        initial=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        transition=torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]], dtype=torch.float64),
        means=torch.tensor([[-2.0, 0.0], [0.0, 2.0], [2.5, -1.0]], dtype=torch.float64),
        scales=torch.tensor([[0.7, 1.1], [0.5, 0.9], [1.3, 0.6]], dtype=torch.float64),
    )
    x, _ = model.sample(len(lengths), max(lengths), seed=seed)
    lengths = torch.tensor(lengths)
    reference = HmmlearnGaussianHMM(n_components=K, covariance_type="diag", init_params="", params="")
    p = model.get_parameters()
    reference.startprob_ = p["initial"].numpy()
    reference.transmat_ = p["transition"].numpy()
    reference.means_ = p["means"].numpy()
    reference.covars_ = (p["scales"] ** 2).numpy()
    return model, x, lengths, reference


#: hmmlearn's covars_ layout per covariance type, from full (K, D, D) covariances
HMMLEARN_COVARS = {
    "diag": lambda c: np.diagonal(c, axis1=1, axis2=2),
    "spherical": lambda c: np.diagonal(c, axis1=1, axis2=2)[:, 0],
    "full": lambda c: c,
    "tied": lambda c: c[0],
}


def covariance_case(covariance: str, lengths=(9, 4, 1, 7, 12)):
    """Ours and hmmlearn's Gaussian HMM of ``covariance`` type with the same parameters."""
    rng = np.random.default_rng(3)
    K, D = 3, 2
    model = build_model("gaussian-hmm", data_dim=D, hidden_dim=K, covariance=covariance).double()
    params = {"initial": CHAIN["initial"], "transition": CHAIN["transition"], "means": rng.normal(scale=2.0, size=(K, D))}
    factor = np.tril(rng.normal(size=(K, D, D)), -1) * 0.5 + np.eye(D) * rng.uniform(0.5, 1.5, (K, D, 1))
    params.update({
        "diag": {"scales": rng.uniform(0.5, 1.5, (K, D))},
        "spherical": {"scales": rng.uniform(0.5, 1.5, K)},
        "full": {"scale_tril": factor},
        "tied": {"scale_tril": factor[0]},
    }[covariance])
    model.set_parameters(**{name: torch.from_numpy(value) for name, value in params.items()})
    x, _ = model.sample(len(lengths), max(lengths), seed=4)
    reference = HmmlearnGaussianHMM(n_components=K, covariance_type=covariance, init_params="", params="")
    reference.n_features = D
    reference.startprob_, reference.transmat_, reference.means_ = CHAIN["initial"], CHAIN["transition"], params["means"]
    reference.covars_ = HMMLEARN_COVARS[covariance](model.get_parameters()["covariances"].numpy())
    return model, x, torch.tensor(lengths), reference


@pytest.mark.parametrize("covariance", list(HMMLEARN_COVARS))
def test_every_covariance_type_matches_hmmlearn(covariance):
    """Per-sequence score, Viterbi and ``predict_proba`` against hmmlearn's ``GaussianHMM``
    of the same ``covariance_type`` and parameters, to 1e-10; ``covariances`` read back as
    its ``covars_`` (full matrices)."""
    model, x, lengths, reference = covariance_case(covariance)
    covariances = model.get_parameters()["covariances"].numpy()
    np.testing.assert_allclose(covariances, reference.covars_, rtol=1e-12)  # both full (K, D, D)
    log_likelihood = model.log_likelihood(x, lengths).detach()
    states, log_joint = model.decode(x, lengths)
    (marginals,) = model.posterior(x, lengths)
    for n, length in enumerate(lengths.tolist()):
        frames = x[n, :length].numpy()
        np.testing.assert_allclose(log_likelihood[n].item(), reference.score(frames), rtol=1e-10)
        their_log_joint, their_states = reference.decode(frames, algorithm="viterbi")
        np.testing.assert_allclose(log_joint[n].item(), their_log_joint, rtol=1e-10)
        np.testing.assert_array_equal(states[n, :length].numpy(), their_states)
        np.testing.assert_allclose(marginals[n, :length].numpy(), reference.predict_proba(frames), atol=1e-10)


@pytest.mark.parametrize("covariance", ["full", "tied"])
def test_one_em_iteration_of_full_and_tied_equals_hmmlearns(covariance):
    """hmmlearn's full/tied M-step is an inverse-Wishart mode: ``(covars_prior +
    scatter) / (max(covars_weight - D, 0) + n)``; ours with ``psi I`` and ``nu`` degrees
    of freedom is ``(psi I + scatter) / (n + nu + D + 1)``: the same with
    ``covars_prior = psi I`` and ``covars_weight = nu + 2 D + 1`` (means: flat on both)."""
    model, x, lengths, reference = covariance_case(covariance)
    D, psi = 2, 0.3
    flat = build_model("gaussian-hmm", data_dim=D, hidden_dim=3, covariance=covariance, prior_mean_scale=1e12,
                       prior_covariance_scale=psi, prior_covariance_dof=2.0, prior_sticky=1e-300, prior_smooth=1.0).double()
    nu = flat.inverse_wishart_df
    reference.set_params(n_iter=1, params="stmc", means_weight=0.0, covars_prior=psi * np.eye(D), covars_weight=nu + 2 * D + 1)
    frames = [x[n, :length].numpy() for n, length in enumerate(lengths.tolist())]
    reference.fit(np.concatenate(frames), [len(f) for f in frames])
    params = {name: value.unsqueeze(0) for name, value in model.get_parameters().items() if name != "covariances"}
    ours, _ = flat.em_step(params, x, lengths)
    np.testing.assert_allclose(ours["initial"][0], reference.startprob_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours["transition"][0], reference.transmat_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(ours["means"][0], reference.means_, rtol=1e-8, atol=1e-10)
    covariance_ours = ours["scale_tril"][0] @ ours["scale_tril"][0].transpose(-1, -2)
    np.testing.assert_allclose(covariance_ours, reference._covars_, rtol=1e-8, atol=1e-12)


def test_gaussian_hmm_matches_hmmlearn():
    model, x, lengths, reference = gaussian_case()
    ours_ll = model.log_likelihood(x, lengths).detach()
    states, log_joint = model.decode(x, lengths)
    (marginals,) = model.posterior(x, lengths)
    for n, length in enumerate(lengths.tolist()):
        frames = x[n, :length].numpy()
        np.testing.assert_allclose(ours_ll[n].item(), reference.score(frames), rtol=1e-10)
        ref_log_joint, ref_states = reference.decode(frames, algorithm="viterbi")
        np.testing.assert_allclose(log_joint[n].item(), ref_log_joint, rtol=1e-10)
        np.testing.assert_array_equal(states[n, :length].numpy(), ref_states)
        np.testing.assert_allclose(marginals[n, :length].numpy(), reference.predict_proba(frames), atol=1e-10)


#: hmmlearn's families for symbols and counts: (ours, theirs, our emission parameters, its
#: attribute, our frames -> its observations, our flat-prior hyperparameters, its flat priors)
DISCRETE = {
    "categorical-hmm": (
        HmmlearnCategoricalHMM, "emission_probs", "emissionprob_", lambda x: x.argmax(-1, keepdims=True),
        {"prior_emission": 1.0}, {"emissionprob_prior": 1.0},
    ),
    "poisson-hmm": (
        HmmlearnPoissonHMM, "rates", "lambdas_", lambda x: x.astype(np.int64),
        {"prior_rate_shape": 1 + 1e-12, "prior_rate_rate": 1e-30}, {"lambdas_prior": 0.0, "lambdas_weight": 0.0},
    ),
}
CHAIN = {
    "initial": np.array([0.5, 0.3, 0.2]),
    "transition": np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]]),
}


def discrete_case(family: str, lengths=(9, 4, 1, 7, 12)):
    """Ours and hmmlearn's ``family`` with the same parameters (flat priors on both), and
    frames sampled from ours, one sequence per length."""
    peer, ours_name, theirs_name, _, flat, their_flat = DISCRETE[family]
    rng = np.random.default_rng(1)
    emission = rng.dirichlet(np.ones(5), 3) if family == "categorical-hmm" else rng.uniform(0.5, 6.0, (3, 4))
    model = build_model(family, data_dim=emission.shape[1], hidden_dim=3, prior_sticky=1e-300, prior_smooth=1.0, **flat).double()
    model.set_parameters(**{name: torch.from_numpy(value) for name, value in {**CHAIN, ours_name: emission}.items()})
    x, _ = model.sample(len(lengths), max(lengths), seed=2)
    reference = peer(n_components=3, init_params="", params="", **their_flat)
    reference.startprob_, reference.transmat_ = CHAIN["initial"], CHAIN["transition"]
    setattr(reference, theirs_name, emission)
    reference.n_features = emission.shape[1]
    return model, x, torch.tensor(lengths), reference


@pytest.mark.parametrize("family", list(DISCRETE))
def test_symbol_and_count_families_match_hmmlearn(family):
    """Per-sequence score, Viterbi path and log-probability and ``predict_proba`` against
    hmmlearn's ``CategoricalHMM`` / ``PoissonHMM`` with the same parameters, to 1e-10."""
    model, x, lengths, reference = discrete_case(family)
    observations = DISCRETE[family][3]
    log_likelihood = model.log_likelihood(x, lengths).detach()
    states, log_joint = model.decode(x, lengths)
    (marginals,) = model.posterior(x, lengths)
    for n, length in enumerate(lengths.tolist()):
        frames = observations(x[n, :length].numpy())
        np.testing.assert_allclose(log_likelihood[n].item(), reference.score(frames), rtol=1e-10)
        their_log_joint, their_states = reference.decode(frames, algorithm="viterbi")
        np.testing.assert_allclose(log_joint[n].item(), their_log_joint, rtol=1e-10)
        np.testing.assert_array_equal(states[n, :length].numpy(), their_states)
        np.testing.assert_allclose(marginals[n, :length].numpy(), reference.predict_proba(frames), atol=1e-10)


@pytest.mark.parametrize("family", list(DISCRETE))
def test_one_em_iteration_equals_hmmlearns(family):
    """``fit`` with ``n_iter=1`` from the same parameters, flat priors on both sides."""
    model, x, lengths, reference = discrete_case(family)
    _, ours_name, theirs_name, observations, _, _ = DISCRETE[family]
    reference.n_iter, reference.params = 1, "ste" if family == "categorical-hmm" else "stl"
    frames = [observations(x[n, :length].numpy()) for n, length in enumerate(lengths.tolist())]
    reference.fit(np.concatenate(frames), [len(f) for f in frames])
    params = {name: value.unsqueeze(0) for name, value in model.get_parameters().items()}
    ours, _ = model.em_step(params, x, lengths)
    for name, theirs in (("initial", "startprob_"), ("transition", "transmat_"), (ours_name, theirs_name)):
        np.testing.assert_allclose(ours[name][0].numpy(), getattr(reference, theirs), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("variance", ["global", "component", "dimension", "component-dimension"])
def test_gmm_matches_closed_form_density(variance):
    torch.manual_seed(0)
    K, D = 3, 2
    model = build_model("gmm", data_dim=D, hidden_dim=K, variance=variance).double()
    points = torch.randn(25, D, dtype=torch.float64) * 2
    model.set_parameters(**model.init_parameters(points, None, torch.Generator().manual_seed(1)))
    p = model.get_parameters()
    scales = model.component_scales(p["scales"])
    densities = np.stack(
        [
            p["weights"][k].item()
            * multivariate_normal(p["locs"][k].numpy(), np.diag(scales[k].numpy() ** 2)).pdf(points.numpy())
            for k in range(K)
        ],
        -1,
    )
    np.testing.assert_allclose(model.log_likelihood(points).detach().numpy(), np.log(densities.sum(-1)), rtol=1e-10)
    np.testing.assert_allclose(model.posterior(points).marginals.numpy(), densities / densities.sum(-1, keepdims=True), rtol=1e-9)
    assignment, log_joint = model.decode(points)
    np.testing.assert_array_equal(assignment.numpy(), densities.argmax(-1))
    np.testing.assert_allclose(log_joint.numpy(), np.log(densities.max(-1)), rtol=1e-10)
    steps = model.log_likelihood_steps(points)
    assert steps.shape == (25, 1)


@pytest.mark.parametrize("variance", ["global", "component-dimension"])
def test_gmm_loss_equals_the_tutorials_enumerated_model(variance):
    torch.manual_seed(0)
    model = build_model("gmm", data_dim=2, hidden_dim=3, variance=variance)
    points = torch.randn(40, 2) * 3
    model.set_parameters(**model.init_parameters(points, None, torch.Generator().manual_seed(2)))
    ours = Trace_ELBO().differentiable_loss(model.model, model.guide, points, None, scale=2.0)
    classic = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(
        classic_gmm_model(model), model.guide, points, None, scale=2.0
    )
    torch.testing.assert_close(ours, classic, rtol=1e-5, atol=0)


@pytest.mark.parametrize("case", [*HMMLEARN_COVARS, *DISCRETE])
def test_bic_and_aic_equal_hmmlearns(case):
    """BIC and AIC of every covariance type and of the symbol and count families: our free
    parameters and criteria against hmmlearn's ``bic``/``aic`` of the same model and data."""
    if case in DISCRETE:
        model, x, lengths, reference = discrete_case(case)
        observations = DISCRETE[case][3]
    else:
        model, x, lengths, reference = covariance_case(case)
        observations = np.asarray
    frames = np.concatenate([observations(x[n, :length].numpy()) for n, length in enumerate(lengths.tolist())])
    ours = information_criteria(float(model.log_likelihood(x, lengths).sum()), free_parameters(model), int(lengths.sum()))
    assert free_parameters(model) == sum(reference._get_n_fit_scalars_per_param().values())
    np.testing.assert_allclose(ours["bic"], reference.bic(frames, lengths.numpy()), rtol=1e-10)
    np.testing.assert_allclose(ours["aic"], reference.aic(frames, lengths.numpy()), rtol=1e-10)
