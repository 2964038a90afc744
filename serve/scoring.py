"""Answers to requests, shared by the Ray Serve deployment and the MLflow pyfunc.

Pure torch on the model's exact engine: no Pyro handlers in the request path (Pyro's
handler stack is a process global and not thread-safe). Bodies and answers are the
models of :mod:`serve.schemas` (docs/design.md, "HTTP"); what a body must hold comes from
the model's declarations (``data_kind``: the body key, ``data_dim``: values per frame,
``observation``: 0/1, counts, one-hot symbols or any finite number), never from its
family's name. Every problem
raises :class:`RequestError` with an HTTP status and a ``detail`` that says what and
where, e.g. ``sequences[3][17]: expected 88 values, got 87``.
"""

from __future__ import annotations

import math
import reprlib
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import orjson
import torch
from pydantic import ValidationError

from trainables.models import SequenceModel
from trainables.models.contract import MISSING_REFUSED, OBSERVATION_RULES, bad_frames, bad_values
from trainables.models.missing import observed_values

from .errors import RequestError
from .schemas import MAX_FRAMES, MAX_SEQUENCES, METHODS, SampleRequest, check_answer

SCORE_SEED = 0  # particles of a likelihood bound (DMM) are drawn from this seed per request
NUMBERS = frozenset({int, float})  # the types of JSON numbers (bool is not one)
MISSING = frozenset({type(None)})  # JSON null: a missing value, for a model that takes them


class Scores(NamedTuple):
    """``log_likelihood`` ``(N,)`` and its ``per_step`` increments ``(N, T)``."""

    log_likelihood: torch.Tensor
    per_step: torch.Tensor


def read_json(raw: bytes) -> Any:
    """The JSON value of a request body, read by ``orjson`` (4-10x ``json``'s speed);
    anything it cannot read is a 400 that says where: bad syntax or UTF-8, nesting deeper
    than 1,024, a number beyond float64 (``1e400``, a 400-digit integer), ``NaN``."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as error:
        raise RequestError(400, f"body: malformed JSON ({error})") from None


def _shown(value: Any) -> str:
    """``repr(value)``, shortened for a message (long lists, numbers of 400 digits)."""
    return reprlib.repr(value)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _frame(values: Any, where: str, width: int, observation: str, missing: bool) -> np.ndarray:
    """One frame (point) checked value by value: the first bad one says what and where;
    null is a missing value where ``missing`` (the model takes them)."""
    if not isinstance(values, list):
        raise RequestError(422, f"{where}: expected a list of {width} numbers, got {type(values).__name__}")
    if len(values) != width:
        raise RequestError(422, f"{where}: expected {width} values, got {len(values)}")
    for d, value in enumerate(values):
        if value is None:
            if not missing:
                raise RequestError(422, f"{where}[{d}]: null (missing) is {MISSING_REFUSED}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RequestError(422, f"{where}[{d}]: expected a number, got {_shown(value)}")
        if not _finite(value):
            raise RequestError(422, f"{where}[{d}]: expected a finite number, got {_shown(value)}")
        if bad_values(np.array([float(value)]), observation)[0]:
            raise RequestError(422, f"{where}[{d}]: expected {OBSERVATION_RULES[observation]}, got {_shown(value)}")
    frame = np.asarray(values, dtype=np.float64)  # null -> NaN
    if bad_frames(frame, observation):
        if np.isnan(frame).any():
            raise RequestError(422, f"{where}: partly null; a one-hot frame is null whole (missing) or not at all")
        raise RequestError(422, f"{where}: expected one 1 among {width} values (a one-hot symbol), got {frame.sum():g}")
    return frame


def _fast_frames(frames: list, width: int, observation: str, missing: bool) -> np.ndarray | None:
    """``frames`` as a ``(len(frames), width)`` float64 array (NaN for null) when every frame
    is a list of ``width`` finite JSON numbers that ``observation`` allows, or nulls where
    ``missing``, else None; vectorised (the value-by-value check is 4-7x slower on a 76 x 88
    chorale: bench/bench_request_path.py)."""
    try:
        if not set(map(type, chain.from_iterable(frames))) <= (NUMBERS | MISSING if missing else NUMBERS):
            return None
        array = np.asarray(frames, dtype=np.float64)
    except (TypeError, ValueError, OverflowError):  # a frame that is no list, ragged, huge ints
        return None
    if array.ndim != 2 or array.shape[1] != width or np.isinf(array).any():
        return None
    if bad_values(array, observation).any() or bad_frames(array, observation).any():
        return None
    return array


def parse_frames(frames: list, where: str, model: SequenceModel) -> np.ndarray:
    """``frames`` (a list of frames or of points) as a ``(len(frames), data_dim)`` array, or
    the ``RequestError`` of the first bad frame ``where[t]``."""
    declared = model.data_dim, model.observation, model.missing_values
    array = _fast_frames(frames, *declared)
    if array is None:  # something is wrong: find the first bad place
        array = np.stack([_frame(frame, f"{where}[{t}]", *declared) for t, frame in enumerate(frames)])
    return array


def _items(body: Any, key: str, what: str) -> list:
    if not isinstance(body, dict):
        raise RequestError(400, f"body: expected a JSON object with {key!r}, got {type(body).__name__}")
    if key not in body:
        raise RequestError(422, f"{key}: missing (the body needs a list of {what})")
    unknown = next((name for name in body if name != key), None)
    if unknown is not None:
        raise RequestError(422, f"{_shown(unknown)}: unknown field (a body for this model holds only {key!r})")
    items = body[key]
    if not isinstance(items, list) or not items:
        raise RequestError(422, f"{key}: expected a non-empty list of {what}")
    if len(items) > MAX_SEQUENCES:
        raise RequestError(413, f"{key}: {len(items)} {what} in one request; the limit is {MAX_SEQUENCES}")
    return items


def parse_inputs(model: SequenceModel, body: Any) -> list[np.ndarray]:
    """The validated items of a body (``SequencesRequest`` or ``PointsRequest``, by the
    model's ``data_kind``): float64 arrays, ``(T_i, D)`` per sequence or ``(D,)`` per point."""
    key, width = model.data_kind, model.data_dim
    if key == "points":
        return list(parse_frames(_items(body, key, f"points of {width} values"), key, model))
    sequences = _items(body, key, f"sequences of frames of {width} values")
    total = sum(len(s) for s in sequences if isinstance(s, list))
    if total > MAX_FRAMES:
        raise RequestError(413, f"sequences: {total} frames in one request; the limit is {MAX_FRAMES}")
    parsed = []
    for n, sequence in enumerate(sequences):
        if not isinstance(sequence, list) or not sequence:
            raise RequestError(422, f"sequences[{n}]: expected a non-empty list of frames")
        parsed.append(parse_frames(sequence, f"sequences[{n}]", model))
    return parsed


def _batch(model: SequenceModel, items: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Points ``(D,)`` as ``x`` ``(N, D)`` with no lengths; sequences ``(T_i, D)`` zero-padded
    to ``x`` ``(N, T, D)`` with ``lengths`` ``(N,)``; on the model's dtype and device."""
    dtype, device = next(model.parameters()).dtype, model.device
    if model.data_kind == "points":
        return torch.from_numpy(np.stack(items)).to(device=device, dtype=dtype), None
    lengths = [len(item) for item in items]
    padded = np.zeros((len(items), max(lengths), model.data_dim))
    for n, item in enumerate(items):
        padded[n, : len(item)] = item
    return torch.from_numpy(padded).to(device=device, dtype=dtype), torch.tensor(lengths, device=device)


def _rows(values: torch.Tensor, lengths: list[int] | None) -> list:
    """``values`` as one list per item; a time axis (``(N, T, ...)`` of sequences) is cut
    to each item's length, per-item values ``(N,)`` stay as they are."""
    rows = values.tolist()
    if lengths is None or values.dim() < 2:
        return rows
    return [row[:length] for row, length in zip(rows, lengths)]


def _fields(result: NamedTuple, lengths: list[int] | None) -> dict[str, list]:
    """A contract result as JSON fields: each field name -> its list over items."""
    return {name: _rows(value, lengths) for name, value in result._asdict().items()}


def scores(model: SequenceModel, x: torch.Tensor, lengths: torch.Tensor | None) -> Scores:
    """Per-step log-likelihood increments and their sums; a bound (``exact`` False) draws its
    particles from a generator seeded with ``SCORE_SEED``, so the same request always gets
    the same answer."""
    if model.exact:
        steps = model.log_likelihood_steps(x, lengths)
    else:
        generator = torch.Generator(device=x.device).manual_seed(SCORE_SEED)
        steps = model.log_likelihood_steps(x, lengths, generator=generator)
    return Scores(steps.sum(-1), steps)


@torch.no_grad()
def compute(model: SequenceModel, method: str, items: list[np.ndarray]) -> dict[str, list]:
    """The per-item fields of the answer to ``score``, ``decode`` or ``posterior`` for
    ``items`` (of :func:`parse_inputs`), each a list over items, computed in one batch
    (what ``@serve.batch`` joins is answered exactly as one by one, except that a bound's
    particles depend on the batch: the deployment does not join those)."""
    x, lengths = _batch(model, items)
    if method == "score":
        result = scores(model, x, lengths)
    elif method == "decode":
        result = model.decode(x, lengths)
    elif method == "posterior":
        result = model.posterior(x, lengths)
    else:
        raise RequestError(404, f"unknown method {method!r}; expected one of {list(METHODS)}")
    return {**_fields(result, None if lengths is None else lengths.tolist()),
            "observed_values": observed_values(x, lengths).tolist()}


def complete(model: SequenceModel, method: str, fields: dict[str, list]) -> dict[str, Any]:
    """The answer of ``method`` from its per-item ``fields``: a score says whether it is ``exact``."""
    return {**fields, "exact": model.exact} if method == "score" else fields


def sample_request(model: SequenceModel, body: Any) -> SampleRequest:
    """``body`` as a :class:`SampleRequest` for ``model``: ``length`` is required for
    sequences, and ``num_sequences x length`` frames may not pass ``MAX_FRAMES`` (413)."""
    if not isinstance(body, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(body).__name__}")
    try:
        request = SampleRequest.model_validate(body)
    except ValidationError as error:
        problem = error.errors()[0]
        if problem["type"] == "extra_forbidden":
            known = list(SampleRequest.model_fields)
            raise RequestError(422, f"{_shown(problem['loc'][0])}: unknown field (a sample body holds {known})") from None
        raise RequestError(422, _integer_problem(problem["loc"][0], body)) from None
    if model.data_kind == "sequences":
        if request.length is None:
            raise RequestError(422, _integer_problem("length", body))
        frames = request.num_sequences * request.length
        if frames > MAX_FRAMES:
            raise RequestError(413, f"num_sequences x length = {frames} frames; the limit is {MAX_FRAMES}")
    return request


def _integer_problem(name: str, body: dict) -> str:
    """What is wrong with the integer field ``name`` of a sample body, with its bounds."""
    bounds = {type(rule).__name__: rule for rule in SampleRequest.model_fields[name].metadata}
    expected = f"an integer from {bounds['Ge'].ge} to {bounds['Le'].le}"
    if body.get(name) is None:
        return f"{name}: missing ({expected})"
    return f"{name}: expected {expected}, got {_shown(body[name])}"


@torch.no_grad()
def sample(model: SequenceModel, request: SampleRequest) -> dict[str, Any]:
    """The ``SampleAnswer`` of a :func:`sample_request`: ``sequences`` and ``states``."""
    length = request.length if model.data_kind == "sequences" else None
    return _fields(model.sample(request.num_sequences, length, seed=request.seed), None)


def answer(model: SequenceModel, method: str, body: Any) -> dict[str, Any]:
    """The answer to ``method`` (score, decode, posterior, sample) for ``body``, checked
    against its model in :data:`serve.schemas.ANSWERS`."""
    if method == "sample":
        return check_answer(method, sample(model, sample_request(model, body)))
    if method not in METHODS:
        raise RequestError(404, f"unknown method {method!r}; expected one of {list(METHODS)}")
    return check_answer(method, complete(model, method, compute(model, method, parse_inputs(model, body))))
