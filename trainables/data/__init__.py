"""Data sets by name or path (docs/design.md, "Layout").

``load_dataset(name="jsb")``, ``load_dataset(name="synthetic-hmm", seed=1)`` or
``load_dataset(path="my.npz")`` returns a :class:`Dataset` whose splits ``train``,
``valid`` and ``test`` hold padded sequences ``x`` ``(N, T, D)`` with ``lengths`` ``(N,)``,
or points ``x`` ``(N, D)`` for mixtures. Bad data raises :class:`DataError` at load time.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .base import SPLITS, DataError, Dataset, Split, sequences_to_split, validate_split
from .files import file_reader, load_file
from .jsb import load_jsb

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "Split",
    "dataset_summary",
    "load_argument",
    "load_dataset",
    "load_file",
    "load_jsb",
    "sequences_to_split",
    "validate_split",
]

DATASETS: dict[str, str] = {
    "jsb": "four-part Bach chorales from music21 as 88-key piano rolls, one frame per beat",
    "synthetic-hmm": "binary sequences sampled from a Bernoulli-emission HMM with known parameters",
    "synthetic-gaussian-hmm": "real sequences sampled from a Gaussian HMM with known parameters",
    "synthetic-gmm": "points sampled from a Gaussian mixture with known parameters",
    "synthetic-categorical-hmm": "one-hot symbol sequences sampled from a categorical HMM with known parameters",
    "synthetic-poisson-hmm": "count sequences sampled from a Poisson HMM with known parameters",
}


def named_loader(name: str) -> Callable[..., Dataset]:
    """The loader of a built-in data set, taking only its options as keywords."""
    if name not in DATASETS:
        raise DataError(
            f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}, or give a file path"
        )
    if name == "jsb":
        return load_jsb
    from .synthetic import load_synthetic

    return partial(load_synthetic, name)


def _check_options(source: str, loader: Callable[..., Dataset], options: dict[str, Any]) -> None:
    """Raise naming the valid options when ``options`` holds a keyword ``loader`` lacks."""
    parameters = inspect.signature(loader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DataError(
            f"{source}: unknown option(s) {', '.join(unknown)}; "
            f"valid options: {', '.join(accepted) or 'none'}"
        )


def load_dataset(
    name: str | None = None, path: str | os.PathLike[str] | None = None, **options: Any
) -> Dataset:
    """Load a built-in data set by ``name`` (a key of :data:`DATASETS`) or a user file by
    ``path`` (see :func:`load_file`); give exactly one.

    :param options: keyword options of the named loader, e.g. ``max_chorales`` for
        ``jsb`` or ``num_sequences``, ``length``, ``seed`` for ``synthetic-*``; of a
        table file ``sequence``, ``order``, ``features``, ``split``, ``seed``; other
        files take none.
    :raises DataError: for both or neither of ``name`` and ``path``, an unknown name or
        option (listing the valid ones), or bad data.
    """
    if (name is None) == (path is None):
        raise DataError(
            f"give exactly one of a data set name ({', '.join(DATASETS)}) or a file path"
        )
    if path is not None:
        source, loader, takes = str(path), partial(load_file, path), file_reader(path)
    else:
        source, loader = name, named_loader(name)
        takes = loader
    _check_options(source, takes, options)
    return loader(**options)


def load_argument(name_or_path: str, **options: Any) -> Dataset:
    """A data set as the command line names it, with the ``options`` it was given: a file
    path (it has a suffix; a table's columns and split) or a built-in data set's name."""
    if Path(name_or_path).suffix:
        return load_dataset(path=name_or_path, **options)
    return load_dataset(name_or_path, **options)


def _split_summary(split_name: str, split: Split) -> dict[str, str | int | float]:
    num_rows = split.x.size(0)
    if split.lengths is None:
        values = split.x
        row: dict[str, str | int | float] = {"split": split_name, "points": num_rows, "frames": num_rows}
    else:
        values = split.x[torch.arange(split.x.size(1)) < split.lengths.unsqueeze(-1)]  # (frames, D)
        frames = int(split.lengths.sum())
        row = {
            "split": split_name,
            "sequences": num_rows,
            "frames": frames,
            "max_length": int(split.lengths.max()),
            "notes_per_frame": float(values.nansum()) / frames,
        }
    return {**row, "missing": float(values.isnan().float().mean())}


def dataset_summary(dataset: Dataset) -> list[dict[str, str | int | float]]:
    """One row per split (train, valid, test).

    Sequence splits: ``split``, ``sequences``, ``frames`` (sum of lengths), ``max_length``
    and ``notes_per_frame``, the mean over real frames of the sum of ``x`` over ``D``
    (the number of keys down for binary piano rolls; just the mean frame sum for other
    data; missing values left out). Point splits: ``split``, ``points`` and ``frames``
    (= points). Both end with ``missing``, the fraction of real values that are NaN.
    """
    return [_split_summary(name, dataset.splits[name]) for name in SPLITS]
