#!/usr/bin/env bash
# Evidence for the SmolLM2 ROME layer (docs/RESULTS.md): ROME at several layers on the first
# 10 dev records (5 CounterFact + 5 WikiData), covariance from the preset's self-sampled corpus.
#   scripts/layer_sweep.sh DATA [OUT] [LAYERS...]   (NPROC=2 by default: torchrun data-parallel)
set -euo pipefail
data=${1:?usage: $0 path/to/merged_counterfact_dev.json [OUT] [LAYERS...]}; shift
out=${1:-runs/layer_sweep.jsonl}; shift || true
layers=${*:-1 2 3 4 6 8 11}
nproc=${NPROC:-2}
# covariances first, in one process (the ranks would otherwise compute them twice)
python - $layers <<'PY'
import sys
from attndrift import models
from attndrift.editing import covariance, rome
model = models.load_model("smollm2-135m")
cfg = rome.preset(model).covariance
for layer in map(int, sys.argv[1:]):
    covariance.layer_covariance(model, layer, cfg)
PY
for layer in $layers; do
  OMP_NUM_THREADS=1 torchrun --nproc_per_node "$nproc" --master_port 29533 -m attndrift.cli \
    sweep --data "$data" --limit 10 --layer "$layer" --out "$out"
done
attndrift summarize "$out"
