"""Exact inference for hidden Markov models, as pure tensor functions.

Every HMM-like family of :mod:`trainables.models` reduces itself to three factors over
its (possibly product) state space of size ``S`` and hands them to these functions:

- ``log_init``  ``(..., S)``: log-probability of the state at the first frame;
- ``log_trans`` ``(..., S, S)``: ``log_trans[..., i, j] = log p(z_t = j | z_{t-1} = i)``;
- ``log_emit``  ``(..., T, S)``: ``log p(x_t | z_t = s, ...)`` for every frame.

The leading ``...`` are batch dimensions (sequences, restarts) and broadcast against each
other and against ``lengths`` ``(...)``: frame ``t`` of a sequence is real when
``t < length`` and padding otherwise; padding never changes any result. Lengths must be
at least 1.

The forward and backward recursions run in probability space, normalised at every frame
(Rabiner's scaling: four tensor ops a frame where log space takes eleven), and fall back
to log space, with a max shift around each matrix product, wherever a scale leaves the
floating-point range; so they are fast, stable in float32 and exact to rounding in
float64, on CPU and CUDA alike. Viterbi runs in log space.

On the CPU, for up to ``MAX_COMPILED_STATES`` states, the same recursions run compiled
(:mod:`trainables.compiled`: the loop over frames in machine code). On a GPU, sequences of
at least ``MIN_SCAN_FRAMES`` frames over at most ``MAX_SCAN_STATES`` states take the
parallel scan (:mod:`trainables.scan`) for the likelihood and marginals. The sequential
PyTorch recursions serve the rest, and gradients through the per-frame steps.
``PYROSWEEP_ENGINE`` (:mod:`trainables.engines`) forces one path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import compiled, scan
from .engines import ENGINE_ENV, engine

MAX_COMPILED_STATES = 64  # beyond, the batched matrix products of the PyTorch path win
# auto takes the parallel scan on a GPU for sequences at least this long with at most
# this many states (its work grows as S^3 log T); not measured on a GPU yet
MIN_SCAN_FRAMES, MAX_SCAN_STATES = 1024, 16

__all__ = [
    "expected_statistics",
    "filtered",
    "frame_mask",
    "log_likelihood",
    "log_likelihood_steps",
    "posterior_marginals",
    "predicted",
    "sample_states",
    "viterbi",
]


def path(device: torch.device, num_states: int = 1, num_frames: int = 1) -> str:
    """The path that runs for factors on ``device`` over ``num_states`` states and
    ``num_frames`` frames: ``compiled`` on the CPU with up to ``MAX_COMPILED_STATES``
    states, ``scan`` on a GPU for long sequences over few states, else ``torch``
    (``auto``); or the one ``PYROSWEEP_ENGINE`` forces."""
    choice = engine()
    on_cpu = device.type == "cpu"
    if choice == "compiled" and not on_cpu:
        raise ValueError(f"{ENGINE_ENV}=compiled runs on the CPU only; these factors are on {device}")
    if choice != "auto":
        return choice
    if on_cpu:
        return "compiled" if num_states <= MAX_COMPILED_STATES else "torch"
    return "scan" if num_frames >= MIN_SCAN_FRAMES and num_states <= MAX_SCAN_STATES else "torch"


def compiled_on(device: torch.device) -> bool:
    """Whether the compiled kernels (emissions too) run for tensors on ``device``."""
    return path(device) == "compiled"


def _path(log_emit: torch.Tensor) -> str:
    """The path of the recursions for ``log_emit`` ``(..., T, S)``."""
    return path(log_emit.device, log_emit.size(-1), log_emit.size(-2))


def frame_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Boolean ``(..., T)`` mask of the real (unpadded) frames for ``lengths`` ``(...)``."""
    return torch.arange(num_frames, device=lengths.device) < lengths.unsqueeze(-1)


def _right_multiplier(trans: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map ``probs -> probs @ trans`` for row vectors ``probs`` ``(..., S)`` and
    ``trans`` ``(..., S, S)``, with its form chosen once for a whole recursion."""
    if trans.dim() > 2 and trans.size(-3) != 1:  # one matrix per sequence
        return lambda probs: torch.matmul(probs.unsqueeze(-2), trans).squeeze(-2)
    shared = trans.squeeze(-3) if trans.dim() > 2 else trans  # one GEMM for all sequences

    def times(probs: torch.Tensor) -> torch.Tensor:
        if probs.dim() == shared.dim() == 3 and probs.size(0) == shared.size(0):
            return torch.bmm(probs, shared)  # measured 2.4x faster than matmul's 3-D dispatch
        return torch.matmul(probs, shared)

    return times


def _log_vecmat(log_alpha: torch.Tensor, times_trans: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``log(exp(log_alpha) @ trans)`` for ``log_alpha`` ``(..., S)`` and ``times_trans``
    the :func:`_right_multiplier` of probabilities ``trans``, shifted by the max of
    ``log_alpha`` for stability.

    Sums that underflow are clamped to the smallest normal float rather than ``-inf``, so
    that gradients stay finite for states that structural zeros make unreachable.
    """
    shift = log_alpha.max(-1, keepdim=True).values.detach()
    summed = times_trans((log_alpha - shift).exp())
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
    times_trans = _right_multiplier(log_trans.exp())
    joint = log_init + log_emit[..., 0, :]
    step = joint.logsumexp(-1)
    log_alpha = joint - step.unsqueeze(-1)
    log_alphas, steps = [log_alpha], [step]
    for t in range(1, num_frames):
        joint = _log_vecmat(log_alpha, times_trans) + log_emit[..., t, :]
        step = joint.logsumexp(-1)
        real = mask[..., t]
        log_alpha = torch.where(real.unsqueeze(-1), joint - step.unsqueeze(-1), log_alpha)
        log_alphas.append(log_alpha)
        steps.append(step)
    steps = torch.stack(torch.broadcast_tensors(*steps), -1)
    return log_alphas, steps.masked_fill(~mask, 0.0)


def filtered(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward recursion's own results: the filtering distributions
    ``log p(z_t | x_<=t)`` ``(..., T, S)`` (held at a sequence's last real frame through
    its padding) and the increments ``log p(x_t | x_<t)`` ``(..., T)``, zero at padding;
    on the sequential PyTorch path (a stream's chunks, :mod:`trainables.streaming`)."""
    log_alphas, steps = _filter(log_init, log_trans, log_emit, lengths)
    return torch.stack(torch.broadcast_tensors(*log_alphas), -2), steps


def predicted(log_probs: torch.Tensor, log_trans: torch.Tensor) -> torch.Tensor:
    """``log(exp(log_probs) @ exp(log_trans))``: the state distribution ``(..., S)`` one
    step after ``log_probs`` ``(..., S)`` under ``log_trans`` ``(S, S)``."""
    return _log_vecmat(log_probs, _right_multiplier(log_trans.exp()))


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to an input's ``shape``."""
    while grad.dim() > len(shape):
        grad = grad.sum(0)
    for dim, size in enumerate(shape):
        if size == 1 and grad.size(dim) != 1:
            grad = grad.sum(dim, keepdim=True)
    return grad


def _scaled_filter(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The forward recursion in probability space with a normalisation per frame
    (Rabiner's scaling): four tensor ops a frame where the log-space one takes eleven.

    ``alpha_t = (alpha_{t-1} @ A) * b_t / c_t`` with the emissions shifted by their max,
    ``b_t = exp(log_emit_t - max_s log_emit_t)``, and ``c_t`` the sum that normalises, so
    the increment of frame ``t`` is ``log c_t + max_s log_emit_t``. Past a sequence's end
    ``b_t = 1`` and the recursion runs on harmlessly (those alphas are never used).

    :param mask: ``(..., T, 1)`` real frames.
    :returns: ``alphas`` ``(..., T, S)``, the emissions over their scale ``b_t / c_t``
        ``(..., T, S)`` and the increments ``(..., T)``; or ``None`` where some ``c_t``
        falls below ``tiny / eps`` (terms under the smallest normal float would weigh)
        and only the log-space recursion is exact.
    """
    shift = log_emit.max(-1, keepdim=True).values
    emit = torch.where(mask, (log_emit - shift).exp(), 1.0)
    times_trans = _right_multiplier(log_trans.exp())
    frames = emit.unbind(-2)
    joint = log_init.exp() * frames[0]
    alphas, scales = [], []
    for t, frame in enumerate(frames):
        if t:
            joint = times_trans(alphas[-1]) * frame
        scales.append(joint.sum(-1, keepdim=True))
        alphas.append(joint / scales[-1])
    scales = torch.where(mask, torch.stack(torch.broadcast_tensors(*scales), -2), 1.0)
    finfo = torch.finfo(scales.dtype)
    if not bool(scales.min() >= finfo.tiny / finfo.eps):  # also catches NaN
        return None
    steps = torch.where(mask, scales.log() + shift, 0.0).squeeze(-1)
    return torch.stack(torch.broadcast_tensors(*alphas), -2), emit / scales, steps


def _scaled_expectations(
    trans: torch.Tensor,
    alphas: torch.Tensor,
    weighted: torch.Tensor,
    mask: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Smoothed marginals ``(..., T, S)`` (zero at padding) and expected transition
    counts ``(..., S, S)`` from :func:`_scaled_filter`'s ``alphas`` and ``weighted``
    (``b_t / c_t``) by the scaled backward recursion
    ``beta_{t-1} = A @ (b_t / c_t * beta_t)``, three tensor ops a frame; ``None`` where a
    ``beta`` exceeds ``eps / tiny`` (an alpha under the smallest normal float would weigh).
    """
    times_trans_t = _right_multiplier(trans.transpose(-1, -2))
    beta = torch.ones_like(alphas[..., -1, :])
    betas = [beta]
    for frame, real in zip(weighted.unbind(-2)[:0:-1], mask.unbind(-2)[:0:-1]):
        beta = torch.where(real, times_trans_t(frame * beta), beta)
        betas.append(beta)
    betas = torch.stack(betas[::-1], -2)
    finfo = torch.finfo(betas.dtype)
    if not bool(betas.max() <= finfo.eps / finfo.tiny):
        return None
    marginals = alphas * betas * mask
    later = weighted[..., 1:, :] * betas[..., 1:, :] * mask[..., 1:, :]
    return marginals, torch.einsum("...ti,...tj->...ij", alphas[..., :-1, :], later) * trans


def _log_expectations(
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    mask: torch.Tensor,
    log_alphas: torch.Tensor,
    steps: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :func:`_scaled_expectations` computes, in log space from :func:`_filter`'s
    ``log_alphas`` ``(..., T, S)`` and ``steps`` ``(..., T)``: exact at any range."""
    times_trans_t = _right_multiplier(log_trans.exp().transpose(-1, -2))
    # log_beta_t = log p(x_{t+1:} | z_t) - sum of those frames' steps (scaled like alpha)
    log_beta = torch.zeros_like(log_alphas[..., -1, :])
    betas = [log_beta]
    for t in range(log_emit.size(-2) - 1, 0, -1):
        message = log_emit[..., t, :] + log_beta - steps[..., t, None]
        previous = _log_vecmat(message, times_trans_t)
        log_beta = torch.where(mask[..., t, :], previous, log_beta)
        betas.append(log_beta)
    log_betas = torch.stack(betas[::-1], -2)
    marginals = (log_alphas + log_betas).exp() * mask
    # xi_t(i, j) = alpha_{t-1}(i) A(i, j) emit_t(j) beta_t(j) / c_t, summed over real t
    later = (log_emit[..., 1:, :] + log_betas[..., 1:, :] - steps[..., 1:, None]).exp()
    later = later * mask[..., 1:, :]
    counts = torch.einsum("...ti,...tj->...ij", log_alphas[..., :-1, :].exp(), later) * log_trans.exp()
    return marginals, counts


class _ExactLogLikelihood(torch.autograd.Function):
    """``log p(x)`` with a hand-written backward: the expected counts of forward-backward.

    d log p / d log_emit[t, s] is the smoothed marginal of state s at frame t,
    d / d log_init[s] the marginal at the first frame and d / d log_trans[i, j] the
    expected number of i -> j transitions, so the backward pass is one backward
    recursion with no autograd graph over the ``T`` steps of the forward one. Both run in
    scaled probability space (measured 1.7x faster than log space) and fall back to log
    space where the scales leave the floating-point range.
    """

    @staticmethod
    def forward(ctx, log_init, log_trans, log_emit, lengths):
        mask = frame_mask(lengths, log_emit.size(-2)).unsqueeze(-1)
        with torch.no_grad():
            scaled = _scaled_filter(log_init, log_trans, log_emit, mask)
            if scaled is None:
                log_alphas, steps = _filter(log_init, log_trans, log_emit, lengths)
                saved = (torch.stack(log_alphas, -2), steps)
            else:
                alphas, weighted, steps = scaled
                saved = (alphas, weighted)
        ctx.scaled = scaled is not None
        ctx.save_for_backward(log_init, log_trans, log_emit, lengths, mask, *saved)
        return steps.sum(-1)

    @staticmethod
    def backward(ctx, grad_total):
        log_init, log_trans, log_emit, lengths, mask, first, second = ctx.saved_tensors
        expected = _scaled_expectations(log_trans.exp(), first, second, mask) if ctx.scaled else None
        if expected is None:
            if ctx.scaled:
                log_alphas, steps = _filter(log_init, log_trans, log_emit, lengths)
                first, second = torch.stack(log_alphas, -2), steps
            expected = _log_expectations(log_trans, log_emit, mask, first, second)
        return (*_gradients(grad_total, *expected, log_init.shape, log_trans.shape, log_emit.shape), None)


def _gradients(grad_total, marginals, counts, init_shape, trans_shape, emit_shape):
    """The gradients of ``log p(x)`` ``(...)`` with respect to ``log_init``, ``log_trans``
    and ``log_emit``: the marginals of the first frame, the expected counts, the marginals,
    each times ``grad_total`` and summed back to its factor's shape."""
    scale = grad_total.unsqueeze(-1)
    return (
        _sum_to(marginals[..., 0, :] * scale, init_shape),
        _sum_to(counts * scale.unsqueeze(-1), trans_shape),
        _sum_to(marginals * scale.unsqueeze(-1), emit_shape),
    )


class _CompiledLogLikelihood(torch.autograd.Function):
    """``log p(x)`` by :func:`trainables.compiled.forward_backward`: the expected counts
    for the backward pass come from the same compiled pass, when a gradient is needed."""

    @staticmethod
    def forward(ctx, log_init, log_trans, log_emit, lengths):
        backward = any(ctx.needs_input_grad[:3])
        steps, marginals, counts = compiled.forward_backward(log_init, log_trans, log_emit, lengths, backward)
        if backward:
            ctx.save_for_backward(marginals, counts)
            ctx.shapes = log_init.shape, log_trans.shape, log_emit.shape
        return steps.sum(-1)

    @staticmethod
    def backward(ctx, grad_total):
        marginals, counts = ctx.saved_tensors
        return (*_gradients(grad_total, marginals, counts, *ctx.shapes), None)


def _differentiable(*factors: torch.Tensor) -> bool:
    """Whether autograd will ask for a gradient of these factors."""
    return torch.is_grad_enabled() and any(factor.requires_grad for factor in factors)


def log_likelihood_steps(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """Per-frame increments ``log p(x_t | x_<t)`` of the exact log-likelihood.

    :returns: ``(..., T)`` increments, zero at padded frames; their sum over ``T`` is
        ``log p(x_{0:length})``. Differentiable (autograd through the recursion) with
        respect to all three factors.
    """
    chosen = _path(log_emit)
    if chosen == "compiled" and not _differentiable(log_init, log_trans, log_emit):
        return compiled.forward_backward(log_init, log_trans, log_emit, lengths, backward=False)[0]
    if chosen == "scan":
        steps = scan.log_likelihood_steps(log_init, log_trans, log_emit, lengths)
        if steps is not None:
            return steps
    mask = frame_mask(lengths, log_emit.size(-2)).unsqueeze(-1)
    scaled = _scaled_filter(log_init, log_trans, log_emit, mask)
    return scaled[2] if scaled is not None else _filter(log_init, log_trans, log_emit, lengths)[1]


def log_likelihood(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The exact ``log p(x_{0:length})`` ``(...)``, the sum of :func:`log_likelihood_steps`,
    with a hand-written backward pass (expected counts; measured faster than autograd
    through the recursion). Use this for training; the steps for per-frame answers."""
    chosen = _path(log_emit)
    if chosen == "scan":  # autograd through the scan's products
        steps = scan.log_likelihood_steps(log_init, log_trans, log_emit, lengths)
        if steps is not None:
            return steps.sum(-1)
    if chosen != "compiled":
        return _ExactLogLikelihood.apply(log_init, log_trans, log_emit, lengths)
    if not _differentiable(log_init, log_trans, log_emit):  # scoring: no autograd Function to set up
        return compiled.forward_backward(log_init, log_trans, log_emit, lengths, backward=False)[0].sum(-1)
    return _CompiledLogLikelihood.apply(log_init, log_trans, log_emit, lengths)


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
    if _path(log_emit) == "compiled":
        return compiled.forward_backward(log_init, log_trans, log_emit, lengths)[1]
    with torch.enable_grad():  # scan or PyTorch: the gradient of their log-likelihood
        log_emit = log_emit.detach().requires_grad_(True)
        total = log_likelihood(log_init.detach(), log_trans.detach(), log_emit, lengths)
        (marginals,) = torch.autograd.grad(total.sum(), log_emit)
    return marginals


def expected_statistics(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """EM's E-step: the log-likelihood ``(...)``, the smoothed marginals ``(..., T, S)``
    (zero at padding) and the expected transition counts ``(..., S, S)`` of every
    sequence (summed over its frames), by one forward-backward pass.

    On the compiled path the kernel's own; elsewhere the gradient of the log-likelihood
    with respect to ``log_emit`` and ``log_trans`` broadcast to the batch shape (each
    sequence's expected counts are its own derivative).
    """
    batch = torch.broadcast_shapes(log_init.shape[:-1], log_trans.shape[:-2], log_emit.shape[:-2], lengths.shape)
    if _path(log_emit) == "compiled":
        steps, marginals, counts = compiled.forward_backward(log_init, log_trans, log_emit, lengths)
        return steps.sum(-1), marginals, counts
    with torch.enable_grad():
        num_states = log_emit.size(-1)
        log_trans = log_trans.detach().expand(*batch, num_states, num_states).clone().requires_grad_(True)
        log_emit = log_emit.detach().requires_grad_(True)
        total = log_likelihood(log_init.detach(), log_trans, log_emit, lengths)
        counts, marginals = torch.autograd.grad(total.sum(), (log_trans, log_emit))
    return total.detach(), marginals, counts


def viterbi(
    log_init: torch.Tensor,
    log_trans: torch.Tensor,
    log_emit: torch.Tensor,
    lengths: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Most likely state path by max-product dynamic programming.

    :returns: ``states`` ``(..., T)`` int64 with ``-1`` at padded frames, and
        ``log_joint`` ``(...)``, the joint ``log p(z*, x)`` of that path. The scan path
        has no Viterbi of its own (the max-product scan would need a backtrace per
        round): it runs the PyTorch one.
    """
    if _path(log_emit) == "compiled":
        return compiled.viterbi(log_init, log_trans, log_emit, lengths)
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
    """Ancestral samples of the state chain alone, by the inverse CDF of uniforms drawn
    from ``generator``: every path gives the same draws for the same seed (the compiled
    one loops over frames in machine code).

    :param log_init: ``(S,)``.
    :param log_trans: ``(S, S)``.
    :returns: ``(num_sequences, length)`` int64 states.
    """
    uniforms = torch.rand(num_sequences, length, generator=generator, device=log_init.device, dtype=torch.float64)
    cumulative_init, cumulative_trans = log_init.double().exp().cumsum(-1), log_trans.double().exp().cumsum(-1)
    if compiled_on(log_init.device):
        return compiled.sample_states(cumulative_init, cumulative_trans, uniforms)
    state = _inverse_cdf(cumulative_init.expand(num_sequences, -1).contiguous(), uniforms[:, 0])
    states = [state]
    for t in range(1, length):
        state = _inverse_cdf(cumulative_trans[state], uniforms[:, t])
        states.append(state)
    return torch.stack(states, -1)


def _inverse_cdf(cumulative: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """The state whose slice of the cumulative sums ``(N, S)`` holds ``uniforms`` ``(N,)``
    (scaled by the total): a state of probability zero is never drawn."""
    values = (uniforms * cumulative[:, -1]).unsqueeze(-1)
    return torch.searchsorted(cumulative, values, right=True).squeeze(-1).clamp_max(cumulative.size(-1) - 1)
