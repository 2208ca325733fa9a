#!/usr/bin/env bash
# Drift and patching of real ROME edits (preset: layer 6, C from 32,768 tokens) of three dev
# records (docs/RESULTS.md): drift heatmaps, restore with 10-layer windows (paper Fig. 5),
# contaminate with 6-layer windows (paper Fig. 3), on each record's first DNS prompt.
#   scripts/analysis_examples.sh [OUT] [RECORDS...]      (DATA=... for another data file)
set -euo pipefail
out=${1:-runs/analysis}; shift || true
records=${*:-3 17 23}
data=${DATA:-$(dirname "$0")/../../shared/data/merged_counterfact_dev.json}
for r in $records; do
  attndrift drift --data "$data" --record "$r" --out "$out/r$r"
  attndrift patch --data "$data" --record "$r" --edit "$out/r$r/edit.safetensors" \
    --directions restore --window 10 --out "$out/r$r/restore_w10"
  attndrift patch --data "$data" --record "$r" --edit "$out/r$r/edit.safetensors" \
    --directions contaminate --window 6 --out "$out/r$r/contaminate_w6"
done
