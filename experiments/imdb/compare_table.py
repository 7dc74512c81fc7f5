"""The comparison's table and samples from compare.sh's eval JSONs.

    python experiments/imdb/compare_table.py experiments/imdb/compare > experiments/imdb/compare/table.md
    python experiments/imdb/compare_table.py experiments/imdb/gemma "untrained Gemma-3-270M" raft2 > ...   # another policy

Reads eval_rm.json (judged by the training reward), eval_vader.json (the same answers scored by
VADER) and train_seconds.txt; or, where the evaluation ran one seed at a time, eval_rm_s0.json,
eval_rm_s1.json, ... and their VADER twins, merged. One row per method: the mean over its seeds,
± the standard deviation across seeds where there are several (with one seed: ± the standard error
over queries). Win rates pool the seeds (each query's outcomes against every seed averaged), 95%
bootstrap intervals over queries. Training time: the first seed's run (later seeds may have shared
the machine). "Strongest baseline": the method outside PLE and its ablations with the highest mean
training-RM reward, unless a third argument names the baseline (gemma.sh: raft2, the comparison's).
"Continues": the share of answers that continue the review (prompt_formats.py's heuristic). Then
each method's seed-0 answers to the first 5 held-out queries.
"""
import os
import sys
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import ple  # noqa: E402
from eval import copying_share, distinct_n, mean_and_error, win_rate  # noqa: E402
from methods import METHODS, NAMES, method_of  # noqa: E402
from prompt_formats import continues  # noqa: E402

TODAY = "experiments/imdb/guidance/texts/today.txt"  # the principles every comparison run read


def merged(folder, prefix):
    """The results files whose names start with prefix as one: their models side by side."""
    files = sorted(f for f in os.listdir(folder) if f.startswith(prefix) and f.endswith(".json"))
    if not files:
        sys.exit(f"error: no {prefix}*.json in {folder}: run the evaluation first")

    def load(name):  # eval.py saves its progress as it goes; such a file has no summary yet
        report = ple.read_json(os.path.join(folder, name))
        if report.get("complete", True) is False:
            sys.exit(f"error: {folder}/{name} is an evaluation still running or stopped part-way: "
                     "let it finish (or run it again: it resumes), then make the table")
        return report

    first = load(files[0])
    for name in files[1:]:
        other = load(name)
        assert other["generations"]["queries"] == first["generations"]["queries"], f"{name}: other queries"
        first["generations"]["models"].update(other["generations"]["models"])
        first["models"].update(other["models"])
    return first


def as_list(x):
    return x if isinstance(x, list) else [x]


def pooled(rewards):  # per query, the rewards of every seed (and sample)
    return [[x for seed in query for x in as_list(seed)] for query in zip(*rewards)]


def interval(win):
    """A win rate and its 95% interval, as the tables print them."""
    return f"{win['rate']:.2f} [{win['ci_low']:.2f}, {win['ci_high']:.2f}]"


def spread(values, rewards):
    """'mean ± sd across seeds', or with one seed 'mean ± s.e. over queries'."""
    if len(values) > 1:
        return np.mean(values), np.std(values, ddof=1)
    return values[0], mean_and_error(rewards[0])[1] if rewards else float("nan")


def main(folder, untrained=NAMES["untrained"], against=None):
    NAMES["untrained"] = untrained  # the starting policy's name in the table
    report = merged(folder, "eval_rm")
    vader = {m: e["rewards"] for m, e in merged(folder, "eval_vader")["generations"]["models"].items()}
    seconds = {}
    with open(os.path.join(folder, "train_seconds.txt")) as f:
        for line in f:
            name, value = line.split()
            seconds[name] = int(value)
    generations = report["generations"]["models"]
    runs = defaultdict(dict)  # method -> seed -> model
    for model in generations:
        method, seed = method_of(model)
        runs[method][seed] = model
    methods = [m for m in NAMES if m in runs]
    rm = {m: [generations[runs[m][s]]["rewards"] for s in sorted(runs[m])] for m in methods}
    vd = {m: [vader[runs[m][s]] for s in sorted(runs[m])] for m in methods}
    baselines = [m for m in methods if m != "untrained" and not METHODS[m].ours]
    if against and against not in baselines:
        sys.exit(f"error: no evaluated baseline '{against}' in {folder}; evaluated: {', '.join(baselines)}")
    baseline = against or max(baselines, key=lambda m: np.mean([mean_and_error(r)[0] for r in rm[m]]), default=None)
    judged_against = ["untrained"] + ([baseline] if baseline else [])  # (none evaluated yet: no column)

    def rate(judge, a, b):
        if a == b:
            return "-"
        return interval(win_rate(pooled(judge[a]), pooled(judge[b])))

    principles = ple.read_principles(ple.resolve_path(report["settings"].get("principles", TODAY)),
                                     report["settings"]["task"])
    n = len(report["generations"]["queries"])
    print(f"{n} held-out test queries, one answer each per model; {'baseline' if against else 'strongest baseline'}: "
          f"{NAMES[baseline] if baseline else 'none evaluated'}.\n")
    print("| method | seeds | reward, training RM | VADER | KL to untrained | distinct-2 | copies principles "
          "| continues | answer tokens | win rate vs untrained, RM | vs untrained, VADER "
          + "".join(f"| vs {NAMES[b]}, RM | vs {NAMES[b]}, VADER " for b in judged_against[1:])
          + "| training time, first seed |")
    print("| --- " * (10 + 2 * len(judged_against)) + "|")
    for m in methods:
        stats = [report["models"][runs[m][s]] for s in sorted(runs[m])]
        answers = [generations[runs[m][s]]["answers"] for s in sorted(runs[m])]
        flat = [[a for query in seed for a in as_list(query)] for seed in answers]  # each seed's answers
        cells = []
        for judge in (rm, vd):
            mean, err = spread([mean_and_error(r)[0] for r in judge[m]], judge[m])
            cells.append(f"{mean:+.2f} ± {err:.2f}")
        if all("kl" in s for s in stats):  # (evaluations made without --kl_samples have none)
            kl, kl_err = spread([s["kl"] for s in stats], None)
            cells.append(f"{kl:.1f} ± {stats[0]['kl_stderr'] if len(stats) == 1 else kl_err:.1f}")
        else:
            cells.append("-")
        cells.append(f"{np.mean([distinct_n(a, 2) for a in flat]):.2f}")  # eval.py's own metrics, per seed
        cells.append(f"{np.mean([copying_share(a, principles) for a in flat]):.2f}")
        cells.append(f"{np.mean([continues(a) for seed in flat for a in seed]):.2f}")
        cells.append(f"{np.mean([s['mean_answer_tokens'] for s in stats]):.1f}")
        for b in judged_against:
            cells += [rate(rm, m, b), rate(vd, m, b)]
        time = seconds.get(f"{m}_s{min(runs[m])}")
        cells.append(f"{time / 60:.1f} min" if m != "untrained" and time else "-")
        seeds = ", ".join(map(str, sorted(runs[m]))) if m != "untrained" else "-"
        print(f"| {NAMES[m]} | {seeds} | " + " | ".join(cells) + " |")

    print("\n## Samples: the first 5 held-out queries, seed 0 of each method\n")
    for i, query in enumerate(report["generations"]["queries"][:5]):
        print(f"**{query!r}**\n")
        for m in methods:
            model = runs[m][min(runs[m])]
            answer, reward = as_list(generations[model]["answers"][i])[0], as_list(generations[model]["rewards"][i])[0]
            print(f"- {NAMES[m]} ({reward:+.2f}): {' '.join(answer.split())!r}")
        print()


if __name__ == "__main__":
    main(*sys.argv[1:4])
