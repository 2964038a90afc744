"""``pyrosweep score``: batch scoring on Ray Data, from input files to one Parquet file.

1. The model URI is pinned to a version (``serve.registry.pin_source``), so every actor
   loads the same one, and the model is loaded on the driver for its declarations.
2. The input (an ``.npz``, a table, or a directory of them: :mod:`trainables.data.inputs`)
   is read and checked against those declarations on the driver, before Ray starts: a
   bad file stops the command with a message naming the file, the sequence and the value.
3. Its sequences, one row each, go to Ray Data in blocks of ``batch_size`` rows;
   ``map_batches`` runs ``actors`` :class:`SequenceScorer` actors (1 CPU and ``num_gpus``
   GPUs each) that load the model once and answer a block with
   :func:`serve.scoring.compute`, the code the HTTP server answers with.
4. The driver writes the scored blocks, in the order of the input, to one Parquet file.

The answers are the served ones: a block is computed as one batch, as ``@serve.batch``
joins requests, so per-step and total log-likelihoods equal a request's within float32
rounding (``4 eps`` of the sequence's ``sum |per_step|``, see :mod:`serve.app`) and
decoded states are the same. A bound (the DMM, ``exact`` False) draws its particles per
computation, so its sequences are computed one by one: each equals a request holding that
sequence alone. Models of points (``data_kind`` points) are refused: ``pyrosweep query``
scores points.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from serve.source import actor_device, load_source
from serve.registry import pin_source
from serve.scoring import compute
from trainables.data.base import DataError
from trainables.data.inputs import INPUT_SUFFIXES, read_inputs
from trainables.models import SequenceModel
from trainables.models.contract import observation_problem

from .remote import ray_session

#: the input columns an actor reads; every other input column (``file``, ``sequence``) is kept as it is
FRAMES, LENGTH = "frames", "length"


@dataclass
class ScoreOptions:
    model: str  # models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint directory
    input: str  # an .npz, .csv or .parquet file, or a directory of them
    output: str  # the Parquet file to write
    tracking_uri: str
    methods: tuple[str, ...] = ("score",)
    address: str | None = None  # an existing Ray cluster; None: a local Ray
    num_gpus: float = 0.0  # per actor
    actors: int | None = None  # None: one per CPU of the cluster (per num_gpus GPUs with GPUs)
    batch_size: int = 256  # sequences per block, computed as one batch
    table_options: dict[str, Any] = field(default_factory=dict)  # a table's columns (trainables.data.tables)


@dataclass(frozen=True)
class Written:
    """What :func:`write_parquet` wrote: ``rows``, and when the first block came (seconds
    from the start, ``first_seconds``) with its ``first_rows``."""

    rows: int
    first_rows: int
    first_seconds: float


@dataclass(frozen=True)
class ScoreSummary:
    """What a run did: ``seconds`` from the start of the dataset's execution (actors
    starting, models loading) to the file's close, Ray's own start excluded; ``startup``
    the seconds until the first scored block reached the driver."""

    source: str  # the pinned model: models:/NAME/VERSION or a checkpoint path
    actors: int
    seconds: float
    written: Written
    output: Path

    @property
    def sequences(self) -> int:
        return self.written.rows

    @property
    def startup(self) -> float:
        return self.written.first_seconds

    @property
    def per_second(self) -> float:
        return self.sequences / self.seconds

    @property
    def steady_per_second(self) -> float:
        """Sequences per second once the first block came (actors up): the later blocks'
        rows over their time (``nan`` for one block)."""
        later = self.seconds - self.startup
        return (self.sequences - self.written.first_rows) / later if later > 0 else float("nan")


def input_files(path: Path) -> list[Path]:
    """``path`` itself, or for a directory every ``.npz``/``.csv``/``.parquet``/``.pq`` file
    in it (not in subdirectories), sorted by name."""
    if not path.is_dir():
        return [path]
    files = sorted(item for item in path.iterdir() if item.is_file() and item.suffix.lower() in INPUT_SUFFIXES)
    if not files:
        raise DataError(f"{path}: a directory with no {', '.join(INPUT_SUFFIXES)} file in it")
    return files


def _frames_problem(model: SequenceModel, frames: np.ndarray) -> str | None:
    """The first value of ``frames`` ``(T, D)`` the model cannot take, as ``[t, d] is v;
    expected ...``; None if it takes them all (as the server would)."""
    infinite = np.argwhere(np.isinf(frames))
    if len(infinite):
        t, d = (int(i) for i in infinite[0])
        return f"[{t}, {d}] is {frames[t, d]}; expected a finite number or missing (NaN)"
    return observation_problem(frames, model.observation, missing_values=model.missing_values)


def check_inputs(model: SequenceModel, ids: np.ndarray, items: list[np.ndarray] | np.ndarray, source: str) -> None:
    """Raise a :class:`DataError` naming ``source``, the sequence and the value, for the
    first thing in ``items`` (one ``(T_i, D)`` array per id of ``ids``) the model cannot take."""
    if not isinstance(items, list):
        raise DataError(f"{source}: points (one row each); batch scoring takes sequences (drop --points)")
    if not items:
        raise DataError(f"{source}: no sequences")
    width = items[0].shape[1]
    if width != model.data_dim:
        raise DataError(f"{source}: {width} values per frame; the model ({model.family}) takes {model.data_dim}")
    if _frames_problem(model, np.concatenate(items)) is None:  # the usual case: one vectorised check
        return
    n, problem = next((n, problem) for n, item in enumerate(items) if (problem := _frames_problem(model, item)))
    raise DataError(f"{source}: sequence {np.asarray(ids)[n].tolist()!r}, [frame, value] {problem}")


def _rows(ids: np.ndarray, items: list[np.ndarray]) -> pa.Table:
    """One row per sequence: ``sequence`` (its id), ``frames`` (its ``(T_i, D)`` values
    flat, row by row, NaN where missing) and ``length`` (``T_i``)."""
    lengths = np.array([len(item) for item in items], dtype=np.int64)
    values = pa.array(np.concatenate(items).ravel())
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths * items[0].shape[1])]), pa.int64())
    return pa.table({"sequence": pa.array(ids), FRAMES: pa.LargeListArray.from_arrays(offsets, values), LENGTH: lengths})


def _joined(tables: dict[str, pa.Table]) -> pa.Table:
    """The rows of every file of a directory, ``file`` (its name) first; sequence ids as
    strings where the files' ids are of different types (indices of an npz, a table's)."""
    if len({table.schema.field("sequence").type for table in tables.values()}) > 1:
        tables = {name: table.set_column(0, "sequence", pc.cast(table["sequence"], pa.string())) for name, table in tables.items()}
    return pa.concat_tables(
        [table.add_column(0, "file", pa.array([name] * table.num_rows, pa.string())) for name, table in tables.items()]
    )


def read_rows(model: SequenceModel, path: Path, table_options: dict[str, Any]) -> pa.Table:
    """The checked sequences of ``path`` (a file, or a directory of them) as rows (see
    :func:`_rows`); a directory's rows also say their ``file``."""
    tables = {}
    for file in input_files(path):
        source = str(file)
        ids, items = read_inputs(file, source, **table_options)
        check_inputs(model, ids, items, source)
        tables[file.name] = _rows(ids, items)
    return _joined(tables) if path.is_dir() else tables[path.name]


def answer_fields(model: SequenceModel, methods: tuple[str, ...], items: list[np.ndarray]) -> dict[str, list]:
    """The per-sequence fields of the served answers of every method in ``methods`` for
    ``items`` (``(T_i, D)`` arrays), each a list over items: ``observed_values`` once, then
    each method's (``log_likelihood`` and ``per_step``; ``states`` and ``log_joint``;
    ``marginals``; the DMM's ``latents``, ``loc``, ``scale``). An exact model's items are
    computed as one batch, a bound's one by one (see the module)."""
    groups = [items] if model.exact else [[item] for item in items]
    fields: dict[str, list] = {}
    for method in methods:
        answers = [compute(model, method, group) for group in groups]
        fields.update({name: [value for answer in answers for value in answer[name]] for name in answers[0]})
    return {"observed_values": fields.pop("observed_values"), **fields}


class SequenceScorer:
    """A Ray Data actor: the model of ``user_config`` (``serve.registry.pin_source``),
    loaded once, on the GPU when Ray gave the actor one; each call answers a block."""

    def __init__(self, user_config: dict[str, Any], methods: tuple[str, ...]) -> None:
        model, _ = load_source(user_config)
        self.model = model.to(actor_device())
        self.methods = methods

    def __call__(self, block: pa.Table) -> pa.Table:
        """``block``'s rows (``frames``, ``length`` and the ids) -> the ids and the answers' fields."""
        width = self.model.data_dim
        values = pc.list_flatten(block[FRAMES]).to_numpy()
        lengths = block[LENGTH].to_numpy()
        items = np.split(values.reshape(-1, width), np.cumsum(lengths)[:-1])
        scored = block.drop_columns([FRAMES, LENGTH])
        for name, values in answer_fields(self.model, self.methods, items).items():
            scored = scored.append_column(name, pa.array(values))
        return scored


def default_actors(num_gpus: float) -> int:
    """One actor per CPU of the cluster; with GPUs, no more than ``num_gpus`` each allows."""
    resources = ray.cluster_resources()
    actors = int(resources.get("CPU", 0))
    if num_gpus:
        actors = min(actors, int(resources.get("GPU", 0) / num_gpus))
    if actors < 1:
        raise RuntimeError(f"the Ray cluster ({resources}) has no room for one scoring actor "
                           f"(1 CPU and {num_gpus} GPU)")
    return actors


def write_parquet(dataset: ray.data.Dataset, output: Path, metadata: dict[str, str], started: float) -> Written:
    """Stream ``dataset``'s blocks, in order, into one Parquet file at ``output`` (written
    as ``output.partial`` and renamed when complete); ``started``: the run's
    ``time.perf_counter()`` at its start."""
    partial = output.with_name(output.name + ".partial")
    output.parent.mkdir(parents=True, exist_ok=True)
    writer, rows = None, 0
    try:
        for block in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
            if writer is None:
                first = Written(0, block.num_rows, time.perf_counter() - started)
                writer = pq.ParquetWriter(partial, block.schema.with_metadata(metadata))
            writer.write_table(block.cast(writer.schema))
            rows += block.num_rows
    finally:
        if writer is not None:
            writer.close()
    os.replace(partial, output)
    return Written(rows, first.first_rows, first.first_seconds)


def run_scoring(options: ScoreOptions) -> ScoreSummary:
    """Score ``options.input`` with ``options.model`` into ``options.output`` (see the module)."""
    user_config = pin_source(options.model, options.tracking_uri)
    model, _ = load_source(user_config)
    if model.data_kind != "sequences":
        raise ValueError(f"{options.model}: a model of points ({model.family}); batch scoring takes sequence "
                         f"models (pyrosweep query scores points)")
    rows = read_rows(model, Path(options.input), options.table_options)
    blocks = [rows.slice(start, options.batch_size) for start in range(0, rows.num_rows, options.batch_size)]
    metadata = {"pyrosweep.model": user_config["source"], "pyrosweep.methods": ",".join(options.methods),
                "pyrosweep.exact": str(model.exact).lower()}
    with ray_session(options.address, options.tracking_uri):
        actors = min(options.actors or default_actors(options.num_gpus), len(blocks))
        started = time.perf_counter()
        scored = ray.data.from_arrow(blocks).map_batches(
            SequenceScorer,
            fn_constructor_args=(user_config, options.methods),
            batch_size=None,  # a block is a batch
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=1,
            num_gpus=options.num_gpus,
        )
        scored.context.execution_options.preserve_order = True  # this dataset's own copy of the context
        written = write_parquet(scored, Path(options.output), metadata, started)
        seconds = time.perf_counter() - started
    return ScoreSummary(user_config["source"], actors, seconds, written, Path(options.output))
