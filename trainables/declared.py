"""Settings declared once, as pydantic models: a family's hyperparameters and the
training settings. Every reader takes names, types, defaults, constraints and
descriptions from the declaration: the sweep-file checks, the ``pyrosweep train`` flags,
``/v1/model`` and the MLflow params.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

#: a sweep file's YAML gives typed values: no coercion of "8" to 8 or 1.5 to an int, no inf or nan
STRICT = ConfigDict(strict=True, allow_inf_nan=False)


class Declared(BaseModel):
    """A declaration: unknown names refused, instances immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @classmethod
    def build(cls, owner: str, values: Mapping[str, Any]):
        """An instance of validated ``values``; a bad one raises ``ValueError`` as
        ``OWNER: KEY: problem, got VALUE`` (one ``; ``-separated part per problem)."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as error:
            problems = "; ".join(problem_phrase(e) for e in error.errors())
            raise ValueError(f"{owner}: {problems}") from None

    @classmethod
    def annotation(cls, name: str) -> Any:
        """The type of field ``name`` with its constraints (``Annotated[int, Ge(1)]``)."""
        return constrained(cls.model_fields[name])


def constrained(field: FieldInfo) -> Any:
    """A field's annotation with its constraints and validators attached."""
    return Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation


def problem_phrase(error: Mapping[str, Any]) -> str:
    """``KEY: problem, got VALUE``; a check across keys (no key) is its message alone."""
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    return f"{'.'.join(map(str, error['loc']))}: {error_phrase(error)}"


def error_phrase(error: Mapping[str, Any]) -> str:
    """A pydantic error as a short phrase that shows the offending value."""
    if error["type"] == "extra_forbidden":
        return "unknown name"
    if error["type"] in ("model_type", "dict_type"):
        return f"expected a mapping, got {error['input']!r}"
    message = error["msg"].replace("Input should be", "should be").removeprefix("Value error, ")
    return f"{message}, got {error['input']!r}"


def value_problem(value: Any, annotation: Any) -> str | None:
    """What is wrong with ``value`` as a strict value of ``annotation``, or None."""
    try:
        TypeAdapter(annotation, config=STRICT).validate_python(value)
    except ValidationError as error:
        return error_phrase(error.errors()[0])
    return None


def is_integer(annotation: Any) -> bool:
    """Whether values of ``annotation`` are integers (``int``, ``int | None``, constrained)."""
    if typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation is int or int in typing.get_args(annotation)
