"""Exact HMM loss + gradient: our engine against Pyro's classic enumeration, side by side.

Same ``hmm`` (K=16), same parameters, same data (the jsb training split, full batch):
``Trace_ELBO`` on the engine's exact likelihood versus ``TraceEnum_ELBO`` on the
enumerated model (``trainables.models.classic``). Prints both times, the ratio and the
machine; also the in-process time to score one chorale.
"""

from __future__ import annotations

import os
import platform
import time

import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.classic import classic_hmm_model


def best_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    split = load_dataset("jsb").splits["train"]
    x, lengths = split.x, split.lengths
    model = build_model("hmm", data_dim=88, hidden_dim=16)
    model.set_parameters(**model.init_parameters(x, lengths, torch.Generator().manual_seed(0)))
    params = list(model.parameters())

    def ours():
        loss = Trace_ELBO().differentiable_loss(model.model, model.guide, x, lengths)
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
    print(f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"data: jsb train, {x.shape[0]} sequences x {x.shape[1]} frames x 88 keys, K=16")
    print(f"loss agreement: ours {float(a):.6f} vs TraceEnum {float(b):.6f} "
          f"(relative {float(abs(a - b) / abs(b)):.1e})")
    print(f"loss + gradient: ours {ours_s * 1e3:.1f} ms, TraceEnum_ELBO {reference_s * 1e3:.1f} ms, "
          f"ratio {reference_s / ours_s:.1f}x")
    print(f"score one chorale ({int(lengths[0])} frames) in process: {score_s * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
