"""report.md with PNG plots for a mixture plan (matplotlib, headless), and the console table.

Three plots (domain shares natural / weights / planned, long-document share before / after,
token-weighted length CDF per domain from the stats histograms) at 110 dpi, ~30-60 KB each;
matplotlib is imported only here and only when a report is written (~0.5 s).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from megatron_longctx.atomic import atomic_output, write_text_atomic
from megatron_longctx.data.stats import load_stats
from megatron_longctx.mixture.plan import MixturePlan

if TYPE_CHECKING:
    from megatron_longctx.mixture.views import Realization


def dumps_table(plan: MixturePlan) -> str:
    """A plain-text table of the plan (console and report)."""
    rows = [f"{'domain':24s} {'share':>7s} {'target':>7s} {'long':>6s} {'->':>6s} "
            f"{'short x':>8s} {'long x':>8s}"]
    for d in plan.domains:
        short, long_ = d.buckets
        rows.append(
            f"{d.domain:24s} {d.weight_share:7.2%} {d.target_share:7.2%} "
            f"{d.long_share_before:6.1%} {d.long_share_after:6.1%} "
            f"{short.repeat:8.3f} {long_.repeat:8.3f}"
        )
    t = plan.totals
    rows.append(f"{'total':24s} {'':7s} {'':7s} {t.long_share_before:6.1%} "
                f"{t.long_share_after:6.1%}   max repeat {t.max_repeat:.2f}")
    return "\n".join(rows)


def _short(domain: str) -> str:
    return domain.removeprefix("RedPajama")


def _bars(ax, labels, series: dict[str, list[float]], title: str) -> None:
    x = np.arange(len(labels))
    width = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_title(title)
    ax.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    ax.legend()


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _plot_shares(plan: MixturePlan, output_dir: str) -> None:
    """domain_shares.png and long_shares.png."""
    import matplotlib.pyplot as plt

    domains = plan.domains
    labels = [_short(d.domain) for d in domains]
    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, labels, {
        "natural (data)": [d.natural_share for d in domains],
        "target weights": [d.weight_share for d in domains],
        "after plan": [d.target_share for d in domains],
    }, f"Domain token shares ({plan.strategy})")
    _save(fig, os.path.join(output_dir, "domain_shares.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, labels, {
        "before": [d.long_share_before for d in domains],
        "after": [d.long_share_after for d in domains],
    }, f"Share of tokens in documents > {plan.long_threshold} tokens")
    _save(fig, os.path.join(output_dir, "long_shares.png"))


def _plot_length_cdf(plan: MixturePlan, output_dir: str) -> None:
    """length_cdf.png: token-weighted length CDF per domain, from the stats histograms."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for d in plan.domains:
        bins = load_stats(d.stats)["histogram"]["bins"]
        if not bins:
            continue
        hi = np.array([b[1] - 1 for b in bins], dtype=float)
        toks = np.cumsum([b[3] for b in bins], dtype=float)
        ax.step(np.maximum(hi, 1), toks / toks[-1], where="post", label=_short(d.domain))
    ax.axvline(plan.long_threshold, color="k", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("share of tokens in documents <= length")
    ax.set_title("Token-weighted length CDF per domain")
    ax.legend(fontsize=8)
    _save(fig, os.path.join(output_dir, "length_cdf.png"))


def _markdown(plan: MixturePlan, realization: Realization | None) -> list[str]:
    """report.md's lines: summary, table, plots, per-bucket rows, warnings, files."""
    t = plan.totals
    lines = [
        f"# Mixture plan: {plan.strategy}",
        "",
        f"- budget: {plan.train_tokens:.4g} tokens = {plan.train_samples:,} samples of "
        f"{plan.seq_length:,} tokens",
        f"- domain weights: `{plan.parameters.domain_weights}`; long threshold: "
        f"{plan.long_threshold} tokens; "
        f"{', '.join(f'{k} = {v:.4g}' for k, v in plan.details.items()) or 'natural'}",
        f"- overall long share: {t.long_share_before:.1%} -> {t.long_share_after:.1%}; "
        f"max repeat {t.max_repeat:.2f}",
        "", "```", dumps_table(plan), "```", "",
        "Columns: weight share (target before strategy), target share (after), long share "
        "before -> after, repeat factors (epochs over the training documents' unique tokens, "
        "held-out documents excluded; < 1 = subsampled).",
        "",
        "![domain shares](domain_shares.png)",
        "![long shares](long_shares.png)",
        "![length cdf](length_cdf.png)",
        "", "## Per bucket", "",
        "| domain | bucket | documents | unique tokens | held out (docs / tokens) "
        "| target tokens | repeat | weight |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {d.domain} | {b.name} | {b.documents:,.0f} | {b.unique_tokens:,.0f} | "
              f"{b.held_out_documents:,} / {b.held_out_tokens:,} | "
              f"{b.target_tokens:,.0f} | {b.repeat:.3f} | {b.sampling_weight:.4f} |"
              for d in plan.domains for b in d.buckets]
    if plan.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in plan.warnings]
    if realization is not None:
        lines += ["", "## Files", "",
                  f"- Megatron blend (`--data-args-path`): `{realization.blend_file}`",
                  f"- per split (`--per-split-data-args-path`): `{realization.per_split_file}`",
                  f"- {len(realization.views)} views; {realization.note}"]
    return lines


def write_report(plan: MixturePlan, output_dir: str,
                 realization: Realization | None = None) -> str:
    """Write report.md + domain_shares.png, long_shares.png, length_cdf.png; returns md path."""
    import matplotlib

    matplotlib.use("Agg")
    _plot_shares(plan, output_dir)
    _plot_length_cdf(plan, output_dir)
    path = os.path.join(output_dir, "report.md")
    write_text_atomic(path, "\n".join(_markdown(plan, realization)) + "\n")
    return path
