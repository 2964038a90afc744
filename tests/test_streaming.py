"""The stream engine (``trainables.streaming``) in process, for every HMM family: chunks
of any sizes give the whole sequence's answers, equal to the batch engine's in float64
(filtered: the posterior of each prefix at its last frame; fixed lag: at frame t - L),
and forecasts equal the chain pushed forward by hand."""

from __future__ import annotations

import pytest
import torch

from serve.monitor import upper_tail
from trainables import streaming
from trainables.models import build_model

FAMILIES = {  # family -> (data_dim, hidden_dim)
    "hmm": (6, 3), "arhmm": (6, 3), "nnhmm": (6, 3), "fhmm": (6, 4), "pfhmm": (6, 4), "hmm2": (6, 3),
    "gaussian-hmm": (2, 3), "categorical-hmm": (5, 3), "poisson-hmm": (3, 3),
}
LAG = 2


def random_model(family: str):
    """A float64 model of ``family`` at a seeded random initialisation (no training)."""
    data_dim, hidden_dim = FAMILIES[family]
    model = build_model(family, data_dim=data_dim, hidden_dim=hidden_dim)
    model.set_parameters(**model.init_parameters(None, None, torch.Generator().manual_seed(3)))
    return streaming.streaming_model(model)


def run(model, x: torch.Tensor, chunk: int) -> tuple[torch.Tensor, ...]:
    """``x`` ``(T, D)`` filtered ``chunk`` frames at a time: filtered, per_step, smoothed."""
    state, parts = streaming.start(model, LAG), []
    for start in range(0, len(x), chunk):
        answer = streaming.filter_chunk(model, x[start : start + chunk], state)
        state = answer.state
        parts.append(answer)
    assert [part.smoothed_start for part in parts if len(part.smoothed)] == [
        max(0, n * chunk - LAG) for n, part in enumerate(parts) if len(part.smoothed)
    ]
    return tuple(torch.cat([getattr(part, name) for part in parts]) for name in ("filtered", "per_step", "smoothed"))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_any_chunking_gives_the_batch_answers(family):
    model = random_model(family)
    x = model.sample(1, 17, seed=5).sequences[0]
    T = len(x)
    whole = run(model, x, T)
    for chunk in (1, 4):
        for a, b in zip(run(model, x, chunk), whole):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    filtered, per_step, smoothed = whole
    torch.testing.assert_close(per_step, model.log_likelihood_steps(x[None], torch.tensor([T]))[0].detach(), rtol=0, atol=1e-9)
    prefixes = model.posterior(x.expand(T, -1, -1), torch.arange(1, T + 1)).marginals  # (T, T, K)
    ends = torch.arange(T)
    torch.testing.assert_close(filtered, prefixes[ends, ends], rtol=0, atol=1e-9)
    torch.testing.assert_close(smoothed, prefixes[ends[LAG:], ends[:-LAG]], rtol=0, atol=1e-9)


@pytest.mark.parametrize("family", ["hmm", "gaussian-hmm", "hmm2", "fhmm"])
def test_forecasts_push_the_filtered_states_through_the_chain(family):
    model = random_model(family)
    x = model.sample(1, 9, seed=2).sequences[0]
    state = streaming.filter_chunk(model, x, streaming.start(model)).state
    forecast = streaming.forecast(model, state, horizon=4, num_samples=3, seed=1)
    params = model.map_values()
    transition = model.chain_factors(params)[1].exp()
    probs = state.log_filtered[-1].exp()
    for h in range(4):
        probs = probs @ transition
        torch.testing.assert_close(forecast.state_probs[h], model.output_marginals(probs), rtol=0, atol=1e-12)
        torch.testing.assert_close(forecast.mean[h], probs @ model.emission_means(params), rtol=0, atol=1e-12)
    assert forecast.mean_exact and forecast.samples.shape == (3, 4, model.data_dim)
    again = streaming.forecast(model, state, horizon=4, num_samples=3, seed=1)
    assert torch.equal(again.samples, forecast.samples)


def test_upper_tail_pvalues():
    reference = torch.tensor([1.0, 2.0, 2.0, 3.0]).numpy()
    values = torch.tensor([0.5, 2.0, 3.5, float("nan")]).numpy()
    got = upper_tail(reference, values)
    assert got[:3].tolist() == [5 / 5, 4 / 5, 1 / 5] and got[3] != got[3]
