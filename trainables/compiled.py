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

import numba
import numpy as np
import torch

JIT = {"cache": True, "nogil": True}  # no Python objects inside: other threads run meanwhile


@numba.njit(**JIT)
def _row(array, b):
    """Sequence ``b``'s row of ``array``: its own, or the one all sequences share."""
    return array[b if array.shape[0] > 1 else 0]


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
def _forward_backward(log_init, log_trans, log_emit, lengths, backward, steps, marginals, counts):
    """Every sequence ``b``: ``steps`` (B, T); with ``backward`` also ``marginals``
    (B, T, S) and ``counts`` (B, S, S). ``log_init`` (Bi, S) and ``log_trans`` (Bt, S, S)
    have one row for all (Bi or Bt = 1) or one per sequence."""
    B, T, S = log_emit.shape
    finfo = np.finfo(log_emit.dtype)
    tiny, huge = finfo.tiny / finfo.eps, finfo.eps / finfo.tiny
    trans_all = np.exp(log_trans)
    alpha = np.empty((T, S), log_emit.dtype)
    weighted = np.empty((T, S), log_emit.dtype)
    joint = np.empty(S, log_emit.dtype)
    beta = np.empty(S, log_emit.dtype)
    later = np.empty(S, log_emit.dtype)
    for b in range(B):
        init, trans = _row(log_init, b), _row(trans_all, b)
        length = lengths[b]
        exact = True
        for t in range(length):
            shift = log_emit[b, t].max()
            total = 0.0
            for j in range(S):
                emit = math.exp(log_emit[b, t, j] - shift)
                if t == 0:
                    joint[j] = math.exp(init[j]) * emit
                else:
                    acc = 0.0
                    for i in range(S):
                        acc += alpha[t - 1, i] * trans[i, j]
                    joint[j] = acc * emit
                weighted[t, j] = emit
                total += joint[j]
            if not total >= tiny:  # also NaN: only log space is exact
                exact = False
                break
            steps[b, t] = math.log(total) + shift
            for j in range(S):
                alpha[t, j] = joint[j] / total
                weighted[t, j] /= total
        if exact and backward:
            beta[:] = 1.0
            for t in range(length - 1, -1, -1):
                for j in range(S):
                    marginals[b, t, j] = alpha[t, j] * beta[j]
                if t == 0:
                    break
                for j in range(S):
                    later[j] = weighted[t, j] * beta[j]
                for i in range(S):
                    acc = 0.0
                    for j in range(S):
                        counts[b, i, j] += alpha[t - 1, i] * trans[i, j] * later[j]
                        acc += trans[i, j] * later[j]
                    beta[i] = acc
                if not beta.max() <= huge:  # an alpha under the smallest normal float weighs
                    exact = False
                    break
        if not exact:
            _log_forward_backward(init, _row(log_trans, b), log_emit[b], length, backward, steps[b], marginals[b], counts[b])


@numba.njit(**JIT)
def _viterbi(log_init, log_trans, log_emit, lengths, states, log_joint):
    """Most likely paths: ``states`` (B, T) (-1 at padding) and ``log_joint`` (B,)."""
    B, T, S = log_emit.shape
    score = np.empty(S, log_emit.dtype)
    best = np.empty(S, log_emit.dtype)
    pointers = np.empty((T, S), np.int64)
    for b in range(B):
        init, trans = _row(log_init, b), _row(log_trans, b)
        for j in range(S):
            score[j] = init[j] + log_emit[b, 0, j]
        for t in range(1, lengths[b]):
            for j in range(S):
                top, arg = -np.inf, 0
                for i in range(S):
                    value = score[i] + trans[i, j]
                    if value > top:
                        top, arg = value, i
                best[j] = top + log_emit[b, t, j]
                pointers[t, j] = arg
            score[:] = best
        state = 0
        for j in range(1, S):
            if score[j] > score[state]:
                state = j
        log_joint[b] = score[state]
        states[b, :] = -1
        for t in range(lengths[b] - 1, -1, -1):
            states[b, t] = state
            state = pointers[t, state]


def _flat(log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor, lengths: torch.Tensor):
    """The batch shape of the factors and their arrays for the kernels: ``log_init``
    (Bi, S), ``log_trans`` (Bt, S, S), ``log_emit`` (B, T, S), ``lengths`` (B,) int64."""
    batch = torch.broadcast_shapes(log_init.shape[:-1], log_trans.shape[:-2], log_emit.shape[:-2], lengths.shape)
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
    steps = np.zeros((B, T), emit.dtype)
    marginals = np.zeros((B, T, S) if backward else (B, 0, 0), emit.dtype)
    counts = np.zeros((B, S, S) if backward else (B, 0, 0), emit.dtype)
    _forward_backward(init, trans, emit, flat_lengths, backward, steps, marginals, counts)
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
    _viterbi(init, trans, emit, flat_lengths, states, log_joint)
    return torch.from_numpy(states).reshape(*batch, T), torch.from_numpy(log_joint).reshape(batch)
