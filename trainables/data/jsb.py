"""The ``jsb`` data set: the four-part Bach chorales that music21 ships, as piano rolls.

Each chorale becomes an 88-key piano roll ``(T, 88)`` with one frame per quarter beat:
key ``pitch - 21`` is on in frame ``t`` when a note of that pitch, in any of the four
parts, sounds at beat offset ``t`` (``offset <= t < offset + quarterLength``, offsets from
the start of the piece); ``T`` is the end of the last note, rounded up. The chorales,
sorted by corpus path and permuted with seed 0, are split 60/20/20 into train, valid and
test. With ``key="c"`` each chorale is first transposed to C major or C minor, as the
JSB Chorales benchmark prepares it (Boulanger-Lewandowski et al. 2012): the tonic of
music21's key analysis moved to C by the smallest shift (-6..+5 semitones). Parsing takes
about half a minute on two cores, so the result is cached as an ``.npz`` (the format
:func:`~trainables.data.files.load_file` reads, plus ``{split}_names`` and, for
``key="c"``, ``{split}_shifts``) under ``$PYROSWEEP_CACHE``, or the user cache directory
``~/.cache/pyrosweep``.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import music21
import numpy as np

from .base import SPLITS, DataError, Dataset, sequences_to_split
from .files import read_npz_splits
from .pianoroll import NUM_KEYS, piano_roll

__all__ = ["FRACTIONS", "KEYS", "SEED", "cache_dir", "cache_path", "load_jsb", "shift_to_c"]

SEED = 0
FRACTIONS = {"train": 0.6, "valid": 0.2}  # test gets the rest
_FORMAT = 1  # bump when the parsing or the cache layout changes
PATHS_PER_WORKER = 40  # below this many files per core, one process parses them all
Key = Literal["original", "c"]
KEYS: tuple[Key, ...] = ("original", "c")


def cache_dir() -> Path:
    """``$PYROSWEEP_CACHE`` if set, else the user cache directory of ``pyrosweep``."""
    if os.environ.get("PYROSWEEP_CACHE"):
        return Path(os.environ["PYROSWEEP_CACHE"])
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "pyrosweep"
    return Path(user_cache_dir("pyrosweep"))


def cache_path(max_chorales: int | None = None, key: Key = "original") -> Path:
    """The cache file of :func:`load_jsb` for ``max_chorales``, ``key`` and this music21 version."""
    count = "all" if max_chorales is None else str(max_chorales)
    transposed = "" if key == "original" else f"-key-{key}"
    return cache_dir() / f"jsb-v{_FORMAT}-music21-{music21.__version__}-{count}{transposed}.npz"


def shift_to_c(score: music21.stream.Score) -> int:
    """The semitones (-6..+5) that move the tonic of ``score``'s analysed key to C."""
    tonic = score.analyze("key").tonic.pitchClass
    return -((tonic + 6) % 12 - 6)


def _chorale_name(path: Path) -> str:
    """``bach/bwv1.6.mxl``: the path of a chorale inside the music21 corpus."""
    return f"{path.parent.name}/{path.name}"


def _chorale_roll(score: music21.stream.Score, name: str, shift: int = 0) -> np.ndarray:
    """Piano roll ``(T, 88)`` float32 of all parts of ``score`` moved ``shift`` semitones,
    one frame per quarter beat."""
    spans = [
        (float(note.offset), float(note.offset + note.duration.quarterLength), pitch.midi + shift)
        for part in score.parts
        for note in part.flatten().notes
        for pitch in note.pitches
    ]
    if not spans:
        raise DataError(f"jsb: chorale {name} has no notes")
    frames: list[list[int]] = [[] for _ in range(math.ceil(max(end for _, end, _ in spans)))]
    for start, end, pitch in spans:
        for t in range(math.ceil(start), math.ceil(end)):
            frames[t].append(pitch)
    return piano_roll(frames, f"jsb: chorale {name}")


def _four_part_roll(path: Path, key: Key = "original") -> tuple[str, np.ndarray, int] | None:
    """``(name, roll (T, 88), shift)`` of the corpus file at ``path`` in ``key`` (``shift``:
    the semitones it was moved), or None unless it is a four-part score."""
    score = music21.corpus.parse(path)
    if len(score.parts) != 4:
        return None
    name = _chorale_name(path)
    shift = 0 if key == "original" else shift_to_c(score)
    return name, _chorale_roll(score, name, shift), shift


def _four_part_chorales(max_chorales: int | None, key: Key) -> list[tuple[str, np.ndarray, int]]:
    """``(name, roll (T, 88), shift)`` of the four-part scores among the first
    ``max_chorales`` corpus files, in corpus path order, parsed on every core (fresh
    ``spawn`` processes: the caller may hold threads, e.g. Ray's or torch's, that a fork
    would copy broken)."""
    paths = sorted(music21.corpus.getComposer("bach"), key=str)[:max_chorales]
    workers = min(os.cpu_count() or 1, max(1, len(paths) // PATHS_PER_WORKER))
    keys = [key] * len(paths)
    if workers == 1:
        rolls = list(map(_four_part_roll, paths, keys))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context) as pool:
            rolls = list(pool.map(_four_part_roll, paths, keys, chunksize=PATHS_PER_WORKER // 4))
    return [roll for roll in rolls if roll is not None]


def _split_order(num_chorales: int) -> list[np.ndarray]:
    """Indices of the train, valid and test chorales: a seeded permutation cut 60/20/20."""
    order = np.random.default_rng(SEED).permutation(num_chorales)
    bounds = np.cumsum([round(FRACTIONS[split] * num_chorales) for split in FRACTIONS])
    parts = np.split(order, bounds)
    if min(map(len, parts)) == 0:
        raise DataError(
            f"jsb: {num_chorales} four-part chorales are too few to fill train, valid and "
            "test; raise max_chorales"
        )
    return parts


def _parse_chorales(max_chorales: int | None, key: Key) -> dict[str, np.ndarray]:
    """Parse the corpus into the cache arrays: ``{split}_x`` ``(N, T, 88)`` uint8,
    ``{split}_len`` ``(N,)`` int64, ``{split}_names`` ``(N,)`` str and, transposed,
    ``{split}_shifts`` ``(N,)`` int64 (the semitones each chorale moved)."""
    chorales = _four_part_chorales(max_chorales, key)
    arrays = {}
    for split, indices in zip(SPLITS, _split_order(len(chorales))):
        padded = sequences_to_split([chorales[i][1] for i in indices], "jsb", split)
        arrays[f"{split}_x"] = padded.x.numpy().astype(np.uint8)
        arrays[f"{split}_len"] = padded.lengths.numpy()
        arrays[f"{split}_names"] = np.array([chorales[i][0] for i in indices], dtype=str)
        if key != "original":
            arrays[f"{split}_shifts"] = np.array([chorales[i][2] for i in indices], dtype=np.int64)
    return arrays


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` as a compressed ``.npz`` at ``path`` via a temporary file and a
    rename, so that a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as handle:
        try:
            np.savez_compressed(handle, **arrays)
        except BaseException:
            os.unlink(handle.name)
            raise
    os.replace(handle.name, path)


def load_jsb(max_chorales: int | None = None, key: Key = "original") -> Dataset:
    """The ``jsb`` data set: splits of ``x`` ``(N, T, 88)`` binary piano rolls with
    ``lengths`` ``(N,)``, 221/74/73 chorales of 24..193 frames when complete.

    :param max_chorales: parse only the first this many corpus files (sorted by path),
        for fast tests; the four-part ones among them are split. ``None``: all of them.
    :param key: ``"original"``: as written; ``"c"``: each chorale transposed to C major or
        C minor, as the benchmark prepares it (the same chorales in the same splits).
    :raises DataError: for ``max_chorales`` < 1, an unknown ``key``, too few four-part
        chorales to fill three splits, or a pitch outside the piano range (naming the chorale).
    """
    if key not in KEYS:
        raise DataError(f"jsb: key must be one of {', '.join(KEYS)}, got {key!r}")
    if max_chorales is not None and (type(max_chorales) is not int or max_chorales < 1):
        raise DataError(
            f"jsb: max_chorales must be a positive integer or None, got {max_chorales!r}"
        )
    path = cache_path(max_chorales, key)
    if not path.is_file():
        _write_atomically(path, _parse_chorales(max_chorales, key))
    splits = read_npz_splits(path, f"jsb cache {path}")
    return Dataset(name="jsb", splits=splits, data_dim=NUM_KEYS)
