"""Our batched tokenizers give exactly megatron.core 0.16.1's ids, vocab size and EOD."""

from __future__ import annotations

import json

import pytest

from megatron_longctx.config.tokenizer import TokenizerSpec
from megatron_longctx.data.tokenizers import build_tokenizer
from tests.reference.upstream_preprocess import build_megatron_tokenizer

SAMPLES = [
    "Hello world.",
    "  leading spaces and\ttabs\n\nand blank lines  ",
    "naïve café 東京 emoji🙂 <|endoftext|> inside text",
    "x",
    "Dr. Smith went to the U.S. on 3.14 e.g. yesterday.",
]


@pytest.mark.parametrize("special", [False, True])
def test_hf_matches_megatron(hf_tokenizer_dir, corpus_records, special):
    ours = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", hf_tokenizer_dir, special))
    ref = build_megatron_tokenizer("HuggingFaceTokenizer", hf_tokenizer_dir, special)
    texts = SAMPLES + [r["text"] for r in corpus_records[:50]]
    flat, lengths = ours.encode_batch(texts)
    expected = [ref.tokenize(t) for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]
    assert ours.vocab_size == ref.vocab_size
    assert ours.eod == ref.eod is not None
    assert ours.decode(ours.encode(SAMPLES[2])) == SAMPLES[2]


def test_hf_include_special_tokens_adds_bos(tmp_path, hf_tokenizer_dir):
    """With a tokenizer whose post-processor adds BOS, the flag switches BOS on (as upstream)."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_file(f"{hf_tokenizer_dir}/tokenizer.json")
    bos = tok.token_to_id("<|pad|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|pad|> $A", special_tokens=[("<|pad|>", bos)]
    )
    d = tmp_path / "bos"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    cfg = {"eos_token": "<|endoftext|>", "tokenizer_class": "PreTrainedTokenizerFast"}
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    plain = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", str(d), False))
    with_bos = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", str(d), True))
    ref = build_megatron_tokenizer("HuggingFaceTokenizer", str(d), True)
    assert with_bos.encode("hello") == ref.tokenize("hello") == [bos] + plain.encode("hello")


def test_hf_tokenizer_json_file_is_accepted(hf_tokenizer_dir):
    ours = build_tokenizer(
        TokenizerSpec("HuggingFaceTokenizer", f"{hf_tokenizer_dir}/tokenizer.json")
    )
    dir_tok = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", hf_tokenizer_dir))
    assert ours.encode(SAMPLES[1]) == dir_tok.encode(SAMPLES[1])
    assert ours.eod == dir_tok.eod


@pytest.mark.parametrize(
    "tokenizer_type", ["SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"]
)
def test_sentencepiece_matches_megatron(spm_model, corpus_records, tokenizer_type):
    ours = build_tokenizer(TokenizerSpec(tokenizer_type, spm_model))
    ref = build_megatron_tokenizer(tokenizer_type, spm_model)
    texts = SAMPLES + [r["text"] for r in corpus_records[:30]]
    flat, lengths = ours.encode_batch(texts)
    expected = [ref.tokenize(t) for t in texts]
    assert flat.tolist() == [i for e in expected for i in e]
    assert lengths.tolist() == [len(e) for e in expected]
    assert ours.vocab_size == ref.vocab_size
    assert ours.eod == ref.eod


def test_spec_errors_name_the_flag(tmp_path, spm_model):
    with pytest.raises(ValueError, match="--tokenizer-type"):
        TokenizerSpec("GPT2BPE", spm_model).validate()
    with pytest.raises(FileNotFoundError, match="--tokenizer-model"):
        TokenizerSpec("HuggingFaceTokenizer", str(tmp_path / "missing")).validate()
    with pytest.raises(ValueError, match="--tokenizer-model"):
        TokenizerSpec("SentencePieceTokenizer", str(tmp_path)).validate()
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer(TokenizerSpec("SentencePieceTokenizer", str(bad)))
    with pytest.raises(ValueError, match="--tokenizer-model"):
        build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", str(tmp_path)))


def test_resolved_tokenizer_cache_skips_transformers(tmp_path, hf_tokenizer_dir):
    """Second load comes from the cache: same ids, and transformers is never imported."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MEGATRON_LONGCTX_CACHE": str(tmp_path / "cache")}
    code = (
        "import sys, json\n"
        "from megatron_longctx.config.tokenizer import TokenizerSpec\n"
        "from megatron_longctx.data.tokenizers import build_tokenizer\n"
        f"t = build_tokenizer(TokenizerSpec('HuggingFaceTokenizer', {hf_tokenizer_dir!r}))\n"
        f"print(json.dumps([t.encode({SAMPLES[2]!r}), t.vocab_size, t.eod,\n"
        "                  'transformers' in sys.modules]))\n"
    )
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                                  capture_output=True, text=True).stdout)
        for _ in range(2)
    ]
    assert runs[0][:3] == runs[1][:3]
    assert runs[0][3] is True and runs[1][3] is False
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 1
    # A changed tokenizer file changes the key: the stale entry is not reused.
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(hf_tokenizer_dir, changed)
    cfg = json.loads((changed / "tokenizer_config.json").read_text())
    cfg["model_max_length"] = 12345
    (changed / "tokenizer_config.json").write_text(json.dumps(cfg))
    third = json.loads(subprocess.run(
        [sys.executable, "-c", code.replace(repr(hf_tokenizer_dir), repr(str(changed)))],
        env=env, check=True, capture_output=True, text=True).stdout)
    assert third[3] is True and third[:3] == runs[0][:3]
    assert len(list((tmp_path / "cache" / "tokenizers").iterdir())) == 2
