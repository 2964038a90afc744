"""The dry-run plan of ``pyrosweep sweep --dry-run``: what a sweep would run, one aligned
line per setting."""

from __future__ import annotations

from typing import Any

from .schema import Restarts, SweepSpec
from .space import grid_size, num_trials, search_form


def _describe_spec(value: Any) -> str:
    """``grid [8, 16]``, ``randint [0, 10)``, ``0.5 (fixed)``."""
    form = search_form(value)
    if form is None:
        return f"{value!r} (fixed)"
    if form == "randint":
        low, high = value[form]
        return f"randint [{low}, {high})"
    return f"{form} {value[form]!r}"


def _describe_data(data: dict[str, Any]) -> str:
    """``jsb (max_chorales=60)`` or the file path."""
    head = data.get("name", data.get("path"))
    options = ", ".join(f"{key}={value!r}" for key, value in data.items() if key not in ("name", "path"))
    return f"{head} ({options})" if options else str(head)


def _describe_restarts(restarts: Restarts) -> str:
    """``best of 10 initialisations, keep 1`` or ``none (one initialisation)``."""
    if restarts.screen == 1:
        return "none (one initialisation per trial)"
    return f"best of {restarts.screen} initialisations, keep {restarts.keep}"


def _describe_trials(spec: SweepSpec) -> str:
    """``8 = 2 samples x 4 grid points``."""
    total = num_trials(spec)
    if spec.search_alg.type == "optuna" or grid_size(spec) == 1:
        return str(total)
    return f"{total} = {spec.num_samples} samples x {grid_size(spec)} grid points"


def _describe_scheduler(spec: SweepSpec) -> str:
    """``asha (grace_period 5, reduction_factor 2, max_t 30 epochs)`` or ``fifo``."""
    scheduler = spec.scheduler
    if scheduler.type == "fifo":
        return "fifo (every trial runs to the end or its early stop)"
    return (
        f"asha (grace_period {scheduler.grace_period}, reduction_factor {scheduler.reduction_factor:g}, "
        f"max_t {spec.train.epochs} epochs)"
    )


def _describe_search_alg(spec: SweepSpec) -> str:
    """``random (grid x random sampling), seed 0``."""
    kind = "optuna (OptunaSearch)" if spec.search_alg.type == "optuna" else "random (grid x random sampling)"
    return kind if spec.search_alg.seed is None else f"{kind}, seed {spec.search_alg.seed}"


def describe_plan(spec: SweepSpec) -> str:
    """The dry-run plan: one aligned ``label  text`` line per setting, one per search key."""
    train = spec.train.model_dump().items()
    fixed = " ".join(f"{key}={value}" for key, value in train if key not in spec.search)
    width = max((len(key) for key in spec.search), default=0)
    search_lines = [f"{key.ljust(width)}  {_describe_spec(value)}" for key, value in spec.search.items()]
    resources = spec.resources
    concurrency = "decided by Ray" if spec.max_concurrent is None else str(spec.max_concurrent)
    per_trial = f"{resources.cpu:g} cpu, {resources.gpu:g} gpu per trial, max_concurrent {concurrency}"
    rows = [
        ("sweep", f"{spec.name} ({spec.source})" if spec.source else spec.name),
        ("model", spec.model),
        ("data", _describe_data(spec.data)),
        ("train", fixed),
        ("search", search_lines[0] if search_lines else "(nothing)"),
        *(("", line) for line in search_lines[1:]),
        ("restarts", _describe_restarts(spec.restarts)),
        *([("seeds", f"{spec.seeds} outer seeds per trial (seed, seed + 1, ...): the searcher and ASHA see their mean")]
          if spec.seeds > 1 else []),
        ("trials", _describe_trials(spec)),
        ("metric", f"{spec.metric} ({spec.mode})"),
        ("scheduler", _describe_scheduler(spec)),
        ("search_alg", _describe_search_alg(spec)),
        ("resources", per_trial),
        ("checkpoints", f"every {spec.checkpoint_every} epochs; max_failures {spec.max_failures}"),
    ]
    label_width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(label_width)}  {text}".rstrip() for label, text in rows)
