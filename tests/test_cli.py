"""The command line as a user runs it: a real subprocess of ``pyrosweep``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np


def pyrosweep(*args: str, home) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        env={"PYROSWEEP_HOME": str(home), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )


def test_data_list_and_prepare(tmp_path):
    listed = pyrosweep("data", "list", home=tmp_path)
    assert listed.returncode == 0
    for name in ("jsb", "synthetic-hmm", "synthetic-gaussian-hmm", "synthetic-gmm"):
        assert name in listed.stdout
    prepared = pyrosweep("data", "prepare", "synthetic-hmm", home=tmp_path)
    assert prepared.returncode == 0, prepared.stderr
    lines = prepared.stdout.splitlines()
    assert lines[1].split() == ["split", "sequences", "frames", "max_length", "notes_per_frame", "missing"]
    assert [line.split()[0] for line in lines[2:5]] == ["train", "valid", "test"]


def test_bad_input_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_x=np.zeros((2, 3, 4)), train_len=np.array([3, 9]))
    result = pyrosweep("data", "prepare", str(bad), home=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("pyrosweep: error: ") and "bad.npz" in result.stderr
    assert "Traceback" not in result.stderr
    unknown = pyrosweep("train", "--model", "hmmm", "--data", "synthetic-hmm", home=tmp_path)
    assert unknown.returncode == 2 and "unknown model family 'hmmm'" in unknown.stderr


def test_train_prints_nll_per_split_and_writes_a_checkpoint(tmp_path):
    result = pyrosweep(
        "train", "--model", "gaussian-hmm", "--data", "synthetic-gaussian-hmm", "--hidden-dim", "3",
        "--epochs", "3", "--screen", "5", home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    table = {line.split()[0]: float(line.split()[1]) for line in result.stdout.splitlines()
             if line.split()[:1] in (["train"], ["valid"], ["test"]) and len(line.split()) == 2}
    assert set(table) == {"train", "valid", "test"}
    assert all(np.isfinite(v) for v in table.values())
    assert result.stdout.splitlines()[0].endswith("engine compiled")
    checkpoint = tmp_path / "checkpoints" / "gaussian-hmm-synthetic-gaussian-hmm"
    assert (checkpoint / "model.pt").exists() and (checkpoint / "config.json").exists()


def test_the_engine_flag_forces_a_path_and_gives_the_same_numbers(tmp_path):
    """``--engine torch`` trains on the PyTorch recursions: same NLLs as the compiled path
    to float32 rounding (the same seeded run on both)."""
    runs = {}
    for engine in ("compiled", "torch"):
        result = pyrosweep(
            "--engine", engine, "train", "--model", "hmm", "--data", "synthetic-hmm", "--hidden-dim", "3",
            "--epochs", "2", "--out", str(tmp_path / engine), home=tmp_path,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0].endswith(f"engine {engine}")
        runs[engine] = [float(line.split()[1]) for line in result.stdout.splitlines()
                        if line.split()[:1] in (["train"], ["valid"], ["test"]) and len(line.split()) == 2]
    assert np.allclose(runs["compiled"], runs["torch"], rtol=1e-4)


def test_train_by_em(tmp_path):
    result = pyrosweep(
        "train", "--model", "gaussian-hmm", "--data", "synthetic-gaussian-hmm", "--hidden-dim", "3",
        "--method", "em", "--epochs", "30", "--screen", "3", home=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "EM, at most 30 iterations" in lines[0]
    losses = [float(line.split()[4]) for line in lines if line.startswith("iteration ")]
    assert len(losses) >= 2 and all(b <= a + 1e-4 for a, b in zip(losses, losses[1:]))  # printed to 4 places
    refused = pyrosweep("train", "--model", "dmm", "--data", "synthetic-hmm", "--method", "em", home=tmp_path)
    assert refused.returncode == 2 and "dmm: EM is not available" in refused.stderr
