"""The exact engine against hmmlearn's ``GaussianHMM`` (diagonal, C++ recursions), side by
side in one run, one thread: score, Viterbi and posterior with the same parameters on
(a) N=200 sequences of T=500 frames, K=8 states, D=4 and (b) N=16, T=10,000, K=4, D=2.

Ours is the whole call a ``gaussian-hmm`` makes: its emission factors
(``gaussian_log_probs``) and the recursion of ``trainables.inference``, on the compiled
path and on the PyTorch path (``PYROSWEEP_ENGINE``), float64 and float32. hmmlearn computes
its own emissions inside each call. Prints the best of 5 in ms, the ratios to hmmlearn,
and how far our float64 log-likelihood is from hmmlearn's.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from common import best_time, machine, setup_threads
from hmmlearn.hmm import GaussianHMM

from trainables import inference
from trainables.models.gaussian_hmm import gaussian_log_probs

SHAPES = {"a": (200, 500, 8, 4), "b": (16, 10_000, 4, 2)}
REPEATS = 5


def peer(num_states: int, dim: int, rng: np.random.Generator) -> GaussianHMM:
    """A ``GaussianHMM`` with set (random, well-separated) parameters."""
    model = GaussianHMM(num_states, covariance_type="diag")
    model.startprob_ = rng.dirichlet(np.ones(num_states) * 5)
    model.transmat_ = rng.dirichlet(np.ones(num_states) * 5, num_states)
    model.means_ = rng.normal(scale=2.0, size=(num_states, dim))
    model.covars_ = rng.uniform(0.5, 2.0, size=(num_states, dim))
    model.n_features = dim
    return model


def ours(model: GaussianHMM, x: np.ndarray, dtype: torch.dtype):
    """Our score, Viterbi and posterior of ``x`` (N, T, D) under ``model``'s parameters."""
    as_tensor = lambda array: torch.tensor(array, dtype=dtype)  # noqa: E731
    log_init, log_trans = as_tensor(np.log(model.startprob_)), as_tensor(np.log(model.transmat_))
    means = as_tensor(model.means_)
    scales = as_tensor(np.sqrt(np.diagonal(model.covars_, axis1=1, axis2=2)))  # covars_ reads back (K, D, D)
    frames = as_tensor(x)
    lengths = torch.full((x.shape[0],), x.shape[1])

    def emit() -> torch.Tensor:
        return gaussian_log_probs(frames, means, scales)

    return {
        "score": lambda: inference.log_likelihood_steps(log_init, log_trans, emit(), lengths).sum(-1),
        "viterbi": lambda: inference.viterbi(log_init, log_trans, emit(), lengths),
        "posterior": lambda: inference.posterior_marginals(log_init, log_trans, emit(), lengths),
    }


def main() -> None:
    setup_threads()
    print(machine())
    print(f"best of {REPEATS} in ms; ratio = hmmlearn time / ours (above 1: ours is faster)")
    print(f"{'shape':<6} {'method':<10} {'hmmlearn':>9} {'compiled64':>11} {'compiled32':>11} {'torch64':>9} {'torch32':>9}  ratios (compiled64, compiled32, torch64)")
    for label, (num, frames, states, dim) in SHAPES.items():
        rng = np.random.default_rng(0)
        model = peer(states, dim, rng)
        x = rng.normal(scale=2.0, size=(num, frames, dim))
        flat, lengths = x.reshape(-1, dim), [frames] * num
        theirs = {
            "score": lambda: model.score(flat, lengths),
            "viterbi": lambda: model.decode(flat, lengths),
            "posterior": lambda: model.predict_proba(flat, lengths),
        }
        times = {}
        for engine in ("compiled", "torch"):
            os.environ[inference.ENGINE_ENV] = engine
            for bits, dtype in ((64, torch.float64), (32, torch.float32)):
                for method, call in ours(model, x, dtype).items():
                    times[method, f"{engine}{bits}"] = best_time(call, REPEATS) * 1e3
        os.environ[inference.ENGINE_ENV] = "compiled"
        gap = abs(float(ours(model, x, torch.float64)["score"]().sum()) - model.score(flat, lengths))
        for method, call in theirs.items():
            reference = best_time(call, REPEATS) * 1e3
            row = [times[method, name] for name in ("compiled64", "compiled32", "torch64", "torch32")]
            ratios = ", ".join(f"{reference / t:.2f}x" for t in row[:3])
            print(f"({label})    {method:<10} {reference:9.1f} {row[0]:11.1f} {row[1]:11.1f} {row[2]:9.1f} {row[3]:9.1f}  {ratios}")
        print(f"({label})    |log p ours float64 - hmmlearn| = {gap:.1e} nats")


if __name__ == "__main__":
    main()
