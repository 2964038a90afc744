"""``pyrosweep serve --follow-alias``: watch the registry and ask the server to swap when
the served alias points to another version.

A thread resolves ``models:/NAME@ALIAS`` every ``poll_s`` seconds; when the version
differs from the one served it hands the new ``user_config`` over and sets the server's
swap event, the same one SIGHUP sets (``cluster.serving.run_server`` swaps in its own
loop, so a swap never runs twice at once). A registry that cannot be reached, or an
alias that is gone, is said on stderr and asked again at the next poll: the server keeps
serving what it serves.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from serve.registry import parse_model_uri, pin_source


def check_followable(model: str) -> None:
    """Refuse ``--follow-alias`` for anything but ``models:/NAME@ALIAS``."""
    try:
        _, alias, _ = parse_model_uri(model)
    except ValueError:
        alias = None
    if alias is None:
        raise ValueError(
            f"--follow-alias follows a registry alias: expected --model models:/NAME@ALIAS "
            f"(e.g. models:/jsb-hmm@champion), got {model!r}, which never moves"
        )


class AliasFollower(threading.Thread):
    """Polls ``model``'s alias; ``served`` is the source being served (``models:/NAME/V``)."""

    def __init__(self, model: str, tracking_uri: str, served: str, poll_s: float, moved: threading.Event) -> None:
        super().__init__(name="follow-alias", daemon=True)
        self.model, self.tracking_uri, self.served, self.poll_s = model, tracking_uri, served, poll_s
        self.moved, self.stopped = moved, threading.Event()
        self._pending: dict[str, Any] | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        """Resolve the alias once; on a new version, hand it over and set ``moved``."""
        try:
            user_config = pin_source(self.model, self.tracking_uri)
        except Exception as error:  # whatever the registry client raises (server down, alias gone): keep serving
            print(f"follow-alias: could not resolve {self.model} ({error}); trying again in {self.poll_s:g} s",
                  file=sys.stderr, flush=True)
            return
        if user_config["source"] != self.served:
            with self._lock:
                self._pending = user_config
            self.moved.set()

    def take(self) -> dict[str, Any] | None:
        """The ``user_config`` of the version the alias moved to since the last take, if any."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending
