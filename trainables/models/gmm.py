"""``gmm``: a Gaussian mixture of K components in D dimensions (the GMM tutorial seed),
with the assignments summed out exactly (logsumexp over components)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from pyro import distributions as dist

from . import em
from .base import MapModel
from .contract import Hyperparameters, Marginals, Samples, StatePath
from .gaussian_hmm import gaussian_init, gaussian_log_probs
from .missing import filled, observed
from .parts import flat_dirichlet, safe_log

#: variance structure -> shape of ``scales`` as a function of (K, D)
VARIANCES = {
    "global": lambda K, D: (),
    "component": lambda K, D: (K,),
    "dimension": lambda K, D: (D,),
    "component-dimension": lambda K, D: (K, D),
}


class GMMHyperparameters(Hyperparameters):
    """The variance structure and the tutorial's priors."""

    variance: Literal[tuple(VARIANCES)] = Field(
        "component-dimension", description="what the standard deviations are shared over"
    )
    prior_weight: float = Field(0.5, gt=0, description="Dirichlet weight of the mixture weights")
    prior_loc_scale: float = Field(4.0, gt=0, description="Normal(0, s) prior on every component mean")
    prior_log_scale: float = Field(0.5, gt=0, description="LogNormal(0, s) prior on every standard deviation")


class GaussianMixture(MapModel):
    """Parameters ``weights`` ``(K,)``, ``locs`` ``(K, D)`` and ``scales`` (standard
    deviations) shaped by ``variance``: ``global`` ``()``, ``component`` ``(K,)``,
    ``dimension`` ``(D,)`` or ``component-dimension`` ``(K, D)``. Priors as in the
    tutorial: ``Dirichlet(prior_weight)``, ``Normal(0, prior_loc_scale)`` and
    ``LogNormal(0, prior_log_scale)``.

    Data are points ``x`` ``(N, D)``; ``lengths`` is not used.
    """

    family = "gmm"
    data_kind = "points"
    observation = "real"
    latent = "components"
    hyperparameters = GMMHyperparameters

    @property
    def scale_shape(self) -> tuple[int, ...]:
        return VARIANCES[self.hparams.variance](self.hidden_dim, self.data_dim)

    def priors(self):
        K, D, h, zero = self.hidden_dim, self.data_dim, self.hparams, self._anchor
        shape = self.scale_shape
        return {
            "weights": flat_dirichlet((K,), h.prior_weight, zero),
            "locs": dist.Normal(zero, h.prior_loc_scale).expand([K, D]).to_event(2),
            "scales": dist.LogNormal(zero, h.prior_log_scale).expand(shape).to_event(len(shape)),
        }

    def relabel_problem(self):
        return None

    def shared_parameters(self):
        """The scales of ``global`` and ``dimension`` variance belong to no component."""
        return frozenset({"scales"}) if self.hparams.variance in ("global", "dimension") else frozenset()

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        if x is None:
            locs, scales = torch.randn((K, D), generator=generator), torch.ones(K, D)
        else:
            locs, scales = gaussian_init(K, x, generator)
            scales = scales / 2**0.5  # the tutorial's sqrt(var / 2)
        reduce = {
            "global": lambda s: s.mean(),
            "component": lambda s: s.mean(-1),
            "dimension": lambda s: s[0],
            "component-dimension": lambda s: s,
        }[self.hparams.variance]
        return {"weights": torch.full((K,), 1.0 / K), "locs": locs, "scales": reduce(scales)}

    def em_step(self, params, x, lengths=None, improve=None):
        """Responsibilities, then the weights, the means given the current scales and the
        scales given the new means, each tied as ``variance`` says."""
        joint = self.joint_log_probs(params, x)
        log_likelihood = joint.logsumexp(-1)
        weights = (joint - log_likelihood.unsqueeze(-1)).exp()  # (..., N, K)
        h, mask = self.hparams, observed(x)
        points = filled(x, mask).to(weights.dtype)
        prior = em.base(self.priors()["weights"]).concentration
        locs = em.normal_mean_map(weights, points, self.component_scales(params["scales"]) ** 2, h.prior_loc_scale, mask)
        deviations = em.squared_deviations(weights, points, locs, mask)  # (..., K, D)
        count = em.visits(weights, mask).expand_as(deviations)
        tied = {"global": (-2, -1), "component": (-1,), "dimension": (-2,), "component-dimension": ()}[h.variance]
        if tied:
            count, deviations = count.sum(tied), deviations.sum(tied)
        scales = em.lognormal_scale_map(count, deviations, h.prior_log_scale).to(locs.dtype)
        return {"weights": em.dirichlet_map(weights.sum(-2), prior), "locs": locs, "scales": scales}, log_likelihood

    def component_scales(self, scales: torch.Tensor) -> torch.Tensor:
        """``scales`` of any variance structure (with leading batch dims) as ``(..., K, D)``."""
        K, D = self.hidden_dim, self.data_dim
        variance = self.hparams.variance
        if variance == "global":
            scales = scales[..., None, None]
        elif variance == "component":
            scales = scales[..., :, None]
        elif variance == "dimension":
            scales = scales[..., None, :]
        return scales.expand(*scales.shape[:-2], K, D)

    def joint_log_probs(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """``(..., N, K)`` log p(x_n, component k) for points ``x`` ``(N, D)``."""
        locs = params["locs"]
        log_density = gaussian_log_probs(
            x.to(locs.dtype), locs, self.component_scales(params["scales"])
        )
        return safe_log(params["weights"]).unsqueeze(-2) + log_density

    def log_likelihood_of(self, params, x, lengths=None):
        return self.joint_log_probs(params, x).logsumexp(-1)

    def log_likelihood_steps(self, x, lengths=None):
        """``(N, 1)``: a mixture has one step per point."""
        return self.log_likelihood_of(self.map_values(), x).unsqueeze(-1)

    def components(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The mixture as ``weights`` ``(K,)``, ``locs`` ``(K, D)`` and per-dimension
        standard deviations ``(K, D)`` (for pictures)."""
        params = self.get_parameters()
        return params["weights"], params["locs"], self.component_scales(params["scales"])

    @torch.no_grad()
    def decode(self, x, lengths=None) -> StatePath:
        """MAP assignment ``(N,)`` int64 and its joint log p(x_n, k*) ``(N,)``."""
        log_joint, assignment = self.joint_log_probs(self.map_values(), x).max(-1)
        return StatePath(assignment, log_joint)

    @torch.no_grad()
    def posterior(self, x, lengths=None) -> Marginals:
        """Responsibilities ``(N, K)``."""
        return Marginals(self.joint_log_probs(self.map_values(), x).softmax(-1))

    @torch.no_grad()
    def sample(self, num_sequences, length=None, seed=0) -> Samples:
        """``num_sequences`` points ``(N, D)`` and their components ``(N,)``; ``length``
        is ignored (a point has no time axis)."""
        if num_sequences < 1:
            raise ValueError(f"gmm: sample needs num_sequences >= 1, got {num_sequences}")
        generator = torch.Generator(device=self.device).manual_seed(seed)
        params = self.map_values()
        assignment = torch.multinomial(
            params["weights"], num_sequences, replacement=True, generator=generator
        )
        locs = params["locs"][assignment]
        scales = self.component_scales(params["scales"])[assignment]
        noise = torch.randn(locs.shape, generator=generator, device=locs.device)
        return Samples(locs + scales * noise, assignment)
