"""``pyrosweep submit``: run a sweep as a Ray Job on a cluster (``JobSubmissionClient``).

The sweep file is validated here first (a bad file never reaches the cluster), then
shipped in the job's ``working_dir`` (with its data file, if it names one) together with
this checkout's packages as ``py_modules``. On the cluster the job's driver runs
``python -m cluster.cli sweep FILE --address auto`` on the head node, so the sweep's
MLflow store and Tune storage must be ones the head node reaches: a tracking server
(``--tracking-uri http://...``) and shared storage.
"""

from __future__ import annotations

import asyncio
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

from .remote import runtime_env
from .sweep_file import SweepSpec

FINAL_STATES = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def stage_sweep(spec: SweepSpec, directory: Path) -> str:
    """Copy the sweep file into ``directory`` (and its data file, the path made relative
    to it); returns the staged file's name."""
    raw = yaml.safe_load(Path(spec.source).read_text())
    if "path" in spec.data:
        data_file = Path(spec.data["path"])
        shutil.copy(data_file, directory / data_file.name)
        raw["data"] = {**raw["data"], "path": data_file.name}
    name = Path(spec.source).name
    (directory / name).write_text(yaml.safe_dump(raw, sort_keys=False))
    return name


def entrypoint(sweep_file: str, tracking_uri: str | None, storage: str | None, extra: list[str]) -> str:
    """The job's shell command: a sweep on the cluster the job runs in. It starts in the
    job's ``working_dir`` but runs from ``/``: Ray can delete an unpacked ``working_dir``
    once the job's last worker using it exits, while the driver is still at work (seen
    here: Tune's final analysis failed on the missing current directory). The staged
    files are read by absolute path at the start."""
    arguments = ["--address", "auto"]
    if tracking_uri:
        arguments += ["--tracking-uri", tracking_uri]
    if storage:
        arguments += ["--storage", storage]
    return (
        f'STAGED="$PWD" && cd / && python -m cluster.cli sweep "$STAGED"/{shlex.quote(sweep_file)} '
        f"{shlex.join(arguments + extra)}"
    )


def submit(
    spec: SweepSpec,
    address: str,
    tracking_uri: str | None = None,
    storage: str | None = None,
    extra: list[str] | None = None,
) -> tuple[JobSubmissionClient, str]:
    """Submit the sweep ``spec`` to the Ray Jobs API at ``address``
    (``http://HEAD:8265``); returns the client and the job's submission id."""
    client = JobSubmissionClient(address)
    with tempfile.TemporaryDirectory(prefix="pyrosweep-job-") as staging:
        sweep_file = stage_sweep(spec, Path(staging))
        job_id = client.submit_job(
            entrypoint=entrypoint(sweep_file, tracking_uri, storage, extra or []),
            runtime_env={**runtime_env(tracking_uri), "working_dir": staging},
            submission_id=f"pyrosweep-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            metadata={"pyrosweep.sweep": spec.name},
        )
    return client, job_id


def follow(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Print the job's logs as they come until it ends; returns its final status."""

    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    asyncio.run(stream())
    status = client.get_job_status(job_id)
    while status not in FINAL_STATES:  # the log stream can close a moment before the status moves
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return status
