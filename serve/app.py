"""The Ray Serve deployment: a FastAPI ingress with the routes of docs/design.md ("HTTP").

Every route declares its body and answer with the models of :mod:`serve.schemas`, so
``/openapi.json`` and ``/docs`` show them. Bodies are read by :mod:`serve.scoring` (one
vectorised check, with messages that say what and where), not by FastAPI: their schemas
enter the OpenAPI document as components (``_openapi``). Answers are validated against
their models and written by them (``serve.schemas.write_answer``).

The model comes from ``user_config`` (``{"source": "models:/NAME/VERSION" or a checkpoint
directory, "tracking_uri": ...}``): ``reconfigure`` loads it and swaps it in at once, so a
new version goes live in the running replica without failing an in-flight request (each
request keeps the model it started with, and every model answer names it in the header
``x-pyrosweep-model``: NAME/VERSION, or the checkpoint directory's name). ``score`` and
``decode`` requests of up to ``BATCH_FRAMES`` frames are joined across requests by
``@serve.batch`` (no wait when the queue is empty); every request is validated on its
own first, so one bad request never fails its batch. A batched answer equals the answer
alone within float32 rounding, not to the last bit (a batch's matrix products take other
kernels than one sequence's): per-step and total log-likelihoods within ``4 eps`` of the
sequence's ``sum |per_step|`` (measured: 1.1 eps at most), and the same decoded states.
``posterior`` is never batched.

What a request may be (headers, body bytes, the time to send a body) is
:mod:`serve.limits`. Bodies of more than ``INLINE_BYTES`` are parsed, and requests of more
than ``BATCH_FRAMES`` frames computed and written, in a worker thread, so a large request
holds a small one no longer than the small one's own work (the GIL is shared in turns).

With ``--shadow`` the score route also mirrors what it answered to the challenger's
deployment (:mod:`serve.mirror`, :mod:`serve.shadow`) without waiting for it, and
``GET /v1/shadow`` reports the paired comparison.
"""

import asyncio
import os
from functools import cached_property, partial
from typing import Any, Callable

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from .errors import RequestError
from .limits import BodyLimits, HeaderGuard, read_body
from .mirror import Mirror
from .monitor import Measured, Monitor, pvalues_flag
from .registry import pin_source
from .schemas import (
    INPUT_REQUESTS,
    NO_SHADOW,
    PROBLEMS,
    STREAM_PROBLEMS,
    DecodeAnswer,
    FilterAnswer,
    FilterRequest,
    ForecastAnswer,
    ForecastRequest,
    Health,
    ModelDescription,
    MonitorAnswer,
    PosteriorAnswer,
    SampleAnswer,
    SampleRequest,
    ScoreAnswer,
    ShadowReport,
    request_body,
    request_components,
    write_answer,
)
from .scoring import complete, compute, parse_inputs, read_json, sample_request
from .source import actor_device, load_source, served_as, source_reference
from .scoring import sample as draw_samples
from .streams import Streams, default_stream_key

MAX_ONGOING_REQUESTS = 1024  # per replica: a slow body waits here as a cheap coroutine
BATCH_WAIT_S = 0.0  # a batch takes what has queued while the previous one ran, never waits
BATCH_FRAMES = 4096  # a larger request is computed alone: in a batch it would hold the small ones
INLINE_BYTES = 256 * 1024  # a smaller body is parsed on the event loop (a thread hop costs more)
INLINE_FRAMES = 512  # a smaller batch is computed on the event loop (a few ms at most)
MODEL_HEADER = "x-pyrosweep-model"  # the model that answered: NAME/VERSION or a checkpoint's name
REPLICA_HEADER = "x-pyrosweep-replica"  # the replica that answered a stream's chunk

api = FastAPI(
    title="pyrosweep",
    description="Likelihoods, most likely hidden states, posteriors and samples of a served Pyro model. "
    "Bodies of score, decode and posterior hold `sequences` or `points`: the model's `data_kind` "
    "(GET /v1/model) says which.",
    redirect_slashes=False,  # Starlette would redirect /healthz/ to a Location built from the client's Host
)
api.add_middleware(HeaderGuard)
api.add_middleware(Measured)  # outermost: what the guard refuses is counted too
INPUTS = request_body(*INPUT_REQUESTS)


def _openapi() -> dict[str, Any]:
    """FastAPI's OpenAPI document with the request models added to its components (the
    routes refer to them: FastAPI does not see bodies it does not parse)."""
    if api.openapi_schema is None:
        document = FastAPI.openapi(api)
        document.setdefault("components", {}).setdefault("schemas", {}).update(request_components())
    return api.openapi_schema


api.openapi = _openapi


def _frames(model: torch.nn.Module, inputs: list[np.ndarray]) -> int:
    """The frames of a request's ``inputs`` (a point is one)."""
    return sum(map(len, inputs)) if model.data_kind == "sequences" else len(inputs)


def _json(text: str, model: torch.nn.Module) -> Response:
    """A JSON answer already written (by ``serve.schemas.write_answer``: the answer model
    its route declares) by ``model``, named in the ``MODEL_HEADER``."""
    return Response(text, media_type="application/json", headers={MODEL_HEADER: model.served_as})


def _score_inputs(model: torch.nn.Module, body: Any) -> tuple[list[np.ndarray], bool]:
    """A score body's items and whether it asks for p-values."""
    body, pvalues = pvalues_flag(body)
    return parse_inputs(model, body), pvalues


def _monitored(monitor: Monitor, method: str, answer: dict[str, Any], inputs: list[np.ndarray], pvalues: bool) -> dict[str, Any]:
    """A score ``answer`` recorded in the replica's ``monitor`` (per-step NLL; NaN for a
    frame of nulls), with each step's p-value when asked; other answers as they are."""
    if method != "score":
        return answer
    nll = [-np.asarray(steps, dtype=np.float64) for steps in answer["per_step"]]
    for values, item in zip(nll, inputs):
        values[np.isnan(item.reshape(len(values), -1)).all(-1)] = np.nan
    monitor.record(np.concatenate(nll))
    return {**answer, "pvalues": [monitor.pvalues(values).tolist() for values in nll]} if pvalues else answer


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"detail": error.detail})


@serve.deployment(name="pyrosweep", max_ongoing_requests=MAX_ONGOING_REQUESTS)
@serve.ingress(api)
class ModelServer:
    """One replica serving one model version at a time; ``body_limits`` are the fields of
    :class:`serve.limits.BodyLimits`; ``stream_key`` signs stream state tokens
    (:mod:`serve.streams`: every replica of a deployment gets the same); ``shadow``, the
    handle of a :class:`serve.shadow.ShadowScorer` to mirror ``shadow_fraction`` of score
    requests to."""

    def __init__(
        self,
        max_batch_size: int = 16,
        body_limits: dict[str, Any] | None = None,
        stream_key: str = "",
        shadow: Any = None,
        shadow_fraction: float = 1.0,
    ) -> None:
        self.model: torch.nn.Module | None = None
        self.info: dict[str, Any] = {}
        self.streams: Streams | None = None
        self.monitor: Monitor | None = None
        self.body_limits = BodyLimits.model_validate(body_limits or {})
        self.stream_key = stream_key or default_stream_key()
        self._batched.set_max_batch_size(max_batch_size)
        self.mirror = None if shadow is None else Mirror(shadow, shadow_fraction)

    def reconfigure(self, config: dict[str, Any]) -> None:
        model, info = load_source(config)
        model = model.to(actor_device())
        model.served_as = served_as(info)  # read by each request from the model it started with
        info = {**info, "device": str(next(model.parameters()).device)}
        monitor = Monitor(source_reference(config), model.served_as)
        streams = Streams.of(model, info, self.stream_key, monitor)
        self.model, self.info, self.monitor, self.streams = model, info, monitor, streams

    def _current(self):
        if self.model is None:
            raise RequestError(503, "no model loaded yet")
        return self.model

    @api.get("/healthz", response_model=Health)
    def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.info.get("name"),
            "version": self.info.get("version"),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    @api.get("/v1/model", response_model=ModelDescription, responses={503: PROBLEMS[503]})
    def describe(self) -> dict[str, Any]:
        """The model's family, declared kinds, dimensions, hyperparameters and parameters."""
        model = self._current()
        parameters = {name: value.cpu().tolist() for name, value in model.get_parameters().items()}
        return {**self.info, "parameters": parameters}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, models: list, methods: list[str], inputs: list[list[np.ndarray]]) -> list[dict]:
        """Answer a batch of already validated requests, one ``compute`` per model and method."""
        answers: list[dict | None] = [None] * len(inputs)
        groups: dict[tuple[int, str, int], list[int]] = {}
        for i, (model, method) in enumerate(zip(models, methods)):
            alone = -1 if model.exact else i  # a bound's particles would depend on the batch
            groups.setdefault((id(model), method, alone), []).append(i)
        for indices in groups.values():
            model, method = models[indices[0]], methods[indices[0]]
            joined = [item for i in indices for item in inputs[i]]
            inline = _frames(model, joined) <= INLINE_FRAMES  # a thread hop would cost more than it saves
            fields = compute(model, method, joined) if inline else await asyncio.to_thread(compute, model, method, joined)
            start = 0
            for i in indices:
                stop = start + len(inputs[i])
                answers[i] = complete(model, method, {key: values[start:stop] for key, values in fields.items()})
                start = stop
        return answers

    async def _read(self, model: torch.nn.Module, request: Request, parse: Callable[[Any], Any]) -> Any:
        """``parse`` of the JSON value of ``request``'s body (read within the limits of
        :mod:`serve.limits`), in a worker thread for a body of more than ``INLINE_BYTES``."""
        max_bytes = self.body_limits.bytes_for(model.data_dim, model.observation)
        raw = await read_body(request, max_bytes, self.body_limits.timeout_s)
        if len(raw) <= INLINE_BYTES:
            return parse(read_json(raw))
        return await asyncio.to_thread(lambda: parse(read_json(raw)))

    async def _answer(self, method: str, request: Request, batched: bool) -> Response:
        model, monitor = self._current(), self.monitor
        if method == "score":  # the only one of the three that takes "pvalues"
            inputs, pvalues = await self._read(model, request, partial(_score_inputs, model))
        else:
            inputs, pvalues = await self._read(model, request, partial(parse_inputs, model)), False
        if batched and _frames(model, inputs) <= BATCH_FRAMES:
            answer = await self._batched(model, method, inputs)
            text = write_answer(method, _monitored(monitor, method, answer, inputs, pvalues))
        else:
            answer = await asyncio.to_thread(lambda: complete(model, method, compute(model, method, inputs)))
            text = await asyncio.to_thread(lambda: write_answer(method, _monitored(monitor, method, answer, inputs, pvalues)))
        if method == "score" and self.mirror is not None:
            self.mirror.offer(model, inputs, answer["log_likelihood"])  # not awaited: the caller never waits for it
        return _json(text, model)

    @api.post("/v1/score", response_model=ScoreAnswer, responses=PROBLEMS, openapi_extra=INPUTS)
    async def score(self, request: Request) -> Response:
        """``log_likelihood`` per sequence (nats), ``per_step`` increments, ``exact``."""
        return await self._answer("score", request, batched=True)

    @api.post("/v1/decode", response_model=DecodeAnswer, responses=PROBLEMS, openapi_extra=INPUTS)
    async def decode(self, request: Request) -> Response:
        """Most likely ``states`` (Viterbi; components for points) or ``latents``, and ``log_joint``."""
        return await self._answer("decode", request, batched=True)

    @api.post("/v1/posterior", response_model=PosteriorAnswer, responses=PROBLEMS, openapi_extra=INPUTS)
    async def posterior(self, request: Request) -> Response:
        """Smoothed state ``marginals`` per sequence, or the latents' ``loc`` and ``scale``."""
        return await self._answer("posterior", request, batched=False)

    @api.post("/v1/sample", response_model=SampleAnswer, responses=PROBLEMS, openapi_extra=request_body(SampleRequest))
    async def sample(self, request: Request) -> Response:
        """``num_sequences`` draws of ``length`` frames: ``sequences`` and ``states``."""
        model = self._current()
        body = await self._read(model, request, partial(sample_request, model))
        return _json(await asyncio.to_thread(lambda: write_answer("sample", draw_samples(model, body))), model)

    @api.get("/v1/shadow", response_model=ShadowReport, responses={**NO_SHADOW, 503: PROBLEMS[503]})
    async def shadow(self) -> dict[str, Any]:
        """Shadow traffic (``--shadow``): the challenger's NLL per frame minus the champion's on
        the mirrored sequences (negative: the challenger is better), its 95% paired-bootstrap
        interval and ``n``."""
        model = self._current()
        if self.mirror is None:
            raise RequestError(404, "no shadow traffic: start pyrosweep serve with --shadow models:/NAME@challenger")
        return await self.mirror.report(model)

    async def _streamed(self, method: str, request: Request) -> Response:
        model, streams = self._current(), self.streams
        body = await self._read(model, request, lambda body: body)
        text = await asyncio.to_thread(lambda: write_answer(method, getattr(streams, method)(body)))
        response = _json(text, model)
        response.headers[REPLICA_HEADER] = self.replica
        return response

    @cached_property
    def replica(self) -> str:
        """This replica's id in Serve (a stream's chunks may be answered by any)."""
        return serve.get_replica_context().replica_id.unique_id

    @api.get("/v1/monitor", response_model=MonitorAnswer, responses={503: PROBLEMS[503]})
    def monitor_report(self) -> dict[str, Any]:
        """This replica's recent per-step NLL against the version's validation frames, and
        whether it ``drifted``."""
        self._current()
        return {**self.monitor.report(), "replica": self.replica}

    @api.post("/v1/filter", response_model=FilterAnswer, responses=STREAM_PROBLEMS, openapi_extra=request_body(FilterRequest))
    async def filter(self, request: Request) -> Response:
        """A stream's next ``frames``: ``filtered`` p(z_t | x_<=t), ``per_step``, fixed-lag
        ``smoothed`` marginals and the ``state`` token for its next chunk (exact HMMs)."""
        return await self._streamed("filter", request)

    @api.post("/v1/forecast", response_model=ForecastAnswer, responses=STREAM_PROBLEMS, openapi_extra=request_body(ForecastRequest))
    async def forecast(self, request: Request) -> Response:
        """The next ``horizon`` frames after ``frames`` and/or a stream's ``state``:
        ``state_probs``, ``mean`` and, when asked, sampled continuations (exact HMMs)."""
        return await self._streamed("forecast", request)


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (validated by Ray Serve before the app is built)."""

    model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    max_batch_size: int = Field(16, ge=1)
    body_limits: BodyLimits = Field(default_factory=BodyLimits)
    stream_key: str | None = Field(None, description="key of stream state tokens (default: $PYROSWEEP_STREAM_KEY, else a new one)")


def build_app(args: AppArgs) -> Application:
    """The application for Serve config files and KubeRay's RayService
    (``import_path: serve.app:build_app`` with ``args: {model: ..., tracking_uri: ...}``),
    or ``serve run serve.app:build_app model=models:/NAME@champion``. An alias is pinned
    to its version number when the app is built; replicas and resources come from the
    config's ``deployments`` section (deployment name ``pyrosweep``)."""
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.model.startswith("models:/") and not tracking_uri:
        raise ValueError(f"{args.model}: a registry model needs tracking_uri (or $MLFLOW_TRACKING_URI)")
    user_config = pin_source(args.model, tracking_uri)
    bound = (args.max_batch_size, args.body_limits.model_dump(), args.stream_key or default_stream_key())
    return ModelServer.options(user_config=user_config).bind(*bound)
