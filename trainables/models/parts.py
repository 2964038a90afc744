"""Building blocks shared by the families: priors, random initialisations, emissions.

Random draws take an explicit ``torch.Generator`` so a seed fixes an initialisation
without touching the global RNG.
"""

from __future__ import annotations

import torch
from pyro import distributions as dist

from ..inference import frame_mask


def sticky_dirichlet(num_states: int, sticky: float, smooth: float, like: torch.Tensor):
    """``Dirichlet(sticky * I + smooth)`` over the rows of a ``(K, K)`` transition matrix,
    as in Pyro's ``examples/hmm.py``; one event of shape ``(K, K)``."""
    eye = torch.eye(num_states, dtype=like.dtype, device=like.device)
    return dist.Dirichlet(sticky * eye + smooth).to_event(1)


def flat_dirichlet(shape: tuple[int, ...], concentration: float, like: torch.Tensor):
    """``Dirichlet(concentration)`` on the last dim, one event over all of ``shape``."""
    alpha = torch.full(shape, concentration, dtype=like.dtype, device=like.device)
    return dist.Dirichlet(alpha).to_event(len(shape) - 1)


def beta_prior(shape: tuple[int, ...], a: float, b: float, like: torch.Tensor):
    """Independent ``Beta(a, b)`` on every entry, one event over all of ``shape``."""
    a_ = torch.tensor(a, dtype=like.dtype, device=like.device)
    b_ = torch.tensor(b, dtype=like.dtype, device=like.device)
    return dist.Beta(a_, b_).expand(shape).to_event(len(shape))


def uniform_simplex(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Draws uniform on the simplex of the last dim (``Dirichlet(1)``), ``shape``."""
    exponential = -torch.rand(shape, generator=generator).log()
    return exponential / exponential.sum(-1, keepdim=True)


def sticky_simplex(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random ``(..., K, K)`` transition rows leaning towards staying: ``(I + U) / 2``."""
    return 0.5 * torch.eye(shape[-1]) + 0.5 * uniform_simplex(shape, generator)


def frame_mean(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """``(D,)`` mean of the real frames of ``x`` ``(N, T, D)``."""
    return x[frame_mask(lengths, x.shape[1])].mean(0)


def bernoulli_init(
    shape: tuple[int, ...],
    x: torch.Tensor | None,
    lengths: torch.Tensor | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random emission probabilities ``shape`` ``(..., D)`` spread around each key's
    frequency in the data (or uniform on (0.05, 0.5) without data), kept inside (0, 1)."""
    noise = torch.rand(shape, generator=generator)
    if x is None:
        return 0.05 + 0.45 * noise
    return (frame_mean(x.cpu(), lengths.cpu()) * (0.5 + noise)).clamp(1e-3, 1 - 1e-3)


def safe_log(p: torch.Tensor) -> torch.Tensor:
    """``log p`` with ``p`` clamped to the smallest normal float: finite where p underflows."""
    return p.clamp_min(torch.finfo(p.dtype).tiny).log()


def bernoulli_log_probs(
    x: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Log-probability of binary frames under every state's Bernoulli emission.

    :param x: ``(N, T, D)`` frames of 0/1 values.
    :param probs: ``(..., S, D)`` per-state key probabilities.
    :param weight: optional ``(N, T, D)`` 0/1 selector of the keys that count.
    :returns: ``(..., N, T, S)``.
    """
    x = x.to(probs.dtype)
    log_on, log_off = safe_log(probs), safe_log(1 - probs)
    if weight is None:  # x log p + (1 - x) log(1 - p) = x (log p - log(1 - p)) + log(1 - p)
        return torch.einsum("ntd,...sd->...nts", x, log_on - log_off) + log_off.sum(-1)[..., None, None, :]
    return torch.einsum("ntd,...sd->...nts", x * weight, log_on - log_off) + torch.einsum(
        "ntd,...sd->...nts", weight.to(probs.dtype), log_off
    )
