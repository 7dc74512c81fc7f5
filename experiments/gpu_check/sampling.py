"""Sampling on one GPU: ple.py's paths side by side, the memory-bandwidth bound, ple.py runs, a paper-sized estimate.

    python experiments/gpu_check/sampling.py --tokenizer FOLDER --output experiments/gpu_check/sampling.json
    python experiments/gpu_check/sampling.py --tokenizer FOLDER --device cpu --tiny --output /tmp/s.json  # small

First, ple.py itself (ple.train) on a random-weight policy of SmolLM2-135M's shape with its defaults (48 queries of
data/review_openings.txt, VADER, LoRA r 8, 24 new tokens, batch 16) for 3 iterations, with --static_cache on and off:
seconds per iteration and how many graphs torch compiled. Then, per shape (SmolLM2-135M, Llama-3-8B; LlamaConfig
from their published configs, random bfloat16 weights, LoRA r 8 / scaling 16 on all linear layers with non-zero
adapters) and batch (64, 256 prompts x --tokens new tokens, no end-of-sequence: every answer runs to the cap),
ple.generate_answers through:

- unmerged: the adapters as separate matrices (--merge_lora off);
- merged:   inside ple.fast_sampling(merge_lora=True), the dynamic KV cache (ple.py on CUDA before --static_cache);
- static:   merged, and transformers' static KV cache in one shape (--static_cache, now the default on CUDA): on
            CUDA generate compiles its decoding step; the first call, the compile, is timed apart.

Tokens/s are batch x tokens / seconds of one call after a warm-up, beside the bound of the card's memory bandwidth
(a device-to-device copy measured here): per decoding step the weights and the KV cache so far are read once. Then
one PLE iteration per shape (64 queries x 2 answers x --tokens, static sampling, AdamW on the adapters), and from
it an estimate of one iteration of 4096 queries x 2 x 256 tokens. Results are written after every step: a run cut
short keeps what it measured.
"""
import argparse
import json
import os
import random
import sys
import tempfile
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
TINY = {  # --tiny: the same steps on shapes a CPU gets through in a minute
    "SmolLM2-135M": dict(SHAPES["SmolLM2-135M"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2),
    "Llama-3-8B": dict(SHAPES["Llama-3-8B"], hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=49152),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def compiled_graphs():
    """Graphs torch has compiled in this process so far (dynamo's count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def bandwidth(device, gib=1.0):
    """Bytes per second a device-to-device copy moves (each byte read once and written once)."""
    src = torch.empty(int(gib * 2 ** 30), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() / min(timed(lambda: dst.copy_(src), device) for _ in range(5))


def llama(shape, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=8192, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, dtype=dtype)


def policy(shape, device, dtype):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(llama(shape, device, dtype), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                   target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero; a trained adapter does not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    model.generation_config.eos_token_id = shape["vocab_size"]  # an id never sampled: every answer runs to the cap
    return model.eval()


def ple_runs(a, tokenizer, device, report, output):
    """ple.train with its defaults on a random policy of SmolLM2-135M's shape, 3 iterations, static cache on, off."""
    folder = tempfile.mkdtemp(prefix="gpu_check_")
    llama((TINY if a.tiny else SHAPES)["SmolLM2-135M"], "cpu", torch.bfloat16).save_pretrained(f"{folder}/policy")
    tokenizer.save_pretrained(f"{folder}/policy")
    for static in ("on", "off"):
        before, start = compiled_graphs(), time.perf_counter()
        ple.train(ple.Args(model=f"{folder}/policy", output_dir=f"{folder}/run_{static}", iterations=3,
                           static_cache=static, device="cpu" if device.type == "cpu" else "auto"))
        metrics = ple.read_json(f"{folder}/run_{static}/metrics.jsonl", lines=True)
        report["ple_runs"][static] = dict(
            seconds_per_iteration=[m["sample_s"] + m["score_s"] + m["train_s"] for m in metrics],
            sample_s=[m["sample_s"] for m in metrics], sample_tokens_per_s=[m["sample_tokens_per_s"] for m in metrics],
            compiled_graphs=compiled_graphs() - before, wall_s=time.perf_counter() - start,
            peak_memory_mb=max(m["peak_memory_mb"] or 0 for m in metrics))
        print("ple.py --static_cache", static, report["ple_runs"][static], flush=True)
        save(report, output)


def measure(path, model, tokenizer, prompts, a, device):
    """Tokens/s of one sampling path: one timed call after a warm-up (static: the first call, its compile, apart)."""
    static = (len(prompts), -(-max(map(len, prompts)) // 64) * 64) if path == "static" else None

    def call(tokens):
        with ple.fast_sampling(model, merge_lora=path != "unmerged"):
            answers = ple.generate_answers(model, tokenizer, prompts, tokens, 0.7, 0.95, shape=static)
        assert all(len(x) == tokens for x in answers)

    before = compiled_graphs()
    first = timed(lambda: call(a.tokens if static else 8), device)  # the compile, or a short warm-up
    seconds = timed(lambda: call(a.tokens), device)
    return dict(tokens_per_s=len(prompts) * a.tokens / seconds, seconds=seconds, first_call_s=first,
                compiled_graphs=compiled_graphs() - before)


def iteration(model, tokenizer, queries, principles, a, device):
    """One PLE iteration as ple.py runs it on CUDA (merged, static sampling), 64 queries x 2 answers x a.tokens."""
    many = [queries[i % len(queries)] for i in range(64)]
    prompt_ids, prompt_ids_p = (ple.encode_prompts(tokenizer, many, p, chat=False) for p in (None, principles))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    out = {}
    with ple.fast_sampling(model, merge_lora=True):
        out["sample_s"] = timed(lambda: out.update(ids=ple.sample_pairs(
            model, tokenizer, prompt_ids, prompt_ids_p, 32, a.tokens, 0.7, 0.95, static_cache=True)), device)
    ids, ids_p = out.pop("ids")
    rewards = torch.randn(len(many)), torch.randn(len(many))  # (random text: any reward does; the loss is the point)
    out["train_s"] = timed(lambda: out.update(tokens=ple.train_on_samples(
        "ple", model, optimizer, prompt_ids, ids, ids_p, *rewards, 0.2, 1.0, pad_id=tokenizer.pad_token_id,
        mini_batch_size=8, max_grad_norm=1.0)[1]), device)
    model.eval()
    out.update(sample_tokens_per_s=2 * len(many) * a.tokens / out["sample_s"],
               train_tokens_per_s=out["tokens"] / out["train_s"])
    if device.type == "cuda":
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def estimate(report, name, a, queries=4096, tokens=256):
    """An estimate, not a measurement: one iteration of `queries` x 2 answers x `tokens` at this shape, sampling
    at the best path's tokens/s at the largest batch measured, training at the iteration's tokens/s."""
    rows = [r for r in report["sampling"] if r["shape"] == name]
    best = max((r[p]["tokens_per_s"] for r in rows[-1:] for p in ("merged", "static")
                if "tokens_per_s" in r.get(p, {})), default=None)
    it = report["iteration"].get(name)
    if best is None or not it:
        return {}
    answer_tokens = 2 * queries * tokens
    train_tokens = answer_tokens + (it["tokens"] - 2 * 64 * a.tokens) * queries / 64  # prompts scaled up
    one = dict(sample_s=answer_tokens / best, train_s=train_tokens / it["train_tokens_per_s"])
    return dict(queries=queries, tokens=tokens, one_gpu_min=(one["sample_s"] + one["train_s"]) / 60,
                eight_gpus_min=(one["sample_s"] + one["train_s"]) / 8 / 60, **one)


def save(report, path):
    ple.write_file(path, json.dumps(report, indent=1))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="a tokenizer folder (SmolLM2's, saved with save_pretrained)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--batches", nargs="+", type=int, default=[64, 256], help="prompts per generate call")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--tiny", action="store_true", help="small shapes, for a check on CPU")
    p.add_argument("--output", required=True)
    a = p.parse_args()
    from transformers import AutoTokenizer

    device, dtype = torch.device(a.device), torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    principles = ple.read_principles(ple.resolve_path("principles.txt"), "sentiment")
    with open(ple.resolve_path("data/review_openings.txt")) as f:  # as ple.py reads them (without `datasets`)
        queries = [ple.make_query("sentiment", {"text": line}, random.Random(i))[0] for i, line in enumerate(f)
                   if line.strip()]
    prompts = ple.encode_prompts(tokenizer, queries, chat=False) + ple.encode_prompts(tokenizer, queries, principles,
                                                                                       chat=False)
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
                  torch=torch.__version__, transformers=__import__("transformers").__version__,
                  peft=__import__("peft").__version__, tokens=a.tokens, tiny=a.tiny,
                  bandwidth_gb_s=bandwidth(device, 0.25 if a.tiny else 1.0) / 1e9, ple_runs={}, sampling=[],
                  iteration={}, estimate={})
    print(f"{report['device']}: device-to-device copy {report['bandwidth_gb_s']:.0f} GB/s", flush=True)
    try:  # (ple.py needs `datasets` and vaderSentiment: without them the table below still runs)
        ple_runs(a, tokenizer, device, report, a.output)
    except Exception as e:  # noqa: BLE001
        report["ple_runs"]["error"] = f"{type(e).__name__}: {e}"
        print("ple.py runs failed:", report["ple_runs"]["error"], flush=True)
    for name in a.shapes:
        shape = (TINY if a.tiny else SHAPES)[name]
        model = policy(shape, device, dtype)
        weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
        for batch in a.batches:
            batch_prompts = [prompts[i % len(prompts)] for i in range(batch)]
            kv_bytes = (batch * shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * shape["hidden_size"]
                        // shape["num_attention_heads"] * 2 * (sum(map(len, batch_prompts)) / batch + a.tokens / 2))
            row = dict(shape=name, batch=batch, weight_gb=weight_bytes / 1e9, kv_gb_mean=kv_bytes / 1e9,
                       bound_tokens_per_s=batch / ((weight_bytes + kv_bytes) / (report["bandwidth_gb_s"] * 1e9)))
            report["sampling"].append(row)
            for path in ("unmerged", "merged", "static"):
                try:
                    row[path] = measure(path, model, tokenizer, batch_prompts, a, device)
                except Exception as e:  # noqa: BLE001 (a path this version cannot take is reported, not fatal)
                    row[path] = dict(error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                print(name, batch, path, row[path], flush=True)
                save(report, a.output)
        report["iteration"][name] = iteration(model, tokenizer, queries, principles, a, device)
        report["estimate"][name] = estimate(report, name, a)
        print(name, "iteration", report["iteration"][name], report["estimate"][name], flush=True)
        save(report, a.output)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(markdown(report))


def markdown(report):
    def cell(x):
        return f"{x['tokens_per_s']:,.0f}" if "tokens_per_s" in x else "failed"

    lines = ["| shape | batch | unmerged tok/s | merged (dynamic cache) | static cache | static / merged | "
             "first static call (compile) | bandwidth bound |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["sampling"]:
        ok = all("tokens_per_s" in r.get(p, {}) for p in ("merged", "static"))
        lines.append(f"| {r['shape']} | {r['batch']} | {cell(r.get('unmerged', {}))} | {cell(r.get('merged', {}))} | "
                     f"{cell(r.get('static', {}))} | "
                     + (f"{r['static']['tokens_per_s'] / r['merged']['tokens_per_s']:.1f}x | "
                        f"{r['static']['first_call_s']:.1f} s |" if ok else "- | - |")
                     + f" {r['bound_tokens_per_s']:,.0f} |")
    lines += ["", "| ple.py, 3 iterations | s per iteration (0, 1, 2) | sampling tok/s (0, 1, 2) | graphs compiled |",
              "| --- | --- | --- | --- |"]
    for static, run in [(k, v) for k, v in report["ple_runs"].items() if k != "error"]:
        lines.append(f"| --static_cache {static} | {', '.join(f'{s:.1f}' for s in run['seconds_per_iteration'])} | "
                     f"{', '.join(f'{s:,.0f}' for s in run['sample_tokens_per_s'])} | {run['compiled_graphs']} |")
    lines += ["", "| shape | sampling s | tok/s | training s | tok/s | peak memory GB | estimate: 4096 x 2 x 256, "
              "1 GPU | 8 GPUs |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, it in report["iteration"].items():
        est = report["estimate"].get(name, {})
        lines.append(f"| {name} | {it['sample_s']:.1f} | {it['sample_tokens_per_s']:,.0f} | {it['train_s']:.1f} | "
                     f"{it['train_tokens_per_s']:,.0f} | {it.get('peak_memory_gb', float('nan')):.1f} | "
                     f"{est.get('one_gpu_min', float('nan')):.0f} min | {est.get('eight_gpus_min', float('nan')):.0f} "
                     "min |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
