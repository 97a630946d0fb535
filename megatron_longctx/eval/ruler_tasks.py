"""RULER-style synthetic tasks (Hsieh et al. 2024, NVIDIA/RULER) and HELMET's JSON KV retrieval:
definitions, sample generation fitted to a token budget, and scoring.

Our own implementation of the task definitions in RULER's `scripts/synthetic.yaml`, its
generators (`scripts/data/synthetic/*.py`), prompt templates and answer prefixes
(`constants.py`) and metrics (`scripts/eval/synthetic/constants.py`); the JSON KV task follows
HELMET's `load_json_kv` prompt (after lost-in-the-middle's kv_retrieval). Prompts are for base
models: the task template followed by its answer prefix, no chat wrapper (RULER's `base`).

Tasks (`TASKS`; RULER's 13 minus nothing, plus `json_kv`):

| task | haystack | needles / structure | answer | metric | new tokens |
|---|---|---|---|---|---|
| niah_single_1 | noise sentence repeated | word key -> 7-digit number | 1 | all | 128 |
| niah_single_2 | essay | word -> number | 1 | all | 128 |
| niah_single_3 | essay | word -> UUID | 1 | all | 128 |
| niah_multikey_1 | essay | 4 keys (1 queried, 3 distractors) | 1 | all | 128 |
| niah_multikey_2 | distractor needles | word -> number among needles | 1 | all | 128 |
| niah_multikey_3 | distractor needles | UUID -> UUID | 1 | all | 128 |
| niah_multivalue | essay | 1 key, 4 values | 4 | all | 128 |
| niah_multiquery | essay | 4 keys, all 4 queried | 4 | all | 128 |
| vt | noise | 1 chain of 4 hops (5 variables) + a ~500-token one-shot example | 5 | all | 30 |
| cwe | numbered word list | 10 words x30, others x3 (6/1 below 4K) + one-shot | 10 | all | 120 |
| fwe | coded words, Zipf alpha 2 | vocab = length // 50 | 3 | all | 50 |
| json_kv | JSON of UUID pairs (HELMET's count) | 2 demos, 1 queried key | 1 | sub-EM | 100 |
| qa_1 / qa_2 | SQuAD / HotpotQA documents | gold + distractor documents | any of | part | 32 |

Length: RULER's rule, `prompt tokens (BOS included) + new tokens <= length` under the model's
tokenizer. Each sample's size is one integer `units` (haystack words for essay, noise or
distractor lines, distinct words for cwe, total words for fwe, JSON pairs, documents for QA):
the largest fitting `units` is searched once per (task, length) on sample 0 by interpolation
(3-6 tokenizations of a full prompt; RULER HEAD bisects, ~17-25), and every sample starts from
it and shrinks only when its own random values tokenize longer. Prompts therefore sit within a
few units of the length (tests: within 5% at 2K and 8K with a small test tokenizer). json_kv
takes HELMET's fixed pair count for the length instead when it fits.

Randomness: each sample draws from `SeedSequence([seed, crc32(task), length, index])`, whatever
`units` it is built at, so a sample is reproducible alone (resume, TP ranks, reordering).
RULER's generators draw from one global stream (sample i depends on samples 0..i-1) and shuffle
word lists with the same fixed seed for every sample; ours shuffle per sample. QA follows
RULER's order exactly: question i of the file, gold documents where `random.Random(seed)`'s
shuffle puts them.

Every deliberate difference from RULER's and HELMET's code, with its expected effect on a
score, is listed in docs/evaluation.md ("Deliberate differences from RULER and HELMET").
"""

from __future__ import annotations

import json
import math
import random
import re
import string
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

# --------------------------------------------------------------------------------------------
# templates (RULER constants.py; the answer prefix is appended for base models)
# --------------------------------------------------------------------------------------------
NIAH_NEEDLE = "One of the special magic {kind} for {key} is: {value}."
NIAH_TEMPLATE_MANY = (
    "Some special magic {kind} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\nWhat are all the special magic "
    "{kind} for {query} mentioned in the provided text? The special magic {kind} for {query} "
    "mentioned in the provided text are")
#: RULER's singular rewrite (Some -> A, are -> is, kind without "s") when one value is asked.
NIAH_TEMPLATE_ONE = (
    "A special magic {kind} is hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kind} afterwards.\n{context}\nWhat is the special magic "
    "{kind} for {query} mentioned in the provided text? The special magic {kind} for {query} "
    "mentioned in the provided text is")
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.")
#: RULER's text (HEAD's, with the 2024 release's "assgined" typo fixed to "assigned").
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above. Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assigned the value {query}, they are: ")
CWE_TEMPLATE = (
    "Below is a numbered list of words. In these words, some appear more often than others. "
    "Memorize the ones that appear most often.\n{context}\nQuestion: What are the {num_cw} most "
    "common words in the above list? Answer: The top {num_cw} words that appear most often in "
    "the list are:")
FWE_TEMPLATE = (
    "Read the following coded text and track the frequency of each coded word. Find the three "
    "most frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. "
    "Please ignore the dots '....'. What are the three most frequently appeared words in the "
    "above coded text? Answer: According to the coded text above, the three most frequently "
    "appeared words are:")
QA_TEMPLATE = (
    "Answer the question based on the given documents. Only give me the answer and do not "
    "output any other words.\n\nThe following are given documents.\n\n{context}\n\nAnswer the "
    "question based on the given documents. Only give me the answer and do not output any other "
    "words.\n\nQuestion: {query} Answer:")
QA_DOCUMENT = "Document {i}:\n{document}"
#: HELMET's json_kv prompt (user template + "\n" + system template).
JSON_KV_TEMPLATE = ("{context}\n\nExtract the value corresponding to the specified key in the "
                    "JSON object below.\n\n{demos}Key: {query}\nCorresponding value:")
JSON_KV_DEMO = "Key: {key}\nCorresponding value: {value}"
#: HELMET's json_kv test files per length (data/json_kv/test_k{pairs}_dep6.jsonl): JSON pairs
#: per prompt, fixed whatever the tokenizer (HELMET sized them with LLaMA-2's).
HELMET_JSON_KV_PAIRS = {4096: 50, 8192: 105, 16384: 220, 32768: 440, 65536: 900, 131072: 1800}

#: Sentence shapes of the default essay haystack (`essay_words`): slots {a} adjective, {n}
#: noun, {v} verb (base form), filled from the wonderwords lists by a seeded stream.
ESSAY_SHAPES = (
    "The {a} {n} will {v} the {n} before the {a} {n} arrives.",
    "Nobody expected a {n} to {v} so close to the {n}.",
    "In the {a} season, every {n} learns to {v} with a {a} {n}.",
    "She said the {n} would never {v} without a {a} {n} nearby.",
    "If you {v} a {n} long enough, the {n} starts to look {a}.",
    "Most people who {v} the {n} forget about the {a} {n} behind it.",
    "There was a {a} {n} on the corner, and a {n} that liked to {v}.",
    "A {a} {n} is easier to {v} than a {a} {n}.",
    "We could {v} the {n}, but the {n} seemed too {a} for that.",
    "After the {n} left, the {a} {n} began to {v} again.",
    "Why would a {n} {v} when the {n} is already {a}?",
    "Years later, the {n} still remembered how to {v} the {a} {n}.",
    "Every {n} has a {a} side that only the {n} can {v}.",
    "He walked past the {a} {n} and decided to {v} the {n} instead.",
    "Sometimes the {n} and the {n} {v} together for a {a} while.",
    "It is strange how a {a} {n} can {v} a whole {n}.",
)
#: Words per generated block; block k is drawn from its own stream, so any prefix of the
#: haystack is the same whatever length asked for it.
ESSAY_BLOCK_WORDS = 20_000
ESSAY_SOURCE = ("generated essay (ruler_tasks.ESSAY_SHAPES over the wonderwords lists, "
                "seeded, non-repeating)")


# --------------------------------------------------------------------------------------------
# task definitions (RULER scripts/synthetic.yaml)
# --------------------------------------------------------------------------------------------
METRICS = ("string_match_all", "string_match_part", "substring_exact_match")


@dataclass(frozen=True)
class TaskSpec:
    """One task: generator kind, its parameters, metric and generation budget.

    Attributes:
        name: the task's RULER name (or json_kv).
        kind: niah | vt | cwe | fwe | json_kv | qa.
        params: the generator's settings (RULER's synthetic.yaml `args`).
        metric: string_match_all | string_match_part (RULER) | substring_exact_match
            (HELMET's json_kv).
        max_new_tokens: RULER's `tokens_to_generate` for the kind.
    """

    name: str
    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    metric: str = "string_match_all"
    max_new_tokens: int = 128


def _niah(name: str, haystack: str, k: str, v: str, nk: int = 1, nv: int = 1,
          nq: int = 1) -> TaskSpec:
    return TaskSpec(name, "niah", {"haystack": haystack, "key_type": k, "value_type": v,
                                   "num_keys": nk, "num_values": nv, "num_queries": nq})


TASKS: dict[str, TaskSpec] = {t.name: t for t in (
    _niah("niah_single_1", "noise", "words", "numbers"),
    _niah("niah_single_2", "essay", "words", "numbers"),
    _niah("niah_single_3", "essay", "words", "uuids"),
    _niah("niah_multikey_1", "essay", "words", "numbers", nk=4),
    _niah("niah_multikey_2", "needle", "words", "numbers"),
    _niah("niah_multikey_3", "needle", "uuids", "uuids"),
    _niah("niah_multivalue", "essay", "words", "numbers", nv=4),
    _niah("niah_multiquery", "essay", "words", "numbers", nq=4),
    TaskSpec("vt", "vt", {"num_chains": 1, "num_hops": 4, "icl_tokens": 500, "icl_name_len": 3,
                          "name_len": 5}, max_new_tokens=30),
    TaskSpec("cwe", "cwe", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}, max_new_tokens=120),
    TaskSpec("fwe", "fwe", {"alpha": 2.0, "coded_wordlen": 6}, max_new_tokens=50),
    TaskSpec("json_kv", "json_kv", {"shots": 2, "pairs": HELMET_JSON_KV_PAIRS},
             metric="substring_exact_match", max_new_tokens=100),
    TaskSpec("qa_1", "qa", {"dataset": "squad"}, metric="string_match_part", max_new_tokens=32),
    TaskSpec("qa_2", "qa", {"dataset": "hotpotqa"}, metric="string_match_part",
             max_new_tokens=32),
)}
SYNTHETIC_TASKS = tuple(n for n, t in TASKS.items() if t.kind != "qa")
QA_TASKS = ("qa_1", "qa_2")
#: The 13 tasks RULER averages for its headline score (json_kv is HELMET's, outside it).
RULER_TASKS = tuple(n for n in TASKS if n != "json_kv")
#: RULER's default lengths (run.sh SEQ_LENGTHS).
RULER_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)


# --------------------------------------------------------------------------------------------
# scoring (RULER scripts/eval/synthetic/constants.py and evaluate.py's postprocess_pred)
# --------------------------------------------------------------------------------------------
_CONTROL_RE = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(text: str) -> str:
    """RULER's post-processing: strip, control characters -> newline, strip again."""
    return _CONTROL_RE.sub("\n", text.strip()).strip()


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """100 x fraction of references that occur in the prediction (case-insensitive
    substrings): RULER's metric for niah, vt, cwe, fwe (and ours for json_kv)."""
    pred = prediction.lower()
    return 100.0 * sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """100 if any reference occurs in the prediction (case-insensitive), else 0: RULER's QA
    metric."""
    pred = prediction.lower()
    return 100.0 if any(r.lower() in pred for r in references) else 0.0


_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """HELMET's (SQuAD's) answer normalisation: lower case, punctuation removed, articles
    removed, whitespace runs collapsed to one space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def _first_answer_line(prediction: str, prefix: str = "corresponding value:") -> str:
    """HELMET's `parse_output`: the rest of the line after `prefix` (case-insensitive), else
    the first line."""
    for pattern in (re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", re.IGNORECASE),
                    re.compile(r"(?:^)(.*)(?:\n|$)")):
        match = pattern.search(prediction)
        if match is not None:
            line = match[1].strip()
            return re.sub(f"^{re.escape(prefix)}", "", line, flags=re.IGNORECASE).strip()
    return prediction


def substring_exact_match(prediction: str, references: Sequence[str]) -> float:
    """100 if a normalised reference is a substring of the normalised prediction or of its
    parsed answer line, else 0: HELMET's `substring_exact_match` for json_kv (the better of
    the raw and the parsed output, as its `post_process`)."""
    candidates = (normalize_answer(prediction),
                  normalize_answer(_first_answer_line(prediction)))
    return 100.0 if any(normalize_answer(r) in c for r in references
                        for c in candidates) else 0.0


def score_prediction(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score one sample (0-100) with the task's metric: RULER's metrics after RULER's
    post-processing, HELMET's on the raw output (it normalises instead)."""
    if not references:
        raise ValueError("a sample without reference answers")
    if metric == "substring_exact_match":
        return substring_exact_match(prediction, references)
    fn = string_match_all if metric == "string_match_all" else string_match_part
    return fn(postprocess_prediction(prediction), references)


# --------------------------------------------------------------------------------------------
# resources: word lists, essay, QA data
# --------------------------------------------------------------------------------------------
_WORD_OK = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def wonderwords_lists() -> dict[str, list[str]]:
    """Nouns, adjectives and verbs shipped with `wonderwords` (the word files RULER reads with
    wonderwords' private loader; here through its public `RandomWord.filter`, which returns
    the same words), entries with spaces or other characters dropped, sorted."""
    try:
        from wonderwords import RandomWord
    except ImportError as err:  # pragma: no cover (a declared dependency)
        raise ImportError("the RULER tasks need the `wonderwords` package "
                          "(pip install wonderwords)") from err
    words = RandomWord()
    out = {}
    for name, category in (("nouns", "nouns"), ("adjs", "adjectives"), ("verbs", "verbs")):
        out[name] = sorted({w for w in words.filter(include_categories=[category])
                            if _WORD_OK.fullmatch(w)})
    return out


def english_words() -> list[str]:
    """The `english-words` package's "web2" list (Webster's 2nd, public domain), lower case,
    letters only, sorted: ~234K words. cwe draws from it when a prompt needs more distinct
    words than the wonderwords lists hold (~8.7K; 128K tokens under LLaMA-3's tokenizer need
    ~11K), as RULER HEAD draws from its larger English word list there."""
    from english_words import get_english_words_set

    return sorted(get_english_words_set(["web2"], lower=True, alpha=True))


def generated_essay(adjs: Sequence[str], nouns: Sequence[str], verbs: Sequence[str],
                    block: int) -> list[str]:
    """Words of block `block` of the default essay haystack: sentences of `ESSAY_SHAPES`
    filled with random wonderwords words, from the block's own seeded stream. ~16 shapes x
    ~1.5K adjectives x ~6.8K nouns x ~1K verbs: no sentence pattern lines up with the same
    words twice, so, unlike a repeated text, no stretch of the haystack recurs at any length."""
    rng = np.random.default_rng([0x6573_7361, block])  # "essa"
    slots = {"a": adjs, "n": nouns, "v": verbs}
    out: list[str] = []
    while len(out) < ESSAY_BLOCK_WORDS:
        shape = ESSAY_SHAPES[int(rng.integers(len(ESSAY_SHAPES)))]
        words = []
        for token in shape.split():
            m = re.fullmatch(r"\{(\w)\}(\W*)", token)
            if m:
                pool = slots[m[1]]
                token = pool[int(rng.integers(len(pool)))] + m[2]
            words.append(token)
        out += words
    return out[:ESSAY_BLOCK_WORDS]


def read_squad(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """SQuAD v2-format JSON -> (questions, documents), as RULER's `read_squad`: every
    paragraph is a document; answerable questions keep their paragraph as gold and the other
    paragraphs of the same article as preferred distractors."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    docs = sorted({p["context"] for d in data["data"] for p in d["paragraphs"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = []
    for article in data["data"]:
        same = [index[p["context"]] for p in article["paragraphs"]]
        for p in article["paragraphs"]:
            gold = index[p["context"]]
            for qa in p["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                if qa.get("is_impossible") or not answers:
                    continue
                qas.append({"query": qa["question"], "outputs": answers, "context": [gold],
                            "more_context": [i for i in same if i != gold]})
    return qas, docs


def read_hotpotqa(path: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """HotpotQA-format JSON (a list of {question, answer, context: [[title, sentences]]})
    -> (questions, documents): "title\\nsentences" per document, all of a question's
    documents gold, as RULER's `read_hotpotqa`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))

    def doc(title: str, sentences: list[str]) -> str:
        return f"{title}\n{''.join(sentences)}"

    docs = sorted({doc(t, s) for d in data for t, s in d["context"]})
    index = {c: i for i, c in enumerate(docs)}
    qas = [{"query": d["question"], "outputs": [d["answer"]],
            "context": [index[doc(t, s)] for t, s in d["context"]], "more_context": []}
           for d in data]
    return qas, docs


@dataclass
class TaskResources:
    """What the generators read: word lists, essay words, QA data (loaded once per run).

    Attributes:
        adjs, nouns, verbs: the wonderwords lists (NIAH word keys are "adjective-noun":
            ~6.2M combinations).
        cwe_words: nouns + adjectives + verbs (RULER's cwe vocabulary).
        long_words: the larger English list cwe falls back to (`english_words`).
        essay_words: the essay haystack split on whitespace: a --haystack-file's text
            (repeated cyclically when a prompt needs more), or the generated essay (grown
            block by block, never repeated).
        essay_source: which haystack (results.md and the log name it).
        qa: dataset name -> (questions, documents).
    """

    adjs: list[str]
    nouns: list[str]
    cwe_words: list[str]
    essay_words: list[str]
    essay_source: str
    qa: dict[str, tuple[list[dict[str, Any]], list[str]]] = field(default_factory=dict)
    verbs: list[str] = field(default_factory=list)
    long_words: list[str] = field(default_factory=list)
    essay_generated: bool = False

    def cwe_extra_words(self) -> list[str]:
        """`long_words` minus the wonderwords ones (case-insensitively), computed once."""
        if not hasattr(self, "_cwe_extra"):
            have = {w.lower() for w in self.cwe_words}
            self._cwe_extra = [w for w in self.long_words if w not in have]
        return self._cwe_extra

    def essay(self, n_words: int) -> list[str]:
        """The haystack's first `n_words` words (generated blocks appended as needed; a
        haystack file repeats)."""
        words = self.essay_words
        if self.essay_generated:
            while len(words) < n_words:
                words += generated_essay(self.adjs, self.nouns, self.verbs,
                                         len(words) // ESSAY_BLOCK_WORDS)
            return words[:n_words]
        reps = -(-n_words // len(words))
        return (words * reps)[:n_words] if reps > 1 else words[:n_words]

    @classmethod
    def load(cls, haystack_file: str | None = None, squad_file: str | None = None,
             hotpotqa_file: str | None = None) -> TaskResources:
        lists = wonderwords_lists()
        if haystack_file:
            from megatron_longctx.eval.needle import load_haystack_texts

            words = "\n\n".join(load_haystack_texts(haystack_file)).split()
            source = f"--haystack-file {Path(haystack_file).resolve()}"
            if not words:
                raise ValueError(f"--haystack-file {haystack_file}: no text")
        else:
            words, source = [], ESSAY_SOURCE
        qa = {}
        for name, flag, path, reader in (("squad", "--squad-file", squad_file, read_squad),
                                         ("hotpotqa", "--hotpotqa-file", hotpotqa_file,
                                          read_hotpotqa)):
            if path:
                try:
                    qa[name] = reader(path)
                except (KeyError, TypeError, ValueError, IndexError) as err:
                    raise ValueError(f"{flag} {path}: not {name} format ({type(err).__name__}: "
                                     f"{err})") from None
        for name, (questions, _) in qa.items():
            if not questions:
                flag = "--squad-file" if name == "squad" else "--hotpotqa-file"
                raise ValueError(f"{flag}: no answerable questions found")
        cwe = sorted(set(lists["nouns"]) | set(lists["adjs"]) | set(lists["verbs"]))
        return cls(adjs=lists["adjs"], nouns=lists["nouns"], cwe_words=cwe, essay_words=words,
                   essay_source=source, qa=qa, verbs=lists["verbs"],
                   long_words=english_words(), essay_generated=not haystack_file)


# --------------------------------------------------------------------------------------------
# generators: (rng, units) -> (prompt text, answers, meta)
# --------------------------------------------------------------------------------------------
@dataclass
class Built:
    """A generated prompt before tokenization."""

    text: str
    answers: list[str]
    meta: dict[str, Any]


def _number(rng: np.random.Generator) -> str:
    return str(int(rng.integers(10**6, 10**7)))  # 7 digits, RULER's default


def _uuid(rng: np.random.Generator) -> str:
    return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))


def _key_word(rng: np.random.Generator, res: TaskResources) -> str:
    adj = res.adjs[int(rng.integers(len(res.adjs)))]
    return f"{adj}-{res.nouns[int(rng.integers(len(res.nouns)))]}"


def _random(kind: str, rng: np.random.Generator, res: TaskResources) -> str:
    if kind == "numbers":
        return _number(rng)
    if kind == "uuids":
        return _uuid(rng)
    return _key_word(rng, res)


def _distinct(kind: str, n: int, rng: np.random.Generator, res: TaskResources,
              avoid: set[str] | None = None) -> list[str]:
    avoid = set() if avoid is None else set(avoid)
    out: list[str] = []
    while len(out) < n:
        x = _random(kind, rng, res)
        if x not in avoid:
            avoid.add(x)
            out.append(x)
    return out


def _essay_text(res: TaskResources, n_words: int) -> str:
    return " ".join(res.essay(n_words))


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+")
_DEPTHS = [int(d) for d in np.round(np.linspace(0, 100, 40))]


def build_niah(spec: TaskSpec, rng: np.random.Generator, units: int,
               res: TaskResources) -> Built:
    """RULER niah.py: keys (num_keys = max(keys, queries)), values per key, needles
    "One of the special magic {values} for {key} is: {value}." shuffled and inserted into the
    haystack (essay: at distinct depths of RULER's 40-depth grid, between sentences; noise /
    needle: at distinct random lines); `units` = essay words or haystack lines."""
    p = spec.params
    nk, nv, nq = max(p["num_keys"], p["num_queries"]), p["num_values"], p["num_queries"]
    kind = p["value_type"]
    keys = _distinct(p["key_type"], nk, rng, res)
    values = [_distinct(kind, nv, rng, res) for _ in keys]
    needles = [NIAH_NEEDLE.format(kind=kind, key=k, value=v)
               for k, vs in zip(keys, values) for v in vs]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    if p["haystack"] == "essay":
        sents = _SENT_SPLIT.split(_essay_text(res, units).strip())
        if len(sents) == 1:  # no sentence end: every needle would go before the essay
            warnings.warn(f"essay haystack {res.essay_source}: no sentence ends; needles are "
                          "placed between words instead", stacklevel=2)
            sents = _essay_text(res, units).split()
        depths = sorted(int(d) for d in rng.choice(_DEPTHS, size=len(needles), replace=False))
        cuts = [0] + [int(len(sents) * d / 100) for d in depths] + [len(sents)]
        parts: list[str] = []
        for i in range(1, len(cuts)):
            chunk = " ".join(sents[cuts[i - 1]:cuts[i]])
            if chunk:
                parts.append(chunk)
            if i - 1 < len(needles):
                parts.append(needles[i - 1])
        context = " ".join(parts)
        distractors = 0
    else:
        if units < len(needles):
            raise ValueError("haystack smaller than the needles")
        if p["haystack"] == "noise":
            lines = [NOISE] * units
        else:  # distractor needles with keys different from every real key
            fake_keys = _distinct(p["key_type"], units, rng, res, avoid=set(keys))
            lines = [NIAH_NEEDLE.format(kind=kind, key=k, value=_random(kind, rng, res))
                     for k in fake_keys]
        at = sorted((int(i) for i in rng.choice(units, size=len(needles), replace=False)),
                    reverse=True)
        for i, needle in zip(at, needles):
            lines.insert(i, needle)
        context = "\n".join(lines)
        distractors = units if p["haystack"] == "needle" else 0
    asked = sorted(int(i) for i in rng.choice(nk, size=nq, replace=False))
    queries = [keys[i] for i in asked]
    answers = [v for i in asked for v in values[i]]
    query = queries[0] if nq == 1 else ", ".join(queries[:-1]) + ", and " + queries[-1]
    if nq * nv == 1:
        text = NIAH_TEMPLATE_ONE.format(kind=kind[:-1], context=context, query=query)
    else:
        text = NIAH_TEMPLATE_MANY.format(kind=kind, context=context, query=query)
    return Built(text, answers, {"keys": keys, "values": values, "queries": queries,
                                 "needles": len(needles), "distractors": distractors})


def _vt_chains(rng: np.random.Generator, num_chains: int, num_hops: int, name_len: int,
               avoid_values: set[int]) -> tuple[list[list[str]], list[list[str]], list[int]]:
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choice(letters, size=name_len))
        if name not in seen:
            seen.add(name)
            names.append(name)
    chains, variables, starts = [], [], []
    used = set(avoid_values)
    for c in range(num_chains):
        vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
        value = int(rng.integers(10000, 99999))
        while value in used:
            value = int(rng.integers(10000, 99999))
        used.add(value)
        # RULER's hop lines end in a space ("VAR B = VAR A \n"), its first line does not
        chain = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]} "
                                              for j in range(num_hops)]
        chains.append(chain)
        variables.append(vs)
        starts.append(value)
    return variables, chains, starts


def _vt_prompt(rng: np.random.Generator, noises: int, num_chains: int, num_hops: int,
               name_len: int, avoid: set[int]) -> tuple[str, list[str], list[list[str]], int]:
    variables, chains, starts = _vt_chains(rng, num_chains, num_hops, name_len, avoid)
    sentences = [NOISE] * noises
    for chain in chains:  # each chain at sorted random positions, in order
        at = sorted(int(i) for i in rng.choice(len(sentences), size=len(chain), replace=False))
        for j, (pos, line) in enumerate(zip(at, chain)):
            sentences.insert(pos + j, line)
    text = VT_TEMPLATE.format(context="\n".join(sentences), query=starts[0],
                              num_v=num_hops + 1)
    return text, variables[0], chains, starts[0]


def vt_icl_example(rng: np.random.Generator, spec: TaskSpec, noises: int,
                   avoid: set[int] = frozenset()) -> tuple[str, int]:
    """RULER's vt one-shot example: the task with `icl_name_len`-letter names (3) and
    min(10, hops) hops over `noises` noise lines, followed by " " + its answer + "\n"
    (RULER appends the answer after the prompt's "they are: ", hence two spaces)."""
    p = spec.params
    text, answer, _, value = _vt_prompt(rng, noises, p["num_chains"], min(10, p["num_hops"]),
                                        p["icl_name_len"], set(avoid))
    return text + " " + " ".join(answer) + "\n", value


def vt_icl_noise(spec: TaskSpec, tokenizer: Any, seed: int) -> int:
    """Noise lines of vt's one-shot example: the most for which the example's prompt (without
    its answer) stays within `icl_tokens` (500) tokens under `tokenizer`, as RULER fits it
    (its example fills ~500 tokens: ~18 lines with LLaMA tokenizers)."""
    p = spec.params
    rng_seed = [int(seed), zlib.crc32(b"vt-icl")]

    def tokens(n: int) -> int:
        rng = np.random.default_rng(rng_seed)
        text, _, _, _ = _vt_prompt(rng, n, p["num_chains"], min(10, p["num_hops"]),
                                   p["icl_name_len"], set())
        return len(tokenizer.encode(text))

    lo, hi = min(10, p["num_hops"]) + 1, 2 * min(10, p["num_hops"]) + 2
    if tokens(lo) > p["icl_tokens"]:
        return lo
    while tokens(hi) <= p["icl_tokens"]:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tokens(mid) <= p["icl_tokens"] else (lo, mid)
    return lo


def build_vt(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources) -> Built:
    """RULER variable_tracking.py: chains "VAR ABCDE = 12345", "VAR FGHIJ = VAR ABCDE ", ...
    (num_hops hops, 5-letter upper-case names) inserted in order at random lines of `units`
    noise sentences; asked: every variable holding the first chain's value. RULER's one-shot
    example (3-letter names, `icl_noise` lines: ~500 tokens, see `vt_icl_noise`) comes first,
    separated by an empty line."""
    p = spec.params
    hops, nc = p["num_hops"], p["num_chains"]
    if "icl_noise" not in p:
        raise ValueError("vt needs params['icl_noise'] (SampleMaker fits it to icl_tokens)")
    if units < hops + 1:
        raise ValueError("fewer noise lines than chain statements")
    icl_text, icl_value = vt_icl_example(rng, spec, p["icl_noise"])
    text, answer, chains, _ = _vt_prompt(rng, units, nc, hops, p["name_len"], {icl_value})
    return Built(icl_text + "\n" + text, list(answer), {"chains": chains, "noise_lines": units,
                                                        "icl_noise_lines": p["icl_noise"]})


def _numbered(words: Sequence[str]) -> str:
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_frequencies(spec: TaskSpec, length: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """((common, uncommon) repeats of the task, (words, common, uncommon) of its one-shot
    example): RULER uses 6/1 with a (20 words, 3/1) example below 4096 tokens, else
    freq_cw/freq_ucw (30/3) with a (40 words, 10/3) example."""
    p = spec.params
    if length < 4096:
        return (6, 1), (20, 3, 1)
    return (p["freq_cw"], p["freq_ucw"]), (40, 10, 3)


def build_cwe(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources,
              length: int) -> Built:
    """RULER common_words_extraction.py: `units` distinct words from the wonderwords nouns,
    adjectives and verbs; when they hold fewer than `units` words, all of them plus the rest
    from the larger English list (`english_words`). RULER HEAD then draws all `units` words
    from its larger list instead: most of those rare words take 2-4 tokens where wonderwords'
    take ~1, so a prompt one word past the switch jumps by tens of thousands of tokens at
    128K and its length search stops at the switch, well short of the length; topping up
    keeps the prompt filling the length. The first num_cw repeated freq_cw times,
    the others freq_ucw times, shuffled, numbered "1. w 2. w ..."; a one-shot example with
    its answer first."""
    num_cw = spec.params["num_cw"]
    (fc, fu), (ex_words, ex_c, ex_u) = cwe_frequencies(spec, length)
    if units <= num_cw:
        raise ValueError("no uncommon words")

    def example(n: int, c: int, u: int) -> tuple[str, list[str]]:
        base = res.cwe_words
        if n <= len(base):
            chosen = [base[int(i)] for i in rng.choice(len(base), n, replace=False)]
        else:  # all of wonderwords, the rest from the larger list, in random order
            extra = res.cwe_extra_words()
            if n > len(base) + len(extra):
                raise ValueError(f"cwe needs {n:,} distinct words; the word lists hold "
                                 f"{len(base) + len(extra):,}")
            more = [extra[int(i)] for i in rng.choice(len(extra), n - len(base),
                                                      replace=False)]
            pool = base + more
            chosen = [pool[int(i)] for i in rng.permutation(n)]
        common, rare = chosen[:num_cw], chosen[num_cw:]
        words = common * c + rare * u
        words = [words[i] for i in rng.permutation(len(words))]
        return CWE_TEMPLATE.format(context=_numbered(words), num_cw=num_cw), common

    ex_text, ex_answer = example(ex_words, ex_c, ex_u)
    text, answer = example(units, fc, fu)
    return Built(ex_text + " " + _numbered(ex_answer) + "\n" + text, answer,
                 {"distinct_words": units, "repeats": (fc, fu)})


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin tail; |error| < 1e-12 for 2.0):
    RULER takes scipy.special.zeta, which is not a dependency here."""
    k = np.arange(1, terms, dtype=np.float64)
    n = float(terms)
    return float(np.sum(k ** -alpha) + n ** (1 - alpha) / (alpha - 1) + 0.5 * n ** -alpha
                 + alpha * n ** (-alpha - 1) / 12)


def fwe_counts(units: int, vocab_size: int, alpha: float) -> list[int]:
    """Occurrences of the word of rank k = 1..vocab: floor(units * k^-alpha / zeta(alpha))."""
    z = zeta(alpha)
    k = np.arange(1, vocab_size + 1, dtype=np.float64)
    return [int(c) for c in np.floor(units * k ** -alpha / z)]


def fwe_min_units(alpha: float) -> int:
    """Fewest words for which ranks 4 and 5 (the 3rd answer and the next word) differ by at
    least one occurrence, so the top 3 cannot tie (alpha 2: 74)."""
    return math.ceil(zeta(alpha) / (4.0 ** -alpha - 5.0 ** -alpha))


def build_fwe(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources,
              length: int) -> Built:
    """RULER freq_words_extraction.py: a vocabulary of length // 50 random 6-letter coded
    words, the first replaced by "..." (noise, the most frequent); rank k occurs
    floor(units * k^-alpha / zeta(alpha)) times; shuffled; the answer is ranks 2-4."""
    p = spec.params
    vocab_size = length // 50
    if vocab_size < 5:
        raise ValueError("length // 50 < 5 coded words")
    vocab: list[str] = []
    seen: set[str] = set()
    letters = np.array(list(string.ascii_lowercase))
    while len(vocab) < vocab_size:
        w = "".join(rng.choice(letters, size=p["coded_wordlen"]))
        if w not in seen:
            seen.add(w)
            vocab.append(w)
    vocab[0] = "..."
    counts = fwe_counts(units, vocab_size, p["alpha"])
    words = [w for w, c in zip(vocab, counts) for _ in range(c)]
    words = [words[i] for i in rng.permutation(len(words))]
    text = FWE_TEMPLATE.format(context=" ".join(words))
    return Built(text, vocab[1:4], {"vocab": vocab, "counts": counts, "words": units})


def json_kv_pairs(spec: TaskSpec, length: int) -> int:
    """HELMET's pair count for `length` (50 at 4K ... 1,800 at 128K); other lengths
    interpolate linearly between HELMET's, or scale its 4K / 128K counts proportionally
    outside them (at least shots + 1)."""
    table = spec.params["pairs"]
    if length in table:
        return int(table[length])
    xs = sorted(table)
    if length < xs[0]:
        n = table[xs[0]] * length / xs[0]
    elif length > xs[-1]:
        n = table[xs[-1]] * length / xs[-1]
    else:
        n = float(np.interp(length, xs, [table[x] for x in xs]))
    return max(int(round(n)), spec.params["shots"] + 1)


def build_json_kv(spec: TaskSpec, rng: np.random.Generator, units: int,
                  res: TaskResources) -> Built:
    """HELMET json_kv (lost-in-the-middle kv_retrieval): `units` UUID key -> UUID value pairs
    as one JSON object, `shots` demonstrations drawn from its other pairs, then the queried
    key at a random position of the object."""
    shots = spec.params["shots"]
    if units < shots + 1:
        raise ValueError("fewer pairs than demonstrations + 1")
    keys = _distinct("uuids", units, rng, res)
    values = _distinct("uuids", units, rng, res, avoid=set(keys))
    pairs = list(zip(keys, values))
    context = "JSON data:\n{" + ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}"
                                             for k, v in pairs) + "}"
    picked = [int(i) for i in rng.choice(units, size=shots + 1, replace=False)]
    demos = "".join(JSON_KV_DEMO.format(key=json.dumps(pairs[i][0]), value=pairs[i][1]) + "\n\n"
                    for i in picked[1:])
    key, value = pairs[picked[0]]
    text = JSON_KV_TEMPLATE.format(context=context, demos=demos, query=json.dumps(key))
    return Built(text, [value], {"pairs": units, "query_position": picked[0]})


def qa_positions(num_docs: int, seed: int) -> list[int]:
    """RULER's document order: `random.Random(seed).shuffle` of the document list (gold
    documents first, then distractors). Element i of the result is the index, in that list,
    of the document shown as "Document i+1", so the gold documents land at the same positions
    in every sample with `num_docs` documents."""
    order = list(range(num_docs))
    random.Random(seed).shuffle(order)
    return order


def build_qa(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources,
             index: int, seed: int) -> Built:
    """RULER qa.py: question `index` in file order (wrapping when a run asks for more samples
    than the file has questions); its gold documents, then distractors (the article's other
    paragraphs first for SQuAD, then random documents; all documents repeated when `units`
    reaches their number), ordered by RULER's fixed-seed shuffle (`qa_positions`);
    "Document i:\n..." each; `units` = documents in all."""
    questions, docs = res.qa[spec.params["dataset"]]
    qa = questions[index % len(questions)]
    gold, more = list(qa["context"]), list(qa["more_context"])
    if units < len(gold):
        raise ValueError("fewer documents than gold documents")
    if units >= len(docs):
        chosen = (list(range(len(docs))) * -(-units // len(docs)))[:units]
    elif units - len(gold) <= len(more):
        chosen = gold + [more[int(i)] for i in rng.choice(len(more), units - len(gold),
                                                          replace=False)]
    else:
        rest = sorted(set(range(len(docs))) - set(gold) - set(more))
        extra = units - len(gold) - len(more)
        chosen = gold + more + [rest[int(i)] for i in rng.choice(len(rest), extra,
                                                                 replace=False)]
    order = qa_positions(len(chosen), seed)
    shown = [chosen[i] for i in order]
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=docs[d])
                          for i, d in enumerate(shown))
    gold_at = sorted(order.index(i) for i in range(len(gold))) if units < len(docs) else []
    return Built(QA_TEMPLATE.format(context=context, query=qa["query"]), list(qa["outputs"]),
                 {"documents": len(shown), "question": qa["query"], "question_index":
                  index % len(questions), "gold_positions": gold_at})


def min_units(spec: TaskSpec, res: TaskResources) -> int:
    """Smallest `units` a task can be built with."""
    p = spec.params
    if spec.kind == "niah":
        needles = max(p["num_keys"], p["num_queries"]) * p["num_values"]
        return needles if p["haystack"] != "essay" else 1
    if spec.kind == "vt":
        return p["num_hops"] + 1
    if spec.kind == "cwe":
        return p["num_cw"] + 1
    if spec.kind == "fwe":
        return fwe_min_units(p["alpha"])
    if spec.kind == "json_kv":
        return p["shots"] + 1
    questions, _ = res.qa[p["dataset"]]
    return max(len(q["context"]) for q in questions)


def build(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources,
          length: int, index: int, seed: int) -> Built:
    """Generate one prompt of `spec` with `units` haystack units."""
    if spec.kind == "niah":
        return build_niah(spec, rng, units, res)
    if spec.kind == "vt":
        return build_vt(spec, rng, units, res)
    if spec.kind == "cwe":
        return build_cwe(spec, rng, units, res, length)
    if spec.kind == "fwe":
        return build_fwe(spec, rng, units, res, length)
    if spec.kind == "json_kv":
        return build_json_kv(spec, rng, units, res)
    return build_qa(spec, rng, units, res, index, seed)


# --------------------------------------------------------------------------------------------
# fitting to the token budget
# --------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One prompt of one cell.

    Attributes:
        task, length, index: the cell and the sample's index in it.
        ids: prompt token ids (BOS prefix included).
        text: prompt text (without BOS).
        answers: RULER's `outputs` (references).
        units: haystack units it was built with.
        meta: generator details (keys, chains, counts, ...) for checks.
    """

    task: str
    length: int
    index: int
    ids: list[int]
    text: str
    answers: list[str]
    units: int
    meta: dict[str, Any]


class LengthTooShortError(ValueError):
    """A task's smallest prompt does not fit the requested length."""


def sample_rng(seed: int, task: str, length: int, index: int) -> np.random.Generator:
    """The sample's own random stream: independent of units, order and other samples."""
    return np.random.default_rng(np.random.SeedSequence(
        [int(seed), zlib.crc32(task.encode()), int(length), int(index)]))


class SampleMaker:
    """Builds the samples of one (task, length) cell within `length - max_new_tokens` tokens.

    Args:
        spec: the task.
        length: requested length (prompt + new tokens).
        max_new_tokens: the generation budget counted in the length.
        tokenizer: `EvalTokenizer`-like (`encode`, `bos_ids`).
        res: word lists, essay, QA data.
        seed: run seed.
    """

    def __init__(self, spec: TaskSpec, length: int, max_new_tokens: int, tokenizer: Any,
                 res: TaskResources, seed: int) -> None:
        if spec.kind == "vt" and "icl_noise" not in spec.params:
            spec = replace(spec, params={**spec.params,
                                         "icl_noise": vt_icl_noise(spec, tokenizer, seed)})
        self.spec, self.length, self.tokenizer, self.res, self.seed = (
            spec, int(length), tokenizer, res, int(seed))
        self.bos = list(tokenizer.bos_ids)
        self.budget = int(length) - int(max_new_tokens)
        self.min_units = min_units(spec, res)
        self._hint: int | None = None
        self._slope = 1.0
        self.tokenizations = 0

    def _make(self, index: int, units: int) -> tuple[Built, list[int]]:
        rng = sample_rng(self.seed, self.spec.name, self.length, index)
        built = build(self.spec, rng, units, self.res, self.length, index, self.seed)
        self.tokenizations += 1
        return built, self.bos + self.tokenizer.encode(built.text)

    def _too_short(self, tokens: int) -> LengthTooShortError:
        return LengthTooShortError(
            f"--lengths {self.length}: task {self.spec.name} needs at least {tokens} prompt "
            f"tokens + {self.length - self.budget} new tokens; use longer lengths or drop the "
            "task (--tasks)")

    def units_hint(self) -> int:
        """Largest units for which sample 0 fits: grow by linear extrapolation (at most 4x a
        step), then interpolate inside the bracket, bisecting every third step. json_kv:
        HELMET's fixed pair count when it fits (else the largest that does)."""
        if self._hint is not None:
            return self._hint
        n0 = self.min_units
        try:
            f0 = len(self._make(0, n0)[1])
        except ValueError as err:  # the generator itself refuses this length (fwe vocab)
            raise LengthTooShortError(f"--lengths {self.length}: task {self.spec.name}: "
                                      f"{err}") from None
        if f0 > self.budget:
            raise self._too_short(f0)
        if self.spec.kind == "json_kv":
            fixed = json_kv_pairs(self.spec, self.length)
            f = len(self._make(0, fixed)[1])
            if f <= self.budget:
                self._slope = max((f - f0) / max(fixed - n0, 1), 1e-3)
                self._hint = fixed
                return fixed
        lo, f_lo, hi, f_hi = n0, f0, None, None
        n = 2 * n0 + 8
        for step in range(64):
            f = len(self._make(0, n)[1])
            if f <= self.budget:
                lo, f_lo = n, f
            else:
                hi, f_hi = n, f
            if hi is not None and hi - lo <= 1:
                break
            if hi is None:
                slope = max((f_lo - f0) / max(lo - n0, 1), 1e-3)
                guess = lo + int((self.budget - f_lo) / slope * 1.02) + 1
                n = min(max(guess, lo + 1), 4 * lo + 16)
            elif step % 3 == 2:
                n = (lo + hi) // 2
            else:
                slope = max((f_hi - f_lo) / (hi - lo), 1e-3)
                n = min(max(lo + int((self.budget - f_lo) / slope), lo + 1), hi - 1)
        self._slope = max((f_lo - f0) / max(lo - n0, 1), 1e-3)
        self._hint = lo
        return lo

    def make(self, index: int) -> Sample:
        """Sample `index` at the cell's units, shrunk until it fits."""
        units = self.units_hint()
        built, ids = self._make(index, units)
        while len(ids) > self.budget:
            if units <= self.min_units:
                raise self._too_short(len(ids))
            over = int((len(ids) - self.budget) / self._slope) + 1
            units = max(self.min_units, units - over)
            built, ids = self._make(index, units)
        return Sample(self.spec.name, self.length, index, ids, built.text, built.answers,
                      units, built.meta)


def top_counts(words: Sequence[str], k: int, ignore: Callable[[str], bool] | None = None
               ) -> list[str]:
    """The k most frequent words (ties by first appearance): a helper for checks."""
    counts = Counter(w for w in words if ignore is None or not ignore(w))
    return [w for w, _ in counts.most_common(k)]
