"""What the Ray cluster's nodes can see: refuse, before any work starts, a local path that some node cannot.

On one machine (or a truly shared mount) local paths work; on a cluster whose nodes share no disk
they fail deep inside a stage, on another node. ``check_visible`` asks every node: a directory an
output goes to gets a marker file written by the driver, which a task pinned to each node must
read back; an input (corpus, model, tokenizer) must show the same size and modification time (a
directory: the same names and sizes) on every node. A cluster counts as several nodes when it
has more than one, or when its only node has no CPU; while no node with a CPU or GPU has joined
(an autoscaling cluster at job start), no node can vouch for a local path and every one is refused.
"""
from __future__ import annotations

import os
import uuid

MARKER = ".s2l-visible-{}"


class NodeError(ValueError):
    """A local path is not visible on every node of the cluster."""


def _signature(path: str) -> list | None:
    """What identifies a local input on a node: a file's size and mtime, a directory's top-level names and
    sizes; None when the path is absent."""
    if os.path.isfile(path):
        st = os.stat(path)
        return [st.st_size, st.st_mtime_ns]
    if os.path.isdir(path):
        return sorted([e.name, e.stat().st_size if e.is_file() else -1] for e in os.scandir(path))
    return None


def _look(inputs: dict[str, str], markers: dict[str, str]) -> dict[str, list | bool | None]:
    """Ray task, pinned to one node: each input's signature, and whether each marker file reads back."""
    out: dict[str, list | bool | None] = {k: _signature(p) for k, p in inputs.items()}
    for k, (path, token) in markers.items():
        try:
            with open(path) as f:
                out[k] = f.read() == token
        except OSError:
            out[k] = False
    return out


def awaiting_workers() -> bool:
    """No alive node has a CPU or a GPU: the cluster's work runs on nodes its autoscaler has yet to start (the head
    of ``cluster.yaml`` has none)."""
    import ray

    return not any(n.get("Resources", {}).get(r, 0) > 0 for n in ray.nodes() if n.get("Alive") for r in ("CPU", "GPU"))


def autoscaling() -> bool:
    """The head runs no work (no CPU or GPU), the shape of ``cluster.yaml``: the worker nodes come and go with the
    autoscaler, so the nodes present now are not what the job will get. (Ray's monitor posts a status on every
    cluster, a local one included, so that status cannot tell.)"""
    import ray

    heads = [n["Resources"] for n in ray.nodes() if n.get("Alive") and "node:__internal_head__" in n.get("Resources", {})]
    return any(not (h.get("CPU", 0) or h.get("GPU", 0)) for h in heads)


def several_nodes() -> list[dict]:
    """The alive nodes when the cluster has several (see the module doc), else []."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) == 1 and nodes[0].get("Resources", {}).get("CPU", 0) > 0:
        return []
    return nodes


def check_visible(inputs: dict[str, str], outputs: dict[str, str]) -> None:
    """Refuse a local path (not a URI) that a node of a multi-node cluster cannot see; ``inputs`` must exist
    (what -> path), ``outputs`` are directories the run writes (created here if absent)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    inputs = {k: os.path.abspath(p) for k, p in inputs.items() if p and "://" not in p}
    outputs = {k: os.path.abspath(p) for k, p in outputs.items() if p and "://" not in p}
    if (inputs or outputs) and awaiting_workers():
        k, p = next(iter({**inputs, **outputs}.items()))
        raise NodeError(f"{k} {p} is a local path, and no node that runs this job's work has joined the cluster yet "
                        "(its head has no CPUs; worker nodes start on demand), so none can vouch for it: give it as a "
                        "URI (s3://...) or as a directory on a mount that every node shares")
    nodes = several_nodes() if inputs or outputs else []
    if not nodes:
        return
    expected = {k: _signature(p) for k, p in inputs.items()}
    token = uuid.uuid4().hex
    markers, created = {}, []
    for k, p in outputs.items():
        if not os.path.isdir(p):
            os.makedirs(p)
            created.append(p)
        markers[k] = (os.path.join(p, MARKER.format(token)), token)
        with open(markers[k][0], "w") as f:
            f.write(token)
    look = ray.remote(_look)
    try:
        seen = ray.get([look.options(num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(
            n["NodeID"], soft=False)).remote(inputs, markers) for n in nodes])
    finally:
        for path, _ in markers.values():
            os.remove(path)
    for node, found in zip(nodes, seen):
        for k, p in {**inputs, **outputs}.items():
            ok = found[k] is True if k in markers else found[k] == expected[k]
            if not ok:
                for d in reversed(created):  # a refused run leaves nothing behind
                    os.rmdir(d)
                raise NodeError(f"{k} {p} is a local path that node {node.get('NodeManagerAddress')} "
                                f"({node['NodeID'][:12]}) cannot see; on this cluster of {len(nodes)} nodes give it "
                                "as a URI (s3://...) or as a directory on a mount that every node shares")
