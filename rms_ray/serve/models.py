"""Request and response bodies of the judge service (pydantic), and turning a validation failure into one 4xx.

``POST /v1/judge`` takes one item ``{"image", "query", "response"?, "task"?, "id"?}`` or ``{"items": [...]}`` and
answers :class:`JudgeResponse` (always a ``results`` list, one per item, in order). ``POST /v1/chat/completions``
and ``GET /v1/models`` follow the OpenAI API shapes (the fields the official client reads).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rms_ray.serve.inputs import InputError


class _In(BaseModel):
    # strict: a number is not a string, a list is not an image; unknown keys are an error (a typo is not ignored)
    model_config = ConfigDict(extra="forbid", strict=True)


class JudgeItemIn(_In):
    """One item to judge. ``image``: a base64 data URL (or an allow-listed URL / absolute path)."""

    image: str
    query: str = Field(min_length=1)
    response: str | None = None
    task: Literal["prompt", "response"] | None = Field(None, description="default: response when a response is "
                                                       "given, else prompt (as in the labelled format)")
    id: str | None = Field(None, max_length=1000, description="echoed back in the result")


class JudgeBatchIn(_In):
    """Several items in one request (at most ``serve.max_items_per_request``)."""

    items: list[JudgeItemIn] = Field(min_length=1)


class JudgeResult(BaseModel):
    """The judge's answer on one item: ``unsafe_score`` is P(unsafe) from the first generated token (the number
    ``rms-ray evaluate`` computes), ``verdict`` the generated label; both null when the answer is unparseable
    (``parsed`` false, ``error`` says why). ``latency_ms``: engine time of this item."""

    id: str | None = None
    task: str
    verdict: str | None
    unsafe_score: float | None
    category: str | None
    rationale: str | None
    parsed: bool
    error: str | None
    latency_ms: float


class JudgeResponse(BaseModel):
    """``POST /v1/judge`` answer: one result per item, the judge's identity and the request's wall time (ms)."""

    results: list[JudgeResult]
    judge: str
    prompt_version: str
    config_hash: str
    latency_ms: float


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat completion request the service honours. Unknown fields are ignored (clients
    send many optional ones); ``stream`` and ``n > 1`` are refused. ``temperature`` defaults to 0 (greedy:
    reproducible evaluations), not OpenAI's 1."""

    model_config = ConfigDict(extra="ignore")
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = None
    n: int = Field(1, ge=1)
    stream: bool = False


def parse_json_body(body: bytes) -> Any:
    """The JSON value of a request body.

    Raises:
        InputError: 400 when the body is not UTF-8 JSON.
    """
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" (line {e.lineno}, column {e.colno})" if isinstance(e, json.JSONDecodeError) else ""
        raise InputError(400, "invalid_json", f"request body is not valid JSON{where}") from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _type_name(value: Any) -> str:
    return {list: "an array", dict: "an object", int: "a number", float: "a number", bool: "a boolean",
            str: "a string", type(None): "null"}.get(type(value), type(value).__name__)


def validate(model: type[BaseModel], value: Any, prefix: str = "") -> Any:
    """``model.model_validate(value)``, or a 422 :class:`InputError` naming the first bad field.

    The message says what was expected and what came (``items[0].image: expected a string, got an array (an image
    is a base64 data URL string, not an array of pixels)``).
    """
    if not isinstance(value, dict):
        raise InputError(422, "invalid_request", f"request body must be a JSON object, got {_type_name(value)}",
                         prefix or None)
    try:
        return model.model_validate(value)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("str", "list[ContentPart]")))
        param = (prefix + "." if prefix else "") + _loc(loc) if loc else (prefix or "body")
        if err["type"] == "missing":
            msg = f"{param}: required field missing"
        elif err["type"] == "extra_forbidden":
            msg = f"{param}: unknown field"
        else:
            msg = f"{param}: {err['msg']} (got {_type_name(err.get('input'))})"
        if loc and loc[-1] in ("image", "url") and isinstance(err.get("input"), list):
            msg += " (an image is a base64 data URL string, not an array of pixels)"
        extra = f"; {len(e.errors()) - 1} more problem(s)" if len(e.errors()) > 1 else ""
        raise InputError(422, "invalid_request", msg + extra, param) from None
