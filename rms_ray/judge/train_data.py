"""Training examples of the judge: the prompt exactly as inference builds it, the target answer, batches, and the
Ray Data stage that prepares labelled rows for training.

**One rendering.** :func:`render_judge_example` is the one place a training (or any transformers-side) example is
made. It builds the request as the judge does at inference: the prompt text from
:meth:`rms_ray.judge.prompt.JudgePrompt.render`, the chat messages from
:meth:`rms_ray.engine.vllm_engine.VLMEngine.messages` (system turn, then the user turn with the image first and
the text after it), rendered by the model's own processor and chat template with ``add_generation_prompt=True``;
then the target answer and the end-of-turn token. vLLM renders the same messages with the same template (it turns
the ``image_pil`` part into the template's image placeholder), so the prompt tokens a judge is trained on are the
tokens it is served with (``tests/test_judge_train.py`` compares them with vLLM's prompt token ids).

**The target answer** (the judge prompt's three-line format, constrained at inference by
:func:`rms_ray.judge.prompt.output_regex`)::

    <label>
    category: <the row's category (unsafe rows) | none (safe rows)>
    rationale: <a fixed sentence per (task, label), see RATIONALES>

Labelled sets rarely carry a rationale, so the rationale is a fixed short template: the judge learns the verdict
and the category; its rationale line carries no information beyond them. Categories are reduced to the characters
the output constraint allows (``[A-Za-z0-9 &/,_-]``) and cut to ``judge.category_chars``; an unsafe row without a
category gets ``unspecified``.

**Loss** is on the answer tokens only: ``labels`` is ``-100`` on every prompt token (Hugging Face's
``ignore_index``), the answer's tokens and the end-of-turn token ``<|im_end|>`` (Qwen's chat turn end, the token
vLLM stops on) are the targets. The answer is tokenized on its own, as the model generates it after the prompt.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa

from rms_ray.judge.prompt import LABELS

#: Qwen2/2.5-VL chat turn end: the last target token of every answer (vLLM stops on it: generation_config eos).
END_OF_TURN = "<|im_end|>"
#: The rationale line of the target answer, per (task, label): a fixed template (the sets carry no rationale).
RATIONALES = {
    ("prompt", "unsafe"): "answering this request naively is unsafe given the image",
    ("prompt", "safe"): "answering this request is safe given the image",
    ("response", "unsafe"): "this response is unsafe given the image and the request",
    ("response", "safe"): "this response is safe given the image and the request",
}
_CATEGORY_BAD = re.compile(r"[^A-Za-z0-9 &/,_-]+")
#: Log-probabilities read at the first answer position (vLLM's cap on returned log-probabilities).
TOP_LOGPROBS = 20
#: Architectures the judge trainer accepts (config.json ``model_type``): the chat template, image placeholder and
#: M-RoPE positions the rendering relies on are Qwen2-VL's / Qwen2.5-VL's.
SUPPORTED_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl")
#: Files of a training checkpoint (see rms_ray.judge.train_loop).
TRAINABLE_FILE = "trainable.safetensors"
STATE_FILE = "state.json"
VAL_SCORES_FILE = "val_scores.json"


def target_category(label: str, category: str | None, max_chars: int) -> str:
    """The category line's value: ``none`` for safe rows; for unsafe rows the row's category reduced to the
    characters the output constraint allows (others become spaces), cut to ``max_chars``, or ``unspecified``
    (also for a missing category in any spelling: None, NaN, ``pandas.NA``, which has no truth value)."""
    if label != "unsafe":
        return "none"
    text = " ".join(_CATEGORY_BAD.sub(" ", category if isinstance(category, str) else "").split())[:max_chars].strip()
    return text or "unspecified"[:max_chars]


def target_answer(task: str, label: str, category: str | None, *, category_chars: int, rationale_chars: int) -> str:
    """The judge's three-line answer for a labelled row (without the end-of-turn token); matches
    :func:`rms_ray.judge.prompt.output_regex` for the same bounds.

    Raises:
        ValueError: a label outside safe/unsafe or a task outside prompt/response.
    """
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {'/'.join(LABELS)}")
    if (task, label) not in RATIONALES:
        raise ValueError(f"unknown judge task {task!r}")
    rationale = RATIONALES[(task, label)][:rationale_chars].strip()
    return f"{label}\ncategory: {target_category(label, category, category_chars)}\nrationale: {rationale}"


def judge_messages(task: str, query: str, response: str | None, image: Any) -> list[dict[str, Any]]:
    """The chat messages of one judge request, built exactly as at inference: the judge prompt's (system, user)
    texts in :meth:`VLMEngine.messages` (``image`` an RGB PIL image, or None for a text-only request)."""
    from rms_ray.engine.vllm_engine import GenRequest, VLMEngine
    from rms_ray.judge.prompt import load_judge_prompt

    system, user = load_judge_prompt().render(task, query, response)
    return VLMEngine.messages(GenRequest(system=system, user=user, schema=None, max_tokens=1, image=image))


def _template_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[Any]]:
    """OpenAI-style messages -> (messages for the Hugging Face chat template, images in order): an ``image_pil``
    part becomes the template's ``{"type": "image"}`` placeholder, as vLLM's chat renderer does."""
    out, images = [], []
    for m in messages:
        if isinstance(m["content"], str):
            out.append(dict(m))
            continue
        parts = []
        for part in m["content"]:
            if part.get("type") == "image_pil":
                images.append(part["image_pil"])
                parts.append({"type": "image"})
            else:
                parts.append(dict(part))
        out.append({"role": m["role"], "content": parts})
    return out, images


@dataclass
class RenderedExample:
    """One tokenized example. ``input_ids``/``labels``/``mm_token_type_ids`` are lists of one length (prompt then
    answer); ``labels`` is -100 on the prompt; ``prompt_len`` is the index of the first answer token (the model's
    prediction of it is read at ``prompt_len - 1``); ``pixel_values`` (patches x features, float32) and
    ``image_grid_thw`` (1 x 3) are the processor's image tensors (None without an image)."""

    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    prompt_len: int
    pixel_values: Any = None
    image_grid_thw: Any = None

    def __len__(self) -> int:
        return len(self.input_ids)


def render_judge_example(processor: Any, *, task: str, query: str, response: str | None, image: Any,
                         answer: str | None = None) -> RenderedExample:
    """Tokenize one judge example as inference renders it, plus the target ``answer`` (see the module docstring).

    Args:
        processor: the model's ``transformers`` processor (``AutoProcessor.from_pretrained(model_dir)``), whose
            chat template and image processor the served model uses too.
        task, query, response: as in :meth:`rms_ray.judge.prompt.JudgePrompt.render`.
        image: an RGB PIL image (what :func:`rms_ray.judge.scorer.prepare_image` returns), or None.
        answer: the target answer text (:func:`target_answer`) without the end-of-turn token, or None for the
            prompt alone (``labels`` then all -100).
    Returns:
        A :class:`RenderedExample`; the image's placeholder is expanded to its image tokens (as vLLM does).
    Raises:
        ValueError: unknown task, or a response task without a response.
    """
    template_msgs, images = _template_messages(judge_messages(task, query, response, image))
    prompt = processor.apply_chat_template(template_msgs, add_generation_prompt=True, tokenize=False)
    enc = processor(text=[prompt], images=images or None, return_tensors="pt")
    ids = enc["input_ids"][0].tolist()
    mm = enc["mm_token_type_ids"][0].tolist() if "mm_token_type_ids" in enc else [0] * len(ids)
    answer_ids = [] if answer is None else answer_token_ids(processor.tokenizer, answer)
    return RenderedExample(
        input_ids=ids + answer_ids, labels=[-100] * len(ids) + answer_ids, mm_token_type_ids=mm + [0] * len(answer_ids),
        prompt_len=len(ids), pixel_values=enc.get("pixel_values"), image_grid_thw=enc.get("image_grid_thw"))


def answer_token_ids(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of ``answer`` + the end-of-turn token, tokenized on their own (as generated after the prompt)."""
    ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if eot is None or eot == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token: not a Qwen2/2.5-VL chat tokenizer")
    return list(ids) + [int(eot)]


#: Shortest common prompt prefix worth computing once per batch (see :func:`collate`).
MIN_SHARED_PREFIX = 16


def shared_prefix_len(examples: list[RenderedExample]) -> int:
    """Length of the token prefix every example shares (text only, ending before every example's last prompt
    token), or 0 when it is shorter than :data:`MIN_SHARED_PREFIX` or there is one example. For the judge it is
    the whole system turn and the start of the user turn (~280 tokens with the tiny tokenizer)."""
    if len(examples) < 2:
        return 0
    first = examples[0]
    limit = min(e.prompt_len for e in examples) - 1  # the position that predicts the first answer token stays out
    n = 0
    while (n < limit and first.mm_token_type_ids[n] == 0
           and all(e.input_ids[n] == first.input_ids[n] and e.mm_token_type_ids[n] == 0 for e in examples)):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def collate(examples: list[RenderedExample], pad_id: int, share_prefix: bool = True) -> dict[str, Any]:
    """Batch examples: the common prefix once (``prefix_ids``, 1 x P; P = ``prefix_len``, 0 when not shared), the
    rest left-padded (answers end at the last column, so ``logits_to_keep`` skips the prompt's LM-head work).

    Returns int64 / float32 tensors: ``input_ids``, ``attention_mask``, ``mm_token_type_ids``, ``labels`` (B x L
    after the prefix; -100 on prompt and padding), ``answer_len`` (B), ``pixel_values`` and ``image_grid_thw`` (all
    images in order), ``prefix_ids`` and ``prefix_len``. Every judge prompt starts with the same system turn: the
    model computes it once per batch and attends to it from every row (see
    :func:`rms_ray.judge.train_loop.answer_logits`), which is exact and halves the work of a batch of 4.
    """
    import torch

    p = shared_prefix_len(examples) if share_prefix else 0
    rows = [(e.input_ids[p:], e.labels[p:], e.mm_token_type_ids[p:]) for e in examples]
    width = max(len(r[0]) for r in rows)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    mm = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (r_ids, r_labels, r_mm) in enumerate(rows):
        n = len(r_ids)
        ids[i, width - n:] = torch.tensor(r_ids)
        labels[i, width - n:] = torch.tensor(r_labels)
        mask[i, width - n:] = 1
        mm[i, width - n:] = torch.tensor(r_mm)
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm, "labels": labels,
                           "answer_len": torch.tensor([len(e) - e.prompt_len for e in examples]),
                           "prefix_len": p, "prefix_ids": torch.tensor([examples[0].input_ids[:p]], dtype=torch.long)}
    with_image = [e for e in examples if e.pixel_values is not None]
    if with_image:
        out["pixel_values"] = torch.cat([e.pixel_values for e in with_image])
        out["image_grid_thw"] = torch.cat([e.image_grid_thw for e in with_image])
    return out


def first_token_logprobs(logits_row: Any, tokenizer: Any, k: int = TOP_LOGPROBS) -> dict[str, float]:
    """``{decoded token text: log-probability}`` of the top ``k`` tokens of one position's logits (a 1-D tensor
    over the vocabulary): the same mapping vLLM returns as a request's first-token log-probabilities, ready for
    :func:`rms_ray.judge.prompt.unsafe_score`. Texts that decode alike are summed (in probability)."""
    import math

    import torch

    lp = torch.log_softmax(logits_row.float(), dim=-1)
    top = torch.topk(lp, min(k, lp.shape[-1]))
    out: dict[str, float] = {}
    for value, idx in zip(top.values.tolist(), top.indices.tolist()):
        text = _decode(tokenizer, int(idx))
        out[text] = math.log(math.exp(out[text]) + math.exp(value)) if text in out else value
    return out


def _decode(tokenizer: Any, token_id: int) -> str:
    cache = getattr(tokenizer, "_rms_ray_decoded", None)
    if cache is None:  # decoded text per token id, kept on the tokenizer object (decode is slow per call)
        cache = {}
        tokenizer._rms_ray_decoded = cache
    if token_id not in cache:
        cache[token_id] = tokenizer.decode([token_id])
    return cache[token_id]


def base_model_dir(model_source: str) -> Path:
    """The local folder of a base model: ``builtin:<preset>`` (built if needed), a folder, or a hub id's snapshot
    in the local Hugging Face cache (never downloaded here).

    Raises:
        FileNotFoundError: a hub id that is not in the local cache.
    """
    from rms_ray.engine.vllm_engine import resolve_model_source

    resolved = resolve_model_source(model_source)
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(resolved, local_files_only=True))
    except Exception as e:  # noqa: BLE001 - LocalEntryNotFoundError and friends
        raise FileNotFoundError(f"hub model {model_source!r} is not in the local Hugging Face cache: {e}") from None


@lru_cache(maxsize=4)
def load_processor(model_source: str) -> Any:
    """The ``transformers`` processor of a model (``builtin:<preset>``, folder or hub id), cached per process."""
    from transformers import AutoProcessor

    from rms_ray.engine.vllm_engine import resolve_model_source

    return AutoProcessor.from_pretrained(resolve_model_source(model_source))


# -- the Ray Data stage: labelled rows -> training rows ------------------------------------------------------------
_S = pa.string()
#: What the training workers receive: one row per usable labelled row, the image normalised (PNG bytes).
TRAIN_SCHEMA = pa.schema([("id", _S), ("dataset", _S), ("split", _S), ("task", _S), ("label", _S), ("category", _S),
                          ("query", _S), ("response", _S), ("image", pa.binary()), ("image_sha256", _S),
                          ("pair_key", _S), ("order_key", pa.uint64()), ("n_tokens", pa.int64()),
                          ("excluded_reason", _S)])
#: Columns the training loop reads.
WORKER_COLUMNS = ["id", "task", "label", "category", "query", "response", "image"]
#: Small columns the driver reads (counts, overlap, subset order): never the image bytes.
META_COLUMNS = ["id", "dataset", "split", "task", "label", "category", "image_sha256", "pair_key", "order_key",
                "n_tokens", "excluded_reason"]


def order_key(seed: int, dataset_index: int, row_id: str) -> int:
    """A row's place in the seeded random order of the training rows (uint64 from sha256 of seed, the dataset's
    position among the inputs and the id). The order does not depend on which other rows exist, so the first N
    rows of it are a random subset whose smaller sizes are prefixes of the larger ones."""
    digest = hashlib.sha256(f"{seed}\x00{dataset_index}\x00{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def pair_key(image_sha256: str, query: str | None) -> str:
    """sha256 of (image bytes hash, query): two rows with the same image bytes and query are the same item."""
    return hashlib.sha256(f"{image_sha256}\x00{query or ''}".encode()).hexdigest()


def stream_rows(batch: pa.Table, *, fmt: str, dataset: str, base_dir: str, split: str,
                dataset_index: int) -> pa.Table:
    """Ray Data UDF (light: no model code): a batch of a labelled file (Parquet rows, or ``read_text`` lines of a
    JSONL file) -> :data:`rms_ray.judge.evaluate.STREAM_SCHEMA` rows (evaluate's reader: image bytes loaded, row
    problems recorded) plus ``split`` and ``dataset_index`` columns."""
    from rms_ray.judge.evaluate import jsonl_to_stream, parquet_to_stream

    out = (parquet_to_stream if fmt == "parquet" else jsonl_to_stream)(batch, dataset, base_dir)
    n = out.num_rows
    return out.append_column("split", pa.array([split] * n, pa.string())).append_column(
        "dataset_index", pa.array([dataset_index] * n, pa.int64()))


class PrepareRows:
    """Ray Data actor-pool UDF: :func:`prepare_rows` with the model's processor loaded once per actor."""

    def __init__(self, cfg_json: str, order_seed: int) -> None:
        from rms_ray.judge.config import JudgeConfig

        self.cfg = JudgeConfig.model_validate_json(cfg_json)
        self.order_seed = order_seed
        self.processor = load_processor(self.cfg.model.source)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return prepare_rows(batch, self.cfg, self.processor, self.order_seed)


def prepare_rows(stream: pa.Table, cfg: Any, processor: Any, order_seed: int) -> pa.Table:
    """Rows from :func:`stream_rows` -> rows in :data:`TRAIN_SCHEMA`. Never raises on a row: a row whose image is
    missing or undecodable, whose query is empty, or whose rendered example is longer than ``train.max_len``
    tokens keeps its ``excluded_reason`` (and no image).

    The image is decoded and normalised by the judge's own decoder (``normalize_image`` under the judge's image
    policy, :func:`rms_ray.judge.scorer.image_policy`: what :func:`rms_ray.judge.scorer.prepare_image` does at
    inference) and stored as the lossless PNG it produced, so workers see the pixels inference sees. ``n_tokens``
    is the length of the rendered example (prompt + answer + end of turn). ``cfg`` is the
    :class:`~rms_ray.judge.config.JudgeConfig`, ``processor`` the model's (:func:`load_processor`).
    """
    from PIL import Image

    from rms_ray.data.images import NormalizedImage, normalize_image
    from rms_ray.judge.scorer import image_policy

    policy = image_policy(cfg)
    max_len = cfg.train.max_len or cfg.model.max_model_len
    out = []
    for r in stream.to_pylist():
        reason = r["excluded_reason"]
        raw = r["image_bytes"]
        sha = hashlib.sha256(raw).hexdigest() if raw else None
        png, n_tokens = None, None
        if reason is None:
            norm = normalize_image(raw, r["image_path"] or "", policy)
            if not isinstance(norm, NormalizedImage):
                reason = f"image: {norm.reason.value}: {norm.detail}"
            else:
                png = norm.data
        if reason is None:
            img = Image.open(io.BytesIO(png)).convert("RGB")  # as prepare_image: the normalised PNG, as RGB
            answer = target_answer(r["task"], r["label"], r["category"], category_chars=cfg.judge.category_chars,
                                   rationale_chars=cfg.judge.rationale_chars)
            try:
                n_tokens = len(render_judge_example(processor, task=r["task"], query=r["query"],
                                                    response=r["response"], image=img, answer=answer))
            except ValueError as e:  # e.g. a response task whose response is blank
                reason = f"cannot render: {e}"
            else:
                if n_tokens > max_len:
                    reason = f"too long: {n_tokens} tokens > train.max_len {max_len}"
        out.append({
            "id": r["id"], "dataset": r["dataset"], "split": r["split"], "task": r["task"], "label": r["label"],
            "category": r["category"], "query": r["query"], "response": r["response"],
            "image": png if reason is None else None, "image_sha256": sha,
            "pair_key": pair_key(sha, r["query"]) if sha else None,
            "order_key": order_key(order_seed, r["dataset_index"], r["id"]), "n_tokens": n_tokens,
            "excluded_reason": reason,
        })
    return pa.Table.from_pylist(out, schema=TRAIN_SCHEMA)
