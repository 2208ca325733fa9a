#!/usr/bin/env bash
# Drift and patching of real ROME edits of three embedded records (docs/RESULTS.md):
# drift heatmaps, restore with 10-layer windows (paper Fig. 5), contaminate with 6-layer
# windows (paper Fig. 3), on each record's first distracting-neighbour prompt.
#   scripts/analysis_examples.sh [OUT] [RECORDS...]
set -euo pipefail
out=${1:-runs/analysis}; shift || true
records=${*:-0 19 49}
for r in $records; do
  attndrift drift --record "$r" --out "$out/r$r"
  attndrift patch --record "$r" --edit "$out/r$r/edit.safetensors" --directions restore \
    --window 10 --out "$out/r$r/restore_w10"
  attndrift patch --record "$r" --edit "$out/r$r/edit.safetensors" --directions contaminate \
    --window 6 --out "$out/r$r/contaminate_w6"
done
