"""EM as a training method (``train: {method: em}``): the engine's E-step and the
families' closed-form MAP M-steps (``trainables/models/em.py``).

- every EM family, restarts stacked: the objective never increases, to rounding (float64);
- one iteration of ``gaussian-hmm`` from given parameters equals hmmlearn's ``fit`` with
  ``n_iter=1`` where the two objectives coincide (flat priors on hmmlearn's side, priors
  made flat on ours), to 1e-8;
- EM's fixed point is a stationary point of SVI's objective (the same MAP objective): the
  gradient there is below 1e-6 of the gradient at the start;
- ``nnhmm`` by generalised EM (its network by gradient steps) improves its objective;
- families without an M-step are refused with a message, before any training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hmmlearn.hmm import GaussianHMM
from helpers import knock_out
from test_speed_paths import in_float64

from trainables.data import load_dataset
from trainables.models import build_model
from trainables.models.missing import start_frames
from trainables.settings import TrainConfig
from trainables.svi import Trainer

CASES = {  # case -> (family, data set, hyperparameters)
    "hmm": ("hmm", "synthetic-hmm", {}),
    "arhmm": ("arhmm", "synthetic-hmm", {}),
    "fhmm": ("fhmm", "synthetic-hmm", {"hidden_dim": 4}),
    "pfhmm": ("pfhmm", "synthetic-hmm", {"hidden_dim": 4}),
    "hmm2": ("hmm2", "synthetic-hmm", {}),
    **{f"gaussian-hmm-{kind}": ("gaussian-hmm", "synthetic-gaussian-hmm", {"covariance": kind})
       for kind in ("diag", "spherical", "full", "tied")},
    "categorical-hmm": ("categorical-hmm", "synthetic-categorical-hmm", {}),
    "poisson-hmm": ("poisson-hmm", "synthetic-poisson-hmm", {}),
    **{f"gmm-{kind}": ("gmm", "synthetic-gmm", {"variance": kind}) for kind in ("global", "component", "dimension", "component-dimension")},
}


def em_trainer(
    case: str, epochs: int = 25, tolerance: float = 0.0, restarts: int = 3, seed: int = 0, missing: float = 0.0
) -> Trainer:
    """A float64 EM trainer of ``case`` with ``restarts`` stacked starts, a ``missing``
    fraction of the values missing (whole frames of one-hot symbols)."""
    family, name, hparams = CASES[case]
    options = {"num_sequences": 40, "length": 30} if family != "gmm" else {}
    data = in_float64(load_dataset(name, seed=seed, **options))
    if missing:
        data = knock_out(data, missing, seed + 1, whole_frames=family == "categorical-hmm")
    hparams = {"hidden_dim": 3, **hparams}
    model = build_model(family, data_dim=data.data_dim, **hparams).double()
    generator = torch.Generator().manual_seed(seed)
    train = data.splits["train"]
    frames = start_frames(train.x, train.lengths)
    starts = [model.init_parameters(frames, train.lengths, generator) for _ in range(restarts)]
    config = TrainConfig(method="em", epochs=epochs, tolerance=tolerance, patience=None, seed=seed)
    return Trainer(model, data, config, initial_parameters=starts)


@pytest.mark.parametrize("case", list(CASES))
def test_the_em_objective_never_increases(case):
    trainer = em_trainer(case)
    losses = []
    while not trainer.done:
        trainer.run_epoch()
        losses.append([candidate.history[-1].train_loss for candidate in trainer.candidates])
    losses = np.array(losses)  # (iterations, restarts)
    assert losses.shape[0] >= 5  # (tolerance 0: stops early only where an iteration changes nothing)
    rounding = 1e-12 * np.abs(losses[:-1])
    assert (losses[1:] <= losses[:-1] + rounding).all(), np.diff(losses, axis=0).max()
    assert (losses[-1] < losses[0]).all()


def test_one_iteration_equals_hmmlearns_where_the_objectives_coincide():
    """Flat priors: ours with Normal(0, 1e12) means, LogNormal(0, 1e12) scales (an
    improper 1/s prior in the limit) and Dirichlet(1) rows; hmmlearn's with
    ``means_weight=0`` and ``covars_weight=2, covars_prior=0`` (the same 1/s prior:
    variances sum / (n + 1)) and unit start and transition priors."""
    rng = np.random.default_rng(0)
    K, D = 3, 2
    lengths = [9, 4, 1, 7, 12]
    x = rng.normal(size=(sum(lengths), D)) * 2
    start = {
        "initial": np.array([0.5, 0.3, 0.2]),
        "transition": np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.3, 0.6]]),
        "means": np.array([[-2.0, 0.0], [0.0, 2.0], [2.5, -1.0]]),
        "scales": np.array([[1.0, 0.5], [0.7, 1.2], [1.5, 0.9]]),
    }
    theirs = GaussianHMM(K, covariance_type="diag", n_iter=1, init_params="", params="stmc",
                         means_weight=0.0, covars_prior=0.0, covars_weight=2.0, startprob_prior=1.0, transmat_prior=1.0)
    theirs.startprob_, theirs.transmat_ = start["initial"], start["transition"]
    theirs.means_, theirs.covars_ = start["means"], start["scales"] ** 2
    theirs.fit(x, lengths)

    model = build_model("gaussian-hmm", data_dim=D, hidden_dim=K, prior_mean_scale=1e12, prior_log_scale=1e12,
                        prior_sticky=1e-300, prior_smooth=1.0, prior_initial=1.0).double()
    padded = torch.zeros(len(lengths), max(lengths), D, dtype=torch.float64)
    for n, (begin, length) in enumerate(zip(np.cumsum([0, *lengths[:-1]]), lengths)):
        padded[n, :length] = torch.from_numpy(x[begin : begin + length])
    params = {name: torch.from_numpy(value).unsqueeze(0) for name, value in start.items()}
    ours, _ = model.em_step(params, padded, torch.tensor(lengths))
    np.testing.assert_allclose(ours["initial"][0], theirs.startprob_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours["transition"][0], theirs.transmat_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours["means"][0], theirs.means_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours["scales"][0] ** 2, np.diagonal(theirs.covars_, axis1=1, axis2=2), rtol=1e-8)


STATIONARY = [
    ("gaussian-hmm-diag", ("initial", "transition", "means", "scales")),
    ("gaussian-hmm-full", ("initial", "transition", "means", "scale_tril")),
    ("gmm-component-dimension", ("weights", "locs", "scales")),
    ("categorical-hmm", ("emission_probs",)),  # its synthetic chain: entries at the floor
    ("poisson-hmm", ("initial", "rates")),
    ("hmm2", ("emission_probs",)),  # (fhmm, pfhmm: keys at the floor in some chain pairs; monotone above)
]


@pytest.mark.parametrize("case, names", STATIONARY)
def test_the_em_fixed_point_is_a_stationary_point_of_the_svi_objective(case, names):
    """Both methods maximise the same MAP objective: where EM has converged, the gradient
    SVI follows vanishes, for every parameter inside its domain (transition rows with an
    entry at ``EM_FLOOR`` are at the cut simplex's edge, where it need not)."""
    trainer = em_trainer(case, epochs=2000, restarts=1)  # (categorical-hmm creeps along a ridge until ~500)
    model, train = trainer.model, trainer.splits["train"]

    def gradient_size() -> float:
        leaves = {name: value.detach().clone().requires_grad_() for name, value in trainer.stacked.items()}
        loss = model.training_loss_of(model.constrain(leaves), train.x, train.lengths).sum()
        gradients = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
        return max(float(gradients[name].abs().max()) for name in names)

    at_start = gradient_size()
    while not trainer.done:
        trainer.run_epoch()
    assert gradient_size() <= 1e-6 * at_start


@pytest.mark.parametrize("family", ["dmm"])
def test_families_without_an_m_step_are_refused(family):
    data = load_dataset("synthetic-hmm", num_sequences=10, length=8)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=4)
    with pytest.raises(ValueError, match=f"{family}: EM is not available for this family; use method: svi"):
        Trainer(model, data, TrainConfig(method="em", epochs=2))


def test_integer_files_train_and_values_a_family_cannot_score_are_refused(tmp_path):
    """An ``.npz`` of integer counts trains ``poisson-hmm``; a count of 1.5, symbol codes
    given to ``categorical-hmm`` instead of one-hot frames, are refused before training,
    naming the split and the place."""
    data = load_dataset("synthetic-poisson-hmm", num_sequences=20, length=10)
    arrays = {f"{name}_x": split.x.numpy().astype(np.int64) for name, split in data.splits.items()}
    arrays.update({f"{name}_len": split.lengths.numpy() for name, split in data.splits.items()})
    np.savez(tmp_path / "counts.npz", **arrays)
    counts = load_dataset(path=tmp_path / "counts.npz")
    model = build_model("poisson-hmm", data_dim=3, hidden_dim=2)
    Trainer(model, counts, TrainConfig(method="em", epochs=1)).run_epoch()

    arrays["valid_x"] = arrays["valid_x"].astype(np.float64)
    arrays["valid_x"][0, 2, 1] = 1.5
    np.savez(tmp_path / "fractions.npz", **arrays)
    with pytest.raises(ValueError, match=r"poisson-hmm: the valid split's x\[0, 2, 1\] is 1.5; expected a non-negative integer count"):
        Trainer(model, load_dataset(path=tmp_path / "fractions.npz"), TrainConfig(method="em", epochs=1))

    symbols = load_dataset("synthetic-categorical-hmm", num_sequences=20, length=10)
    codes = {f"{name}_x": split.x.argmax(-1, keepdim=True).numpy() for name, split in symbols.splits.items()}
    codes.update({f"{name}_len": split.lengths.numpy() for name, split in symbols.splits.items()})
    np.savez(tmp_path / "codes.npz", **codes)
    categorical = build_model("categorical-hmm", data_dim=1, hidden_dim=2)
    with pytest.raises(ValueError, match=r"categorical-hmm: the train split's x\[\d+, \d+, 0\] is \d; expected 0 or 1 in a one-hot frame"):
        Trainer(categorical, load_dataset(path=tmp_path / "codes.npz"), TrainConfig())


#: case -> (emission parameter, its tolerance, transition tolerance): about twice the
#: largest error measured by either method (gaussian-hmm 0.08 / 0.06, poisson-hmm rates
#: 0.15 of 0.5-10 / transitions 0.02, both at 200 sequences of 25-50 frames)
RECOVERY = {"gaussian-hmm": ("means", 0.2, 0.12), "poisson-hmm": ("rates", 0.35, 0.05)}


@pytest.mark.parametrize("method", ["em", "svi"])
@pytest.mark.parametrize("family", list(RECOVERY))
def test_both_methods_recover_the_true_parameters_after_aligning_the_states(family, method):
    """Synthetic data from known parameters; the learned states matched to the true ones
    by an optimal assignment on the emission parameters (scipy's Hungarian method)."""
    from scipy.optimize import linear_sum_assignment

    key, emission_tolerance, transition_tolerance = RECOVERY[family]
    data = load_dataset(f"synthetic-{family}", num_sequences=200, length=50, seed=0)
    model = build_model(family, data_dim=data.data_dim, hidden_dim=3)
    trainer = Trainer(model, data, TrainConfig(method=method, epochs=300, lr=0.05, screen=10, patience=20, seed=0))
    while not trainer.done:
        trainer.run_epoch()
    trainer.result()
    learned, truth = model.get_parameters(), data.truth
    _, matched = linear_sum_assignment(torch.cdist(learned[key].double(), truth[key].double()).numpy())
    order = torch.from_numpy(np.argsort(matched))  # learned state of each true state
    assert (learned[key][order] - truth[key]).abs().max() <= emission_tolerance
    assert (learned["transition"][order][:, order] - truth["transition"]).abs().max() <= transition_tolerance


def test_nnhmm_trains_by_generalised_em():
    """The exact E-step, the chain's closed-form update, then ``network_steps`` gradient
    steps on the network's expected complete-data log-likelihood (no monotonicity
    guarantee: Adam steps; over 15 iterations the objective falls and validation too)."""
    data = in_float64(load_dataset("synthetic-hmm", num_sequences=30, length=20, seed=0))
    model = build_model("nnhmm", data_dim=data.data_dim, hidden_dim=3, nn_dim=8, nn_channels=2).double()
    before = [p.detach().clone() for p in model.network_parameters()]
    trainer = Trainer(model, data, TrainConfig(method="em", epochs=15, lr=0.05, network_steps=3, patience=None, seed=0))
    records = []
    while not trainer.done:
        records += trainer.run_epoch()
    assert len(records) == 15 and records[-1].train_loss < records[0].train_loss
    assert min(r.valid_nll for r in records) < records[0].valid_nll
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, model.network_parameters()))
