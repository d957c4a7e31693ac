#!/usr/bin/env bash
# The legal memory decoder on one GPU, whole train split, paper-like epochs: split -> datastore (with the
# residual stream entering block 24) -> kNN targets (T and k chosen on validation) -> train the top 6 blocks
# -> the trained tensors in parts of at most 16 MiB (`edge-memdec parts pack`). About 10 minutes on one H200.
#   recipes/gpu_legal.sh WORK PARTS_OUT
# Then, on any machine: edge-memdec parts unpack PARTS_OUT --out hf && edge-memdec convert hf -o legal.gguf ...
# Settings by environment: DEVICE (cuda), MAX_TOKENS (whole split), EPOCHS (15), LR (3e-4), BATCH (32 windows).
set -euo pipefail
work=${1:?usage: recipes/gpu_legal.sh WORK PARTS_OUT}
parts=${2:?usage: recipes/gpu_legal.sh WORK PARTS_OUT}
device=${DEVICE:-cuda}
frozen=${FROZEN:-24}
mkdir -p "$work"
log() { echo "[$(date -u +%T)] $*" | tee -a "$work/gpu.log"; }
limit=()
[ -n "${MAX_TOKENS:-}" ] && limit=(--max-tokens "$MAX_TOKENS")
log split
edge-memdec corpus split legal --out "$work/split"
log datastore
edge-memdec datastore build --corpus "$work/split" --out "$work/datastore" "${limit[@]}" \
  --hidden-blocks "$frozen" --pass carry --shard-windows 256 --device "$device" --threads "${THREADS:-8}"
log knn-targets
edge-memdec knn-targets "$work/datastore" --temperature auto --ks 64,256,1024 --index auto \
  --device "$device" --threads "${THREADS:-8}"
log train
edge-memdec train "$work/datastore" --out "$work/run" --frozen-blocks "$frozen" --epochs "${EPOCHS:-15}" \
  --lr "${LR:-3e-4}" --batch-windows "${BATCH:-32}" --n-ctx 1024 --stride 1024 --valid-corpus "$work/split" \
  --valid-tokens 20000 --device "$device" --threads "${THREADS:-8}" --checkpoint-every 1000
log parts
edge-memdec parts pack "$work/run" --out "$parts"
cp "$work/run/train.json" "$work/datastore/targets/targets.json" "$parts/"
log done
