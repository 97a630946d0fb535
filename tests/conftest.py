"""Shared fixtures: small SlimPajama-shaped corpora and offline tokenizers (HF BPE, SPM)."""

from __future__ import annotations

import json
import os
import random
import warnings
from pathlib import Path

import pytest

from megatron_longctx.data.synthetic import DOMAINS as SYNTHETIC_DOMAINS

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")

DOMAINS = SYNTHETIC_DOMAINS
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "that",
    "for",
    "it",
    "as",
    "was",
    "with",
    "be",
    "by",
    "on",
    "not",
    "he",
    "this",
    "are",
    "or",
    "his",
    "from",
    "at",
    "which",
    "but",
    "have",
    "an",
    "they",
    "you",
    "were",
    "her",
    "she",
    "there",
    "would",
    "their",
    "we",
    "him",
    "been",
    "has",
    "when",
    "who",
    "will",
    "more",
    "no",
    "if",
    "out",
    "so",
    "said",
    "what",
    "up",
    "its",
    "about",
    "into",
    "than",
    "them",
    "can",
    "only",
    "other",
    "new",
    "some",
    "could",
    "time",
    "these",
    "two",
    "may",
    "then",
    "do",
    "first",
    "any",
    "my",
    "now",
    "such",
    "like",
    "our",
    "over",
    "man",
    "me",
    "even",
    "most",
    "made",
    "after",
    "also",
    "did",
    "many",
    "before",
    "must",
    "through",
    "back",
    "years",
    "where",
    "much",
    "your",
    "way",
    "well",
    "down",
    "should",
    "because",
    "each",
    "dr",
    "mr",
    "mrs",
    "etc",
    "e.g",
    "i.e",
    "u.s",
    "3.14",
    "naïve",
    "café",
    "東京",
    "emoji🙂",
]


def make_text(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "?", "!"]))
    sep = rng.choice([" ", " ", "\n", "\n\n"])
    return sep.join(out)


def make_records(n: int, seed: int = 0) -> list[dict]:
    """SlimPajama-shaped records with varied lengths, unicode, and all seven domains."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        domain = DOMAINS[rng.randrange(len(DOMAINS))]
        sentences = rng.choice([1, 3, 10, 40]) * (4 if domain == "RedPajamaBook" else 1)
        records.append(
            {"text": make_text(rng, sentences), "meta": {"redpajama_set_name": domain}, "id": i}
        )
    return records


def write_jsonl(path: Path, records: list[dict], compression: str = "none") -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if compression == "gz":
        import gzip

        data = gzip.compress(data, mtime=0)
    elif compression == "zst":
        import zstandard

        data = zstandard.ZstdCompressor(level=3).compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_tokenizer_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache tokenizer cache."""
    os.environ["MEGATRON_LONGCTX_CACHE"] = str(tmp_path_factory.mktemp("tokenizer-cache"))


@pytest.fixture(scope="session")
def corpus_records() -> list[dict]:
    return make_records(600, seed=1)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory, corpus_records) -> str:
    from megatron_longctx.data.train_tokenizer import train_bpe_tokenizer

    out = tmp_path_factory.mktemp("tok") / "bpe"
    return train_bpe_tokenizer((r["text"] for r in corpus_records), str(out), vocab_size=800)


@pytest.fixture(scope="session")
def spm_model(tmp_path_factory, corpus_records) -> str:
    import sentencepiece

    out = tmp_path_factory.mktemp("spm")
    text = out / "train.txt"
    text.write_text("\n".join(r["text"].replace("\n", " ") for r in corpus_records))
    sentencepiece.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(out / "sp"),
        vocab_size=500,
        model_type="bpe",
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    return str(out / "sp.model")


@pytest.fixture
def single_rank_group(tmp_path):
    """A 1-rank gloo process group for megatron's dataset cache, destroyed after the test so
    nothing leaks into tests that fork ranks of their own."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()
