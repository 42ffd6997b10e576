"""Shared fixtures: environment for offline vLLM/Ray, the shared data folder, one local Ray for the session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PHOTOS = REPO / "examples" / "photos"

# Before anything imports vllm/ray: offline, quiet, and the tiny model cached inside the checkout.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RMS_RAY_CACHE", str(REPO / ".cache" / "rms_ray"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def shared_data_dir() -> Path | None:
    """``RMS_SHARED_DATA`` or ``<repo>/../shared/data`` when it exists (see ../shared/README.md)."""
    env = os.environ.get("RMS_SHARED_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data (or RMS_SHARED_DATA) is absent: real benchmark images are not in this checkout")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the in-process pipeline tests, with its own temp dir (removed at teardown)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rms_ray_test_ray_")
    from rms_ray.common.ray_utils import SCRATCH_ENV, configure_ray_data

    configure_ray_data()
    # engine actors put their scratch files (vLLM's file store) under this session's folder, removed below
    old_scratch = os.environ.get(SCRATCH_ENV)
    os.environ[SCRATCH_ENV] = os.path.join(tmp, "engines")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _temp_dir=tmp)
    yield ray
    ray.shutdown()
    if old_scratch is None:
        os.environ.pop(SCRATCH_ENV, None)
    else:
        os.environ[SCRATCH_ENV] = old_scratch
    shutil.rmtree(tmp, ignore_errors=True)


class Recorder:
    """Delegates to a real engine and keeps every request it was given (observation, not a mock)."""

    def __init__(self, engine):
        self.engine, self.requests = engine, []

    def generate(self, requests):
        self.requests += requests
        return self.engine.generate(requests)


@pytest.fixture(scope="session")
def vllm_engine():
    """One real vLLM CPU engine (tiny model, cpu-tiny settings) in this process, shared by the in-process tests."""
    import gc

    from rms_ray.common.config import load_config
    from rms_ray.engine.vllm_engine import VLMEngine

    cfg = load_config("cpu-tiny")
    eng = VLMEngine(cfg.model, cfg.resources)
    yield cfg, eng
    del eng
    gc.collect()
