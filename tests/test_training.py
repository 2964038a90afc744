"""The SVI loop: parameter recovery on synthetic data, screening, early stopping,
seeding, checkpoints and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from trainables.data import Dataset, Split, load_dataset
from trainables.models import build_model
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.settings import TrainConfig
from trainables.svi import Trainer, evaluate_nll, screen_initializations, train

# (data set, family, parameter that identifies the states, recovery tolerance, data options)
RECOVERY = [
    ("synthetic-hmm", "hmm", "emission_probs", 0.08, dict(num_sequences=200, length=40)),
    ("synthetic-gaussian-hmm", "gaussian-hmm", "means", 0.25, dict(num_sequences=100, length=40)),
    ("synthetic-gmm", "gmm", "locs", 0.25, dict(num_sequences=600)),
]


def aligned(learned: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """The permutation of true state labels closest to the learned ones."""
    _, columns = linear_sum_assignment(torch.cdist(learned, truth).numpy())
    return torch.as_tensor(columns)


@pytest.mark.slow
@pytest.mark.parametrize("name, family, key, tolerance, options", RECOVERY)
def test_parameters_are_recovered_from_synthetic_data(name, family, key, tolerance, options):
    data = load_dataset(name, hidden_dim=3, seed=1, **options)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=3)
    result = train(model, data, TrainConfig(epochs=40, lr=0.05, batch_size=40, screen=20))
    learned, truth = model.get_parameters(), data.truth
    order = aligned(learned[key], truth[key])
    assert (learned[key] - truth[key][order]).abs().max() < tolerance
    if "transition" in truth:
        assert (learned["transition"] - truth["transition"][order][:, order]).abs().max() < 0.05
    true_model = build_model(family, data_dim=data.data_dim, hidden_dim=3)
    true_model.set_parameters(**truth)
    assert result.test_nll < evaluate_nll(true_model, data.splits["test"]) + 0.1


def small_hmm_data(seed=0):
    return load_dataset("synthetic-hmm", num_sequences=40, length=20, hidden_dim=2, seed=seed)


def test_screening_ranks_initialisations_by_the_training_objective():
    data = small_hmm_data()
    model = build_model("hmm", data_dim=data.data_dim, hidden_dim=2)
    split = data.splits["train"]
    losses, best = screen_initializations(model, split, 30, torch.Generator().manual_seed(0), keep=3, chunk=7)
    assert losses.shape == (30,) and losses.std() > 0 and len(best) == 3
    objective = []
    for params in best:
        model.set_parameters(**params)
        params = model.map_values()
        log_likelihood = model.log_likelihood_of(params, split.x, split.lengths).sum()
        objective.append(float(-(model.log_prior_of(params) + log_likelihood)))
    torch.testing.assert_close(torch.tensor(objective), losses.sort().values[:3], rtol=1e-5, atol=0)


def test_a_resumed_trainer_continues_exactly(tmp_path):
    data = small_hmm_data()
    config = TrainConfig(epochs=6, lr=0.1, seed=5, screen=4, patience=None)
    straight = Trainer(build_model("hmm", data_dim=data.data_dim, hidden_dim=2), data, config)
    while not straight.done:
        straight.run_epoch()
    first = Trainer(build_model("hmm", data_dim=data.data_dim, hidden_dim=2), data, config)
    for _ in range(3):
        first.run_epoch()
    torch.save(first.state_dict(), tmp_path / "trainer.pt")
    resumed = Trainer(build_model("hmm", data_dim=data.data_dim, hidden_dim=2), data, config)
    resumed.load_state_dict(torch.load(tmp_path / "trainer.pt", weights_only=True))
    while not resumed.done:
        resumed.run_epoch()
    assert [r.valid_nll for r in resumed.history] == [r.valid_nll for r in straight.history]
    assert resumed.result().test_nll == straight.result().test_nll


def test_training_is_seeded_and_stops_early():
    data = small_hmm_data()
    runs = []
    for _ in range(2):
        model = build_model("hmm", data_dim=data.data_dim, hidden_dim=2)
        runs.append(train(model, data, TrainConfig(epochs=200, lr=0.2, patience=2, seed=3, screen=3)))
    first, second = runs
    assert [r.valid_nll for r in first.history] == [r.valid_nll for r in second.history]
    assert len(first.history) < 200
    assert len(first.history) - first.best_epoch == 2
    assert first.best_valid_nll == min(r.valid_nll for r in first.history)


def test_dmm_trains_through_the_same_loop():
    torch.manual_seed(0)
    data = small_hmm_data()
    result = train(small_dmm(data), data, TrainConfig(epochs=3, lr=0.01, patience=None))
    assert len(result.history) == 3 and math.isfinite(result.test_nll)


def test_checkpoint_round_trip(tmp_path):
    data = small_hmm_data()
    model = build_model("arhmm", data_dim=data.data_dim, hidden_dim=2, prior_sticky=0.5)
    train(model, data, TrainConfig(epochs=2))
    save_checkpoint(model, tmp_path / "ckpt", valid_nll=1.5)
    restored = load_checkpoint(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model"]["prior_sticky"] == 0.5 and config["valid_nll"] == 1.5
    split = data.splits["test"]
    torch.testing.assert_close(
        restored.log_likelihood(split.x, split.lengths), model.log_likelihood(split.x, split.lengths)
    )


def small_dmm(data):
    return build_model(
        "dmm", data_dim=data.data_dim, hidden_dim=2, emission_dim=8, transition_dim=8, rnn_dim=8,
        annealing_epochs=2,
    )


def test_non_finite_loss_is_an_error_that_says_where():
    data = small_hmm_data()
    train_split = data.splits["train"]
    poisoned = train_split.x.clone()
    poisoned[0, 0, 0] = math.inf  # load-time checks would refuse this; train() must too
    bad = Dataset("poisoned", {**data.splits, "train": Split(poisoned, train_split.lengths)}, data.data_dim)
    with pytest.raises(ValueError, match=r"dmm: the train split's x\[0, 0, 0\] is inf; expected 0 or 1"):
        train(small_dmm(data), bad, TrainConfig(epochs=1, batch_size=100))
    trainer = Trainer(small_dmm(data), data, TrainConfig(epochs=1, batch_size=100))
    trainer.splits["train"].x[0, 0, 0] = math.inf  # past the checks: the loss itself says where
    with pytest.raises(FloatingPointError, match="non-finite training loss .* epoch 1, batch 0"):
        trainer.run_epoch()


def test_bad_settings_and_missing_cuda_are_refused():
    with pytest.raises(ValueError, match="train: lr: should be greater than 0, got -1"):
        TrainConfig.build("train", {"lr": -1})
    if not torch.cuda.is_available():
        data = small_hmm_data()
        model = build_model("hmm", data_dim=data.data_dim, hidden_dim=2)
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            train(model, data, TrainConfig(epochs=1, device="cuda"))


def test_build_model_refuses_unknown_names():
    with pytest.raises(ValueError, match="unknown model family 'nope'"):
        build_model("nope", data_dim=2, hidden_dim=2)
    with pytest.raises(ValueError, match="hmm: wobble: unknown name"):
        build_model("hmm", data_dim=2, hidden_dim=2, wobble=1)
    with pytest.raises(ValueError, match="perfect square"):
        build_model("fhmm", data_dim=2, hidden_dim=8)
