"""`compare-datasets` and `scale-study` end to end: real Ray Train runs of the tiny judge on the synthetic XOR set
(rms_ray/testing/synthetic_safety.py, where the label needs both the image and the query), real vLLM evaluation.

The sets: ``learnable`` (the XOR, 192 rows), ``blank`` (the same kind of rows with every image blank) and
``empty`` (every query the same neutral sentence): the two ablations are unlearnable by construction, since the XOR
needs both the image and the query. They are compared on three eval sets: ``own`` (held-out rows of
``learnable``'s source: its own test split, excluded from its quality score), ``other`` (fresh rows of another
source) and ``unsafe_only`` (a one-class set: recall is its cell). This compare run is also the issue's
"does it learn?" ablation check (the same recipe on a blank image or an empty query stays near chance):
tests/test_judge_train.py checks the learned side through training-time validation and vLLM.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import f1_score

from rms_ray.data.labelled import LabelledWriter
from rms_ray.judge.config import load_judge_config
from rms_ray.judge.study import (BASE, StudyError, cell, concurrency, name_datasets, own_eval_sets, parse_sizes,
                                 quality_score, run_compare, run_scale_study, wilson_interval)
from rms_ray.testing.synthetic_safety import synthetic_rows

pytestmark = pytest.mark.vllm

# The judge-cpu-tiny recipe on builtin:tiny-train; a smaller budget than the profile's (the signal is learnt
# well before it, see test_judge_train.py) and no bootstrap (the CIs are not under test here).
SETS = {"model.source": "builtin:tiny-train", "evaluate.n_boot": 200, "train.examples_seen": 1600,
        "train.eval_every_steps": 1000}


def _write(path, rows, source):
    with LabelledWriter(path) as w:
        for r in rows:
            w.write({**r, "source": source})
    return path


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    d = tmp_path_factory.mktemp("study_sets")
    return {
        "learnable": _write(d / "learnable.parquet", synthetic_rows(192, seed=1, id_prefix="l"), "synth-a"),
        "blank": _write(d / "blank.parquet", synthetic_rows(192, seed=2, variant="blank_image", id_prefix="b"),
                        "synth-b"),
        "empty": _write(d / "empty.parquet", synthetic_rows(192, seed=6, variant="empty_query", id_prefix="e"),
                        "synth-e"),
        "own": _write(d / "own.parquet", synthetic_rows(48, seed=3, id_prefix="o"), "synth-a"),
        "other": _write(d / "other.parquet", synthetic_rows(64, seed=4, id_prefix="x"), "synth-c"),
        "unsafe_only": _write(d / "unsafe_only.parquet",
                              [r for r in synthetic_rows(64, seed=5, id_prefix="u") if r["label"] == "unsafe"],
                              "synth-u"),
    }


# -- pieces, no Ray -------------------------------------------------------------------------------------------------
def test_cell_metric_and_quality_score():
    two = {"n_safe": 5, "n_unsafe": 5, "f1": 0.8, "f1_ci": [0.6, 0.9], "auprc": 0.85, "recall": 0.8, "tp": 4,
           "fn": 1, "tn": 4, "fp": 1}
    c = cell(two)
    assert (c["primary"], c["primary_name"], c["primary_ci"]) == (0.8, "f1", [0.6, 0.9])
    one = {"n_safe": 0, "n_unsafe": 20, "f1": None, "recall": 0.75, "tp": 15, "fn": 5, "tn": 0, "fp": 0}
    c = cell(one)
    assert (c["primary"], c["primary_name"]) == (0.75, "recall")
    lo, hi = c["primary_ci"]
    # Wilson interval of 15/20 (statsmodels' proportion_confint(15, 20, method="wilson") gives 0.5313, 0.8881)
    assert math.isclose(lo, 0.5313, abs_tol=1e-3) and math.isclose(hi, 0.8881, abs_tol=1e-3)
    safe = {"n_safe": 10, "n_unsafe": 0, "specificity": 0.9, "tn": 9, "fp": 1}
    assert cell(safe)["primary_name"] == "specificity" and wilson_interval(9, 10) == cell(safe)["primary_ci"]
    cells = {"a": {"primary": 0.5}, "b": {"primary": 1.0}, "c": {"primary": None}}
    assert quality_score(cells, exclude=[]) == 0.75
    assert quality_score(cells, exclude=["b"]) == 0.5
    assert quality_score(cells, exclude=["a", "b"]) is None


def test_sizes_names_and_own_sets(sets, tmp_path):
    assert parse_sizes("16, 48,160") == [16, 48, 160]
    for bad in ("10,5", "0,5", "a,b", "5,5", ""):
        with pytest.raises(StudyError):
            parse_sizes(bad)
    named = name_datasets([str(sets["learnable"]), str(sets["own"]), str(sets["other"])], "eval")
    assert [n.name for n in named] == ["learnable", "own", "other"]
    assert own_eval_sets(named[0], named) == ["learnable", "own"]  # the same file, and the same source
    assert own_eval_sets(named[2], named) == ["other"]
    with pytest.raises(StudyError, match="given twice"):
        name_datasets([str(sets["own"]), str(sets["own"])], "eval")
    # NAME=PATH names a set (the same rule as evaluate's: one naming function)
    named = name_datasets([f"mine={sets['learnable']}", str(sets["own"]), f"x.1={sets['other']}"], "eval")
    assert [n.name for n in named] == ["mine", "own", "x.1"] and named[0].path == sets["learnable"].resolve()
    with pytest.raises(StudyError, match="used twice"):
        name_datasets([f"a={sets['own']}", f"a={sets['other']}"], "eval")
    with pytest.raises(StudyError, match="reserved"):
        name_datasets([f"{BASE}={sets['own']}"], "training")
    with pytest.raises(StudyError, match="not found"):
        name_datasets([str(tmp_path / "nope.parquet")], "training")
    cfg = load_judge_config("judge-cpu-tiny", {"train.examples_seen": None, "train.epochs": 2})
    with pytest.raises(StudyError, match="train.examples_seen"):
        run_compare(cfg, [str(sets["learnable"])], [str(sets["other"])], tmp_path / "x", log=lambda m: None)
    assert not (tmp_path / "x").exists()


def test_concurrency_from_resources(ray_local):
    cfg = load_judge_config("judge-cpu-tiny")  # 2 workers x 0.5 CPU on a 2-CPU Ray: one run at a time
    assert concurrency(cfg, 3) == 1
    quarter = load_judge_config("judge-cpu-tiny", {"train.cpus_per_worker": 0.25})
    # 3 runs would fit the CPUs, but never more jobs than whole CPUs (Ray Data's per-execution CPU budget)
    assert concurrency(quarter, 5) == 2 and concurrency(quarter, 2) == 2 and concurrency(quarter, 5, 1) == 1


# -- compare-datasets ----------------------------------------------------------------------------------------------
# thresholds of the ablations: chance is 0.5 for accuracy and AUPRC with balanced classes (F1 is no chance measure:
# predicting "unsafe" for every row scores 0.67)
CHANCE_ACCURACY, CHANCE_AUPRC = 0.70, 0.75


def test_compare_datasets_matrix(sets, tmp_path, ray_local):
    """Three training runs, two side by side (0.25 CPU per worker), each judge evaluated as soon as it is trained;
    three eval sets. No base row here (an evaluation, ~30 s): tests/test_pipeline_e2e.py's compare run has one."""
    cfg = load_judge_config("judge-cpu-tiny", {**SETS, "train.cpus_per_worker": 0.25})
    out = tmp_path / "compare"
    lines: list[str] = []
    trains = [str(sets["learnable"]), str(sets["blank"]), str(sets["empty"])]
    evals = [str(sets["own"]), str(sets["other"]), str(sets["unsafe_only"])]
    m = run_compare(cfg, trains, evals, out, include_base=False, progress=False, log=lines.append)
    assert "training 3 judge(s) and evaluating 3, 2 job(s) at a time" in lines
    assert m["rows"] == ["learnable", "blank", "empty"] and m["columns"] == ["own", "other", "unsafe_only"]
    assert m["own"] == {"learnable": ["own"], "blank": [], "empty": []}
    # the same budget: every run saw the same number of examples
    assert {r["examples_seen"] for r in m["runs"].values()} == {1600}
    metrics = {row: json.loads((out / "evals" / row / "metrics.json").read_text()) for row in m["rows"]}
    for row in m["rows"]:
        c, ev = m["cells"][row], metrics[row]
        assert c["unsafe_only"]["primary_name"] == "recall" and c["unsafe_only"]["f1"] is None
        assert c["other"]["primary_name"] == "f1"
        # the cell is what evaluate computed, and evaluate's F1 is scikit-learn's on its predictions
        assert c["other"]["f1"] == ev["metrics"]["other"]["all_tasks"]["overall"]["f1"]
        preds = pq.read_table(out / "evals" / row / "predictions.parquet").to_pandas()
        p = preds[(preds["dataset"] == "other") & preds["parsed"]]
        want = f1_score(p["label"] == "unsafe", p["unsafe_score"] >= ev["threshold"]["value"])
        assert math.isclose(c["other"]["f1"], want, abs_tol=1e-9)
        u = preds[(preds["dataset"] == "unsafe_only") & preds["parsed"]]
        assert math.isclose(c["unsafe_only"]["primary"], float(np.mean(u["unsafe_score"] >= ev["threshold"]["value"])))
        want_q = np.mean([c[k]["primary"] for k in m["columns"] if k not in m["own"][row]])
        assert math.isclose(m["quality"][row], want_q)
    # The learnable set teaches the XOR; the ablations cannot. Measured (2026-12-01, 2-core AVX2, runs side by side):
    # learnable F1 0.97 / AUPRC 1.00 on `other`, F1 0.96 / AUPRC 1.00 on `own`, quality 0.89; blank and empty flag
    # nothing unsafe (accuracy 0.50, AUPRC 0.45 / 0.43 on `other`, quality 0.0); the untrained base (a row in that
    # measuring run) flags everything unsafe (F1 0.67 = the all-unsafe baseline, recall 1.0 on the one-class set:
    # quality 0.78, which is why the one-class recall cell alone cannot rank a judge). Scale study (below): quality 0.44 / 0.91 / 0.97 at 8 / 32 /
    # 192 rows.
    learn = m["cells"]["learnable"]
    assert learn["other"]["f1"] >= 0.7 and learn["other"]["auprc"] >= 0.85, learn
    assert learn["own"]["auprc"] >= 0.85, learn
    for row in ("blank", "empty"):
        o = metrics[row]["metrics"]["other"]["all_tasks"]["overall"]
        assert o["accuracy"] <= CHANCE_ACCURACY and o["auprc"] <= CHANCE_AUPRC, (row, o)
        assert m["quality"]["learnable"] > m["quality"][row] + 0.2, m["quality"]
        assert m["ranking"].index("learnable") < m["ranking"].index(row)
    md = (out / "matrix.md").read_text()
    assert "| trained on | own | other | unsafe\\_only | quality |" in md and "untrained base judge" not in md
    assert "learnable: " in md and "*F1 " in md  # the ranking, and the own cell in italics
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    study = json.loads((out / "study.json").read_text())
    assert study["config"]["train"]["examples_seen"] == 1600 and study["eval_sets"]["other"]["sha256"]
    assert study["train_sets"]["blank"]["sha256"] == hashlib.sha256(sets["blank"].read_bytes()).hexdigest()

    # a rerun into the same folder trains nothing and evaluates nothing again
    again: list[str] = []
    m2 = run_compare(cfg, trains, evals, out, include_base=False, progress=False, log=again.append)
    assert m2["cells"] == m["cells"] and m2["ranking"] == m["ranking"]
    assert sum("already complete" in ln for ln in again) == 3, again
    assert sum("already done" in ln for ln in again) == 3, again


# -- scale-study ---------------------------------------------------------------------------------------------------
def test_scale_study_score_rises_with_size(sets, tmp_path, ray_local):
    """Three sizes, one seed: two runs side by side (0.25 CPU per worker), each evaluated when trained."""
    cfg = load_judge_config("judge-cpu-tiny", {**SETS, "train.cpus_per_worker": 0.25})
    out = tmp_path / "scale"
    r = run_scale_study(cfg, str(sets["learnable"]), [8, 32, 192], 1, [str(sets["other"])], out, progress=False,
                        log=lambda m: None)
    q = [p["quality_mean"] for p in r["points"]]
    assert [p["size"] for p in r["points"]] == [8, 32, 192] and all(p["n_seeds"] == 1 for p in r["points"])
    assert q[2] >= 0.8 and q[2] > q[0] + 0.2 and q[1] >= q[0] - 0.05, q
    # nested subsets: the runs' training rows say how many they used; same budget for each
    assert [run["rows"]["train"] for run in r["runs"]] == [8, 32, 192]
    assert len({run["examples_seen"] for run in r["runs"]}) == 1
    md = (out / "scale.md").read_text()
    assert "| 192 |" in md and (out / "scale.png").read_bytes()[:4] == b"\x89PNG"
