"""Ray Tune storage seen through pyarrow: a local path (one node), a shared mount or an
``s3://`` / ``gs://`` URI, read and written the same way; and the check, before a
multi-node sweep starts, that every node sees the same storage.

On a cluster, trials write checkpoints from whichever node Ray put them on and the driver
(or a retried trial on another node) reads them back: a local disk that only one node has
fails mid-sweep, so the sweep is refused up front instead.
"""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit, urlunsplit

import ray
from pyarrow import fs

from .remote import on_node

CHECK_DIR = ".pyrosweep-storage-check"


def join(storage: str, name: str) -> str:
    """``name`` below ``storage``, keeping a URI's query (``s3://b/p?endpoint_override=...``)."""
    if "://" not in storage:
        return f"{storage.rstrip('/')}/{name}"
    parts = urlsplit(storage)
    return urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


def _open(storage: str) -> tuple[fs.FileSystem, str]:
    filesystem, root = fs.FileSystem.from_uri(storage)
    return filesystem, root.rstrip("/")


def read_text(storage: str, name: str) -> str | None:
    """The text of ``{storage}/{name}``, or ``None`` if there is no such file."""
    filesystem, root = _open(storage)
    path = f"{root}/{name}"
    if filesystem.get_file_info(path).type == fs.FileType.NotFound:
        return None
    with filesystem.open_input_stream(path) as stream:
        return stream.read().decode()


def write_text(storage: str, name: str, text: str) -> None:
    """Write ``text`` to ``{storage}/{name}`` (parents created)."""
    filesystem, root = _open(storage)
    path = f"{root}/{name}"
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(text.encode())


def remove(storage: str, name: str) -> None:
    """Delete the directory ``{storage}/{name}`` with everything in it."""
    filesystem, root = _open(storage)
    filesystem.delete_dir(f"{root}/{name}")


def _probe(storage: str, marker: str, expected: str, node_id: str) -> str | None:
    """On one node: read the driver's marker and write one back. The problem, or ``None``."""
    try:
        seen = read_text(storage, f"{CHECK_DIR}/{marker}")
        if seen is None:
            return "does not see the files the driver writes there"
        if seen != expected:
            return "sees a different file at that path (a different disk or bucket)"
        write_text(storage, f"{CHECK_DIR}/{marker}.{node_id}", expected)
    except Exception as error:  # noqa: BLE001 - any filesystem error is the node's answer
        return f"cannot use it: {type(error).__name__}: {error}"
    return None


def check_shared(storage: str, controller_node: str, timeout_s: float = 60.0) -> None:
    """Raise ``RuntimeError`` unless every alive node of the running Ray reads what the
    controller node (where Tune's loop runs) writes to ``storage``, and the controller
    reads back what each node writes."""
    marker, expected = uuid.uuid4().hex, uuid.uuid4().hex
    nodes = {node["NodeID"]: node for node in ray.nodes() if node["Alive"]}
    written = ray.get(on_node(controller_node, _write_marker).remote(storage, marker, expected), timeout=timeout_s)
    if written is not None:
        raise RuntimeError(f"--storage {storage}: the sweep's driver {written}")
    probes = {on_node(node_id, _probe).remote(storage, marker, expected, node_id): node_id for node_id in nodes}
    ready, late = ray.wait(list(probes), num_returns=len(probes), timeout=timeout_s)
    problems = {probes[ref]: ray.get(ref) for ref in ready}
    problems.update({probes[ref]: f"did not answer within {timeout_s:.0f} s" for ref in late})
    seen_back = ray.get(on_node(controller_node, _read_back).remote(storage, marker, list(nodes)), timeout=timeout_s)
    for node_id in nodes:
        if problems.get(node_id) is None and node_id not in seen_back:
            problems[node_id] = "writes files there that the driver does not see"
    ray.get(on_node(controller_node, remove).remote(storage, CHECK_DIR), timeout=timeout_s)
    failing = {node_id: problem for node_id, problem in problems.items() if problem is not None}
    if failing:
        lines = "\n".join(
            f"  node {node_id} ({nodes[node_id]['NodeManagerAddress']}): {problem}"
            for node_id, problem in sorted(failing.items())
        )
        raise RuntimeError(
            f"--storage {storage} is not shared by every node of the cluster:\n{lines}\n"
            f"Trials checkpoint from the node they run on and are restored on another: give "
            f"--storage a path every node mounts (NFS at the same path) or an s3:// / gs:// URI."
        )


def _write_marker(storage: str, marker: str, expected: str) -> str | None:
    try:
        write_text(storage, f"{CHECK_DIR}/{marker}", expected)
    except Exception as error:  # noqa: BLE001
        return f"cannot write there: {type(error).__name__}: {error}"
    return None


def _read_back(storage: str, marker: str, node_ids: list[str]) -> list[str]:
    return [node_id for node_id in node_ids if read_text(storage, f"{CHECK_DIR}/{marker}.{node_id}") is not None]


def needs_check(storage: str) -> bool:
    """A check is due when more than one node could touch ``storage`` or it is remote."""
    return "://" in storage or sum(1 for node in ray.nodes() if node["Alive"]) > 1
