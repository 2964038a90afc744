"""Reading a sweep file: its YAML (floats such as ``1e-3``, no duplicate keys) and the
command line's overrides on top."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .problems import SweepFileError

OVERRIDABLE = ("num_samples", "max_concurrent")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 ``SafeLoader`` that reads ``1e-3`` as a float (not a string) and refuses
    duplicate keys instead of keeping the last."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key in (key for key, _ in node.value if isinstance(key, yaml.ScalarNode)):
            if key.value in seen:
                problem = f"duplicate key {key.value!r}"
                raise yaml.constructor.ConstructorError(None, None, problem, key.start_mark)
            seen.add(key.value)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def read_yaml(file: Path, source: str) -> dict[str, Any]:
    """The top-level mapping of a sweep file."""
    try:
        raw = yaml.load(file.read_text(), Loader=_Loader)
    except FileNotFoundError:
        raise SweepFileError(source, [((), "no such file")]) from None
    except OSError as error:
        raise SweepFileError(source, [((), f"cannot read: {error.strerror}")]) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise SweepFileError(source, [((), f"invalid YAML{where}: {problem}")]) from None
    if raw is None:
        raise SweepFileError(source, [((), "the file is empty")])
    if not isinstance(raw, dict):
        raise SweepFileError(source, [((), f"expected a mapping of settings, got {type(raw).__name__}")])
    return raw


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None, source: str) -> dict[str, Any]:
    """``raw`` with the command line's settings (those not ``None``) on top."""
    given = {key: value for key, value in (overrides or {}).items() if value is not None}
    unknown = sorted(set(given) - set(OVERRIDABLE))
    if unknown:
        raise SweepFileError(
            source, [((key,), f"cannot be overridden (only: {', '.join(OVERRIDABLE)})") for key in unknown]
        )
    return {**raw, **given}
