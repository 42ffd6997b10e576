"""JSON schemas of every stage's structured output, and the one place where model output is parsed.

vLLM constrains decoding to these schemas (``StructuredOutputsParams(json=...)``), so a well-behaved engine always
returns parseable JSON. Output can still be cut by ``max_tokens``, and xgrammar was seen to let a raw control
character into a string (../shared/RUNTIME.md), so every string is bounded (``maxLength``) and
:func:`parse_output` re-validates and never raises: it returns ``(value, None)`` or ``(None, error)``.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from rms_ray.common.config import TextLimits

_TEXT = {"type": "string", "minLength": 1}


def _obj(**props: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _text(max_len: int) -> dict[str, Any]:
    return {**_TEXT, "maxLength": max_len}


def stage_schemas(limits: TextLimits, min_hazards: int, max_hazards: int) -> dict[str, dict[str, Any]]:
    """The JSON schema of each stage's output, keyed by prompt name (see :mod:`rms_ray.construct.prompts`).

    Scene analysis lists ``min_hazards..max_hazards`` hazards; verdicts are enums (``safe``/``unsafe``, or
    ``risky``/``not_risky`` for the pair); every string is bounded by ``limits`` (characters). A naive response is
    verified with ``verify_response`` (it must come back ``unsafe``), so it has no verification schema of its own.
    """
    hazard = _obj(hazard=_text(limits.hazard), why_here=_text(limits.why_here))
    safety = _obj(verdict={"type": "string", "enum": ["safe", "unsafe"]}, reason=_text(limits.reason))
    return {
        "scene_analysis": _obj(
            description=_text(limits.description),
            setting=_text(limits.setting),
            entities={"type": "array", "items": _text(limits.entity), "minItems": 1, "maxItems": 8},
            hazards={"type": "array", "items": hazard, "minItems": min_hazards, "maxItems": max_hazards},
        ),
        "query_synthesis": _obj(query=_text(limits.query)),
        "guidance_response": _obj(response=_text(limits.response)),
        "verify_query_alone": safety,
        "verify_image_alone": safety,
        "verify_pair": _obj(verdict={"type": "string", "enum": ["risky", "not_risky"]}, reason=_text(limits.reason)),
        "verify_response": safety,
        "contrast_query": _obj(query=_text(limits.contrast_query)),
        "verify_contrast": safety,
        "naive_response": _obj(response=_text(limits.naive_response)),
    }


def _strip_controls(text: str) -> str:
    # Raw control characters are invalid JSON; \t \n \r stay (accepted inside strings by strict=False below).
    return "".join(ch for ch in text if ch >= " " or ch in "\t\n\r")


def _strip_strings(value: Any) -> Any:
    # Validate what we store: a string of blanks must fail minLength, not pass as "   ".
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return [_strip_strings(v) for v in value]
    if isinstance(value, dict):
        return {k: _strip_strings(v) for k, v in value.items()}
    return value


def parse_output(text: str, schema: dict[str, Any]) -> tuple[Any | None, str | None]:
    """Parse ``text`` as one JSON value and validate it against ``schema``.

    Returns:
        ``(value, None)`` on success, ``(None, reason)`` otherwise (reason: ``"invalid_json: ..."`` or
        ``"schema_mismatch: ..."``). Never raises.
    """
    try:
        value = json.loads(_strip_controls(text), strict=False)
    except (ValueError, TypeError, RecursionError) as e:  # ValueError covers JSONDecodeError and int-digit limits
        return None, f"invalid_json: {e}"
    value = _strip_strings(value)
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path) or "<root>"
        return None, f"schema_mismatch at {path}: {e.message[:200]}"
    return value, None
