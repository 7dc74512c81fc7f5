"""The HH experiment's prompt sets, cut from the halves build_pair_reward.py wrote: short enough for 2 CPU cores.

    python experiments/hh/prompts.py runs/hh            # reads runs/hh/A.jsonl and B.jsonl

Keeps the conversations whose prompt (the transcript up to its last "\\n\\nAssistant:") has at most --max_chars
characters, orders each half by the sha256 of the prompt (fixed by the text, as the split), and writes
    OUT/A_train.jsonl     the first --train of A: the training prompts
    OUT/A_heldout.jsonl   the next --heldout of A: the guidance gain is measured on them, before any training
    OUT/B_eval.jsonl      the first --eval of B: every trained model is judged on them
as `chosen`/`rejected` rows, which `ple.py --task dialogue --dataset` and `eval.py` read as Anthropic/hh-rlhf.
"""
import argparse
import hashlib
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
import ple  # noqa: E402  (the same transcript reading as the training runs)


def short_rows(path, max_chars):
    """The rows of a half whose prompt has at most max_chars characters, ordered by the sha256 of the prompt."""
    kept = []
    for row in ple.read_json(path, lines=True, keys=("chosen", "rejected")):
        prompt, _ = ple.make_query("dialogue", row, None)
        if prompt is not None and len(prompt) <= max_chars:
            kept.append((hashlib.sha256(prompt.encode()).hexdigest(), row))
    return [row for _, row in sorted(kept, key=lambda pair: pair[0])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="the folder build_pair_reward.py wrote A.jsonl and B.jsonl to")
    p.add_argument("--max_chars", type=int, default=500)
    p.add_argument("--train", type=int, default=256)
    p.add_argument("--heldout", type=int, default=128)
    p.add_argument("--eval", type=int, default=320)
    args = p.parse_args(argv)
    a = short_rows(os.path.join(args.out_dir, "A.jsonl"), args.max_chars)
    b = short_rows(os.path.join(args.out_dir, "B.jsonl"), args.max_chars)
    if len(a) < args.train + args.heldout or len(b) < args.eval:
        sys.exit(f"error: A has {len(a)} and B {len(b)} prompts of at most {args.max_chars} characters; fewer than "
                 f"asked for: raise --max_chars or ask for fewer")
    for name, rows in (("A_train", a[:args.train]), ("A_heldout", a[args.train:args.train + args.heldout]),
                       ("B_eval", b[:args.eval])):
        path = os.path.join(args.out_dir, f"{name}.jsonl")
        ple.write_file(path, "".join(json.dumps(row) + "\n" for row in rows))
        print(f"{path}: {len(rows)} conversations")
    print(f"of {len(a)} short prompts in A and {len(b)} in B (at most {args.max_chars} characters)")


if __name__ == "__main__":
    main()
