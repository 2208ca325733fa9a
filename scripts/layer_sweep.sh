#!/usr/bin/env bash
# Evidence for the SmolLM2 ROME layer (docs/RESULTS.md): ROME at several layers on the first
# 10 dev records (5 CounterFact + 5 WikiData), covariance from the preset's self-sampled corpus.
#   scripts/layer_sweep.sh [OUT] [LAYERS...]
set -euo pipefail
out=${1:-runs/layer_sweep.jsonl}; shift || true
layers=${*:-1 2 3 4 6 8 11}
data=${ATTNDRIFT_DEV_DATA:-$(dirname "$0")/../../shared/data/merged_counterfact_dev.json}
for layer in $layers; do
  attndrift sweep --data "$data" --limit 10 --layer "$layer" --out "$out"
done
attndrift summarize "$out"
