"""RULER-style task of the accuracy harness: prompts, scoring, CLI checks, and an end-to-end run
on a tiny random Llama (no real model; the data comes from ``../shared/data/ruler``)."""

import re
import zlib

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from icecache_ray.eval import ruler

VOCAB = 96


class WordTokenizer:
    """A deterministic stand-in for a BPE tokenizer: one id per word or punctuation mark."""

    eos_token_id = None

    def __call__(self, text):
        return {"input_ids": [zlib.crc32(t.encode()) % VOCAB for t in re.findall(r"\w+|[^\w\s]", text)]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"w{i}" for i in ids)


@pytest.mark.parametrize("variant", ruler.VARIANTS)
@pytest.mark.parametrize("length", [300, 1500])
def test_prompt_is_deterministic_and_fills_the_length(variant, length):
    tok = WordTokenizer()
    a = ruler.build_sample(tok, variant, length, ruler.sample_seed(0, variant, length, 0))
    b = ruler.build_sample(tok, variant, length, ruler.sample_seed(0, variant, length, 0))
    c = ruler.build_sample(tok, variant, length, ruler.sample_seed(1, variant, length, 0))
    assert a == b and a.ids != c.ids
    assert length - 8 <= len(a.ids) <= length  # grown word by word up to the length, never past it
    assert a.answers and 0.0 <= a.depth <= 1.0 and all(0.0 <= d <= 1.0 for d in a.needle_depths)


@pytest.mark.parametrize("variant", [v for v in ruler.VARIANTS if v.startswith("niah")])
def test_needles_and_question_are_in_the_prompt(variant):
    tok = WordTokenizer()
    sample = ruler.build_sample(tok, variant, 800, "needles")
    text = sample.text
    assert tok(text)["input_ids"] == sample.ids
    keys, values, queries = ruler.SHAPES[variant]
    needles = re.findall(r"One of the special magic numbers for ([\w-]+) is: (\d{7})\.", text)
    assert len(needles) == keys * values and len({k for k, _ in needles}) == keys
    assert sorted(sample.answers) == sorted(v for k, v in needles if k in sample.query.replace(",", " ").split())
    assert len(sample.answers) == values * queries
    assert text.endswith(f"for {sample.query} mentioned in the provided text {'is' if len(sample.answers) == 1 else 'are'}")


def test_variable_tracking_prompt_holds_the_chain_in_order():
    tok = WordTokenizer()
    sample = ruler.build_sample(tok, "variable_tracking", 800, "chain")
    text = sample.text
    assert tok(text)["input_ids"] == sample.ids
    names = sample.answers
    assert len(names) == ruler.VT_HOPS + 1 and len(set(names)) == len(names)
    statements = re.findall(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.", text)
    assert statements[0] == (names[0], sample.query)  # the value first, then each hop from the one before
    assert statements[1:] == [(b, f"VAR {a}") for a, b in zip(names, names[1:])]
    assert text.endswith(f"{len(names)} variables are assigned the value {sample.query}, they are:")
    assert ruler.score("variable_tracking", " ".join(names).lower(), names) == 1.0
    assert ruler.score("variable_tracking", names[0], names) == pytest.approx(1 / len(names))


def test_qa_prompt_holds_the_golden_paragraph_and_question():
    tok = WordTokenizer()
    sample = ruler.build_sample(tok, "qa_squad", 1200, 3)
    text = sample.text
    assert tok(text)["input_ids"] == sample.ids
    assert text.endswith(f"Question: {sample.query} Answer:")
    assert any(a in text for a in sample.answers)
    assert text.count("Document ") >= 3 and "Document 1:\n" in text


class ChatTokenizer(WordTokenizer):
    chat_template = "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        assert not tokenize and add_generation_prompt and messages[0]["role"] == "user"
        return f"USER {messages[0]['content']} ASSISTANT"


def test_qa_uses_the_chat_template_when_the_tokenizer_has_one():
    sample = ruler.build_sample(ChatTokenizer(), "qa_squad", 600, 3)
    assert sample.chat_template and sample.text.startswith("USER Answer the question")
    assert sample.text.endswith(f"Question: {sample.query} ASSISTANT") and 590 <= len(sample.ids) <= 600
    raw = ruler.build_sample(WordTokenizer(), "qa_squad", 600, 3)
    assert not raw.chat_template and raw.query == sample.query and raw.answers == sample.answers


def test_bad_variant_or_length_is_rejected():
    with pytest.raises(ValueError, match="niah_nope"):
        ruler.build_sample(WordTokenizer(), "niah_nope", 500, 0)
    with pytest.raises(ValueError, match="without any haystack"):
        ruler.build_sample(WordTokenizer(), "niah_single", 20, 0)


def test_normalize():
    assert ruler.normalize("  The  U.S. Army's, an  answer!") == "u s army s answer"


@pytest.mark.parametrize(
    "variant,output,answers,expected",
    [
        ("niah_single", " 1234567.", ["1234567"], 1.0),
        ("niah_single", " 12345678", ["1234567"], 0.0),  # whole numbers only
        ("niah_single", " 7654321", ["1234567"], 0.0),
        ("niah_multikey", "is: 1234567 and 7654321", ["7654321"], 1.0),
        ("niah_multivalue", " 1111111, 2222222, and 3333333.", ["1111111", "2222222", "3333333", "4444444"], 0.75),
        ("niah_multiquery", "2222222", ["1111111", "2222222", "3333333", "4444444"], 0.25),
        ("niah_multiquery", "", ["1111111", "2222222"], 0.0),
        ("qa_squad", " the Winter film capital of the world.", ["Winter Film Capital of the World", "film capital"], 1.0),
        ("qa_squad", " GALILEO", ["Galileo"], 1.0),
        ("qa_squad", " the United States", ["U.S.", "United States of America"], 0.0),
        ("qa_squad", " Paris, France", ["Lyon", "france"], 1.0),  # any gold answer counts (part match)
        ("qa_squad", " Francesca", ["France"], 0.0),
    ],
)
def test_scores(variant, output, answers, expected):
    assert ruler.score(variant, output, answers) == pytest.approx(expected)


def test_cli_rejects_bad_variants_before_loading_a_model(tmp_path):
    from icecache_ray.eval.__main__ import main

    with pytest.raises(SystemExit, match="niah_bogus"):
        main(["ruler", "--variants", "niah_single,niah_bogus", "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--samples"):
        main(["ruler", "--samples", "0", "--json", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit, match="--layer-reuse"):
        main(["passkey", "--layer-reuse", "0", "--json", str(tmp_path / "r.json")])


def test_run_ruler_end_to_end_on_a_tiny_model():
    from icecache_ray.eval.__main__ import configs, markdown, summarize, summarize_by_variant
    from icecache_ray.eval.tasks import run_ruler

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)).eval()
    runs = configs(["icecache", "full"], [64])
    rows = run_ruler(model, WordTokenizer(), runs, [400], seed=0, variants=list(ruler.VARIANTS), samples=1)
    assert len(rows) == len(ruler.VARIANTS) * len(runs)
    for row in rows:
        assert {"task", "policy", "budget", "length", "prompt_tokens", "seed", "score", "variant", "depth",
                "answers", "generated"} <= set(row)
        assert row["task"] == "ruler" and row["length"] == 400 and row["prompt_tokens"] <= 400
        assert 0.0 <= row["score"] <= 1.0 and row["seed"] == 0
        assert row["decode"]["generated_tokens"] == ruler.MAX_NEW_TOKENS[row["variant"]]
    summary = summarize(rows)
    n = len(ruler.VARIANTS)
    assert {(s["policy"], s["budget"], s["n"]) for s in summary} == {("icecache", 64, n), ("full", None, n)}
    by_variant = summarize_by_variant(rows)
    assert len(by_variant) == len(rows) and {s["variant"] for s in by_variant} == set(ruler.VARIANTS)
    assert "| variant |" in markdown(summary, by_variant)


@pytest.mark.realmodel
def test_prompts_fill_the_length_with_the_real_tokenizer():
    """SmolLM2's BPE tokenizer: every variant lands within a few tokens of the requested length."""
    from transformers import AutoTokenizer

    from icecache_ray.model import ensure_local_model

    tok = AutoTokenizer.from_pretrained(ensure_local_model())
    for variant in ruler.VARIANTS:
        sample = ruler.build_sample(tok, variant, 1024, ruler.sample_seed(0, variant, 1024, 0))
        assert 1024 - 4 <= len(sample.ids) <= 1024, variant
        assert tok(sample.text)["input_ids"] == sample.ids
        assert all(a in sample.text for a in sample.answers)
        assert sample.chat_template == (variant == "qa_squad")
