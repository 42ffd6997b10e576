"""``rms-ray`` command line: construct datasets, check configs, build the tiny local model."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml
from typer.core import TyperCommand

from rms_ray.common.config import CONFIG_DIR, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build real-world multimodal safety (RMS) datasets with Ray Data + vLLM.")

#: Exit code of a run stopped by Ctrl-C (128 + SIGINT, what shells report).
EXIT_INTERRUPTED = 130
_KEY_VALUE = re.compile(r"^[A-Za-z_][\w.]*=")  # a config override: dotted key, then "="


def expand_set_values(args: list[str]) -> list[str]:
    """``--set a=1 b=2`` -> ``--set a=1 --set b=2``: after a ``--set`` value, every following token that looks
    like KEY=VALUE (a dotted name, then ``=``) is one more override. Anything else (an option, a dataset path of
    ``evaluate``, ``--``) ends the run, so positional arguments keep working."""
    out: list[str] = []
    in_set = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            out += args[i:]
            break
        if a == "--set" and i + 1 < len(args):
            out += [a, args[i + 1]]
            in_set, i = True, i + 2
            continue
        if a.startswith("--set="):
            in_set = True
        elif in_set and _KEY_VALUE.match(a):
            out += ["--set", a]
            i += 1
            continue
        else:
            in_set = False
        out.append(a)
        i += 1
    return out


class _SetCommand(TyperCommand):
    """A command whose ``--set`` takes several KEY=VALUE tokens (see :func:`expand_set_values`)."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_set_values(list(args)))


#: Options of the study commands that take several values after one flag (``--train D1 D2 --eval E1 E2``).
MULTI_VALUE = ("--train", "-t", "--eval", "-e")


def expand_multi_values(args: list[str], names: tuple[str, ...] = MULTI_VALUE) -> list[str]:
    """``--train a b --eval c`` -> ``--train a --train b --eval c``: after one of ``names``, every following token
    that does not start with ``-`` is one more value of it."""
    out: list[str] = []
    current: str | None = None
    for a in args:
        if a in names:
            current = a
            out.append(a)
        elif current is not None and not a.startswith("-") and out[-1] != current:
            out += [current, a]
        else:
            if a.startswith("-"):
                current = None
            out.append(a)
    return out


class _StudyCommand(_SetCommand):
    """``--set`` as in :class:`_SetCommand`, and several values after ``--train`` / ``--eval``."""

    def parse_args(self, ctx, args):
        return super().parse_args(ctx, expand_multi_values(list(args)))


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key] = yaml.safe_load(raw)
    return out


def _origins(pairs: list[str]) -> dict[str, str]:
    """Override key -> how it was given (``--set KEY=VALUE``), so config errors name the ``--set``."""
    return {pair.split("=", 1)[0]: f"--set {pair}" for pair in pairs if "=" in pair}


def _load(config: str, sets: list[str]):
    try:
        return load_config(config, _overrides(sets), origins=_origins(sets))
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


def _interrupted(what: str) -> typer.Exit:
    typer.echo(f"\ninterrupted; {what}", err=True)
    return typer.Exit(EXIT_INTERRUPTED)


@app.command(cls=_SetCommand)
def construct(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file or profile name in configs/"),
    input: str = typer.Option(..., "--input", "-i", help="folder, glob, or .parquet/.jsonl listing of images"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (rerun into it to resume)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N images (by id)"),
    set_: list[str] = typer.Option([], "--set", help="override config keys, e.g. --set generation.max_rounds=2 "
                                                    "images.max_side=640 (or repeat --set)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Build (or resume) an RMS dataset from real images and print a summary."""
    cfg = _load(config, set_)
    from rms_ray.common.failures import RunLog, is_user_error
    from rms_ray.construct.pipeline import run_construct

    run_log = RunLog("construct", output, cfg.resources)
    try:
        with run_log:
            manifest = run_construct(cfg, input, output, limit=limit, ray_address=ray_address, progress=progress,
                                     log=lambda m: typer.echo(m, err=True))
    except Exception as e:  # noqa: BLE001 - every failure ends as one `error:` line
        if is_user_error(e):  # missing input, no images, bad listing/model, an output we must not touch
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        # an engine that cannot start, a dead engine actor, an unwritable output: the cause, and where the detail is
        typer.echo(f"error: {run_log.fail(e)}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:  # committed batches are kept: a rerun skips them
        raise _interrupted("rerun the same command to resume") from None
    a = manifest["accounting"]
    typer.echo(
        f"\n{output}: {a['images_in']} images in = {a['images_accepted']} accepted + {a['images_rejected']} rejected"
        f" + {a['images_quarantined']} quarantined + {a['images_duplicate']} duplicates"
        f" ({'balanced' if a['balanced'] else 'NOT balanced: rerun to resume'})\n"
        f"samples: {a['samples_accepted']} accepted, {a['samples_rejected']} rejected; "
        f"categories: {len(manifest['categories'])}; took {manifest['timings']['total_s']:.1f} s"
    )
    if not a["balanced"]:
        raise typer.Exit(1)


@app.command(cls=_SetCommand)
def evaluate(
    datasets: list[str] = typer.Option([], "--datasets", "-d",
                                       help="labelled .jsonl/.parquet files or construct output folders: "
                                            "--datasets D1 D2 ... (or repeat -d)"),
    more: Optional[list[str]] = typer.Argument(None, metavar="[D2 ...]", show_default=False,
                                               help="more datasets (what follows --datasets D1)"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (new, empty, or an earlier evaluate's)"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j",
                                        help="judge model: builtin:<preset>, a model folder or a hub id "
                                             "(default: the profile's model.source)"),
    config: str = typer.Option("judge-cpu-tiny", "--config", "-c", help="judge profile (YAML file or name)"),
    threshold_from: Optional[str] = typer.Option(None, "--threshold-from",
                                                 help="dataset (name or path) whose max-F1 threshold applies to all"),
    set_: list[str] = typer.Option([], "--set", help="override config keys, e.g. --set evaluate.n_boot=200 "
                                                    "resources.batch_size=16 (or repeat --set)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score a judge on labelled datasets; write metrics.json, predictions.parquet and report.md."""
    from rms_ray.engine.vllm_engine import ModelSourceError
    from rms_ray.judge.config import load_judge_config
    from rms_ray.judge.evaluate import EvaluateError, run_evaluate

    datasets = [*datasets, *(more or [])]
    if not datasets:
        typer.echo("error: no datasets: give --datasets D1 [D2 ...]", err=True)
        raise typer.Exit(2)
    sets, origins = _overrides(set_), _origins(set_)
    if judge is not None and not judge.strip():  # e.g. --judge "$CKPT" with CKPT unset: never the default judge
        typer.echo("error: --judge is empty: give builtin:<preset>, a model folder or a hub id", err=True)
        raise typer.Exit(2)
    if judge:
        sets["model.source"], origins["model.source"] = judge, f"--judge {judge}"
    try:
        cfg = load_judge_config(config, sets, origins=origins)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    from rms_ray.common.failures import RunLog, is_user_error

    run_log = RunLog("evaluate", output, cfg.resources)
    try:
        with run_log:
            result = run_evaluate(cfg, datasets, output, threshold_from=threshold_from, ray_address=ray_address,
                                  progress=progress, log=lambda m: typer.echo(m, err=True))
    except Exception as e:  # noqa: BLE001 - every failure ends as one `error:` line
        if is_user_error(e, (EvaluateError, ModelSourceError, FileNotFoundError)):
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"error: {run_log.fail(e)}", err=True)  # engine/worker failure, unwritable output
        raise typer.Exit(1)
    except KeyboardInterrupt:  # evaluate starts over on a rerun (it does not resume)
        raise _interrupted("rerun the same command to evaluate again") from None
    thr = result["threshold"]
    typer.echo(f"\njudge {result['judge']['model']} ({result['judge']['prompt_version']}), "
               f"threshold {thr['value']:.3f} ({thr['source']})")
    for name, acc in result["accounting"].items():
        # a dataset whose every row was excluded has no metrics
        m = result["metrics"].get(name, {}).get("all_tasks", {}).get("overall", {})
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        scores = (f"F1 {fmt(m.get('f1'))}, AUPRC {fmt(m.get('auprc'))}, recall {fmt(m.get('recall'))}, "
                  f"FPR {fmt(m.get('fpr'))}" if m else "no metrics: no row was evaluated (see excluded.jsonl)")
        typer.echo(f"  {name}: {acc['rows_in']} rows = {acc['evaluated']} evaluated + {acc['excluded']} excluded; "
                   f"unparseable {acc['unparseable']}; {scores}")
    typer.echo(f"wrote {output}/metrics.json, predictions.parquet, report.md "
               f"({result['timings']['rows_per_s']} rows/s)")


@app.command("train-judge", cls=_SetCommand)
def train_judge(
    config: str = typer.Option(..., "--config", "-c", help="judge profile with a train: section (YAML file or name), "
                                                          "e.g. judge-cpu-tiny, judge-gpu-qwen2.5-vl-3b"),
    train: list[str] = typer.Option(..., "--train", "-t", help="labelled .jsonl/.parquet file or construct output "
                                                              "folder to train on (repeat for several)"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (new or empty; rerun into it to resume); "
                                                           "the judge is OUTPUT/model"),
    val: Optional[str] = typer.Option(None, "--val", help="labelled validation set (held out: no id or image+query "
                                                          "of --train); ranks checkpoints"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j",
                                        help="base model to fine-tune: builtin:<preset>, a Qwen2/2.5-VL folder or a "
                                             "hub id (default: the profile's model.source)"),
    row_limit: Optional[int] = typer.Option(None, "--row-limit", min=1,
                                            help="train on the first N rows of a seeded random order of --train"),
    subset_seed: Optional[int] = typer.Option(None, "--subset-seed", help="seed of that order (default: train.seed)"),
    set_: list[str] = typer.Option([], "--set", help="override config keys, e.g. --set train.examples_seen=20000 "
                                                    "train.num_workers=4 (or repeat --set)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Fine-tune a VLM safety judge on labelled data with Ray Train; write OUTPUT/model (pass it to --judge).

    The budget is train.examples_seen (or train.epochs): steps = ceil(budget / (batch_size x num_workers x
    grad_accum)). Rerunning the same command into the same OUTPUT resumes from its latest checkpoint.
    """
    from rms_ray.judge.config import load_judge_config
    from rms_ray.judge.train import TrainError, TrainInterrupted, run_train

    sets, origins = _overrides(set_), _origins(set_)
    if judge is not None and not judge.strip():
        typer.echo("error: --judge is empty: give builtin:<preset>, a model folder or a hub id", err=True)
        raise typer.Exit(2)
    if judge:
        sets["model.source"], origins["model.source"] = judge, f"--judge {judge}"
    try:
        cfg = load_judge_config(config, sets, origins=origins)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    from rms_ray.common.failures import RunLog, is_user_error

    run_log = RunLog("train-judge", output, cfg.resources)
    try:
        with run_log:
            s = run_train(cfg, train, output, val=val, ray_address=ray_address, progress=progress,
                          log=lambda m: typer.echo(m, err=True), row_limit=row_limit, subset_seed=subset_seed)
    except TrainInterrupted as e:  # checkpoints are kept: the same command resumes
        raise _interrupted(f"{e}; rerun the same command to resume") from None
    except Exception as e:  # noqa: BLE001 - every failure ends as one `error:` line
        if is_user_error(e, (TrainError, FileNotFoundError)):
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"error: {run_log.fail(e)}", err=True)  # a worker failed past train.max_failures, ...
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise _interrupted("rerun the same command to resume from the latest checkpoint") from None
    val_line = ", ".join(f"{k[4:]} {v:.3f}" for k, v in s["best_val"].items()
                         if k in ("val_f1", "val_auprc", "val_loss")) or "no validation set"
    line = f"{s['steps']} steps, {s['examples_seen']} examples seen"
    if s.get("resumed_from_step") is not None:
        line += f"; resumed from step {s['resumed_from_step']}"
    if s.get("restarts"):
        line += f"; workers restarted at step(s) {', '.join(map(str, s['restarts']))}"
    typer.echo(f"\njudge: {s['model_dir']} (best checkpoint: step {s['best_step']}; {val_line})\n{line}; "
               f"took {s['timings']['total_s']:.1f} s")
    typer.echo(f"wrote {output}/judge_meta.json, train_log.jsonl, train_curves.png, excluded.jsonl")


@app.command("check-config", cls=_SetCommand)
def check_config(config: str = typer.Argument(..., help="YAML file or profile name"),
                 set_: list[str] = typer.Option([], "--set", help="override config keys (several after one --set)")
                 ) -> None:
    """Validate a config and print it resolved, with its hash (judge-* profiles as judge configs, serve-* as serving
    configs)."""
    if Path(config).name.startswith("serve-"):
        cfg = _serve_profile(config, set_, None, None, None)
    elif Path(config).name.startswith("judge-"):
        from rms_ray.judge.config import load_judge_config

        try:
            cfg = load_judge_config(config, _overrides(set_), origins=_origins(set_))
        except ConfigError as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(2)
    else:
        cfg = _load(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    typer.echo(f"# config_hash: {cfg.config_hash()}")


@app.command()
def profiles() -> None:
    """List the profiles shipped in configs/."""
    for f in sorted(CONFIG_DIR.glob("*.yaml")):
        first = next((ln[1:].strip() for ln in f.read_text().splitlines() if ln.startswith("#")), "")
        typer.echo(f"{f.stem:28s} {first}")


@app.command("build-tiny-model")
def build_tiny_model(output: Path = typer.Option(..., "--output", "-o"),
                     preset: str = typer.Option("tiny", help="tiny | bench-100m"),
                     seed: int = typer.Option(0)) -> None:
    """Build the tiny random Qwen2.5-VL locally (no downloads) and print its path."""
    from rms_ray.testing.tiny_model import build_tiny_vlm

    typer.echo(str(build_tiny_vlm(output, preset=preset, seed=seed)))


@app.command()
def manifest(output: Path = typer.Argument(..., help="a dataset folder")) -> None:
    """Print a dataset's accounting from its manifest.json."""
    path = output / "manifest.json"
    if not path.exists():
        typer.echo(f"error: {path} not found", err=True)
        raise typer.Exit(2)
    json.dump(json.loads(path.read_text())["accounting"], sys.stdout, indent=2)
    typer.echo("")


@app.command("import-dataset")
def import_dataset_cmd(
    fmt: str = typer.Argument(..., metavar="FORMAT",
                              help="mmsafeaware | figstep | siuo | vlguard | vlsbench | mossbench | mssbench | rms"),
    src: Path = typer.Argument(..., help="the set's annotation file or folder (see rms_ray/judge/importers.py)"),
    output: Path = typer.Option(..., "--output", "-o", help="labelled .parquet (images embedded) or .jsonl"),
    images: Optional[Path] = typer.Option(None, "--images", help="image folder (default: where the format keeps "
                                                                 "its images next to SRC)"),
    source: Optional[str] = typer.Option(None, "--source", help="value of the source column (default: FORMAT)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N rows, in upstream order (a record "
                                                          "that gives a prompt and a response row counts twice)"),
    responses: bool = typer.Option(True, "--responses/--no-responses",
                                   help="also emit response-task rows where the set ships reference responses"),
) -> None:
    """Convert a published safety dataset into the labelled format; unusable rows go to OUT.excluded.jsonl."""
    from rms_ray.judge.importers import import_dataset

    try:
        r = import_dataset(fmt, src, images, output, source=source, limit=limit, responses=responses)
    except (OSError, ValueError) as e:  # unknown format, missing SRC/images, bad suffix or layout, unwritable output
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{r.output}: {r.written} rows written ({r.format}, source {r.source}) in {r.seconds:.1f} s")
    for task, by_label in r.counts.items():
        typer.echo(f"  {task}: " + ", ".join(f"{n} {label}" for label, n in by_label.items()))
    why = "; ".join(f"{n} {k}" for k, n in sorted(r.reasons.items()))  # "2 image not found; 1 unknown label"
    typer.echo(f"excluded: {r.excluded} rows -> {r.excluded_path}" + (f" ({why})" if why else ""))
    typer.echo(f"rows in: {r.rows_in} = {r.written} written + {r.excluded} excluded")
    if r.written == 0:  # an empty labelled file is refused by evaluate: say so now, not at evaluation time
        typer.echo(f"warning: no usable rows in {src}" + (" (is it the right file for this FORMAT?)"
                                                          if r.rows_in == 0 else f" (see {r.excluded_path})"), err=True)
        raise typer.Exit(1)


@app.command("split-dataset")
def split_dataset_cmd(
    src: Path = typer.Argument(..., help="a labelled .parquet or .jsonl file (e.g. from import-dataset)"),
    output: Path = typer.Option(..., "--output", "-o", help="folder for train.parquet, test.parquet, split.json"),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="expected share of groups in test (0..1)"),
    seed: int = typer.Option(0, "--seed", help="which split (same seed + file = same split)"),
    group_by: str = typer.Option("image", "--group-by", help="image (one photo never on both sides) | id"),
    jsonl: bool = typer.Option(False, "--jsonl", help="write .jsonl (image paths) instead of .parquet"),
) -> None:
    """Split a labelled file into train and test files by a hash of each image (no photo on both sides)."""
    from rms_ray.data.split import split_labelled

    try:
        r = split_labelled(src, output, test_fraction=test_fraction, seed=seed, group_by=group_by,
                           suffix=".jsonl" if jsonl else ".parquet")
    except (OSError, ValueError) as e:  # missing/broken input, bad argument, an empty side, unwritable output
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    for side in ("train", "test"):
        counts = "; ".join(f"{task}: " + ", ".join(f"{n} {lbl}" for lbl, n in by.items())
                           for task, by in r[side]["counts"].items())
        typer.echo(f"{r[side]['path']}: {r[side]['rows']} rows, {r['groups'][side]} {group_by} group(s) ({counts})")
    typer.echo(f"excluded: {r['excluded']} rows -> {output / 'excluded.jsonl'}; rule and counts: {output / 'split.json'}")


def _judge_profile(config: str, set_: list[str], judge: Optional[str]):
    """Load a judge profile with ``--set`` overrides and ``--judge`` as ``model.source`` (exits 2 on a bad one)."""
    from rms_ray.judge.config import load_judge_config

    sets, origins = _overrides(set_), _origins(set_)
    if judge is not None and not judge.strip():
        typer.echo("error: --judge is empty: give builtin:<preset>, a model folder or a hub id", err=True)
        raise typer.Exit(2)
    if judge:
        sets["model.source"], origins["model.source"] = judge, f"--judge {judge}"
    try:
        return load_judge_config(config, sets, origins=origins)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


def _run_study(command: str, output: Path, cfg, fn) -> dict:
    """Run a study function with the one-line error handling of every command (user errors exit 2)."""
    from rms_ray.common.failures import RunLog, is_user_error
    from rms_ray.engine.vllm_engine import ModelSourceError

    run_log = RunLog(command, output, cfg.resources)
    try:
        with run_log:
            return fn()
    except Exception as e:  # noqa: BLE001 - every failure ends as one `error:` line
        cause = e.__cause__ if isinstance(e, RuntimeError) and e.__cause__ is not None else e
        if is_user_error(cause, (ValueError, ModelSourceError, FileNotFoundError)):
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2)
        typer.echo(f"error: {run_log.fail(e)}", err=True)
        raise typer.Exit(1)
    except KeyboardInterrupt:
        raise _interrupted("rerun the same command to resume (finished judges and evaluations are kept)") from None


@app.command("compare-datasets", cls=_StudyCommand)
def compare_datasets(
    train: list[str] = typer.Option(..., "--train", "-t", help="datasets to compare: --train D1 D2 ... (labelled "
                                                               "files or construct output folders)"),
    evals: list[str] = typer.Option(..., "--eval", "-e", help="eval sets: --eval E1 E2 ..."),
    output: Path = typer.Option(..., "--output", "-o", help="study folder (rerun into it to resume)"),
    config: str = typer.Option("judge-cpu-tiny", "--config", "-c", help="judge profile: the recipe and budget"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j", help="base judge (default: the profile's model)"),
    base: bool = typer.Option(True, "--base/--no-base", help="also score the untrained base judge (a matrix row)"),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                 help="most training runs side by side (default: as resources fit)"),
    set_: list[str] = typer.Option([], "--set", help="override config keys, e.g. --set train.examples_seen=20000"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train a judge on each dataset (same recipe, same budget), score every judge on every eval set, and write
    the matrix (Markdown, JSON, heatmap) with each dataset's quality score and the ranking."""
    from rms_ray.judge.study import run_compare

    cfg = _judge_profile(config, set_, judge)
    m = _run_study("compare-datasets", output, cfg, lambda: run_compare(
        cfg, train, evals, output, include_base=base, max_concurrent=max_concurrent, ray_address=ray_address, progress=progress,
        log=lambda s: typer.echo(s, err=True)))
    typer.echo("\nranking (quality = mean F1 / recall over the other datasets):")
    for i, row in enumerate(m["ranking"], 1):
        typer.echo(f"  {i}. {row}: {m['quality'][row]:.3f}")
    typer.echo(f"wrote {output}/matrix.md, matrix.json, heatmap.png")


@app.command("scale-study", cls=_StudyCommand)
def scale_study(
    train: list[str] = typer.Option(..., "--train", "-t", help="the ONE dataset to subsample (labelled file or "
                                                               "construct output folder)"),
    sizes: str = typer.Option(..., "--sizes", help="ascending subset sizes in rows, e.g. 1000,2000,5000"),
    evals: list[str] = typer.Option(..., "--eval", "-e", help="eval sets: --eval E1 E2 ..."),
    output: Path = typer.Option(..., "--output", "-o", help="study folder (rerun into it to resume)"),
    seeds: int = typer.Option(1, "--seeds", min=1, max=20, help="seeds per size (error bars over seeds)"),
    config: str = typer.Option("judge-cpu-tiny", "--config", "-c", help="judge profile: the recipe and budget"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j", help="base judge (default: the profile's model)"),
    max_concurrent: Optional[int] = typer.Option(None, "--max-concurrent", min=1,
                                                 help="most training runs side by side (default: as resources fit)"),
    set_: list[str] = typer.Option([], "--set", help="override config keys, e.g. --set train.examples_seen=20000"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Score vs dataset size: nested subsets, one training run per (size, seed), a table and a plot."""
    from rms_ray.judge.study import StudyError, parse_sizes, run_scale_study

    try:
        if len(train) != 1:
            raise StudyError(f"--train: a scale study subsamples one dataset, got {len(train)}: {' '.join(train)}")
        size_list = parse_sizes(sizes)
    except StudyError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    cfg = _judge_profile(config, set_, judge)
    r = _run_study("scale-study", output, cfg, lambda: run_scale_study(
        cfg, train[0], size_list, seeds, evals, output, max_concurrent=max_concurrent, ray_address=ray_address, progress=progress,
        log=lambda s: typer.echo(s, err=True)))
    typer.echo("\nsize  quality (mean +- std over seeds)")
    for p in r["points"]:
        q, sd = p["quality_mean"], p["quality_std"]
        typer.echo(f"  {p['size']:>6}  " + ("n/a" if q is None else f"{q:.3f} +- {sd:.3f}"))
    typer.echo(f"wrote {output}/scale.md, scale.json, scale.png")


# -- the judge service (rms_ray/serve) ---------------------------------------------------------------------------
def _serve_profile(config: str, set_: list[str], judge: Optional[str], host: Optional[str], port: Optional[int]):
    """Load a serving profile with ``--set``, ``--judge`` (model.source), ``--host``, ``--port`` (exits 2 if bad)."""
    from rms_ray.serve.config import load_serve_config

    sets, origins = _overrides(set_), _origins(set_)
    if judge is not None and not judge.strip():
        typer.echo("error: --judge is empty: give builtin:<preset>, a model folder or a hub id", err=True)
        raise typer.Exit(2)
    for key, value, flag in (("model.source", judge, "--judge"), ("serve.host", host, "--host"),
                             ("serve.port", port, "--port")):
        if value is not None:
            sets[key], origins[key] = value, f"{flag} {value}"
    try:
        return load_serve_config(config, sets, origins=origins)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


@app.command("serve", cls=_SetCommand)
def serve_cmd(
    config: str = typer.Option("serve-cpu-tiny", "--config", "-c", help="serving profile (YAML file or name)"),
    judge: Optional[str] = typer.Option(None, "--judge", "-j", help="judge model: builtin:<preset>, a model folder "
                                                                   "or a hub id (default: the profile's)"),
    host: Optional[str] = typer.Option(None, help="bind address (default: the profile's serve.host, 127.0.0.1)"),
    port: Optional[int] = typer.Option(None, help="port (default: the profile's serve.port, 8000)"),
    set_: list[str] = typer.Option([], "--set", help="override config keys, e.g. --set serve.num_replicas=2"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
) -> None:
    """Serve a judge over HTTP with Ray Serve (POST /v1/judge, OpenAI /v1/chat/completions + /v1/models, /healthz,
    /readyz); blocks until Ctrl-C."""
    from rms_ray.engine.vllm_engine import ModelSourceError
    from rms_ray.serve.app import ServeStartError, run_server

    cfg = _serve_profile(config, set_, judge, host, port)
    try:
        run_server(cfg, ray_address=ray_address, log=lambda m: typer.echo(m, err=True))
    except (ServeStartError, ModelSourceError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1 if isinstance(e, ServeStartError) and not e.user else 2)
    except KeyboardInterrupt:  # the normal way to stop a server
        typer.echo("\nstopped", err=True)


@app.command("judge")
def judge_cmd(
    input: Path = typer.Argument(..., help="a labelled .jsonl/.parquet file, or a folder of images (with --query)"),
    url: str = typer.Option(..., "--url", help="the judge service, e.g. http://127.0.0.1:8000"),
    output: Path = typer.Option(..., "--output", "-o", help="results .parquet (one row per input row/image)"),
    query: Optional[str] = typer.Option(None, "--query", "-q", help="the text sent with every image of a folder"),
    token_env: str = typer.Option("RMS_RAY_JUDGE_TOKEN", help="environment variable holding the bearer token"),
    batch_size: int = typer.Option(8, min=1, max=1024, help="items per request"),
    concurrency: int = typer.Option(4, min=1, max=256, help="requests in flight"),
    retries: int = typer.Option(5, min=0, max=20, help="retries of a request answered 503 (overload) or failing "
                                                        "to connect"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Judge a labelled file or a folder of images with a running judge service; write a Parquet of verdicts."""
    import httpx

    from rms_ray.data.labelled import LabelledFormatError
    from rms_ray.serve.client import ServiceCallError, judge_file

    if output.suffix != ".parquet":
        typer.echo(f"error: --output {output} must end in .parquet", err=True)
        raise typer.Exit(2)
    try:
        httpx.get(url.rstrip("/") + "/healthz", timeout=10, trust_env=False).raise_for_status()
    except httpx.HTTPError as e:
        typer.echo(f"error: no judge service answers at {url} ({type(e).__name__}: {e})", err=True)
        raise typer.Exit(1)
    try:
        r = judge_file(url, input, output, query=query, token_env=token_env, batch_size=batch_size,
                       concurrency=concurrency, retries=retries, progress=progress)
    except (FileNotFoundError, LabelledFormatError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except ServiceCallError as e:  # 401: every row would fail the same way
        typer.echo(f"error: the judge service refused the request ({e}); set {token_env} to its token", err=True)
        raise typer.Exit(1)
    typer.echo(f"{output}: {r['rows']} rows = {r['judged']} judged + {r['unparseable']} unparseable + "
               f"{r['failed']} failed (see the error column) in {r['seconds']:.1f} s")
    if r["rows"] and r["failed"] == r["rows"]:
        raise typer.Exit(1)


@app.command("eval-model")
def eval_model_cmd(
    endpoint: str = typer.Option(..., "--endpoint", help="OpenAI-compatible base URL of the model under evaluation, "
                                                        "e.g. http://127.0.0.1:8000/v1"),
    model: str = typer.Option(..., "--model", "-m", help="the model name to send (GET {endpoint}/models lists them)"),
    dataset: str = typer.Option(..., "--dataset", "-d", help="labelled .jsonl/.parquet or construct output folder"),
    judge_url: str = typer.Option(..., "--judge-url", help="the judge service, e.g. http://127.0.0.1:8000"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (rerun into it to resume)"),
    concurrency: int = typer.Option(4, min=1, max=256, help="items in flight"),
    retries: int = typer.Option(3, min=0, max=20, help="retries of a call answered 429/5xx or failing to connect"),
    max_tokens: int = typer.Option(512, min=1, max=32768, help="the model's answer length cap"),
    temperature: float = typer.Option(0.0, min=0.0, max=2.0, help="the model's sampling temperature (0: greedy)"),
    threshold: float = typer.Option(0.5, min=0.0, max=1.0, help="unsafe when the judge's unsafe score >= this"),
    limit: Optional[int] = typer.Option(None, min=1, help="only the first N prompt rows"),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="environment variable holding the model's API key"),
    judge_token_env: str = typer.Option("RMS_RAY_JUDGE_TOKEN", help="environment variable holding the judge's token"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Evaluate any OpenAI-compatible chat model on RMS data: safe-response and refusal rates (overall, per
    category, Wilson intervals) and the worst answers beside the dataset's guidance; Markdown + JSON."""
    import httpx

    from rms_ray.data.labelled import LabelledFormatError
    from rms_ray.serve.eval_model import EvalModelError, run_eval_model

    for name, probe in (("judge service", judge_url.rstrip("/") + "/healthz"),
                        ("model endpoint", endpoint.rstrip("/") + "/models")):
        try:  # reachable at all (any HTTP answer will do: some endpoints have no /models or need a key)
            httpx.get(probe, timeout=10, trust_env=False)
        except httpx.HTTPError as e:
            typer.echo(f"error: no {name} answers at {probe.rsplit('/', 1)[0]} ({type(e).__name__}: {e})", err=True)
            raise typer.Exit(1)
    try:
        s = run_eval_model(endpoint, model, dataset, judge_url, output, concurrency=concurrency, retries=retries,
                           max_tokens=max_tokens, temperature=temperature, threshold=threshold, limit=limit,
                           api_key_env=api_key_env, judge_token_env=judge_token_env, progress=progress,
                           log=lambda m: typer.echo(m, err=True))
    except (EvalModelError, LabelledFormatError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:
        raise _interrupted("rerun the same command to resume (committed answers are kept)") from None
    a = s["accounting"]
    typer.echo(f"\n{s['model']} on {s['dataset']['name']}: {a['rows']} rows = {a['safe']} safe + {a['refusal']} "
               f"refusal + {a['unsafe']} unsafe + {a['unjudged']} unjudged + {a['error']} error")
    for name, g in s["groups"].items():
        o = g["overall"]
        fmt = lambda b: "n/a" if b["rate"] is None else f"{b['rate']:.3f} [{b['ci95'][0]:.3f}, {b['ci95'][1]:.3f}]"  # noqa: E731
        typer.echo(f"  {name}: safe response {fmt(o['safe_response'])}, refusal {fmt(o['refusal'])}, "
                   f"unsafe {fmt(o['unsafe'])} (n={o['n']})")
    typer.echo(f"wrote {output}/summary.json, report.md, results.parquet")


if __name__ == "__main__":
    app()
