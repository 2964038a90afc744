"""Constrained chain topologies: which transitions (and first states) a chain allows,
and a Dirichlet prior whose support has exact zeros elsewhere.

A topology is a ``(K, K)`` bool array ``allowed[i, j]`` (may go from ``i`` to ``j``) and a
``(K,)`` bool array of the allowed first states. The zeros are structural: the prior
:class:`MaskedDirichlet` lives on :class:`MaskedSimplex`, whose transform
(:class:`MaskedSoftmaxTransform`, registered with ``transform_to`` and ``biject_to``) maps
unconstrained reals to rows with exact zeros at masked entries, so SVI never learns them
and EM (``em.dirichlet_map`` with the mask) never fills them. A masked prior's free
coordinates are read off ``prior.support`` (``base_constraint.mask`` under ``to_event``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from pyro.distributions import TorchDistribution
from torch.distributions import biject_to, constraints, transform_to
from torch.distributions.transforms import Transform

#: the file types a ``transition_mask`` may be: numpy's binary array, or text numpy reads
MASK_READERS = {".npy": np.load, ".txt": np.loadtxt, ".csv": lambda path: np.loadtxt(path, delimiter=",")}


def load_mask(path: str | Path) -> list[list[int]]:
    """The 0/1 matrix in ``path`` (``.npy``, whitespace-separated ``.txt`` or ``.csv``) as
    nested lists; anything but a 2-d array of 0s and 1s is refused."""
    path = Path(path).expanduser()
    reader = MASK_READERS.get(path.suffix.lower())
    if reader is None:
        raise ValueError(f"transition_mask {str(path)!r}: unknown file type (expected one of: {', '.join(MASK_READERS)})")
    if not path.is_file():
        raise ValueError(f"transition_mask: no such file: {path}")
    array = np.asarray(reader(path))
    if array.ndim != 2 or not np.isin(array, (0, 1)).all():
        raise ValueError(f"transition_mask {str(path)!r}: expected a K x K array of 0s and 1s, got shape {array.shape}")
    return array.astype(int).tolist()


def chain_masks(
    topology: str, bandwidth: int, mask: list[list[int]] | None, num_states: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The allowed first states ``(K,)`` and transitions ``(K, K)`` (bool) of a topology,
    or ``None`` for an unconstrained (ergodic) chain. ``left-right`` allows ``0 <= j - i
    <= bandwidth`` and starts in state 0; ``banded`` allows ``|j - i| <= bandwidth``; a
    ``mask`` gives the transitions itself and any first state. Refuses a mask of the wrong shape, a state with no way out and a state
    no path from a first state reaches, naming the state."""
    K = num_states
    if mask is not None and topology != "ergodic":
        raise ValueError(f"transition_mask gives the transitions itself: leave topology ergodic, got {topology!r}")
    steps = np.arange(K)[None, :] - np.arange(K)[:, None]  # j - i
    if mask is not None:
        allowed = np.asarray(mask, dtype=bool)
        if allowed.shape != (K, K):
            raise ValueError(f"transition_mask must be hidden_dim x hidden_dim = {K} x {K}, got {allowed.shape}")
        first = np.ones(K, dtype=bool)
    elif topology == "left-right":
        allowed = (steps >= 0) & (steps <= bandwidth)
        first = np.arange(K) == 0
    elif topology == "banded":
        allowed = np.abs(steps) <= bandwidth
        first = np.ones(K, dtype=bool)
    else:
        return None
    empty = np.flatnonzero(~allowed.any(1))
    if len(empty):
        raise ValueError(f"state {empty[0]} has no allowed transition (row {empty[0]} of the mask is all 0)")
    reached = first.copy()
    for _ in range(K):
        reached = reached | allowed[reached].any(0)
    unreachable = np.flatnonzero(~reached)
    if len(unreachable):
        raise ValueError(f"state {unreachable[0]} cannot be reached from the first states {np.flatnonzero(first).tolist()}")
    return first, allowed


class MaskedSimplex(constraints.Constraint):
    """Probability vectors on the last dim that are exactly 0 where ``mask`` (a bool
    tensor broadcastable to the value ``(..., K)``) is False."""

    event_dim = 1

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def check(self, value: torch.Tensor) -> torch.Tensor:
        tolerance = 1e-6 if value.dtype == torch.float32 else 1e-12
        ones = (value.sum(-1) - 1).abs() < tolerance * value.size(-1)
        return (value >= 0).all(-1) & ones & ~((value != 0) & ~self.mask).any(-1)

    def __repr__(self) -> str:
        return f"MaskedSimplex(mask={self.mask.int().tolist()})"


class MaskedSoftmaxTransform(Transform):
    """Reals ``(..., K)`` to :class:`MaskedSimplex` ``(..., K)``: a softmax over the allowed
    entries, exactly 0 elsewhere (their reals get no gradient). The inverse is the log
    of the allowed entries (0 at masked ones); like ``SoftmaxTransform``, unique only up
    to a shift of each row."""

    domain = constraints.real_vector
    bijective = False  # shift-invariant, as the simplex's softmax

    def __init__(self, mask: torch.Tensor, cache_size: int = 0) -> None:
        super().__init__(cache_size=cache_size)
        self.mask = mask

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def codomain(self):
        return MaskedSimplex(self.mask)

    def __eq__(self, other) -> bool:
        return isinstance(other, MaskedSoftmaxTransform) and torch.equal(self.mask, other.mask)

    def with_cache(self, cache_size: int = 1):
        return self if self._cache_size == cache_size else MaskedSoftmaxTransform(self.mask, cache_size)

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(~self.mask, -torch.inf).softmax(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, y, 1).log()


@transform_to.register(MaskedSimplex)
@biject_to.register(MaskedSimplex)
def _masked_softmax(constraint: MaskedSimplex) -> MaskedSoftmaxTransform:
    return MaskedSoftmaxTransform(constraint.mask)


class MaskedDirichlet(TorchDistribution):
    """``Dirichlet(concentration)`` over the allowed entries of the last dim only (the
    rest exactly 0). ``concentration`` ``(..., K)`` positive, ``mask`` bool broadcastable
    to it with at least one True per row, kept as ``allowed`` (``mask`` is Pyro's method);
    event shape ``(K,)``."""

    arg_constraints = {"concentration": constraints.independent(constraints.positive, 1)}

    def __init__(self, concentration: torch.Tensor, mask: torch.Tensor, validate_args=None) -> None:
        self.concentration = concentration
        self.allowed = mask.expand_as(concentration)
        super().__init__(concentration.shape[:-1], concentration.shape[-1:], validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self):
        return MaskedSimplex(self.allowed)

    def expand(self, batch_shape, _instance=None):
        shape = torch.Size(batch_shape) + self.event_shape
        return MaskedDirichlet(self.concentration.expand(shape), self.allowed.expand(shape))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        alpha = torch.where(self.allowed, self.concentration, 1)  # masked entries add 0 below
        log_norm = torch.lgamma(alpha).sum(-1) - torch.lgamma(torch.where(self.allowed, alpha, 0).sum(-1))
        return torch.xlogy(alpha - 1, torch.where(self.allowed, value, 1)).sum(-1) - log_norm

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        gamma = torch._standard_gamma(self.concentration.expand(shape)) * self.allowed
        return gamma / gamma.sum(-1, keepdim=True)
