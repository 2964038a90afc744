"""Synthetic data sets with known truth: sampled from a model whose parameters are drawn
from a seed, split 60/20/20 like ``jsb``, returned with those true parameters.

- ``synthetic-hmm``: binary frames from a Bernoulli ``hmm``;
- ``synthetic-gaussian-hmm``: real frames from a ``gaussian-hmm``;
- ``synthetic-gmm``: points from a ``gmm`` with per-component, per-dimension scales.

Sequences have ragged lengths, uniform between ``length // 2`` and ``length``.
"""

from __future__ import annotations

import torch

from .base import DataError, Dataset, SPLITS, Split, validate_split

FAMILY_OF = {
    "synthetic-hmm": "hmm",
    "synthetic-gaussian-hmm": "gaussian-hmm",
    "synthetic-gmm": "gmm",
}
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def _sticky_transition(num_states: int, generator: torch.Generator) -> torch.Tensor:
    """``(K, K)`` rows that stay with probability 0.8 and move uniformly at random else."""
    moves = torch.rand((num_states, num_states), generator=generator) * (1 - torch.eye(num_states))
    return 0.8 * torch.eye(num_states) + 0.2 * moves / moves.sum(-1, keepdim=True).clamp_min(1e-12)


def true_parameters(family: str, data_dim: int, hidden_dim: int, generator: torch.Generator):
    """Well-separated true parameters of ``family`` for ``hidden_dim`` states/components."""
    K, D = hidden_dim, data_dim
    if family == "gmm":
        return {
            "weights": torch.full((K,), 1.0 / K),
            "locs": 4.0 * torch.randn((K, D), generator=generator),
            "scales": 0.5 + 0.5 * torch.rand((K, D), generator=generator),
        }
    chain = {
        "initial": torch.full((K,), 1.0 / K),
        "transition": _sticky_transition(K, generator) if K > 1 else torch.ones(1, 1),
    }
    if family == "hmm":
        return {**chain, "emission_probs": 0.05 + 0.9 * torch.rand((K, D), generator=generator)}
    return {
        **chain,
        "means": 3.0 * torch.randn((K, D), generator=generator),
        "scales": 0.5 + 0.5 * torch.rand((K, D), generator=generator),
    }


def _split_counts(total: int, name: str) -> list[int]:
    counts = [int(total * fraction) for fraction in SPLIT_FRACTIONS[1:]]
    counts.insert(0, total - sum(counts))
    if min(counts) < 1:
        raise DataError(f"{name}: num_sequences={total} is too few for a 60/20/20 split (need >= 5)")
    return counts


def load_synthetic(
    name: str,
    num_sequences: int = 200,
    length: int = 50,
    data_dim: int | None = None,
    hidden_dim: int = 3,
    seed: int = 0,
) -> Dataset:
    """Sample data set ``name`` from a seeded model: ``num_sequences`` sequences (points,
    for ``synthetic-gmm``) in all, frames of ``data_dim`` values (default 8 binary keys for
    ``synthetic-hmm``, 2 otherwise), ``hidden_dim`` states or components."""
    from ..models import build_model

    if name not in FAMILY_OF:
        raise DataError(f"unknown synthetic data set {name!r}; expected one of {sorted(FAMILY_OF)}")
    family = FAMILY_OF[name]
    data_dim = data_dim if data_dim is not None else (8 if family == "hmm" else 2)
    if length < 2 or hidden_dim < 1 or data_dim < 1:
        raise DataError(f"{name}: need length >= 2, hidden_dim >= 1, data_dim >= 1")
    counts = _split_counts(num_sequences, name)
    generator = torch.Generator().manual_seed(seed)
    truth = true_parameters(family, data_dim, hidden_dim, generator)
    model = build_model(family, data_dim=data_dim, hidden_dim=hidden_dim)
    model.set_parameters(**truth)
    x, _ = model.sample(num_sequences, length, seed=seed)
    splits: dict[str, Split] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        part = x[start : start + count]
        lengths = None
        if family != "gmm":
            lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
        splits[split] = validate_split(part, lengths, name, split)
        start += count
    return Dataset(name=name, splits=splits, data_dim=data_dim, truth=truth)
