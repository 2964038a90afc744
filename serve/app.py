"""The Ray Serve deployment: a FastAPI ingress with the routes of DESIGN.md section 6.

The model comes from ``user_config`` (``{"source": "models:/NAME/VERSION" or a checkpoint
directory, "tracking_uri": ...}``): ``reconfigure`` loads it and swaps it in at once, so a
new version goes live in the running replica without failing an in-flight request (each
request keeps the model it started with). ``score`` and ``decode`` are joined across
requests by ``@serve.batch``; every request is validated on its own first, so one bad
request never fails its batch.
"""

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application

from trainables.svi import CHECKPOINT_CONFIG, load_checkpoint

from .registry import load_model_version, parse_model_uri, pin_source
from .scoring import RequestError, compute, merge, parse_inputs
from .scoring import sample as draw_samples

api = FastAPI(
    title="pyrosweep",
    description="Likelihoods, most likely hidden states, posteriors and samples of a served Pyro model.",
)

SEQUENCES_EXAMPLE = {"sequences": [[[0.0, 1.0], [1.0, 1.0]]]}


@api.exception_handler(RequestError)
async def _request_error(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse(status_code=error.status, content={"detail": error.detail})


async def _body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RequestError(400, f"body: malformed JSON ({error})") from None


def load_source(config: dict[str, Any]) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of ``config["source"]`` (a registered version or a checkpoint directory)
    and what ``/v1/model`` says about it."""
    source = config["source"]
    if source.startswith("models:/"):
        name, _, version = parse_model_uri(source)
        return load_model_version(config["tracking_uri"], name, version)
    model = load_checkpoint(source).eval()
    saved = json.loads((Path(source) / CHECKPOINT_CONFIG).read_text())
    info = {"name": Path(source).name, "version": None, "run_id": None, **{k: v for k, v in saved.items() if k != "model"}}
    return model, {**info, "family": model.family, "data_dim": model.data_dim,
                   "hidden_dim": model.hidden_dim, "hyperparameters": model.config}


def _device() -> str:
    return "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"


@serve.deployment(name="pyrosweep", max_ongoing_requests=64)
@serve.ingress(api)
class ModelServer:
    """One replica serving one model version at a time."""

    def __init__(self, max_batch_size: int = 16) -> None:
        self.model: torch.nn.Module | None = None
        self.info: dict[str, Any] = {}
        self._batched.set_max_batch_size(max_batch_size)

    def reconfigure(self, config: dict[str, Any]) -> None:
        model, info = load_source(config)
        model = model.to(_device())
        self.model, self.info = model, {**info, "device": str(next(model.parameters()).device)}

    def _current(self):
        if self.model is None:
            raise RequestError(503, "no model loaded yet")
        return self.model

    @api.get("/healthz")
    def healthz(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "model": self.info.get("name"),
            "version": self.info.get("version"),
            "node_id": ray.get_runtime_context().get_node_id(),
        }

    @api.get("/v1/model")
    def describe(self) -> dict[str, Any]:
        model = self._current()
        parameters = model.get_parameters() if hasattr(model, "get_parameters") else None
        return {
            **self.info,
            "exact": model.exact,
            "parameters": None if parameters is None else {k: v.cpu().tolist() for k, v in parameters.items()},
        }

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.003)
    async def _batched(self, models: list, methods: list[str], inputs: list[list[np.ndarray]]) -> list[dict]:
        """Answer a batch of already validated requests, one ``compute`` per model and method."""
        answers: list[dict | None] = [None] * len(inputs)
        groups: dict[tuple[int, str, int], list[int]] = {}
        for i, (model, method) in enumerate(zip(models, methods)):
            alone = -1 if model.exact else i  # a bound's particles would depend on the batch
            groups.setdefault((id(model), method, alone), []).append(i)
        for indices in groups.values():
            joined = [item for i in indices for item in inputs[i]]
            results = await asyncio.to_thread(compute, models[indices[0]], methods[indices[0]], joined)
            start = 0
            for i in indices:
                answers[i] = merge(results[start : start + len(inputs[i])])
                start += len(inputs[i])
        return answers

    async def _answer_batched(self, method: str, request: Request) -> dict[str, Any]:
        model = self._current()
        inputs = parse_inputs(model, await _body(request))
        return await self._batched(model, method, inputs)

    @api.post("/v1/score", openapi_extra={"requestBody": {"content": {"application/json": {"example": SEQUENCES_EXAMPLE}}}})
    async def score(self, request: Request) -> dict[str, Any]:
        """``log_likelihood`` per sequence (nats), ``per_step`` increments, ``exact``."""
        return await self._answer_batched("score", request)

    @api.post("/v1/decode", openapi_extra={"requestBody": {"content": {"application/json": {"example": SEQUENCES_EXAMPLE}}}})
    async def decode(self, request: Request) -> dict[str, Any]:
        """Viterbi ``states`` and ``log_joint`` per sequence (DMM: ``latents``)."""
        return await self._answer_batched("decode", request)

    @api.post("/v1/posterior", openapi_extra={"requestBody": {"content": {"application/json": {"example": SEQUENCES_EXAMPLE}}}})
    async def posterior(self, request: Request) -> dict[str, Any]:
        """Smoothed state ``marginals`` ``(T, K)`` per sequence (DMM: ``loc``, ``scale``)."""
        model = self._current()
        inputs = parse_inputs(model, await _body(request))
        return merge(await asyncio.to_thread(compute, model, "posterior", inputs))

    @api.post("/v1/sample", openapi_extra={"requestBody": {"content": {"application/json": {"example": {"num_sequences": 2, "length": 16, "seed": 0}}}}})
    async def sample(self, request: Request) -> dict[str, Any]:
        """``num_sequences`` samples of ``length`` frames: ``sequences`` and ``states``."""
        model = self._current()
        body = await _body(request)
        return await asyncio.to_thread(draw_samples, model, body)


class AppArgs(BaseModel):
    """Arguments of :func:`build_app` (validated by Ray Serve before the app is built)."""

    model: str = Field(description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    max_batch_size: int = Field(16, ge=1)


def build_app(args: AppArgs) -> Application:
    """The application for Serve config files and KubeRay's RayService
    (``import_path: serve.app:build_app`` with ``args: {model: ..., tracking_uri: ...}``),
    or ``serve run serve.app:build_app model=models:/NAME@champion``. An alias is pinned
    to its version number when the app is built; replicas and resources come from the
    config's ``deployments`` section (deployment name ``pyrosweep``)."""
    tracking_uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if args.model.startswith("models:/") and not tracking_uri:
        raise ValueError(f"{args.model}: a registry model needs tracking_uri (or $MLFLOW_TRACKING_URI)")
    return ModelServer.options(user_config=pin_source(args.model, tracking_uri)).bind(args.max_batch_size)
