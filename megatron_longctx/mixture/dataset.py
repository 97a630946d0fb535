"""The training-side dataset: megatron-core's GPTDataset with the plan's length upsampling.

`LongCtxGPTDataset` replaces its split's document list with the plan's upsampled list before
megatron-core builds its indices: every document of length bucket b appears floor(r_b) times, and
a seeded choice of round(frac(r_b) * n_b) documents once more (`native.build_document_index`).
GPTDataset honours repeated document ids, so megatron-core's own shuffling, packing across
document boundaries (as the paper does) and index caching do the rest. Domains are combined by
megatron-core's BlendedDataset with the plan's domain shares as weights, so the domain mix is
exact at sample granularity and each domain's short/long token split is exact at document level.

Cache safety: the plan's repeat factors, threshold and seed are hashed into `plan_key`, which is
one of `_key_config_attributes()`, so megatron's index cache (keyed by an md5 of those
attributes) can never serve indices of an older plan.

Samples carry `segment_ids` (int32 per token: which packed document a token belongs to) when
`return_document_boundaries` is set, for intra-document attention masking; no s x s mask is ever
built (`create_attention_mask` is forced off: at 128K a dense boolean mask is 16 GiB per sample).
`cut` plans train on the planner's piece views (`views/` beside the plan file), so pieces are
documents and no segment is longer than `--cut-length`.

Splits: with a plan, each dataset's train and valid ranges come from `plan.split_documents`
(the held-out tail of `--valid-fraction`), the same function the view writer and the
evaluation use; `eod_mask_loss` follows `--eod-mask-loss` as on the `--data-path` route.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.utils import Split

from megatron_longctx.data import native
from megatron_longctx.data.indexed import DatasetError, check_dataset
from megatron_longctx.mixture.plan import (
    DomainPlan,
    MixturePlan,
    split_documents,
    split_string,
    view_prefix,
)


class DatasetTokenizer:
    """The few tokenizer attributes megatron-core's datasets read (no tokenizer files needed)."""

    def __init__(self, vocab_size: int, eod: int, sha256: str = "") -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.pad = -1  # never a real id: nothing is masked as padding
        self.unique_identifiers = OrderedDict(
            [("class", "DatasetTokenizer"), ("vocab_size", vocab_size), ("eod", eod),
             ("sha256", sha256)]
        )


@dataclass
class LongCtxGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus the plan's per-bucket repeat factors."""

    #: Documents longer than this are in the "long" bucket (index 1).
    length_threshold: int | None = None
    #: {dataset path prefix: [repeat of short bucket, repeat of long bucket]}.
    bucket_repeats: dict[str, list[float]] | None = None
    #: Hash of everything above and the seed: part of megatron's index-cache key.
    plan_key: str = ""
    #: Add `segment_ids` (packed document id per token) to every sample.
    return_document_boundaries: bool = False
    #: A plan's `--valid-fraction`: each dataset's train split is its first n - round(f * n)
    #: documents and its valid split the rest (`plan.split_documents`), whatever megatron makes
    #: of the `split` string. None: megatron's `split` ranges (the `--data-path` route).
    held_out_fraction: float | None = None

    def __post_init__(self) -> None:
        self.create_attention_mask = False
        super().__post_init__()
        if self.bucket_repeats is not None and not self.plan_key:
            payload = json.dumps([self.length_threshold, self.bucket_repeats, self.random_seed],
                                 sort_keys=True)
            self.plan_key = hashlib.sha256(payload.encode()).hexdigest()


class LongCtxGPTDataset(GPTDataset):
    """GPTDataset over the plan's upsampled document list (train split only)."""

    def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split,
                 config: LongCtxGPTDatasetConfig) -> None:
        if config.held_out_fraction is not None and index_split in (Split.train, Split.valid):
            train_ids, held_ids = split_documents(len(indexed_dataset.sequence_lengths),
                                                  config.held_out_fraction)
            indexed_indices = (train_ids if index_split == Split.train else held_ids).astype(
                np.int32)
        repeats = (config.bucket_repeats or {}).get(dataset_path)
        if repeats is not None and index_split == Split.train:
            kept = upsample_documents(
                indexed_dataset, indexed_indices, config.length_threshold, repeats,
                config.random_seed ^ zlib.crc32(os.path.basename(dataset_path).encode()),
            )
            if kept.size == 0 and len(indexed_indices) and num_samples:
                raise ValueError(
                    f"{dataset_path}: the plan keeps none of its {len(indexed_indices)} training "
                    f"documents (repeat factors {', '.join(f'{r:.3g}' for r in repeats)} round "
                    f"to 0 documents) but the blend draws {num_samples} samples from it: the "
                    "budget is too small for this corpus; raise --train-tokens or give this "
                    "domain weight 0 (--domain-weights)"
                )
            indexed_indices = kept
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples,
                         index_split, config)

    def _get_num_epochs(self, num_tokens_per_epoch: int) -> int:
        # Upstream loops forever when a split of this dataset has no tokens but samples are
        # requested from it (e.g. a small domain whose held-out share rounds to 0 documents).
        if num_tokens_per_epoch <= 0 and self.num_samples:
            raise ValueError(
                f"{self.dataset_path}: the {self.index_split.name} split has no documents but "
                f"{self.num_samples} samples are requested from it (raise --valid-fraction / "
                "--split, or give this dataset more documents)"
            )
        return super()._get_num_epochs(num_tokens_per_epoch)

    @staticmethod
    def _key_config_attributes() -> list[str]:
        return [*GPTDataset._key_config_attributes(), "plan_key", "return_document_boundaries"]

    def part_lengths(self, idx: int) -> np.ndarray:
        """Token counts of the document parts packed into sample `idx` (extra token included)."""
        row = int(self.shuffle_index[idx])
        starts = native.sample_document_boundaries(
            self.sample_index, self.document_index, self.dataset.sequence_lengths, row
        )
        total = self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
        return np.diff(np.concatenate([[0], starts, [total]]))

    def __getitem__(self, idx):
        sample = super().__getitem__(idx)
        if self.config.return_document_boundaries and idx is not None:
            parts = self.part_lengths(idx)
            seg = np.repeat(np.arange(parts.size, dtype=np.int32), parts)
            sample["segment_ids"] = torch.from_numpy(seg[: sample["tokens"].numel()])
        return sample


def upsample_documents(indexed_dataset, indices: np.ndarray, threshold: int,
                       repeats: list[float], seed: int) -> np.ndarray:
    """The split's document ids, each repeated per its bucket's factor (int32, as megatron wants).

    Raises:
        ValueError: the dataset has several sequences per document (--split-sentences output):
            GPTDataset packs sequences, so per-document length buckets would not apply.
    """
    if len(indexed_dataset.document_indices) - 1 != len(indexed_dataset.sequence_lengths):
        raise ValueError(f"{indexed_dataset.path_prefix}: length upsampling needs one sequence "
                         "per document (preprocess without --split-sentences)")
    lengths = indexed_dataset.sequence_lengths[indices]
    buckets = (lengths > threshold).astype(np.int32)
    order = native.build_document_index(buckets, np.asarray(repeats, dtype=np.float64), seed)
    return np.asarray(indices)[order].astype(np.int32)


@dataclass(frozen=True)
class PlanInputs:
    """What our trainer blends for a plan: one dataset per domain with a positive share."""

    prefixes: list[str]
    weights: list[float]
    #: {prefix: [repeat of short, repeat of long]}.
    repeats: dict[str, list[float]]
    #: The plan's domain of each prefix.
    domains: list[DomainPlan]


def check_plan_datasets(plan: MixturePlan) -> None:
    """Every active domain's dataset is whole and is the one the plan was made from.

    Checks the .idx/.bin pair (`check_dataset`: truncation, mismatched pair), the document
    count the plan recorded, and the .idx/.bin sizes of format-3 plans' provenance; costs one
    read of each .idx (12 bytes per document). The trainer and the audit call it through
    `build_plan_datasets`, so a dataset rebuilt or damaged after planning is one line naming
    the plan and the file instead of silently different samples.

    Raises:
        DatasetError: naming the plan file, the domain and the dataset file.
    """
    where = plan.source or "the mixture plan"
    for domain in plan.active_domains:
        index = check_dataset(domain.prefix)
        documents = len(index.document_indices) - 1
        sizes = {"idx_bytes": os.path.getsize(domain.prefix + ".idx"),
                 "bin_bytes": os.path.getsize(domain.prefix + ".bin")}
        changed = [k for k, v in sizes.items() if domain.provenance.get(k, v) != v]
        if documents != domain.documents or changed:
            raise DatasetError(
                f"{where}: domain {domain.domain} was planned on {domain.documents:,} documents "
                f"of {domain.prefix}.idx, which now has {documents:,}"
                f"{' and other ' + '/'.join(changed) if changed else ''}: the dataset changed "
                "after planning; re-run tools/blend_mixture.py")


def plan_dataset_inputs(plan: MixturePlan) -> PlanInputs:
    """The datasets, blend weights and repeat factors that realize `plan` in our trainer.

    `cut` plans train on the piece views beside the plan file (`plan.views_dir`, written by
    `outputs.write_plan_outputs`), each repeated target / view tokens times; the others on the
    stage-1 datasets with the plan's per-bucket repeat factors.
    """
    domains = plan.active_domains
    if plan.strategy != "cut":
        return PlanInputs([d.prefix for d in domains], [d.target_share for d in domains],
                          {d.prefix: d.repeats for d in domains}, domains)
    prefixes, repeats = [], {}
    for d in domains:
        view = view_prefix(plan.views_dir, d, "cut")
        if not os.path.exists(view + ".idx"):
            raise FileNotFoundError(f"{plan.source}: cut view {view}.idx not found (written by "
                                    "tools/blend_mixture.py beside the plan)")
        tokens = int(check_dataset(view).document_lengths().sum())
        r = d.target_tokens / tokens if tokens else 0.0
        prefixes.append(view)
        repeats[view] = [r, r]
    return PlanInputs(prefixes, [d.target_share for d in domains], repeats, domains)


def build_plan_datasets(
    plan: MixturePlan,
    tokenizer: DatasetTokenizer,
    num_samples: tuple[int, int, int],
    seed: int | None = None,
    cache_dir: str | None = None,
    return_document_boundaries: bool = False,
    seq_length: int | None = None,
    eod_mask_loss: bool = False,
):
    """(train, valid, test) BlendedDatasets realizing `plan` (None for empty splits).

    `eod_mask_loss` is `--eod-mask-loss` (no loss on EOD tokens), as on the `--data-path` route.
    """
    check_plan_datasets(plan)
    inputs = plan_dataset_inputs(plan)
    config = LongCtxGPTDatasetConfig(
        random_seed=plan.seed if seed is None else seed,
        sequence_length=seq_length or plan.seq_length,
        blend=(inputs.prefixes, inputs.weights),
        split=split_string(plan.valid_fraction),
        path_to_cache=cache_dir,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=eod_mask_loss,
        length_threshold=plan.long_threshold if plan.strategy != "cut" else 2**62,
        bucket_repeats=inputs.repeats,
        return_document_boundaries=return_document_boundaries,
        held_out_fraction=plan.valid_fraction,
    )
    # A split asked for 0 samples is not built: megatron's _get_num_epochs never terminates for
    # a non-empty document range that must yield 0 samples (it needs > 0 tokens).
    config.split_matrix = [rng if n > 0 else None
                           for rng, n in zip(config.split_matrix, num_samples)]
    builder = BlendedMegatronDatasetBuilder(
        LongCtxGPTDataset, list(num_samples), lambda: True, config
    )
    return builder.build()
