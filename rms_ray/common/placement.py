"""Paths every process of a run must agree on: the output folder (engine actors commit their shards there) and a
local model folder (every engine loads it).

A relative path means something else in an actor than on the driver: a job submitted with a ``working_dir`` runs
its actors in a copy of that folder, on other machines. So :func:`resolve_run_paths` makes both absolute on the
driver before any actor starts, and :func:`check_output_shared` refuses a multi-node run whose output the other
nodes cannot see (a node-local disk, ``/tmp``): their shards would land on their own disks, and the driver would
find nothing to finalise.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Iterable

from rms_ray.common.io import tmp_suffix

#: Filesystem types (``/proc/mounts``) that only the machine holding them sees. Network and cluster filesystems
#: (nfs, nfs4, lustre, cifs, ceph, glusterfs, gpfs, beegfs, fuse.* such as s3fs/gcsfuse, ...) are not here.
LOCAL_FS_TYPES = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "zfs", "f2fs", "tmpfs", "ramfs", "overlay",
                            "vfat", "exfat", "ntfs", "ntfs3", "hfs", "hfsplus", "apfs", "devtmpfs", "squashfs"})
PROBE_TIMEOUT_S = 60.0


def resolve_run_paths(cfg: Any, output_dir: str | Path) -> tuple[Any, str]:
    """``(cfg, absolute output path)`` with ``cfg.model.source`` made absolute when it names a folder that exists
    here (a hub id or ``builtin:<preset>`` is left as is). Call on the driver before any actor starts."""
    out = str(Path(output_dir).expanduser().resolve())
    source = cfg.model.source
    if not source.startswith("builtin:") and Path(source).expanduser().is_dir():
        model = cfg.model.model_copy(update={"source": str(Path(source).expanduser().resolve())})
        cfg = cfg.model_copy(update={"model": model})
    return cfg, out


def _unescape(field: str) -> str:
    # /proc/mounts escapes space, tab, newline and backslash as octal
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def filesystem_type(path: str | Path, mounts: str | None = None) -> str | None:
    """The type of the filesystem holding ``path`` (symlinks of its existing part resolved): the mount in ``mounts``
    (``/proc/mounts`` text; read when None) with the longest mount point containing it. None when unknown (no
    ``/proc/mounts``, e.g. macOS)."""
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return None
    p, tail = Path(path).expanduser().absolute(), []
    while not p.exists() and p != p.parent:  # resolve symlinks of the part that exists; keep the rest as given
        p, tail = p.parent, [p.name, *tail]
    p = p.resolve().joinpath(*tail)
    best, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = _unescape(fields[1])
        inside = str(p) == point or str(p).startswith(point.rstrip("/") + "/")
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def shared_output_problem(path: str, *, n_nodes: int, fs_type: str | None,
                          unseen: Iterable[str] = (), probed: bool = True) -> str | None:
    """Why ``path`` cannot be the output of a run on ``n_nodes`` nodes, or None. Pure: the caller gathers the facts.

    Args:
        fs_type: the filesystem type holding ``path`` (:func:`filesystem_type`).
        unseen: nodes (host names) that looked for a marker file the driver wrote there and did not find it.
        probed: whether every other node answered that probe; if not, a node-local filesystem type decides.
    """
    if n_nodes <= 1:
        return None
    unseen = sorted(unseen)
    where = f" (a {fs_type} filesystem)" if fs_type else ""
    if unseen:
        return (f"output {path}{where} is not visible from {len(unseen)} of the cluster's {n_nodes} nodes "
                f"({', '.join(unseen[:5])}{', ...' if len(unseen) > 5 else ''}): engine actors there would write "
                "their shards to their own disks. Give --output a path on a filesystem every node mounts at the "
                "same place (NFS/EFS/Lustre)")
    if not probed and fs_type in LOCAL_FS_TYPES:
        return (f"output {path} is on a node-local {fs_type} filesystem and this Ray cluster has {n_nodes} nodes: "
                "engine actors on the other nodes would write their shards to their own disks. Give --output a "
                "path on a filesystem every node mounts at the same place (NFS/EFS/Lustre)")
    return None


def _sees(marker: str) -> tuple[str, bool]:
    # NFS attribute caches can hide a new file for a moment: look a few times before saying no
    for _ in range(5):
        if os.path.exists(marker):
            return socket.gethostname(), True
        time.sleep(1.0)
    return socket.gethostname(), False


def check_output_shared(path: str | Path, marker_dir: str | Path | None = None) -> None:
    """On a multi-node Ray cluster (Ray initialised), make sure every node sees the output folder ``path``: write a
    marker file in ``marker_dir`` (default ``path``) on the driver, and look for it from a zero-CPU task pinned to
    each other node. A single-node cluster passes at once.

    Raises:
        rms_ray.data.store.OutputError: some node does not see it, or (when the probe could not run) it is on a
            node-local filesystem type. The message names the folder and the nodes.
    """
    import ray

    from rms_ray.data.store import OutputError

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in nodes if n["NodeID"] != here]
    marker = Path(marker_dir or path) / f".node-probe-{tmp_suffix()}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(socket.gethostname())
    unseen, probed = [], True
    try:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        probe = ray.remote(num_cpus=0, max_retries=0)(_sees)
        refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(str(marker))
                for node in others]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
        probed = not pending
        for ref in ready:
            try:
                host, seen = ray.get(ref)
            except Exception:  # noqa: BLE001 - a node that cannot run the probe is judged by the filesystem type
                probed = False
                continue
            if not seen:
                unseen.append(host)
        for ref in pending:
            ray.cancel(ref, force=True)
    finally:
        marker.unlink(missing_ok=True)
    problem = shared_output_problem(str(path), n_nodes=len(nodes), fs_type=filesystem_type(path), unseen=unseen,
                                    probed=probed)
    if problem:
        raise OutputError(problem)
