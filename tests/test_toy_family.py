"""A family defined only here, registered through the public path
(``trainables.models.register_family``), goes the whole way with no change to ``serve/``
or ``cluster/``: trained, swept through Tune (trials in Ray workers import this module
by the name its checkpoints record), promoted, and served over HTTP with answers checked
against brute-force enumeration.

The toy: an HMM with Laplace emissions (real frames), a state space of K states.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import ray
import torch
from pydantic import Field
from pyro import distributions as dist

from cluster.promote import promote
from cluster.serving import ServeOptions, serving
from cluster.sweep import run_sweep
from cluster.sweep_file import load_sweep_file
from helpers import free_port, get, mlflow_runs, post
from trainables.data import load_dataset
from trainables.models import FAMILIES, register_family
from trainables.models.hmm_base import ChainHyperparameters, HMMFamily
from trainables.models.parts import sticky_simplex, uniform_simplex
from trainables.settings import TrainConfig
from trainables.svi import train

pytestmark = pytest.mark.slow
FAMILY = "toy-laplace-hmm"


class LaplaceHyperparameters(ChainHyperparameters):
    prior_loc_scale: float = Field(5.0, gt=0, description="Normal(0, s) prior on every location")


@register_family
class LaplaceHMM(HMMFamily):
    """K states, each emitting every dimension from its own Laplace(loc, scale)."""

    family = FAMILY
    observation = "real"
    hyperparameters = LaplaceHyperparameters

    def priors(self):
        K, D, zero = self.hidden_dim, self.data_dim, self._anchor
        return {
            "initial": self._initial_prior(K),
            "transition": self._transition_prior(K),
            "locs": dist.Normal(zero, self.hparams.prior_loc_scale).expand([K, D]).to_event(2),
            "scales": dist.LogNormal(zero, 1.0).expand([K, D]).to_event(2),
        }

    def init_parameters(self, x, lengths, generator):
        K, D = self.hidden_dim, self.data_dim
        return {
            "initial": uniform_simplex((K,), generator),
            "transition": sticky_simplex((K, K), generator),
            "locs": torch.randn((K, D), generator=generator),
            "scales": torch.ones(K, D),
        }

    def emission_log_probs(self, params, x):
        locs, scales = params["locs"], params["scales"]
        shape = (*locs.shape[:-2], *[1] * (x.dim() - 1), *locs.shape[-2:])
        locs, scales = locs.reshape(shape), scales.reshape(shape)
        values = x.to(locs.dtype).unsqueeze(-2)
        return -((values - locs).abs() / scales + torch.log(2 * scales)).sum(-1)

    def sample_emissions(self, params, states, generator):
        locs, scales = params["locs"][states], params["scales"][states]
        uniform = torch.rand(locs.shape, generator=generator, dtype=locs.dtype) - 0.5
        return locs - scales * uniform.sign() * torch.log1p(-2 * uniform.abs())


SWEEP = f"""
name: toy-sweep
model: {FAMILY}
data: {{name: synthetic-gaussian-hmm, num_sequences: 30, length: 12, hidden_dim: 2}}
train: {{epochs: 3, batch_size: 10}}
search:
  hidden_dim: 2
  lr: {{choice: [0.02, 0.05]}}
  prior_loc_scale: {{uniform: [2.0, 8.0]}}
restarts: {{screen: 3, keep: 1}}
num_samples: 1
"""


def brute_force(model: LaplaceHMM, frames: torch.Tensor) -> tuple[float, list[int]]:
    """log p(x) and the best path of one sequence ``(T, D)`` by enumerating every path, in float64."""
    params = {k: v.double() for k, v in model.get_parameters().items()}
    emit = model.emission_log_probs(params, frames.double()[None])[0]  # (T, K)
    log_init, log_trans = params["initial"].log(), params["transition"].log()
    scores = {}
    for path in itertools.product(range(model.hidden_dim), repeat=len(frames)):
        score = log_init[path[0]] + emit[0, path[0]]
        for t in range(1, len(path)):
            score = score + log_trans[path[t - 1], path[t]] + emit[t, path[t]]
        scores[path] = float(score)
    best = max(scores, key=scores.get)
    return math.log(sum(math.exp(s) for s in scores.values())), list(best)


@pytest.fixture(scope="module")
def ray_for_this_module(monkeypatch_module):
    # Ray workers and Serve replicas import this module by name, as an installed
    # package of a user's would be: put the tests folder on their path.
    tests = str(Path(__file__).parent)
    monkeypatch_module.setenv("PYTHONPATH", tests)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_toy_family_is_registered_and_trains_in_process():
    assert FAMILIES[FAMILY] is LaplaceHMM
    data = load_dataset("synthetic-gaussian-hmm", num_sequences=20, length=10, hidden_dim=2)
    model = LaplaceHMM(data.data_dim, 2)
    result = train(model, data, TrainConfig(epochs=3, lr=0.05))
    assert result.history[-1].train_loss < result.history[0].train_loss


def test_the_toy_family_is_swept_promoted_and_served(tmp_path, ray_for_this_module):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config = tmp_path / "toy.yaml"
    config.write_text(SWEEP)
    outcome = run_sweep(load_sweep_file(config), tracking=uri, storage=str(tmp_path / "ray"))
    client, parents, children = mlflow_runs(uri, "toy-sweep")
    assert outcome.best is not None and {c.info.status for c in children} == {"FINISHED"}
    artifacts = {a.path for a in client.list_artifacts(outcome.best["run_id"])}
    assert {"model.png", "checkpoint"} <= artifacts

    promoted = promote(uri, "toy-sweep")
    port = free_port()
    options = ServeOptions(model="models:/toy-sweep@champion", tracking_uri=uri, port=port)
    test = load_dataset("synthetic-gaussian-hmm", num_sequences=30, length=12, hidden_dim=2).splits["test"]
    frames = test.x[0, :5]  # 2^5 paths to enumerate
    with serving(options):
        url = f"http://127.0.0.1:{port}"
        status, described = get(f"{url}/v1/model")
        assert status == 200 and described["family"] == FAMILY and described["version"] == promoted["version"]
        parameters = {name: torch.tensor(value) for name, value in described["parameters"].items()}
        status, scored = post(f"{url}/v1/score", {"sequences": [frames.tolist()]})
        assert status == 200 and scored["exact"] is True
        status, decoded = post(f"{url}/v1/decode", {"sequences": [frames.tolist()]})
        assert status == 200
        status, posterior = post(f"{url}/v1/posterior", {"sequences": [frames.tolist()]})
        assert status == 200
        status, sampled = post(f"{url}/v1/sample", {"num_sequences": 2, "length": 4, "seed": 0})
        assert status == 200 and len(sampled["sequences"][0]) == 4
    model = LaplaceHMM(frames.shape[-1], 2, **{k: v for k, v in described["hyperparameters"].items()
                                              if k not in ("family", "data_dim", "hidden_dim")})
    model.set_parameters(**parameters)
    log_likelihood, best_path = brute_force(model, frames)
    # the served engine runs in float32: about T (D + 2K) = 30 roundings of 2**-24 on the
    # way to the total (2e-6 relative); 1e-4 leaves room, the paths are enumerated in float64
    assert scored["log_likelihood"][0] == pytest.approx(log_likelihood, rel=1e-4)
    assert decoded["states"][0] == best_path
    assert [sum(row) for row in posterior["marginals"][0]] == pytest.approx([1.0] * 5, abs=1e-5)
