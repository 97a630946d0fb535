"""Deterministic synthetic corpus in SlimPajama's record format.

The demo trains a tiny LLaMA and then extends its context; the data-pipeline tests need input
that looks like SlimPajama without downloading it. This module writes such a corpus:

* **Records** are JSON lines ``{"text": ..., "meta": {"redpajama_set_name": NAME}}`` with NAME
  one of the seven SlimPajama sources in `DOMAINS`, in chunk files named like SlimPajama's
  ``chunk_00000.jsonl.zst`` (or ``.jsonl.gz`` / ``.jsonl``).
* **Mixture.** Every domain gets a word budget ``share * total_words`` (`SLIMPAJAMA_SHARES`
  are token shares; one synthetic word is about one token of a small BPE). Document lengths are
  drawn until the budget is reached and the last one is cut to land on it, so the number of
  documents per domain is about ``budget / mean length`` and the word shares match the target
  up to ``min_words`` words per domain.
* **Lengths** are lognormal around ``MEDIAN_TOKENS[domain] * length_scale`` words with sigma
  1.0 (`LENGTH_SIGMA`), rounded and clipped to ``[min_words, max_words]``: documents longer
  than ``4096 * length_scale`` words (the analogue of the paper's 4K-token threshold) hold
  each domain's SlimPajama share of words (`long_token_share`: CommonCrawl 37%, C4 6%,
  Wikipedia 10%, StackExchange and GitHub 14%, Books and ArXiv ~100%; 31% of all, Fu et al.
  2024 report about 30%), so every domain has long documents to upsample, as in the paper.
* **Text** is lowercase ASCII with learnable structure: per domain a small set of sentence
  templates over a fixed vocabulary (about 1,200 word types, see `vocabulary`), sentences
  ending in ``". "``, paragraphs separated by ``"\\n\\n"``; GitHub documents are code that
  defines one-line functions and later asserts correct results of calling them.
* **Long-range structure.** Each prose document draws its own lexicon once
  (`_LEXICON_SUBSETS`): 20 topic nouns (12 of one topic), 16 of the 100 common nouns, 12
  adjectives, 10 + 6 verbs, 6 adverbs, a cast of 4 characters (Books), one entity
  (Wikipedia), and writes every such slot from it with Zipf-like frequencies. Which words a
  document uses is revealed gradually, so a model that reads further back predicts better and
  the loss falls with position, as on real text; code refers back to the functions it defined;
  ArXiv numbers its theorems in order.
* **Long-range retrieval.** Every document of at least `_FACT_MIN_WORDS` words states one
  fact (`FACT_TEMPLATE`: a key and a code word from `FACT_VALUES`) in its first 10% and asks
  about it (`QUESTION_TEMPLATE`, the answer included) once per ~24 words of a near zone after
  the statement (a dense retrieval signal for a short training window) and, in documents of
  160 words or more, again after each of a chain of log-uniform gaps of 64-448 words
  (retrieval over hundreds of tokens with no mention in between, for the extended length). One
  fact per document makes the test the needle test's: find the one code word in the context
  and copy it. `make_fact` and `QUESTION_PROMPT_TEMPLATE` let an evaluation build needle prompts
  in the same phrasing.

Everything is a function of the `CorpusConfig`: numpy generators are seeded from
``(seed, stream, domain)`` so lengths, order and text are independent streams, and
`write_corpus` produces byte-identical files for the same config.

A word here is one whitespace-separated token (``len(text.split())``); punctuation written as a
separate token (``" ."``, ``":"``, ``"?"``) counts as a word.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zstandard

from megatron_longctx.atomic import write_bytes_atomic
from megatron_longctx.config.flags import Flag, option
from megatron_longctx.config.mixture import SLIMPAJAMA_SHARES

__all__ = [
    "COMPRESSIONS",
    "DOMAINS",
    "FACT_KEYS",
    "FACT_TEMPLATE",
    "FACT_VALUES",
    "LENGTH_SIGMA",
    "MEDIAN_TOKENS",
    "QUESTION_PROMPT_TEMPLATE",
    "QUESTION_TEMPLATE",
    "SLIMPAJAMA_SHARES",
    "ZSTD_LEVEL",
    "CorpusConfig",
    "DomainSummary",
    "chunk_name",
    "iter_records",
    "load_corpus_config",
    "long_token_share",
    "make_fact",
    "near_zone",
    "parse_domain_shares",
    "plan_lengths",
    "summarize_plan",
    "vocabulary",
    "write_corpus",
]

# --------------------------------------------------------------------------------------------
# Domains, mixture and length model
# --------------------------------------------------------------------------------------------

#: The seven SlimPajama sources (in the order used for seeding and summaries) and their token
#: shares, defined once in the mixture config.
DOMAINS: tuple[str, ...] = tuple(SLIMPAJAMA_SHARES)

#: Median document length per source in tokens, measured on the real corpus.
MEDIAN_TOKENS: dict[str, int] = {
    "RedPajamaCommonCrawl": 1066,
    "RedPajamaC4": 315,
    "RedPajamaGithub": 520,
    "RedPajamaBook": 121602,
    "RedPajamaArXiv": 14565,
    "RedPajamaWikipedia": 409,
    "RedPajamaStackExchange": 507,
}

#: Sigma of log(length) per source: 1.0 for every source, the one free parameter of the length
#: model, fitted to the one published aggregate. Fu et al. (2024, Figure 2) report that about
#: 30% of SlimPajama's tokens are in documents longer than 4K tokens; with the medians above and
#: sigma 1.0 the model gives 30.9% (`long_token_share`), per source: CommonCrawl 37%, C4 5.9%,
#: GitHub 14%, Books 100%, ArXiv 99%, Wikipedia 9.6%, StackExchange 14%. (Per-source shares are
#: not published; sigma 0.75 gives 17%, 1.25 gives 48%: the fit is tight.) The
#: length-weighted distribution of a lognormal is lognormal with its log-mean shifted by
#: sigma**2.
LENGTH_SIGMA: dict[str, float] = {d: 1.0 for d in MEDIAN_TOKENS}


def long_token_share(domain: str, threshold: float, median: float | None = None) -> float:
    """Share of `domain`'s tokens in documents longer than `threshold` under the length model
    (lognormal around `median`, default `MEDIAN_TOKENS[domain]`, sigma `LENGTH_SIGMA`), before
    clipping to ``[min_words, max_words]``."""
    sigma = LENGTH_SIGMA[domain]
    m = MEDIAN_TOKENS[domain] if median is None else median
    z = (math.log(m) + sigma * sigma - math.log(threshold)) / sigma
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


#: Accepted values of `CorpusConfig.compression` and the chunk-file suffix each one produces.
COMPRESSIONS: dict[str, str] = {"zst": ".jsonl.zst", "gz": ".jsonl.gz", "none": ".jsonl"}

#: zstd level used for every chunk (fixed so that output bytes only depend on the config).
ZSTD_LEVEL = 10
_GZIP_LEVEL = 6

# Independent random streams, combined with the seed (and domain index) in a SeedSequence.
_STREAM_LENGTHS = 0
_STREAM_ORDER = 1
_STREAM_TEXT = 2

# --------------------------------------------------------------------------------------------
# Facts (long-range retrieval)
# --------------------------------------------------------------------------------------------

#: How a fact is stated in a document: a key and its code word (one of `FACT_VALUES`).
FACT_TEMPLATE = "the secret code of {key} is {value} ."
#: How a fact is asked about later in the same document (the answer follows in the text).
QUESTION_TEMPLATE = "question : what is the secret code of {key} ? answer : {value} ."
#: The question up to the answer, for building retrieval prompts whose completion is the value.
QUESTION_PROMPT_TEMPLATE = "question : what is the secret code of {key} ? answer :"


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


#: The 100 fact keys. None of them occurs anywhere else in the vocabulary.
FACT_KEYS: tuple[str, ...] = _words(
    """
    falcon tiger eagle otter badger heron lynx panther cobra raven sparrow beaver bison camel
    cheetah condor coyote crane dingo dolphin donkey ferret finch flamingo gazelle gecko gibbon
    giraffe gorilla hamster hawk hedgehog hornet hyena ibis iguana impala jackal jaguar kestrel
    koala lemur leopard lizard llama lobster macaw magpie mantis marmot meerkat mink mole
    mongoose moose narwhal newt ocelot octopus orca osprey ostrich panda parrot pelican penguin
    pheasant pigeon piranha puffin quail raccoon rhino salmon scorpion seal shark skunk
    sloth snail spider squid stork swan tapir termite toucan trout tuna turtle viper vulture
    walrus weasel whale wombat yak zebra alpaca buffalo
    """
)

#: The 122 code words (fact values). None of them occurs anywhere else in the vocabulary, and
#: each is frequent enough in the corpus to become one token of the demo's BPE (4,096 types).
#: A value that is one distinctive token can be retrieved by a single attention head that
#: finds it wherever it is and copies it; 4-digit values were one or two tokens shared with
#: the prose's numbers, and the demo's tiny model never learned to copy them
#: (docs/demo.md, "What the retrieval experiments showed").
FACT_VALUES: tuple[str, ...] = _words(
    """
    amber azure beige bronze cobalt copper coral crimson cyan ebony emerald fuchsia garnet
    ginger gold indigo ivory jade khaki lavender lemon lilac lime magenta maroon mauve mint navy
    ochre onyx opal orchid peach pearl plum quartz ruby rust saffron sapphire scarlet sepia
    silver slate tan teal topaz turquoise umber vanilla violet walnut wheat zinc agate basil
    brass cedar chrome citrine clove cocoa cotton denim flax granite graphite hazel honey iron
    jasper kelp linen lotus marble mustard nickel nutmeg obsidian oak pewter pine platinum
    poppy sable sage sienna steel suede tin titan tulip velvet willow wool almond anise cinder
    dune ember fern frost glacier juniper kiwi lagoon maple mocha nectar orbit pebble prism
    quill raisin reef sorrel spruce thistle tundra vapor zephyr acorn
    """
)

# One fact per document of at least this many words (statement plus one question: 21 words).
_FACT_MIN_WORDS = 32
# Where the statement falls (`fact_head`): in the first _FACT_HEAD of a short document (so the
# near zone after it is most of the document), anywhere in the first _FACT_SPREAD of a longer
# one, at most _FACT_SPREAD_MAX_WORDS in. A long document's dense questions then start at a
# random place, not always at its beginning: averaged over documents the question density
# rises over the first few hundred words and then stays flat, as retrievable repeats do in
# real text, instead of being highest at the start. With every statement in the first 10%,
# the held-out loss by position of a model trained at 512 tokens rose by 0.5 nats from
# positions 128-256 to 256-512 (the near zone ends there); see docs/demo.md.
_FACT_HEAD = 0.1
_FACT_SPREAD = 0.5
_FACT_SPREAD_MAX_WORDS = 400
# Near questions: one per _WORDS_PER_QUESTION words of the near zone, which follows the
# statement: the rest of a short document, at most _NEAR_SHARE of a long one and at most
# _NEAR_MAX_WORDS words. This dense signal is what lets a 64-token stage 1 learn retrieval in
# ~2M tokens: with one question per 48 words it had not begun at 3.3M (docs/demo.md).
_WORDS_PER_QUESTION = 24
_NEAR_SHARE = 0.4
_NEAR_MAX_WORDS = 240
# Far questions: after the near zone, a chain of questions with log-uniform gaps of
# _FAR_MIN_GAP to _FAR_MAX_GAP words to the previous mention of the value, up to the end of the
# document: retrieval over hundreds of tokens with no mention in between, in every window of a
# long document, which is what the extended-length stage trains and the needle test measures.
_FAR_MIN_WORDS = 160
_FAR_MIN_GAP = 64
_FAR_MAX_GAP = 448
# The first near question comes at least this many words after the statement.
_MIN_DISTANCE = 4


def near_zone(n_words: int) -> float:
    """Words of the near zone of a document of `n_words` words: the rest of a document under
    160 words, else 40% of it up to 240 words (one near question per 24 of these words)."""
    if n_words < _FAR_MIN_WORDS:
        return float(n_words)
    return min(_NEAR_SHARE * n_words, _NEAR_MAX_WORDS)


def fact_head(n_words: int) -> float:
    """Words of a document of `n_words` words within which its fact is stated (uniformly):
    10% of a document under 160 words, else half of it up to 400 words."""
    if n_words < _FAR_MIN_WORDS:
        return _FACT_HEAD * n_words
    return min(_FACT_SPREAD * n_words, _FACT_SPREAD_MAX_WORDS)


def make_fact(rng: np.random.Generator) -> tuple[str, str]:
    """Draw one fact: a key from `FACT_KEYS` and a code word from `FACT_VALUES`.

    Args:
        rng: numpy generator to draw from (two draws).

    Returns:
        ``(key, value)`` exactly as written in the text, e.g. ``("falcon", "amber")``. Use
        ``FACT_TEMPLATE.format(key=key, value=value)`` to state it.
    """
    key = FACT_KEYS[int(rng.integers(len(FACT_KEYS)))]
    value = FACT_VALUES[int(rng.integers(len(FACT_VALUES)))]
    return key, value


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def parse_domain_shares(spec: str) -> dict[str, float]:
    """Parse ``--domain-shares`` text such as ``"Book=0.5,ArXiv=0.3,C4=0.2"``.

    Names may be given in full (``RedPajamaBook``) or without the ``RedPajama`` prefix, in any
    case. Domains not listed get share 0.

    Args:
        spec: Comma-separated ``NAME=SHARE`` pairs.

    Returns:
        Mapping from full domain name to share.

    Raises:
        ValueError: naming ``--domain-shares`` on a malformed pair or an unknown domain.
    """
    by_lower = {d.lower(): d for d in DOMAINS}
    by_lower.update({d[len("RedPajama") :].lower(): d for d in DOMAINS})
    shares: dict[str, float] = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        name, sep, value = item.partition("=")
        domain = by_lower.get(name.strip().lower())
        if not sep or domain is None:
            raise ValueError(
                f"--domain-shares: cannot parse {item.strip()!r}; expected NAME=SHARE with NAME "
                f"one of {', '.join(d[len('RedPajama') :] for d in DOMAINS)}"
            )
        try:
            shares[domain] = float(value)
        except ValueError:
            raise ValueError(f"--domain-shares: share {value.strip()!r} is not a number") from None
    if not shares:
        raise ValueError("--domain-shares: no NAME=SHARE pairs given")
    return shares


def _default_shares() -> dict[str, float]:
    return dict(SLIMPAJAMA_SHARES)


@dataclass
class CorpusConfig:
    """Everything the corpus depends on; the same config always gives the same bytes.

    Attributes:
        total_words: Word budget of the whole corpus (``--total-words``).
        seed: Seed of every random stream (``--seed``), >= 0.
        length_scale: Multiplies the real median token counts to get median words per
            document (``--length-scale``); 1/16 keeps the demo small.
        min_words: Shortest document in words (``--min-words``).
        max_words: Longest document in words (``--max-words``).
        domain_shares: Target share of words per domain (``--domain-shares``); missing domains
            get 0 and shares are normalised to sum to 1.
        num_files: Number of chunk files (``--num-files``).
        compression: ``"zst"``, ``"gz"`` or ``"none"`` (``--compression``).
    """

    total_words: int = option(2_000_000, Flag("--total-words", "word budget of the whole corpus"))
    seed: int = option(1234, Flag("--seed", "seed of every random stream"))
    length_scale: float = option(1 / 16, Flag(
        "--length-scale", "median words per document = real median tokens * this"))
    min_words: int = option(8, Flag("--min-words", "shortest document in words"))
    max_words: int = option(60_000, Flag("--max-words", "longest document in words"))
    domain_shares: dict[str, float] = option(default_factory=_default_shares, flag=Flag(
        "--domain-shares", "target word shares, e.g. 'Book=0.5,ArXiv=0.5'",
        parse=parse_domain_shares, metavar="NAME=SHARE,...", default_help="SlimPajama's shares"))
    num_files: int = option(4, Flag("--num-files", "number of chunk files"))
    compression: str = option("zst", Flag(
        "--compression", "chunk compression", choices=tuple(COMPRESSIONS)))

    def validate(self) -> CorpusConfig:
        """Check every field.

        Returns:
            The config itself, so that ``config.validate()`` can be chained.

        Raises:
            ValueError: naming the command-line flag of the first invalid field.
        """
        for name, flag in (
            ("total_words", "--total-words"),
            ("seed", "--seed"),
            ("min_words", "--min-words"),
            ("max_words", "--max-words"),
            ("num_files", "--num-files"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | np.integer):
                raise ValueError(f"{flag} must be an integer, got {value!r}")
        if self.total_words < 1:
            raise ValueError(f"--total-words must be >= 1, got {self.total_words}")
        if self.seed < 0:
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if not isinstance(self.length_scale, int | float) or not (
            math.isfinite(self.length_scale) and self.length_scale > 0
        ):
            raise ValueError(
                f"--length-scale must be a finite number > 0, got {self.length_scale!r}"
            )
        if self.min_words < 1:
            raise ValueError(f"--min-words must be >= 1, got {self.min_words}")
        if self.max_words < self.min_words:
            raise ValueError(
                f"--max-words must be >= --min-words ({self.min_words}), got {self.max_words}"
            )
        if self.num_files < 1:
            raise ValueError(f"--num-files must be >= 1, got {self.num_files}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"--compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if not isinstance(self.domain_shares, Mapping):
            raise ValueError("--domain-shares must map domain names to shares")
        for name, share in self.domain_shares.items():
            if name not in DOMAINS:
                raise ValueError(
                    f"--domain-shares: unknown domain {name!r} (expected one of "
                    f"{', '.join(DOMAINS)})"
                )
            if (
                isinstance(share, bool)
                or not isinstance(share, int | float)
                or not math.isfinite(share)
                or share < 0
            ):
                raise ValueError(f"--domain-shares: share of {name} must be >= 0, got {share!r}")
        if sum(self.domain_shares.values()) <= 0:
            raise ValueError("--domain-shares must give at least one domain a share > 0")
        return self

    def normalized_shares(self) -> dict[str, float]:
        """Shares of all seven domains (0 where missing), normalised to sum to 1."""
        total = float(sum(self.domain_shares.values()))
        return {d: float(self.domain_shares.get(d, 0.0)) / total for d in DOMAINS}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of the fields, with `domain_shares` listing all seven domains."""
        out = dataclasses.asdict(self)
        out["domain_shares"] = {d: float(self.domain_shares.get(d, 0.0)) for d in DOMAINS}
        return out


def load_corpus_config(path: str | os.PathLike[str]) -> CorpusConfig:
    """Read the ``corpus_config.json`` written by `write_corpus`.

    Args:
        path: The JSON file.

    Returns:
        The validated config it describes.
    """
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return CorpusConfig(**data).validate()


# --------------------------------------------------------------------------------------------
# Lengths
# --------------------------------------------------------------------------------------------


def _rng(config: CorpusConfig, stream: int, domain_index: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([config.seed, stream, domain_index]))


def _domain_lengths(config: CorpusConfig, index: int, budget: int) -> np.ndarray:
    """Draw one domain's document lengths until they sum to `budget` (last one cut)."""
    if budget <= 0:
        return np.zeros(0, dtype=np.int64)
    domain = DOMAINS[index]
    rng = _rng(config, _STREAM_LENGTHS, index)
    median = max(MEDIAN_TOKENS[domain] * config.length_scale, 1.0)
    sigma = LENGTH_SIGMA[domain]
    mean = min(max(median * math.exp(sigma * sigma / 2), config.min_words), config.max_words)
    parts: list[np.ndarray] = []
    done = 0
    while done < budget:
        n = int(1.1 * (budget - done) / mean) + 16
        draw = rng.lognormal(math.log(median), sigma, size=n)
        x = np.clip(np.rint(draw), config.min_words, config.max_words).astype(np.int64)
        ends = done + np.cumsum(x)
        k = int(np.searchsorted(ends, budget))  # first document reaching the budget
        if k < n:
            x = x[: k + 1]
            x[k] = budget - (ends[k - 1] if k > 0 else done)
            parts.append(x)
            break
        parts.append(x)
        done = int(ends[-1])
    lengths = np.concatenate(parts)
    if lengths[-1] < config.min_words:
        if len(lengths) > 1:
            lengths = lengths[:-1]  # drop the stub: the domain falls short by < min_words
        else:
            lengths[-1] = config.min_words  # budget below min_words: one minimal document
    return lengths


def plan_lengths(config: CorpusConfig) -> dict[str, np.ndarray]:
    """Word count of every document, per domain, in generation order.

    `iter_records` writes exactly these lengths (``len(text.split())``), so corpus statistics
    can be computed without generating text.

    Args:
        config: The corpus config (validated here).

    Returns:
        For each of the seven domains (also those with share 0) an int64 array of lengths.
    """
    config.validate()
    shares = config.normalized_shares()
    return {
        d: _domain_lengths(config, i, int(round(shares[d] * config.total_words)))
        for i, d in enumerate(DOMAINS)
    }


def _document_order(config: CorpusConfig, plan: Mapping[str, np.ndarray]) -> np.ndarray:
    counts = [len(plan[d]) for d in DOMAINS]
    order = np.repeat(np.arange(len(DOMAINS)), counts)
    return _rng(config, _STREAM_ORDER).permutation(order)


@dataclass(frozen=True)
class DomainSummary:
    """Length statistics of one domain of a planned corpus (lengths in words)."""

    domain: str
    documents: int
    words: int
    word_share: float
    median_words: float
    long_threshold: int
    long_word_share: float


def summarize_plan(
    config: CorpusConfig, long_threshold: int | None = None
) -> dict[str, DomainSummary]:
    """Per-domain statistics of the corpus `config` describes.

    Args:
        config: The corpus config.
        long_threshold: Documents longer than this many words count as long; default
            ``round(4096 * length_scale)``, the paper's 4K-token threshold at this scale.

    Returns:
        A `DomainSummary` per domain, in `DOMAINS` order.
    """
    plan = plan_lengths(config)
    if long_threshold is None:
        long_threshold = max(1, round(4096 * config.length_scale))
    total = sum(int(x.sum()) for x in plan.values())
    out: dict[str, DomainSummary] = {}
    for d in DOMAINS:
        x = plan[d]
        words = int(x.sum())
        out[d] = DomainSummary(
            domain=d,
            documents=len(x),
            words=words,
            word_share=words / total if total else 0.0,
            median_words=float(np.median(x)) if len(x) else 0.0,
            long_threshold=long_threshold,
            long_word_share=float(x[x > long_threshold].sum()) / words if words else 0.0,
        )
    return out


# --------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------

_TOPICS: tuple[str, ...] = (
    # nature
    "bird fox wolf bear deer rabbit owl stream meadow leaf branch flower seed root cloud storm "
    "rain snow wind pond",
    # cooking
    "soup bread salt pepper onion garlic oven pan knife spoon plate sauce butter flour sugar "
    "cheese recipe kitchen dinner lunch",
    # travel
    "train station ticket airport hotel map suitcase passport journey route coast island "
    "harbor border tourist guide museum beach valley trail",
    # technology
    "computer server network screen keyboard program system device battery cable signal "
    "memory disk phone camera robot sensor chip printer router",
    # sports
    "ball goal match player coach stadium season league score team race runner bike helmet "
    "court net trophy referee fan medal",
    # health
    "doctor nurse patient hospital medicine fever heart blood bone muscle diet sleep pain "
    "clinic vaccine cough skin health exercise vitamin",
    # business
    "market price customer company product sale contract budget profit bank loan tax office "
    "manager worker meeting report client brand store",
    # home
    "house garden window door roof floor wall chair table lamp carpet closet garage yard "
    "fence stair bedroom sofa mirror shelf",
)
_TOPIC_SIZE = 20

_CATEGORIES: dict[str, str] = {
    "det": "the a this that every each some one another no",
    "pron": "they we you she he it i",
    "interj": "yes indeed right okay sure well true agreed fine exactly",
    "adj": (
        "old new small large big little long short high low good bad great poor early late "
        "young strong weak quick slow bright dark green red blue white black warm cold hot cool "
        "soft hard simple clear quiet loud heavy light deep wide narrow rich fresh clean dry wet "
        "open free full empty main local public private common rare real final first last next "
        "certain whole special major minor basic modern ancient famous happy sad calm busy safe "
        "wild kind brave proud gentle careful useful strange familiar similar different "
        "important"
    ),
    "noun": (
        "time year day week month way thing man woman child people world life hand part place "
        "case point group number problem fact home room road street city town country river sea "
        "lake hill mountain tree forest field farm school book letter story word name friend "
        "family mother father brother sister teacher student king queen village shop bed car "
        "boat ship bridge light fire water stone wood paper food music song game idea plan "
        "reason result change power money work job club party morning evening night summer "
        "winter spring"
    ),
    "vt": (
        "saw found took made gave kept built moved opened closed carried sold bought held left "
        "brought watched painted cleaned fixed broke followed visited helped called chose needed "
        "wanted liked loved used read wrote checked changed covered filled lifted pulled pushed "
        "shared started stopped"
    ),
    "vi": (
        "slept arrived left waited laughed smiled worked stayed returned fell rose ran walked grew "
        "changed rested failed won lost appeared vanished sang danced spoke listened"
    ),
    "vtp": (
        "install remove update configure convert parse sort find read write open close delete "
        "create copy move check fix build run"
    ),
    "adv": (
        "slowly quickly quietly often never always soon later again still already nearly really "
        "simply clearly finally suddenly carefully gently openly"
    ),
    "prep": (
        "in on at near under over behind beside across through into from with without for about "
        "after before around along"
    ),
    "conj": "and but while because so although when since after before until",
    "char": (
        "anna ben clara david emma felix grace henry iris jack kate leo maria noah olive peter "
        "rose sam tara victor will zoe adam bella carl diana eric fiona george helen ivan julia "
        "kevin laura mark nina oscar paula ruth simon"
    ),
    "place": (
        "paris london rome berlin madrid vienna oslo cairo lima tokyo delhi boston denver dublin "
        "geneva lisbon milan prague seoul sydney toronto warsaw athens bergen chester dover "
        "exeter harlow ipswich kendal leeds morton newport oxford preston reading salford truro "
        "wells york"
    ),
    "ent": (
        "ashford brampton caldwell dunmore elmstead fairhaven glenrock hartwell ivybridge "
        "kingsbury lakemoor marlow northgate oakridge pembury queensford redhill stanmore "
        "thornbury upwood valemont westbrook yarwood ambleside bexley carrow dunfield eastwick "
        "foxley greystone"
    ),
    "wnoun": (
        "city town village river castle church school university company museum bridge station "
        "district island region"
    ),
    "wsec": (
        "history geography culture economy education transport climate demographics sports politics"
    ),
    "vpass": "founded built opened named established completed destroyed restored renamed expanded",
    "month": (
        "january february march april may june july august september october november december"
    ),
    "tech": (
        "python linux windows excel java bash git docker mysql javascript android ubuntu vim "
        "emacs latex"
    ),
    "mnoun": (
        "set group graph function space matrix vector field ring module operator sequence series "
        "measure map algebra manifold curve surface bound norm kernel basis domain"
    ),
    "madj": (
        "finite compact linear convex smooth bounded continuous abelian normal regular dense "
        "closed discrete random stable uniform positive complex real countable"
    ),
    "var": "x y z n m k f g",
    "vmath": "proves implies shows gives yields defines bounds extends",
    "num": " ".join(str(i) for i in range(1, 100)),
    "day": " ".join(str(i) for i in range(1, 29)),
    "year": " ".join(str(i) for i in range(1800, 2021)),
}
#: Words a document draws per category (`_DocumentWriter._document_lexicon`); categories not
#: listed use their whole list. Topic nouns: `_TOPIC_CORE` from one topic, the rest from any.
_LEXICON_SUBSETS: dict[str, int] = {
    "tnoun": 20, "noun": 16, "adj": 12, "vt": 10, "vi": 6, "adv": 6, "char": 4, "ent": 1,
    "place": 3, "mnoun": 8, "madj": 6, "tech": 2, "wnoun": 4,
}
_TOPIC_CORE = 12
_COUNTERS = ("count1", "count2")  # categories rendered as 1, 2, 3, ... within a document

_CODE_MODULES = _words("os sys math json re time random itertools collections typing")
_CODE_COMMENT_WORDS = _words(
    "compute return the value of x for each item in list check if input is valid add a small "
    "offset to result helper used by tests below simple function convert number into index "
    "keep this fast"
)
_CODE_NUM_FUNCS = 30
_CODE_OPS = ("+", "-", "*")


class _Lexicon:
    """Word categories stored as contiguous ranges of one word array (plus '.'-variants)."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.ids: dict[str, int] = {}
        self.starts: list[int] = []
        self.sizes: list[int] = []

    def _register(self, name: str, words: list[str]) -> int:
        self.ids[name] = len(self.starts)
        self.starts.append(len(self.words))
        self.sizes.append(len(words))
        self.words.extend(words)
        return self.ids[name]

    def add(self, name: str, words: list[str]) -> None:
        self._register(name, words)
        self._register(name + ".", [w + "." for w in words])

    def category(self, token: str) -> int:
        """Category id of a template token: ``<name>``, ``<name>.`` or a literal word."""
        if token.startswith("<"):
            name = token[1:].replace(">", "")
            if name not in self.ids:
                raise KeyError(f"unknown template category {token!r}")
            return self.ids[name]
        name = "'" + token
        if name not in self.ids:
            self._register(name, [token])
        return self.ids[name]


_LEX = _Lexicon()
for _name, _words in _CATEGORIES.items():
    _LEX.add(_name, _words.split())
_LEX.add("tnoun", " ".join(_TOPICS).split())
for _name in _COUNTERS:
    _LEX.add(_name, [str(i) for i in range(1, 100)])
assert all(len(t.split()) == _TOPIC_SIZE for t in _TOPICS)
assert all(len(_CATEGORIES[c].split()) >= k for c, k in _LEXICON_SUBSETS.items() if c != "tnoun")


@dataclass(frozen=True)
class _Template:
    """A compiled sentence template: one category id per word."""

    cats: np.ndarray
    n: int
    head: bool  # starts a paragraph
    alone: bool  # is a paragraph of its own (heading)


def _compile(template: str) -> _Template:
    tokens = template.split()
    head = alone = False
    if tokens[0] == "^":
        head, tokens = True, tokens[1:]
    elif tokens[0] == "=":
        head = alone = True
        tokens = tokens[1:]
    cats = np.array([_LEX.category(t) for t in tokens], dtype=np.int64)
    return _Template(cats=cats, n=len(tokens), head=head, alone=alone)


@dataclass(frozen=True)
class _Style:
    """Templates of one prose domain: weighted body templates, optional opening, paragraphs."""

    templates: tuple[_Template, ...]
    cum_weights: np.ndarray
    opening: tuple[_Template, ...]
    paragraph: tuple[int, int]  # min, max sentences per paragraph
    mean_len: float


def _style(body: list[tuple[str, float]], opening: list[str], paragraph: tuple[int, int]) -> _Style:
    templates = tuple(_compile(t) for t, _ in body)
    weights = np.array([w for _, w in body], dtype=np.float64)
    cum = np.cumsum(weights / weights.sum())
    cum[-1] = 1.0
    mean_len = float(sum(t.n * w for t, w in zip(templates, weights / weights.sum())))
    return _Style(templates, cum, tuple(_compile(t) for t in opening), paragraph, mean_len)


# Exact-length fillers: _FILLERS[n] has n words. They close a document on its word budget.
_FILLER_TEXT = (
    "<interj>.",
    "<pron> <vi>.",
    "<det> <noun> <vi>.",
    "<det> <adj> <tnoun> <vi>.",
    "<det> <tnoun> <vt> <det> <noun>.",
    "<det> <adj> <noun> <vt> <det> <tnoun>.",
    "<det> <adj> <tnoun> <vt> <det> <adj> <noun>.",
    "<det> <noun> <vt> <det> <tnoun> <prep> <det> <noun>.",
    "<det> <adj> <tnoun> <vt> <det> <noun> <prep> <det> <noun>.",
    "<det> <adj> <noun> <vt> <det> <adj> <tnoun> <prep> <det> <noun>.",
    "<det> <adj> <tnoun> <adv> <vt> <det> <adj> <noun> <prep> <det> <noun>.",
    "<det> <adj> <tnoun> <vt> <det> <noun> <conj> <det> <adj> <noun> <vi> <adv>.",
)
_FILLERS: tuple[_Template | None, ...] = (None, *(_compile(t) for t in _FILLER_TEXT))
_FILL_MAX = len(_FILLER_TEXT)

_PROSE = [
    ("<det> <adj> <tnoun> <vt> <det> <noun> <prep> <det> <tnoun>.", 3.0),
    ("<pron> <vt> <det> <adj> <tnoun> <prep> <det> <noun>.", 3.0),
    ("<det> <tnoun> <vi> <adv> <conj> <det> <noun> <vt> <det> <adj> <tnoun>.", 2.0),
    ("<pron> <adv> <vt> <det> <tnoun>.", 2.0),
    ("there was <det> <adj> <tnoun> <prep> <det> <noun>.", 1.5),
    ("<det> <noun> <prep> <det> <tnoun> was <adj>.", 1.5),
    ("<det> <adj> <tnoun> <vt> <det> <adj> <noun>.", 1.0),
]

_STYLES: dict[str, _Style] = {
    "RedPajamaCommonCrawl": _style(
        [
            *_PROSE,
            ("click here to <vtp> <det> <tnoun>.", 0.6),
            ("share this <noun> with <det> <adj> <noun>.", 0.4),
            ("= posted on <month> <day> , <year>", 0.3),
            ("= home | about | contact | <tnoun>", 0.2),
        ],
        [],
        (2, 6),
    ),
    "RedPajamaC4": _style(
        [
            *_PROSE,
            ("we <vt> <det> <adj> <tnoun> and it was <adj>.", 1.5),
            ("call us today to <vtp> <det> <adj> <tnoun>.", 0.8),
            ("i <adv> <vt> this <tnoun>.", 1.0),
        ],
        [],
        (2, 5),
    ),
    "RedPajamaBook": _style(
        [
            ("<char> <vt> <det> <tnoun>.", 2.0),
            ("<char> <vi> <adv>.", 1.5),
            ("<char> and <char> <vt> <det> <adj> <noun> <prep> <det> <tnoun>.", 2.0),
            ("<pron> <vt> <det> <noun> <prep> <det> <tnoun>.", 2.0),
            ("it was <det> <adj> <noun>.", 1.0),
            ("<char> said that <det> <tnoun> was <adj>.", 1.5),
            ("= chapter <count1>", 0.08),
            *_PROSE[:3],
        ],
        ["= chapter <count1>"],
        (4, 10),
    ),
    "RedPajamaWikipedia": _style(
        [
            ("it was <vpass> in <year>.", 1.5),
            ("in <year> , <ent> <vt> <det> <adj> <tnoun>.", 1.5),
            ("<ent> has <det> population of <num> thousand.", 0.7),
            ("the <wnoun> of <ent> <vt> <det> <noun>.", 1.5),
            ("= <wsec>", 0.25),
            *_PROSE[:2],
            _PROSE[5],
        ],
        ["= <ent>", "<ent> is <det> <adj> <wnoun> in <place>."],
        (3, 6),
    ),
    "RedPajamaArXiv": _style(
        [
            ("= section <count1> <mnoun>", 0.15),
            ("^ theorem <count2> .", 0.6),
            ("^ lemma <count2> .", 0.5),
            ("let <var> be <det> <madj> <mnoun>.", 2.0),
            ("then <var> is <madj>.", 1.5),
            ("we have <var> = <var> + <num>.", 1.5),
            ("^ proof .", 0.6),
            ("this <vmath> that <var> is <madj>.", 1.5),
            ("by lemma <num> , <var> is <madj>.", 1.0),
            ("hence <var> <vmath> <det> <madj> <mnoun> on <var>.", 1.0),
        ],
        ["= abstract", "we study <madj> <mnoun> of <madj> <mnoun>."],
        (2, 6),
    ),
    "RedPajamaStackExchange": _style(
        [
            ("i tried to <vtp> the <tnoun> but it <vi>.", 2.0),
            ("the <tnoun> is <adj> and the <noun> is <adj>.", 1.5),
            ("^ answer : you can <vtp> the <tnoun> with <tech>.", 1.0),
            ("use <det> <adj> <tnoun> instead.", 1.5),
            ("this <vt> <det> <tnoun> for me.", 1.0),
            ("^ comment : thanks , that <vi>.", 0.4),
        ],
        ["question : how do i <vtp> <det> <tnoun> in <tech> ?"],
        (2, 5),
    ),
}

_WORDS = np.array(_LEX.words, dtype=object)
_STARTS = np.array(_LEX.starts, dtype=np.int64)
_SIZES = np.array(_LEX.sizes, dtype=np.int64)
_COUNTER_IDS = tuple(_LEX.ids[c] for c in _COUNTERS)
_NUM_START = _LEX.starts[_LEX.ids["num"]]  # words "1".."99"


def vocabulary() -> frozenset[str]:
    """Every word type the generator can write, except code tokens.

    Returns:
        Word types without a trailing period (prose writes ``"mat."`` for the word ``mat`` at
        the end of a sentence). Code identifiers such as ``f_12(x):`` and small numbers in
        code are not included.
    """
    words = {w.rstrip(".") or w for w in _LEX.words}
    words.update(FACT_KEYS)
    words.update(FACT_VALUES)
    for text in (FACT_TEMPLATE, QUESTION_TEMPLATE):
        words.update(t for t in text.split() if not t.startswith("{"))
    words.update(_CODE_MODULES)
    words.update(_CODE_COMMENT_WORDS)
    words.update(("#", "import", "def", "return", "assert", "==", "pass", "x"))
    return frozenset(words)


# --------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------

_FACT_WORDS = len(FACT_TEMPLATE.format(key="k", value="1000").split())
_QUESTION_WORDS = len(QUESTION_TEMPLATE.format(key="k", value="1000").split())


class _DocumentWriter:
    """Writes the documents of one domain from that domain's own random stream."""

    def __init__(self, config: CorpusConfig, index: int) -> None:
        self.domain = DOMAINS[index]
        self.rng = _rng(config, _STREAM_TEXT, index)
        self.code = self.domain == "RedPajamaGithub"
        self.style = None if self.code else _STYLES[self.domain]
        self.fact_prefix = "# " if self.code else ""

    def document(self, n_words: int) -> str:
        """Return one document of exactly `n_words` whitespace-separated words."""
        facts, fact_words = self._plan_facts(n_words)
        body_words = n_words - fact_words
        if self.code:
            units, starts, glued = self._code_body(body_words)
        else:
            units, starts, glued = self._prose_body(body_words)
        if facts:
            self._insert_facts(units, starts, glued, facts, body_words)
        paragraphs: list[str] = []
        current: list[str] = []
        joiner = "\n" if self.code else " "
        for unit, start in zip(units, starts):
            if start and current:
                paragraphs.append(joiner.join(current))
                current = []
            current.append(unit)
        if current:
            paragraphs.append(joiner.join(current))
        return "\n\n".join(paragraphs)

    # -- facts ---------------------------------------------------------------------------------

    def _plan_facts(
        self, n_words: int
    ) -> tuple[list[tuple[str, str, float, int, list[float]]], int]:
        """Choose the document's fact as (key, value, statement offset, near questions, far
        question offsets); return it (nothing for documents under `_FACT_MIN_WORDS` words) and
        the words it takes.

        The statement offset (uniform within `fact_head`) and the far offsets (after the near
        zone) are fractions of the document's length."""
        if n_words < _FACT_MIN_WORDS:
            return [], 0
        stated = self.rng.random() * fact_head(n_words)
        zone = near_zone(n_words)
        near = max(int(zone // _WORDS_PER_QUESTION), 1)
        far: list[float] = []
        if n_words >= _FAR_MIN_WORDS:
            at = stated + zone
            while True:
                at += math.exp(self.rng.uniform(math.log(_FAR_MIN_GAP), math.log(_FAR_MAX_GAP)))
                if at >= n_words:
                    break
                far.append(at / n_words)
        prefix = len(self.fact_prefix.split())
        key, value = make_fact(self.rng)
        return [(key, value, stated / n_words, near, far)], _FACT_WORDS + prefix + (
            near + len(far)) * (
            _QUESTION_WORDS + prefix)

    def _insert_facts(
        self,
        units: list[str],
        starts: list[bool],
        glued: list[bool],
        facts: list[tuple[str, str, float, int, list[float]]],
        body_words: int,
    ) -> None:
        """Insert the statement and the questions after it, at sentence (line) boundaries.

        The statement falls where `_plan_facts` put it (`fact_head`), the near questions at
        uniform positions of the near zone after it, the far ones where `_plan_facts` put them
        (see the constants). A fact never goes right after a unit glued to its successor (a
        heading, a comment and ``def`` line of a function); it moves past the glued run instead.
        """
        ends = np.cumsum([len(u.split()) for u in units]) if units else np.zeros(0)
        inserts: list[tuple[int, int, int, str]] = []
        for j, (key, value, head, near, far) in enumerate(facts):
            stated = head * body_words
            zone = min(near_zone(body_words), body_words - stated)
            asked = list(stated + _MIN_DISTANCE + self.rng.random(near) * max(
                zone - _MIN_DISTANCE, 0))
            asked += [f * body_words for f in far]
            inserts.append((int(stated), 0, j, FACT_TEMPLATE.format(key=key, value=value)))
            question = QUESTION_TEMPLATE.format(key=key, value=value)
            inserts.extend((int(min(pos, body_words)), 1, j, question) for pos in asked)
        # Index = number of units that end at or before the position; statements of a fact come
        # before its questions at the same index (positions are never smaller). Moving indices
        # past glued units is monotone, so that order survives.
        placed = []
        for pos, kind, j, text in inserts:
            index = int(np.searchsorted(ends, pos, side="right"))
            while 0 < index < len(units) and glued[index - 1]:
                index += 1
            placed.append((index, kind, j, text))
        placed.sort()
        for index, _, _, text in reversed(placed):
            after_heading = index > 0 and glued[index - 1]  # only possible at the very end
            units.insert(index, self.fact_prefix + text)
            starts.insert(index, after_heading)
            glued.insert(index, False)
        if starts:
            starts[0] = True

    # -- prose ---------------------------------------------------------------------------------

    def _prose_body(self, n_words: int) -> tuple[list[str], list[bool], list[bool]]:
        """Sentences of exactly `n_words` words, paragraph-start flags, heading (glue) flags."""
        style = self.style
        assert style is not None
        rng = self.rng
        chosen: list[_Template] = []
        remaining = n_words
        for template in style.opening:
            if template.n <= remaining:
                chosen.append(template)
                remaining -= template.n
        picks = np.zeros(0, dtype=np.int64)
        i = 0
        while remaining > 0:
            if i == len(picks):
                picks = np.searchsorted(
                    style.cum_weights, rng.random(int(remaining / style.mean_len) + 8), side="right"
                )
                i = 0
            template = style.templates[picks[i]]
            i += 1
            if template.n > remaining:
                template = _FILLERS[min(remaining, _FILL_MAX)]
                assert template is not None
            chosen.append(template)
            remaining -= template.n
        if not chosen:
            return [], [], []

        # Per-document lexicon (`_document_lexicon`): most content words come from subsets the
        # document draws once, so every word seen tells a reader more about the ones to come.
        cats = np.concatenate([t.cats for t in chosen])
        # u**1.5 skews every category towards its first words (a rough Zipf shape).
        ranks = rng.random(len(cats)) ** 1.5
        ids = _STARTS[cats] + (ranks * _SIZES[cats]).astype(np.int64)
        for cat, chosen_ids in self._document_lexicon().items():
            mask = cats == cat
            if mask.any():
                ids[mask] = chosen_ids[(ranks[mask] * len(chosen_ids)).astype(np.int64)]
        for counter in _COUNTER_IDS:
            mask = cats == counter
            if mask.any():
                ids[mask] = _NUM_START + np.arange(int(mask.sum())) % 99
        words = _WORDS[ids].tolist()

        units: list[str] = []
        paragraph_starts: list[bool] = []
        low, high = style.paragraph
        lengths = rng.integers(low, high + 1, size=len(chosen) // low + 2)
        para = 0
        in_paragraph = 0
        force = True
        pos = 0
        for template in chosen:
            units.append(" ".join(words[pos : pos + template.n]))
            pos += template.n
            start = force or template.head or in_paragraph >= lengths[para % len(lengths)]
            if start:
                para += 1
                in_paragraph = 0
            paragraph_starts.append(start)
            in_paragraph += 1
            force = template.alone
        return units, paragraph_starts, [t.alone for t in chosen]

    def _document_lexicon(self) -> dict[int, np.ndarray]:
        """This document's own words: category id -> word ids, in Zipf rank order.

        Per `_LEXICON_SUBSETS`: topic nouns are `_TOPIC_CORE` of one topic's 20 plus the rest
        from all topics; other categories a random subset of their words; Books a cast of
        characters, Wikipedia one entity. A sentence-final category (``<adj>.``) uses the same
        words as its plain one. Long-range structure: a reader that remembers the words of the
        document so far predicts the next content word from ~20 candidates instead of ~160,
        and the longer the context, the more of the subset it has seen (the loss falls with
        position, as on real text).
        """
        rng = self.rng
        out: dict[int, np.ndarray] = {}
        for name, size in _LEXICON_SUBSETS.items():
            plain, final = _LEX.ids[name], _LEX.ids[name + "."]
            total = int(_SIZES[plain])
            if name == "tnoun":
                topic = int(rng.integers(len(_TOPICS)))
                own = topic * _TOPIC_SIZE + rng.choice(_TOPIC_SIZE, _TOPIC_CORE, replace=False)
                others = np.setdiff1d(np.arange(total), topic * _TOPIC_SIZE
                                      + np.arange(_TOPIC_SIZE))
                picked = np.concatenate([own, rng.choice(others, size - _TOPIC_CORE,
                                                         replace=False)])
                picked = picked[rng.permutation(size)]
            else:
                picked = rng.choice(total, min(size, total), replace=False)
            out[plain] = _STARTS[plain] + picked
            out[final] = _STARTS[final] + picked
        return out

    # -- code ----------------------------------------------------------------------------------

    def _code_body(self, n_words: int) -> tuple[list[str], list[bool], list[bool]]:
        """Python-like code: imports, one-line functions, asserts that use them correctly.

        Returns lines of exactly `n_words` words, block-start flags and glue flags (a function's
        comment and ``def`` line stay attached to the next line).
        """
        rng = self.rng
        r = rng.random(8 * (n_words // 2 + 8)).tolist()  # enough for the worst case
        pos = 0

        def nxt() -> float:
            nonlocal pos
            pos += 1
            return r[pos - 1]

        lines: list[str] = []
        starts: list[bool] = []
        glued: list[bool] = []
        remaining = n_words
        names = rng.permutation(_CODE_NUM_FUNCS).tolist()
        defined: dict[int, tuple[str, int]] = {}
        n_defs = 0

        def emit(line: str, start: bool, glue: bool = False) -> None:
            nonlocal remaining
            lines.append(line)
            starts.append(start)
            glued.append(glue)
            remaining -= len(line.split())

        def comment(n: int) -> str:
            if n == 1:
                return "pass"
            k = len(_CODE_COMMENT_WORDS)
            return "# " + " ".join(_CODE_COMMENT_WORDS[int(nxt() * k)] for _ in range(n - 1))

        for j in range(1 + int(nxt() * 3)):
            if remaining >= 2:
                emit("import " + _CODE_MODULES[int(nxt() * len(_CODE_MODULES))], j == 0)
        while remaining > 0:
            action = nxt()
            if not defined or action < 0.35:
                size = 2 + int(nxt() * 6)  # comment words
                if size + 6 > remaining:
                    emit(comment(min(remaining, 8)), not lines)
                    continue
                name = names[n_defs % _CODE_NUM_FUNCS]
                n_defs += 1
                op = _CODE_OPS[int(nxt() * len(_CODE_OPS))]
                k = 1 + int(nxt() * 9)
                defined[name] = (op, k)
                emit(comment(size), True, glue=True)
                emit(f"def f_{name}(x):", False, glue=True)
                emit(f"    return x {op} {k}", False)
            elif action < 0.85 and remaining >= 4:
                name = list(defined)[int(nxt() * len(defined))]  # any earlier function
                op, k = defined[name]
                a = int(nxt() * 10)
                value = a + k if op == "+" else a - k if op == "-" else a * k
                emit(f"assert f_{name}({a}) == {value}", False)
            elif remaining >= 3:
                name = list(defined)[int(nxt() * len(defined))]
                emit(f"v_{int(nxt() * 10)} = f_{name}({int(nxt() * 10)})", False)
            else:
                emit(comment(remaining), False)
        return lines, starts, glued


# --------------------------------------------------------------------------------------------
# Records and files
# --------------------------------------------------------------------------------------------


def iter_records(config: CorpusConfig) -> Iterator[dict[str, Any]]:
    """Yield the corpus's records in order, deterministically.

    Domains are interleaved in a seeded random order (not grouped). The i-th record of a domain
    has exactly ``plan_lengths(config)[domain][i]`` words.

    Args:
        config: The corpus config (validated here).

    Yields:
        ``{"text": str, "meta": {"redpajama_set_name": domain}}``.
    """
    plan = plan_lengths(config)
    order = _document_order(config, plan)
    writers = [_DocumentWriter(config, i) for i in range(len(DOMAINS))]
    next_doc = [0] * len(DOMAINS)
    lengths = [plan[d].tolist() for d in DOMAINS]
    for index in order.tolist():
        n_words = lengths[index][next_doc[index]]
        next_doc[index] += 1
        yield {
            "text": writers[index].document(n_words),
            "meta": {"redpajama_set_name": DOMAINS[index]},
        }


def chunk_name(index: int, compression: str) -> str:
    """SlimPajama-style chunk file name, e.g. ``chunk_00003.jsonl.zst``."""
    return f"chunk_{index:05d}{COMPRESSIONS[compression]}"


def _encode(data: bytes, compression: str) -> bytes:
    if compression == "zst":
        # One frame per file, content size in the header, no threads: deterministic bytes.
        return zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
    if compression == "gz":
        return gzip.compress(data, compresslevel=_GZIP_LEVEL, mtime=0)
    return data


def write_corpus(config: CorpusConfig, output_dir: str | os.PathLike[str]) -> list[Path]:
    """Write the corpus as ``num_files`` chunk files plus ``corpus_config.json``.

    Records are split contiguously: file ``i`` holds the ``i``-th of `num_files` near-equal
    runs of the `iter_records` stream (the first ``n % num_files`` files hold one more record;
    since domains are already interleaved, every file is a mix). Each file is built in memory,
    compressed as a whole (one zstd frame at level `ZSTD_LEVEL`, or gzip with ``mtime=0``),
    written to a hidden temporary name in `output_dir` and renamed onto its final name, so a
    reader never sees a partial chunk. Chunk files of an earlier run with more files are left
    alone.

    Args:
        config: The corpus config (validated here).
        output_dir: Directory to write into (created if missing).

    Returns:
        The chunk file paths, sorted.
    """
    config.validate()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_docs = sum(len(x) for x in plan_lengths(config).values())
    per_file, extra = divmod(n_docs, config.num_files)
    records = iter_records(config)
    paths: list[Path] = []
    for i in range(config.num_files):
        count = per_file + (1 if i < extra else 0)
        lines = [json.dumps(next(records), ensure_ascii=True) + "\n" for _ in range(count)]
        path = out / chunk_name(i, config.compression)
        write_bytes_atomic(path, _encode("".join(lines).encode("utf-8"), config.compression))
        paths.append(path)
    meta = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(out / "corpus_config.json", meta.encode("utf-8"))
    return sorted(paths)
