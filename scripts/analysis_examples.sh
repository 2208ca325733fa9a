#!/usr/bin/env bash
# Drift and patching of real ROME edits (preset: layer 6, C from 32,768 tokens) of three dev
# records (docs/RESULTS.md): drift heatmaps; restore with 10-layer windows (paper Fig. 5) and
# contaminate with 6-layer windows (paper Fig. 3) on one distracting-neighbour prompt each —
# one the vanilla model gets right and the ROME edit gets wrong in the main sweep.
#   scripts/analysis_examples.sh DATA [OUT] [RECORD:DNS_PROBE ...]
set -euo pipefail
data=${1:?usage: $0 path/to/merged_counterfact_dev.json [OUT] [RECORD:DNS_PROBE ...]}; shift
out=${1:-runs/analysis}; shift || true
examples=${*:-3:4 7:8 23:9}
for ex in $examples; do
  r=${ex%%:*} probe=${ex##*:}
  [ -f "$out/r$r/edit.safetensors" ] || attndrift drift --data "$data" --record "$r" --out "$out/r$r"
  for spec in "restore 10" "contaminate 6"; do
    set -- $spec
    attndrift patch --data "$data" --record "$r" --edit "$out/r$r/edit.safetensors" \
      --probe "$probe" --directions "$1" --window "$2" --out "$out/r$r/${1}_w$2"
  done
done
