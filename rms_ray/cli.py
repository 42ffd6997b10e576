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


@app.command("check-config", cls=_SetCommand)
def check_config(config: str = typer.Argument(..., help="YAML file or profile name"),
                 set_: list[str] = typer.Option([], "--set", help="override config keys (several after one --set)")
                 ) -> None:
    """Validate a config and print it resolved, with its hash (judge-* profiles as judge configs)."""
    if Path(config).name.startswith("judge-"):
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


if __name__ == "__main__":
    app()
