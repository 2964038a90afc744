"""Write a synthetic table of sensor readings with gaps, for configs/readings.yaml.

60 units, each a sequence of 25 to 50 readings a minute apart of three sensors (a, b, c),
sampled from a 3-state Gaussian HMM; a fifth of the readings are lost (null), and one
reading in twenty loses all three. Long format, one row per reading, rows shuffled:
``unit``, ``time`` (a timestamp), ``a``, ``b``, ``c``. ``--live`` writes 20 more units of
the same HMM instead, unseen in training: live data to score.

Run: python configs/sensor_readings.py                  (writes configs/readings.parquet)
     python configs/sensor_readings.py --live --out live.csv  (.parquet or .csv)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa

from trainables.data import SPLITS, load_dataset

SENSORS = ("a", "b", "c")


TRAINING_UNITS, LIVE_UNITS = 60, 20


def readings_table(live: bool = False) -> pa.Table:
    """The readings as a table (see the module docstring): the training units, or the live ones."""
    data = load_dataset("synthetic-gaussian-hmm", num_sequences=TRAINING_UNITS + LIVE_UNITS, length=50,
                        data_dim=3, hidden_dim=3, seed=0)
    sequences = [x[:length] for split in SPLITS
                 for x, length in zip(data.splits[split].x.double().numpy(), data.splits[split].lengths.tolist())]
    chosen = range(TRAINING_UNITS, TRAINING_UNITS + LIVE_UNITS) if live else range(TRAINING_UNITS)
    rng = np.random.default_rng(int(live))
    units, times, frames = [], [], []
    for unit in chosen:
        length = len(sequences[unit])
        units += [f"unit-{unit:03d}"] * length
        times.append((np.datetime64("2026-11-01T00:00") + np.arange(length).astype("timedelta64[m]")).astype("datetime64[s]"))
        frames.append(sequences[unit])
    values = np.concatenate(frames)
    lost = (rng.random(values.shape) < 0.2) | (rng.random((len(values), 1)) < 0.05)
    columns = {"unit": pa.array(units), "time": pa.array(np.concatenate(times))}
    for d, name in enumerate(SENSORS):
        columns[name] = pa.array(values[:, d], mask=lost[:, d])
    table = pa.table(columns)
    return table.take(rng.permutation(table.num_rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("readings.parquet"))
    parser.add_argument("--live", action="store_true", help="the 20 live units instead of the 60 training ones")
    args = parser.parse_args()
    table = readings_table(args.live)
    if args.out.suffix.lower() == ".csv":
        from pyarrow import csv

        csv.write_csv(table, args.out)
    else:
        from pyarrow import parquet

        parquet.write_table(table, args.out)
    print(f"{args.out}: {table.num_rows} readings of {len(set(table.column('unit').to_pylist()))} units")


if __name__ == "__main__":
    main()
