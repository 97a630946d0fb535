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
| vt | noise | 1 chain of 4 hops (5 variables) + a one-shot example | 5 | all | 30 |
| cwe | numbered word list | 10 words x30, others x3 (6/1 below 4K) + one-shot | 10 | all | 120 |
| fwe | coded words, Zipf alpha 2 | vocab = length // 50 | 3 | all | 50 |
| json_kv | JSON of UUID pairs | 2 demonstrations, 1 queried key | 1 | all | 100 |
| qa_1 / qa_2 | SQuAD / HotpotQA documents | gold + distractor documents | any of | part | 32 |

Length: RULER's rule, `prompt tokens (BOS included) + new tokens <= length` under the model's
tokenizer. Each sample's size is one integer `units` (haystack words for essay, noise or
distractor lines, distinct words for cwe, total words for fwe, JSON pairs, documents for QA):
the largest fitting `units` is searched once per (task, length) on sample 0 by interpolation
(3-6 tokenizations of a full prompt; RULER instead grows the haystack in fixed steps of 500
words or 25 lines, 50-250 tokenizations at 128K), and every sample starts from it and shrinks
only when its own random values tokenize longer. Prompts therefore sit within a few units of
the length (tests: within 2% at 1-4K with a small test tokenizer).

Randomness: each sample draws from `SeedSequence([seed, crc32(task), length, index])`, whatever
`units` it is built at, so a sample is reproducible alone (resume, TP ranks, reordering).
RULER's generators draw from one global stream (sample i depends on samples 0..i-1) and shuffle
needles and word lists with the same fixed seed for every sample; ours shuffle per sample.

Deliberate differences, each to keep every answer retrievable from the prompt (the oracle test):
distractor keys never equal a real key (RULER samples them independently: a collision is
possible among ~1M adjective-noun keys); vt chain start values are distinct; fwe refuses a
length whose top-3 counts could tie (below ~75 words); word-list entries with spaces (e.g.
"contact lens") are dropped so a numbered list splits unambiguously (19 of ~8,700). Essay
sentences are split with a regex (`.`, `!`, `?` followed by whitespace) instead of nltk's Punkt.
"""

from __future__ import annotations

import json
import math
import re
import string
import uuid
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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
#: RULER's text, its "assgined" typo included (prompts stay comparable with published runs).
VT_TEMPLATE = (
    "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
    "{context}\nQuestion: Find all variables that are assigned the value {query} in the text "
    "above. Answer: According to the chain(s) of variable assignment in the text above, {num_v} "
    "variables are assgined the value {query}, they are: ")
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

#: The essay haystack when no --haystack-file is given: generic prose written for this
#: project (no download, no copyrighted text), repeated as needed. ~900 words, i.e. it repeats
#: every ~1,200 LLaMA tokens; RULER's Paul Graham essays do not repeat below ~150K tokens, so
#: pass your own long text (--haystack-file) for results comparable with published RULER runs.
DEFAULT_ESSAY = """\
Most work that lasts is done slowly. A carpenter who builds a table to be used for fifty years \
spends more time choosing the wood than cutting it. He looks at the grain, feels the weight of \
each board, and sets aside the pieces that would warp in a damp winter. None of this shows in \
the finished table. What shows is that it does not wobble, and that is the whole point.

Cities grow in the same way. Nobody plans the corner bakery, the shoe repair shop, or the bench \
where old friends meet every morning. They appear because someone needed them, and they stay \
because enough people keep coming back. A planner can draw the streets, but the life of a \
street is written by thousands of small decisions made by people who never meet each other.

Learning a new skill is rarely a straight line. For weeks nothing seems to change, and then one \
evening the fingers find the chord without looking, or the sentence in a foreign language comes \
out whole. The progress was happening all along, below the surface, in the hours that felt \
wasted. Patience is not waiting. It is doing the same careful thing again while the result \
takes its time.

Weather shapes the character of a place more than its monuments do. In a town with long rainy \
seasons people learn to be cheerful indoors, to cook slow meals, and to tell long stories. In a \
dry valley they rise early and rest in the heat of the afternoon. Visitors notice the buildings \
first, but residents talk about the wind, the light in October, and the year the river froze.

A good question is often worth more than a quick answer. When a team is stuck, the person who \
asks what problem they are really trying to solve can save a month of effort. Questions open \
doors that answers close too early. The habit of asking them is easy to describe and hard to \
keep, because an answer feels like progress and a question feels like delay.

Gardens teach humility. You can prepare the soil, choose the seeds, and water on schedule, and \
still a late frost or a family of rabbits decides the harvest. Experienced gardeners plant a \
little more than they need and share the surplus with neighbors. Over the years they stop \
trying to control every outcome and start paying attention to what the ground is telling them.

Tools change faster than the problems they solve. People wrote letters with quills, then with \
fountain pens, then on typewriters and keyboards, but the difficulty of saying exactly what one \
means stayed the same. Each new tool removes one kind of friction and adds another. The writers \
worth reading learned to think clearly first and to treat the tool as a detail.

Maps are useful because they leave things out. A map that showed every stone and every blade of \
grass would be as large as the land and just as confusing. The art is in choosing what to keep: \
the roads for a driver, the contour lines for a hiker, the depths for a sailor. Every summary is \
a map of something, and its value depends on knowing who will use it and why.

Small routines carry people through difficult seasons. A walk after dinner, a cup of tea before \
the day begins, a phone call every Sunday: none of these solve a hard problem, yet they give the \
days a shape. When everything else is uncertain, a familiar habit is a handrail. It is worth \
choosing such habits deliberately, while things are calm, so that they are there when needed.

Libraries are quiet, but they are not still. Every book on the shelf is an argument waiting for a \
reader, and every reader brings questions the author never imagined. A student looking for one \
fact finds three others along the way. The best discoveries often happen on the shelf next to \
the one you meant to visit, which is a good reason to browse without a plan now and then.
"""

# --------------------------------------------------------------------------------------------
# task definitions (RULER scripts/synthetic.yaml)
# --------------------------------------------------------------------------------------------
METRICS = ("string_match_all", "string_match_part")


@dataclass(frozen=True)
class TaskSpec:
    """One task: generator kind, its parameters, metric and generation budget.

    Attributes:
        name: the task's RULER name (or json_kv).
        kind: niah | vt | cwe | fwe | json_kv | qa.
        params: the generator's settings (RULER's synthetic.yaml `args`).
        metric: string_match_all | string_match_part.
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
    TaskSpec("vt", "vt", {"num_chains": 1, "num_hops": 4, "icl_noise": 5}, max_new_tokens=30),
    TaskSpec("cwe", "cwe", {"freq_cw": 30, "freq_ucw": 3, "num_cw": 10}, max_new_tokens=120),
    TaskSpec("fwe", "fwe", {"alpha": 2.0, "coded_wordlen": 6}, max_new_tokens=50),
    TaskSpec("json_kv", "json_kv", {"shots": 2}, max_new_tokens=100),
    TaskSpec("qa_1", "qa", {"dataset": "squad"}, metric="string_match_part", max_new_tokens=32),
    TaskSpec("qa_2", "qa", {"dataset": "hotpotqa"}, metric="string_match_part",
             max_new_tokens=32),
)}
SYNTHETIC_TASKS = tuple(n for n, t in TASKS.items() if t.kind != "qa")
QA_TASKS = ("qa_1", "qa_2")
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


def score_prediction(metric: str, prediction: str, references: Sequence[str]) -> float:
    """Score one sample (0-100) with the task's metric after RULER's post-processing."""
    if not references:
        raise ValueError("a sample without reference answers")
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
        key_words: "adjective-noun" keys (RULER's NIAH word keys: ~6.2M combinations).
        cwe_words: nouns + adjectives + verbs (RULER's cwe vocabulary).
        essay_words: the essay haystack split on whitespace (repeated cyclically as needed).
        essay_source: where the essay came from.
        qa: dataset name -> (questions, documents).
    """

    adjs: list[str]
    nouns: list[str]
    cwe_words: list[str]
    essay_words: list[str]
    essay_source: str
    qa: dict[str, tuple[list[dict[str, Any]], list[str]]] = field(default_factory=dict)

    @classmethod
    def load(cls, haystack_file: str | None = None, squad_file: str | None = None,
             hotpotqa_file: str | None = None) -> TaskResources:
        lists = wonderwords_lists()
        if haystack_file:
            from megatron_longctx.eval.needle import load_haystack_texts

            text = "\n\n".join(load_haystack_texts(haystack_file))
            source = str(Path(haystack_file).resolve())
        else:
            text, source = DEFAULT_ESSAY, "built-in generic prose (ruler_tasks.DEFAULT_ESSAY)"
        words = text.split()
        if not words:
            raise ValueError(f"--haystack-file {haystack_file}: no text")
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
                   essay_source=source, qa=qa)


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
    words = res.essay_words
    reps = -(-n_words // len(words))
    return " ".join((words * reps)[:n_words]) if reps > 1 else " ".join(words[:n_words])


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


def _vt_chains(rng: np.random.Generator, num_chains: int, num_hops: int,
               avoid_values: set[int]) -> tuple[list[list[str]], list[list[str]], list[int]]:
    letters = np.array(list(string.ascii_uppercase))
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < num_chains * (num_hops + 1):
        name = "".join(rng.choice(letters, size=5))
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
        chain = [f"VAR {vs[0]} = {value}"] + [f"VAR {vs[j + 1]} = VAR {vs[j]}"
                                              for j in range(num_hops)]
        chains.append(chain)
        variables.append(vs)
        starts.append(value)
    return variables, chains, starts


def _vt_prompt(rng: np.random.Generator, noises: int, num_chains: int,
               num_hops: int, avoid: set[int]) -> tuple[str, list[str], list[list[str]], int]:
    variables, chains, starts = _vt_chains(rng, num_chains, num_hops, avoid)
    sentences = [NOISE] * noises
    for chain in chains:  # each chain at sorted random positions, in order
        at = sorted(int(i) for i in rng.choice(len(sentences), size=len(chain), replace=False))
        for j, (pos, line) in enumerate(zip(at, chain)):
            sentences.insert(pos + j, line)
    text = VT_TEMPLATE.format(context="\n".join(sentences), query=starts[0],
                              num_v=num_hops + 1)
    return text, variables[0], chains, starts[0]


def build_vt(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources) -> Built:
    """RULER variable_tracking.py: chains "VAR A = 12345", "VAR B = VAR A", ... (num_hops
    hops, 5-letter upper-case names) inserted in order at random lines of `units` noise
    sentences; asked: every variable holding the first chain's value. A one-shot example (a
    short task of `icl_noise` lines with its answer) comes first, as RULER's few-shot vt."""
    p = spec.params
    hops, nc = p["num_hops"], p["num_chains"]
    if units < hops + 1:
        raise ValueError("fewer noise lines than chain statements")
    icl_text, icl_answer, _, icl_value = _vt_prompt(rng, p["icl_noise"], nc, hops, set())
    text, answer, chains, _ = _vt_prompt(rng, units, nc, hops, {icl_value})
    prompt = icl_text + " ".join(icl_answer) + "\n\n" + text
    return Built(prompt, list(answer), {"chains": chains, "noise_lines": units})


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
    adjectives and verbs; the first num_cw repeated freq_cw times, the others freq_ucw times,
    shuffled, numbered "1. w 2. w ..."; a one-shot example with its answer first."""
    num_cw = spec.params["num_cw"]
    (fc, fu), (ex_words, ex_c, ex_u) = cwe_frequencies(spec, length)
    if units <= num_cw:
        raise ValueError("no uncommon words")

    def example(n: int, c: int, u: int) -> tuple[str, list[str]]:
        chosen = [res.cwe_words[int(i)] for i in rng.choice(len(res.cwe_words), n,
                                                            replace=False)]
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


def build_qa(spec: TaskSpec, rng: np.random.Generator, units: int, res: TaskResources,
             index: int, seed: int) -> Built:
    """RULER qa.py: the question's gold documents plus distractors (the article's other
    paragraphs first for SQuAD, then random documents), shuffled, "Document i:\\n..." each;
    `units` = documents in all. Question i of a run is the i-th of a seeded permutation."""
    questions, docs = res.qa[spec.params["dataset"]]
    order = np.random.default_rng([seed, 7]).permutation(len(questions))
    qa = questions[int(order[index % len(questions)])]
    gold, more = list(qa["context"]), list(qa["more_context"])
    if units < len(gold):
        raise ValueError("fewer documents than gold documents")
    if units >= len(docs):
        chosen = list(range(len(docs)))
    elif units - len(gold) <= len(more):
        chosen = gold + [more[int(i)] for i in rng.choice(len(more), units - len(gold),
                                                          replace=False)]
    else:
        rest = sorted(set(range(len(docs))) - set(gold) - set(more))
        extra = units - len(gold) - len(more)
        chosen = gold + more + [rest[int(i)] for i in rng.choice(len(rest), extra,
                                                                 replace=False)]
    chosen = [chosen[int(i)] for i in rng.permutation(len(chosen))]
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=docs[d])
                          for i, d in enumerate(chosen))
    return Built(QA_TEMPLATE.format(context=context, query=qa["query"]), list(qa["outputs"]),
                 {"documents": len(chosen), "question": qa["query"]})


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
        step), then interpolate inside the bracket, bisecting every third step."""
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
