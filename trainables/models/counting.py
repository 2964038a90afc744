"""The free parameters of a model, exact per family and topology, for BIC and AIC
(:mod:`trainables.selection`): ``K - 1`` per probability row of ``K`` entries (only the
allowed entries of a row with structural zeros), ``D (D + 1) / 2`` per Cholesky factor of
a ``D x D`` covariance, one per other parameter value, plus every network weight."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints


def support_dimension(support: constraints.Constraint, shape: torch.Size) -> int:
    """The free real numbers in a value of ``shape`` on ``support``."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    numel = math.prod(shape)
    mask = getattr(support, "mask", None)
    if mask is not None:  # rows summing to one over their allowed entries only
        allowed = torch.as_tensor(mask, dtype=torch.bool).expand(shape)
        return int(allowed.sum()) - int(allowed.any(-1).sum())
    if support is constraints.simplex:
        return numel - numel // shape[-1]
    if support is constraints.lower_cholesky:
        dim = shape[-1]
        return numel // (dim * dim) * dim * (dim + 1) // 2
    return numel


def free_parameters(model) -> int:
    """Free parameters of ``model``: its prior sites' values on their supports (MAP
    families) plus every weight of its networks (``nnhmm``, ``dmm``)."""
    if not hasattr(model, "priors"):  # a family of networks alone (dmm)
        return sum(weight.numel() for weight in model.parameters() if weight.requires_grad)
    sites = sum(support_dimension(prior.support, prior.shape()) for prior in model.priors().values())
    return sites + sum(weight.numel() for weight in model.network_parameters())
