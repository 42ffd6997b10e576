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


@app.command("check-config")
def check_config(config: str = typer.Argument(..., help="YAML file or profile name"),
                 set_: list[str] = typer.Option([], "--set")) -> None:
    """Validate a config and print it resolved, with its hash."""
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


if __name__ == "__main__":
    app()
