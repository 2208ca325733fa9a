#!/usr/bin/env bash
# The batch and sequential editing of the study docs/studies/editors.md, dev records 0-49. Resumable; raw lines go to runs/, gzipped copies to results/.
#   scripts/group_study.sh DATA batch        MEMIT and AlphaEdit, γ 0 and 0.025, batch 1/10/50
#                                            (one process: each record's z optimised once per γ)
#   scripts/group_study.sh DATA sequential   ROME (preset) and ROME+SADR (γ 0.05, 80 steps) in
#                                            sequences of 10 and 50; then ROME at 80 steps
# RECORDS=0-49 by default; OMP_NUM_THREADS=1 unless set; SWEEP_FLAGS=… passed on.
set -euo pipefail
data=${1:?usage: $0 path/to/merged_counterfact_dev.json batch|sequential}
what=${2:?batch or sequential}
records=${RECORDS:-0-49}
run() { OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m attndrift.cli sweep --data "$data" \
          --records "$records" ${SWEEP_FLAGS:-} "$@"; }
mkdir -p results
case $what in
  batch)
    out=runs/group_batch.jsonl
    run --editor memit,alphaedit --sadr-gamma 0,0.025 --batch 1,10,50 --out "$out" ;;
  sequential)
    out=runs/group_sequential.jsonl
    run --sequential 10,50 --out "$out"
    run --sequential 10,50 --steps 80 --sadr-gamma 0.05 --out "$out"
    run --sequential 10,50 --steps 80 --out "$out" ;;
  *) echo "batch or sequential, not $what" >&2; exit 2 ;;
esac
gzip -9 -c "$out" > "results/$(basename "$out").gz"
