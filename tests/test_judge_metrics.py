"""Tests for rms_ray.judge.metrics and rms_ray.judge.report, each metric checked against scikit-learn/numpy."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image
from sklearn.calibration import calibration_curve
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from rms_ray.judge.metrics import (
    METRIC_KEYS,
    NOTE_NO_BOOT,
    UNCATEGORISED,
    binary_metrics,
    calibration_bins,
    choose_threshold,
    evaluate_predictions,
)
from rms_ray.judge.report import write_report

# An undefined metric must come back as None, never as sklearn's 0-with-a-warning or a numpy 0/0.
pytestmark = [pytest.mark.filterwarnings("error::sklearn.exceptions.UndefinedMetricWarning"),
              pytest.mark.filterwarnings("error::RuntimeWarning")]

# Ties (0.3 x3, 0.7 x2) and scores exactly at the 0.5 threshold (0.5 x3).
LABELS = ["safe", "safe", "unsafe", "safe", "unsafe", "unsafe", "safe", "unsafe", "unsafe", "safe", "unsafe", "safe"]
SCORES = [0.1, 0.3, 0.3, 0.3, 0.5, 0.5, 0.5, 0.7, 0.7, 0.9, 0.95, 0.05]
Y = np.array([1 if v == "unsafe" else 0 for v in LABELS])


def _synthetic(n: int, seed: int = 0, sep: float = 0.35) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    s = np.clip(rng.normal(0.35 + sep * y, 0.2), 0, 1)
    return y, s


def _assert_plain_json(obj) -> None:
    """Only plain Python types, and no NaN (json.dumps refuses NaN with allow_nan=False)."""
    json.dumps(obj, allow_nan=False)

    def walk(o):
        if isinstance(o, dict):
            for k, v in o.items():
                assert type(k) is str
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)
        else:
            assert o is None or type(o) in (int, float, str, bool), (o, type(o))

    walk(obj)


# --------------------------------------------------------------------------------------------------------------
# binary_metrics
# --------------------------------------------------------------------------------------------------------------
def test_binary_metrics_match_sklearn_with_ties_and_threshold_on_scores():
    m = binary_metrics(LABELS, SCORES, 0.5, n_boot=0)
    pred = (np.array(SCORES) >= 0.5).astype(int)
    tn, fp, fn, tp = confusion_matrix(Y, pred, labels=[0, 1]).ravel()
    # By hand: >= 0.5 flags 0.5 x3, 0.7 x2, 0.9, 0.95 -> unsafe 0.5 x2, 0.7 x2, 0.95 = 5 TP; safe 0.5, 0.9 = 2 FP.
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (tp, fp, tn, fn) == (5, 2, 4, 1)
    assert m["n"] == m["n_parsed"] == 12 and (m["n_safe"], m["n_unsafe"]) == (6, 6)
    assert m["n_unparseable"] == 0 and m["coverage"] == 1.0
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(Y, pred))
    assert m["precision"] == pytest.approx(precision_score(Y, pred))
    assert m["recall"] == pytest.approx(recall_score(Y, pred))
    assert m["specificity"] == pytest.approx(recall_score(Y, pred, pos_label=0))
    assert m["f1"] == pytest.approx(f1_score(Y, pred)) == pytest.approx(10 / 13)
    assert m["f1_strict"] == pytest.approx(m["f1"])
    assert m["fpr"] == pytest.approx(fp / (fp + tn)) and m["fnr"] == pytest.approx(fn / (fn + tp))
    assert m["auprc"] == pytest.approx(average_precision_score(Y, SCORES))
    assert m["auroc"] == pytest.approx(roc_auc_score(Y, SCORES))
    assert m["brier"] == pytest.approx(brier_score_loss(Y, SCORES))
    assert m["threshold"] == 0.5 and m["notes"] == [NOTE_NO_BOOT] and list(m) == list(METRIC_KEYS)
    _assert_plain_json(m)


def test_threshold_is_inclusive():
    # Nudging the threshold just above 0.5 un-flags the three rows that sit exactly on it.
    at = binary_metrics(LABELS, SCORES, 0.5, n_boot=0)
    above = binary_metrics(LABELS, SCORES, math.nextafter(0.5, 1.0), n_boot=0)
    assert (at["tp"], at["fp"]) == (5, 2)
    assert (above["tp"], above["fp"]) == (3, 1)
    assert binary_metrics([1, 0], [0.3, 0.2], 0.3, n_boot=0)["tp"] == 1


@pytest.mark.parametrize("kind", ["list", "numpy", "pandas", "pyarrow", "ints", "bools"])
def test_input_types_agree(kind):
    ref = binary_metrics(LABELS, SCORES, 0.5, n_boot=50)
    labels, scores = {
        "list": (LABELS, SCORES),
        "numpy": (np.array(LABELS), np.array(SCORES)),
        "pandas": (pd.Series(LABELS), pd.Series(SCORES)),
        "pyarrow": (pa.array(LABELS), pa.array(SCORES)),
        "ints": (Y.tolist(), SCORES),
        "bools": (Y.astype(bool), SCORES),
    }[kind]
    assert binary_metrics(labels, scores, 0.5, n_boot=50) == ref


def test_one_class_unsafe():
    scores = [0.1, 0.4, 0.5, 0.8, 0.9]
    m = binary_metrics(["unsafe"] * 5, scores, 0.5)
    assert m["recall"] == pytest.approx(recall_score([1] * 5, [0, 0, 1, 1, 1])) == pytest.approx(0.6)
    assert m["fnr"] == pytest.approx(0.4)  # = attack success rate against the judge
    for key in ("precision", "f1", "balanced_accuracy", "auprc", "auroc", "f1_ci", "auprc_ci", "fpr",
                "specificity", "f1_strict"):
        assert m[key] is None, key
    assert m["accuracy"] == pytest.approx(0.6)
    assert m["brier"] == pytest.approx(np.mean((np.array(scores) - 1) ** 2))
    assert any(n.startswith("one class only (unsafe): precision, F1") and "report recall" in n for n in m["notes"])
    _assert_plain_json(m)


def test_one_class_safe():
    m = binary_metrics(["safe"] * 4, [0.1, 0.6, 0.7, 0.2], 0.5)
    assert m["fpr"] == pytest.approx(0.5) and m["specificity"] == pytest.approx(0.5)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (0, 2, 2, 0)
    for key in ("precision", "recall", "fnr", "f1", "auprc", "auroc", "balanced_accuracy", "f1_ci", "auprc_ci"):
        assert m[key] is None, key
    assert any(n.startswith("one class only (safe)") for n in m["notes"])


def test_nothing_flagged_precision_none_f1_zero():
    m = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], 0.9, n_boot=0)
    assert m["precision"] is None and any("precision is undefined" in n for n in m["notes"])
    assert m["f1"] == 0.0 == f1_score([0, 1, 1], [0, 0, 0], zero_division=0.0)
    assert m["recall"] == 0.0 and m["fpr"] == 0.0


def test_unparseable_rows_excluded_and_counted():
    labels = LABELS + ["unsafe", "unsafe", "safe"]
    # Their scores, if used, would change every metric (and one is NaN, one None).
    scores = SCORES + [0.0, np.nan, None]
    parsed = [True] * 12 + [False, False, False]
    m = binary_metrics(labels, scores, 0.5, parsed=parsed, n_boot=100, seed=3)
    ref = binary_metrics(LABELS, SCORES, 0.5, n_boot=100, seed=3)
    for key in METRIC_KEYS:
        if key not in ("n", "n_safe", "n_unsafe", "n_unparseable", "coverage", "f1_strict", "notes"):
            assert m[key] == ref[key], key
    assert (m["n"], m["n_parsed"], m["n_unparseable"]) == (15, 12, 3)
    assert (m["n_safe"], m["n_unsafe"]) == (7, 8)
    assert m["coverage"] == pytest.approx(12 / 15)
    # Worst case: the two unparseable unsafe rows are misses, the unparseable safe row a false alarm.
    y_all = np.array([1 if v == "unsafe" else 0 for v in labels])
    strict_pred = np.r_[(np.array(SCORES) >= 0.5).astype(int), [0, 0, 1]]
    assert m["f1_strict"] == pytest.approx(f1_score(y_all, strict_pred)) == pytest.approx(10 / 16)
    assert m["f1_strict"] < m["f1"]


def test_parsed_defaults_to_finite_score_and_scoreless_parsed_is_unparseable():
    m = binary_metrics(["unsafe", "safe", "unsafe"], [0.9, 0.2, None], 0.5, n_boot=0)
    assert m["n_unparseable"] == 1 and m["tp"] == 1 and m["tn"] == 1
    m2 = binary_metrics(["unsafe", "safe", "unsafe"], [0.9, 0.2, None], 0.5, parsed=[True, True, True], n_boot=0)
    assert m2["n_unparseable"] == 1 and any("no finite score" in n for n in m2["notes"])


def test_all_unparseable_and_empty():
    m = binary_metrics(["safe", "unsafe", "unsafe"], [None, None, None], 0.5, parsed=[False, False, False])
    assert (m["n"], m["n_parsed"], m["n_unparseable"], m["coverage"]) == (3, 0, 3, 0.0)
    for key in ("accuracy", "balanced_accuracy", "precision", "recall", "f1", "fpr", "fnr", "auprc", "auroc",
                "ece", "brier", "f1_ci", "auprc_ci", "specificity"):
        assert m[key] is None, key
    assert m["f1_strict"] == 0.0  # both unsafe rows missed
    assert any("no parsed rows" in n for n in m["notes"])
    _assert_plain_json(m)
    e = binary_metrics([], [], 0.5)
    assert e["n"] == 0 and e["coverage"] is None and e["f1"] is None and e["f1_strict"] is None
    assert any("no rows" in n for n in e["notes"])
    _assert_plain_json(e)


@pytest.mark.parametrize("bad, match", [
    ({"labels": ["safe", "maybe"], "scores": [0.1, 0.2]}, "labels must be"),
    ({"labels": ["safe", None], "scores": [0.1, 0.2]}, "labels must be"),
    ({"labels": [0, 2], "scores": [0.1, 0.2]}, "labels must be"),
    ({"labels": ["safe"], "scores": [0.1, 0.2]}, "shape"),
    ({"labels": ["safe", "unsafe"], "scores": [0.1, 1.2]}, r"\[0, 1\]"),
    ({"labels": ["safe"], "scores": [0.1], "threshold": float("nan")}, "threshold"),
    ({"labels": ["safe"], "scores": [0.1], "ci": 1.0}, "ci"),
])
def test_binary_metrics_rejects_bad_input(bad, match):
    kwargs = {"threshold": 0.5, **bad}
    with pytest.raises(ValueError, match=match):
        binary_metrics(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------
def test_ece_hand_computed():
    # Bins: 0.05 -> [0, .1]: |.05 - 0| ; 0.15 x2 -> (.1, .2]: |.15 - .5| ; 0.85 -> (.8, .9]: |.85 - 1| ;
    # 0.95 -> (.9, 1]: |.95 - 1|.  ECE = (1*.05 + 2*.35 + 1*.15 + 1*.05) / 5 = 0.19.
    m = binary_metrics([0, 0, 1, 1, 1], [0.05, 0.15, 0.15, 0.85, 0.95], 0.5, n_boot=0)
    assert m["ece"] == pytest.approx(0.19)
    # A perfectly calibrated bin structure has ECE 0; 0 and 1 land in the first and last bins.
    assert binary_metrics([0, 1], [0.0, 1.0], 0.5, n_boot=0)["ece"] == pytest.approx(0.0)
    bins = calibration_bins([0, 1], [0.0, 1.0])
    assert bins[0]["n"] == 1 and bins[-1]["n"] == 1 and sum(b["n"] for b in bins) == 2


def test_calibration_bins_match_sklearn_calibration_curve():
    y, s = _synthetic(500, seed=4)
    s = np.round(s, 1)  # many scores exactly on bin edges
    bins = calibration_bins(y, s)
    prob_true, prob_pred = calibration_curve(y, s, n_bins=10, strategy="uniform")
    full = [b for b in bins if b["n"]]
    assert [b["unsafe_rate"] for b in full] == pytest.approx(prob_true)
    assert [b["mean_score"] for b in full] == pytest.approx(prob_pred)
    assert sum(b["n"] for b in bins) == 500
    ece = sum(b["n"] / 500 * abs(b["mean_score"] - b["unsafe_rate"]) for b in full)
    assert binary_metrics(y, s, 0.5, n_boot=0)["ece"] == pytest.approx(ece)


# --------------------------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------------------------
def test_bootstrap_matches_sklearn_per_resample():
    y, s = _synthetic(60, seed=1)
    s = np.round(s, 1)  # ties, some exactly at the threshold
    assert (s == 0.5).sum() >= 3
    m = binary_metrics(y, s, 0.5, n_boot=300, seed=7, ci=0.9)
    # Independent recomputation: same draws, sklearn F1/AP on each resample, one-class resamples skipped.
    idx = np.random.default_rng(7).integers(0, 60, size=(300, 60))
    f1s, aps = [], []
    for r in idx:
        if y[r].min() == y[r].max():
            continue
        f1s.append(f1_score(y[r], s[r] >= 0.5))
        aps.append(average_precision_score(y[r], s[r]))
    assert m["f1_ci"] == pytest.approx(np.percentile(f1s, [5, 95]).tolist())
    assert m["auprc_ci"] == pytest.approx(np.percentile(aps, [5, 95]).tolist())
    assert m["n_boot_skipped"] == 300 - len(f1s) == 0


def test_bootstrap_skips_and_counts_one_class_resamples():
    y, s = [1, 0, 0, 0, 0], [0.9, 0.2, 0.6, 0.1, 0.3]
    m = binary_metrics(y, s, 0.5, n_boot=200, seed=0)
    idx = np.random.default_rng(0).integers(0, 5, size=(200, 5))
    one_class = int(sum(np.asarray(y)[r].min() == np.asarray(y)[r].max() for r in idx))
    assert one_class > 0 and m["n_boot_skipped"] == one_class
    assert any(f"{one_class} of 200 bootstrap resamples" in n for n in m["notes"])


def test_bootstrap_ci_contains_estimate_reproducible_and_narrows():
    y, s = _synthetic(2000, seed=2)
    big = binary_metrics(y, s, 0.5, n_boot=300, seed=11)
    small = binary_metrics(y[:150], s[:150], 0.5, n_boot=300, seed=11)
    for m in (big, small):
        assert m["f1_ci"][0] <= m["f1"] <= m["f1_ci"][1]
        assert m["auprc_ci"][0] <= m["auprc"] <= m["auprc_ci"][1]
    assert binary_metrics(y, s, 0.5, n_boot=300, seed=11) == big
    assert binary_metrics(y, s, 0.5, n_boot=300, seed=12)["f1_ci"] != big["f1_ci"]

    def width(ci):
        return ci[1] - ci[0]

    assert width(big["f1_ci"]) < width(small["f1_ci"]) / 2
    assert width(big["auprc_ci"]) < width(small["auprc_ci"]) / 2


# --------------------------------------------------------------------------------------------------------------
# choose_threshold
# --------------------------------------------------------------------------------------------------------------
def _brute_force_threshold(y, s) -> float:
    cands = np.unique(s)
    f1s = np.array([f1_score(y, s >= t, zero_division=0.0) for t in cands])
    return float(cands[np.flatnonzero(f1s >= f1s.max() - 1e-12)].min())


@pytest.mark.parametrize("seed", range(6))
def test_choose_threshold_equals_brute_force(seed):
    y, s = _synthetic(150, seed=seed, sep=0.2)
    s = np.round(s, 2)  # ties
    assert choose_threshold(y, s) == _brute_force_threshold(y, s)


def test_choose_threshold_tie_goes_to_smallest_and_ignores_unparseable():
    # Thresholds 0.2 and 0.4 both give F1 = 2/3 (0.2: P=1/2 R=1; 0.4: P=1 R=1/2): the smaller is chosen.
    y, s = [0, 0, 1, 1], [0.2, 0.2, 0.4, 0.2]
    assert _brute_force_threshold(np.array(y), np.array(s)) == 0.2 == choose_threshold(y, s)
    # An unparseable row with an extreme score must not become a candidate.
    assert choose_threshold(y + [1], s + [0.01], parsed=[True] * 4 + [False]) == 0.2


@pytest.mark.parametrize("labels, scores, parsed, match", [
    (["unsafe", "unsafe"], [0.2, 0.9], None, "one class only"),
    (["safe"], [0.2], None, "one class only"),
    ([], [], None, "no parsed rows"),
    (["safe", "unsafe"], [None, None], [False, False], "no parsed rows"),
])
def test_choose_threshold_errors(labels, scores, parsed, match):
    with pytest.raises(ValueError, match=match):
        choose_threshold(labels, scores, parsed=parsed)
    with pytest.raises(ValueError, match="rule"):
        choose_threshold([0, 1], [0.1, 0.9], rule="youden")


# --------------------------------------------------------------------------------------------------------------
# evaluate_predictions + report
# --------------------------------------------------------------------------------------------------------------
def _frame() -> pd.DataFrame:
    rows = [
        # dataset A, prompt: 2 categories + one null category; one unparseable row
        ("A", "prompt", "unsafe", "weapons", 0.9, True),
        ("A", "prompt", "unsafe", "weapons", 0.4, True),
        ("A", "prompt", "safe", "weapons", 0.6, True),
        ("A", "prompt", "safe", "drugs", 0.1, True),
        ("A", "prompt", "unsafe", "drugs", 0.8, True),
        ("A", "prompt", "safe", None, 0.2, True),
        ("A", "prompt", "unsafe", None, None, False),
        # dataset A, response: all unsafe
        ("A", "response", "unsafe", "weapons", 0.7, True),
        ("A", "response", "unsafe", "weapons", 0.3, True),
        ("A", "response", "unsafe", "", 0.95, True),
        # dataset B, prompt only
        ("B", "prompt", "safe", "fraud", 0.05, True),
        ("B", "prompt", "unsafe", "fraud", 0.75, True),
        ("B", "prompt", "safe", "fraud", 0.55, True),
        ("B", "prompt", "unsafe", "fraud", 0.65, True),
    ]
    return pd.DataFrame(rows, columns=["dataset", "task", "label", "category", "unsafe_score", "parsed"])


def test_evaluate_predictions_nested_structure_and_counts():
    df = _frame()
    res = evaluate_predictions(df, threshold=0.5, n_boot=20)
    _assert_plain_json(res)
    assert list(res) == ["A", "B"]
    assert list(res["A"]) == ["prompt", "response", "all_tasks"]
    assert list(res["B"]) == ["prompt", "all_tasks"]
    ap = res["A"]["prompt"]
    assert list(ap["by_category"]) == ["drugs", "weapons", UNCATEGORISED]
    o = ap["overall"]
    assert (o["n"], o["n_parsed"], o["n_unparseable"], o["n_safe"], o["n_unsafe"]) == (7, 6, 1, 3, 4)
    assert (o["tp"], o["fp"], o["tn"], o["fn"]) == (2, 1, 2, 1)
    w = ap["by_category"]["weapons"]
    assert (w["n"], w["tp"], w["fp"], w["tn"], w["fn"]) == (3, 1, 1, 0, 1)
    u = ap["by_category"][UNCATEGORISED]
    assert (u["n"], u["n_parsed"], u["tn"], u["n_unparseable"]) == (2, 1, 1, 1)
    assert u["recall"] is None and u["fpr"] == 0.0  # its only parsed row is safe
    r = res["A"]["response"]
    assert r["overall"]["f1"] is None and r["overall"]["recall"] == pytest.approx(2 / 3)
    assert list(r["by_category"]) == ["weapons", UNCATEGORISED]  # "" -> uncategorised
    at = res["A"]["all_tasks"]["overall"]
    assert (at["n"], at["tp"], at["fp"], at["tn"], at["fn"]) == (10, 4, 1, 2, 2)
    assert res["A"]["all_tasks"]["by_category"]["weapons"]["n"] == 5
    b = res["B"]["prompt"]["overall"]
    assert (b["tp"], b["fp"], b["tn"], b["fn"]) == (2, 1, 1, 0)
    assert b == res["B"]["all_tasks"]["overall"]
    # Each overall equals binary_metrics on that subset.
    sub = df[(df.dataset == "A") & (df.task == "prompt")]
    assert o == binary_metrics(sub.label, sub.unsafe_score, 0.5, parsed=sub.parsed, n_boot=20)
    # The same table as pyarrow gives the same result.
    assert evaluate_predictions(pa.Table.from_pandas(df), threshold=0.5, n_boot=20) == res


def test_evaluate_predictions_validates_table():
    with pytest.raises(ValueError, match="lacks column"):
        evaluate_predictions(_frame().drop(columns=["label"]))
    bad = _frame()
    bad.loc[0, "task"] = "image"
    with pytest.raises(ValueError, match="task must be"):
        evaluate_predictions(bad)


def test_write_report(tmp_path):
    df = _frame()
    res = evaluate_predictions(df, threshold=0.5, n_boot=50)
    meta = {"judge": "llavaguard-7b", "prompt_version": "judge-v3", "threshold_source": "chosen on val by max F1"}
    path = write_report(res, df, tmp_path / "rep", title="Judge eval", meta=meta)
    assert path == tmp_path / "rep" / "report.md"
    text = path.read_text()
    assert text.startswith("# Judge eval")
    assert "llavaguard-7b" in text and "judge-v3" in text and "chosen on val by max F1" in text
    assert "`0.5`" in text
    o = res["A"]["prompt"]["overall"]
    row = next(line for line in text.splitlines() if line.startswith("| prompt | 7 |"))
    assert f"{o['f1']:.3f} [{o['f1_ci'][0]:.3f}, {o['f1_ci'][1]:.3f}]" in row
    assert f"{o['auprc']:.3f} [{o['auprc_ci'][0]:.3f}, {o['auprc_ci'][1]:.3f}]" in row
    assert f"| {o['accuracy']:.3f} |" in row and f"| {o['auroc']:.3f} |" in row and f"| {o['ece']:.3f} |" in row
    assert "| 3 / 4 |" in row and "| 1 (14.3%) |" in row
    resp = next(line for line in text.splitlines() if line.startswith("| response | 3 |"))
    assert "n/a" in resp and f"| {2 / 3:.3f} |" in resp
    assert "- *response*: one class only (unsafe): precision, F1" in text  # the note under the table
    assert "### By category: prompt" in text and "| weapons | 3 |" in text
    assert "A/response: one class only (unsafe)" in text  # PR curve left out, with a note
    for name in ("pr_curves.png", "reliability.png"):
        assert f"]({name})" in text
        with Image.open(tmp_path / "rep" / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
            im.verify()
    assert sorted(p.name for p in (tmp_path / "rep").iterdir()) == ["pr_curves.png", "reliability.png", "report.md"]


def test_write_report_one_class_and_unparseable_only(tmp_path):
    df = pd.DataFrame({"dataset": ["X"] * 3, "task": ["prompt"] * 3, "label": ["unsafe"] * 3,
                       "category": [None] * 3, "unsafe_score": [None] * 3, "parsed": [False] * 3})
    res = evaluate_predictions(df, n_boot=10)
    path = write_report(res, df, tmp_path, meta={})
    text = path.read_text()
    assert "no parsed rows" in text and "n/a" in text
    for name in ("pr_curves.png", "reliability.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()


def test_write_report_empty_table_without_bootstrap(tmp_path):
    df = pd.DataFrame({c: [] for c in ("dataset", "task", "label", "category", "unsafe_score", "parsed")})
    res = evaluate_predictions(df, n_boot=0)
    assert res == {}
    text = write_report(res, df, tmp_path).read_text()
    assert "No predictions to evaluate." in text and "reliability diagram: no parsed rows" in text
    df2 = pd.DataFrame({"dataset": ["x", "x"], "task": ["prompt"] * 2, "label": ["safe", "unsafe"],
                        "unsafe_score": [0.2, 0.8]})  # no category/parsed columns: optional
    text2 = write_report(evaluate_predictions(df2, n_boot=0), df2, tmp_path).read_text()
    assert "No confidence intervals (n_boot = 0)." in text2 and "n_boot = 0: no confidence" not in text2
    assert "| uncategorised | 2 | 1 / 1 |" in text2
