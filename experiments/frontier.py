"""Reward against drift: the untrained model and every saved iteration of each run, on the same held-out queries.

    python ple.py --save_every 1 --output_dir runs/ple ...          # keeps iter-1/, iter-2/, ... beside checkpoints
    python experiments/frontier.py runs/ple runs/cd --reward vader  # -> frontier.json and frontier.png beside runs/ple

The run folders come first, then any of eval.py's flags (--reward, --dataset, --n, --kl_samples, --cache, --output,
...). Each iter-N/ is evaluated by eval.py (its generations cached, its KL to the runs' untrained model measured on
answers sampled at temperature 1); the JSON holds eval.py's report plus "frontier": per run, a point per iteration
(0 is the untrained model). A research tool, not part of the method: eval.py's own report is what a run needs.
"""
import glob
import os
import re
import sys
from dataclasses import replace

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import eval as evaluation  # noqa: E402
import ple  # noqa: E402
from ple import PLEError, require  # noqa: E402


def frontier_models(args, runs):
    """The reference (the runs' untrained model, or --reference), then every run's iter-N/ in order."""
    require(not args.models and not args.rescore, "models", "the frontier takes run folders, not --models/--rescore")
    require(args.reward, "reward", "the frontier draws reward against KL: pass one")
    require(args.kl_samples >= 1, "kl_samples", "must be at least 1 for the frontier (the KL is its x axis)")
    points, bases = [], {}
    for run_dir in runs:
        if not os.path.isfile(os.path.join(run_dir, "args.json")):
            raise PLEError(f"{run_dir}: not a ple.py run folder (it has no args.json)")
        run = ple.read_json(os.path.join(run_dir, "args.json"), keys=ple.RUN)
        found = sorted((int(m.group(1)), path) for path in glob.glob(os.path.join(run_dir, "iter-*"))
                       if (m := re.fullmatch(r"iter-(\d+)", os.path.basename(path))) and os.path.isdir(path))
        if not found:
            raise PLEError(f"{run_dir} holds no saved iterations (iter-N/): train it with ple.py --save_every K")
        every, done = run.get("save_every") or 0, max(n for n, _ in found + ple.checkpoints(run_dir))
        missing = [n for n in range(every, done + 1, every or 1) if every and n not in dict(found)]
        if missing:
            print(f"warning: {run_dir} lacks iter-{', iter-'.join(map(str, missing))}/ (saved every {every}): those "
                  "points are left out", file=sys.stderr)
        bases[run["model"]] = run["model"]
        points += [(run_dir, n, path) for n, path in found]
    if not args.reference and len(bases) > 1:
        raise PLEError(f"the runs start from different models ({', '.join(bases)}); pass --reference MODEL")
    return args.reference or next(iter(bases.values())), points


def frontier_report(report, reference, points):
    """One line per run: the reference at its KL (0 up to the estimate), then each saved iteration."""
    def point(name, iteration):
        st = report["models"][name]
        return {"iteration": iteration, "model": name, "reward": st["mean_reward"], "reward_stderr": st["stderr"],
                "kl": st["kl"], "kl_stderr": st["kl_stderr"],
                **{k: st[k] for k in ("distinct_1", "distinct_2", "principle_copying", "mean_answer_tokens")}}

    runs = {}
    for run_dir, n, path in points:
        runs.setdefault(run_dir, [point(reference, 0)]).append(point(path, n))
    return {"reference": reference, "runs": runs}


def plot_frontier(frontier, path):
    """Reward against KL to the reference: a line per run, a point per saved iteration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for run, line in frontier["runs"].items():
        ax.errorbar([p["kl"] for p in line], [p["reward"] for p in line], xerr=[p["kl_stderr"] for p in line],
                    yerr=[p["reward_stderr"] for p in line], marker="o", capsize=2, label=os.path.basename(run))
        for p in line:
            ax.annotate(str(p["iteration"]), (p["kl"], p["reward"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set(xlabel=f"KL to the untrained model, {os.path.basename(frontier['reference'])} (nats per answer)",
           ylabel="mean reward on held-out queries", title="Reward against drift; numbers are iterations")
    ax.legend(fontsize=8)
    fig.tight_layout()
    ple.write_file(path, lambda f: fig.savefig(f, format="png", dpi=120))
    plt.close(fig)


def markdown(frontier):
    lines = [f"KL to `{frontier['reference']}` (nats per answer, sampled at temperature 1)", "",
             "| run | iteration | mean reward ± s.e. | KL ± s.e. | distinct-2 | principle copying | answer tokens |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run, line in frontier["runs"].items():
        for p in line:
            lines.append(f"| {run} | {p['iteration']} | {p['reward']:+.3f} ± {p['reward_stderr']:.3f} | "
                         f"{p['kl']:.2f} ± {p['kl_stderr']:.2f} | {p['distinct_2']:.2f} | "
                         f"{p['principle_copying']:.2f} | {p['mean_answer_tokens']:.1f} |")
    return "\n".join(lines)


def frontier(runs, args):
    """Evaluate the reference and every saved iteration; write the JSON (eval.py's report plus "frontier") and
    the PNG beside it. Returns the report as written."""
    reference, points = frontier_models(args, runs)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(runs[0])), "frontier.json")
    args = replace(args, reference=reference, models=[reference] + [path for _, _, path in points], output=output)
    report, record, output = evaluation.run_models(args, win_rates=False)
    report["frontier"] = frontier_report(report, reference, points)
    plot_frontier(report["frontier"], os.path.splitext(output)[0] + ".png")
    return evaluation.write_report(report, record, output)


def main(argv):
    runs = [a for a in argv[:next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))]]
    try:
        require(runs, "runs", "name the run folders first: frontier.py RUN_DIR [RUN_DIR ...] [eval.py's flags]")
        report = frontier([os.path.expanduser(r) for r in runs], ple.parse_args(argv[len(runs):],
                                                                                   evaluation.EvalArgs))
    except KeyboardInterrupt:
        print("\nstopped by Ctrl-C: the generations of every model that finished are kept in eval.py's cache",
              file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        print(ple.error_line(e), file=sys.stderr)
        sys.exit(2)
    print(markdown(report["frontier"]))


if __name__ == "__main__":
    main(sys.argv[1:])
