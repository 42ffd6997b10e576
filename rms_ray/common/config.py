"""Typed, validated configuration for a construction run.

One YAML file (see ``configs/``) holds everything a run needs: the model profile, the resources of the engine
actor pool, the image policy, the generation loop and the taxonomy. It is validated once at the edge
(:func:`load_config`) with pydantic; unknown keys and bad values fail with a message that names the key path.
The resolved config and its hash are written into every dataset's ``manifest.json``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

if TYPE_CHECKING:
    from rms_ray.data.images import ImagePolicy

_M = TypeVar("_M", bound=BaseModel)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which VLM runs and how vLLM loads it.

    ``source`` is ``builtin:<preset>`` (a tiny random Qwen2.5-VL built locally by :mod:`rms_ray.testing.tiny_model`;
    presets ``tiny`` and ``bench-100m``), a local folder, or a hub id (on a cluster with hub access or a cache).
    """

    source: str = Field("builtin:tiny", description="builtin:<preset>, a local model folder, or a hub id")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="auto: decided where each engine runs (CPU: bfloat16 with avx512_bf16/amx_bf16 flags, "
        "else float32; GPU: vLLM's auto), see rms_ray.engine.dtype; kept as written in the config and its hash")
    max_model_len: int = Field(2048, ge=256)
    structured_outputs_backend: Literal["xgrammar", "guidance", "outlines"] = "xgrammar"
    max_num_seqs: int | None = Field(None, ge=1, description="vLLM scheduler cap on concurrent sequences")
    engine_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra vllm.LLM(...) keyword arguments")
    env: dict[str, str] = Field(default_factory=dict, description="environment variables set in each engine actor")
    trust_remote_code: bool = False


class ResourcesConfig(_Strict):
    """Ray resources: the engine actor pool and the light CPU stages around it.

    On a 2-core machine every request must be fractional: an actor that asks for 1 CPU each takes a whole core
    and the read tasks then wait forever (see ../shared/RUNTIME.md).
    """

    engine_replicas: int = Field(1, ge=1, description="actor-pool size: number of vLLM engines")
    num_cpus_per_engine: float = Field(1.0, gt=0)
    num_gpus_per_engine: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1, description="images per map_batches call into one engine")
    decode_num_cpus: float = Field(0.25, gt=0, description="CPUs per image-decode task")
    ray_num_cpus: int | None = Field(None, ge=1, description="logical CPUs for a local Ray start (None: detect)")
    batches_in_flight: int = Field(2, ge=1, le=16, description="map_batches calls running at once in one engine "
                                   "actor; their requests share the engine's continuous batching")
    max_engine_restarts: int = Field(1, ge=0, le=10, description="restarts of a dead engine actor (Ray's default "
                                     "is unbounded)")
    max_task_retries: int = Field(1, ge=0, le=10, description="retries of a batch whose engine actor died")
    # An engine actor that dies while starting (its process killed, e.g. by Ray's memory monitor, after its
    # max_engine_restarts; or vLLM refusing to start) is handled by Ray Data, not by Ray's restarts: these bound it.
    max_engine_init_deaths: int = Field(0, ge=0, le=10, description="engine actors that may die in a row while "
                                        "starting, each replaced by a fresh one, before the job fails (Ray Data "
                                        "max_consecutive_actor_init_deaths)")
    engine_init_retries: int = Field(0, ge=0, le=5, description="in-process retries of an engine start that raised "
                                     "(Ray Data actor_init_max_retries); 0: a start vLLM refuses fails at once")

    @model_validator(mode="after")
    def _tp_needs_gpus(self) -> "ResourcesConfig":
        if self.tensor_parallel_size > 1 and self.num_gpus_per_engine < self.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size={self.tensor_parallel_size} needs num_gpus_per_engine >= "
                f"{self.tensor_parallel_size}, got {self.num_gpus_per_engine}"
            )
        return self


class ImagesConfig(_Strict):
    """Image normalisation and quarantine policy (see :mod:`rms_ray.data.images`)."""

    max_side: int = Field(768, ge=32, description="longest side after resize, pixels")
    max_pixels: int = Field(64_000_000, ge=1024, description="declared width*height above this is quarantined")
    min_side: int = Field(32, ge=1)
    animated: Literal["first_frame", "quarantine"] = "first_frame"
    encode_format: Literal["JPEG", "PNG"] = "JPEG"
    jpeg_quality: int = Field(90, ge=30, le=95, description="the decoder's bound: Pillow advises against more than "
                              "95 (much larger files, hardly any gain)")
    # Near duplicates need BOTH a close pHash and close colours (pHash is greyscale); see rms_ray.data.dedup.
    near_duplicates: bool = Field(True, description="detect near duplicates; false: exact (sha256) duplicates only")
    near_duplicate_hamming: int = Field(
        4, ge=0, le=32, description="max pHash Hamming distance (bits of 64) of a near duplicate; 0 = identical "
        "pHash only (colour still compared; not an off switch: use near_duplicates: false)")
    near_duplicate_color_distance: float = Field(
        8.0, ge=0, allow_inf_nan=False, description="max colour distance of a near duplicate: largest CIE76 Delta E "
        "(CIELAB, D65) between the mean colours of corresponding cells of a 4x4 grid; ~2.3 is just noticeable, "
        "JPEG/resize variants measure <= ~6; 0 = identical colour signature")
    extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".mpo")

    @model_validator(mode="after")
    def _policy_accepts(self) -> "ImagesConfig":
        # The decoder's own checks (rms_ray.data.images.ImagePolicy), run here so that a value it refuses fails at
        # load time with the key path, not at run time after the output folder was bound to the config.
        try:
            self.policy()
        except ValueError as e:
            raise ValueError(str(e).replace("ImagePolicy.", "")) from None
        return self

    def policy(self, encode_format: str | None = None) -> "ImagePolicy":
        """The :class:`rms_ray.data.images.ImagePolicy` of these settings (``encode_format`` overrides the config's,
        e.g. PNG for the judge). Raises ValueError for values the policy refuses."""
        from rms_ray.data.images import ImagePolicy

        return ImagePolicy(max_side=self.max_side, max_pixels=self.max_pixels, min_side=self.min_side,
                           animated=self.animated, encode_format=encode_format or self.encode_format,
                           jpeg_quality=self.jpeg_quality)


class MaxTokens(_Strict):
    """Per-stage generation caps, in tokens."""

    scene: int = Field(384, ge=16)
    query: int = Field(128, ge=16)
    response: int = Field(384, ge=16)
    verify: int = Field(128, ge=16)
    contrast_query: int = Field(128, ge=16)
    naive_response: int = Field(384, ge=16)


class TextLimits(_Strict):
    """Upper bounds (characters) on every generated string, enforced in the JSON schema given to the engine.

    They stop runaway generations and bound what one row can hold; size ``max_tokens`` to fit them.
    """

    description: int = Field(400, ge=8)
    setting: int = Field(60, ge=8)
    entity: int = Field(40, ge=4)
    hazard: int = Field(100, ge=8)
    why_here: int = Field(160, ge=8)
    query: int = Field(240, ge=8)
    response: int = Field(900, ge=8)
    reason: int = Field(160, ge=8)
    contrast_query: int = Field(240, ge=8)
    naive_response: int = Field(900, ge=8)


class ContrastConfig(_Strict):
    """The safe side of a dataset (see README "Method and choices"): a judge trained only on risky pairs and
    guidance responses never sees the other label of either task.

    ``query``: per accepted image, a benign query about the same scene, verified safe *with* the image (a
    ``safe`` prompt example). ``naive_response``: per accepted sample, a response that complies without noticing
    the risk, verified unsafe (an ``unsafe`` response example). In the YAML, ``contrast: false`` (or ``true``)
    sets both.
    """

    query: bool = Field(True, description="generate and verify a benign contrast query per accepted image")
    naive_response: bool = Field(True, description="generate and verify an unsafe naive response per accepted sample")


class GenerationConfig(_Strict):
    """The construct-verify-regenerate loop."""

    queries_per_image: int = Field(2, ge=1, le=16, description="candidate (query, response) pairs per image")
    max_hazards: int = Field(5, ge=1, le=16, description="hazards the scene analysis may list")
    max_rounds: int = Field(3, ge=1, le=10, description="generation rounds per candidate, the first included")
    parse_retries: int = Field(1, ge=0, le=5, description="re-asks when output does not parse or fit the schema")
    temperature: float = Field(0.0, ge=0)
    retry_temperature: float = Field(0.7, ge=0, description="sampling temperature of parse retries")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    max_tokens: MaxTokens = MaxTokens()
    text_limits: TextLimits = TextLimits()
    contrast: ContrastConfig = ContrastConfig()

    @model_validator(mode="before")
    @classmethod
    def _contrast_shorthand(cls, data: Any) -> Any:
        # `contrast: false` is the common case (switch the whole safe side off); keep it one word in YAML / --set.
        if isinstance(data, dict) and isinstance(data.get("contrast"), bool):
            flag = data["contrast"]
            data = {**data, "contrast": {"query": flag, "naive_response": flag}}
        return data

    @model_validator(mode="after")
    def _enough_hazards(self) -> "GenerationConfig":
        if self.max_hazards < self.queries_per_image:
            raise ValueError(
                f"max_hazards ({self.max_hazards}) must be >= queries_per_image ({self.queries_per_image})"
            )
        return self


class TaxonomyConfig(_Strict):
    """Emergent risk categories (see :mod:`rms_ray.taxonomy.core`)."""

    embedder: str | None = Field(None, description="None: packaged all-MiniLM-L6-v2; else a path or hub id")
    max_categories: int = Field(20, ge=1)
    unmapped_threshold: float = Field(0.25, ge=-1, le=1)


class OutputConfig(_Strict):
    """How rows are written."""

    rows_per_file: int = Field(5000, ge=1, description="rows per final Parquet file")
    embed_images: bool = Field(True, description="store normalised image bytes in the rows (else path only)")


class ConstructConfig(_Strict):
    """Everything one ``rms-ray construct`` run needs. Load with :func:`load_config`."""

    profile: str = Field("custom", description="name of this profile, recorded in the manifest")
    model: ModelConfig = ModelConfig()
    resources: ResourcesConfig = ResourcesConfig()
    images: ImagesConfig = ImagesConfig()
    generation: GenerationConfig = GenerationConfig()
    taxonomy: TaxonomyConfig = TaxonomyConfig()
    output: OutputConfig = OutputConfig()

    def config_hash(self) -> str:
        """sha256 (hex, 16 chars) of the canonical JSON of everything that shapes the data: all sections but
        ``profile`` (a label) and ``resources`` (how many engines, batch sizes: a resumed run may change them
        without changing a row). Written into every row and manifest; a resume with another hash is refused."""
        return shaping_hash(self)


def shaping_hash(cfg: BaseModel) -> str:
    """sha256 (16 hex) of the canonical JSON of a run config without ``profile`` (a label) and ``resources`` (how
    many engines, batch sizes: they never change an output row). The one definition every config's
    ``config_hash`` uses."""
    content = cfg.model_dump(mode="json", exclude={"profile", "resources"})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one, silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dup:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key(s) {', '.join(dup)}", node.start_mark)
        return super().construct_mapping(node, deep=deep)


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message lists every problem."""


def _override_origin(key: str, value: Any) -> str:
    """How an override is named in messages when the caller did not say (``override KEY=VALUE``)."""
    shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return f"override {key}={shown.removesuffix('...').strip()}"


def _format_errors(err: ValidationError, source: str, origins: dict[str, str] | None = None,
                   file_valid: bool = False) -> str:
    """One line per problem, by key path. A problem inside an overridden key (or a check of the section holding
    one) names the override as the user gave it (``origins``: dotted key -> e.g. ``--set a.b=1``), so a bad
    ``--set`` is not blamed on the YAML file."""
    origins = origins or {}
    if file_valid:
        lines = [f"invalid override for config {source} (the file itself is valid):"]
    else:
        lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        blame = [o for k, o in origins.items() if k == loc or loc.startswith(k + ".") or k.startswith(loc + ".")
                 or loc == "<root>"]
        if e["type"] == "extra_forbidden":
            text = f"unknown key {loc}" if blame else f"{loc}: unknown key (not allowed here)"
        elif isinstance(e["input"], dict):  # a check of a whole section: its content is not worth a line dump
            text = f"{loc}: {e['msg']}"
        else:
            text = f"{loc}: {e['msg']} (got {e['input']!r})"
        lines.append(f"  - {', '.join(blame)}: {text}" if blame else f"  - {text}")
    return "\n".join(lines)


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A path to a YAML file, or a profile name found in ``configs/`` (``cpu-tiny`` -> ``configs/cpu-tiny.yaml``).

    Raises:
        ConfigError: neither exists; the message lists the known profiles.
    """
    p = Path(name_or_path)
    if p.is_file():
        return p
    candidate = CONFIG_DIR / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"config {name_or_path!s} not found (not a file; known profiles: {', '.join(known) or 'none'})")


def load_config(name_or_path: str | Path, overrides: dict[str, Any] | None = None,
                schema: type[_M] | None = None, origins: dict[str, str] | None = None) -> _M:
    """Read and validate a YAML config.

    Args:
        name_or_path: a YAML file or a profile name in ``configs/``.
        overrides: dotted keys to set after reading, e.g. ``{"generation.queries_per_image": 3}``.
        schema: the pydantic model to validate against (default :class:`ConstructConfig`; judge commands pass
            :class:`rms_ray.judge.config.JudgeConfig`). The one loader for every command.
        origins: how the user gave each override, named in error messages (dotted key -> text, e.g.
            ``{"generation.max_rounds": "--set generation.max_rounds=0"}``); default ``override KEY=VALUE``.

    Raises:
        ConfigError: unreadable YAML, not a mapping, unknown keys or invalid values (all listed, by key path; a
            problem that comes from an override names the override).
    """
    path = resolve_config_path(name_or_path)
    try:
        data = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level, got {type(data).__name__}")
    from_file = copy.deepcopy(data)
    named: dict[str, str] = {}  # normalised dotted key -> how the user gave it
    for dotted, value in (overrides or {}).items():
        parts = [part.strip() for part in dotted.strip().split(".")]
        origin = (origins or {}).get(dotted) or _override_origin(".".join(parts), value)
        named[".".join(parts)] = origin
        node = data
        *parents, leaf = parts
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{origin}: {key} is not a mapping in {path}")
        node[leaf] = value
    model = schema or ConstructConfig
    try:
        return model.model_validate(data)
    except ValidationError as e:
        file_valid = False
        if named:
            try:
                model.model_validate(from_file)
                file_valid = True
            except ValidationError:
                pass
        raise ConfigError(_format_errors(e, str(path), named, file_valid)) from None
