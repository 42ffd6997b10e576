"""Importers: published multimodal safety sets -> the labelled format (:mod:`rms_ray.data.labelled`).

:data:`IMPORTERS` maps a format name to an :class:`Importer`. An importer only *maps*: it reads the set's own
annotation files and yields :class:`Item` s (one labelled-format row each, plus the upstream record it came
from). Everything else happens once, in :func:`import_dataset`: limit, row checks (label, query, duplicate id,
image present and decodable), writing the output (JSONL or Parquet by suffix; Parquet embeds image bytes), and
writing every unusable row, with its ``reason`` and upstream record, to ``excluded_path(output)``. Nothing is
dropped silently: ``rows_in == written + excluded``.

Layouts (each reader's docstring names the repository file and commit it was written against):

=============  ====================================================================================================
``mmsafeaware`` ``eval.jsonl`` of ``../shared/data/MMSafeAware`` (+ its ``excluded.jsonl``), or upstream
                ``prompt.txt`` + numbered images (Jarviswang94/MMSafetyAwareness)
``figstep``     ``eval.jsonl`` of ``../shared/data/FigStep_SafeBench`` (ThuCCSLab/FigStep SafeBench)
``siuo``        ``data/siuo_gen.json`` or ``data/siuo_mcqa.json`` + ``data/images/`` (sinwang20/SIUO)
``vlguard``     ``train.json`` / ``test.json`` + the unzipped ``train/`` / ``test/`` folder (ys-zong/VLGuard)
``vlsbench``    ``data.json`` + ``imgs/`` (AI45Lab/VLSBench, HF Foreshhh/vlsbench)
``mossbench``   ``data/`` and ``data_contrast/`` with ``images_information/information.json`` (xirui-li/MOSSBench)
``mssbench``    ``combined.json`` + ``chat/`` + ``embodied/`` (eric-ai-lab/MSSBench, HF kzhou35/mssbench)
``rms``         a folder written by ``rms-ray construct`` (rows from :mod:`rms_ray.construct.export`)
=============  ====================================================================================================
"""

from __future__ import annotations

import io
import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, NamedTuple

from PIL import Image, UnidentifiedImageError

from rms_ray.data.labelled import (CORE, LABELS, SUFFIXES, TASKS, LabelledFormatError, LabelledWriter,
                                   excluded_path, load_row_image, write_excluded)


class Item(NamedTuple):
    """One candidate row from an importer.

    ``row``: labelled columns plus extras; ``image`` is a path relative to the images folder (or absolute), an
    Image struct with bytes, or None. ``upstream``: the record as published, copied into the excluded file if the
    row is unusable. ``reason``: set when the upstream itself marks the row unusable (it is then excluded as is).
    """

    row: dict[str, Any]
    upstream: Any
    reason: str | None = None


@dataclass(frozen=True)
class Importer:
    """A format: ``read(src, images_dir)`` yields :class:`Item` s; ``images(src)`` is the default images folder."""

    read: Callable[[Path, Path], Iterable[Item]]
    images: Callable[[Path], Path]
    src: str  # what SRC is, for --help and errors


@dataclass
class ImportReport:
    """What :func:`import_dataset` did. ``counts``: task -> label -> rows written; ``reasons``: kind -> rows."""

    format: str
    source: str
    src: str
    output: str
    excluded_path: str
    rows_in: int = 0
    written: int = 0
    excluded: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the shared checking/writing path ------------------------------------------------------------------------


def _row_problem(row: dict[str, Any], written_ids: set[str]) -> str | None:
    if row.get("id") in (None, ""):
        return "missing id"
    if row.get("label") not in LABELS:
        return f"unknown label: {row.get('label')!r}"
    if row.get("task") not in TASKS:
        return f"unknown task: {row.get('task')!r}"
    query = row.get("query")
    if not isinstance(query, str) or not query.strip():
        return "empty query"
    response = row.get("response")
    if row["task"] == "response" and (not isinstance(response, str) or not response.strip()):
        return "empty response"
    if str(row["id"]) in written_ids:
        return f"duplicate id: {row['id']}"
    return None


def _checked_image(value: Any, base: Path) -> tuple[bytes | None, str | None, str | None]:
    """``(bytes, path, None)`` for an image PIL can open and verify, else ``(None, path, reason)``."""
    data, path, err = load_row_image(value, base)
    if err:
        return None, path, err
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # structure/CRC check without decoding every pixel: fast on 100k rows
    except UnidentifiedImageError:
        return None, path, f"not a readable image: {path}: not an image format PIL recognises"
    except Exception as e:  # PIL raises many types for broken files; any of them makes the row unusable
        return None, path, f"not a readable image: {path}: {type(e).__name__}: {e}"
    return data, path, None


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    image = row.get("image")
    if isinstance(image, dict):  # never put image bytes in the excluded JSONL
        image = image.get("path")
    return {**row, "image": image}


def import_dataset(fmt: str, src: str | Path, images_dir: str | Path | None, output: str | Path, *,
                   source: str | None = None, limit: int | None = None, responses: bool = True) -> ImportReport:
    """Convert a published dataset into one labelled file (see the module docstring for each format's layout).

    Args:
        fmt: a key of :data:`IMPORTERS`.
        src: the format's annotation file or folder (``IMPORTERS[fmt].src``).
        images_dir: the folder image paths are relative to; None = the format's default (next to ``src``).
        output: ``.parquet`` (image bytes embedded) or ``.jsonl`` (image paths relative to the file).
        source: value of the ``source`` column (default: the row's own, else ``fmt``).
        limit: use only the first N candidate rows (in file order; a record giving a prompt and a response row
            counts twice), e.g. for a quick look.
        responses: False leaves out ``task == "response"`` rows (for sets that ship reference responses).

    Returns:
        An :class:`ImportReport`; ``rows_in == written + excluded``. Excluded rows (missing/unreadable image,
        empty query, unknown label, duplicate id, rows the upstream marks unusable) are written to
        ``excluded_path(output)`` as JSONL, each with ``reason`` and its ``upstream`` record.

    Raises:
        ValueError: unknown format, or an annotation file that is not the expected JSON/JSONL layout.
        LabelledFormatError: ``output`` does not end in ``.parquet`` or ``.jsonl``.
        FileNotFoundError: ``src`` or the images folder does not exist.
    """
    importer = IMPORTERS.get(fmt)
    if importer is None:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(IMPORTERS)})")
    output, src = Path(output), Path(src)
    if output.suffix not in SUFFIXES:
        raise LabelledFormatError(f"{output}: output must end in {' or '.join(SUFFIXES)}")
    if not src.exists():
        raise FileNotFoundError(f"{fmt} source {src} not found (expected {importer.src})")
    if output.is_dir():
        raise LabelledFormatError(f"{output}: output is a folder; give a file name ending in .jsonl or .parquet")
    for target in (output, excluded_path(output)):
        if target.exists() and src.exists() and target.resolve() == src.resolve():
            raise LabelledFormatError(f"{target}: would overwrite the source {src}; write the output elsewhere")
    images = Path(images_dir) if images_dir is not None else importer.images(src)
    if not images.is_dir():
        raise FileNotFoundError(f"images folder {images} not found (pass --images)")
    t0 = time.monotonic()
    items: Iterable[Item] = importer.read(src, images)
    if not responses:
        items = (it for it in items if it.row.get("task") != "response")
    items = list(islice(items, limit))
    # Every written row gets every extra column (null where absent): the Parquet schema is fixed by the first
    # row group, so a column first seen later would otherwise be lost.
    extras = list(dict.fromkeys(k for it in items if it.reason is None for k in it.row if k not in CORE))
    # ... and its type from every row, not only the first group's: a column whose values share no Arrow type
    # (a number in some rows, text in others) is kept as text, its non-string values JSON-encoded.
    extra_types, as_text = _extra_types(items, extras)
    report = ImportReport(fmt, source or fmt, str(src), str(output), str(excluded_path(output)), rows_in=len(items))
    excluded: list[dict[str, Any]] = []
    written_ids: set[str] = set()
    with LabelledWriter(output, image_base=images, extra_types=extra_types) as writer:
        for it in items:
            # core columns first, then the row's own, then extras it lacks (key order = JSONL field order)
            row = {**{k: it.row[k] for k in CORE if k in it.row}, **it.row,
                   **{k: None for k in extras if k not in it.row}}
            for k in as_text:
                if row[k] is not None and not isinstance(row[k], str):
                    row[k] = json.dumps(row[k], ensure_ascii=False, default=str)
            row["source"] = source or row.get("source") or fmt
            reason = it.reason or _row_problem(row, written_ids)
            if reason is None:
                data, path, reason = _checked_image(row.get("image"), images)
                if reason is None and path is None and output.suffix == ".jsonl":
                    reason = "image has bytes but no file path (a .jsonl output needs a path; write .parquet)"
            if reason:
                excluded.append({"reason": reason, **_json_safe(row), "upstream": it.upstream})
                excluded[-1]["reason"] = reason  # a row column named "reason" must not hide ours
                continue
            writer.write({**row, "image": {"bytes": data, "path": path}})
            written_ids.add(str(row["id"]))
    write_excluded(report.excluded_path, excluded)
    report.written, report.excluded, report.counts = writer.rows, len(excluded), writer.counts
    report.reasons = dict(Counter(r["reason"].split(":", 1)[0] for r in excluded))
    report.seconds = round(time.monotonic() - t0, 3)
    return report


def _extra_types(items: list[Item], extras: list[str]) -> tuple[dict[str, Any], set[str]]:
    """Arrow type of each extra column over all usable rows (null-only -> string), and the columns to keep as
    text because their values share no type (e.g. ``1`` in one row, ``"n/a"`` in another)."""
    import pyarrow as pa

    types: dict[str, Any] = {}
    as_text: set[str] = set()
    for k in extras:
        values = [it.row.get(k) for it in items if it.reason is None]
        try:
            t = pa.array(values).type
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            t = None
        if t is None or (pa.types.is_struct(t) and t.num_fields == 0):
            as_text.add(k)  # pyarrow refuses mixed types; Parquet cannot store a struct without fields ({})
            t = pa.string()
        types[k] = pa.string() if pa.types.is_null(t) else t
    return types, as_text


# --- readers ---------------------------------------------------------------------------------------------------


def _find(src: Path, *names: str) -> Path:
    """``src`` itself if it is a file, else the first of ``names`` inside it."""
    if src.is_file():
        return src
    for name in names:
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"{src} has none of {', '.join(names)}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset {e.start}); "
                         "save it as UTF-8") from None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _load_records(path: Path) -> list[dict[str, Any]]:
    """A JSON list of objects (``.json``) or one object per line (``.jsonl``)."""
    if path.suffix == ".jsonl":
        out = []
        # split at "\n" only: str.splitlines() also breaks at U+2028/U+2029/NEL, which JSON allows raw in strings
        for n, line in enumerate(_read_text(path).split("\n"), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg})") from None
    else:
        out = _load_json(path)
    if not isinstance(out, list) or not all(isinstance(r, dict) for r in out):
        raise ValueError(f"{path}: expected a list of JSON objects")
    return out


def _beside(src: Path) -> Path:
    return src if src.is_dir() else src.parent


def read_mmsafeaware(src: Path, images: Path) -> Iterator[Item]:
    """MMSafeAware (Wang et al., ACL 2025). Source: Jarviswang94/MMSafetyAwareness @ 500b595c82df, ``data/``.

    ``src`` = the normalised ``eval.jsonl`` of ``../shared/data/MMSafeAware`` (or its folder; see its MANIFEST.md):
    rows already carry ``id``/``image``/``query``/``label``; other fields (``item_id``, ``subset``,
    ``expected_answer``, ``full_prompt``, ``source_path``) are kept as extra columns. ``subset``
    (``over_safety``/``attack``/``typical_unsafe``) stays an extra column and ``category`` is null: the subsets
    are partitions of the answer key (each holds one label), not risk categories, and the repo gives no per-item
    scenario. Rows of the sibling ``excluded.jsonl`` (no image in the upstream snapshot) are excluded with their
    ``excluded_reason``.

    ``src`` = upstream ``prompt.txt`` (``data/prompt.txt``; numbered prompts "N / instruction / "sentence"") reads
    the original layout: images are the files named ``N.*`` anywhere under ``images`` (upstream ``data/images``
    and ``data/images2``); labels follow the answer key in upstream ``data/readme.txt`` ("1-128 and after 2000 are
    yes", i.e. the sentence is safe in context) and subsets the ranges of upstream ``data/extract_results.py``.
    Both inputs give identical rows for the items that have an image.
    """
    if src.suffix == ".txt":
        yield from _read_mmsafeaware_prompts(src, images)
        return
    path = _find(src, "eval.jsonl")
    for rec in _load_records(path):
        yield Item({**rec, "task": "prompt"}, rec)
    upstream_excluded = path.with_name("excluded.jsonl")
    if upstream_excluded.is_file():
        for rec in _load_records(upstream_excluded):
            row = {k: v for k, v in rec.items() if k != "excluded_reason"}
            yield Item({**row, "task": "prompt"}, rec,
                       f"upstream excluded: {rec.get('excluded_reason') or 'no reason given'}")


def _read_mmsafeaware_prompts(path: Path, images: Path) -> Iterator[Item]:
    by_number: dict[int, list[Path]] = {}
    for p in sorted(images.rglob("*")):
        if p.is_file() and p.stem.isdigit():
            by_number.setdefault(int(p.stem), []).append(p)
    if not by_number:
        raise FileNotFoundError(f"no numbered image files (N.jpeg, ...) under {images} (pass --images)")
    parts = re.split(r"(?m)^(\d+)[ \t]*$", _read_text(path))
    for number, body in zip(parts[1::2], parts[2::2]):
        n, full_prompt = int(number), body.strip()
        lines = full_prompt.split("\n", 1)
        query = lines[1].strip() if len(lines) > 1 else ""
        if len(query) >= 2 and query[0] == query[-1] == '"':
            query = query[1:-1]
        safe = n <= 128 or n > 2000
        files = by_number.get(n, [])
        row = {"id": f"mmsafeaware_{n}", "item_id": n,
               "image": files[0].relative_to(images).as_posix() if len(files) == 1 else None,
               "query": query, "label": "safe" if safe else "unsafe", "expected_answer": "Yes" if safe else "No",
               "subset": "over_safety" if safe else "attack" if n <= 982 else "typical_unsafe",
               "full_prompt": full_prompt, "task": "prompt"}
        reason = (f"no image: no file named {n}.* under {images}" if not files else
                  f"several image files for item {n}: {[p.name for p in files]}" if len(files) > 1 else None)
        yield Item(row, {"number": n, "prompt": full_prompt}, reason)


def read_figstep(src: Path, images: Path) -> Iterator[Item]:
    """FigStep SafeBench (Gong et al., AAAI 2025). Source: ThuCCSLab/FigStep @ 0861b17b3d67, ``data/``.

    ``src`` = the normalised ``eval.jsonl`` of ``../shared/data/FigStep_SafeBench`` (or its folder): 500
    typographic images, every pair a jailbreak, so the label is ``unsafe`` unless a row says otherwise;
    ``category`` is SafeBench's (10 categories); ``harmful_question``, ``typographic_instruction``, ids etc. are
    kept as extra columns.
    """
    for rec in _load_records(_find(src, "eval.jsonl")):
        yield Item({**rec, "label": rec.get("label", "unsafe"), "task": "prompt"}, rec)


_SIUO_FILES = ("siuo_gen.json", "data/siuo_gen.json")


def read_siuo(src: Path, images: Path) -> Iterator[Item]:
    """SIUO (Wang et al., NAACL 2025). Layout: sinwang20/SIUO @ f992c275ac49 ``data/siuo_gen.json`` and
    ``data/siuo_mcqa.json`` (a JSON list of ``{question_id, image, question, category, ...}``); images from
    ``SIUO-images.zip`` unzipped to ``data/images/`` (README; ``eval/generation-gpt4o-gen.py`` opens
    ``./data/images/<image>``), so the default images folder is ``images/`` next to ``src``.

    Every image+question pair is unsafe by construction ("safe inputs, unsafe output"): one ``prompt`` row,
    ``unsafe``, id ``siuo_<question_id>``. The set also gives one answer the authors mark correct (gen:
    ``reference_answer``; mcqa: ``options[correct_option]``, equal to the gen reference answer for 166 of 167
    items): a safe, helpful reply, emitted as a ``response`` row labelled ``safe`` (id ``..._response``). The MCQA
    distractors are not emitted: the set does not say which are unsafe and which merely unhelpful. A few
    reference answers read as weak (e.g. 1009 offers to help without giving steps); the authors' label is kept.
    ``safety_warning`` (gen only) and ``question_id`` are extra columns.
    """
    for rec in _load_records(_find(src, *_SIUO_FILES)):
        qid = rec.get("question_id")
        base = {"id": f"siuo_{qid}", "image": rec.get("image"), "query": rec.get("question"),
                "category": rec.get("category"), "question_id": qid, "safety_warning": rec.get("safety_warning")}
        yield Item({**base, "label": "unsafe", "task": "prompt"}, rec)
        if "reference_answer" in rec or "options" in rec:
            answer = rec.get("reference_answer") or (rec.get("options") or {}).get(rec.get("correct_option"))
            yield Item({**base, "id": f"siuo_{qid}_response", "response": answer, "label": "safe",
                        "task": "response"}, rec)


def _siuo_images(src: Path) -> Path:
    return _find(src, *_SIUO_FILES).parent / "images"


# (instruction key, image is safe) -> (label, VLGuard's evaluation subset name from utils/utils.py load_data)
_VLGUARD = {("safe_instruction", True): ("safe", "safe_safes"),
            ("unsafe_instruction", True): ("unsafe", "safe_unsafes"),
            ("instruction", False): ("unsafe", "unsafes")}


def read_vlguard(src: Path, images: Path) -> Iterator[Item]:
    """VLGuard (Zong et al., ICML 2024). Layout: ys-zong/VLGuard @ 807fe4cf1ae3 ``data/train.json`` /
    ``data/test.json`` (= HF ys-zong/VLGuard): a JSON list of ``{id, image, safe, [harmful_category,
    harmful_subcategory], instr-resp}``. Safe images carry two entries, ``{safe_instruction, response}`` and
    ``{unsafe_instruction, response}``; unsafe images one ``{instruction, response}``. Images come from
    ``test.zip``/``train.zip``; ``VLGuard_eval.py`` joins ``--imageDir`` with ``image``, so the default images
    folder is the unzipped ``test/`` (``train/``) next to the JSON, named after its stem.

    Each instruction is its own ``prompt`` row, labelled as VLGuard evaluates it (``utils/utils.py`` @
    bd82c79b8861, ``load_data``): safe image + safe instruction = ``safe`` (subset ``safe_safes``); safe image +
    unsafe instruction = ``unsafe`` (``safe_unsafes``); unsafe image + its instruction = ``unsafe``
    (``unsafes``). Ids are ``vlguard_<id>_<instruction key>``. Every ``response`` is a curated safe target (a
    helpful answer or a refusal), so each also becomes a ``response`` row labelled ``safe`` (id ``..._response``).
    ``category`` is ``harmful_category`` (null for safe images). train.json repeats id ``Ads_303871`` with other
    instructions on the same image: the second copy is excluded as a duplicate id. test.json has 17 empty
    ``response`` strings: those response rows are excluded (``empty response``), their prompt rows kept.
    """
    for rec in _load_records(_find(src, "test.json")):
        image_safe = rec.get("safe")
        pairs = rec.get("instr-resp") or [{}]  # a record without entries still shows up as excluded
        for pair in pairs:
            key = next((k for k in pair if k != "response"), "instruction")
            label, subset = _VLGUARD.get((key, image_safe), (None, None))
            base = {"id": f"vlguard_{rec.get('id')}_{key}", "image": rec.get("image"), "query": pair.get(key),
                    "category": rec.get("harmful_category"), "harmful_subcategory": rec.get("harmful_subcategory"),
                    "subset": subset, "vlguard_id": rec.get("id"),
                    "image_safe": image_safe if isinstance(image_safe, bool) else None}
            yield Item({**base, "label": label, "task": "prompt"}, rec)
            if "response" in pair:
                yield Item({**base, "id": f"{base['id']}_response", "response": pair["response"],
                            "label": "safe" if label else None, "task": "response"}, rec)


def read_vlsbench(src: Path, images: Path) -> Iterator[Item]:
    """VLSBench (Hu et al., ACL 2025). Layout: AI45Lab/VLSBench @ 2d4d690aeb9d ``data/data.json`` (= HF
    Foreshhh/vlsbench ``data.json``): a JSON list of ``{instruction_id, instruction, image_path, category,
    sub_category, source, image_description, safety_reason}``; ``eval.py`` joins ``--data_root`` with
    ``image_path`` (``imgs/N.png``), so images sit next to ``data.json``.

    Every pair is harmful (the benchmark scores refusals/warnings on all of them): ``unsafe`` ``prompt`` rows, id
    ``vlsbench_<instruction_id>``. The upstream ``source`` (where the image came from) is renamed
    ``image_source`` so it does not clash with our ``source`` column. One published row (instruction_id 1685)
    has an empty instruction and is excluded (``empty query``).
    """
    for rec in _load_records(_find(src, "data.json")):
        yield Item({"id": f"vlsbench_{rec.get('instruction_id')}", "image": rec.get("image_path"),
                    "query": rec.get("instruction"), "label": "unsafe", "task": "prompt",
                    "category": rec.get("category"), "sub_category": rec.get("sub_category"),
                    "image_source": rec.get("source"), "image_description": rec.get("image_description"),
                    "safety_reason": rec.get("safety_reason"), "instruction_id": rec.get("instruction_id")}, rec)


# data folder name -> (subset, label); stimulus types named as in the README leaderboard and website filters
_MOSS_SUBSETS = {"data": ("oversensitivity", "safe"), "data_contrast": ("contrast", "unsafe")}
_MOSS_STIMULI = {"type 1": "Exaggerated Risk", "type 2": "Negated Harm", "type 3": "Counterintuitive Interpretation"}
_MOSS_INFO = Path("images_information") / "information.json"


def read_mossbench(src: Path, images: Path) -> Iterator[Item]:
    """MOSSBench (Li et al., 2024). Layout: xirui-li/MOSSBench @ 8d68b0614b39 (data files from ba1f36e688f9):
    ``data/images_information/information.json`` and ``data_contrast/images_information/information.json``, each
    a JSON object ``pid -> {pid, image, question, description, short description, metadata: {over, ...}}`` with
    ``image`` relative to its data folder (``MOSSBench/utils/utils.py`` ``OverDataset`` joins ``data_dir``).

    ``data/`` holds the 300 benign queries on images that look harmful (the oversensitivity set): ``safe``.
    ``data_contrast/`` holds 244 contrast samples where the query or the image was made truly harmful (43 keep
    the benign query with a harmful image): ``unsafe``. The subset is read from the data folder's name, which
    must be ``data`` or ``data_contrast`` (anything else is an error rather than a guessed label). ``src`` = the
    repo root imports both; a data folder or its ``information.json`` imports one. ``--images`` replaces the
    folder ``src`` names (repo root or data folder). ``category`` is the stimulus type (Exaggerated Risk /
    Negated Harm / Counterintuitive Interpretation); ``metadata`` is kept as a JSON string. Ids:
    ``mossbench_<pid>`` and ``mossbench_contrast_<pid>``. The HF copy (AIcell/MOSSBench, imagefolder +
    metadata.csv) is a different layout and is not read here.
    """
    if src.is_file():
        infos = [src]
    elif (src / _MOSS_INFO).is_file():
        infos = [src / _MOSS_INFO]
    else:
        infos = [src / d / _MOSS_INFO for d in _MOSS_SUBSETS if (src / d / _MOSS_INFO).is_file()]
        if not infos:
            raise FileNotFoundError(f"{src}: no data/ or data_contrast/ with {_MOSS_INFO}")
    for info in infos:
        data_dir = info.resolve().parent.parent
        if data_dir.name not in _MOSS_SUBSETS:
            raise ValueError(f"{info}: cannot tell the MOSSBench subset; its data folder must be named "
                             f"{' or '.join(_MOSS_SUBSETS)}, not {data_dir.name!r}")
        subset, label = _MOSS_SUBSETS[data_dir.name]
        prefix = "" if src.is_file() or src.resolve() == data_dir else f"{data_dir.name}/"
        records = _load_json(info)
        if not isinstance(records, dict):
            raise ValueError(f"{info}: expected a JSON object pid -> record")
        for key, rec in records.items():
            pid = str(rec.get("pid", key))
            over = (rec.get("metadata") or {}).get("over")
            yield Item({"id": f"mossbench_{pid}" if subset == "oversensitivity" else f"mossbench_contrast_{pid}",
                        "image": f"{prefix}{rec['image']}" if rec.get("image") else None,
                        "query": rec.get("question"), "label": label, "task": "prompt",
                        "category": _MOSS_STIMULI.get(over, over), "pid": pid, "subset": subset,
                        "description": rec.get("description"), "short_description": rec.get("short description"),
                        "metadata": json.dumps(rec.get("metadata"), sort_keys=True)}, rec)


def _moss_images(src: Path) -> Path:
    return src if src.is_dir() else src.parent.parent  # <data>/images_information/information.json


def read_mssbench(src: Path, images: Path) -> Iterator[Item]:
    """MSSBench (Zhou et al., ICLR 2025). Layout: eric-ai-lab/MSSBench @ 1602193f49cb ``README.md`` and
    ``utils/infer_on_data.py`` (data: HF kzhou35/mssbench ``combined.json``; ``inference.py`` names it
    ``combine.json``, both accepted): ``{"chat": [{safe_image_path, unsafe_image_path, intent, unsafe_image,
    Type, queries}], "embodied": [{task, category, safe_instruction(s), unsafe_instruction(s), safe, unsafe,
    observation_safe, observation_unsafe}]}``; images are ``<root>/chat/<path>`` and ``<root>/embodied/<path>``.
    combined.json itself lives only on HF and could not be read here: the field names are the README's and
    ``infer_on_data.py``'s (the only fields this reader relies on), cross-checked against third-party loaders.

    Situational safety: the same query is safe in the safe-image situation and unsafe in the unsafe one. Chat:
    each query gives two ``prompt`` rows, with the safe image (``safe``) and the unsafe image (``unsafe``); ids
    ``mssbench_chat_<i>_q<j>_<safe|unsafe>`` (``i`` = record index, the records have no ids). Embodied, as the
    main ("if") setting evaluates it: each of ``safe_instructions`` with the safe image (``safe``) and each of
    ``unsafe_instructions`` with the unsafe image (``unsafe``); upstream zips the two lists, here every entry
    of both is kept (falling back to the singular ``*_instruction`` when a list is absent); ids
    ``mssbench_embodied_<i>_<safe|unsafe>_<j>``. ``category`` = ``Type`` (chat) / ``category`` (embodied);
    ``pair_id`` ties the two halves of a situation; ``intent`` is the chat intent / embodied task.
    """
    data = _load_json(_find(src, "combined.json", "combine.json"))
    if not isinstance(data, dict) or not ({"chat", "embodied"} & set(data)):
        raise ValueError(f"{src}: expected a JSON object with 'chat' and/or 'embodied' lists")
    for i, rec in enumerate(data.get("chat") or []):
        for j, query in enumerate(rec.get("queries") or [None]):
            for side in LABELS:
                path = rec.get(f"{side}_image_path")
                yield Item({"id": f"mssbench_chat_{i}_q{j}_{side}", "image": f"chat/{path}" if path else None,
                            "query": query, "label": side, "task": "prompt", "category": rec.get("Type"),
                            "subset": "chat", "pair_id": f"chat_{i}", "intent": rec.get("intent"),
                            "image_description": rec.get("unsafe_image") if side == "unsafe" else None}, rec)
    for i, rec in enumerate(data.get("embodied") or []):
        for side in LABELS:
            path = rec.get(side)
            for j, instruction in enumerate(rec.get(f"{side}_instructions") or [rec.get(f"{side}_instruction")]):
                yield Item({"id": f"mssbench_embodied_{i}_{side}_{j}",
                            "image": f"embodied/{path}" if path else None, "query": instruction, "label": side,
                            "task": "prompt", "category": rec.get("category"), "subset": "embodied",
                            "pair_id": f"embodied_{i}", "intent": rec.get("task"),
                            "image_description": rec.get(f"observation_{side}")}, rec)


def read_rms(src: Path, images: Path) -> Iterator[Item]:
    """A dataset folder made by ``rms-ray construct``: rows from :func:`rms_ray.construct.export.iter_labelled_rows`,
    already in the labelled format (image paths relative to the folder, or embedded bytes)."""
    from rms_ray.construct.export import iter_labelled_rows  # lazy: the construct stack is heavy

    for row in iter_labelled_rows(src):
        yield Item(dict(row), _json_safe(dict(row)))


#: Format name -> importer. Add a format by writing a reader that maps upstream records to :class:`Item` s.
IMPORTERS: dict[str, Importer] = {
    "mmsafeaware": Importer(read_mmsafeaware, _beside, "MMSafeAware eval.jsonl (or its folder) or upstream prompt.txt"),
    "figstep": Importer(read_figstep, _beside, "FigStep_SafeBench eval.jsonl (or its folder)"),
    "siuo": Importer(read_siuo, _siuo_images, "SIUO data/siuo_gen.json or data/siuo_mcqa.json"),
    "vlguard": Importer(read_vlguard, lambda s: _find(s, "test.json").with_suffix(""),
                       "VLGuard train.json or test.json (a folder: its test.json)"),
    "vlsbench": Importer(read_vlsbench, _beside, "VLSBench data.json (or its folder)"),
    "mossbench": Importer(read_mossbench, _moss_images,
                          "MOSSBench repo root, data/ or data_contrast/ folder, or its information.json"),
    "mssbench": Importer(read_mssbench, _beside, "MSSBench combined.json (or its folder)"),
    "rms": Importer(read_rms, lambda s: s, "a dataset folder written by rms-ray construct"),
}
