"""Train a small byte-level BPE tokenizer offline (tests and the demo never download one).

The result is a directory that `--tokenizer-model` accepts with `--tokenizer-type
HuggingFaceTokenizer` (tokenizer.json + tokenizer_config.json, EOS `<|endoftext|>`), loadable by
`transformers.AutoTokenizer` and by megatron-core's HuggingFaceTokenizer alike.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator

from megatron_longctx.data import records as rec

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def iter_texts(
    inputs: list[str], json_key: str = "text", max_bytes: int | None = None
) -> Iterator[str]:
    """Texts of valid records from jsonl(.gz/.zst) inputs, up to `max_bytes` of text."""
    seen = 0
    for path in rec.expand_inputs(inputs):
        try:
            for line_no, raw in rec.iter_lines(path):
                record = rec.parse_record(path, line_no, raw, [json_key], None)
                if isinstance(record, rec.Record) and isinstance(record.texts[0], str):
                    yield record.texts[0]
                    seen += len(record.texts[0])
                    if max_bytes is not None and seen >= max_bytes:
                        return
        except rec.TruncatedInputError:
            continue


def train_bpe_tokenizer(texts: Iterable[str], output_dir: str, vocab_size: int = 4096) -> str:
    """Train byte-level BPE on `texts` and save a HuggingFace tokenizer directory atomically.

    Returns the output directory. Deterministic for the same texts and vocab size.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"--vocab-size must be >= 300 (256 bytes + specials), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN
    )
    parent = os.path.dirname(os.path.abspath(output_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer-", dir=parent)
    fast.save_pretrained(tmp)
    if os.path.isdir(output_dir):
        shutil.rmtree(output_dir)
    os.replace(tmp, output_dir)
    return output_dir
