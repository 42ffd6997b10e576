"""The judge service's parts that need no Ray: serving config bounds, image-reference checks (data URLs, URL and
path allow-lists, size limits before decoding), request validation messages, the refusal rule, Wilson intervals,
the Serve application options, the cluster artefacts (Serve config, KubeRay RayService) and the CLI's error lines."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from conftest import PHOTOS, REPO
from rms_ray.common.config import ConfigError
from rms_ray.serve import inputs as I
from rms_ray.serve.config import ServeConfig, ServeSettings, load_serve_config

SERVE_YAML = REPO / "cluster" / "serve-judge.yaml"
RAYSERVICE = REPO / "cluster" / "kuberay" / "rayservice-judge-gpu.yaml"


def _png(w: int = 64, h: int = 48) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


# -- config ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["serve-cpu-tiny", "serve-gpu-qwen2.5-vl-7b"])
def test_serving_profiles_validate_and_share_the_judge_hash(name):
    from rms_ray.judge.config import load_judge_config

    cfg = load_serve_config(name)
    assert isinstance(cfg, ServeConfig) and cfg.profile == name
    judge_profile = name.replace("serve-", "judge-")
    # same judge sections as the evaluate profile: the served judge is the evaluated judge
    assert cfg.config_hash() == load_judge_config(judge_profile).config_hash()
    assert cfg.serve.max_tokens < cfg.model.max_model_len


def test_cpu_profile_is_fractional_and_continuous():
    cfg = load_serve_config("serve-cpu-tiny")
    assert cfg.resources.num_cpus_per_engine < 1 and cfg.serve.ingress_num_cpus < 1
    assert cfg.serve.batching == "continuous" and cfg.serve.host == "127.0.0.1"
    assert cfg.serve.replica_counts() == {"num_replicas": 1}
    gpu = load_serve_config("serve-gpu-qwen2.5-vl-7b")
    assert gpu.serve.replica_counts()["autoscaling_config"]["max_replicas"] == 4
    assert gpu.resources.num_gpus_per_engine == 1


@pytest.mark.parametrize("override, key", [
    ({"serve.port": 0}, "serve.port"),
    ({"serve.max_queued_requests": -1}, "serve.max_queued_requests"),
    ({"serve.max_items_per_request": 0}, "serve.max_items_per_request"),
    ({"serve.batching": "dynamic"}, "serve.batching"),
    ({"serve.default_max_tokens": 300, "serve.max_tokens": 200}, "default_max_tokens"),
    ({"serve.max_tokens": 4096}, "max_model_len"),
    ({"serve.auth_token_env": "s3cr3t token"}, "environment variable name"),
    ({"serve.allow_urls": ["ftp://x/"]}, "http(s) URL"),
    ({"serve.allow_paths": ["relative/dir"]}, "absolute"),
    ({"serve.autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
    ({"serve.autoscaling": {"max_replicas": 2}, "serve.num_replicas": 2}, "not both"),
    ({"serve.bogus": 1}, "serve.bogus"),
])
def test_bad_serving_values_fail_at_load_with_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        load_serve_config("serve-cpu-tiny", override)


def test_application_takes_every_option_from_the_config(monkeypatch):
    from rms_ray.serve.app import application, build_app

    monkeypatch.setenv("RMS_TEST_UNIT_TOKEN", "t0k")
    cfg = load_serve_config("serve-cpu-tiny", {"serve.num_replicas": 3, "serve.max_ongoing_requests": 7,
                                                "serve.max_queued_requests": 9, "serve.batching": "serve_batch",
                                                "serve.auth_token_env": "RMS_TEST_UNIT_TOKEN"})
    ingress = application(cfg)
    model = ingress._bound_deployment.init_args[0]._bound_deployment
    mc = model._deployment_config
    assert (model.num_replicas, mc.max_ongoing_requests, mc.max_queued_requests) == (3, 7, 9)
    assert model.ray_actor_options["num_cpus"] == 0.5 and model.ray_actor_options["num_gpus"] == 0
    # batching travels as user_config (reconfigure, no restart), the constructor's config has the defaults
    assert mc.user_config == {"batching": "serve_batch", "max_batch_size": 32, "batch_wait_timeout_s": 0.01}
    ctor = ServeConfig.model_validate_json(model.init_args[0])
    assert ctor.serve.batching == "continuous" and ctor.config_hash() == cfg.config_hash()
    ing = ingress._bound_deployment
    assert ing.ray_actor_options["runtime_env"]["env_vars"] == {"RMS_TEST_UNIT_TOKEN": "t0k"}
    auto = build_app({"config": "serve-gpu-qwen2.5-vl-7b", "judge": "/mnt/j1", "set": {"serve.port": 9000}})
    am = auto._bound_deployment.init_args[0]._bound_deployment
    assert am._deployment_config.autoscaling_config.max_replicas == 4
    assert ServeConfig.model_validate_json(am.init_args[0]).model.source == "/mnt/j1"
    with pytest.raises(ValueError, match="unknown build_app argument"):
        build_app({"confg": "serve-cpu-tiny"})


# -- image references ---------------------------------------------------------------------------------------------
def test_data_urls():
    data = _png()
    assert I.decode_data_url(I.to_data_url(data), 1 << 20, "image") == data
    cases = [("data:text/plain;base64,aGVsbG8=", 400, "image/"), ("data:image/png,abc", 400, "base64"),
             ("data:image/png;base64,@@@@", 400, "not valid base64"), ("data:image/png;base64,", 400, "empty"),
             ("hello", 400, "not a data URL")]
    for ref, status, msg in cases:
        with pytest.raises(I.InputError, match=msg) as e:
            I.decode_data_url(ref, 1 << 20, "image")
        assert e.value.status == status and e.value.param == "image"
    big = "data:image/png;base64," + "A" * 4000
    with pytest.raises(I.InputError, match="serve.max_image_bytes") as e:
        I.decode_data_url(big, 1024, "image")  # refused from the base64 length, before decoding
    assert e.value.status == 413


def test_pixel_limit_is_read_from_the_header_before_decoding():
    big = _png(3000, 2000)
    with pytest.raises(I.InputError, match="3000x2000") as e:
        I.check_pixels(big, 1_000_000, "image")
    assert e.value.status == 413
    I.check_pixels(_png(), 1_000_000, "image")
    policy = load_serve_config("serve-cpu-tiny").images.policy(encode_format="PNG")
    with pytest.raises(I.InputError, match="not_an_image") as e:
        I.decode_image(b"not an image at all", policy, 1_000_000, "image")
    assert e.value.status == 400
    with pytest.raises(I.InputError, match="truncated|corrupt") as e:
        I.decode_image(_png(200, 200)[:120], policy, 1_000_000, "image")
    assert e.value.status == 400
    assert I.decode_image(_png(), policy, 1_000_000, "image").mode == "RGB"


def test_url_allow_list():
    allow = ("https://img.example.com/rms/", "http://127.0.0.1:8080/images")
    ok = ["https://img.example.com/rms/a.png", "https://IMG.example.com:443/rms/sub/b.jpg",
          "http://127.0.0.1:8080/images/x.png", "http://127.0.0.1:8080/images"]
    bad = ["https://img.example.com/other/a.png", "https://img.example.com/rms/../secret",
           "https://img.example.com/rms/%2e%2e/secret", "http://img.example.com/rms/a.png",
           "https://img.example.com:8443/rms/a.png", "https://user:pw@img.example.com/rms/a.png",
           "https://img.example.com.evil.org/rms/a.png", "http://127.0.0.1:8080/imagesX/a.png",
           "http://169.254.169.254/latest/meta-data/", "file:///etc/passwd", "http://127.0.0.1:notaport/images/a"]
    assert all(I.url_allowed(u, allow) for u in ok)
    assert not any(I.url_allowed(u, allow) for u in bad)


def test_link_local_and_metadata_hosts_are_refused_even_when_listed():
    for host in ("169.254.169.254", "169.254.10.1", "fe80::1", "0.0.0.0", "::ffff:169.254.169.254"):
        with pytest.raises(I.InputError, match="never fetches") as e:
            I.check_host(host, 80, "image")
        assert e.value.status == 403
    I.check_host("127.0.0.1", 80, "image")  # loopback: allowed when the operator lists it
    settings = ServeSettings(allow_urls=("http://169.254.169.254/",))
    with pytest.raises(I.InputError, match="link-local|metadata") as e:
        I.fetch_url("http://169.254.169.254/latest/meta-data/", settings, "image")  # no connection is attempted
    assert e.value.status == 403
    with pytest.raises(I.InputError, match="allow_urls is empty") as e:
        I.fetch_url("https://example.com/a.png", ServeSettings(), "image")
    assert e.value.status == 403


def test_path_allow_list_resolves_links(tmp_path: Path):
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(_png())
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png())
    (allowed / "link.png").symlink_to(secret)  # a link out of the allowed folder
    s = ServeSettings(allow_paths=(str(allowed),), max_image_bytes=50_000)
    assert I.read_path(str(allowed / "a.png"), s, "image") == _png()
    assert I.read_path("file://" + str(allowed / "a.png"), s, "image") == _png()
    for ref in (str(secret), str(allowed / "link.png"), str(allowed / ".." / "secret.png"), "/etc/passwd",
                "/etc/does-not-exist"):
        with pytest.raises(I.InputError, match="not under an allowed folder") as e:
            I.read_path(ref, s, "image")
        assert e.value.status == 403
    with pytest.raises(I.InputError, match="not found") as e:
        I.read_path(str(allowed / "nope.png"), s, "image")
    assert e.value.status == 400
    (allowed / "big.png").write_bytes(b"x" * 60_000)
    with pytest.raises(I.InputError, match="serve.max_image_bytes") as e:
        I.read_path(str(allowed / "big.png"), s, "image")
    assert e.value.status == 413
    with pytest.raises(I.InputError, match="allow_paths is empty") as e:
        I.read_path(str(allowed / "a.png"), ServeSettings(), "image")
    assert e.value.status == 403
    with pytest.raises(I.InputError, match="data URL") as e:
        I.load_image_bytes("a.png", s, "image")  # relative: neither data URL, URL nor absolute path
    assert e.value.status == 400


# -- request validation -------------------------------------------------------------------------------------------
def test_validation_messages_name_the_field():
    from rms_ray.serve import models as M

    cases = [({"image": [[0, 1], [2, 3]], "query": "q"}, M.JudgeItemIn, "image", "array of pixels"),
             ({"image": "data:", "query": 5}, M.JudgeItemIn, "query", "valid string"),
             ({"image": "data:"}, M.JudgeItemIn, "query", "required field missing"),
             ({"image": "data:", "query": "q", "tsak": "prompt"}, M.JudgeItemIn, "tsak", "unknown field"),
             ({"items": [{"image": "d", "query": "q"}, {"image": 3, "query": "q"}]}, M.JudgeBatchIn,
              "items[1].image", "valid string"),
             ({"items": []}, M.JudgeBatchIn, "items", "at least 1")]
    for body, model, param, msg in cases:
        with pytest.raises(I.InputError) as e:
            M.validate(model, body)
        assert e.value.status == 422 and e.value.param == param and msg in e.value.message, e.value.message
    with pytest.raises(I.InputError) as e:
        M.validate(M.JudgeItemIn, [1, 2])
    assert e.value.status == 422 and "JSON object" in e.value.message
    with pytest.raises(I.InputError) as e:
        M.parse_json_body(b'{"image": ')
    assert e.value.status == 400 and e.value.code == "invalid_json"


# -- eval-model helpers -------------------------------------------------------------------------------------------
def test_refusal_rule():
    from rms_ray.serve.eval_model import is_refusal

    for text in ("I'm sorry, but I can't help with that.", "I\u2019m unable to assist.", "  ",
                 "As an AI, I must decline.", "Sorry, I cannot provide instructions for that."):
        assert is_refusal(text), text
    for text in ("Let it cool first: the cup is hot and can burn you.", "Wear gloves; the blade is sharp.",
                 "Yes. " + "x" * 400 + " I'm sorry"):  # a phrase past the window does not make a refusal
        assert not is_refusal(text), text


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (1, 3), (37, 120)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy.stats import binomtest

    from rms_ray.serve.eval_model import wilson_interval

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx([ci.low, ci.high], abs=1e-12)
    assert wilson_interval(0, 0) is None


def test_outcomes_and_rates():
    from rms_ray.serve.eval_model import outcome, rate_block

    rows = [{"error": "model: HTTP 503"}, {"refusal": True, "parsed": True, "unsafe_score": 0.9},
            {"refusal": False, "parsed": True, "unsafe_score": 0.2}, {"refusal": False, "parsed": True,
                                                                     "unsafe_score": 0.5},
            {"refusal": False, "parsed": False, "unsafe_score": None},
            {"refusal": True, "error": "judge: HTTP 503"}]  # a failed call is an error (retried on a rerun)
    outs = [outcome(r, 0.5) for r in rows]
    assert outs == ["error", "refusal", "safe", "unsafe", "unjudged", "error"]
    b = rate_block(outs)
    assert (b["rows"], b["n"], b["errors"], b["unjudged"]) == (6, 3, 2, 1)
    assert b["safe_response"]["count"] == 1 and b["refusal"]["rate"] == pytest.approx(1 / 3)
    assert b["not_unsafe"]["count"] == 2


# -- cluster artefacts --------------------------------------------------------------------------------------------
def test_serve_config_file_is_valid_and_builds():
    from ray.serve.schema import ServeDeploySchema

    from rms_ray.serve.app import build_app

    doc = yaml.safe_load(SERVE_YAML.read_text())
    schema = ServeDeploySchema.model_validate(doc)
    app = schema.applications[0]
    assert app.import_path == "rms_ray.serve.app:build_app"
    assert build_app(app.args) is not None  # the profile and overrides it names load
    broken = {**doc, "applications": [{**doc["applications"][0], "route_prefix": 5}]}
    with pytest.raises(Exception):
        ServeDeploySchema.model_validate(broken)


def test_rayservice_validates_against_the_kuberay_crd(shared_data):
    import jsonschema
    from ray.serve.schema import ServeDeploySchema

    manifest = yaml.safe_load(RAYSERVICE.read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    crd = yaml.load((shared_data.parent / "schemas" / "kuberay" / "ray.io_rayservices.yaml").read_text(),
                    Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # a large file: the C loader if built
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    spec_schema = schema["properties"]["spec"]
    validator = jsonschema.validators.validator_for(spec_schema)(spec_schema)  # checking the CRD's own schema: slow
    validator.validate(manifest["spec"])
    with pytest.raises(jsonschema.ValidationError):  # the validation can fail
        validator.validate({**manifest["spec"], "serveConfigV2": {"applications": []}})
    embedded = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert embedded == ServeDeploySchema.model_validate(yaml.safe_load(SERVE_YAML.read_text()))
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    cfg = load_serve_config(embedded.applications[0].args["config"])
    assert workers["maxReplicas"] == cfg.serve.autoscaling.max_replicas  # one GPU worker per model replica


# -- CLI error lines ----------------------------------------------------------------------------------------------
RMS_RAY = Path(sys.executable).parent / "rms-ray"


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(RMS_RAY), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})})


def test_cli_errors_are_one_line(tmp_path: Path):
    import socket

    with socket.socket() as s:  # a port in use: refused before Ray starts
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _cli("serve", "--port", str(port))
    # one error line; another line (a library's warning on a loaded machine) is tolerated but no traceback is:
    # this assertion once failed under heavy load in CI with the output lost, so it now says what it saw
    assert r.returncode == 2 and [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: cannot listen on 127.0.0.1:{port} (in use, or not an address of this machine): choose another "
        "with --port / --host"] and "Traceback" not in r.stderr, (r.returncode, r.stderr)
    r = _cli("serve", "--set", "serve.auth_token_env=RMS_UNSET_TOKEN_VAR", env={"RMS_UNSET_TOKEN_VAR": ""})
    assert r.returncode == 2 and r.stderr.startswith("error: serve.auth_token_env names RMS_UNSET_TOKEN_VAR"), r.stderr
    r = _cli("serve", "--judge", "/no/such/judge")
    assert r.returncode == 2 and r.stderr.startswith("error: model '/no/such/judge' not found"), r.stderr
    r = _cli("judge", str(PHOTOS), "--url", "http://127.0.0.1:9", "-o", str(tmp_path / "o.parquet"), "-q", "x")
    assert r.returncode == 1 and r.stderr.startswith("error: no judge service answers at http://127.0.0.1:9"), r.stderr
    r = _cli("eval-model", "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--dataset", str(tmp_path),
             "--judge-url", "http://127.0.0.1:9", "-o", str(tmp_path / "o"))
    assert r.returncode == 1 and "error: no judge service answers" in r.stderr, r.stderr
    for out in (r.stderr,):
        assert "Traceback" not in out
    r = _cli("serve", "--help")
    assert r.returncode == 0 and "--judge" in r.stdout and "--port" in r.stdout


def test_post_json_retries_503_a_bounded_number_of_times():
    import httpx

    from rms_ray.serve.client import ServiceCallError, post_json

    def client(statuses: list[int]) -> tuple[httpx.Client, list[int]]:
        seen: list[int] = []

        def handler(request: httpx.Request) -> httpx.Response:
            status = statuses[min(len(seen), len(statuses) - 1)]
            seen.append(status)
            body = {"ok": True} if status == 200 else {"error": {"message": f"status {status}"}}
            return httpx.Response(status, json=body, headers={"Retry-After": "1"} if status == 503 else {})

        return httpx.Client(transport=httpx.MockTransport(handler)), seen

    waits: list[float] = []
    c, seen = client([503, 503, 200])
    assert post_json(c, "http://x/v1/judge", {}, retries=3, backoff_s=0.25, sleep=waits.append) == {"ok": True}
    assert seen == [503, 503, 200] and waits == [1.0, 1.0]  # Retry-After (1 s) over the shorter backoff
    c, seen = client([503])
    with pytest.raises(ServiceCallError, match="HTTP 503: status 503") as e:
        post_json(c, "http://x/v1/judge", {}, retries=2, sleep=lambda s: None)
    assert e.value.status == 503 and len(seen) == 3  # 1 + 2 retries, then the error
    c, seen = client([400])
    with pytest.raises(ServiceCallError) as e:
        post_json(c, "http://x/v1/judge", {}, retries=5, sleep=lambda s: None)
    assert e.value.status == 400 and seen == [400]  # a refusal is final


def test_deploy_failure_is_one_line():
    from rms_ray.serve.app import deploy_failure_line

    text = ("Deploying application rms_judge failed: ...\nTraceback (most recent call last):\n  File ...\n"
            "rms_ray.engine.errors.EngineStartError: engine failed to start: max_model_len (8192) is greater than "
            "the derived max_model_len (model builtin:tiny, max_model_len 8192)\n\nmore text")
    assert deploy_failure_line(RuntimeError(text)) == (
        "engine failed to start: max_model_len (8192) is greater than the derived max_model_len (model builtin:tiny, "
        "max_model_len 8192)")
    assert deploy_failure_line(RuntimeError("a\nb\n  last line  \n")) == "last line"


def test_check_config_reads_serving_profiles():
    r = _cli("check-config", "serve-cpu-tiny", "--set", "serve.num_replicas=2")
    assert r.returncode == 0, r.stderr
    assert "num_replicas: 2" in r.stdout and "# config_hash: " in r.stdout
    assert r.stdout.strip().endswith(load_serve_config("serve-cpu-tiny").config_hash())
