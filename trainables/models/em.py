"""Closed-form MAP M-steps for EM (``train: {method: em}``), under the same priors SVI
uses, so that both maximise ``log p(x | theta) + log p(theta)``.

Each update is the exact maximiser of the expected complete-data log-likelihood plus the
log prior, given expected counts from the engine's E-step (:func:`trainables.inference.
expected_statistics`). A Dirichlet or Beta prior with a concentration below 1 (the sticky
transition prior's off-diagonal 0.1, the Beta(0.1, 0.9) emission prior) has no maximum
inside the simplex where the data give a coordinate fewer than ``1 - concentration``
expected counts: the objective grows without bound as that probability goes to 0, under
SVI too (whose steps only slow the descent). There every update stops at ``EM_FLOOR``
and is exact on the simplex cut to probabilities ``>= EM_FLOOR`` (hmmlearn's rule,
``max(counts + concentration - 1, 0)``, with that floor). The floor is 1e-4: on jsb
(``hmm`` K=16) a floor of 1e-6 left probabilities that held-out chorales contradict
(validation NLL 8.82 against SVI's 8.50), 1e-4 and 1e-3 generalise as well as SVI (8.47,
8.48), 1e-2 does not (9.07). Leading dims ``(...)`` are restarts.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from .. import compiled
from ..inference import compiled_on

EM_FLOOR = 1e-4  # the smallest probability an M-step gives
NEWTON_STEPS = 40  # the log-scale equation's Newton iterations (converged to rounding in < 10)


def base(prior: Distribution) -> Distribution:
    """The distribution under ``Independent`` / ``Expanded`` wrappers."""
    while hasattr(prior, "base_dist"):
        prior = prior.base_dist
    return prior


def dirichlet_map(counts: torch.Tensor, concentration: torch.Tensor) -> torch.Tensor:
    """Probabilities ``(..., K)`` maximising ``sum_k (counts_k + concentration_k - 1) log p_k``
    over the simplex cut at ``min(EM_FLOOR, 0.1 / K)``: proportional to the positive
    weights, the floor where a weight is not positive (a row without one: the largest
    weights share)."""
    weight = counts + concentration - 1
    positive = torch.where(weight > 0, weight, 0.0)
    none = positive.sum(-1, keepdim=True) == 0
    positive = torch.where(none, (weight == weight.amax(-1, keepdim=True)).to(weight.dtype), positive)
    share = positive > 0
    floor = min(EM_FLOOR, 0.1 / weight.size(-1))  # a floor that leaves most of the mass to the data
    rest = 1 - (~share).sum(-1, keepdim=True) * floor
    return torch.where(share, positive / positive.sum(-1, keepdim=True) * rest, floor)


def beta_map(ones: torch.Tensor, zeros: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The probability maximising ``(ones + a - 1) log p + (zeros + b - 1) log(1 - p)`` on
    ``[EM_FLOOR, 1 - EM_FLOOR]``: the interior mode, clipped, where both weights are
    positive; else the end the larger weight favours."""
    on, off = ones + a - 1, zeros + b - 1
    interior = (on / (on + off).clamp_min(torch.finfo(on.dtype).tiny)).clamp(EM_FLOOR, 1 - EM_FLOOR)
    end = torch.where(on > off, 1 - EM_FLOOR, EM_FLOOR)
    return torch.where((on > 0) & (off > 0), interior, end)


def normal_mean_map(weights: torch.Tensor, x: torch.Tensor, variance: torch.Tensor, prior_scale: float) -> torch.Tensor:
    """Means ``(..., K, D)`` under a ``Normal(0, prior_scale)`` prior given the
    responsibilities ``weights`` ``(..., P, K)`` of points ``x`` ``(P, D)`` and the current
    ``variance`` ``(..., K, D)``: ``sum w x / (sum w + variance / prior_scale^2)``."""
    total = weights.sum(-2).unsqueeze(-1)
    return torch.matmul(weights.transpose(-1, -2), x) / (total + variance / prior_scale**2)


def squared_deviations(weights: torch.Tensor, x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``sum_p w_pk (x_pd - mean_kd)^2`` ``(..., K, D)`` in float64, summed directly (no
    cancellation): compiled on the CPU, else with a ``(..., P, K, D)`` intermediate."""
    if compiled_on(x.device):
        return compiled.weighted_deviations(weights, x, means)
    deviations = (x.unsqueeze(-2) - means.unsqueeze(-3)).double() ** 2
    return torch.einsum("...pk,...pkd->...kd", weights.double(), deviations)


def lognormal_scale_map(count: torch.Tensor, deviations: torch.Tensor, prior_scale: float) -> torch.Tensor:
    """Standard deviations maximising ``-count log s - deviations / (2 s^2)`` plus the log
    density of a ``LogNormal(0, prior_scale)`` prior on ``s``: with ``u = log s`` the root of
    ``deviations e^{-2u} - (count + 1) - u / prior_scale^2``, a strictly concave objective's
    derivative, by Newton's method from the root without the prior's quadratic term (in
    float64)."""
    count, deviations = count.double(), deviations.double()
    u = 0.5 * (deviations.clamp_min(torch.finfo(torch.float64).tiny) / (count + 1)).log()
    precision = 1.0 / prior_scale**2
    for _ in range(NEWTON_STEPS):
        pull = deviations * torch.exp(-2 * u)
        u = u - (pull - (count + 1) - u * precision) / (-2 * pull - precision)
    return u.exp()


def flat_points(marginals: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames as points, padding included (its marginals are zero, so it weighs
    nothing): responsibilities ``(..., N T, S)`` from ``marginals`` ``(..., N, T, S)``
    and frames ``(N T, D)`` from ``x`` ``(N, T, D)``; views, no copies."""
    return marginals.flatten(-3, -2), x.flatten(0, 1)
