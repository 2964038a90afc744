"""R restarts of ``hmm`` on ``jsb`` trained together as one batched model against the same
R runs one after another, side by side.

Same R starts (the best R of 4R screened draws), same settings, same minibatches; each
side trains every candidate for the same number of epochs, validation included (no early
stopping, so the work is equal). Ours: one ``Trainer`` given the R starts (parameters
stacked ``(R, ...)``). Reference: R ``Trainer`` s, one per start. Prints both times, the
largest relative difference of the candidates' validation NLLs, the ratio and the
machine.
"""

from __future__ import annotations

import time

import torch
from common import machine, setup_threads

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.settings import TrainConfig
from trainables.svi import Trainer, screen_initializations

R, HIDDEN_DIM, EPOCHS = 8, 16, 3
CONFIG = TrainConfig(epochs=EPOCHS, batch_size=20, lr=0.05, patience=None)


def run(data, starts) -> tuple[list[float], float]:
    """Train one trainer from ``starts`` to the end: last validation NLL of every
    candidate, and seconds."""
    trainer = Trainer(build_model("hmm", data_dim=88, hidden_dim=HIDDEN_DIM), data, CONFIG, starts)
    started = time.perf_counter()
    while not trainer.done:
        trainer.run_epoch()
    return [candidate.history[-1].valid_nll for candidate in trainer.candidates], time.perf_counter() - started


def main() -> None:
    setup_threads()
    data = load_dataset("jsb")
    model = build_model("hmm", data_dim=88, hidden_dim=HIDDEN_DIM)
    _, starts = screen_initializations(model, data.splits["train"], 4 * R, torch.Generator().manual_seed(0), keep=R)
    run(data, starts[:2])  # warm-up
    batched, sequential = [], []
    for _ in range(2):
        batched.append(run(data, starts))
        sequential.append([run(data, start) for start in starts])
    ours = min(seconds for _, seconds in batched)
    reference = min(sum(seconds for _, seconds in runs) for runs in sequential)
    ours_nll = torch.tensor(batched[0][0])
    reference_nll = torch.tensor([nll for nlls, _ in sequential[0] for nll in nlls])
    difference = float(((ours_nll - reference_nll).abs() / reference_nll.abs()).max())
    print(machine())
    print(f"hmm K={HIDDEN_DIM} on jsb, R={R} restarts, {EPOCHS} epochs each (batch 20, validation included)")
    print(f"candidates' validation NLL: batched vs one by one, largest relative difference {difference:.1e}")
    print(f"R={R} restarts: batched {ours:.2f} s, one after another {reference:.2f} s, ratio {reference / ours:.1f}x")


if __name__ == "__main__":
    main()
