"""Offline sentence splitting with nltk Punkt (for `--split-sentences`).

Megatron-LM downloads punkt at run time; our machines may have no network. Resolution order:
1. installed nltk data (`punkt_tab/{lang}`, then the legacy `punkt/{lang}.pickle` is NOT loaded:
   unpickling downloaded data runs arbitrary code, which nltk >= 3.9 itself refuses);
2. otherwise train Punkt parameters with nltk's own `PunktTrainer` on a deterministic sample of
   the input (the first `sample_bytes` of text across the sorted input files, the same for every
   shard, so sharded and single runs split identically). ~1 MB of text trains in a few seconds.

`describe` says which one was used; it goes to the log and the stats file.
`keep_newlines` keeps the whitespace after a sentence end attached to the sentence (Megatron's
`--keep-newlines`), so joining the sentences gives back the text.
"""

from __future__ import annotations

from dataclasses import dataclass

from nltk.tokenize.punkt import (
    PunktLanguageVars,
    PunktParameters,
    PunktSentenceTokenizer,
    PunktTrainer,
)

#: Megatron splits texts into 1,000,000-character pieces before Punkt; we do the same so that
#: very long documents split identically.
PUNKT_PIECE_CHARS = 1_000_000


class KeepWhitespaceLanguageVars(PunktLanguageVars):
    """Punkt language variables whose sentence end keeps the following whitespace."""

    _period_context_fmt = r"""
        \S*                          # word characters before the candidate end
        %(SentEndChars)s             # the candidate sentence end
        \s*                          # keep any whitespace (newlines too) with this sentence
        (?=(?P<after_tok>
            %(NonWord)s              # followed by punctuation
            |
            (?P<next_tok>\S+)        # or by the next word, with no whitespace required
        ))"""


@dataclass
class SplitterSpec:
    """Picklable description of the splitter, rebuilt in every worker."""

    params: PunktParameters
    keep_newlines: bool
    describe: str


def installed_punkt(lang: str) -> PunktParameters | None:
    """Parameters from installed `punkt_tab` data, or None when it is not installed."""
    import nltk

    try:
        nltk.data.find(f"tokenizers/punkt_tab/{lang}/")
    except LookupError:
        return None
    from nltk.tokenize.punkt import PunktTokenizer

    return PunktTokenizer(lang)._params


def train_punkt(sample_text: str) -> PunktParameters:
    """Train Punkt parameters on text with nltk's unsupervised trainer."""
    trainer = PunktTrainer()
    trainer.INCLUDE_ALL_COLLOCS = False
    trainer.train(sample_text, finalize=True)
    return trainer.get_params()


def resolve_splitter(
    lang: str, keep_newlines: bool, sample_text: str | None, sample_origin: str
) -> SplitterSpec:
    """Installed punkt data when present, else Punkt trained on `sample_text`."""
    params = installed_punkt(lang)
    if params is not None:
        return SplitterSpec(params, keep_newlines, f"nltk punkt_tab/{lang} (installed data)")
    if not sample_text:
        raise ValueError(
            "--split-sentences: no installed nltk punkt data and no input text to train on"
        )
    params = train_punkt(sample_text)
    return SplitterSpec(
        params,
        keep_newlines,
        f"nltk PunktTrainer on {len(sample_text.encode())} bytes of {sample_origin} "
        "(no installed punkt data)",
    )


class SentenceSplitter:
    """Splits a text into sentences like Megatron's preprocessing does."""

    def __init__(self, spec: SplitterSpec) -> None:
        lang_vars = KeepWhitespaceLanguageVars() if spec.keep_newlines else PunktLanguageVars()
        # Passing parameters as train_text makes nltk use them as they are.
        self._punkt = PunktSentenceTokenizer(train_text=spec.params, lang_vars=lang_vars)

    def split(self, text: str) -> list[str]:
        return [
            sentence
            for start in range(0, len(text), PUNKT_PIECE_CHARS)
            for sentence in self._punkt.tokenize(text[start : start + PUNKT_PIECE_CHARS])
        ]
