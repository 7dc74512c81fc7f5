#!/usr/bin/env bash
# Sampling on one GPU: ple.py itself for 3 iterations with --static_cache on and off (seconds per iteration, graphs
# compiled), then ple.py's sampling paths side by side (LoRA unmerged, merged with the dynamic KV cache, merged with
# the static cache in one shape; its compile timed apart) at SmolLM2-135M's and Llama-3-8B's shapes with random
# weights, batch 64 and 256 x 128 new tokens, against the card's memory-bandwidth bound; one PLE iteration at each
# shape and an estimate of a paper-sized one. About 8 minutes on one H100-class GPU; nothing is downloaded.
#
#   bash experiments/gpu_check/sampling.sh TOKENIZER_FOLDER          # SmolLM2's tokenizer, saved with save_pretrained
#   DEVICE=cpu bash experiments/gpu_check/sampling.sh TOKENIZER_FOLDER --tiny --batches 4 8 --tokens 8
#
# ple.py needs `datasets` and vaderSentiment there (pip install them). Writes experiments/gpu_check/sampling.json
# (after every step: a run cut short keeps what it measured) and prints the tables for README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENIZER=${1:?usage: sampling.sh TOKENIZER_FOLDER [sampling.py flags]}
shift
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
OUTPUT=${OUTPUT:-experiments/gpu_check/sampling.json}
python experiments/gpu_check/sampling.py --tokenizer "$TOKENIZER" --device "${DEVICE:-cuda}" --output "$OUTPUT" "$@" 2>&1 \
  | tr '\r' '\n' | grep -av "it/s\]\|s/it\]\|Warning\|warnings.warn"
