"""``gaussian-hmm``: K states with diagonal Gaussian emissions and a learned initial
distribution, the model of hmmlearn's ``GaussianHMM(covariance_type="diag")``."""

from __future__ import annotations

import math

import torch
from pydantic import Field
from pyro import distributions as dist

from ..compiled import diagonal_gaussian
from ..inference import compiled_on, frame_mask
from . import em
from .hmm_base import ChainHyperparameters, HMMFamily
from .parts import sticky_simplex, uniform_simplex


def gaussian_log_probs(x: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density of every frame under every state.

    :param x: ``(..., D)`` frames (any leading shape, e.g. ``(N, T)``).
    :param means: ``(B..., S, D)``; ``scales``: ``(B..., S, D)`` standard deviations (the
        two broadcast against each other).
    :returns: ``(B..., ..., S)``. On the compiled path (:func:`inference.compiled_on`)
        without the ``(B..., ..., S, D)`` intermediate; differentiable in ``means`` and
        ``scales`` on both.
    """
    means, scales = torch.broadcast_tensors(means, scales)
    if compiled_on(x.device) and not x.requires_grad and x.dtype in (torch.float32, torch.float64):
        return diagonal_gaussian(x, means, scales)
    batch = means.shape[:-2]
    means = means.reshape(*batch, *[1] * (x.dim() - 1), *means.shape[-2:])
    scales = scales.reshape(means.shape)
    z = (x.unsqueeze(-2) - means) / scales
    return -0.5 * (z * z).sum(-1) - scales.log().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)


def gaussian_init(
    num_states: int, points: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``means`` at distinct data points (repeated if there are fewer points than
    states) and ``scales`` at the data's spread per dimension, both ``(K, D)``.

    :param points: ``(P, D)`` real data points (frames).
    """
    points = points.cpu()
    chosen = torch.randperm(len(points), generator=generator)[:num_states]
    chosen = chosen.repeat(math.ceil(num_states / len(chosen)))[:num_states]
    scales = points.std(0).clamp_min(1e-3) if len(points) > 1 else torch.ones(points.shape[-1])
    return points[chosen].clone(), scales.expand(num_states, -1).clone()


class GaussianHMMHyperparameters(ChainHyperparameters):
    """The chain priors and weak priors on the Gaussian emissions."""

    prior_mean_scale: float = Field(10.0, gt=0, description="Normal(0, s) prior on every mean")
    prior_log_scale: float = Field(2.0, gt=0, description="LogNormal(0, s) prior on every standard deviation")


class GaussianHMM(HMMFamily):
    """Parameters ``initial`` ``(K,)``, ``transition`` ``(K, K)``, ``means`` ``(K, D)``,
    ``scales`` ``(K, D)`` (standard deviations). Priors: flat Dirichlet on ``initial``,
    sticky Dirichlet on transition rows, ``Normal(0, prior_mean_scale)`` on means and
    ``LogNormal(0, prior_log_scale)`` on scales (weak by default: scale your data)."""

    family = "gaussian-hmm"
    observation = "real"
    hyperparameters = GaussianHMMHyperparameters

    def priors(self):
        K, D, h, zero = self.hidden_dim, self.data_dim, self.hparams, self._anchor
        return {
            "initial": self._initial_prior(K),
            "transition": self._transition_prior(K),
            "means": dist.Normal(zero, h.prior_mean_scale).expand([K, D]).to_event(2),
            "scales": dist.LogNormal(zero, h.prior_log_scale).expand([K, D]).to_event(2),
        }

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        if x is None:
            means, scales = torch.randn((K, D), generator=generator), torch.ones(K, D)
        else:
            means, scales = gaussian_init(K, x[frame_mask(lengths, x.shape[1])], generator)
        return {
            "initial": uniform_simplex((K,), generator),
            "transition": sticky_simplex((K, K), generator),
            "means": means,
            "scales": scales,
        }

    def emission_log_probs(self, params, x):
        return gaussian_log_probs(x.to(params["means"].dtype), params["means"], params["scales"])

    def emission_m_step(self, params, x, lengths, marginals):
        """The means given the current scales, then the scales given the new means (one
        conditional maximisation each: the EM objective still never decreases)."""
        h = self.hparams
        weights, points = em.flat_points(marginals, x.to(marginals.dtype))
        means = em.normal_mean_map(weights, points, params["scales"] ** 2, h.prior_mean_scale)
        deviations = em.squared_deviations(weights, points, means)
        count = weights.sum(-2).unsqueeze(-1).expand_as(deviations)
        return {"means": means, "scales": em.lognormal_scale_map(count, deviations, h.prior_log_scale).to(means.dtype)}

    def sample_emissions(self, params, states, generator):
        means, scales = params["means"][states], params["scales"][states]
        noise = torch.randn(means.shape, generator=generator, device=means.device)
        return means + scales * noise
