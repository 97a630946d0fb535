"""Write a mixture plan's artifacts: views, Megatron blend files, report, and the plan itself.

Files in `--output-dir`:
- `views/{dataset}_{bucket}.idx/.bin`: one view per (domain, length bucket) with a target (one per
  domain for `cut`, listing pieces), and `views/{dataset}_valid` when `--valid-fraction` > 0
  (the last `plan.held_out_count(n, f) = round(f * n)` documents of each dataset).
- `blend.txt`: `w1 p1 w2 p2 ...` for Megatron's `--data-args-path`, weights = planned token shares.
- `blend_per_split.json`: {"train": [...], "valid": [...] | null, "test": null} for
  `--per-split-data-args-path` (null splits are skipped by Megatron's `get_blend_from_list`).
- `report.md` and PNG plots.
- `mixture_plan.json` last, so its presence means everything above is complete.

The views are not recorded in the plan: `planned_views` derives them from the plan and the
stage-1 indexes, and the training dataset derives its `cut` views the same way (plan.py says why).

How exact the stock-Megatron route is: blending picks whole samples, so each bucket's token
share matches its weight up to one sample per bucket; but each view packs only its own bucket's
documents, so a sample never mixes short and long documents, unlike the paper (and unlike our
own dataset, `megatron_longctx.mixture.dataset`, which packs the upsampled documents of a domain
together and matches the plan's bucket shares at document level).
"""

from __future__ import annotations

import os

from megatron_longctx.atomic import write_json_atomic, write_text_atomic
from megatron_longctx.data.indexed import IndexInfo, read_index
from megatron_longctx.mixture.plan import (
    PLAN_FILE,
    VIEWS_DIR,
    DomainPlan,
    MixturePlan,
    split_documents,
    view_prefix,
)
from megatron_longctx.mixture.report import write_report
from megatron_longctx.mixture.views import PlannedView, Realization, write_view


def _domain_views(plan: MixturePlan, domain: DomainPlan, views_dir: str,
                  index: IndexInfo) -> list[PlannedView]:
    """The train views (buckets with a target and documents) and the valid view of a domain."""
    lengths = index.document_lengths()
    train_docs, valid_docs = split_documents(len(lengths), plan.valid_fraction)
    if plan.strategy == "cut":
        groups = [("cut", train_docs, domain.target_tokens)]
    else:
        is_long = lengths[train_docs] > plan.long_threshold
        groups = [(b.name, train_docs[is_long == (b.name == "long")], b.target_tokens)
                  for b in domain.buckets]
    for bucket, docs, target in groups:
        if target > 0 and docs.size == 0:  # a blend would drop it and renormalise the others
            raise ValueError(
                f"{domain.domain}/{bucket}: the plan draws {target:.3g} tokens from it but it "
                f"has no training documents in {domain.prefix}.idx (--valid-fraction "
                f"{plan.valid_fraction:g}); re-plan with tools/blend_mixture.py")
    out = [PlannedView(domain.domain, bucket, view_prefix(views_dir, domain, bucket), docs,
                       int(lengths[docs].sum()), target)
           for bucket, docs, target in groups if target > 0]
    if valid_docs.size:
        out.append(PlannedView(domain.domain, "valid", view_prefix(views_dir, domain, "valid"),
                               valid_docs, int(lengths[valid_docs].sum()), domain.target_share))
    return out


def planned_views(plan: MixturePlan, views_dir: str) -> list[PlannedView]:
    """Every view of the plan, domain by domain (train views, then the domain's valid view)."""
    return [v for d in plan.domains
            for v in _domain_views(plan, d, views_dir, read_index(d.prefix))]


def _flat(blend: list[tuple[float, str]]) -> list[str]:
    total = sum(w for w, _ in blend)
    return [x for w, p in blend for x in (f"{w / total:.10g}", p)]


def write_views_and_blends(plan: MixturePlan, output_dir: str) -> Realization:
    """Create the views and the blend files."""
    views_dir = os.path.join(output_dir, VIEWS_DIR)
    views: list[PlannedView] = []
    train_blend: list[tuple[float, str]] = []
    valid_blend: list[tuple[float, str]] = []
    for domain in plan.domains:
        index = read_index(domain.prefix)
        for v in _domain_views(plan, domain, views_dir, index):
            write_view(domain.prefix, v.view, v.document_ids, plan.cut_length, index)
            views.append(v)
            if v.bucket == "valid":
                valid_blend.append((v.weight, os.path.abspath(v.view)))
            else:
                train_blend.append((v.weight / plan.train_tokens, os.path.abspath(v.view)))
    blend_path = os.path.join(output_dir, "blend.txt")
    write_text_atomic(blend_path, " ".join(_flat(train_blend)) + "\n")
    per_split_path = os.path.join(output_dir, "blend_per_split.json")
    write_json_atomic(per_split_path, {
        "train": _flat(train_blend),
        "valid": _flat(valid_blend) if valid_blend else None,
        "test": None,
    })
    return Realization(blend_path, per_split_path, [v for v in views if v.bucket != "valid"])


def write_plan_outputs(plan: MixturePlan, output_dir: str) -> dict[str, str]:
    """Views, blends, report, then `mixture_plan.json` last. Returns the main paths."""
    os.makedirs(output_dir, exist_ok=True)
    plan_path = os.path.join(output_dir, PLAN_FILE)
    if os.path.exists(plan_path):
        os.unlink(plan_path)  # a rerun that fails midway must not leave the old plan standing
    realization = write_views_and_blends(plan, output_dir)
    report = write_report(plan, output_dir, realization)
    plan.save(plan_path)
    return {"plan": plan_path, "blend": realization.blend_file,
            "per_split": realization.per_split_file, "report": report}
