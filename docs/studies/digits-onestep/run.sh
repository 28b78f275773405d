#!/usr/bin/env bash
# The one-step study of docs/results.md ("One step that looks like its teacher"): the students of the
# bundled digits DDPM side by side, every one from the SAME pairs (16384 DDIM-20 pairs, seed 0, as
# data/recipes/digits-fewstep.toml makes them) and scored in ONE report from the same noise.
#
#   bash docs/studies/digits-onestep/run.sh runs/onestep      # from the repository root, one CPU thread
#
# Each command's CPU seconds go to OUT/cpu.tsv (user + system of the process, GNU time); a student's
# CPU is the pairs' plus its own training (plus its round-1 student's, for a distilled one).
set -euo pipefail
OUT=${1:-runs/onestep}
T=data/teachers/digits-ddpm
P=data/perceptual/digits-lpips
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"
run() {  # run NAME CMD...: skip when OUT/NAME is done; record its CPU seconds
  local name=$1; shift
  if [ -e "$OUT/$name.done" ]; then return; fi
  /usr/bin/time -f "$name\t%U\t%S\t%e" -a -o "$OUT/cpu.tsv" "$@"
  touch "$OUT/$name.done"
}
TRAIN="--batch-size 128 --log-with none --checkpoint-every 500 --seed 0"
run pairs reflow generate --teacher $T --out "$OUT/pairs" --num-pairs 16384 --nfe 20 --solver ddim --seed 0 --batch-size 1024
run heldout reflow generate --teacher $T --out "$OUT/heldout" --num-pairs 1024 --nfe 50 --solver ddim --seed 1 --batch-size 1024
# today's fewstep: one reflow round (1000 steps, pseudo-Huber) then distillation to k = 1 and 2 (500 steps)
run round1 reflow train --pairs "$OUT/pairs" --init $T --out "$OUT/round1" --max-steps 1000 --lr 1e-3 --loss pseudo_huber $TRAIN
for k in 1 2; do
  run distill-k$k reflow distill --pairs "$OUT/pairs" --init "$OUT/round1" --out "$OUT/distill-k$k" --k $k \
    --max-steps 500 --lr 3e-4 --loss pseudo_huber $TRAIN
  run lpips-k$k reflow distill --pairs "$OUT/pairs" --init "$OUT/round1" --out "$OUT/lpips-k$k" --k $k \
    --max-steps 500 --lr 3e-4 --loss lpips_huber --perceptual-weights $P $TRAIN
done
# MeanFlow on the same pairs, from the teacher's UNet, no distillation stage
MF="--pairs $OUT/pairs --init $T --objective meanflow --max-steps ${MF_STEPS:-1500} --lr 1e-3 --loss pseudo_huber"
run meanflow reflow train $MF --out "$OUT/meanflow" $TRAIN
run meanflow-trunc reflow train $MF --drop-farthest 0.1 --out "$OUT/meanflow-trunc" $TRAIN
# one report: every student from the same noise (2000 samples x seeds 1, 2, 3), MSE to the held-out DDIM-50 pairs
MODELS=()
for m in distill-k1 lpips-k1 distill-k2 lpips-k2 meanflow meanflow-trunc; do MODELS+=(--model "$OUT/$m"); done
run report reflow eval "${MODELS[@]}" --reference digits --heldout "$OUT/heldout" --nfe 1,2 \
  --num-samples 2000 --seeds 1,2,3 --out "$OUT/report"
run teacher reflow eval --model $T --reference digits --heldout "$OUT/heldout" --nfe 50 \
  --num-samples 2000 --seeds 1,2,3 --out "$OUT/teacher"
cat "$OUT/cpu.tsv"
