"""The paper's baselines RAFT and SFT, plugged into ple.py's loop: the same queries, sampling, reward, logs,
checkpoints and resume as a PLE run, only the iteration differs.

    python experiments/baselines.py --method raft --raft_k 4          # SFT on the best of 4 answers to x
    python experiments/baselines.py --method sft --where label=1 ...  # SFT on the dataset's answers (D_sft)

Every flag of ple.py works here too (--model, --reward, --dataset, --output_dir, --resume, ...); --loss and the
threshold are PLE's and unused. This file is also how to plug a method of your own into ple.py: an iteration
function that fills ple.Iteration, passed to ple.train.
"""
import os
import sys
from dataclasses import dataclass
from typing import Literal

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import ple  # noqa: E402
from ple import arg, require  # noqa: E402


@dataclass
class BaselineArgs(ple.Args):
    method: Literal["raft", "sft"] = arg("raft", "raft: SFT on the best of --raft_k answers to x; sft: SFT on the "
                                                 "dataset's answers, cut to --max_new_tokens")
    raft_k: int = arg(4, "RAFT: answers sampled per query, the best one trained on (the paper's RAFT: 4)")
    where: str = arg("", "FIELD=VALUE: keep only the dataset rows whose FIELD is VALUE (label=1: IMDb's positive ones)")


def raft_iteration(t, args, state):
    """RAFT (best-of-K, as the paper ran it with K = 4): K answers to x from the current model, scored like PLE's,
    then SFT on the best one given x. No principle, no threshold; K answers a query where PLE samples 2."""
    k, clock, ids = args.raft_k, ple.Stopwatch(), []
    prompts, rows = [p for p in state.prompt_ids for _ in range(k)], 2 * args.batch_size  # prompts per call: PLE's
    shape = ple.static_shape(rows, prompts) if state.static_cache else None
    state.policy.eval()
    with clock("sample"), ple.fast_sampling(state.policy, state.merge_lora):
        for start in ple.tqdm(range(0, len(prompts), rows), desc="sampling", leave=False):
            ids += ple.generate_answers(state.policy, state.tokenizer, prompts[start:start + rows], args.max_new_tokens,
                                        args.temperature, args.top_p, shape)
    texts = state.tokenizer.batch_decode(ids, skip_special_tokens=True)
    with clock("score"):
        rewards = ple.score(state.reward_fn, [q for q in state.queries for _ in range(k)], texts,
                            args.reward_batch_size)
    best = [i * k + j for i, j in enumerate(rewards.view(-1, k).argmax(-1).tolist())]
    with clock("train"):
        losses, tokens = ple.sft_epoch(state.model, state.optimizer, state.prompt_ids, [ids[i] for i in best],
                                       **state.step)
    return ple.Iteration(t=t, tau=None, answers=[texts[i] for i in best], rewards=rewards[best].tolist(),
                         branches=["raft"] * len(best), losses=losses, reward_x=rewards.mean().item(),
                         answers_scored=len(texts), train_tokens=tokens, answer_tokens=sum(map(len, ids)),
                         seconds=clock, extra={"candidates": [texts[i * k:(i + 1) * k] for i in range(len(best))],
                                               "candidate_rewards": rewards.view(-1, k).tolist()})


def sft_iteration(t, args, state):
    """SFT on the dataset's answers given x. The model first answers x and x_p and is scored as in a PLE
    iteration, so that both methods are measured alike; the update does not use those answers."""
    require(state.sft_targets is not None, "dataset", f"{args.dataset} lacks an answer for some queries of task "
            f"'{args.task}': --method sft needs one for every query")
    clock = ple.Stopwatch()
    with clock("sample"), ple.fast_sampling(state.policy, state.merge_lora):
        answer_ids, answer_ids_p = ple.sample_pairs(state.policy, state.tokenizer, state.prompt_ids,
                                                    state.prompt_ids_p, args.batch_size, args.max_new_tokens,
                                                    args.temperature, args.top_p, state.static_cache)
    answers, answers_p = (state.tokenizer.batch_decode(ids, skip_special_tokens=True)
                          for ids in (answer_ids, answer_ids_p))
    with clock("score"):
        rewards, rewards_p = (ple.score(state.reward_fn, state.queries, texts, args.reward_batch_size)
                              for texts in (answers, answers_p))
    with clock("train"):
        losses, tokens = ple.sft_epoch(state.model, state.optimizer, state.prompt_ids, state.sft_targets,
                                       **state.step)
    return ple.Iteration(t=t, tau=ple.threshold_at(t, args.tau0, args.alpha), answers=answers,
                         rewards=rewards.tolist(), answers_p=answers_p, rewards_p=rewards_p.tolist(),
                         branches=["sft"] * len(answers), losses=losses, reward_x=rewards.mean().item(),
                         answers_scored=2 * len(answers), train_tokens=tokens,
                         answer_tokens=sum(map(len, answer_ids + answer_ids_p)), seconds=clock)


def train(args):
    """`python experiments/baselines.py`: its own flags checked, then ple.py's run with the method's iteration."""
    require(args.raft_k >= 1, "raft_k", "must be at least 1")
    require(not args.where or "=" in args.where and args.where.split("=", 1)[0].strip(), "where",
            f"'{args.where}' is not FIELD=VALUE (e.g. --where label=1)")
    return ple.train(args, {"raft": raft_iteration, "sft": sft_iteration}[args.method])


if __name__ == "__main__":
    ple.main(dataclass=BaselineArgs, work=train)
