"""The forward recursion as a parallel (log-depth) scan, for long sequences with small
state spaces on a GPU: every frame is an ``S x S`` matrix of the log semiring,
``M_t[i, j] = log_trans[i, j] + log_emit[t, j]``, and the prefix products
``M_0 (x) M_1 (x) ... (x) M_t`` (Hillis-Steele, ``ceil(log2 T)`` rounds of batched
matrix products over all frames at once) give every filtering message; ``M_0``'s rows
are all ``log_init + log_emit[0]``, padding frames are identities. ``O(T S^3 log T)``
work against the sequential ``O(T S^2)``, but ``log T`` steps instead of ``T``.

Device-agnostic PyTorch, differentiable by autograd; written and tested on the CPU
against the sequential recursion (no GPU was at hand). It runs in float64 whatever the
factors' dtype: its messages are unnormalised, ``O(T)`` nats in size, and each step is
the difference of two of them, which float32 would leave a few hundredths of a nat off
after 100,000 frames. Each product is shifted by the
max of its left factor's rows and its right factor's columns; where some entry of a
product falls below ``S * tiny / eps`` of that shift without being an exact zero (terms
under the smallest normal float would weigh), :func:`log_likelihood_steps` answers
``None`` and the caller runs the sequential recursion, as the scaled recursions fall
back to log space.
"""

from __future__ import annotations

import torch


def _log_matmul(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log(exp(left) @ exp(right))`` for ``(..., S, S)`` factors, and whether it is exact
    to rounding everywhere (a 0-dim bool tensor)."""
    finite = lambda shift: torch.where(torch.isfinite(shift), shift, 0.0)  # noqa: E731 (all -inf rows)
    row_shift = finite(left.amax(-1, keepdim=True).detach())
    column_shift = finite(right.amax(-2, keepdim=True).detach())
    product = torch.matmul((left - row_shift).exp(), (right - column_shift).exp())
    finfo = torch.finfo(product.dtype)
    with torch.no_grad():
        small = product < left.size(-1) * finfo.tiny / finfo.eps
        some_term = torch.matmul((left > -torch.inf).to(product.dtype), (right > -torch.inf).to(product.dtype)) > 0
        exact = ~(small & some_term).any()
    positive = product > 0  # structural zeros stay -inf, with a zero (not NaN) gradient
    logged = torch.where(positive, torch.where(positive, product, 1.0).log(), -torch.inf)
    return logged + row_shift + column_shift, exact


def log_likelihood_steps(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor | None:
    """Per-frame increments ``(..., T)`` of the exact log-likelihood (zero at padding), as
    :func:`trainables.inference.log_likelihood_steps` defines them; ``None`` where the
    scan would not be exact to rounding."""
    dtype = log_emit.dtype
    log_init, log_trans, log_emit = log_init.double(), log_trans.double(), log_emit.double()
    num_frames, num_states = log_emit.shape[-2:]
    real = torch.arange(num_frames, device=log_emit.device) < lengths.unsqueeze(-1)  # (..., T)
    identity = torch.full((num_states, num_states), -torch.inf, dtype=torch.float64, device=log_emit.device)
    identity.diagonal().zero_()
    later = log_trans.unsqueeze(-3) + log_emit[..., 1:, None, :]  # (..., T-1, S, S)
    first = (log_init + log_emit[..., 0, :]).unsqueeze(-2).unsqueeze(-3)  # (..., 1, 1, S)
    batch = torch.broadcast_shapes(later.shape[:-3], first.shape[:-3], real.shape[:-1])
    prefix = torch.cat([first.expand(*batch, 1, num_states, num_states), later.expand(*batch, -1, -1, -1)], -3)
    prefix = torch.where(real.expand(*batch, -1)[..., None, None], prefix, identity)
    offset = 1
    while offset < num_frames:  # Hillis-Steele: frame t takes in frames t - 2 offset + 1 .. t
        combined, exact = _log_matmul(prefix[..., :-offset, :, :], prefix[..., offset:, :, :])
        if not bool(exact):
            return None
        prefix = torch.cat([prefix[..., :offset, :, :], combined], -3)
        offset *= 2
    totals = prefix[..., 0, :].logsumexp(-1)  # (..., T): log p(x_{0:t}), held through padding
    steps = torch.diff(totals, dim=-1, prepend=torch.zeros_like(totals[..., :1]))
    return steps.masked_fill(~real, 0.0).to(dtype)
