"""Constrained topologies: structural zeros against brute-force enumeration, exact zeros
after SVI and EM, and the refusals (at construction and before Ray starts)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import yaml

from cluster.sweep_file import SweepFileError, load_sweep_file
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.models import FAMILIES

K, D, T = 3, 2, 4
MASK = [[1, 1, 0], [0, 1, 1], [1, 0, 1]]
TOPOLOGIES = {
    "left-right": {"topology": "left-right"},
    "banded": {"topology": "banded", "bandwidth": 1},
    "file mask": {"transition_mask": MASK},
}


def model(family: str = "hmm", **hparams):
    torch.manual_seed(0)
    return FAMILIES[family](D, K, **hparams).double()


def data(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return (torch.rand(n, T, D, generator=generator, dtype=torch.float64) > 0.5).double(), torch.full((n,), T)


def brute_force(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p(x) ``(N,)``, the best path's log joint ``(N,)`` and marginals ``(N, T, K)`` by
    summing over every one of the K^T paths with the probabilities themselves."""
    params = m.get_parameters()
    emit = m.emission_log_probs(params, x).exp()  # (N, T, K)
    joints = []
    for path in itertools.product(range(K), repeat=T):
        p = params["initial"][path[0]] * emit[:, 0, path[0]]
        for t in range(1, T):
            p = p * params["transition"][path[t - 1], path[t]] * emit[:, t, path[t]]
        joints.append(p)
    joints = torch.stack(joints, -1)  # (N, K^T)
    paths = torch.tensor(list(itertools.product(range(K), repeat=T)))
    onehot = torch.nn.functional.one_hot(paths, K).double()  # (K^T, T, K)
    marginals = torch.einsum("np,ptk->ntk", joints, onehot) / joints.sum(-1)[:, None, None]
    return joints.sum(-1).log(), joints.max(-1).values.log(), marginals


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_engine_matches_brute_force_with_a_mask(name):
    m, (x, lengths) = model(**TOPOLOGIES[name]), data()
    log_likelihood, best, marginals = brute_force(m, x)
    torch.testing.assert_close(m.log_likelihood(x, lengths), log_likelihood)
    torch.testing.assert_close(m.decode(x, lengths).log_joint, best)
    torch.testing.assert_close(m.posterior(x, lengths).marginals, marginals)


def test_mask_file_is_read_into_the_config(tmp_path):
    path = tmp_path / "mask.csv"
    np.savetxt(path, np.array(MASK), delimiter=",", fmt="%d")
    m = model(transition_mask=str(path))
    assert m.config["transition_mask"] == MASK
    zeros = ~torch.tensor(MASK, dtype=torch.bool)
    assert (m.get_parameters()["transition"][zeros] == 0).all()
    assert m.priors()["transition"].support.base_constraint.mask.tolist() == (~zeros).tolist()


@pytest.mark.parametrize("family", ["hmm", "gaussian-hmm", "categorical-hmm", "poisson-hmm"])
def test_masked_entries_stay_exactly_zero_under_svi_and_em(family):
    m = FAMILIES[family](D, K, topology="left-right", bandwidth=1).double()
    x, lengths = data(4)
    if family == "gaussian-hmm":
        x = x + 0.1 * torch.arange(T * D, dtype=torch.float64).reshape(T, D)
    if family == "categorical-hmm":
        x = torch.nn.functional.one_hot(x[..., 0].long(), D).double()
    zeros = ~torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]], dtype=torch.bool)
    optimiser = torch.optim.Adam(m.parameters(), lr=0.1)
    for _ in range(5):
        optimiser.zero_grad()
        m.training_loss(x, lengths).backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        optimiser.step()
    params = m.get_parameters()
    assert (params["transition"][zeros] == 0).all() and params["initial"].tolist() == [1.0, 0.0, 0.0]
    objective = []
    for _ in range(4):
        new, log_likelihood = m.em_step(m.map_values(), x, lengths)
        objective.append(float((log_likelihood.sum() + m.log_prior_of(m.map_values())).detach()))
        m.set_parameters(**new)
        assert (new["transition"][zeros] == 0).all() and new["initial"].tolist() == [1.0, 0.0, 0.0]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(objective, objective[1:]))


def test_batched_restarts_keep_the_zeros():
    m = model(topology="banded")
    params = {name: value.expand(2, *value.shape) for name, value in m.get_parameters().items()}
    again = m.constrain(m.unconstrain(params))
    torch.testing.assert_close(again["transition"], params["transition"])
    assert again["transition"][:, 0, 2].eq(0).all()


@pytest.mark.parametrize(
    "hparams, message",
    [
        ({"transition_mask": [[1, 1, 0], [0, 0, 0], [0, 0, 1]]}, "state 1 has no allowed transition"),
        ({"topology": "left-right", "bandwidth": 1}, None),
        ({"transition_mask": [[1, 1], [1, 1]]}, "must be hidden_dim x hidden_dim = 3 x 3"),
    ],
)
def test_bad_masks_are_refused_at_construction(hparams, message):
    if message is None:
        FAMILIES["hmm"](D, K, **hparams)
    else:
        with pytest.raises(ValueError, match=message):
            FAMILIES["hmm"](D, K, **hparams)


@pytest.mark.parametrize("family", ["fhmm", "pfhmm", "hmm2"])
def test_topology_refused_where_the_chain_is_not_single(family):
    with pytest.raises(ValueError, match="constrain a single initial/transition chain"):
        FAMILIES[family](D, 4, topology="left-right")


def sweep(tmp_path, search, model_name="hmm"):
    path = tmp_path / "sweep.yaml"
    settings = {"name": "t", "model": model_name, "data": {"name": "synthetic-hmm"}, "search": search}
    path.write_text(yaml.safe_dump(settings))
    return path


def test_sweep_file_searching_topology_passes(tmp_path):
    np.save(tmp_path / "mask.npy", np.array(MASK))
    spec = load_sweep_file(sweep(tmp_path, {"hidden_dim": 3, "topology": {"choice": ["ergodic", "left-right"]}}))
    assert spec.search["topology"] == {"choice": ["ergodic", "left-right"]}
    spec = load_sweep_file(sweep(tmp_path, {"hidden_dim": 3, "transition_mask": "mask.npy"}))
    assert spec.search["transition_mask"] == MASK


@pytest.mark.parametrize(
    "search, model_name, message",
    [
        ({"hidden_dim": {"grid": [3, 4]}, "transition_mask": {"choice": [[[1, 1, 0], [0, 1, 1], [0, 0, 1]]]}}, "hmm", "4 x 4"),
        ({"hidden_dim": 3, "transition_mask": {"choice": [[[1, 1, 0], [0, 0, 0], [0, 0, 1]]]}}, "hmm", "state 1 has no allowed"),
        ({"hidden_dim": 4, "topology": {"choice": ["ergodic", "banded"]}}, "fhmm", "single initial/transition"),
        ({"hidden_dim": 3, "transition_mask": "missing.npy"}, "hmm", "no such file"),
    ],
)
def test_sweep_file_refuses_bad_topologies_before_ray(tmp_path, search, model_name, message):
    with pytest.raises(SweepFileError, match=message):
        load_sweep_file(sweep(tmp_path, search, model_name))


def test_checkpoint_keeps_the_mask_without_its_file(tmp_path):
    path = tmp_path / "mask.txt"
    np.savetxt(path, np.array(MASK), fmt="%d")
    m = model(transition_mask=str(path))
    save_checkpoint(m, tmp_path / "checkpoint")
    path.unlink()
    restored = load_checkpoint(tmp_path / "checkpoint")
    assert restored.config["transition_mask"] == MASK
    transition = restored.get_parameters()["transition"].double()
    eps = torch.finfo(torch.float32).eps  # restored in float32: a softmax's rounding, a few eps
    torch.testing.assert_close(transition, m.get_parameters()["transition"], rtol=8 * eps, atol=8 * eps)
    assert (transition[~torch.tensor(MASK, dtype=torch.bool)] == 0).all()
