"""What a family declares about itself, and the named results its methods return.

Serving, the pyfunc, ``pyrosweep query``, the sweep-file checks, the CLI and the MLflow
pictures read these declarations; none of them branches on a family's name.

A family class sets:

- ``data_kind``: ``"sequences"`` (``x`` ``(N, T, D)`` with ``lengths`` ``(N,)``) or
  ``"points"`` (``x`` ``(N, D)``, no lengths); it is also the key of an HTTP body.
- ``observation``: ``"binary"`` (every value 0 or 1) or ``"real"`` (any finite number).
- ``latent``: ``"states"`` (a discrete chain: decoding gives a state per frame),
  ``"components"`` (a mixture: a component per point) or ``"continuous"`` (a latent
  vector per frame).
- ``exact``: False where ``log_likelihood`` is a bound.
- ``hyperparameters``: a :class:`Hyperparameters` subclass, the one declaration of what
  the family takes besides ``data_dim`` (name, type, default, constraint, description).
"""

from __future__ import annotations

import math
from typing import Annotated, Literal, NamedTuple

import torch
from pydantic import AfterValidator, Field

from ..declared import Declared

DataKind = Literal["sequences", "points"]
Observation = Literal["binary", "real"]
Latent = Literal["states", "components", "continuous"]


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
