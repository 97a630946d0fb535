"""report.md with PNG plots for a mixture plan (matplotlib, headless)."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from megatron_longctx.data.stats import load_stats


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


def write_report(plan: dict[str, Any], output_dir: str) -> str:
    """Write report.md + domain_shares.png, long_shares.png, length_cdf.png; returns md path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megatron_longctx.mixture.outputs import dumps_table

    domains = plan["domains"]
    labels = [_short(d["domain"]) for d in domains]

    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, labels, {
        "natural (data)": [d["natural_share"] for d in domains],
        "target weights": [d["weight_share"] for d in domains],
        "after plan": [d["target_share"] for d in domains],
    }, f"Domain token shares ({plan['strategy']})")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "domain_shares.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    _bars(ax, labels, {
        "before": [d["long_share_before"] for d in domains],
        "after": [d["long_share_after"] for d in domains],
    }, f"Share of tokens in documents > {plan['long_threshold']} tokens")
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "long_shares.png"), dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    for d, label in zip(domains, labels):
        bins = load_stats(d["stats"])["histogram"]["bins"]
        if not bins:
            continue
        hi = np.array([b[1] - 1 for b in bins], dtype=float)
        toks = np.cumsum([b[3] for b in bins], dtype=float)
        ax.step(np.maximum(hi, 1), toks / toks[-1], where="post", label=label)
    ax.axvline(plan["long_threshold"], color="k", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("document length (tokens)")
    ax.set_ylabel("share of tokens in documents <= length")
    ax.set_title("Token-weighted length CDF per domain")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(output_dir, "length_cdf.png"), dpi=110)
    plt.close(fig)

    p = plan["parameters"]
    lines = [
        f"# Mixture plan: {plan['strategy']}",
        "",
        f"- budget: {plan['train_tokens']:.4g} tokens = {plan['train_samples']:,} samples of "
        f"{plan['seq_length']:,} tokens",
        f"- domain weights: `{p['domain_weights']}`; long threshold: {plan['long_threshold']} "
        f"tokens; {', '.join(f'{k} = {v:.4g}' for k, v in plan['details'].items()) or 'natural'}",
        f"- overall long share: {plan['totals']['long_share_before']:.1%} -> "
        f"{plan['totals']['long_share_after']:.1%}; max repeat "
        f"{plan['totals']['max_repeat']:.2f}",
        "",
        "```",
        dumps_table(plan),
        "```",
        "",
        "Columns: weight share (target before strategy), target share (after), long share "
        "before -> after, repeat factors (epochs over unique tokens; < 1 = subsampled).",
        "",
        "![domain shares](domain_shares.png)",
        "![long shares](long_shares.png)",
        "![length cdf](length_cdf.png)",
        "",
        "## Per bucket",
        "",
        "| domain | bucket | documents | unique tokens | target tokens | repeat | weight |",
        "|---|---|---|---|---|---|---|",
    ]
    for d in domains:
        for b in d["buckets"]:
            lines.append(
                f"| {d['domain']} | {b['name']} | {b['documents']:,.0f} | "
                f"{b['unique_tokens']:,.0f} | {b['target_tokens']:,.0f} | {b['repeat']:.3f} | "
                f"{b['sampling_weight']:.4f} |"
            )
    if plan["warnings"]:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in plan["warnings"]]
    real = plan.get("realization")
    if real:
        lines += ["", "## Files", "",
                  f"- Megatron blend (`--data-args-path`): `{real['blend_file']}`",
                  f"- per split (`--per-split-data-args-path`): `{real['per_split_file']}`",
                  f"- {len(real['views'])} views; {real['note']}"]
    path = os.path.join(output_dir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
