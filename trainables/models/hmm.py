"""The discrete-state HMM families of Pyro's ``examples/hmm.py`` for binary frames
(e.g. 88-key piano rolls), each reduced to factors of the exact engine.

| family | examples/hmm.py | states | emission |
| --- | --- | --- | --- |
| ``hmm`` | model_1 | K | Bernoulli per key given z_t |
| ``arhmm`` | model_2 | K | Bernoulli per key given z_t and that key at t-1 |
| ``fhmm`` | model_3 | (w, x), sqrt(K) each, independent chains | given (w_t, x_t) |
| ``pfhmm`` | model_4 | (w, x), x_t depends on w_t and x_{t-1} | given (w_t, x_t) |
| ``hmm2`` | model_6 | pairs (z_{t-1}, z_t) of K states | given z_t |
| ``nnhmm`` | model_5 | K | neural net of z_t and all keys at t-1 |

Unlike the examples, every family learns its own initial distribution (the examples
start every chain in state 0). For ``fhmm`` and ``pfhmm`` ``hidden_dim`` is the size of
the product space, a perfect square, as in the examples; states are reported as
``w * sqrt(K) + x``. ``hmm2``'s pair chain starts from ``initial`` over
``(z_{-1}, z_0)`` flattened; it reports z_t.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from . import em
from .contract import PerfectSquare
from .hmm_base import ChainHyperparameters, HMMFamily
from .missing import filled, observed
from .parts import (
    bernoulli_init,
    bernoulli_log_probs,
    beta_prior,
    safe_log,
    sticky_simplex,
    uniform_simplex,
)


class BernoulliHyperparameters(ChainHyperparameters):
    """The chain priors and a Beta prior on every emission probability."""

    prior_emission_a: float = Field(0.1, gt=0, description="Beta(a, b) prior on emission probabilities: a")
    prior_emission_b: float = Field(0.9, gt=0, description="Beta(a, b) prior on emission probabilities: b")


class TwoChainHyperparameters(BernoulliHyperparameters):
    """``hidden_dim`` is the size of the product space of two chains: a perfect square."""

    single_chain = False  # two chains on a product space: no topology

    hidden_dim: PerfectSquare = Field(16, description="states of the product space of two sqrt(K)-state chains")


class SecondOrderHyperparameters(BernoulliHyperparameters):
    """``hmm2``'s: the chain runs on state pairs, so no topology."""

    single_chain = False


class NeuralHyperparameters(BernoulliHyperparameters):
    """The emission network's widths besides the chain priors."""

    nn_dim: int = Field(48, ge=1, description="hidden width of the emission network")
    nn_channels: int = Field(2, ge=1, description="convolution channels of the emission network")


class BernoulliChainHMM(HMMFamily):
    """Binary-frame families: ``Beta(prior_emission_a, prior_emission_b)`` on every
    emission probability, as in Pyro's ``examples/hmm.py``."""

    observation = "binary"
    hyperparameters = BernoulliHyperparameters

    def _emission_prior(self, *shape: int):
        a, b = self.hparams.prior_emission_a, self.hparams.prior_emission_b
        return beta_prior(shape, a, b, self._anchor)

    def sample_emissions(self, params, states, generator, previous=None):
        probs = self.state_emission_probs(params)[states]
        return (torch.rand(probs.shape, generator=generator, device=probs.device) < probs).to(
            probs.dtype
        )

    def state_emission_probs(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(S, D)`` key probabilities of every engine state (state-only emissions)."""
        raise NotImplementedError

    def emission_log_probs(self, params, x):
        mask = observed(x)
        return bernoulli_log_probs(filled(x, mask), self.state_emission_probs(params), mask)

    def emission_means(self, params, previous=None):
        return self.state_emission_probs(params)

    def emission_marginals(self, marginals: torch.Tensor) -> torch.Tensor:
        """Engine marginals ``(..., N, T, S)`` over the states ``emission_probs`` is indexed
        by, flattened (product chains: ``w * C + x``, the engine's own; pairs: the later
        state)."""
        return marginals

    def emission_m_step(self, params, x, lengths, marginals):
        prior = em.base(self.priors()["emission_probs"])
        layout = prior.concentration1.shape  # (*E, D): the emitting states, then the keys
        weights = self.emission_marginals(marginals)  # (..., N, T, prod E)
        mask = observed(x)
        ones = torch.einsum("...nts,ntd->...sd", weights, filled(x, mask).to(marginals.dtype))
        visits = weights.sum((-3, -2)).unsqueeze(-1) if mask is None else torch.einsum(
            "...nts,ntd->...sd", weights, mask.to(marginals.dtype))
        a, b = (concentration.reshape(-1, layout[-1]) for concentration in (prior.concentration1, prior.concentration0))
        probs = em.beta_map(ones, visits - ones, a, b)
        return {"emission_probs": probs.reshape(*probs.shape[:-2], *layout)}


class BernoulliHMM(BernoulliChainHMM):
    """``hmm``: K states, a Bernoulli per key given the state (examples/hmm.py model_1).

    Parameters: ``initial`` ``(K,)``, ``transition`` ``(K, K)``, ``emission_probs`` ``(K, D)``.
    """

    family = "hmm"

    def priors(self):
        K, D = self.hidden_dim, self.data_dim
        return {
            "initial": self._initial_prior(K),
            "transition": self._transition_prior(K),
            "emission_probs": self._emission_prior(K, D),
        }

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        return {
            **self.chain_init(generator),
            "emission_probs": bernoulli_init((K, D), x, lengths, generator),
        }

    def state_emission_probs(self, params):
        return params["emission_probs"]


class AutoregressiveHMM(BernoulliHMM):
    """``arhmm``: each key also depends on itself at the previous frame (model_2).

    ``emission_probs`` ``(K, 2, D)``: ``[k, v, d]`` is p(key d on | state k, key d was v);
    before the first frame every key counts as off.
    """

    family = "arhmm"
    missing_values = False
    emission_context = 1

    def priors(self):
        priors = super().priors()
        priors["emission_probs"] = self._emission_prior(self.hidden_dim, 2, self.data_dim)
        return priors

    def init_parameters(self, x, lengths, generator):
        params = super().init_parameters(x, lengths, generator)
        K, D = self.hidden_dim, self.data_dim
        params["emission_probs"] = bernoulli_init((K, 2, D), x, lengths, generator)
        return params

    def emission_log_probs(self, params, x):
        was_on = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1).to(
            params["emission_probs"].dtype
        )
        probs = params["emission_probs"]
        return bernoulli_log_probs(x, probs[..., 0, :], 1 - was_on) + bernoulli_log_probs(
            x, probs[..., 1, :], was_on
        )

    def emission_m_step(self, params, x, lengths, marginals):
        prior = em.base(self.priors()["emission_probs"])
        x = x.to(marginals.dtype)
        was_on = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        probs = []
        for value, before in enumerate((1 - was_on, was_on)):  # the key off, then on, at the previous frame
            ones = torch.einsum("...nts,ntd->...sd", marginals, before * x)
            visits = torch.einsum("...nts,ntd->...sd", marginals, before)
            a, b = prior.concentration1[..., value, :], prior.concentration0[..., value, :]
            probs.append(em.beta_map(ones, visits - ones, a, b))
        return {"emission_probs": torch.stack(probs, -2)}

    def emission_means(self, params, previous=None):
        probs = params["emission_probs"]  # (K, 2, D)
        was_on = torch.zeros(self.data_dim, dtype=torch.long, device=probs.device) if previous is None else previous.long()
        return probs[:, was_on, torch.arange(self.data_dim, device=probs.device)]

    def sample_emissions(self, params, states, generator, previous=None):
        probs = params["emission_probs"]
        keys = torch.arange(self.data_dim, device=probs.device)
        frame = torch.zeros(states.shape[0], self.data_dim, dtype=torch.long, device=probs.device)
        if previous is not None:
            frame = previous.long().expand_as(frame)
        frames = []
        for t in range(states.shape[1]):
            p = probs[states[:, t, None], frame, keys]
            frame = (torch.rand(p.shape, generator=generator, device=p.device) < p).long()
            frames.append(frame)
        return torch.stack(frames, 1).to(probs.dtype)


class _TwoChainHMM(BernoulliChainHMM):
    """Two chains w and x of ``sqrt(K)`` states each, emitting given the pair."""

    hyperparameters = TwoChainHyperparameters
    state_space = "(w,x) states of the two chains"

    def state_labels(self):
        C = self.chain_dim
        return [f"{s // C},{s % C}" for s in range(C * C)]

    @property
    def chain_dim(self) -> int:
        """States of each chain, ``sqrt(hidden_dim)``."""
        return math.isqrt(self.hidden_dim)

    def state_emission_probs(self, params):
        return params["emission_probs"].flatten(-3, -2)


class FactorialHMM(_TwoChainHMM):
    """``fhmm``: two independent chains (model_3). Parameters ``initial_w``, ``initial_x``
    ``(C,)``, ``transition_w``, ``transition_x`` ``(C, C)``, ``emission_probs``
    ``(C, C, D)`` with ``C = sqrt(K)``."""

    family = "fhmm"

    def priors(self):
        C, D = self.chain_dim, self.data_dim
        return {
            "initial_w": self._initial_prior(C),
            "initial_x": self._initial_prior(C),
            "transition_w": self._transition_prior(C),
            "transition_x": self._transition_prior(C),
            "emission_probs": self._emission_prior(C, C, D),
        }

    def init_parameters(self, x, lengths, generator):
        C, D = self.chain_dim, self.data_dim
        return {
            "initial_w": uniform_simplex((C,), generator),
            "initial_x": uniform_simplex((C,), generator),
            "transition_w": sticky_simplex((C, C), generator),
            "transition_x": sticky_simplex((C, C), generator),
            "emission_probs": bernoulli_init((C, C, D), x, lengths, generator),
        }

    def chain_factors(self, params):
        init_w, init_x = safe_log(params["initial_w"]), safe_log(params["initial_x"])
        trans_w, trans_x = safe_log(params["transition_w"]), safe_log(params["transition_x"])
        log_init = (init_w[..., :, None] + init_x[..., None, :]).flatten(-2)
        log_trans = trans_w[..., :, None, :, None] + trans_x[..., None, :, None, :]
        return log_init, log_trans.flatten(-4, -3).flatten(-2)

    def chain_m_step(self, first, counts):
        C = self.chain_dim
        first, counts = first.unflatten(-1, (C, C)), counts.unflatten(-1, (C, C)).unflatten(-3, (C, C))  # [w, x, w', x']
        return {
            "initial_w": self.dirichlet_update("initial_w", first.sum(-1)),
            "initial_x": self.dirichlet_update("initial_x", first.sum(-2)),
            "transition_w": self.dirichlet_update("transition_w", counts.sum((-3, -1))),
            "transition_x": self.dirichlet_update("transition_x", counts.sum((-4, -2))),
        }


class PartiallyFactorialHMM(_TwoChainHMM):
    """``pfhmm``: x_t depends on w_t and x_{t-1} (model_4). Parameters ``initial_w``
    ``(C,)``, ``initial_x`` ``(C, C)`` (given w_0), ``transition_w`` ``(C, C)``,
    ``transition_x`` ``(C, C, C)`` indexed ``[w_t, x_{t-1}, x_t]``, ``emission_probs``
    ``(C, C, D)``."""

    family = "pfhmm"

    def priors(self):
        C, D = self.chain_dim, self.data_dim
        return {
            "initial_w": self._initial_prior(C),
            "initial_x": self._initial_prior(C, C),
            "transition_w": self._transition_prior(C),
            "transition_x": self._transition_prior(C, C),
            "emission_probs": self._emission_prior(C, C, D),
        }

    def init_parameters(self, x, lengths, generator):
        C, D = self.chain_dim, self.data_dim
        return {
            "initial_w": uniform_simplex((C,), generator),
            "initial_x": uniform_simplex((C, C), generator),
            "transition_w": sticky_simplex((C, C), generator),
            "transition_x": sticky_simplex((C, C, C), generator),
            "emission_probs": bernoulli_init((C, C, D), x, lengths, generator),
        }

    def chain_factors(self, params):
        init_w, init_x = safe_log(params["initial_w"]), safe_log(params["initial_x"])
        trans_w, trans_x = safe_log(params["transition_w"]), safe_log(params["transition_x"])
        log_init = (init_w[..., :, None] + init_x).flatten(-2)
        # [w, x, w', x'] = log p(w' | w) + log p(x' | w', x)
        log_trans = trans_w[..., :, None, :, None] + trans_x.transpose(-3, -2).unsqueeze(-4)
        return log_init, log_trans.flatten(-4, -3).flatten(-2)

    def chain_m_step(self, first, counts):
        C = self.chain_dim
        first, counts = first.unflatten(-1, (C, C)), counts.unflatten(-1, (C, C)).unflatten(-3, (C, C))  # [w, x, w', x']
        return {
            "initial_w": self.dirichlet_update("initial_w", first.sum(-1)),
            "initial_x": self.dirichlet_update("initial_x", first),
            "transition_w": self.dirichlet_update("transition_w", counts.sum((-3, -1))),
            "transition_x": self.dirichlet_update("transition_x", counts.sum(-4).transpose(-3, -2)),  # [w', x, x']
        }


class SecondOrderHMM(BernoulliChainHMM):
    """``hmm2``: z_t depends on z_{t-1} and z_{t-2} (model_6), run as a first-order chain
    on pairs. Parameters ``initial`` ``(K * K,)`` over ``(z_{-1}, z_0)``, ``transition``
    ``(K, K, K)`` indexed ``[z_{t-2}, z_{t-1}, z_t]``, ``emission_probs`` ``(K, D)``."""

    family = "hmm2"
    state_space = "(z[t-1],z[t]) state pairs"
    hyperparameters = SecondOrderHyperparameters

    def priors(self):
        K, D = self.hidden_dim, self.data_dim
        return {
            "initial": self._initial_prior(K * K),
            "transition": self._transition_prior(K, K),
            "emission_probs": self._emission_prior(K, D),
        }

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        return {
            "initial": uniform_simplex((K * K,), generator),
            "transition": sticky_simplex((K, K, K), generator),
            "emission_probs": bernoulli_init((K, D), x, lengths, generator),
        }

    def chain_factors(self, params):
        K = self.hidden_dim
        trans = safe_log(params["transition"])
        # [a, b, b', c] = log p(c | a, b) where b' == b, impossible otherwise
        consistent = torch.eye(K, dtype=torch.bool, device=trans.device)[:, :, None]
        log_trans = torch.where(consistent, trans.unsqueeze(-2), -torch.inf)
        return safe_log(params["initial"]), log_trans.flatten(-4, -3).flatten(-2)

    def state_emission_probs(self, params):
        probs = params["emission_probs"]  # pair (a, b) at a * K + b emits as state b
        return probs.unsqueeze(-3).expand(*probs.shape[:-2], self.hidden_dim, *probs.shape[-2:]).flatten(-3, -2)

    def chain_m_step(self, first, counts):
        K = self.hidden_dim
        pairs = counts.unflatten(-1, (K, K)).unflatten(-3, (K, K))  # [a, b, b', c], zero unless b' == b
        return {
            "initial": self.dirichlet_update("initial", first),
            "transition": self.dirichlet_update("transition", pairs.diagonal(dim1=-3, dim2=-2).movedim(-1, -2)),
        }

    def emission_marginals(self, marginals):
        return self.output_marginals(marginals)

    def output_states(self, states):
        return torch.where(states >= 0, states % self.hidden_dim, states)

    def output_marginals(self, marginals):
        return marginals.unflatten(-1, (self.hidden_dim, self.hidden_dim)).sum(-2)

    def state_labels(self):
        K = self.hidden_dim
        return [f"{s // K},{s % K}" for s in range(K * K)]


class TonesGenerator(nn.Module):
    """Emission net of ``nnhmm``: logits of every key given the state and the previous
    frame, through a 1-D convolution over keys (Pyro's examples/hmm.py ``TonesGenerator``)."""

    def __init__(self, data_dim: int, hidden_dim: int, nn_dim: int, nn_channels: int) -> None:
        super().__init__()
        self.state_to_hidden = nn.Embedding(hidden_dim, nn_dim)
        self.conv = nn.Conv1d(1, nn_channels, 3, padding=1)
        self.frame_to_hidden = nn.Linear(nn_channels * data_dim, nn_dim)
        self.hidden_to_logits = nn.Linear(nn_dim, data_dim)

    def forward(self, previous: torch.Tensor) -> torch.Tensor:
        """``previous`` ``(..., D)`` frames -> logits ``(..., K, D)`` for every state."""
        conv = torch.relu(self.conv(previous.reshape(-1, 1, previous.shape[-1])))
        frame_hidden = self.frame_to_hidden(conv.flatten(1)).reshape(*previous.shape[:-1], 1, -1)
        hidden = torch.relu(frame_hidden + self.state_to_hidden.weight)
        return self.hidden_to_logits(hidden)


class NeuralHMM(BernoulliHMM):
    """``nnhmm``: K states, keys emitted by a neural net of the state and the previous frame
    (model_5). MAP ``initial`` ``(K,)`` and ``transition`` ``(K, K)``; the net's weights are
    plain (maximum-likelihood) parameters of the module."""

    family = "nnhmm"
    missing_values = False
    emission_context = 1
    hyperparameters = NeuralHyperparameters

    def __init__(self, data_dim: int, hidden_dim: int, **hparams) -> None:
        super().__init__(data_dim, hidden_dim, **hparams)
        self.tones = TonesGenerator(self.data_dim, self.hidden_dim, self.hparams.nn_dim, self.hparams.nn_channels)

    def priors(self):
        priors = super().priors()
        del priors["emission_probs"]
        return priors

    def init_parameters(self, x, lengths, generator):
        params = super().init_parameters(x, lengths, generator)
        del params["emission_probs"]
        return params

    @torch.no_grad()
    def relabel(self, order):
        """The chain's, and the emission net's state embedding ``(K, nn_dim)``, reordered."""
        super().relabel(order)
        embedding = self.tones.state_to_hidden.weight
        embedding.copy_(embedding[torch.as_tensor(order, device=embedding.device)])

    def emission_m_step(self, params, x, lengths, marginals):
        """None in closed form: the network takes gradient steps instead (generalised EM,
        :meth:`HMMFamily.em_step`)."""
        return {}

    def emission_log_probs(self, params, x):
        previous = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], 1)
        logits = self.tones(previous)
        x = x.unsqueeze(-2)
        return (x * logits - nn.functional.softplus(logits)).sum(-1)

    def emission_means(self, params, previous=None):
        weight = self.tones.hidden_to_logits.weight
        frame = weight.new_zeros(self.data_dim) if previous is None else previous.to(weight.dtype)
        return torch.sigmoid(self.tones(frame))

    def sample_emissions(self, params, states, generator, previous=None):
        weight = self.tones.hidden_to_logits.weight
        frame = weight.new_zeros(states.shape[0], self.data_dim)
        if previous is not None:
            frame = previous.to(weight.dtype).expand_as(frame)
        frames = []
        for t in range(states.shape[1]):
            logits = self.tones(frame)[torch.arange(states.shape[0]), states[:, t]]
            p = torch.sigmoid(logits)
            frame = (torch.rand(p.shape, generator=generator, device=p.device) < p).to(p.dtype)
            frames.append(frame)
        return torch.stack(frames, 1)
