"""One process of the multi-process tests (test_ple.py launches two with accelerate launch).

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 ple_tests/worker.py MODE OUT SETTINGS_JSON

MODE run: ple.train(ple.Args(**settings)), then each process saves the weights it holds.
MODE step: one ple_epoch step on this process's half of fixed pairs, through accelerator.prepare; each
process that holds the whole weights saves them as weights-rank{RANK}.pt in OUT.
A "shard" setting selects Accelerate's FSDP2, as `accelerate launch --use_fsdp --fsdp_version 2` does on GPUs
(Accelerate takes FSDP on GPUs only, so on these CPU processes its state is set as a GPU launch sets it).
"""
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch  # noqa: E402

import ple  # noqa: E402


def accelerator_for(shard):
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    accelerator = Accelerator(cpu=True)  # the state every later Accelerator of this process shares
    if shard:
        from accelerate.state import PartialState  # (every AcceleratorState made later copies PartialState's type)

        PartialState().distributed_type = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    return accelerator


def one_step(settings, accelerator):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(settings["model"]).eval()
    model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.5))
    if settings.get("shard"):
        from torch.distributed.fsdp import FSDPModule

        assert isinstance(model, FSDPModule)
    n = len(settings["prompts"]) // accelerator.num_processes
    part = slice(accelerator.process_index * n, (accelerator.process_index + 1) * n)
    ple.ple_epoch(model, optimizer, settings["prompts"][part], settings["answers"][part],
                  settings["answers_p"][part], torch.tensor(settings["rewards"][part]),
                  torch.tensor(settings["rewards_p"][part]), 0.2, 1.0, pad_id=settings["pad_id"],
                  mini_batch_size=n, max_grad_norm=settings["max_grad_norm"])
    return accelerator.get_state_dict(model)  # whole weights (under FSDP gathered from the shards, on process 0)


def main():
    mode, out, settings = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    path = os.path.join(out, f"weights-rank{os.environ['RANK']}.pt")
    accelerator = accelerator_for(settings.pop("shard", False))
    if mode == "run":
        state = ple.train(ple.Args(**settings))
        if not ple.is_sharded(accelerator):  # (a sharded run has ended its process group: its whole model is final/)
            torch.save(state.policy.state_dict(), path)
    else:
        if weights := one_step(settings, accelerator):  # (under FSDP only process 0 holds the whole weights)
            torch.save(weights, path)
        accelerator.wait_for_everyone()  # then the process group ends, as ple.train ends it: one left to the
        accelerator.end_training()       # exit tears gloo's threads down mid-use at times (terminate, SIGABRT)
    sys.stdout.flush()
    sys.stderr.flush()
    # Every file is written and the process group has ended: leave without the interpreter's teardown, whose C++
    # destructors (gloo's and FSDP2's, run in whatever order the last references go) once aborted a process of the
    # sharded step on a busy machine ("terminate called without an active exception").
    os._exit(0)


if __name__ == "__main__":
    main()
