"""EM (``train: {method: em}``) against hmmlearn's EM and against our SVI, side by side.

1. Gaussian HMMs, diagonal and full (K=8, D=4, 200 x 500 frames sampled from a random
   one), and a categorical HMM (K=8, 6 symbols): our EM and hmmlearn's ``fit`` from the
   same start, with priors under which the two objectives coincide (diag: hmmlearn's
   ``means_weight=0, covars_prior=0, covars_weight=2``; full: its inverse-Wishart mode
   set to ours; categorical: flat; unit start and transition priors; ours: the same).
   hmmlearn runs to its tolerance (1e-4 absolute on the log-likelihood) or 200 iterations; we count our
   iterations until our log-likelihood reaches its final one.
2. EM against SVI with the same priors and the same start (the best of 10 screened
   initialisations): ``gaussian-hmm`` K=3 on ``synthetic-gaussian-hmm`` and ``hmm`` K=16 on
   ``jsb``. SVI runs to its early stop (patience 10, at most 300 epochs, batch 20,
   lr 0.05); EM's wall time is until its validation NLL comes within 0.01 nats per frame
   of SVI's best; SVI's until its best epoch; both with the validation pass of every
   epoch (iteration) counted, as a trial runs.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import machine, setup_threads
from hmmlearn.hmm import CategoricalHMM, GaussianHMM

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.settings import TrainConfig
from trainables.svi import Trainer, screen_initializations

K, D, N, T = 8, 4, 200, 500
WITHIN = 0.01  # nats per frame


def _peer_case(kind: str, rng: np.random.Generator):
    """hmmlearn's model (set to a random start, priors that make its objective ours), our
    model with the same priors, our start ``{name: (1, ...)}``, the data in both layouts."""
    flat = {"prior_sticky": 1e-300, "prior_smooth": 1.0}
    chain = {"initial": np.full(K, 1 / K), "transition": rng.dirichlet(np.ones(K) * 5, K)}
    if kind == "categorical":
        V = 6
        truth = CategoricalHMM(K)
        truth.startprob_, truth.transmat_ = rng.dirichlet(np.ones(K) * 5), rng.dirichlet(np.ones(K) * 5, K)
        truth.emissionprob_ = rng.dirichlet(np.ones(V), K)
        symbols, _ = truth.sample(N * T, random_state=0)
        theirs = CategoricalHMM(K, n_iter=200, tol=1e-4, init_params="", params="ste", emissionprob_prior=1.0,
                                implementation="scaling")
        start = {**chain, "emission_probs": rng.dirichlet(np.ones(V) * 5, K)}
        theirs.emissionprob_ = start["emission_probs"]
        ours = build_model("categorical-hmm", data_dim=V, hidden_dim=K, prior_emission=1.0, **flat)
        frames = np.eye(V)[symbols[:, 0]].reshape(N, T, V)
        return theirs, ours, start, frames, symbols
    truth = GaussianHMM(K, covariance_type="diag")
    truth.startprob_, truth.transmat_ = rng.dirichlet(np.ones(K) * 5), rng.dirichlet(np.ones(K) * 5, K)
    truth.means_, truth.covars_ = rng.normal(scale=2.0, size=(K, D)), rng.uniform(0.5, 2.0, size=(K, D))
    x, _ = truth.sample(N * T, random_state=0)
    start = {**chain, "means": x[rng.choice(N * T, K, replace=False)]}
    if kind == "diag":
        start["scales"] = np.ones((K, D)) * x.std(0)
        priors = {"means_weight": 0.0, "covars_prior": 0.0, "covars_weight": 2.0}
        ours = build_model("gaussian-hmm", data_dim=D, hidden_dim=K, prior_mean_scale=1e12, prior_log_scale=1e12, **flat)
        covars = start["scales"] ** 2
    else:  # full: an inverse-Wishart mode on both sides (tests/test_references.py)
        start["scale_tril"] = np.repeat(np.linalg.cholesky(np.cov(x.T))[None], K, 0)
        ours = build_model("gaussian-hmm", data_dim=D, hidden_dim=K, covariance="full", prior_mean_scale=1e12, **flat)
        priors = {"means_weight": 0.0, "covars_prior": ours.hparams.prior_covariance_scale * np.eye(D),
                  "covars_weight": ours.inverse_wishart_df + 2 * D + 1}
        covars = start["scale_tril"] @ start["scale_tril"].transpose(0, 2, 1)
    theirs = GaussianHMM(K, covariance_type=kind, n_iter=200, tol=1e-4, init_params="", params="stmc",
                         implementation="scaling", **priors)
    theirs.means_, theirs.covars_ = start["means"], covars
    return theirs, ours, start, x.reshape(N, T, D), x


def against_hmmlearn(kind: str) -> None:
    rng = np.random.default_rng(0)
    theirs, ours, start, frames, observations = _peer_case(kind, rng)
    theirs.startprob_, theirs.transmat_ = start["initial"], start["transition"]
    started = time.perf_counter()
    theirs.fit(observations, [T] * N)
    their_s, their_iterations = time.perf_counter() - started, theirs.monitor_.iter
    target = theirs.score(observations, [T] * N)

    model = ours.double()
    frames, lengths = torch.from_numpy(frames), torch.full((N,), T)
    params = {name: torch.from_numpy(value).unsqueeze(0) for name, value in start.items()}
    model.em_step(params, frames[:2], lengths[:2])  # compile
    iterations, started = 0, time.perf_counter()
    while iterations < 1000:
        new, log_likelihood = model.em_step(params, frames, lengths)
        if float(log_likelihood.sum()) >= target:  # the start of this iteration is as good as theirs
            break
        params, iterations = new, iterations + 1
    our_s = time.perf_counter() - started
    width = "V=6 symbols" if kind == "categorical" else f"Gaussian {kind}, D={D}"
    print(f"{width}, K={K}, {N} x {T} frames, to hmmlearn's final log-likelihood {target:.3f}:")
    print(f"  hmmlearn: {their_iterations} iterations, {their_s:.2f} s, {their_s / their_iterations * 1e3:.1f} ms each")
    print(f"  ours:     {iterations} iterations, {our_s:.2f} s, {our_s / max(iterations, 1) * 1e3:.1f} ms each"
          f"  (per iteration {their_s / their_iterations / (our_s / max(iterations, 1)):.1f}x faster)")


def against_svi(family: str, data_name: str, hidden_dim: int, **options) -> None:
    data = load_dataset(data_name, **options)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=hidden_dim)
    _, (start,) = screen_initializations(model, data.splits["train"], 10, torch.Generator().manual_seed(0))
    runs = {}
    for method in ("svi", "em"):  # warm-up: the compiled kernels of this shape
        Trainer(build_model(family, data_dim=data.data_dim, hidden_dim=hidden_dim), data,
                TrainConfig(method=method, epochs=1, seed=0), start).run_epoch()
    for method in ("svi", "em"):
        config = TrainConfig(method=method, epochs=300, batch_size=20, lr=0.05, patience=10, seed=0)
        trainer = Trainer(build_model(family, data_dim=data.data_dim, hidden_dim=hidden_dim), data, config, start)
        records = []
        while not trainer.done:
            records += trainer.run_epoch()
        runs[method] = np.cumsum([r.epoch_s for r in records]), np.array([r.valid_nll for r in records])
    svi_time, svi_valid = runs["svi"]
    best = int(svi_valid.argmin())
    em_time, em_valid = runs["em"]
    reached = np.flatnonzero(em_valid <= svi_valid[best] + WITHIN)
    print(f"{family} K={hidden_dim} on {data_name}: SVI's best validation NLL {svi_valid[best]:.4f} at epoch {best + 1}, "
          f"{svi_time[best]:.2f} s of training")
    if reached.size:
        at = int(reached[0])
        print(f"  EM within {WITHIN} of it at iteration {at + 1}: {em_time[at]:.2f} s "
              f"({svi_time[best] / em_time[at]:.1f}x sooner); EM's best {em_valid.min():.4f} after {len(em_valid)} iterations")
    else:
        print(f"  EM never came within {WITHIN}: its best {em_valid.min():.4f} after {len(em_valid)} iterations")


def main() -> None:
    setup_threads()
    print(machine())
    for kind in ("diag", "full", "categorical"):
        against_hmmlearn(kind)
    against_svi("gaussian-hmm", "synthetic-gaussian-hmm", 3)
    against_svi("hmm", "jsb", 16)


if __name__ == "__main__":
    main()
