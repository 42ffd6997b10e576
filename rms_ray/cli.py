"""``rms-ray`` command line: construct datasets, check configs, build the tiny local model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
import yaml

from rms_ray.common.config import CONFIG_DIR, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Build real-world multimodal safety (RMS) datasets with Ray Data + vLLM.")


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key] = yaml.safe_load(raw)
    return out


def _load(config: str, sets: list[str]):
    try:
        return load_config(config, _overrides(sets))
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)


@app.command()
def construct(
    config: str = typer.Option(..., "--config", "-c", help="YAML config file or profile name in configs/"),
    input: str = typer.Option(..., "--input", "-i", help="folder, glob, or .parquet/.jsonl listing of images"),
    output: Path = typer.Option(..., "--output", "-o", help="output folder (rerun into it to resume)"),
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N images (by id)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set generation.max_rounds=2"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or local)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Build (or resume) an RMS dataset from real images and print a summary."""
    cfg = _load(config, set_)
    from rms_ray.construct.pipeline import run_construct

    try:
        manifest = run_construct(cfg, input, output, limit=limit, ray_address=ray_address, progress=progress)
    except (FileNotFoundError, ValueError) as e:  # missing input, bad listing, an output we must not touch
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    a = manifest["accounting"]
    if a["images_in"] == 0:
        typer.echo(f"warning: no images found in {input} (extensions: {', '.join(cfg.images.extensions)})", err=True)
    typer.echo(
        f"\n{output}: {a['images_in']} images in = {a['images_accepted']} accepted + {a['images_rejected']} rejected"
        f" + {a['images_quarantined']} quarantined + {a['images_duplicate']} duplicates"
        f" ({'balanced' if a['balanced'] else 'NOT balanced: rerun to resume'})\n"
        f"samples: {a['samples_accepted']} accepted, {a['samples_rejected']} rejected; "
        f"categories: {len(manifest['categories'])}; took {manifest['timings']['total_s']:.1f} s"
    )
    if not a["balanced"]:
        raise typer.Exit(1)


@app.command()
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
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set evaluate.n_boot=200"),
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
    sets = _overrides(set_)
    if judge:
        sets["model.source"] = judge
    try:
        cfg = load_judge_config(config, sets)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    try:
        result = run_evaluate(cfg, datasets, output, threshold_from=threshold_from, ray_address=ray_address,
                              progress=progress, log=lambda m: typer.echo(m, err=True))
    except (EvaluateError, ModelSourceError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    thr = result["threshold"]
    typer.echo(f"\njudge {result['judge']['model']} ({result['judge']['prompt_version']}), "
               f"threshold {thr['value']:.3f} ({thr['source']})")
    for name, acc in result["accounting"].items():
        m = result["metrics"][name]["all_tasks"]["overall"]
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        typer.echo(f"  {name}: {acc['rows_in']} rows = {acc['evaluated']} evaluated + {acc['excluded']} excluded; "
                   f"unparseable {acc['unparseable']}; F1 {fmt(m.get('f1'))}, AUPRC {fmt(m.get('auprc'))}, "
                   f"recall {fmt(m.get('recall'))}, FPR {fmt(m.get('fpr'))}")
    typer.echo(f"wrote {output}/metrics.json, predictions.parquet, report.md "
               f"({result['timings']['rows_per_s']} rows/s)")


@app.command("check-config")
def check_config(config: str = typer.Argument(..., help="YAML file or profile name"),
                 set_: list[str] = typer.Option([], "--set")) -> None:
    """Validate a config and print it resolved, with its hash (judge-* profiles as judge configs)."""
    if Path(config).name.startswith("judge-"):
        from rms_ray.judge.config import load_judge_config

        try:
            cfg = load_judge_config(config, _overrides(set_))
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
    limit: Optional[int] = typer.Option(None, min=1, help="use only the first N upstream rows"),
    responses: bool = typer.Option(True, "--responses/--no-responses",
                                   help="also emit response-task rows where the set ships reference responses"),
) -> None:
    """Convert a published safety dataset into the labelled format; unusable rows go to OUT.excluded.jsonl."""
    from rms_ray.judge.importers import import_dataset

    try:
        r = import_dataset(fmt, src, images, output, source=source, limit=limit, responses=responses)
    except (FileNotFoundError, ValueError) as e:  # unknown format, missing SRC/images, bad suffix or layout
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(f"{r.output}: {r.written} rows written ({r.format}, source {r.source}) in {r.seconds:.1f} s")
    for task, by_label in r.counts.items():
        typer.echo(f"  {task}: " + ", ".join(f"{n} {label}" for label, n in by_label.items()))
    why = ", ".join(f"{k}: {n}" for k, n in sorted(r.reasons.items()))
    typer.echo(f"excluded: {r.excluded} rows -> {r.excluded_path}" + (f" ({why})" if why else ""))
    typer.echo(f"rows in: {r.rows_in} = {r.written} written + {r.excluded} excluded")


if __name__ == "__main__":
    app()
