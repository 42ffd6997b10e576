"""rms_ray.common.config: the shipped profiles validate; bad configs fail with messages that name the key path."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pydantic
import pytest
import yaml

from rms_ray.common.config import CONFIG_DIR, ConfigError, ConstructConfig, load_config, resolve_config_path

PROFILES = sorted(CONFIG_DIR.glob("*.yaml"))


def _write(tmp_path: Path, data: object, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def test_profiles_are_shipped():
    assert {p.stem for p in PROFILES} >= {"cpu-tiny", "gpu-qwen2.5-vl-7b"}


CONSTRUCT_PROFILES = [p for p in PROFILES if not p.stem.startswith(("judge-", "serve-"))]  # serve-*: test_serve*
JUDGE_PROFILES = [p for p in PROFILES if p.stem.startswith("judge-")]


@pytest.mark.parametrize("path", JUDGE_PROFILES, ids=[p.stem for p in JUDGE_PROFILES])
def test_every_shipped_judge_profile_validates(path: Path):
    from rms_ray.judge.config import JudgeConfig, load_judge_config

    cfg = load_judge_config(path.stem)
    assert isinstance(cfg, JudgeConfig) and cfg.profile == path.stem
    assert cfg == load_judge_config(path) and cfg.judge.top_logprobs <= 20
    with pytest.raises(ConfigError, match="judge.top_logprobs"):
        load_judge_config(path.stem, {"judge.top_logprobs": 50})


def test_judge_and_construct_profiles_are_both_shipped():
    assert {p.stem for p in JUDGE_PROFILES} >= {"judge-cpu-tiny", "judge-gpu-qwen2.5-vl-7b"}


@pytest.mark.parametrize("path", CONSTRUCT_PROFILES, ids=[p.stem for p in CONSTRUCT_PROFILES])
def test_every_shipped_profile_validates(path: Path):
    by_name = load_config(path.stem)
    by_path = load_config(path)
    assert isinstance(by_name, ConstructConfig)
    assert by_name.profile == path.stem  # the manifest records the profile name: it must match the file
    assert by_name == by_path and by_name.config_hash() == by_path.config_hash()
    g = by_name.generation
    assert g.max_hazards >= g.queries_per_image


def test_cpu_tiny_values_and_defaults():
    cfg = load_config("cpu-tiny")
    assert cfg.model.source == "builtin:tiny"
    assert cfg.model.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"}
    assert (cfg.resources.num_cpus_per_engine, cfg.resources.decode_num_cpus, cfg.resources.ray_num_cpus) == (1.0, 0.25, 2)
    assert (cfg.generation.queries_per_image, cfg.generation.max_hazards, cfg.generation.max_rounds) == (2, 3, 4)
    assert cfg.generation.max_tokens.query == 48
    assert cfg.generation.text_limits.response == 200
    assert cfg.taxonomy.max_categories == 8
    # keys the file does not set take the model defaults
    assert cfg.images.jpeg_quality == 90
    assert cfg.images.encode_format == "JPEG"
    assert cfg.resources.tensor_parallel_size == 1
    assert cfg.generation.top_p == 1.0


def test_resolve_config_path(tmp_path):
    assert resolve_config_path("cpu-tiny") == CONFIG_DIR / "cpu-tiny.yaml"
    f = _write(tmp_path, {"profile": "x"})
    assert resolve_config_path(f) == f
    assert resolve_config_path(str(f)) == f


def test_unknown_profile_lists_known_profiles():
    with pytest.raises(ConfigError) as ei:
        load_config("no-such-profile")
    msg = str(ei.value)
    known = ", ".join(p.stem for p in PROFILES)
    assert msg == f"config no-such-profile not found (not a file; known profiles: {known})"
    assert "cpu-tiny" in msg and "gpu-qwen2.5-vl-7b" in msg


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


def test_unknown_top_level_key(tmp_path):
    p = _write(tmp_path, {"profile": "x", "foo": 1})
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = str(ei.value).splitlines()
    assert lines[0] == f"invalid config {p}:"
    assert lines[1:] == ["  - foo: unknown key (not allowed here)"]


def test_unknown_nested_key(tmp_path):
    p = _write(tmp_path, {"profile": "x", "generation": {"foo": 1, "max_tokens": {"scnee": 100}}})
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = str(ei.value).splitlines()[1:]
    assert sorted(lines) == sorted([
        "  - generation.foo: unknown key (not allowed here)",
        "  - generation.max_tokens.scnee: unknown key (not allowed here)",
    ])


def test_unknown_key_via_override_names_the_override_not_the_file():
    with pytest.raises(ConfigError) as ei:
        load_config("cpu-tiny", {"generation.foo": 1})
    assert str(ei.value).splitlines() == [
        f"invalid override for config {CONFIG_DIR / 'cpu-tiny.yaml'} (the file itself is valid):",
        "  - override generation.foo=1: unknown key generation.foo",
    ]
    with pytest.raises(ConfigError) as ei:  # the caller says how the user gave it (the CLI: --set KEY=VALUE)
        load_config("cpu-tiny", {"generation.max_roundz": 2}, origins={"generation.max_roundz": "--set x=2"})
    assert str(ei.value).splitlines()[1] == "  - --set x=2: unknown key generation.max_roundz"


def test_errors_in_the_file_still_name_the_file(tmp_path):
    p = _write(tmp_path, {"profile": "x", "generation": {"foo": 1}})
    with pytest.raises(ConfigError) as ei:
        load_config(p, {"generation.max_rounds": 0})
    assert str(ei.value).splitlines() == [
        f"invalid config {p}:",
        "  - override generation.max_rounds=0: generation.max_rounds: Input should be greater than or equal to 1 "
        "(got 0)",
        "  - generation.foo: unknown key (not allowed here)",
    ]


def test_every_problem_is_listed(tmp_path):
    p = _write(tmp_path, {"profile": "x", "images": {"jpeg_quality": 96, "max_side": 8}, "model": {"dtype": "int8"}})
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    lines = str(ei.value).splitlines()
    assert len(lines) == 4
    body = "\n".join(lines[1:])
    assert "  - images.jpeg_quality: Input should be less than or equal to 95 (got 96)" in body
    assert "  - images.max_side: Input should be greater than or equal to 32 (got 8)" in body
    assert "  - model.dtype: " in body and "(got 'int8')" in body


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("resources.batch_size", "many", "resources.batch_size: Input should be a valid integer"),
        ("resources.batch_size", 0, "resources.batch_size: Input should be greater than or equal to 1 (got 0)"),
        ("generation.max_rounds", 11, "generation.max_rounds: Input should be less than or equal to 10 (got 11)"),
        ("generation.top_p", 0, "generation.top_p: Input should be greater than 0 (got 0)"),
        ("generation.max_tokens.scene", 8, "generation.max_tokens.scene: Input should be greater than or equal to 16 (got 8)"),
        ("images.animated", "loop", "images.animated: Input should be 'first_frame' or 'quarantine' (got 'loop')"),
        ("taxonomy.unmapped_threshold", 1.5, "taxonomy.unmapped_threshold: Input should be less than or equal to 1 (got 1.5)"),
        ("output.rows_per_file", 0, "output.rows_per_file: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_bad_value_names_path_and_value(key, value, fragment):
    with pytest.raises(ConfigError) as ei:
        load_config("cpu-tiny", {key: value})
    assert fragment in str(ei.value)
    assert repr(value) in str(ei.value)


def test_max_hazards_below_queries_per_image_rejected():
    with pytest.raises(ConfigError) as ei:
        load_config("cpu-tiny", {"generation.max_hazards": 1})
    msg = str(ei.value)
    assert "  - override generation.max_hazards=1: generation: Value error, max_hazards (1) must be >= " \
           "queries_per_image (2)" in msg
    # equal is fine
    cfg = load_config("cpu-tiny", {"generation.max_hazards": 2})
    assert cfg.generation.max_hazards == cfg.generation.queries_per_image == 2


def test_tensor_parallel_needs_gpus():
    with pytest.raises(ConfigError) as ei:
        load_config("cpu-tiny", {"resources.tensor_parallel_size": 2, "resources.num_gpus_per_engine": 1})
    assert ("  - override resources.tensor_parallel_size=2, override resources.num_gpus_per_engine=1: resources: "
            "Value error, tensor_parallel_size=2 needs num_gpus_per_engine >= 2, got 1.0") in str(ei.value)
    cfg = load_config("cpu-tiny", {"resources.tensor_parallel_size": 2, "resources.num_gpus_per_engine": 2})
    assert cfg.resources.tensor_parallel_size == 2


def test_dotted_overrides_apply():
    cfg = load_config("cpu-tiny", {
        "generation.max_rounds": 5,
        "generation.max_tokens.scene": 300,
        "model.env.EXTRA": "1",
        "taxonomy.embedder": "/models/e5",
        "profile": "renamed",
    })
    assert cfg.generation.max_rounds == 5
    assert cfg.generation.max_tokens.scene == 300
    assert cfg.generation.max_tokens.query == 48  # siblings from the file are kept
    assert cfg.model.env == {"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1", "EXTRA": "1"}
    assert cfg.taxonomy.embedder == "/models/e5"
    assert cfg.profile == "renamed"
    # a section absent from the file is created by an override
    cfg2 = load_config("cpu-tiny", {"output.embed_images": False})
    assert cfg2.output.embed_images is False and cfg2.output.rows_per_file == 5000


def test_override_through_a_non_mapping():
    with pytest.raises(ConfigError, match=r"^override profile\.x=1: profile is not a mapping in .*cpu-tiny\.yaml$"):
        load_config("cpu-tiny", {"profile.x": 1})


def test_config_hash_stable_and_sensitive(tmp_path):
    a, b = load_config("cpu-tiny"), load_config("cpu-tiny")
    assert re.fullmatch(r"[0-9a-f]{16}", a.config_hash())
    assert a.config_hash() == b.config_hash()
    changed = load_config("cpu-tiny", {"generation.seed": 1})
    assert changed.config_hash() != a.config_hash()
    assert load_config("cpu-tiny", {"model.env.OMP_NUM_THREADS": "2"}).config_hash() != a.config_hash()
    # resources and the profile label do not shape rows: a resume may change them
    assert load_config("cpu-tiny", {"resources.batch_size": 3, "resources.engine_replicas": 2,
                                    "profile": "renamed"}).config_hash() == a.config_hash()
    # same content, different key order, comments and file: same hash (canonical JSON)
    data = yaml.safe_load((CONFIG_DIR / "cpu-tiny.yaml").read_text())
    reordered = dict(reversed(list(data.items())))
    p = tmp_path / "copy.yaml"
    p.write_text("# a comment\n" + yaml.safe_dump(reordered, sort_keys=False))
    assert load_config(p).config_hash() == a.config_hash()
    # the profile copied under another file name with one default spelled out explicitly: still the same config
    assert load_config(p, {"images.jpeg_quality": 90}).config_hash() == a.config_hash()


def test_config_is_frozen():
    cfg = load_config("cpu-tiny")
    with pytest.raises(pydantic.ValidationError):
        cfg.generation.max_rounds = 9  # type: ignore[misc]


def test_non_mapping_yaml(tmp_path):
    p = _write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value) == f"config {p} must be a mapping at the top level, got list"
    p2 = _write(tmp_path, "just a string\n", "s.yaml")
    with pytest.raises(ConfigError, match="must be a mapping at the top level, got str"):
        load_config(p2)


def test_invalid_yaml(tmp_path):
    p = _write(tmp_path, "profile: x\ngeneration: [1, 2\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(ei.value).startswith(f"config {p} is not valid YAML: ")


def test_empty_yaml_is_all_defaults_with_profile_custom(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    assert cfg.profile == "custom" and cfg.model.source == "builtin:tiny"


def test_minimal_config_is_all_defaults(tmp_path):
    p = _write(tmp_path, {"profile": "minimal"})
    cfg = load_config(p)
    assert cfg == ConstructConfig(profile="minimal")
    assert cfg.model.source == "builtin:tiny"
    assert cfg.generation.queries_per_image == 2 and cfg.generation.max_hazards == 5


def test_profile_copied_elsewhere_loads_by_path(tmp_path):
    dst = tmp_path / "mine.yaml"
    shutil.copy(CONFIG_DIR / "gpu-qwen2.5-vl-7b.yaml", dst)
    cfg = load_config(dst)
    assert cfg.model.engine_kwargs == {"gpu_memory_utilization": 0.9, "mm_processor_kwargs": {"max_pixels": 1003520}}
    assert cfg.resources.num_gpus_per_engine == 1.0 and cfg.resources.engine_replicas == 4


def test_duplicate_yaml_keys_are_refused(tmp_path):
    p = tmp_path / "dup.yaml"
    p.write_text("profile: x\ngeneration:\n  max_rounds: 2\n  max_rounds: 3\n")
    with pytest.raises(ConfigError, match="duplicate key.*max_rounds"):
        load_config(p)


def test_override_keys_tolerate_spaces_and_profile_defaults():
    assert load_config("cpu-tiny", {" generation.max_rounds ": 2}).generation.max_rounds == 2
    from rms_ray.common.config import ConstructConfig

    assert ConstructConfig().profile == "custom"


def test_contrast_is_on_by_default_and_part_of_the_hash():
    from rms_ray.common.config import ConstructConfig, ContrastConfig

    assert ConstructConfig().generation.contrast == ContrastConfig(query=True, naive_response=True)
    on = load_config("cpu-tiny")
    assert on.generation.contrast.query and on.generation.contrast.naive_response
    off = load_config("cpu-tiny", {"generation.contrast": False})  # the one-word switch sets both parts
    assert off.generation.contrast == ContrastConfig(query=False, naive_response=False)
    assert load_config("cpu-tiny", {"generation.contrast": True}).config_hash() == on.config_hash()
    half = load_config("cpu-tiny", {"generation.contrast.naive_response": False})
    assert half.generation.contrast == ContrastConfig(query=True, naive_response=False)
    assert len({on.config_hash(), off.config_hash(), half.config_hash()}) == 3
    with pytest.raises(ConfigError, match=r"override generation\.contrast\.nope=true: unknown key generation\.contrast\.nope"):
        load_config("cpu-tiny", {"generation.contrast.nope": True})


@pytest.mark.parametrize(("override", "line"), [
    ({"images.jpeg_quality": 98},
     "  - override images.jpeg_quality=98: images.jpeg_quality: Input should be less than or equal to 95 (got 98)"),
    ({"images.min_side": 1000}, "  - override images.min_side=1000: images: Value error, min_side (1000) > max_side (512)"),
])
def test_image_values_the_decoder_refuses_fail_at_load(override, line):
    with pytest.raises(ConfigError) as ei:
        load_config("cpu-tiny", override)
    assert line in str(ei.value).splitlines()


@pytest.mark.parametrize("override", [
    {"images.jpeg_quality": 30}, {"images.jpeg_quality": 95}, {"images.min_side": 512},
    {"images.min_side": 1, "images.max_side": 32, "images.max_pixels": 1024, "images.encode_format": "PNG"},
])
def test_every_image_setting_the_config_accepts_is_one_the_decoder_accepts(override):
    from rms_ray.data.images import ImagePolicy
    from rms_ray.judge.scorer import image_policy as judge_policy

    cfg = load_config("cpu-tiny", override)
    policy = cfg.images.policy()
    assert isinstance(policy, ImagePolicy) and policy.jpeg_quality == cfg.images.jpeg_quality
    assert policy.min_side == cfg.images.min_side and policy.max_side == cfg.images.max_side
    from rms_ray.judge.config import load_judge_config

    assert judge_policy(load_judge_config("judge-cpu-tiny", override)).encode_format == "PNG"
