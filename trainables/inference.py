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
    "log_likelihood",
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
    probs = (log_alpha - shift).exp()
    if trans.dim() == 2:
        summed = probs @ trans
    elif trans.size(-3) == 1:  # shared by every sequence: one (N, S) @ (S, S) product, not N
        summed = torch.matmul(probs, trans.squeeze(-3))
    else:
        summed = torch.matmul(probs.unsqueeze(-2), trans).squeeze(-2)
    return summed.clamp_min(torch.finfo(summed.dtype).tiny).log() + shift


def _filter(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The forward recursion: the normalised filtering distributions
    ``log p(z_t | x_<=t)`` ``(..., S)`` of every frame (held at a sequence's last real
    frame through its padding) and the per-frame increments ``(..., T)``, zero at padding."""
    num_frames = log_emit.size(-2)
    mask = frame_mask(lengths, num_frames)
    trans = log_trans.exp()
    joint = log_init + log_emit[..., 0, :]
    step = joint.logsumexp(-1)
    log_alpha = joint - step.unsqueeze(-1)
    log_alphas, steps = [log_alpha], [step]
    for t in range(1, num_frames):
        joint = _log_vecmat(log_alpha, trans) + log_emit[..., t, :]
        step = joint.logsumexp(-1)
        real = mask[..., t]
        log_alpha = torch.where(real.unsqueeze(-1), joint - step.unsqueeze(-1), log_alpha)
        log_alphas.append(log_alpha)
        steps.append(step)
    steps = torch.stack(torch.broadcast_tensors(*steps), -1)
    return log_alphas, steps.masked_fill(~mask, 0.0)


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
    return _filter(log_init, log_trans, log_emit, lengths)[1]


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to an input's ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.size(dim) != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad


class _ExactLogLikelihood(torch.autograd.Function):
    """``log p(x)`` with a hand-written backward: the expected counts of forward-backward.

    d log p / d log_emit[t, s] is the smoothed marginal of state s at frame t,
    d / d log_init[s] the marginal at the first frame and d / d log_trans[i, j] the
    expected number of i -> j transitions, so the backward pass is one backward
    recursion with no autograd graph over the ``T`` steps of the forward one.
    """

    @staticmethod
    def forward(ctx, log_init, log_trans, log_emit, lengths):
        with torch.no_grad():
            log_alphas, steps = _filter(log_init, log_trans, log_emit, lengths)
        ctx.save_for_backward(log_init, log_trans, log_emit, lengths, torch.stack(log_alphas, -2), steps)
        return steps.sum(-1)

    @staticmethod
    def backward(ctx, grad_total):
        log_init, log_trans, log_emit, lengths, log_alphas, steps = ctx.saved_tensors
        num_frames = log_emit.size(-2)
        mask = frame_mask(lengths, num_frames)
        trans_t = log_trans.exp().transpose(-1, -2)
        # log_beta_t = log p(x_{t+1:} | z_t) - sum of those frames' steps (scaled like alpha)
        log_beta = torch.zeros_like(log_alphas[..., -1, :])
        betas = [log_beta]
        for t in range(num_frames - 1, 0, -1):
            message = log_emit[..., t, :] + log_beta - steps[..., t, None]
            previous = _log_vecmat(message, trans_t)
            log_beta = torch.where(mask[..., t, None], previous, log_beta)
            betas.append(log_beta)
        log_betas = torch.stack(betas[::-1], -2)
        marginals = (log_alphas + log_betas).exp() * mask.unsqueeze(-1)
        # xi_t(i, j) = alpha_{t-1}(i) A(i, j) emit_t(j) beta_t(j) / c_t, summed over real t
        later = (log_emit[..., 1:, :] + log_betas[..., 1:, :] - steps[..., 1:, None]).exp()
        later = later * mask[..., 1:, None]
        counts = torch.einsum("...ti,...tj->...ij", log_alphas[..., :-1, :].exp(), later) * log_trans.exp()
        scale = grad_total.unsqueeze(-1)
        grad_init = _sum_to(marginals[..., 0, :] * scale, log_init.shape)
        grad_trans = _sum_to(counts * scale.unsqueeze(-1), log_trans.shape)
        grad_emit = _sum_to(marginals * scale.unsqueeze(-1), log_emit.shape)
        return grad_init, grad_trans, grad_emit, None


def log_likelihood(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The exact ``log p(x_{0:length})`` ``(...)``, the sum of :func:`log_likelihood_steps`,
    with a hand-written backward pass (expected counts; measured faster than autograd
    through the recursion). Use this for training; the steps for per-frame answers."""
    return _ExactLogLikelihood.apply(log_init, log_trans, log_emit, lengths)


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
