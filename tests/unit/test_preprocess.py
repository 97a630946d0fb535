"""tools/preprocess_data.py: Megatron compatibility, domain routing, bad input, crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_longctx.config.cli import parse_preprocess_args
from megatron_longctx.config.preprocess import PreprocessConfig, slurm_array_defaults
from megatron_longctx.config.tokenizer import TokenizerSpec
from megatron_longctx.data.indexed import read_document, read_index
from megatron_longctx.data.merge import MergeError, merge_shards
from megatron_longctx.data.preprocess import PreprocessError, run_preprocess
from megatron_longctx.data.sentences import SentenceSplitter, resolve_splitter
from megatron_longctx.data.stats import load_stats
from megatron_longctx.data.tokenizers import build_tokenizer
from tests.conftest import DOMAINS, make_records, write_jsonl
from tests.reference.upstream_preprocess import megatron_preprocess

REPO = Path(__file__).resolve().parents[2]
DOMAIN_KEY = "meta.redpajama_set_name"


def _cfg(inputs, prefix, tok, **kw) -> PreprocessConfig:
    kw.setdefault("workers", 1)
    spec = tok if isinstance(tok, TokenizerSpec) else TokenizerSpec("HuggingFaceTokenizer", tok)
    return PreprocessConfig(inputs=[str(i) for i in inputs], output_prefix=str(prefix),
                            tokenizer=spec, **kw)


def _same_files(a: str, b: str) -> None:
    for ext in (".bin", ".idx"):
        assert Path(a + ext).read_bytes() == Path(b + ext).read_bytes(), (a, b, ext)


# ---------------------------------------------------------------------------------------------
# Compatibility with Megatron-LM's tools/preprocess_data.py
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_bytes_equal_megatron_two_keys(tmp_path, corpus_records, hf_tokenizer_dir, workers):
    records = [dict(r, title=r["text"][:40]) for r in corpus_records]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    ref = megatron_preprocess(str(src), str(tmp_path / "ref"), "HuggingFaceTokenizer",
                              hf_tokenizer_dir, ("text", "title"), append_eod=True, workers=2)
    result = run_preprocess(_cfg([src], tmp_path / "ours", hf_tokenizer_dir, append_eod=True,
                                 json_keys=["text", "title"], workers=workers, batch_bytes=5000))
    assert sorted(result.datasets) == [str(tmp_path / "ours_text_document"),
                                       str(tmp_path / "ours_title_document")]
    for key in ("text", "title"):
        _same_files(str(tmp_path / f"ours_{key}_document"), ref[key])


def test_bytes_equal_megatron_sentencepiece_no_eod(tmp_path, corpus_records, spm_model):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_records)
    ref = megatron_preprocess(str(src), str(tmp_path / "ref"), "Llama2Tokenizer", spm_model)
    run_preprocess(_cfg([src], tmp_path / "ours", TokenizerSpec("Llama2Tokenizer", spm_model)))
    _same_files(str(tmp_path / "ours_text_document"), ref["text"])


@pytest.mark.parametrize("keep_newlines", [False, True])
def test_bytes_equal_megatron_split_sentences(tmp_path, corpus_records, hf_tokenizer_dir,
                                              keep_newlines):
    src = write_jsonl(tmp_path / "in.jsonl", corpus_records)
    result = run_preprocess(_cfg([src], tmp_path / "ours", hf_tokenizer_dir, append_eod=True,
                                 split_sentences=True, keep_newlines=keep_newlines, workers=2))
    stats = load_stats(str(tmp_path / "ours_text_sentence.stats.json"))
    assert "PunktTrainer" in stats["preprocess"]["sentence_splitter"]  # no punkt data installed
    # Upstream's flow with the same Punkt parameters gives the same bytes.
    sample = "\n\n".join(r["text"] for r in corpus_records)[: 1 << 20]
    spec = resolve_splitter("english", keep_newlines, sample, "test")
    ref = megatron_preprocess(str(src), str(tmp_path / "ref"), "HuggingFaceTokenizer",
                              hf_tokenizer_dir, append_eod=True, splitter=spec)
    _same_files(str(tmp_path / "ours_text_sentence"), ref["text"])
    index = read_index(str(tmp_path / "ours_text_sentence"))
    assert index.sequence_lengths.size > index.document_indices.size  # really split
    assert result.summary["documents_written"] == len(corpus_records)


def test_offline_sentence_splitting_trains_punkt():
    text = ("Dr. Smith arrived at noon. He met Mrs. Jones at the station. They left together. "
            * 200)
    spec = resolve_splitter("english", keep_newlines=False, sample_text=text, sample_origin="t")
    assert "PunktTrainer" in spec.describe
    sentences = SentenceSplitter(spec).split("The cat sat. The dog ran. A bird flew away.")
    assert sentences == ["The cat sat.", "The dog ran.", "A bird flew away."]
    keep = resolve_splitter("english", True, text, "t")
    doc = "One line here.\n\nTwo lines there.\nThree."
    assert "".join(SentenceSplitter(keep).split(doc)) == doc
    with pytest.raises(ValueError, match="--split-sentences"):
        resolve_splitter("english", False, "", "t")


def test_round_trip_text_tokens_indexed_dataset(tmp_path, corpus_records, hf_tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = write_jsonl(tmp_path / "in.jsonl.zst", corpus_records, "zst")
    run_preprocess(_cfg([src], tmp_path / "o", hf_tokenizer_dir, append_eod=True))
    tok = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", hf_tokenizer_dir))
    ds = IndexedDataset(str(tmp_path / "o_text_document"))
    assert len(ds) == len(corpus_records)
    for i in (0, 1, 17, len(corpus_records) - 1):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == corpus_records[i]["text"]


# ---------------------------------------------------------------------------------------------
# Domain routing and stats
# ---------------------------------------------------------------------------------------------


def test_domain_routing_and_stats(tmp_path, corpus_records, hf_tokenizer_dir):
    files = [write_jsonl(tmp_path / "c0.jsonl.gz", corpus_records[:300], "gz"),
             write_jsonl(tmp_path / "c1.jsonl.zst", corpus_records[300:], "zst")]
    result = run_preprocess(_cfg([tmp_path], tmp_path / "out" / "sp", hf_tokenizer_dir,
                                 domain_key=DOMAIN_KEY, append_eod=True, workers=2,
                                 batch_bytes=3000))
    tok = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", hf_tokenizer_dir))
    assert len(result.datasets) == len(DOMAINS)
    for domain in DOMAINS:
        prefix = str(tmp_path / "out" / f"sp_{domain}_text_document")
        expected = [r["text"] for r in corpus_records if r["meta"]["redpajama_set_name"] == domain]
        index = read_index(prefix)
        assert index.document_indices.size - 1 == len(expected)
        for doc in (0, len(expected) // 2, len(expected) - 1):
            assert tok.decode(read_document(prefix, index, doc)[:-1].tolist()) == expected[doc]
        stats = load_stats(prefix + ".stats.json")
        lengths = index.document_lengths()
        assert stats["domain"] == domain and stats["documents"] == len(expected)
        assert stats["tokens"] == lengths.sum() and stats["length"]["max"] == lengths.max()
        assert stats["tokens_longer_than"]["256"] == lengths[lengths > 256].sum()
        assert stats["tokenizer"]["vocab_size"] == tok.vocab_size
        assert len(stats["tokenizer"]["sha256"]) == 64
        assert [i["path"] for i in stats["inputs"]] == [str(f) for f in files]
        assert stats["dtype"] == "uint16"


def test_int32_for_large_vocab(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["[UNK]"] = len(vocab)
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok_dir = tmp_path / "big"
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>",
                            unk_token="[UNK]").save_pretrained(tok_dir)
    src = write_jsonl(tmp_path / "in.jsonl", [{"text": "w1 w69999 w5"}])
    run_preprocess(_cfg([src], tmp_path / "o", str(tok_dir), append_eod=True))
    assert read_index(str(tmp_path / "o_text_document")).dtype == np.int32
    assert np.fromfile(tmp_path / "o_text_document.bin", np.int32).tolist() == [
        1, 69999, 5, vocab["</s>"]]


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _bad_input(tmp_path: Path) -> list[Path]:
    good = make_records(40, seed=5)
    lines = [json.dumps(r).encode() for r in good[:10]]
    lines += [
        b'{"text": "unterminated',  # 11 invalid_json
        json.dumps({"meta": {"redpajama_set_name": "RedPajamaC4"}}).encode(),  # 12 missing_key
        json.dumps({"text": 5, "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode(),  # 13
        json.dumps({"text": "", "meta": {"redpajama_set_name": "RedPajamaC4"}}).encode(),  # 14
        b'{"text": "bad \xff byte", "meta": {"redpajama_set_name": "RedPajamaC4"}}',  # 15 utf8
        b'{"text": "lone \\ud800 surrogate", "meta": {"redpajama_set_name": "RedPajamaC4"}}',
        json.dumps({"text": "no domain"}).encode(),  # 17 missing_key (domain)
        b"[1, 2]",  # 18 invalid_json (not an object)
        b"",  # 19 blank line: not a record
    ]
    lines += [json.dumps(r).encode() for r in good[10:20]]
    plain = tmp_path / "a.jsonl"
    plain.write_bytes(b"\n".join(lines) + b"\n")
    import gzip

    import zstandard

    rest = "".join(json.dumps(r) + "\n" for r in good[20:]).encode()
    gz = gzip.compress(rest, mtime=0)
    # One zstd frame per record: a cut keeps the complete frames before it.
    zs = b"".join(zstandard.ZstdCompressor().compress(json.dumps(r).encode() + b"\n")
                  for r in good[20:])
    (tmp_path / "b.jsonl.gz").write_bytes(gz[: len(gz) * 2 // 3])
    (tmp_path / "c.jsonl.zst").write_bytes(zs[: len(zs) * 2 // 3])
    return [plain, tmp_path / "b.jsonl.gz", tmp_path / "c.jsonl.zst"]


def test_bad_records_are_counted_with_locations(tmp_path, hf_tokenizer_dir):
    files = _bad_input(tmp_path)
    result = run_preprocess(_cfg(files, tmp_path / "o", hf_tokenizer_dir, domain_key=DOMAIN_KEY))
    assert result.summary["skipped"] == {
        "empty_text": 1, "invalid_json": 2, "invalid_utf8": 2, "missing_key": 2,
        "not_string": 1, "truncated_file": 2,
    }
    stats = load_stats(next(iter(result.datasets)) + ".stats.json")
    samples = stats["skipped_samples"]
    a = str(files[0])
    assert [s["location"] for s in samples["invalid_json"]] == [f"{a}:11", f"{a}:18"]
    assert [s["location"] for s in samples["invalid_utf8"]] == [f"{a}:15", f"{a}:16"]
    assert [s["location"] for s in samples["missing_key"]] == [f"{a}:12", f"{a}:17"]
    assert {s["location"].split(":")[0] for s in samples["truncated_file"]} == {
        str(files[1]), str(files[2])}
    # Everything before each truncation point was kept: 20 good lines + part of b and of c.
    assert 20 + 2 < result.summary["documents_written"] < 20 + 2 * 20


def test_empty_after_tokenization_is_skipped(tmp_path, spm_model):
    records = [{"text": "hello world"}, {"text": "   "}, {"text": "again"}]
    src = write_jsonl(tmp_path / "in.jsonl", records)
    result = run_preprocess(_cfg([src], tmp_path / "o",
                                 TokenizerSpec("SentencePieceTokenizer", spm_model)))
    assert result.summary["skipped"] == {"empty_after_tokenization": 1}
    assert read_index(str(tmp_path / "o_text_document")).document_indices.size == 3
    with pytest.raises(PreprocessError, match=r"in\.jsonl:2: empty_after_tokenization"):
        run_preprocess(_cfg([src], tmp_path / "p",
                            TokenizerSpec("SentencePieceTokenizer", spm_model), on_error="fail"))


@pytest.mark.parametrize("workers", [1, 2])
def test_on_error_fail_stops_with_location_and_no_outputs(tmp_path, hf_tokenizer_dir, workers):
    files = _bad_input(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(PreprocessError, match=r"a\.jsonl:11: invalid_json"):
        run_preprocess(_cfg(files, out / "o", hf_tokenizer_dir, domain_key=DOMAIN_KEY,
                            on_error="fail", workers=workers, batch_bytes=100))
    assert not out.exists() or os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# Sharding, resume, merge, crash safety
# ---------------------------------------------------------------------------------------------


def _corpus_files(tmp_path: Path, n_files: int = 4, per_file: int = 150) -> list[Path]:
    recs = make_records(n_files * per_file, seed=9)
    (tmp_path / "in").mkdir()
    return [write_jsonl(tmp_path / "in" / f"chunk_{i:05d}.jsonl.zst",
                        recs[i * per_file:(i + 1) * per_file], "zst")
            for i in range(n_files)]


def test_shards_merge_equal_single_run(tmp_path, hf_tokenizer_dir):
    files = _corpus_files(tmp_path, n_files=5)
    (tmp_path / "in" / "chunk_00002.jsonl.zst").write_bytes(
        (tmp_path / "in" / "chunk_00002.jsonl.zst").read_bytes()[:-40])  # one bad file too
    kw = dict(domain_key=DOMAIN_KEY, append_eod=True)
    single = run_preprocess(_cfg([tmp_path / "in"], tmp_path / "one" / "d", hf_tokenizer_dir,
                                 **kw))
    for i in range(3):
        run_preprocess(_cfg([tmp_path / "in"], tmp_path / "sh" / "d", hf_tokenizer_dir,
                            shard_index=i, num_shards=3, **kw))
    merged = merge_shards(str(tmp_path / "sh" / "d"), str(tmp_path / "merged" / "d"))
    assert len(merged) == len(single.datasets) == len(DOMAINS)
    for prefix in single.datasets:
        other = prefix.replace(str(tmp_path / "one"), str(tmp_path / "merged"))
        _same_files(prefix, other)
        a, b = load_stats(prefix + ".stats.json"), load_stats(other + ".stats.json")
        assert a == b and a["index"]["idx_sha256"]
    assert single.summary["skipped"] == {"truncated_file": 1}
    assert len(files) == 5


def test_merge_refuses_incomplete_shards(tmp_path, hf_tokenizer_dir):
    _corpus_files(tmp_path, n_files=3)
    run_preprocess(_cfg([tmp_path / "in"], tmp_path / "sh" / "d", hf_tokenizer_dir,
                        shard_index=0, num_shards=3))
    with pytest.raises(MergeError, match=r"shards \[1, 2\] of 3"):
        merge_shards(str(tmp_path / "sh" / "d"), str(tmp_path / "m"))


def test_rerun_skips_completed_shard_and_redoes_changed_config(tmp_path, hf_tokenizer_dir):
    _corpus_files(tmp_path, n_files=2)
    cfg = _cfg([tmp_path / "in"], tmp_path / "o", hf_tokenizer_dir, shard_index=1, num_shards=2)
    first = run_preprocess(cfg)
    assert not first.skipped_as_complete
    assert run_preprocess(cfg).skipped_as_complete
    changed = _cfg([tmp_path / "in"], tmp_path / "o", hf_tokenizer_dir, shard_index=1,
                   num_shards=2, append_eod=True)
    assert not run_preprocess(changed).skipped_as_complete


def _cli(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "preprocess_data.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


def test_kill_mid_run_then_rerun_gives_same_bytes(tmp_path, hf_tokenizer_dir):
    recs = make_records(6000, seed=3)
    src = write_jsonl(tmp_path / "big.jsonl", recs)
    base = ["--input", str(src), "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", hf_tokenizer_dir, "--append-eod", "--domain-key", DOMAIN_KEY,
            "--workers", "2", "--batch-bytes", "20000"]
    ref = _cli([*base, "--output-prefix", str(tmp_path / "ref" / "d")])
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    out = tmp_path / "run"
    proc = _cli([*base, "--output-prefix", str(out / "d")])
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until it is writing, then kill it hard
        if out.exists() and any(p.name.endswith(".bin.tmp") for p in out.iterdir()):
            time.sleep(0.3)
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "d.done.json").exists()
    # Whatever is left, no .idx exists without its complete, final .bin.
    for idx in out.glob("*.idx"):
        ref_prefix = str(tmp_path / "ref" / idx.name[:-4])
        _same_files(str(idx)[:-4], ref_prefix)

    rerun = _cli([*base, "--output-prefix", str(out / "d")])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    for idx in (tmp_path / "ref").glob("*.idx"):
        _same_files(str(idx)[:-4], str(out / idx.name[:-4]))
        assert (out / (idx.name[:-4] + ".stats.json")).exists()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def test_cli_flag_errors_name_the_flag(tmp_path, hf_tokenizer_dir, capsys):
    base = ["--input", "x.jsonl", "--output-prefix", "o", "--tokenizer-type",
            "HuggingFaceTokenizer", "--tokenizer-model", hf_tokenizer_dir]
    for extra, flag in [(["--workers", "0"], "--workers"),
                        (["--shard-index", "3", "--num-shards", "2"], "--shard-index"),
                        (["--keep-newlines"], "--keep-newlines"),
                        (["--domain-key", "meta..x"], "--domain-key")]:
        with pytest.raises(SystemExit):
            parse_preprocess_args([*base, *extra])
        assert flag in capsys.readouterr().err
    proc = _cli([*base[:1], str(tmp_path / "nothing*.jsonl"), *base[2:]])
    assert proc.wait(timeout=120) == 2
    assert "--input" in proc.stderr.read().decode()


def test_slurm_array_defaults():
    assert slurm_array_defaults({}) == (0, 1)
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1",
           "SLURM_ARRAY_TASK_COUNT": "8"}
    assert slurm_array_defaults(env) == (4, 8)
