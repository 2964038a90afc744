"""The PNG pictures logged to MLflow with every trial and sweep (docs/design.md, "MLflow
layout").

- :func:`loss_curve_png`: train loss and validation NLL per epoch;
- :func:`model_picture_png`: what a trained model learned, drawn from the kinds its
  family declares (``latent``, ``observation``), never from its name;
- :func:`sweep_plot_png`: the sweep metric against every searched hyperparameter;
- :func:`k_curve_png`: held-out NLL, BIC and AIC against the number of states.

Figures are built with matplotlib's object API on the Agg canvas (never ``pyplot``): no
global state, so pictures can be drawn from several threads of a long-lived driver.
Each function writes a PNG to ``path`` and returns it as a :class:`~pathlib.Path`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Real
from pathlib import Path
from typing import Any, Literal

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colorbar import Colorbar
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Ellipse
from matplotlib.patheffects import withStroke
from matplotlib.ticker import MaxNLocator

from trainables.data import Split
from trainables.models import SequenceModel

__all__ = ["k_curve_png", "loss_curve_png", "model_picture_png", "sweep_plot_png"]

PathLike = str | os.PathLike[str]

#: above this many states the transition heatmap gets no per-cell labels or tick names
_MAX_LABELLED_STATES = 12
#: a positive numeric hyperparameter spread over more than this factor is plotted on a log axis
_LOG_AXIS_SPREAD = 20.0
_HALO = [withStroke(linewidth=2.5, foreground="white")]
_BEST_STYLE = {"marker": "*", "s": 260, "color": "crimson", "edgecolors": "black", "zorder": 5}


# ---------------------------------------------------------------- shared helpers
def _figure(width: float, height: float) -> Figure:
    """A new figure (inches) on its own Agg canvas, laid out so nothing is clipped."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def _message_png(title: str, message: str, path: PathLike) -> Path:
    """A PNG that only says ``message`` (for empty histories or sweeps without results)."""
    fig = _figure(6.4, 3.2)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=12)
    ax.set_axis_off()
    return _save(fig, path)


def _is_finite_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _state_colors(num_states: int) -> tuple[Colormap, BoundaryNorm]:
    """One distinct color per state ``0 .. num_states - 1``, for images and scatters."""
    if num_states <= 20:
        base = matplotlib.colormaps["tab10" if num_states <= 10 else "tab20"]
        cmap = ListedColormap(base(np.arange(num_states)))
    else:
        cmap = ListedColormap(matplotlib.colormaps["turbo"](np.linspace(0, 1, num_states)))
    return cmap, BoundaryNorm(np.arange(num_states + 1) - 0.5, num_states)


def _state_colorbar(
    fig: Figure, mappable: Any, ax: Axes, num_states: int, label: str, max_ticks: int = 12
) -> Colorbar:
    """A colorbar of discrete states with at most ``max_ticks`` integer ticks."""
    bar = fig.colorbar(mappable, ax=ax, label=label, pad=0.01)
    step = max(1, math.ceil(num_states / max_ticks))
    bar.set_ticks(np.arange(0, num_states, step))
    bar.minorticks_off()
    return bar


# ---------------------------------------------------------------- loss curve
def loss_curve_png(history: Sequence[dict[str, float]], path: PathLike) -> Path:
    """Train loss and validation NLL (both nats per frame) against the epoch, with the
    epoch of the best validation NLL marked.

    :param history: one row per epoch with keys ``epoch``, ``train_loss`` and
        ``valid_nll``; non-finite values leave a gap in their line.
    """
    if not history:
        return _message_png("Training curve", "No epochs were recorded.", path)
    epochs = np.array([row["epoch"] for row in history], dtype=float)
    train = np.array([row["train_loss"] for row in history], dtype=float)
    valid = np.array([row["valid_nll"] for row in history], dtype=float)
    fig = _figure(7.0, 4.2)
    ax = fig.add_subplot()
    ax.plot(epochs, train, marker=".", label="train loss (negative ELBO)")
    ax.plot(epochs, valid, marker=".", label="validation NLL")
    finite = np.isfinite(valid)
    if finite.any():
        best = int(np.flatnonzero(finite)[np.argmin(valid[finite])])
        ax.axvline(epochs[best], color="grey", linestyle=":", linewidth=1)
        ax.scatter(
            [epochs[best]],
            [valid[best]],
            **_BEST_STYLE,
            label=f"best validation: {valid[best]:.4g} at epoch {epochs[best]:g}",
        )
    ax.set_title("Training curve")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per frame (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


# ---------------------------------------------------------------- model pictures
def model_picture_png(model: SequenceModel, split: Split, path: PathLike) -> Path:
    """A picture of what ``model`` learned, drawn on data from ``split``, by the kind of
    its latent variables:

    - ``states`` (HMM families): the transition matrix over the engine's state space
      ``(S, S)`` (left), and the first sequence of ``split`` with its Viterbi path (right),
      frames drawn as a piano roll (``binary``) or as values over time (``real``).
    - ``components`` (mixtures): the points ``(N, D)`` of ``split`` colored by MAP
      component, with every component's mean and 2-sigma ellipse (a histogram with the
      weighted component densities when ``D == 1``).
    - ``continuous`` (``dmm``): the first sequence of ``split`` and its decoded latent
      path ``(T, Z)``.

    :param split: sequences ``x`` ``(N, T, D)`` with ``lengths`` ``(N,)``, or points
        ``x`` ``(N, D)`` for mixtures.
    """
    with torch.no_grad():
        fig = _FIGURES[model.latent](model, split)
    return _save(fig, path)


def _first_sequence(model: SequenceModel, split: Split) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The first sequence of ``split`` on the model's device as ``x`` ``(1, T, D)`` and
    ``lengths`` ``(1,)``, with its number of real frames ``L``."""
    if split.lengths is None:
        raise ValueError(f"{model.family}: the picture needs sequence data (x with lengths)")
    x, lengths = split.x[:1].to(model.device), split.lengths[:1].to(model.device)
    return x, lengths, int(lengths[0])


def _piano_roll(fig: Figure, ax: Axes, frames: np.ndarray, title: str) -> None:
    """Draw binary ``frames`` ``(L, D)`` as a piano roll: one column per frame, one row
    per key, lowest key at the bottom."""
    image = ax.imshow(frames.T, origin="lower", aspect="auto", cmap="Greys", vmin=0, vmax=1,
                      interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, pad=0.01, ticks=[0, 1])
    bar.set_ticklabels(["off", "on"])
    ax.set_ylabel("key (0 = lowest)")
    ax.set_title(title)
    ax.tick_params(labelbottom=False)


def _transition_heatmap(fig: Figure, ax: Axes, model: SequenceModel) -> None:
    """Heatmap of p(to | from) ``(S, S)`` over the engine's state space."""
    trans = model.transition_matrix().cpu().numpy()
    num_states = trans.shape[-1]
    image = ax.imshow(trans, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, label="p(to | from)", shrink=0.8)
    ax.set_title(f"{model.family}: transition matrix\n{num_states} {model.state_space}")
    ax.set_xlabel("to state")
    ax.set_ylabel("from state")
    if num_states <= _MAX_LABELLED_STATES:
        labels = model.state_labels()
        ax.set_xticks(range(num_states), labels, rotation=90 if num_states > 6 else 0)
        ax.set_yticks(range(num_states), labels)
        for (i, j), p in np.ndenumerate(trans):
            ax.text(j, i, f"{p:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if p > 0.6 else "white")


def _states_figure(model: SequenceModel, split: Split) -> Figure:
    x, lengths, length = _first_sequence(model, split)
    states = model.decode(x, lengths).states[0, :length].cpu().numpy()
    frames = x[0, :length].cpu().numpy()
    fig = _figure(14.0, 5.6)
    grid = fig.add_gridspec(2, 2, width_ratios=[1.0, 1.7], height_ratios=[5, 1])
    _transition_heatmap(fig, fig.add_subplot(grid[:, 0]), model)
    top = fig.add_subplot(grid[0, 1])
    strip = fig.add_subplot(grid[1, 1], sharex=top)
    title = f"first sequence of the split ({length} frames) and its Viterbi path"
    if model.observation in ("binary", "categorical"):  # keys, or one-hot symbols, as a roll
        _piano_roll(fig, top, frames, title)
    else:
        _real_frames(fig, top, frames, states, model.hidden_dim, title)
    cmap, norm = _state_colors(model.hidden_dim)
    image = strip.imshow(states[None, :], aspect="auto", cmap=cmap, norm=norm,
                         interpolation="nearest", extent=(-0.5, length - 0.5, 0, 1))
    _state_colorbar(fig, image, strip, model.hidden_dim, "state", max_ticks=4)
    _label_runs(strip, states)
    strip.set_yticks([])
    strip.set_ylabel("Viterbi\nstate")
    strip.set_xlabel("time (frame)")
    return fig


def _label_runs(ax: Axes, states: np.ndarray) -> None:
    """Write the state number on every run of ``states`` ``(L,)`` long enough to hold it."""
    starts = np.flatnonzero(np.diff(states, prepend=-2))
    ends = np.append(starts[1:], len(states))
    for start, end in zip(starts, ends):
        if end - start >= max(2, 0.03 * len(states)):
            ax.text((start + end - 1) / 2, 0.5, str(states[start]), ha="center", va="center",
                    fontsize=9, fontweight="bold", path_effects=_HALO)


def _real_frames(fig: Figure, ax: Axes, frames: np.ndarray, states: np.ndarray,
                     num_states: int, title: str) -> None:
    """The first one or two dimensions of ``frames`` ``(L, D)`` against time, every frame
    colored by its decoded state (``states`` ``(L,)``)."""
    cmap, norm = _state_colors(num_states)
    time = np.arange(len(frames))
    for d, marker in zip(range(min(2, frames.shape[1])), ("o", "s")):
        ax.plot(time, frames[:, d], color="grey", linewidth=0.8, marker=marker,
                markerfacecolor="none", zorder=1, label=f"dimension {d}")
        points = ax.scatter(time, frames[:, d], c=states, cmap=cmap, norm=norm, marker=marker,
                            edgecolors="black", linewidths=0.4, zorder=2)
    _state_colorbar(fig, points, ax, num_states, "Viterbi state")
    ax.set_ylabel("value")
    if frames.shape[1] > 2:
        title += f"\n(dimensions 0 and 1 of {frames.shape[1]})"
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    ax.tick_params(labelbottom=False)


def _components_figure(model: SequenceModel, split: Split) -> Figure:
    """Points ``x`` ``(N, D)`` by MAP component, with the learned components."""
    x = split.x.to(model.device)
    assignment = model.decode(x).states.cpu().numpy()
    weights, locs, scales = (tensor.cpu().numpy() for tensor in model.components())
    points = x.cpu().numpy()
    fig = _figure(7.5, 6.0)
    ax = fig.add_subplot()
    if points.shape[1] == 1:
        _mixture_histogram(ax, points[:, 0], assignment, weights, locs[:, 0], scales[:, 0])
        shown = f"histogram of {len(points)} points stacked by MAP component"
    else:
        _mixture_scatter(fig, ax, points, assignment, weights, locs, scales)
        shown = f"{len(points)} points colored by MAP component; X: mean, ellipse: 2 sigma"
        if points.shape[1] > 2:
            shown += f"\n(first 2 of {points.shape[1]} dimensions)"
    ax.set_title(f"{model.family}: {model.hidden_dim} components\n{shown}")
    ax.grid(alpha=0.3)
    return fig


def _mixture_scatter(fig: Figure, ax: Axes, points: np.ndarray, assignment: np.ndarray,
                 weights: np.ndarray, locs: np.ndarray, scales: np.ndarray) -> None:
    """Scatter of ``points`` ``(N, D >= 2)`` in dims 0 and 1, means ``locs`` ``(K, D)``
    marked and diagonal 2-sigma ellipses from ``scales`` ``(K, D)``."""
    num_components = len(weights)
    cmap, norm = _state_colors(num_components)
    dots = ax.scatter(points[:, 0], points[:, 1], c=assignment, cmap=cmap, norm=norm, s=14,
                      alpha=0.7)
    for k in range(num_components):
        ax.add_patch(Ellipse(locs[k, :2], 4 * scales[k, 0], 4 * scales[k, 1], fill=False,
                             edgecolor=cmap(k), linewidth=2))
    ax.scatter(locs[:, 0], locs[:, 1], c=np.arange(num_components), cmap=cmap, norm=norm,
               marker="X", s=160, edgecolors="black", linewidths=1.2, zorder=4)
    bar = _state_colorbar(fig, dots, ax, num_components, "component")
    if num_components <= _MAX_LABELLED_STATES:
        bar.set_ticks(range(num_components), labels=[f"{k}: weight {w:.2f}" for k, w in
                                                     enumerate(weights)])
    ax.set_xlabel("dimension 0")
    ax.set_ylabel("dimension 1")


def _mixture_histogram(ax: Axes, points: np.ndarray, assignment: np.ndarray, weights: np.ndarray,
                   locs: np.ndarray, scales: np.ndarray) -> None:
    """Stacked density histogram of 1-D ``points`` ``(N,)`` by component, with each
    component's weighted density ``w_k Normal(loc_k, scale_k)`` over it."""
    cmap, _ = _state_colors(len(weights))
    groups = [points[assignment == k] for k in range(len(weights))]
    ax.hist(groups, bins=30, stacked=True, density=True, alpha=0.5,
            color=[cmap(k) for k in range(len(weights))])
    grid = np.linspace(points.min() - 1.0, points.max() + 1.0, 400)
    for k, (w, loc, scale) in enumerate(zip(weights, locs, scales)):
        density = w * np.exp(-0.5 * ((grid - loc) / scale) ** 2) / (scale * math.sqrt(2 * math.pi))
        ax.plot(grid, density, color=cmap(k), linewidth=2,
                label=f"component {k}: weight {w:.2f} x Normal({loc:.2f}, sd {scale:.2f})")
    ax.set_xlabel("value")
    ax.set_ylabel("density")
    ax.legend(loc="best", fontsize=8)


def _continuous_figure(model: SequenceModel, split: Split) -> Figure:
    x, lengths, length = _first_sequence(model, split)
    latents = model.decode(x, lengths).latents[0, :length].cpu().numpy()
    fig = _figure(12.0, 6.4)
    top = fig.add_subplot(2, 1, 1)
    bottom = fig.add_subplot(2, 1, 2, sharex=top)
    _piano_roll(fig, top, x[0, :length].cpu().numpy(),
                f"{model.family}: first sequence of the split ({length} frames)")
    limit = float(np.abs(latents).max()) or 1.0
    image = bottom.imshow(latents.T, origin="lower", aspect="auto", cmap="RdBu_r",
                          vmin=-limit, vmax=limit, interpolation="nearest")
    fig.colorbar(image, ax=bottom, pad=0.01, label="posterior mean")
    bottom.set_title(f"posterior-mean latent path z[t] ({latents.shape[1]} latent dimensions)")
    bottom.set_ylabel("latent dimension")
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_xlabel("time (frame)")
    return fig


#: the picture of each declared kind of latent variable
_FIGURES = {"states": _states_figure, "components": _components_figure, "continuous": _continuous_figure}


# ---------------------------------------------------------------- sweep summary
def sweep_plot_png(
    rows: Sequence[dict[str, Any]],
    searched: Sequence[str],
    metric: str,
    path: PathLike,
    mode: Literal["min", "max"] = "min",
) -> Path:
    """The sweep ``metric`` against every searched hyperparameter, best trial highlighted.

    :param rows: one dict per trial with the searched hyperparameters (numbers or
        strings), ``metric`` and ``status``; rows whose ``metric`` is missing or not a
        finite number (failed or unfinished trials) are left out, and counted in the title.
    :param searched: the searched keys, one panel each (metric against value; a log axis
        for positive values spread over more than a factor 20; strings as categories).
        Empty: one panel of the metric per trial index.
    :param mode: whether lower (``"min"``) or higher (``"max"``) ``metric`` is better.
    """
    done = [(i, row) for i, row in enumerate(rows) if _is_finite_number(row.get(metric))]
    if not done:
        statuses = sorted({str(row.get("status", "unknown")) for row in rows})
        detail = f"statuses: {', '.join(statuses)}" if statuses else "no trials"
        return _message_png(f"Sweep: {metric}",
                            f"No trial reported a finite {metric}\n({len(rows)} trials; {detail})",
                            path)
    values = [float(row[metric]) for _, row in done]
    best = int(np.argmin(values) if mode == "min" else np.argmax(values))
    keys = list(searched) or [None]
    columns = min(len(keys), 3)
    fig = _figure(max(4.6 * columns, 8.0), 3.8 * math.ceil(len(keys) / columns) + 0.4)
    for n, key in enumerate(keys):
        ax = fig.add_subplot(math.ceil(len(keys) / columns), columns, n + 1)
        if key is None:
            _metric_panel(ax, [i for i, _ in done], values, best)
            ax.set_xlabel("trial index")
        else:
            _hyperparameter_panel(ax, key, done, values, best)
        ax.set_ylabel(f"{metric} ({'lower' if mode == 'min' else 'higher'} is better)")
    skipped = len(rows) - len(done)
    fig.suptitle(
        f"Sweep: {metric} of {len(done)} trials, one dot each; "
        f"best {values[best]:.4g} (trial {done[best][0]}, red star)"
        + (f"\n{skipped} trials without a finite {metric} are not shown" if skipped else "")
    )
    return _save(fig, path)


def _hyperparameter_panel(ax: Axes, key: str, done: list[tuple[int, dict[str, Any]]],
                          values: list[float], best: int) -> None:
    """Metric against the value of ``key`` for the trials that have it."""
    present = [n for n, (_, row) in enumerate(done) if key in row]
    ax.set_xlabel(key)
    if not present:
        ax.set_title(f"{key}: no finished trial has a value")
        return
    settings = [done[n][1][key] for n in present]
    metrics = [values[n] for n in present]
    best_here = present.index(best) if best in present else None
    if all(_is_finite_number(s) for s in settings):
        numbers = np.array(settings, dtype=float)
        _metric_panel(ax, numbers, metrics, best_here)
        if numbers.min() > 0 and numbers.max() > _LOG_AXIS_SPREAD * numbers.min():
            ax.set_xscale("log")
        elif all(float(s).is_integer() for s in settings) and len(set(settings)) <= 10:
            ax.set_xticks(sorted(set(numbers)))
    else:
        categories = sorted({str(s) for s in settings})
        positions = [categories.index(str(s)) for s in settings]
        _metric_panel(ax, positions, metrics, best_here)
        ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
        ax.set_xlim(-0.5, len(categories) - 0.5)
    ax.set_title(f"{key}" + (f" ({len(done) - len(present)} trials without it)"
                             if len(present) < len(done) else ""))


def _metric_panel(ax: Axes, positions: Sequence[float] | np.ndarray, metrics: Sequence[float],
                  best: int | None) -> None:
    """Scatter of ``metrics`` at ``positions``, the ``best`` one (an index) as a star."""
    ax.scatter(positions, metrics, s=36, alpha=0.75, edgecolors="black", linewidths=0.4)
    if best is not None:
        ax.scatter([positions[best]], [metrics[best]], **_BEST_STYLE)
    ax.grid(alpha=0.3)


def k_curve_png(per_k: Sequence[dict[str, Any]], recommended: dict[str, Any] | None, path: PathLike) -> Path:
    """Choosing the number of states: held-out NLL per frame with its standard error, and
    BIC and AIC of the training split, against ``hidden_dim``; the recommendation marked.

    :param per_k: the best trial per ``hidden_dim`` (:func:`trainables.selection.best_per_value`),
        with ``best_valid_nll``, ``valid_nll_se``, ``bic`` and ``aic`` (NaN where not known).
    :param recommended: the row the one-standard-error rule picks, or None.
    """
    if not per_k:
        return _message_png("Number of states", "No finished trial to compare", path)
    states = [int(row["hidden_dim"]) for row in per_k]
    fig = _figure(11.0, 4.2)
    held_out, criteria = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    nll = [row["best_valid_nll"] for row in per_k]
    spread = [row.get("valid_nll_se", math.nan) for row in per_k]
    held_out.errorbar(states, nll, yerr=[s if math.isfinite(s) else 0.0 for s in spread], marker="o", capsize=4)
    held_out.set_ylabel("held-out NLL (nats per frame, ± 1 s.e.)")
    for key, marker in (("bic", "s"), ("aic", "^")):
        values = [row.get(key, math.nan) for row in per_k]
        if any(math.isfinite(v) for v in values):
            criteria.plot(states, values, marker=marker, label=key.upper())
    criteria.set_ylabel("BIC, AIC of the training split (lower is better)")
    if criteria.get_legend_handles_labels()[0]:
        criteria.legend()
    for ax in (held_out, criteria):
        ax.set_xlabel("hidden_dim (best trial of each)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if recommended is not None:
            ax.axvline(int(recommended["hidden_dim"]), color="crimson", linestyle="--", linewidth=1)
    title = "Number of states"
    if recommended is not None:
        title += (f": {recommended['hidden_dim']} recommended (the fewest within one standard error "
                  f"of the best held-out NLL, dashed)")
    fig.suptitle(title)
    return _save(fig, path)
