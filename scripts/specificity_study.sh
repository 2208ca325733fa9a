#!/usr/bin/env bash
# The specificity study (docs/studies/specificity.md) on the embedded SmolLM2: every row of a
# block of records runs before the next block starts; resumable (rerun the same command).
#
#   scripts/specificity_study.sh DATA OUT "BLOCKS" "ROWS"
#
# DATA: the merged CounterFact development file; OUT: the results file (one per process);
# BLOCKS: record ranges, e.g. "1100-1109 1120-1129"; ROWS: any of
#   baseline   ROME at 80 steps (the same-budget baseline)
#   margin     ROME stopped on the edit prompt's margin alone, m in $MARGINS (default 1,2,4)
#   nll_margin the margin stop of variant a: NLL below 0.5 and margin at least 2
#   offtarget  the off-target hinge, weight $OFFTARGET (default 2)
#   distract   SADR on distractor prompts, gamma $DISTRACT_GAMMA (default 0.5)
#   sadr       ROME+SADR at the earlier study's gamma 0.05
#   chosen     the selected variant: its flags in $CHOSEN (e.g. "--offtarget 2")
#   matched    its efficacy-matched baseline: ROME stopped at margin $MATCHED
# Every row runs under the calibrated ROME preset with at most 80 steps. One thread per
# process (two processes on two cores: give each its own OUT and BLOCKS).
set -euo pipefail
data=${1:?usage: $0 DATA OUT BLOCKS ROWS}
out=${2:?results file}
blocks=${3:?record ranges}
rows=${4:?rows}
run() {
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} python -m attndrift.cli sweep --data "$data" \
    --steps 80 --out "$out" ${SWEEP_FLAGS:-} "$@"
}
for records in $blocks; do
  for row in $rows; do
    case $row in
      baseline)   run --records "$records" ;;
      margin)     run --records "$records" --early-stop-on margin --stop-margin "${MARGINS:-1,2,4}" ;;
      nll_margin) run --records "$records" --early-stop 0.5 --stop-margin 2 ;;
      offtarget)  run --records "$records" --offtarget "${OFFTARGET:-2}" ;;
      distract)   run --records "$records" --sadr-gamma "${DISTRACT_GAMMA:-0.5}" \
                    --sadr-prompts distractors ;;
      sadr)       run --records "$records" --sadr-gamma 0.05 ;;
      chosen)     run --records "$records" ${CHOSEN:?the chosen variant\'s flags} ;;
      matched)    run --records "$records" --early-stop-on margin \
                    --stop-margin "${MATCHED:?the efficacy-matched margin}" ;;
      *) echo "unknown row $row" >&2; exit 2 ;;
    esac
  done
done
