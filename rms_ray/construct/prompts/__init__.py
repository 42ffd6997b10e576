"""Versioned prompt templates: the one place where a prompt is defined.

Each stage's prompt is a YAML file in ``rms_ray/construct/prompts/`` (``version``, ``needs_image``, ``user`` template) that
shares one system preamble (``_system.yaml``). A template's recorded version is ``<name>@v<version>+<sha8>``,
where sha8 hashes the system text and the template: any edit changes what the manifest records, even if the
author forgets to bump ``version``.

Injection safety: everything that did not come from the config (model-generated scene text, queries, responses,
failure reasons) is substituted only inside ``<data>...</data>`` blocks, JSON-encoded, with ``<`` and ``>``
escaped so it cannot close the block. Text inside an image never reaches a template at all; it is pixels.
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

import yaml

STAGES = (
    "scene_analysis",
    "query_synthesis",
    "guidance_response",
    "verify_query_alone",
    "verify_image_alone",
    "verify_pair",
    "verify_response",
    # the safe side (GenerationConfig.contrast): recorded whether or not a run uses them, so the
    # prompt_versions struct of a row never depends on the config
    "contrast_query",
    "verify_contrast",
    "naive_response",
)


def data_literal(value: Any) -> str:
    """Encode untrusted ``value`` for a ``<data>`` block: JSON, with ``<``/``>`` escaped as ``\\u003c``/``\\u003e``."""
    return json.dumps(value, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


@dataclass(frozen=True)
class PromptTemplate:
    """One stage's prompt. ``render`` returns (system, user) strings; ``version_id`` is what manifests record."""

    name: str
    version: int
    needs_image: bool
    system: str
    user: string.Template
    version_id: str

    def render(self, *, trusted: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> tuple[str, str]:
        """Fill the template.

        Args:
            trusted: values from the config (numbers, fixed phrases), substituted as they are.
            data: untrusted values, substituted through :func:`data_literal` (only inside ``<data>`` blocks).
        Raises:
            KeyError: a placeholder of the template was given no value.
        """
        values = {k: str(v) for k, v in (trusted or {}).items()}
        values.update({k: data_literal(v) for k, v in (data or {}).items()})
        return self.system, self.user.substitute(values).strip()


def feedback_block(reasons: list[str]) -> str:
    """Instruction text that feeds earlier verification failures back into a regeneration prompt (self-adaptive
    loop). The reasons are model output, so they go inside a ``<data>`` block. Empty list -> empty string."""
    if not reasons:
        return ""
    return (
        "An earlier attempt failed verification for these reasons:\n"
        f"<data>{data_literal(reasons)}</data>\n"
        "Write a new attempt that fixes every one of them."
    )


def _read(name: str) -> dict[str, Any]:
    return yaml.safe_load(resources.files("rms_ray.construct.prompts").joinpath(f"{name}.yaml").read_text())


@lru_cache(maxsize=None)
def load_prompt(name: str) -> PromptTemplate:
    """Load stage ``name`` (one of :data:`STAGES`).

    Raises:
        ValueError: unknown stage name.
    """
    if name not in STAGES:
        raise ValueError(f"unknown prompt {name!r}; known: {', '.join(STAGES)}")
    system = _read("_system")
    spec = _read(name)
    digest = hashlib.sha256((system["text"] + "\x00" + spec["user"]).encode()).hexdigest()[:8]
    return PromptTemplate(
        name=name,
        version=int(spec["version"]),
        needs_image=bool(spec["needs_image"]),
        system=system["text"].strip(),
        user=string.Template(spec["user"]),
        version_id=f"{name}@v{spec['version']}+{digest}",
    )


def prompt_versions() -> dict[str, str]:
    """``{stage: version_id}`` for every stage, as recorded in rows and manifests."""
    return {name: load_prompt(name).version_id for name in STAGES}
