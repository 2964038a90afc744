"""``gaussian-hmm``: K states with Gaussian emissions and a learned initial distribution,
the model of hmmlearn's ``GaussianHMM``, with its four covariance types:

- ``diag``: ``scales`` ``(K, D)``, a standard deviation per state and dimension;
- ``spherical``: ``scales`` ``(K,)``, one per state;
- ``full``: ``scale_tril`` ``(K, D, D)``, the Cholesky factor of each state's covariance;
- ``tied``: ``scale_tril`` ``(D, D)``, one covariance shared by the states.

Standard deviations have ``LogNormal`` priors; covariances (full, tied) an inverse-Wishart
prior with ``D - 1 + prior_covariance_dof`` degrees of freedom and scale matrix
``prior_covariance_scale * I``, its density taken of ``L L^T`` (no Jacobian: SVI over the
Cholesky factor and EM over the covariance maximise the same function). Means have
``Normal(0, prior_mean_scale)`` priors.
"""

from __future__ import annotations

import math

import torch
from typing import Literal

from pydantic import Field
from pyro import distributions as dist
from torch.distributions import constraints

from ..compiled import diagonal_gaussian
from ..inference import compiled_on, frame_mask
from . import em
from .hmm_base import ChainHyperparameters, HMMFamily
from .missing import filled, observed


def gaussian_log_probs(x: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density of every frame under every state.

    :param x: ``(..., D)`` frames (any leading shape, e.g. ``(N, T)``).
    :param means: ``(B..., S, D)``; ``scales``: ``(B..., S, D)`` standard deviations (the
        two broadcast against each other).
    :returns: ``(B..., ..., S)``: the density of the observed values of each frame (NaN
        values are missing, :mod:`.missing`). For complete frames on the compiled path
        (:func:`inference.compiled_on`) without the ``(B..., ..., S, D)`` intermediate;
        differentiable in ``means`` and ``scales`` on both.
    """
    means, scales = torch.broadcast_tensors(means, scales)
    mask = observed(x)
    if mask is None and compiled_on(x.device) and not x.requires_grad and x.dtype in (torch.float32, torch.float64):
        return diagonal_gaussian(x, means, scales)
    batch = means.shape[:-2]
    means = means.reshape(*batch, *[1] * (x.dim() - 1), *means.shape[-2:])
    scales = scales.reshape(means.shape)
    z = (filled(x, mask).unsqueeze(-2) - means) / scales
    if mask is None:
        return -0.5 * (z * z).sum(-1) - scales.log().sum(-1) - 0.5 * x.shape[-1] * math.log(2 * math.pi)
    terms = -0.5 * z * z - scales.log() - 0.5 * math.log(2 * math.pi)
    return torch.where(mask.unsqueeze(-2), terms, 0.0).sum(-1)


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


def cholesky_log_probs(x: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor) -> torch.Tensor:
    """Full-covariance Gaussian log-density of every frame under every state.

    :param x: ``(..., D)`` frames; ``means`` ``(B..., S, D)``; ``scale_tril``
        ``(B..., S, D, D)`` lower Cholesky factors of the covariances.
    :returns: ``(B..., ..., S)``.
    """
    lead, D = x.shape[:-1], x.shape[-1]
    deviations = x.reshape(-1, D).unsqueeze(-3) - means.unsqueeze(-2)  # (B..., S, P, D)
    whitened = torch.linalg.solve_triangular(scale_tril, deviations.transpose(-1, -2), upper=False)
    log_det = scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True)  # (B..., S, 1)
    log_probs = -0.5 * (whitened**2).sum(-2) - log_det - 0.5 * D * math.log(2 * math.pi)  # (B..., S, P)
    return log_probs.transpose(-1, -2).reshape(*means.shape[:-2], *lead, means.shape[-2])


def observed_block_log_probs(
    x: torch.Tensor, mask: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor
) -> torch.Tensor:
    """:func:`cholesky_log_probs` of frames with missing values: each frame's observed
    block under the marginal of its states' Gaussians (the block's covariance refactored),
    one pass per pattern of observed values; 0 for a frame with none observed.

    :param x: ``(..., D)`` frames, NaN where missing; ``mask`` ``(..., D)`` the observed ones.
    :returns: ``(B..., ..., S)``.
    """
    lead, D = x.shape[:-1], x.shape[-1]
    points, present = x.reshape(-1, D), mask.reshape(-1, D)
    covariance = scale_tril @ scale_tril.transpose(-1, -2)
    log_probs = means.new_zeros(*means.shape[:-2], points.shape[0], means.shape[-2])  # (B..., P, S)
    patterns, which = torch.unique(present, dim=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        if not bool(pattern.any()):
            continue
        rows, dims = (which == index).nonzero().squeeze(-1), pattern.nonzero().squeeze(-1)
        block = torch.linalg.cholesky(covariance[..., dims[:, None], dims])
        log_probs = log_probs.index_copy(-2, rows, cholesky_log_probs(points[rows][:, dims], means[..., dims], block))
    return log_probs.reshape(*means.shape[:-2], *lead, means.shape[-2])


def expected_frames(
    x: torch.Tensor, mask: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """EM's E-step for the missing values of full-covariance frames: under state ``k`` the
    missing block ``m`` of a frame given its observed block ``o`` is Gaussian with mean
    ``mu_m + S_mo S_oo^-1 (x_o - mu_o)`` and covariance ``S_mm - S_mo S_oo^-1 S_om``.

    :param x: ``(P, D)`` points, NaN where missing; ``mask`` ``(P, D)`` the observed ones;
        ``means`` ``(..., K, D)``; ``scale_tril`` ``(..., K, D, D)``; ``weights``
        ``(..., P, K)`` the states' responsibilities.
    :returns: the expected points ``(..., P, K, D)`` (observed values as they are) and
        ``sum_p w_pk Cov[x_p | x_p,o, k]`` ``(..., K, D, D)``, the scatter those
        expectations leave out.
    """
    covariance = scale_tril @ scale_tril.transpose(-1, -2)
    expected = filled(x, mask).to(means.dtype).unsqueeze(-2).expand(*means.shape[:-2], *x.shape[:1], *means.shape[-2:]).clone()
    correction = torch.zeros_like(covariance)
    patterns, which = torch.unique(mask, dim=0, return_inverse=True)
    for index, pattern in enumerate(patterns):
        if bool(pattern.all()):
            continue
        rows = (which == index).nonzero().squeeze(-1)
        seen, unseen = pattern.nonzero().squeeze(-1), (~pattern).nonzero().squeeze(-1)
        cross = covariance[..., unseen[:, None], seen]  # (..., K, m, o)
        gain = torch.linalg.solve(covariance[..., seen[:, None], seen], cross.transpose(-1, -2)).transpose(-1, -2)
        deviation = x[rows][:, seen].to(means.dtype).unsqueeze(-2) - means[..., seen].unsqueeze(-3)  # (..., r, K, o)
        fill = means[..., unseen].unsqueeze(-3) + torch.einsum("...kmo,...rko->...rkm", gain, deviation)
        expected[..., rows[:, None, None], torch.arange(means.shape[-2])[:, None], unseen] = fill
        spread = covariance[..., unseen[:, None], unseen] - gain @ cross.transpose(-1, -2)  # (..., K, m, m)
        mass = weights[..., rows, :].sum(-2)[..., None, None]  # (..., K, 1, 1)
        correction[..., unseen[:, None], unseen] += mass * spread
    return expected, correction


class InverseWishartCholesky(dist.TorchDistribution):
    """``InverseWishart(df, scale * I)`` of the covariance ``L L^T``, as a density of its
    Cholesky factor ``L`` ``(*batch, D, D)`` without the Jacobian: a prior for MAP, whose
    maximiser over ``L`` is then the covariance's. Samples through the Wishart of the
    precision."""

    arg_constraints: dict = {}
    support = constraints.lower_cholesky
    has_rsample = False

    def __init__(self, df: float, scale: float, dim: int, batch_shape: tuple[int, ...], like: torch.Tensor):
        self.df, self.scale, self.dim, self.like = df, scale, dim, like
        super().__init__(torch.Size(batch_shape), torch.Size((dim, dim)), validate_args=False)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        D, df, scale = self.dim, self.df, self.scale
        eye = torch.eye(D, dtype=value.dtype, device=value.device)
        inverse = torch.linalg.solve_triangular(value, eye.expand_as(value), upper=False)
        log_det = 2 * value.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        norm = 0.5 * df * D * math.log(scale / 2) - torch.special.multigammaln(torch.tensor(df / 2, dtype=value.dtype), D)
        return norm - 0.5 * (df + D + 1) * log_det - 0.5 * scale * (inverse**2).sum((-2, -1))

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        eye = torch.eye(self.dim, dtype=self.like.dtype, device=self.like.device)
        precision = torch.distributions.Wishart(self.df, covariance_matrix=eye / self.scale).sample(
            torch.Size(sample_shape) + self.batch_shape)
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(precision)))

    def expand(self, batch_shape, _instance=None):
        return InverseWishartCholesky(self.df, self.scale, self.dim, tuple(batch_shape), self.like)


COVARIANCES = ("diag", "spherical", "full", "tied")


class GaussianHMMHyperparameters(ChainHyperparameters):
    """The chain priors, the covariance type and weak priors on the Gaussian emissions."""

    covariance: Literal[COVARIANCES] = Field("diag", description="diag, spherical, full or tied (as hmmlearn's covariance_type)")
    prior_mean_scale: float = Field(10.0, gt=0, description="Normal(0, s) prior on every mean")
    prior_log_scale: float = Field(2.0, gt=0, description="diag, spherical: LogNormal(0, s) prior on every standard deviation")
    prior_covariance_dof: float = Field(1.0, gt=0, description="full, tied: inverse-Wishart prior with D - 1 + this many degrees of freedom")
    prior_covariance_scale: float = Field(0.01, gt=0, description="full, tied: the inverse-Wishart's scale matrix, this times I")


class GaussianHMM(HMMFamily):
    """Parameters ``initial`` ``(K,)``, ``transition`` ``(K, K)``, ``means`` ``(K, D)`` and,
    by ``covariance``, ``scales`` or ``scale_tril`` (the module docstring); every form also
    reads back as ``covariances`` ``(K, D, D)`` in :meth:`get_parameters`, like hmmlearn's
    ``covars_``. Priors: flat Dirichlet on ``initial``, sticky Dirichlet on transition rows,
    weak ones on the emissions (scale your data)."""

    family = "gaussian-hmm"
    observation = "real"
    hyperparameters = GaussianHMMHyperparameters

    @property
    def covariance(self) -> str:
        return self.hparams.covariance

    @property
    def inverse_wishart_df(self) -> float:
        return self.data_dim - 1 + self.hparams.prior_covariance_dof

    def priors(self):
        K, D, h, zero = self.hidden_dim, self.data_dim, self.hparams, self._anchor
        priors = {
            "initial": self._initial_prior(K),
            "transition": self._transition_prior(K),
            "means": dist.Normal(zero, h.prior_mean_scale).expand([K, D]).to_event(2),
        }
        if self.covariance in ("diag", "spherical"):
            shape = [K, D] if self.covariance == "diag" else [K]
            priors["scales"] = dist.LogNormal(zero, h.prior_log_scale).expand(shape).to_event(len(shape))
        else:
            batch = (K,) if self.covariance == "full" else ()
            prior = InverseWishartCholesky(self.inverse_wishart_df, h.prior_covariance_scale, D, batch, zero)
            priors["scale_tril"] = prior.to_event(len(batch))
        return priors

    def shared_parameters(self):
        """A ``tied`` covariance belongs to no state."""
        return frozenset({"scale_tril"}) if self.covariance == "tied" else frozenset()

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        if x is None:
            points = None
            means, scales = torch.randn((K, D), generator=generator), torch.ones(K, D)
        else:
            points = x[frame_mask(lengths, x.shape[1])]
            means, scales = gaussian_init(K, points, generator)
        params = {**self.chain_init(generator), "means": means}
        if self.covariance == "diag":
            params["scales"] = scales
        elif self.covariance == "spherical":
            params["scales"] = scales.mean(-1)
        else:  # the data's covariance (made positive definite), for every state
            spread = torch.cov(points.cpu().T).reshape(D, D) if points is not None and len(points) > D else torch.eye(D)
            scale_tril = torch.linalg.cholesky(spread + 1e-3 * torch.eye(D))
            params["scale_tril"] = scale_tril.expand(K, D, D).clone() if self.covariance == "full" else scale_tril
        return params

    def state_scale_tril(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(..., K, D, D)`` Cholesky factors of every state's covariance, any kind."""
        K, D = self.hidden_dim, self.data_dim
        if self.covariance in ("full", "tied"):
            scale_tril = params["scale_tril"]
            return scale_tril if self.covariance == "full" else scale_tril.unsqueeze(-3).expand(*scale_tril.shape[:-2], K, D, D)
        return torch.diag_embed(self.state_scales(params))

    def state_scales(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``(..., K, D)`` standard deviations of the diagonal kinds."""
        scales = params["scales"]
        return scales if self.covariance == "diag" else scales.unsqueeze(-1).expand(*scales.shape, self.data_dim)

    def get_parameters(self) -> dict[str, torch.Tensor]:
        params = super().get_parameters()
        scale_tril = self.state_scale_tril(params)
        return {**params, "covariances": scale_tril @ scale_tril.transpose(-1, -2)}

    def emission_log_probs(self, params, x):
        x = x.to(params["means"].dtype)
        if self.covariance in ("full", "tied"):
            mask = observed(x)
            if mask is not None:
                return observed_block_log_probs(x, mask, params["means"], self.state_scale_tril(params))
            return cholesky_log_probs(x, params["means"], self.state_scale_tril(params))
        return gaussian_log_probs(x, params["means"], self.state_scales(params))

    def emission_m_step(self, params, x, lengths, marginals):
        """The means given the current covariances, then the covariances given the new
        means (one conditional maximisation each: the EM objective still never decreases)."""
        h = self.hparams
        weights, points = em.flat_points(marginals, x.to(marginals.dtype))
        mask = observed(points)
        if self.covariance in ("diag", "spherical"):
            points = filled(points, mask)
            means = em.normal_mean_map(weights, points, self.state_scales(params) ** 2, h.prior_mean_scale, mask)
            deviations = em.squared_deviations(weights, points, means, mask)
            count = em.visits(weights, mask).expand_as(deviations)
            if self.covariance == "spherical":
                count, deviations = count.sum(-1), deviations.sum(-1)
            return {"means": means, "scales": em.lognormal_scale_map(count, deviations, h.prior_log_scale).to(means.dtype)}
        scale_tril, correction = self.state_scale_tril(params), 0.0
        if mask is not None:  # EM over the missing values too: their expectations under each state
            points, correction = expected_frames(points, mask, params["means"], scale_tril, weights)
        means = em.gaussian_mean_map(weights, points, scale_tril, h.prior_mean_scale)
        scatter = em.scatter(weights, points, means) + correction  # (..., K, D, D)
        count = weights.sum(-2)
        if self.covariance == "tied":
            scatter, count = scatter.sum(-3), count.sum(-1)
        eye = torch.eye(self.data_dim, dtype=scatter.dtype, device=scatter.device)
        covariance = (h.prior_covariance_scale * eye + scatter) / (count[..., None, None] + self.inverse_wishart_df + self.data_dim + 1)
        return {"means": means, "scale_tril": torch.linalg.cholesky(covariance).to(means.dtype)}

    def emission_means(self, params, previous=None):
        return params["means"]

    def sample_emissions(self, params, states, generator, previous=None):
        means = params["means"][states]
        noise = torch.randn(means.shape, generator=generator, device=means.device)
        if self.covariance in ("full", "tied"):
            return means + (self.state_scale_tril(params)[states] @ noise.to(means.dtype).unsqueeze(-1)).squeeze(-1)
        return means + self.state_scales(params)[states] * noise
