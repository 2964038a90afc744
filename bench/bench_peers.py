"""The exact engine against hmmlearn's ``GaussianHMM`` (diagonal, C++ recursions) and
dynamax (JAX), side by side in one run, one thread: score, Viterbi and posterior with the
same parameters on (a) N=200 sequences of T=500 frames, K=8 states, D=4 and (b) N=16,
T=10,000, K=4, D=2.

Ours is the whole call a ``gaussian-hmm`` makes: its emission factors
(``gaussian_log_probs``) and the recursion of ``trainables.inference``, on the compiled
path and on the PyTorch path (``PYROSWEEP_ENGINE``), float64 and float32. hmmlearn
computes its own emissions inside each call; so does dynamax, whose ``hmm_filter``,
``hmm_posterior_mode`` and ``hmm_smoother`` (which, like ours, also sums the expected
transitions) are
vmapped over sequences and jitted with the emission, timed after compilation (the compile
time is printed apart). dynamax is in the ``bench`` extra (``pip install -c
constraints.txt -e ".[bench]"``); without it its columns are left out. Prints the best of
5 in ms, the ratios to hmmlearn and dynamax, and how far our float64 log-likelihood is
from hmmlearn's.
"""

from __future__ import annotations

import importlib.util
import os
import time

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np
import torch
from common import best_time, machine, setup_threads
from hmmlearn.hmm import GaussianHMM

from trainables import inference
from trainables.engines import ENGINE_ENV
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


def dynamax(model: GaussianHMM, x: np.ndarray, bits: int) -> dict[str, tuple[float, float]]:
    """dynamax's score, Viterbi and posterior of ``x`` (N, T, D) under ``model``'s
    parameters in ``bits``-bit floats: ``{method: (best seconds, compile seconds)}``."""
    import jax
    import jax.numpy as jnp
    from dynamax.hidden_markov_model.inference import hmm_filter, hmm_posterior_mode, hmm_smoother

    jax.config.update("jax_enable_x64", True)
    dtype = jnp.float64 if bits == 64 else jnp.float32
    init, trans = jnp.asarray(model.startprob_, dtype), jnp.asarray(model.transmat_, dtype)
    means = jnp.asarray(model.means_, dtype)
    scales = jnp.asarray(np.sqrt(np.diagonal(model.covars_, axis1=1, axis2=2)), dtype)
    frames = jnp.asarray(x, dtype)

    def emit(sequence):  # (T, D) -> (T, K)
        return jax.scipy.stats.norm.logpdf(sequence[:, None, :], means, scales).sum(-1)

    methods = {
        "score": lambda seq: hmm_filter(init, trans, emit(seq)).marginal_loglik,
        "viterbi": lambda seq: hmm_posterior_mode(init, trans, emit(seq)),
        "posterior": lambda seq: hmm_smoother(init, trans, emit(seq)).smoothed_probs,
    }
    times = {}
    for method, per_sequence in methods.items():
        call = jax.jit(jax.vmap(per_sequence))
        started = time.perf_counter()
        call(frames).block_until_ready()
        first = time.perf_counter() - started
        best = best_time(lambda: call(frames).block_until_ready(), REPEATS, warmup=False)
        times[method] = best, first - best
    return times


def main() -> None:
    setup_threads()
    print(machine())
    with_dynamax = importlib.util.find_spec("dynamax") is not None
    if not with_dynamax:
        print('dynamax is not installed (pip install -c constraints.txt -e ".[bench]"): its columns are left out')
    columns = ["hmmlearn", "compiled64", "compiled32", "torch64", "torch32"] + (["dynamax64", "dynamax32"] if with_dynamax else [])
    print(f"best of {REPEATS} in ms; ratio = peer time / ours (above 1: ours is faster)")
    print(f"{'shape':<6} {'method':<10}" + "".join(f"{name:>11}" for name in columns) + "  hmmlearn/compiled64, /compiled32" + (", dynamax64/compiled64, dynamax32/compiled32" if with_dynamax else ""))
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
        times = {(method, "hmmlearn"): best_time(call, REPEATS) * 1e3 for method, call in theirs.items()}
        for engine in ("compiled", "torch"):
            os.environ[ENGINE_ENV] = engine
            for bits, dtype in ((64, torch.float64), (32, torch.float32)):
                for method, call in ours(model, x, dtype).items():
                    times[method, f"{engine}{bits}"] = best_time(call, REPEATS) * 1e3
        compile_s = {}
        for bits in (64, 32) if with_dynamax else ():
            for method, (best, compiling) in dynamax(model, x, bits).items():
                times[method, f"dynamax{bits}"], compile_s[method, bits] = best * 1e3, compiling
        os.environ[ENGINE_ENV] = "compiled"
        gap = abs(float(ours(model, x, torch.float64)["score"]().sum()) - model.score(flat, lengths))
        for method in theirs:
            row = {name: times[method, name] for name in columns}
            pairs = [("hmmlearn", "compiled64"), ("hmmlearn", "compiled32")]
            pairs += [("dynamax64", "compiled64"), ("dynamax32", "compiled32")] if with_dynamax else []
            ratios = ", ".join(f"{row[peer_name] / row[name]:.2f}x" for peer_name, name in pairs)
            print(f"({label})    {method:<10}" + "".join(f"{row[name]:11.1f}" for name in columns) + f"  {ratios}")
        print(f"({label})    |log p ours float64 - hmmlearn| = {gap:.1e} nats")
        if with_dynamax:
            print(f"({label})    dynamax compile s (64 / 32 bit): " + ", ".join(f"{method} {compile_s[method, 64]:.2f} / {compile_s[method, 32]:.2f}" for method in theirs))


if __name__ == "__main__":
    main()
