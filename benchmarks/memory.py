"""Where ple.py's memory goes: the resident set of a run, phase by phase, against one isolated step.

    python benchmarks/memory.py                                  # LoRA r 8 (ple.py's default)
    python benchmarks/memory.py --lora_r 0 --learning_rate 1e-5  # full fine-tuning

Two fresh processes, the same model, dtype and mini-batch shape (ple.py's flags after the script's
name go to both):
- isolated: load the policy as ple.py does, sample the pairs of one mini-batch (--mini_batch_size
  queries of the run's data, answers of at most --max_new_tokens), then two optimizer steps on them:
  weights + gradients + optimizer state + one mini-batch's activations, with the process itself
  (Python, torch, the tokenizer). This is the floor a run cannot go below.
- run: `ple.train` with --iterations 3 --num_queries 8 --max_new_tokens 32 (unless given), the resident
  set read every 5 ms; the peak and the level at the end of each phase (loading, sampling,
  scoring, training, logging with its checkpoint, the final save).
Prints a Markdown table and the run's peak over the isolated step's peak.
"""
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ple  # noqa: E402

DEFAULTS = ["--iterations", "3", "--num_queries", "8", "--max_new_tokens", "32"]


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


class Tracker:
    """The resident set, read every 5 ms by a thread: the peak within each phase."""

    def __init__(self):
        self.peak, self.phases = rss(), []
        threading.Thread(target=self.watch, daemon=True).start()

    def watch(self):
        while True:
            self.peak = max(self.peak, rss())
            time.sleep(0.005)

    def wrap(self, name, fn):
        def traced(*args, **kwargs):
            self.peak = rss()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases.append(dict(phase=name, peak=max(self.peak, rss()), end=rss()))
        return traced


def args_for(argv, out):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(ple.Args).parse_args_into_dataclasses(DEFAULTS + argv + ["--output_dir", out])
    return args


def isolated(argv):
    """Two optimizer steps on one mini-batch, nothing else."""
    with tempfile.TemporaryDirectory() as out:
        args = args_for(argv, out)
    from accelerate import PartialState

    device = PartialState(cpu=args.device == "cpu").device
    model, tokenizer, optimizer = ple.load_trainable(args, device, ple.pick_dtype(args.dtype, device))
    loaded = rss()
    queries, _, _ = ple.load_queries(ple.resolve_path(args.dataset), args.split, args.task, args.mini_batch_size, 0)
    prompt = dict(chat_prefix=ple.TASKS[args.task].chat_prefix, chat=ple.chat_prompts(args.chat_template, args.task))
    prompts = ple.encode_prompts(tokenizer, queries, **prompt)
    principles = ple.read_principles(ple.resolve_path(args.principles), args.task)
    torch.manual_seed(args.seed)  # answers as a run samples them: the same shapes
    answers, answers_p = ple.sample_pairs(model, tokenizer, prompts, ple.encode_prompts(tokenizer, queries, principles,
                                          **prompt), args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
    rewards, rewards_p = torch.zeros(len(prompts)), torch.linspace(-1, 1, len(prompts))  # both branches
    for _ in range(2):
        ple.train_on_samples("ple", model, optimizer, prompts, answers, answers_p, rewards, rewards_p, 0.2, 1.0,
                             pad_id=tokenizer.pad_token_id, mini_batch_size=args.mini_batch_size,
                             max_grad_norm=1.0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return dict(loaded=loaded, peak=peak_rss(), parameters=sum(p.numel() for p in model.parameters()),
                trainable=trainable)


def traced_run(argv):
    tracker = Tracker()
    for name in ("set_up", "sample_pairs", "score", "train_on_samples", "log_iteration", "save_final"):
        setattr(ple, name, tracker.wrap(name, getattr(ple, name)))
    with tempfile.TemporaryDirectory() as out:
        ple.train(args_for(argv, os.path.join(out, "run")))
    return dict(phases=tracker.phases, peak=peak_rss())


def gib(n):
    return f"{n / 2 ** 30:.2f}"


def main(argv):
    if argv[:1] in (["--isolated"], ["--run"]):
        print(json.dumps(isolated(argv[1:]) if argv[0] == "--isolated" else traced_run(argv[1:])))
        return
    result = {}
    for part in ("--isolated", "--run"):
        out = subprocess.run([sys.executable, __file__, part] + argv, capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr[-3000:])
        result[part[2:]] = json.loads(out.stdout.strip().splitlines()[-1])
    iso, run = result["isolated"], result["run"]
    print(f"flags: {' '.join(DEFAULTS + argv)}; {iso['parameters'] / 1e6:.0f}M parameters, "
          f"{iso['trainable'] / 1e6:.1f}M trainable\n")
    print("| phase | peak GiB | at its end GiB |\n| --- | --- | --- |")
    for p in run["phases"]:
        print(f"| {p['phase']} | {gib(p['peak'])} | {gib(p['end'])} |")
    print(f"\nisolated step: {gib(iso['loaded'])} GiB after loading, peak {gib(iso['peak'])} GiB")
    print(f"run: peak {gib(run['peak'])} GiB, {run['peak'] / iso['peak']:.2f}x the isolated step's peak")


if __name__ == "__main__":
    main(sys.argv[1:])
