"""RULER-style retrieval and QA tasks, built offline from ``../shared/data/ruler``.

Five variants, after RULER (Hsieh et al., 2024; NVIDIA's ``niah.py`` and ``qa.py``), all with the
Paul Graham essays as haystack except ``qa_squad``:

- ``niah_single``: one needle "One of the special magic numbers for {key} is: {value}.";
- ``niah_multikey``: four needles with different keys, the question asks for one of them;
- ``niah_multivalue``: four values for the same key, the question asks for all of them;
- ``niah_multiquery``: four keys, the question asks for all four;
- ``qa_squad``: a SQuAD v2.0 question, its golden paragraph among distractor paragraphs from
  other SQuAD articles;
- ``variable_tracking``: one chain "VAR A = 12345. VAR B = VAR A. ..." of five 5-letter variable
  names spread through the haystack; the question asks for every variable holding the value.

Keys are "adjective-noun" pairs from the wonderwords lists and values 7-digit numbers, both drawn
from a ``random.Random`` seeded per sample, so a prompt depends only on (tokenizer, variant,
length, seed). Needles go in at sentence boundaries (a regex splitter stands in for NLTK's
``sent_tokenize``) at depths drawn from RULER's 40 evenly spaced depths (variable tracking
uses the essays as noise where RULER repeats one filler sentence). Prompts are raw text
(no chat template) ending with an answer prefix, except ``qa_squad``, which goes through the
tokenizer's chat template when it has one: SmolLM2-135M-Instruct answered none of 14 raw QA
prompts (400-2048 tokens, three wordings; mostly an immediate end-of-turn) but 3 of 5 in its chat
format at 1024 tokens. Prompts are grown word by word to the largest size that fits the requested
number of tokens.

Scoring: the output and the expected answers are normalized (lower case, punctuation to spaces,
articles dropped, whitespace collapsed) and an answer counts when it appears in the output as
whole words. ``niah_*`` scores the fraction of expected answers found (RULER's "all" match; 0 or 1
for the single-answer variants; ``variable_tracking`` likewise over its five names),
``qa_squad`` scores 1 when any gold answer is found ("part").
"""

from __future__ import annotations

import json
import logging
import random
import re
import string
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

log = logging.getLogger(__name__)

VARIANTS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "qa_squad", "variable_tracking")
# 7-digit values are 8 tokens each in SmolLM2 (one per digit), so four of them need ~40 tokens.
MAX_NEW_TOKENS = {"niah_single": 16, "niah_multikey": 16, "niah_multivalue": 48, "niah_multiquery": 48, "qa_squad": 32,
                  "variable_tracking": 30}
VT_HOPS = 4  # RULER's default: one chain of 5 variables (value, then 4 assignments)
# (keys in the haystack, values per key, keys asked for) per niah variant, RULER's defaults.
SHAPES = {"niah_single": (1, 1, 1), "niah_multikey": (4, 1, 1), "niah_multivalue": (1, 4, 1), "niah_multiquery": (4, 1, 4)}
DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.round(np.linspace(0, 100, 40))

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_ONE = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What is the special magic number for {query} mentioned in the provided text? "
    "The special magic number for {query} mentioned in the provided text is"
)
NIAH_ALL = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards.\n{context}\n"
    "What are all the special magic numbers for {query} mentioned in the provided text? "
    "The special magic numbers for {query} mentioned in the provided text are"
)
QA = (
    "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\n"
    "The following are given documents.\n\n{context}\n\n"
    "Answer the question based on the given documents. Only give me the answer and do not output any other words.\n\n"
    "Question: {query}"
)
QA_RAW_PREFIX = " Answer:"
VT = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
    "Question: Find all variables that are assigned the value {query} in the text above. "
    "Answer: According to the chain(s) of variable assignment in the text above, {n} variables are assigned "
    "the value {query}, they are:"
)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


@dataclass
class RulerSample:
    """One prompt: token ids, the expected answers, the question's key(s) (or the SQuAD question),
    the depth of the first answer's needle and of every needle (fractions of the haystack; for
    ``qa_squad`` the golden paragraph's position among the documents) and the prompt text."""

    variant: str
    ids: list[int]
    answers: list[str]
    query: str
    depth: float
    needle_depths: list[float] = field(default_factory=list)
    text: str = field(default="", repr=False)
    chat_template: bool = False


def sample_seed(seed: int, variant: str, length: int, index: int) -> str:
    """Seed of one sample (a string: ``random.Random`` hashes it the same way in every process)."""
    return f"ruler:{seed}:{variant}:{length}:{index}"


@lru_cache(maxsize=1)
def _essay_words() -> tuple[str, ...]:
    """The essay haystack split on whitespace (~525k words)."""
    from icecache_ray.haystack import load_essays

    return tuple(load_essays().split())


@lru_cache(maxsize=2)
def _wordlist(name: str) -> tuple[str, ...]:
    """Lower-case alphabetic words of ``ruler/wonderwords/{name}list.txt``."""
    from icecache_ray.haystack import data_dir

    path = data_dir() / "ruler" / "wonderwords" / f"{name}list.txt"
    return tuple(w for w in path.read_text(encoding="utf-8").split() if re.fullmatch(r"[a-z]+", w))


@lru_cache(maxsize=1)
def _squad() -> tuple[list[list[str]], list[tuple[int, int, str, tuple[str, ...]]]]:
    """SQuAD v2.0 dev: paragraphs per article and answerable questions (article, paragraph, question, answers)."""
    from icecache_ray.haystack import data_dir

    data = json.loads((data_dir() / "ruler" / "squad.json").read_text(encoding="utf-8"))["data"]
    articles, questions = [], []
    for a, article in enumerate(data):
        articles.append([p["context"] for p in article["paragraphs"]])
        for p, paragraph in enumerate(article["paragraphs"]):
            for qa in paragraph["qas"]:
                answers = tuple(dict.fromkeys(x["text"] for x in qa["answers"]))
                if answers and not qa.get("is_impossible", False):
                    questions.append((a, p, qa["question"], answers))
    return articles, questions


def _fit(tokenizer, n_tokens: int, make_text: Callable[[int], str], most: int) -> tuple[list[int], str]:
    """(ids, text) of ``make_text(n)`` for the largest ``n <= most`` whose prompt has at most ``n_tokens`` tokens."""
    text = make_text(0)
    best = (tokenizer(text)["input_ids"], text)
    if len(best[0]) > n_tokens:
        raise ValueError(f"n_tokens={n_tokens}: the prompt without any haystack already has {len(best[0])} tokens")
    lo, hi = 0, most
    while lo < hi:  # invariant: make_text(lo) fits
        mid = (lo + hi + 1) // 2
        text = make_text(mid)
        ids = tokenizer(text)["input_ids"]
        if len(ids) <= n_tokens:
            lo, best = mid, (ids, text)
        else:
            hi = mid - 1
    return best


def _sentence_start(words: tuple[str, ...], index: int) -> int:
    """The first word at or after ``index`` that starts a sentence (``index`` if none within 200 words)."""
    for i in range(max(index, 1), min(index + 200, len(words))):
        if words[i - 1][-1] in ".!?":
            return i
    return index


def _join_keys(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah(tokenizer, variant: str, n_tokens: int, rng: random.Random) -> RulerSample:
    n_keys, n_values, n_queries = SHAPES[variant]
    adjectives, nouns = _wordlist("adjective"), _wordlist("noun")
    keys: list[str] = []
    while len(keys) < n_keys:
        key = f"{rng.choice(adjectives)}-{rng.choice(nouns)}"
        if key not in keys:
            keys.append(key)
    values = {k: rng.sample(range(1_000_000, 10_000_000), n_values) for k in keys}
    needles = [(k, v) for k in keys for v in values[k]]
    rng.shuffle(needles)
    depths = sorted(d / 100 for d in rng.sample(DEPTHS, len(needles)))
    queries = rng.sample(keys, n_queries)
    answers = [str(v) for q in queries for v in values[q]]
    words = _essay_words()
    start = _sentence_start(words, rng.randrange(len(words) // 2))

    def make_text(n_words: int) -> str:
        sentences = _SENTENCE_END.split(" ".join(words[start : start + n_words])) if n_words else []
        cuts = [int(len(sentences) * d) for d in depths]
        pieces, prev = [], 0
        for cut, (key, value) in zip(cuts, needles):
            pieces += sentences[prev:cut] + [NEEDLE.format(key=key, value=value)]
            prev = cut
        pieces += sentences[prev:]
        template = NIAH_ONE if len(answers) == 1 else NIAH_ALL
        return template.format(context=" ".join(pieces), query=_join_keys(queries))

    ids, text = _fit(tokenizer, n_tokens, make_text, min(2 * n_tokens, len(words) - start))
    first = next(d for d, (k, v) in zip(depths, needles) if str(v) == answers[0])
    return RulerSample(variant, ids, answers, _join_keys(queries), first, depths, text)


def _qa(tokenizer, n_tokens: int, rng: random.Random) -> RulerSample:
    articles, questions = _squad()
    a, p, question, answers = rng.choice(questions)
    gold = articles[a][p]
    pool = [text for i, paragraphs in enumerate(articles) if i != a for text in paragraphs]
    rng.shuffle(pool)
    depth = rng.choice(DEPTHS) / 100

    def make_text(n_words: int) -> str:
        docs, left = [], n_words
        for text in pool:
            if left <= 0:
                break
            words = text.split()
            docs.append(" ".join(words[:left]))
            left -= len(words)
        docs.insert(round(depth * len(docs)), gold)
        context = "\n\n".join(f"Document {i + 1}:\n{doc}" for i, doc in enumerate(docs))
        prompt = QA.format(context=context, query=question)
        if chat:
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return prompt + QA_RAW_PREFIX

    chat = bool(getattr(tokenizer, "chat_template", None))
    ids, text = _fit(tokenizer, n_tokens, make_text, min(2 * n_tokens, sum(len(t.split()) for t in pool)))
    return RulerSample("qa_squad", ids, list(answers), question, depth, [depth], text, chat)


def _vt(tokenizer, n_tokens: int, rng: random.Random) -> RulerSample:
    names: list[str] = []
    while len(names) < VT_HOPS + 1:
        name = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randrange(10_000, 100_000))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
    depths = sorted(d / 100 for d in rng.sample(DEPTHS, len(chain)))
    words = _essay_words()
    start = _sentence_start(words, rng.randrange(len(words) // 2))

    def make_text(n_words: int) -> str:
        sentences = _SENTENCE_END.split(" ".join(words[start : start + n_words])) if n_words else []
        pieces, prev = [], 0
        for cut, statement in zip((int(len(sentences) * d) for d in depths), chain):  # in chain order
            pieces += sentences[prev:cut] + [statement]
            prev = cut
        pieces += sentences[prev:]
        return VT.format(context=" ".join(pieces), query=value, n=len(names))

    ids, text = _fit(tokenizer, n_tokens, make_text, min(2 * n_tokens, len(words) - start))
    return RulerSample("variable_tracking", ids, names, value, depths[0], depths, text)


def build_sample(tokenizer, variant: str, n_tokens: int, seed: int | str) -> RulerSample:
    """A ``variant`` prompt of at most (and about) ``n_tokens`` tokens, deterministic in ``seed``."""
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}: must be one of {list(VARIANTS)}")
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens!r}: must be a positive int")
    rng = random.Random(seed)
    if variant == "qa_squad":
        sample = _qa(tokenizer, n_tokens, rng)
    elif variant == "variable_tracking":
        sample = _vt(tokenizer, n_tokens, rng)
    else:
        sample = _niah(tokenizer, variant, n_tokens, rng)
    log.debug("ruler %s: %d tokens (asked %d), answers %s", variant, len(sample.ids), n_tokens, sample.answers)
    return sample


def normalize(text: str) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed."""
    return " ".join(_ARTICLES.sub(" ", _PUNCT.sub(" ", text.lower())).split())


def _found(answer: str, output: str) -> bool:
    norm = normalize(answer)
    if not norm:  # an answer made only of articles or punctuation: plain substring
        return answer.strip().lower() in output.lower()
    return f" {norm} " in f" {normalize(output)} "


def score_all(output: str, answers: list[str]) -> float:
    """Fraction of ``answers`` found in ``output`` (RULER's string_match_all)."""
    return sum(_found(a, output) for a in answers) / len(answers) if answers else 0.0


def score_part(output: str, answers: list[str]) -> float:
    """1.0 when any of ``answers`` is found in ``output`` (RULER's string_match_part)."""
    return float(any(_found(a, output) for a in answers))


def score(variant: str, output: str, answers: list[str]) -> float:
    """The variant's metric, in [0, 1]."""
    return score_part(output, answers) if variant == "qa_squad" else score_all(output, answers)
