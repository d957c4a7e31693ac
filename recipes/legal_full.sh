#!/usr/bin/env bash
# The shipped legal memory decoder's campaign on a CPU, stage by stage; every stage resumes after a kill.
#   recipes/legal_full.sh WORK [MAX_TOKENS]
# WORK holds everything (split, datastore, targets, run); MAX_TOKENS caps the datastore's train tokens
# (whole documents, seeded sample; default 1.2M, the whole split is ~3.1M). Stage timings go to WORK/stages.log.
# Settings by environment: FROZEN (24), THREADS (2), HIDDEN, PRECISION (auto), EPOCHS (2), MAX_STEPS, LR (3e-4),
# BATCH (8 windows), VALID_EVERY (40 steps); kNN targets: TEMPERATURE (auto: the T x k sweep of KS on validation,
# or a fixed T with K neighbours), KS (64,256,1024), K (1024), NPROBE (32 IVF lists searched per query).
set -euo pipefail
work=${1:?usage: recipes/legal_full.sh WORK [MAX_TOKENS]}
max_tokens=${2:-1200000}
frozen=${FROZEN:-24}          # lower blocks kept at the base's weights (their output read from the datastore)
threads=${THREADS:-2}
hidden=${HIDDEN:-$frozen}     # blocks whose input the datastore stores (add 18 for recipes/legal_designs.sh's top 12)
precision=${PRECISION:-auto}  # auto: bf16 autocast where the CPU multiplies bf16 natively (2x here), else fp32
mkdir -p "$work"
stage() {  # stage NAME DONE_FILE COMMAND...
  local name=$1 done=$2; shift 2
  if [ -e "$done" ]; then echo "$name: done" >> "$work/stages.log"; return; fi
  local t0; t0=$(date +%s)
  /usr/bin/time -f "$name: %e s wall, peak %M KiB" -a -o "$work/stages.log" "$@"
  echo "$name: finished $(date -u +%FT%TZ) after $(( $(date +%s) - t0 )) s" >> "$work/stages.log"
}
stage split "$work/split/manifest.json" edge-memdec corpus split legal --out "$work/split"
stage datastore "$work/datastore/.complete" bash -c "edge-memdec datastore build --corpus '$work/split' \
  --out '$work/datastore' --max-tokens $max_tokens --hidden-blocks $hidden --pass carry --threads $threads --device auto --precision $precision \
  && touch '$work/datastore/.complete'"
stage knn_targets "$work/datastore/targets/knn-ids.npy" edge-memdec knn-targets "$work/datastore" \
  --temperature "${TEMPERATURE:-auto}" -k "${K:-1024}" \
  $( [ "${TEMPERATURE:-auto}" = auto ] && echo --ks "${KS:-64,256,1024}" ) --index ivfflat \
  --nprobe "${NPROBE:-32}" --threads "$threads"
stage train "$work/run/train.json" edge-memdec train "$work/datastore" --out "$work/run" \
  --frozen-blocks "$frozen" --epochs "${EPOCHS:-2}" --lr "${LR:-3e-4}" --batch-windows "${BATCH:-8}" \
  --n-ctx 1024 --stride 1024 --valid-corpus "$work/split" --valid-tokens 10000 --valid-every "${VALID_EVERY:-40}" \
  --checkpoint-every 5 --threads "$threads" --device auto --precision "$precision" \
  $( [ -n "${MAX_STEPS:-}" ] && echo --max-steps "$MAX_STEPS" ) $( [ -f "$work/run/checkpoint.pt" ] && echo --resume )
