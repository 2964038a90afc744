"""Answers to scoring requests, shared by the Ray Serve deployment and the MLflow pyfunc.

Pure torch on the model's exact engine: no Pyro handlers in the request path (Pyro's
handler stack is a process global and not thread-safe). Bodies are the JSON of
DESIGN.md section 6; every problem raises :class:`RequestError` with an HTTP status and a
``detail`` that says what and where, e.g. ``sequences[3][17]: expected 88 values, got 87``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from trainables.models import SequenceModel

METHODS = ("score", "decode", "posterior", "sample")
MAX_SEQUENCES = 512  # per request
MAX_FRAMES = 200_000  # per request, all sequences together
MAX_SAMPLE_LENGTH = 10_000
SCORE_SEED = 0  # particles of a likelihood bound (DMM) are drawn from this seed per request
BINARY_FAMILIES = frozenset({"hmm", "arhmm", "fhmm", "pfhmm", "hmm2", "nnhmm", "dmm"})


class RequestError(ValueError):
    """A request the model cannot answer: ``status`` (4xx) and a ``detail`` for the caller."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def body_key(model: SequenceModel) -> str:
    """``points`` for mixtures, ``sequences`` for everything else."""
    return "points" if model.family == "gmm" else "sequences"


def _frame(values: Any, where: str, width: int, binary: bool) -> np.ndarray:
    if not isinstance(values, list):
        raise RequestError(422, f"{where}: expected a list of {width} numbers, got {type(values).__name__}")
    if len(values) != width:
        raise RequestError(422, f"{where}: expected {width} values, got {len(values)}")
    for d, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(422, f"{where}[{d}]: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise RequestError(422, f"{where}[{d}]: expected a finite number, got {value}")
        if binary and value not in (0, 1):
            raise RequestError(422, f"{where}[{d}]: expected 0 or 1 for a Bernoulli model, got {value}")
    return np.asarray(values, dtype=np.float64)


def _items(body: Any, key: str, what: str) -> list:
    if not isinstance(body, dict):
        raise RequestError(400, f"body: expected a JSON object with {key!r}, got {type(body).__name__}")
    if key not in body:
        raise RequestError(422, f"{key}: missing (the body needs a list of {what})")
    items = body[key]
    if not isinstance(items, list) or not items:
        raise RequestError(422, f"{key}: expected a non-empty list of {what}")
    if len(items) > MAX_SEQUENCES:
        raise RequestError(413, f"{key}: {len(items)} {what} in one request; the limit is {MAX_SEQUENCES}")
    return items


def parse_inputs(model: SequenceModel, body: Any) -> list[np.ndarray]:
    """The validated inputs of a body: ``(T_i, D)`` arrays (``(D,)`` per point for gmm)."""
    key, width = body_key(model), model.data_dim
    binary = model.family in BINARY_FAMILIES
    if key == "points":
        points = _items(body, key, f"points of {width} values")
        return [_frame(point, f"points[{n}]", width, binary) for n, point in enumerate(points)]
    sequences = _items(body, key, f"sequences of frames of {width} values")
    total = sum(len(s) for s in sequences if isinstance(s, list))
    if total > MAX_FRAMES:
        raise RequestError(413, f"sequences: {total} frames in one request; the limit is {MAX_FRAMES}")
    parsed = []
    for n, sequence in enumerate(sequences):
        if not isinstance(sequence, list) or not sequence:
            raise RequestError(422, f"sequences[{n}]: expected a non-empty list of frames")
        frames = [_frame(frame, f"sequences[{n}][{t}]", width, binary) for t, frame in enumerate(sequence)]
        parsed.append(np.stack(frames))
    return parsed


def _batch(model: SequenceModel, inputs: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Padded ``x`` ``(N, T, D)`` and ``lengths`` ``(N,)`` (or points ``(N, D)``, None)."""
    dtype, device = next(model.parameters()).dtype, next(model.parameters()).device
    if model.family == "gmm":
        return torch.as_tensor(np.stack(inputs), dtype=dtype, device=device), None
    lengths = torch.tensor([len(s) for s in inputs], device=device)
    x = torch.zeros(len(inputs), int(lengths.max()), model.data_dim, dtype=dtype, device=device)
    for n, sequence in enumerate(inputs):
        x[n, : len(sequence)] = torch.as_tensor(sequence, dtype=dtype)
    return x, lengths


def _trim(values: torch.Tensor, lengths: torch.Tensor | None) -> list:
    """Per-item lists, each cut to its sequence's length."""
    rows = values.detach().cpu().tolist()
    return rows if lengths is None else [row[:length] for row, length in zip(rows, lengths.tolist())]


def _score_steps(model: SequenceModel, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Per-step log-likelihood increments; a bound (DMM) draws its particles from a
    generator seeded with ``SCORE_SEED``, so the same request always gets the same answer."""
    if model.exact:
        return model.log_likelihood_steps(x, lengths)
    generator = torch.Generator(device=x.device).manual_seed(SCORE_SEED)
    return model.log_likelihood_steps(x, lengths, generator=generator)


@torch.no_grad()
def compute(model: SequenceModel, method: str, inputs: list[np.ndarray]) -> list[dict[str, Any]]:
    """One answer per input for ``score``, ``decode`` or ``posterior``, computed in a
    single batch (what ``@serve.batch`` joins is answered exactly as one by one, except
    that a bound's particles depend on the batch: the deployment does not join those)."""
    x, lengths = _batch(model, inputs)
    if method == "score":
        steps = _score_steps(model, x, lengths)
        totals = steps.sum(-1).tolist()
        return [
            {"log_likelihood": total, "per_step": per_step, "exact": model.exact}
            for total, per_step in zip(totals, _trim(steps, lengths))
        ]
    if method == "decode":
        states, log_joint = model.decode(x, lengths)
        key = "latents" if model.family == "dmm" else "states"
        return [{key: s, "log_joint": j} for s, j in zip(_trim(states, lengths), log_joint.tolist())]
    if method == "posterior":
        posterior = model.posterior(x, lengths)
        if model.family == "dmm":
            loc, scale = posterior
            return [{"loc": l, "scale": s} for l, s in zip(_trim(loc, lengths), _trim(scale, lengths))]
        return [{"marginals": m} for m in _trim(posterior, lengths)]
    raise RequestError(404, f"unknown method {method!r}; expected one of {list(METHODS)}")


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-item answers as one response: each key becomes a list over items."""
    merged = {key: [answer[key] for answer in answers] for key in answers[0]}
    if "exact" in merged:
        merged["exact"] = merged["exact"][0]
    return merged


def _int_field(body: dict, key: str, low: int, high: int, default: int | None = None) -> int:
    value = body.get(key, default)
    if value is None:
        raise RequestError(422, f"{key}: missing (an integer from {low} to {high})")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(422, f"{key}: expected an integer from {low} to {high}, got {value!r}")
    return value


@torch.no_grad()
def sample(model: SequenceModel, body: Any) -> dict[str, Any]:
    """``{"num_sequences", "length", "seed"}`` -> sampled ``sequences`` and ``states``."""
    if not isinstance(body, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(body).__name__}")
    count = _int_field(body, "num_sequences", 1, MAX_SEQUENCES)
    seed = _int_field(body, "seed", 0, 2**63 - 1, default=0)
    length = None if model.family == "gmm" else _int_field(body, "length", 1, MAX_SAMPLE_LENGTH)
    if length is not None and count * length > MAX_FRAMES:
        raise RequestError(413, f"num_sequences x length = {count * length} frames; the limit is {MAX_FRAMES}")
    x, states = model.sample(count, length, seed=seed)
    return {"sequences": x.cpu().tolist(), "states": states.cpu().tolist()}


def answer(model: SequenceModel, method: str, body: Any) -> dict[str, Any]:
    """The JSON answer to ``method`` (score, decode, posterior, sample) for ``body``."""
    if method == "sample":
        return sample(model, body)
    if method not in METHODS:
        raise RequestError(404, f"unknown method {method!r}; expected one of {list(METHODS)}")
    return merge(compute(model, method, parse_inputs(model, body)))
