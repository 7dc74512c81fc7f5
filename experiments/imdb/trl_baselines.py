"""The TRL baselines on ple.py's task: online DPO, RLOO and SDFT, with the same queries, prompts and reward.

    pip install -r experiments/imdb/requirements.txt
    python experiments/imdb/trl_baselines.py --method rloo --reward runs/imdb/rm --dataset stanfordnlp/imdb \
        --lora_r 8 --lora_alpha 16 --learning_rate 1e-4 --output_dir runs/imdb/rloo_s0
    python experiments/imdb/trl_baselines.py --method dpo ...
    python experiments/imdb/trl_baselines.py --method sdft --teacher live --chat_template off ...   # no reward model

Every flag of ple.py means the same here (`--help`); the loss is TRL's. The same budget as a ple.py run:
--iterations passes over the --num_queries training queries, 2 answers to each query per pass, and
--mini_batch_size queries per optimizer step.
- dpo: TRL's online DPO (trl.experimental): the better-rewarded of the 2 answers is preferred; KL to the
  starting model through DPO's beta (--kl_coef).
- rloo: TRL's RLOOTrainer (REINFORCE with a leave-one-out baseline over the 2 answers; TRL 1.x ships no
  PPOTrainer, and RLOO is the PPO family's critic-free member); KL penalty --kl_coef.
- sdft: TRL's SDFT (trl.experimental), on-policy context distillation: the student answers x; the teacher
  (--teacher: the current model, as PLE's y_p; the starting one; or an EMA of it) is shown ple.py's x_p
  exactly (the --principles, a blank line, x); the student is distilled toward the teacher's top-k token
  distribution on its own answers. Plain-text prompts only. No reward: --reward is loaded and checked, not used.
Writes args.json (ple.py's fields, so eval.py holds out the training rows and finds the starting model),
iter-N/ every --save_every passes (LoRA: the adapter; for experiments/frontier.py) and final/ (merged).
"""
import os
import sys
import time
from dataclasses import dataclass
from typing import Literal

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import ple  # noqa: E402
from ple import arg  # noqa: E402


@dataclass
class BaselineArgs(ple.Args):
    method: Literal["dpo", "rloo", "sdft"] = arg("rloo", "dpo: TRL's online DPO; rloo: TRL's RLOO; sdft: TRL's "
                                                          "SDFT, the principles as the teacher's context")
    kl_coef: float = arg(-1.0, "dpo: beta (default 0.1); rloo: KL penalty (default 0.05); -1: TRL's default")
    teacher: Literal["base", "live", "ema"] = arg("live", "sdft: the model shown x_p: the current one (live, as PLE's "
                                                          "y_p), the starting one (base, TRL's default) or an EMA")

# SDFT's teacher prompt: the privileged context (the principles, one per line), a blank line, then x: ple.py's x_p
TEACHER_TEMPLATE = "{privileged_context}\n\n{prompt}"


def reward_function(reward, batch_size):
    """ple.py's reward as TRL calls it: on the original query (a dataset column), never the rendered prompt."""
    def reward_func(prompts, completions, query, **kwargs):
        return ple.score(reward, list(query), list(completions), batch_size).tolist()

    reward_func.__name__ = "reward"
    return reward_func


def save_passes(tokenizer, args):
    """A callback that keeps the weights after every pass over the queries as iter-N/, as ple.py --save_every."""
    from transformers import TrainerCallback

    class SavePasses(TrainerCallback):
        def on_epoch_end(self, training_args, state, control, model=None, **kwargs):
            n = round(state.epoch)
            if state.is_world_process_zero and args.save_every and n % args.save_every == 0:
                ple.save_model(os.path.join(args.output_dir, f"iter-{n}"), model, tokenizer)

    return SavePasses()


def main(argv=None):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(BaselineArgs).parse_args_into_dataclasses(argv)
    try:
        run(args)
    except ple.PLEError as e:
        sys.exit(f"error: {e}")


def run(args):
    from accelerate import PartialState
    from datasets import Dataset
    from peft import LoraConfig

    ple.check_args(args)
    if args.loss != "ple" or args.sft_epochs:
        raise ple.PLEError("--loss and --sft_epochs are ple.py's; here the method is --method")
    chat = ple.chat_prompts(args.chat_template, args.task)
    if args.method == "sdft" and chat:
        raise ple.PLEError("--method sdft needs plain-text prompts (--chat_template off): under a chat template the "
                           "teacher's prompt would not be ple.py's x_p")
    if args.method == "sdft":  # read before any model loads: a bad file fails now
        principles = ple.read_principles(ple.resolve_path(args.principles), args.task)
    queries, answers, sources = ple.load_queries(ple.resolve_path(args.dataset), args.split, args.task,
                                                 args.num_queries, args.seed)
    if ple.prepare_output_dir(args, PartialState(), {"data_sha256": ple.content_hash([queries, answers, sources])}):
        raise ple.PLEError("--resume is not supported for the TRL baselines; start a new --output_dir")
    device = PartialState(cpu=args.device == "cpu").device
    reward_fn = ple.load_reward(args.reward, device)
    ple.score(reward_fn, queries[:2], [""] * len(queries[:2]), 2)  # a reward that fails, fails now
    reward = reward_function(reward_fn, args.reward_batch_size)
    from transformers import set_seed

    set_seed(args.seed)
    model, tokenizer = ple.load_policy(args.model, device, ple.pick_dtype(args.dtype, device))
    if args.method == "sdft":  # plain text: TRL tokenizes x and x_p as ple.py does, special tokens included
        data = Dataset.from_dict({"prompt": queries, "privileged_context": ["\n".join(principles)] * len(queries)})
    else:
        prompt_ids = ple.encode_prompts(tokenizer, queries, chat_prefix=ple.TASKS[args.task].chat_prefix, chat=chat)
        prompts = [tokenizer.decode(ids) for ids in prompt_ids]  # rendered exactly as ple.py renders x
        data = Dataset.from_dict({"prompt": prompts, "query": queries})
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM") if args.lora_r else None
    common = dict(output_dir=args.output_dir, learning_rate=args.learning_rate, num_train_epochs=args.iterations,
                  max_grad_norm=args.max_grad_norm, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                  logging_steps=1, save_strategy="no", report_to="none", use_cpu=device.type == "cpu",
                  bf16=ple.pick_dtype(args.dtype, device) == torch.bfloat16,
                  gradient_accumulation_steps=args.gradient_accumulation_steps,
                  gradient_checkpointing=args.gradient_checkpointing, lr_scheduler_type="constant",
                  weight_decay=0.0)
    if args.kl_coef >= 0 and args.method != "sdft":
        common["beta"] = args.kl_coef
    if args.method == "sdft":
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        config = SDFTConfig(**common, num_generations=2, max_completion_length=args.max_new_tokens,
                            per_device_train_batch_size=2 * args.mini_batch_size // args.gradient_accumulation_steps,
                            teacher_model_kind=args.teacher, teacher_prompt_template=TEACHER_TEMPLATE)
        trainer = SDFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                              peft_config=lora, callbacks=[save_passes(tokenizer, args)])
    elif args.method == "rloo":
        from trl import RLOOConfig, RLOOTrainer

        config = RLOOConfig(**common, num_generations=2, max_completion_length=args.max_new_tokens,
                            per_device_train_batch_size=2 * args.mini_batch_size // args.gradient_accumulation_steps)
        trainer = RLOOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                              processing_class=tokenizer, peft_config=lora, callbacks=[save_passes(tokenizer, args)])
    else:
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        config = OnlineDPOConfig(**common, max_new_tokens=args.max_new_tokens,
                                 per_device_train_batch_size=args.mini_batch_size // args.gradient_accumulation_steps)
        trainer = OnlineDPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                                   processing_class=tokenizer, peft_config=lora,
                                   callbacks=[save_passes(tokenizer, args)])
    start = time.time()
    trainer.train()
    history = [dict(r) for r in trainer.state.log_history]
    ple.write_jsonl(os.path.join(args.output_dir, "metrics.jsonl"), history)
    final = trainer.model.merge_and_unload() if args.lora_r else trainer.model
    ple.save_model(os.path.join(args.output_dir, "final"), final, tokenizer)
    print(f"{args.method}: {trainer.state.global_step} optimizer steps, {2 * len(queries) * args.iterations} answers "
          f"sampled, {time.time() - start:.0f} s; saved {os.path.join(args.output_dir, 'final')}")


if __name__ == "__main__":
    main()
