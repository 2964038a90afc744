"""HMMs for symbols and counts, hmmlearn's ``CategoricalHMM`` and ``PoissonHMM`` on the
one engine: each family only supplies its emission factors, sampling and M-step.

- ``categorical-hmm``: one symbol per frame out of ``data_dim`` = V, given one-hot:
  frames ``(N, T, V)`` with a single 1 (symbol ``s`` is a 1 at index ``s``);
  ``emission_probs`` ``(K, V)`` under a flat ``Dirichlet(prior_emission)``.
- ``poisson-hmm``: non-negative integer counts per dimension; ``rates`` ``(K, D)`` under a
  ``Gamma(prior_rate_shape, prior_rate_rate)`` (shape above 1: the MAP rate stays positive).
"""

from __future__ import annotations

import torch
from pydantic import Field
from pyro import distributions as dist

from ..inference import frame_mask
from . import em
from .hmm_base import ChainHyperparameters, HMMFamily
from .missing import filled, observed
from .parts import flat_dirichlet, safe_log, uniform_simplex


class CategoricalHyperparameters(ChainHyperparameters):
    """The chain priors and a flat Dirichlet on every state's symbol distribution."""

    prior_emission: float = Field(1.1, gt=0, description="flat Dirichlet weight of every state's symbol probabilities")


class CategoricalHMM(HMMFamily):
    """``categorical-hmm``: parameters ``initial`` ``(K,)``, ``transition`` ``(K, K)`` and
    ``emission_probs`` ``(K, V)``; frames are one-hot ``(N, T, V)``."""

    family = "categorical-hmm"
    observation = "categorical"
    hyperparameters = CategoricalHyperparameters

    def priors(self):
        K, V = self.hidden_dim, self.data_dim
        return {
            "initial": self._initial_prior(K),
            "transition": self._transition_prior(K),
            "emission_probs": flat_dirichlet((K, V), self.hparams.prior_emission, self._anchor),
        }

    def init_parameters(self, x, lengths, generator):
        K, V = self.hidden_dim, self.data_dim
        emission = uniform_simplex((K, V), generator)
        if x is not None:  # around the symbols' frequencies in the data
            frequency = x.cpu()[frame_mask(lengths.cpu(), x.shape[1])].mean(0)
            emission = 0.5 * emission + 0.5 * frequency
        return {
            **self.chain_init(generator),
            "emission_probs": emission,
        }

    def emission_log_probs(self, params, x):
        """``(..., N, T, K)``: ``log emission_probs[k, symbol]`` (one matrix product); 0 for
        a missing frame (all NaN: it reads as all zeros)."""
        frames = filled(x, observed(x)).to(params["emission_probs"].dtype)
        return torch.einsum("ntv,...sv->...nts", frames, safe_log(params["emission_probs"]))

    def emission_means(self, params, previous=None):
        return params["emission_probs"]  # a one-hot frame's mean: each symbol's probability

    def sample_emissions(self, params, states, generator, previous=None):
        probs = params["emission_probs"][states]  # (N, T, V)
        symbols = torch.multinomial(probs.reshape(-1, self.data_dim), 1, generator=generator)
        return torch.nn.functional.one_hot(symbols.reshape(states.shape), self.data_dim).to(probs.dtype)

    def emission_m_step(self, params, x, lengths, marginals):
        counts = torch.einsum("...nts,ntv->...sv", marginals, filled(x, observed(x)).to(marginals.dtype))
        return {"emission_probs": em.dirichlet_map(counts, em.base(self.priors()["emission_probs"]).concentration)}


class PoissonHyperparameters(ChainHyperparameters):
    """The chain priors and a Gamma prior on every rate."""

    prior_rate_shape: float = Field(1.1, gt=1, description="Gamma(shape, rate) prior on every Poisson rate: shape")
    prior_rate_rate: float = Field(0.01, gt=0, description="Gamma(shape, rate) prior on every Poisson rate: rate")


class PoissonHMM(HMMFamily):
    """``poisson-hmm``: parameters ``initial`` ``(K,)``, ``transition`` ``(K, K)`` and
    ``rates`` ``(K, D)``; frames are non-negative integer counts ``(N, T, D)``."""

    family = "poisson-hmm"
    observation = "counts"
    hyperparameters = PoissonHyperparameters

    def priors(self):
        K, D, h = self.hidden_dim, self.data_dim, self.hparams
        shape = torch.full((K, D), h.prior_rate_shape, dtype=self._anchor.dtype, device=self._anchor.device)
        return {
            "initial": self._initial_prior(K),
            "transition": self._transition_prior(K),
            "rates": dist.Gamma(shape, h.prior_rate_rate).to_event(2),
        }

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        spread = 0.5 + torch.rand((K, D), generator=generator)
        mean = x.cpu()[frame_mask(lengths.cpu(), x.shape[1])].mean(0).clamp_min(0.1) if x is not None else torch.ones(D)
        return {
            **self.chain_init(generator),
            "rates": mean * spread,
        }

    def emission_log_probs(self, params, x):
        """``(..., N, T, K)``: ``sum_d x log rate - rate - log x!`` over the observed counts
        (one matrix product; a missing count reads as 0, whose terms but ``- rate`` vanish)."""
        rates = params["rates"]
        mask = observed(x)
        x = filled(x, mask).to(rates.dtype)
        exposure = rates.sum(-1)[..., None, None, :] if mask is None else torch.einsum("ntd,...sd->...nts", mask.to(rates.dtype), rates)
        return torch.einsum("ntd,...sd->...nts", x, safe_log(rates)) - exposure - torch.lgamma(x + 1).sum(-1, keepdim=True)

    def emission_means(self, params, previous=None):
        return params["rates"]

    def sample_emissions(self, params, states, generator, previous=None):
        return torch.poisson(params["rates"][states], generator=generator)

    def emission_m_step(self, params, x, lengths, marginals):
        """``(sum w x + shape - 1) / (sum w + rate)``: the Gamma prior's MAP rate."""
        h = self.hparams
        weights, counts = em.flat_points(marginals, x.to(marginals.dtype))
        mask = observed(counts)
        totals = torch.matmul(weights.transpose(-1, -2), filled(counts, mask))
        return {"rates": (totals + h.prior_rate_shape - 1) / (em.visits(weights, mask) + h.prior_rate_rate)}
