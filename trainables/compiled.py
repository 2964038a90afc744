"""The exact HMM recursions compiled for the CPU (numba): the loop over frames runs in
machine code, one sequence at a time, instead of several PyTorch ops a frame.

Same factors and results as :mod:`trainables.inference` (its module docstring): batch
dims broadcast, ragged ``lengths``, padding changes nothing. Inputs are broadcast and
flattened to ``B`` sequences; a transition matrix shared by all of them is passed once.
The forward-backward pass runs in scaled probability space (Rabiner's scaling) and,
for a sequence where a scale leaves the floating-point range, again in log space, as
the PyTorch path does. float32 and float64 are compiled apart (``cache=True`` keeps the
machine code between processes); the kernels release the GIL (a Serve replica's event
loop runs while a large request is computed in a worker thread).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch

JIT = {"cache": True, "nogil": True}  # no Python objects inside: other threads run meanwhile


@numba.njit(**JIT)
def _scalar(value, array):
    """``value`` in ``array``'s dtype: a literal such as ``0.0`` is float64 in numba and
    would turn float32 sums into float64 ones (measured 1.4x slower)."""
    return np.full(1, value, array.dtype)[0]


@numba.njit(**JIT)
def _row(array, b):
    """Sequence ``b``'s row of ``array``: its own, or the one all sequences share."""
    return array[0] if array.shape[0] == 1 else array[b]  # (a prange index is unsigned: not unified with 0)


@numba.njit(**JIT)
def _log_forward_backward(log_init, log_trans, log_emit, length, backward, steps, marginals, counts):
    """One sequence in log space: fills ``steps`` (T,) and, with ``backward``,
    ``marginals`` (T, S) and ``counts`` (S, S) of frames ``< length``; exact at any range."""
    S = log_init.shape[0]
    log_alpha = np.empty((length, S), log_emit.dtype)
    joint = np.empty(S, log_emit.dtype)
    for t in range(length):
        for j in range(S):
            if t == 0:
                joint[j] = log_init[j] + log_emit[0, j]
            else:
                top = -np.inf
                for i in range(S):
                    top = max(top, log_alpha[t - 1, i] + log_trans[i, j])
                total = 0.0
                for i in range(S):
                    total += math.exp(log_alpha[t - 1, i] + log_trans[i, j] - top)
                joint[j] = top + math.log(total) + log_emit[t, j] if total > 0 else -np.inf
        top = joint.max()
        if top == -np.inf:  # no state can emit this frame: log p(x) is -inf
            steps[t] = -np.inf
            log_alpha[t, :] = -np.inf
            continue
        total = 0.0
        for j in range(S):
            total += math.exp(joint[j] - top)
        steps[t] = top + math.log(total)
        for j in range(S):
            log_alpha[t, j] = joint[j] - steps[t]
    if not backward:
        return
    counts[:, :] = 0.0
    log_beta = np.zeros(S, log_emit.dtype)
    message = np.empty(S, log_emit.dtype)
    for t in range(length - 1, -1, -1):
        for j in range(S):
            marginals[t, j] = math.exp(log_alpha[t, j] + log_beta[j])
        if t == 0:
            break
        for j in range(S):
            message[j] = log_emit[t, j] + log_beta[j] - steps[t]
        for i in range(S):
            for j in range(S):
                counts[i, j] += math.exp(log_alpha[t - 1, i] + log_trans[i, j] + message[j])
        for i in range(S):
            top = -np.inf
            for j in range(S):
                top = max(top, log_trans[i, j] + message[j])
            total = 0.0
            for j in range(S):
                total += math.exp(log_trans[i, j] + message[j] - top)
            log_beta[i] = top + math.log(total) if total > 0 else -np.inf


@numba.njit(**JIT)
def _shifted(log_emit, lengths, shifted, shift):
    """Each real frame's max over states ``shift`` (B, T) and ``shifted = log_emit - shift``
    (B, T, S), for numpy's vectorised ``exp`` (measured 5x faster than ``math.exp`` in the
    recursion's loop). A frame no state emits has ``shift`` 0 and ``shifted`` -inf;
    padding has both 0."""
    B, T, S = log_emit.shape
    shift[:, :] = 0.0
    shifted[:, :, :] = 0.0
    minus_inf = _scalar(-np.inf, log_emit)
    for b in range(B):
        for t in range(lengths[b]):
            top = minus_inf
            for j in range(S):
                top = max(top, log_emit[b, t, j])
            if top == -np.inf:
                shifted[b, t, :] = -np.inf
                continue
            shift[b, t] = top
            for j in range(S):
                shifted[b, t, j] = log_emit[b, t, j] - top


@numba.njit(**JIT)
def _sequence_forward_backward(b, log_init, log_trans, trans_all, log_emit, emit, lengths, backward, steps, marginals, counts):
    """Sequence ``b``: the per-frame normalisers ``steps[b]`` (T,) and, with ``backward``,
    ``marginals[b]`` (T, S) and ``counts[b]`` (S, S); whether the scaled pass was exact
    (else ``steps[b]`` holds the log-space increments). ``log_init`` (Bi, S), ``log_trans``
    and its probabilities ``trans_all`` (Bt, S, S) have one row for all (Bi or Bt = 1) or
    one per sequence; ``emit`` (B, T, S) is ``exp(log_emit - shift)`` by :func:`_shifted`.

    Loops, not array expressions (those allocate every frame); each state's sum a dot
    product over a contiguous row (``A`` transposed for the forward pass)."""
    T, S = log_emit.shape[1:]
    finfo = np.finfo(log_emit.dtype)
    tiny, huge = finfo.tiny / finfo.eps, finfo.eps / finfo.tiny
    zero, one = _scalar(0.0, log_emit), _scalar(1.0, log_emit)
    init, trans = _row(log_init, b), _row(trans_all, b)
    transposed = np.ascontiguousarray(trans.T)
    frames, length = emit[b], lengths[b]
    alpha = np.empty((T, S), log_emit.dtype)
    exact = True
    for t in range(length):
        total = zero
        for j in range(S):
            if t == 0:
                acc = math.exp(init[j])
            else:
                acc = zero
                for i in range(S):
                    acc += alpha[t - 1, i] * transposed[j, i]
            alpha[t, j] = acc * frames[t, j]
            total += alpha[t, j]
        if not total >= tiny:  # also NaN: only log space is exact
            exact = False
            break
        steps[b, t] = total
        inverse = one / total
        for j in range(S):
            alpha[t, j] *= inverse
    if exact and backward:
        beta, later = np.ones(S, log_emit.dtype), np.empty(S, log_emit.dtype)
        expected = np.zeros((S, S), log_emit.dtype)
        for t in range(length - 1, -1, -1):
            for j in range(S):
                marginals[b, t, j] = alpha[t, j] * beta[j]
            if t == 0:
                break
            inverse = one / steps[b, t]
            for j in range(S):
                later[j] = frames[t, j] * inverse * beta[j]
            top = zero
            for i in range(S):
                for j in range(S):  # apart from the sum below, so that it vectorises
                    expected[i, j] += alpha[t - 1, i] * later[j]
                acc = zero
                for j in range(S):
                    acc += trans[i, j] * later[j]
                beta[i] = acc
                top = max(top, acc)
            if not top <= huge:  # an alpha under the smallest normal float weighs
                exact = False
                break
        for i in range(S):  # xi summed over frames, A factored out of the loop
            for j in range(S):
                counts[b, i, j] = expected[i, j] * trans[i, j]
    if not exact:
        steps[b, length:] = 0.0
        _log_forward_backward(init, _row(log_trans, b), log_emit[b], length, backward, steps[b], marginals[b], counts[b])
    return exact


@numba.njit(**JIT)
def _forward_backward(log_init, log_trans, log_emit, emit, lengths, backward, steps, exact, marginals, counts):
    """:func:`_sequence_forward_backward` of every sequence, one after another; ``exact``
    (B,) says which ones' ``steps`` are normalisers (1 at padding)."""
    trans_all = np.exp(log_trans)
    for b in range(log_emit.shape[0]):
        exact[b] = _sequence_forward_backward(b, log_init, log_trans, trans_all, log_emit, emit, lengths, backward, steps, marginals, counts)


@numba.njit(parallel=True, **JIT)
def _forward_backward_threads(log_init, log_trans, log_emit, emit, lengths, backward, steps, exact, marginals, counts):
    """:func:`_forward_backward` with the sequences shared among numba's threads."""
    trans_all = np.exp(log_trans)
    for b in numba.prange(log_emit.shape[0]):
        exact[b] = _sequence_forward_backward(b, log_init, log_trans, trans_all, log_emit, emit, lengths, backward, steps, marginals, counts)


@numba.njit(**JIT)
def _sequence_viterbi(b, log_init, transposed_all, log_emit, lengths, states, log_joint):
    """Sequence ``b``'s most likely path ``states[b]`` (T,) (-1 at padding) and its
    ``log_joint[b]``; ``transposed_all`` (Bt, S, S) is ``log_trans`` transposed (its
    columns contiguous)."""
    T, S = log_emit.shape[1:]
    init, transposed = _row(log_init, b), _row(transposed_all, b)
    minus_inf = _scalar(-np.inf, log_emit)
    score, best = np.empty(S, log_emit.dtype), np.empty(S, log_emit.dtype)
    pointers = np.empty((T, S), np.int64)
    for j in range(S):
        score[j] = init[j] + log_emit[b, 0, j]
    for t in range(1, lengths[b]):
        for j in range(S):
            top, arg = minus_inf, 0
            for i in range(S):
                value = score[i] + transposed[j, i]
                if value > top:
                    top, arg = value, i
            best[j] = top + log_emit[b, t, j]
            pointers[t, j] = arg
        for j in range(S):
            score[j] = best[j]
    state = 0
    for j in range(1, S):
        if score[j] > score[state]:
            state = j
    log_joint[b] = score[state]
    states[b, :] = -1
    for t in range(lengths[b] - 1, -1, -1):
        states[b, t] = state
        state = pointers[t, state]


@numba.njit(**JIT)
def _viterbi(log_init, log_trans, log_emit, lengths, states, log_joint):
    """Most likely paths: ``states`` (B, T) (-1 at padding) and ``log_joint`` (B,)."""
    transposed_all = np.ascontiguousarray(log_trans.transpose(0, 2, 1))
    for b in range(log_emit.shape[0]):
        _sequence_viterbi(b, log_init, transposed_all, log_emit, lengths, states, log_joint)


@numba.njit(parallel=True, **JIT)
def _viterbi_threads(log_init, log_trans, log_emit, lengths, states, log_joint):
    """:func:`_viterbi` with the sequences shared among numba's threads."""
    transposed_all = np.ascontiguousarray(log_trans.transpose(0, 2, 1))
    for b in numba.prange(log_emit.shape[0]):
        _sequence_viterbi(b, log_init, transposed_all, log_emit, lengths, states, log_joint)


@numba.njit(**JIT)
def _sample_states(cumulative_init, cumulative_trans, uniforms, states):
    """``states`` (N, L) by the inverse CDF of ``uniforms`` (N, L) against the cumulative
    sums of the initial distribution (S,) and of each transition row (S, S)."""
    S = cumulative_init.shape[0]
    for n in range(uniforms.shape[0]):
        state = min(np.searchsorted(cumulative_init, uniforms[n, 0] * cumulative_init[-1], side="right"), S - 1)
        states[n, 0] = state
        for t in range(1, uniforms.shape[1]):
            row = cumulative_trans[state]
            state = min(np.searchsorted(row, uniforms[n, t] * row[-1], side="right"), S - 1)
            states[n, t] = state


_THREADS = threading.Lock()  # numba's default threading layer runs one parallel kernel at a time


@contextmanager
def _threaded(num_sequences: int) -> Iterator[bool]:
    """Whether to run the kernel whose sequences are shared among threads: where torch
    may use more than one thread here (a trial given several CPUs), there are several
    sequences and no other thread of this process runs one now (then: the serial one)."""
    threads = min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
    if threads < 2 or num_sequences < 2 or not _THREADS.acquire(blocking=False):
        yield False
        return
    try:
        numba.set_num_threads(threads)
        yield True
    finally:
        _THREADS.release()


def _flat(log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor, lengths: torch.Tensor):
    """The batch shape of the factors and their arrays for the kernels: ``log_init``
    (Bi, S), ``log_trans`` (Bt, S, S), ``log_emit`` (B, T, S), ``lengths`` (B,) int64."""
    # numpy's broadcast_shapes: measured 10x faster than torch's (20 us, a tenth of a chorale's score)
    batch = np.broadcast_shapes(log_init.shape[:-1], log_trans.shape[:-2], log_emit.shape[:-2], lengths.shape)
    S, T = log_emit.size(-1), log_emit.size(-2)

    def rows(tensor: torch.Tensor, event: tuple[int, ...]) -> np.ndarray:
        if all(size == 1 for size in tensor.shape[: tensor.dim() - len(event)]):
            return tensor.detach().reshape(1, *event).contiguous().numpy()
        return tensor.detach().expand(*batch, *event).reshape(-1, *event).contiguous().numpy()

    emit = log_emit.detach().expand(*batch, T, S).reshape(-1, T, S).contiguous().numpy()
    return batch, rows(log_init, (S,)), rows(log_trans, (S, S)), emit, lengths.expand(batch).reshape(-1).to(torch.int64).numpy()


def forward_backward(log_init, log_trans, log_emit, lengths, backward: bool = True):
    """``steps`` ``(..., T)`` and, with ``backward``, ``marginals`` ``(..., T, S)`` and
    ``counts`` ``(..., S, S)``, as tensors of the factors' dtype (zeros at padding)."""
    batch, init, trans, emit, flat_lengths = _flat(log_init, log_trans, log_emit, lengths)
    B, T, S = emit.shape
    shifted, shift = np.empty_like(emit), np.empty((B, T), emit.dtype)
    _shifted(emit, flat_lengths, shifted, shift)
    np.exp(shifted, out=shifted)
    steps, exact = np.ones((B, T), emit.dtype), np.empty(B, np.bool_)
    marginals = np.zeros((B, T, S) if backward else (B, 0, 0), emit.dtype)
    counts = np.zeros((B, S, S) if backward else (B, 0, 0), emit.dtype)
    with _threaded(B) as threaded:
        kernel = _forward_backward_threads if threaded else _forward_backward
        kernel(init, trans, emit, shifted, flat_lengths, backward, steps, exact, marginals, counts)
    steps[exact] = np.log(steps[exact]) + shift[exact]  # numpy's vectorised log
    steps = torch.from_numpy(steps).reshape(*batch, T)
    if not backward:
        return steps, None, None
    return steps, torch.from_numpy(marginals).reshape(*batch, T, S), torch.from_numpy(counts).reshape(*batch, S, S)


def viterbi(log_init, log_trans, log_emit, lengths) -> tuple[torch.Tensor, torch.Tensor]:
    """``states`` ``(..., T)`` int64 (-1 at padding) and ``log_joint`` ``(...)``."""
    batch, init, trans, emit, flat_lengths = _flat(log_init, log_trans, log_emit, lengths)
    B, T, _ = emit.shape
    states = np.empty((B, T), np.int64)
    log_joint = np.empty(B, emit.dtype)
    with _threaded(B) as threaded:
        (_viterbi_threads if threaded else _viterbi)(init, trans, emit, flat_lengths, states, log_joint)
    return torch.from_numpy(states).reshape(*batch, T), torch.from_numpy(log_joint).reshape(batch)


@numba.njit(**JIT)
def _gaussian(x, means, scales, out):
    """Diagonal Gaussian log-densities ``out`` (Bm, P, S) of frames ``x`` (P, D) under
    ``means`` and ``scales`` (Bm, S, D), with no (P, S, D) intermediate."""
    Bm, S, D = means.shape
    zero = _scalar(0.0, out)
    inverse = _scalar(1.0, scales) / scales  # measured 1.7x faster than dividing in the loop
    norm = -np.log(scales).sum(-1) - 0.5 * D * math.log(2 * math.pi)
    for m in range(Bm):
        for p in range(x.shape[0]):
            for s in range(S):
                acc = zero
                for d in range(D):
                    z = (x[p, d] - means[m, s, d]) * inverse[m, s, d]
                    acc += z * z
                out[m, p, s] = norm[m, s] - 0.5 * acc


@numba.njit(**JIT)
def _gaussian_gradients(x, means, scales, grad, grad_means, grad_scales):
    """The gradients of ``sum(grad * out)`` of :func:`_gaussian` with respect to
    ``means`` and ``scales`` (Bm, S, D), for ``grad`` (Bm, P, S): with ``z = (x - mu) / s``,
    ``d out / d mu = z / s`` and ``d out / d s = (z * z - 1) / s``."""
    Bm, S, D = means.shape
    one = _scalar(1.0, scales)
    inverse = one / scales
    for m in range(Bm):
        for p in range(x.shape[0]):
            for s in range(S):
                weight = grad[m, p, s]
                for d in range(D):
                    z = (x[p, d] - means[m, s, d]) * inverse[m, s, d]
                    grad_means[m, s, d] += weight * z
                    grad_scales[m, s, d] += weight * (z * z - one)
    grad_means *= inverse
    grad_scales *= inverse


@numba.njit(**JIT)
def _deviations(weights, x, means, out):
    """``out`` (R, K, D) += ``sum_p weights[r, p, k] * (x[p, d] - means[r, k, d])^2`` for
    ``weights`` (R, P, K), ``x`` (P, D), ``means`` (R, K, D): EM's weighted squared
    deviations, summed directly (no cancellation) and without a (P, K, D) intermediate."""
    R, P, K = weights.shape
    for r in range(R):
        for p in range(P):
            for k in range(K):
                weight = weights[r, p, k]
                for d in range(x.shape[1]):
                    z = x[p, d] - means[r, k, d]
                    out[r, k, d] += weight * z * z


def weighted_deviations(weights: torch.Tensor, x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    """``(..., K, D)`` float64 ``sum_p weights * (x - means)^2`` for ``weights``
    ``(..., P, K)``, points ``x`` ``(P, D)`` and ``means`` ``(..., K, D)``."""
    batch, (K, D) = means.shape[:-2], means.shape[-2:]
    flat_weights = weights.detach().double().reshape(-1, *weights.shape[-2:]).contiguous().numpy()
    out = np.zeros((flat_weights.shape[0], K, D))
    _deviations(flat_weights, x.detach().double().contiguous().numpy(), means.detach().double().reshape(-1, K, D).contiguous().numpy(), out)
    return torch.from_numpy(out).reshape(*batch, K, D)


class _DiagonalGaussian(torch.autograd.Function):
    """:func:`diagonal_gaussian` with the compiled gradient for ``means`` and ``scales``."""

    @staticmethod
    def forward(ctx, x, means, scales):
        batch, (S, D) = means.shape[:-2], means.shape[-2:]
        points = x.detach().reshape(-1, D).contiguous().numpy()
        flat_means = means.detach().reshape(-1, S, D).contiguous().numpy()
        flat_scales = scales.detach().reshape(-1, S, D).contiguous().numpy()
        out = np.empty((flat_means.shape[0], points.shape[0], S), points.dtype)
        _gaussian(points, flat_means, flat_scales, out)
        ctx.save_for_backward(x, means, scales)
        return torch.from_numpy(out).reshape(*batch, *x.shape[:-1], S)

    @staticmethod
    def backward(ctx, grad):
        x, means, scales = ctx.saved_tensors
        shape = means.shape
        flat_means = means.reshape(-1, *shape[-2:]).contiguous().numpy()
        flat_scales = scales.reshape(-1, *shape[-2:]).contiguous().numpy()
        flat_grad = grad.reshape(flat_means.shape[0], -1, shape[-2]).contiguous().numpy()
        grad_means, grad_scales = np.zeros_like(flat_means), np.zeros_like(flat_scales)
        points = x.reshape(-1, shape[-1]).contiguous().numpy()
        _gaussian_gradients(points, flat_means, flat_scales, flat_grad, grad_means, grad_scales)
        return None, torch.from_numpy(grad_means).reshape(shape), torch.from_numpy(grad_scales).reshape(shape)


def diagonal_gaussian(x: torch.Tensor, means: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Diagonal Gaussian log-density of every frame under every state, differentiable with
    respect to ``means`` and ``scales`` (not ``x``).

    :param x: ``(..., D)`` frames; ``means``, ``scales``: ``(B..., S, D)`` of one shape.
    :returns: ``(B..., ..., S)``.
    """
    return _DiagonalGaussian.apply(x, means, scales)


def sample_states(cumulative_init: torch.Tensor, cumulative_trans: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` int64 states of chains drawn by the inverse CDF of ``uniforms`` ``(N, L)``
    (:func:`trainables.inference.sample_states`)."""
    states = np.empty(uniforms.shape, np.int64)
    _sample_states(cumulative_init.numpy(), cumulative_trans.numpy(), uniforms.numpy(), states)
    return torch.from_numpy(states)
