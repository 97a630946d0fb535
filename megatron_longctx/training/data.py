"""Datasets, the per-rank batch sampler and the batch -> model-input step.

Data flow per optimizer step (every rank reads its own micro-batches; nothing is broadcast):

    dataset (BlendedDataset over LongCtxGPTDataset | GPTDataset | MockGPTDataset)
      -> BatchSampler.next_step(): `num_microbatches` micro-batches of this DP rank, in
         Megatron-LM's order (sample i of a global batch goes to DP rank (i // mbs) % DP)
      -> prepare_microbatch(): the CP split (chunks r and 2*CP-1-r of the row); with
         --reset-attention-mask instead the THD micro-batch (document starts from
         `segment_ids`, each document padded to 2*CP, chunks r and 2*CP-1-r of every
         document, one packed row: parallel/thd.py), the layout Transformer Engine takes.

Trade-off: TP ranks read the same samples instead of Megatron-LM's read-on-TP-rank-0 plus a
broadcast. At 128K a micro-batch is 131072 x 8 bytes x ~4 tensors = 4 MB from the page cache,
negligible next to a ~10 s step, and no extra collective is needed.

The sampler position (`consumed_samples`) is saved in checkpoints, so a resumed run reads
exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_longctx.config.tokenizer import NULL_TOKENIZER, TokenizerSpec
from megatron_longctx.config.training import PretrainConfig
from megatron_longctx.data.stats import domain_of_prefix
from megatron_longctx.mixture.dataset import DatasetTokenizer


@dataclass
class TrainData:
    """Datasets and what the loss/logging needs to know about them."""

    train: Any
    valid: Any
    tokenizer: DatasetTokenizer
    domain_names: list[str]


def resolve_tokenizer(cfg: PretrainConfig) -> DatasetTokenizer:
    """vocab size and EOD: NullTokenizer flags, the mixture plan's record, or the tokenizer
    files (any text tokenizer type of config/tokenizer.py)."""
    data = cfg.data
    if data.tokenizer_type == NULL_TOKENIZER:
        vocab = int(data.vocab_size or 0)
        return DatasetTokenizer(vocab, vocab - 1, "null")
    if data.mixture_plan and not data.tokenizer_model:
        from megatron_longctx.mixture.plan import load_plan

        tok = load_plan(data.mixture_plan).tokenizer
        return DatasetTokenizer(tok.vocab_size, tok.eod, tok.sha256)
    from megatron_longctx.data.tokenizers import build_tokenizer

    tok = build_tokenizer(TokenizerSpec(data.tokenizer_type, data.tokenizer_model))
    if tok.eod is None:
        raise ValueError(f"--tokenizer-model {data.tokenizer_model}: the tokenizer has no EOS "
                         "token to use as end-of-document")
    return DatasetTokenizer(int(tok.vocab_size), int(tok.eod), tok.identity()["sha256"])


def _blend(items: list[str], flag: str) -> tuple[list[str], list[float] | None]:
    """Megatron's blend list (`p1 p2 ...` or `w1 p1 w2 p2 ...`) via its own parser; every
    prefix must be a complete dataset (`check_dataset`: the error names the flag and the file,
    not a later megatron assertion or a read past the end of a truncated .bin)."""
    from megatron.core.datasets.utils import get_blend_from_list

    from megatron_longctx.data.indexed import DatasetError, check_dataset

    if not items:
        raise ValueError(f"{flag}: no dataset prefixes given")
    try:
        prefixes, weights = get_blend_from_list(items)
    except (AssertionError, ValueError) as err:
        raise ValueError(f"{flag}: not a list of prefixes or weight/prefix pairs "
                         f"({err or items[:4]})") from None
    for prefix in prefixes:
        try:
            check_dataset(prefix)
        except DatasetError as err:
            raise DatasetError(f"{flag}: {err}") from None
    return list(prefixes), weights


def _read_args_file(path: str, flag: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read().split()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err})") from None


def _read_per_split_spec(path: str) -> dict[str, Any]:
    flag = "--per-split-data-args-path"
    try:
        with open(path, encoding="utf-8") as handle:
            spec = json.load(handle)
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{flag} {path}: cannot be read ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {path}: invalid JSON ({err})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{flag} {path}: expected a JSON object with train/valid/test")
    return spec


def _split_items(items: Any) -> list[str]:
    return items if isinstance(items, list) else str(items).split()


def check_data_files(cfg: PretrainConfig) -> None:
    """Check every dataset the flags name before any process group exists (the entrypoint
    calls it): --data-path, --data-args-path, --per-split-data-args-path prefixes are complete
    .bin/.idx pairs. Mock data and mixture plans (validated by mixture/plan.py when loaded) are
    not checked here.

    Raises:
        ValueError: (DatasetError included) naming the flag and the file.
    """
    data = cfg.data
    if data.mock_data or data.mixture_plan:
        return
    if data.per_split_data_args_path:
        spec = _read_per_split_spec(data.per_split_data_args_path)
        for split in ("train", "valid", "test"):
            if spec.get(split):
                _blend(_split_items(spec[split]), "--per-split-data-args-path")
    elif data.data_path:
        _blend(data.data_path, "--data-path")
    elif data.data_args_path:
        _blend(_read_args_file(data.data_args_path, "--data-args-path"), "--data-args-path")


def num_samples_needed(cfg: PretrainConfig, world_size: int) -> tuple[int, int, int]:
    """(train, valid, test) samples the run will draw, as Megatron-LM computes them."""
    gbs = cfg.global_batch_size(world_size)
    t = cfg.training
    train = t.train_iters * gbs
    evals = (t.train_iters // t.eval_interval + 1) if t.eval_interval and t.eval_iters else 0
    return train, evals * t.eval_iters * gbs, 0


def build_datasets(cfg: PretrainConfig, world_size: int,
                   tokenizer: DatasetTokenizer | None = None) -> TrainData:
    """Train/valid datasets from whichever source the flags name (validated: exactly one)."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

    from megatron_longctx.mixture.dataset import (
        LongCtxGPTDataset,
        LongCtxGPTDatasetConfig,
        build_plan_datasets,
    )

    data = cfg.data
    tokenizer = tokenizer or resolve_tokenizer(cfg)
    sizes = num_samples_needed(cfg, world_size)
    seq = cfg.model.seq_length
    boundaries = data.reset_attention_mask
    if data.mock_data:
        config = GPTDatasetConfig(
            random_seed=cfg.training.seed, sequence_length=seq, blend=None, blend_per_split=None,
            split="1,1,0", tokenizer=tokenizer, reset_position_ids=False,
            reset_attention_mask=False, eod_mask_loss=data.eod_mask_loss,
            create_attention_mask=False, mid_level_dataset_surplus=0.005,
        )
        sizes = tuple(n if n > 0 else None for n in sizes)
        train, valid, _ = BlendedMegatronDatasetBuilder(
            MockGPTDataset, list(sizes), lambda: True, config).build()
        return TrainData(train, valid, tokenizer, ["mock"])
    if data.mixture_plan:
        from megatron_longctx.mixture.plan import load_plan

        plan = load_plan(data.mixture_plan)
        cache = data.data_cache_path or os.path.join(
            os.path.dirname(os.path.abspath(data.mixture_plan)), "cache")
        train, valid, _ = build_plan_datasets(
            plan, tokenizer, sizes, seed=cfg.training.seed, cache_dir=cache,
            return_document_boundaries=boundaries, seq_length=seq,
            eod_mask_loss=data.eod_mask_loss)
        names = [d.domain for d in plan.active_domains]
        return TrainData(train, valid, tokenizer, names)
    blend = blend_per_split = None
    if data.per_split_data_args_path:
        spec = _read_per_split_spec(data.per_split_data_args_path)
        blend_per_split = []
        for split in ("train", "valid", "test"):
            items = spec.get(split)
            blend_per_split.append(
                _blend(_split_items(items), "--per-split-data-args-path") if items else None)
        names = [domain_of_prefix(p) for p in blend_per_split[0][0]]
    else:
        items = data.data_path or _read_args_file(data.data_args_path or "", "--data-args-path")
        blend = _blend(items, "--data-path" if data.data_path else "--data-args-path")
        names = [domain_of_prefix(p) for p in blend[0]]
    config = LongCtxGPTDatasetConfig(
        random_seed=cfg.training.seed, sequence_length=seq, blend=blend,
        blend_per_split=blend_per_split, split=None if blend_per_split else data.split,
        path_to_cache=data.data_cache_path, tokenizer=tokenizer, reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=data.eod_mask_loss,
        return_document_boundaries=boundaries,
    )
    if config.split_matrix is not None:
        config.split_matrix = [rng if n > 0 else None
                               for rng, n in zip(config.split_matrix, sizes)]
    train, valid, _ = BlendedMegatronDatasetBuilder(
        LongCtxGPTDataset, list(sizes), lambda: True, config).build()
    return TrainData(train, valid, tokenizer, names)


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def collate(samples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack dataset samples into [b, s] tensors (dataset_id into [b])."""
    out: dict[str, torch.Tensor] = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids", "segment_ids"):
        if key in samples[0]:
            out[key] = torch.stack([torch.as_tensor(s[key]) for s in samples])
    if "dataset_id" in samples[0]:
        out["dataset_id"] = torch.tensor([int(s["dataset_id"]) for s in samples])
    return out


class BatchSampler:
    """This DP rank's micro-batches, step by step, from a position that checkpoints restore.

    Megatron-LM's MegatronPretrainingSampler order: global sample index
    consumed + m * (mbs * DP) + dp_rank * mbs + j is sample j of micro-batch m on `dp_rank`.
    """

    def __init__(self, dataset: Any, micro_batch_size: int, dp_rank: int, dp_size: int,
                 consumed_samples: int = 0) -> None:
        self.dataset = dataset
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed_samples = consumed_samples

    def next_step(self, num_microbatches: int) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step; advances the position by a global batch."""
        mbs, dp = self.micro_batch_size, self.dp_size
        total = len(self.dataset)
        needed = self.consumed_samples + num_microbatches * mbs * dp
        if needed > total:
            raise RuntimeError(f"dataset exhausted: {needed} samples needed, {total} built "
                               "(raise the sample count or lower --train-iters)")
        batches = []
        for m in range(num_microbatches):
            start = self.consumed_samples + m * mbs * dp + self.dp_rank * mbs
            batches.append(collate([self.dataset[i] for i in range(start, start + mbs)]))
        self.consumed_samples = needed
        return batches


# --------------------------------------------------------------------------------------------
# batch -> model inputs
# --------------------------------------------------------------------------------------------
def document_starts(segment_ids: torch.Tensor) -> list[list[int]]:
    """Per row, the positions where the packed-document id changes (plus 0)."""
    seg = segment_ids.detach().cpu().numpy()
    return [[0, *(np.flatnonzero(np.diff(row)) + 1).tolist()] for row in seg]


def build_thd_microbatch(batch: dict[str, torch.Tensor], *, cp_size: int, cp_rank: int,
                         seq_length: int, eod: int, reset_position_ids: bool = False,
                         pad_multiple: int | None = None) -> dict[str, Any]:
    """This CP rank's THD micro-batch (`parallel.thd`): the rows' documents, each padded to a
    multiple of 2*CP with loss-masked pads and every row cut back to `seq_length`, packed into
    one row [1, b * seq_length / CP] with global cu_seqlens (= cu_seqlens_padded, int32).

    Tokens keep their order; pads hold `eod` (label `eod`, loss mask 0). `position_ids` are
    each slot's position in its row (or in its document with `reset_position_ids`); RoPE takes
    its positions from the ThdSeqParams, the same way. Returns tokens / labels / loss_mask /
    position_ids [1, t], `packed_seq_params` and `thd_stats`: pad and dropped token counts and
    the sum of squared padded document lengths of the whole micro-batch (before the CP split,
    so every CP rank reports the same). `pad_multiple` overrides 2*CP (a larger multiple of
    it: one process can then run the very batch a CP run splits).
    """
    from megatron_longctx.model.attention import document_starts_from_eod
    from megatron_longctx.parallel.thd import (
        pack_row,
        thd_pad_multiple,
        thd_partition_indices,
        thd_seq_params,
    )

    if "segment_ids" in batch:
        starts = document_starts(batch["segment_ids"])
    else:
        starts = document_starts_from_eod(batch["tokens"], eod)
    multiple = pad_multiple or thd_pad_multiple(cp_size)
    if multiple % thd_pad_multiple(cp_size):
        raise ValueError(f"pad multiple {multiple} is not a multiple of 2 x CP ({cp_size})")
    rows = {k: [] for k in ("tokens", "labels", "loss_mask", "position_ids")}
    cu_all, pads, dropped = [0], 0, 0
    for i, row_starts in enumerate(starts):
        row = pack_row(row_starts, seq_length, multiple)
        pads, dropped = pads + row.pad_tokens, dropped + row.dropped_tokens
        index = torch.from_numpy(row.index)
        real = index >= 0
        src = index.clamp(min=0)
        for key, fill in (("tokens", eod), ("labels", eod), ("loss_mask", 0)):
            value = batch[key][i].index_select(0, src)
            rows[key].append(torch.where(real, value, torch.full_like(value, fill)))
        positions = row.doc_positions if reset_position_ids else np.arange(seq_length)
        rows["position_ids"].append(torch.from_numpy(np.asarray(positions, dtype=np.int64)))
        cu_all.extend((row.cu_seqlens[1:].astype(np.int64) + i * seq_length).tolist())
    cu = torch.tensor(cu_all, dtype=torch.int64)
    local = thd_partition_indices(cu, cp_size, cp_rank)
    out: dict[str, Any] = {k: torch.cat(v).index_select(0, local).unsqueeze(0)
                           for k, v in rows.items()}
    out["packed_seq_params"] = thd_seq_params(cu, seq_length, reset_position_ids)
    lengths = (cu[1:] - cu[:-1]).double()
    out["thd_stats"] = {"pad_tokens": pads, "dropped_tokens": dropped,
                        "square_tokens": float((lengths * lengths).sum())}
    return out


def prepare_microbatch(batch: dict[str, torch.Tensor], *, cp_size: int, cp_rank: int,
                       seq_length: int, document_masking: bool, eod: int,
                       device: torch.device | None = None,
                       reset_position_ids: bool = False,
                       pad_multiple: int | None = None) -> dict[str, Any]:
    """Model inputs of this CP rank. Without document masking: the [b, s] tensors split in
    Megatron's load-balanced layout (chunks r and 2*CP-1-r). With it: the THD micro-batch of
    `build_thd_microbatch` (one packed row, what Transformer Engine and the SDPA twin take)."""
    from megatron_longctx.parallel.context_parallel import split_batch_for_cp

    if document_masking:
        local = build_thd_microbatch(batch, cp_size=cp_size, cp_rank=cp_rank,
                                     seq_length=seq_length, eod=eod,
                                     reset_position_ids=reset_position_ids,
                                     pad_multiple=pad_multiple)
        params = local["packed_seq_params"]
        if device is not None:
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                local[key] = local[key].to(device, non_blocking=True)
            cu = params.cu_seqlens_q.to(device, non_blocking=True)
            params.cu_seqlens_q = params.cu_seqlens_kv = cu
            params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = cu
        local["dataset_id"] = batch.get("dataset_id")
        return local
    tensors = {k: batch[k] for k in ("tokens", "labels", "loss_mask", "position_ids")
               if k in batch}
    local = split_batch_for_cp(tensors, cp_size, cp_rank)
    if device is not None:
        local = {k: v.to(device, non_blocking=True) for k, v in local.items()}
    local["packed_seq_params"] = None
    local["dataset_id"] = batch.get("dataset_id")
    return local
