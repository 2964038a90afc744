"""The fast paths give the reference paths' numbers.

- the engine's scaled probability-space recursions against its log-space ones (and their
  fall-back where probabilities leave the floating-point range), and its parallel scan
  against the sequential recursion;
- the MAP families' direct training loss against Pyro's ``Trace_ELBO``;
- restarts trained as one batched model against the same runs one after another, alone
  (through a real Tune trial: tests/test_sweep.py).
"""

from __future__ import annotations

import pytest
import torch
from pyro.infer import Trace_ELBO
from test_exact import FAMILIES, make_model

from trainables import inference, scan
from trainables.data import Dataset, Split, load_dataset
from trainables.models import build_model
from trainables.settings import TrainConfig
from trainables.svi import Trainer, screen_initializations


def random_factors(dtype, spread=1.0, batch=(2, 1)):
    """Factors with ragged lengths, broadcast over sequences and a restart dim."""
    torch.manual_seed(0)
    S, N, T = 4, 5, 7
    log_init = torch.randn(*batch, S, dtype=dtype).log_softmax(-1)
    log_trans = torch.randn(*batch, S, S, dtype=dtype).log_softmax(-1)
    log_emit = spread * torch.randn(N, T, S, dtype=dtype)
    return log_init, log_trans, log_emit, torch.tensor([7, 2, 1, 5, 6])


def value_and_grads(function, factors):
    leaves = [f.detach().requires_grad_() for f in factors[:3]]
    total = function(*leaves, factors[3])
    return [total.detach(), *torch.autograd.grad(total.sum(), leaves)]


def log_space(log_init, log_trans, log_emit, lengths):
    """The reference: autograd through the log-space recursion."""
    return inference._filter(log_init, log_trans, log_emit, lengths)[1].sum(-1)


def steps_total(log_init, log_trans, log_emit, lengths):
    """Autograd through the per-frame increments (scaled where in range)."""
    return inference.log_likelihood_steps(log_init, log_trans, log_emit, lengths).sum(-1)


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_the_scaled_recursions_give_the_log_space_numbers(dtype, rtol, engine):
    factors = random_factors(dtype)
    mask = inference.frame_mask(factors[3], 7).unsqueeze(-1)
    assert inference._scaled_filter(*factors[:3], mask) is not None  # the fast path ran
    reference = value_and_grads(log_space, factors)
    for function in (inference.log_likelihood, steps_total):
        for fast, exact in zip(value_and_grads(function, factors), reference):
            torch.testing.assert_close(fast, exact, rtol=rtol, atol=rtol)
    torch.testing.assert_close(
        inference.log_likelihood_steps(*factors), inference._filter(*factors)[1], rtol=rtol, atol=rtol
    )


def two_tracks(log_init_0: float, emit_0: float, emit_rest: float):
    """float32 factors of 4 states where state 0 and the rest are e^-80 apart in
    transitions: ``log_init`` ``(1, 4)`` puts ``log_init_0`` on state 0, and every frame
    after the first scores state 0 ``emit_0`` and the rest ``emit_rest``."""
    log_trans = torch.full((1, 4, 4), -80.0)
    log_trans[:, 1:, 1:] = 0.0
    log_trans[:, 0, 0] = 0.0
    log_init = torch.tensor([[log_init_0, 0.0, 0.0, 0.0]])
    log_emit = torch.zeros(5, 7, 4)
    log_emit[:, 1:, 0], log_emit[:, 1:, 1:] = emit_0, emit_rest
    return log_init.log_softmax(-1), log_trans.log_softmax(-1), log_emit, torch.tensor([7, 2, 1, 5, 6])


@pytest.mark.parametrize("case", ["forward", "backward"])
def test_out_of_range_probabilities_fall_back_to_log_space(case, engine):
    """Where float32 probabilities leave the range the log-space path answers: a frame
    only the unlikely state explains (a forward scale ~e^-80), or a future that only an
    unlikely state explains over several frames (a backward beta ~e^80)."""
    if case == "forward":
        factors = two_tracks(80.0, -100.0, 0.0)  # starts in state 0, then state 0 fits badly
    else:
        factors = two_tracks(-100.0, 0.0, -25.0)  # starts elsewhere, then state 0 fits best
    mask = inference.frame_mask(factors[3], 7).unsqueeze(-1)
    scaled = inference._scaled_filter(*factors[:3], mask)
    if case == "forward":
        assert scaled is None
    else:
        assert inference._scaled_expectations(factors[1].exp(), scaled[0], scaled[1], mask) is None
    reference = value_and_grads(log_space, [f.double() for f in factors[:3]] + [factors[3]])
    for function in (inference.log_likelihood, steps_total):
        for fast, exact in zip(value_and_grads(function, factors), reference):
            torch.testing.assert_close(fast.double(), exact, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_parallel_scan_gives_the_sequential_numbers(dtype):
    """The scan's steps and their gradient (ragged lengths, restarts broadcast) against
    autograd through the log-space recursion in float64; it computes in float64 whatever
    the factors' dtype, so float32 factors get the float64 answer rounded once."""
    factors = random_factors(dtype, spread=3.0)
    reference = value_and_grads(log_space, [f.double() for f in factors[:3]] + [factors[3]])
    steps = scan.log_likelihood_steps(*factors)
    assert steps is not None and steps.dtype == dtype  # it answered: no fall-back
    rtol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    torch.testing.assert_close(steps.double(), inference._filter(*[f.double() for f in factors[:3]], factors[3])[1],
                               rtol=rtol, atol=rtol)
    scanned = value_and_grads(lambda *f: scan.log_likelihood_steps(*f).sum(-1), factors)
    for fast, exact in zip(scanned, reference):
        torch.testing.assert_close(fast.double(), exact, rtol=rtol * 10, atol=rtol * 10)


def test_the_scan_of_a_long_sequence_and_where_it_declines():
    """3,000 frames: 12 rounds of products; then transitions e^-800 apart (beyond float64's
    range in one product), where the scan declines and the engine's scan path answers by
    the sequential recursion instead."""
    torch.manual_seed(6)
    log_init = torch.randn(4, dtype=torch.float64).log_softmax(-1)
    log_trans = torch.randn(4, 4, dtype=torch.float64).log_softmax(-1)
    log_emit = torch.randn(2, 3000, 4, dtype=torch.float64)
    lengths = torch.tensor([3000, 1777])
    sequential = inference._filter(log_init, log_trans, log_emit, lengths)[1]
    torch.testing.assert_close(scan.log_likelihood_steps(log_init, log_trans, log_emit, lengths), sequential,
                               rtol=1e-12, atol=1e-9)
    far = torch.full((4, 4), -800.0, dtype=torch.float64)
    far[1:, 1:], far[0, 0] = 0.0, 0.0
    factors = (torch.tensor([0.0, -800.0, -800.0, -800.0], dtype=torch.float64), far, log_emit[:, :40], torch.tensor([40, 9]))
    assert scan.log_likelihood_steps(*factors) is None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(inference.ENGINE_ENV, "scan")
        torch.testing.assert_close(inference.log_likelihood_steps(*factors), inference._filter(*factors)[1])


@pytest.mark.parametrize("family", [*FAMILIES, "gmm"])
def test_the_direct_map_loss_is_trace_elbo(family):
    if family == "gmm":
        model = build_model("gmm", data_dim=2, hidden_dim=3).double()
        x, lengths = torch.randn(6, 2, dtype=torch.float64), None
    else:
        model, x, lengths = make_model(family, seed=5)
    params = list(model.parameters())
    direct = model.training_loss(x, lengths, scale=3.0)
    pyro_loss = Trace_ELBO().differentiable_loss(model.model, model.guide, x, lengths, scale=3.0)
    torch.testing.assert_close(direct, pyro_loss, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(direct, params), torch.autograd.grad(pyro_loss, params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def restart_setting(family="hmm"):
    data = load_dataset("synthetic-hmm", num_sequences=40, length=20, hidden_dim=2, seed=0)
    config = TrainConfig(epochs=10, lr=0.1, batch_size=10, patience=1, seed=3)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=3)
    _, starts = screen_initializations(model, data.splits["train"], 12, torch.Generator().manual_seed(1), keep=4)
    return data, config, starts


#: Float32 runs of ``restart_setting`` (40 ClippedAdam steps at lr 0.1): a batched GEMM
#: rounds differently from R single ones (one ulp, 2**-24 relative, per product), and
#: Adam's normalised steps carry such differences along. Measured here: losses 2e-7
#: relative, unconstrained parameters 1.5e-5 absolute; the bounds below leave 50x and
#: 13x. Exactness itself is checked in float64 (1e-9).
FLOAT32_LOSSES, FLOAT32_PARAMETERS = 1e-5, 2e-4


def assert_same_run(candidate, alone, losses=FLOAT32_LOSSES, parameters=FLOAT32_PARAMETERS):
    assert [r.epoch for r in candidate.history] == [r.epoch for r in alone.history]
    for ours, theirs in zip(candidate.history, alone.history):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=losses)
        assert ours.valid_nll == pytest.approx(theirs.valid_nll, rel=losses)
    assert candidate.best_epoch == alone.best_epoch
    for name, value in candidate.best_state.items():
        torch.testing.assert_close(value, alone.best_state[name], rtol=parameters, atol=parameters)


def in_float64(data: Dataset) -> Dataset:
    splits = {name: Split(split.x.double(), split.lengths) for name, split in data.splits.items()}
    return Dataset(data.name, splits, data.data_dim)


def test_restarts_batched_follow_the_runs_one_after_another():
    """In float64 the batched candidates and the runs alone agree to rounding (1e-9)."""
    data, config, starts = restart_setting()
    data = in_float64(data)
    starts = [{name: value.double() for name, value in start.items()} for start in starts]

    def trainer(initial):
        return Trainer(build_model("hmm", data_dim=data.data_dim, hidden_dim=3).double(), data, config, initial)

    batched = trainer(starts)
    while not batched.done:
        batched.run_epoch()
    epochs = {candidate.epoch for candidate in batched.candidates}
    assert len(epochs) > 1, "the setting should stop candidates early at different epochs"
    for candidate, start in zip(batched.candidates, starts):
        alone = trainer(start)
        while not alone.done:
            alone.run_epoch()
        assert_same_run(candidate, alone, losses=1e-9, parameters=1e-9)


def test_restarts_of_a_family_with_network_weights_are_refused_as_one_model():
    data = load_dataset("synthetic-hmm", num_sequences=10, length=5, hidden_dim=2, seed=0)
    model = build_model("nnhmm", data_dim=data.data_dim, hidden_dim=2)
    starts = [model.init_parameters(None, None, torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(ValueError, match="share its network weights"):
        Trainer(model, data, TrainConfig(epochs=1), starts)


def test_our_clipped_adam_is_pyros():
    """Same steps, same numbers (clamping, learning-rate decay, bias correction), and a
    state that round-trips."""
    from pyro.optim.clipped_adam import ClippedAdam as PyroClippedAdam

    from trainables.svi import ClippedAdam

    torch.manual_seed(0)
    settings = {"lr": 0.1, "betas": (0.8, 0.99), "clip_norm": 0.5, "lrd": 0.97}
    ours, theirs = [torch.randn(3, 4, requires_grad=True)], [torch.zeros(3, 4, requires_grad=True)]
    with torch.no_grad():
        theirs[0].copy_(ours[0])
    mine, reference = ClippedAdam(ours, **settings), PyroClippedAdam(theirs, **settings)
    for step in range(6):
        if step == 3:
            mine.load_state_dict(mine.state_dict())
        for optimizer, params in ((mine, ours), (reference, theirs)):
            optimizer.zero_grad()
            (params[0] ** 3).sum().backward()
            optimizer.step()
        assert torch.equal(ours[0], theirs[0])


def test_a_diverged_map_candidate_is_a_non_finite_loss_error():
    """What the sweep's ``nan`` fault relies on: no support error from the priors first."""
    data, config, starts = restart_setting()
    trainer = Trainer(build_model("hmm", data_dim=data.data_dim, hidden_dim=3), data, config, starts)
    with torch.no_grad():
        trainer.learnable[0].fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite training loss .* epoch 1, batch 0"):
        trainer.run_epoch()
