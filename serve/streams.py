"""Streaming filters and forecasts over HTTP, with no state on the server
(docs/design.md, "Streams").

A stream's state between chunks (:class:`trainables.streaming.StreamState`) travels with
the client as a *token*: the state's numbers and the id of the model version that made
it, signed with HMAC-SHA256 under the deployment's key, so a client can neither forge a
state nor carry it to another version (409), and any replica that holds the key answers
any chunk: no sticky sessions. The key is the deployment's (``pyrosweep serve`` draws
one, or reads ``$PYROSWEEP_STREAM_KEY`` so a fleet of servers shares it)..

Token: ``BASE64URL(zlib(header length, JSON header, float64 arrays)) "." BASE64URL(HMAC)``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
import torch
from pydantic import BaseModel, ValidationError

from trainables import streaming
from trainables.models import SequenceModel

from .errors import RequestError
from .monitor import Monitor
from .schemas import MAX_FRAMES, ForecastOptions, FilterOptions
from .scoring import parse_frames

STREAM_KEY_ENV = "PYROSWEEP_STREAM_KEY"
_HEADER = struct.Struct(">I")


def default_stream_key() -> str:
    """The key that signs state tokens: ``$PYROSWEEP_STREAM_KEY`` (the same on every server
    of a fleet), else a new random one (one deployment's replicas share it)."""
    return os.environ.get(STREAM_KEY_ENV) or secrets.token_hex(32)


def model_id(model: SequenceModel, info: dict[str, Any]) -> str:
    """``NAME/VERSION#DIGEST``: the served version and a SHA-256 of its parameters (a
    checkpoint directory has no version; its digest still tells two apart)."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return f"{info.get('name')}/{info.get('version')}#{digest.hexdigest()[:16]}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _options(options: type[BaseModel], body: dict) -> BaseModel:
    """The fields of ``body`` but ``frames`` as ``options``; a 422 that names the field."""
    try:
        return options.model_validate({key: value for key, value in body.items() if key != "frames"})
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(map(str, problem["loc"])) or "body"
        if problem["type"] == "extra_forbidden":
            known = ["frames", *options.model_fields]
            raise RequestError(422, f"{where}: unknown field (this body holds {known})") from None
        raise RequestError(422, f"{where}: {problem['msg'].lower()}, got {problem.get('input')!r:.80}") from None


@dataclass(frozen=True)
class Streams:
    """A served version's streams: its float64 model (None, with the ``problem``, where it
    cannot filter exactly), its id in tokens, the signing key, and the replica's monitor
    (what a filter answers is recorded in it)."""

    model: streaming.HMMFamily | None
    problem: str | None
    model_id: str
    key: bytes
    monitor: Monitor

    @classmethod
    def of(cls, model: SequenceModel, info: dict[str, Any], key: str, monitor: Monitor) -> Streams:
        problem = streaming.streaming_problem(model)
        exact = None if problem else streaming.streaming_model(model)
        return cls(exact, problem, model_id(model, info), key.encode(), monitor)

    # Tokens
    def seal(self, state: streaming.StreamState) -> str:
        """``state`` as a signed token."""
        arrays = (state.log_filtered, state.log_emit, state.context)
        header = orjson.dumps({"model": self.model_id, "frames_seen": state.frames_seen, "lag": state.lag,
                               "rows": len(state.log_filtered), "context": len(state.context)})
        body = b"".join(array.cpu().numpy().astype("<f8").tobytes() for array in arrays)
        payload = zlib.compress(_HEADER.pack(len(header)) + header + body, 1)
        return f"{_b64(payload)}.{_b64(hmac.digest(self.key, payload, 'sha256'))}"

    def unseal(self, token: Any) -> streaming.StreamState:
        """The state a token of this deployment holds, for this model version; 409 for a
        token altered, signed by another key or made by another version."""
        try:
            encoded, signature = token.split(".")
            payload = _unb64(encoded)
            valid = hmac.compare_digest(hmac.digest(self.key, payload, "sha256"), _unb64(signature))
        except ValueError:
            valid = False
        if not valid:
            raise RequestError(409, "state: not a token this server signed (altered, or signed by another "
                               "deployment's key); start the stream again without a state")
        data = zlib.decompress(payload)
        (size,) = _HEADER.unpack_from(data)
        header = orjson.loads(data[_HEADER.size : _HEADER.size + size])
        if header["model"] != self.model_id:
            raise RequestError(409, f"state: the token was made by model {header['model']}; this server serves "
                               f"{self.model_id}: start the stream again without a state")
        values = torch.from_numpy(np.frombuffer(data, dtype="<f8", offset=_HEADER.size + size).copy())
        states, dim, rows = self.model.transition_matrix().shape[-1], self.model.data_dim, header["rows"]
        log_filtered, log_emit, context = values.to(self.model.device).split([rows * states, rows * states, header["context"] * dim])
        return streaming.StreamState(header["frames_seen"], header["lag"], log_filtered.view(rows, states),
                                     log_emit.view(rows, states), context.view(-1, dim))

    # Requests
    def _exact(self) -> streaming.HMMFamily:
        if self.model is None:
            raise RequestError(422, self.problem)
        return self.model

    def _frames(self, frames: Any) -> torch.Tensor:
        """A body's ``frames`` ``(n, D)`` on the stream model's device, float64."""
        if not isinstance(frames, list) or not frames:
            raise RequestError(422, "frames: expected a non-empty list of frames")
        if len(frames) > MAX_FRAMES:
            raise RequestError(413, f"frames: {len(frames)} frames in one request; the limit is {MAX_FRAMES}")
        return torch.from_numpy(parse_frames(frames, "frames", self.model)).to(self.model.device)

    def _stream(self, state: str | None, lag: int | None) -> streaming.StreamState:
        """The stream a body continues: its token's, or a new one of ``lag``."""
        if state is None:
            return streaming.start(self.model, lag or 0)
        stream = self.unseal(state)
        if lag is not None and lag != stream.lag:
            raise RequestError(422, f"lag: this stream's lag is {stream.lag} (its first chunk set it), got {lag}")
        return stream

    def filter(self, body: Any) -> dict[str, Any]:
        """The ``FilterAnswer`` of a ``filter`` body."""
        model = self._exact()
        if not isinstance(body, dict) or "frames" not in body:
            raise RequestError(422 if isinstance(body, dict) else 400, "body: expected a JSON object with 'frames'")
        options = _options(FilterOptions, body)
        frames = self._frames(body["frames"])
        chunk = streaming.filter_chunk(model, frames, self._stream(options.state, options.lag))
        nll = np.where(torch.isnan(frames).all(-1).cpu().numpy(), np.nan, -chunk.per_step.cpu().numpy())
        self.monitor.record(nll)
        pvalues = {"pvalues": self.monitor.pvalues(nll).tolist()} if options.pvalues else {}
        return {
            "filtered": chunk.filtered.tolist(),
            "per_step": chunk.per_step.tolist(),
            "smoothed": chunk.smoothed.tolist(),
            "smoothed_start": chunk.smoothed_start,
            "lag": chunk.state.lag,
            "frames_seen": chunk.state.frames_seen,
            "state": self.seal(chunk.state),
            **pvalues,
        }

    def forecast(self, body: Any) -> dict[str, Any]:
        """The ``ForecastAnswer`` of a ``forecast`` body."""
        model = self._exact()
        if not isinstance(body, dict):
            raise RequestError(400, f"body: expected a JSON object, got {type(body).__name__}")
        options = _options(ForecastOptions, body)
        if options.state is None and body.get("frames") is None:
            raise RequestError(422, "frames: missing (a forecast starts after frames, a stream's state, or both)")
        frames = options.num_samples * options.horizon
        if frames > MAX_FRAMES:
            raise RequestError(413, f"num_samples x horizon = {frames} frames; the limit is {MAX_FRAMES}")
        stream = self._stream(options.state, None)
        if body.get("frames") is not None:
            stream = streaming.filter_chunk(model, self._frames(body["frames"]), stream).state
        result = streaming.forecast(model, stream, options.horizon, options.num_samples, options.seed)
        answer = {"state_probs": result.state_probs.tolist(), "mean": result.mean.tolist(),
                  "mean_exact": result.mean_exact, "frames_seen": stream.frames_seen}
        return answer if result.samples is None else {**answer, "samples": result.samples.tolist()}
