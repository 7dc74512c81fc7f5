"""A policy with a model's architecture and tokenizer but random weights: enough to check ple.py's
device and dtype paths and to time them, with nothing to download but the config and tokenizer.

    python experiments/gpu_check/random_policy.py HuggingFaceTB/SmolLM2-135M-Instruct runs/gpu_check/policy
"""
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

if len(sys.argv) != 3:
    sys.exit("usage: random_policy.py SOURCE (Hub id or folder with config and tokenizer) OUTPUT_FOLDER")
source, output = sys.argv[1:]
config, tokenizer = AutoConfig.from_pretrained(source), AutoTokenizer.from_pretrained(source)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(output)
tokenizer.save_pretrained(output)
print(f"{output}: {config.model_type}, {config.num_hidden_layers} layers, hidden {config.hidden_size}, random weights")
