"""rms_ray.engine.dtype: ``dtype: auto`` picks bf16 only where the CPU runs it natively (no engine needed here; the
real runs' recorded choice is checked in test_pipeline_e2e and test_judge_evaluate)."""

from __future__ import annotations

import pytest

from rms_ray.common.config import ConstructConfig, load_config
from rms_ray.engine.dtype import DtypeChoice, dtype_from_cpu_flags, read_cpu_flags, resolve_dtype, summarize_choices

AVX2 = "fpu vme de pse tsc msr pae mce cx8 apic sse sse2 ssse3 fma cx16 sse4_1 sse4_2 avx f16c avx2 bmi2"
AVX512 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
SAPPHIRE_RAPIDS = AVX512 + " avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize(("flags", "dtype", "reason"), [
    (AVX2, "float32", "cpu flags: no avx512_bf16 / amx_bf16 (bf16 would fall back to plain torch matmuls)"),
    (AVX512, "float32", "cpu flags: no avx512_bf16 / amx_bf16 (bf16 would fall back to plain torch matmuls)"),
    (AVX512 + " avx512_bf16", "bfloat16", "cpu flags: avx512_bf16"),
    (AVX2 + " amx_bf16 amx_tile", "bfloat16", "cpu flags: amx_bf16"),
    (SAPPHIRE_RAPIDS, "bfloat16", "cpu flags: avx512_bf16, amx_bf16"),
    ("", "float32", "cpu flags: no avx512_bf16 / amx_bf16 (bf16 would fall back to plain torch matmuls)"),
    ("avx512_bf16x xamx_bf16", "float32",  # whole flags only, not substrings
     "cpu flags: no avx512_bf16 / amx_bf16 (bf16 would fall back to plain torch matmuls)"),
], ids=["avx2", "avx512-no-bf16", "avx512_bf16", "amx_bf16", "sapphire-rapids", "empty", "look-alikes"])
def test_auto_on_cpu_is_bf16_only_with_native_bf16_flags(flags, dtype, reason):
    assert dtype_from_cpu_flags(flags) == (dtype, reason)


def test_resolve_reads_the_flags_of_this_machine_and_keeps_explicit_and_gpu_choices(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("".join(f"processor\t: {i}\nvendor_id\t: GenuineIntel\nflags\t\t: {AVX2}\n\n" for i in range(2)))
    assert resolve_dtype("auto", 0, info) == DtypeChoice("float32", "auto", dtype_from_cpu_flags(AVX2)[1])
    info.write_text(f"processor\t: 0\nflags\t\t: {SAPPHIRE_RAPIDS}\nbugs\t\t: spectre_v1\n")
    assert resolve_dtype("auto", 0, info).to_dict() == {
        "dtype": "bfloat16", "requested": "auto", "reason": "cpu flags: avx512_bf16, amx_bf16"}
    # on GPU vLLM's own auto (the model config's dtype); an explicit dtype is never second-guessed
    assert resolve_dtype("auto", 1, info) == DtypeChoice("auto", "auto", "gpu: vLLM's auto (the model config's dtype)")
    assert resolve_dtype("bfloat16", 0, tmp_path / "absent") == DtypeChoice("bfloat16", "bfloat16", "set in the config")
    # no flags to read (another OS or architecture): float32 works everywhere
    choice = resolve_dtype("auto", 0, tmp_path / "absent")
    assert choice.dtype == "float32" and choice.reason.startswith("cpu flags unreadable")
    assert read_cpu_flags(tmp_path / "absent") is None


def test_cpu_profiles_say_auto_and_the_hash_covers_the_config_as_written():
    from rms_ray.judge.config import load_judge_config

    cpu, judge = load_config("cpu-tiny"), load_judge_config("judge-cpu-tiny")
    assert cpu.model.dtype == "auto" and judge.model.dtype == "auto"
    assert load_config("gpu-qwen2.5-vl-7b").model.dtype == "bfloat16"
    assert cpu.model_dump(mode="json")["model"]["dtype"] == "auto"  # what manifests record under "config"
    # the hash is of what was written: `auto` is one config whatever it resolves to on a machine
    assert cpu.config_hash() != load_config("cpu-tiny", {"model.dtype": "bfloat16"}).config_hash()
    assert ConstructConfig().model.dtype == "bfloat16"  # other configs keep the old default (and their hashes)


def test_a_run_records_one_choice_or_says_why_not():
    bf16 = {"dtype": "bfloat16", "requested": "auto", "reason": "cpu flags: avx512_bf16"}
    fp32 = {"dtype": "float32", "requested": "auto", "reason": "cpu flags: no avx512_bf16 / amx_bf16 (...)"}
    assert summarize_choices([bf16, dict(bf16)], "auto") == bf16
    mixed = summarize_choices([bf16, fp32, bf16], "auto")
    assert mixed["dtype"] == "mixed" and mixed["choices"] == [bf16, fp32]
    assert summarize_choices([], "auto") == {"dtype": None, "requested": "auto",
                                             "reason": "no engine started in this run"}
