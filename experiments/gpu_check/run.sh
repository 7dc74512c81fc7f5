#!/usr/bin/env bash
# A short check of ple.py and eval.py on one CUDA GPU: bfloat16 (the default on cuda) with LoRA and with
# full fine-tuning, float32 beside them for the speed ratio, a run stopped after 2 iterations and resumed
# (compared with the straight run), and eval.py on the trained adapter. The policy has
# SmolLM2-135M-Instruct's architecture and tokenizer and random weights (random_policy.py), so the
# figures are mechanics and speed, not alignment: its answers are random tokens that run to the cap.
#
#   bash experiments/gpu_check/run.sh [SOURCE] [OUTPUT]   # SOURCE: Hub id or folder with config + tokenizer
#                                                        # (default HuggingFaceTB/SmolLM2-135M-Instruct)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=${1:-HuggingFaceTB/SmolLM2-135M-Instruct}
OUT=${2:-runs/gpu_check}
DEVICE=${DEVICE:-auto}   # auto: the GPU (Accelerate's pick); DEVICE=cpu runs the same steps on the CPU (slowly)
rm -rf "$OUT"; mkdir -p "$OUT"
python experiments/gpu_check/random_policy.py "$SRC" "$OUT/policy"
# ple.py's defaults: 48 queries from data/review_openings.txt, answers of 24 tokens, VADER reward
common=(--model "$OUT/policy" --reward vader --device "$DEVICE" --iterations 3 --learning_rate 1e-4 --seed 0
        --chat_template auto)
run() { echo "== ple.py $*"; python ple.py "${common[@]}" "$@" 2>&1 | tr '\r' '\n' | grep -a "^iter\|rror\|dtype\|resum"; }
run --lora_r 8 --output_dir "$OUT/lora_bf16"              # dtype auto: bfloat16 on cuda
run --lora_r 8 --output_dir "$OUT/lora_fp32" --dtype float32
run --lora_r 0 --output_dir "$OUT/full_bf16"
run --lora_r 0 --output_dir "$OUT/full_fp32" --dtype float32
run --lora_r 8 --output_dir "$OUT/lora_resumed" --iterations 2
run --lora_r 8 --output_dir "$OUT/lora_resumed" --resume
echo "== eval.py"
python eval.py --models "$OUT/lora_bf16/final" "$OUT/policy" --reward vader --device "$DEVICE" --seed 0 \
  --output "$OUT/eval.json" 2>&1 | tr '\r' '\n' | grep -av "it/s\]\|s/it\]" | tail -4
python experiments/gpu_check/report.py "$OUT"
