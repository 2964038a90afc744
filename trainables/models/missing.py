"""Missing values, integrated out exactly: the one convention every family follows.

A value of ``x`` that is NaN is missing (``null`` over HTTP, an empty cell in a table).
It is never imputed: a family's emission term for a frame is the density of its observed
values only (a fully missing frame has none, log 1 = 0, so its state still follows the
chain), which for densities that factorise over the values of a frame (Bernoulli per key,
Poisson per count, diagonal Gaussian per dimension) is the product over the observed ones,
and for a full or tied Gaussian the marginal of the observed block. Every density is
computed on :func:`filled` frames (missing values read as 0) with the missing terms
dropped, so gradients stay finite whatever the pattern of NaN.

``observed(x)`` is ``None`` where nothing is missing: the families then take exactly the
path they take on complete data (the same numbers, bit for bit).
"""

from __future__ import annotations

import torch

from ..inference import frame_mask


def observed(x: torch.Tensor) -> torch.Tensor | None:
    """Boolean ``x.shape`` mask of the observed (non-NaN) values, or None if none is missing."""
    missing = torch.isnan(x)
    return None if not bool(missing.any()) else ~missing


def filled(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``x`` with its missing values (``~mask``) read as 0; ``x`` itself when ``mask`` is None."""
    return x if mask is None else torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def start_frames(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``x`` for data-informed random initialisations only (never for a density): missing
    values replaced by their column's mean over the observed real values (0 for a column
    with none), so that means, spreads and frequencies of the data are finite."""
    mask = observed(x)
    if mask is None:
        return x
    real = mask if lengths is None else mask & frame_mask(lengths.to(x.device), x.shape[1]).unsqueeze(-1)
    values = filled(x, real).flatten(0, -2)
    counts = real.flatten(0, -2).sum(0)
    means = values.sum(0) / counts.clamp_min(1)
    return torch.where(mask, x, means.to(x.dtype))


def observed_values(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """``(N,)`` int64: how many values of each sequence ``x`` ``(N, T, D)`` (within its
    ``lengths``) or point ``x`` ``(N, D)`` (``lengths`` None) are not missing."""
    present = ~torch.isnan(x)
    if lengths is not None:
        present = present & frame_mask(lengths.to(x.device), x.shape[1]).unsqueeze(-1)
    return present.flatten(1).sum(-1)


def observed_frames(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Boolean ``(N, T)`` of the real frames of ``x`` ``(N, T, D)`` with a value that is
    not missing, or ``(N,)`` of such points ``x`` ``(N, D)`` (``lengths`` None)."""
    present = (~torch.isnan(x)).any(-1)
    return present if lengths is None else present & frame_mask(lengths.to(x.device), x.shape[1])
