"""Tests of the synthetic SlimPajama-style corpus generator (megatron_longctx.data.synthetic)."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zstandard

from megatron_longctx.data import synthetic
from megatron_longctx.data.synthetic import (
    DOMAINS,
    FACT_KEYS,
    FACT_TEMPLATE,
    FACT_VALUES,
    MEDIAN_TOKENS,
    QUESTION_PROMPT_TEMPLATE,
    QUESTION_TEMPLATE,
    SLIMPAJAMA_SHARES,
    CorpusConfig,
    iter_records,
    load_corpus_config,
    make_fact,
    parse_domain_shares,
    plan_lengths,
    summarize_plan,
    vocabulary,
    write_corpus,
)

REPO = Path(__file__).resolve().parents[2]
SMALL = CorpusConfig(total_words=200_000, seed=7, num_files=3)
QUESTION_RE = re.compile(r"question : what is the secret code of (\w+) \? answer : (\w+) \.")
FACT_RE = re.compile(r"the secret code of (\w+) is (\w+) \.")
CODE = "RedPajamaGithub"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return list(iter_records(SMALL))


def by_domain(records: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {d: [] for d in DOMAINS}
    for record in records:
        out[record["meta"]["redpajama_set_name"]].append(record["text"])
    return out


def n_words(text: str) -> int:
    return len(text.split())


def read_chunk(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().decompress(raw)  # needs the content size in the frame
    elif path.name.endswith(".gz"):
        raw = gzip.decompress(raw)
    text = raw.decode("utf-8")
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


# ---------------------------------------------------------------------------------------------
# constants and facts
# ---------------------------------------------------------------------------------------------


def test_constants() -> None:
    assert len(DOMAINS) == 7 and len(set(DOMAINS)) == 7
    assert set(SLIMPAJAMA_SHARES) == set(DOMAINS) == set(MEDIAN_TOKENS)
    assert SLIMPAJAMA_SHARES["RedPajamaCommonCrawl"] == 0.5337
    assert SLIMPAJAMA_SHARES["RedPajamaStackExchange"] == 0.0317
    assert sum(SLIMPAJAMA_SHARES.values()) == pytest.approx(1.0, abs=1e-3)
    assert MEDIAN_TOKENS["RedPajamaBook"] == 121602 and MEDIAN_TOKENS["RedPajamaC4"] == 315
    assert len(FACT_KEYS) == 100 and len(set(FACT_KEYS)) == 100
    assert len(FACT_VALUES) == 122 and len(set(FACT_VALUES)) == 122
    assert not set(FACT_KEYS) & set(FACT_VALUES)
    assert FACT_TEMPLATE == "the secret code of {key} is {value} ."
    assert QUESTION_TEMPLATE == ("question : what is the secret code of {key} ? answer : "
                                 "{value} .")
    assert QUESTION_TEMPLATE.format(key="k", value="v") == (
        QUESTION_PROMPT_TEMPLATE.format(key="k") + " v ."
    )
    # The default config does not share its dict with the module constant.
    config = CorpusConfig()
    config.domain_shares["RedPajamaBook"] = 1.0
    assert SLIMPAJAMA_SHARES["RedPajamaBook"] == 0.0415


def test_make_fact() -> None:
    a = [make_fact(np.random.default_rng(3)) for _ in range(2)]
    assert a[0] == a[1]  # deterministic given the generator state
    rng = np.random.default_rng(0)
    facts = [make_fact(rng) for _ in range(500)]
    assert all(k in FACT_KEYS and v in FACT_VALUES for k, v in facts)
    assert len({k for k, _ in facts}) > 80 and len({v for _, v in facts}) > 100


# ---------------------------------------------------------------------------------------------
# records: determinism, mixture, lengths
# ---------------------------------------------------------------------------------------------


def test_iter_records_deterministic_and_seed_dependent(records: list[dict]) -> None:
    assert list(iter_records(SMALL)) == records
    other = list(iter_records(replace(SMALL, seed=8)))
    assert [r["text"] for r in other[:50]] != [r["text"] for r in records[:50]]
    for record in records[:100]:
        assert set(record) == {"text", "meta"}
        assert set(record["meta"]) == {"redpajama_set_name"}


def test_domains_interleaved(records: list[dict]) -> None:
    names = [r["meta"]["redpajama_set_name"] for r in records]
    runs = 1 + sum(a != b for a, b in zip(names, names[1:]))
    # Grouped output would have 7 runs; a random order has about n * (1 - sum p_i^2) ~ 0.57 n.
    assert runs > len(names) / 4
    assert len(set(names[:200])) >= 5


def test_all_domains_present(records: list[dict]) -> None:
    counts = Counter(r["meta"]["redpajama_set_name"] for r in records)
    assert set(counts) == set(DOMAINS)
    # Even a corpus too small for some budgets keeps one minimal document per domain.
    tiny = list(iter_records(CorpusConfig(total_words=100)))
    assert {r["meta"]["redpajama_set_name"] for r in tiny} == set(DOMAINS)
    assert min(n_words(r["text"]) for r in tiny) >= 8


def test_word_shares_match_targets(records: list[dict]) -> None:
    words = Counter()
    for record in records:
        words[record["meta"]["redpajama_set_name"]] += n_words(record["text"])
    total = sum(words.values())
    assert abs(total - SMALL.total_words) <= 7 * SMALL.min_words
    target = SMALL.normalized_shares()
    for domain in DOMAINS:
        # Budgets are filled exactly (the last document is cut), so a domain only misses its
        # budget by rounding or a dropped stub shorter than min_words: 8 / 200k = 0.004%.
        # 0.2 points still leaves room for that and would catch any real mixing error.
        assert words[domain] / total == pytest.approx(target[domain], abs=0.002), domain


def test_custom_domain_shares() -> None:
    config = CorpusConfig(
        total_words=40_000, domain_shares={"RedPajamaC4": 3.0, "RedPajamaArXiv": 1.0}
    )
    words = Counter()
    for record in iter_records(config):
        words[record["meta"]["redpajama_set_name"]] += n_words(record["text"])
    assert set(words) == {"RedPajamaC4", "RedPajamaArXiv"}
    assert words["RedPajamaC4"] / sum(words.values()) == pytest.approx(0.75, abs=0.002)


def test_lengths_follow_plan_and_bounds(records: list[dict]) -> None:
    plan = {d: iter(x.tolist()) for d, x in plan_lengths(SMALL).items()}
    for record in records:
        assert n_words(record["text"]) == next(plan[record["meta"]["redpajama_set_name"]])
    assert all(next(it, None) is None for it in plan.values())

    config = CorpusConfig(total_words=60_000, min_words=30, max_words=400, seed=2)
    lengths = [n_words(r["text"]) for r in iter_records(config)]
    assert min(lengths) >= 30 and max(lengths) <= 400
    assert lengths.count(400) > 5  # Books and ArXiv are clipped


def test_medians_ordered_and_scaled(records: list[dict]) -> None:
    texts = by_domain(records)
    median = {d: float(np.median([n_words(t) for t in texts[d]])) for d in DOMAINS}
    short = [d for d in DOMAINS if d not in ("RedPajamaBook", "RedPajamaArXiv", DOMAINS[0])]
    assert median["RedPajamaBook"] > median["RedPajamaArXiv"] > median["RedPajamaCommonCrawl"]
    assert median["RedPajamaCommonCrawl"] > max(median[d] for d in short)
    # Domains with many documents sit near real median * length_scale. The standard error of
    # log(sample median) is ~1.25 sigma / sqrt(n): 4% for CommonCrawl (n ~ 1000, sigma 1.0),
    # 2% for C4 (n ~ 2000), 10% for the ~150-document domains (sigma <= 1.1): allow ~3.5 of it.
    tolerance = {
        "RedPajamaCommonCrawl": 0.15,
        "RedPajamaC4": 0.1,
        CODE: 0.35,
        "RedPajamaWikipedia": 0.35,
        "RedPajamaStackExchange": 0.35,
    }
    for domain, rel in tolerance.items():
        expected = MEDIAN_TOKENS[domain] * SMALL.length_scale
        assert len(texts[domain]) > 100
        assert median[domain] == pytest.approx(expected, rel=rel), domain


def test_long_document_word_share(records: list[dict]) -> None:
    threshold = 4096 * SMALL.length_scale
    texts = by_domain(records)
    share = {}
    for domain in DOMAINS:
        lengths = np.array([n_words(t) for t in texts[domain]])
        share[domain] = lengths[lengths > threshold].sum() / lengths.sum()
    # As in the paper: long documents hold a minority of web tokens, most of books/papers,
    # about 30% of all tokens (Fu et al. 2024, Figure 2), every domain some.
    assert 0.2 < share["RedPajamaCommonCrawl"] < 0.5
    assert 0.02 < share["RedPajamaC4"] < 0.12
    assert share["RedPajamaBook"] > 0.95 and share["RedPajamaArXiv"] > 0.9
    summary = summarize_plan(SMALL)
    for domain in DOMAINS:
        assert summary[domain].long_threshold == threshold
        assert summary[domain].long_word_share == pytest.approx(share[domain])
        assert summary[domain].documents == len(texts[domain])


def test_long_share_per_domain_follows_the_model_and_the_papers_total() -> None:
    # A corpus large enough for every domain (lengths only, no text): each domain's share of
    # words in documents longer than the 4K analogue is the model's (`long_token_share`), and
    # the total is about the 30% Fu et al. (2024, Figure 2) report for SlimPajama.
    config = CorpusConfig(total_words=8_000_000, seed=3, length_scale=1 / 8)
    summary = summarize_plan(config)
    overall = 0.0
    for domain in DOMAINS:
        expected = synthetic.long_token_share(domain, 4096)
        got = summary[domain].long_word_share
        assert got == pytest.approx(expected, abs=0.06), domain
        assert got > 0.02, domain  # every domain has long documents to upsample
        overall += summary[domain].word_share * got
    assert 0.25 < overall < 0.36


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def test_text_format(records: list[dict]) -> None:
    texts = by_domain(records)
    for domain, docs in texts.items():
        for text in docs:
            assert text.isascii() and text == text.lower()
            assert text == text.strip() and "\n\n\n" not in text and "\t" not in text
            if domain != CODE:
                assert "  " not in text and "\n " not in text
        if domain != CODE:
            prose = " ".join(docs)
            assert prose.count(". ") > len(docs)  # sentences end in ". "
            assert any("\n\n" in t for t in docs)  # paragraphs
    assert any(t.startswith("question : how do i") for t in texts["RedPajamaStackExchange"])
    assert any("theorem 1 ." in t for t in texts["RedPajamaArXiv"])


def test_code_documents_execute(records: list[dict]) -> None:
    docs = by_domain(records)[CODE]
    assert sum("def f_" in t for t in docs) > len(docs) / 2
    asserts = 0
    for text in docs:
        # Every assert states the true value of a function defined earlier in the file.
        exec(compile(text, "<synthetic>", "exec"), {})
        asserts += text.count("\nassert ")
    assert asserts > 100


def test_small_vocabulary(records: list[dict]) -> None:
    vocab = vocabulary()
    assert len(vocab) < 2000
    code_token = re.compile(r"f_\d+\((x|\d+)\):?|v_\d|[-+*=]|==|-?\d+|\(?\d+\)?")
    seen = set()
    for record in records:
        code = record["meta"]["redpajama_set_name"] == CODE
        for token in record["text"].split():
            word = token.rstrip(".") or token
            seen.add(word)
            assert word in vocab or word.isdigit() or (code and code_token.fullmatch(word)), token
    non_numeric = {w for w in seen if not w.lstrip("-").isdigit()}
    assert len(non_numeric) < 2000


def test_punkt_splits_facts(records: list[dict]) -> None:
    punkt = pytest.importorskip("nltk.tokenize.punkt")
    splitter = punkt.PunktSentenceTokenizer()
    text = next(t for t in by_domain(records)["RedPajamaCommonCrawl"] if QUESTION_RE.search(t))
    sentences = splitter.tokenize(text)
    key, value = FACT_RE.search(text).groups()
    assert FACT_TEMPLATE.format(key=key, value=value) in sentences
    assert f"question : what is the secret code of {key} ?" in sentences
    assert f"answer : {value} ." in sentences
    assert len(sentences) >= text.count(". ")


# ---------------------------------------------------------------------------------------------
# facts in documents
# ---------------------------------------------------------------------------------------------


def test_questions_follow_their_facts(records: list[dict]) -> None:
    """One fact per document of >= 32 words: a question per ~24 words of the near zone after
    it, then in documents of >= 160 words a chain of far questions up to the end, each 64-448
    words (plus the question itself) after the previous mention of the value."""
    questions = 0
    with_facts = Counter()
    far_gaps = []
    heads: list[float | None] = []
    for record in records:
        text = record["text"]
        length = n_words(text)
        stated = list(FACT_RE.finditer(text))
        asked = list(QUESTION_RE.finditer(text))
        if length < 32:
            assert not stated and not asked
            continue
        assert len(stated) == 1, text[:200]
        key, value = stated[0].groups()
        assert key in FACT_KEYS and value in FACT_VALUES
        # Within `fact_head`: the first 10% of a short document, the first half (at most 400
        # words) of a longer one (plus a sentence or a glued code block of slack).
        limit = 0.1 * length if length < 160 else min(0.5 * length, 400)
        assert n_words(text[:stated[0].start()]) <= limit + 40
        heads.append(n_words(text[:stated[0].start()]) / limit if length >= 160 else None)
        near = max(int(synthetic.near_zone(length) // 24), 1)
        assert len(asked) >= near
        for match in asked:
            assert match.groups() == (key, value)
            assert stated[0].end() <= match.start()
        questions += len(asked)
        with_facts[record["meta"]["redpajama_set_name"]] += 1
        if length >= 1000:
            starts = [m.start() for m in asked]
            gaps = [n_words(text[a:b]) for a, b in zip(starts[near:], starts[near + 1:])]
            assert gaps and max(gaps) <= 448 + 80, gaps  # + question words and sentence rounding
            assert n_words(text[starts[-1]:]) <= 448 + 80  # the chain reaches the end
            far_gaps += gaps
    assert questions > 1000
    assert set(with_facts) == set(DOMAINS)
    # Log-uniform gaps between 64 and 448 words: a third of them over ~200 words.
    assert len(far_gaps) > 50 and 0.2 < np.mean(np.array(far_gaps) > 200) < 0.6
    # Long documents' statements spread over their head, not all at its start.
    spread = np.array([h for h in heads if h is not None])
    assert len(spread) > 100 and 0.35 < np.median(spread) < 0.65


def test_fact_words_only_in_facts(records: list[dict]) -> None:
    words = set(FACT_KEYS) | set(FACT_VALUES)
    for record in records[:3000]:
        text = FACT_RE.sub(" ", QUESTION_RE.sub(" ", record["text"]))
        assert not words.intersection(w.rstrip(".") for w in text.split())


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", ["zst", "gz", "none"])
def test_write_corpus_readable(tmp_path: Path, records: list[dict], compression: str) -> None:
    config = replace(SMALL, compression=compression)
    paths = write_corpus(config, tmp_path / "out")
    suffix = {"zst": ".jsonl.zst", "gz": ".jsonl.gz", "none": ".jsonl"}[compression]
    assert [p.name for p in paths] == [f"chunk_{i:05d}{suffix}" for i in range(3)]
    assert paths == sorted(paths)
    chunks = [read_chunk(p) for p in paths]
    assert [r for chunk in chunks for r in chunk] == records  # contiguous split, same order
    sizes = [len(c) for c in chunks]
    assert max(sizes) - min(sizes) <= 1
    assert load_corpus_config(tmp_path / "out" / "corpus_config.json") == replace(
        config, domain_shares=config.to_dict()["domain_shares"]
    )


@pytest.mark.parametrize("compression", ["zst", "gz"])
def test_write_corpus_byte_identical(tmp_path: Path, compression: str) -> None:
    config = replace(SMALL, total_words=50_000, compression=compression)
    first = write_corpus(config, tmp_path / "a")
    second = write_corpus(config, tmp_path / "b")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()
        if compression == "gz":  # runs within one second would hide a wall-clock mtime
            assert a.read_bytes()[4:8] == b"\0\0\0\0"
    assert (tmp_path / "a" / "corpus_config.json").read_bytes() == (
        tmp_path / "b" / "corpus_config.json"
    ).read_bytes()
    other = write_corpus(replace(config, seed=config.seed + 1), tmp_path / "c")
    assert all(a.read_bytes() != c.read_bytes() for a, c in zip(first, other, strict=True))


def test_write_corpus_no_temporary_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = replace(SMALL, total_words=20_000, num_files=3)
    paths = write_corpus(config, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([p.name for p in paths] + ["corpus_config.json"])

    # A failure while the second chunk is being written leaves neither its final name nor the
    # temporary file behind (the first chunk was completed and renamed).
    out = tmp_path / "failing"
    calls = []
    real_fsync = os.fsync

    def failing_fsync(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 2:
            assert len(os.listdir(out)) == 2  # the temporary file exists while being written
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(synthetic.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_corpus(config, out)
    assert os.listdir(out) == ["chunk_00000.jsonl.zst"]


# ---------------------------------------------------------------------------------------------
# validation and command line
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "flag"),
    [
        ({"total_words": 0}, "--total-words"),
        ({"total_words": 1.5}, "--total-words"),
        ({"seed": -1}, "--seed"),
        ({"length_scale": 0.0}, "--length-scale"),
        ({"length_scale": float("nan")}, "--length-scale"),
        ({"min_words": 0}, "--min-words"),
        ({"max_words": 4}, "--max-words"),
        ({"num_files": 0}, "--num-files"),
        ({"compression": "bz2"}, "--compression"),
        ({"domain_shares": {"RedPajamaFoo": 1.0}}, "--domain-shares"),
        ({"domain_shares": {"RedPajamaC4": -1.0}}, "--domain-shares"),
        ({"domain_shares": {"RedPajamaC4": 0.0}}, "--domain-shares"),
    ],
)
def test_validate_names_flag(tmp_path: Path, changes: dict, flag: str) -> None:
    config = replace(CorpusConfig(), **changes)
    with pytest.raises(ValueError, match=re.escape(flag)):
        config.validate()
    with pytest.raises(ValueError, match=re.escape(flag)):
        write_corpus(config, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_validate_accepts_defaults() -> None:
    config = CorpusConfig()
    assert config.validate() is config
    assert replace(config, compression="none", num_files=1, min_words=1).validate()


def test_parse_domain_shares() -> None:
    assert parse_domain_shares("Book=0.5, redpajamac4=0.25,ArXiv=1") == {
        "RedPajamaBook": 0.5,
        "RedPajamaC4": 0.25,
        "RedPajamaArXiv": 1.0,
    }
    for bad in ("Books=1", "Book", "Book=x", ""):
        with pytest.raises(ValueError, match="--domain-shares"):
            parse_domain_shares(bad)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_corpus.py"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def test_cli(tmp_path: Path) -> None:
    out = tmp_path / "corpus"
    flags = ["--total-words", "30000", "--num-files", "2", "--compression", "gz", "--seed", "5"]
    result = run_cli("--output-dir", str(out), *flags)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines[:7]] == list(DOMAINS)
    assert all("median_words=" in line and "long_share(>256w)=" in line for line in lines[:7])
    names = ["chunk_00000.jsonl.gz", "chunk_00001.jsonl.gz", "corpus_config.json"]
    assert sorted(os.listdir(out)) == names
    config = load_corpus_config(out / "corpus_config.json")
    assert (config.total_words, config.seed, config.compression) == (30000, 5, "gz")

    bad = run_cli("--output-dir", str(tmp_path / "bad"), "--num-files", "0")
    assert bad.returncode == 2 and "--num-files must be >= 1" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_long_range_structure_lowers_a_cache_models_loss_with_position() -> None:
    # A model-free reader of long-range structure: a unigram cache model (Kuhn & De Mori
    # 1990) predicts each word from the counts of the words before it in the same document,
    # smoothed with the corpus unigram. On real text its loss falls as the document goes on;
    # here that needs the per-document lexicon (with one global word list per category the
    # cache knows as much after 64 words as after 512).
    import math

    config = CorpusConfig(total_words=600_000, seed=5, length_scale=0.106)
    docs = [r["text"].split() for r in iter_records(config)
            if r["meta"]["redpajama_set_name"] != CODE]
    unigram = Counter(w for d in docs for w in d)
    total = sum(unigram.values())
    alpha = 10.0
    early, late = [], []
    long_docs = [d for d in docs if len(d) >= 512]
    assert len(long_docs) > 50
    for words in long_docs:
        seen: Counter = Counter()
        for i, w in enumerate(words[:512]):
            loss = -math.log((seen[w] + alpha * unigram[w] / total) / (i + alpha))
            (early if i < 64 else late if i >= 128 else []).append(loss)
            seen[w] += 1
    assert np.mean(early) - np.mean(late) > 0.6, (np.mean(early), np.mean(late))


def test_demo_corpus_supplies_the_released_per_source_rule_at_the_ablation_budget() -> None:
    # `make ablation` trains each arm for --stage2-iters x --tokens-per-step tokens; under the
    # released per-source rule (keep every document longer than the stage-2 length, each
    # shorter one with probability 0.1, domain shares kept) no domain's kept documents may
    # need more than 3 passes (the ablation reports the measured maximum; the issue it answers
    # asked for at most 4). Word counts -> tokens at the demo BPE's measured 1.18 per word.
    from megatron_longctx.demo.pipeline import (
        DEMO_TOKENS_PER_WORD,
        DEMO_VALID_FRACTION,
        DemoSettings,
    )

    flags = re.search(r"^ABLATION_FLAGS \?= (.*)$", (REPO / "Makefile").read_text(), re.M)
    assert flags, "Makefile: ABLATION_FLAGS"
    args = flags.group(1).split()
    demo = DemoSettings()
    steps = int(args[args.index("--stage2-iters") + 1])
    budget = steps * demo.tokens_per_step
    config = CorpusConfig(total_words=demo.total_words, length_scale=demo.corpus_length_scale)
    threshold_words = demo.long_length / DEMO_TOKENS_PER_WORD
    for domain, lengths in plan_lengths(config).items():
        long_words = lengths[lengths > threshold_words].sum()
        kept = (long_words + 0.1 * (lengths.sum() - long_words)) * (1 - DEMO_VALID_FRACTION)
        passes = budget * SLIMPAJAMA_SHARES[domain] / (kept * DEMO_TOKENS_PER_WORD)
        assert passes <= 3.0, (domain, passes)
