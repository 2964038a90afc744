"""``pyrosweep score`` on real Ray Data: a Parquet table of 10,000 sequences scored on a
two-node local cluster (``ray.cluster_utils.Cluster``: a head with no CPUs, two 1-CPU
worker nodes) equals the answers a real Serve deployment of the same checkpoint gives
over HTTP, in requests of 500 sequences; bad files are refused, before Ray starts, with
the loaders' messages.

Tolerance: a batch is computed as one, as ``@serve.batch`` joins requests, so the two
sides group sequences differently and agree within float32 rounding, not to the last bit:
per-step and total log-likelihoods (and log joints) within ``4 eps`` of the sequence's
``sum |per_step|`` (the bound of serve/app.py), marginals within the same absolute
amount (a marginal ``exp(l)`` moves by at most the error of ``l``); decoded states and
observed values are the same.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from cluster.batch_scoring import ScoreOptions, read_rows, run_scoring
from cluster.remote import ray_session
from cluster.serving import ServeOptions, serving
from helpers import free_port, post
from trainables.checkpoint import load_checkpoint, save_checkpoint
from trainables.data.base import DataError
from trainables.models import build_model
from pyarrow import csv

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NUM_SEQUENCES, DATA_DIM, REQUEST_SEQUENCES = 10_000, 3, 500
EPS = float(torch.finfo(torch.float32).eps)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small binary hmm (3 keys, 3 states) with data-informed random parameters."""
    model = build_model("hmm", data_dim=DATA_DIM, hidden_dim=3)
    x = torch.randint(0, 2, (8, 12, DATA_DIM)).float()
    model.set_parameters(**model.init_parameters(x, torch.full((8,), 12), torch.Generator().manual_seed(0)))
    return save_checkpoint(model, tmp_path_factory.mktemp("model") / "hmm")


def long_table(num_sequences: int, seed: int) -> tuple[pa.Table, list[np.ndarray]]:
    """A long-format table of ``num_sequences`` sequences of 10-20 binary frames, 5% of
    the values missing, its rows shuffled; and each sequence's ``(T, D)`` frames by id."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(num_sequences):
        frames = (rng.random((rng.integers(10, 21), DATA_DIM)) < 0.4).astype(np.float64)
        frames[rng.random(frames.shape) < 0.05] = np.nan
        sequences.append(frames)
    ids = np.repeat(np.arange(num_sequences), [len(frames) for frames in sequences])
    order = np.concatenate([np.arange(len(frames)) for frames in sequences])
    values = np.concatenate(sequences)
    shuffled = rng.permutation(len(ids))
    columns = {"sequence": ids[shuffled], "order": order[shuffled]}
    columns.update({f"key{d}": values[shuffled, d] for d in range(DATA_DIM)})
    return pa.table(columns), sequences


@pytest.fixture(scope="module")
def two_nodes():
    """A head with 0 CPUs and two worker nodes of 1 CPU each (as tests/test_cluster.py)."""
    path = os.environ["PATH"]
    os.environ["PATH"] = f"{BIN}{os.pathsep}{path}"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    yield cluster
    cluster.shutdown()
    os.environ["PATH"] = path


def served(url: str, method: str, sequences: list[np.ndarray]) -> dict[str, list]:
    """The answers of ``/v1/METHOD`` for ``sequences``, in requests of REQUEST_SEQUENCES."""
    joined: dict[str, list] = {}
    for start in range(0, len(sequences), REQUEST_SEQUENCES):
        chunk = sequences[start : start + REQUEST_SEQUENCES]
        body = {"sequences": [[[None if math.isnan(v) else v for v in frame] for frame in s.tolist()] for s in chunk]}
        status, answer = post(f"{url}/v1/{method}", body)
        assert status == 200, answer
        for name, values in answer.items():
            if name != "exact":
                joined.setdefault(name, []).extend(values)
    return joined


def test_ten_thousand_sequences_on_two_nodes_equal_the_served_answers(tmp_path, checkpoint, two_nodes):
    table, sequences = long_table(NUM_SEQUENCES, seed=1)
    pq.write_table(table, tmp_path / "sequences.parquet")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    summary = run_scoring(ScoreOptions(
        model=str(checkpoint), input=str(tmp_path / "sequences.parquet"), output=str(tmp_path / "scores.parquet"),
        tracking_uri=uri, methods=("score", "decode", "posterior"), address=two_nodes.address,
    ))  # fmt: skip  (blocks of 256 sequences: grouped unlike the requests of 500)
    print(f"{summary.sequences} sequences, {summary.actors} actors on 2 nodes: {summary.seconds:.1f} s "
          f"({summary.startup:.1f} s to the first block), {summary.per_second:.0f} sequences/s in all, "
          f"{summary.steady_per_second:.0f} after the first block")
    assert summary.sequences == NUM_SEQUENCES and summary.actors == 2
    scores = pq.read_table(tmp_path / "scores.parquet")
    assert scores.column_names == ["sequence", "observed_values", "log_likelihood", "per_step", "states", "log_joint", "marginals"]
    assert scores.schema.metadata[b"pyrosweep.model"] == str(checkpoint).encode()
    rows = scores.to_pydict()
    assert rows["sequence"] == list(range(NUM_SEQUENCES))  # the input's order: by sequence id

    port = free_port()
    options = ServeOptions(model=str(checkpoint), tracking_uri=uri, port=port, proxy_location="HeadOnly")
    with ray_session(two_nodes.address, uri), serving(options):
        answers = {method: served(f"http://127.0.0.1:{port}", method, sequences) for method in ("score", "decode", "posterior")}
    worst = 0.0
    for n in range(NUM_SEQUENCES):
        scale = sum(abs(step) for step in answers["score"]["per_step"][n])
        tolerance = 4 * EPS * scale
        assert rows["observed_values"][n] == answers["score"]["observed_values"][n]
        assert rows["states"][n] == answers["decode"]["states"][n]
        assert len(rows["per_step"][n]) == len(sequences[n])
        pairs = [
            (rows["log_likelihood"][n], answers["score"]["log_likelihood"][n]),
            (rows["log_joint"][n], answers["decode"]["log_joint"][n]),
            *zip(rows["per_step"][n], answers["score"]["per_step"][n]),
            *zip(np.ravel(rows["marginals"][n]), np.ravel(answers["posterior"]["marginals"][n])),
        ]
        error = max(abs(ours - theirs) for ours, theirs in pairs)
        assert error <= tolerance, f"sequence {n}: {error / (EPS * scale):.2f} eps x sum|per_step| apart"
        worst = max(worst, error / (EPS * scale))
    print(f"largest difference to the served answers: {worst:.2f} eps x sum|per_step|")


def test_a_directory_is_every_file_in_it_with_its_name(tmp_path, checkpoint):
    """An npz's ids are its indices, a table's its ids; ids of different types become strings."""
    model = load_checkpoint(checkpoint)
    table, sequences = long_table(3, seed=2)
    pq.write_table(table, tmp_path / "b.parquet")
    named = pa.array([f"u{n}" for n in table["sequence"].to_pylist()])
    csv.write_csv(table.set_column(0, "sequence", named), tmp_path / "c.csv")
    padded = np.zeros((2, 20, DATA_DIM))
    padded[0, :4], padded[1, :7] = sequences[0][:4], sequences[1][:7]
    np.savez(tmp_path / "a.npz", x=padded, lengths=np.array([4, 7]))
    (tmp_path / "notes.txt").write_text("not an input")
    rows = read_rows(model, tmp_path, {}).to_pydict()
    assert rows["file"] == ["a.npz"] * 2 + ["b.parquet"] * 3 + ["c.csv"] * 3
    assert rows["sequence"] == ["0", "1", "0", "1", "2", "u0", "u1", "u2"]
    assert rows["length"] == [4, 7, *(len(s) for s in sequences * 2)]
    for row, frames in zip(rows["frames"][2:], sequences * 2):  # NaN (missing) kept
        np.testing.assert_array_equal(np.reshape(row, (-1, DATA_DIM)), frames)


def bad_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """Bad inputs, each with what the refusal says."""
    table, _ = long_table(4, seed=3)
    cases = {}
    pq.write_table(table.drop_columns(["sequence"]), path := directory / "no-ids.parquet")
    cases["no sequence column"] = (path, r"no-ids.parquet: no column 'sequence' for sequence")
    pq.write_table(table.drop_columns(["key2"]), path := directory / "narrow.parquet")
    cases["wrong width"] = (path, r"narrow.parquet: 2 values per frame; the model \(hmm\) takes 3")
    values = table["key1"].to_numpy().copy()
    values[np.flatnonzero(table["sequence"].to_numpy() == 2)[0]] = 2.0
    pq.write_table(table.set_column(3, "key1", pa.array(values)), path := directory / "counts.parquet")
    cases["not binary"] = (path, r"counts.parquet: sequence 2, \[frame, value\] \[\d+, 1\] is 2; expected 0 or 1 for a Bernoulli model")
    np.savez(path := directory / "no-x.npz", frames=np.zeros((2, 5, 3)), lengths=np.array([5, 5]))
    cases["npz without x"] = (path, r"no-x.npz: no array 'x' \(arrays: frames, lengths\)")
    np.savez(path := directory / "too-long.npz", x=np.zeros((2, 5, 3)), lengths=np.array([5, 6]))
    cases["npz length"] = (path, r"too-long.npz: lengths\[1\] is 6, expected a length in 1..5")
    cases["missing file"] = (directory / "gone.parquet", r"gone.parquet: no such file")
    (path := directory / "empty").mkdir()
    cases["empty directory"] = (path, r"empty: a directory with no .npz, .csv, .parquet, .pq file in it")
    return cases


def test_bad_files_are_refused_before_ray_starts(tmp_path, checkpoint):
    for case, (path, message) in bad_files(tmp_path).items():
        options = ScoreOptions(model=str(checkpoint), input=str(path), output=str(tmp_path / "out.parquet"), tracking_uri="")
        with pytest.raises(DataError, match=message):
            run_scoring(options)
        assert not ray.is_initialized(), case
    assert not (tmp_path / "out.parquet").exists()


def test_the_command_says_what_is_wrong_in_one_line(tmp_path, checkpoint):
    path, message = bad_files(tmp_path)["not binary"]
    done = subprocess.run(
        [str(BIN / "pyrosweep"), "score", "--model", str(checkpoint), "--input", str(path),
         "--output", str(tmp_path / "out.parquet"), "--methods", "score,decode"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYROSWEEP_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    first = done.stderr.splitlines()[0]
    assert first.startswith("pyrosweep: error: ") and re.search(message, first), done.stderr
