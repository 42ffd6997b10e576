#!/usr/bin/env bash
# Set up (first time) and run the main job end to end on the bundled photos with the tiny local model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export RAY_USAGE_STATS_ENABLED=0
OUT=${1:-runs/demo}
.venv/bin/rms-ray construct --config configs/cpu-tiny.yaml --input examples/photos --output "$OUT"
echo "dataset card: $OUT/README.md"
