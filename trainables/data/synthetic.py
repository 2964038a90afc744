"""Synthetic data sets with known truth: sampled from a model whose parameters are drawn
from a seed, split 60/20/20 like ``jsb``, returned with those true parameters.

- ``synthetic-hmm``: binary frames from a Bernoulli ``hmm``;
- ``synthetic-gaussian-hmm``: real frames from a ``gaussian-hmm``;
- ``synthetic-gmm``: points from a ``gmm`` with per-component, per-dimension scales;
- ``synthetic-categorical-hmm``: one-hot symbols (6 by default) from a ``categorical-hmm``;
- ``synthetic-poisson-hmm``: counts (3 per frame by default) from a ``poisson-hmm``.

Sequences have ragged lengths, uniform between ``length // 2`` and ``length``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import DataError, Dataset, SPLITS, Split, validate_split

SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def _sticky_transition(num_states: int, generator: torch.Generator) -> torch.Tensor:
    """``(K, K)`` rows that stay with probability 0.8 and move uniformly at random else."""
    moves = torch.rand((num_states, num_states), generator=generator) * (1 - torch.eye(num_states))
    return 0.8 * torch.eye(num_states) + 0.2 * moves / moves.sum(-1, keepdim=True).clamp_min(1e-12)


def _chain(K: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "initial": torch.full((K,), 1.0 / K),
        "transition": _sticky_transition(K, generator) if K > 1 else torch.ones(1, 1),
    }


def _bernoulli_hmm(K: int, D: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_chain(K, generator), "emission_probs": 0.05 + 0.9 * torch.rand((K, D), generator=generator)}


def _gaussian_hmm(K: int, D: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        **_chain(K, generator),
        "means": 3.0 * torch.randn((K, D), generator=generator),
        "scales": 0.5 + 0.5 * torch.rand((K, D), generator=generator),
    }


def _categorical_hmm(K: int, V: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    weights = 0.2 + torch.rand((K, V), generator=generator) ** 3  # a few likely symbols per state
    return {**_chain(K, generator), "emission_probs": weights / weights.sum(-1, keepdim=True)}


def _poisson_hmm(K: int, D: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {**_chain(K, generator), "rates": 0.5 + 9.5 * torch.rand((K, D), generator=generator)}


def _gmm(K: int, D: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "weights": torch.full((K,), 1.0 / K),
        "locs": 4.0 * torch.randn((K, D), generator=generator),
        "scales": 0.5 + 0.5 * torch.rand((K, D), generator=generator),
    }


#: data set -> (family it is sampled from, default data_dim, its well-separated true
#: parameters for K states or components and D values)
SYNTHETIC: dict[str, tuple[str, int, Callable[[int, int, torch.Generator], dict[str, torch.Tensor]]]] = {
    "synthetic-hmm": ("hmm", 8, _bernoulli_hmm),
    "synthetic-gaussian-hmm": ("gaussian-hmm", 2, _gaussian_hmm),
    "synthetic-gmm": ("gmm", 2, _gmm),
    "synthetic-categorical-hmm": ("categorical-hmm", 6, _categorical_hmm),
    "synthetic-poisson-hmm": ("poisson-hmm", 3, _poisson_hmm),
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

    if name not in SYNTHETIC:
        raise DataError(f"unknown synthetic data set {name!r}; expected one of {sorted(SYNTHETIC)}")
    family, default_dim, true_parameters = SYNTHETIC[name]
    data_dim = data_dim if data_dim is not None else default_dim
    if length < 2 or hidden_dim < 1 or data_dim < 1:
        raise DataError(f"{name}: need length >= 2, hidden_dim >= 1, data_dim >= 1")
    counts = _split_counts(num_sequences, name)
    generator = torch.Generator().manual_seed(seed)
    truth = true_parameters(hidden_dim, data_dim, generator)
    model = build_model(family, data_dim=data_dim, hidden_dim=hidden_dim)
    model.set_parameters(**truth)
    x, _ = model.sample(num_sequences, length, seed=seed)
    splits: dict[str, Split] = {}
    start = 0
    for split, count in zip(SPLITS, counts):
        part = x[start : start + count]
        lengths = None
        if model.data_kind == "sequences":
            lengths = torch.randint(length // 2, length + 1, (count,), generator=generator)
        splits[split] = validate_split(part, lengths, name, split)
        start += count
    return Dataset(name=name, splits=splits, data_dim=data_dim, truth=truth)
