"""The data types every loader returns, and the checks every split goes through.

A split of sequence data is a padded float32 tensor ``x`` ``(N, T, D)`` with int64
``lengths`` ``(N,)``: frame ``t`` of sequence ``n`` is real when ``t < lengths[n]`` and
padding otherwise, and padding is stored as zeros. A split of point data (mixtures) is
``x`` ``(N, D)`` with ``lengths`` ``None``. NaN is a missing value
(:mod:`trainables.models.missing`). Bad data fails here, at load time, with a
:class:`DataError` whose message names the source (a file path or a data set name), the
split and the problem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

__all__ = ["SPLITS", "DataError", "Dataset", "Split", "sequences_to_split", "validate_split"]

SPLITS = ("train", "valid", "test")


class DataError(ValueError):
    """Data that cannot be used, with a message saying where and what is wrong."""


@dataclass(frozen=True)
class Split:
    """One split: ``x`` ``(N, T, D)`` float32 padded sequences with ``lengths`` ``(N,)``
    int64, or ``x`` ``(N, D)`` float32 points with ``lengths`` ``None``."""

    x: torch.Tensor
    lengths: torch.Tensor | None

    @cached_property
    def fingerprint(self) -> str:
        """A SHA-256 of the values and lengths: two splits with the same fingerprint are the
        same sequences in the same order (what a paired comparison of two models needs).
        Hashed once per split: a trial asks again every time its best epoch moves."""
        digest = hashlib.sha256(repr(tuple(self.x.shape)).encode())
        digest.update(self.x.detach().cpu().contiguous().numpy().tobytes())
        if self.lengths is not None:
            digest.update(self.lengths.detach().cpu().numpy().astype(np.int64).tobytes())
        return digest.hexdigest()


@dataclass(frozen=True)
class Dataset:
    """A named data set: splits ``"train"``, ``"valid"``, ``"test"`` of the same kind
    (sequences or points) and the same ``data_dim`` ``D``; ``truth`` holds the true
    parameters of synthetic sets (e.g. ``transition`` ``(K, K)``), ``None`` otherwise."""

    name: str
    splits: dict[str, Split]
    data_dim: int
    truth: dict[str, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if sorted(self.splits) != sorted(SPLITS):
            raise DataError(
                f"{self.name}: splits are {sorted(self.splits)}, expected {list(SPLITS)}"
            )
        for split_name, split in self.splits.items():
            if split.x.size(-1) != self.data_dim:
                raise DataError(
                    f"{self.name}: {split_name}_x has {split.x.size(-1)} values per "
                    f"frame, expected data_dim={self.data_dim}"
                )
        if len({split.lengths is None for split in self.splits.values()}) > 1:
            raise DataError(f"{self.name}: splits mix sequences (with lengths) and points")


def _as_tensor(array: np.ndarray | torch.Tensor, name: str, kinds: str, what: str) -> torch.Tensor:
    """``array`` as a CPU tensor, after checking that its numpy dtype kind is in ``kinds``."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.dtype.kind not in kinds:
        raise DataError(f"{name} has dtype {array.dtype}, expected {what}")
    return torch.tensor(array)


def _check_finite(x: torch.Tensor, mask: torch.Tensor, name: str) -> None:
    """Raise naming the first infinite value of ``x`` among the entries where ``mask``
    (NaN is a missing value, integrated out by the families that take them)."""
    bad = torch.isinf(x) & mask
    if bad.any():
        index = tuple(int(i) for i in bad.nonzero()[0])
        where = ", ".join(map(str, index))
        raise DataError(f"{name}[{where}] is {float(x[index])}, expected a finite number or NaN (missing)")


def _empty_split(source: str, split: str) -> DataError:
    return DataError(
        f"{source}: {split} is empty; every split needs at least one sequence or point"
    )


def _validate_points(x: torch.Tensor, source: str, split: str) -> Split:
    if x.dim() != 2:
        raise DataError(
            f"{source}: {split}_x has shape {tuple(x.shape)}, expected (points, values) "
            "for point data"
        )
    _check_finite(x, torch.ones_like(x, dtype=torch.bool), f"{source}: {split}_x")
    return Split(x=x, lengths=None)


def _validate_sequences(x: torch.Tensor, lengths: torch.Tensor, source: str, split: str) -> Split:
    if x.dim() != 3:
        raise DataError(
            f"{source}: {split}_x has shape {tuple(x.shape)}, expected (sequences, frames, values)"
        )
    num_sequences, num_frames = x.shape[:2]
    if lengths.shape != (num_sequences,):
        raise DataError(
            f"{source}: {split}_len has shape {tuple(lengths.shape)} but {split}_x has "
            f"{num_sequences} sequences; expected ({num_sequences},)"
        )
    out_of_range = (lengths < 1) | (lengths > num_frames)
    if out_of_range.any():
        n = int(out_of_range.nonzero()[0, 0])
        raise DataError(
            f"{source}: {split}_len[{n}] is {int(lengths[n])}, expected a length in "
            f"1..{num_frames} (the number of frames of {split}_x)"
        )
    real = torch.arange(num_frames) < lengths.unsqueeze(-1)
    _check_finite(x, real.unsqueeze(-1).expand_as(x), f"{source}: {split}_x")
    return Split(x=x.masked_fill(~real.unsqueeze(-1), 0.0), lengths=lengths)


def validate_split(
    x: np.ndarray | torch.Tensor,
    lengths: np.ndarray | torch.Tensor | None,
    source: str,
    split: str,
) -> Split:
    """Check one split and convert it to canonical tensors.

    :param x: ``(N, T, D)`` padded sequences, or ``(N, D)`` points when ``lengths`` is
        ``None``; any real or boolean dtype, numpy or torch.
    :param lengths: ``(N,)`` integer lengths in ``1..T``, or ``None`` for points.
    :param source: the file path or data set name, for messages.
    :param split: the split name, for messages.
    :returns: a :class:`Split` with float32 ``x`` whose padded frames (``t >= length``)
        are zero and int64 ``lengths``; both are copies, never views of the input.
    :raises DataError: for wrong shapes, infinite values in real frames, lengths out of
        range, or an empty split; the message names ``source``, ``split`` and the problem.
    """
    x_name = f"{source}: {split}_x"
    x_tensor = _as_tensor(x, x_name, "biuf", "real numbers").to(torch.float32)
    if x_tensor.dim() >= 1 and x_tensor.size(0) == 0:
        raise _empty_split(source, split)
    if x_tensor.dim() >= 2 and x_tensor.size(-1) == 0:
        raise DataError(f"{x_name} has shape {tuple(x_tensor.shape)}: 0 values per frame")
    if lengths is None:
        return _validate_points(x_tensor, source, split)
    length_tensor = _as_tensor(lengths, f"{source}: {split}_len", "iu", "integers")
    return _validate_sequences(x_tensor, length_tensor.to(torch.int64), source, split)


def sequences_to_split(
    sequences: Sequence[np.ndarray | torch.Tensor],
    source: str = "sequences",
    split: str = "train",
) -> Split:
    """Pad a list of ``(T_i, D)`` sequences into a validated ``(N, max T_i, D)`` split.

    :param sequences: ``N`` arrays of shape ``(T_i, D)``, numpy or torch.
    :param source: the file path or data set name, for messages.
    :param split: the split name, for messages.
    :returns: a :class:`Split` with ``lengths`` ``(N,)`` equal to the ``T_i``.
    :raises DataError: as :func:`validate_split`, or when a sequence is not 2-D or the
        sequences disagree on ``D``.
    """
    arrays = [np.asarray(s.detach().cpu() if isinstance(s, torch.Tensor) else s) for s in sequences]
    if not arrays:
        raise _empty_split(source, split)
    for n, array in enumerate(arrays):
        if array.ndim != 2:
            raise DataError(
                f"{source}: {split} sequence {n} has shape {array.shape}, expected (frames, values)"
            )
        if array.shape[1] != arrays[0].shape[1]:
            raise DataError(
                f"{source}: {split} sequence {n} has {array.shape[1]} values per frame "
                f"but sequence 0 has {arrays[0].shape[1]}"
            )
    lengths = np.array([len(array) for array in arrays], dtype=np.int64)
    padded = np.zeros((len(arrays), max(lengths), arrays[0].shape[-1]), dtype=np.float32)
    for array, row in zip(arrays, padded):
        row[: len(array)] = array
    return validate_split(padded, lengths, source, split)
