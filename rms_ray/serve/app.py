"""The judge service: a Ray Serve application with a FastAPI ingress and one model deployment.

Two deployments (Ray Serve's usual split of HTTP from the model):

* ``JudgeIngress`` (FastAPI, a fraction of a CPU): auth, body limits, JSON and field validation, image fetching and
  decoding (in a worker thread, off the event loop), the OpenAI shapes. It answers ``/healthz`` itself, so a
  process that is up says so while the model still loads, and it resends a request whose model replica died to
  another one (``serve.replica_death_retries``; requests are idempotent).
* ``JudgeModel`` (one per engine: a GPU, or a CPU share): owns the one :class:`~rms_ray.engine.VLMEngine` of its
  process, created by :class:`~rms_ray.judge.scorer.Judge` exactly as ``evaluate``'s actors create it. A judge item
  becomes ``Judge.request(item)``, its result ``Judge._output`` / ``output_row``: the served unsafe score is
  computed by the code that computes it offline. Requests from all callers share the engine in one of three ways
  (``serve.batching``): ``continuous`` (``VLMEngine.submit``: an item joins the running batch at the next engine
  step), ``serve_batch`` (Ray Serve's ``@serve.batch``: items collected for ``batch_wait_timeout_s``, run as one
  engine call, the next batch waits) or ``none`` (one item at a time through ``engine.generate``; the benchmark's
  baseline).

Routes: ``POST /v1/judge``, ``POST /v1/chat/completions``, ``GET /v1/models`` (OpenAI-compatible), ``GET /healthz``
(alive; never needs auth), ``GET /readyz`` (a model replica has its engine loaded). Errors are JSON
``{"error": {"message", "type", "param", "status"}}``. Overload is shed with 503: the model deployment's queue per
caller is bounded (``serve.max_queued_requests``; Ray Serve raises ``BackPressureError``, answered 503 here) and so
is the proxy's queue in front of the ingress (Serve's own 503).

Metrics: Ray Serve's own (``ray_serve_num_http_requests``, ``ray_serve_http_request_latency_ms``,
``ray_serve_deployment_queued_queries``, ``ray_serve_replica_processing_queries``, ...) on each node's Ray metrics
endpoint, plus the counters defined here (``ray_rms_judge_items_total`` by task and verdict,
``ray_rms_chat_completions_total`` by finish reason, ``ray_rms_rejected_requests_total`` by status and type).

Import path for ``serve run`` / ``serve deploy``: ``rms_ray.serve.app:build_app`` with args ``config``, ``judge``
and ``set`` (see :func:`build_app` and ``cluster/serve-judge.yaml``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import threading
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rms_ray.serve import models as M
from rms_ray.serve.config import ServeConfig, ServeSettings, load_serve_config
from rms_ray.serve.inputs import InputError, ServiceError, load_image

logger = logging.getLogger("rms_ray")

APP_NAME = "rms_judge"
MODEL_DEPLOYMENT = "JudgeModel"
INGRESS_DEPLOYMENT = "JudgeIngress"
#: System prompt of a chat completion without a system message (Qwen-VL's own default).
DEFAULT_SYSTEM = "You are a helpful assistant."
#: Seconds ``/readyz`` waits for a model replica to answer before saying "not ready".
READY_TIMEOUT_S = 5.0
#: Serve's attempts at a model replica's constructor (engine start) before the deployment fails: vLLM refuses a
#: setting the same way twice, and Serve's default (20) would spend minutes on a config that cannot start.
CONSTRUCTOR_ATTEMPTS = 2

api = FastAPI(title="rms_ray judge", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ServiceError)
async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # unknown route / method: the same JSON error shape as everything else
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(ServiceError(exc.status_code, code, str(exc.detail)).body(), status_code=exc.status_code)


# -- model deployment --------------------------------------------------------------------------------------------
class _EngineTimeout(Exception):
    pass


@serve.deployment(name=MODEL_DEPLOYMENT)
class JudgeModel:
    """One engine (created by :class:`~rms_ray.judge.scorer.Judge` from the config's judge part) and the batching
    mode of ``serve.batching``. Called only by :class:`JudgeIngress` through a deployment handle."""

    def __init__(self, cfg_json: str) -> None:
        from PIL import Image
        from ray.serve.metrics import Counter

        from rms_ray.judge.scorer import Judge, JudgeItem

        self.cfg = ServeConfig.model_validate_json(cfg_json)
        t0 = time.perf_counter()
        self.scorer = Judge(self.cfg.judge_config())  # the one place this replica's vLLM engine is created
        self.engine = self.scorer.engine
        # one request before the replica counts as up: the engine's first request is much slower (~2 s on a CPU)
        self.engine.generate([self.scorer.request(JudgeItem(Image.new("RGB", (64, 64), (128, 128, 128)), "warm-up"))])
        self.load_s = time.perf_counter() - t0
        self.timeout_s = self.cfg.serve.request_timeout_s
        self.reconfigure(batching_options(self.cfg))
        self._one = asyncio.Lock()
        self._batch_counts = {"serve_batches": 0, "serve_batch_items": 0}
        self.items_total = Counter("rms_judge_items", description="judge items scored, by task and verdict",
                                   tag_keys=("task", "verdict"))
        self.chat_total = Counter("rms_chat_completions", description="chat completions, by finish reason",
                                  tag_keys=("finish_reason",))

    def reconfigure(self, options: dict[str, Any]) -> None:
        """Serve's ``user_config`` hook: the batching mode and ``@serve.batch`` sizes, changed in place (no engine
        restart) when a deployment with other values is applied (see :func:`batching_options`)."""
        self.mode = options["batching"]
        self._batched.set_max_batch_size(options["max_batch_size"])
        self._batched.set_batch_wait_timeout_s(options["batch_wait_timeout_s"])

    def _engine_failed(self) -> str | None:
        # VLMEngine records why its step loop died (then every submit raises); None while it runs
        return getattr(self.engine, "_failed", None)

    def check_health(self) -> None:
        """Serve's periodic health check: a replica whose engine died is replaced."""
        failed = self._engine_failed()
        if failed:
            raise RuntimeError(f"vLLM engine failed: {failed}")

    def ready(self) -> dict[str, Any]:
        """This replica's engine is loaded (the constructor returned) and has not failed."""
        ctx = serve.get_replica_context()
        return {"ready": self._engine_failed() is None, "model": self.cfg.model.source,
                "replica": getattr(ctx, "replica_tag", None) or str(getattr(ctx, "replica_id", "")),
                "engine_dtype": self.engine.dtype_choice.to_dict(), "engine_load_s": round(self.load_s, 3),
                "batching": self.mode}

    def stats(self) -> dict[str, float]:
        """The engine's counters (:meth:`rms_ray.engine.VLMEngine.stats`) and, for ``serve_batch``, how many
        ``@serve.batch`` calls ran and how many items they held (``serve_batches``, ``serve_batch_items``)."""
        return {**self.engine.stats(), **self._batch_counts}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01)  # the config's values are set by reconfigure
    async def _batched(self, requests: list) -> list:
        # lock-step: the whole batch goes to the engine at once and the next batch waits until it is done
        self._batch_counts["serve_batches"] += 1
        self._batch_counts["serve_batch_items"] += len(requests)
        return list(await asyncio.gather(*(asyncio.wrap_future(self.engine.submit(r)) for r in requests)))

    async def _unbatched(self, request: Any) -> Any:
        async with self._one:
            return (await asyncio.to_thread(self.engine.generate, [request]))[0]

    async def _run(self, request: Any) -> tuple[Any, float]:
        t0 = time.perf_counter()
        if self.mode == "continuous":
            pending = asyncio.wrap_future(self.engine.submit(request))
        elif self.mode == "serve_batch":
            pending = self._batched(request)
        else:
            pending = self._unbatched(request)
        try:
            result = await asyncio.wait_for(pending, self.timeout_s)
        except asyncio.TimeoutError:
            raise _EngineTimeout() from None
        return result, (time.perf_counter() - t0) * 1000.0

    async def judge(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Score items ``{"image": PIL RGB, "query", "response", "task"}``; ``{"rows": [output_row + task]}`` or
        ``{"status", "code", "message"}`` when the engine timed out (504) or failed (503)."""
        from rms_ray.judge.scorer import Judge, JudgeItem, output_row

        requests = [self.scorer.request(JudgeItem(image=it["image"], query=it["query"], task=it["task"],
                                                 response=it.get("response"))) for it in items]
        try:
            done = await asyncio.gather(*(self._run(r) for r in requests))
        except _EngineTimeout:
            return {"status": 504, "code": "timeout", "message": f"the engine did not answer within "
                    f"{self.timeout_s} s (serve.request_timeout_s)"}
        except RuntimeError as e:  # the engine failed: check_health has Serve replace this replica
            return {"status": 503, "code": "engine_failed", "message": str(e)[:300]}
        rows = []
        for it, (res, ms) in zip(items, done):
            row = output_row(Judge._output(res, ms))
            row["task"] = it["task"]
            rows.append(row)
            self.items_total.inc(tags={"task": it["task"], "verdict": row["verdict"] or "unparseable"})
        return {"rows": rows}

    async def chat(self, system: str, user: str, image: Any, max_tokens: int, temperature: float, top_p: float,
                   seed: int) -> dict[str, Any]:
        """Free-text generation (no output constraint): ``{"text", "finish_reason", "completion_tokens",
        "prompt_tokens", "latency_ms"}`` or an error dict as in :meth:`judge`."""
        from rms_ray.engine.vllm_engine import GenRequest

        req = GenRequest(system=system, user=user, schema=None, regex=None, max_tokens=max_tokens, image=image,
                         temperature=temperature, top_p=top_p, seed=seed)
        try:
            res, ms = await self._run(req)
        except _EngineTimeout:
            return {"status": 504, "code": "timeout", "message": f"the engine did not answer within "
                    f"{self.timeout_s} s (serve.request_timeout_s)"}
        except RuntimeError as e:
            return {"status": 503, "code": "engine_failed", "message": str(e)[:300]}
        self.chat_total.inc(tags={"finish_reason": (res.finish_reason or "none").split(":", 1)[0]})
        return {"text": res.text, "finish_reason": res.finish_reason, "completion_tokens": res.num_tokens,
                "prompt_tokens": res.prompt_tokens, "latency_ms": ms}


# -- ingress -----------------------------------------------------------------------------------------------------
def _ray_errors() -> tuple[type[BaseException], ...]:
    from ray.exceptions import ActorUnavailableError, RayActorError

    return (RayActorError, ActorUnavailableError)


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class JudgeIngress:
    """HTTP front of the judge: validation, auth, image loading, OpenAI shapes; forwards work to ``JudgeModel``."""

    def __init__(self, model: Any, cfg_json: str) -> None:
        from ray.serve.metrics import Counter

        from rms_ray.judge.prompt import load_judge_prompt
        from rms_ray.judge.scorer import image_policy

        self.model = model
        self.cfg = ServeConfig.model_validate_json(cfg_json)
        self.s = self.cfg.serve
        self.policy = image_policy(self.cfg)
        self.token: bytes | None = None
        if self.s.auth_token_env:
            token = os.environ.get(self.s.auth_token_env, "")
            if not token:  # refuse to start open when auth was asked for
                raise RuntimeError(f"serve.auth_token_env names {self.s.auth_token_env}, which is not set (or empty) "
                                   "in the ingress replica's environment")
            self.token = token.encode()
        self.prompt_version = load_judge_prompt().version_id
        self.config_hash = self.cfg.config_hash()
        self.model_name = self.cfg.served_model_name()
        self.created = int(time.time())
        self.rejected = Counter("rms_rejected_requests", description="requests answered with an error, by status "
                                "and type", tag_keys=("status", "type"))

    # -- helpers
    def _auth(self, request: Request) -> None:
        if self.token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.token):
            raise InputError(401, "unauthorized", "missing or wrong bearer token (Authorization: Bearer <token>)")

    async def _body(self, request: Request) -> Any:
        limit = self.s.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise InputError(413, "request_too_large", f"request body is {declared} bytes; the limit is {limit} "
                             "(serve.max_request_bytes)")
        buf = bytearray()
        async for chunk in request.stream():
            buf += chunk
            if len(buf) > limit:
                raise InputError(413, "request_too_large", f"request body is over the limit of {limit} bytes "
                                 "(serve.max_request_bytes)")
        return M.parse_json_body(bytes(buf))

    def _text(self, value: str | None, param: str) -> None:
        if value is not None and len(value) > self.s.max_text_chars:
            raise InputError(413, "text_too_long", f"{param} is {len(value)} characters; the limit is "
                             f"{self.s.max_text_chars} (serve.max_text_chars)", param)

    async def _call(self, method: str, *args: Any) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        for attempt in range(self.s.replica_death_retries + 1):
            try:
                out = await getattr(self.model, method).remote(*args)
            except BackPressureError:
                raise ServiceError(503, "overloaded", "the judge is at capacity (serve.max_queued_requests "
                                   "waiting); retry later") from None
            except _ray_errors() as e:
                if attempt < self.s.replica_death_retries:
                    logger.warning("a model replica died during a request; resending it (%s)", type(e).__name__)
                    continue
                raise ServiceError(503, "replica_unavailable", f"the model replica died ({type(e).__name__}); "
                                   "retry") from None
            if "status" in out:
                raise ServiceError(out["status"], out["code"], out["message"])
            return out
        raise AssertionError("unreachable")

    async def _guard(self, request: Request, work: Any) -> Any:
        try:
            self._auth(request)
            return await work()
        except ServiceError as e:
            self.rejected.inc(tags={"status": str(e.status), "type": e.code})
            raise

    # -- routes
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        """Alive: this process answers (no auth, no model call)."""
        return {"status": "alive"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> JSONResponse:
        """Ready: a model replica answers with its engine loaded (200), else 503 with the reason."""
        async def work() -> JSONResponse:
            try:
                info = await asyncio.wait_for(self.model.ready.remote(), READY_TIMEOUT_S)
            except asyncio.TimeoutError:
                return JSONResponse({"ready": False, "reason": "no model replica answered within "
                                     f"{READY_TIMEOUT_S:g} s (model loading or all replicas busy)"}, status_code=503)
            except Exception as e:  # noqa: BLE001 - any failure to reach a replica means "not ready"
                return JSONResponse({"ready": False, "reason": f"{type(e).__name__}: {str(e)[:200]}"},
                                    status_code=503)
            return JSONResponse(info, status_code=200 if info.get("ready") else 503)

        return await self._guard(request, work)

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        """OpenAI ``GET /v1/models``: the one served model."""
        async def work() -> dict[str, Any]:
            return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                "owned_by": "rms_ray"}]}

        return await self._guard(request, work)

    @api.post("/v1/judge")
    async def judge(self, request: Request) -> dict[str, Any]:
        """Judge one item or ``{"items": [...]}``; see :class:`rms_ray.serve.models.JudgeResponse`."""
        async def work() -> dict[str, Any]:
            t0 = time.perf_counter()
            value = await self._body(request)
            if isinstance(value, dict) and "items" in value:
                if isinstance(value["items"], list) and len(value["items"]) > self.s.max_items_per_request:
                    raise InputError(413, "too_many_items", f"{len(value['items'])} items; the limit is "
                                     f"{self.s.max_items_per_request} per request (serve.max_items_per_request)",
                                     "items")
                items = M.validate(M.JudgeBatchIn, value).items
                params = [f"items[{i}]" for i in range(len(items))]
            else:
                items, params = [M.validate(M.JudgeItemIn, value)], [""]
            tasks = []
            for it, p in zip(items, params):
                dot = f"{p}." if p else ""
                self._text(it.query, f"{dot}query")
                self._text(it.response, f"{dot}response")
                task = it.task or ("response" if it.response else "prompt")
                if task == "response" and not (it.response or "").strip():
                    raise InputError(422, "invalid_request", f"{dot}response: required (non-empty) for a response "
                                     "task", f"{dot}response")
                tasks.append(task)

            def decode_all() -> list[Any]:  # in a worker thread: fetching and decoding must not block the loop
                return [load_image(it.image, self.s, self.policy, f"{p}.image" if p else "image")
                        for it, p in zip(items, params)]

            images = await asyncio.to_thread(decode_all)
            out = await self._call("judge", [{"image": img, "query": it.query, "response": it.response, "task": t}
                                             for img, it, t in zip(images, items, tasks)])
            results = [M.JudgeResult(id=it.id, task=row["task"], verdict=row["verdict"],
                                     unsafe_score=row["unsafe_score"], category=row["judge_category"],
                                     rationale=row["rationale"], parsed=row["parsed"], error=row["error"],
                                     latency_ms=round(row["latency_ms"], 3))
                       for it, row in zip(items, out["rows"])]
            return M.JudgeResponse(results=results, judge=self.cfg.model.source, prompt_version=self.prompt_version,
                                   config_hash=self.config_hash,
                                   latency_ms=round((time.perf_counter() - t0) * 1000.0, 3)).model_dump()

        return await self._guard(request, work)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> dict[str, Any]:
        """OpenAI chat completion (non-streaming, n=1): the served model generates free text."""
        async def work() -> dict[str, Any]:
            req = M.validate(M.ChatCompletionRequest, await self._body(request))
            if req.stream:
                raise InputError(400, "unsupported", "stream=true is not supported: send stream=false", "stream")
            if req.n != 1:
                raise InputError(400, "unsupported", "only n=1 is supported", "n")
            if req.model != self.model_name:
                raise InputError(404, "model_not_found", f"model {req.model!r} is not served here; GET /v1/models "
                                 f"lists {self.model_name!r}", "model")
            system, user, image_ref, image_param = self._flatten(req.messages)
            wanted = req.max_completion_tokens or req.max_tokens or self.s.default_max_tokens
            max_tokens = min(wanted, self.s.max_tokens)  # bounded by the config; documented, not an error
            image = None
            if image_ref is not None:
                image = await asyncio.to_thread(load_image, image_ref, self.s, self.policy, image_param)
            out = await self._call("chat", system, user, image, max_tokens, req.temperature, req.top_p,
                                   req.seed or 0)
            finish = out["finish_reason"] or "stop"
            if finish.startswith("error"):  # e.g. a prompt longer than max_model_len
                raise InputError(400, "invalid_request", f"the model refused the request: {finish[7:]}", "messages")
            return {
                "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                             "finish_reason": "length" if finish == "length" else "stop", "logprobs": None}],
                "usage": {"prompt_tokens": out["prompt_tokens"], "completion_tokens": out["completion_tokens"],
                          "total_tokens": out["prompt_tokens"] + out["completion_tokens"]},
            }

        return await self._guard(request, work)

    def _flatten(self, messages: list[M.ChatMessage]) -> tuple[str, str, str | None, str]:
        """OpenAI messages -> (system, user text, image reference, its field). System/developer messages are
        joined into the system prompt; one user message is the user turn; a conversation (several turns) becomes
        one user turn holding the transcript (the engine takes one system and one user turn). At most one image:
        the engine is configured with one image per prompt."""
        systems: list[str] = []
        turns: list[tuple[str, str]] = []
        image_ref, image_param = None, ""
        for i, m in enumerate(messages):
            parts: list[str] = []
            if isinstance(m.content, str):
                parts.append(m.content)
            elif m.content:
                for j, part in enumerate(m.content):
                    if part.type == "text":
                        parts.append(part.text or "")
                    elif part.image_url is not None:
                        if m.role != "user":
                            raise InputError(400, "invalid_request", "images are accepted in user messages only",
                                             f"messages[{i}].content[{j}]")
                        if image_ref is not None:
                            raise InputError(400, "too_many_images", "at most one image per request",
                                             f"messages[{i}].content[{j}]")
                        image_ref, image_param = part.image_url.url, f"messages[{i}].content[{j}].image_url.url"
                    else:
                        raise InputError(422, "invalid_request", "image_url part without image_url",
                                         f"messages[{i}].content[{j}]")
            text = "\n".join(parts)
            self._text(text, f"messages[{i}].content")
            if m.role in ("system", "developer"):
                systems.append(text)
            else:
                turns.append((m.role, text))
        if not any(role == "user" for role, _ in turns):
            raise InputError(422, "invalid_request", "messages: no user message", "messages")
        system = "\n\n".join(s for s in systems if s) or DEFAULT_SYSTEM
        if len(turns) == 1:
            user = turns[0][1]
        else:
            user = "\n\n".join(f"{role.capitalize()}: {text}" for role, text in turns) + "\n\nAssistant:"
        self._text(user, "messages")
        return system, user, image_ref, image_param


# -- building and running ----------------------------------------------------------------------------------------
#: The ``serve`` keys a running model replica takes through ``reconfigure`` (Serve's ``user_config``).
BATCHING_KEYS = ("batching", "max_batch_size", "batch_wait_timeout_s")


def batching_options(cfg: ServeConfig) -> dict[str, Any]:
    """The model deployment's ``user_config``: ``serve.batching``, ``max_batch_size``, ``batch_wait_timeout_s``."""
    return {k: getattr(cfg.serve, k) for k in BATCHING_KEYS}


def application(cfg: ServeConfig) -> Any:
    """The Serve application of ``cfg`` (ingress bound to the model deployment), every option from the config.

    A model replica asks ``resources.num_cpus_per_engine`` CPUs and ``resources.num_gpus_per_engine`` GPUs; the
    ingress ``serve.ingress_num_cpus``. When ``serve.auth_token_env`` is set and that variable is set in this
    process, it is passed to the ingress replicas' environment (``runtime_env``); otherwise the replicas must have
    it in their own environment (a Kubernetes secret, say), or the ingress refuses to start.
    """
    s, r = cfg.serve, cfg.resources
    # The batching settings travel as Serve's user_config, not in the constructor's config: changing them is a
    # light update of the running replicas (reconfigure), not a restart of their engines.
    fixed = {k: ServeSettings.model_fields[k].default for k in BATCHING_KEYS}
    cfg_json = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=fixed)}).model_dump_json()
    # serve.run gives every deployment a random code version, so any redeploy would restart the engines; a version
    # derived from the constructor's config keeps a redeploy that changes only user_config a light update (what
    # `serve deploy` does with its config-derived versions). Serve accepts a version only as an internal option.
    version = hashlib.sha256(cfg_json.encode()).hexdigest()[:16]
    model = JudgeModel.options(
        ray_actor_options={"num_cpus": r.num_cpus_per_engine, "num_gpus": r.num_gpus_per_engine},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        max_constructor_retry_count=CONSTRUCTOR_ATTEMPTS, user_config=batching_options(cfg), **s.replica_counts(),
    ).options(version=version, _internal=True).bind(cfg_json)
    ingress_actor: dict[str, Any] = {"num_cpus": s.ingress_num_cpus}
    if s.auth_token_env and os.environ.get(s.auth_token_env):
        ingress_actor["runtime_env"] = {"env_vars": {s.auth_token_env: os.environ[s.auth_token_env]}}
    return JudgeIngress.options(
        num_replicas=s.ingress_replicas, ray_actor_options=ingress_actor,
        max_ongoing_requests=s.ingress_max_ongoing_requests, max_queued_requests=s.ingress_max_queued_requests,
        max_constructor_retry_count=CONSTRUCTOR_ATTEMPTS,
    ).options(version=version, _internal=True).bind(model, cfg_json)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """Serve application builder: ``serve run rms_ray.serve.app:build_app config=serve-cpu-tiny judge=builtin:tiny``
    or a Serve config file's ``import_path: rms_ray.serve.app:build_app`` with ``args``.

    Args:
        args: ``config`` (profile name or YAML path, default ``serve-cpu-tiny``), ``judge`` (overrides
            ``model.source``), ``set`` (a mapping of dotted config keys to values, as ``--set``).
    Raises:
        ValueError: an unknown argument. rms_ray.common.config.ConfigError: an invalid config.
    """
    args = dict(args or {})
    config = str(args.pop("config", "serve-cpu-tiny"))
    judge = args.pop("judge", None)
    sets = dict(args.pop("set", None) or {})
    if args:
        raise ValueError(f"unknown build_app argument(s) {sorted(args)}; known: config, judge, set")
    if judge:
        sets["model.source"] = str(judge)
    return application(load_serve_config(config, sets))


def deploy(cfg: ServeConfig, *, blocking: bool = True) -> None:
    """Deploy the application of ``cfg`` on the Serve instance of the connected Ray cluster (``serve.start`` first
    to choose host and port). ``blocking``: wait until every replica is up (engines loaded).

    Raises:
        RuntimeError: Serve could not deploy it (e.g. an engine that failed to start, with vLLM's reason).
    """
    if blocking:
        serve.run(application(cfg), name=APP_NAME, route_prefix="/")
    else:  # Serve's own non-blocking variant of run (used by tests that watch readiness while the model loads)
        from ray.serve.api import _run

        _run(application(cfg), _blocking=False, name=APP_NAME, route_prefix="/")


def port_free(host: str, port: int) -> bool:
    """Whether ``host:port`` can be bound now (checked before Ray starts, so a taken port is one clear line)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    family, *_, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(addr)
        except OSError:
            return False
    return True


def serve_url(host: str, port: int) -> str:
    """The URL to print for a bind address (``0.0.0.0`` / ``::`` -> this machine's name)."""
    import socket

    shown = socket.gethostname() if host in ("0.0.0.0", "::", "") else host
    return f"http://{'[' + shown + ']' if ':' in shown else shown}:{port}"


class ServeStartError(RuntimeError):
    """The service could not start, in one line: ``user`` is True for what the user gave (a taken port, an unset
    token variable: exit 2), False for a deployment that failed (exit 1)."""

    def __init__(self, message: str, user: bool = True) -> None:
        super().__init__(message)
        self.user = user


def deploy_failure_line(exc: BaseException) -> str:
    """One line for a failed deployment: the engine's ``engine failed to start: ...`` line when Ray's text holds one
    (a replica's constructor raised it), else the last line of the error text."""
    import re

    from rms_ray.engine.errors import ENGINE_START_PREFIX

    text = str(exc)
    m = re.search(re.escape(ENGINE_START_PREFIX) + r"[^\n]*", text)
    if m:
        return m.group(0)[:700]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:700]


def run_server(cfg: ServeConfig, *, ray_address: str | None = None, log: Any = print,
               on_ready: Any = None) -> None:
    """``rms-ray serve``: start (or join) Ray, start Serve on ``serve.host:serve.port``, deploy, print the URL and
    block until interrupted (Ctrl-C or SIGTERM); then delete the application and stop a Ray this call started.

    Args:
        on_ready: called with the base URL once every replica is up (tests); default: block forever.
    Raises:
        ServeStartError: the port is taken, the auth token variable is unset, or the deployment failed (its
            reason in one line, e.g. vLLM's refusal).
        rms_ray.engine.ModelSourceError: the judge is not a model.
    """
    import signal

    from rms_ray.common.ray_utils import init_ray, shutdown_ray
    from rms_ray.engine.vllm_engine import check_model_source

    s = cfg.serve
    check_model_source(cfg.model.source)
    if s.auth_token_env and not os.environ.get(s.auth_token_env):
        raise ServeStartError(f"serve.auth_token_env names {s.auth_token_env}, which is not set: export "
                              f"{s.auth_token_env}=<token> (or set serve.auth_token_env: null for no auth)")
    if not (ray_address or os.environ.get("RAY_ADDRESS")) and not port_free(s.host, s.port):
        raise ServeStartError(f"cannot listen on {s.host}:{s.port} (in use, or not an address of this machine): "
                              "choose another with --port / --host")
    url = serve_url(s.host, s.port)
    main = threading.current_thread() is threading.main_thread()
    old = signal.getsignal(signal.SIGTERM) if main else None
    started = init_ray(cfg.resources.ray_num_cpus, ray_address)
    if main:  # after ray.init, which installs its own: SIGTERM (ray job stop, kill) ends the command like Ctrl-C,
        signal.signal(signal.SIGTERM, _raise_interrupt)  # so the application is deleted, not left running
    try:
        serve.start(http_options={"host": s.host, "port": s.port})
        log(f"starting the judge {cfg.model.source} ({s.batching} batching, "
            f"{s.autoscaling and 'autoscaling' or str(s.num_replicas) + ' replica(s)'}): loading the model...")
        t0 = time.perf_counter()
        try:
            deploy(cfg)
        except RuntimeError as e:
            raise ServeStartError(f"the judge service failed to deploy: {deploy_failure_line(e)}", user=False) from e
        log(f"serving {cfg.model.source} at {url}  (ready in {time.perf_counter() - t0:.0f} s; "
            f"auth {'on: ' + s.auth_token_env if s.auth_token_env else 'off'})\n"
            f"  POST {url}/v1/judge   POST {url}/v1/chat/completions   GET {url}/v1/models   "
            f"GET {url}/healthz   GET {url}/readyz\n  Ctrl-C to stop")
        if on_ready is not None:
            on_ready(url)
            return
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.delete(APP_NAME)
        except Exception:  # noqa: BLE001 - Serve may already be down (the cluster went away)
            pass
        if started:
            try:
                serve.shutdown()
            finally:
                shutdown_ray()
        if main:
            signal.signal(signal.SIGTERM, old)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt()
