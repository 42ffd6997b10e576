"""Why an engine could not start, in one line a user can act on.

vLLM refuses a configuration deep inside its start-up: a pydantic validation error of its own config (e.g.
``max_model_len`` above what the model allows), a ``TypeError`` for an ``engine_kwargs`` key it does not know, a
``RuntimeError`` when the KV cache does not fit. Through Ray that arrives as a traceback of hundreds of lines.
:class:`EngineStartError` carries one line, ``engine failed to start: <vLLM's reason> (model X, max_model_len Y)``;
the original exception stays attached as ``__cause__``, so the full traceback still reaches the run's log file
(see :mod:`rms_ray.common.failures`, which finds this line again on the driver side of Ray).
"""

from __future__ import annotations

from typing import Any

#: Every :class:`EngineStartError` message starts with this; the driver looks for it in Ray's error text.
ENGINE_START_PREFIX = "engine failed to start: "
_MAX_REASON = 320  # characters of vLLM's reason kept in the one-line message (cut at a sentence end if one fits)


class EngineStartError(RuntimeError):
    """vLLM could not start an engine. The message is one line (see :func:`engine_start_message`); the exception
    vLLM raised is ``__cause__``. A plain ``RuntimeError`` subclass with one string argument, so it pickles across
    Ray processes unchanged."""


def _one_reason(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):  # pydantic ValidationError (vLLM's config classes): the messages, not the input dump
        try:
            msgs = [str(e.get("msg", "")) for e in errors()]
            text = "; ".join(m.removeprefix("Value error, ").removeprefix("Assertion failed, ") for m in msgs if m)
            if text:
                return text
        except Exception:  # noqa: BLE001 - fall back to the plain text below
            pass
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def engine_failure_reason(exc: BaseException) -> str:
    """vLLM's reason for ``exc`` in one line: the exception's own message and, when it was raised from another
    (vLLM wraps some failures, e.g. "Engine core initialization failed. See root cause above"), the innermost
    cause's; whitespace collapsed, at most ~320 characters (cut after a sentence where possible)."""
    text = _one_reason(exc)
    inner, seen = exc, {id(exc)}
    while (inner.__cause__ or inner.__context__) is not None and id(inner.__cause__ or inner.__context__) not in seen:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
        seen.add(id(inner))
    if inner is not exc:
        text += f" (caused by {_one_reason(inner)})"
    text = " ".join(text.split())
    if len(text) <= _MAX_REASON:
        return text
    end = text.rfind(". ", 0, _MAX_REASON)  # vLLM's first sentences say what is wrong; the rest is advice
    return text[: end + 1] if end > _MAX_REASON // 3 else text[: _MAX_REASON - 3] + "..."


def engine_start_message(exc: BaseException, model_cfg: Any) -> str:
    """``engine failed to start: <reason> (model X, max_model_len Y[, engine_kwargs {...}])``: the settings that
    most often make vLLM refuse to start, next to its reason."""
    where = f"model {model_cfg.source}, max_model_len {model_cfg.max_model_len}"
    if getattr(model_cfg, "engine_kwargs", None):
        where += f", engine_kwargs {dict(model_cfg.engine_kwargs)}"
    return f"{ENGINE_START_PREFIX}{engine_failure_reason(exc)} ({where})"
