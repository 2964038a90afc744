"""The classic Pyro form of ``hmm``: hidden states as enumerated sample sites under
``TraceEnum_ELBO`` (Pyro's ``examples/hmm.py`` model_1, with a learned initial
distribution). It is the reference the tests and benchmarks hold the engine to: with the
same ``AutoDelta`` guide its loss equals ``BernoulliHMM.model``'s to rounding.
"""

from __future__ import annotations

from typing import Callable

import pyro
import torch
from pyro import distributions as dist
from pyro import poutine

from .hmm import BernoulliHMM


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
