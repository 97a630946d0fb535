"""Needle-in-a-haystack retrieval test (Fu et al. 2024, after gkamradt's LLMTest).

Protocol, one cell per (length, depth) of the grid:

1. **Grid.** Lengths in tokens of the whole prompt (BOS, template, haystack, needle and
   question): the paper's 40 values `round(linspace(1000, 128000, 40))` by default
   (`paper_lengths`); depths `round(linspace(0, 100, 10))` percent (`depth_grid`).
2. **Haystack.** Text repeated to length: the files of `--haystack` (the paper uses Paul
   Graham's essays) or, offline, Book-style documents of the synthetic demo corpus
   (`synthetic_haystack_texts`, its own facts removed so that no other "secret code" competes
   with the needle). The text is tokenized once with character offsets.
3. **Sentence boundaries.** A boundary is a character position right after terminal
   punctuation (`.`, `!`, `?`, optionally followed by closing quotes/brackets) that is followed
   by whitespace, or right after a line break. A token position is a boundary when the
   previous token ends at or before such a character position and the next token starts at or
   after it (no token straddles it). A haystack with a stretch of more than
   `MAX_SENTENCE_TOKENS` (1024) tokens without one (code, a word list, one long line) is cut
   between words instead, with a warning: it would otherwise give prompts without haystack.
4. **Filling and insertion, in tokens.** The haystack is cut at the largest boundary `b` that
   keeps the whole prompt within `length` tokens (measured by tokenizing the assembled prompt;
   the cut is lowered and the prompt rebuilt if joining changed the count), so the actual
   length is at most `length` and short of it by less than about one sentence. The needle goes
   in at the largest boundary `p <= round(b * depth / 100)` (backing up to a sentence start, as
   the released code backs up to a period): depth 0 is the start of the haystack, 100 its end.
   The results record the actual prompt length, the token index of the needle's first token in
   the prompt and the actual depth `100 * p / b`.
5. **Prompt.** `template` with `{context}` = haystack with the needle and `{question}`. The
   paper's template is the released code's (`PAPER_TEMPLATE`); the synthetic-fact needle uses
   the demo corpus's own phrasing (`{context} {question}`, the question ending in "answer :").
   Prompt ids = the tokenizer's BOS prefix + the tokenized prompt text (one tokenization of the
   whole text, as the released code does; the needle keeps one space on each side).
6. **Generation.** Greedy, at most 50 new tokens, stopping at EOS (the model backends in
   `megatron_longctx.eval.models`, with a KV cache).
7. **Score.** `score_response`: the percentage of the answer's distinct words found among the
   response's words. A word is a maximal run of Unicode letters and digits (underscores and
   punctuation separate words, so "don't" is "don" + "t"), compared after `str.casefold()`; the
   response's words are a set (order and repetition do not matter). The paper needle's answer is
   "eat a sandwich and sit in Dolores Park on a sunny day": 11 distinct words, stop words
   included, as the paper's "fraction of the needle's answer words present in the response".
   (The released code scores ROUGE-1 F against the whole needle instead.) The overall score is
   the mean over all cells of the grid.

Needle types (`NEEDLE_TYPES`): `paper` (the defaults above, or `--needle/--question/--answer`),
`passkey` (a random 5-digit pass key, the Landmark-attention phrasing) and `synthetic-fact`
(`FACT_TEMPLATE` / `QUESTION_PROMPT_TEMPLATE` / `make_fact` of `megatron_longctx.data.synthetic`,
i.e. what the demo's tiny model is trained to retrieve). Random needles are drawn per cell from
`(seed, length, depth)`, so a rerun builds identical prompts.

Results (`results.json`, rewritten atomically after every cell) hold the settings, the model's
description and every cell; a rerun skips cells already there and refuses a results file made
with other settings or another model (`ResultsMismatchError`). `plot_heatmap` draws the paper's
figure (lengths on x, depths on y, red-yellow-green score, a dashed line at the training length).
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.identity import content_sha256

FORMAT = "megatron-longctx-needle/1"
RESULTS_NAME = "results.json"
HEATMAP_NAME = "heatmap.png"

PAPER_NEEDLE = ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores "
                "Park on a sunny day.")
PAPER_QUESTION = "What is the best thing to do in San Francisco?"
PAPER_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
#: The released code's prompt for base models (eval/needle/needle_in_haystack.py).
PAPER_TEMPLATE = ("<|im_start|> This is a very long story book: <book> {context} </book>.\n "
                  "Based on the content of the book, Question: {question}\nAnswer:")
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"
PASSKEY_TEMPLATE = ("There is important information hidden inside a lot of irrelevant text. "
                    "Find it and memorize it. I will quiz you about the important information "
                    "there.\n{context}\n{question}")
SYNTHETIC_TEMPLATE = "{context} {question}"
NEEDLE_TYPES = ("paper", "passkey", "synthetic-fact")

_WORD_RE = re.compile(r"[^\W_]+")
_SENTENCE_END_RE = re.compile(r"[.!?]+[\"')\]]*(?=\s)|\n")


# --------------------------------------------------------------------------------------------
# grid and scoring
# --------------------------------------------------------------------------------------------
def paper_lengths(min_length: int = 1000, max_length: int = 128000,
                  num_lengths: int = 40) -> list[int]:
    """`round(linspace(min, max, num))` tokens: the paper's 40 lengths from 1000 to 128000."""
    if num_lengths < 1 or min_length < 1 or max_length < min_length:
        raise ValueError(f"bad length grid: --min-length {min_length}, --max-length "
                         f"{max_length}, --num-lengths {num_lengths}")
    values = np.round(np.linspace(min_length, max_length, num_lengths)).astype(int)
    return sorted({int(v) for v in values})


def depth_grid(num_depths: int = 10) -> list[float]:
    """`round(linspace(0, 100, num))` percent: 0, 11, 22, ..., 100 for the paper's 10."""
    if num_depths < 1:
        raise ValueError(f"--depths must be >= 1, got {num_depths}")
    if num_depths == 1:
        return [50.0]
    return [float(v) for v in np.round(np.linspace(0, 100, num_depths))]


def answer_words(text: str) -> list[str]:
    """Distinct words of `text` in order of appearance: maximal runs of Unicode letters and
    digits, casefolded ("Dolores Park!" -> ["dolores", "park"])."""
    seen: dict[str, None] = {}
    for word in _WORD_RE.findall(text.casefold()):
        seen.setdefault(word, None)
    return list(seen)


def score_response(response: str, answer: str) -> float:
    """Percentage (0-100) of the answer's distinct words that occur among the response's words.

    Raises:
        ValueError: the answer has no words.
    """
    want = answer_words(answer)
    if not want:
        raise ValueError(f"answer {answer!r} has no words to look for")
    got = set(answer_words(response))
    return 100.0 * sum(word in got for word in want) / len(want)


# --------------------------------------------------------------------------------------------
# settings and needles
# --------------------------------------------------------------------------------------------
@dataclass
class NeedleSettings:
    """Everything a needle run depends on (the CLI's flags).

    Attributes:
        lengths: prompt lengths in tokens (`--lengths`, or `--min-length/--max-length/
            --num-lengths`).
        depths: needle depths in percent of the haystack (`--depths N` -> `depth_grid(N)`).
        needle_type: paper | passkey | synthetic-fact (`--needle-type`).
        needle: custom needle sentence (`--needle`, paper type only).
        question: custom question (`--question`).
        answer: custom answer whose words are scored (`--answer`; default the needle).
        template: prompt template with {context} and {question} (`--prompt-template`);
            default per needle type.
        haystack: text file or directory (`--haystack`); None = synthetic Book-style text.
        max_new_tokens: greedy decoding budget (`--max-new-tokens`, paper: 50).
        seed: seed of random needles and of the synthetic haystack (`--seed`).
        training_length: where the heatmap draws its line (`--training-length`); not part of
            the results' identity.
    """

    lengths: list[int]
    depths: list[float]
    needle_type: str = "paper"
    needle: str | None = None
    question: str | None = None
    answer: str | None = None
    template: str | None = None
    haystack: str | None = None
    max_new_tokens: int = 50
    seed: int = 1234
    training_length: int | None = field(default=None, compare=False)

    def validate(self) -> NeedleSettings:
        """Check the flags together; ValueError names the flag."""
        if not self.lengths or any(int(x) < 1 for x in self.lengths):
            raise ValueError(f"--lengths must be positive token counts, got {self.lengths}")
        if not self.depths or any(not 0 <= float(d) <= 100 for d in self.depths):
            raise ValueError(f"depths must lie in [0, 100], got {self.depths}")
        if self.needle_type not in NEEDLE_TYPES:
            raise ValueError(f"--needle-type must be one of {NEEDLE_TYPES}, got "
                             f"{self.needle_type!r}")
        custom = (self.needle, self.question, self.answer)
        if self.needle_type != "paper" and any(x is not None for x in custom):
            raise ValueError(f"--needle/--question/--answer apply to --needle-type paper, not "
                             f"{self.needle_type}")
        if self.needle is not None and self.question is None:
            raise ValueError("--needle needs --question (and usually --answer)")
        if self.needle is None and (self.question is not None or self.answer is not None):
            raise ValueError("--question/--answer need --needle")
        answer = self.answer if self.answer is not None else self.needle
        if answer is not None and not answer_words(answer):
            raise ValueError(f"--answer {answer!r} has no words to score")
        template = self.resolved_template()
        if template.count("{context}") != 1 or "{question}" not in template:
            raise ValueError("--prompt-template must contain {context} once and {question}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        self.lengths = sorted({int(x) for x in self.lengths})
        self.depths = sorted({float(d) for d in self.depths})
        return self

    def resolved_template(self) -> str:
        """The prompt template in use (the flag, else the needle type's default)."""
        if self.template is not None:
            return self.template
        return {"paper": PAPER_TEMPLATE, "passkey": PASSKEY_TEMPLATE,
                "synthetic-fact": SYNTHETIC_TEMPLATE}[self.needle_type]

    def identity(self) -> dict[str, Any]:
        """The settings cells depend on: all but the grid and the training length."""
        out = asdict(self)
        for name in ("lengths", "depths", "training_length"):
            out.pop(name)
        out["template"] = self.resolved_template()
        out["haystack"] = str(Path(self.haystack).resolve()) if self.haystack else None
        out["haystack_sha256"] = (content_sha256(self.haystack) if self.haystack
                                  and Path(self.haystack).exists() else None)
        return out


@dataclass(frozen=True)
class Needle:
    """One cell's needle: the sentence hidden, the question asked and the scored answer."""

    text: str
    question: str
    answer: str


def _cell_rng(seed: int, length: int, depth: float) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, int(length),
                                                         int(round(depth * 1000))]))


def make_needle(settings: NeedleSettings, length: int, depth: float) -> Needle:
    """The needle of cell (length, depth): fixed for paper/custom, drawn from the cell's seed
    for passkey (5 digits) and synthetic-fact (`make_fact`: a key and a code word)."""
    if settings.needle_type == "passkey":
        key = str(int(_cell_rng(settings.seed, length, depth).integers(10000, 100000)))
        return Needle(PASSKEY_NEEDLE.format(key=key), PASSKEY_QUESTION, key)
    if settings.needle_type == "synthetic-fact":
        from megatron_longctx.data.synthetic import (
            FACT_TEMPLATE,
            QUESTION_PROMPT_TEMPLATE,
            make_fact,
        )

        key, value = make_fact(_cell_rng(settings.seed, length, depth))
        return Needle(FACT_TEMPLATE.format(key=key, value=value),
                      QUESTION_PROMPT_TEMPLATE.format(key=key), value)
    if settings.needle is not None:
        answer = settings.answer if settings.answer is not None else settings.needle
        return Needle(settings.needle, str(settings.question), answer)
    return Needle(PAPER_NEEDLE, PAPER_QUESTION, PAPER_ANSWER)


# --------------------------------------------------------------------------------------------
# haystack
# --------------------------------------------------------------------------------------------
def _fact_patterns() -> list[re.Pattern[str]]:
    from megatron_longctx.data.synthetic import FACT_TEMPLATE, QUESTION_TEMPLATE

    out = []
    # Questions first, so each is removed whole.
    for template in (QUESTION_TEMPLATE, FACT_TEMPLATE):
        pattern = re.escape(template)
        pattern = pattern.replace(re.escape("{key}"), "[a-z]+")
        pattern = pattern.replace(re.escape("{value}"), "[a-z]+")
        out.append(re.compile(r"(?:# )?" + pattern + r"[ \t]*"))
    return out


def synthetic_haystack_texts(min_words: int, seed: int = 1234) -> list[str]:
    """Book-style documents of the synthetic demo corpus with at least `min_words` words in
    all, their own fact statements and questions removed (no competing "secret code")."""
    from megatron_longctx.data.synthetic import CorpusConfig, iter_records

    config = CorpusConfig(total_words=max(int(min_words), 1000), seed=seed,
                          domain_shares={"RedPajamaBook": 1.0}, min_words=200)
    patterns = _fact_patterns()
    texts = []
    for record in iter_records(config):
        text = record["text"]
        for pattern in patterns:
            text = pattern.sub("", text)
        texts.append(text.strip())
    return [t for t in texts if t]


def load_haystack_texts(path: str | Path) -> list[str]:
    """Texts of a `.txt` file, a `.jsonl(.gz/.zst)` file (its records' "text"), or every such
    file of a directory (recursively, sorted by path)."""
    from megatron_longctx.data.train_tokenizer import iter_texts

    root = Path(path)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and (
            p.suffix == ".txt" or p.name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst"))))
    elif root.is_file():
        files = [root]
    else:
        raise FileNotFoundError(f"--haystack {path}: no such file or directory")
    texts: list[str] = []
    for file in files:
        if file.suffix == ".txt":
            texts.append(file.read_text(encoding="utf-8", errors="replace"))
        else:
            texts.extend(iter_texts([str(file)]))
    texts = [t.strip() for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"--haystack {path}: no text found (.txt or .jsonl records)")
    return texts


def sentence_end_positions(text: str) -> np.ndarray:
    """Character positions right after each sentence end or line break (see module doc)."""
    return np.fromiter((m.end() for m in _SENTENCE_END_RE.finditer(text)), dtype=np.int64)


#: Longest stretch of haystack tokens without a sentence boundary before the cuts fall back to
#: word boundaries (prose sentences are 20-40 tokens; a 1024-token "sentence" is not prose).
MAX_SENTENCE_TOKENS = 1024


@dataclass
class Haystack:
    """Haystack text tokenized once: token start offsets and sentence-boundary token indices.

    Attributes:
        text: the whole haystack text.
        token_starts: character start of every token, plus len(text) at index n_tokens.
        boundaries: sorted token indices where a sentence starts (0 and n_tokens included).
        source: where the text came from (recorded in results).
    """

    text: str
    token_starts: np.ndarray
    boundaries: np.ndarray
    source: str

    @property
    def n_tokens(self) -> int:
        return len(self.token_starts) - 1

    @classmethod
    def from_texts(cls, texts: list[str], tokenizer: Any, min_tokens: int,
                   source: str) -> Haystack:
        """Join documents with blank lines, repeat the whole until it has at least
        `min_tokens` tokens, tokenize once and find the boundaries."""
        if not texts:
            raise ValueError("empty haystack")
        base = "\n\n".join(texts)
        text = base
        ids, offsets = tokenizer.encode_with_offsets(text)
        if len(ids) < min_tokens:
            repeats = math.ceil(min_tokens / max(len(ids), 1)) + 1
            text = "\n\n".join([base] * repeats)
            ids, offsets = tokenizer.encode_with_offsets(text)
        n = len(ids)
        starts = np.append(offsets[:, 0], len(text)).astype(np.int64)
        ends = sentence_end_positions(text)
        if n > 1 and len(ends):
            j = np.searchsorted(ends, offsets[:-1, 1], side="left")
            found = j < len(ends)
            ok = np.zeros(n - 1, dtype=bool)
            ok[found] = ends[j[found]] <= offsets[1:, 0][found]
            inner = np.flatnonzero(ok) + 1
        else:
            inner = np.zeros(0, dtype=np.int64)
        boundaries = np.unique(np.concatenate([[0], inner, [n]])).astype(np.int64)
        if n > 1 and np.diff(boundaries).max() > MAX_SENTENCE_TOKENS:
            # A text without sentence ends (code, a word list, one long line) would give
            # prompts with little or no haystack: cut between words instead, and say so.
            words = np.flatnonzero([s == 0 or text[s - 1].isspace() for s in starts[:-1]])
            boundaries = np.unique(np.concatenate([[0], words, [n]])).astype(np.int64)
            if np.diff(boundaries).max() > MAX_SENTENCE_TOKENS:
                boundaries = np.arange(n + 1, dtype=np.int64)
            warnings.warn(f"haystack {source}: a stretch of more than {MAX_SENTENCE_TOKENS} "
                          "tokens without a sentence end; prompts are cut between words "
                          "instead", stacklevel=2)
        return cls(text=text, token_starts=starts, boundaries=boundaries, source=source)

    def boundary_at_or_below(self, token: int) -> int:
        """The largest sentence-boundary token index <= `token` (0 at least)."""
        i = int(np.searchsorted(self.boundaries, token, side="right")) - 1
        return int(self.boundaries[max(i, 0)])

    def char_at(self, token: int) -> int:
        """Character offset where token `token` starts (len(text) for n_tokens)."""
        return int(self.token_starts[token])


def build_haystack(settings: NeedleSettings, tokenizer: Any, min_tokens: int) -> Haystack:
    """The haystack of a run: `--haystack` files, else synthetic Book-style text."""
    if settings.haystack:
        texts = load_haystack_texts(settings.haystack)
        source = str(Path(settings.haystack).resolve())
    else:
        texts = synthetic_haystack_texts(min_tokens + 2000, seed=settings.seed)
        source = f"synthetic RedPajamaBook-style text (seed {settings.seed}, facts removed)"
    return Haystack.from_texts(texts, tokenizer, min_tokens, source)


# --------------------------------------------------------------------------------------------
# prompts
# --------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """One cell's prompt.

    Attributes:
        ids: prompt token ids (BOS prefix included).
        insertion_token: index in `ids` of the needle's first token.
        haystack_tokens: haystack tokens in the prompt (`b`).
        needle_depth: actual depth, 100 * (haystack tokens before the needle) / b.
        text: the prompt text (without BOS).
    """

    ids: list[int]
    insertion_token: int
    haystack_tokens: int
    needle_depth: float
    text: str


def build_prompt(haystack: Haystack, tokenizer: Any, needle: Needle, template: str,
                 length: int, depth: float) -> Prompt:
    """Fill the template to at most `length` tokens with the needle at `depth` percent.

    Raises:
        ValueError: `length` cannot hold the template, needle and question, or the haystack
            is too short for it.
    """
    prefix, suffix = template.split("{context}")
    prefix = prefix.replace("{question}", needle.question)
    suffix = suffix.replace("{question}", needle.question)
    bos = list(tokenizer.bos_ids)
    text_all = haystack.text

    def assemble(b: int, p: int) -> Prompt:
        cut, at = haystack.char_at(b), haystack.char_at(p)
        before, after = text_all[:at], text_all[at:cut]
        sep1 = " " if before and not before[-1].isspace() else ""
        sep2 = " " if after and not after[0].isspace() else ""
        text = prefix + before + sep1 + needle.text + sep2 + after + suffix
        needle_char = len(prefix) + len(before) + len(sep1)
        ids, offsets = tokenizer.encode_with_offsets(text)
        inside = np.flatnonzero(offsets[:, 1] > needle_char)
        first = int(inside[0]) if len(inside) else len(ids)
        return Prompt(ids=bos + ids, insertion_token=len(bos) + first, haystack_tokens=b,
                      needle_depth=100.0 * p / b if b else 0.0, text=text)

    overhead = len(assemble(0, 0).ids)
    budget = length - overhead
    for _ in range(10):
        if budget <= 0:
            raise ValueError(f"length {length}: the prompt without haystack already has "
                             f"{overhead} tokens (template, needle, question); use longer "
                             "--lengths")
        if budget > haystack.n_tokens:
            raise ValueError(f"haystack has {haystack.n_tokens} tokens, length {length} needs "
                             f"{budget}")
        b = haystack.boundary_at_or_below(budget)
        p = haystack.boundary_at_or_below(int(round(b * depth / 100.0)))
        prompt = assemble(b, p)
        if len(prompt.ids) <= length:
            return prompt
        budget -= len(prompt.ids) - length
    raise ValueError(f"length {length}: could not fit the prompt (tokenization keeps growing)")


# --------------------------------------------------------------------------------------------
# results, resume and the run
# --------------------------------------------------------------------------------------------
class ResultsMismatchError(ValueError):
    """An existing results.json was made with other settings or another model."""


def _cell_key(length: int, depth: float) -> tuple[int, float]:
    return int(length), round(float(depth), 6)


def model_identity(description: dict[str, Any]) -> dict[str, Any]:
    """The part of a model description that must match for results to be resumed: where the
    model is, what its files hold (`weights_sha256`, `tokenizer_sha256`) and the dtype it
    runs in (another --dtype changes the answers)."""
    keys = ("kind", "path", "checkpoint", "iteration", "tokenizer", "weights_sha256",
            "tokenizer_sha256", "dtype")
    return {k: description.get(k) for k in keys}


def check_resumable(path: Path, results: dict[str, Any], identity: dict[str, Any],
                    description: dict[str, Any]) -> None:
    """Raise ResultsMismatchError unless `results` (read from `path`) were made with the same
    settings `identity` and the same model: a resumed grid must not mix two experiments."""
    for name, value in identity.items():
        if results["settings"].get(name) != value:
            raise ResultsMismatchError(
                f"{path} was made with {name}={results['settings'].get(name)!r}, this run "
                f"has {value!r}; use another --output-dir or --overwrite")
    held, now = model_identity(results["model"]), model_identity(description)
    changed = [k for k in now if held.get(k) != now[k]]
    if changed:
        name = changed[0]
        raise ResultsMismatchError(
            f"{path} holds results of another model ({name} {held.get(name)!r}, this run "
            f"has {now[name]!r}); use another --output-dir or --overwrite")


def read_results(path: str | Path, fmt: str) -> dict[str, Any] | None:
    """A results.json of format `fmt` (needle, RULER), or None when absent."""
    path = Path(path)
    if not path.is_file():
        return None
    results = json.loads(path.read_text(encoding="utf-8"))
    if results.get("format") != fmt:
        raise ResultsMismatchError(f"{path}: not a {fmt} file")
    return results


def load_results(path: str | Path) -> dict[str, Any] | None:
    """A results.json written by `run_needle`, or None when absent."""
    return read_results(path, FORMAT)


def summarize(cells: Iterable[dict[str, Any]], lengths: list[int],
              depths: list[float]) -> dict[str, Any]:
    """Overall score (mean over the grid's cells that exist) and how many are done."""
    wanted = {_cell_key(L, d) for L in lengths for d in depths}
    scores = [c["score"] for c in cells if _cell_key(c["length"], c["depth"]) in wanted]
    return {"overall": float(np.mean(scores)) if scores else None,
            "cells_done": len(scores), "cells_total": len(wanted)}


def run_needle(model: Any, settings: NeedleSettings, output_dir: str | Path, *,
               overwrite: bool = False, use_cache: bool = True, reuse_prefix: bool = True,
               plot: bool = True,
               log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run (or resume) the grid on `model` and write results.json and heatmap.png.

    Args:
        model: a `CausalLM` (driver rank) or any object with `tokenizer`, `generate(ids, n)`
            and `describe()`.
        settings: the protocol (validated here).
        output_dir: where results.json and heatmap.png go (created).
        overwrite: discard an existing results.json instead of resuming it.
        use_cache: KV-cache generation (False: full recompute per token, for checks).
        reuse_prefix: keep one KV cache across the cells and prefill only what differs from
            the previous prompt (`CausalLM.generate(..., reuse_prefix=True)`, exact up to
            prefill grouping): consecutive depths of a length share the haystack up to the
            earlier insertion point, so about half the prefill of a depth sweep is saved.
            `CausalLM` models only; the cache is released when the run ends.
        plot: write heatmap.png at the end.
        log: progress lines (None: silent).

    Returns:
        The results dict (as written to results.json).

    Raises:
        ResultsMismatchError: results.json exists with other settings or another model.
    """
    settings.validate()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS_NAME
    description = model.describe()
    identity = settings.identity()
    results = None if overwrite else load_results(path)
    if results is not None:
        check_resumable(path, results, identity, description)
    cells = {_cell_key(c["length"], c["depth"]): c for c in (results or {}).get("cells", [])}
    haystack = build_haystack(settings, model.tokenizer, max(settings.lengths))
    state: dict[str, Any] = {
        "format": FORMAT,
        "settings": {**identity, "lengths": settings.lengths, "depths": settings.depths,
                     "training_length": settings.training_length,
                     "haystack_source": haystack.source, "haystack_tokens": haystack.n_tokens},
        "model": description,
    }

    def save() -> None:
        ordered = sorted(cells.values(), key=lambda c: (c["length"], c["depth"]))
        state["cells"] = ordered
        state.update(summarize(ordered, settings.lengths, settings.depths))
        write_json_atomic(path, state)

    total = len(settings.lengths) * len(settings.depths)
    todo = [(length, depth) for length in settings.lengths for depth in settings.depths
            if _cell_key(length, depth) not in cells]
    skipped = total - len(todo)
    reuse = bool(reuse_prefix and use_cache and todo and _supports_prefix_reuse(model))
    if reuse:
        model.reserve_cache(max(length for length, _ in todo) + settings.max_new_tokens)
    try:
        for length, depth in todo:
            key = _cell_key(length, depth)
            cells[key] = needle_cell(model, settings, haystack, length, depth,
                                     use_cache=use_cache, reuse_prefix=reuse)
            save()
            if log is not None:
                cell = cells[key]
                log(f"[{len(cells)}/{total}] length {length} depth {depth:g}%: "
                    f"score {cell['score']:.1f} ({cell['tokens']} tokens, "
                    f"{cell['reused_tokens']} reused, {cell['seconds']:.2f} s) "
                    f"{cell['response'][:80]!r}")
    finally:
        if reuse:
            model.clear_cache()
    save()
    if log is not None and skipped:
        log(f"{skipped} cells were already in {path}")
    if plot:
        plot_heatmap(state, out / HEATMAP_NAME, training_length=settings.training_length)
    return state


def _supports_prefix_reuse(model: Any) -> bool:
    """Whether `model` is one of eval/models.py's `CausalLM`s (imported here only when a run
    asks for reuse: this module stays importable without torch-heavy model code)."""
    from megatron_longctx.eval.models import CausalLM

    return isinstance(model, CausalLM)


def needle_cell(model: Any, settings: NeedleSettings, haystack: Any, length: int,
                depth: float, *, use_cache: bool = True,
                reuse_prefix: bool = False) -> dict[str, Any]:
    """One grid cell: insert the needle at `depth` percent of a `length`-token prompt,
    generate greedily, score the response (the results.json cell record; `reused_tokens`:
    prompt tokens taken from the persistent KV cache with `reuse_prefix`)."""
    tokenizer = model.tokenizer
    needle = make_needle(settings, length, depth)
    prompt = build_prompt(haystack, tokenizer, needle, settings.resolved_template(), length,
                          depth)
    start = time.perf_counter()
    if reuse_prefix:
        new_ids = model.generate(prompt.ids, settings.max_new_tokens, reuse_prefix=True)
        reused = int(model.last_reused_tokens)
    else:
        new_ids = model.generate(prompt.ids, settings.max_new_tokens, use_cache=use_cache)
        reused = 0
    seconds = time.perf_counter() - start
    response = tokenizer.decode(new_ids).strip()
    return {
        "length": int(length), "depth": float(depth),
        "tokens": len(prompt.ids), "insertion_token": prompt.insertion_token,
        "haystack_tokens": prompt.haystack_tokens,
        "needle_depth": round(prompt.needle_depth, 3),
        "needle": needle.text, "question": needle.question, "answer": needle.answer,
        "response": response, "generated_tokens": len(new_ids),
        "score": score_response(response, needle.answer), "reused_tokens": reused,
        "seconds": round(seconds, 3),
    }


def length_label(length: int) -> str:
    """Exact below 10,000 tokens (1000, 4256, 2048), else thousands (128K, 13.0K -> 13K)."""
    if length < 10000:
        return str(length)
    return f"{length / 1000:.0f}K"


def plot_heatmap(results: dict[str, Any], path: str | Path, *,
                 training_length: int | None = None, title: str | None = None) -> Path:
    """The paper's heatmap: grid lengths on x, depths on y (0% at the top), score colour
    (red 0 -> yellow -> green 100, missing cells blank), a dashed vertical line at
    `training_length` (interpolated between the columns it falls between; outside the grid's
    lengths the legend says so instead)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LinearSegmentedColormap

    lengths = [int(x) for x in results["settings"]["lengths"]]
    depths = [float(d) for d in results["settings"]["depths"]]
    grid = np.full((len(depths), len(lengths)), np.nan)
    col = {L: i for i, L in enumerate(lengths)}
    row = {_cell_key(0, d)[1]: i for i, d in enumerate(depths)}
    for cell in results.get("cells", []):
        i = row.get(_cell_key(0, cell["depth"])[1])
        j = col.get(int(cell["length"]))
        if i is not None and j is not None:
            grid[i, j] = cell["score"]
    cmap = LinearSegmentedColormap.from_list(
        "needle", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="white")
    width = min(max(6.0, 0.32 * len(lengths) + 3.0), 18.0)
    fig, ax = plt.subplots(figsize=(width, 0.35 * len(depths) + 2.5))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto",
                      interpolation="nearest")
    ax.set_xticks(range(len(lengths)), [length_label(L) for L in lengths], rotation=45,
                  ha="right")
    ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_xticks(np.arange(-0.5, len(lengths)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(depths)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set_xlabel("Token Limit")
    ax.set_ylabel("Depth Percent")
    if training_length is not None and lengths:
        inside = lengths[0] <= training_length <= lengths[-1]
        if inside:
            x = (float(np.interp(training_length, lengths, range(len(lengths))))
                 if len(lengths) > 1 else 0.0)
            ax.axvline(x, color="black", linestyle="--", linewidth=1.5,
                       label=f"training length {training_length:,}")
        else:  # no line outside the grid: say where it is instead
            side = "above" if training_length > lengths[-1] else "below"
            ax.plot([], [], " ", label=f"training length {training_length:,} ({side} the grid)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.12, 1.0), frameon=False, fontsize=8)
    overall = results.get("overall")
    name = Path(str(results.get("model", {}).get("path", "model"))).name
    if title is None:
        score = "n/a" if overall is None else f"{overall:.1f}"
        title = f"Needle in a haystack: {name} (overall {score})"
    ax.set_title(title)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label("Score")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
