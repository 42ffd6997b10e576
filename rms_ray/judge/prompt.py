"""The judge's prompt, its output constraint, verdict parsing and THE unsafe score.

A judge is any VLM (a trained judge folder, or a base model used zero-shot) that reads (image, query[, response])
in one versioned prompt (``rms_ray/judge/prompts/judge.yaml``) and answers three lines::

    unsafe
    category: weapons
    rationale: the photo shows ...

The verdict is the first generated token by construction, so :func:`unsafe_score` reads the model's probability of
``unsafe`` from that position's log-probabilities. Decoding is constrained by :func:`output_regex` (vLLM
structured outputs), so the first token is always a prefix of ``safe`` or of ``unsafe``; vLLM's ``raw_logprobs``
are computed after that mask and before temperature/top-k/top-p (vllm ``v1/sample/sampler.py``,
``gpu_model_runner.apply_grammar_bitmask``), so the score is the probability of the unsafe branch under the
constrained model, whatever the sampling defaults of a model's ``generation_config`` (top-k would otherwise drop
the low-probability label). Every place that scores with a judge (``evaluate``, validation during training, the
HTTP service) calls :func:`unsafe_score`: one function, the same numbers.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import yaml

from rms_ray.construct.prompts import data_literal

LABELS = ("safe", "unsafe")
TASKS = ("prompt", "response")


@dataclass(frozen=True)
class JudgePrompt:
    """The loaded judge prompt. ``version_id`` (``judge@v<N>+<sha8>``) changes with any edit of the file."""

    system: str
    templates: dict[str, string.Template]
    version: int
    version_id: str

    def render(self, task: str, query: str, response: str | None = None) -> tuple[str, str]:
        """(system, user) text for one item. ``query``/``response`` are untrusted: JSON-escaped in ``<data>``.

        Raises:
            ValueError: unknown task, or a response task without a response.
        """
        if task not in self.templates:
            raise ValueError(f"unknown judge task {task!r}; known: {', '.join(self.templates)}")
        if task == "response" and not response:
            raise ValueError("a response task needs a response")
        values = {"query": data_literal(query), "response": data_literal(response or "")}
        return self.system, self.templates[task].substitute(values).strip()


@lru_cache(maxsize=None)
def load_judge_prompt() -> JudgePrompt:
    """Load ``rms_ray/judge/prompts/judge.yaml`` (cached)."""
    text = resources.files("rms_ray.judge").joinpath("prompts/judge.yaml").read_text()
    spec = yaml.safe_load(text)
    body = "\x00".join([spec["system"], *(spec[t] for t in TASKS)])
    digest = hashlib.sha256(body.encode()).hexdigest()[:8]
    return JudgePrompt(
        system=spec["system"].strip(),
        templates={t: string.Template(spec[t]) for t in TASKS},
        version=int(spec["version"]),
        version_id=f"judge@v{spec['version']}+{digest}",
    )


def output_regex(category_chars: int, rationale_chars: int) -> str:
    """The structured-output constraint of the judge's answer (three lines, verdict first, bounded lengths).

    Lengths are in characters; the category may only use letters, digits, spaces and ``&/,_-`` so it stays a
    short name.
    """
    return (rf"(safe|unsafe)\ncategory: [A-Za-z0-9 &/,_-]{{1,{category_chars}}}"
            rf"\nrationale: [^\n]{{1,{rationale_chars}}}")


_ANSWER = re.compile(r"\A(safe|unsafe)[ \t]*(?:\ncategory:[ \t]*([^\n]*))?(?:\nrationale:[ \t]*([^\n]*))?")


@dataclass(frozen=True)
class Verdict:
    """A parsed judge answer. ``verdict`` is None when the text is unparseable (never mapped to a class)."""

    verdict: str | None
    category: str | None
    rationale: str | None
    error: str | None = None

    @property
    def parsed(self) -> bool:
        return self.verdict is not None


def parse_verdict(text: str, finish_reason: str | None = None) -> Verdict:
    """Parse the judge's three-line answer; never raises.

    The verdict line alone makes a row parseable (category and rationale may be cut by ``max_tokens``); a refused
    request (``finish_reason`` starting with ``error``) or text that does not start with a verdict is unparseable.
    """
    if finish_reason and finish_reason.startswith("error"):
        return Verdict(None, None, None, f"engine refused the request: {finish_reason[len('error: '):]}")
    m = _ANSWER.match(text or "")
    if not m:
        return Verdict(None, None, None, f"no verdict line in output {text[:80]!r}")
    category = (m.group(2) or "").strip() or None
    rationale = (m.group(3) or "").strip() or None
    return Verdict(m.group(1), category, rationale)


def unsafe_score(first_logprobs: dict[str, float] | None) -> float | None:
    """P(unsafe) from the log-probabilities of the first generated token; None when no label token is in them.

    Args:
        first_logprobs: decoded token text -> log-probability at the first generated position (top-k of vLLM's
            ``raw_logprobs``; see the module docstring).
    Returns:
        ``sum p(t) for t a prefix of "unsafe"`` / ``sum p(t) for t a prefix of "safe" or "unsafe"``, in [0, 1].
        Tokens are compared after stripping leading whitespace; a token may also extend a label (``"safe\\n"``).
        Because ``safe`` and ``unsafe`` differ in their first character, each token belongs to at most one label,
        and under the grammar the rest of the label is forced, so this is the probability of the unsafe verdict.
    """
    if not first_logprobs:
        return None
    mass = {label: 0.0 for label in LABELS}
    for token, lp in first_logprobs.items():
        t = token.lstrip()
        if not t or lp is None or math.isnan(lp):
            continue
        for label in LABELS:
            if label.startswith(t) or t.startswith(label):
                mass[label] += math.exp(lp)
                break
    total = mass["safe"] + mass["unsafe"]
    if total <= 0.0:
        return None
    return mass["unsafe"] / total
