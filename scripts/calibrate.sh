#!/usr/bin/env bash
# Calibration of the SmolLM2-135M ROME, MEMIT and PMET presets on the tuning slice (the study
# docs/studies/calibration.md): every setting of each grid on dev records 1000-1099 (ROME) and
# 1000-1059 (MEMIT, PMET). Resumable; raw lines go to runs/, gzipped copies to results/.
#   scripts/calibrate.sh DATA [rome|memit|pmet|both]   (both: ROME and MEMIT; NPROC=2 torchrun
#   ranks; SWEEP_FLAGS=… passed on)
set -euo pipefail
data=${1:?usage: $0 path/to/merged_counterfact_dev.json [rome|memit|both]}
what=${2:-both}
nproc=${NPROC:-2}
run() { OMP_NUM_THREADS=1 torchrun --nproc_per_node "$nproc" --master_port 29541 \
          -m attndrift.cli sweep --data "$data" ${SWEEP_FLAGS:-} "$@"; }
# covariances first, in one process (the ranks would otherwise compute them concurrently)
python - <<'PY'
from attndrift import models
from attndrift.editing import covariance, memit, rome
model = models.load_model("smollm2-135m")
r, m = rome.preset(model), memit.preset(model)
covariance.layer_covariance(model, r.layer, r.covariance)
for layer in range(2, 9):
    covariance.layer_covariance(model, layer, m.covariance)
PY
if [[ $what == rome || $what == both ]]; then
  # GPT-J's preset as it was (20 steps, weight decay 0.5, ROME's stop rule) ...
  run --records 1000-1099 --steps 20 --out runs/calibration_rome.jsonl
  # ... and the grid: weight decay x what early stopping watches, 25 steps at most
  run --records 1000-1099 --steps 25 --weight-decay 0.5,0.05,0.001 --early-stop-on loss,nll \
    --out runs/calibration_rome.jsonl
fi
if [[ $what == memit || $what == both ]]; then
  run --records 1000-1059 --editor memit --mom2-weight 15000,2000,250,30 \
    --layers '4,5,6,7,8;2,3,4,5,6' --early-stop-on nll --out runs/calibration_memit.jsonl
fi
if [[ $what == pmet ]]; then
  # PMET's own delta optimisation (EasyEdit's GPT-J values, its NLL schedule) at MEMIT's layers;
  # one optimisation per record and clamp, shared by the four λ (editors.TargetMemo)
  run --records 1000-1059 --editor pmet --mom2-weight 15000,2000,250,30 --clamp 0.75,4 \
    --out runs/calibration_pmet.jsonl
fi
# the raw lines, committed: summarize reads results/calibration_rome.jsonl's gzipped shards
mkdir -p results
for f in runs/calibration_*.rank*-of-*.jsonl; do gzip -9 -c "$f" > "results/$(basename "$f").gz"; done
