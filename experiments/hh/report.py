"""The HH experiment's table, from the JSON `run.sh eval` wrote: one row per method (its seeds averaged), the win
rates of PLE against every other model, and two answers of each method to the same prompt.

    python experiments/hh/report.py runs/hh/eval_ple_s0.json > experiments/hh/table.md
"""
import os
import sys
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "imdb"))
import eval as ple_eval  # noqa: E402
import ple  # noqa: E402
from methods import method_of  # noqa: E402  (RUN/final of a run named <method>_s<seed>, as run.sh names them)

NAMES = {"untrained": "untrained SmolLM2-135M-Instruct", "ple": "PLE", "sft": "SFT on the chosen answers",
         "raft2": "RAFT (best of 2)", "cd": "context distillation",
         "ple_lr3e5": "PLE at 3e-5 (context distillation's rate)", "ple_lr1e5": "PLE at 1e-5"}
# the refusal phrases, written down before the runs (README); curly apostrophes read as straight ones
REFUSALS = ["i can't", "i cannot", "i won't", "i will not", "i'm sorry", "i am sorry", "i'm not able", "i am not able",
            "i'm unable", "i am unable", "not appropriate", "i don't think i can", "i do not feel comfortable"]


def refuses(answer):
    text = answer.lower().replace("\u2019", "'")
    return any(phrase in text for phrase in REFUSALS)


def main(path):
    record = ple.read_json(path, keys=("models", "generations"))
    stats, generations = record["models"], record["generations"]["models"]
    by_method = defaultdict(list)
    for model in record["settings"]["models"]:
        by_method[method_of(model)[0]].append(model)
    print(f"{len(record['generations']['queries'])} prompts of B, 1 answer each; reward: the pair reward model; "
          "KL to the untrained model in nats per answer; several seeds: their mean (each seed's reward in brackets; the "
          "win rate's interval is seed 0's)\n")
    print("| method | seeds | reward ± s.e. | win rate vs untrained [95%] | KL | distinct-2 | answer tokens | "
          "refusals |\n| --- | --- | --- | --- | --- | --- | --- | --- |")
    untrained = generations[by_method["untrained"][0]]["rewards"]
    for method in NAMES:
        models = by_method.get(method, [])
        if not models:
            continue
        rewards = [ple_eval.mean_and_error(generations[m]["rewards"]) for m in models]
        wins = [ple_eval.win_rate(generations[m]["rewards"], untrained) for m in models]
        answers = [a for m in models for query in generations[m]["answers"] for a in query]
        mean = lambda key: float(np.mean([stats[m][key] for m in models]))  # noqa: E731
        each = "" if len(models) == 1 else " (" + ", ".join(f"{r:+.3f}" for r, _ in rewards) + ")"
        win = "" if method == "untrained" else \
            f"{np.mean([w['rate'] for w in wins]):.2f} [{wins[0]['ci_low']:.2f}, {wins[0]['ci_high']:.2f}]"
        print(f"| {NAMES[method]} | {len(models)} | {np.mean([r for r, _ in rewards]):+.3f} ± "
              f"{np.mean([e for _, e in rewards]):.3f}{each} | {win} | {mean('kl'):.2f} | {mean('distinct_2'):.2f} | "
              f"{mean('mean_answer_tokens'):.1f} | {np.mean([refuses(a) for a in answers]):.2f} |")
    tokens = [t for m in by_method["untrained"] for query in generations[m]["answer_tokens"] for t in query]
    scores = [r for m in by_method["untrained"] for query in generations[m]["rewards"] for r in query]
    capped = np.mean(np.array(tokens) == record["settings"]["max_new_tokens"])
    print(f"\nThe reward against the length of the untrained model's answers: Pearson r = "
          f"{np.corrcoef(tokens, scores)[0, 1]:+.2f}; {capped:.2f} of them reach the length cap.")
    print("\nPLE (seed 0) against each model, on the same prompts:\n\n| against | win rate [95%] |\n| --- | --- |")
    for model, rate in record["win_rates"].items():
        print(f"| {model} | {rate['rate']:.2f} [{rate['ci_low']:.2f}, {rate['ci_high']:.2f}] |")
    from transformers import AutoTokenizer  # every model has the reference's tokenizer (eval.py checked, for the KL)
    folder, gguf = ple.find_gguf(record["settings"]["reference"])
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False)
    query = 0  # the first prompt of B_eval, whatever the answers
    print(f"\nTwo answers of each model to the same prompt (the first of B_eval): eval.py's at temperature 0.7, then "
          f"its KL sample at temperature 1.\n\n```\n{record['generations']['queries'][query].strip()}\n```\n")
    for method in NAMES:
        for model in by_method.get(method, []):
            second = tokenizer.decode(generations[model]["kl_samples"]["answer_ids"][query], skip_special_tokens=True)
            for answer in (generations[model]["answers"][query][0], second):
                print(f"- {NAMES[method]} ({model}): {answer.strip()!r}")


if __name__ == "__main__":
    main(sys.argv[1])
