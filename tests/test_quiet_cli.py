"""``pyrosweep demo`` as ``make demo > file`` runs it: a short story in plain text, and
the libraries' logs in the log file it names."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from helpers import PYROSWEEP, free_port

STORY = ("1. data", "2. sweep", "best trial", "3. promoted", "4. serving", "Viterbi states", "as a stream",
         "forecast of the next 4 frames", "monitor (/v1/monitor)", "shut down", "demo finished")


@pytest.mark.slow
def test_demo_prints_a_short_plain_story_and_logs_the_rest_to_a_file(tmp_path: Path) -> None:
    # RAY_ADDRESS=local: a Ray of its own, not a cluster another test started on this machine
    env = {**os.environ, "PYROSWEEP_HOME": str(tmp_path / "home"), "RAY_ADDRESS": "local"}
    output = tmp_path / "demo.out"
    with output.open("w") as out:
        done = subprocess.run(
            [PYROSWEEP, "demo", "--port", str(free_port())], stdout=out, stderr=subprocess.STDOUT, env=env, timeout=900
        )
    text = output.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    assert "\x1b" not in text and len(lines) <= 40, text
    assert not [line for line in lines if re.search("failed|Error|Traceback", line)], text
    assert all(step in text for step in STORY), text
    (named,) = [line.removeprefix("logs: ") for line in lines if line.startswith("logs: ")]
    log = Path(named)
    assert log.parent == tmp_path / "home" / "logs" and log.name.startswith("demo-")
    logged = log.read_text()
    assert "Started a local Ray instance" in logged and "ray.serve" in logged and "ray.tune" in logged
