"""The model zoo: every family built by name through :func:`build_model`; a new family
(a :class:`SequenceModel` subclass that sets the declarations of :mod:`.contract`) joins
it through :func:`register_family`."""

from __future__ import annotations

import importlib
from typing import Any

import pyro

from .base import MapModel, SequenceModel
from .contract import Hyperparameters
from .discrete_hmm import CategoricalHMM, PoissonHMM
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

FAMILIES: dict[str, type[SequenceModel]] = {}


def register_family(cls: type[SequenceModel]) -> type[SequenceModel]:
    """Make ``cls`` buildable by its ``family`` name everywhere (training, sweep files,
    serving, the CLI); usable as a class decorator. Refuses a name already taken by
    another class and a class missing a declaration."""
    missing = [name for name in ("family", "observation", "latent") if not hasattr(cls, name)]
    if missing:
        raise TypeError(f"{cls.__name__}: a model family must declare {', '.join(missing)}")
    taken = FAMILIES.get(cls.family)
    if taken is not None and taken is not cls:
        raise ValueError(f"model family {cls.family!r} is already registered by {taken.__name__}")
    FAMILIES[cls.family] = cls
    return cls


for _family in (
        BernoulliHMM,
        AutoregressiveHMM,
        FactorialHMM,
        PartiallyFactorialHMM,
        SecondOrderHMM,
        NeuralHMM,
        GaussianHMM,
        CategoricalHMM,
        PoissonHMM,
        DeepMarkovModel,
        GaussianMixture,
):
    register_family(_family)


def family_class(family: str, module: str | None = None) -> type[SequenceModel]:
    """The class registered as ``family``, importing ``module`` first (the module that
    registers it: how a family defined outside ``trainables`` reaches Ray workers and
    Serve replicas) when it is not registered yet."""
    if family not in FAMILIES and module is not None:
        importlib.import_module(module)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[family]


def build_model(family: str, data_dim: int, hidden_dim: int, **hparams: Any) -> SequenceModel:
    """Build a model of ``family`` for ``data_dim``-dimensional frames and ``hidden_dim``
    states (or mixture components, or latent dimensions for ``dmm``)."""
    return family_class(family)(data_dim, hidden_dim, **hparams)


__all__ = [
    "FAMILIES",
    "Hyperparameters",
    "MapModel",
    "SequenceModel",
    "build_model",
    "family_class",
    "register_family",
]
