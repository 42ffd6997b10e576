"""Build a small, randomly initialised Qwen2.5-VL model directory fully offline (tests and benchmarks).

Nothing is downloaded: the tokenizer is a byte-level BPE trained here with the ``tokenizers`` library on a built-in
English corpus (Qwen2 pre-tokenizer regex, Qwen special tokens, Qwen2.5-VL chat template), the image processor is
capped at a few dozen image tokens, and the weights are drawn from a seeded generator. The resulting directory loads
with ``transformers`` (``AutoProcessor`` + ``Qwen2_5_VLForConditionalGeneration``) and with vLLM (CPU build, V1 engine),
so the real inference code path (chat prompt -> image tokens -> vision tower -> LM -> structured output) can be
exercised on a CPU in seconds.

Choices worth knowing:

* Weights are drawn with std 0.2 (not the usual 0.02): with 0.02 a random model's greedy output is the same for every
  input, so a test could not tell whether the image reached the model. Norm weights are 1.
* Head sizes (LM and vision tower) are 64 or 32: vLLM's CPU attention accepts only 32, 64, 80, 96, 112, 128, 160,
  192, 224, 256 and 512.
* Same preset + seed -> byte-identical files (weights: numpy PCG64 ``standard_normal`` in float32, rounded to
  bfloat16, written by safetensors in a fixed order; the BPE trainer is deterministic).
* The stamp file ``rms_ray_tiny.json`` is written last (atomically); a directory without it is not a finished build.
* Traps met with vLLM 0.29 (CPU) + xgrammar on such a model: a JSON-schema string bounded only by ``maxLength`` can
  receive raw control characters (strict ``json.loads`` fails: parse with ``strict=False`` or bound the string with a
  character-class ``pattern`` such as ``^[A-Za-z0-9 ,.'-]{0,40}$``); xgrammar refuses ``pattern`` together with
  ``maxLength`` on one string; ``disable_any_whitespace`` still yields ``", "``/``": "`` separators with xgrammar.
* The image processor is ``Qwen2VLImageProcessor`` with ``max_pixels = 28*28*64``: every image becomes at most 64 image
  tokens (a 512x512 photo becomes exactly 64). Building the ``Qwen2_5_VLProcessor`` needs ``import torchvision`` to
  succeed (its video half); see ``scripts/patch_torchvision.py`` for CPU machines.

Public API: :data:`PRESETS`, :class:`TinyVLMSpec`, :func:`build_tiny_vlm`, :func:`ensure_tiny_vlm`,
:func:`is_complete_build`, :func:`default_cache_root`. CLI: ``python -m rms_ray.testing.tiny_model [PRESET] [--out DIR]``
prints the directory (builds into the cache by default).

Loading it in vLLM (CPU; set ``VLLM_ENABLE_V1_MULTIPROCESSING=0 OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
HF_HUB_OFFLINE=1`` before importing vllm)::

    llm = LLM(model=str(ensure_tiny_vlm("tiny")), dtype="bfloat16", max_model_len=1024, enforce_eager=True,
              limit_mm_per_prompt={"image": 1, "video": 0},
              structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True})
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}],
        add_generation_prompt=True, tokenize=False)
    llm.generate([{"prompt": prompt, "multi_modal_data": {"image": pil_image}}],
                 SamplingParams(temperature=0.0, max_tokens=64,
                                structured_outputs=StructuredOutputsParams(json=schema)))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BUILDER_VERSION",
    "PRESETS",
    "STAMP_FILE",
    "TinyVLMSpec",
    "build_tiny_vlm",
    "default_cache_root",
    "ensure_tiny_vlm",
    "is_complete_build",
]

#: Bump when the builder's output changes for an unchanged spec, so that cached builds are redone.
BUILDER_VERSION = 2
#: Name of the stamp file written last into a finished build directory.
STAMP_FILE = "rms_ray_tiny.json"
#: Marker present while a build is in progress (lets a crashed build be cleaned up without ``overwrite``).
BUILDING_MARKER = ".rms_ray_tiny_building"
#: Head sizes vLLM's CPU attention backend accepts.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

# Qwen2 pre-tokenizer regex (the one Qwen2/Qwen2.5/Qwen2.5-VL use).
QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501

# Qwen2.5-VL special tokens, in Qwen's id order (they follow the BPE vocabulary). (token, special)
QWEN_VL_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The chat template Qwen2.5-VL-*-Instruct ships (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Built-in training corpus for the tokenizer: plain English about photos, scenes and safety, plus JSON, so that
# prompts and JSON answers tokenize into reasonable pieces. Changing it changes every build (bump BUILDER_VERSION).
_CORPUS = r"""
You are a helpful assistant. Look at the image and describe what you see. The photo shows a person standing
in a kitchen next to a table. There is a cup of coffee on the table, a plate, a spoon and a small bowl of sugar.
The light comes from a window on the left. The scene is calm and safe. Nobody is in danger.
Describe the image in one sentence. A cat is sleeping on a red blanket near the door.
An astronaut in a white suit is smiling in front of a flag. A rocket stands on the launch pad at night.
Two motorcycles are parked on the street. A man rides a bicycle without a helmet on a busy road.
A child is climbing a tall ladder without anyone holding it. The ladder is leaning against a wall.
A woman is cutting vegetables with a sharp knife. A pot of water is boiling on the stove.
There is a wet floor in the hallway and no warning sign. Someone could slip and fall.
A worker on a construction site is not wearing a hard hat or safety glasses.
Electric cables lie across the floor of the office. The socket is overloaded with many plugs.
A car is driving too fast in the rain. The road is dark and the lights are off.
A dog is running in the park. Children are playing football on the grass. The sky is blue.
A bottle of medicine is open on the table within reach of a small child.
A candle is burning next to a curtain. Smoke rises from the pan on the stove.
The image contains text on a page. The clock on the wall shows ten past three.
Is this image safe? Answer yes or no, then explain why. What is the main hazard in this picture?
Which object is the most dangerous? How could the person reduce the risk? Give a short answer.
The question is harmful if it asks for help to hurt someone. The answer should refuse unsafe requests
and offer safe advice instead. A safe answer explains the risk and suggests what to do.
Rate the risk from low to high. The risk level is low, medium or high. The category is one of:
physical harm, fire, electricity, traffic, chemicals, falls, sharp objects, privacy, self harm, none.
Return only JSON. Do not add any other text. Use double quotes for keys and strings.
{"safe": true, "risk": "low", "category": "none", "reason": "The scene shows a cup of coffee on a table."}
{"safe": false, "risk": "high", "category": "falls", "reason": "A child climbs a ladder with no one holding it."}
{"safe": false, "risk": "medium", "category": "fire", "reason": "A candle burns next to a curtain."}
{"label": "unsafe", "score": 0.87, "hazards": ["wet floor", "no sign"], "objects": ["floor", "door", "light"]}
{"caption": "A man rides a bicycle on a road.", "tags": ["bicycle", "road", "man"], "count": 3}
{"question": "What should the worker wear?", "answer": "A hard hat and safety glasses.", "valid": true}
{"image_id": 12, "width": 512, "height": 512, "format": "png", "scene": "kitchen", "people": 1}
{"items": [{"name": "knife", "risk": "high"}, {"name": "cup", "risk": "low"}], "total": 2, "ok": null}
[{"id": 1, "text": "yes"}, {"id": 2, "text": "no"}, {"id": 3, "text": "maybe"}]
{"scenario": "A person is standing on a chair to reach a high shelf.", "safe": false, "severity": 2}
{"instruction": "Describe the hazards in the image.", "response": "There is a wet floor and a cable."}
The numbers are 0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 30 42 50 64 99 100 128 256 512 1000 2024 2025.
First, second, third. One, two, three, four, five, six, seven, eight, nine, ten.
Red, green, blue, yellow, black, white, brown, gray, orange, pink, purple, dark, bright, light.
Small, large, big, tall, short, long, old, new, young, happy, sad, busy, quiet, open, closed, empty, full.
The man, the woman, the child, the boy, the girl, the people, the worker, the driver, the cook, the student.
In the kitchen, in the street, in the park, at home, at school, at work, on the road, near the water, at night.
He is holding a phone. She is reading a book. They are walking across the bridge. We can see trees and houses.
It looks like a photo taken outside during the day. The picture is blurry and the colors are faded.
This is a close up of coins on a table. This is a microscope image of cells. This is a photo of grass and gravel.
The moon is bright in the night sky. The galaxy is far away. Bricks form a wall. A camera man holds a camera.
Please answer the following question about the image. Think step by step and give the final answer.
User: Can you tell me how to make this safer? Assistant: Yes. Keep the floor dry and put up a sign.
User: Is it dangerous? Assistant: It could be dangerous because the child might fall from the ladder.
Instructions: list every object, then list every hazard, then give a risk score between 0 and 1.
Output format: {"objects": [...], "hazards": [...], "score": 0.5}. Keys: "objects", "hazards", "score".
Keep answers short, clear and helpful. Avoid guessing. If you are not sure, say that you are not sure.
Safety first: wear gloves, goggles, a helmet and a mask when needed. Turn off the power before repairs.
Store chemicals in a locked cabinet. Keep knives away from children. Never leave a fire unattended.
Look both ways before crossing the street. Wear a seat belt. Do not use a phone while driving.
"""


@dataclass(frozen=True)
class TinyVLMSpec:
    """Architecture of a randomly initialised Qwen2.5-VL model.

    All sizes are counts (not bytes); pixel bounds are width*height in pixels (28*28 pixels = one image token after
    the 2x2 merge of 14-pixel patches). Head sizes are ``hidden_size // num_heads`` and must be in
    :data:`VLLM_CPU_HEAD_SIZES`; ``sum(mrope_section)`` must equal the LM head size / 2. The LM vocabulary is the
    trained tokenizer's length (~2.6k) rounded up to a multiple of 64.
    """

    name: str
    # language model
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    mrope_section: tuple[int, int, int]
    # vision tower
    vision_hidden_size: int
    vision_depth: int
    vision_num_heads: int
    vision_intermediate_size: int
    vision_fullatt_block_indexes: tuple[int, ...]
    # tokenizer / processor / init
    tokenizer_vocab_size: int = 3072  # BPE training target (byte alphabet + merges), special tokens come on top
    max_position_embeddings: int = 4096
    min_pixels: int = 28 * 28 * 4  # >= 4 image tokens
    max_pixels: int = 28 * 28 * 64  # <= 64 image tokens per image
    init_std: float = 0.2
    rope_theta: float = 1_000_000.0
    description: str = field(default="", compare=False)

    @property
    def head_dim(self) -> int:
        """LM attention head size (``hidden_size // num_attention_heads``)."""
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_head_dim(self) -> int:
        """Vision-tower attention head size."""
        return self.vision_hidden_size // self.vision_num_heads

    def validate(self) -> None:
        """Raise ``ValueError`` if the spec cannot load in vLLM's CPU build (head sizes, mrope, GQA, indices)."""
        if self.hidden_size % self.num_attention_heads or self.head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(f"{self.name}: LM head size {self.hidden_size}/{self.num_attention_heads} not allowed")
        if self.vision_hidden_size % self.vision_num_heads or self.vision_head_dim not in VLLM_CPU_HEAD_SIZES:
            raise ValueError(f"{self.name}: vision head size {self.vision_head_dim} not allowed")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"{self.name}: num_attention_heads must be a multiple of num_key_value_heads")
        if sum(self.mrope_section) * 2 != self.head_dim:
            raise ValueError(f"{self.name}: sum(mrope_section)*2 must equal head_dim {self.head_dim}")
        if any(not 0 <= i < self.vision_depth for i in self.vision_fullatt_block_indexes):
            raise ValueError(f"{self.name}: vision_fullatt_block_indexes out of range")
        if self.max_position_embeddings < 2048:
            raise ValueError(f"{self.name}: max_position_embeddings must be >= 2048")

    def to_json_dict(self) -> dict[str, Any]:
        """Plain-JSON form (tuples become lists); used for the stamp and its fingerprint."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


#: Named specs. "tiny": 1.2M parameters (2.5 MB), for tests. "tiny-train": the same with a 0.02 init, for training
#: tests. "bench-100m": ~100M parameters, same architecture and tokenizer, for throughput benchmarks.
PRESETS: dict[str, TinyVLMSpec] = {
    "tiny": TinyVLMSpec(
        name="tiny",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        mrope_section=(8, 12, 12),
        vision_hidden_size=64,
        vision_depth=2,
        vision_num_heads=2,
        vision_intermediate_size=128,
        vision_fullatt_block_indexes=(1,),
        description="1.2M params (2.5 MB); for unit tests",
    ),
    # `tiny`'s architecture with the usual 0.02 init. Measured (2026-12, 2-core AVX2, full fine-tuning, batch 8):
    # `tiny` (std 0.2: saturated attention) did not learn the image-AND-text XOR of
    # rms_ray.testing.synthetic_safety in 400 steps at lr 1e-3 or 3e-3 (val accuracy 0.50-0.55), although it learns
    # either modality alone in ~40 steps; this preset reached val F1 0.95 by step 200 at lr 1e-3. Its untrained
    # greedy output is degenerate (the reason `tiny` uses 0.2), so it is for training tests only.
    "tiny-train": TinyVLMSpec(
        name="tiny-train",
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=256,
        mrope_section=(8, 12, 12),
        vision_hidden_size=64,
        vision_depth=2,
        vision_num_heads=2,
        vision_intermediate_size=128,
        vision_fullatt_block_indexes=(1,),
        init_std=0.02,
        description="1.2M params (2.5 MB), init std 0.02; for training tests (learns the synthetic XOR)",
    ),
    "bench-100m": TinyVLMSpec(
        name="bench-100m",
        hidden_size=768,
        num_hidden_layers=10,
        num_attention_heads=12,
        num_key_value_heads=2,
        intermediate_size=2048,
        mrope_section=(8, 12, 12),
        vision_hidden_size=512,
        vision_depth=8,
        vision_num_heads=8,
        vision_intermediate_size=1536,
        vision_fullatt_block_indexes=(3, 7),
        description="98.7M params (189 MB); for throughput benchmarks",
    ),
}


# --------------------------------------------------------------------------------------------------------------------
# pieces


def _train_tokenizer(spec: TinyVLMSpec):
    """Train the byte-level BPE on the built-in corpus; return a ``transformers`` Qwen2 tokenizer (not saved)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    # The corpus plus Title-Case and UPPER-CASE copies of it (more distinct words -> a vocab of ~2-3k; capitalised
    # words get their own tokens). Deterministic: the BPE trainer breaks ties by a fixed order.
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln.strip()]
    lines = lines + [ln.title() for ln in lines] + [ln.upper() for ln in lines]
    tok.train_from_iterator(lines, trainer=trainer)
    model_json = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model_json["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model_json["merges"]]
    base = len(vocab)
    # Special tokens go into the vocab right after the BPE pieces (Qwen's layout) so that their ids do not depend
    # on the order in which the tokenizer class registers them.
    for i, (t, _) in enumerate(QWEN_VL_SPECIAL_TOKENS):
        vocab[t] = base + i

    hf_tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=spec.max_position_embeddings,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf_tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in QWEN_VL_SPECIAL_TOKENS])
    hf_tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    for i, (t, _) in enumerate(QWEN_VL_SPECIAL_TOKENS):
        got = hf_tok.convert_tokens_to_ids(t)
        if got != base + i:
            raise RuntimeError(f"special token {t!r} got id {got}, expected {base + i}")
    return hf_tok


def _make_config(spec: TinyVLMSpec, tokenizer):
    from transformers import Qwen2_5_VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN_VL_SPECIAL_TOKENS}
    vocab_size = ((len(tokenizer) + 63) // 64) * 64  # padded like Qwen's 152064 > 151665
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std,
        rms_norm_eps=1e-6,
        use_cache=True,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=spec.num_hidden_layers,
        attention_dropout=0.0,
        rope_parameters={
            "rope_type": "default",
            "mrope_section": list(spec.mrope_section),
            "rope_theta": spec.rope_theta,
        },
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    vision_config = dict(
        depth=spec.vision_depth,
        hidden_size=spec.vision_hidden_size,
        hidden_act="silu",
        intermediate_size=spec.vision_intermediate_size,
        num_heads=spec.vision_num_heads,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        out_hidden_size=spec.hidden_size,
        fullatt_block_indexes=list(spec.vision_fullatt_block_indexes),
        initializer_range=spec.init_std,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        dtype="bfloat16",
    )
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return config


def _make_processor(spec: TinyVLMSpec, tokenizer):
    from transformers import Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    size = {"shortest_edge": spec.min_pixels, "longest_edge": spec.max_pixels}
    image_processor = Qwen2VLImageProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    video_processor = Qwen2VLVideoProcessor(size=size, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def _random_state_dict(spec: TinyVLMSpec, config, seed: int):
    """Random weights for ``config``: ``({name: bfloat16 tensor}, number of parameters)``.

    Names and shapes come from the transformers model built on the meta device (no memory, no init cost); values
    from numpy's PCG64 generator (``standard_normal`` in float32, times ``init_std``; norm weights are 1), drawn
    tensor by tensor in registration order and rounded to bfloat16. numpy's generator is platform-independent, so the
    bytes do not depend on the CPU's vector extensions.
    """
    import numpy as np
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        model = Qwen2_5_VLForConditionalGeneration(config)
    rng = np.random.Generator(np.random.PCG64(seed))
    std = np.float32(spec.init_std)
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():  # registration order: deterministic
        parts = name.split(".")
        is_norm = parts[-1] == "weight" and p.ndim == 1 and ("norm" in parts[-2] or parts[-2] == "ln_q")
        if is_norm:
            arr = np.ones(tuple(p.shape), dtype=np.float32)
        else:
            arr = rng.standard_normal(tuple(p.shape), dtype=np.float32) * std
        out[name] = torch.from_numpy(arr).to(torch.bfloat16).contiguous()
    n_params = sum(t.numel() for t in out.values())
    return out, n_params


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _fingerprint(spec: TinyVLMSpec, seed: int) -> str:
    payload = json.dumps({"spec": spec.to_json_dict(), "seed": seed, "builder": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _file_digests(directory: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.name not in (STAMP_FILE, BUILDING_MARKER) and not p.name.endswith(".tmp"):
            h = hashlib.sha256()
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[p.name] = {"size": p.stat().st_size, "sha256": h.hexdigest()}
    return out


def _read_stamp(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete_build(directory: str | Path, preset: str = "tiny", seed: int = 0, verify_hashes: bool = False) -> bool:
    """True if ``directory`` holds a finished build of ``preset``/``seed`` by this builder version.

    Checks the stamp (preset, seed, spec fingerprint) and that every file it lists exists with the recorded size;
    with ``verify_hashes=True`` also re-hashes every file (sha256; ~0.5 s per 100 MB). Never raises for a missing or
    malformed directory (returns False); raises ``KeyError`` for an unknown preset.
    """
    spec = PRESETS[preset]
    directory = Path(directory)
    stamp = _read_stamp(directory)
    if not stamp or (directory / BUILDING_MARKER).exists():
        return False
    if stamp.get("preset") != preset or stamp.get("seed") != seed:
        return False
    if stamp.get("fingerprint") != _fingerprint(spec, seed):
        return False
    files = stamp.get("files") or {}
    if "model.safetensors" not in files:
        return False
    for name, meta in files.items():
        p = directory / name
        if not p.is_file() or p.stat().st_size != meta.get("size"):
            return False
    if verify_hashes:
        return _file_digests(directory) == files
    return True


# --------------------------------------------------------------------------------------------------------------------
# public API


def build_tiny_vlm(output_dir: str | Path, preset: str = "tiny", seed: int = 0, overwrite: bool = False) -> Path:
    """Build a random Qwen2.5-VL model directory (tokenizer, config, weights, processor) into ``output_dir``.

    Files written: ``config.json``, ``generation_config.json``, ``model.safetensors`` (bfloat16),
    ``tokenizer.json``/``tokenizer_config.json``, ``chat_template.jinja``, the processor config(s), and last the stamp
    ``rms_ray_tiny.json`` (preset, seed, spec, spec fingerprint, parameter count, sha256 + size of every file, and a
    ``content_hash`` over them). Fully offline; deterministic: same preset + seed -> byte-identical
    ``model.safetensors`` and tokenizer files.

    Args:
        output_dir: target directory; created if missing.
        preset: key of :data:`PRESETS` ("tiny": 1.2M params, 2.5 MB, ~0.3 s once transformers' Qwen2.5-VL modules
            are imported, ~5 s cold; "bench-100m": 98.7M params, 189 MB, ~6 s).
        seed: seed of the weight generator.
        overwrite: rebuild even if a complete build with the same preset/seed is already there.

    Returns:
        ``Path(output_dir)``.

    Raises:
        KeyError: unknown preset.
        FileExistsError: ``output_dir`` holds other files (not a complete build of this preset/seed, not a previous
            build of ours) and ``overwrite`` is False.
        ImportError: ``transformers``/``tokenizers``/``torch``/``safetensors`` missing, or ``torchvision`` not
            importable (the Qwen2.5-VL processor needs it; run ``scripts/patch_torchvision.py`` on CPU machines).
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    spec = PRESETS[preset]
    spec.validate()
    out = Path(output_dir)
    if not overwrite and is_complete_build(out, preset, seed):
        return out
    if out.exists() and any(out.iterdir()):
        ours = (out / STAMP_FILE).exists() or (out / BUILDING_MARKER).exists()
        if not overwrite and not ours:
            raise FileExistsError(f"{out} is not empty and is not a tiny-VLM build; pass overwrite=True")
        for p in out.iterdir():  # a stale/partial build of ours, or overwrite requested
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / BUILDING_MARKER).write_text("build in progress\n", encoding="utf-8")

    from safetensors.torch import save_file

    tokenizer = _train_tokenizer(spec)
    config = _make_config(spec, tokenizer)
    processor = _make_processor(spec, tokenizer)
    state_dict, n_params = _random_state_dict(spec, config, seed)

    save_file(state_dict, str(out / "model.safetensors"), metadata={"format": "pt"})
    os.chmod(out / "model.safetensors", 0o644)  # save_file creates it 0600; other users (Ray workers) must read it
    del state_dict
    config.save_pretrained(out)
    processor.save_pretrained(out)  # tokenizer files, chat template, image/video processor configs
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t, _ in QWEN_VL_SPECIAL_TOKENS}
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        },
    )
    files = _file_digests(out)
    content_hash = hashlib.sha256(
        json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode()
    ).hexdigest()
    stamp = {
        "preset": preset,
        "seed": seed,
        "builder_version": BUILDER_VERSION,
        "fingerprint": _fingerprint(spec, seed),
        "spec": spec.to_json_dict(),
        "num_parameters": n_params,
        "tokenizer_len": len(tokenizer),
        "content_hash": content_hash,
        "files": files,
    }
    tmp_stamp = out / (STAMP_FILE + ".tmp")
    _write_json(tmp_stamp, stamp)
    os.replace(tmp_stamp, out / STAMP_FILE)  # the stamp appears atomically and last
    (out / BUILDING_MARKER).unlink()
    return out


def default_cache_root() -> Path:
    """Root holding one sub-directory per preset: ``$RMS_RAY_CACHE/models`` if that variable is set, else
    ``~/.cache/rms_ray/models``."""
    env = os.environ.get("RMS_RAY_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "rms_ray") / "models"


def ensure_tiny_vlm(preset: str = "tiny", cache_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Return the directory of a complete build of ``preset``, building it if missing.

    The directory is ``<root>/<preset>`` (``<root>/<preset>-seed<seed>`` for a non-zero seed) with ``root =
    cache_dir`` if given, else :func:`default_cache_root`. Safe for concurrent callers (processes or threads): each
    builds into its own temporary directory under ``root`` and ``os.rename``s it into place; the loser of a race
    discards its copy and returns the winner's (identical) build. Cost when already built: one stamp read.

    Raises:
        KeyError: unknown preset. ``OSError``: ``root`` not writable. See :func:`build_tiny_vlm` for the rest.
    """
    if preset not in PRESETS:
        raise KeyError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    final = root / (preset if seed == 0 else f"{preset}-seed{seed}")
    if is_complete_build(final, preset, seed):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    try:
        build_tiny_vlm(tmp, preset=preset, seed=seed, overwrite=True)
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700
        for _ in range(3):
            try:
                os.rename(tmp, final)  # atomic; fails if final exists and is non-empty
                return final
            except OSError:
                if is_complete_build(final, preset, seed):
                    return final  # another process won the race
                if final.exists():  # stale/incomplete (e.g. older builder version): move it aside, retry
                    stale = Path(tempfile.mkdtemp(prefix=f".{final.name}.stale-", dir=root))
                    try:
                        os.rename(final, stale / "old")
                    except OSError:
                        pass
                    shutil.rmtree(stale, ignore_errors=True)
        raise OSError(f"could not move the build into place at {final}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Build a random Qwen2.5-VL model directory offline.")
    parser.add_argument("preset", nargs="?", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--out", help="build into this directory (default: the cache, see default_cache_root())")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    if args.out:
        path = build_tiny_vlm(args.out, preset=args.preset, seed=args.seed, overwrite=args.overwrite)
    else:
        path = ensure_tiny_vlm(args.preset, seed=args.seed)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
