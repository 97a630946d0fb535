"""Plots shared by the demo and the mixture ablation: loss by position for several checkpoints
on one figure (the paper's perplexity-by-position figure), per-domain loss changes, realised
domain shares.

Inputs are eval/ppl.py results (``ppl.json`` dicts) and plain numbers; nothing is read from
disk here. matplotlib runs headless (Agg); each PNG is written atomically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from megatron_longctx.atomic import atomic_output

__all__ = ["plot_domain_deltas", "plot_domain_shares", "plot_position_curves",
           "position_bucket_edges"]


def position_bucket_edges(short_length: int, long_length: int) -> list[int]:
    """Loss-by-position bucket edges that resolve both training lengths: 0, half the short
    length, then doubling from the short length up to the long one (its last edge).

    At the demo's 64 / 512: 0, 32, 64, 128, 256, 512, so the buckets inside the stage-1 window
    (0-32, 32-64) and each doubling beyond it are separate points of the curve. eval/ppl.py's
    defaults (0, 1K, 4K, ...) would give the demo a single 0-512 bucket.

    Raises:
        ValueError: `long_length` is not above `short_length`, or `short_length` < 2.
    """
    if short_length < 2 or long_length <= short_length:
        raise ValueError(f"need 2 <= short length ({short_length}) < long length "
                         f"({long_length})")
    edges = [0, short_length // 2]
    edge = short_length
    while edge < long_length:
        edges.append(edge)
        edge *= 2
    return [*edges, long_length]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_position_curves(curves: Mapping[str, Mapping[str, Any]], path: str | Path, *,
                         marks: Sequence[int] = (), title: str = "Loss by position") -> Path:
    """Mean loss per position bucket (all domains pooled), one line per checkpoint.

    Args:
        curves: label -> eval/ppl.py result (its ``buckets``); every result should use the
            same bucket edges (the first one's labels are drawn).
        path: the PNG to write.
        marks: token positions (e.g. the stage-1 length) drawn as dashed vertical lines.
        title: the figure's title.

    Returns:
        `path`.
    """
    plt = _pyplot()
    first = next(iter(curves.values()))
    labels = [b["label"] for b in first["buckets"]]
    starts = [b["start"] for b in first["buckets"]]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(labels) + 3.5), 4.2))
    for label, result in curves.items():
        ys = [b["loss"] if b["loss"] is not None else np.nan for b in result["buckets"]]
        ax.plot(x, ys, marker="o", linewidth=1.8, label=label)
    for mark in marks:
        if mark in starts:
            ax.axvline(starts.index(mark) - 0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks(x, labels)
    ax.set_xlabel("position in document (tokens)")
    ax.set_ylabel("mean loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_domain_deltas(deltas: Mapping[str, Mapping[str, Mapping[str, float | None]]],
                       domains: Sequence[str], path: str | Path, *,
                       panels: Sequence[tuple[str, str]]) -> Path:
    """Grouped bars: per domain, each strategy's loss change against the reference.

    Args:
        deltas: strategy -> panel key -> domain -> loss change (None: no documents).
        domains: the x axis.
        path: the PNG to write.
        panels: (panel key, panel title), one subplot each (e.g. short and long positions).

    Returns:
        `path`.
    """
    plt = _pyplot()
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.1 * len(domains) + 3), 3.2 *
                                                     len(panels)), squeeze=False)
    names = list(deltas)
    width = 0.8 / max(len(names), 1)
    x = np.arange(len(domains))
    for ax, (key, title) in zip(axes[:, 0], panels):
        for k, name in enumerate(names):
            ys = [deltas[name][key].get(d) for d in domains]
            ax.bar(x + (k - (len(names) - 1) / 2) * width,
                   [np.nan if y is None else y for y in ys], width, label=name)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(x, [d.removeprefix("RedPajama") for d in domains], fontsize=8)
        ax.set_ylabel("loss change (nats)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_domain_shares(shares: Mapping[str, Mapping[str, float]],
                       long_shares: Mapping[str, float], domains: Sequence[str],
                       path: str | Path) -> Path:
    """Stacked bars of each strategy's realised domain shares, its long-document share above.

    Args:
        shares: strategy -> domain -> realised token share.
        long_shares: strategy -> realised share of tokens from long documents.
        domains: stacking order.
        path: the PNG to write.

    Returns:
        `path`.
    """
    plt = _pyplot()
    names = list(shares)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(names) + 3.5), 4.2))
    bottom = np.zeros(len(names))
    for domain in domains:
        ys = np.array([shares[n].get(domain, 0.0) for n in names])
        ax.bar(names, ys, 0.6, bottom=bottom, label=domain.removeprefix("RedPajama"))
        bottom += ys
    for k, name in enumerate(names):
        ax.text(k, 1.01, f"long {long_shares[name]:.0%}", ha="center", fontsize=8)
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("realised share of training tokens")
    ax.set_title("Domain mix of what stage 2 trained on (audit of the built index)",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig: Any, plt: Any, path: str | Path) -> Path:
    """Write the figure atomically (a temporary file renamed into place) and close it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(fig)
    return path
