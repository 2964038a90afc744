"""What a family declares about itself, and the named results its methods return.

Serving, the pyfunc, ``pyrosweep query``, the sweep-file checks, the CLI and the MLflow
pictures read these declarations; none of them branches on a family's name.

A family class sets:

- ``data_kind``: ``"sequences"`` (``x`` ``(N, T, D)`` with ``lengths`` ``(N,)``) or
  ``"points"`` (``x`` ``(N, D)``, no lengths); it is also the key of an HTTP body.
- ``observation``: ``"binary"`` (every value 0 or 1), ``"real"`` (any finite number),
  ``"counts"`` (non-negative integers) or ``"categorical"`` (one-hot frames: a single 1,
  0 elsewhere; symbol ``s`` of V is a 1 at index ``s``).
- ``latent``: ``"states"`` (a discrete chain: decoding gives a state per frame),
  ``"components"`` (a mixture: a component per point) or ``"continuous"`` (a latent
  vector per frame).
- ``exact``: False where ``log_likelihood`` is a bound.
- ``missing_values``: whether NaN values are missing values, integrated out exactly
  (:mod:`.missing`); False where an emission conditions on the previous frame's values.
- ``hyperparameters``: a :class:`Hyperparameters` subclass, the one declaration of what
  the family takes besides ``data_dim`` (name, type, default, constraint, description).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import numpy as np
import torch
from pydantic import AfterValidator, Field

from ..declared import Declared

DataKind = Literal["sequences", "points"]
Observation = Literal["binary", "real", "counts", "categorical"]
Latent = Literal["states", "components", "continuous"]


#: what a value (and for one-hot symbols, a frame) of each observation kind must be
OBSERVATION_RULES = {
    "binary": "0 or 1 for a Bernoulli model",
    "real": "a finite number",
    "counts": "a non-negative integer count",
    "categorical": "0 or 1 in a one-hot frame (symbol s of V is a 1 at index s)",
}


def bad_values(frames: np.ndarray, observation: Observation) -> np.ndarray:
    """Boolean mask, the shape of ``frames`` ``(..., D)`` (finite or NaN, which is missing
    and never bad here), of the values ``observation`` does not allow."""
    present = ~np.isnan(frames)
    if observation in ("binary", "categorical"):
        return present & (frames != 0) & (frames != 1)
    if observation == "counts":
        return present & ((frames < 0) | (frames != np.floor(frames)))
    return np.zeros(frames.shape, dtype=bool)


def bad_frames(frames: np.ndarray, observation: Observation) -> np.ndarray:
    """Boolean mask ``(...)`` of the frames ``(..., D)`` that are neither one-hot nor
    missing whole (all NaN), for ``categorical`` (no frame is bad for the other kinds)."""
    if observation != "categorical":
        return np.zeros(frames.shape[:-1], dtype=bool)
    missing = np.isnan(frames)
    return np.where(missing.any(-1), ~missing.all(-1), frames.sum(-1) != 1)


MISSING_REFUSED = "a value this family cannot take missing: its emissions condition on the previous frame's values"


def observation_problem(
    x: np.ndarray, observation: Observation, real: np.ndarray | None = None, missing_values: bool = True
) -> str | None:
    """The first value or frame of ``x`` ``(..., D)`` (its ``real`` frames ``(...)``, all if
    ``None``) that ``observation`` does not allow, as ``[n, t, d] is v; expected ...``;
    ``None`` if every one is fine. NaN values are missing, allowed unless
    ``missing_values`` is False."""
    real = np.ones(x.shape[:-1], dtype=bool) if real is None else real
    if not missing_values and len(missing := np.argwhere(np.isnan(x) & real[..., None])):
        return f"{[int(i) for i in missing[0]]} is missing (NaN); {MISSING_REFUSED}"
    values = np.argwhere(bad_values(x, observation) & real[..., None])
    if len(values):
        return f"{[int(i) for i in values[0]]} is {x[tuple(values[0])]:g}; expected {OBSERVATION_RULES[observation]}"
    frames = np.argwhere(bad_frames(x, observation) & real)
    if len(frames):
        frame = x[tuple(frames[0])]
        if np.isnan(frame).any():
            return f"{[int(i) for i in frames[0]]} is partly missing; a one-hot frame is missing whole (all NaN) or not at all"
        return f"{[int(i) for i in frames[0]]} has {frame.sum():g} ones; expected {OBSERVATION_RULES[observation]}"
    return None


class Hyperparameters(Declared):
    """Base of every family's declaration: ``hidden_dim`` (states, components or latent
    dimensions). Subclasses add fields with ``Field(default, constraint...,
    description=...)``; unknown names are refused."""

    hidden_dim: int = Field(16, ge=1, description="number of hidden states (mixture components, latent dimensions)")


def _perfect_square(value: int) -> int:
    if math.isqrt(value) ** 2 != value:
        raise ValueError("must be a perfect square (4, 9, 16, ...): the size of the product state space")
    return value


PerfectSquare = Annotated[int, Field(ge=1), AfterValidator(_perfect_square)]


# Results: the field names are the JSON keys of the answers. Tensors with a time axis are
# ``(N, T, ...)`` (padding past each length), per-item values ``(N,)``.
class StatePath(NamedTuple):
    """Most likely states ``(N, T)`` int64 (-1 past length; ``(N,)`` components for
    points) and the joint log p(states, x) ``(N,)``."""

    states: torch.Tensor
    log_joint: torch.Tensor


class LatentPath(NamedTuple):
    """A latent path ``(N, T, Z)`` (zero at padding) and log p(x, latents) ``(N,)``."""

    latents: torch.Tensor
    log_joint: torch.Tensor


class Marginals(NamedTuple):
    """Posterior state (component) probabilities ``(N, T, K)`` (``(N, K)`` for points)."""

    marginals: torch.Tensor


class GaussianPosterior(NamedTuple):
    """Per-step Gaussian posterior ``loc`` and ``scale`` ``(N, T, Z)``."""

    loc: torch.Tensor
    scale: torch.Tensor


class Samples(NamedTuple):
    """Draws ``sequences`` ``(N, T, D)`` (points ``(N, D)``) and their ``states``
    (``(N, T)`` states, ``(N,)`` components or ``(N, T, Z)`` latents)."""

    sequences: torch.Tensor
    states: torch.Tensor
