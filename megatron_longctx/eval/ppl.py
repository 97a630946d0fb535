"""Loss by context position and by domain on held-out long documents.

What is measured: each selected document is read from its start, up to `seq_length` tokens,
and the model's negative log-likelihood (nats) of token j given tokens 0..j-1 is computed for
j = 1 .. n-1 (`CausalLM.token_losses`: one forward over the document, no packing with other
documents, no loss at position 0). The loss at position j counts in the bucket [a, b) with
a <= j < b. Default buckets: 0-1K, 1K-4K, 4K-16K, 16K-32K, then doubling (32K-64K, 64K-128K,
...), the last one ending at `seq_length` (K = 1024 tokens). Bucket and domain means are
token-weighted, so the token-weighted mean of the bucket means is exactly the mean over all
scored tokens (tests check it). A falling curve means the model uses the longer context; the
paper's point (Fu et al. 2024) is that such validation losses hide retrieval differences, so
read them next to the needle test.

Documents (`select_documents`): from indexed datasets (`{prefix}.bin/.idx`) named by
`--data-path` (all documents, or the last `--valid-fraction` of them), or by a mixture plan: its
domains' prefixes and exactly the documents the trainer held out (`mixture.plan.split_documents`:
the last round(valid_fraction * n) documents of each dataset). Of those, the first
`max_docs_per_domain` documents with at least `min_length` tokens are used (dataset order,
deterministic). `min_length` defaults to `seq_length`, so every bucket is averaged over the
same documents; a lower value adds shorter documents to the early buckets only.

Outputs: `ppl.json` (per bucket, per domain and per domain x bucket: token count, mean loss,
perplexity; per document: length and mean loss; settings and model) and
`loss_by_position.png` (mean loss per bucket, one line per domain and one for all).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longctx.atomic import write_json_atomic
from megatron_longctx.data.indexed import read_document, read_index
from megatron_longctx.data.stats import domain_of_prefix

FORMAT = "megatron-longctx-ppl/1"
RESULTS_NAME = "ppl.json"
PLOT_NAME = "loss_by_position.png"
_FIRST_EDGES = (0, 1024, 4096, 16384, 32768)


# --------------------------------------------------------------------------------------------
# buckets
# --------------------------------------------------------------------------------------------
def default_bucket_edges(seq_length: int) -> list[int]:
    """0, 1K, 4K, 16K, 32K, then doubling, cut at `seq_length` (which is the last edge)."""
    if seq_length < 2:
        raise ValueError(f"--seq-length must be >= 2, got {seq_length}")
    edges = [e for e in _FIRST_EDGES if e < seq_length]
    while edges[-1] * 2 < seq_length and edges[-1] >= _FIRST_EDGES[-1]:
        edges.append(edges[-1] * 2)
    return [*edges, seq_length]


def parse_bucket_edges(text: str | None, seq_length: int) -> list[int]:
    """Edges from `--buckets 0,1024,4096` (increasing, starting at 0); edges at or beyond
    `seq_length` are dropped and `seq_length` closes the last bucket. None: the defaults."""
    if text is None:
        return default_bucket_edges(seq_length)
    try:
        edges = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--buckets: expected comma-separated integers, got {text!r}") from None
    if not edges or edges[0] != 0 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"--buckets must start at 0 and increase, got {text!r}")
    return [*[e for e in edges if e < seq_length], seq_length]


def bucket_label(start: int, end: int) -> str:
    """'0-1K', '1K-4K', '300-600' (K = 1024 when divisible)."""
    def one(x: int) -> str:
        return f"{x // 1024}K" if x and x % 1024 == 0 else str(x)

    return f"{one(start)}-{one(end)}"


def position_bucket_sums(losses: np.ndarray, edges: Sequence[int]) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """Per bucket, the sum of losses and the token count; losses[k] is position k + 1."""
    positions = np.arange(1, len(losses) + 1)
    index = np.searchsorted(np.asarray(edges), positions, side="right") - 1
    keep = (index >= 0) & (index < len(edges) - 1)
    sums = np.bincount(index[keep], weights=losses[keep], minlength=len(edges) - 1)
    counts = np.bincount(index[keep], minlength=len(edges) - 1)
    return sums.astype(np.float64), counts.astype(np.int64)


# --------------------------------------------------------------------------------------------
# documents
# --------------------------------------------------------------------------------------------
@dataclass
class DocumentSource:
    """Candidate documents of one domain: an indexed dataset and document indices in it."""

    domain: str
    prefix: str
    documents: np.ndarray


@dataclass
class EvalDocument:
    """One evaluated document: its first `seq_length` tokens."""

    domain: str
    prefix: str
    index: int
    length: int
    tokens: np.ndarray


def sources_from_data_paths(items: Sequence[str],
                            valid_fraction: float | None = None) -> list[DocumentSource]:
    """`--data-path p1 p2` or Megatron's weighted `w1 p1 w2 p2` (weights ignored). Domain: the
    dataset's stats file's `domain`, else its name without `_text_document`. With
    `valid_fraction`, only the held-out tail (`mixture.plan.split_documents`)."""
    from megatron_longctx.mixture.plan import split_documents

    prefixes = [x for x in items if not _is_number(x)]
    if not prefixes:
        raise ValueError("--data-path: no dataset prefixes given")
    if valid_fraction is not None and not 0 < valid_fraction < 1:
        raise ValueError(f"--valid-fraction must be in (0, 1), got {valid_fraction}")
    out = []
    for prefix in prefixes:
        if not os.path.isfile(prefix + ".idx"):
            raise FileNotFoundError(f"--data-path {prefix}: no {prefix}.idx")
        n = len(read_index(prefix).document_lengths())
        docs = (np.arange(n, dtype=np.int64) if valid_fraction is None
                else split_documents(n, valid_fraction)[1])
        out.append(DocumentSource(domain_of_prefix(prefix), prefix, docs))
    return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def sources_from_mixture_plan(path: str | os.PathLike) -> list[DocumentSource]:
    """The held-out documents of every domain of a mixture plan (those the trainer's `valid`
    split reads: the last `valid_fraction` of each dataset).

    Raises:
        ValueError: the plan holds nothing out (planned with --valid-fraction 0).
    """
    from megatron_longctx.mixture.plan import load_plan, split_documents

    plan = load_plan(str(path))
    fraction = plan.valid_fraction
    if fraction <= 0:
        raise ValueError(f"--mixture-plan {path}: planned with --valid-fraction 0, so no "
                         "documents are held out; use --data-path with a held-out dataset")
    out = []
    for domain in plan.domains:
        n = len(read_index(domain.prefix).document_lengths())
        out.append(DocumentSource(domain.domain, domain.prefix, split_documents(n, fraction)[1]))
    return out


def select_documents(sources: Sequence[DocumentSource], *, seq_length: int, min_length: int,
                     max_docs_per_domain: int) -> list[EvalDocument]:
    """Per source, the first `max_docs_per_domain` candidates with >= `min_length` tokens,
    each cut to its first `seq_length` tokens."""
    if min_length < 2:
        raise ValueError(f"--min-doc-length must be >= 2, got {min_length}")
    if max_docs_per_domain < 1:
        raise ValueError(f"--max-docs-per-domain must be >= 1, got {max_docs_per_domain}")
    out = []
    for source in sources:
        index = read_index(source.prefix)
        lengths = index.document_lengths()
        docs = source.documents[lengths[source.documents] >= min_length][:max_docs_per_domain]
        for doc in docs.tolist():
            tokens = read_document(source.prefix, index, doc)[:seq_length].astype(np.int64)
            out.append(EvalDocument(source.domain, source.prefix, int(doc),
                                    int(lengths[doc]), tokens))
    return out


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def _summary(sums: np.ndarray, counts: np.ndarray, edges: Sequence[int]) -> list[dict]:
    rows = []
    for k in range(len(edges) - 1):
        n = int(counts[k])
        loss = float(sums[k] / n) if n else None
        rows.append({"start": int(edges[k]), "end": int(edges[k + 1]),
                     "label": bucket_label(edges[k], edges[k + 1]), "tokens": n, "loss": loss,
                     "ppl": math.exp(loss) if loss is not None else None})
    return rows


def _total(sums: np.ndarray, counts: np.ndarray) -> dict[str, Any]:
    n = int(counts.sum())
    loss = float(sums.sum() / n) if n else None
    return {"tokens": n, "loss": loss, "ppl": math.exp(loss) if loss is not None else None}


def evaluate_documents(model: Any, documents: Sequence[EvalDocument], edges: Sequence[int], *,
                       log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Token losses of every document, summed per bucket, per domain and per domain x bucket.

    Raises:
        ValueError: a token id is outside the model's vocabulary (dataset tokenized with
            another tokenizer).
    """
    nb = len(edges) - 1
    total_sums, total_counts = np.zeros(nb), np.zeros(nb, dtype=np.int64)
    per_domain: dict[str, list[Any]] = {}
    rows = []
    start = time.perf_counter()
    for i, doc in enumerate(documents):
        if len(doc.tokens) and int(doc.tokens.max()) >= model.vocab_size:
            raise ValueError(f"{doc.prefix} document {doc.index}: token id "
                             f"{int(doc.tokens.max())} >= the model's vocabulary "
                             f"({model.vocab_size}); the dataset uses another tokenizer")
        t0 = time.perf_counter()
        losses = np.asarray(model.token_losses(doc.tokens.tolist()), dtype=np.float64)
        sums, counts = position_bucket_sums(losses, edges)
        total_sums += sums
        total_counts += counts
        entry = per_domain.setdefault(doc.domain, [np.zeros(nb), np.zeros(nb, dtype=np.int64), 0])
        entry[0] += sums
        entry[1] += counts
        entry[2] += 1
        rows.append({"domain": doc.domain, "prefix": doc.prefix, "index": doc.index,
                     "length": doc.length, "evaluated_tokens": len(doc.tokens),
                     "loss": float(losses.mean())})
        if log is not None:
            log(f"[{i + 1}/{len(documents)}] {doc.domain} document {doc.index}: "
                f"{len(doc.tokens)} tokens, loss {losses.mean():.4f} "
                f"({time.perf_counter() - t0:.2f} s)")
    seconds = time.perf_counter() - start
    scored = int(total_counts.sum())
    return {
        "buckets": _summary(total_sums, total_counts, edges),
        "overall": _total(total_sums, total_counts),
        "domains": {name: {"documents": n_docs, **_total(s, c),
                           "buckets": _summary(s, c, edges)}
                    for name, (s, c, n_docs) in per_domain.items()},
        "documents": rows,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(scored / seconds, 1) if seconds > 0 else None,
    }


def run_ppl(model: Any, sources: Sequence[DocumentSource], output_dir: str | Path, *,
            seq_length: int, edges: Sequence[int] | None = None, min_length: int | None = None,
            max_docs_per_domain: int = 8, plot: bool = True,
            log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Select documents, evaluate them and write ppl.json (+ loss_by_position.png).

    Args:
        model: a `CausalLM` (driver rank) or anything with `vocab_size`, `token_losses(ids)`
            and `describe()`.
        sources: candidate documents per domain (`sources_from_data_paths`,
            `sources_from_mixture_plan`).
        output_dir: created if needed.
        seq_length: tokens evaluated per document (from its start).
        edges: bucket edges (default `default_bucket_edges(seq_length)`).
        min_length: shortest document used (default `seq_length`).
        max_docs_per_domain: documents per domain.
        plot: write loss_by_position.png.
        log: progress lines (None: silent).

    Returns:
        The results dict written to ppl.json.

    Raises:
        ValueError: no document is long enough.
    """
    edges = list(edges) if edges is not None else default_bucket_edges(seq_length)
    if edges[-1] != seq_length:
        raise ValueError(f"the last bucket edge ({edges[-1]}) must be --seq-length "
                         f"({seq_length})")
    min_length = seq_length if min_length is None else int(min_length)
    documents = select_documents(sources, seq_length=seq_length, min_length=min_length,
                                 max_docs_per_domain=max_docs_per_domain)
    if not documents:
        raise ValueError(f"no candidate document has >= {min_length} tokens; lower "
                         "--min-doc-length or use other data")
    found = {d.domain for d in documents}
    missing = sorted({s.domain for s in sources} - found)
    if missing and log is not None:
        log(f"no document with >= {min_length} tokens in: {', '.join(missing)}")
    result = {
        "format": FORMAT,
        "model": model.describe(),
        "settings": {"seq_length": seq_length, "min_length": min_length,
                     "max_docs_per_domain": max_docs_per_domain, "bucket_edges": edges,
                     "sources": [{"domain": s.domain, "prefix": s.prefix,
                                  "candidates": int(len(s.documents))} for s in sources],
                     "domains_without_documents": missing},
        **evaluate_documents(model, documents, edges, log=log),
    }
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(str(out / RESULTS_NAME), result)
    if plot:
        plot_loss_by_position(result, out / PLOT_NAME)
    return result


def plot_loss_by_position(result: dict[str, Any], path: str | Path) -> Path:
    """Mean loss per position bucket: one line per domain, a thick one for all tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [b["label"] for b in result["buckets"]]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(5.0, 1.0 * len(labels) + 2.5), 4.0))
    for name in sorted(result["domains"]):
        ys = [b["loss"] if b["loss"] is not None else np.nan
              for b in result["domains"][name]["buckets"]]
        ax.plot(x, ys, marker="o", linewidth=1, label=name)
    ys = [b["loss"] if b["loss"] is not None else np.nan for b in result["buckets"]]
    ax.plot(x, ys, marker="s", color="black", linewidth=2.5, label="all")
    ax.set_xticks(x, labels)
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("mean loss (nats/token)")
    name = Path(str(result.get("model", {}).get("path", "model"))).name
    overall = result["overall"]["loss"]
    ax.set_title(f"Loss by position: {name} (all {overall:.3f})" if overall is not None
                 else f"Loss by position: {name}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
