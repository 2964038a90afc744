"""Tables in long format (CSV, Parquet): one row per frame, read into the same splits
whatever the file type, with every problem named with its file and place."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import pytest
import ray
import torch
import yaml

from cluster.cli import _read_query_input
from cluster.sweep import run_sweep
from cluster.sweep_file import SweepFileError, load_sweep_file
from helpers import knock_out
from trainables.data import SPLITS, DataError, dataset_summary, load_dataset
from trainables.models import build_model
from trainables.settings import TrainConfig
from trainables.svi import evaluate_nll, train

FEATURES = ["a", "b"]  # synthetic-gaussian-hmm's 2 values per frame


def long_rows(data, seed: int = 0) -> pa.Table:
    """Every sequence of every split of ``data`` as rows (unit, t, a, b, part), shuffled;
    unit ids sort in the order of the splits' sequences."""
    units, times, parts, frames = [], [], [], []
    for split in SPLITS:
        x, lengths = data.splits[split].x, data.splits[split].lengths
        for n, length in enumerate(lengths.tolist()):
            units += [f"{split[:2]}{n:03d}"] * length
            times += list(range(length))
            parts += [split] * length
            frames.append(x[n, :length].double().numpy())
    values = np.concatenate(frames)
    gaps = {name: pa.array(values[:, d], mask=np.isnan(values[:, d])) for d, name in enumerate(FEATURES)}  # NaN -> null
    table = pa.table({"unit": units, "t": times, **gaps, "part": parts})
    return table.take(np.random.default_rng(seed).permutation(table.num_rows))


@pytest.fixture(scope="module")
def readings(tmp_path_factory):
    """synthetic-gaussian-hmm with 20% of values missing, as a Parquet and a CSV file."""
    data = knock_out(load_dataset("synthetic-gaussian-hmm", num_sequences=30, seed=3), 0.2, seed=4)
    table = long_rows(data)
    directory = tmp_path_factory.mktemp("tables")
    pa_parquet.write_table(table, directory / "readings.parquet")
    pa_csv.write_csv(table, directory / "readings.csv")
    return data, directory


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_a_parquet_and_a_csv_file_give_the_same_splits_and_the_same_trial(readings):
    data, directory = readings
    options = {"sequence": "unit", "order": "t", "features": FEATURES}
    parquet = load_dataset(path=directory / "readings.parquet", **options)
    csv = load_dataset(path=directory / "readings.csv", **options)
    for split in SPLITS:
        assert same(parquet.splits[split].x, csv.splits[split].x)
        assert torch.equal(parquet.splits[split].lengths, csv.splits[split].lengths)
    assert sum(len(parquet.splits[s].lengths) for s in SPLITS) == 30
    assert [len(parquet.splits[s].lengths) for s in SPLITS] == [18, 6, 6]  # 60/20/20
    assert dataset_summary(parquet) == dataset_summary(csv)
    nll = []
    for dataset in (parquet, csv):
        model = build_model("gaussian-hmm", data_dim=2, hidden_dim=3)
        train(model, dataset, TrainConfig(epochs=3, seed=0))
        nll.append(evaluate_nll(model, dataset.splits["test"]))
    assert nll[0] == nll[1] and math.isfinite(nll[0])


def test_a_split_column_gives_the_splits_it_names(readings):
    data, directory = readings
    given = load_dataset(path=directory / "readings.parquet", sequence="unit", order="t", features=FEATURES, split="part")
    for split in SPLITS:  # the unit ids sort as the sequences were: each split comes back whole
        lengths = data.splits[split].lengths
        assert torch.equal(given.splits[split].lengths, lengths)
        assert same(given.splits[split].x, data.splits[split].x[:, : int(lengths.max())])
    train_split = data.splits["train"]
    real = train_split.x[torch.arange(train_split.x.size(1)) < train_split.lengths.unsqueeze(-1)]
    assert dataset_summary(given)[0]["missing"] == pytest.approx(float(real.isnan().double().mean()), rel=1e-6)
    assert 0.15 < dataset_summary(given)[0]["missing"] < 0.25


def test_the_seeded_split_depends_on_its_seed_only(readings):
    _, directory = readings
    options = {"sequence": "unit", "order": "t", "features": FEATURES}
    first = load_dataset(path=directory / "readings.csv", **options, seed=1)
    again = load_dataset(path=directory / "readings.csv", **options, seed=1)
    other = load_dataset(path=directory / "readings.csv", **options, seed=2)
    assert same(first.splits["train"].x, again.splits["train"].x)
    assert not same(first.splits["train"].x, other.splits["train"].x)


def test_default_features_are_the_other_numeric_columns_and_points_are_rows(tmp_path):
    table = pa.table({"sequence": ["s1", "s1", "s2", "s3", "s3"], "order": [2, 1, 1, 1, 2],
                      "x": [1.0, 0.5, None, 3.0, 4.0], "y": [1, 2, 3, 4, 5], "note": list("vwxyz")})
    path = tmp_path / "frames.parquet"
    pa_parquet.write_table(table, path)
    dataset = load_dataset(path=path, seed=0)
    assert dataset.data_dim == 2  # x, y; not the text column
    frames = {tuple(s.x[n, : int(s.lengths[n])].nan_to_num(-1).flatten().tolist())
              for s in dataset.splits.values() for n in range(len(s.lengths))}
    assert frames == {(0.5, 2.0, 1.0, 1.0), (-1.0, 3.0), (3.0, 4.0, 4.0, 5.0)}  # s1 in its order
    points = load_dataset(path=path, sequence=None, features=["x", "y"])
    assert sum(s.x.size(0) for s in points.splits.values()) == 5
    assert all(s.lengths is None for s in points.splits.values())


def write_csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


GOOD = "unit,t,a,part\n" + "".join(f"u{n},{t},{n + t},{('train', 'valid', 'test')[n % 3]}\n" for n in range(6) for t in range(3))

# case: (CSV text, options, the message after the path)
BAD_TABLES = {
    "no sequence column": (GOOD, {"sequence": "id", "order": "t"},
                           "no column 'id' for sequence (columns: unit, t, a, part); say which with the sequence option"),
    "no order column": (GOOD, {"sequence": "unit"}, "no column 'order' for order"),
    "no feature column": (GOOD, {"sequence": "unit", "order": "t", "features": ["a", "z"]}, "no feature column 'z'"),
    "non-numeric values": (GOOD, {"sequence": "unit", "order": "t", "features": ["part"]},
                           "feature column 'part' holds string values, expected numbers"),
    "a text cell among numbers": (GOOD.replace("u1,1,2,", "u1,1,two,"), {"sequence": "unit", "order": "t", "features": ["a"]},
                                  "feature column 'a' holds string values, expected numbers"),
    "duplicate (sequence, order)": (GOOD.replace("u2,1,", "u2,0,"), {"sequence": "unit", "order": "t"},
                                    "sequence 'u2' has two rows with t 0 (rows 6 and 7); each (sequence, t) pair must be unique"),
    "an empty sequence id": (GOOD.replace("u4,0,", ",0,"), {"sequence": "unit", "order": "t"},
                             "column 'unit' (sequence) is empty in row 12"),
    "an empty split": (GOOD.replace(",test", ",valid"), {"sequence": "unit", "order": "t", "split": "part"},
                       "split test is empty: no row has 'test' in column 'part'"),
    "a sequence in two splits": (GOOD.replace("u3,2,5,train", "u3,2,5,test"), {"sequence": "unit", "order": "t", "split": "part"},
                                 "sequence 'u3' is in"),
    "an unknown split name": (GOOD.replace("u5,0,5,test", "u5,0,5,training"), {"sequence": "unit", "order": "t", "split": "part"},
                              "row 15, split column 'part' is 'training'; expected train, valid, test"),
    "too few sequences": ("unit,t,a\nu1,0,1\nu2,0,1\n", {"sequence": "unit", "order": "t"},
                          "2 sequences; a seeded 60/20/20 split needs at least 3 (or give a split column)"),
    "infinity": (GOOD.replace("u1,1,2,", "u1,1,inf,"), {"sequence": "unit", "order": "t", "features": ["a"]},
                 "row 4, column 'a' is inf, expected a finite number or missing"),
    "no rows": ("unit,t,a\n", {"sequence": "unit", "order": "t"}, "the table has no rows"),
    "unknown option": (GOOD, {"sequence": "unit", "colour": "red"}, "unknown option(s) colour; valid options: sequence, order, features, split, seed"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_table_is_refused_naming_the_file_and_the_problem(tmp_path, case):
    text, options, problem = BAD_TABLES[case]
    path = write_csv(tmp_path, text)
    with pytest.raises(DataError) as error:
        load_dataset(path=path, **options)
    assert str(error.value).startswith(str(path)) and problem in str(error.value), str(error.value)


def test_an_unreadable_parquet_file_is_named(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"broken.parquet: not a readable .parquet table"):
        load_dataset(path=path)


def test_a_sweep_file_reads_a_table_and_refuses_a_bad_option_before_ray(readings):
    _, directory = readings
    settings = {"name": "t", "model": "gaussian-hmm", "search": {"hidden_dim": 2},
                "data": {"path": "readings.parquet", "sequence": "unit", "order": "t", "features": FEATURES}}
    sweep = directory / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(settings))
    assert load_sweep_file(sweep).data == {**settings["data"], "path": str(directory / "readings.parquet")}
    sweep.write_text(yaml.safe_dump({**settings, "data": {"path": "readings.parquet", "columns": ["a"]}}))
    with pytest.raises(SweepFileError, match=r"data\.columns: unknown option for a \.parquet file"):
        load_sweep_file(sweep)
    sweep.write_text(yaml.safe_dump({**settings, "data": {"path": "readings.parquet", "features": "a"}}))
    with pytest.raises(SweepFileError, match=r"data\.features"):
        load_sweep_file(sweep)


def test_a_query_body_from_a_table_has_every_sequence_with_nulls(readings):
    data, directory = readings
    body = _read_query_input(str(directory / "readings.csv"), {"sequence": "unit", "order": "t", "features": FEATURES})
    assert len(body["sequences"]) == 30
    first = data.splits["train"].x[0, : int(data.splits["train"].lengths[0])]
    units = sorted(f"{split[:2]}{n:03d}" for split in SPLITS for n in range(len(data.splits[split].lengths)))
    sent = body["sequences"][units.index("tr000")]
    assert [[None if math.isnan(v) else v for v in frame] for frame in first.double().tolist()] == sent


def test_gaps_a_family_cannot_take_are_refused_before_ray_starts(readings, tmp_path):
    """arhmm conditions on the previous frame's values: a table with gaps stops the sweep
    at its start, naming the split and the first missing value, before Ray runs."""
    _, directory = readings
    settings = {"name": "t", "model": "arhmm", "search": {"hidden_dim": 2},
                "data": {"path": str(directory / "readings.parquet"), "sequence": "unit", "order": "t", "features": FEATURES}}
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump(settings))
    with pytest.raises(ValueError, match=r"arhmm: the train split's x\[\d+, \d+, \d\] is missing \(NaN\)"):
        run_sweep(load_sweep_file(sweep), tracking=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert not ray.is_initialized()
