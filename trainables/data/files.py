"""Data sets from user files, chosen by suffix.

- ``.npz``: arrays ``{split}_x`` ``(N, T, D)`` and ``{split}_len`` ``(N,)`` (integers) for
  each split ``train``, ``valid`` and ``test``; other arrays are ignored.
- ``.pkl`` / ``.pickle``: the original JSB chorales format, a dict split -> list of
  sequences -> list of frames, each frame a list or tuple of the MIDI pitches (integers
  in 21..108) sounding in it; becomes 88-key piano rolls ``(N, T, 88)``.
- ``.csv`` / ``.parquet`` / ``.pq``: a table in long format, one row per frame
  (:mod:`trainables.data.tables`); its options name the columns and the split.

Every problem raises :class:`~trainables.data.base.DataError` naming the file path.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .base import SPLITS, DataError, Dataset, Split, sequences_to_split, validate_split
from .pianoroll import piano_roll
from .tables import TABLE_SUFFIXES, read_table_splits

__all__ = ["NPZ_KEYS", "READERS", "file_reader", "load_file", "read_npz_splits"]

NPZ_KEYS = tuple(f"{split}_{suffix}" for split in SPLITS for suffix in ("x", "len"))


def read_npz_splits(path: Path, source: str) -> dict[str, Split]:
    """The three validated splits of an ``.npz`` file (keys in :data:`NPZ_KEYS`)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataError(f"{source}: not a readable .npz archive ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{source}: holds a single array, expected an .npz archive of {NPZ_KEYS}")
    with archive:
        missing = [key for key in NPZ_KEYS if key not in archive.files]
        if missing:
            raise DataError(
                f"{source}: missing array(s) {', '.join(missing)}; "
                f"an .npz data file needs {', '.join(NPZ_KEYS)}"
            )
        try:
            arrays = {key: archive[key] for key in NPZ_KEYS}
        except ValueError as exc:
            raise DataError(f"{source}: {exc}") from exc
    return {
        split: validate_split(arrays[f"{split}_x"], arrays[f"{split}_len"], source, split)
        for split in SPLITS
    }


def _read_pickle_splits(path: Path, source: str) -> dict[str, Split]:
    """The three validated piano-roll splits of a JSB-format pickle."""
    try:
        with path.open("rb") as handle:
            data = pickle.load(handle)
    except Exception as exc:  # unpickling can fail with almost any exception type
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, dict):
        raise DataError(
            f"{source}: holds a {type(data).__name__}, expected a dict of split -> sequences"
        )
    missing = [split for split in SPLITS if split not in data]
    if missing:
        raise DataError(
            f"{source}: missing split(s) {', '.join(missing)}; "
            f"a JSB pickle needs {', '.join(SPLITS)}"
        )
    return {split: _pickle_split(data[split], source, split) for split in SPLITS}


def _pickle_split(sequences: object, source: str, split: str) -> Split:
    """One split of a JSB pickle: ``N`` sequences of pitch lists -> ``(N, T, 88)``."""
    if not isinstance(sequences, Iterable):
        raise DataError(
            f"{source}: {split} is a {type(sequences).__name__}, expected a list of sequences"
        )
    rolls = []
    for n, frames in enumerate(sequences):
        where = f"{source}: {split} sequence {n}"
        if not isinstance(frames, Iterable):
            raise DataError(f"{where} is a {type(frames).__name__}, expected a list of frames")
        roll = piano_roll(list(frames), where)
        if len(roll) == 0:
            raise DataError(f"{where} has no frames; every sequence needs at least one")
        rolls.append(roll)
    return sequences_to_split(rolls, source, split)


#: file suffix -> reader of its splits, ``reader(path, source, **options)``
READERS: dict[str, Callable[..., dict[str, Split]]] = {
    ".npz": read_npz_splits,
    ".pkl": _read_pickle_splits,
    ".pickle": _read_pickle_splits,
    **dict.fromkeys(TABLE_SUFFIXES, read_table_splits),
}


def file_reader(path: str | os.PathLike[str]) -> Callable[..., dict[str, Split]]:
    """The reader of the user file ``path`` by its suffix, bound to it: it takes only the
    reader's options (none for ``.npz`` and pickles; columns and split for tables).

    :raises DataError: for a missing file or an unknown suffix, naming the path.
    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{source}: no such file")
    reader = READERS.get(file.suffix.lower())
    if reader is None:
        raise DataError(
            f"{source}: unknown file type {file.suffix or '(no suffix)'!r}; "
            f"expected one of {', '.join(READERS)}"
        )
    return partial(reader, file, source)


def load_file(path: str | os.PathLike[str], **options: Any) -> Dataset:
    """Load a user data file (``.npz``, a JSB pickle ``.pkl`` / ``.pickle``, or a table
    ``.csv`` / ``.parquet`` with the options of :func:`~trainables.data.tables.read_table_splits`).

    Pickles are read with :func:`pickle.load`, which can run code stored in the file: this
    is only ever called on a path the user passes explicitly, so only pass files you trust.

    :returns: a :class:`Dataset` named ``str(path)`` with splits of ``x`` ``(N, T, D)``
        (``D = 88`` for pickles) and ``lengths`` ``(N,)`` (tables of points: ``(N, D)``).
    :raises DataError: for a missing file, an unknown suffix, missing arrays, splits or
        columns, bad shapes, infinite values, lengths out of range, an empty split, a pitch
        outside 21..108, or a table's duplicate frames; the message starts with the path.
    """
    splits = file_reader(path)(**options)
    return Dataset(name=str(path), splits=splits, data_dim=splits["train"].x.size(-1))
