"""A sweep's progress on the driver's stdout, in place of Tune's status tables.

:class:`SweepView` prints a line for every trial that ends and a summary line when the
sweep does: plain text, no control codes. On a terminal it also draws a live table
(``rich``) under those lines: the count of trials by state, the best valid NLL so far,
the elapsed time, and each running trial's epoch and NLLs.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

from ray import tune
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .console import live_terminal

REDRAW_S = 0.25
CAUSE_CHARS = 300
PENDING = ("PENDING", "PAUSED")


def _value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cause(trial) -> str:
    """The last line of the trial's last error, from the error file Tune has just written
    on the driver (its copy in the sweep's storage may not be there yet)."""
    path = Path(trial.error_file) if trial.error_file else None
    lines = path.read_text().strip().splitlines() if path and path.exists() else []
    return lines[-1][:CAUSE_CHARS] if lines else "see the log"


class SweepView(tune.Callback):
    """Tune callback drawing the sweep for the user (see the module). Tune pickles its
    callbacks with the experiment for ``Tuner.restore``: only ``searched`` is kept, the
    rest starts again in :meth:`setup`."""

    def __init__(self, searched: list[str]) -> None:
        self.searched = searched

    def __getstate__(self) -> dict[str, Any]:
        return {"searched": self.searched}

    def setup(self, total_num_samples: int = 0, **info) -> None:
        self._started = time.monotonic()
        self._total = total_num_samples
        self._best: tuple[float, str] | None = None
        self._drawn = 0.0
        self._live = None
        if live_terminal():
            self._live = Live(console=Console(), auto_refresh=False, transient=True)
            self._live.start()

    def _label(self, trial) -> str:
        params = ", ".join(f"{key}={_value(trial.config.get(key))}" for key in self.searched)
        return f"trial {trial.trial_id}" + (f" ({params})" if params else "")

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        best = result.get("best_valid_nll")
        if best is not None and (self._best is None or best < self._best[0]):
            self._best = (best, trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result
        print(f"   {self._label(trial)} finished: best valid NLL {result.get('best_valid_nll', float('nan')):.4f} "
              f"at epoch {result.get('best_epoch', '?')} of {result.get('epoch', '?')}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        epoch = trial.last_result.get("epoch", 0) + 1
        print(f"   {self._label(trial)} failed in epoch {epoch}: {_cause(trial)}", flush=True)

    def on_step_end(self, iteration, trials, **info) -> None:
        if self._live is not None and time.monotonic() - self._drawn >= REDRAW_S:
            self._live.update(self._table(trials), refresh=True)
            self._drawn = time.monotonic()

    def on_experiment_end(self, trials, **info) -> None:
        if self._live is not None:
            self._live.stop()
        finished = sum(1 for trial in trials if trial.status == "TERMINATED" and trial.last_result.get("done"))
        failed = sum(1 for trial in trials if trial.status == "ERROR")
        # stopped by Ctrl-C: terminated, but not done
        counts = {"finished": finished, "failed": failed, "unfinished": len(trials) - finished - failed}
        parts = ", ".join(f"{count} {name}" for name, count in counts.items() if count)
        print(f"   {len(trials)} trials in {time.monotonic() - self._started:.0f} s: {parts or 'none ran'}", flush=True)

    def _table(self, trials) -> Group:
        """The live view: the counts and the time, the best so far, the running trials."""
        states = Counter(trial.status for trial in trials)
        pending = sum(states[state] for state in PENDING) + max(0, self._total - len(trials))
        elapsed = time.monotonic() - self._started
        counts = (f"{pending} pending, {states['RUNNING']} running, {states['TERMINATED']} finished, "
                  f"{states['ERROR']} failed  ({elapsed // 60:.0f}:{elapsed % 60:02.0f})")
        best = f"best so far: valid NLL {self._best[0]:.4f}, trial {self._best[1]}" if self._best else "no result yet"
        table = Table("trial", *self.searched, "epoch", "valid NLL", "best valid NLL", box=None)
        for trial in trials:
            if trial.status == "RUNNING":
                result = trial.last_result
                table.add_row(trial.trial_id, *(_value(trial.config.get(key)) for key in self.searched),
                              *(_value(result.get(key, "")) for key in ("epoch", "valid_nll", "best_valid_nll")))
        return Group(Text(counts), Text(best), table)
