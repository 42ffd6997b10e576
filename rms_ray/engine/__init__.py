"""The one owner of vLLM: engine creation and batched generation, used by construction, evaluation and serving."""

from rms_ray.engine.errors import EngineStartError
from rms_ray.engine.vllm_engine import (
    GenRequest,
    GenResult,
    ModelSourceError,
    VLMEngine,
    check_model_source,
    resolve_model_source,
)

__all__ = ["EngineStartError", "GenRequest", "GenResult", "ModelSourceError", "VLMEngine", "check_model_source",
           "resolve_model_source"]
