"""The one place that turns a profile's ``model.dtype`` into the dtype vLLM is given, on the machine the engine
runs on.

Why: on a CPU without native bf16 matmuls (no AVX-512 BF16, no AMX) vLLM's CPU backend falls back from oneDNN to
plain torch matmuls for bfloat16. Measured on a 2-core AVX2 machine: the tiny model ~20% slower in bf16 than in
float32, the 100M-parameter model's engine over 25 minutes instead of under 4. So ``dtype: auto`` (the CPU
profiles' default) means: bfloat16 where ``/proc/cpuinfo`` lists ``avx512_bf16`` or ``amx_bf16``, float32 elsewhere,
and on GPUs vLLM's own ``auto`` (the dtype in the model's config).

vLLM's ``dtype="auto"`` means "the model config's dtype"; ours is resolved before vLLM sees it. The config (and its
``config_hash``) keeps ``auto`` as written; what was chosen, and why, is recorded beside it (the construction
manifest's and evaluate's ``metrics.json``'s ``engine`` entry).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

#: CPU flags (as spelled in /proc/cpuinfo) under which vLLM's CPU backend runs bfloat16 natively (oneDNN).
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype an engine was created with: ``dtype`` (what vLLM got), ``requested`` (the config's value) and
    ``reason`` (one line a person can check)."""

    dtype: str
    requested: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        """``{"dtype", "requested", "reason"}`` for manifests and metrics files."""
        return asdict(self)


def dtype_from_cpu_flags(flags: str) -> tuple[str, str]:
    """Pure choice for ``dtype: auto`` on a CPU: ``(dtype, reason)`` from a whitespace-separated flags string (the
    ``flags`` line of ``/proc/cpuinfo``). bfloat16 when one of :data:`BF16_CPU_FLAGS` is present, else float32."""
    present = set(flags.split())
    found = [f for f in BF16_CPU_FLAGS if f in present]
    if found:
        return "bfloat16", f"cpu flags: {', '.join(found)}"
    return "float32", f"cpu flags: no {' / '.join(BF16_CPU_FLAGS)} (bf16 would fall back to plain torch matmuls)"


def read_cpu_flags(path: Path = CPUINFO) -> str | None:
    """The first ``flags`` line of ``/proc/cpuinfo`` (x86 Linux), or None where there is none (other OS/arch)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "flags":
                    return value.strip()
    except OSError:
        return None
    return None


def resolve_dtype(requested: str, num_gpus: float, cpuinfo: Path = CPUINFO) -> DtypeChoice:
    """The dtype to give ``vllm.LLM`` for a config's ``model.dtype`` on this machine (call it where the engine runs).

    Args:
        requested: the config's ``model.dtype`` (``auto``, ``bfloat16``, ``float16``, ``float32``).
        num_gpus: GPUs per engine (0: CPU engine).
        cpuinfo: where the CPU flags are read (tests pass a file).
    Returns:
        A :class:`DtypeChoice`. An explicit dtype is passed through; ``auto`` on GPU stays vLLM's ``auto``; ``auto``
        on CPU is decided by :func:`dtype_from_cpu_flags` (float32 where no flags can be read).
    """
    if requested != "auto":
        return DtypeChoice(requested, requested, "set in the config")
    if num_gpus > 0:
        return DtypeChoice("auto", requested, "gpu: vLLM's auto (the model config's dtype)")
    flags = read_cpu_flags(cpuinfo)
    if flags is None:
        return DtypeChoice("float32", requested, f"cpu flags unreadable ({cpuinfo}): float32 is safe everywhere")
    dtype, reason = dtype_from_cpu_flags(flags)
    return DtypeChoice(dtype, requested, reason)


def summarize_choices(choices: list[dict[str, str]], requested: str) -> dict[str, object]:
    """The ``engine`` entry of a manifest / metrics file from the choices the engines of one run reported.

    One distinct choice (the usual case): that choice. Several (engines on machines with different CPUs): ``dtype``
    ``"mixed"`` and every distinct choice under ``choices``. None (no engine started, e.g. a resumed run with
    nothing left to do): ``dtype`` None and a reason saying so.
    """
    distinct = [dict(c) for c in {tuple(sorted(c.items())): c for c in choices}.values()]
    if len(distinct) == 1:
        return distinct[0]
    if not distinct:
        return {"dtype": None, "requested": requested, "reason": "no engine started in this run"}
    return {"dtype": "mixed", "requested": requested, "reason": "engines resolved dtype differently",
            "choices": sorted(distinct, key=lambda c: (c.get("dtype") or "", c.get("reason") or ""))}
