"""What every benchmark script shares: the machine line and best-of-N (or median) timing."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import torch


def setup_threads() -> None:
    """One torch thread (as trials run), or ``BENCH_THREADS``."""
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))


def machine() -> str:
    """Platform, cores, torch version and threads, and the load when the line is printed
    (the CPU may be shared: compare figures of one run only)."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load}"
    )


def timings(fn: Callable[[], object], repeats: int, warmup: bool = True) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` (after one untimed call)."""
    if warmup:
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return times


def best_time(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """The fastest of ``repeats`` calls of ``fn``, in seconds (after one untimed call)."""
    return min(timings(fn, repeats, warmup))
