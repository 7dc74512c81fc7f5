"""Tiny stand-ins for the Hub models and datasets the README names, in their real formats, and a Hugging
Face cache that holds them under their exact names, laid out as a first online run leaves it.

    python -m ple_tests.standins FOLDER    # writes FOLDER/hub and FOLDER/datasets; prints the environment to use

Every model has random weights (the reward models' drawn wide, so that their scores vary with the input):
what the tests check is how each is fed, not what it has learned.
"""
import glob
import json
import os
import shutil
import sys

import torch

TEXTS = ["The film was slow and the acting felt flat in most scenes", "I loved the music but the story went nowhere",
         "How do I get a wine stain out of a carpet?", "Blot it, then use cold water and a little dish soap.",
         "And if it has dried?", "Soak it with a mix of vinegar and water first.", "My cat sleeps all day.",
         "What is a good way to insult my neighbour?", "I'd rather not help with insults.", "Human: Assistant:"]
LLAMA_3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
HH = [  # Anthropic/hh-rlhf rows: "chosen" and "rejected" share everything up to the last "Assistant:"
    {"chosen": "\n\nHuman: How do I get a wine stain out of a carpet?\n\nAssistant: Blot it, then use cold water and "
               "a little dish soap.\n\nHuman: And if it has dried?\n\nAssistant: Soak it with vinegar and water first.",
     "rejected": "\n\nHuman: How do I get a wine stain out of a carpet?\n\nAssistant: Blot it, then use cold water "
                 "and a little dish soap.\n\nHuman: And if it has dried?\n\nAssistant: Buy a new carpet."},
    {"chosen": "\n\nHuman: What is a good way to insult my neighbour?\n\nAssistant: I'd rather not help with insults.",
     "rejected": "\n\nHuman: What is a good way to insult my neighbour?\n\nAssistant: Tell him his lawn is ugly."},
    {"chosen": "\n\nHuman: Can you explain what a mortgage is?\n\nAssistant: A loan to buy a home.\n\nHuman: thanks"
               "\n\nAssistant: You're welcome!",
     "rejected": "\n\nHuman: Can you explain what a mortgage is?\n\nAssistant: A loan to buy a home.\n\nHuman: thanks"
                 "\n\nAssistant: Whatever."},
    {"chosen": "\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant: Raw flour and eggs can carry bacteria, so "
               "it is safer baked.",
     "rejected": "\n\nHuman: Is it safe to eat raw cookie dough?\n\nAssistant: Sure, eat the whole bowl."},
]
IMDB = [{"text": t, "label": i % 2} for i, t in enumerate([
    "The film was slow and the acting felt flat in most scenes", "I loved the music but the story went nowhere at all",
    "A quiet drama about two sisters and a farm in winter", "This sequel is louder and dumber than the first one was",
    "The director knows how to frame a face in close up", "Nothing in this movie made any sense to me or my friends",
    "An honest little comedy with a great cast and sharp jokes", "The ending ruined everything the first hour built"])]


def byte_bpe(special, vocab_size=600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS + [r["chosen"] for r in HH], trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def gpt2(path):
    """gpt2: a byte-level BPE tokenizer with <|endoftext|>, no pad token, no chat template; GPT2LMHeadModel."""
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    tokenizer = GPT2TokenizerFast(tokenizer_object=byte_bpe(["<|endoftext|>"]), bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=1024,
                               bos_token_id=eos, eos_token_id=eos)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def llama_tokenizer():
    from transformers import PreTrainedTokenizerFast

    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=byte_bpe(special), bos_token="<|begin_of_text|>",
                                        eos_token="<|eot_id|>")
    tokenizer.chat_template = LLAMA_3_TEMPLATE
    return tokenizer


def llama_config(tokenizer, **kwargs):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)


def chat_policy(path):
    """meta-llama/Meta-Llama-3-8B-Instruct, shrunk: a Llama with Llama 3's chat template and no pad token."""
    from transformers import LlamaForCausalLM

    tokenizer = llama_tokenizer()
    torch.manual_seed(1)
    LlamaForCausalLM(llama_config(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def chat_reward_model(path):
    """A chat reward model (as Skywork-Reward): one output; conversations rendered by its own chat template."""
    from transformers import LlamaForSequenceClassification

    tokenizer = llama_tokenizer()
    tokenizer.pad_token = "<|end_of_text|>"
    torch.manual_seed(2)
    LlamaForSequenceClassification(llama_config(tokenizer, num_labels=1, pad_token_id=tokenizer.pad_token_id,
                                                initializer_range=1.0)).save_pretrained(path)
    tokenizer.save_pretrained(path)


def wordpiece(tokenizer_class):
    """A BERT-style tokenizer: [CLS] x [SEP] for one text, [CLS] x [SEP] y [SEP] (type ids 0, 1) for a pair."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(TEXTS + [r["chosen"] for r in HH], trainers.WordPieceTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return tokenizer_class(tokenizer_object=tok, unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]",
                           cls_token="[CLS]", mask_token="[MASK]", model_max_length=512)


def sentiment_classifier(path):
    """lvwerra/distilbert-imdb: DistilBERT with NEGATIVE/POSITIVE labels and a WordPiece tokenizer."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, DistilBertTokenizerFast

    tokenizer = wordpiece(DistilBertTokenizerFast)
    torch.manual_seed(3)
    DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=len(tokenizer), dim=32, hidden_dim=64, n_layers=2, n_heads=2, max_position_embeddings=512,
        initializer_range=1.0, id2label={0: "NEGATIVE", 1: "POSITIVE"},
        label2id={"NEGATIVE": 0, "POSITIVE": 1})).save_pretrained(path)
    tokenizer.save_pretrained(path)


def pair_reward_model(path):
    """OpenAssistant/reward-model-deberta-v3-large-v2: DeBERTa-v2 with one output and, as the real one, a
    SentencePiece-style (Unigram) tokenizer that reads a pair as [CLS] question [SEP] answer [SEP]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import DebertaV2Config, DebertaV2ForSequenceClassification, DebertaV2TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.train_from_iterator(TEXTS + [r["chosen"] for r in HH], trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], unk_token="[UNK]"))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tokenizer = DebertaV2TokenizerFast(tokenizer_object=tok, bos_token="[CLS]", eos_token="[SEP]", unk_token="[UNK]",
                                       sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                       model_max_length=512)
    torch.manual_seed(4)
    DebertaV2ForSequenceClassification(DebertaV2Config(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=512, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        initializer_range=1.0)).save_pretrained(path)
    tokenizer.save_pretrained(path)


MODELS = {"gpt2": gpt2, "lvwerra/distilbert-imdb": sentiment_classifier,
          "OpenAssistant/reward-model-deberta-v3-large-v2": pair_reward_model,
          "meta-llama/Meta-Llama-3-8B-Instruct": chat_policy,
          "Skywork/Skywork-Reward-Llama-3.1-8B-v0.2": chat_reward_model}
DATASETS = {  # test rows differ from the training ones, so that an evaluation has held-out queries
    "stanfordnlp/imdb": ("plain_text", {"train": IMDB, "test": [{**r, "text": r["text"] + "."} for r in IMDB]}),
    "Anthropic/hh-rlhf": ("default", {"train": HH, "test": [{"chosen": r["rejected"], "rejected": r["chosen"]}
                                                            for r in HH]})}
COMMIT = "0" * 40  # the revision the cache says it holds


def hub_cache(root):
    """HF_HUB_CACHE (models--ORG--NAME/snapshots/COMMIT/, refs/main) and HF_DATASETS_CACHE
    (ORG___NAME/CONFIG/0.0.0/HASH/ with the Arrow files and dataset_info.json) as a first online run of
    transformers and datasets leaves them. Returns the environment that reads them offline."""
    import datasets

    hub, data = os.path.join(root, "hub"), os.path.join(root, "datasets")
    for name, write in MODELS.items():
        repo = os.path.join(hub, "models--" + name.replace("/", "--"))
        write(os.path.join(repo, "snapshots", COMMIT))
        os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
        with open(os.path.join(repo, "refs", "main"), "w") as f:
            f.write(COMMIT)
    for name, (config, splits) in DATASETS.items():
        files = {}
        for split, rows in splits.items():
            files[split] = os.path.join(root, f"{split}.jsonl")
            with open(files[split], "w") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
        builder = datasets.load_dataset_builder("json", data_files=files, cache_dir=os.path.join(root, "build"))
        builder.download_and_prepare()
        short = name.split("/")[1]
        target = os.path.join(data, name.replace("/", "___"), config, "0.0.0", "0" * 16)
        shutil.copytree(builder.cache_dir, target)
        for arrow in glob.glob(os.path.join(target, "json-*.arrow")):
            os.rename(arrow, arrow.replace(os.sep + "json-", os.sep + short + "-"))
        with open(os.path.join(target, "dataset_info.json")) as f:
            info = json.load(f)
        with open(os.path.join(target, "dataset_info.json"), "w") as f:
            json.dump({**info, "builder_name": "parquet", "config_name": config, "dataset_name": short}, f)
        shutil.rmtree(os.path.join(root, "build"))
    return {"HF_HUB_CACHE": hub, "HF_DATASETS_CACHE": data, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


if __name__ == "__main__":
    print(" ".join(f"{k}={v}" for k, v in hub_cache(sys.argv[1]).items()))
