"""Exact HMM loss + gradient: our engine against Pyro's classic enumeration, side by side.

Same ``hmm`` (K=16), same parameters, same data (the jsb training split, full batch):
the family's training loss (``Trace_ELBO``'s, computed directly on the engine's exact
likelihood) versus ``TraceEnum_ELBO`` on the enumerated model
(``trainables.models.classic``), each with its gradient wrt the model's parameters. Prints both times, the ratio and the
machine; also the in-process time to score one chorale.
"""

from __future__ import annotations

import torch
from common import best_time, machine, setup_threads
from pyro.infer import TraceEnum_ELBO

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.classic import classic_hmm_model


def main() -> None:
    setup_threads()
    split = load_dataset("jsb").splits["train"]
    x, lengths = split.x, split.lengths
    model = build_model("hmm", data_dim=88, hidden_dim=16)
    model.set_parameters(**model.init_parameters(x, lengths, torch.Generator().manual_seed(0)))
    params = list(model.parameters())

    def ours():
        loss = model.training_loss(x, lengths)
        return loss, torch.autograd.grad(loss, params)

    classic = classic_hmm_model(model)

    def reference():
        loss = TraceEnum_ELBO(max_plate_nesting=2).differentiable_loss(classic, model.guide, x, lengths)
        return loss, torch.autograd.grad(loss, params)

    (a, _), (b, _) = ours(), reference()
    a, b = a.detach(), b.detach()
    ours_s, reference_s = best_time(ours, 5), best_time(reference, 2)
    one = split.x[:1, : int(lengths[0])], lengths[:1]
    with torch.no_grad():
        score_s = best_time(lambda: model.log_likelihood(*one), 20)
    print(machine())
    print(f"data: jsb train, {x.shape[0]} sequences x {x.shape[1]} frames x 88 keys, K=16")
    print(f"loss agreement: ours {float(a):.6f} vs TraceEnum {float(b):.6f} "
          f"(relative {float(abs(a - b) / abs(b)):.1e})")
    print(f"loss + gradient: ours {ours_s * 1e3:.1f} ms, TraceEnum_ELBO {reference_s * 1e3:.1f} ms, "
          f"ratio {reference_s / ours_s:.1f}x")
    print(f"score one chorale ({int(lengths[0])} frames) in process: {score_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
