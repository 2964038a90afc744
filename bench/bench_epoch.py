"""A full training epoch of ``hmm`` and of ``nnhmm`` on ``jsb``: ours against the recipes
of Pyro's ``examples/hmm.py``, model_1 and model_5, side by side at the same batch size, K
and network sizes.

Both sides do the same work, training only (no validation pass), from the same
parameters (the network's weights included) through the same shuffled minibatches of 20
sequences trimmed to their longest, with the same priors, ``AutoDelta`` guide and
``ClippedAdam`` settings. Reference: the enumerated model (``trainables.models.classic``)
under ``TraceEnum_ELBO``, one ``svi.step`` per minibatch, as the example does. Ours:
``Trainer.train_epoch`` (the direct MAP loss on the exact engine). Prints both epoch
times, the mean training losses of the epoch (the same numbers), the ratio and the
machine. ``nnhmm``'s time is mostly its network's, on both sides.
"""

from __future__ import annotations

import time

import pyro
import torch
from common import machine, setup_threads
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.optim import ClippedAdam

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.classic import classic_hmm_model, classic_nnhmm_model
from trainables.settings import TrainConfig
from trainables.svi import Trainer, batches, num_frames

BATCH_SIZE, HIDDEN_DIM, LR = 20, 16, 0.05
CLASSIC = {"hmm": classic_hmm_model, "nnhmm": classic_nnhmm_model}  # model_1, model_5


def fresh(family: str):
    """The family at K=16 with the same network weights every time (seeded)."""
    torch.manual_seed(0)
    return build_model(family, data_dim=88, hidden_dim=HIDDEN_DIM)


def start(family: str, split) -> dict[str, torch.Tensor]:
    return fresh(family).init_parameters(split.x, split.lengths, torch.Generator().manual_seed(0))


def reference_epoch(family: str, data) -> tuple[float, float]:
    """One epoch of the classic recipe: its mean loss per frame and its seconds."""
    split = data.splits["train"]
    model = fresh(family)
    model.set_parameters(**start(family, split))
    pyro.clear_param_store()
    svi = SVI(CLASSIC[family](model), model.guide, ClippedAdam({"lr": LR}), TraceEnum_ELBO(max_plate_nesting=2))
    started = time.perf_counter()
    losses = [
        svi.step(x, lengths, scale=split.x.shape[0] / x.shape[0])
        for x, lengths in batches(split, BATCH_SIZE, torch.Generator().manual_seed(0))
    ]
    seconds = time.perf_counter() - started
    return sum(losses) / len(losses) / num_frames(split), seconds


def our_epoch(family: str, data) -> tuple[float, float]:
    """One epoch of ``Trainer`` from the same start (its batch order is seeded alike)."""
    model = fresh(family)
    config = TrainConfig(epochs=1, batch_size=BATCH_SIZE, lr=LR, seed=0)
    trainer = Trainer(model, data, config, initial_parameters=start(family, data.splits["train"]))
    started = time.perf_counter()
    loss = trainer.train_epoch()
    return float(loss[0]), time.perf_counter() - started


def main() -> None:
    setup_threads()
    data = load_dataset("jsb")
    print(machine())
    print(f"jsb, {data.splits['train'].x.shape[0]} training chorales, K={HIDDEN_DIM}, batch {BATCH_SIZE}")
    for family, repeats in (("hmm", 3), ("nnhmm", 1)):
        our_epoch(family, data)  # warm-up
        # Interleaved, so that both sides' best times come from the machine's quieter moments.
        ours_runs, reference_runs = [], []
        for _ in range(repeats):
            ours_runs += [our_epoch(family, data) for _ in range(4)]
            reference_runs.append(reference_epoch(family, data))
        (ours_loss, _), (reference_loss, _) = ours_runs[0], reference_runs[0]
        ours = min(seconds for _, seconds in ours_runs)
        reference = min(seconds for _, seconds in reference_runs)
        print(f"{family}: mean training loss of the epoch: ours {ours_loss:.6f}, recipe {reference_loss:.6f} "
              f"(relative {abs(ours_loss - reference_loss) / abs(reference_loss):.1e})")
        print(f"{family}: one training epoch: ours {ours * 1e3:.1f} ms, examples/hmm.py recipe {reference:.2f} s, "
              f"ratio {reference / ours:.1f}x")


if __name__ == "__main__":
    main()
