"""Cluster artefacts are valid: the KubeRay RayJob against the CRD schema, the runtime env, the job entrypoint."""

from __future__ import annotations

import shlex
import subprocess
import sys

import jsonschema
import pytest
import yaml

from conftest import REPO
from rms_ray.common.config import load_config

RAYJOB = REPO / "cluster" / "kuberay" / "rayjob-construct-gpu.yaml"


def _crd_schema(shared, kind_file: str, version: str) -> dict:
    crd = yaml.safe_load((shared.parent / "schemas" / "kuberay" / kind_file).read_text())
    return next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]


def test_rayjob_validates_against_the_kuberay_crd(shared_data):
    manifest = yaml.safe_load(RAYJOB.read_text())
    assert manifest["kind"] == "RayJob" and manifest["apiVersion"] == "ray.io/v1"
    schema = _crd_schema(shared_data, "ray.io_rayjobs.yaml", "v1")
    jsonschema.validate(manifest["spec"], schema["properties"]["spec"])
    broken = {**manifest["spec"], "backoffLimit": "two"}  # the validation can fail
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema["properties"]["spec"])


def test_rayjob_entrypoint_names_a_real_script_and_a_valid_config():
    spec = yaml.safe_load(RAYJOB.read_text())["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[0] == "python" and (REPO / argv[1]).is_file()
    cfg = load_config(REPO / argv[argv.index("--config") + 1])
    assert cfg.resources.num_gpus_per_engine == 1
    workers = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert workers["replicas"] == cfg.resources.engine_replicas  # one GPU worker per engine replica


def test_runtime_env_is_loadable():
    env = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "." and env["env_vars"]["HF_HUB_OFFLINE"] == "1"


def test_job_entrypoint_help():
    res = subprocess.run([sys.executable, "jobs/construct.py", "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--config" in res.stdout and "--input" in res.stdout
