"""The setting that forces a path of the exact engine (:mod:`trainables.inference`), for
benchmarks and debugging: ``PYROSWEEP_ENGINE`` or ``pyrosweep --engine``. Free of torch,
so that the command line can set it before anything heavy is imported."""

from __future__ import annotations

import os

ENGINE_ENV = "PYROSWEEP_ENGINE"
#: auto: the path each call's device and sizes choose; compiled: the CPU kernels (numba);
#: torch: the sequential PyTorch recursions (the reference); scan: the parallel scan
ENGINES = ("auto", "compiled", "torch", "scan")


def engine() -> str:
    """The engine ``PYROSWEEP_ENGINE`` asks for (``auto`` unless set)."""
    choice = os.environ.get(ENGINE_ENV, "auto")
    if choice not in ENGINES:
        raise ValueError(f"{ENGINE_ENV}: expected one of {list(ENGINES)}, got {choice!r}")
    return choice
