"""The HTTP API's request and response models, one per body and answer of every route
(docs/design.md, "HTTP"); ``serve.app`` declares them on its routes, so ``/openapi.json``
and ``/docs`` show every field, and the pyfunc and ``pyrosweep query`` check answers
against the same models.

Request bodies are *described* here but validated by ``serve.scoring`` (a vectorised
numpy check, with messages that say what and where): the limits below are the ones it
enforces. The body key is the model's ``data_kind``: ``sequences`` or ``points``
(``GET /v1/model`` says which). Answers are the contract's named results
(``trainables.models.contract``) with the same field names; values with a time axis are
cut to each sequence's length, per-item values have one entry per sequence (point).
Non-finite numbers in answers are written as ``Infinity`` / ``NaN``, as Python's ``json``
does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel
from pydantic.json_schema import models_json_schema

MAX_SEQUENCES = 512  # sequences (points) per request
MAX_FRAMES = 200_000  # frames per request, all sequences together
MAX_SAMPLE_LENGTH = 10_000
MAX_SEED = 2**63 - 1
MAX_LAG = 100  # frames of fixed-lag smoothing: a state token holds two (lag, S) arrays
MAX_HORIZON = 10_000
MAX_FORECAST_SAMPLES = 1000
METHODS = ("score", "decode", "posterior", "sample")
STREAM_METHODS = ("filter", "forecast")

# a value may be null: missing, integrated out (trainables.models.missing) by a model whose
# GET /v1/model says missing_values: true
Frame = list[float | None]


# Requests
class Request(BaseModel):
    """Base of the request bodies: exactly their fields (any other is a 422)."""

    model_config = ConfigDict(extra="forbid")


PVALUES_DESCRIPTION = "answer each frame's upper-tail p-value against the version's validation frames too"


class SequencesRequest(Request):
    """The body of ``score``, ``decode`` and ``posterior`` for a model of sequences."""

    sequences: list[Annotated[list[Frame], Field(min_length=1)]] = Field(
        min_length=1,
        max_length=MAX_SEQUENCES,
        description=f"N sequences of T_i frames of data_dim numbers (0 or 1 for a binary model; null "
        f"where a value is missing), {MAX_FRAMES} frames in all at most",
        examples=[[[[0.0, 1.0], [1.0, 1.0]]]],
    )
    pvalues: bool = Field(False, description=f"score only: {PVALUES_DESCRIPTION}")


class PointsRequest(Request):
    """The body of ``score``, ``decode`` and ``posterior`` for a model of points (a mixture)."""

    points: list[Frame] = Field(
        min_length=1, max_length=MAX_SEQUENCES, description="N points of data_dim numbers (null where missing)",
        examples=[[[0.0, 1.0]]],
    )
    pvalues: bool = Field(False, description=f"score only: {PVALUES_DESCRIPTION}")


class SampleRequest(Request):
    """The body of ``sample`` (validated by this model, strictly: integers only)."""

    num_sequences: int = Field(ge=1, le=MAX_SEQUENCES, strict=True, description="how many draws")
    length: int | None = Field(
        None, ge=1, le=MAX_SAMPLE_LENGTH, strict=True,
        description=f"frames per sequence: required for a model of sequences, ignored for points; "
        f"num_sequences x length <= {MAX_FRAMES}",
    )  # fmt: skip
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description="the same seed gives the same draws")


INPUT_REQUESTS = (SequencesRequest, PointsRequest)

STATE_FIELD = Field(
    None, description="the `state` token of the stream's previous answer (none: a new stream)"
)


class FilterOptions(Request):
    """The fields of a ``filter`` body besides its ``frames`` (validated by this model)."""

    state: str | None = STATE_FIELD
    lag: int | None = Field(
        None, ge=0, le=MAX_LAG, strict=True,
        description="fixed-lag smoothing: answer p(z[t-lag] | x[<=t]) too; set by a stream's first "
        "chunk, kept by its token",
    )  # fmt: skip
    pvalues: bool = Field(False, strict=True, description=PVALUES_DESCRIPTION)


class FilterRequest(FilterOptions):
    """The body of ``filter``: the next frames of a stream (any replica answers any chunk)."""

    frames: list[Frame] = Field(
        min_length=1, max_length=MAX_FRAMES, description="the stream's next frames of data_dim numbers (null where missing)",
        examples=[[[0.0, 1.0], [1.0, 1.0]]],
    )


class ForecastOptions(Request):
    """The fields of a ``forecast`` body besides its ``frames`` (validated by this model)."""

    state: str | None = STATE_FIELD
    horizon: int = Field(ge=1, le=MAX_HORIZON, strict=True, description="how many frames ahead")
    num_samples: int = Field(
        0, ge=0, le=MAX_FORECAST_SAMPLES, strict=True,
        description=f"sampled continuations to return; num_samples x horizon <= {MAX_FRAMES}",
    )  # fmt: skip
    seed: int = Field(0, ge=0, le=MAX_SEED, strict=True, description="the same seed gives the same draws")


class ForecastRequest(ForecastOptions):
    """The body of ``forecast``: after ``frames`` (a stream's next ones, or a whole sequence),
    after ``state`` (a stream so far), or both."""

    frames: list[Frame] | None = Field(
        None, min_length=1, max_length=MAX_FRAMES, description="frames to filter first (null where missing)"
    )


# Answers
class Answer(BaseModel):
    """Base of the answers: exactly their fields, non-finite numbers as JSON constants."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


class ObservedAnswer(Answer):
    """Base of the answers about given inputs: how much of each was observed."""

    observed_values: list[int] = Field(description="the values of each sequence (point) that were not null (N,)")


class ScoreAnswer(ObservedAnswer):
    log_likelihood: list[float] = Field(description="log p(observed x) per sequence (point), in nats (N,)")
    per_step: list[list[float]] = Field(
        description="per-step increments log p(observed x_t | observed x_<t) (N, T_i), summing to "
        "log_likelihood; one step per point; 0 for a frame of nulls"
    )
    exact: bool = Field(description="false where log_likelihood is a lower bound (an IWAE bound)")
    pvalues: list[list[float]] | None = Field(
        None, description="when asked: each step's upper-tail p-value of its NLL against the version's "
        "validation frames (N, T_i); NaN for a frame of nulls"
    )


class StatePathAnswer(ObservedAnswer):
    """``decode`` of a model with discrete states (components)."""

    states: list[list[int]] | list[int] = Field(description="most likely states (N, T_i), or components (N,)")
    log_joint: list[float] = Field(description="log p(states, x) (N,)")


class LatentPathAnswer(ObservedAnswer):
    """``decode`` of a model with continuous latents."""

    latents: list[list[list[float]]] = Field(description="latent path (N, T_i, Z)")
    log_joint: list[float] = Field(description="log p(x, latents) (N,), a density in the latents")


class MarginalsAnswer(ObservedAnswer):
    """``posterior`` of a model with discrete states (components)."""

    marginals: list[list[list[float]]] | list[list[float]] = Field(
        description="posterior state probabilities (N, T_i, K), or component probabilities (N, K)"
    )


class GaussianPosteriorAnswer(ObservedAnswer):
    """``posterior`` of a model with continuous latents."""

    loc: list[list[list[float]]] = Field(description="per-step Gaussian mean (N, T_i, Z)")
    scale: list[list[list[float]]] = Field(description="per-step standard deviation (N, T_i, Z)")


class DecodeAnswer(RootModel[StatePathAnswer | LatentPathAnswer]):
    """``states`` or ``latents`` (the model's ``latent`` kind says which) and ``log_joint``."""

    model_config = ConfigDict(ser_json_inf_nan="constants")


class PosteriorAnswer(RootModel[MarginalsAnswer | GaussianPosteriorAnswer]):
    """``marginals``, or ``loc`` and ``scale`` (the model's ``latent`` kind says which)."""

    model_config = ConfigDict(ser_json_inf_nan="constants")


class SampleAnswer(Answer):
    sequences: list[list[list[float]]] | list[list[float]] = Field(
        description="draws (num_sequences, length, D), or points (num_sequences, D)"
    )
    states: list[list[int]] | list[int] | list[list[list[float]]] = Field(
        description="their states (num_sequences, length), components (num_sequences,) "
        "or latents (num_sequences, length, Z)"
    )


class FilterAnswer(Answer):
    filtered: list[list[float]] = Field(description="p(z_t | x_<=t) for each new frame (n, K)")
    per_step: list[float] = Field(description="log p(x_t | x_<t) for each new frame (n,), in nats")
    smoothed: list[list[float]] = Field(
        description="p(z[t-lag] | x[<=t]) for each new frame t >= lag (m, K): the marginals of frames "
        "smoothed_start .. smoothed_start + m - 1"
    )
    smoothed_start: int = Field(description="the frame of smoothed[0]")
    lag: int = Field(description="the stream's lag (0: smoothed equals filtered)")
    frames_seen: int = Field(description="frames of the stream so far, these included")
    state: str = Field(description="the token to send with the stream's next chunk (signed; for this model version only)")
    pvalues: list[float] | None = Field(
        None, description="when asked: each new frame's upper-tail p-value of its NLL against the version's "
        "validation frames (n,); NaN for a frame of nulls"
    )


class ForecastAnswer(Answer):
    state_probs: list[list[float]] = Field(description="p(z[t+h] | x[<=t]) for h = 1..horizon (H, K)")
    mean: list[list[float]] = Field(
        description="E[x[t+h] | x[<=t]] (H, D): for binary keys the probability that a key is on"
    )
    mean_exact: bool = Field(
        description="false where the means after the first step are averages of draws (emissions that "
        "read the previous frame: arhmm, nnhmm)"
    )
    samples: list[list[list[float]]] | None = Field(None, description="num_samples continuations (S, H, D), when asked")
    frames_seen: int = Field(description="frames of the stream the forecast starts after")


ANSWERS: dict[str, type[BaseModel]] = {
    "filter": FilterAnswer,
    "forecast": ForecastAnswer,
    "score": ScoreAnswer,
    "decode": DecodeAnswer,
    "posterior": PosteriorAnswer,
    "sample": SampleAnswer,
}


class MonitorAnswer(BaseModel):
    """``GET /v1/monitor``: the answering replica's recent per-step NLL against the
    version's reference (a two-sample Kolmogorov-Smirnov test)."""

    version: str = Field(description="the model version the window belongs to (a swap starts a new window)")
    replica: str = Field(description="the replica that answered: each keeps its own window")
    window: int = Field(description="frames in the window (score and filter answers, nulls aside)")
    window_limit: int
    reference_frames: int = Field(description="validation frames stored at promotion (0: none)")
    recent_mean_nll: float | None
    reference_mean_nll: float | None
    statistic: float | None = Field(description="the KS statistic of window vs reference")
    pvalue: float | None = Field(description="its p-value")
    drifted: bool = Field(description="pvalue below the threshold with a full enough window")


class Health(BaseModel):
    status: Literal["ok"]
    model: str | None = Field(description="the served model's name")
    version: int | None = Field(description="its registry version (none for a checkpoint directory)")
    node_id: str = Field(description="the Ray node of the replica that answered")


class ModelDescription(BaseModel):
    """What ``GET /v1/model`` says (``trainables.checkpoint.describe`` and where the model
    came from); a registered version adds ``metrics`` and ``aliases``, a checkpoint
    directory what was saved with it."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: int | None
    run_id: str | None
    family: str
    data_kind: Literal["sequences", "points"] = Field(description="the key of a request body")
    observation: Literal["binary", "real", "counts", "categorical"]  # trainables.models.contract.Observation (no torch here)
    latent: Literal["states", "components", "continuous"]
    exact: bool
    missing_values: bool = Field(description="whether null values are taken (missing, integrated out exactly)")
    data_dim: int
    hidden_dim: int
    hyperparameters: dict[str, Any]
    device: str
    parameters: dict[str, Any] = Field(description="named parameters as nested lists (none for a neural network)")


class ShadowReport(BaseModel):
    """``GET /v1/shadow``: the challenger against the champion on the score requests mirrored
    to it (``serve.pairing``), per sequence (point) paired; ``difference`` is null until the
    first pair."""

    champion: str = Field(description="the served model, NAME/VERSION (a checkpoint directory's name)")
    challenger: str = Field(description="the shadow model, NAME/VERSION")
    n: int = Field(description="paired sequences (points) so far")
    frames: int = Field(description="their frames (a point is one)")
    difference: float | None = Field(
        description="challenger NLL minus champion NLL per frame, nats: negative = the challenger is better"
    )
    low: float | None = Field(description="the paired bootstrap interval's lower end")
    high: float | None = Field(description="its upper end")
    level: float | None = Field(description="its level (0.95)")
    kinds: str = Field(description="the challenger's score, then the champion's: 'exact vs exact', 'bound vs exact', ...")
    like_for_like: bool = Field(description="false where either score is a bound: then the difference is no NLL difference")
    logged_to: str | None = Field(description="the challenger's registry version whose tags hold the latest logged result")
    pending: int = Field(description="mirrors sent and not yet scored (by the replica that answered)")
    dropped: int = Field(description="sequences not mirrored because too many mirrors were pending")
    failed: int = Field(description="mirrored requests the challenger failed to score (logged)")


class Problem(BaseModel):
    detail: str = Field(description="what is wrong and where, e.g. 'sequences[3][17]: expected 88 values, got 87'")


PROBLEMS: dict[int | str, dict[str, Any]] = {
    400: {"model": Problem, "description": "not a JSON object"},
    413: {"model": Problem, "description": f"too many sequences (> {MAX_SEQUENCES}) or frames (> {MAX_FRAMES})"},
    422: {"model": Problem, "description": "a value the model cannot take (what and where)"},
    503: {"model": Problem, "description": "no model loaded yet"},
}


STREAM_PROBLEMS: dict[int | str, dict[str, Any]] = {
    **PROBLEMS,
    409: {"model": Problem, "description": "a state token this server did not sign, or signed for another model version"},
}


NO_SHADOW: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "the server runs no shadow (--shadow)"}}


def check_answer(method: str, answer: dict[str, Any]) -> dict[str, Any]:
    """``answer`` itself when it fits ``method``'s answer model (else pydantic's
    ``ValidationError``, a ``ValueError``)."""
    ANSWERS[method].model_validate(answer)
    return answer


def write_answer(method: str, answer: dict[str, Any]) -> str:
    """``answer`` validated against ``method``'s answer model and written as JSON by it
    (by the model itself: FastAPI's own writing of a union answer turns non-finite
    numbers into null)."""
    return ANSWERS[method].model_validate(answer).model_dump_json(exclude_unset=True)


def request_body(*models: type[BaseModel]) -> dict[str, Any]:
    """A route's ``openapi_extra`` declaring a JSON body of one of ``models`` (their
    schemas are in :func:`request_components`)."""
    refs = [{"$ref": f"#/components/schemas/{model.__name__}"} for model in models]
    schema = refs[0] if len(refs) == 1 else {"anyOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def request_components() -> dict[str, Any]:
    """The JSON schemas of the request models, for the OpenAPI document's components."""
    models = [(model, "validation") for model in (*INPUT_REQUESTS, SampleRequest, FilterRequest, ForecastRequest)]
    _, schemas = models_json_schema(models, ref_template="#/components/schemas/{model}")
    return schemas["$defs"]
