#!/usr/bin/env bash
# The one-step study of docs/results.md ("One step that looks like its teacher"), as it was run: every
# student of the bundled digits DDPM from the SAME pairs (16384 DDIM-20 pairs, seed 0, as
# data/recipes/digits-fewstep.toml makes them), scored in ONE report from the same noise.
#
#   bash docs/studies/digits-onestep/run.sh runs/onestep      # from the repository root, one CPU thread
#
# Each training's CPU seconds go to OUT/cpu.tsv (user + system, GNU time); a student's CPU minutes add the
# pairs' and its round-1 student's (OUT/fewstep-lpips/manifest.json records those stages).
set -euo pipefail
OUT=${1:-runs/onestep}
S=docs/studies/digits-onestep
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"
timed() {  # timed NAME CMD...: skip when OUT/NAME exists; record its CPU seconds
  local name=$1; shift
  [ -e "$OUT/$name" ] && return
  /usr/bin/time -f "$name\t%U\t%S\t%e" -a -o "$OUT/cpu.tsv" "$@"
}
# pairs, held-out DDIM-50 pairs, the reflow round (1000 steps) and its LPIPS-Huber distillations to 1 and 2 steps
reflow rounds --config $S/fewstep-lpips.toml --out "$OUT/fewstep-lpips"
PAIRS=$OUT/fewstep-lpips/round-1/pairs ROUND1=$OUT/fewstep-lpips/round-1/student
COMMON="--batch-size 128 --log-with none --checkpoint-every 500"
for k in 1 2; do  # today's distillation (pseudo-Huber), from the same round-1 student
  timed distill-k$k reflow distill --pairs "$PAIRS" --init "$ROUND1" --out "$OUT/distill-k$k" --k $k \
    --max-steps 500 --lr 3e-4 --loss pseudo_huber $COMMON
done
# MeanFlow from the round-1 student, 500 steps: all pairs, and without the 10% farthest
MF="--pairs $PAIRS --init $ROUND1 --objective meanflow --equal-fraction 0.75 --max-steps 500 --lr 3e-4 --loss pseudo_huber"
timed mf-r1-0.75 reflow train $MF --out "$OUT/mf-r1-0.75" $COMMON
timed mf-r1-trunc reflow train $MF --drop-farthest 0.1 --out "$OUT/mf-r1-trunc" $COMMON
# one report, every student from the same noise; the teacher's DDIM-50 on its own
timed report reflow eval --model "$ROUND1" --model "$OUT/distill-k1" --model "$OUT/fewstep-lpips/distill-k1/student" \
  --model "$OUT/distill-k2" --model "$OUT/fewstep-lpips/distill-k2/student" \
  --model "$OUT/mf-r1-0.75" --model "$OUT/mf-r1-trunc" \
  --reference digits --heldout "$OUT/fewstep-lpips/heldout" --nfe 1,2 --num-samples 2000 --seeds 1,2,3 \
  --diagnostics-samples 256 --out "$OUT/report"
timed teacher reflow eval --model data/teachers/digits-ddpm --reference digits --heldout "$OUT/fewstep-lpips/heldout" \
  --nfe 50 --num-samples 2000 --seeds 1,2,3 --out "$OUT/teacher"
cat "$OUT/cpu.tsv"
