"""One process of the multi-process tests (test_ple.py launches two with accelerate launch).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 tests/worker.py MODE OUT SETTINGS_JSON

MODE run: ple.run(ple.Args(**settings)), then each process saves the weights it holds.
MODE step / sharded_step: one ple_epoch step on this process's half of fixed pairs, data parallel or
sharded (--fsdp's FSDP2); each process saves the whole weights as weights-rank{RANK}.pt in OUT.
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402

import ple  # noqa: E402


def whole_weights(model):
    """A sharded model's weights gathered on every process; a plain model's own."""
    if ple.sharded(model):
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return model.state_dict()


def one_step(mode, settings):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    accelerator = Accelerator(cpu=True)
    model = AutoModelForCausalLM.from_pretrained(settings["model"]).eval()
    if mode == "sharded_step":
        ple.shard_model(model)  # before the optimizer: it must hold the shards
        from transformers.generation import utils as generation  # generate() must step every process together

        assert generation.is_fsdp_managed_module(model) and generation._get_torch_distributed_world_size() > 1
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    if mode == "step":
        model, optimizer = accelerator.prepare(model, optimizer)
    n = len(settings["prompts"]) // accelerator.num_processes
    part = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    ple.ple_epoch(model, optimizer, settings["prompts"][part], settings["answers"][part],
                  settings["answers_p"][part], torch.tensor(settings["rewards"][part]),
                  torch.tensor(settings["rewards_p"][part]), 0.2, 1.0, pad_id=settings["pad_id"],
                  mini_batch_size=n, max_grad_norm=settings["max_grad_norm"])
    return accelerator.unwrap_model(model)


def main():
    mode, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    path = os.path.join(out, f"weights-rank{os.environ['RANK']}.pt")
    if mode == "run":
        state = ple.run(ple.Args(**settings))
        if not ple.sharded(state.policy):  # (a sharded run has ended its process group: its whole model is final/)
            torch.save(state.policy.state_dict(), path)
    else:
        torch.save(whole_weights(one_step(mode, settings)), path)


if __name__ == "__main__":
    main()
