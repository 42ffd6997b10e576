"""What keeps an output folder exact when runs collide or crash, and what binds it: one run at a time (a lock the
OS releases), temp names no two processes share, fsync before a shard's commit point, the binding to prompt
versions and model revision, and paths every node of a cluster agrees on. No engine runs here."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import PHOTOS, REPO

from rms_ray.common.config import load_config
from rms_ray.construct.binding import model_revision, run_binding
from rms_ray.data.store import SHARD_FILES, SUCCESS, OutputBusy, OutputConfigMismatch, OutputStore

PACKAGE_DIR = REPO / "rms_ray"
CPU_TINY = REPO / "configs" / "cpu-tiny.yaml"

_HOLD = """
import sys, time
from rms_ray.data.store import OutputStore
lock = OutputStore(sys.argv[1]).lock()
print("locked", flush=True)
time.sleep(120)
"""


def test_one_run_per_output_folder_and_a_dead_runs_lock_is_released(tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=rf"another rms_ray run is writing to {out} .*held by pid {holder.pid} "):
            OutputStore(out).lock()
        # the command a user runs: refused before Ray starts, with the folder named
        from typer.testing import CliRunner

        from rms_ray.cli import app

        r = CliRunner().invoke(app, ["construct", "-c", "cpu-tiny", "-i", str(PHOTOS), "-o", str(out),
                                     "--no-progress"])
        assert r.exit_code == 2, r.output
        assert f"another rms_ray run is writing to {out}" in r.output
        assert not (out / "_work" / "commits").exists()  # nothing was written by the refused run
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: no release, no clean-up
        holder.wait()
    with OutputStore(out).lock() as lock:  # the OS released it with the process
        assert lock.held
        with pytest.raises(OutputBusy):  # and a second taker in the same process is refused too
            OutputStore(out).lock()
    assert not lock.held
    OutputStore(out).lock().release()


def test_a_foreign_folder_is_refused_before_a_lock_is_created(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty and was not made by rms_ray"):
        OutputStore(mine).lock()
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def test_shard_commit_is_durable_and_temp_names_are_private(tmp_path, monkeypatch):
    """Every shard file, its _SUCCESS and the tmp folder are fsynced before the rename that commits them, and the
    commits folder after it; temp names carry the pid and a random part."""
    store = OutputStore(tmp_path / "out")
    store.prepare()
    events = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        events.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    name = store.commit_shard([], [], [{"image_id": "img_a", "status": "rejected"}])
    monkeypatch.undo()
    renames = [e for e in events if e[0] == "rename"]
    assert len(renames) == 1
    _, src, dst = renames[0]
    assert dst == str(store.commits / name)
    pid, rand = Path(src).name.removeprefix(f"{name}-").split("-")
    assert pid == str(os.getpid()) and len(rand) == 12
    at = events.index(renames[0])
    before = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert {f"{src}/{f}" for f in (*SHARD_FILES, SUCCESS)} | {src} <= before
    assert ("fsync", str(store.commits)) in events[at:]
    manifest = json.loads((store.commits / name / SUCCESS).read_text())
    assert {f: m["size"] for f, m in manifest["files"].items()} == {
        f: (store.commits / name / f).stat().st_size for f in SHARD_FILES}
    from rms_ray.common.io import _tmp_name

    a, b = _tmp_name(tmp_path / "x.json"), _tmp_name(tmp_path / "x.json")
    assert a != b and f".{os.getpid()}." in a.name


def _bind(out: Path, cfg, **binding):
    store = OutputStore(out)
    store.check_config(cfg.config_hash(), cfg.model_dump(mode="json"), binding={**run_binding(cfg), **binding})
    return store


def test_resume_with_an_edited_prompt_is_refused(tmp_path):
    """A real edit of a prompt file in a copy of the package: the copy's run is refused on the folder the original
    made, naming the stage whose version changed; the original still resumes."""
    cfg = load_config(CPU_TINY)
    out = tmp_path / "out"
    _bind(out, cfg)
    shutil.copytree(PACKAGE_DIR, tmp_path / "copy" / "rms_ray", ignore=shutil.ignore_patterns("__pycache__"))
    f = tmp_path / "copy" / "rms_ray" / "construct" / "prompts" / "verify_pair.yaml"
    f.write_text(f.read_text().replace("with a one-sentence reason.", "with a one-sentence  reason."))
    code = ("import sys, rms_ray; assert rms_ray.__file__.startswith(sys.argv[1]), rms_ray.__file__\n"
            "from rms_ray.common.config import load_config\n"
            "from rms_ray.construct.binding import run_binding\n"
            "from rms_ray.data.store import OutputStore\n"
            "cfg = load_config(sys.argv[2])\n"
            "OutputStore(sys.argv[3]).check_config(cfg.config_hash(), cfg.model_dump(mode='json'), "
            "binding=run_binding(cfg))\n")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "copy"), str(CPU_TINY), str(out)],
                       cwd=tmp_path / "copy", env={**os.environ, "PYTHONPATH": str(tmp_path / "copy")},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "OutputConfigMismatch" in r.stderr and f"{out} holds work made with other prompts" in r.stderr
    assert "prompt_versions.verify_pair: verify_pair@v1+" in r.stderr and "use a new --output" in r.stderr
    assert "prompt_versions.scene_analysis" not in r.stderr  # only what changed is named
    _bind(out, cfg)  # the unedited package resumes


def test_resume_with_another_model_revision_is_refused(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["X"], "hidden_size": 8}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    cfg = load_config(CPU_TINY, {"model.source": str(model)})
    first = model_revision(str(model))
    assert first.startswith("folder@") and model_revision(str(model)) == first
    out = tmp_path / "out"
    _bind(out, cfg)
    (model / "model.safetensors").write_bytes(b"\0" * 65)  # retrained / re-downloaded weights
    with pytest.raises(OutputConfigMismatch, match=rf"model_revision: {first} -> folder@"):
        _bind(out, cfg)
    assert model_revision("builtin:tiny") != model_revision("builtin:bench-100m")
    assert model_revision("builtin:tiny").startswith("builtin:tiny@")


def test_hub_model_revision_is_the_cached_commit(tmp_path):
    """A hub id binds to the commit the local Hugging Face cache resolves it to (here a cache laid out by hand)."""
    repo = tmp_path / "hub" / "models--org--vlm"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    code = ("from rms_ray.construct.binding import model_revision; "
            "print(model_revision('org/vlm')); print(model_revision('org/other'))")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"org/vlm@{commit}", "org/other@unresolved"]


def test_folder_of_an_older_rms_ray_without_a_binding(tmp_path):
    cfg = load_config(CPU_TINY)
    out = tmp_path / "out"
    store = OutputStore(out)
    store.check_config(cfg.config_hash(), cfg.model_dump(mode="json"))  # as older versions recorded it
    run_config = json.loads((out / "_work" / "run_config.json").read_text())
    assert run_config["binding"] is None
    _bind(out, cfg)  # nothing committed yet: the binding is recorded now
    assert json.loads((out / "_work" / "run_config.json").read_text())["binding"] == run_binding(cfg)
    (out / "_work" / "run_config.json").write_text(json.dumps({**run_config, "binding": None}))
    store.prepare()
    store.commit_shard([], [], [{"image_id": "img_a", "status": "rejected"}])
    with pytest.raises(OutputConfigMismatch, match="earlier rms_ray that did not record the prompt versions"):
        _bind(out, cfg)


def test_relative_output_and_model_folder_are_resolved_on_the_driver(tmp_path, monkeypatch):
    """What the engine actors get (the config JSON and the output path run_construct passes them) is absolute:
    a job's actors run in a copy of its working_dir, on other machines."""
    from rms_ray.common.placement import resolve_run_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "models" / "m" / "config.json").write_text("{}")
    cfg = load_config(CPU_TINY, {"model.source": "models/m"})
    resolved, out = resolve_run_paths(cfg, "runs/x")
    assert out == str(tmp_path / "runs" / "x")
    actor_cfg = json.loads(resolved.model_dump_json())  # what ConstructUDF is constructed with
    assert actor_cfg["model"]["source"] == str(tmp_path / "models" / "m")
    assert resolved.config_hash() != cfg.config_hash()  # the hash (and run_config.json) records the absolute path
    hub = load_config(CPU_TINY, {"model.source": "Qwen/Qwen2.5-VL-7B-Instruct"})
    assert resolve_run_paths(hub, "runs/x")[0].model.source == "Qwen/Qwen2.5-VL-7B-Instruct"  # not a folder here
    assert resolve_run_paths(load_config(CPU_TINY), "/abs/out")[0].model.source == "builtin:tiny"


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /tmp tmpfs rw 0 0
server:/export /mnt/shared nfs4 rw,vers=4.2 0 0
/dev/sdb /mnt/shared/local\\040disk xfs rw 0 0
lustre@tcp:/fs /lustre lustre rw,flock 0 0
"""


def test_output_a_multi_node_cluster_cannot_share_is_refused():
    from rms_ray.common.placement import filesystem_type, shared_output_problem

    assert filesystem_type("/mnt/shared/rms/v1", MOUNTS) == "nfs4"
    assert filesystem_type("/mnt/shared/local disk/x", MOUNTS) == "xfs"  # the longest mount point wins
    assert filesystem_type("/tmp/run", MOUNTS) == "tmpfs"
    assert filesystem_type("/lustre/a/b", MOUNTS) == "lustre"
    assert filesystem_type("/home/u/out", MOUNTS) == "ext4"
    # one node: any local folder will do
    assert shared_output_problem("/tmp/run", n_nodes=1, fs_type="tmpfs", probed=False) is None
    # nodes that looked for the driver's marker file and did not find it: refused, whatever the filesystem type
    msg = shared_output_problem("/mnt/data/out", n_nodes=3, fs_type="nfs4", unseen=["node-b", "node-c"])
    assert msg.startswith("output /mnt/data/out (a nfs4 filesystem) is not visible from 2 of the cluster's 3 nodes")
    assert "node-b, node-c" in msg and "filesystem every node mounts" in msg
    # every node saw it: fine, even on a type that is usually local (one machine's Ray nodes, a shared block device)
    assert shared_output_problem("/tmp/run", n_nodes=2, fs_type="tmpfs", unseen=[]) is None
    # the probe could not run: a node-local filesystem type decides
    msg = shared_output_problem("/tmp/run", n_nodes=4, fs_type="tmpfs", probed=False)
    assert msg.startswith("output /tmp/run is on a node-local tmpfs filesystem and this Ray cluster has 4 nodes")
    assert shared_output_problem("/mnt/shared/x", n_nodes=4, fs_type="nfs4", probed=False) is None


def test_single_node_cluster_passes_the_shared_output_check(tmp_path, ray_local):
    from rms_ray.common.placement import check_output_shared

    before = tmp_path.stat().st_mtime_ns
    check_output_shared(tmp_path / "out", tmp_path)
    assert tmp_path.stat().st_mtime_ns == before  # one node: nothing to probe, no marker written (or left)


def test_index_and_shard_files_are_parquet_the_tools_read(tmp_path):
    """The commit index is an ordinary Parquet table (inspectable with any tool) of every committed image."""
    store = OutputStore(tmp_path / "out")
    store.prepare()
    names = [store.commit_shard([], [], [{"image_id": f"img_{i}", "status": "rejected", "sha256": f"s{i}"}])
             for i in range(3)]
    assert store.compact() == 3
    t = pq.read_table(store.index_path)
    assert sorted(zip(t.column("image_id").to_pylist(), t.column("shard").to_pylist())) == [
        (f"img_{i}", names[i]) for i in range(3)]
