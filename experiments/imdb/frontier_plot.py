"""The comparison's reward-KL frontier, drawn again from the JSON that `experiments/frontier.py` wrote.

    python experiments/imdb/frontier_plot.py experiments/imdb/compare > experiments/imdb/compare/frontier.md

Reads frontier.json in the folder (one line per run folder, a point per saved iteration) and redraws
frontier.png over experiments/frontier.py's: the methods by name, and a second panel that widens the crowded corner
near zero KL. Prints a Markdown table: per method, reward (KL) at each saved iteration.
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import ple  # noqa: E402  (its reader: a damaged file is named in one line)
from methods import METHODS, NAMES, run_of  # noqa: E402

ZOOM_KL = 1.0  # the second panel shows KL up to this many nats
COLORS = [f"C{i}" for i in range(10)] + ["black", "gold"]


def main(folder):
    frontier = ple.read_json(os.path.join(folder, "frontier.json"), keys=["frontier"])["frontier"]
    lines = {run_of(run)[0]: line for run, line in frontier["runs"].items()}
    methods = [m for m in NAMES if m in lines]
    seeds = sorted({str(run_of(run)[1]) for run in frontier["runs"]})

    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, zoom in zip(axes, (False, True)):
        for i, m in enumerate(methods):
            line = [p for p in lines[m] if not zoom or p["kl"] <= ZOOM_KL]
            ax.errorbar([p["kl"] for p in line], [p["reward"] for p in line],
                        xerr=[p["kl_stderr"] for p in line], yerr=[p["reward_stderr"] for p in line],
                        marker="os^vD<>ph*XP"[i % 12], capsize=2, color=COLORS[i % 12], label=NAMES[m],
                        linewidth=2.5 if m == "ple" else 1.2, linestyle="-" if METHODS[m].ours else "--")
            for p in line:
                if p["iteration"]:
                    ax.annotate(str(p["iteration"]), (p["kl"], p["reward"]), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color=COLORS[i % 12])
        ax.set(xlabel="KL to the untrained model (nats per answer)",
               title=f"KL up to {ZOOM_KL:g} nats" if zoom else "every saved iteration")
        if zoom:
            ax.set_xlim(right=ZOOM_KL)
    axes[0].set_ylabel("mean training-RM reward on held-out queries")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Reward against drift, seed {', '.join(seeds)}; numbers are iterations, bars one s.e.")
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "frontier.png"), dpi=110)

    iterations = [p["iteration"] for p in lines[methods[0]]]
    print("Mean training-RM reward (KL to the untrained model, nats) at each saved iteration; iteration 0 is the "
          "untrained model.\n")
    print("| method | " + " | ".join(f"iter {i}" for i in iterations) + " |")
    print("| --- " * (len(iterations) + 1) + "|")
    for m in methods:
        cells = {p["iteration"]: f"{p['reward']:+.2f} ({p['kl']:.1f})" for p in lines[m]}
        print(f"| {NAMES[m]} | " + " | ".join(cells.get(i, "-") for i in iterations) + " |")


if __name__ == "__main__":
    main(sys.argv[1])
