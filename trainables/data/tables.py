"""Data sets from tables in long format (CSV or Parquet, read with pyarrow): one row per frame.

A row holds a sequence id (column ``sequence``), the frame's place in its sequence (column
``order``: any sortable values, e.g. integers or timestamps) and the frame's values (the
``features`` columns, by default every numeric column but those and ``split``). An empty
cell, ``NA`` or ``NaN`` is a missing value (NaN, integrated out by the model). With
``sequence: null`` every row is a point (mixtures) and ``order`` is not read.

Sequences (or points) go to ``train``/``valid``/``test`` by a seeded 60/20/20 split of the
sequence ids, or by a ``split`` column whose values are those names. Each split lists its
sequences in the order of their ids, so a CSV and a Parquet file of the same rows give the
same splits. Every problem raises :class:`~trainables.data.base.DataError` naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .base import SPLITS, DataError, Split, sequences_to_split, validate_split

__all__ = ["SPLIT_FRACTIONS", "TABLE_SUFFIXES", "read_table", "read_table_inputs", "read_table_splits"]

TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: the seeded split's shares of the sequence ids (train, valid, test)
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def read_table(path: Path, source: str) -> pa.Table:
    """The whole table of a CSV or Parquet file (CSV: empty, ``NA``, ``NaN`` cells are
    null, in text columns too)."""
    try:
        if path.suffix.lower() == ".csv":
            from pyarrow import csv

            return csv.read_csv(path, convert_options=csv.ConvertOptions(strings_can_be_null=True))
        from pyarrow import parquet

        return parquet.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{source}: not a readable {path.suffix.lower()} table ({exc})") from exc


def _shown(value: object) -> str:
    """``repr`` of a table value, numpy scalars as the Python values they hold."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _column(table: pa.Table, name: object, role: str, source: str) -> pa.Array:
    """Column ``name`` (the ``role`` option) with no nulls."""
    if not isinstance(name, str) or name not in table.column_names:
        raise DataError(
            f"{source}: no column {name!r} for {role} (columns: {', '.join(table.column_names)}); "
            f"say which with the {role} option (--{role}-column on the command line)"
        )
    column = table.column(name).combine_chunks()
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"{source}: column {name!r} ({role}) is empty in row {row}")
    return column


def _numeric(column: pa.ChunkedArray) -> bool:
    kind = column.type
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind) or pa.types.is_decimal(kind)


def _feature_values(table: pa.Table, features: list[str] | None, taken: set[str], source: str) -> np.ndarray:
    """The ``(rows, D)`` float64 values of the feature columns (null -> NaN)."""
    if features is None:
        features = [name for name in table.column_names if name not in taken and _numeric(table.column(name))]
        if not features:
            raise DataError(f"{source}: no numeric column besides {', '.join(sorted(taken))} to use as features")
    elif not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise DataError(f"{source}: features: expected a non-empty list of column names, got {features!r}")
    columns = []
    for name in features:
        if name not in table.column_names:
            raise DataError(f"{source}: no feature column {name!r} (columns: {', '.join(table.column_names)})")
        if name in taken:
            raise DataError(f"{source}: column {name!r} is the {', '.join(sorted(taken))} column(s), not a feature")
        column = table.column(name)
        if not _numeric(column):
            raise DataError(f"{source}: feature column {name!r} holds {column.type} values, expected numbers")
        columns.append(pc.cast(column, pa.float64()).to_numpy())
    values = np.stack(columns, axis=-1)
    if np.isinf(values).any():
        row, d = np.argwhere(np.isinf(values))[0]
        raise DataError(f"{source}: row {row}, column {features[d]!r} is {values[row, d]}, expected a finite number or missing")
    return values


def _seeded_assignment(num_ids: int, seed: int, source: str, what: str) -> np.ndarray:
    """The split index (0, 1, 2) of each of ``num_ids`` ids: a seeded 60/20/20 permutation."""
    if num_ids < len(SPLITS):
        raise DataError(
            f"{source}: {num_ids} {what}; a seeded {'/'.join(str(round(100 * f)) for f in SPLIT_FRACTIONS)} "
            f"split needs at least {len(SPLITS)} (or give a split column)"
        )
    sizes = [max(1, round(fraction * num_ids)) for fraction in SPLIT_FRACTIONS[1:]]
    counts = [num_ids - sum(sizes), *sizes]
    assignment = np.repeat(np.arange(len(SPLITS)), counts)
    return assignment[np.argsort(np.random.default_rng(seed).permutation(num_ids))]


def _split_column(column: pa.Array, ids: np.ndarray, inverse: np.ndarray, name: str, source: str) -> np.ndarray:
    """The split index (0, 1, 2) of each id of ``ids`` ``(I,)`` from the split column
    ``(rows,)``, whose rows ``inverse`` ``(rows,)`` indexes into ``ids``."""
    labels = pc.cast(column, pa.string()).to_numpy(zero_copy_only=False)
    known = np.isin(labels, SPLITS)
    if not known.all():
        row = int(np.flatnonzero(~known)[0])
        raise DataError(f"{source}: row {row}, split column {name!r} is {labels[row]!r}; expected {', '.join(SPLITS)}")
    row_split = np.select([labels == split for split in SPLITS], range(len(SPLITS)))
    id_split = np.empty(len(ids), dtype=np.int64)
    id_split[inverse] = row_split
    conflict = np.flatnonzero(id_split[inverse] != row_split)
    if len(conflict):
        row = int(conflict[0])
        raise DataError(
            f"{source}: sequence {_shown(ids[inverse[row]])} is in {SPLITS[row_split[row]]} (row {row}) and in "
            f"{SPLITS[id_split[inverse[row]]]}; a sequence belongs to one split"
        )
    for index, split in enumerate(SPLITS):
        if not (id_split == index).any():
            raise DataError(f"{source}: split {split} is empty: no row has {split!r} in column {name!r}")
    return id_split


def _frame_order(inverse: np.ndarray, order: pa.Array, ids: np.ndarray, name: str, source: str) -> np.ndarray:
    """The row indices ``(rows,)`` sorted by sequence (``inverse``, ``(rows,)``), then by
    the ``order`` column; no two rows of a sequence may share an order value."""
    keys = pa.table({"id": inverse, "order": order})
    rows = pc.sort_indices(keys, sort_keys=[("id", "ascending"), ("order", "ascending")]).to_numpy()
    ordered = order.take(pa.array(rows)).to_numpy(zero_copy_only=False)
    twins = np.flatnonzero((inverse[rows][1:] == inverse[rows][:-1]) & (ordered[1:] == ordered[:-1]))
    if len(twins):
        first, second = rows[twins[0]], rows[twins[0] + 1]
        raise DataError(
            f"{source}: sequence {_shown(ids[inverse[first]])} has two rows with {name} {_shown(ordered[twins[0]])} "
            f"(rows {min(first, second)} and {max(first, second)}); each (sequence, {name}) pair must be unique"
        )
    return rows


def _grouped(
    path: Path, source: str, sequence: str | None, order: str, features: list[str] | None, split: str | None
) -> tuple[pa.Table, np.ndarray, np.ndarray, list[np.ndarray] | np.ndarray]:
    """The table of ``path`` and its rows grouped by sequence: ``ids`` ``(I,)`` the sorted
    sequence ids (row numbers for points), ``inverse`` ``(rows,)`` each row's index into
    ``ids``, and one ``(T_i, D)`` float64 array of frames per id, in order (for points one
    ``(rows, D)`` array). ``split`` is only kept out of the default features."""
    table = read_table(path, source)
    if table.num_rows == 0:
        raise DataError(f"{source}: the table has no rows")
    taken = {name for name in (sequence, order if sequence is not None else None, split) if name is not None}
    values = _feature_values(table, features, taken, source)
    if sequence is None:
        rows = np.arange(table.num_rows)
        return table, rows, rows, values
    ids, inverse = np.unique(_column(table, sequence, "sequence", source).to_numpy(zero_copy_only=False), return_inverse=True)
    rows = _frame_order(inverse, _column(table, order, "order", source), ids, order, source)
    starts = np.flatnonzero(np.diff(inverse[rows])) + 1
    return table, ids, inverse, np.split(values[rows], starts)


def read_table_inputs(
    path: Path, source: str, *, sequence: str | None = "sequence", order: str = "order", features: list[str] | None = None
) -> tuple[np.ndarray, list[np.ndarray] | np.ndarray]:
    """Every sequence of a long-format table: its sorted ids ``(I,)`` and one ``(T_i, D)``
    float64 array per id, in that order (NaN where missing); or, when ``sequence`` is
    ``None``, the row numbers ``(rows,)`` and the ``(rows, D)`` points. The inputs of a
    request (``pyrosweep query --input TABLE``) or of a batch (``pyrosweep score``).
    Options as :func:`read_table_splits`."""
    _, ids, _, frames = _grouped(path, source, sequence, order, features, None)
    return ids, frames


def read_table_splits(
    path: Path,
    source: str,
    *,
    sequence: str | None = "sequence",
    order: str = "order",
    features: list[str] | None = None,
    split: str | None = None,
    seed: int = 0,
) -> dict[str, Split]:
    """The three validated splits of a long-format table.

    :param sequence: the sequence id column, or ``None`` for point data (a row a point).
    :param order: the column that orders the frames of a sequence.
    :param features: the value columns (``D`` of them); default every numeric column but
        ``sequence``, ``order`` and ``split``.
    :param split: a column of ``train``/``valid``/``test`` per row (the same for every row
        of a sequence); default a 60/20/20 split of the sequence ids seeded by ``seed``.
    :returns: splits of ``x`` ``(N, T, D)`` with ``lengths`` ``(N,)``, or points ``(N, D)``.
    """
    table, ids, inverse, frames = _grouped(path, source, sequence, order, features, split)
    if split is None:
        id_split = _seeded_assignment(len(ids), seed, source, "sequences" if sequence is not None else "points")
    else:
        id_split = _split_column(_column(table, split, "split", source), ids, inverse, split, source)
    if sequence is None:
        return {name: validate_split(frames[id_split == s], None, source, name) for s, name in enumerate(SPLITS)}
    return {
        name: sequences_to_split([frames[i] for i in np.flatnonzero(id_split == s)], source, name)
        for s, name in enumerate(SPLITS)
    }
