"""Sweep files (docs/design.md, "Sweep file"): read and validate a sweep YAML before Ray
starts, and turn it into what the launcher and ``pyrosweep sweep --dry-run`` need.

``load_sweep_file("configs/hmm-jsb.yaml")`` returns a :class:`SweepSpec`, or raises a
:class:`SweepFileError` listing every problem found, one per line, each naming the file
and the key path::

    configs/x.yaml: search.lr.loguniform: expected [low, high] with 0 < low < high, got [0.1, 0.01]
    configs/x.yaml: trian: unknown key (expected one of: checkpoint_every, data, ...); did you mean 'train'?

One job per module: :mod:`.problems` (key paths and messages), :mod:`.reading` (YAML),
:mod:`.checks` (values of the search space and data options against their
declarations), :mod:`.schema` (the spec), :mod:`.space` (the search space for Tune) and
:mod:`.plan` (the dry-run text). Only :func:`param_space` imports Ray.
"""

from .plan import describe_plan
from .problems import SweepFileError
from .schema import Resources, Restarts, Scheduler, SearchAlg, SweepSpec, load_sweep_file
from .space import num_trials, param_space, searched_keys

__all__ = [
    "SweepFileError",
    "SweepSpec",
    "Restarts",
    "Scheduler",
    "SearchAlg",
    "Resources",
    "load_sweep_file",
    "param_space",
    "searched_keys",
    "num_trials",
    "describe_plan",
]
