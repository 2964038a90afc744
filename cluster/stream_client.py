"""The client side of ``pyrosweep query filter`` and ``query forecast``: a file's
sequences sent as streams, chunk by chunk, each answer's token carried to the next."""

from __future__ import annotations

from typing import Any, Callable, Iterator

Post = Callable[[str, Any], dict]  # (url, body) -> the JSON answer


def filter_lines(post: Post, url: str, sequences: list[list], chunk: int, lag: int | None) -> Iterator[dict[str, Any]]:
    """One record a frame of every sequence, streamed to ``url`` (``/v1/filter``) in
    chunks of ``chunk`` frames: ``sequence``, ``frame``, ``per_step``, ``filtered``
    (the state probabilities), and ``smoothed`` (those of frame ``frame - lag``) once a
    stream has more than ``lag`` frames."""
    if chunk < 1:
        raise ValueError(f"--chunk: expected at least 1 frame, got {chunk}")
    for n, frames in enumerate(sequences):
        state, smoothed = None, []
        for start in range(0, len(frames), chunk):
            body = {"frames": frames[start : start + chunk], "state": state}
            if lag is not None and state is None:
                body["lag"] = lag
            answer = post(url, body)
            state, smoothed = answer["state"], smoothed + answer["smoothed"]
            first = answer["frames_seen"] - len(answer["per_step"])
            for i, (step, filtered) in enumerate(zip(answer["per_step"], answer["filtered"])):
                t = first + i
                record = {"sequence": n, "frame": t, "per_step": step, "filtered": filtered}
                if lag is not None and t >= lag:
                    record["smoothed"] = smoothed[t - lag]
                yield record


def forecasts(post: Post, url: str, sequences: list[list], horizon: int) -> Iterator[dict[str, Any]]:
    """The ``/v1/forecast`` answer for the ``horizon`` frames after each sequence, with its index."""
    for n, frames in enumerate(sequences):
        yield {"sequence": n, **post(url, {"frames": frames, "horizon": horizon})}
