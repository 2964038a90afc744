"""Batch scoring throughput (``pyrosweep score``, :mod:`cluster.batch_scoring`) on a local
Ray: sequences per second per core with 1 and 2 scoring actors, against the same
``compute`` in this process with no Ray (the ceiling of one core).

An ``hmm`` (K=8, 16 binary keys) scores Parquet tables of 10-20-frame sequences, 5% of the
values missing. Each run's time includes starting its actors and loading the model in
them; the steady rate counts only the blocks after the first one reached the driver. ``BENCH_METHODS`` (default ``score``) picks the methods.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine, setup_threads  # noqa: E402

from cluster.batch_scoring import ScoreOptions, answer_fields, run_scoring  # noqa: E402
from trainables.checkpoint import save_checkpoint  # noqa: E402
from trainables.models import build_model  # noqa: E402

DATA_DIM, HIDDEN_DIM, BATCH_SIZE = 16, 8, 500
SEQUENCES, IN_PROCESS = 100_000, 20_000
METHODS = tuple(os.environ.get("BENCH_METHODS", "score").split(","))


def sequences(count: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    made = []
    for _ in range(count):
        frames = (rng.random((rng.integers(10, 21), DATA_DIM)) < 0.3).astype(np.float64)
        frames[rng.random(frames.shape) < 0.05] = np.nan
        made.append(frames)
    return made


def write_table(items: list[np.ndarray], path: Path) -> None:
    """``items`` as a long-format table: sequence, order, key0..key15."""
    values = np.concatenate(items)
    columns = {
        "sequence": np.repeat(np.arange(len(items)), [len(item) for item in items]),
        "order": np.concatenate([np.arange(len(item)) for item in items]),
        **{f"key{d}": values[:, d] for d in range(DATA_DIM)},
    }
    pq.write_table(pa.table(columns), path)


def main() -> None:
    setup_threads()
    print(machine())
    scratch = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    model = build_model("hmm", data_dim=DATA_DIM, hidden_dim=HIDDEN_DIM)
    start = torch.from_numpy(np.nan_to_num(np.stack([s[:10] for s in sequences(64, 0)]))).float()
    model.set_parameters(**model.init_parameters(start, torch.full((64,), 10), torch.Generator().manual_seed(0)))
    checkpoint = save_checkpoint(model, scratch / "hmm")

    items = sequences(SEQUENCES, 1)
    answer_fields(model, METHODS, items[:BATCH_SIZE])  # compile once
    started = time.perf_counter()
    for first in range(0, IN_PROCESS, BATCH_SIZE):
        answer_fields(model, METHODS, items[first : first + BATCH_SIZE])
    in_process = IN_PROCESS / (time.perf_counter() - started)
    print(f"methods {','.join(METHODS)}; hmm K={HIDDEN_DIM}, D={DATA_DIM}, 10-20 frames, batches of {BATCH_SIZE}")
    print(f"in process, no Ray (1 core): {in_process:,.0f} sequences/s")

    write_table(items, scratch / "in.parquet")
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        for actors in (1, 2):
            summary = run_scoring(ScoreOptions(
                model=str(checkpoint), input=str(scratch / "in.parquet"), output=str(scratch / "out.parquet"),
                tracking_uri="", methods=METHODS, actors=actors, batch_size=BATCH_SIZE,
            ))  # fmt: skip
            print(f"{actors} actor(s), {summary.sequences:,} sequences: {summary.seconds:.1f} s "
                  f"({summary.startup:.1f} s to the first block): {summary.per_second / actors:,.0f} sequences/s "
                  f"per core in all, {summary.steady_per_second / actors:,.0f} per core after the first block")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
