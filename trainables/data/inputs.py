"""Inputs to answer, from a file: every sequence (or point) of an ``.npz`` or of a table,
with its id. What ``pyrosweep query --input`` sends in one request and what ``pyrosweep
score`` scores in batches.

- ``.npz``: ``x`` ``(N, T, D)`` and ``lengths`` ``(N,)`` (integers in ``1..T``) for
  sequences, or ``x`` ``(N, D)`` alone for points; the ids are the indices ``0..N-1``.
  NaN is a missing value.
- ``.csv`` / ``.parquet`` / ``.pq``: a table in long format
  (:func:`trainables.data.tables.read_table_inputs`); the ids are its sequence ids.

Every problem raises :class:`~trainables.data.base.DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import DataError
from .tables import TABLE_SUFFIXES, read_table_inputs

__all__ = ["INPUT_SUFFIXES", "read_inputs", "read_npz_inputs"]

INPUT_SUFFIXES = (".npz", *TABLE_SUFFIXES)
NPZ_SHAPES = "x (N, T, D) with lengths (N,), or x (N, D) alone for points"


def read_npz_inputs(path: Path, source: str) -> tuple[np.ndarray, list[np.ndarray] | np.ndarray]:
    """The ids ``(N,)`` (indices) and the inputs of an ``.npz``: one ``(T_i, D)`` float64
    array per sequence (``x[n, :lengths[n]]``), or the ``(N, D)`` float64 points."""
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise DataError(f"{source}: no such file") from None
    except (OSError, ValueError) as exc:
        raise DataError(f"{source}: not a readable .npz archive ({exc})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{source}: holds a single array, expected an .npz archive of {NPZ_SHAPES}")
    with archive:
        if "x" not in archive.files:
            raise DataError(f"{source}: no array 'x' (arrays: {', '.join(archive.files) or 'none'}); expected {NPZ_SHAPES}")
        try:
            x, lengths = archive["x"], archive["lengths"] if "lengths" in archive.files else None
        except ValueError as exc:
            raise DataError(f"{source}: {exc}") from exc
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: x has dtype {x.dtype}, expected real numbers")
    x = x.astype(np.float64)
    if lengths is None:
        if x.ndim != 2:
            raise DataError(f"{source}: x has shape {x.shape} and there is no 'lengths'; expected {NPZ_SHAPES}")
        return np.arange(len(x)), x
    if x.ndim != 3:
        raise DataError(f"{source}: x has shape {x.shape}; expected {NPZ_SHAPES}")
    if lengths.dtype.kind not in "iu" or lengths.shape != x.shape[:1]:
        raise DataError(f"{source}: lengths has shape {lengths.shape} and dtype {lengths.dtype}; "
                        f"expected {x.shape[0]} integers (x has {x.shape[0]} sequences)")
    out_of_range = np.flatnonzero((lengths < 1) | (lengths > x.shape[1]))
    if len(out_of_range):
        n = int(out_of_range[0])
        raise DataError(f"{source}: lengths[{n}] is {int(lengths[n])}, expected a length in 1..{x.shape[1]} (the frames of x)")
    return np.arange(len(x)), [x[n, :length] for n, length in enumerate(lengths.tolist())]


def read_inputs(path: Path, source: str, **table_options) -> tuple[np.ndarray, list[np.ndarray] | np.ndarray]:
    """The ids and inputs of an ``.npz`` or a table file (``table_options``: its columns,
    as :func:`~trainables.data.tables.read_table_inputs` takes them)."""
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return read_npz_inputs(path, source)
    if suffix in TABLE_SUFFIXES:
        if not path.exists():
            raise DataError(f"{source}: no such file")
        return read_table_inputs(path, source, **table_options)
    raise DataError(f"{source}: expected a file ending in {', '.join(INPUT_SUFFIXES)}")
