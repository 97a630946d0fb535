"""Tokenizer types and the picklable `TokenizerSpec` (what to load), shared by every stage.

The one tokenizer-type list: stage 1 encodes text, so it accepts the text tokenizers
(`TEXT_TOKENIZER_TYPES`, Megatron-LM core_v0.16.1's names); the trainer needs only a vocabulary
size and an EOD id, so it also accepts `NullTokenizer` (`--vocab-size`, EOD = vocab - 1, as
megatron's NullTokenizer). Loading lives in `data/tokenizers.py`; this module imports nothing
from the package, so `config/` stays the bottom layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from megatron_longctx.config.flags import Flag, option

#: Tokenizers that encode text (preprocessing, and training with --tokenizer-model).
TEXT_TOKENIZER_TYPES = (
    "HuggingFaceTokenizer",
    "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer",
    "Llama2Tokenizer",
)
#: In core 0.16.1 these three map to the same SentencePiece wrapper (a `.model` file).
SENTENCEPIECE_TYPES = TEXT_TOKENIZER_TYPES[1:]
#: Megatron's tokenizer of no text: ids 0..vocab-1 (`--vocab-size`), EOD = vocab - 1.
NULL_TOKENIZER = "NullTokenizer"
#: Every type any of our tools accepts.
TOKENIZER_TYPES = (*TEXT_TOKENIZER_TYPES, NULL_TOKENIZER)


@dataclass(frozen=True)
class TokenizerSpec:
    """What to load: picklable, so worker processes rebuild the same tokenizer.

    `validate()` checks that the files exist (a `stat`, no reading): a wrong path fails when
    the flags are parsed, naming `--tokenizer-model`, instead of inside a worker process.
    """

    tokenizer_type: str = option(flag=Flag(
        "--tokenizer-type", "tokenizer class (Megatron-LM's names)", required=True,
        choices=TEXT_TOKENIZER_TYPES))
    tokenizer_model: str = option(flag=Flag(
        "--tokenizer-model", "HF tokenizer directory or tokenizer.json; SentencePiece .model",
        required=True))
    include_special_tokens: bool = option(False, Flag(
        "--tokenizer-hf-include-special-tokens",
        "HF only: ids of tokenizer(text).input_ids (e.g. with BOS)"))

    def validate(self) -> None:
        """Raise ValueError / FileNotFoundError naming the flag."""
        if self.tokenizer_type not in TEXT_TOKENIZER_TYPES:
            raise ValueError(
                f"--tokenizer-type {self.tokenizer_type!r} is not supported; "
                f"choose one of {', '.join(TEXT_TOKENIZER_TYPES)}"
            )
        if not self.tokenizer_model:
            raise ValueError(f"--tokenizer-model is required for {self.tokenizer_type}")
        if not os.path.exists(self.tokenizer_model):
            raise FileNotFoundError(f"--tokenizer-model {self.tokenizer_model!r} does not exist")
        if self.tokenizer_type in SENTENCEPIECE_TYPES and not os.path.isfile(self.tokenizer_model):
            raise ValueError(
                f"--tokenizer-model {self.tokenizer_model!r}: {self.tokenizer_type} needs a "
                "SentencePiece .model file"
            )
        if self.include_special_tokens and self.tokenizer_type in SENTENCEPIECE_TYPES:
            raise ValueError(
                "--tokenizer-hf-include-special-tokens only applies to --tokenizer-type "
                "HuggingFaceTokenizer"
            )
