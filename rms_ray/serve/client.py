"""Clients of the judge service and of OpenAI-compatible chat endpoints: bounded retries, one error per item.

* :func:`post_json` - one POST with bounded retries on 503/502/504/429 and connection errors (exponential backoff,
  ``Retry-After`` honoured up to the backoff cap); every other status is final.
* :class:`JudgeClient` - ``POST /v1/judge``.
* :func:`judge_file` - ``rms-ray judge --url``: a labelled file (or a folder of images with one ``--query``) through
  the service, results to Parquet (the atomic writer), progress bar. A request refused for one bad item is split
  into single items, so one bad image costs only its own row (recorded with the service's error message).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import httpx
import pyarrow as pa

#: Statuses worth another try: overload (503 from the bounded queue), a proxy or timeout in front, rate limits.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_CAP_S = 8.0


class ServiceCallError(Exception):
    """A request that failed for good: ``status`` (None for a connection failure) and the service's message."""

    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message = status, message


def error_message(r: httpx.Response) -> str:
    """The ``error.message`` of a JSON error body (this service's and OpenAI's shape), else the text (cut)."""
    try:
        body = r.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(body, dict) and body.get("detail"):
            return str(body["detail"])[:500]
    except ValueError:
        pass
    return (r.text or r.reason_phrase or "")[:500]


def post_json(client: httpx.Client, url: str, payload: Any, *, headers: dict[str, str] | None = None,
              retries: int = 3, backoff_s: float = 0.5, sleep: Callable[[float], None] = time.sleep) -> Any:
    """POST ``payload`` as JSON; the decoded JSON answer of a 200.

    Retries (at most ``retries`` more attempts) on :data:`RETRY_STATUSES` and on connection errors / timeouts,
    waiting ``backoff_s * 2**attempt`` (capped at 8 s; a ``Retry-After`` in seconds is used when larger, within
    the cap).

    Raises:
        ServiceCallError: a non-200 answer that is final, or the retries ran out.
    """
    last: ServiceCallError | None = None
    for attempt in range(retries + 1):
        try:
            r = client.post(url, json=payload, headers=headers)
        except httpx.TransportError as e:  # connection refused/reset, timeouts
            last = ServiceCallError(None, f"{type(e).__name__}: {e}"[:300])
        else:
            if r.status_code == 200:
                try:
                    return r.json()
                except ValueError:
                    raise ServiceCallError(200, "answer is not JSON") from None
            last = ServiceCallError(r.status_code, error_message(r))
            if r.status_code not in RETRY_STATUSES:
                raise last
        if attempt < retries:
            wait_s = min(BACKOFF_CAP_S, backoff_s * (2 ** attempt))
            if last.status is not None:
                ra = r.headers.get("retry-after", "")
                if ra.isdigit():
                    wait_s = min(BACKOFF_CAP_S, max(wait_s, float(ra)))
            sleep(wait_s)
    assert last is not None
    raise last


def bearer(token_env: str | None) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` from the environment variable ``token_env`` when it is set."""
    token = os.environ.get(token_env or "", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


class JudgeClient:
    """``POST {url}/v1/judge`` with bounded retries. Thread-safe (one ``httpx.Client``).

    Args:
        url: the service's base URL (``http://host:port``).
        token_env: environment variable holding the bearer token (None or unset: no header).
    """

    def __init__(self, url: str, *, token_env: str | None = None, timeout_s: float = 300.0, retries: int = 5,
                 backoff_s: float = 0.5) -> None:
        self.url = url.rstrip("/")
        self.headers = bearer(token_env)
        self.retries, self.backoff_s = retries, backoff_s
        self.http = httpx.Client(timeout=timeout_s, trust_env=False)

    def judge(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Judge ``items`` (``{"image": data URL, "query", "response"?, "task"?, "id"?}``); the response body.

        Raises:
            ServiceCallError: refused (4xx) or still failing after the retries.
        """
        return post_json(self.http, f"{self.url}/v1/judge", {"items": items}, headers=self.headers,
                         retries=self.retries, backoff_s=self.backoff_s)

    def close(self) -> None:
        self.http.close()


# -- rms-ray judge ---------------------------------------------------------------------------------------------
_S, _F, _B = pa.string(), pa.float64(), pa.bool_()
#: Columns of ``rms-ray judge``'s output (the prediction columns named as in evaluate's predictions.parquet).
JUDGE_OUTPUT_SCHEMA = pa.schema([
    ("id", _S), ("image", _S), ("query", _S), ("response", _S), ("task", _S), ("label", _S), ("category", _S),
    ("verdict", _S), ("unsafe_score", _F), ("judge_category", _S), ("rationale", _S), ("parsed", _B),
    ("error", _S), ("latency_ms", _F), ("judge", _S), ("prompt_version", _S)])


@dataclass
class _Row:
    meta: dict[str, Any]  # id, image (path or "<embedded>"), query, response, task, label, category
    item: dict[str, Any] | None  # the request item, or None when the image could not be read here
    error: str | None = None


def _labelled_rows(path: Path) -> Iterator[_Row]:
    from rms_ray.data.labelled import default_task, iter_rows, load_row_image
    from rms_ray.serve.inputs import to_data_url

    for batch in iter_rows(path, batch_size=64):
        for r in batch:
            data, ipath, err = load_row_image(r.get("image"), path.parent)
            task = default_task(r)
            meta = {"id": str(r.get("id")), "image": ipath or "<embedded>", "query": r.get("query"),
                    "response": r.get("response"), "task": task, "label": r.get("label"),
                    "category": None if r.get("category") is None else str(r.get("category"))}
            if err is not None or not isinstance(r.get("query"), str) or not r["query"].strip():
                yield _Row(meta, None, err or "empty query")
                continue
            item = {"image": to_data_url(data), "query": r["query"], "task": task, "id": meta["id"]}
            if r.get("response"):
                item["response"] = r["response"]
            yield _Row(meta, item)


def _folder_rows(folder: Path, query: str, extensions: Iterable[str]) -> Iterator[_Row]:
    from rms_ray.serve.inputs import to_data_url

    exts = {e.lower() for e in extensions}
    for p in sorted(x for x in folder.rglob("*") if x.is_file() and x.suffix.lower() in exts):
        rel = p.relative_to(folder).as_posix()
        meta = {"id": rel, "image": str(p), "query": query, "response": None, "task": "prompt", "label": None,
                "category": None}
        try:
            data = p.read_bytes()
        except OSError as e:
            yield _Row(meta, None, f"image unreadable: {e.strerror or e}")
            continue
        yield _Row(meta, {"image": to_data_url(data), "query": query, "task": "prompt", "id": rel})


def count_inputs(input_path: Path, extensions: Iterable[str]) -> int:
    """How many rows (labelled file) or images (folder) :func:`judge_file` will send (for the progress bar)."""
    if input_path.is_dir():
        exts = {e.lower() for e in extensions}
        return sum(1 for x in input_path.rglob("*") if x.is_file() and x.suffix.lower() in exts)
    from rms_ray.data.labelled import scan

    return scan(input_path).rows


def judge_file(url: str, input_path: str | Path, output: str | Path, *, query: str | None = None,
               token_env: str | None = None, batch_size: int = 8, concurrency: int = 4, retries: int = 5,
               timeout_s: float = 300.0, progress: bool = True,
               extensions: Iterable[str] = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"),
               ) -> dict[str, Any]:
    """Send a labelled file (``.jsonl``/``.parquet``) or a folder of images (with ``query``) to the judge service
    at ``url`` and write one row per input to ``output`` (Parquet, :data:`JUDGE_OUTPUT_SCHEMA`, atomically).

    At most ``concurrency`` requests of ``batch_size`` items are in flight; 503s are retried (``retries``, with
    backoff). A batch refused with a 4xx other than 401/403-auth is resent item by item, so a bad item gets its
    own error row. Returns counts ``{"rows", "judged", "unparseable", "failed", "seconds"}`` (``failed``: no
    answer from the judge for that row: unreadable image here, refused by the service, or retries used up).

    Raises:
        ValueError: a folder without ``query``, or a file that is not a labelled file (the reason named).
        FileNotFoundError: ``input_path`` does not exist.
        ServiceCallError: 401 (auth is all-or-nothing: stop at once rather than fail every row).
    """
    from rms_ray.common.io import write_parquet_atomic

    t0 = time.perf_counter()
    src = Path(input_path).expanduser()
    if not src.exists():
        raise FileNotFoundError(f"input {src} not found")
    if src.is_dir():
        if not query or not query.strip():
            raise ValueError("a folder of images needs --query (the text sent with every image)")
        rows_iter = _folder_rows(src, query, extensions)
    else:
        if query:
            raise ValueError("--query applies to a folder of images; a labelled file has its own queries")
        rows_iter = _labelled_rows(src)
    total = count_inputs(src, extensions)
    client = JudgeClient(url, token_env=token_env, timeout_s=timeout_s, retries=retries)
    out_rows: list[dict[str, Any]] = []
    lock = threading.Lock()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc="judge", unit="item", dynamic_ncols=True)

    def record(row: _Row, result: dict[str, Any] | None, body: dict[str, Any] | None, error: str | None) -> None:
        res = result or {}
        with lock:
            out_rows.append({**row.meta, "_failed": result is None, "verdict": res.get("verdict"),
                             "unsafe_score": res.get("unsafe_score"),
                             "judge_category": res.get("category"), "rationale": res.get("rationale"),
                             "parsed": bool(res.get("parsed")) if result else False,
                             "error": error or res.get("error"), "latency_ms": res.get("latency_ms"),
                             "judge": (body or {}).get("judge"), "prompt_version": (body or {}).get("prompt_version")})
            if bar is not None:
                bar.update(1)

    def send(batch: list[_Row]) -> None:
        try:
            body = client.judge([r.item for r in batch])  # type: ignore[misc]
        except ServiceCallError as e:
            if e.status == 401:
                raise
            if len(batch) > 1 and e.status is not None and 400 <= e.status < 500:
                for r in batch:  # find the bad item: one request each
                    send([r])
                return
            for r in batch:
                record(r, None, None, f"judge: {e}")
            return
        for r, res in zip(batch, body["results"]):
            record(r, res, body, None)

    in_flight: deque[Future] = deque()
    try:
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            batch: list[_Row] = []

            def flush() -> None:
                nonlocal batch
                if batch:
                    in_flight.append(pool.submit(send, batch))
                    batch = []
                while len(in_flight) >= 2 * concurrency:  # bounded: images of at most 2x concurrency batches held
                    done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
                    for f in done:
                        in_flight.remove(f)
                        f.result()

            for n, row in enumerate(rows_iter):
                row.meta["_n"] = n  # output in input order, whatever order the answers came in
                if row.item is None:
                    record(row, None, None, row.error)
                    continue
                batch.append(row)
                if len(batch) >= batch_size:
                    flush()
            flush()
            for f in list(in_flight):
                f.result()
    finally:
        client.close()
        if bar is not None:
            bar.close()
    out_rows.sort(key=lambda r: r["_n"])
    tbl = pa.Table.from_pylist([{k: r.get(k) for k in JUDGE_OUTPUT_SCHEMA.names} for r in out_rows],
                               schema=JUDGE_OUTPUT_SCHEMA)
    write_parquet_atomic(tbl, Path(output).expanduser())
    return {"rows": len(out_rows), "judged": sum(1 for r in out_rows if r["parsed"]),
            "unparseable": sum(1 for r in out_rows if not r["_failed"] and not r["parsed"]),
            "failed": sum(1 for r in out_rows if r["_failed"]),
            "seconds": round(time.perf_counter() - t0, 3)}
