"""The learning-rate sweep's table, the rate each method keeps, and its reward-KL plot.

    python experiments/imdb/sweep_report.py                # table (Markdown) and sweep/selected.json
    python experiments/imdb/sweep_report.py --plot FILE    # also reward against KL, one line per method

Reads experiments/imdb/sweep/<method>_lr<rate>.json (written by sweep.sh, judged on validation
queries). The rule that picks one rate per method, fixed before any test-split result was looked at:
the rate with the highest mean validation reward among those whose KL to the untrained model is at
most KL_CAP nats per answer; a method with no rate under the cap keeps its smallest rate. Reward alone
would pick rates where the model has collapsed onto a few phrases (distinct-2 0.08 at KL 34 nats).
"""
import argparse
import glob
import json
import os

import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import ple  # noqa: E402  (its reader: a damaged file is named in one line)
from methods import NAMES  # noqa: E402

KL_CAP = 10.0
SWEPT = ("ple", "raft", "raft2", "cd", "rloo", "dpo", "sft")  # the methods sweep.sh sweeps, in table order


def read_sweep(folder):
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, "*_lr*.json"))):
        r = ple.read_json(path, keys=("method", "learning_rate"))
        runs.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["learning_rate"]) for m, rs in runs.items()}


def select(runs):
    """The kept rate of one method: best validation reward with KL <= KL_CAP, else the smallest rate."""
    allowed = [r for r in runs if r["kl"] is not None and r["kl"] <= KL_CAP]
    return max(allowed, key=lambda r: r["validation_reward"]) if allowed else runs[0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", default=os.path.join(HERE, "sweep"))
    p.add_argument("--plot", help="write reward against KL (PNG)")
    a = p.parse_args()
    sweep = read_sweep(a.sweep)
    order = [m for m in SWEPT if m in sweep] + sorted(set(sweep) - set(SWEPT))
    chosen = {m: select(sweep[m]) for m in order}
    print("| method | learning rate | validation reward (training RM) ± s.e. | KL to untrained ± s.e. | distinct-2 "
          "| win rate vs untrained | training time | kept |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in order:
        for r in sweep[m]:
            print(f"| {NAMES.get(m, m)} | {r['learning_rate']:g} | {r['validation_reward']:+.2f} ± {r['stderr']:.2f} "
                  f"| {r['kl']:.1f} ± {r['kl_stderr']:.1f} | {r['distinct_2']:.2f} | {r['win_rate_vs_untrained']:.2f} "
                  f"| {r['training_seconds'] / 60:.1f} min | {'**yes**' if r is chosen[m] else ''} |")
    with open(os.path.join(a.sweep, "selected.json"), "w") as f:
        json.dump({m: r["learning_rate"] for m, r in chosen.items()}, f, indent=1)
    if a.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for m in order:
            rs = sweep[m]
            line, = ax.plot([r["kl"] for r in rs], [r["validation_reward"] for r in rs], "o-", label=NAMES.get(m, m))
            for r in rs:
                ax.annotate(f"{r['learning_rate']:g}", (r["kl"], r["validation_reward"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points", color=line.get_color())
        ax.axvline(KL_CAP, color="grey", lw=0.8, ls="--")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(left=0)
        ax.set_xlabel("KL to the untrained model (nats per answer)")
        ax.set_ylabel("validation reward (training RM)")
        ax.set_title("Learning-rate sweep, validation queries (labels: learning rate)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)


if __name__ == "__main__":
    main()
