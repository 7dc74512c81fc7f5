"""Summarize run.sh's runs: per-iteration speed and peak memory, the resumed run against the straight
one, the saved dtype, eval.py's figures. Writes OUTPUT/report.json and prints a Markdown table."""
import glob
import json
import math
import os
import sys

import torch
from safetensors.torch import load_file

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from ple import read_json  # noqa: E402

out = sys.argv[1]
runs = ["lora_bf16", "lora_fp32", "full_bf16", "full_fp32"]
report = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
          "torch": torch.__version__, "runs": {}}


def records(run):
    return read_json(os.path.join(out, run, "metrics.jsonl"), lines=True)


def samples(run):
    return [open(f).read() for f in sorted(glob.glob(os.path.join(out, run, "samples", "*.jsonl")))]


def learning(record):  # a record without its timings and memory
    return {k: v for k, v in record.items() if not k.endswith(("_s", "_per_s")) and k != "peak_memory_mb"}


print("| run | s / iteration | sampling tok/s | training tok/s | peak GPU memory MiB | losses finite | saved dtype |")
print("|---|---|---|---|---|---|---|")
for run in runs:
    rs = records(run)
    later = rs[1:] or rs  # iteration 0 includes CUDA's warm-up
    weights = load_file(os.path.join(out, run, "final", "model.safetensors"))
    row = {"iterations": len(rs),
           "seconds_per_iteration": sum(r["sample_s"] + r["score_s"] + r["train_s"] for r in later) / len(later),
           "sample_tokens_per_s": sum(r["sample_tokens_per_s"] for r in later) / len(later),
           "train_tokens_per_s": sum(r["train_tokens_per_s"] for r in later) / len(later),
           "peak_memory_mb": max(r["peak_memory_mb"] for r in rs),
           "losses_finite": all(math.isfinite(r["loss"]) for r in rs),
           "saved_dtypes": sorted({str(t.dtype) for t in weights.values()})}
    report["runs"][run] = row
    print(f"| {run} | {row['seconds_per_iteration']:.1f} | {row['sample_tokens_per_s']:.0f} | "
          f"{row['train_tokens_per_s']:.0f} | {row['peak_memory_mb']:.0f} | {row['losses_finite']} | "
          f"{', '.join(row['saved_dtypes'])} |")

for kind in ("lora", "full"):
    seconds = {dtype: report["runs"][f"{kind}_{dtype}"]["seconds_per_iteration"] for dtype in ("fp32", "bf16")}
    report[f"{kind}_fp32_over_bf16_time"] = ratio = seconds["fp32"] / seconds["bf16"]
    print(f"{kind}: float32 takes {ratio:.2f}x bfloat16's time per iteration")

straight = load_file(os.path.join(out, "lora_bf16", "final", "model.safetensors"))
resumed = load_file(os.path.join(out, "lora_resumed", "final", "model.safetensors"))
diff = max((straight[k].float() - resumed[k].float()).abs().max().item() for k in straight)
report["resumed"] = {"same_keys": straight.keys() == resumed.keys(), "max_abs_weight_difference": diff,
                     "same_samples": samples("lora_bf16") == samples("lora_resumed"),
                     "same_metrics": [learning(r) for r in records("lora_bf16")]
                     == [learning(r) for r in records("lora_resumed")]}
print(f"resumed (2 + 1 iterations) vs straight 3: {report['resumed']}")

ev = read_json(os.path.join(out, "eval.json"))
report["eval"] = {name: {k: m.get(k) for k in ("mean_reward", "kl", "distinct_2", "mean_answer_tokens")}
                  for name, m in ev["models"].items()}
print(f"eval.py: {report['eval']}")
json.dump(report, open(os.path.join(out, "report.json"), "w"), indent=1)
