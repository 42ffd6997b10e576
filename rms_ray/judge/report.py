"""The evaluation report: ``report.md`` (metric tables per dataset/task and category) plus two PNG plots.

Every file goes through :func:`rms_ray.common.io.atomic_write`, so a reader never sees a half-written report.
Plots use matplotlib's Agg canvas directly (no pyplot, no global backend change), like the taxonomy plot.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, precision_recall_curve

from rms_ray.common.io import atomic_write, write_text_atomic
from rms_ray.judge.metrics import (
    ALL_TASKS,
    N_BINS,
    NOTE_NO_BOOT,
    TASKS,
    calibration_bins,
    normalise_predictions,
)

REPORT_NAME = "report.md"
PR_PLOT_NAME = "pr_curves.png"
RELIABILITY_PLOT_NAME = "reliability.png"

_COLUMNS = ("n", "safe / unsafe", "acc", "bal. acc", "precision", "recall", "F1 [CI]", "F1 strict", "FPR", "FNR",
            "AUPRC [CI]", "AUROC", "ECE", "Brier", "unparseable")


# --------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------
def fmt(x: Any, digits: int = 3) -> str:
    """A metric for a table cell: ``n/a`` for ``None`` (undefined), else fixed ``digits`` decimals."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def _fmt_ci(x: Any, ci: Any) -> str:
    if x is None:
        return "n/a"
    return fmt(x) if not ci else f"{fmt(x)} [{fmt(ci[0])}, {fmt(ci[1])}]"


def _cell(text: Any) -> str:
    # Category names are free text: a "|" or newline would break the Markdown table.
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(name: str, m: dict[str, Any]) -> str:
    unp = m["n_unparseable"]
    unp_txt = f"{unp}" if not m["n"] else f"{unp} ({100 * unp / m['n']:.1f}%)"
    cells = [_cell(name), str(m["n"]), f"{m['n_safe']} / {m['n_unsafe']}", fmt(m["accuracy"]),
             fmt(m["balanced_accuracy"]), fmt(m["precision"]), fmt(m["recall"]), _fmt_ci(m["f1"], m["f1_ci"]),
             fmt(m["f1_strict"]), fmt(m["fpr"]), fmt(m["fnr"]), _fmt_ci(m["auprc"], m["auprc_ci"]),
             fmt(m["auroc"]), fmt(m["ece"]), fmt(m["brier"]), unp_txt]
    return "| " + " | ".join(cells) + " |"


def _table(first: str, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    lines = ["| " + " | ".join((first,) + _COLUMNS) + " |",
             "|" + "---|" + "---:|" * len(_COLUMNS)]
    lines += [_row(name, m) for name, m in rows]
    notes = [f"- *{_cell(name)}*: {note}" for name, m in rows for note in m.get("notes") or []
             if note != NOTE_NO_BOOT]  # stated once under "How to read"
    if notes:
        lines += ["", "Notes:", ""] + notes
    return lines


def _task_name(task: str) -> str:
    return "all tasks" if task == ALL_TASKS else task


def _sections(ds_result: dict[str, Any]) -> list[str]:
    return [t for t in (*TASKS, ALL_TASKS) if t in ds_result] + \
        [t for t in ds_result if t not in TASKS and t != ALL_TASKS]


def _iter_overall(metrics: dict[str, Any]):
    for ds, res in metrics.items():
        for task in _sections(res):
            yield ds, task, res[task]["overall"]


# --------------------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------------------
def _series(frame) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, y, scores) of the parsed rows of every dataset/task, in report order."""
    out = []
    for ds in sorted(frame["dataset"].unique()):
        for task in TASKS:
            part = frame[(frame["dataset"] == ds) & (frame["task"] == task) & frame["parsed"]]
            if len(part):
                out.append((f"{ds}/{task}", part["y"].to_numpy(), part["unsafe_score"].to_numpy()))
    return out


#: matplotlib is not thread-safe even without pyplot: its font and mathtext parsers (pyparsing) are shared, and two
#: threads drawing at once raised "ParseException ... (at char 0)" in a study training two judges side by side.
#: Every plot of the package is drawn under this lock (see :func:`serialised`).
PLOT_LOCK = threading.RLock()


def serialised(fn):
    """Decorator: run a plotting function under :data:`PLOT_LOCK` (plots take milliseconds; nothing waits long)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with PLOT_LOCK:
            return fn(*args, **kwargs)
    return wrapper


def new_figure(size: tuple[float, float]):
    """A matplotlib ``Figure`` on its own Agg canvas (no pyplot state: safe in threads, e.g. studies that train
    and evaluate several judges side by side). ``size`` in inches."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` atomically; returns ``path``."""
    # The temp name ends in ".tmp", so the format must be explicit.
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


@serialised
def plot_pr_curves(frame, path: str | Path, title: str = "Precision-recall (unsafe = positive)") -> list[str]:
    """Write a PNG of PR curves, one line per dataset/task whose parsed rows have both classes.

    Each line is :func:`sklearn.metrics.precision_recall_curve` drawn as a step function (as sklearn's
    ``PrecisionRecallDisplay``), with its AP in the legend and its unsafe rate (a random judge's precision)
    as a dashed baseline in the same colour.

    Args:
        frame: a frame from :func:`rms_ray.judge.metrics.normalise_predictions`.
        path: output ``.png`` (written atomically; parent folders created).
        title: figure title.

    Returns:
        Notes on series left out (one class only), for the report.
    """
    fig = new_figure((7.5, 5.5))
    ax = fig.subplots()
    notes = []
    drawn = 0
    for label, y, s in _series(frame):
        if y.min() == y.max():
            notes.append(f"{label}: one class only ({'unsafe' if y[0] else 'safe'}) among parsed rows, "
                         "no PR curve")
            continue
        precision, recall, _ = precision_recall_curve(y, s)
        ap = average_precision_score(y, s)
        line, = ax.plot(recall, precision, drawstyle="steps-post", lw=1.6,
                        label=f"{label}: AP={ap:.3f} (n={y.size}, unsafe {y.mean():.0%})")
        ax.axhline(y.mean(), color=line.get_color(), ls="--", lw=0.9, alpha=0.8)
        drawn += 1
    if not drawn:
        ax.text(0.5, 0.5, "no dataset/task with both classes", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7, loc="lower left")
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall (share of unsafe flagged)")
    ax.set_ylabel("precision")
    ax.set_title(title + "\n(dashed: unsafe rate = no-skill baseline)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, Path(path))
    return notes


@serialised
def plot_reliability(frame, path: str | Path, n_bins: int = N_BINS,
                     title: str = "Reliability of the unsafe score") -> list[str]:
    """Write a PNG reliability diagram: mean unsafe score vs observed unsafe rate per bin, and bin counts.

    Bins are those of ECE (:func:`rms_ray.judge.metrics.calibration_bins`). The top panel has one line per
    dataset/task with parsed rows (one-class sets included: their observed rate is 0 or 1) and the diagonal of
    perfect calibration; the bottom panel shows the row count of every bin (log scale).

    Args:
        frame: a frame from :func:`rms_ray.judge.metrics.normalise_predictions`.
        path: output ``.png`` (written atomically; parent folders created).
        n_bins: equal-width bins on [0, 1].
        title: figure title.

    Returns:
        Notes for the report (empty unless there is nothing to draw).
    """
    fig = new_figure((7.5, 7.0))
    top, bottom = fig.subplots(2, 1, gridspec_kw={"height_ratios": [3, 1.3]}, sharex=True)
    top.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfect calibration")
    series = _series(frame)
    width = 1.0 / n_bins / max(len(series), 1) * 0.9
    edges = np.linspace(0, 1, n_bins + 1)
    for i, (label, y, s) in enumerate(series):
        bins = calibration_bins(y, s, n_bins=n_bins)
        full = [b for b in bins if b["n"]]
        line, = top.plot([b["mean_score"] for b in full], [b["unsafe_rate"] for b in full], marker="o", ms=4,
                         lw=1.3, label=f"{label} (n={y.size})")
        bottom.bar(edges[:-1] + i * width + 0.05 / n_bins, [b["n"] for b in bins], width=width, align="edge",
                   color=line.get_color())
    notes = []
    if not series:
        top.text(0.5, 0.5, "no parsed rows", ha="center", va="center", transform=top.transAxes)
        notes.append("reliability diagram: no parsed rows to draw")
    top.legend(fontsize=7, loc="upper left")
    top.set_xlim(0, 1)
    top.set_ylim(-0.02, 1.02)
    top.set_ylabel("observed unsafe rate")
    top.set_title(title + f" ({n_bins} equal-width bins)", fontsize=10)
    top.grid(alpha=0.3)
    bottom.set_xlabel("unsafe score (top: bin mean; bottom: bin edges)")
    bottom.set_ylabel("rows per bin")
    if series:
        bottom.set_yscale("log")  # bins range from a handful of rows to most of the set
    bottom.set_xticks(edges)
    bottom.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_png(fig, Path(path))
    return notes


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------
def _thresholds(metrics: dict[str, Any]) -> list[float]:
    return sorted({m["threshold"] for _, _, m in _iter_overall(metrics) if m.get("threshold") is not None})


def _calibration_table(frame, ds: str) -> list[str]:
    lines = ["| task | bin | n | mean unsafe score | observed unsafe rate |", "|---|---|---:|---:|---:|"]
    any_row = False
    for task in TASKS:
        part = frame[(frame["dataset"] == ds) & (frame["task"] == task) & frame["parsed"]]
        for i, b in enumerate(calibration_bins(part["y"].to_numpy(), part["unsafe_score"].to_numpy())):
            if b["n"]:
                any_row = True
                # Bin 0 also holds a score of exactly 0 (sklearn calibration_curve's assignment).
                span = f"{'[' if i == 0 else '('}{b['lo']:.1f}, {b['hi']:.1f}]"
                lines.append(f"| {task} | {span} | {b['n']} | {fmt(b['mean_score'])} | {fmt(b['unsafe_rate'])} |")
    return lines if any_row else ["No parsed rows."]


def write_report(metrics: dict[str, Any], df: Any, out_dir: str | Path,
                 title: str = "Safety judge evaluation", meta: dict[str, Any] | None = None) -> Path:
    """Write ``report.md``, ``pr_curves.png`` and ``reliability.png`` into ``out_dir`` (each atomically).

    The report has: the run metadata (``meta``, e.g. judge id, prompt version, split), the decision threshold
    and where it came from, how to read the metrics, the two plots, and per dataset an overall table (one row
    per task and all tasks pooled), a per-category table per task, and the calibration bins. Undefined metrics
    show as ``n/a``, with the reason in the notes under the table.

    Args:
        metrics: the result of :func:`rms_ray.judge.metrics.evaluate_predictions`.
        df: the predictions table the metrics came from (pandas or pyarrow; used for the plots and bins).
        out_dir: output folder (created).
        title: report title.
        meta: run metadata shown as a table. Recognised keys: ``threshold_source`` (e.g. ``"chosen on
            <split> by max F1"``; shown next to the threshold) — every key/value is listed.

    Returns:
        Path of ``report.md``.

    Raises:
        ValueError: ``df`` is not a valid predictions table (see ``normalise_predictions``).
        OSError: ``out_dir`` is not writable.
    """
    out_dir = Path(out_dir)
    meta = dict(meta or {})
    frame = normalise_predictions(df)
    pr_notes = plot_pr_curves(frame, out_dir / PR_PLOT_NAME)
    rel_notes = plot_reliability(frame, out_dir / RELIABILITY_PLOT_NAME)

    first = next(iter(_iter_overall(metrics)), (None, None, {}))[2]
    ths = _thresholds(metrics)
    source = meta.get("threshold_source", "not stated (the fixed value passed to evaluate_predictions)")
    th_txt = ", ".join(f"`{t:g}`" for t in ths) if ths else "n/a"

    lines = [f"# {title}", ""]
    if meta:
        lines += ["| | |", "|---|---|"]
        lines += [f"| {_cell(k)} | {_cell(v if isinstance(v, str) else json.dumps(v, default=str))} |"
                  for k, v in meta.items()]
        lines.append("")
    lines += [(f"**Decision threshold:** {th_txt} (an item is flagged unsafe when `unsafe_score >= threshold`); "
              f"source: {source}."), ""]
    if len(ths) > 1:
        lines += ["Warning: the subsets were evaluated at different thresholds.", ""]
    ci, n_boot = first.get("ci_level"), first.get("n_boot")
    ci_txt = (f"- `[CI]`: {fmt(ci, 2)} percentile bootstrap interval over parsed rows ({n_boot} resamples with "
              f"replacement, seed {first.get('seed')}); resamples with one class only are skipped."
              if n_boot else "- No confidence intervals (n_boot = 0).")
    lines += [
        "## How to read this report", "",
        ("- Positive class = **unsafe**. Recall = share of unsafe items flagged (1 - recall = attack success "
         "rate against the judge); FPR = share of safe items flagged."),
        ("- **Unparseable** verdicts are never mapped to a class: they are excluded from every metric and counted "
         "(the `unparseable` column). `F1 strict` is the worst case: an unparseable unsafe item counts as missed, "
         "an unparseable safe item as a false alarm."),
        ci_txt,
        ("- AUPRC = average precision (scikit-learn `average_precision_score`); its no-skill baseline is the "
         "unsafe rate, not 0.5."),
        (f"- ECE = sum over {N_BINS} equal-width score bins of (bin share) x |mean unsafe score - observed unsafe "
         "rate| (Naeini et al. 2015; Guo et al. 2017, eq. 3, with the unsafe score as the probability). "
         "Brier = mean squared error of the unsafe score."),
        ("- `n/a` = undefined for this subset (e.g. one class only, or no parsed rows); the reason is in the "
         "notes under the table."),
        "",
        "## Plots", "",
        f"![Precision-recall curves]({PR_PLOT_NAME})", "",
        f"![Reliability diagram]({RELIABILITY_PLOT_NAME})", "",
    ]
    plot_notes = pr_notes + rel_notes
    if plot_notes:
        lines += ["Plot notes:", ""] + [f"- {_cell(n)}" for n in plot_notes] + [""]

    if not metrics:
        lines += ["No predictions to evaluate.", ""]
    for ds, res in metrics.items():
        lines += [f"## Dataset `{ds}`", "", "### Overall", ""]
        lines += _table("task", [(_task_name(t), res[t]["overall"]) for t in _sections(res)])
        lines.append("")
        for t in _sections(res):
            cats = res[t].get("by_category") or {}
            if not cats:
                continue
            lines += [f"### By category: {_task_name(t)}", ""]
            lines += _table("category", list(cats.items()))
            lines.append("")
        if ds in set(frame["dataset"]):
            lines += ["### Calibration bins", ""] + _calibration_table(frame, ds) + [""]
    return write_text_atomic(out_dir / REPORT_NAME, "\n".join(lines).rstrip() + "\n")
