"""The model zoo: every family built by name through :func:`build_model`."""

from __future__ import annotations

from typing import Any

import pyro

from .base import MapModel, SequenceModel
from .dmm import DeepMarkovModel
from .gaussian_hmm import GaussianHMM
from .gmm import GaussianMixture
from .hmm import (
    AutoregressiveHMM,
    BernoulliHMM,
    FactorialHMM,
    NeuralHMM,
    PartiallyFactorialHMM,
    SecondOrderHMM,
)

# Parameters live in their PyroModule (state_dict checkpoints), never in Pyro's global
# param store: two models in one process (tests, a serving replica) cannot collide.
pyro.settings.set(module_local_params=True)

FAMILIES: dict[str, type[SequenceModel]] = {
    cls.family: cls
    for cls in (
        BernoulliHMM,
        AutoregressiveHMM,
        FactorialHMM,
        PartiallyFactorialHMM,
        SecondOrderHMM,
        NeuralHMM,
        GaussianHMM,
        DeepMarkovModel,
        GaussianMixture,
    )
}


def build_model(family: str, data_dim: int, hidden_dim: int, **hparams: Any) -> SequenceModel:
    """Build a model of ``family`` for ``data_dim``-dimensional frames and ``hidden_dim``
    states (or mixture components, or latent dimensions for ``dmm``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    cls = FAMILIES[family]
    unknown = sorted(set(hparams) - set(cls.hparam_names()))
    if unknown:
        raise ValueError(
            f"{family}: unknown hyperparameter(s) {unknown}; "
            f"expected some of {sorted(cls.hparam_names())}"
        )
    return cls(data_dim, hidden_dim, **hparams)


__all__ = ["FAMILIES", "MapModel", "SequenceModel", "build_model"]
