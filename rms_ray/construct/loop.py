"""Construction of RMS samples for a batch of images: the self-adaptive generate-verify-regenerate loop.

Per image (after the paper's image-oriented recipe, arXiv 2509.04403; details where the abstract is silent are
ours and documented in README "Method and choices"):

1. **Scene analysis** (image): description, setting, entities and free-text hazards this scene makes possible.
   In the same batched call, **image-alone verification**: is the image harmful by itself? An unsafe image
   cannot be fixed by rewriting text, so its candidates are rejected at once (reason recorded), not regenerated.
2. For each of the first ``queries_per_image`` hazards, a candidate runs up to ``max_rounds`` rounds of:
   **query synthesis** (image + scene + hazard), **guidance response** (image + query + hazard), then three
   **verifications** as separate calls: the query alone (text only) is safe; the pair is risky; the response is
   safe. A failed query check (alone unsafe, or pair not risky) regenerates query and response; a failed response
   check regenerates only the response. Every failure reason is fed back into the next round's prompt.
3. After ``max_rounds`` a candidate that still fails is rejected with every reason of every round.
4. **The safe side** (``generation.contrast``, on by default), so that a judge trained on the dataset sees both
   labels of both tasks. Per image with candidates, a **contrast query**: a benign request about the same scene,
   verified ``safe`` *with* the image (``verify_contrast``). Per candidate, a **naive response**: one that
   complies with the risky query without noticing the risk, verified ``unsafe`` by ``verify_response``. Each has
   its own budget of ``max_rounds`` attempts with the failure fed back, like the candidates. Both ride in the
   same batched calls as the candidates' steps: contrast queries from round 1 beside query synthesis; a naive
   response beside the guidance response of the same query (so a sample accepted in round 1 usually has it
   without an extra engine step). A naive response belongs to its query: when the query fails its checks, the
   naive response goes with it and its budget restarts for the next query. A sample accepted with a failed naive
   response keeps regenerating only that until its attempts are spent (at most ``max_rounds - 1`` extra rounds).
   A contrast query or naive response that still fails is recorded with its reason and never rejects the
   image's or the sample's accepted rows.

Every stage is one batched engine call over all images/candidates of the batch still in play. Output that does
not parse or fit its schema is re-asked ``parse_retries`` times (sampling at ``retry_temperature``) and otherwise
recorded as a failure with the raw text; nothing here raises on model output.
"""

from __future__ import annotations

import hashlib
import io
import itertools
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from rms_ray.common.config import ConstructConfig
from rms_ray.engine.vllm_engine import Engine, GenRequest
from rms_ray.construct.prompts import feedback_block, load_prompt, prompt_versions
from rms_ray.construct.schemas import parse_output, stage_schemas


@dataclass
class ImageInput:
    """A normalised image entering construction. ``data`` is RGB JPEG/PNG bytes from :mod:`rms_ray.data.images`."""

    image_id: str
    image_path: str
    data: bytes
    meta: dict[str, Any] = field(default_factory=dict)  # sha256, phash, width, height, ... copied into rows

    def pil(self) -> Image.Image:
        img = Image.open(io.BytesIO(self.data))
        img.load()
        return img.convert("RGB")


@dataclass
class SideText:
    """A text with its own verification and ``max_rounds`` budget: an image's contrast query or a candidate's
    naive response. Between rounds, ``text`` is set only once it passed (``status == "accepted"``)."""

    text: str | None = None
    verdict: tuple[str, str] | None = None  # (verdict, reason) of the latest attempt's verification, if it parsed
    feedback: list[str] = field(default_factory=list)
    attempts: int = 0
    status: str = "pending"  # pending | accepted | failed
    failure: str | None = None  # the latest failure, "round N <what>: ..."
    tokens: int = 0

    def start(self) -> None:
        """Count one generation attempt; the previous verdict was about another text."""
        self.attempts += 1
        self.verdict = None

    def fail(self, rnd: int, problem: str, max_rounds: int) -> None:
        """Record a failure, feed it back into the next attempt, and give up when the budget is spent."""
        self.text, self.failure, self.feedback = None, f"round {rnd} {problem}", [problem]
        if self.attempts >= max_rounds:
            self.status = "failed"

    def check(self, rnd: int, name: str, value: Any, err: str | None, good: str, max_rounds: int) -> None:
        """Apply a verification answer: ``good`` verdict accepts the text, anything else is a failure."""
        if err:
            self.fail(rnd, f"verify_{name}: {err}", max_rounds)
            return
        self.verdict = (value["verdict"], value["reason"])
        if value["verdict"] == good:
            self.status = "accepted"
        else:
            self.fail(rnd, f"{name}={value['verdict']}: {value['reason']}", max_rounds)

    def columns(self, names: tuple[str, str, str, str]) -> dict[str, Any]:
        """Row columns ``(text, rounds, verdict, reason)``: the text when accepted (else null), attempts made, the
        latest attempt's verdict, and the verifier's reason when accepted or the latest failure otherwise."""
        text, rounds, verdict, reason = names
        return {
            text: self.text if self.status == "accepted" else None,
            rounds: self.attempts,
            verdict: self.verdict[0] if self.verdict else None,
            reason: self.verdict[1] if self.status == "accepted" else self.failure,
        }


#: Row columns of the safe side, null when ``generation.contrast`` switched that part off.
CONTRAST_COLUMNS = ("contrast_query", "contrast_rounds", "verdict_contrast", "reason_contrast")
NAIVE_COLUMNS = ("naive_response", "naive_rounds", "verdict_naive_response", "reason_naive_response")


@dataclass
class Candidate:
    """One (hazard -> query -> guidance response) attempt for one image, across rounds."""

    image: int  # index into the batch
    k: int  # candidate index within its image
    hazard: str
    why_here: str
    query: str | None = None
    response: str | None = None
    verdicts: dict[str, tuple[str, str]] = field(default_factory=dict)  # check -> (verdict, reason)
    reasons: list[str] = field(default_factory=list)  # every failure, "round N <stage>: ..."
    feedback_query: list[str] = field(default_factory=list)
    feedback_response: list[str] = field(default_factory=list)
    rounds: int = 0
    status: str = "pending"  # pending | accepted | rejected
    failed_stage: str | None = None
    raw_text: str | None = None
    tokens: int = 0
    naive: SideText | None = None  # None when generation.contrast.naive_response is off


@dataclass
class ImageOutcome:
    """All rows one image produced. ``status``: accepted (>= 1 accepted sample) or rejected."""

    image_id: str
    status: str
    accepted: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    gen_tokens: int


def request_seed(base: int, *parts: Any) -> int:
    """A per-request sampling seed from stable identifiers, independent of batch composition (31-bit int)."""
    digest = hashlib.sha256(repr((base, *parts)).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class Constructor:
    """Runs the loop above for a batch of images with an engine.

    Args:
        cfg: the validated run config (generation settings are read from ``cfg.generation``).
        engine: anything with ``generate(list[GenRequest]) -> list[GenResult]``.
        model_id: recorded in every row.
    """

    def __init__(self, cfg: ConstructConfig, engine: Engine, model_id: str) -> None:
        self.cfg = cfg
        self.gen = cfg.generation
        self.engine = engine
        self.model_id = model_id
        self.prompt_versions = prompt_versions()
        self.schemas = stage_schemas(self.gen.text_limits, self.gen.queries_per_image, self.gen.max_hazards)

    # -- engine calls -------------------------------------------------------------------------------------------
    def _request(self, stage: str, image: Image.Image | None, max_tokens: int, seed_parts: tuple,
                 trusted: dict | None = None, data: dict | None = None) -> GenRequest:
        tmpl = load_prompt(stage)
        system, user = tmpl.render(trusted=trusted, data=data)
        return GenRequest(
            system=system, user=user, schema=self.schemas[stage], max_tokens=max_tokens,
            image=image if tmpl.needs_image else None,
            temperature=self.gen.temperature, top_p=self.gen.top_p,
            seed=request_seed(self.gen.seed, stage, *seed_parts),
            tag=(stage, *seed_parts),  # not sent to the model: says which step a request is, to whoever observes
        )

    def _ask(self, requests: list[GenRequest]) -> list[tuple[Any | None, str | None, str, int]]:
        """Generate, re-asking unparseable outputs. Returns per request (value, error, last raw text, tokens)."""
        results: list[tuple[Any | None, str | None, str, int]] = [(None, "not generated", "", 0)] * len(requests)
        todo = list(range(len(requests)))
        for attempt in range(self.gen.parse_retries + 1):
            if not todo:
                break
            batch = [requests[i] for i in todo]
            if attempt:
                batch = [
                    GenRequest(**{**r.__dict__, "temperature": self.gen.retry_temperature,
                                  "seed": request_seed(r.seed, "retry", attempt)})
                    for r in batch
                ]
            outs = self.engine.generate(batch)
            still = []
            for i, req, out in zip(todo, batch, outs):
                value, err = parse_output(out.text, req.schema)
                spent = results[i][3] + out.num_tokens
                if out.finish_reason and out.finish_reason.startswith("error"):
                    err = f"engine refused the request: {out.finish_reason[len('error: '):]}"
                elif err and out.finish_reason == "length":
                    err = f"{err} (cut at max_tokens={req.max_tokens})"
                results[i] = (value, err, out.text, spent)
                if err:
                    still.append(i)
            todo = still
        return results

    # -- the loop -----------------------------------------------------------------------------------------------
    def construct(self, images: list[ImageInput]) -> list[ImageOutcome]:
        """Build samples for ``images``; returns one outcome per image, in order. Never raises on model output."""
        g = self.gen
        pils = [im.pil() for im in images]
        scene_reqs, image_reqs = [], []
        for i, im in enumerate(images):
            scene_reqs.append(self._request(
                "scene_analysis", pils[i], g.max_tokens.scene, (im.image_id,),
                trusted={"max_hazards": g.max_hazards, "min_hazards": g.queries_per_image}))
            image_reqs.append(self._request(
                "verify_image_alone", pils[i], g.max_tokens.verify, (im.image_id,)))
        answers = self._ask(scene_reqs + image_reqs)
        scenes, image_checks = answers[: len(images)], answers[len(images):]

        image_tokens = [s[3] + c[3] for s, c in zip(scenes, image_checks)]
        image_rejections: dict[int, dict[str, Any]] = {}
        candidates: list[Candidate] = []
        for i in range(len(images)):
            scene, err, raw, _ = scenes[i]
            check, cerr, craw, _ = image_checks[i]
            if err:
                image_rejections[i] = {"stage": "scene_analysis", "reasons": [f"scene_analysis: {err}"], "raw_text": raw}
                continue
            if cerr or check["verdict"] != "safe":
                reason = f"verify_image_alone: {cerr}" if cerr else f"image_alone=unsafe: {check['reason']}"
                image_rejections[i] = {"stage": "verify_image_alone", "reasons": [reason], "raw_text": craw if cerr else None,
                                       "scene": scene, "verdict_image_alone": None if cerr else check["verdict"],
                                       "reason_image_alone": None if cerr else check["reason"]}
                continue
            for k, hz in enumerate(scene["hazards"][: g.queries_per_image]):
                c = Candidate(image=i, k=k, hazard=hz["hazard"], why_here=hz["why_here"],
                              naive=SideText() if g.contrast.naive_response else None)
                c.verdicts["image_alone"] = ("safe", check["reason"])
                candidates.append(c)
        # one contrast query per image that has candidates: only those can end up accepted
        contrasts = ({c.image: SideText() for c in candidates} if g.contrast.query else {})

        plain_scenes = [s[0] for s in scenes]
        for rnd in itertools.count(1):
            if rnd > g.max_rounds:  # a candidate's budget is spent; only naive responses of accepted ones go on
                for c in candidates:
                    if c.status == "pending":
                        c.status = "rejected"
            live = [c for c in candidates if c.status == "pending"]
            live_contrast = [(i, s) for i, s in contrasts.items() if s.status == "pending"]
            live_naive = [c for c in candidates
                          if c.naive is not None and c.naive.status == "pending" and c.status != "rejected"]
            if not (live or live_contrast or live_naive):
                break
            self._round(rnd, live, live_contrast, live_naive, images, pils, plain_scenes)

        for c in candidates:
            if c.status == "pending":
                c.status = "rejected"
        for i, s in contrasts.items():
            image_tokens[i] += s.tokens
        return self._outcomes(images, plain_scenes, candidates, image_rejections, image_tokens, contrasts)

    def _round(self, rnd: int, live: list[Candidate], live_contrast: list[tuple[int, SideText]],
               live_naive: list[Candidate], images: list[ImageInput], pils: list[Image.Image],
               scenes: list[Any]) -> None:
        """One round: three batched engine calls (generate queries, generate responses, verify), each also
        carrying the contrast queries and naive responses still in play. With ``generation.contrast`` off the
        extra lists are empty and the calls are exactly the candidates' own."""
        g = self.gen
        for c in live:
            c.rounds, c.failed_stage = rnd, None
        # 1. queries for candidates without one (first round, or a failed query check), and contrast queries
        need_q = [c for c in live if c.query is None]
        need_cq = [(i, s) for i, s in live_contrast if s.text is None]
        answers = self._ask([
            self._request("query_synthesis", pils[c.image], g.max_tokens.query,
                          (images[c.image].image_id, c.k, rnd),
                          trusted={"feedback": feedback_block(c.feedback_query)},
                          data={"scene": _scene_brief(scenes[c.image]), "hazard": {"hazard": c.hazard, "why_here": c.why_here}})
            for c in need_q
        ] + [
            self._request("contrast_query", pils[i], g.max_tokens.contrast_query, (images[i].image_id, rnd),
                          trusted={"feedback": feedback_block(s.feedback)},
                          data={"scene": _scene_brief(scenes[i]),
                                "hazards": [h["hazard"] for h in scenes[i]["hazards"]]})
            for i, s in need_cq
        ])
        for c, (value, err, raw, tok) in zip(need_q, answers):
            c.tokens += tok
            if err:
                self._fail(c, rnd, "query_synthesis", err, raw, regenerate_query=True)
            else:
                c.query = value["query"]
        for (i, s), (value, err, _, tok) in zip(need_cq, answers[len(need_q):]):
            s.start()
            s.tokens += tok
            if err:
                s.fail(rnd, f"contrast_query: {err}", g.max_rounds)
            else:
                s.text = value["query"]
        # 2. guidance responses for candidates with a query but no response; naive responses for the same queries
        need_r = [c for c in live if c.query is not None and c.response is None]
        need_n = [c for c in live_naive if c.query is not None and c.naive.text is None]
        answers = self._ask([
            self._request("guidance_response", pils[c.image], g.max_tokens.response,
                          (images[c.image].image_id, c.k, rnd),
                          trusted={"feedback": feedback_block(c.feedback_response)},
                          data={"query": c.query, "hazard": c.hazard})
            for c in need_r
        ] + [
            self._request("naive_response", pils[c.image], g.max_tokens.naive_response,
                          (images[c.image].image_id, c.k, rnd),
                          trusted={"feedback": feedback_block(c.naive.feedback)},
                          data={"query": c.query, "hazard": c.hazard})
            for c in need_n
        ])
        for c, (value, err, raw, tok) in zip(need_r, answers):
            c.tokens += tok
            if err:
                self._fail(c, rnd, "guidance_response", err, raw, regenerate_query=False)
            else:
                c.response = value["response"]
        for c, (value, err, _, tok) in zip(need_n, answers[len(need_r):]):
            c.naive.start()
            c.tokens += tok
            if err:
                c.naive.fail(rnd, f"naive_response: {err}", g.max_rounds)
            else:
                c.naive.text = value["response"]
        # 3. three verifications per complete candidate, plus one per new contrast query / naive response:
        #    one batched call
        ready = [c for c in live if c.query is not None and c.response is not None]
        check_c = [(i, s) for i, s in live_contrast if s.text is not None]
        check_n = [c for c in live_naive if c.naive.text is not None]
        reqs: list[GenRequest] = []
        for c in ready:
            ids = (images[c.image].image_id, c.k, rnd)
            reqs.append(self._request("verify_query_alone", None, g.max_tokens.verify, ids,
                                      data={"query": c.query}))
            reqs.append(self._request("verify_pair", pils[c.image], g.max_tokens.verify, ids,
                                      data={"query": c.query, "hazard": c.hazard}))
            reqs.append(self._request("verify_response", pils[c.image], g.max_tokens.verify, ids,
                                      data={"query": c.query, "response": c.response}))
        for i, s in check_c:
            reqs.append(self._request("verify_contrast", pils[i], g.max_tokens.verify, (images[i].image_id, rnd),
                                      data={"query": s.text}))
        for c in check_n:  # the guidance response's judge, which must find this one unsafe
            reqs.append(self._request("verify_response", pils[c.image], g.max_tokens.verify,
                                      (images[c.image].image_id, c.k, "naive", rnd),
                                      data={"query": c.query, "response": c.naive.text}))
        va = self._ask(reqs)
        extra = va[3 * len(ready):]
        for (i, s), (value, err, _, tok) in zip(check_c, extra):
            s.tokens += tok
            s.check(rnd, "contrast", value, err, "safe", g.max_rounds)
        # naive verdicts before the candidates' checks: a failed query check below discards this naive response
        for c, (value, err, _, tok) in zip(check_n, extra[len(check_c):]):
            c.tokens += tok
            c.naive.check(rnd, "naive_response", value, err, "unsafe", g.max_rounds)
        for j, c in enumerate(ready):
            (qv, qe, qraw, qt), (pv, pe, praw, pt), (rv, re_, rraw, rt) = va[3 * j: 3 * j + 3]
            c.tokens += qt + pt + rt
            query_problems, response_problems = [], []
            for name, value, err, raw, good, problems in (
                ("query_alone", qv, qe, qraw, "safe", query_problems),
                ("pair", pv, pe, praw, "risky", query_problems),
                ("response", rv, re_, rraw, "safe", response_problems),
            ):
                if err:
                    problems.append(f"verify_{name}: {err}")
                    c.raw_text = raw
                    continue
                c.verdicts[name] = (value["verdict"], value["reason"])
                if value["verdict"] != good:
                    problems.append(f"{name}={value['verdict']}: {value['reason']}")
            if not query_problems and not response_problems:
                c.status, c.failed_stage = "accepted", None
                continue
            c.failed_stage = "verify"
            for p in query_problems + response_problems:
                c.reasons.append(f"round {rnd} {p}")
            if query_problems:  # the query itself must change; its response goes with it
                c.feedback_query, c.feedback_response = query_problems, []
                c.query = c.response = None
                self._reset_naive(c)
            else:
                c.feedback_response, c.response = response_problems, None

    @staticmethod
    def _reset_naive(c: Candidate) -> None:
        # A naive response answers one query: a new query gets a fresh one with a fresh budget.
        if c.naive is not None:
            c.naive = SideText()

    @staticmethod
    def _fail(c: Candidate, rnd: int, stage: str, err: str, raw: str, regenerate_query: bool) -> None:
        c.reasons.append(f"round {rnd} {stage}: {err}")
        c.failed_stage, c.raw_text = stage, raw
        if regenerate_query:
            c.query = c.response = None
            Constructor._reset_naive(c)
        else:
            c.response = None

    # -- rows ---------------------------------------------------------------------------------------------------
    def _common(self, im: ImageInput, scene: dict | None) -> dict[str, Any]:
        return {
            "image_id": im.image_id,
            "image_path": im.image_path,
            **im.meta,
            "scene_description": scene["description"] if scene else None,
            "scene_setting": scene["setting"] if scene else None,
            "scene_entities": list(scene["entities"]) if scene else None,
            "model_id": self.model_id,
            "prompt_versions": self.prompt_versions,
        }

    def _outcomes(self, images, scenes, candidates, image_rejections, image_tokens, contrasts) -> list[ImageOutcome]:
        per_image: dict[int, list[Candidate]] = {}
        for c in candidates:
            per_image.setdefault(c.image, []).append(c)
        outcomes = []
        for i, im in enumerate(images):
            accepted, rejected = [], []
            if i in image_rejections:
                rej = image_rejections[i]
                rejected.append({**self._common(im, rej.get("scene") or scenes[i]), "sample_id": f"{im.image_id}-img",
                                 "candidate_index": -1, "stage": rej["stage"], "reasons": rej["reasons"],
                                 "raw_text": rej.get("raw_text"), "rounds": 0,
                                 "verdict_image_alone": rej.get("verdict_image_alone"),
                                 "reason_image_alone": rej.get("reason_image_alone")})
            for c in per_image.get(i, []):
                row = {
                    **self._common(im, scenes[i]),
                    "sample_id": f"{im.image_id}-{c.k}",
                    "candidate_index": c.k,
                    "hazard": c.hazard,
                    "hazard_rationale": c.why_here,
                    "query": c.query,
                    "response": c.response,
                    "rounds": c.rounds,
                    "reasons": list(c.reasons),
                    **{f"verdict_{name}": c.verdicts.get(name, (None, None))[0]
                       for name in ("image_alone", "query_alone", "pair", "response")},
                    **{f"reason_{name}": c.verdicts.get(name, (None, None))[1]
                       for name in ("image_alone", "query_alone", "pair", "response")},
                    # the image's contrast query is repeated on each of its rows: data/ stays one table
                    **(contrasts[i].columns(CONTRAST_COLUMNS) if i in contrasts
                       else dict.fromkeys(CONTRAST_COLUMNS)),
                    **(c.naive.columns(NAIVE_COLUMNS) if c.naive is not None
                       else dict.fromkeys(NAIVE_COLUMNS)),
                }
                if c.status == "accepted":
                    accepted.append(row)
                else:
                    rejected.append({**row, "stage": c.failed_stage or "verify", "raw_text": c.raw_text})
            tokens = image_tokens[i] + sum(c.tokens for c in per_image.get(i, []))
            outcomes.append(ImageOutcome(im.image_id, "accepted" if accepted else "rejected", accepted, rejected, tokens))
        return outcomes


def _scene_brief(scene: dict[str, Any]) -> dict[str, Any]:
    return {"description": scene["description"], "setting": scene["setting"], "entities": scene["entities"]}
