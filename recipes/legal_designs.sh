#!/usr/bin/env bash
# Decoder designs compared on the legal campaign's own datastore and kNN targets (after recipes/legal_full.sh WORK
# has built them), each at the same budget of optimizer steps, then one table of validation PPL.
#   recipes/legal_designs.sh WORK [STEPS]
# Designs: the top 6 blocks trained on the stored input of block 24 (tied head, frozen: the shipped design), the
# top 12 on the stored input of block 18, the top 6 with an untied, trained copy of the head, and a rank-64 LoRA on
# every block (weights frozen; about as many trained parameters as 6 blocks, every block run from token ids). Each
# run resumes.
set -euo pipefail
work=${1:?usage: recipes/legal_designs.sh WORK [STEPS]}
steps=${2:-20}
threads=${THREADS:-2}
mkdir -p "$work/designs"
design() {  # design NAME FROZEN [EXTRA...]
  local name=$1 frozen=$2; shift 2
  local out="$work/designs/$name"
  [ -e "$out/train.json" ] && return
  edge-memdec train "$work/datastore" --out "$out" --frozen-blocks "$frozen" --max-steps "$steps" --epochs 1 \
    --lr "${LR:-3e-4}" --batch-windows "${BATCH:-8}" --n-ctx 1024 --stride 1024 --valid-corpus "$work/split" \
    --valid-tokens 10000 --checkpoint-every 5 --threads "$threads" --device auto "$@" \
    $( [ -f "$out/checkpoint.pt" ] && echo --resume )
}
design top6-tied 24
design top12-tied 18
design top6-untied 24 --head untied
design lora64-all 0 --lora-rank 64
python - "$work/designs" <<'EOF'
import json, sys
from pathlib import Path
print(f"{'design':14} {'params':>8} {'trained':>8} {'positions':>10} {'seconds':>8} {'base':>8} {'alone':>8} {'mixed':>8} {'lambda':>6}")
for run in sorted(Path(sys.argv[1]).iterdir()):
    summary = json.loads((run / "train.json").read_text())
    v = summary["validation"]
    trained = summary.get("params_trained", 0) / 1e6
    print(f"{run.name:14} {summary['params'] / 1e6:7.1f}M {trained:7.1f}M {summary['positions_trained']:10d} "
          f"{summary['seconds']:8.0f} {v['base_ppl']:8.3f} {v['memdec_ppl']:8.3f} {v['best_ppl']:8.3f} "
          f"{v['best_lambda']:6.2f}")
EOF
