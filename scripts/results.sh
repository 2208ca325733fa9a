#!/usr/bin/env bash
# The sweeps behind docs/RESULTS.md, on the embedded SmolLM2-135M and the dev records.
# Resumable: rerun the same command after an interruption. NPROC torchrun ranks (default 2).
#   scripts/results.sh gamma          # γ selection on dev records 1000-1007
#   GAMMA=0.2 scripts/results.sh main    # ROME vs ROME+SADR on 0-59, MEMIT±SADR on 0-29
set -euo pipefail
data=${ATTNDRIFT_DEV_DATA:-$(dirname "$0")/../../shared/data/merged_counterfact_dev.json}
nproc=${NPROC:-2}
run() { OMP_NUM_THREADS=1 torchrun --nproc_per_node "$nproc" --master_port 29541 \
          -m attndrift.cli sweep --data "$data" "$@"; }
# covariances first, in one process (ranks would otherwise compute them concurrently)
python - <<'PY'
from attndrift import covariance, memit, models, rome
model = models.load_model("smollm2-135m")
r, m = rome.preset(model), memit.preset(model)
for cfg, layers in ((r.covariance, [r.layer]), (m.covariance, m.layers)):
    for layer in layers:  # a layer shared with the same config is read from the cache
        covariance.layer_covariance(model, layer, cfg)
PY
case ${1:-} in
  gamma)
    run --records 1000-1007 --sadr-gamma 0,0.01,0.05,0.2 --out runs/gamma.jsonl
    attndrift summarize runs/gamma.jsonl --plot runs/gamma_tradeoff.html --csv runs/gamma.csv ;;
  main)
    : "${GAMMA:?set GAMMA to the selected ROME γ}"
    run --records 0-59 --sadr-gamma "0,$GAMMA" --out runs/rome.jsonl
    run --records 0-29 --editor memit --sadr-gamma "0,$(python -c "print($GAMMA / 2)")" \
      --out runs/memit.jsonl
    attndrift summarize runs/rome.jsonl runs/memit.jsonl ;;
  *) echo "usage: $0 gamma | main" >&2; exit 2 ;;
esac
