"""The command-line flags that say how to read a data set: a built-in set's options and a
table file's columns and split (:mod:`trainables.data.tables`); shared by ``pyrosweep data
prepare``, ``pyrosweep train`` and ``pyrosweep query``."""

from __future__ import annotations

import argparse
from typing import Any

#: flag destination -> the loader option it sets
OPTION_OF = {
    "max_chorales": "max_chorales",
    "key": "key",
    "sequence_column": "sequence",
    "order_column": "order",
    "features": "features",
    "split_column": "split",
    "split_seed": "seed",
}


def add_data_arguments(parser: argparse.ArgumentParser, built_in: bool = True, splits: bool = True) -> None:
    """Add the data flags to ``parser`` (``built_in``: ``--max-chorales`` too; ``splits``:
    the table's split flags too)."""
    group = parser.add_argument_group("data", "how to read the data (tables: CSV or Parquet, one row per frame)")
    if built_in:
        group.add_argument("--max-chorales", type=int, default=None, help="jsb: parse only this many files")
        group.add_argument("--key", choices=["original", "c"], default=None,
                           help="jsb: original keys, or each chorale transposed to C major / C minor as the benchmark does")
    group.add_argument("--sequence-column", default=None, metavar="COLUMN", help="table: the sequence id column (default: sequence)")
    group.add_argument("--order-column", default=None, metavar="COLUMN", help="table: the column ordering a sequence's frames (default: order)")
    group.add_argument("--features", default=None, metavar="A,B,...", type=lambda text: text.split(","),
                       help="table: the value columns (default: every other numeric column)")
    if splits:
        group.add_argument("--split-column", default=None, metavar="COLUMN", help="table: a column of train/valid/test (default: a seeded 60/20/20 split)")
        group.add_argument("--split-seed", type=int, default=None, metavar="N", help="table: the seed of the 60/20/20 split (default: 0)")
    group.add_argument("--points", action="store_true", help="table: every row is a point (mixtures), no sequences")


def data_options(args: argparse.Namespace) -> dict[str, Any]:
    """The loader options the data flags of ``args`` give (flags left out are absent)."""
    given = vars(args)
    options = {option: given[flag] for flag, option in OPTION_OF.items() if given.get(flag) is not None}
    if given.get("points"):
        options["sequence"] = None
    return options
