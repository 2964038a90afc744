"""A stream of frames filtered chunk by chunk, and forecasts of the frames to come, exact
for the HMM families (:class:`~trainables.models.hmm_base.HMMFamily`).

Nothing is kept between chunks but a :class:`StreamState`: the filtering distribution at
the last frame (and, for fixed-lag smoothing, those of the last ``lag`` frames with their
emissions), and the last frame where a family's emissions read it. A chunk continues the
forward recursion of :mod:`trainables.inference` from it, so the frames of a sequence sent
in chunks of any sizes get the answers of the whole sequence sent at once; with ``lag``
``L``, frame ``t`` also gets the smoothed marginals ``p(z_{t-L} | x_<=t)`` by a backward
pass over the last ``L`` frames. Run on a float64 model (:func:`streaming_model`): chunks
end where the client cuts them, and float64 makes every cut agree to ~1e-12.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch

from . import inference
from .models import SequenceModel
from .models.hmm_base import HMMFamily

MEAN_DRAWS = 1000  # draws behind a forecast mean that has no closed form (emissions that read the previous frame)


class StreamState(NamedTuple):
    """What a stream carries from one chunk to the next, over the engine's ``S`` states.

    ``frames_seen``; the fixed-lag ``lag`` (0: no smoothing); ``log_filtered`` ``(W, S)``
    the filtering distributions ``log p(z_t | x_<=t)`` and ``log_emit`` ``(W, S)`` the
    emissions of its last ``W = min(frames_seen, max(lag, 1))`` frames; ``context``
    ``(C, D)`` its last ``C = min(frames_seen, emission_context)`` frames."""

    frames_seen: int
    lag: int
    log_filtered: torch.Tensor
    log_emit: torch.Tensor
    context: torch.Tensor


class Chunk(NamedTuple):
    """The answers for a chunk's ``n`` frames, in the user's state space (``K`` states).

    ``filtered`` ``(n, K)`` ``p(z_t | x_<=t)``; ``per_step`` ``(n,)`` ``log p(x_t | x_<t)``;
    ``smoothed`` ``(m, K)`` ``p(z_{t-lag} | x_<=t)`` for the chunk's frames ``t >= lag``,
    of frames ``smoothed_start ..``; ``state`` the stream after the chunk."""

    filtered: torch.Tensor
    per_step: torch.Tensor
    smoothed: torch.Tensor
    smoothed_start: int
    state: StreamState


class Forecast(NamedTuple):
    """``state_probs`` ``(H, K)`` ``p(z_{t+h} | x_<=t)``; ``mean`` ``(H, D)`` ``E[x_{t+h} |
    x_<=t]``, exact where ``mean_exact`` (else the mean of ``MEAN_DRAWS`` draws or of the
    samples); ``samples`` ``(num_samples, H, D)`` continuations, or None."""

    state_probs: torch.Tensor
    mean: torch.Tensor
    mean_exact: bool
    samples: torch.Tensor | None


def streaming_problem(model: SequenceModel) -> str | None:
    """Why ``model`` cannot be filtered exactly frame by frame; None where it can."""
    if model.data_kind != "sequences":
        return f"{model.family}: a model of points, not of sequences: there is no stream to filter"
    if not isinstance(model, HMMFamily):
        return (f"{model.family}: its latents are continuous and its likelihood a bound; streaming filters "
                "and forecasts are exact, for the HMM families only")
    return None


def streaming_model(model: HMMFamily) -> HMMFamily:
    """A float64 copy of ``model`` (same device), in eval mode, for the stream's recursions."""
    return copy.deepcopy(model).double().eval()


def start(model: HMMFamily, lag: int = 0) -> StreamState:
    """The state of a stream before its first frame."""
    empty = torch.zeros(0, model.transition_matrix().shape[-1], dtype=torch.float64, device=model.device)
    return StreamState(0, lag, empty, empty, torch.zeros(0, model.data_dim, dtype=torch.float64, device=model.device))


@torch.no_grad()
def filter_chunk(model: HMMFamily, frames: torch.Tensor, state: StreamState) -> Chunk:
    """Continue the stream ``state`` with ``frames`` ``(n, D)`` (n >= 1, on the model's
    device and dtype, NaN where missing for a family that takes missing values)."""
    params = model.map_values()
    log_init, log_trans = model.chain_factors(params)
    seen = torch.cat([state.context, frames])
    log_emit = model.emission_log_probs(params, seen[None])[0, len(state.context):]  # (n, S)
    first = log_init if state.frames_seen == 0 else inference.predicted(state.log_filtered[-1], log_trans)
    log_filtered, steps = inference.filtered(first, log_trans, log_emit, torch.tensor(len(frames), device=frames.device))
    window_filtered = torch.cat([state.log_filtered, log_filtered])
    window_emit = torch.cat([state.log_emit, log_emit])
    smoothed, smoothed_start = _fixed_lag(window_filtered, window_emit, log_trans, state)
    total = state.frames_seen + len(frames)
    kept, context = min(total, max(state.lag, 1)), min(total, model.emission_context)
    after = StreamState(total, state.lag, window_filtered[len(window_filtered) - kept:],
                        window_emit[len(window_emit) - kept:], seen[len(seen) - context:])
    return Chunk(model.output_marginals(log_filtered.exp()), steps, model.output_marginals(smoothed), smoothed_start, after)


def _fixed_lag(
    log_filtered: torch.Tensor, log_emit: torch.Tensor, log_trans: torch.Tensor, before: StreamState
) -> tuple[torch.Tensor, int]:
    """``p(z_{t-L} | x_<=t)`` ``(m, S)`` for the new frames ``t >= L`` (``L`` the lag) and
    the index of the first one's frame ``t - L``, from the window's filtering distributions
    and emissions ``(W_before + n, S)`` (row 0 is frame ``frames_seen - W_before``) by a
    backward pass over frames ``t - L + 1 .. t``, all ``t`` at once."""
    lag, first_row = before.lag, before.frames_seen - len(before.log_filtered)
    first_frame = max(before.frames_seen, lag)
    rows = torch.arange(min(first_frame - first_row, len(log_filtered)), len(log_filtered), device=log_filtered.device)
    log_beta = torch.zeros(len(rows), log_filtered.size(-1), dtype=log_filtered.dtype, device=log_filtered.device)
    backward = log_trans.transpose(-1, -2)  # log p(z_u = j | z_{u-1} = i), read as [j, i]
    for j in range(lag):  # log p(x_{u..t} | z_{u-1}) from u = t down to t - L + 1
        log_beta = inference.predicted(log_emit[rows - j] + log_beta, backward)
    joint = log_filtered[rows - lag] + log_beta
    return (joint - joint.logsumexp(-1, keepdim=True)).exp(), first_frame - lag


@torch.no_grad()
def forecast(model: HMMFamily, state: StreamState, horizon: int, num_samples: int = 0, seed: int = 0) -> Forecast:
    """The next ``horizon`` frames of a stream (``frames_seen >= 1``): state probabilities
    and means exactly (the means by Monte Carlo after the first step where emissions read
    the previous frame), and ``num_samples`` continuations drawn from ``seed``."""
    params = model.map_values()
    _, log_trans = model.chain_factors(params)
    log_probs = [inference.predicted(state.log_filtered[-1], log_trans)]
    for _ in range(1, horizon):
        log_probs.append(inference.predicted(log_probs[-1], log_trans))
    probs = torch.stack(log_probs).exp()  # (H, S)
    previous = state.context[-1] if model.emission_context else None
    draws = num_samples or (MEAN_DRAWS if previous is not None and horizon > 1 else 0)
    samples = None
    if draws:
        generator = torch.Generator(device=model.device).manual_seed(seed)
        states = inference.sample_states(log_probs[0], log_trans, draws, horizon, generator)
        extra = {} if previous is None else {"previous": previous.expand(draws, -1)}
        samples = model.sample_emissions(params, states, generator, **extra)
    if previous is None:
        mean, exact = probs @ model.emission_means(params), True
    else:  # the first step exactly, given the last frame; later ones from the draws
        first = (probs[0] @ model.emission_means(params, previous))[None]
        mean, exact = (first, True) if horizon == 1 else (torch.cat([first, samples[:, 1:].mean(0)]), False)
    return Forecast(model.output_marginals(probs), mean, exact, samples if num_samples else None)
