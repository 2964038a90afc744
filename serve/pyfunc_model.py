"""The MLflow pyfunc of a promoted model ("model from code": ``cluster.promote`` logs
this file with the trial's checkpoint as the artifact ``checkpoint``).

It answers like ``pyrosweep serve`` does, outside Ray, through ``serve.scoring.answer``::

    model = mlflow.pyfunc.load_model("models:/NAME@champion")
    model.predict({"sequences": [[[0, 1, ...], ...]]}, params={"method": "decode"})
    model.predict({"num_sequences": 2, "length": 16, "seed": 0}, params={"method": "sample"})

The input is a request body of the HTTP API (``serve.schemas``, docs/design.md "HTTP";
its key is the model's ``data_kind``: ``sequences``, or ``points`` for a mixture) and the
answer is the route's, checked against the same answer model; ``params["method"]`` is
``score`` (default), ``decode``, ``posterior`` or ``sample``. MLflow's schema enforcement
hands ``predict`` a one-row DataFrame whose columns are the body's keys (nested lists
or, from ``mlflow models serve``'s ``inputs``, numpy arrays); it is turned back into the
body dict. A dict, or a list holding one dict, is taken as the body as it is. Values
MLflow cannot make numbers of (e.g. strings) are refused by its schema enforcement
first, in its own words. Other bad input raises ``MlflowException`` (error code
``INVALID_PARAMETER_VALUE``: HTTP 400 from ``mlflow models serve``) with the scoring
module's ``detail`` as its message, chained to the ``RequestError``.

``mlflow models serve -m models:/NAME@champion --env-manager local`` (with the venv's
``bin`` on ``PATH``: it execs ``uvicorn``) answers ``POST /invocations`` with
``{"predictions": ANSWER}`` for::

    {"dataframe_records": [BODY], "params": {"method": "decode"}}
    {"inputs": BODY, "params": {"method": "score"}}

``inputs`` goes through ``numpy.array``, so it only takes sequences of equal length;
``dataframe_records`` (one record: the body) takes ragged ones.
"""

from __future__ import annotations

import math
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

from serve.schemas import SampleRequest
from serve.errors import RequestError
from serve.scoring import answer
from trainables.models import SequenceModel
from trainables.checkpoint import load_checkpoint

DEFAULT_METHOD = "score"
SAMPLE_FIELDS = tuple(SampleRequest.model_fields)  # num_sequences, length, seed


def signature(key: str) -> ModelSignature:
    """What the pyfunc takes: the body's ``key`` (``sequences`` ``(N, T, D)`` or ``points``
    ``(N, D)``, numbers) and the ``sample`` fields, all optional, so one schema admits every
    method; params: ``method`` (default ``score``). Outputs differ by method: none declared."""
    values: Any = DataType.double
    for _ in range(3 if key == "sequences" else 2):
        values = Array(values)
    fields = [ColSpec(DataType.long, field, required=False) for field in SAMPLE_FIELDS]
    return ModelSignature(
        inputs=Schema([ColSpec(values, key, required=False), *fields]),
        params=ParamSchema([ParamSpec("method", DataType.string, DEFAULT_METHOD)]),
    )


def _plain(value: Any) -> Any:
    """``value`` with numpy arrays and scalars turned into Python lists and numbers."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def _absent(value: Any) -> bool:
    """A cell that stands for a key the body did not have (pandas fills in NaN/None)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def request_body(model_input: Any) -> dict[str, Any]:
    """The JSON body carried by ``model_input``: a dict, a list of one dict, or a one-row
    DataFrame (absent keys dropped); anything else raises ``RequestError``."""
    if isinstance(model_input, pd.DataFrame):
        if len(model_input) != 1:
            raise RequestError(400, f"input: expected one request body (one row), got {len(model_input)} rows")
        row = _plain(model_input.to_dict(orient="records")[0])
        return {key: value for key, value in row.items() if not _absent(value)}
    if isinstance(model_input, list) and len(model_input) == 1:
        model_input = model_input[0]
    if not isinstance(model_input, dict):
        raise RequestError(400, f"input: expected a JSON object (a dict), got {type(model_input).__name__}")
    return _plain(model_input)


class PyroSweepModel(mlflow.pyfunc.PythonModel):
    """A pyrosweep checkpoint answering score / decode / posterior / sample requests."""

    model: SequenceModel

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.model = load_checkpoint(context.artifacts["checkpoint"]).eval()

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The answer to ``params["method"]`` (default ``score``) for the body in
        ``model_input`` (see the module docstring for the forms it takes)."""
        method = (params or {}).get("method", DEFAULT_METHOD)
        try:
            return answer(self.model, method, request_body(model_input))
        except RequestError as error:
            raise MlflowException.invalid_parameter_value(error.detail) from error


mlflow.models.set_model(PyroSweepModel())
