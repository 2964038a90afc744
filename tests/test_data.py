"""Tests of trainables.data: the jsb chorales, user files, the registry and the checks."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import music21
import numpy as np
import pytest
import torch

from trainables.data import (
    DATASETS,
    DataError,
    Dataset,
    dataset_summary,
    load_dataset,
    load_file,
    load_jsb,
    sequences_to_split,
    validate_split,
)
from trainables.data.base import SPLITS
from trainables.data.jsb import cache_path, shift_to_c
from trainables.data.pianoroll import pitch_class_shares

SMALL = 12  # corpus files parsed by the fast jsb tests


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "cache"
    monkeypatch.setenv("PYROSWEEP_CACHE", str(directory))
    return directory


@pytest.fixture(scope="session")
def full_jsb(jsb_cache: Path) -> Dataset:
    """The full corpus through the session's shared cache (conftest ``jsb_cache``): parsed
    here, or read back if another test parsed it first."""
    return load_jsb()


def assert_datasets_equal(a: Dataset, b: Dataset) -> None:
    assert a.name == b.name and a.data_dim == b.data_dim
    for split in SPLITS:
        assert torch.equal(a.splits[split].x, b.splits[split].x)
        assert torch.equal(a.splits[split].lengths, b.splits[split].lengths)


def assert_canonical_sequences(dataset: Dataset, binary: bool) -> None:
    """Shapes (N, T, D), dtypes, lengths in 1..T and zero padding, for every split."""
    for split in dataset.splits.values():
        num_sequences, num_frames, data_dim = split.x.shape
        assert data_dim == dataset.data_dim
        assert split.x.dtype == torch.float32 and split.lengths.dtype == torch.int64
        assert split.lengths.shape == (num_sequences,)
        assert split.lengths.min() >= 1 and split.lengths.max() <= num_frames
        padding = torch.arange(num_frames) >= split.lengths.unsqueeze(-1)
        assert (split.x[padding] == 0).all()
        if binary:
            assert ((split.x == 0) | (split.x == 1)).all()


# jsb


def test_jsb_small(cache: Path) -> None:
    dataset = load_jsb(max_chorales=SMALL)
    assert dataset.name == "jsb" and dataset.data_dim == 88 and dataset.truth is None
    assert_canonical_sequences(dataset, binary=True)
    sizes = [len(dataset.splits[split].lengths) for split in SPLITS]
    total = sum(sizes)
    assert 8 <= total <= SMALL
    assert sizes[:2] == [round(0.6 * total), round(0.2 * total)]
    for row in dataset_summary(dataset):
        assert 3 <= row["notes_per_frame"] <= 5
        assert row["max_length"] <= 200


def test_jsb_cache_is_written_once_and_reused(cache: Path) -> None:
    path = cache_path(SMALL)
    assert path.parent == cache and not path.exists()
    first = load_jsb(max_chorales=SMALL)
    written = path.stat()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
    second = load_jsb(max_chorales=SMALL)
    assert_datasets_equal(first, second)
    assert path.stat().st_mtime_ns == written.st_mtime_ns and path.stat().st_ino == written.st_ino

    # A later load reads whatever the cache file holds, without parsing again.
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["train_x"] = arrays["train_x"][:1]
    arrays["train_len"] = arrays["train_len"][:1]
    np.savez(path, **arrays)
    assert len(load_jsb(max_chorales=SMALL).splits["train"].lengths) == 1

    assert cache_path(SMALL + 1) != path and cache_path() != path


def test_jsb_cache_holds_names_of_chorales(cache: Path) -> None:
    dataset = load_jsb(max_chorales=SMALL)
    with np.load(cache_path(SMALL)) as archive:
        names = {split: list(archive[f"{split}_names"]) for split in SPLITS}
    all_names = sum(names.values(), [])
    assert len(set(all_names)) == len(all_names)
    assert all(name.startswith("bach/bwv") for name in all_names)
    for split in SPLITS:
        assert len(names[split]) == len(dataset.splits[split].lengths)


def test_jsb_split_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    loads = []
    for directory in ("a", "b"):
        monkeypatch.setenv("PYROSWEEP_CACHE", str(tmp_path / directory))
        loads.append(load_jsb(max_chorales=SMALL))
    assert_datasets_equal(*loads)


def test_jsb_in_c_is_each_chorale_moved_to_c_by_the_smallest_shift(cache: Path) -> None:
    """``key="c"``: the same chorales in the same splits, each roll the original one moved
    by its recorded shift (-6..+5), which takes its analysed tonic to C (checked again by
    music21 on the transposed score)."""
    original, in_c = load_jsb(max_chorales=SMALL), load_jsb(max_chorales=SMALL, key="c")
    with np.load(cache_path(SMALL, "c")) as archive, np.load(cache_path(SMALL)) as plain:
        for split in SPLITS:
            assert list(archive[f"{split}_names"]) == list(plain[f"{split}_names"])
            assert torch.equal(in_c.splits[split].lengths, original.splits[split].lengths)
            for n, shift in enumerate(archive[f"{split}_shifts"].tolist()):
                assert -6 <= shift <= 5
                moved = torch.roll(original.splits[split].x[n], shift, dims=-1)
                assert torch.equal(in_c.splits[split].x[n], moved)  # no key falls off the piano
        name, shift = str(archive["train_names"][0]), int(archive["train_shifts"][0])
    score = music21.corpus.parse(name)
    assert shift_to_c(score.transpose(shift)) == 0
    shares = pitch_class_shares(in_c.splits["train"].x.numpy())
    assert max(shares, key=shares.get) in ("C", "G") and sum(shares.values()) == pytest.approx(1.0)
    with pytest.raises(DataError, match="jsb: key must be one of original, c, got 'd'"):
        load_jsb(max_chorales=SMALL, key="d")


@pytest.mark.parametrize("max_chorales", [0, -3, 2.5, True])
def test_jsb_rejects_bad_max_chorales(cache: Path, max_chorales: object) -> None:
    with pytest.raises(DataError, match="max_chorales"):
        load_jsb(max_chorales=max_chorales)


def test_jsb_too_few_chorales(cache: Path) -> None:
    with pytest.raises(DataError, match="too few"):
        load_jsb(max_chorales=2)
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.slow
def test_jsb_full(full_jsb: Dataset) -> None:
    assert_canonical_sequences(full_jsb, binary=True)
    sizes = {split: len(full_jsb.splits[split].lengths) for split in SPLITS}
    total = sum(sizes.values())
    assert 340 <= total <= 400
    assert sizes["train"] == round(0.6 * total) and sizes["valid"] == round(0.2 * total)
    rows = dataset_summary(full_jsb)
    frames = sum(row["frames"] for row in rows)
    notes = sum(row["notes_per_frame"] * row["frames"] for row in rows)
    assert 3 <= notes / frames <= 5
    assert max(row["max_length"] for row in rows) <= 200
    assert min(int(split.lengths.min()) for split in full_jsb.splits.values()) >= 16


# user files

def valid_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """A well-formed .npz content: D = 3, lengths in 1..5, garbage in the padding."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in zip(SPLITS, (4, 3, 2)):
        arrays[f"{split}_x"] = rng.normal(size=(n, 5, 3))
        arrays[f"{split}_len"] = rng.integers(1, 6, size=n)
    return arrays


def chorale_pickle() -> dict[str, list[list[tuple[int, ...]]]]:
    return {
        "train": [[(60, 64, 67), (62,), ()], [(21, 108)]],
        "valid": [[(55.0, 59.0)]],
        "test": [[[40], [41, 45]]],
    }


def write_pickle(path: Path, data: object) -> Path:
    with path.open("wb") as handle:
        pickle.dump(data, handle)
    return path


def test_npz_round_trip(tmp_path: Path) -> None:
    arrays = valid_arrays()
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    dataset = load_file(path)
    assert dataset.name == str(path) and dataset.data_dim == 3
    assert_canonical_sequences(dataset, binary=False)
    for split in SPLITS:
        lengths = arrays[f"{split}_len"]
        assert dataset.splits[split].lengths.tolist() == lengths.tolist()
        for n, length in enumerate(lengths):
            expected = torch.tensor(arrays[f"{split}_x"][n, :length], dtype=torch.float32)
            assert torch.equal(dataset.splits[split].x[n, :length], expected)


def test_npz_allows_nan_in_padding(tmp_path: Path) -> None:
    arrays = valid_arrays()
    arrays["train_len"][0] = 2
    arrays["train_x"][0, 2:] = np.nan
    path = tmp_path / "padded.npz"
    np.savez(path, **arrays)
    assert (load_file(path).splits["train"].x[0, 2:] == 0).all()


def test_npz_nan_values_are_missing(tmp_path: Path) -> None:
    """NaN in real frames loads as is (missing, integrated out by the model); the summary
    says which fraction of the real values it is and leaves them out of the frame sums."""
    arrays = valid_arrays()
    arrays["train_len"][:2] = 5
    arrays["train_x"][1, 0, 2] = np.nan
    arrays["train_x"][0, 1] = np.nan  # a whole frame
    path = tmp_path / "gaps.npz"
    np.savez(path, **arrays)
    train = load_file(path).splits["train"]
    assert torch.isnan(train.x[1, 0, 2]) and torch.isnan(train.x[0, 1]).all()
    row = dataset_summary(load_file(path))[0]
    real = [arrays["train_x"][n, :length] for n, length in enumerate(arrays["train_len"])]
    assert row["missing"] == pytest.approx(4 / sum(frames.size for frames in real), rel=1e-6)
    assert row["notes_per_frame"] == pytest.approx(sum(np.nansum(f) for f in real) / arrays["train_len"].sum(), rel=1e-5)


def test_pickle_round_trip(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "chorales.pkl", chorale_pickle())
    dataset = load_file(path)
    assert dataset.name == str(path) and dataset.data_dim == 88
    assert_canonical_sequences(dataset, binary=True)
    train = dataset.splits["train"]
    assert train.x.shape == (2, 3, 88) and train.lengths.tolist() == [3, 1]
    assert train.x[0, 0].nonzero().flatten().tolist() == [60 - 21, 64 - 21, 67 - 21]
    assert train.x[0, 1].nonzero().flatten().tolist() == [62 - 21]
    assert train.x[0, 2].sum() == 0
    assert train.x[1, 0].nonzero().flatten().tolist() == [0, 87]
    assert dataset.splits["valid"].x[0, 0].nonzero().flatten().tolist() == [34, 38]
    assert dataset.splits["test"].x.shape == (1, 2, 88)


def test_pickle_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "chorales.PICKLE", chorale_pickle())
    assert load_file(path).splits["test"].lengths.tolist() == [2]


def _npz(**changes: np.ndarray | None):
    """A writer of a valid .npz with ``changes`` applied (None deletes an array)."""

    def write(path: Path) -> Path:
        arrays = {**valid_arrays(), **changes}
        np.savez(path, **{key: value for key, value in arrays.items() if value is not None})
        return path

    return write


def _pickle_with(split: str, sequences: object):
    def write(path: Path) -> Path:
        return write_pickle(path, {**chorale_pickle(), split: sequences})

    return write


def _inf_frame() -> np.ndarray:
    x = valid_arrays()["train_x"].copy()
    x[1, 0, 2] = -np.inf
    return x


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _bytes(content: bytes):
    def write(path: Path) -> Path:
        path.write_bytes(content)
        return path

    return write


# case: (file name, writer of the file or None, expected part of the message)
BAD_FILES = {
    "missing file": ("gone.npz", None, "no such file"),
    "unknown suffix": ("data.txt", _bytes(b"1,2,3\n"), "unknown file type '.txt'"),
    "no suffix": ("data", _bytes(b"1,2,3\n"), "unknown file type"),
    "not an archive": ("data.npz", _bytes(b"hello"), "not a readable .npz"),
    "single array": ("data.npz", _bytes(_npy_bytes(np.zeros(3))), "holds a single array"),
    "missing key": ("data.npz", _npz(valid_len=None), "missing array(s) valid_len"),
    "wrong ndim": ("data.npz", _npz(train_x=np.zeros((4, 5))), "train_x has shape (4, 5)"),
    "lengths count": (
        "data.npz",
        _npz(valid_len=np.array([1, 2])),
        "valid_len has shape (2,) but valid_x has 3 sequences",
    ),
    "lengths ndim": (
        "data.npz",
        _npz(valid_len=np.ones((3, 1), dtype=int)),
        "valid_len has shape (3, 1)",
    ),
    "float lengths": (
        "data.npz",
        _npz(test_len=np.array([1.0, 2.0])),
        "test_len has dtype float64",
    ),
    "text values": ("data.npz", _npz(test_x=np.full((2, 5, 3), "a")), "test_x has dtype <U1"),
    "infinity": ("data.npz", _npz(train_x=_inf_frame()), "train_x[1, 0, 2] is -inf, expected a finite number or NaN (missing)"),
    "length 0": ("data.npz", _npz(test_len=np.array([3, 0])), "test_len[1] is 0"),
    "length > T": (
        "data.npz",
        _npz(test_len=np.array([9, 1])),
        "test_len[0] is 9, expected a length in 1..5",
    ),
    "empty split": (
        "data.npz",
        _npz(test_x=np.zeros((0, 5, 3)), test_len=np.zeros(0, dtype=int)),
        "test is empty",
    ),
    "mismatched D": (
        "data.npz",
        _npz(valid_x=np.zeros((3, 5, 2))),
        "valid_x has 2 values per frame",
    ),
    "bad pitch": (
        "data.pkl",
        _pickle_with("valid", [[(60,), (12, 64)]]),
        "valid sequence 0 frame 1: pitch 12 is outside",
    ),
    "high pitch": (
        "data.pkl",
        _pickle_with("test", [[(109,)]]),
        "pitch 109 is outside the piano range 21..108",
    ),
    "fractional pitch": (
        "data.pkl",
        _pickle_with("train", [[(60.5,)]]),
        "pitch 60.5 is not an integer",
    ),
    "frame not a list": (
        "data.pkl",
        _pickle_with("train", [[60, 62]]),
        "train sequence 0 frame 0: 60 is not a list",
    ),
    "empty sequence": (
        "data.pkl",
        _pickle_with("valid", [[(60,)], []]),
        "valid sequence 1 has no frames",
    ),
    "empty pickle split": ("data.pkl", _pickle_with("test", []), "test is empty"),
    "missing split": (
        "data.pkl",
        lambda p: write_pickle(p, {"train": [[(60,)]], "valid": [[(60,)]]}),
        "missing split(s) test",
    ),
    "not a dict": ("data.pickle", lambda p: write_pickle(p, [[(60,)]]), "holds a list"),
    "not a pickle": ("data.pkl", _bytes(b"not a pickle"), "not a readable pickle"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_raises_naming_file_and_problem(tmp_path: Path, case: str) -> None:
    name, write, problem = BAD_FILES[case]
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(DataError) as error:
        load_file(path)
    message = str(error.value)
    assert message.startswith(str(path)) and problem in message, message


# checks and helpers


def test_validate_split_points_and_torch_input() -> None:
    x = torch.arange(6.0, dtype=torch.float64).reshape(3, 2)
    points = validate_split(x, None, "pts", "train")
    assert points.lengths is None and points.x.dtype == torch.float32 and points.x.shape == (3, 2)
    with pytest.raises(DataError, match="pts: valid_x has shape"):
        validate_split(np.zeros((3, 2, 1)), None, "pts", "valid")
    with pytest.raises(DataError, match=r"pts: test_x\[1, 0\] is inf"):
        validate_split(np.array([[0.0], [np.inf]]), None, "pts", "test")


def test_validate_split_does_not_change_its_input() -> None:
    x = torch.ones(2, 3, 1)
    split = validate_split(x, torch.tensor([1, 3]), "mem", "train")
    assert (x == 1).all() and split.x[0, 1:].sum() == 0


def test_sequences_to_split_pads() -> None:
    split = sequences_to_split([np.ones((2, 3)), torch.full((4, 3), 2.0)], "mem", "train")
    assert split.x.shape == (2, 4, 3) and split.lengths.tolist() == [2, 4]
    assert split.x[0, 2:].sum() == 0 and (split.x[1] == 2).all()
    with pytest.raises(DataError, match="mem: train sequence 1 has 2 values per frame"):
        sequences_to_split([np.ones((2, 3)), np.ones((2, 2))], "mem", "train")
    with pytest.raises(DataError, match=r"mem: train sequence 0 has shape \(3,\)"):
        sequences_to_split([np.ones(3)], "mem", "train")
    with pytest.raises(DataError, match="mem: valid is empty"):
        sequences_to_split([], "mem", "valid")


def test_dataset_checks_its_splits() -> None:
    split = validate_split(np.zeros((2, 3)), None, "mem", "train")
    with pytest.raises(DataError, match="expected"):
        Dataset(name="mem", splits={"train": split, "test": split}, data_dim=3)
    with pytest.raises(DataError, match="data_dim=4"):
        Dataset(name="mem", splits=dict.fromkeys(SPLITS, split), data_dim=4)
    sequences = validate_split(np.zeros((2, 1, 3)), np.array([1, 1]), "mem", "valid")
    with pytest.raises(DataError, match="mix sequences"):
        Dataset(name="mem", splits={"train": split, "valid": sequences, "test": split}, data_dim=3)


def test_dataset_summary(tmp_path: Path) -> None:
    path = write_pickle(tmp_path / "chorales.pkl", chorale_pickle())
    rows = dataset_summary(load_file(path))
    assert [row["split"] for row in rows] == list(SPLITS)
    assert rows[0] == {
        "split": "train",
        "sequences": 2,
        "frames": 4,
        "max_length": 3,
        "notes_per_frame": (3 + 1 + 0 + 2) / 4,
        "missing": 0.0,
    }
    points = validate_split(np.ones((5, 2)), None, "mem", "train")
    rows = dataset_summary(Dataset(name="mem", splits=dict.fromkeys(SPLITS, points), data_dim=2))
    assert rows[1] == {"split": "valid", "points": 5, "frames": 5, "missing": 0.0}


# registry


def test_registry_names() -> None:
    assert set(DATASETS) == {"jsb", "synthetic-hmm", "synthetic-gaussian-hmm", "synthetic-gmm", "synthetic-categorical-hmm", "synthetic-poisson-hmm"}
    assert all(isinstance(text, str) and text for text in DATASETS.values())


def test_load_dataset_by_name_and_path(cache: Path, tmp_path: Path) -> None:
    assert_datasets_equal(load_dataset("jsb", max_chorales=SMALL), load_jsb(max_chorales=SMALL))
    path = write_pickle(tmp_path / "chorales.pkl", chorale_pickle())
    assert_datasets_equal(load_dataset(path=str(path)), load_file(path))
    with pytest.raises(DataError, match=r"chorales.pkl: unknown option\(s\) seed; valid options: none"):
        load_dataset(path=path, seed=1)


@pytest.mark.parametrize(
    ("arguments", "problem"),
    [
        ({"name": "bach"}, "unknown data set 'bach'; choose one of jsb, synthetic-hmm"),
        ({"name": "synthetic-dmm"}, "unknown data set 'synthetic-dmm'"),
        (
            {"name": "jsb", "max_files": 3},
            "jsb: unknown option(s) max_files; valid options: max_chorales",
        ),
        ({"path": "x.npz", "seed": 1}, "x.npz: no such file"),
        ({}, "give exactly one of a data set name (jsb, synthetic-hmm"),
        ({"name": "jsb", "path": "x.npz"}, "give exactly one of"),
    ],
)
def test_load_dataset_errors(arguments: dict, problem: str) -> None:
    with pytest.raises(DataError) as error:
        load_dataset(**arguments)
    assert problem in str(error.value)


def test_data_error_is_value_error() -> None:
    assert issubclass(DataError, ValueError)
