"""The MLflow pictures: every family, the loss curve and the sweep plot write real PNGs."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from matplotlib import image as mpimg

from cluster.plots import k_curve_png, loss_curve_png, model_picture_png, sweep_plot_png
from trainables.data import Split, load_dataset, validate_split
from trainables.models import FAMILIES, MapModel, SequenceModel, build_model, register_family


def assert_png(path: Path) -> None:
    """``path`` is a readable RGB(A) PNG of more than 1 KB."""
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG"), path
    assert len(data) > 1024, (path, len(data))
    pixels = mpimg.imread(path)
    assert pixels.ndim == 3 and pixels.shape[-1] in (3, 4), pixels.shape
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100, pixels.shape


def fitted(family: str, split: Split, data_dim: int, hidden_dim: int, **hparams) -> SequenceModel:
    """A model of ``family`` with parameters initialised from ``split`` (MAP families)."""
    model = build_model(family, data_dim=data_dim, hidden_dim=hidden_dim, **hparams)
    if isinstance(model, MapModel):
        generator = torch.Generator().manual_seed(0)
        model.set_parameters(**model.init_parameters(split.x, split.lengths, generator))
    return model


@pytest.fixture(scope="module")
def piano_rolls() -> Split:
    """Random 88-key 0/1 piano rolls ``(5, 24, 88)`` with ragged lengths."""
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand((5, 24, 88), generator=generator) < 0.1).float()
    return validate_split(x, torch.tensor([24, 17, 20, 12, 24]), "random rolls", "valid")


@pytest.fixture(scope="module")
def hmm_data() -> Split:
    return load_dataset("synthetic-hmm", num_sequences=20, length=15).splits["valid"]


@pytest.mark.parametrize(
    "family, hidden_dim, hparams",
    [
        ("hmm", 3, {}),
        ("hmm", 16, {}),
        ("arhmm", 3, {}),
        ("fhmm", 4, {}),
        ("pfhmm", 4, {}),
        ("hmm2", 3, {}),
        ("hmm2", 4, {}),
        ("nnhmm", 3, {"nn_dim": 8}),
    ],
)
def test_bernoulli_hmm_pictures(tmp_path, piano_rolls, family, hidden_dim, hparams):
    model = fitted(family, piano_rolls, 88, hidden_dim, **hparams)
    path = model_picture_png(model, piano_rolls, tmp_path / f"{family}.png")
    assert path == tmp_path / f"{family}.png"
    assert_png(path)


def test_hmm_picture_on_synthetic_data_and_str_path(tmp_path, hmm_data):
    model = fitted("hmm", hmm_data, 8, 3)
    path = model_picture_png(model, hmm_data, str(tmp_path / "nested" / "hmm.png"))
    assert isinstance(path, Path)
    assert_png(path)


@pytest.mark.parametrize("data_dim", [1, 2, 5])
def test_gaussian_hmm_picture(tmp_path, data_dim):
    split = load_dataset(
        "synthetic-gaussian-hmm", num_sequences=20, length=15, data_dim=data_dim
    ).splits["valid"]
    model = fitted("gaussian-hmm", split, data_dim, 3)
    assert_png(model_picture_png(model, split, tmp_path / "gaussian-hmm.png"))


@pytest.mark.parametrize("variance", ["global", "component", "dimension", "component-dimension"])
@pytest.mark.parametrize("data_dim", [1, 2, 3])
def test_gmm_picture(tmp_path, variance, data_dim):
    split = load_dataset("synthetic-gmm", num_sequences=100, data_dim=data_dim).splits["train"]
    model = fitted("gmm", split, data_dim, 3, variance=variance)
    assert_png(model_picture_png(model, split, tmp_path / f"gmm-{variance}.png"))


def test_dmm_picture(tmp_path, piano_rolls):
    small = {"emission_dim": 8, "transition_dim": 8, "rnn_dim": 8}
    model = build_model("dmm", data_dim=88, hidden_dim=3, **small)
    assert_png(model_picture_png(model, piano_rolls, tmp_path / "dmm.png"))
    rolls = (torch.rand((4, 10, 8), generator=torch.Generator().manual_seed(1)) < 0.3).float()
    split = validate_split(rolls, torch.tensor([10, 7, 3, 9]), "rolls", "test")
    model = build_model("dmm", data_dim=8, hidden_dim=3, **small)
    assert_png(model_picture_png(model, split, tmp_path / "dmm-8.png"))


def test_a_family_without_its_declarations_is_refused():
    """Pictures (and serving) dispatch on the declared kinds: a family must declare them."""

    class Other(SequenceModel):
        family = "other"

    with pytest.raises(TypeError, match="must declare observation, latent"):
        register_family(Other)
    assert "other" not in FAMILIES


def test_pictures_from_threads(tmp_path, piano_rolls):
    """No global matplotlib state: pictures drawn concurrently all come out whole."""
    model = fitted("hmm", piano_rolls, 88, 4)
    with ThreadPoolExecutor(4) as pool:
        paths = list(
            pool.map(
                lambda n: model_picture_png(model, piano_rolls, tmp_path / f"hmm-{n}.png"),
                range(8),
            )
        )
    for path in paths:
        assert_png(path)


def test_loss_curve(tmp_path):
    history = [
        {"epoch": e, "train_loss": 5.0 / (e + 1) + 1.0, "valid_nll": 4.0 / (e + 1) + 1.2 + 0.02 * e}
        for e in range(30)
    ]
    history[3]["valid_nll"] = float("nan")
    assert_png(loss_curve_png(history, tmp_path / "loss.png"))
    assert_png(loss_curve_png(history[:1], tmp_path / "one.png"))
    assert_png(loss_curve_png([], tmp_path / "empty.png"))


def sweep_rows() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in range(24):
        lr = 10 ** (-3 + 2 * torch.rand((), generator=generator).item())
        hidden_dim = (8, 16, 32)[n % 3]
        optimizer = ("adam", "clipped-adam")[n % 2]
        nll = 6.0 + abs(math.log10(lr) + 2) - 0.02 * hidden_dim + 0.1 * (optimizer == "adam")
        rows.append(
            {"lr": lr, "hidden_dim": hidden_dim, "optim": optimizer,
             "valid_nll": nll, "status": "TERMINATED"}
        )
    rows[5].update(valid_nll=float("nan"), status="ERROR")
    rows[6].update(valid_nll=float("inf"), status="ERROR")
    del rows[7]["valid_nll"]
    rows[7]["status"] = "ERROR"
    return rows


def test_sweep_plot(tmp_path):
    rows = sweep_rows()
    path = sweep_plot_png(rows, ["lr", "hidden_dim", "optim"], "valid_nll", tmp_path / "s.png")
    assert_png(path)
    four = sweep_plot_png(
        [{**row, "seed": n} for n, row in enumerate(rows)],
        ["lr", "hidden_dim", "optim", "seed"],
        "valid_nll",
        tmp_path / "four.png",
        mode="max",
    )
    assert_png(four)
    missing = sweep_plot_png(rows, ["lr", "not_logged"], "valid_nll", tmp_path / "missing.png")
    assert_png(missing)


def test_sweep_plot_without_searched_keys(tmp_path):
    assert_png(sweep_plot_png(sweep_rows(), [], "valid_nll", tmp_path / "trials.png"))


def test_sweep_plot_without_finite_metric(tmp_path):
    rows = [{"lr": 0.1, "valid_nll": float("nan"), "status": "ERROR"}, {"lr": 0.2, "status": "ERROR"}]
    assert_png(sweep_plot_png(rows, ["lr"], "valid_nll", tmp_path / "none.png"))
    assert_png(sweep_plot_png([], ["lr"], "valid_nll", tmp_path / "no-rows.png"))


def test_k_curve(tmp_path):
    """Held-out NLL with error bars and the criteria per K; a DMM sweep has no BIC or AIC
    (NaN), a sweep with nothing finished a message."""
    per_k = [{"hidden_dim": k, "best_valid_nll": 5.0 - 1 / k, "valid_nll_se": 0.1, "bic": 100.0 + k, "aic": 90.0 + k}
             for k in (1, 2, 4)]
    assert_png(k_curve_png(per_k, per_k[1], tmp_path / "k.png"))
    bounds = [{**row, "bic": float("nan"), "aic": float("nan"), "valid_nll_se": float("nan")} for row in per_k]
    assert_png(k_curve_png(bounds, None, tmp_path / "bounds.png"))
    assert_png(k_curve_png([], None, tmp_path / "none.png"))
