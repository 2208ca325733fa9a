#!/usr/bin/env bash
# The study docs/studies/sadr.md on the embedded SmolLM2: the selection rows on the
# selection slice, or the evaluation rows on the evaluation records. Resumable; raw lines go
# to runs/, gzipped copies to results/.
#   scripts/sadr_study.sh DATA selection              (dev records 1100-1179)
#   scripts/sadr_study.sh DATA evaluation GAMMA VARIANT_FLAGS   (dev records 0-199)
#   BLOCKS="0-19 20-39" ROWS="preset budget variant" VARIANT_GAMMA=0.2 scripts/sadr_study.sh \
#     DATA evaluation 0.2 --sadr-relations   (a part: rows preset, budget, variant, memit;
#     every row of a block before the next block; results/ refreshed after each block)
#   RECORDS=1100-1115 ROWS="baseline paper" PAPER_GAMMAS=0.2 scripts/sadr_study.sh DATA selection
#     (a part: some records, some rows, some γ; OWN_GAMMAS and RELATION_KLS likewise)
# Every row runs under the calibrated ROME preset; SADR rows and the same-budget
# baseline have 80 steps at most. NPROC=2 torchrun ranks (NPROC=1: one plain process, e.g.
# two instances on different BLOCKS, each with its own OUT); SWEEP_FLAGS=… passed on.
set -euo pipefail
mkdir -p results
data=${1:?usage: $0 path/to/merged_counterfact_dev.json selection|evaluation [GAMMA FLAGS]}
what=${2:?selection or evaluation}
nproc=${NPROC:-2}
run() {
  if [[ $nproc == 1 ]]; then  # one process: no torchrun (two instances need no port)
    OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m attndrift.cli sweep --data "$data" \
      ${SWEEP_FLAGS:-} "$@"
  else
    OMP_NUM_THREADS=1 torchrun --nproc_per_node "$nproc" --master_port 29542 \
      -m attndrift.cli sweep --data "$data" ${SWEEP_FLAGS:-} "$@"
  fi
}
if [[ $what == selection ]]; then
  records=${RECORDS:-1100-1179}
  out=runs/sadr_selection.jsonl
  budget=(--records "$records" --steps 80 --out "$out")
  for row in ${ROWS:-preset baseline paper threshold relations relation_kl after_subject subject_keys all_heads}; do
    case $row in
      preset)        run --records "$records" --out "$out" ;;
      baseline)      run "${budget[@]}" --sadr-gamma 0 ;;
      paper)         run "${budget[@]}" --sadr-gamma "${PAPER_GAMMAS:-0.2,0.05,0.5}" ;;
      threshold)     run "${budget[@]}" --sadr-gamma "${OWN_GAMMAS:-0.2,1.0}" --sadr-threshold own ;;
      relations)     run "${budget[@]}" --sadr-gamma 0.2 --sadr-relations ;;
      relation_kl)   run "${budget[@]}" --sadr-gamma "${VARIANT_GAMMA:-0.2}" \
                       --relation-kl "${RELATION_KLS:-5,25}" ;;
      after_subject) run "${budget[@]}" --sadr-gamma 0.2 --sadr-queries after_subject ;;
      subject_keys)  run "${budget[@]}" --sadr-gamma 0.2 --sadr-keys subject ;;
      all_heads)     run "${budget[@]}" --sadr-gamma 0.2 --all-heads ;;
      *) echo "unknown row $row" >&2; exit 2 ;;
    esac
  done
elif [[ $what == evaluation ]]; then
  gamma=${3:?the chosen γ}
  variant=${4:-}
  out=${OUT:-runs/sadr_evaluation.jsonl}
  # BLOCKS="0-19 20-39 …": every row of a block runs before the next block starts
  for records in ${BLOCKS:-${RECORDS:-0-199}}; do
  for row in ${ROWS:-preset budget variant memit}; do
    case $row in
      preset) run --records "$records" --out "$out" ;;
      budget) run --records "$records" --steps 80 --sadr-gamma "0,$gamma" --out "$out" ;;
      variant)
        [[ -z $variant ]] || run --records "$records" --steps 80 \
          --sadr-gamma "${VARIANT_GAMMA:-$gamma}" $variant --out "$out" ;;
      memit)
        half=$(python -c "print(float('$gamma') / 2)")
        run --records "$records" --editor memit --sadr-gamma "0,$half" --out "$out" ;;
      *) echo "unknown row $row" >&2; exit 2 ;;
    esac
  done
  for f in runs/sadr_*.rank*-of-*.jsonl; do gzip -9 -c "$f" > "results/$(basename "$f").gz"; done
  done
else
  echo "selection or evaluation, not $what" >&2; exit 2
fi
mkdir -p results
for f in runs/sadr_*.rank*-of-*.jsonl; do gzip -9 -c "$f" > "results/$(basename "$f").gz"; done
