"""The classic Pyro forms of ``hmm``, ``nnhmm`` and ``gmm``: hidden states and assignments
as enumerated sample sites under ``TraceEnum_ELBO`` (Pyro's ``examples/hmm.py`` model_1
with a learned initial distribution, its model_5 likewise, and the GMM tutorial). They are the references the tests
and benchmarks hold the exact engine to: with the same ``AutoDelta`` guide their loss
equals the family's own ``model``'s to rounding.
"""

from __future__ import annotations

from typing import Callable

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine
from pyro.ops.indexing import Vindex

from .gmm import GaussianMixture
from .hmm import BernoulliHMM, NeuralHMM


def classic_hmm_model(hmm: BernoulliHMM) -> Callable[..., None]:
    """A Pyro model over the same priors and sites as ``hmm.model``, to use with
    ``hmm.guide`` and ``TraceEnum_ELBO(max_plate_nesting=2)``.

    The returned callable takes ``x`` ``(N, T, D)``, ``lengths`` ``(N,)`` and ``scale``.
    """

    def model(x: torch.Tensor, lengths: torch.Tensor, scale: float = 1.0) -> None:
        params = hmm._sample_parameters()
        initial, transition = params["initial"], params["transition"]
        emission_probs = params["emission_probs"]
        num_sequences, num_frames, data_dim = x.shape
        keys = pyro.plate("keys", data_dim, dim=-1)
        with poutine.scale(scale=scale), pyro.plate("sequences", num_sequences, dim=-2):
            state = None
            for t in pyro.markov(range(num_frames)):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    probs = initial if state is None else transition[state]
                    state = pyro.sample(
                        f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                    )
                    with keys:
                        pyro.sample(
                            f"x_{t}",
                            dist.Bernoulli(emission_probs[state.squeeze(-1)]),
                            obs=x[:, t],
                        )

    return model


def classic_nnhmm_model(nnhmm: NeuralHMM) -> Callable[..., None]:
    """model_5's form of ``nnhmm``: the state enumerated at every frame, the keys emitted
    by the family's own network of the state and the previous frame (``nnhmm.tones``,
    registered with ``pyro.module`` so that SVI trains it). For ``nnhmm.guide`` and
    ``TraceEnum_ELBO(max_plate_nesting=2)``; same arguments as :func:`classic_hmm_model`."""

    def model(x: torch.Tensor, lengths: torch.Tensor, scale: float = 1.0) -> None:
        pyro.module("tones", nnhmm.tones)
        params = nnhmm._sample_parameters()
        initial, transition = params["initial"], params["transition"]
        num_sequences, num_frames, data_dim = x.shape
        with poutine.scale(scale=scale), pyro.plate("sequences", num_sequences, dim=-2):
            state, previous = None, torch.zeros_like(x[:, 0])
            for t in pyro.markov(range(num_frames)):
                with poutine.mask(mask=(t < lengths).unsqueeze(-1)):
                    probs = initial if state is None else transition[state]
                    state = pyro.sample(
                        f"z_{t}", dist.Categorical(probs), infer={"enumerate": "parallel"}
                    )
                    logits = Vindex(nnhmm.tones(previous))[..., state.squeeze(-1), :]  # (..., N, D)
                    with pyro.plate(f"keys_{t}", data_dim, dim=-1):  # each frame's keys: a plate of their own
                        pyro.sample(f"x_{t}", dist.Bernoulli(logits=logits), obs=x[:, t])
                previous = x[:, t]

    return model


def classic_gmm_model(gmm: GaussianMixture) -> Callable[..., None]:
    """The GMM tutorial's form of ``gmm``: an enumerated assignment site per point, for
    ``gmm.guide`` and ``TraceEnum_ELBO(max_plate_nesting=1)``; takes ``x`` ``(N, D)``,
    ``lengths`` (unused) and ``scale``."""

    def model(x: torch.Tensor, lengths: None = None, scale: float = 1.0) -> None:
        params = gmm._sample_parameters()
        scales = gmm.component_scales(params["scales"])
        with poutine.scale(scale=scale), pyro.plate("points", x.shape[0]):
            assignment = pyro.sample(
                "assignment", dist.Categorical(params["weights"]), infer={"enumerate": "parallel"}
            )
            pyro.sample(
                "obs",
                dist.Normal(params["locs"][assignment], scales[assignment]).to_event(1),
                obs=x,
            )

    return model
