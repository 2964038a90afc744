"""Problems of a sweep file: a key path and a message each, raised together."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from pydantic_core import PydanticCustomError

#: a key path inside the sweep file (mapping keys and list indices) and what is wrong there
KeyPath = tuple[str | int, ...]
Problem = tuple[KeyPath, str]

PROBLEMS_ERROR = "sweep_problems"
#: TrainConfig fields a sweep file sets elsewhere
SET_ELSEWHERE = {"screen": "restarts.screen", "device": "resources.gpu", "threads": "resources.cpu"}


class SweepFileError(ValueError):
    """A sweep file that cannot be run; ``problems`` holds ``(key path, message)`` pairs
    and the message has one ``FILE: KEY.PATH: message`` line per problem."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = [(format_key_path(path), message) for path, message in problems]
        super().__init__(
            "\n".join(
                f"{source}: {path}: {message}" if path else f"{source}: {message}"
                for path, message in self.problems
            )
        )


def format_key_path(path: Iterable[str | int]) -> str:
    """``("search", "lr", "choice", 2)`` -> ``search.lr.choice[2]``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


def problems_error(problems: list[Problem]) -> PydanticCustomError:
    """One pydantic error carrying several problems below the validated field's path."""
    return PydanticCustomError(
        PROBLEMS_ERROR, "{count} problem(s)", {"count": len(problems), "problems": problems}
    )


def raise_any(problems: list[Problem]) -> None:
    """Raise ``problems`` together, if there are any."""
    if problems:
        raise problems_error(problems)


def unknown(what: str, key: Any, choices: Iterable[str]) -> str:
    """``unknown key (expected one of: a, b); did you mean 'a'?``."""
    choices = sorted(choices)
    message = f"unknown {what} (expected one of: {', '.join(choices)})"
    if key in SET_ELSEWHERE:
        return f"{message}; set it as {SET_ELSEWHERE[key]}"
    close = difflib.get_close_matches(str(key), choices, n=1)
    return f"{message}; did you mean {close[0]!r}?" if close else message
