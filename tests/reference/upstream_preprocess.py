"""Megatron-LM's preprocessing loop restated on megatron.core APIs: our compatibility oracle.

Megatron-LM's tools/preprocess_data.py (core_v0.16.1) is not in the megatron-core wheel. This
module re-expresses its `process_json_file` path with the wheel's own pieces:
`megatron.core.tokenizers` (built from the same argument names as upstream's `build_tokenizer`)
and `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder`, with the same control flow:
`multiprocessing.Pool(workers).imap(encode, lines, 32)`, one `json.loads` and one
`tokenizer.tokenize` per document (per sentence when split), `add_document` per document.

Uses: tests compare our outputs' bytes with this; benchmarks/bench_preprocess.py times it as the
"Megatron-style baseline". It is deliberately not optimised. Input is a plain .jsonl (as upstream).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing

from megatron_longctx.data.sentences import SentenceSplitter, SplitterSpec


def _megatron_tokenizer_args(
    tokenizer_type: str, tokenizer_model: str, include_special_tokens: bool
) -> argparse.Namespace:
    """The subset of Megatron-LM's tokenizer arguments `build_tokenizer` reads, at defaults."""
    return argparse.Namespace(
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        vocab_file=None,
        merge_file=None,
        tokenizer_special_tokens=None,
        tokenizer_hf_use_fast=True,
        trust_remote_code=False,
        tokenizer_hf_include_special_tokens=include_special_tokens,
        tokenizer_metadata=None,
        tokenizer_sentencepiece_legacy=False,
        tiktoken_pattern=None,
        tiktoken_num_special_tokens=1000,
        vocab_size=None,
    )


def build_megatron_tokenizer(
    tokenizer_type: str, tokenizer_model: str, include_special_tokens: bool = False
):
    """megatron.core's tokenizer, built exactly as upstream's preprocess_data.py builds it."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer

    return build_tokenizer(
        _megatron_tokenizer_args(tokenizer_type, tokenizer_model, include_special_tokens)
    )


class _UpstreamEncoder:
    """Upstream's Encoder: class attributes hold the per-process tokenizer and splitter."""

    tokenizer = None
    splitter = None

    def __init__(self, tok_args: tuple, json_keys: list[str], append_eod: bool,
                 splitter: SplitterSpec | None) -> None:
        self.tok_args = tok_args
        self.json_keys = json_keys
        self.append_eod = append_eod
        self.splitter_spec = splitter

    def initializer(self) -> None:
        _UpstreamEncoder.tokenizer = build_megatron_tokenizer(*self.tok_args)
        spec = self.splitter_spec
        _UpstreamEncoder.splitter = SentenceSplitter(spec) if spec is not None else None

    def encode(self, json_line: str):
        data = json.loads(json_line)
        ids, lens = {}, {}
        for key in self.json_keys:
            text = data[key]
            if _UpstreamEncoder.splitter is not None and isinstance(text, str):
                text = _UpstreamEncoder.splitter.split(text)  # upstream's separate split pass
            sentences = text if isinstance(text, list) else [text]
            doc_ids: list[int] = []
            sentence_lens: list[int] = []
            for sentence in sentences:
                sentence_ids = _UpstreamEncoder.tokenizer.tokenize(sentence)
                if len(sentence_ids) > 0:
                    doc_ids.extend(sentence_ids)
                    sentence_lens.append(len(sentence_ids))
            if len(doc_ids) > 0 and self.append_eod:
                doc_ids.append(_UpstreamEncoder.tokenizer.eod)
                sentence_lens[-1] += 1
            ids[key] = doc_ids
            lens[key] = sentence_lens
        return ids, lens, len(json_line)


def megatron_preprocess(
    input_jsonl: str,
    output_prefix: str,
    tokenizer_type: str,
    tokenizer_model: str,
    json_keys: tuple[str, ...] = ("text",),
    append_eod: bool = False,
    workers: int = 1,
    include_special_tokens: bool = False,
    splitter: SplitterSpec | None = None,
) -> dict[str, str]:
    """Run the upstream-equivalent loop; returns {json_key: dataset prefix}."""
    from megatron.core.datasets import indexed_dataset

    tok_args = (tokenizer_type, tokenizer_model, include_special_tokens)
    encoder = _UpstreamEncoder(tok_args, list(json_keys), append_eod, splitter)
    tokenizer = build_megatron_tokenizer(*tok_args)
    level = "sentence" if splitter is not None else "document"
    prefixes = {key: f"{output_prefix}_{key}_{level}" for key in json_keys}
    builders = {
        key: indexed_dataset.IndexedDatasetBuilder(
            prefixes[key] + ".bin",
            dtype=indexed_dataset.DType.optimal_dtype(tokenizer.vocab_size),
        )
        for key in json_keys
    }
    ctx = multiprocessing.get_context("fork")
    with open(input_jsonl, encoding="utf-8") as fin, ctx.Pool(
        workers, initializer=encoder.initializer
    ) as pool:
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            for key in doc:
                builders[key].add_document(doc[key], sentence_lens[key])
    for key in json_keys:
        builders[key].finalize(prefixes[key] + ".idx")
    return prefixes
