"""Exact inference for hidden Markov models, as pure tensor functions.

Every HMM-like family of :mod:`trainables.models` reduces itself to three factors over
its (possibly product) state space of size ``S`` and hands them to these functions:

- ``log_init``  ``(..., S)``: log-probability of the state at the first frame;
- ``log_trans`` ``(..., S, S)``: ``log_trans[..., i, j] = log p(z_t = j | z_{t-1} = i)``;
- ``log_emit``  ``(..., T, S)``: ``log p(x_t | z_t = s, ...)`` for every frame.

The leading ``...`` are batch dimensions (sequences, restarts) and broadcast against each
other and against ``lengths`` ``(...)``: frame ``t`` of a sequence is real when
``t < length`` and padding otherwise; padding never changes any result. Lengths must be
at least 1. The recursions run in log space with a max shift around each matrix product,
so they are stable in float32 and exact to rounding in float64, on CPU and CUDA alike.
"""

from __future__ import annotations

import torch

__all__ = [
    "frame_mask",
    "log_likelihood_steps",
    "posterior_marginals",
    "sample_states",
    "viterbi",
]


def frame_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Boolean ``(..., T)`` mask of the real (unpadded) frames for ``lengths`` ``(...)``."""
    return torch.arange(num_frames, device=lengths.device) < lengths.unsqueeze(-1)


def _log_vecmat(log_alpha: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """``log(exp(log_alpha) @ trans)`` for ``log_alpha`` ``(..., S)`` and probabilities
    ``trans`` ``(..., S, S)``, shifted by the max of ``log_alpha`` for stability.

    Sums that underflow are clamped to the smallest normal float rather than ``-inf``, so
    that gradients stay finite for states that structural zeros make unreachable.
    """
    shift = log_alpha.max(-1, keepdim=True).values.detach()
    summed = torch.matmul((log_alpha - shift).exp().unsqueeze(-2), trans).squeeze(-2)
    return summed.clamp_min(torch.finfo(summed.dtype).tiny).log() + shift


def log_likelihood_steps(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Per-frame increments ``log p(x_t | x_<t)`` of the exact log-likelihood.

    :returns: ``(..., T)`` increments, zero at padded frames; their sum over ``T`` is
        ``log p(x_{0:length})``. Differentiable with respect to all three factors.
    """
    num_frames = log_emit.size(-2)
    mask = frame_mask(lengths, num_frames)
    trans = log_trans.exp()
    # log_alpha holds the normalised filtering distribution log p(z_t | x_<=t).
    joint = log_init + log_emit[..., 0, :]
    step = joint.logsumexp(-1)
    log_alpha = joint - step.unsqueeze(-1)
    steps = [step]
    for t in range(1, num_frames):
        joint = _log_vecmat(log_alpha, trans) + log_emit[..., t, :]
        step = joint.logsumexp(-1)
        real = mask[..., t]
        log_alpha = torch.where(real.unsqueeze(-1), joint - step.unsqueeze(-1), log_alpha)
        steps.append(step)
    steps = torch.stack(torch.broadcast_tensors(*steps), -1)
    return steps.masked_fill(~mask, 0.0)


def posterior_marginals(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Smoothed marginals ``p(z_t = s | x_{0:length})`` by forward-backward.

    The backward pass is the gradient of the log-likelihood with respect to ``log_emit``
    (each frame's evidence enters linearly), so it shares the forward recursion exactly.

    :returns: ``(..., T, S)``; rows sum to 1 at real frames and are zero at padding.
    """
    with torch.enable_grad():
        log_emit = log_emit.detach().requires_grad_(True)
        total = log_likelihood_steps(log_init.detach(), log_trans.detach(), log_emit, lengths)
        (marginals,) = torch.autograd.grad(total.sum(), log_emit)
    return marginals


def viterbi(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely state path by max-product dynamic programming.

    :returns: ``states`` ``(..., T)`` int64 with ``-1`` at padded frames, and
        ``log_joint`` ``(...)``, the joint ``log p(z*, x)`` of that path.
    """
    num_frames = log_emit.size(-2)
    mask = frame_mask(lengths, num_frames)
    score = log_init + log_emit[..., 0, :]
    backpointers = []
    for t in range(1, num_frames):
        best, argbest = (score.unsqueeze(-1) + log_trans).max(-2)
        real = mask[..., t].unsqueeze(-1)
        score = torch.where(real, best + log_emit[..., t, :], score)
        backpointers.append(argbest)
    log_joint, state = score.max(-1)
    states = [state]
    for t in range(num_frames - 1, 0, -1):
        previous = backpointers[t - 1].gather(-1, state.unsqueeze(-1))
        state = torch.where(mask[..., t], previous.squeeze(-1), state)
        states.append(state)
    states = torch.stack(states[::-1], -1)
    return states.masked_fill(~mask, -1), log_joint


def sample_states(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    num_sequences: int,
    length: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """Ancestral samples of the state chain alone.

    :param log_init: ``(S,)``.
    :param log_trans: ``(S, S)``.
    :returns: ``(num_sequences, length)`` int64 states.
    """
    probs = log_init.exp().expand(num_sequences, -1)
    trans = log_trans.exp()
    state = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    states = [state]
    for _ in range(1, length):
        state = torch.multinomial(trans[state], 1, generator=generator).squeeze(-1)
        states.append(state)
    return torch.stack(states, -1)
