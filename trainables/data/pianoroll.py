"""88-key piano rolls from MIDI pitches, shared by the music21 chorales and JSB pickles.

Key column ``k`` is MIDI pitch ``21 + k`` (A0 .. C8); a roll is ``(T, 88)`` float32 with
``roll[t, k] = 1`` when that key sounds in frame ``t``.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

import numpy as np

from .base import DataError

__all__ = ["LOWEST_PITCH", "NUM_KEYS", "PITCH_CLASSES", "piano_roll", "pitch_class_shares"]

LOWEST_PITCH = 21
NUM_KEYS = 88
PITCH_CLASSES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")


def pitch_class_shares(rolls: np.ndarray) -> dict[str, float]:
    """The share of sounding keys in each pitch class (C first) over ``rolls`` ``(..., 88)``
    (padding, being zeros, counts for nothing); ``PITCH_CLASSES`` -> share, summing to 1."""
    per_key = rolls.reshape(-1, NUM_KEYS).sum(axis=0, dtype=np.float64)
    per_class = np.bincount((np.arange(NUM_KEYS) + LOWEST_PITCH) % 12, weights=per_key, minlength=12)
    return dict(zip(PITCH_CLASSES, (per_class / per_class.sum()).tolist()))


def _key(pitch: object, where: str) -> int:
    """The key column of one MIDI pitch (an integer, or an integral float, in 21..108)."""
    integral = isinstance(pitch, numbers.Real) and float(pitch).is_integer()
    if not integral or isinstance(pitch, bool):
        raise DataError(f"{where}: pitch {pitch!r} is not an integer MIDI pitch")
    key = int(pitch) - LOWEST_PITCH
    if not 0 <= key < NUM_KEYS:
        raise DataError(
            f"{where}: pitch {int(pitch)} is outside the piano range "
            f"{LOWEST_PITCH}..{LOWEST_PITCH + NUM_KEYS - 1}"
        )
    return key


def piano_roll(frames: Sequence[Iterable[object]], where: str) -> np.ndarray:
    """Piano roll ``(T, 88)`` float32 of ``T`` frames, each an iterable of the MIDI
    pitches sounding in it (an empty frame is silence).

    :param where: names the sequence in messages, e.g. ``"data.pkl: train sequence 3"``.
    :raises DataError: for a frame that is not iterable, or a pitch that is not an integer
        in 21..108; the message names ``where`` and the frame.
    """
    roll = np.zeros((len(frames), NUM_KEYS), dtype=np.float32)
    for t, pitches in enumerate(frames):
        if not isinstance(pitches, Iterable):
            raise DataError(f"{where} frame {t}: {pitches!r} is not a list of MIDI pitches")
        for pitch in pitches:
            roll[t, _key(pitch, f"{where} frame {t}")] = 1.0
    return roll
