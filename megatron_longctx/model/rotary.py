"""Our rotary embedding: every RoPE scheme long-context users extend with, one module.

`inverse_frequencies(spec, dim, seq_len)` computes the per-pair angular frequencies of a
`RopeSpec` (config/model.py) for `default`, `linear`, `dynamic` (NTK), `yarn`, `llama3` and
`longrope`, each written from its definition (HF transformers' `modeling_rope_utils` is the
test oracle, in fp32 with the same operation order so the tables agree to ~1 ulp):

* default: theta^(-2i/d).
* linear: default / factor (= positions / factor).
* dynamic: default with theta' = theta * (factor * L / L0 - (factor - 1))^(d / (d - 2)) for
  the current length L = max(L0, max position + 1), L0 the original length. At L = L0 it is
  the default; LLaMA-2 (theta 1e4, d 128) with factor 10 at 80K gives theta' ~ 2.1M.
* yarn: pairs completing more than beta_fast rotations over L0 keep theta^(-2i/d), pairs
  below beta_slow are divided by factor, a linear ramp in between; attention scaled by
  0.1 ln(factor) + 1 (or the mscale ratio / explicit attention factor).
* llama3: wavelengths under L0 / high_freq_factor kept, over L0 / low_freq_factor divided by
  factor, a smooth blend in between (any factor / low / high / L0, not only LLaMA-3.1's).
* longrope: theta^(-2i/d) / short_factor[i] up to L0, / long_factor[i] beyond; attention
  scaled by sqrt(1 + ln(factor) / ln(L0)).

`LongContextRotaryEmbedding` replaces megatron-core's `RotaryEmbedding` inside `GPTModel`
(model/build.py), with the same interface: `get_rotary_seq_len(...)` then `forward(seq_len)`
returning angles [s, 1, 1, d] (rotate-half layout), sliced for this rank's CP chunks. Both
layer specs consume those angles (megatron's unfused `apply_rotary_pos_emb` on the local
spec, TE's fused RoPE kernel on the TE spec), so the GPU path gets the same frequencies.

Attention scaling (yarn, longrope): HF multiplies cos and sin by m, i.e. q.k by m^2. We fold
m^2 into the softmax scale instead (`softmax_scale_for`: m^2 / sqrt(head_dim), passed as
TransformerConfig.softmax_scale), because megatron's `mscale` argument is only wired to its
MLA YaRN config and TE's fused RoPE refuses it (megatron then warns and falls back to the
unfused kernel). Folding costs nothing, works with fused RoPE, SDPA, TE, FP8 attention and
the KV cache (keys stay unscaled), and differs from HF by rounding only (~1e-7 relative).

Length-dependent schemes (dynamic, longrope) follow HF's semantics: the frequencies are those
of the sequence being run, L = its last position + 1 (CP: the global length). In KV-cache
decoding HF rotates each key once, with the frequencies of the length seen when it was fed;
megatron's static cache keeps keys unrotated and re-rotates all of them every step from our
table, so the module keeps a per-position history (rows of earlier chunks keep the
frequencies they were fed with) and the cached decode equals HF's cached decode. HF also keeps
the largest length seen across calls until a sequence shorter than L0 resets it; we use the
current sequence only (stateless between sequences), which agrees with every fresh call.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from megatron.core.models.common.embeddings.rope_utils import get_pos_emb_on_this_cp_rank
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from torch import Tensor

from megatron_longctx.config.model import ModelConfig, RopeSpec

#: Tables kept per module for schemes that do not depend on the length (keyed by length,
#: offset, packing, CP group): 128K x 128 fp32 angles are 64 MB, so a handful at most.
_TABLE_CACHE = 4


def _default(theta: float, dim: int, device: Any = None) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (theta ** exponents)


def _yarn(spec: RopeSpec, dim: int) -> Tensor:
    factor = spec.effective_factor()
    original = float(spec.original_max_position_embeddings or 1)

    def pair_index(rotations: float) -> float:
        # Pair i completes original * theta^(-2i/d) / (2 pi) rotations over the original
        # length; solve for i.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = pair_index(spec.beta_fast), pair_index(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: the pair extrapolates (keeps its frequency), 0: interpolated
    wavelength_scale = spec.theta ** (torch.arange(0, dim, 2).float() / dim)
    return (1.0 / (factor * wavelength_scale)) * (1 - keep) + (1.0 / wavelength_scale) * keep


def _llama3(spec: RopeSpec, dim: int) -> Tensor:
    inv = _default(spec.theta, dim)
    factor = float(spec.factor or 1.0)
    original = float(spec.original_max_position_embeddings or 1)
    low, high = spec.low_freq_factor, spec.high_freq_factor
    wavelength = 2 * math.pi / inv
    scaled = torch.where(wavelength > original / low, inv / factor, inv)
    blend = (original / wavelength - low) / (high - low)
    smooth = (1 - blend) * scaled / factor + blend * scaled
    middle = ~(wavelength < original / high) * ~(wavelength > original / low)
    return torch.where(middle, smooth, scaled)


def inverse_frequencies(spec: RopeSpec, dim: int, seq_len: int | None = None) -> Tensor:
    """fp32 [dim / 2] angular frequency of each rotary pair (CPU).

    Args:
        spec: the scheme.
        dim: rotated channels per head.
        seq_len: length of the sequence being run (dynamic, longrope); None = the original
            length (what HF computes at construction).
    """
    kind = spec.rope_type
    if kind == "default":
        return _default(spec.theta, dim)
    if kind == "linear":
        return _default(spec.theta, dim) / float(spec.factor or 1.0)
    if kind == "dynamic":
        original = int(spec.original_max_position_embeddings or 1)
        length = max(seq_len or original, original)
        factor = float(spec.factor or 1.0)
        theta = spec.theta * ((factor * length / original) - (factor - 1)) ** (dim / (dim - 2))
        return _default(theta, dim)
    if kind == "yarn":
        return _yarn(spec, dim)
    if kind == "llama3":
        return _llama3(spec, dim)
    if kind == "longrope":
        original = int(spec.original_max_position_embeddings or 0)
        long = seq_len is not None and seq_len > original
        divisors = torch.tensor(spec.long_factor if long else spec.short_factor,
                                dtype=torch.float32)
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (divisors * spec.theta ** exponents)
    raise ValueError(f"--rope-type {kind!r} unknown")


def softmax_scale_for(cfg: ModelConfig) -> float | None:
    """TransformerConfig.softmax_scale carrying the scheme's attention scaling m (m^2 /
    sqrt(head_dim)), or None (megatron's default 1 / sqrt(head_dim)) when m is 1."""
    scale = cfg.rope_spec().attention_scaling()
    if scale == 1.0:
        return None
    return scale * scale / math.sqrt(cfg.head_dim)


def count_periods(spec: RopeSpec, dim: int, length: int) -> tuple[int, Tensor]:
    """(pairs whose wavelength 2 pi / freq fits in `length` positions, all wavelengths).

    A pair that completes a full period within the context has seen every angle in training;
    the others are "extrapolating" when the context grows (Fu et al.'s and YaRN's reading).
    """
    wavelengths = 2 * math.pi / inverse_frequencies(spec, dim, seq_len=length).double()
    return int((wavelengths <= length).sum()), wavelengths


class LongContextRotaryEmbedding(RotaryEmbedding):
    """megatron's RotaryEmbedding interface with our schemes (see the module docstring).

    Subclassing keeps `get_rotary_seq_len` and any isinstance check; `__init__` does not call
    megatron's (which only knows theta / linear / fixed llama3), `forward` is ours.

    Args:
        spec: the resolved scheme (`ModelConfig.rope_spec()`).
        dim: rotated channels per head.
        rotary_interleaved: megatron's interleaved layout (LLaMA: False, rotate-half).
        cp_group: context-parallel group (default: megatron's, when initialised).
    """

    def __init__(self, spec: RopeSpec, dim: int, rotary_interleaved: bool = False,
                 cp_group: Any = None) -> None:
        torch.nn.Module.__init__(self)
        from megatron.core import parallel_state

        self.spec = spec
        self.dim = dim
        self.rotary_interleaved = rotary_interleaved
        self.seq_len_interpolation_factor = None  # folded into inv_freq (megatron attribute)
        self.inv_freq = inverse_frequencies(spec, dim)  # at the original length
        self.cp_group = (cp_group if cp_group is not None else
                         parallel_state.get_context_parallel_group(check_initialized=False))
        self._tables: dict[tuple, Tensor] = {}
        self._pending: tuple[int, int] | None = None  # KV-cache chunk [start, end)
        self._history: Tensor | None = None  # angles fed so far in the current cache
        self._row_length: int | None = None  # THD micro-batch: --seq-length for the table

    # -- megatron's interface ------------------------------------------------------------
    def get_rotary_seq_len(self, inference_context: Any, transformer: Any,
                           transformer_input: Tensor, transformer_config: Any,
                           packed_seq_params: Any = None, **kwargs: Any) -> int:
        """megatron's length (static KV cache: the cache size); also records the chunk a
        length-dependent scheme is being fed in KV-cache decoding."""
        from megatron_longctx.parallel.thd import ThdSeqParams

        length = super().get_rotary_seq_len(inference_context, transformer, transformer_input,
                                            transformer_config, packed_seq_params, **kwargs)
        self._pending = None
        self._row_length = None
        if isinstance(packed_seq_params, ThdSeqParams):
            # Frequencies of length-dependent schemes come from the row (--seq-length), not
            # from the longest document. Global positions: a table over the whole packed row,
            # which megatron's THD RoPE reads at each document's offset (its "exact mapping"
            # when the table covers cu_seqlens[-1]); reset positions: megatron's default, a
            # table of the longest document read from 0 in each.
            self._row_length = packed_seq_params.row_length or None
            if not packed_seq_params.reset_position_ids:
                return packed_seq_params.total_tokens
        if (inference_context is not None and self.spec.length_dependent
                and inference_context.is_static_batching()):
            fed = (transformer.input_tensor if transformer is not None
                   and transformer.input_tensor is not None else transformer_input)
            start = int(inference_context.sequence_len_offset)
            self._pending = (start, start + int(fed.size(0)))
        return length

    def get_freqs_non_repeated(self, max_seq_len: int, offset: int = 0) -> Tensor:
        """Angles [max_seq_len, dim / 2] for positions offset.. (the sequence's own length)."""
        return self._angles(max_seq_len, offset, None)

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group: Any = None) -> Tensor:
        """Angles [s, 1, 1, dim] for positions offset..offset+s, this CP rank's chunks."""
        pending, self._pending = self._pending, None
        group = cp_group if cp_group is not None else self.cp_group
        row_length, self._row_length = self._row_length, None
        key = (max_seq_len, offset, packed_seq, id(group), row_length)
        if pending is None and key in self._tables:
            return self._tables[key]
        angles = self._angles(max_seq_len, offset, pending, row_length)
        if self.rotary_interleaved:
            emb = torch.stack((angles, angles), dim=-1).view(angles.shape[0], -1)
        else:
            emb = torch.cat((angles, angles), dim=-1)
        emb = emb[:, None, None, :]
        if group is not None and group.size() > 1 and not packed_seq:
            emb = get_pos_emb_on_this_cp_rank(emb, 0, group)
        if pending is None and (row_length is not None or not self.spec.length_dependent):
            if len(self._tables) >= _TABLE_CACHE:
                self._tables.clear()
            self._tables[key] = emb
        return emb

    # -- ours ------------------------------------------------------------------------------
    def _device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def _angles(self, length: int, offset: int, pending: tuple[int, int] | None,
                row_length: int | None = None) -> Tensor:
        device = self._device()
        positions = torch.arange(length, dtype=torch.float32, device=device) + offset
        if pending is None:
            seq_len = None
            if self.spec.length_dependent:
                seq_len = row_length if row_length is not None else length + offset
            inv = inverse_frequencies(self.spec, self.dim, seq_len).to(device)
            return torch.outer(positions, inv)
        # KV-cache chunk [start, end): rows before it keep the frequencies they were fed with.
        start, end = pending
        inv = inverse_frequencies(self.spec, self.dim, end).to(device)
        table = torch.outer(positions, inv)
        history = self._history
        if start > 0 and history is not None and history.shape[0] >= start:
            table[:start] = history[:start].to(device)
        self._history = table[:end].clone()
        return table
