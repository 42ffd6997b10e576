"""What an output folder is bound to besides its config: the prompt versions and the model revision.

The config hash covers every setting that shapes a row, but two things shape rows without being settings: the
prompt templates (``rms_ray/construct/prompts``; an edit changes their version id) and the model's weights behind
a name (a hub id moves when its repository gets a new commit; a local folder can be overwritten). A resumed run
with either changed would mix rows made two ways, so :meth:`rms_ray.data.store.OutputStore.check_config` refuses
it, naming what changed (we refuse rather than start a new version inside the folder: one folder, one dataset).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from rms_ray.common.config import ConstructConfig
from rms_ray.construct.prompts import prompt_versions

#: Files whose names and sizes identify a local model folder's weights (hashing gigabytes at every start is not
#: worth it: a retrained or re-downloaded checkpoint changes sizes or config.json).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json")


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit the local Hugging Face cache resolves ``repo_id`` (at ``revision``) to, or None."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # noqa: BLE001 - no cache, or a broken one: the revision is unknown
        return None
    if not isinstance(path, str):
        return None
    # <cache>/models--org--name/snapshots/<commit>/config.json
    return Path(path).parent.name


def model_revision(source: str, engine_kwargs: dict[str, Any] | None = None) -> str:
    """A short string that changes when the weights behind ``model.source`` change.

    * ``builtin:<preset>``: the preset's spec and builder version (the build is deterministic).
    * a local folder: sha256 of its ``config.json`` and the names and sizes of its weight files.
    * a hub id: the commit the local Hugging Face cache resolves it to (``engine_kwargs["revision"]`` if set);
      ``@unresolved`` when the driver has no cached copy (the nodes may; then only the id is bound).
    """
    if source.startswith("builtin:"):
        from rms_ray.testing.tiny_model import BUILDER_VERSION, PRESETS

        preset = source.split(":", 1)[1]
        spec = PRESETS[preset].to_json_dict() if preset in PRESETS else None
        return f"{source}@{_digest({'spec': spec, 'builder': BUILDER_VERSION})}"
    path = Path(source).expanduser()
    if path.is_dir():
        config = path / "config.json"
        cfg_hash = hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None
        weights = sorted((p.relative_to(path).as_posix(), p.stat().st_size) for p in path.rglob("*")
                         if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        return f"folder@{_digest({'config': cfg_hash, 'weights': weights})}"
    revision = (engine_kwargs or {}).get("revision")
    commit = _hub_commit(source, revision)
    return f"{source}@{commit or 'unresolved'}"


def run_binding(cfg: ConstructConfig) -> dict[str, Any]:
    """What an output folder made with ``cfg`` is bound to besides the config hash (recorded in
    ``_work/run_config.json``; a resume with other values is refused)."""
    return {"prompt_versions": prompt_versions(),
            "model_revision": model_revision(cfg.model.source, cfg.model.engine_kwargs)}
