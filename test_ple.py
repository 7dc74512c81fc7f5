"""Tests for ple.py and eval.py: offline, on tiny models built from a config.

    pytest test_ple.py                                     # everything, about five minutes on 2 CPU cores
    pytest test_ple.py -m "not slow and not multiprocess"  # without the subprocesses
"""
import copy
import glob
import importlib.util
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the Hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

import ple
from ple_tests import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
PRINCIPLE = "Write a warm and positive continuation."
REVIEWS = [
    "The film was slow and the acting felt flat in most scenes",
    "I loved the music but the story went nowhere at all",
    "A quiet drama about two sisters and a farm in winter",
    "This sequel is louder and dumber than the first one was",
    "The director knows how to frame a face in close up",
    "Nothing in this movie made any sense to me or my friends",
    "An honest little comedy with a great cast and sharp jokes",
    "The ending ruined everything the first hour had built up",
]


# ------------------------------------------------------------------------------------------------
# fixtures: a tiny tokenizer and GPT-2, a tiny dataset and principles file
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tokenizer():
    """A byte-level BPE tokenizer of 400 tokens trained on REVIEWS, once per test run (copy it to change it)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(REVIEWS + [PRINCIPLE], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    eos = tokenizer.eos_token_id
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=2, n_embd=32, n_head=2, n_positions=256,
                        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def model_dir(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_gpt2"))
    tiny_model(tokenizer).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "reviews.jsonl"
    path.write_text("".join(json.dumps({"text": r, "label": i % 2}) + "\n" for i, r in enumerate(REVIEWS)))
    return str(path)


@pytest.fixture(scope="session")
def principles_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("principles") / "principles.txt"
    path.write_text(f"# test principles\n[sentiment]\n{PRINCIPLE}\n")
    return str(path)


def make_args(model_dir, data_file, principles_file, out, **changes):
    settings = dict(model=model_dir, reward="ple_tests.rewards:word_reward", dataset=data_file,
                    principles=principles_file,
                    output_dir=str(out), iterations=2, num_queries=6, batch_size=4, mini_batch_size=3,
                    max_new_tokens=6, learning_rate=1e-2, lora_r=0, device="cpu", dtype="float32")
    settings.update(changes)
    return ple.Args(**settings)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def state_of(path):
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ------------------------------------------------------------------------------------------------
# the loss, the threshold, the sequence score
# ------------------------------------------------------------------------------------------------

def test_ple_loss_ranking_branch_by_hand():
    lp, lo = torch.tensor([-1.0]), torch.tensor([-2.0])
    loss, info = ple.ple_loss(lp, lo, torch.tensor([1.0]), torch.tensor([0.0]), tau=0.2)
    assert info["ranked"].tolist() == [True]
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-6)  # -log sigmoid(-1 - -2)
    loss, _ = ple.ple_loss(lp, lo, torch.tensor([1.0]), torch.tensor([0.0]), tau=0.2, beta=2.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2.0)), abs=1e-6)


def test_ple_loss_weighted_sft_branch_by_hand():
    lp, lo = torch.tensor([-1.0]), torch.tensor([-2.0])
    loss, info = ple.ple_loss(lp, lo, torch.tensor([0.1]), torch.tensor([0.0]), tau=0.2)
    w_p = math.exp(0.1) / (math.exp(0.1) + 1.0)
    assert info["ranked"].tolist() == [False]
    assert info["weights"][0].tolist() == pytest.approx([w_p, 1 - w_p], abs=1e-6)
    assert loss.item() == pytest.approx(-(w_p * -1.0 + (1 - w_p) * -2.0), abs=1e-6)


def test_ple_loss_delta_equal_to_tau_takes_sft_and_batch_is_mean():
    lp, lo = torch.tensor([-1.0, -1.0]), torch.tensor([-2.0, -2.0])
    loss, info = ple.ple_loss(lp, lo, torch.tensor([0.5, 1.5]), torch.tensor([0.0, 0.0]), tau=0.5)
    assert info["ranked"].tolist() == [False, True]  # delta == tau is not "greater than tau"
    w_p = math.exp(0.5) / (math.exp(0.5) + 1.0)
    wsft = -(w_p * -1.0 + (1 - w_p) * -2.0)
    rank = math.log(1 + math.exp(-1.0))
    assert loss.item() == pytest.approx((wsft + rank) / 2, abs=1e-6)


def test_ple_loss_gradient_signs():
    r_p, r = torch.tensor([2.0, 0.1]), torch.tensor([0.0, 0.0])
    r_p.requires_grad_(True)
    lp = torch.tensor([-1.0, -1.0], requires_grad=True)
    lo = torch.tensor([-2.0, -2.0], requires_grad=True)
    loss, info = ple.ple_loss(lp, lo, r_p, r, tau=0.2)
    loss.backward()
    assert info["ranked"].tolist() == [True, False]
    # ranking pushes l(y_p) up and l(y) down; weighted SFT pushes both up
    assert lp.grad[0] < 0 and lo.grad[0] > 0
    assert lp.grad[1] < 0 and lo.grad[1] < 0
    assert lp.grad[1] < lo.grad[1]  # the better-rewarded answer gets the larger weight
    assert r_p.grad is None or torch.all(r_p.grad == 0)  # rewards are labels, not trained


def test_threshold_at():
    assert ple.threshold_at(0, 0.2, 0.9) == pytest.approx(0.2)
    assert ple.threshold_at(3, 0.2, 0.9) == pytest.approx(0.2 * 0.729)
    assert ple.threshold_at(5, 0.2, 1.0) == pytest.approx(0.2)


def manual_logprob(model, prompt, answer):
    total = 0.0
    with torch.no_grad():
        for i, token in enumerate(answer):
            ids = torch.tensor([prompt + answer[:i]])
            total += torch.log_softmax(model(ids).logits[0, -1].double(), -1)[token].item()
    return total / len(answer)


def test_sequence_logprobs_matches_token_loop_and_ignores_padding_side(tokenizer):
    model = tiny_model(tokenizer)
    eos = tokenizer.eos_token_id
    prompts = [tokenizer("The film was")["input_ids"], tokenizer("A quiet drama about two sisters")["input_ids"]]
    answers = [tokenizer(" slow and flat")["input_ids"] + [eos], tokenizer(" fine")["input_ids"] + [eos]]
    expected = [manual_logprob(model, p, a) for p, a in zip(prompts, answers)]

    ids, mask, answer_mask = ple.training_batch(prompts, answers, eos, "cpu")  # left padding
    left = ple.sequence_logprobs(model, ids, mask, answer_mask)
    width = max(len(p) + len(a) for p, a in zip(prompts, answers))  # right padding, built by hand
    ids_r = torch.full((2, width), eos)
    mask_r, answer_mask_r = torch.zeros(2, width, dtype=torch.long), torch.zeros(2, width, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        ids_r[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask_r[i, :len(p) + len(a)] = 1
        answer_mask_r[i, len(p):len(p) + len(a)] = 1
    right = ple.sequence_logprobs(model, ids_r, mask_r, answer_mask_r)

    assert left.dtype == torch.float32
    assert left.tolist() == pytest.approx(expected, abs=1e-4)
    assert right.tolist() == pytest.approx(expected, abs=1e-4)
    # the end-of-sequence token is part of the answer: leaving it out changes the score
    without_eos = [manual_logprob(model, p, a[:-1]) for p, a in zip(prompts, answers)]
    assert abs(left[0].item() - without_eos[0]) > 1e-3


def test_answer_logprobs_on_plain_tensors():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    labels = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 0]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels[..., None])[..., 0]
    sums = [logp[0, 1:].sum().item(), logp[1, :2].sum().item()]
    total = ple.answer_logprobs(logits, labels, mask, average=False)
    mean = ple.answer_logprobs(logits, labels, mask)
    assert total.dtype == mean.dtype == torch.float32  # computed in float32 whatever the logits' dtype
    assert total.tolist() == pytest.approx(sums, abs=1e-5)
    assert mean.tolist() == pytest.approx([sums[0] / 3, sums[1] / 2], abs=1e-5)


def test_one_forward_per_mini_batch_and_no_prompt_logits(tokenizer):
    model = tiny_model(tokenizer)
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(r)["input_ids"] for r in REVIEWS[:5]]
    answers = [tokenizer(" good")["input_ids"] + [eos], [eos], tokenizer(" a long answer here")["input_ids"] + [eos],
               tokenizer(" ok")["input_ids"], tokenizer(" fine fine")["input_ids"] + [eos]]
    guided = list(reversed(answers))
    calls, shapes = [], []
    model.register_forward_hook(lambda module, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    ple.ple_epoch(model, optimizer, prompts, answers, guided, torch.zeros(5), torch.ones(5), 0.2, 1.0,
                  pad_id=eos, mini_batch_size=2, max_grad_norm=1.0)
    assert calls == [4, 4, 2]  # 3 mini-batches of pairs: one forward each over both answers
    longest = max(map(len, answers))
    assert all(shape[1] <= longest + 1 for shape in shapes)  # logits only where an answer token is predicted


def test_empty_answer_trains_without_crash(tokenizer):
    model = tiny_model(tokenizer)
    eos = tokenizer.eos_token_id
    prompts = [tokenizer("The film was")["input_ids"]] * 2
    ids, mask, answer_mask = ple.training_batch(prompts, [[eos], tokenizer(" good")["input_ids"] + [eos]], eos, "cpu")
    logp = ple.sequence_logprobs(model, ids, mask, answer_mask)
    loss, _ = ple.ple_loss(logp[:1], logp[1:], torch.tensor([0.0]), torch.tensor([1.0]), 0.2)
    loss.backward()
    assert torch.isfinite(loss) and model.transformer.wte.weight.grad.abs().sum() > 0


def test_build_principle_query_and_read_principles(tmp_path):
    assert ple.build_principle_query("The film was", ["Be kind.", "Be brief."]) == "Be kind.\nBe brief.\n\nThe film was"
    shipped = ple.read_principles(os.path.join(HERE, "principles.txt"), "sentiment")
    assert shipped and all(p and not p.startswith("#") for p in shipped)
    for task in ple.TASKS:
        assert ple.read_principles(os.path.join(HERE, "principles.txt"), task)


def test_the_shipped_sentiment_principles_are_the_guidance_the_default_was_chosen_with():
    # experiments/default measured this text's guidance gain and chose the default's settings with it
    praise = os.path.join(HERE, "experiments", "imdb", "guidance", "texts", "praise.txt")
    assert ple.read_principles(os.path.join(HERE, "principles.txt"), "sentiment") == \
        ple.read_principles(praise, "sentiment")


def test_the_default_run_leaves_enough_held_out_openings_to_tell_a_gain_from_noise():
    # eval.py's held-out queries are the shipped openings the default run did not train on; about 64 or more
    # give a win-rate interval that excludes one half when the gain is real (experiments/default)
    _, _, openings = ple.load_queries(os.path.join(HERE, ple.Args.dataset), "train", "sentiment", 0, ple.Args.seed)
    assert len(set(openings)) == len(openings)  # a repeated opening could be trained on and held out at once
    assert len(openings) - ple.Args.num_queries >= 64


def test_chat_models_get_queries_through_their_template_base_models_plain_text(tokenizer):
    tokenizer = copy.deepcopy(tokenizer)  # changed below: a copy
    prefix = ple.TASKS["sentiment"].chat_prefix
    plain = ple.encode_prompts(tokenizer, ["The film was"], [PRINCIPLE], chat_prefix=prefix)
    assert tokenizer.decode(plain[0]) == PRINCIPLE + "\n\nThe film was"
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}<assistant>"
    x = tokenizer.decode(ple.encode_prompts(tokenizer, ["The film was"], chat_prefix=prefix)[0])
    x_p = tokenizer.decode(ple.encode_prompts(tokenizer, ["The film was"], [PRINCIPLE], chat_prefix=prefix)[0])
    assert x == f"<user>{prefix}The film was</s><assistant>"
    assert x_p == f"<user>{PRINCIPLE}\n\n{prefix}The film was</s><assistant>"
    # the principles as the system turn instead; or no chat template at all
    system = ple.encode_prompts(tokenizer, ["The film was"], [PRINCIPLE, "Be brief."], chat_prefix=prefix,
                                placement="system")
    assert tokenizer.decode(system[0]) == f"<system>{PRINCIPLE}\nBe brief.</s><user>{prefix}The film was</s><assistant>"
    off = ple.encode_prompts(tokenizer, ["The film was"], [PRINCIPLE], chat_prefix=prefix, chat=False)
    assert off == plain
    # an HH transcript is a conversation: its turns, the principles before the last user turn or as the system turn
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to bake bread?\n\nAssistant:"
    turns = "<user>hi</s><assistant>hello</s><user>{}how to bake bread?</s><assistant>"
    assert tokenizer.decode(ple.encode_prompts(tokenizer, [hh])[0]) == turns.format("")
    assert tokenizer.decode(ple.encode_prompts(tokenizer, [hh], [PRINCIPLE])[0]) == turns.format(PRINCIPLE + "\n\n")
    assert tokenizer.decode(ple.encode_prompts(tokenizer, [hh], [PRINCIPLE], placement="system")[0]) == \
        f"<system>{PRINCIPLE}</s>" + turns.format("")
    assert ple.conversation("\n\nHuman: hi\n\nHuman: again\n\nAssistant:") is None  # turns must alternate


def test_make_query_per_task():
    import random

    review = "one two three four five six seven eight nine ten"
    query, rest = ple.make_query("sentiment", {"text": review}, random.Random(0))
    assert 2 <= len(query.split()) <= 8 and (query + rest).split() == review.split()
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to bake bread?\n\nAssistant: Mix flour and water."
    query, answer = ple.make_query("dialogue", {"chosen": hh}, random.Random(0))
    assert query.endswith("how to bake bread?\n\nAssistant:") and answer == " Mix flour and water."
    query, _ = ple.make_query("summarize", {"post": "My cat sleeps all day. "}, random.Random(0))
    assert query == "My cat sleeps all day.\n\nTL;DR:"


# Anthropic HH format: a transcript of alternating turns, each after a blank line; "chosen" and
# "rejected" share everything up to the last "Assistant:" turn.
HH_ROWS = [
    {"chosen": "\n\nHuman: How do I get a wine stain out of a carpet?\n\nAssistant: Blot it, then use cold water "
               "and a little dish soap.\n\nHuman: And if it has dried?\n\nAssistant: Soak it with a mix of vinegar "
               "and water first, then blot again.",
     "rejected": "\n\nHuman: How do I get a wine stain out of a carpet?\n\nAssistant: Blot it, then use cold water "
                 "and a little dish soap.\n\nHuman: And if it has dried?\n\nAssistant: Buy a new carpet."},
    {"chosen": "\n\nHuman: What is a good way to insult my neighbour?\n\nAssistant: I'd rather not help with "
               "insults. Is something about your neighbour bothering you?",
     "rejected": "\n\nHuman: What is a good way to insult my neighbour?\n\nAssistant: Tell him his lawn is ugly."},
    {"chosen": "\n\nHuman: Can you explain what a mortgage is?\n\nAssistant: It is a loan to buy a home, paid "
               "back monthly, with the home as security.\n\nHuman: thanks\n\nAssistant: You're welcome!",
     "rejected": "\n\nHuman: Can you explain what a mortgage is?\n\nAssistant: It is a loan to buy a home, paid "
                 "back monthly, with the home as security.\n\nHuman: thanks\n\nAssistant: Whatever."},
]


def test_dialogue_reading_on_hh_format_transcripts(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in HH_ROWS))
    queries, answers, sources = ple.load_queries(str(path), "train", "dialogue", 0, 0)
    assert len(queries) == len(HH_ROWS)
    for q, a, source in zip(queries, answers, sources):
        assert q.startswith("\n\nHuman:") and q.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in a and "\n\nHuman:" not in a
        assert q + a == source  # nothing lost: the query is the transcript up to its last turn
        row = next(r for r in HH_ROWS if r["chosen"] == source)
        assert row["rejected"].startswith(q)  # chosen and rejected share exactly this prompt


@pytest.fixture(scope="session")
def reward_models(tmp_path_factory):
    """The three kinds of reward model, as local folders: a sentiment classifier, a pair RM, a chat RM."""
    from ple_tests import standins

    root = tmp_path_factory.mktemp("reward_models")
    made = {}
    for kind, write in (("classifier", standins.sentiment_classifier), ("pair", standins.pair_reward_model),
                        ("chat", standins.chat_reward_model), ("base", standins.gpt2)):
        write(str(root / kind))
        made[kind] = str(root / kind)
    return made


def test_reward_format_follows_the_kind_of_reward_model_and_refuses_what_does_not_fit(reward_models, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    kinds = {kind: ple.reward_input(path) for kind, path in reward_models.items() if kind != "base"}
    assert kinds == {"classifier": "text", "pair": "pair", "chat": "chat"}
    query, answer = "How do I get a wine stain out of a carpet?", " Blot it, then use cold water."
    tokenizer = AutoTokenizer.from_pretrained(reward_models["pair"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_models["pair"]).eval()
    with torch.no_grad():
        as_pair = model(**tokenizer(query, answer, return_tensors="pt")).logits[0, 0].item()
    pair = ple.load_reward(reward_models["pair"])
    assert pair([query], [answer]) == [pytest.approx(as_pair, rel=1e-4, abs=1e-4)]
    assert ple.load_reward(reward_models["pair"], input_format="text")([query], [answer]) != pair([query], [answer])
    # the query is cut from the left, never the answer: words put before a query past the limit change nothing
    tokenizer.model_max_length = 24
    long_query = " ".join(["very"] * 40) + " " + query
    limited = tmp_path / "limited"
    tokenizer.save_pretrained(limited)
    model.save_pretrained(limited)
    short = ple.load_reward(str(limited))
    assert short([long_query], [answer]) == short(["more words " + long_query], [answer])
    assert short([long_query], [answer]) != short([long_query], [" Buy a new carpet."])
    tokenizer.truncation_side = "left"  # an answer longer than what is left of the query: still only x is cut
    with torch.no_grad():
        cut = tokenizer(query, answer, truncation="only_first", max_length=24, return_tensors="pt")
        assert short([query], [answer]) == [pytest.approx(model(**cut).logits[0, 0].item(), rel=1e-4, abs=1e-4)]
    # a chat reward model: the conversation and the answer in its own template, as its card scores them
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to bake bread?\n\nAssistant:"
    tokenizer = AutoTokenizer.from_pretrained(reward_models["chat"])
    model = AutoModelForSequenceClassification.from_pretrained(reward_models["chat"]).eval()
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "how to bake bread?"}, {"role": "assistant", "content": "Mix flour."}]
    with torch.no_grad():
        as_card = model(**tokenizer.apply_chat_template(conv, tokenize=True, return_tensors="pt",
                                                        return_dict=True)).logits[0, 0].item()
    assert ple.load_reward(reward_models["chat"])([hh, hh], [" Mix flour.", " Buy bread."])[0] == \
        pytest.approx(as_card, rel=1e-4, abs=1e-4)
    with pytest.raises(ple.PLEError, match=r"--reward_format chat: the tokenizer of .* has no chat template"):
        ple.reward_input(reward_models["pair"], "chat")
    with pytest.raises(ple.PLEError, match=r"--reward_format pair: the tokenizer of .* puts nothing between two texts"):
        ple.reward_input(reward_models["base"], "pair")
    with pytest.raises(ple.PLEError, match=r"--reward_format: pair is for reward models; --reward vader"):
        ple.reward_input("vader", "pair")


def test_dialogue_rows_that_do_not_alternate_are_counted_and_a_majority_of_them_refused(tmp_path, capsys):
    good = [json.dumps(r) for r in HH_ROWS]
    bad = json.dumps({"chosen": "\n\nHuman: hi\n\nHuman: hello?\n\nAssistant: Hello."})
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(good + [bad]) + "\n")
    queries, _, _ = ple.load_queries(str(path), "train", "dialogue", 0, 0)
    assert len(queries) == 3 and all(ple.conversation(q) for q in queries)
    assert "note: skipped 1 of the 4 rows of dataset" in capsys.readouterr().err
    path.write_text("\n".join(good[:1] + [bad] * 2) + "\n")
    with pytest.raises(ple.PLEError, match=r"2 of the 3 rows .* give no query for task 'dialogue' \(first: row \d\), "
                                           r"such as HH turns that do not alternate: is it the right --task"):
        ple.load_queries(str(path), "train", "dialogue", 0, 0)


def test_summarize_reads_posts_or_prompts_that_end_in_tldr(tmp_path):
    import random

    query, answer = ple.make_query("summarize", {"prompt": "POST: My cat sleeps all day.\nTL;DR:", "label": "Lazy cat"},
                                   random.Random(0), "prompt")
    assert (query, answer) == ("POST: My cat sleeps all day.\nTL;DR:", "Lazy cat")
    path = tmp_path / "tldr.jsonl"
    path.write_text(json.dumps({"prompt": "POST: My cat sleeps all day.\nTL;DR:", "completion": " Lazy cat"}) + "\n")
    assert ple.load_queries(str(path), "train", "summarize", 0, 0)[:2] == (["POST: My cat sleeps all day.\nTL;DR:"],
                                                                           [" Lazy cat"])
    path.write_text(json.dumps({"article": "x", "highlights": "y"}) + "\n")
    with pytest.raises(ple.PLEError, match=r"has no 'post' or 'prompt' field, which task 'summarize' reads; its "
                                           r"fields are: article, highlights"):
        ple.load_queries(str(path), "train", "summarize", 0, 0)


def test_find_gguf_in_an_installed_package(tmp_path, monkeypatch):
    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (package / "Tiny.Q4.gguf").write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert ple.find_gguf("fake_gguf_pkg") == (str(package), "Tiny.Q4.gguf")
    assert ple.find_gguf(str(package / "Tiny.Q4.gguf")) == (str(package), "Tiny.Q4.gguf")
    assert ple.find_gguf("some-org/some-model") == ("some-org/some-model", None)
    (package / "Other.gguf").write_bytes(b"GGUF")
    with pytest.raises(ple.PLEError, match="2 .gguf files"):
        ple.find_gguf("fake_gguf_pkg")


# ------------------------------------------------------------------------------------------------
# rewards
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def classifier_dir(tokenizer, tmp_path_factory):
    from transformers import GPT2ForSequenceClassification

    path = str(tmp_path_factory.mktemp("tiny_classifier"))
    tokenizer = copy.deepcopy(tokenizer)  # changed below: a copy
    tokenizer.model_max_length = 12
    torch.manual_seed(1)
    config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, n_positions=64, num_labels=2,
                        id2label={0: "NEGATIVE", 1: "POSITIVE"}, label2id={"NEGATIVE": 0, "POSITIVE": 1},
                        pad_token_id=tokenizer.eos_token_id)
    GPT2ForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_classifier_reward_is_positive_logit_truncated_from_the_left(classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward = ple.load_reward(classifier_dir)
    model = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    queries = ["The film was", REVIEWS[0] + " " + REVIEWS[1]]  # the second is longer than 12 tokens
    answers = ["great", " and the ending was awful"]
    got = reward(queries, answers)
    for q, a, r in zip(queries, answers, got):
        ids = tokenizer(ple.join_text(q, a))["input_ids"][-12:]  # the answer's end survives truncation
        with torch.no_grad():
            assert r == pytest.approx(model(torch.tensor([ids])).logits[0, 1].item(), abs=1e-5)


def test_one_logit_reward_model_and_unknown_labels(tokenizer, tmp_path, classifier_dir):
    from transformers import GPT2ForSequenceClassification

    for labels, ok in [({0: "LABEL_0"}, True), ({0: "cat", 1: "dog"}, False)]:
        path = str(tmp_path / str(len(labels)))
        config = GPT2Config(vocab_size=len(tokenizer), n_layer=1, n_embd=16, n_head=2, num_labels=len(labels),
                            id2label=labels, label2id={v: k for k, v in labels.items()},
                            pad_token_id=tokenizer.eos_token_id)
        GPT2ForSequenceClassification(config).save_pretrained(path)
        tokenizer.save_pretrained(path)
        if ok:
            values = ple.load_reward(path)(["a", "b"], ["c", "d"])
            assert len(values) == 2 and values[0] != values[1]
        else:
            with pytest.raises(ple.PLEError, match="'positive'"):
                ple.load_reward(path)


def test_vader_reward_prefers_positive_text():
    reward = ple.load_reward("vader")
    good, bad = reward(["The film was", "The film was"], ["wonderful and moving", "awful and boring"])
    assert good > 0.3 and bad < -0.3


def test_vader_distinct_makes_a_loop_cost_and_scores_the_words_as_written():
    assert ple.repeated_share("It is great. It is GREAT! It is great, truly") == 4 / 10  # "It is great" said again
    assert ple.repeated_share("a b a b a b") == 2 / 6 and ple.repeated_share(" no loop here ") == 0
    vader, distinct = ple.load_reward("vader"), ple.load_reward("vader_distinct")
    queries, answers = ["The film"] * 3, [" is great." * 3, " is great." * 6, " is great and moving, a fine cast."]
    assert vader(queries, answers)[1] > vader(queries, answers)[0]  # VADER pays for each time it is said again
    said_once = vader(queries[:1], [" is great."])[0]
    looped = distinct(queries, answers)[:2]
    assert looped == pytest.approx([vader(queries, answers)[0] - 2 / 6, vader(queries, answers)[1] - 8 / 12])
    assert max(looped) < said_once  # a loop costs more than saying it again pays
    for answer in (answers[2], "", " fine"):  # no loop: VADER's own score
        assert distinct(queries[:1], [answer]) == vader(queries[:1], [answer])
    # a repeated negation still negates: the score is VADER's, less the share repeated ("I did not" said twice)
    negated = ["I did not like it. I did not enjoy it.", "I was not bored. I was not happy."]
    shares = (1 / 10, 1 / 8)
    assert distinct(["", ""], negated) == pytest.approx([v - d for v, d in zip(vader(["", ""], negated), shares)])
    assert max(distinct(["", ""], negated)) < 0


def test_checked_reward_refuses_bad_values():
    with pytest.raises(ple.PLEError, match=r"returned \[0.0, 1.0, 2.0, nan\] for 4 answers; .*finite"):
        ple.score(ple.checked_reward(lambda q, a: [0.0, 1.0, 2.0, float("nan")]), ["q"] * 4, ["a"] * 4, 10)
    with pytest.raises(ple.PLEError, match=r"returned \[0.0, 0.0, 0.0\] for 4 answers; .* number per answer"):
        ple.score(ple.checked_reward(lambda q, a: [0.0] * 3), ["q"] * 4, ["a"] * 4, 10)
    assert ple.score(ple.checked_reward(lambda q, a: [1] * len(q)), ["q"] * 5, ["a"] * 5, 2).tolist() == [1.0] * 5


# ------------------------------------------------------------------------------------------------
# the method part of ple.py alone, as it is copied into another codebase
# ------------------------------------------------------------------------------------------------

def method_part():
    """The text of ple.py above the line that says nothing below it is PLE, run alone as a module."""
    import types

    with open(os.path.join(HERE, "ple.py"), encoding="utf-8") as f:
        text = f.read()
    module = types.ModuleType("ple_method")
    exec(compile(text[:text.index("# === Nothing below this line is PLE")], "ple_method", "exec"), module.__dict__)
    return module


def test_the_method_part_alone_runs_one_ple_iteration(tokenizer):
    method = method_part()
    assert not hasattr(method, "set_up") and not hasattr(method, "PLEError")  # nothing of the machinery came along

    def reward(queries, answers):  # any Python function of the original queries and the answers
        return [(sum(map(ord, a)) % 21) / 10 - 1 for a in answers]

    torch.manual_seed(0)
    model = tiny_model(tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    queries = REVIEWS[:6]
    args = method.Args(tau0=0.2, max_new_tokens=6, batch_size=3)
    state = method.RunState(
        policy=model, model=model, tokenizer=tokenizer, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
        reward_fn=reward, queries=queries, prompt_ids=method.encode_prompts(tokenizer, queries),
        prompt_ids_p=method.encode_prompts(tokenizer, queries, [PRINCIPLE]), sft_targets=None,
        step=dict(pad_id=tokenizer.eos_token_id, mini_batch_size=6, max_grad_norm=1.0))
    it = method.ple_iteration(0, args, state)
    assert it.rewards == pytest.approx(reward(queries, it.answers))  # each answer scored on its original query
    assert it.rewards_p == pytest.approx(reward(queries, it.answers_p))
    routed = ["rank" if r_p - r > 0.2 else "wsft" for r, r_p in zip(it.rewards, it.rewards_p)]
    assert it.branches == routed and set(routed) == {"rank", "wsft"}  # routed by tau_0, both branches taken
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())  # one optimizer step moved it
    logged = []
    method.run(method.Args(iterations=2, max_new_tokens=6, batch_size=3), state, logged.append)  # the loop alone
    assert [i.t for i in logged] == [0, 1] and logged[1].tau == pytest.approx(0.18)


# ------------------------------------------------------------------------------------------------
# the whole loop
# ------------------------------------------------------------------------------------------------

def test_two_iterations_train_write_resume_and_repeat(model_dir, data_file, principles_file, tmp_path):
    rewards.SEEN_QUERIES.clear()
    straight = make_args(model_dir, data_file, principles_file, tmp_path / "a", iterations=3)
    ple.train(straight)
    queries, _, _ = ple.load_queries(data_file, "train", "sentiment", 6, 0)
    # the reward only ever saw the original queries, never the principle-guided ones
    assert rewards.SEEN_QUERIES and set(rewards.SEEN_QUERIES) == set(queries)
    assert not any(PRINCIPLE in q for q in rewards.SEEN_QUERIES)

    out = tmp_path / "b"
    ple.train(make_args(model_dir, data_file, principles_file, out))
    saved = json.loads((out / "args.json").read_text())
    assert saved["iterations"] == 2 and saved["dataset"] == data_file  # paths as given
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1]
    assert metrics[1]["tau"] == pytest.approx(0.2 * 0.9)
    for key in ("ranked_share", "reward_original", "reward_principle", "loss", "sample_tokens_per_s",
                "score_s", "train_tokens_per_s", "peak_memory_mb"):
        assert key in metrics[0]
    samples = read_jsonl(out / "samples" / "iter-001.jsonl")
    assert len(samples) == 6 and {s["query"] for s in samples} == set(queries)
    assert all(s["branch"] in ("rank", "wsft") and len(s["weights"]) == 2 for s in samples)
    assert sum(s["branch"] == "rank" for s in samples) / 6 == pytest.approx(metrics[1]["ranked_share"])
    assert [c for c in os.listdir(out) if c.startswith("checkpoint")] == ["checkpoint-2"]
    from accelerate.utils import load  # Accelerate's reader: tensors, numbers and text only (weights_only)
    assert load(out / "checkpoint-2" / "optimizer.bin")["state"]  # AdamW's moments, saved by Accelerate
    assert set(load(out / "checkpoint-2" / "random_states_0.pkl")) >= {"random_state", "torch_manual_seed"}
    from safetensors.torch import load_file  # full fine-tuning: the weights after 2 iterations, as final/ has them
    checkpoint, final = load_file(out / "checkpoint-2" / "model.safetensors"), state_of(str(out / "final"))
    assert checkpoint and all(torch.equal(checkpoint[k], final[k]) for k in checkpoint)

    before, after = state_of(model_dir), state_of(str(out / "final"))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # training changed the weights

    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=3, resume=True))
    metrics = read_jsonl(out / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1, 2]
    assert metrics[2]["tau"] == pytest.approx(0.2 * 0.81)
    # 2 iterations + resume == 3 iterations straight, to the last bit: same samples, same weights
    assert read_jsonl(out / "samples" / "iter-002.jsonl") == read_jsonl(tmp_path / "a" / "samples" / "iter-002.jsonl")
    resumed, direct = state_of(str(out / "final")), state_of(str(tmp_path / "a" / "final"))
    assert all(torch.equal(resumed[k], direct[k]) for k in direct)


def test_metrics_also_go_to_a_tracker(model_dir, data_file, principles_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, out, report_to="tensorboard"))
    [events] = glob.glob(str(out / "logs" / "run" / "events.out.tfevents.*"))  # Accelerate's tracker, in logs/
    board = EventAccumulator(events)
    board.Reload()
    metrics = read_jsonl(out / "metrics.jsonl")
    for name in ("reward_original", "ranked_share", "tau"):
        assert [(e.step, e.value) for e in board.Scalars(name)] == \
            [(m["iteration"], pytest.approx(m[name])) for m in metrics]


def test_same_seed_repeats_and_other_seed_differs(model_dir, data_file, principles_file, tmp_path):
    runs = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / name, iterations=1, seed=seed))
        runs[name] = read_jsonl(tmp_path / name / "samples" / "iter-000.jsonl")
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]



def test_the_seed_fixes_the_first_samples_with_or_without_lora(model_dir, data_file, principles_file, tmp_path):
    """LoRA's initialisation draws random numbers; the samples of iteration 0 must not depend on it."""
    for name, r in (("full", 0), ("lora", 4)):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / name, iterations=1, lora_r=r))
    full, lora = (read_jsonl(tmp_path / name / "samples" / "iter-000.jsonl") for name in ("full", "lora"))
    assert full == lora

@pytest.mark.parametrize("loss", ["rank", "wsft", "cd"])
def test_ablations_run_and_train(model_dir, data_file, principles_file, tmp_path, loss):
    out = tmp_path / loss
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, loss=loss))
    samples = read_jsonl(out / "samples" / "iter-000.jsonl")
    if loss == "rank":
        assert all(s["branch"] == "rank" for s in samples)
    if loss == "wsft":
        assert all(s["branch"] == "wsft" for s in samples)
    before, after = state_of(model_dir), state_of(str(out / "final"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def sft_targets(monkeypatch):
    """The answer ids every sft_epoch call trains on, one list per call."""
    targets = []
    real_sft_epoch = ple.sft_epoch

    def spy(model, optimizer, prompt_ids, answer_ids, *args, **kwargs):
        targets.append(answer_ids)
        return real_sft_epoch(model, optimizer, prompt_ids, answer_ids, *args, **kwargs)

    monkeypatch.setattr(ple, "sft_epoch", spy)
    return targets


def baseline_args(model_dir, data_file, principles_file, out, method, **changes):
    """experiments/baselines.py's arguments: ple.py's as make_args sets them, the method and its flags."""
    return experiment_script("baselines.py").BaselineArgs(
        **{**vars(make_args(model_dir, data_file, principles_file, out)), **changes}, method=method)


def test_sft_on_rows_where_trains_on_their_continuations_cut_to_the_cap(tokenizer, model_dir, data_file,
                                                                         principles_file, tmp_path, sft_targets):
    out = tmp_path / "sft_positive"
    baselines = experiment_script("baselines.py")
    baselines.train(baseline_args(model_dir, data_file, principles_file, out, "sft", iterations=1, num_queries=0,
                                  where="label=1", max_new_tokens=4, mini_batch_size=2))
    queries = [s["query"] for s in read_jsonl(out / "samples" / "iter-000.jsonl")]
    labelled = [i % 2 for i, review in enumerate(REVIEWS) for q in queries if review.startswith(q + " ")]
    assert len(queries) == 4 and labelled == [1, 1, 1, 1]  # every row with label 1, no other
    for query, target in zip(queries, sft_targets[0]):
        rest = next(r for r in REVIEWS if r.startswith(query + " "))[len(query):]
        assert target == (tokenizer(rest, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:4]
    long_, short = ple.sft_targets_for(tokenizer, [REVIEWS[0], " the end"], max_tokens=5)
    assert len(long_) == 5 and tokenizer.eos_token_id not in long_  # cut at the cap: no end-of-sequence
    assert short[-1] == tokenizer.eos_token_id and len(short) < 5  # an answer within the cap keeps its end
    # eval.py holds out exactly the rows such a run trained on
    assert ple_eval.training_rows([str(out / "final")]) == {r for i, r in enumerate(REVIEWS) if i % 2 == 1}


def test_raft_trains_on_the_best_of_k_answers(tokenizer, model_dir, data_file, principles_file, tmp_path, sft_targets):
    out = tmp_path / "raft"
    experiment_script("baselines.py").train(baseline_args(model_dir, data_file, principles_file, out, "raft",
                                                          iterations=1, raft_k=3))
    samples = read_jsonl(out / "samples" / "iter-000.jsonl")
    assert len(samples) == 6 and len(sft_targets) == 1
    for sample, target in zip(samples, sft_targets[0]):
        assert len(sample["candidates"]) == 3
        assert sample["candidate_rewards"] == pytest.approx(rewards.word_reward([""] * 3, sample["candidates"]))
        assert sample["reward"] == max(sample["candidate_rewards"])  # the best answer ...
        assert sample["answer"] == sample["candidates"][sample["candidate_rewards"].index(sample["reward"])]
        assert tokenizer.decode(target, skip_special_tokens=True) == sample["answer"]  # ... is the SFT target
        assert sample["branch"] == "raft" and sample["answer_principle"] is None
    record = read_jsonl(out / "metrics.jsonl")[0]
    everything = [r for sample in samples for r in sample["candidate_rewards"]]
    assert record["reward_original"] == pytest.approx(sum(everything) / len(everything), abs=1e-6)
    assert record["reward_principle"] is None and record["tau"] is None
    before, after = state_of(model_dir), state_of(str(out / "final"))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_lora_run_trains_adapters_and_saves_a_plain_model(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "lora"
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, lora_r=4, lora_alpha=8))
    assert os.path.exists(out / "checkpoint-1" / "adapter_config.json")
    final = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    assert not any("lora" in k for k in final.state_dict())
    before = state_of(model_dir)
    assert any(not torch.equal(before[k], v) for k, v in final.state_dict().items() if k in before)
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, lora_r=4, lora_alpha=8, resume=True))
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_model_that_always_ends_at_once(tokenizer, tmp_path, data_file, principles_file):
    model = tiny_model(tokenizer)
    with torch.no_grad():  # every hidden state points at the end-of-sequence embedding
        direction = torch.randn(model.config.n_embd)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[tokenizer.eos_token_id] = 50 * direction
    path = str(tmp_path / "eos_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    out = tmp_path / "run"
    ple.train(make_args(path, data_file, principles_file, out, iterations=1))
    samples = read_jsonl(out / "samples" / "iter-000.jsonl")
    assert all(s["answer"] == "" and s["answer_principle"] == "" for s in samples)
    assert math.isfinite(read_jsonl(out / "metrics.jsonl")[0]["loss"])


# ------------------------------------------------------------------------------------------------
# the command line and bad input
# ------------------------------------------------------------------------------------------------

def cli(*argv, env=None, input=None, umask=None):
    return subprocess.run([sys.executable, os.path.join(HERE, "ple.py"), *argv], cwd=HERE, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})}, input=input,
                          preexec_fn=None if umask is None else lambda: os.umask(umask))


@pytest.mark.slow
def test_command_line_run(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "cli"
    result = cli("--model", model_dir, "--reward", "ple_tests.rewards:word_reward", "--dataset", data_file,
                 "--principles", principles_file, "--output_dir", str(out), "--iterations", "1",
                 "--num_queries", "4", "--max_new_tokens", "4", "--device", "cpu", umask=0o022)
    assert result.returncode == 0, result.stderr
    assert "iter 0: tau 0.200" in result.stdout
    modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777 for p in out.rglob("*")}
    assert modes["args.json"] == modes["samples/iter-000.jsonl"] == modes["final/config.json"] == 0o644  # as
    assert modes["samples"] == modes["final"] == modes["checkpoint-1"] == 0o755  # open() and mkdir() make them
    assert modes["final/model.safetensors"] == modes["checkpoint-1/adapter_model.safetensors"] == 0o644
    before, after = state_of(model_dir), state_of(str(out / "final"))  # the final model loads and was trained
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0]


def test_guidance_gain_by_hand_and_the_note_when_it_is_not_clearly_positive():
    gain, se = ple.guidance_gain([0.1, 0.5, -0.2], [0.3, 0.4, 0.4])  # r_p - r: 0.2, -0.1, 0.6
    assert gain == pytest.approx(0.7 / 3)
    assert se == pytest.approx(math.sqrt(((0.2 - 0.7 / 3) ** 2 + (-0.1 - 0.7 / 3) ** 2 + (0.6 - 0.7 / 3) ** 2) / 2 / 3))
    assert ple.guidance_note({"guidance_gain": 0.3, "guidance_gain_se": 0.1}) is None  # clearly above 0
    for g, s in ((0.2, 0.1), (0.05, 0.1), (-0.2, 0.05), (0.0, 0.0)):
        assert ple.guidance_note({"guidance_gain": g, "guidance_gain_se": s}).startswith(
            f"note: the principles do not clearly help the model: at iteration 0 its guided answers beat its plain "
            f"ones by g = {g:+.3f} ± {s:.3f}")
    assert ple.guidance_note({"guidance_gain": None, "guidance_gain_se": None}) is None  # RAFT: no guided answers


@pytest.mark.slow
def test_a_run_reports_its_guidance_gain_and_ends_with_a_summary_whose_command_runs(model_dir, data_file,
                                                                                   principles_file, tmp_path):
    out = tmp_path / "run"
    result = cli("--model", model_dir, "--reward", "ple_tests.rewards:length_reward", "--dataset", data_file,
                 "--principles", principles_file, "--output_dir", str(out), "--iterations", "2",
                 "--num_queries", "4", "--max_new_tokens", "4", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    metrics, rows = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "samples" / "iter-000.jsonl")
    gaps = [r["reward_principle"] - r["reward"] for r in rows]
    assert metrics[0]["guidance_gain"] == pytest.approx(np.mean(gaps))
    assert metrics[0]["guidance_gain_se"] == pytest.approx(np.std(gaps, ddof=1) / 2)
    noted = "note: the principles do not clearly help" in result.stdout
    assert noted == (not metrics[0]["guidance_gain"] > 2 * metrics[0]["guidance_gain_se"])
    lines = result.stdout.strip().splitlines()
    ranked = sum(m["ranked_share"] * 4 for m in metrics)
    first, last = metrics[0]["reward_original"], metrics[1]["reward_original"]
    assert lines[-5] == (f"done: 2 iterations on 4 queries; reward of the answers to x {first:+.3f} at iteration 0, "
                         f"{last:+.3f} at iteration 1 (--reward ple_tests.rewards:length_reward)")
    assert lines[-4].startswith(f"guidance gain at iteration 0: g = mean(r_p - r) = {metrics[0]['guidance_gain']:+.3f}")
    assert lines[-4].endswith(f"pairs ranked: {ranked:.0f} of 8, the rest weighted SFT")
    assert lines[-3] == f"the model: {out / 'final'}" and (out / "final" / "model.safetensors").exists()
    evaluate = shlex.split(lines[-2].split("next: ", 1)[1].split("   #")[0])
    assert evaluate[:4] == ["python", "eval.py", "--models", str(out / "final")] and evaluate[4] == model_dir
    evaluated = subprocess.run([sys.executable, *evaluate[1:], "--max_new_tokens", "4", "--kl_samples", "0",
                                "--bootstrap", "50", "--device", "cpu"], cwd=HERE, capture_output=True, text=True,
                               timeout=600)  # the next command, as printed, evaluates the run
    assert evaluated.returncode == 0 and f"wrote {out / 'eval.json'}" in evaluated.stdout, evaluated.stderr
    assert lines[-1].split("   #")[0].split() == ["python", "eval.py", "--plot", str(out)]
    import matplotlib.pyplot as plt
    plt.close("all")
    ple_eval.run(ple_eval.EvalArgs(plot=str(out)))  # the plot, once evaluated, shows the held-out result beside
    report, held = json.loads((out / "eval.json").read_text()), plt.gcf().axes[2]
    stats = [report["models"][name] for name in (report["baselines"][0], report["candidate"])]
    assert [bar.get_height() for bar in held.patches] == pytest.approx([s["mean_reward"] for s in stats])
    assert [t.get_text() for t in held.get_xticklabels()] == ["untrained", "after PLE"]
    win = report["win_rates"][report["baselines"][0]]
    assert held.get_title().endswith(f"win rate {win['rate']:.2f} [{win['ci_low']:.2f}, {win['ci_high']:.2f}]")


def experiment_script(*path):
    """An experiments/ script as a module (they are scripts, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(path[-1][:-3], os.path.join(HERE, "experiments", *path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_rule_that_chose_the_default_takes_the_best_reward_within_the_drift_bounds(tmp_path, capsys):
    report = experiment_script("default", "report.py")
    loops, fresh = "a fine film a fine film", "a fine film with a great cast"
    paths = []
    # (learning rate, iteration, reward, distinct-2, answers): the best reward loops, another is too repetitive
    for lr, it, reward, d2, answer in ((1e-4, 4, 0.20, 0.7, fresh), (1e-4, 8, 0.50, 0.7, loops),
                                       (5e-5, 6, 0.25, 0.7, fresh), (5e-5, 12, 0.30, 0.5, fresh)):
        run = tmp_path / f"lr{lr}"
        run.mkdir(exist_ok=True)
        (run / "args.json").write_text(json.dumps({"reward": "vader", "num_queries": 48, "learning_rate": lr,
                                                   "iterations": 12}))
        stats = {"mean_reward": reward, "stderr": 0.05, "kl": 1.0, "kl_stderr": 0.1, "distinct_2": d2}
        models = {str(run / f"iter-{it}"): stats, "untrained": {**stats, "mean_reward": 0.1}}
        paths.append(tmp_path / f"val_{lr}_{it}.json")
        paths[-1].write_text(json.dumps({
            "candidate": str(run / f"iter-{it}"), "baselines": ["untrained"], "models": models,
            "win_rates": {"untrained": {"rate": 0.6, "ci_low": 0.5, "ci_high": 0.7}},
            "generations": {"models": {name: {"answers": [[answer, fresh]] * 10} for name in models}}}))
    assert report.select([str(p) for p in paths]) == ("vader", 48, 5e-5, 6)
    assert "chosen: --reward vader, 48 queries, learning rate 5e-5, 6 iterations" in capsys.readouterr().out
    assert report.select([str(paths[1])]) is None  # nothing within the bounds: nothing chosen


@pytest.mark.slow
def test_trl_sdft_baseline_shows_the_teacher_exactly_x_p_and_the_student_exactly_x(model_dir, data_file, tmp_path,
                                                                                 monkeypatch):
    pytest.importorskip("trl", reason="needs trl: pip install -r experiments/imdb/requirements.txt to run it")
    from transformers import AutoTokenizer
    from trl.experimental.sdft import SDFTTrainer
    baselines = experiment_script("imdb", "trl_baselines.py")
    seen, tokenize = [], SDFTTrainer._tokenize_prompts

    def recording(self, prompts):  # every prompt the trainer tokenizes: the student's and the teacher's
        ids = tokenize(self, prompts)
        seen.extend(zip(prompts, map(list, ids)))
        return ids

    monkeypatch.setattr(SDFTTrainer, "_tokenize_prompts", recording)
    principles_path = tmp_path / "principles.txt"
    principles_path.write_text(f"[sentiment]\n{PRINCIPLE}\nBe brief.\n")
    args = baselines.BaselineArgs(method="sdft", model=model_dir, reward="ple_tests.rewards:length_reward",
                                  dataset=data_file, principles=str(principles_path), output_dir=str(tmp_path / "sdft"),
                                  iterations=1, num_queries=4, max_new_tokens=4, mini_batch_size=2,
                                  chat_template="off", device="cpu")
    baselines.run(args)
    queries = ple.load_queries(data_file, args.split, "sentiment", 4, args.seed)[0]
    tokenizer, principles = AutoTokenizer.from_pretrained(model_dir), [PRINCIPLE, "Be brief."]
    x = dict(zip(queries, ple.encode_prompts(tokenizer, queries, chat=False)))
    x_p = dict(zip([ple.build_principle_query(q, principles) for q in queries],
                   ple.encode_prompts(tokenizer, queries, principles, chat=False)))
    assert {text for text, _ in seen} == set(x) | set(x_p)  # each query as x (student) and as x_p (teacher)
    assert all(ids == {**x, **x_p}[text] for text, ids in seen)  # tokenized as ple.py tokenizes them
    assert os.path.isfile(tmp_path / "sdft" / "final" / "config.json")
    with pytest.raises(ple.PLEError, match="--method sdft needs plain-text prompts"):
        baselines.run(baselines.BaselineArgs(**{**vars(args), "chat_template": "auto",
                                                "output_dir": str(tmp_path / "chat")}))


def test_eval_measures_the_guidance_gain_of_principles_files_before_training(model_dir, data_file, principles_file,
                                                                             tmp_path, capsys):
    other = tmp_path / "other.txt"
    other.write_text("[sentiment]\nWrite a long and warm continuation.\n")
    rewards.SCORED.clear()
    ple_eval.run(eval_args([model_dir], data_file, tmp_path / "unused.json", guidance=[principles_file, str(other)],
                           reward="ple_tests.rewards:logged_length_reward", n=4, samples=2))
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| /")]  # a row per file
    assert [line.split(" | ")[0] for line in table] == [f"| {principles_file}", f"| {other}"]
    scored = [v for v in rewards.SCORED if len(v) == 8]  # (the start-up probe scores 2 empty answers)
    for line, r, r_p in zip(table, scored[0::2], scored[1::2]):  # per file: the answers to x, then to x_p
        gaps = np.array(r_p).reshape(4, 2).mean(1) - np.array(r).reshape(4, 2).mean(1)
        assert line.split(" | ")[1] == f"{gaps.mean():+.3f} ± {gaps.std(ddof=1) / 2:.3f}"
    assert not (tmp_path / "unused.json").exists()


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_naming_the_checkpoint_that_the_same_command_resumes_exactly(
        model_dir, data_file, principles_file, tmp_path):
    import signal
    import time

    flags = ["--model", model_dir, "--reward", "ple_tests.rewards:word_reward", "--dataset", data_file, "--principles",
             principles_file, "--num_queries", "4", "--batch_size", "4", "--mini_batch_size", "2", "--max_new_tokens",
             "4", "--lora_r", "0", "--learning_rate", "1e-2", "--device", "cpu", "--iterations", "40"]
    straight = tmp_path / "straight"
    assert cli(*flags, "--output_dir", str(straight)).returncode == 0
    for stopped_at in (1, 3):  # somewhere after the first checkpoint, then after a later one: mid-iteration or write
        out = tmp_path / f"stopped-{stopped_at}"
        run = subprocess.Popen([sys.executable, os.path.join(HERE, "ple.py"), *flags, "--output_dir", str(out)],
                               cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               # a test run started in the background (`pytest &`) ignores SIGINT, and so
                               # would its children: give the run Ctrl-C as a terminal would
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.time() + 300
        while [n for n, _ in ple.checkpoints(str(out))][-1:] < [stopped_at] and run.poll() is None and \
                time.time() < deadline:
            time.sleep(0.02)
        run.send_signal(signal.SIGINT)
        _, err = run.communicate(timeout=300)
        assert run.returncode == 130, err
        last = ple.checkpoints(str(out))[-1][1]
        said = f"stopped by Ctrl-C; the last checkpoint is {last}: the same command with --resume continues from it"
        assert said in err.splitlines()  # a line of its own (a bar the stop cut half-built may still complain as it
        assert "Traceback" not in err[:err.index(said)]  # is freed, after it: tqdm's, not the run's)
        resumed = cli(*flags, "--output_dir", str(out), "--resume")
        assert resumed.returncode == 0, resumed.stderr
        assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == list(range(40))
        for t in (0, 39):
            assert read_jsonl(out / "samples" / f"iter-{t:03d}.jsonl") == \
                read_jsonl(straight / "samples" / f"iter-{t:03d}.jsonl")
        after, direct = state_of(str(out / "final")), state_of(str(straight / "final"))
        assert all(torch.equal(after[k], direct[k]) for k in direct)


def test_a_stop_line_stands_alone_after_a_progress_bar_it_cut_off(capfd):
    """A stop mid-bar prints its line after a line break (not "sampling: 40%|..|stopped by Ctrl-C")."""
    def work(args):
        bar = iter(ple.tqdm(range(5), desc="sampling", leave=False))
        next(bar), next(bar)
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stop:
        ple.main(["--output_dir", "unused"], work=work)
    err = capfd.readouterr().err
    assert stop.value.code == 130 and "sampling" in err
    assert err.splitlines()[-1] == "stopped by Ctrl-C; no checkpoint was saved yet: nothing to resume"


@pytest.mark.slow
def test_help_reads_as_a_tools_and_lists_every_flag():
    helps = {}
    for script, fields in [("ple.py", ple.Args), ("eval.py", ple_eval.EvalArgs)]:
        result = subprocess.run([sys.executable, os.path.join(HERE, script), "--help"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert all(f"--{name}" in result.stdout for name in fields.__dataclass_fields__)
        assert "(default: )" not in result.stdout and "[RESUME]" not in result.stdout
        described = result.stdout.split("\n\n")[1]  # after the usage, what the program does
        assert described.startswith(("PLE: Progressively Label Enhancement", "Evaluate PLE models on held-out"))
        helps[script] = result.stdout
    headings = re.findall(r"(?m)^(\S[^\n]*):$", helps["ple.py"])
    assert headings == ["options", "experiment", "algorithm (the paper's settings)", "data and sampling", "optimizer"]
    assert re.search(r"(?m)^  --resume +continue the run", helps["ple.py"])  # a switch, no value


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_that_names_the_model_and_the_ways_on(tmp_path):
    import socket

    with socket.socket() as sock:  # a port that nothing listens on: every request is refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=f"http://127.0.0.1:{port}")
    result = subprocess.run([sys.executable, "ple.py", "--model", "gpt2", "--output_dir", str(tmp_path / "out")],
                            cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: --model gpt2 is not in your Hub cache, and the Hugging Face Hub cannot be reached (or HF_HUB_OFFLINE "
        "is set): connect to the network, or pass a local folder"]


@pytest.mark.slow
def test_command_line_bad_input_exits_non_zero(model_dir, data_file, tmp_path):
    result = cli("--task", "poetry")
    assert result.returncode != 0 and "invalid choice: 'poetry'" in result.stderr
    result = cli("--model", model_dir, "--dataset", data_file, "--principles", str(tmp_path / "missing.txt"),
                 "--output_dir", str(tmp_path / "x"))
    assert result.stderr.strip().splitlines() == [f"error: FileNotFoundError: [Errno 2] No such file or directory: "
                                                  f"'{tmp_path / 'missing.txt'}' (PLE_DEBUG=1 shows where)"]
    # a Hub id that is not in the cache, offline: one line that says so, before the dataset or any weights load
    result = cli("--model", "nobody-here/no-such-model", "--reward", "ple_tests.rewards:word_reward", "--dataset",
                 str(tmp_path / "no-such-data.jsonl"), "--output_dir", str(tmp_path / "y"), env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2 and result.stderr.splitlines() == [
        "error: --model nobody-here/no-such-model is not in your Hub cache, and the Hugging Face Hub cannot be reached "
        "(or HF_HUB_OFFLINE is set): connect to the network, or pass a local folder"]


@pytest.mark.parametrize("argv, line", [
    (["--iteration", "2"], "error: unrecognized arguments: --iteration 2"),  # no abbreviations
    (["--lr", "1e-4"], "error: unrecognized arguments: --lr 1e-4"),
    (["--iterations", "two"], "error: argument --iterations: invalid int value: 'two'"),
    (["--device", "cuda:7"], "error: argument --device: invalid choice: 'cuda:7' (choose from 'auto', 'cpu')"),
])
def test_command_line_mistakes_get_one_line(argv, line, capsys, monkeypatch):
    monkeypatch.setattr(ple, "train", lambda args: pytest.fail("a run started"))
    with pytest.raises(SystemExit) as stop:
        ple.main(argv)
    assert stop.value.code == 2 and capsys.readouterr().err.strip().splitlines() == [line]


def test_negative_numbers_are_values_and_bad_values_are_refused_before_anything_is_written(
        model_dir, data_file, principles_file, tmp_path):
    args = ple.parse_args(["--learning_rate", "-1e-4", "--tau0", "-.5", "--seed", "-1"])
    assert (args.learning_rate, args.tau0, args.seed) == (-1e-4, -0.5, -1)
    out = tmp_path / "o"
    for bad, refused in [({"learning_rate": -1e-4}, "--learning_rate: must be a positive number"),
                         ({"seed": -1}, r"--seed: must be in \[0, 2\*\*32\)"),
                         ({"seed": 2**32}, r"--seed: must be in \[0, 2\*\*32\)")]:
        with pytest.raises(ple.PLEError, match=refused):
            ple.train(make_args(model_dir, data_file, principles_file, out, **bad))
        assert not out.exists()


@pytest.mark.parametrize("failure, line", [
    (RuntimeError("boom"), "error: RuntimeError: boom (PLE_DEBUG=1 shows where)"),
    (SystemExit(3), "error: sys.exit(3) was called (PLE_DEBUG=1 shows where)"),  # (a library, a callback)
    (ple.PLEError("--x: bad"), "error: --x: bad"),
])
@pytest.mark.parametrize("program", ["ple", "eval"])
def test_any_failure_ends_in_one_line_and_ple_debug_shows_its_traceback(failure, line, program, capsys,
                                                                        monkeypatch):
    module = ple if program == "ple" else ple_eval

    def fails(args):
        raise failure

    monkeypatch.setattr(module, "train" if program == "ple" else "run", fails)
    monkeypatch.delenv("PLE_DEBUG", raising=False)
    for debug in (False, True):
        if debug:
            monkeypatch.setenv("PLE_DEBUG", "1")
        with pytest.raises(SystemExit) as stop:
            module.main(["--output_dir", "unused"] if program == "ple" else ["--plot", "unused"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.strip().splitlines()[-1] == (
            line.replace(" (PLE_DEBUG=1 shows where)", "") if debug else line)
        assert ("Traceback" in err) == debug


def test_ctrl_c_in_eval_ends_in_one_line_that_says_what_is_kept(capsys, monkeypatch):
    def stopped(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ple_eval, "run", stopped)
    with pytest.raises(SystemExit) as stop:
        ple_eval.main(["--plot", "unused"])
    assert stop.value.code == 130 and capsys.readouterr().err.strip().splitlines() == [
        "stopped by Ctrl-C: the generations of every model that finished are kept in the cache (--cache; default "
        "eval_cache/ beside --output), and the same command reuses them"]


def test_fewer_rows_than_num_queries_is_said_before_training(model_dir, data_file, principles_file, tmp_path,
                                                             capsys):
    ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "o", iterations=1, num_queries=500))
    found = len(read_jsonl(tmp_path / "o" / "samples" / "iter-000.jsonl"))
    out = capsys.readouterr().out
    assert f"note: --num_queries 500, but dataset {data_file} gives {found} queries: training on those {found}" in out
    assert out.index("note: --num_queries") < out.index("iter 0:")


CUSTOM_CODE = """
open({marker!r}, "w").close()  # what a folder's code could do, had it been run
from transformers import GPT2Config
class Custom(GPT2Config):
    model_type = "custom"
"""


def test_no_code_from_a_model_folder_runs_asked_or_not(model_dir, other_model_dir, data_file, principles_file,
                                                       tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    del config["model_type"]
    config["auto_map"] = {"AutoConfig": "custom_code.Custom", "AutoModelForCausalLM": "custom_code.Custom"}
    (custom / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "code-ran"
    (custom / "custom_code.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    result = cli("--model", str(custom), "--reward", "ple_tests.rewards:word_reward", "--dataset", data_file,
                 "--principles", principles_file, "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                 input="y\n")  # were transformers to ask whether to run the folder's code, the answer is yes
    assert result.returncode == 2 and "Traceback" not in result.stderr and "[y/N]" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: ValueError: The repository {custom} contains "
                                                             "custom code")
    with pytest.raises(ValueError, match="contains custom code"):
        ple_eval.run(eval_args([str(custom), other_model_dir], data_file, tmp_path / "e.json"))
    assert not marker.exists()


def test_eval_never_replaces_a_file_it_did_not_write(model_dir, other_model_dir,
                                                                                   data_file, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    for text in ("my notes", '{"generations": []}', "[1, 2]", '{"generations": {}, "settings": {}}'):
        notes.write_text(text)
        with pytest.raises(ple.PLEError, match=r"--output: .*notes.txt exists and is not an evaluation eval.py wrote"):
            ple_eval.run(eval_args([model_dir, other_model_dir], data_file, notes))
        assert notes.read_text() == text
    out, target = tmp_path / "e.json", tmp_path / "target.json"
    target.write_text('{"generations": {}}')  # an evaluation's shape, but reached through a link: refused too
    out.symlink_to(target)
    with pytest.raises(ple.PLEError, match=r"--output: .*e.json exists and is not an evaluation eval.py wrote"):
        ple_eval.run(eval_args([model_dir, other_model_dir], data_file, out))
    out.unlink()
    ple_eval.run(eval_args([model_dir, other_model_dir], data_file, out))
    ple_eval.run(eval_args([model_dir, other_model_dir], data_file, out))  # its own file: replaced
    assert json.loads(out.read_text())["generations"]["queries"]


def test_bad_principles(model_dir, data_file, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but a comment\n")
    with pytest.raises(ple.PLEError, match="no principles for task 'sentiment'"):
        ple.train(make_args(model_dir, data_file, str(empty), tmp_path / "o"))
    other = tmp_path / "other.txt"
    other.write_text("[dialogue]\nBe helpful.\n")
    with pytest.raises(ple.PLEError, match=r"tasks with principles: dialogue"):
        ple.train(make_args(model_dir, data_file, str(other), tmp_path / "o"))
    with pytest.raises(FileNotFoundError, match="none.txt"):
        ple.train(make_args(model_dir, data_file, str(tmp_path / "none.txt"), tmp_path / "o"))


def test_dataset_without_the_task_field(model_dir, principles_file, tmp_path):
    path = tmp_path / "wrong.jsonl"
    path.write_text(json.dumps({"review": "good", "stars": 5}) + "\n")
    with pytest.raises(ple.PLEError, match=r"no 'text' field.*fields are: review, stars"):
        ple.train(make_args(model_dir, str(path), principles_file, tmp_path / "o"))
    odd = tmp_path / "reviews.xml"
    odd.write_text("<review>good</review>")
    with pytest.raises(ple.PLEError, match=r"use a \.jsonl, \.json, \.csv or \.txt file"):
        ple.train(make_args(model_dir, str(odd), principles_file, tmp_path / "o"))


def failure_line(function, *args):
    """The one line main() would print for the failure of function(*args)."""
    with pytest.raises(Exception) as failed:
        function(*args)
    return ple.error_line(failed.value)


def test_a_name_that_cannot_load_is_the_librarys_first_line_before_any_weights_load(model_dir, data_file,
                                                                                     principles_file, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("weights were loaded"))
    (tmp_path / "not_a_model").mkdir()
    for changes, said in [
            (dict(model=str(tmp_path / "no_such_folder")), f"--model: {tmp_path / 'no_such_folder'}: no such file or "
                                                           "folder"),  # (not the Hub's "Repo id must be ...")
            (dict(model=str(tmp_path / "not_a_model")), f"ValueError: Unrecognized model in {tmp_path}/not_a_model"),
            (dict(reward=str(tmp_path / "no_rm")), f"--reward: {tmp_path / 'no_rm'}: no such file or folder"),
            (dict(dataset="nope.jsonl"), "ConnectionError: Couldn't reach 'nope.jsonl' on the Hub"),
            (dict(reward="no_module_here:f"), "ModuleNotFoundError: No module named 'no_module_here'")]:
        out = tmp_path / "o"
        line = failure_line(ple.train, make_args(model_dir, data_file, principles_file, out, **changes))
        ours = said.startswith("--")  # ple.py's own line, or the library's with the hint
        assert line.startswith("error: " + said) and line.endswith(" (PLE_DEBUG=1 shows where)") != ours, line
        assert "\n" not in line and out.exists() == ("reward" in changes and ":" in changes["reward"])  # (imported
    # with the reward, after the output folder is claimed; the names before it fail before anything is written)


BAD_RUNS = [  # (changes to a good run, the error it must give)
    (dict(num_queries=-3), r"--num_queries: must be 0 or more"),
    (dict(top_p=0.0), r"--top_p: must be in \(0, 1\]"),
    (dict(top_p=1.5), r"--top_p"),
    (dict(max_grad_norm=-1.0), r"--max_grad_norm: must be a positive number"),
    (dict(learning_rate=-1.0), r"--learning_rate: must be a positive number"),
    (dict(learning_rate=float("nan")), r"--learning_rate"),
    (dict(lora_r=-1), r"--lora_r: must be 0 or more"),
    (dict(temperature=0.0), r"--temperature: must be a positive number"),
    (dict(reward_batch_size=0), r"--reward_batch_size: must be at least 1"),
    (dict(alpha=1.5), r"--alpha"),
    (dict(seed=-1), r"--seed: must be in \[0, 2\*\*32\)"),
    (dict(reward="ple_tests.rewards:scalar_reward"), r"returned 3.0 for 2 answers; .*one finite float32 number"),
    (dict(reward="ple_tests.rewards:none_reward"), r"returned None for 2 answers"),
    (dict(reward="ple_tests.rewards:dict_reward"), r"returned \{0: 0.5, 1: 0.5\} for 2 answers"),
    (dict(model="no/such/model"), r"--model: no/such/model: no such file or folder"),
    (dict(reward="./no_such_reward_model"), r"--reward: ./no_such_reward_model: no such file or folder"),
    (dict(reward="ple_tests.rewards:huge_reward"), r"returned \[1e\+39, 1e\+39\] for 2 answers; .*finite float32"),
]


@pytest.mark.parametrize("changes, message", BAD_RUNS, ids=[m.split(":")[0][:30] for _, m in BAD_RUNS])
def test_bad_input_fails_before_any_model_loads(model_dir, data_file, principles_file, tmp_path, monkeypatch,
                                                 changes, message):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was found")

    monkeypatch.setattr(ple, "load_policy", no_model)
    with pytest.raises(ple.PLEError, match=message):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "o", **changes))


@pytest.mark.parametrize("where, message", [
    ("label", r"--where: 'label' is not FIELD=VALUE"),
    ("stars=5", r"has no 'stars' field, which --where names; its fields are: text, label"),
    ("label=7", r"--where label=7: no row .* has label = 7; its values there: 0, 1")])
def test_a_baselines_bad_where_fails_before_any_model_loads(model_dir, data_file, principles_file, tmp_path,
                                                            monkeypatch, where, message):
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ple.PLEError, match=message):
        experiment_script("baselines.py").train(baseline_args(model_dir, data_file, principles_file, tmp_path / "o",
                                                              "sft", where=where))


def test_bad_files_fail_early_and_clearly(model_dir, data_file, principles_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    def run(out, **changes):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / out, **changes))
    for name in ("empty.txt", "empty.jsonl"):
        (tmp_path / name).write_text("")
        with pytest.raises(ple.PLEError, match=f"dataset file .*{name} is empty"):
            run("o", dataset=str(tmp_path / name))
    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i}) + "\n" for i in range(3)))
    with pytest.raises(ple.PLEError, match=r"row \d: the 'text' field is int \d, not text"):
        run("o", dataset=str(numbers))
    for reward, error in (("raising_reward", ValueError), ("exiting_reward", SystemExit)):  # a reward's own failure
        with pytest.raises(error):
            run(reward, reward=f"ple_tests.rewards:{reward}")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(ple.PLEError, match="is a file, not a folder"):
        run("a_file")
    with pytest.raises(NotADirectoryError, match="a_file/run"):
        run("a_file/run")


def test_run_that_failed_in_iteration_0_leaves_a_usable_folder(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="fails only on real answers"):
        ple.train(make_args(model_dir, data_file, principles_file, out, reward="ple_tests.rewards:late_reward"))
    assert (out / "args.json").exists() and not ple.checkpoints(str(out))
    with pytest.raises(ple.PLEError, match=r"--resume: .*run holds no checkpoint to continue from: start its run "
                                           r"without --resume"):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, resume=True))
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1))  # the corrected command takes it
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0]
    for failed in (dict(reward="ple_tests.no_such_module:f"), dict(reward="ple_tests.rewards:nan_reward")):
        fresh = tmp_path / str(len(failed["reward"]))  # a start that fails to load or on its first scores
        with pytest.raises((ModuleNotFoundError, ple.PLEError)):
            ple.train(make_args(model_dir, data_file, principles_file, fresh, **failed))
        ple.train(make_args(model_dir, data_file, principles_file, fresh, iterations=1))  # the folder is taken again
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0]
    assert json.loads((out / "args.json").read_text())["reward"] == "ple_tests.rewards:word_reward"


def test_metrics_are_rewritten_whole_on_resume_and_a_damaged_file_is_named(model_dir, data_file, principles_file,
                                                                           tmp_path, monkeypatch):
    out = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, static_cache="off"))
    with open(out / "metrics.jsonl", "a") as f:  # a record of an iteration the resume redoes (ple.py never leaves one)
        f.write(json.dumps({**read_jsonl(out / "metrics.jsonl")[0], "iteration": 1, "tau": 0.0}) + "\n")
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, resume=True))  # (static cache:
    metrics = read_jsonl(out / "metrics.jsonl")  # auto, which on this CPU is the off it ran with)
    assert [m["iteration"] for m in metrics] == [0, 1] and metrics[1]["tau"] == pytest.approx(0.2 * 0.9)
    (out / "metrics.jsonl").write_text(metrics and json.dumps(metrics[0]) + '\nnot json\n{"iteration": 1}\n')
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ple.PLEError, match=r"metrics.jsonl, line 2, is not a JSON object with iteration, tau, "
                                           r"ranked_share, reward_original, reward_principle: the file is damaged"):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=3, resume=True))


@pytest.mark.parametrize("reward, message", [("ple_tests.rewards:nan_reward", r"returned \[nan, nan\] for 2 answers"),
                                             ("ple_tests.rewards:inf_reward", r"returned \[0.0, inf\] for 2 answers"),
                                             ("ple_tests.rewards:short_reward", r"returned \[0.0\] for 2 answers")])
def test_bad_reward_values_fail_before_training(model_dir, data_file, principles_file, tmp_path, reward, message):
    out = tmp_path / "o"
    with pytest.raises(ple.PLEError, match=message):
        ple.train(make_args(model_dir, data_file, principles_file, out, reward=reward))
    assert not any(p.startswith("checkpoint") for p in os.listdir(out))


def test_resume_refuses_conflicts_and_overwrites(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2))
    before = listing(out)
    with pytest.raises(ple.PLEError, match=r"run is not empty \(args.json, checkpoint-2, final, metrics.jsonl, "
                                           r"\.\.\.\): pass --resume .* --overwrite_output_dir .* or another"):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1))
    with pytest.raises(ple.PLEError, match=r"--tau0 0.2 there, 0.5 now"):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, tau0=0.5, resume=True))
    with pytest.raises(ple.PLEError, match=r"it has done 2 iterations, more than --iterations 1"):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, resume=True))
    with pytest.raises(ple.PLEError, match="not both"):
        ple.train(make_args(model_dir, data_file, principles_file, out, resume=True, overwrite_output_dir=True))
    assert listing(out) == before  # nothing saved was touched
    missing = tmp_path / "missing"
    with pytest.raises(ple.PLEError, match="missing holds no checkpoint to continue from: start its run without"):
        ple.train(make_args(model_dir, data_file, principles_file, missing, resume=True))
    assert not missing.exists()  # (not even made, to hold a lock)



class WritesAMarker:
    """Unpickled, it creates a file: what a hostile file in a downloaded run folder could do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_resume_loads_no_pickled_object_from_the_run_folder(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, lora_r=4))
    marker = tmp_path / "code-ran"
    resume = make_args(model_dir, data_file, principles_file, out, iterations=2, lora_r=4, resume=True)
    for name in ("random_states_0.pkl", "optimizer.bin"):  # (a random state Accelerate would skip in silence)
        path = out / "checkpoint-1" / name
        kept = path.read_bytes()
        torch.save({"payload": WritesAMarker(str(marker))}, path)
        with pytest.raises(ple.PLEError, match=r"checkpoint-1 holds a file that is not only tensors, numbers and "
                                               r"text, as ple.py writes them: not loaded"):
            ple.train(resume)
        assert not marker.exists()
        path.write_bytes(kept[:100])  # cut short, as by a full disk: torch's own error, not a silent skip
        with pytest.raises((RuntimeError, ple.PLEError), match="zip archive"):
            ple.train(resume)
        path.unlink()
        with pytest.raises((FileNotFoundError, ple.PLEError), match=f"No such file or directory: .*{name}"):
            ple.train(resume)
        path.write_bytes(kept)
    from safetensors.torch import load_file, save_file  # an adapter missing a tensor, emptied, renamed, or removed
    adapter = out / "checkpoint-1" / "adapter_model.safetensors"
    kept, tensors = adapter.read_bytes(), load_file(adapter)
    first = sorted(tensors)[0]
    for edited in ({k: v for k, v in tensors.items() if k != first}, {},
                   {(k + "_renamed" if k == first else k): v for k, v in tensors.items()}):
        save_file(edited, adapter)
        with pytest.raises(ple.PLEError, match=rf"adapter does not hold the {len(tensors)} LoRA tensors of this run"):
            ple.train(resume)
    adapter.unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        ple.train(resume)
    adapter.write_bytes(kept)
    ple.train(resume)
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]


def test_interrupted_checkpoint_write_leaves_the_last_good_one(model_dir, data_file, principles_file, tmp_path,
                                                               monkeypatch):
    out = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1))
    straight = tmp_path / "straight"
    ple.train(make_args(model_dir, data_file, principles_file, straight, iterations=2))
    real = torch.save

    def killed(obj, path, *args, **kwargs):  # the weights are written, then the process dies mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, resume=True))
    assert [n for n, _ in ple.checkpoints(str(out))] == [1]  # the checkpoint before it is whole and kept
    monkeypatch.setattr(torch, "save", real)
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, resume=True))
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]
    assert read_jsonl(out / "samples" / "iter-001.jsonl") == read_jsonl(straight / "samples" / "iter-001.jsonl")
    assert max_difference(state_of(str(out / "final")), state_of(str(straight / "final"))) == 0
    # a full disk while a checkpoint is written: its part removed, the last good checkpoint kept, said as such
    again = tmp_path / "again"
    ple.train(make_args(model_dir, data_file, principles_file, again, iterations=1))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError) as failure:
        ple.train(make_args(model_dir, data_file, principles_file, again, iterations=2, resume=True))
    assert [n for n, _ in ple.checkpoints(str(again))] == [1] and not [n for n in os.listdir(again) if ".tmp" in n]
    assert ple.error_line(failure.value) == "error: the disk is full (OSError: [Errno 28] No space left on device)"
    assert ple.error_line(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")
                          ).startswith("error: the disk is full (RuntimeError: ")  # (torch's writer on a full disk)


@pytest.mark.slow
def test_a_failure_in_the_loop_says_the_command_that_resumes(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, os.path.join(HERE, "ple.py"), "--model", model_dir, "--dataset", data_file,
               "--principles", principles_file, "--output_dir", str(out), "--reward",
               "ple_tests.rewards:second_iteration_reward", "--iterations", "2", "--num_queries", "6",
               "--batch_size", "6", "--reward_batch_size", "64", "--max_new_tokens", "4", "--lora_r", "0"]
    result = subprocess.run(command, cwd=HERE, capture_output=True, text=True, timeout=600)
    [line] = [x for x in result.stderr.splitlines() if x.startswith("error:")]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert line == (f"error: RuntimeError: the reward server went down (PLE_DEBUG=1 shows where); the last checkpoint "
                    f"is {out / 'checkpoint-1'}: the same command with --resume continues from it")
    resumed = subprocess.run(command + ["--resume"], cwd=HERE, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr  # (a new process: the reward's calls counted from 0 again)
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0, 1]


# ------------------------------------------------------------------------------------------------
# the run folder is the user's data: what ple.py writes, locks, verifies and refuses
# ------------------------------------------------------------------------------------------------

def listing(folder):
    """Every file under a folder, with its bytes."""
    found = {}
    for top, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                found[os.path.relpath(os.path.join(top, name), folder)] = f.read()
    return found


def test_a_run_never_writes_into_a_folder_it_did_not_make(model_dir, data_file, principles_file, tmp_path,
                                                          monkeypatch):
    mine = tmp_path / "mine"
    for name, text in [("final/notes.txt", "my notes"), ("args.json", '{"tau0": 0.2}'), ("plan.md", "plan")]:
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = listing(mine)
    for flags, refused in [({}, r"mine is not empty \(args.json, final, plan.md\): pass --resume to continue the run "
                                r"it holds, --overwrite_output_dir to replace it"),
                           ({"resume": True}, r"mine holds no checkpoint to continue from")]:
        with pytest.raises(ple.PLEError, match=refused):  # no mark a user can write makes the folder ple.py's
            ple.train(make_args(model_dir, data_file, principles_file, mine, **flags))
        assert listing(mine) == before  # nothing removed, overwritten or added (not even a lock)
    monkeypatch.chdir(HERE)  # --output_dir . in the repository
    with pytest.raises(ple.PLEError, match=r"--output_dir: \. is not empty"):
        ple.train(make_args(model_dir, data_file, principles_file, "."))


def test_overwrite_replaces_only_what_ple_py_wrote(model_dir, data_file, principles_file, tmp_path):
    out = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=3, save_every=1))
    (out / "eval.json").write_text("{}")  # beside the run: an evaluation, the user's notes
    (out / "notes.txt").write_text("mine")
    (out / ".notes.tmp").write_text("mine too")  # hidden, and named like a temporary file, but not one of ple.py's
    shutil.rmtree(out / "checkpoint-3")  # a finished run whose checkpoint was deleted to save space
    for flags in ({}, {"resume": True}):
        with pytest.raises(ple.PLEError, match="not empty|no checkpoint"):
            ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, **flags))
    assert len(read_jsonl(out / "metrics.jsonl")) == 3 and (out / "final").is_dir()
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, overwrite_output_dir=True))
    assert [m["iteration"] for m in read_jsonl(out / "metrics.jsonl")] == [0]
    assert sorted(os.listdir(out)) == [".notes.tmp", "args.json", "checkpoint-1", "eval.json", "final",
                                       "metrics.jsonl", "notes.txt", "samples"]  # iter-1..3/ gone, with samples 1, 2
    assert os.listdir(out / "samples") == ["iter-000.jsonl"] and (out / "notes.txt").read_text() == "mine"


def test_a_link_is_never_written_through(model_dir, data_file, principles_file, tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("not to be touched")
    (tmp_path / "file.json").symlink_to(target)
    ple.write_file(str(tmp_path / "file.json"), "new")  # the rule every write follows: a fresh file renamed over it
    assert target.read_text() == "not to be touched" and (tmp_path / "file.json").read_text() == "new"
    assert not (tmp_path / "file.json").is_symlink() and sorted(os.listdir(tmp_path)) == ["elsewhere", "file.json"]
    out = tmp_path / "run"  # a link among the run folder's own entries: replaced, never written through
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1))
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(target)
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=1, overwrite_output_dir=True))
    assert target.read_text() == "not to be touched" and not (out / "metrics.jsonl").is_symlink()


def test_an_adapter_folder_a_missing_tracker_and_damaged_inputs_are_refused_in_one_line(
        model_dir, other_model_dir, data_file, principles_file, tmp_path, monkeypatch):
    run = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, run, iterations=1, lora_r=4))
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ple.PLEError, match=r"--model: .*checkpoint-1 is a LoRA adapter \(a run's checkpoint-N/ or "
                                           r"iter-N/\): continue its run with --resume, or train from its run's "
                                           r"final/"):
        ple.train(make_args(str(run / "checkpoint-1"), data_file, principles_file, tmp_path / "o", lora_r=0))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trackio" else real(name, *a))
    with pytest.raises(ple.PLEError, match=r"--report_to: trackio is not installed: pip install trackio"):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "o", report_to="trackio"))
    assert not (tmp_path / "o").exists()  # refused before anything was written
    monkeypatch.undo()
    (run / "args.json").write_text('{"model": ')  # cut short: resume and eval.py name the file
    for go in (lambda: ple.train(make_args(model_dir, data_file, principles_file, run, iterations=2, lora_r=4,
                                           resume=True)),
               lambda: ple_eval.run(eval_args([str(run / "final"), model_dir], data_file, tmp_path / "e.json"))):
        with pytest.raises(ple.PLEError, match=r"run/args.json is not a JSON object with model, .*: the file is "
                                               r"damaged"):
            go()
    saved = tmp_path / "saved.json"  # generations edited by hand: one line that names what is wrong
    ple_eval.run(eval_args([model_dir, other_model_dir], data_file, saved))
    edited = json.loads(saved.read_text())
    edited["generations"]["models"][model_dir]["answers"][0] = [7]
    saved.write_text(json.dumps(edited))
    with pytest.raises(ple.PLEError, match=r"--rescore: the saved generations of .* do not pair up"):
        ple_eval.run(ple_eval.EvalArgs(rescore=str(saved), reward="ple_tests.rewards:length_reward"))


real = importlib.util.find_spec


def test_resume_and_eval_refuse_inputs_that_changed_since_training(model_dir, data_file, principles_file, tmp_path):
    principles, data = tmp_path / "principles.txt", tmp_path / "reviews.jsonl"
    principles.write_text(open(principles_file).read())
    data.write_text(open(data_file).read())
    out = tmp_path / "run"

    def run(iterations):
        ple.train(make_args(model_dir, str(data), str(principles), out, iterations=iterations, resume=iterations > 1))
    run(1)
    saved = json.loads((out / "args.json").read_text())
    assert len(saved["principles_sha256"]) == len(saved["data_sha256"]) == 64
    principles.write_text(open(principles_file).read() + "# a comment: nothing the run reads\n")
    run(2)
    principles.write_text(principles.read_text().replace(PRINCIPLE, "Write a cold continuation."))
    with pytest.raises(ple.PLEError, match=r"--resume: .*the \[sentiment\] principles in .*principles.txt changed "
                                           r"since the run started"):
        run(3)
    principles.write_text(open(principles_file).read())
    data.write_text(json.dumps({"text": "A new first row, put at the top of the file"}) + "\n" + data.read_text())
    with pytest.raises(ple.PLEError, match=r"--resume: .*the rows of .*reviews.jsonl that the queries come from "
                                           r"changed since the run started"):
        run(3)
    # eval.py would now take rows the model trained on for held-out ones: it refuses
    with pytest.raises(ple.PLEError, match=r"trained on rows of .*reviews.jsonl that are no longer there as they were"):
        ple_eval.run(eval_args([str(out / "final"), model_dir], str(data), tmp_path / "e.json"))


def test_a_kill_while_iter_n_is_written_is_redone_on_resume(model_dir, data_file, principles_file, tmp_path,
                                                           monkeypatch):
    straight = tmp_path / "straight"
    ple.train(make_args(model_dir, data_file, principles_file, straight, iterations=2, save_every=1))
    out = tmp_path / "run"
    real = ple.save_model

    def killed_in_iter_2(path, *rest):
        if os.path.basename(path) != "iter-2":
            return real(path, *rest)
        os.makedirs(os.path.join(os.path.dirname(path), ".iter-2.0123abcd.tmp"))  # what a SIGKILL mid-write leaves
        raise KeyboardInterrupt

    monkeypatch.setattr(ple, "save_model", killed_in_iter_2)
    with pytest.raises(KeyboardInterrupt):
        ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, save_every=1))
    assert (out / ".iter-2.0123abcd.tmp").exists() and [n for n, _ in ple.checkpoints(str(out))] == [1]
    monkeypatch.setattr(ple, "save_model", real)
    (out / ".metrics.jsonl.89abcdef.tmp").write_text("")  # a file write cut the same way
    (out / "samples" / "notes.tmp").write_text("inside a folder of ple.py's: left as it is")
    (out / ".notes.tmp").write_text("a user's hidden file: not ple.py's to remove")
    ple.train(make_args(model_dir, data_file, principles_file, out, iterations=2, save_every=1, resume=True))
    assert [n for n in os.listdir(out) if n.endswith(".tmp")] == [".notes.tmp"]
    assert (out / "samples" / "notes.tmp").exists()
    assert max_difference(state_of(str(out / "iter-2")), state_of(str(straight / "iter-2"))) == 0


def test_prompts_too_long_for_the_model_fail_before_sampling_in_both_scripts(model_dir, other_model_dir, data_file,
                                                                            principles_file, tmp_path, monkeypatch):
    monkeypatch.setattr(ple, "generate_answers", lambda *a, **k: pytest.fail("sampling started"))
    too_long = r"6 of 6 queries do not fit the model's 256 positions: the longest, .* tokens, plus --max_new_tokens 250"
    with pytest.raises(ple.PLEError, match=too_long):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "o2", max_new_tokens=250))
    with pytest.raises(ple.PLEError, match=too_long.replace("6 of 6", r"\d of 8")):  # eval.py: the same check
        ple_eval.run(eval_args([model_dir, other_model_dir], data_file, tmp_path / "e.json", max_new_tokens=250))


def test_bad_data_files_end_in_one_line_after_datasets_own_reason(model_dir, data_file, principles_file, tmp_path,
                                                                   monkeypatch, caplog):
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded"))
    cases = [("latin1.csv", b"text\nun caf\xe9 froid\n", r"UnicodeDecodeError.*'utf-8' codec"),
             ("broken.jsonl", b'{"text": "one"}\n{"text": "two\n{"text": "three"}\n',
              r"ArrowInvalid.*JSON parse error: .* in row 1"),  # the reader's error names the row it stopped at
             ("list.jsonl", b'{"text": "one"}\n["two"]\n', r"JSON parse error: .* in row 0")]
    for name, data, message in cases:
        (tmp_path / name).write_bytes(data)
        caplog.clear()
        line = failure_line(ple.train, make_args(model_dir, str(tmp_path / name), principles_file, tmp_path / "o"))
        assert line.startswith("error: DatasetGenerationError: ") and "\n" not in line, line
        assert re.search(message, caplog.text), caplog.text  # datasets' own log line says why, above it
    bom = tmp_path / "bom.txt"  # as some editors save it
    bom.write_bytes(b"\xef\xbb\xbf[sentiment]\n" + PRINCIPLE.encode() + b"\n")
    assert ple.read_principles(str(bom), "sentiment") == [PRINCIPLE]


def test_one_query(model_dir, data_file, principles_file, tmp_path):
    ple.main(["--model", model_dir, "--reward", "ple_tests.rewards:word_reward", "--dataset", data_file,
              "--principles", principles_file, "--output_dir", str(tmp_path / "run"), "--iterations", "1",
              "--num_queries", "1", "--mini_batch_size", "1", "--max_new_tokens", "4", "--lora_r", "0", "--device",
              "cpu"])
    assert len(read_jsonl(tmp_path / "run" / "samples" / "iter-000.jsonl")) == 1  # one query, one row
    assert (tmp_path / "run" / "final").is_dir()


def test_a_reward_module_cannot_replace_a_standard_module(tmp_path, monkeypatch):
    (tmp_path / "colorsys.py").write_text("def f(queries, answers):\n    return [0.0] * len(answers)\n")
    (tmp_path / "my_reward.py").write_text("import colorsys\n\ndef score(queries, answers):\n"
                                           "    return [colorsys.rgb_to_hsv(0.0, 0.0, 1.0)[0] for a in answers]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    for name in ("my_reward", "colorsys"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert ple.load_reward("my_reward:score")(["q"], ["ab"]) == [2 / 3]  # the standard colorsys, not the file
    assert sys.modules["colorsys"].__file__ != str(tmp_path / "colorsys.py") and str(tmp_path) not in sys.path


# ------------------------------------------------------------------------------------------------
# eval.py
# ------------------------------------------------------------------------------------------------

import eval as ple_eval  # noqa: E402  (the module is eval.py; the alias keeps the builtin visible)


def test_win_rate_by_hand():
    result = ple_eval.win_rate([1, 2, 3, 4], [0, 2, 5, 1])
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    assert result["rate"] == pytest.approx((1 + 0.5 + 0 + 1) / 4)
    assert result["ci_low"] <= result["rate"] <= result["ci_high"]
    assert ple_eval.win_rate([1.0, 2.0], [1.05, 0.0], tie_margin=0.1)["ties"] == 1
    assert ple_eval.win_rate([1.0, 2.0], [1.05, 0.0])["ties"] == 0


def test_win_rate_interval_narrows_with_more_queries():
    import random

    rng = random.Random(0)
    cand, base = [rng.gauss(0.2, 1) for _ in range(40)], [rng.gauss(0, 1) for _ in range(40)]
    small = ple_eval.win_rate(cand, base)
    large = ple_eval.win_rate(cand * 8, base * 8)
    assert large["rate"] == pytest.approx(small["rate"])
    assert large["ci_high"] - large["ci_low"] < 0.6 * (small["ci_high"] - small["ci_low"])
    assert small["ci_low"] <= small["rate"] <= small["ci_high"]


def test_win_rate_averages_samples_within_a_query_first():
    cand = [[1, 3], [5], [1, 1, 1]]
    base = [[2], [0, 10], [0]]
    result = ple_eval.win_rate(cand, base)
    # per query: (0 + 1) / 2, (1 + 0) / 2, 1  -> mean 2/3; pooling all 7 pairs would give 5/7
    assert result["rate"] == pytest.approx(2 / 3)
    assert (result["wins"], result["ties"], result["losses"]) == (5, 0, 2)
    with pytest.raises(ple.PLEError, match="at least 2 queries"):
        ple_eval.win_rate([1], [0])
    with pytest.raises(ple.PLEError, match="3 queries, the baseline for 2"):
        ple_eval.win_rate([1, 2, 3], [0, 1])


def test_judge_asks_in_both_orders_and_disagreement_is_a_tie():
    calls = []

    def always_first(query, a, b):
        calls.append((a, b))
        return "A"

    assert ple_eval.judge_outcome(always_first, "q", "cand", "base") == 0.5  # position bias -> tie
    assert calls == [("cand", "base"), ("base", "cand")]
    longer = lambda q, a, b: "A" if len(a) > len(b) else "B"  # noqa: E731
    assert ple_eval.judge_outcome(longer, "q", "a long answer", "short") == 1.0
    assert ple_eval.judge_outcome(longer, "q", "short", "a long answer") == 0.0


@pytest.fixture(scope="session")
def other_model_dir(tokenizer, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny_gpt2_b"))
    tiny_model(tokenizer, seed=1).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def eval_args(models, data_file, out, **changes):
    import tempfile

    settings = dict(models=models, reward="ple_tests.rewards:length_reward", dataset=data_file, max_new_tokens=6,
                    batch_size=4, device="cpu", dtype="float32", output=str(out), bootstrap=200,
                    cache=tempfile.mkdtemp(prefix="eval_cache"))  # a fresh cache: every test generates
    settings.update(changes)
    return ple_eval.EvalArgs(**settings)


def test_eval_two_models_end_to_end_repeatable(model_dir, other_model_dir, data_file, tmp_path):
    a = ple_eval.run(eval_args([model_dir, other_model_dir], data_file, tmp_path / "a.json", samples=2))
    b = ple_eval.run(eval_args([model_dir, other_model_dir], data_file, tmp_path / "b.json", samples=2))
    assert a["generations"] == b["generations"] and a["win_rates"] == b["win_rates"]
    saved = json.loads((tmp_path / "a.json").read_text())
    gens = saved["generations"]
    assert len(gens["queries"]) == len(REVIEWS)
    assert list(gens["models"]) == saved["settings"]["models"] == [model_dir, other_model_dir]  # named as given
    for name in (model_dir, other_model_dir):
        answers = gens["models"][name]["answers"]
        assert len(answers) == len(REVIEWS) and all(len(x) == 2 for x in answers)
        assert gens["models"][name]["rewards"] == [[float(len(x)) for x in pair] for pair in answers]
        mean = sum(sum(r) / 2 for r in gens["models"][name]["rewards"]) / len(REVIEWS)
        assert saved["models"][name]["mean_reward"] == pytest.approx(mean)
    wr = saved["win_rates"][other_model_dir]
    assert wr["wins"] + wr["ties"] + wr["losses"] == len(REVIEWS) * 4
    expected = ple_eval.win_rate(gens["models"][model_dir]["rewards"], gens["models"][other_model_dir]["rewards"],
                                 bootstrap=200)
    assert wr == expected


def test_eval_holds_out_training_rows_and_warns_about_the_training_reward(model_dir, data_file, principles_file,
                                                                          tmp_path, capsys):
    run_dir = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, run_dir, iterations=1, num_queries=6))
    candidate = str(run_dir / "final")
    report = ple_eval.run(eval_args([candidate, model_dir], data_file, "", reward="ple_tests.rewards:word_reward"))
    _, _, trained = ple.load_queries(data_file, "train", "sentiment", 6, 0)
    held_out = report["generations"]["queries"]
    assert len(held_out) == len(REVIEWS) - 6
    assert not any(any(r.startswith(q) for r in trained) for q in held_out)
    assert report["judge_is_training_reward"] is True
    stats = report["models"]
    assert stats[model_dir]["kl"] == 0.0  # the run's untrained model is the default reference
    assert stats[candidate]["kl_reference"] == model_dir
    assert "| KL ± s.e. |" in ple_eval.markdown(report)
    assert "the one the candidate was trained with" in capsys.readouterr().err
    assert (run_dir / "eval.json").exists()  # written beside the candidate's run
    with pytest.raises(ple.PLEError, match=r"only 2 held-out queries .* excluding 6 rows"):
        ple_eval.run(eval_args([candidate, model_dir], data_file, "", n=5))


def test_rescore_saved_generations_without_loading_a_model(model_dir, other_model_dir, data_file, tmp_path,
                                                            monkeypatch):
    path = tmp_path / "gen.json"
    ple_eval.run(eval_args([model_dir, other_model_dir], data_file, path))

    def no_models(*args, **kwargs):
        raise AssertionError("re-scoring must not load a model")

    monkeypatch.setattr(ple, "load_policy", no_models)
    report = ple_eval.run(ple_eval.EvalArgs(rescore=str(path), reward="ple_tests.rewards:word_reward", bootstrap=200))
    gens = report["generations"]
    for name in (model_dir, other_model_dir):
        got = [r for rs in gens["models"][name]["rewards"] for r in rs]
        expected = [r for a in gens["models"][name]["answers"] for r in rewards.word_reward([""], a)]
        assert got == pytest.approx(expected, abs=1e-6)
    assert (tmp_path / "gen-rescored.json").exists()

    broken = json.loads(path.read_text())
    broken["generations"]["models"][other_model_dir]["answers"].pop()
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(ple.PLEError, match=r"generations of .* do not pair up with the queries"):
        ple_eval.run(ple_eval.EvalArgs(rescore=str(tmp_path / "broken.json")))


def test_eval_bad_input(model_dir, other_model_dir, data_file, tmp_path):
    with pytest.raises(ple.PLEError, match="--models: .*missing: no such file or folder"):  # before any generates
        ple_eval.run(eval_args([model_dir, str(tmp_path / "missing")], data_file, tmp_path / "x.json"))
    with pytest.raises(ple.PLEError, match="candidate and at least one baseline"):
        ple_eval.run(eval_args([model_dir], data_file, tmp_path / "x.json"))
    with pytest.raises(ple.PLEError, match=r"only 8 held-out queries"):
        ple_eval.run(eval_args([model_dir, other_model_dir], data_file, tmp_path / "x.json", n=200))
    one_row = tmp_path / "one.jsonl"
    one_row.write_text(json.dumps({"text": "just one review here"}) + "\n")
    with pytest.raises(ple.PLEError, match=r"too few held-out queries \(1\)"):
        ple_eval.run(eval_args([model_dir, other_model_dir], str(one_row), tmp_path / "x.json"))


@pytest.mark.parametrize("changes, message", [
    (dict(reward="ple_tests.rewards:raising_reward"), r"ValueError: the reward server is down"),
    (dict(output="/nonexistent/dir/e.json"), r"--output: /nonexistent/dir/e.json: the folder .* does not exist"),
    (dict(n=1), r"--n: a win rate needs at least 2 queries"),
    (dict(n=-2), r"--n: must be 0"),
    (dict(second="runs/typo/final"), r"--models: runs/typo/final: no such file or folder"),
    (dict(second="not_a_model_anywhere"), r"--models not_a_model_anywhere is not in your Hub cache, and the Hugging"),
    (dict(second=lambda first: first + "/."), r"--models: names one model twice \('.*' and '.*/\.'\)"),
    (dict(top_p=0.0), r"--top_p"),
    (dict(seed=-1), r"--seed: must be in \[0, 2\*\*32 - 1\)"),
])
def test_eval_checks_everything_before_generating(model_dir, other_model_dir, data_file, tmp_path, monkeypatch,
                                                  changes, message):
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    second = changes.pop("second", other_model_dir)
    second = second(model_dir) if callable(second) else second
    out = changes.pop("output", str(tmp_path / "e.json"))
    line = failure_line(ple_eval.run, eval_args([model_dir, second], data_file, out, **changes))
    assert re.search(message, line) and "\n" not in line, line


def test_eval_rescore_bad_files(tmp_path):
    cases = [("missing.json", None, "FileNotFoundError: .* No such file"),
             ("corrupt.json", '{"generations": ', "corrupt.json is not a JSON object: the file is damaged"),
             ("list.json", "[1, 2]", "list.json is not a JSON object"), ("empty_object.json", "{}", "need query texts")]
    paired = {"queries": ["q1", "q2"], "models": {m: {"answers": [["a"], ["b"]], "answer_tokens": [[1], [2]]}
                                                  for m in ("m1", "m2")}}
    for name, saved, message in [  # each edited by hand: one line that names what is wrong
            ("numbers.json", {**paired, "queries": [1, 2]}, "need query texts under 'queries'"),
            ("tokens.json", {**paired, "models": {**paired["models"], "m2": {"answers": [["a"], ["b"]],
                                                                             "answer_tokens": "12"}}},
             "saved generations of 'm2' do not pair up"),
            ("settings.json", {"settings": [], "generations": paired},
             "settings.json: its 'settings' are not an object")]:
        cases.append((name, json.dumps(saved), message))
    for name, text, message in cases:
        if text is not None:
            (tmp_path / name).write_text(text)
        rescore = ple_eval.EvalArgs(rescore=str(tmp_path / name), reward="ple_tests.rewards:length_reward")
        assert re.search(message, failure_line(ple_eval.run, rescore))
    with pytest.raises(ple.PLEError, match="--bootstrap: must be at least 1"):
        ple_eval.run(ple_eval.EvalArgs(rescore=str(tmp_path / "list.json"), bootstrap=0))


def test_eval_on_rows_that_were_all_trained_on(model_dir, data_file, principles_file, tmp_path):
    run_dir = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, run_dir, iterations=1, num_queries=0))
    with pytest.raises(ple.PLEError, match=r"every row .* was excluded as a training row .*\(8 rows\)"):
        ple_eval.run(eval_args([str(run_dir / "final"), model_dir], data_file, tmp_path / "e.json"))


def test_eval_failure_after_generating_loses_nothing(model_dir, other_model_dir, data_file, tmp_path, monkeypatch):
    cache, out = str(tmp_path / "cache"), tmp_path / "e.json"
    real_evaluate = ple_eval.evaluate

    def dies(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. Ctrl-C, or a judge that fails, after every model has generated

    monkeypatch.setattr(ple_eval, "evaluate", dies)
    with pytest.raises(KeyboardInterrupt):
        ple_eval.run(eval_args([model_dir, other_model_dir], data_file, out, cache=cache))
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and len(partial["generations"]["models"]) == 2
    monkeypatch.setattr(ple_eval, "evaluate", real_evaluate)
    rescored = ple_eval.run(ple_eval.EvalArgs(rescore=str(out), reward="ple_tests.rewards:length_reward", bootstrap=50))
    assert [m["answers"] for m in rescored["generations"]["models"].values()] == \
        [m["answers"] for m in partial["generations"]["models"].values()]
    assert set(rescored["win_rates"]) == {other_model_dir}
    # a rerun takes the generations from the cache: no model is loaded again
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("generations were not reused"))
    again = ple_eval.run(eval_args([model_dir, other_model_dir], data_file, out, cache=cache))
    assert [m["answers"] for m in again["generations"]["models"].values()] == \
        [m["answers"] for m in partial["generations"]["models"].values()]
    # other settings are other generations
    with pytest.raises(pytest.fail.Exception, match="generations were not reused"):
        ple_eval.run(eval_args([model_dir, other_model_dir], data_file, out, cache=cache, max_new_tokens=5))


def test_eval_cache_never_serves_generations_that_do_not_fit(tokenizer, model_dir, other_model_dir, data_file,
                                                             tmp_path, monkeypatch, capsys):
    import shutil

    b, cache, out = tmp_path / "b", tmp_path / "cache", tmp_path / "e.json"
    shutil.copytree(other_model_dir, b)
    loads, real_load = [], ple.load_policy
    monkeypatch.setattr(ple, "load_policy", lambda name, *a: loads.append(name) or real_load(name, *a))

    def evaluate():
        loads.clear()
        report = ple_eval.run(eval_args([model_dir, str(b)], data_file, out, cache=str(cache)))
        return report["generations"]["models"][str(b)]["answers"]
    first = evaluate()
    entry = next(p for p in cache.iterdir() if json.loads(p.read_text())["answers"] == first)
    good = entry.read_bytes()
    other = next(p for p in cache.iterdir() if p != entry)
    for damage in (b"\xff\xfe not UTF-8", b'{"answers": 3}', good.replace(b'"answers": [', b'"answers": [[], ', 1),
                   other.read_bytes()):  # unreadable, not eval.py's, another shape, another model's (renamed)
        entry.write_bytes(damage)
        assert evaluate() == first and loads == [str(b)]  # b generates again, the other model is reused
        assert "does not fit this evaluation; generating again" in capsys.readouterr().err
    # other weights of the same size, every file with its old modification time: still not the same model
    stats = {p: p.stat() for p in b.iterdir()}
    tiny_model(tokenizer, seed=5).save_pretrained(b)
    for path, stat in stats.items():
        assert path.stat().st_size == stat.st_size
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert evaluate() != first and loads == [str(b)]
    # another dtype: other answers and other log-probabilities, never the float32 ones relabelled
    loads.clear()
    ple_eval.run(eval_args([model_dir, str(b)], data_file, out, cache=str(cache), dtype="bfloat16"))
    assert loads == [model_dir, str(b)]


@pytest.mark.slow
def test_eval_llm_judge_and_command_line(model_dir, other_model_dir, data_file, tmp_path):
    out = tmp_path / "judged.json"
    result = subprocess.run([sys.executable, os.path.join(HERE, "eval.py"), "--models", model_dir, other_model_dir,
                             "--reward", "ple_tests.rewards:length_reward", "--judge", model_dir, "--dataset",
                             data_file,
                             "--max_new_tokens", "5", "--device", "cpu", "--output", str(out), "--bootstrap", "100"],
                            cwd=HERE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "| model | mean reward" in result.stdout and "Pairwise judge" in result.stdout
    judged = json.loads(out.read_text())["judge_win_rates"][other_model_dir]
    assert judged["wins"] + judged["ties"] + judged["losses"] == len(REVIEWS)


def test_kl_estimate_distinct_n_and_copying_by_hand():
    mean, stderr = ple_eval.kl_estimate([-1.0, -2.0, -3.0], [-2.0, -2.0, -2.0])  # differences 1, 0, -1
    assert mean == 0.0 and stderr == pytest.approx(1 / math.sqrt(3))
    answers = ["the cat sat", "The cat, ran far!", ""]
    assert ple_eval.distinct_n(answers, 1) == pytest.approx(5 / 7)  # the cat sat the cat ran far
    assert ple_eval.distinct_n(answers, 2) == pytest.approx(4 / 5)  # (the cat) twice among 5 bigrams
    assert ple_eval.distinct_n([""], 2) == 0.0
    principles = ["Continue the movie review below in a warm voice.", "Praise the acting."]
    copied = ["I will continue the Movie review, below now", "the movie review below in a warm", "a warm voice",
              "praise the acting"]
    # 5 consecutive words of one principle: the first two answers; the others are too short to copy 5
    assert ple_eval.copying_share(copied, principles) == pytest.approx(2 / 4)


def test_frontier_of_two_runs(model_dir, data_file, principles_file, tmp_path, capsys):
    frontier_py = experiment_script("frontier.py")  # experiments/frontier.py: eval.py's report over iter-N/
    sft = tmp_path / "sft"  # SFT on the same references again and again: each iteration moves further away
    experiment_script("baselines.py").train(baseline_args(model_dir, data_file, principles_file, sft, "sft",
                                                          iterations=3, num_queries=4, learning_rate=3e-2,
                                                          save_every=1))
    lora = tmp_path / "lora"
    ple.train(make_args(model_dir, data_file, principles_file, lora, iterations=2, num_queries=4, lora_r=4,
                      lora_alpha=8, save_every=1))
    assert sorted(os.listdir(sft)) == sorted(["args.json", "checkpoint-3", "final", "iter-1", "iter-2",
                                              "iter-3", "metrics.jsonl", "samples"])
    assert (lora / "iter-2" / "adapter_config.json").exists() and not (lora / "iter-2" / "trainer_state.pt").exists()
    out = tmp_path / "frontier.json"
    settings = ple_eval.EvalArgs(reward="ple_tests.rewards:length_reward", dataset=data_file,
                                 principles=principles_file,
                                 max_new_tokens=8, kl_samples=8, batch_size=16, device="cpu", dtype="float32",
                                 output=str(out), cache=str(tmp_path / "cache"), bootstrap=50)
    report = frontier_py.frontier([str(sft), str(lora)], settings)
    frontier = json.loads(out.read_text())["frontier"]
    assert frontier == report["frontier"] and (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    runs = frontier["runs"]
    assert [p["iteration"] for p in runs[str(sft)]] == [0, 1, 2, 3]
    assert [p["iteration"] for p in runs[str(lora)]] == [0, 1, 2]
    start = runs[str(sft)][0]
    assert start["model"] == model_dir
    assert start["kl"] == 0.0 and start["kl_stderr"] == 0.0  # the reference against itself: exactly 0
    kl = [p["kl"] for p in runs[str(sft)]]
    assert kl[3] > kl[1] + 4 * runs[str(sft)][3]["kl_stderr"] and kl[1] > 0
    assert all(0 <= p["distinct_2"] <= 1 and p["mean_answer_tokens"] > 0 for line in runs.values() for p in line)
    # the same frontier again comes from the cache: the KL needs no model either
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("cached generations were not reused"))
        assert frontier_py.frontier([str(sft), str(lora)], settings)["frontier"] == frontier
    (lora / "iter-1").rename(tmp_path / "iter-1-elsewhere")  # a saved iteration that is missing is named
    assert [n for _, n, _ in frontier_py.frontier_models(settings, [str(lora)])[1]] == [2]
    assert f"{lora} lacks iter-1/ (saved every 1)" in capsys.readouterr().err
    plain = tmp_path / "plain"  # a run trained without --save_every
    plain.mkdir()
    (plain / "args.json").write_text((sft / "args.json").read_text())
    with pytest.raises(ple.PLEError, match="plain holds no saved iterations .*--save_every"):
        frontier_py.frontier_models(settings, [str(sft), str(plain)])
    with pytest.raises(ple.PLEError, match="not a ple.py run folder"):
        frontier_py.frontier_models(settings, [model_dir])
    (plain / "args.json").write_text('{"seed": 0}')  # edited by hand: named, with what it lacks
    with pytest.raises(ple.PLEError, match=r"plain/args.json is not a JSON object with model, reward, dataset"):
        frontier_py.frontier_models(settings, [str(plain)])


def test_similarity_metrics_from_the_json_eval_py_wrote(model_dir, data_file, principles_file, tmp_path):
    similarity = experiment_script("similarity.py")  # experiments/similarity.py: BLEU and perplexity, moved there
    sft = tmp_path / "sft"  # SFT on the dataset's own continuations: closer to the references than the start
    experiment_script("baselines.py").train(baseline_args(model_dir, data_file, principles_file, sft, "sft",
                                                          iterations=4, num_queries=4, learning_rate=3e-3))
    out = tmp_path / "e.json"
    ple_eval.run(eval_args([str(sft / "final"), model_dir], data_file, out))
    table = similarity.similarity(str(out))
    perplexity = {name: row["perplexity"] for name, row in table.items()}
    assert perplexity[str(sft / "final")] < perplexity[model_dir] < 10**4


@pytest.mark.parametrize("script, work, line", [
    ("frontier.py", "frontier", "stopped by Ctrl-C: the generations of every model that finished are kept in eval.py's "
                                "cache"),
    ("similarity.py", "similarity", "stopped by Ctrl-C")])
def test_ctrl_c_in_an_experiment_script_ends_in_one_line(script, work, line, capsys, monkeypatch):
    module = experiment_script(script)

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, work, stopped)
    with pytest.raises(SystemExit) as stop:
        module.main(["runs/a"])
    assert stop.value.code == 130 and capsys.readouterr().err.strip().splitlines() == [line]


def test_hh_split_is_by_conversation_fixed_by_its_text_and_drops_unpaired_rows(tmp_path):
    hh = experiment_script("hh", "build_pair_reward.py")  # experiments/hh: the split half A trains on, half B judges
    prompts = [f"\n\nHuman: question {i}?\n\nAssistant:" for i in range(12)]
    rows = [{"chosen": p + " a kind answer", "rejected": p + " a rude answer"} for p in prompts]
    rows.append({"chosen": prompts[0] + " another kind one", "rejected": prompts[0] + " another rude one"})  # same talk
    rows.append({"chosen": prompts[1] + " fine", "rejected": prompts[2] + " not the same conversation"})
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    a, b = hh.split(str(path))
    assert len(a) + len(b) == 13 and a and b  # the row whose chosen and rejected prompts differ is dropped
    assert not {p for p, _, _ in a} & {p for p, _, _ in b}  # a conversation is in one half only
    path.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    assert sorted(hh.split(str(path))[0]) == sorted(a)  # fixed by the text, not by the file's order
    assert all(c == " a kind answer" or c == " another kind one" for _, c, _ in a + b)
    assert hh.by_length(a, True) + hh.by_length(a, False) == pytest.approx(1)


def test_hh_prompt_sets_are_short_disjoint_and_fixed_by_their_text(tmp_path, capsys):
    prompts = experiment_script("hh", "prompts.py")  # experiments/hh: training, held-out and evaluation prompts
    def rows(half, n):
        return [{"chosen": f"\n\nHuman: {half} question {i}{'?' * (i % 3) * 40}\n\nAssistant: yes",
                 "rejected": f"\n\nHuman: {half} question {i}{'?' * (i % 3) * 40}\n\nAssistant: no"} for i in range(n)]
    for half, n in (("A", 30), ("B", 12)):
        (tmp_path / f"{half}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(half, n)))
    prompts.main([str(tmp_path), "--max_chars", "60", "--train", "6", "--heldout", "4", "--eval", "3"])
    sets = {name: [ple.make_query("dialogue", r, None)[0] for r in ple.read_json(str(tmp_path / f"{name}.jsonl"),
                                                                                lines=True)]
            for name in ("A_train", "A_heldout", "B_eval")}
    assert [len(v) for v in sets.values()] == [6, 4, 3]
    assert all(len(p) <= 60 for v in sets.values() for p in v)  # the long prompts (i % 3 != 0) are left out
    assert not set(sets["A_train"]) & set(sets["A_heldout"]) and all(" B " in p for p in sets["B_eval"])
    (tmp_path / "A.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows("A", 30))))
    prompts.main([str(tmp_path), "--max_chars", "60", "--train", "6", "--heldout", "4", "--eval", "3"])
    assert [ple.make_query("dialogue", r, None)[0] for r in ple.read_json(str(tmp_path / "A_train.jsonl"),
                                                                          lines=True)] == sets["A_train"]
    with pytest.raises(SystemExit, match="A has 10 and B 4 prompts of at most 60 characters"):
        prompts.main([str(tmp_path), "--max_chars", "60", "--train", "8", "--heldout", "4", "--eval", "3"])


def test_kl_needs_the_same_tokenizer(model_dir, other_model_dir, data_file, tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["completely different words here"], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    path = str(tmp_path / "other_tokenizer")
    tiny_model(other).save_pretrained(path)
    other.save_pretrained(path)
    monkeypatch.setattr(ple, "load_policy", lambda *a, **k: pytest.fail("a model was loaded before the check"))
    with pytest.raises(ple.PLEError, match="different tokenizers: the KL between them is undefined"):
        ple_eval.run(eval_args([model_dir, other_model_dir], data_file, tmp_path / "e.json", reference=path))


def test_plot_training_curve(model_dir, data_file, principles_file, tmp_path):
    pytest.importorskip("matplotlib")
    run_dir = tmp_path / "run"
    ple.train(make_args(model_dir, data_file, principles_file, run_dir, iterations=2))
    import matplotlib.pyplot as plt
    plt.close("all")
    ple_eval.run(ple_eval.EvalArgs(plot=str(run_dir)))
    assert (run_dir / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    axes = plt.gcf().axes  # every curve on an axis of its own unit, and every axis says what it shows
    assert len(axes) == 3 and all(ax.get_xlabel() == "iteration" and ax.get_ylabel() for ax in axes[:2])
    assert {line.get_ydata()[0] for line in axes[2].lines} == {0.2}, "tau (reward units) has an axis of its own"
    assert "tau" in axes[2].get_ylabel() and "ranked" in axes[1].get_ylabel()
    assert all(ax.get_title() and ax.get_legend() for ax in axes[:2])  # each panel says what it shows, in itself
    assert "temperature 1" in axes[0].get_title() and "word_reward" in axes[0].get_ylabel()
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["share of pairs ranked (left axis)",
                                                                       "threshold tau (right axis)"]
    with pytest.raises(ple.PLEError, match="no metrics.jsonl"):
        ple_eval.run(ple_eval.EvalArgs(plot=str(tmp_path)))
    good = (run_dir / "metrics.jsonl").read_text()
    (run_dir / "eval.json").write_text(json.dumps({"settings": {}, "generations": {"queries": ["q"], "models": {
        "a": {"answers": [["x"]]}, "b": {"answers": [["y"]]}}}, "baselines": [], "models": {}}))  # judged by none
    with pytest.raises(ple.PLEError, match=r"run/eval.json holds no win rate: rerun eval.py with a --reward"):
        ple_eval.run(ple_eval.EvalArgs(plot=str(run_dir)))
    (run_dir / "eval.json").unlink()
    (run_dir / "metrics.jsonl").write_text(good.replace('"tau"', '"tao"', 1))  # a record without a key the plot draws
    with pytest.raises(ple.PLEError, match=r"metrics.jsonl, line 1, is not a JSON object with iteration, tau, "):
        ple_eval.run(ple_eval.EvalArgs(plot=str(run_dir)))


# ------------------------------------------------------------------------------------------------
# fast sampling: LoRA merged while sampling, compiled decoding
# ------------------------------------------------------------------------------------------------

def lora_model(tokenizer, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(tokenizer).to(dtype), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                       target_modules="all-linear"))
    with torch.no_grad():  # B starts at zero; a trained adapter does not
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.eval()


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.03)])
def test_lora_merged_for_sampling_is_the_same_model_and_gives_the_base_weights_back_bit_for_bit(tokenizer, dtype,
                                                                                                tolerance):
    model = lora_model(tokenizer, dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.tensor([tokenizer(r)["input_ids"][:8] for r in REVIEWS[:3]])
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        with model.disable_adapter():
            base = model(ids).logits.float()
        with ple.fast_sampling(model, merge_lora=True):
            merged = model(ids).logits.float()
            assert all(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
        assert (merged - unmerged).abs().max() < tolerance  # the adapters counted once, in the weights
        assert (base - unmerged).abs().max() > 10 * tolerance  # (and they matter)
        with pytest.raises(RuntimeError, match="stop"), ple.fast_sampling(model, merge_lora=True):
            raise RuntimeError("stop")  # an error while sampling gives the weights back too
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.merged for m in model.modules() if hasattr(m, "merged_adapters"))
    assert torch.equal(model(ids).logits.float(), unmerged)


def test_runs_with_lora_merged_while_sampling_repeat_and_resume_exactly(model_dir, data_file, principles_file,
                                                                        tmp_path):
    lora = dict(lora_r=4, lora_alpha=8, merge_lora="on")
    for name in ("a", "b"):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / name, **lora))
    ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "c", iterations=1, **lora))
    ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "c", resume=True, **lora))
    runs = {name: (read_jsonl(tmp_path / name / "samples" / "iter-001.jsonl"), state_of(str(tmp_path / name / "final")))
            for name in "abc"}
    for name in "bc":
        assert runs[name][0] == runs["a"][0]
        assert max_difference(runs[name][1], runs["a"][1]) == 0
    assert max_difference(runs["a"][1], state_of(model_dir)) > 0  # it trained
    with pytest.raises(ple.PLEError, match="--merge_lora: .* needs --lora_r above 0"):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "d", merge_lora="on"))


def test_static_cache_sampling_gives_the_dynamic_paths_tokens_under_greedy_decoding(tokenizer):
    prompts = [tokenizer(r)["input_ids"][:k] for r, k in zip(REVIEWS, (3, 9, 5, 12, 7))]  # widths 3 to 12
    greedy = dict(max_new_tokens=8, temperature=1.0, top_p=1e-9)  # top-p this small keeps the likeliest token alone
    for model in (tiny_model(tokenizer), lora_model(tokenizer)):
        torch.manual_seed(0)
        dynamic = ple.generate_answers(model, tokenizer, prompts, **greedy)
        with ple.fast_sampling(model, merge_lora=hasattr(model, "peft_config")):  # (LoRA: merged, as on CUDA)
            static = ple.generate_answers(model, tokenizer, prompts, **greedy, shape=(8, 64))  # 3 padding rows
            ids, ids_p = ple.sample_pairs(model, tokenizer, prompts, prompts, 2, 8, 1.0, 1e-9, static_cache=True)
            assert ids == ids_p == dynamic
        assert static == dynamic and len(set(map(tuple, dynamic))) > 1  # the same tokens, and not all alike


def test_runs_with_the_static_cache_train_resume_exactly_and_repeat(model_dir, data_file, principles_file, tmp_path):
    for name in ("a", "b"):
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / name, static_cache="on"))
    ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "c", iterations=1, static_cache="on"))
    ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "c", resume=True, static_cache="on"))
    runs = {name: (read_jsonl(tmp_path / name / "samples" / "iter-001.jsonl"), state_of(str(tmp_path / name / "final")))
            for name in "abc"}
    for name in "bc":
        assert runs[name][0] == runs["a"][0] and max_difference(runs[name][1], runs["a"][1]) == 0
    assert max_difference(runs["a"][1], state_of(model_dir)) > 0  # it trained


@pytest.mark.slow
def test_the_cuda_default_compiles_its_decoding_step_once_and_samples_the_uncompiled_tokens(
        model_dir, data_file, principles_file, tmp_path, monkeypatch):
    """What a GPU user runs by default, on the CPU: LoRA folded in for sampling, the static cache in one shape, and
    transformers' compiled decoding step. Under greedy decoding the tokens are the uncompiled path's; one compile a
    process, none again across generate calls, iterations, restored base weights or a resume; the resume is exact."""
    import transformers
    from torch._dynamo.utils import counters
    from transformers.generation.configuration_utils import CompileConfig

    settings = dict(iterations=2, lora_r=4, merge_lora="on", static_cache="on", top_p=1e-9)  # (top-p: greedy)
    ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "uncompiled", **settings))
    real_generate, real_answers, graphs = transformers.GenerationMixin.generate, ple.generate_answers, []

    def compiled_generate(self, *args, generation_config, **kwargs):
        generation_config.compile_config = CompileConfig()
        # transformers compiles only on CUDA and a few other devices; this private switch, the one its own tests
        # set, compiles on every device, so that the CUDA path runs here
        generation_config.compile_config._compile_all_devices = True
        return real_generate(self, *args, generation_config=generation_config, **kwargs)

    def counted(*args, **kwargs):  # the graphs compiled so far, after each generate call
        answers = real_answers(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return answers

    monkeypatch.setattr(transformers.GenerationMixin, "generate", compiled_generate)
    monkeypatch.setattr(ple, "generate_answers", counted)
    torch._dynamo.reset()
    counters.clear()
    try:
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "compiled", **settings))
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "resumed", **{**settings,
                                                                                               "iterations": 1}))
        ple.train(make_args(model_dir, data_file, principles_file, tmp_path / "resumed", **settings, resume=True))
    finally:
        torch._dynamo.reset()
    assert len(graphs) == 8 and set(graphs) == {1} and not counters["recompiles"]  # compiled in the first call only
    samples = {run: [read_jsonl(tmp_path / run / "samples" / f"iter-00{t}.jsonl") for t in (0, 1)]
               for run in ("uncompiled", "compiled", "resumed")}
    assert samples["compiled"] == samples["uncompiled"] and samples["resumed"] == samples["compiled"]
    assert len({s["answer"] for s in samples["compiled"][0]}) > 1  # (not one answer for every query)
    final = {run: state_of(str(tmp_path / run / "final")) for run in ("compiled", "resumed")}
    assert max_difference(final["compiled"], final["resumed"]) == 0


# ------------------------------------------------------------------------------------------------
# memory and several processes (accelerate launch); the multi-process tests launch 2 CPU processes
# each (marked multiprocess: deselect them with -m "not multiprocess")
# ------------------------------------------------------------------------------------------------

def fixed_pairs(tokenizer, n=4):
    eos = tokenizer.eos_token_id
    prompts = [tokenizer(r)["input_ids"] for r in REVIEWS[:n]]
    answers = [tokenizer(w)["input_ids"] + [eos] for w in (" good", " the acting was flat", " fine", " a farm")][:n]
    answers_p = [tokenizer(w)["input_ids"] + [eos] for w in (" lovely and warm", " bad", " great music", " ok")][:n]
    return prompts, answers, answers_p, [0.0, 0.5, -0.2, 1.0][:n], [1.0, 0.6, 0.9, 0.2][:n]


def one_step(model, pairs, mini_batch_size, max_grad_norm=1e6, **kwargs):
    prompts, answers, answers_p, r, r_p = pairs
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)  # SGD: a step is proportional to the gradient
    ple.ple_epoch(model, optimizer, prompts, answers, answers_p, torch.tensor(r), torch.tensor(r_p),
                  0.2, 1.0, pad_id=model.config.eos_token_id, mini_batch_size=mini_batch_size,
                  max_grad_norm=max_grad_norm, **kwargs)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_difference(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_gradient_accumulation_and_checkpointing_take_the_same_step(tokenizer, monkeypatch):
    pairs = fixed_pairs(tokenizer)
    whole = one_step(tiny_model(tokenizer), pairs, 4)
    assert max_difference(whole, one_step(tiny_model(tokenizer), pairs, 4, accumulation=2)) < 1e-6
    assert max_difference(whole, one_step(tiny_model(tokenizer), pairs, 4, accumulation=3)) < 1e-6  # 2 + 1 + 1
    assert max_difference(whole, one_step(tiny_model(tokenizer), pairs, 2)) > 1e-4  # two steps: not the same
    model = tiny_model(tokenizer)
    monkeypatch.setattr(ple, "load_policy", lambda *args: (model, None))  # --gradient_checkpointing, on this model
    ple.load_trainable(ple.Args(gradient_checkpointing=True, lora_r=0), "cpu", torch.float32)
    calls = []
    model.transformer.h[0].attn.register_forward_hook(lambda *a: calls.append(1))
    assert max_difference(whole, one_step(model, pairs, 4)) < 1e-6
    assert len(calls) == 2  # the block ran again in the backward pass: activations were recomputed, not kept
    assert not model.transformer.h[0].attn.training  # and dropout stayed off


def test_deepspeed_and_fsdp_that_accelerate_cannot_take_are_refused_in_one_line(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ple.PLEError, match="DeepSpeed is not supported by ple.py; shard with Accelerate's FSDP"):
        ple.start_accelerator(ple.Args(device="cpu"))
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch --use_fsdp` sets it
    with pytest.raises(ple.PLEError, match="Accelerate shards with FSDP on GPUs only, not on cpu"):
        ple.start_accelerator(ple.Args(device="cpu"))


def test_processes_must_divide_the_work():
    ple.check_processes(7, 3, 1)  # one process: anything goes
    ple.check_processes(6, 4, 2)
    for queries, mini_batch in ((6, 8), (7, 4), (6, 3)):
        with pytest.raises(ple.PLEError, match=rf"--mini_batch_size: {mini_batch} and the {queries} queries must both "
                                               r"divide across \d processes"):
            ple.check_processes(queries, mini_batch, 8 if queries == 6 and mini_batch == 8 else 2)


def accelerate_launch(*command, processes=2):
    import socket

    with socket.socket() as sock:  # a free port for the processes to meet on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "--main_process_port", str(port), *command], cwd=HERE, capture_output=True, text=True,
                          timeout=600)


def launch(mode, out, settings, processes=2):
    os.makedirs(out, exist_ok=True)
    result = accelerate_launch(os.path.join(HERE, "ple_tests", "worker.py"), mode, str(out), json.dumps(settings),
                               processes=processes)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = [os.path.join(out, f"weights-rank{r}.pt") for r in range(processes)]
    return [torch.load(path) for path in saved if os.path.exists(path)]


@pytest.mark.multiprocess
def test_multiprocess_step_equals_one_process_on_the_whole_mini_batch(tokenizer, model_dir, tmp_path):
    pytest.importorskip("accelerate")
    pairs = fixed_pairs(tokenizer)
    whole = one_step(AutoModelForCausalLM.from_pretrained(model_dir).eval(), pairs, 4)
    half = one_step(AutoModelForCausalLM.from_pretrained(model_dir).eval(), [p[:2] for p in pairs], 2)
    assert max_difference(whole, half) > 1e-3  # without the all-reduce, process 0 would take this step
    keys = ("prompts", "answers", "answers_p", "rewards", "rewards_p")
    settings = {"model": model_dir, "pad_id": tokenizer.eos_token_id, "max_grad_norm": 1e6, **dict(zip(keys, pairs))}
    rank0, rank1 = launch("step", tmp_path / "step", settings)
    assert max_difference(rank0, whole) < 1e-5 and max_difference(rank1, whole) < 1e-5


@pytest.mark.multiprocess
def test_multiprocess_sharded_step_equals_one_process_on_the_whole_mini_batch(tokenizer, model_dir, tmp_path):
    """Accelerate's FSDP2: each process holds half of every weight; the step, gradient clipping included, must
    be the one a single process takes on the whole mini-batch (a norm over one shard would clip less)."""
    pytest.importorskip("accelerate")
    pairs = fixed_pairs(tokenizer)
    clip = 0.05
    whole = one_step(AutoModelForCausalLM.from_pretrained(model_dir).eval(), pairs, 4, max_grad_norm=clip)
    assert max_difference(whole, one_step(AutoModelForCausalLM.from_pretrained(model_dir).eval(), pairs, 4)) > 1e-3
    keys = ("prompts", "answers", "answers_p", "rewards", "rewards_p")
    settings = {"model": model_dir, "pad_id": tokenizer.eos_token_id, "max_grad_norm": clip, "shard": True,
                **dict(zip(keys, pairs))}
    [rank0] = launch("step", tmp_path / "sharded", settings)  # the whole weights, gathered on process 0
    assert sorted(rank0) == sorted(whole) and max_difference(rank0, whole) < 1e-5


@pytest.mark.multiprocess
def test_multiprocess_run_covers_every_query_once_and_resumes_exactly(model_dir, data_file, principles_file,
                                                                       tmp_path):
    pytest.importorskip("accelerate")
    settings = dict(model=model_dir, reward="ple_tests.rewards:word_reward", dataset=data_file,
                    principles=principles_file,
                    num_queries=6, batch_size=4, mini_batch_size=2, max_new_tokens=6, learning_rate=1e-2,
                    lora_r=0, device="cpu", dtype="float32")
    straight = tmp_path / "straight"
    rank0, rank1 = launch("run", straight, {**settings, "output_dir": str(straight), "iterations": 2})
    queries, _, _ = ple.load_queries(data_file, "train", "sentiment", 6, 0)
    for t in range(2):
        assert [r["query"] for r in read_jsonl(straight / "samples" / f"iter-{t:03d}.jsonl")] == queries
    assert max_difference(rank0, rank1) == 0  # every process holds the same weights
    assert max_difference(rank0, state_of(str(straight / "final"))) == 0
    assert max_difference(rank0, state_of(model_dir)) > 0
    metrics = read_jsonl(straight / "metrics.jsonl")
    assert [m["iteration"] for m in metrics] == [0, 1]
    samples = read_jsonl(straight / "samples" / "iter-001.jsonl")
    assert metrics[1]["ranked_share"] == pytest.approx(sum(s["branch"] == "rank" for s in samples) / 6)
    assert metrics[1]["reward_original"] == pytest.approx(sum(s["reward"] for s in samples) / 6)

    resumed = tmp_path / "resumed"
    launch("run", resumed, {**settings, "output_dir": str(resumed), "iterations": 1})
    launch("run", resumed, {**settings, "output_dir": str(resumed), "iterations": 2, "resume": True})
    assert read_jsonl(resumed / "samples" / "iter-001.jsonl") == samples
    assert max_difference(state_of(str(resumed / "final")), rank0) == 0
    with pytest.raises(ple.PLEError, match="launched with 2 process"):  # one process cannot continue it
        ple.train(ple.Args(**{**settings, "output_dir": str(resumed), "iterations": 3, "resume": True}))


@pytest.mark.multiprocess
def test_multiprocess_lora_run_keeps_adapter_only_checkpoints_and_resumes_exactly(model_dir, data_file, principles_file,
                                                                                  tmp_path):
    """Under LoRA a checkpoint holds the adapter (peft's, through Accelerate's save_state hooks), AdamW's state and
    one random state per process; two processes resume from it to the bit."""
    settings = dict(model=model_dir, reward="ple_tests.rewards:word_reward", dataset=data_file,
                    principles=principles_file, num_queries=6, batch_size=4, mini_batch_size=2, max_new_tokens=6,
                    learning_rate=1e-2, lora_r=4, device="cpu", dtype="float32")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    launch("run", straight, {**settings, "output_dir": str(straight), "iterations": 2})
    launch("run", resumed, {**settings, "output_dir": str(resumed), "iterations": 1})
    assert sorted(os.listdir(resumed / "checkpoint-1")) == ["README.md", "adapter_config.json",
                                                            "adapter_model.safetensors", "optimizer.bin",
                                                            "random_states_0.pkl", "random_states_1.pkl"]
    launch("run", resumed, {**settings, "output_dir": str(resumed), "iterations": 2, "resume": True})
    assert read_jsonl(resumed / "samples" / "iter-001.jsonl") == read_jsonl(straight / "samples" / "iter-001.jsonl")
    assert max_difference(state_of(str(resumed / "final")), state_of(str(straight / "final"))) == 0
    (resumed / "checkpoint-2" / "random_states_1.pkl").unlink()  # what only process 1 reads: its line reaches you
    flags = [f"--{k}={v}" for k, v in settings.items()] + ["--output_dir", str(resumed), "--iterations=3", "--resume"]
    refused = accelerate_launch("ple.py", *flags)
    assert refused.returncode != 0 and re.search(r"(?m)^error: --resume: .*checkpoint-2 cannot be resumed: "
                                                 r"FileNotFoundError: .*random_states_1.pkl", refused.stderr)


@pytest.mark.multiprocess
def test_multiprocess_sharded_run_saves_the_whole_model_and_resumes_exactly(model_dir, data_file, principles_file,
                                                                            tmp_path):
    """A sharded run (Accelerate's FSDP2, with --gradient_checkpointing): every query once, checkpoints and
    final/ hold the whole model (gathered from the shards), and a resume (sharded AdamW state restored)
    continues exactly."""
    pytest.importorskip("accelerate")
    settings = dict(model=model_dir, reward="ple_tests.rewards:word_reward", dataset=data_file,
                    principles=principles_file,
                    num_queries=6, batch_size=4, mini_batch_size=2, max_new_tokens=6, learning_rate=1e-2,
                    lora_r=0, device="cpu", dtype="float32", shard=True, save_every=1, gradient_checkpointing=True)
    straight = tmp_path / "straight"
    launch("run", straight, {**settings, "output_dir": str(straight), "iterations": 2})
    queries, _, _ = ple.load_queries(data_file, "train", "sentiment", 6, 0)
    for t in range(2):
        assert [r["query"] for r in read_jsonl(straight / "samples" / f"iter-{t:03d}.jsonl")] == queries
    final = state_of(str(straight / "final"))
    assert sorted(final) == sorted(state_of(model_dir)) and max_difference(final, state_of(model_dir)) > 0
    assert max_difference(final, state_of(str(straight / "iter-1"))) > 0  # iter-1 is the model after one iteration
    resumed = tmp_path / "resumed"
    launch("run", resumed, {**settings, "output_dir": str(resumed), "iterations": 1})
    assert max_difference(state_of(str(resumed / "final")), state_of(str(straight / "iter-1"))) == 0
    launch("run", resumed, {**settings, "output_dir": str(resumed), "iterations": 2, "resume": True})
    assert read_jsonl(resumed / "samples" / "iter-001.jsonl") == read_jsonl(straight / "samples" / "iter-001.jsonl")
    assert max_difference(state_of(str(resumed / "final")), final) == 0


# ------------------------------------------------------------------------------------------------
# the README's Hub commands, as written, on stand-ins in a Hub cache (ple_tests/standins.py)
# ------------------------------------------------------------------------------------------------

def readme_hub_commands():
    """The README's commands that name a Hub model or dataset, continuation lines joined, comments cut."""
    from ple_tests import standins

    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in re.sub(r"\\\n\s*", " ", block).splitlines()]
    return [line for line in lines if any(name in line.split() for name in {**standins.MODELS, **standins.DATASETS})]


SHRINK = {"ple.py": ["--num_queries", "4", "--iterations", "1", "--max_new_tokens", "4", "--batch_size", "4",
                     "--mini_batch_size", "2"],
          "eval.py": ["--n", "2", "--max_new_tokens", "4", "--batch_size", "4", "--kl_samples", "1",
                      "--bootstrap", "50"]}


def snapshot(cache, name):
    from ple_tests import standins

    return os.path.join(cache["HF_HUB_CACHE"], "models--" + name.replace("/", "--"), "snapshots", standins.COMMIT)


@pytest.mark.slow
def test_the_readme_hub_commands_as_written_feed_each_model_its_own_way(tmp_path):
    """Every README command that names the Hub runs as written (sizes shrunk; the launcher of the many-GPU
    one replaced by one process) against a Hub cache of stand-ins, offline; each reward model's score is
    what its model card's usage computes on the same query and answer (to float32's agreement across
    thread counts: relative 1e-4; another way of reading x and y differs by more than 1e-2)."""
    import shlex

    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline
    from ple_tests import standins

    cache = standins.hub_cache(str(tmp_path / "cache"))
    commands = readme_hub_commands()
    assert len(commands) == 5 and sum("eval.py" in c for c in commands) == 2
    work = tmp_path / "work"
    work.mkdir()
    outputs = []
    for command in commands:
        words = shlex.split(command)
        script = next(w for w in words if w in SHRINK)
        words = [sys.executable, os.path.join(HERE, script)] + words[words.index(script) + 1:]
        if "--rescore" not in words:
            words += SHRINK[script]
        started = time.time()
        result = subprocess.run(words, cwd=work, env={**os.environ, **cache}, capture_output=True, text=True,
                                timeout=600)
        print(f"{time.time() - started:.0f} s: {command}")
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        outputs.append(result.stdout)

    def card(name):
        path = snapshot(cache, name)
        return AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path).eval()

    # lvwerra/distilbert-imdb, as TRL's sentiment pipeline reads it: the POSITIVE logit of the text
    runs = {name: json.loads((work / "runs" / name / "args.json").read_text()) for name in ("gpt2_imdb", "hh")}
    assert runs["gpt2_imdb"]["reward_input"] == "text" and runs["hh"]["reward_input"] == "pair"
    sentiment = pipeline("text-classification", model=snapshot(cache, "lvwerra/distilbert-imdb"))
    for row in read_jsonl(work / "runs" / "gpt2_imdb" / "samples" / "iter-000.jsonl"):
        scores = sentiment(ple.join_text(row["query"], row["answer"]), top_k=None, function_to_apply="none")
        positive = next(s["score"] for s in scores if s["label"] == "POSITIVE")
        assert row["reward"] == pytest.approx(positive, rel=1e-4, abs=1e-4)
    # OpenAssistant's DeBERTa, as its card reads it: tokenizer(question, answer), one logit
    tokenizer, model = card("OpenAssistant/reward-model-deberta-v3-large-v2")
    rows = read_jsonl(work / "runs" / "hh" / "samples" / "iter-000.jsonl")
    for row in rows:
        with torch.no_grad():
            logit = model(**tokenizer(row["query"], row["answer"], return_tensors="pt")).logits[0, 0].item()
            joined = model(**tokenizer(ple.join_text(row["query"], row["answer"]), return_tensors="pt")).logits[0, 0]
        assert row["reward"] == pytest.approx(logit, rel=1e-4, abs=1e-4) and abs(joined.item() - logit) > 1e-2
    # a chat reward model, as its card reads it: the conversation and the answer in its own chat template
    assert "reads the conversation x and the answer y in its own chat template" in outputs[-1]
    rescored = json.loads((work / "runs" / "hh" / "eval-rescored.json").read_text())["generations"]
    tokenizer, model = card("Skywork/Skywork-Reward-Llama-3.1-8B-v0.2")
    for entry in rescored["models"].values():
        for query, answers, scores in zip(rescored["queries"], entry["answers"], entry["rewards"]):
            conv = ple.conversation(query) + [{"role": "assistant", "content": answers[0].strip()}]
            with torch.no_grad():
                ids = tokenizer.apply_chat_template(conv, tokenize=True, return_tensors="pt", return_dict=True)
                assert scores[0] == pytest.approx(model(**ids).logits[0, 0].item(), rel=1e-4, abs=1e-4)
    # on HH a chat policy is given the conversation's turns, a base policy the transcript as it is
    query = ple.make_query("dialogue", standins.HH[0], None)[0]
    chat = AutoTokenizer.from_pretrained(snapshot(cache, "meta-llama/Meta-Llama-3-8B-Instruct"))
    rendered = chat.decode(ple.encode_prompts(chat, [query], [PRINCIPLE])[0])
    assert rendered == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHow do I get a wine stain out "
                        "of a carpet?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlot it, then use cold "
                        "water and a little dish soap.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                        f"{PRINCIPLE}\n\nAnd if it has dried?<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
                        "\n\n")
    base = AutoTokenizer.from_pretrained(snapshot(cache, "gpt2"))
    assert base.decode(ple.encode_prompts(base, [query])[0]) == query
