"""Best-of-100 initialisation screening: ours against the GMM tutorial's loop, side by side.

Reference (the seed document's 100-seed search): for each seed, a fresh ``AutoDelta`` guide
with the tutorial's ``init_loc_fn`` on its enumerated 2-D mixture model and one
``svi.loss`` under ``TraceEnum_ELBO``. Ours: ``trainables.svi.screen_initializations``,
the same 100 draws scored in batched passes of the family's exact likelihood. Same data
(``synthetic-gmm`` train split, 2-D, K=3, global variance). Prints both, the ratio and
the machine.
"""

from __future__ import annotations

import time

import pyro
import pyro.distributions as dist
import torch
from common import machine, setup_threads
from pyro import poutine
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoDelta
from pyro.optim import Adam

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.svi import screen_initializations

K, NUM = 3, 100


def tutorial_search(data: torch.Tensor) -> float:
    """The tutorial's ``min((initialize(seed), seed) for seed in range(100))``; seconds."""

    @config_enumerate
    def model(points):
        weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 0.5))
        with pyro.plate("dims", points.shape[1]), pyro.plate("components", K, dim=-2):
            locs = pyro.sample("locs", dist.Normal(0.0, 4.0))
        with pyro.plate("data", len(points)):
            assignment = pyro.sample("assignment", dist.Categorical(weights))
            pyro.sample("obs", dist.Normal(locs[assignment], scale).to_event(1), obs=points)

    def init_loc_fn(site):
        if site["name"] == "weights":
            return torch.ones(K) / K
        if site["name"] == "scale":
            return (data.var() / 2).sqrt()
        return data[torch.multinomial(torch.ones(len(data)) / len(data), K)]

    def initialize(seed: int) -> float:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
        guide = AutoDelta(poutine.block(model, expose=["weights", "locs", "scale"]), init_loc_fn=init_loc_fn)
        svi = SVI(model, guide, Adam({"lr": 0.1}), loss=TraceEnum_ELBO(max_plate_nesting=2))
        return svi.loss(model, guide, data)

    started = time.perf_counter()
    min((initialize(seed), seed) for seed in range(NUM))
    return time.perf_counter() - started


def our_search(split) -> float:
    model = build_model("gmm", data_dim=split.x.shape[1], hidden_dim=K, variance="global")
    started = time.perf_counter()
    screen_initializations(model, split, NUM, torch.Generator().manual_seed(0))
    return time.perf_counter() - started


def main() -> None:
    setup_threads()
    split = load_dataset("synthetic-gmm", num_sequences=500, hidden_dim=K).splits["train"]
    our_search(split)
    ours = min(our_search(split) for _ in range(3))
    reference = tutorial_search(split.x)
    print(machine())
    print(f"gmm K={K}, {split.x.shape[0]} 2-D points, best of {NUM} initialisations")
    print(f"screening: ours {ours * 1e3:.1f} ms, tutorial loop {reference * 1e3:.0f} ms, ratio {reference / ours:.1f}x")


if __name__ == "__main__":
    main()
