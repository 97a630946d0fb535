"""Write a mixture plan's artifacts: views, Megatron blend files, report, and the plan itself.

Files in `--output-dir`:
- `views/{dataset}_{bucket}.idx/.bin`: one view per (domain, length bucket) with a target (one per
  domain for `cut`, listing pieces), and `views/{dataset}_valid` when `--valid-fraction` > 0.
- `blend.txt`: `w1 p1 w2 p2 ...` for Megatron's `--data-args-path`, weights = planned token shares.
- `blend_per_split.json`: {"train": [...], "valid": [...] | null, "test": null} for
  `--per-split-data-args-path` (null splits are skipped by Megatron's `get_blend_from_list`).
- `report.md` and PNG plots.
- `mixture_plan.json` last, so its presence means everything above is complete.

How exact the stock-Megatron route is: blending picks whole samples, so each bucket's token
share matches its weight up to one sample per bucket; but each view packs only its own bucket's
documents, so a sample never mixes short and long documents, unlike the paper (and unlike our
own dataset, `megatron_longctx.mixture.dataset`, which packs the upsampled documents of a domain
together and matches the plan's bucket shares at document level).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from megatron_longctx.data.indexed import read_index
from megatron_longctx.data.stats import write_json_atomic
from megatron_longctx.mixture.views import write_view


def split_string(valid_fraction: float) -> str:
    """Megatron's --split for the held-out tail (train first, then valid, no test)."""
    return f"{1.0 - valid_fraction:.10g},{valid_fraction:.10g},0"


def _split_docs(n_docs: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train documents first, the last `valid_fraction` held out: megatron-core's own arithmetic
    for `--split` (normalised ratios, `round(ratio * n)` bounds), so views and the training
    dataset hold out exactly the same documents."""
    ratios = np.array([float(x) for x in re.findall(r"[.0-9]+", split_string(valid_fraction))])
    ratios = ratios / ratios.sum()
    n_train = int(round(ratios[0] * float(n_docs)))
    return np.arange(n_train, dtype=np.int64), np.arange(n_train, n_docs, dtype=np.int64)


def write_views_and_blends(plan: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """Create the views and blend files; returns the `realization` section of the plan."""
    views_dir = os.path.join(output_dir, "views")
    valid_fraction = plan["parameters"]["valid_fraction"]
    threshold = plan["long_threshold"]
    train_blend: list[tuple[float, str]] = []
    valid_blend: list[tuple[float, str]] = []
    realized: list[dict[str, Any]] = []
    for domain in plan["domains"]:
        prefix = domain["prefix"]
        index = read_index(prefix)
        lengths = index.document_lengths()
        train_docs, valid_docs = _split_docs(len(lengths), valid_fraction)
        name = os.path.basename(prefix)
        if plan["strategy"] == "cut":
            groups = [("cut", train_docs, sum(b["target_tokens"] for b in domain["buckets"]))]
        else:
            is_long = lengths[train_docs] > threshold
            groups = [(b["name"], train_docs[is_long == (b["name"] == "long")], b["target_tokens"])
                      for b in domain["buckets"]]
        for bucket, docs, target in groups:
            if target <= 0 or docs.size == 0:
                continue
            view = os.path.join(views_dir, f"{name}_{bucket}")
            write_view(prefix, view, docs, plan["cut_length"], index)
            train_blend.append((target / plan["train_tokens"], os.path.abspath(view)))
            realized.append({"domain": domain["domain"], "bucket": bucket, "view": view,
                             "documents": int(docs.size),
                             "tokens": int(lengths[docs].sum())})
        if valid_docs.size:
            view = os.path.join(views_dir, f"{name}_valid")
            write_view(prefix, view, valid_docs, plan["cut_length"], index)
            valid_blend.append((domain["target_share"], os.path.abspath(view)))

    def flat(blend: list[tuple[float, str]]) -> list[str]:
        total = sum(w for w, _ in blend)
        return [x for w, p in blend for x in (f"{w / total:.10g}", p)]

    blend_path = os.path.join(output_dir, "blend.txt")
    tmp = blend_path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(" ".join(flat(train_blend)) + "\n")
    os.replace(tmp, blend_path)
    per_split_path = os.path.join(output_dir, "blend_per_split.json")
    write_json_atomic(per_split_path, {
        "train": flat(train_blend),
        "valid": flat(valid_blend) if valid_blend else None,
        "test": None,
    })
    return {"blend_file": blend_path, "per_split_file": per_split_path, "views": realized,
            "note": "views pack each bucket separately; shares exact up to one sample per view"}


def write_plan_outputs(plan: dict[str, Any], output_dir: str) -> dict[str, str]:
    """Views, blends, report, then `mixture_plan.json` last. Returns the main paths."""
    from megatron_longctx.mixture.report import write_report

    os.makedirs(output_dir, exist_ok=True)
    plan_path = os.path.join(output_dir, "mixture_plan.json")
    if os.path.exists(plan_path):
        os.unlink(plan_path)  # a rerun that fails midway must not leave the old plan standing
    plan["realization"] = write_views_and_blends(plan, output_dir)
    report = write_report(plan, output_dir)
    write_json_atomic(plan_path, plan)
    return {"plan": plan_path, "blend": plan["realization"]["blend_file"],
            "per_split": plan["realization"]["per_split_file"], "report": report}


def dumps_table(plan: dict[str, Any]) -> str:
    """A plain-text table of the plan (console and report)."""
    rows = [f"{'domain':24s} {'share':>7s} {'target':>7s} {'long':>6s} {'->':>6s} "
            f"{'short x':>8s} {'long x':>8s}"]
    for d in plan["domains"]:
        short, long_ = d["buckets"]
        rows.append(
            f"{d['domain']:24s} {d['weight_share']:7.2%} {d['target_share']:7.2%} "
            f"{d['long_share_before']:6.1%} {d['long_share_after']:6.1%} "
            f"{short['repeat']:8.3f} {long_['repeat']:8.3f}"
        )
    t = plan["totals"]
    rows.append(f"{'total':24s} {'':7s} {'':7s} {t['long_share_before']:6.1%} "
                f"{t['long_share_after']:6.1%}   max repeat {t['max_repeat']:.2f}")
    return "\n".join(rows)
