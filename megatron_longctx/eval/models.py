"""One causal-LM interface for the evaluation tools, over two backends.

* `MegatronCausalLM`: a checkpoint of ours (trainer or converter, docs/checkpoint-format.md),
  rebuilt from `longctx_meta.json` as megatron-core's GPTModel on the local layer spec and
  loaded at any TP / CP (dist_checkpointing reshards).
* `HFCausalLM`: a Hugging Face model directory through `transformers.AutoModelForCausalLM`.

`load_causal_lm` tells them apart (`checkpoint.meta.is_longctx_checkpoint`).

What a tool calls (`CausalLM`): `tokenizer` (an `EvalTokenizer`), `generate(ids, n)` (greedy,
at most n new tokens, stops at EOS; `reuse_prefix=True` continues from a persistent KV cache,
below), `reserve_cache(n)` / `clear_cache()` (that cache), `token_losses(ids)` (per-token
negative log-likelihood) and `describe()`. Logits past the real vocabulary (Megatron pads it
to a multiple of 128 x TP) are excluded from the argmax and from the softmax of the losses: a
converted checkpoint has exactly-zero padded logits, which would otherwise add
`log(1 + pad / sum(exp(logits)))` to every loss. (Megatron's training loss keeps them; after
training they are very negative.)

Generation never recomputes the context per new token:

* Megatron: megatron-core's `StaticInferenceContext` KV cache. The prompt is prefilled in
  chunks of `prefill_chunk` tokens (activation memory of one chunk instead of the whole
  prompt), then one token per step. Each step attends over the cache: O(S) per layer instead of
  a full O(S^2) recompute. Megatron marks every step after the first chunk `no_mask`;
  `SDPACoreAttention` treats more keys than queries under a causal module as bottom-right
  causal, which makes chunked prefill exact (model/attention.py). The cache holds K and V of
  every layer for this TP rank's query groups: 2 x layers x S x groups/TP x head_dim x bytes
  (LLaMA-2 7B at 128K in bf16: 64 GiB in all, 8 GiB per rank at TP8). Megatron keeps keys
  unrotated and re-applies RoPE to the whole cached K each step (an extra O(S) elementwise
  pass per layer).
* HF: the model's own `past_key_values`, prefilled in the same chunks, `logits_to_keep=1`.

`generate(..., use_cache=False)` runs the no-cache full recompute (one whole forward per new
token): the reference the tests compare the cache against.

Prefix reuse (`generate(..., reuse_prefix=True)`): the model keeps one persistent KV cache
(per rank: every rank executes the same calls in the same order, so at TP each holds its
shard of the same sequence). A call keeps the cached K/V of the longest common token prefix
of its prompt with the sequence the cache holds (the previous prompt and the tokens generated
after it), at most all but the prompt's last token (whose logits start the generation), and
prefills only the rest; then it generates in that cache and leaves it there. Ours rewinds the
static context's `sequence_len_offset` (the buffers are kept; the next forward overwrites the
positions after it); HF crops its `DynamicCache` (`crop(-n)`: full-attention layers only;
other cache types get a fresh prefill every call). `last_reused_tokens` says how many prompt
tokens were reused. Exact: a causal model's K/V at position j depend only on tokens 0..j, and
kept positions hold the same tokens at the same positions; what changes is the floating-point
grouping of the prefill, the same kind of difference as another `prefill_chunk` (the continued
prefill is cut on the same multiples of `prefill_chunk` as one from 0, so only its first chunk
differs). It pays when consecutive prompts share long prefixes (RULER's noise and essay
haystacks up to the first needle): the saved prefill is the shared share of the prompt tokens.
Memory: ours holds buffers for max(prompt + new tokens, `reserve_cache`) positions, rounded up
to 1024, until `clear_cache()` or `close()` (a longer sequence reallocates, starting empty);
HF's cache grows with the sequence. Plain calls (`reuse_prefix=False`) leave it untouched and
use a cache of their own.

Model parallelism (Megatron backend): one model replica spread over TP x CP ranks, world size
= TP x CP, launched with torchrun or srun (one process: no launcher). Global rank 0 is the
driver: it runs the tool and, for every model call, broadcasts the command to the other ranks,
which sit in `serve()` until the driver's `close()`. TP splits weights and the KV cache.
CP splits the sequence for `token_losses` (Megatron's load-balanced layout, as in training).
CP does not apply to `generate`: a CP-split KV cache would need a ring/all-gather decode that
megatron-core 0.16.1's static inference path does not have, so `generate` at CP > 1 raises.
For 128K needle tests use TP (weights and cache split) with chunked prefill (activations of
one chunk); CP is for the full-sequence forward of the perplexity tool.

The HF backend runs in one process (one device); convert to our format for TP/CP
(tools/convert_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megatron_longctx.checkpoint.integrity import open_checkpoint
from megatron_longctx.checkpoint.meta import is_longctx_checkpoint, model_config_of
from megatron_longctx.config.dtypes import PARAMS_DTYPES, torch_dtype
from megatron_longctx.identity import content_sha256

#: Prompt tokens per prefill forward; 0 prefills the whole prompt in one forward.
DEFAULT_PREFILL_CHUNK = 4096
#: Positions per output-layer call when the HF backend computes losses.
_HF_LOSS_CHUNK = 4096
#: A new persistent KV cache is allocated for a multiple of this many positions: the prompts
#: of one length (which differ by a few tokens) then share one allocation.
_CACHE_GRANULE = 1024


class EvalTokenizer:
    """Text <-> token ids for evaluation: a fast Hugging Face tokenizer (directory or
    tokenizer.json), with character offsets and the tokenizer's own BOS prefix.

    Loaded through `megatron_longctx.data.tokenizers` (Megatron's special-token fix-ups), so
    ids are those the preprocessing wrote. `encode` adds no special tokens; `bos_ids` is what
    the tokenizer's post-processor would put in front of a text (LLaMA: `[1]`; the demo's BPE:
    `[]`), found by encoding one word with and without special tokens.

    Attributes:
        path: the tokenizer directory or file.
        vocab_size: `len(tokenizer)`.
        eos_id: end-of-text id (generation stops there), or None.
        bos_ids: ids prepended to every prompt.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from tokenizers import Tokenizer

        from megatron_longctx.config.tokenizer import TokenizerSpec
        from megatron_longctx.data.tokenizers import HFBackendTokenizer, build_tokenizer

        tok = build_tokenizer(TokenizerSpec("HuggingFaceTokenizer", str(path)))
        if not isinstance(tok, HFBackendTokenizer):
            raise ValueError(f"--tokenizer-model {path}: evaluation needs a fast tokenizer "
                             "(tokenizer.json); this one only has a slow Python implementation")
        self.path = str(path)
        self.vocab_size = int(tok.vocab_size)
        self.eos_id = None if tok.eod is None else int(tok.eod)
        self._tok = Tokenizer.from_str(tok.backend_json)
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(full) - len(plain) + 1)
                      if full[i:i + len(plain)] == plain), 0)
        self.bos_ids: list[int] = list(full[:start])

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, no special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_with_offsets(self, text: str) -> tuple[list[int], np.ndarray]:
        """Token ids and an int64 [n, 2] array of (start, end) character offsets into `text`."""
        enc = self._tok.encode(text, add_special_tokens=False)
        offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        return list(enc.ids), offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)


class CausalLM:
    """Interface of an evaluation model (subclasses implement the `_` methods).

    Attributes:
        kind: "megatron" or "hf".
        path: the model directory as given.
        vocab_size: real vocabulary; logits at and above it are padding and ignored.
        max_position_embeddings: positions the model was configured for (None if unknown).
        training_length: sequence length it was trained at (ours: the checkpoint's
            `seq_length`; None for HF directories).
        is_driver: True on the rank that runs the tool (global rank 0).
        last_reused_tokens: prompt tokens the last `generate` on this rank took from the
            persistent KV cache (0 without `reuse_prefix`).
    """

    kind = "base"
    path: str
    vocab_size: int
    max_position_embeddings: int | None = None
    training_length: int | None = None
    is_driver: bool = True
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    last_reused_tokens: int = 0
    model: Any = None

    def __init__(self, tokenizer_model: str | None) -> None:
        self._tokenizer_model = tokenizer_model
        self._tokenizer: EvalTokenizer | None = None
        self._prefix_cache = _PrefixCache()
        self._content: dict[str, Any] | None = None

    # -- tokenizer --------------------------------------------------------------------------
    @property
    def tokenizer(self) -> EvalTokenizer:
        """The model's tokenizer (loaded on first use; --tokenizer-model when none is known)."""
        if self._tokenizer is None:
            if not self._tokenizer_model:
                raise ValueError(f"{self.path}: no tokenizer recorded with the model; pass "
                                 "--tokenizer-model DIR")
            tok = EvalTokenizer(self._tokenizer_model)
            if tok.vocab_size > self.vocab_size:
                raise ValueError(
                    f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model only "
                    f"{self.vocab_size}: not the model's tokenizer (--tokenizer-model)")
            self._tokenizer = tok
        return self._tokenizer

    def stop_ids(self) -> list[int]:
        """Ids that end generation: the tokenizer's EOS when it has one."""
        if self._tokenizer_model is None:
            return []
        eos = self.tokenizer.eos_id
        return [] if eos is None else [eos]

    # -- public calls (collective for multi-rank models) -------------------------------------
    def generate(self, ids: Sequence[int], max_new_tokens: int, *,
                 stop_ids: Sequence[int] | None = None, use_cache: bool = True,
                 reuse_prefix: bool = False) -> list[int]:
        """Greedy continuation of `ids`: at most `max_new_tokens` new ids, ending before the
        first stop id.

        Args:
            ids: prompt token ids (BOS included when the caller wants one).
            max_new_tokens: generation budget; < 1 returns [] without a model call.
            stop_ids: ids that end generation (not returned); default EOS (`stop_ids()`).
            use_cache: KV-cache generation; False recomputes the whole sequence for every new
                token (the reference the tests compare the cache against).
            reuse_prefix: run in the model's persistent KV cache (see the module docstring):
                keep the cached K/V of the longest common prefix of `ids` with the sequence the
                cache holds (at most all but the last prompt token), prefill only the rest,
                and leave this prompt and its generated tokens cached for the next call.
                `last_reused_tokens` tells how many prompt tokens came from the cache.

        Returns:
            The new token ids.

        Raises:
            ValueError: `reuse_prefix` without `use_cache`.
        """
        if reuse_prefix and not use_cache:
            raise ValueError("reuse_prefix needs the KV cache (use_cache=True)")
        self.last_reused_tokens = 0
        if max_new_tokens < 1:
            return []
        stop = list(self.stop_ids() if stop_ids is None else stop_ids)
        new, reused = self._call("generate", [int(i) for i in ids], int(max_new_tokens), stop,
                                 bool(use_cache), bool(reuse_prefix))
        self.last_reused_tokens = int(reused)
        return new

    def reserve_cache(self, max_tokens: int) -> None:
        """Size the persistent KV cache (`generate(..., reuse_prefix=True)`) for sequences of
        up to `max_tokens` tokens (prompt + new tokens), so that longer prompts later do not
        reallocate it (a reallocation starts empty). Ours: a cache smaller than that is
        dropped now and the next reuse call allocates `max_tokens` positions; HF: the cache
        grows as needed, nothing to do. Allocates nothing by itself."""
        if max_tokens < 1:
            raise ValueError(f"reserve_cache needs max_tokens >= 1, got {max_tokens}")
        self._call("reserve_cache", int(max_tokens))

    def clear_cache(self) -> None:
        """Release the persistent KV cache (its memory; the reserved size too): the next
        `generate(..., reuse_prefix=True)` prefills from scratch. `close()` releases it as
        well; after `close()` this is a no-op."""
        if self.model is None:
            self._prefix_cache = _PrefixCache()
            return
        self._call("clear_cache")

    def token_losses(self, ids: Sequence[int]) -> np.ndarray:
        """Negative log-likelihood (nats, float64) of ids[j] given ids[:j], for j = 1..n-1."""
        if len(ids) < 2:
            raise ValueError("token_losses needs at least 2 tokens")
        return self._call("token_losses", [int(i) for i in ids])

    def describe(self) -> dict[str, Any]:
        """What results files record about the model, its content included: the sha256 of
        the weights directory (`identity.content_sha256`; a checkpoint re-converted or
        retrained at the same path differs) and of the tokenizer files."""
        if self._content is None:
            tokenizer = self._tokenizer_model
            self._content = {
                "weights_sha256": content_sha256(self._weights_path()),
                "tokenizer_sha256": (content_sha256(tokenizer) if tokenizer
                                     and Path(tokenizer).exists() else None)}
        return {"kind": self.kind, "path": str(Path(self.path).resolve()),
                "vocab_size": self.vocab_size,
                "max_position_embeddings": self.max_position_embeddings,
                "training_length": self.training_length,
                "tokenizer": self._tokenizer_model, **self._content}

    def _weights_path(self) -> Path:
        """The file or directory whose bytes are the model (hashed once by `describe`)."""
        return Path(self.path)

    def serve(self) -> None:
        """Non-driver ranks: execute the driver's calls until it closes (no-op on rank 0)."""

    def close(self) -> None:
        """Release the model and its KV cache (and, for multi-rank models, stop the serving
        ranks)."""

    def __enter__(self) -> CausalLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- shared implementation (every rank of a multi-rank model runs the _do_ methods with
    #    the same arguments in the same order, so their caches stay identical) ---------------
    def _call(self, name: str, *args: Any) -> Any:
        return getattr(self, f"_do_{name}")(*args)

    def _do_generate(self, ids: list[int], max_new: int, stop: list[int], use_cache: bool,
                     reuse: bool) -> tuple[list[int], int]:
        keep = 0
        try:
            with torch.inference_mode():
                if reuse:
                    state, keep = self._reuse_state(ids, len(ids) + max_new)
                    logits = self._extend(state, ids, keep)
                elif use_cache:
                    state, logits = self._prefill(ids, len(ids) + max_new)
                else:
                    state, logits = None, self._last_logits(ids)
                out: list[int] = []
                while True:
                    token = int(torch.argmax(logits[: self.vocab_size]))
                    if token in stop:
                        break
                    out.append(token)
                    if len(out) == max_new:
                        break
                    logits = (self._step(state, token, len(ids) + len(out) - 1) if use_cache
                              else self._last_logits(ids + out))
        except BaseException:
            if reuse:  # a forward may have stopped half-way through the layers: start over
                self._prefix_cache.state = None
                self._prefix_cache.ids = np.zeros(0, dtype=np.int64)
            raise
        if reuse:  # the cache holds every fed token: the prompt and all but an unfed last one
            fed = len(out) if len(out) < max_new else len(out) - 1
            self._prefix_cache.ids = np.asarray(ids + out[:fed], dtype=np.int64)
        return out, keep

    def _reuse_state(self, ids: list[int], total: int) -> tuple[Any, int]:
        """The persistent state rewound to the longest common prefix of `ids` with what it
        holds (at most len(ids) - 1), or a new one (keep 0) when it is missing, too small
        for `total` positions or cannot be rewound exactly."""
        cache = self._prefix_cache
        state = cache.state
        if state is not None:
            capacity = self._capacity(state)
            if (capacity is not None and capacity < total) or not self._can_rewind(state):
                state = cache.state = None  # free it before allocating the next one
        if state is None:
            size = max(total, cache.reserved)
            cache.state = state = self._new_state(-(-size // _CACHE_GRANULE) * _CACHE_GRANULE)
            cache.ids = np.zeros(0, dtype=np.int64)
        prompt = np.asarray(ids, dtype=np.int64)
        keep = min(_common_prefix(cache.ids, prompt), len(ids) - 1)
        self._rewind(state, keep)
        cache.ids = cache.ids[:keep]
        return state, keep

    def _do_reserve_cache(self, max_tokens: int) -> None:
        cache = self._prefix_cache
        cache.reserved = max_tokens
        if cache.state is not None:
            capacity = self._capacity(cache.state)
            if capacity is not None and capacity < max_tokens:
                cache.state, cache.ids = None, np.zeros(0, dtype=np.int64)

    def _do_clear_cache(self) -> None:
        self._prefix_cache = _PrefixCache()

    def _prefill(self, ids: list[int], total: int) -> tuple[Any, torch.Tensor]:
        """A new KV state for `total` positions with `ids` prefilled; logits of the last."""
        state = self._new_state(total)
        return state, self._extend(state, ids, 0)

    # backend hooks
    def _new_state(self, total: int) -> Any:
        """An empty KV state for up to `total` positions."""
        raise NotImplementedError

    def _capacity(self, state: Any) -> int | None:
        """Positions `state` can hold (None: grows as needed)."""
        raise NotImplementedError

    def _can_rewind(self, state: Any) -> bool:
        """Whether `_rewind` is exact for `state`."""
        return True

    def _rewind(self, state: Any, keep: int) -> None:
        """Keep the first `keep` cached positions of `state`, forget the rest."""
        raise NotImplementedError

    def _extend(self, state: Any, ids: list[int], start: int) -> torch.Tensor:
        """Prefill ids[start:] at positions start.. into `state` (which holds ids[:start]) in
        `_chunks`; logits of the last position."""
        raise NotImplementedError

    def _step(self, state: Any, token: int, position: int) -> torch.Tensor:
        raise NotImplementedError

    def _last_logits(self, ids: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def _do_token_losses(self, ids: list[int]) -> np.ndarray:
        raise NotImplementedError

    def _chunks(self, n: int, start: int = 0) -> list[tuple[int, int]]:
        """Prefill ranges covering start..n, cut at multiples of `prefill_chunk` (the grid of
        a prefill from 0, so a continued prefill runs the same chunks after its first)."""
        if self.prefill_chunk <= 0 or start >= n:
            return [(start, n)] if start < n else []
        step = self.prefill_chunk
        edges = [start, *range((start // step + 1) * step, n, step), n]
        return list(zip(edges[:-1], edges[1:]))


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """Length of the longest common prefix of two id arrays."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


@dataclass
class _PrefixCache:
    """The persistent KV cache of `generate(..., reuse_prefix=True)`.

    Attributes:
        state: the backend's KV state (ours: a StaticInferenceContext; HF: {"past": cache}),
            None when released.
        ids: the tokens whose K/V `state` holds, position 0 on.
        reserved: positions a new state is allocated for at least (`reserve_cache`).
    """

    state: Any = None
    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reserved: int = 0


def _resolve_dtype(dtype: str, saved: str | None) -> str:
    """auto: fp32 without CUDA (this kind of CPU has no bf16 units), else the saved dtype."""
    if dtype != "auto":
        if dtype not in PARAMS_DTYPES:
            raise ValueError(f"--dtype must be auto or one of {sorted(PARAMS_DTYPES)}, got "
                             f"{dtype!r}")
        return dtype
    if not torch.cuda.is_available():
        return "fp32"
    return saved if saved in PARAMS_DTYPES else "fp32"


class MegatronCausalLM(CausalLM):
    """A checkpoint of ours as megatron-core GPTModel (local spec) at TP x CP ranks.

    Call on every rank of the launch (collective construction). See the module docstring for
    the driver/serve protocol, the KV cache and what CP covers.

    Args:
        path: checkpoint root (its latest marker is followed) or iteration directory.
        tensor_model_parallel_size: TP.
        context_parallel_size: CP (`token_losses` only).
        dtype: auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, the checkpoint's dtype on GPU).
        tokenizer_model: tokenizer directory; default the checkpoint's recorded one.
        prefill_chunk: prompt tokens per prefill forward (0 = the whole prompt at once).
    """

    kind = "megatron"

    def __init__(self, path: str | os.PathLike, *, tensor_model_parallel_size: int = 1,
                 context_parallel_size: int = 1, dtype: str = "auto",
                 tokenizer_model: str | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        from megatron_longctx.checkpoint.model_io import (
            checkpoint_params_dtype,
            load_model_checkpoint,
        )
        from megatron_longctx.config.model import ParallelConfig, PrecisionConfig
        from megatron_longctx.model.build import build_model_chunks

        # Marker, metadata and tensor files checked before any model is built
        # (checkpoint/integrity.py): damage is a CheckpointError naming the file.
        directory, meta = open_checkpoint(path)
        recorded = (meta.get("tokenizer") or {}).get("model")
        super().__init__(tokenizer_model or recorded)
        self.path = str(path)
        self.directory = directory
        self.meta = meta
        self.config = model_config_of(meta, directory)
        self.vocab_size = self.config.vocab_size
        self.max_position_embeddings = self.config.max_position_embeddings
        self.training_length = self.config.seq_length
        self.prefill_chunk = int(prefill_chunk)
        self.tp = int(tensor_model_parallel_size)
        self.cp = int(context_parallel_size)
        self.parallel = ParallelConfig(tensor_model_parallel_size=self.tp,
                                       context_parallel_size=self.cp)
        self._stack = contextlib.ExitStack()
        self._closed = False
        try:
            self._init_distributed()
            saved = (checkpoint_params_dtype(directory)
                     if dtype == "auto" and torch.cuda.is_available() else None)
            self.dtype = _resolve_dtype(dtype, saved)
            precision = PrecisionConfig(params_dtype=self.dtype)
            chunks = build_model_chunks(self.config, self.parallel, precision,
                                        perform_initialization=False)
            load_model_checkpoint(chunks, directory)
            model = chunks[0]
            if self.dtype != "fp32":
                from megatron.core.transformer.module import Float16Module

                model = Float16Module(model.config, model)
            self.model = model.eval()
        except BaseException:
            self._stack.close()
            raise
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if torch.cuda.is_available() else torch.device("cpu"))

    def _init_distributed(self) -> None:
        from megatron_longctx.checkpoint.model_io import single_process_group
        from megatron_longctx.parallel.init import (
            destroy_distributed,
            initialize_distributed,
            read_dist_env,
            release_model_parallel,
        )

        self.parallel.validate()
        world = dist.get_world_size() if dist.is_initialized() else read_dist_env().world_size
        need = self.parallel.model_parallel_size
        if world != need:
            raise ValueError(
                f"evaluation runs one model replica: the world size ({world}) must equal "
                f"--tensor-model-parallel-size ({self.tp}) x --context-parallel-size "
                f"({self.cp}) = {need}; launch with e.g. torchrun --nproc-per-node {need}")
        if world == 1:
            self._stack.enter_context(single_process_group())
        else:
            created = not dist.is_initialized()
            initialize_distributed(self.parallel)
            self._stack.callback(destroy_distributed if created else release_model_parallel)
        self.rank = dist.get_rank()
        self.world_size = world
        self.is_driver = self.rank == 0

    def _weights_path(self) -> Path:
        return self.directory  # the iteration read, not the root later saves add to

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "checkpoint": str(self.directory.resolve()),
                "iteration": self.meta.get("iteration"), "dtype": self.dtype,
                "tensor_model_parallel_size": self.tp, "context_parallel_size": self.cp,
                "prefill_chunk": self.prefill_chunk}

    # -- driver / serving ranks -------------------------------------------------------------
    def _call(self, name: str, *args: Any) -> Any:
        if not self.is_driver:
            raise RuntimeError("only rank 0 calls the model; other ranks run serve()")
        if self._closed:
            raise RuntimeError(f"{self.path}: the model is closed")
        if name == "generate" and self.cp > 1:
            raise NotImplementedError(
                "generation with --context-parallel-size > 1 is not supported (megatron-core "
                "0.16.1's KV cache is not context-parallel); use --tensor-model-parallel-size "
                "with chunked prefill (--prefill-chunk) for long needle tests")
        if self.world_size > 1:
            dist.broadcast_object_list([(name, args)], src=0)
        return getattr(self, f"_do_{name}")(*args)

    def serve(self) -> None:
        if self.is_driver:
            return
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            name, args = box[0]
            if name == "stop":
                return
            getattr(self, f"_do_{name}")(*args)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if self.is_driver and self.world_size > 1:
                dist.broadcast_object_list([("stop", ())], src=0)
        finally:
            self.model = None
            self._prefix_cache = _PrefixCache()
            self._stack.close()

    # -- forward passes ---------------------------------------------------------------------
    def _forward(self, ids: list[int], start: int, context: Any = None) -> torch.Tensor:
        """Logits [s, padded vocab] (only the last position with a KV-cache context)."""
        tokens = torch.tensor([ids], dtype=torch.long, device=self.device)
        positions = torch.arange(start, start + len(ids), device=self.device).unsqueeze(0)
        logits = self.model(tokens, positions, None, inference_context=context,
                            runtime_gather_output=True)
        return logits[0].float()

    def _new_state(self, total: int) -> Any:
        from megatron.core.inference.contexts import StaticInferenceContext

        # K/V buffers are allocated per layer on the first forward, for `total` positions
        return StaticInferenceContext(max_batch_size=1, max_sequence_length=total)

    def _capacity(self, state: Any) -> int | None:
        return int(state.max_sequence_length)

    def _rewind(self, state: Any, keep: int) -> None:
        # Attention reads the buffers only up to the offset and the next forward overwrites
        # positions keep.. (rotary: positions from the offset), so moving it back is enough.
        state.reset()
        state.sequence_len_offset = keep

    def _extend(self, state: Any, ids: list[int], start: int) -> torch.Tensor:
        logits = None
        for a, b in self._chunks(len(ids), start):
            logits = self._forward(ids[a:b], a, state)[-1]
            state.increment_sequence_len_offset(b - a)
        return logits

    def _step(self, state: Any, token: int, position: int) -> torch.Tensor:
        logits = self._forward([token], position, state)[-1]
        state.increment_sequence_len_offset(1)
        return logits

    def _last_logits(self, ids: list[int]) -> torch.Tensor:
        return self._forward(ids, 0)[-1]

    def _do_token_losses(self, ids: list[int]) -> np.ndarray:
        from megatron.core import parallel_state, tensor_parallel

        from megatron_longctx.parallel.context_parallel import (
            cp_chunk_ids,
            cp_token_positions,
            split_for_cp,
        )

        n = len(ids) - 1
        pad = (-n) % (2 * self.cp) if self.cp > 1 else 0
        inputs = torch.tensor([ids[:-1] + [0] * pad], dtype=torch.long, device=self.device)
        labels = torch.tensor([ids[1:] + [0] * pad], dtype=torch.long, device=self.device)
        cp_rank = parallel_state.get_context_parallel_rank() if self.cp > 1 else 0
        positions = cp_token_positions(n + pad, self.cp, cp_rank, device=self.device)
        inputs = split_for_cp(inputs, self.cp, cp_rank)
        labels = split_for_cp(labels, self.cp, cp_rank)
        with torch.inference_mode():
            # This TP rank's vocabulary shard [1, s, V/TP]; padded entries masked out.
            logits = self.model(inputs, positions.unsqueeze(0), None,
                                runtime_gather_output=False).float()
            shard = logits.shape[-1]
            first = parallel_state.get_tensor_model_parallel_rank() * shard
            real = self.vocab_size - first
            if real < shard:
                logits[..., max(real, 0):] = float("-inf")
            losses = tensor_parallel.vocab_parallel_cross_entropy(logits, labels)[0]
            if self.cp > 1:
                parts = [torch.empty_like(losses) for _ in range(self.cp)]
                dist.all_gather(parts, losses.contiguous(),
                                group=parallel_state.get_context_parallel_group())
                chunk = (n + pad) // (2 * self.cp)
                full = torch.empty(n + pad, dtype=losses.dtype, device=losses.device)
                for rank, part in enumerate(parts):
                    for slot, c in enumerate(cp_chunk_ids(self.cp, rank)):
                        full[c * chunk:(c + 1) * chunk] = part[slot * chunk:(slot + 1) * chunk]
                losses = full
        return losses[:n].double().cpu().numpy()


def _load_hf_strictly(auto_class: Any, root: Path, load_dtype: Any) -> Any:
    """`from_pretrained` after `convert.hf_checks.check_hf_dir` (architecture, every tensor
    present, expected and of the right shape, files not truncated), and refusing whatever
    transformers still reports as missing or unexpected: it would otherwise fill a missing
    tensor with random weights and evaluate any architecture it knows.

    Raises:
        ConversionError: (a ValueError) one line naming the directory or file and the tensor.
    """
    from megatron_longctx.convert.hf_checks import check_hf_dir, check_loading_info

    check_hf_dir(root)
    model, info = auto_class.from_pretrained(root, dtype=load_dtype, output_loading_info=True)
    check_loading_info(root, info)
    return model


class HFCausalLM(CausalLM):
    """A Hugging Face causal LM directory (one process, one device).

    Loaded strictly (`_load_hf_strictly`): LLaMA-architecture directories whose weight files
    hold exactly the tensors config.json implies; anything else is a one-line error naming the
    directory and tensor, never a partly random model.

    Args:
        path: directory with config.json and weights.
        dtype: auto | fp32 | bf16 | fp16 (auto: fp32 on CPU, config.json's dtype on GPU).
        tokenizer_model: tokenizer directory; default `path` when it holds tokenizer files.
        prefill_chunk: prompt tokens per prefill forward (0 = all at once).
    """

    kind = "hf"

    def __init__(self, path: str | os.PathLike, *, dtype: str = "auto",
                 tokenizer_model: str | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

        if dist.is_initialized() and dist.get_world_size() > 1:
            raise ValueError("a Hugging Face model is evaluated in one process; convert it "
                             "(tools/convert_checkpoint.py hf-to-megatron) for TP/CP")
        root = Path(path)
        has_tokenizer = any((root / name).is_file()
                            for name in ("tokenizer.json", "tokenizer_config.json"))
        super().__init__(tokenizer_model or (str(root) if has_tokenizer else None))
        self.path = str(path)
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda") if cuda else torch.device("cpu")
        # auto: fp32 on CPU, config.json's dtype on GPU
        load_dtype: Any = ("auto" if dtype == "auto" and cuda
                           else torch_dtype(_resolve_dtype(dtype, None)))
        self.model = _load_hf_strictly(AutoModelForCausalLM, root, load_dtype)
        self.model.to(self.device).eval()
        config = self.model.config
        self.vocab_size = int(config.vocab_size)
        self.max_position_embeddings = getattr(config, "max_position_embeddings", None)
        self.prefill_chunk = int(prefill_chunk)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dtype": str(self.model.dtype).replace("torch.", ""),
                "prefill_chunk": self.prefill_chunk}

    def close(self) -> None:
        self.model = None
        self._prefix_cache = _PrefixCache()

    def _tensor(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _dynamic_rotaries(self) -> list[Any]:
        """The model's dynamic-NTK rotary modules: transformers' `dynamic_rope_update` grows
        their `inv_freq` when a forward sees more than `max_seq_len_cached` positions and
        resets it only when a later one is shorter than the original length, so without a
        reset a prompt's answer would depend on the longest prompt before it."""
        return [m for m in self.model.modules()
                if "dynamic" in str(getattr(m, "rope_type", "")) and
                hasattr(m, "original_inv_freq") and hasattr(m, "original_max_seq_len")]

    def _reset_rotary(self) -> None:
        """Every dynamic rotary back to its freshly loaded state (per prompt: a cell's answer
        is the one a newly loaded model gives, whatever the grid order or resume point)."""
        for module in self._dynamic_rotaries():
            module.register_buffer("inv_freq", module.original_inv_freq.clone(),
                                   persistent=False)
            module.max_seq_len_cached = module.original_max_seq_len

    def _new_state(self, total: int) -> Any:
        self._reset_rotary()  # a new prompt
        return {"past": None}  # the model creates its DynamicCache on the first forward

    def _capacity(self, state: Any) -> int | None:
        return None

    def _can_rewind(self, state: Any) -> bool:
        """Full-attention DynamicCache layers only: a sliding-window layer (transformers 5)
        has dropped states past its window, a quantized or linear-attention one cannot be
        cut back exactly. Never with dynamic-NTK RoPE: the cached keys were rotated with the
        frequencies of the previous prompt's length, so each prompt is prefilled anew."""
        from transformers.cache_utils import DynamicCache

        if self._dynamic_rotaries():
            return False
        past = state["past"]
        if past is None:
            return True
        if type(past) is not DynamicCache:
            return False
        layers = getattr(past, "layers", None)
        if layers is None:  # transformers < 4.56: every position of every layer is kept
            return True
        from transformers.cache_utils import DynamicLayer

        return all(type(layer) is DynamicLayer for layer in layers)

    def _rewind(self, state: Any, keep: int) -> None:
        past = state["past"]
        if past is None:
            return
        if keep == 0:
            state["past"] = None
            return
        drop = int(past.get_seq_length()) - keep
        if drop > 0:  # a negative count removes tokens in transformers 4.x and 5.x alike
            past.crop(-drop)

    def _extend(self, state: Any, ids: list[int], start: int) -> torch.Tensor:
        out = None
        for a, b in self._chunks(len(ids), start):
            out = self.model(input_ids=self._tensor(ids[a:b]), past_key_values=state["past"],
                             use_cache=True, logits_to_keep=1)
            state["past"] = out.past_key_values
        return out.logits[0, -1].float()

    def _step(self, state: Any, token: int, position: int) -> torch.Tensor:
        out = self.model(input_ids=self._tensor([token]), past_key_values=state["past"],
                         use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1].float()

    def _last_logits(self, ids: list[int]) -> torch.Tensor:
        self._reset_rotary()  # a full recompute is a new prompt
        out = self.model(input_ids=self._tensor(ids), use_cache=False, logits_to_keep=1)
        return out.logits[0, -1].float()

    def _do_token_losses(self, ids: list[int]) -> np.ndarray:
        """Last hidden states once, then the output layer and the loss in chunks of positions
        (full-vocabulary fp32 logits of a 128K sequence would be 16 GB for LLaMA-2). Assumes
        a LLaMA-style head: logits = lm_head(final hidden state), no extra scaling."""
        import torch.nn.functional as F

        self._reset_rotary()
        base = getattr(self.model, self.model.base_model_prefix)
        head = self.model.get_output_embeddings()
        labels = torch.tensor(ids[1:], dtype=torch.long, device=self.device)
        out = []
        with torch.inference_mode():
            hidden = base(input_ids=self._tensor(ids[:-1]), use_cache=False).last_hidden_state[0]
            for a in range(0, hidden.shape[0], _HF_LOSS_CHUNK):
                logits = head(hidden[a:a + _HF_LOSS_CHUNK]).float()[:, : self.vocab_size]
                out.append(F.cross_entropy(logits, labels[a:a + _HF_LOSS_CHUNK],
                                           reduction="none"))
        return torch.cat(out).double().cpu().numpy()


def load_causal_lm(path: str | os.PathLike, *, tensor_model_parallel_size: int = 1,
                   context_parallel_size: int = 1, dtype: str = "auto",
                   tokenizer_model: str | None = None,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> CausalLM:
    """Open `path` as the right backend: a checkpoint of ours or an HF model directory.

    Collective for our checkpoints (call on every rank). HF directories need TP = CP = 1.

    Raises:
        FileNotFoundError: neither a checkpoint of ours nor a directory with config.json.
        ValueError: bad parallel sizes for the backend or the world size.
    """
    if is_longctx_checkpoint(path):
        return MegatronCausalLM(path, tensor_model_parallel_size=tensor_model_parallel_size,
                                context_parallel_size=context_parallel_size, dtype=dtype,
                                tokenizer_model=tokenizer_model, prefill_chunk=prefill_chunk)
    if (Path(path) / "config.json").is_file():
        if tensor_model_parallel_size != 1 or context_parallel_size != 1:
            raise ValueError(
                f"{path} is a Hugging Face directory, evaluated in one process: "
                "--tensor-model-parallel-size/--context-parallel-size need a checkpoint of ours "
                "(tools/convert_checkpoint.py hf-to-megatron)")
        return HFCausalLM(path, dtype=dtype, tokenizer_model=tokenizer_model,
                          prefill_chunk=prefill_chunk)
    raise FileNotFoundError(f"--model {path}: neither a megatron-longctx checkpoint "
                            "(longctx_meta.json / latest_checkpointed_iteration.txt) nor a "
                            "Hugging Face directory (config.json)")


# --------------------------------------------------------------------------------------------
# CLI helpers shared by tools/eval_needle.py and tools/eval_ppl.py
# --------------------------------------------------------------------------------------------
def add_model_arguments(parser: Any, *, tokenizer: bool = True) -> None:
    """--model, --tokenizer-model, --tensor-model-parallel-size, --context-parallel-size,
    --dtype, --prefill-chunk."""
    group = parser.add_argument_group("model")
    group.add_argument("--model", required=True,
                       help="checkpoint of ours (root or iter_ directory) or a Hugging Face "
                       "model directory; told apart automatically")
    if tokenizer:
        group.add_argument("--tokenizer-model", default=None,
                           help="tokenizer directory when the model has none (default: the "
                           "checkpoint's recorded tokenizer / the HF directory)")
    group.add_argument("--tensor-model-parallel-size", type=int, default=1,
                       help="TP ranks (ours only); world size must be TP x CP")
    group.add_argument("--context-parallel-size", type=int, default=1,
                       help="CP ranks (ours only; loss evaluation, not generation)")
    group.add_argument("--dtype", default="auto", choices=["auto", *PARAMS_DTYPES],
                       help="auto: fp32 on CPU, the saved dtype on GPU")
    group.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK,
                       help=f"prompt tokens per prefill forward (default "
                       f"{DEFAULT_PREFILL_CHUNK}; 0 = whole prompt at once)")
    group.add_argument("--num-threads", type=int, default=None,
                       help="torch CPU threads per process (default: torch's); 1 is fastest "
                       "for tiny models on a busy machine (docs/evaluation.md)")


def model_from_args(args: Any) -> CausalLM:
    """`load_causal_lm` from the flags of `add_model_arguments`."""
    if args.prefill_chunk < 0:
        raise ValueError(f"--prefill-chunk must be >= 0, got {args.prefill_chunk}")
    if args.num_threads is not None:
        if args.num_threads < 1:
            raise ValueError(f"--num-threads must be >= 1, got {args.num_threads}")
        torch.set_num_threads(args.num_threads)
    return load_causal_lm(args.model,
                          tensor_model_parallel_size=args.tensor_model_parallel_size,
                          context_parallel_size=args.context_parallel_size, dtype=args.dtype,
                          tokenizer_model=getattr(args, "tokenizer_model", None),
                          prefill_chunk=args.prefill_chunk)


def comma_ints(text: str, flag: str) -> list[int]:
    """`--lengths 4096,8192` -> [4096, 8192]; ValueError naming `flag` otherwise."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated integers, got {text!r}") from None


def run_with_model(args: Any, make_settings: Any, job: Any) -> Any:
    """The generation tools' main: settings from the flags (`make_settings(args)`, validated
    before any model is loaded), the model from `add_model_arguments`' flags, the settings'
    `training_length` defaulted to the model's, then `job(model, settings)` through `drive`.

    Raises:
        ValueError, FileNotFoundError, NotImplementedError: for the tool to print as one line.
    """
    settings = make_settings(args)
    model = model_from_args(args)
    if settings.training_length is None:
        settings.training_length = model.training_length
    return drive(model, lambda m: job(m, settings))


def drive(model: CausalLM, job: Any) -> Any:
    """Run `job(model)` on the driver rank while the other ranks serve its model calls; close
    the model on every rank afterwards (also when the job raises). Returns the job's result on
    the driver, None elsewhere."""
    try:
        if model.is_driver:
            return job(model)
        model.serve()
        return None
    finally:
        model.close()
