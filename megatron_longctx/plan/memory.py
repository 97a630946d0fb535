"""Per-GPU memory of one training layout: model state exactly, the step's working set by term.

Model state follows megatron-core 0.16.1's data structures, so it is exact (checked to the byte
against `torch.distributed._tools.mem_tracker.MemTracker` on the real trainer,
benchmarks/bench_plan_memory.py):

* weights: this rank's parameter tensors (vocabulary padded, TP-split linears, replicated
  norms) in the params dtype; with the distributed optimizer megatron's DDP moves them into one
  contiguous buffer padded like the gradient buffer.
* gradients: the DDP buffer of fp32 `main_grad`s (the trainer reduces gradients in fp32). With
  the distributed optimizer every parameter starts at a multiple of 64 elements and every bucket
  ends at a multiple of lcm(DP x CP, 128) (megatron's `_ParamAndGradBuffer`).
* optimizer: Adam's two fp32 moments (8 B per element) plus, with bf16/fp16 parameters, the
  fp32 main copy (4 B), plus torch Adam's 4-byte `step` per parameter tensor. The distributed
  optimizer shards every bucket evenly over DP x CP ranks (megatron's data-parallel group
  includes CP); a rank holds the elements of the parameters that fall in its shard, and the
  reported figure is the most loaded rank's.

The working set is modelled term by term, per token held by this rank (s / CP tokens, x
micro-batch):

* activations per layer: the tensors autograd keeps for backward, listed per layer spec
  (`layer_activation_terms`): the local spec (our RMSNorm, megatron's local linears, SDPA
  attention with GQA's K/V expanded to all heads and, under CP, all-gathered K/V pieces) and
  Transformer Engine's (fused norm + linear, flash attention keeping Q/K/V un-expanded,
  fused SwiGLU). Measured for the local spec on CPU to within a few percent
  (docs/slurm.md); the TE list follows TE's saved tensors and waits for a GPU check
  (benchmarks/gpu_check_parts.py `plan_memory`).
* recompute: selective (megatron's `core_attn`) drops core attention's saved tensors; full
  keeps each recompute unit's input (uniform: one input per N layers, then N layers rebuilt at a
  time; block: the first N layers of each stage keep inputs only).
* pipeline: 1F1B keeps min(PP - stage, micro-batches) micro-batches in flight on a stage
  (stage 0: PP); interleaving multiplies by 1 + (PP - 1) / (PP x VPP) (Megatron's factor).
* the loss (last stage): megatron's stock path holds [tokens, V/TP] logits (fp32: 4 B, bf16:
  6 B per element: the bf16 logits with their fp32 softmax, then the fp32 gradient with its
  bf16 cast); the chunked loss (model/loss.py) holds one chunk (4 or 6 B x chunk x V/TP), the
  fp32 output-weight gradient and grad_hidden [tokens, h].
* the backward's transient of one layer (its gradient tensors while the next layer's
  activations are still alive), CP communication buffers (TE p2p: two K/V receive buffers),
  FP8 weight copies (TE keeps an FP8 copy and its transpose: 2 B per linear weight element)
  and, on GPUs, a stated allocator margin (caching-allocator fragmentation plus CUDA context,
  NCCL and cuBLAS workspaces).

Trade-off: a term-by-term model is exact where the data structure is known and within ~10%
where autograd's saved tensors are (the measured table in docs/slurm.md); it does not model
allocator fragmentation, which the margin covers (default 8% + 2.5 GiB on GPUs, the range
Megatron-LM users report between `max_memory_allocated` and `nvidia-smi`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from megatron_longctx.config.model import ModelConfig

#: Bytes per element of each params dtype.
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GIB = float(1 << 30)
#: Default allocator margin on GPUs: fraction of the estimate plus a fixed reserve (bytes).
DEFAULT_MARGIN_FRACTION = 0.08
DEFAULT_MARGIN_FIXED = int(2.5 * (1 << 30))


@dataclass(frozen=True)
class Layout:
    """One training layout: parallel sizes, batching, recompute, precision and kernels.

    Attributes:
        tp / pp / vpp / cp / dp: tensor, pipeline, virtual pipeline (model chunks per PP rank),
            context and data parallel sizes.
        micro_batch_size: sequences per micro-batch.
        num_microbatches: micro-batches per step per DP rank (gradient accumulation).
        sequence_parallel: `--sequence-parallel`.
        recompute_granularity: None | selective | full.
        recompute_method / recompute_num_layers: with full: uniform | block and N.
        distributed_optimizer: `--use-distributed-optimizer`.
        dtype: params dtype fp32 | bf16 | fp16.
        impl: local | transformer_engine.
        fp8: FP8 GEMMs (Transformer Engine).
        cross_entropy_impl / cross_entropy_chunk_size: the loss (model/loss.py).
        cp_comm_type: TE's CP communication (the local spec always all-gathers K/V).
        fused_kernels: CUDA fusions (SwiGLU) on, as the trainer builds them with CUDA; False
            for CPU runs (the measured tables).
        overlap_grad_reduce: DDP buckets of 40M elements (megatron's default with overlap); off
            = one bucket per buffer.
        offload_modules: megatron's fine-grained activation offloading: the modules whose
            inputs go to host memory during forward (empty = off).
    """

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    cp: int = 1
    dp: int = 1
    micro_batch_size: int = 1
    num_microbatches: int = 1
    sequence_parallel: bool = False
    recompute_granularity: str | None = None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    distributed_optimizer: bool = False
    dtype: str = "bf16"
    impl: str = "transformer_engine"
    fp8: bool = False
    cross_entropy_impl: str = "chunked"
    cross_entropy_chunk_size: int = 1024
    cp_comm_type: str = "p2p"
    fused_kernels: bool = True
    overlap_grad_reduce: bool = True
    offload_modules: tuple[str, ...] = ()

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def flags(self) -> list[str]:
        """The pretrain_longctx.py flags of this layout (Megatron-LM names)."""
        out = ["--tensor-model-parallel-size", str(self.tp),
               "--pipeline-model-parallel-size", str(self.pp),
               "--context-parallel-size", str(self.cp),
               "--micro-batch-size", str(self.micro_batch_size)]
        if self.sequence_parallel:
            out.append("--sequence-parallel")
        if self.distributed_optimizer:
            out.append("--use-distributed-optimizer")
        if self.recompute_granularity:
            out += ["--recompute-granularity", self.recompute_granularity]
        if self.recompute_granularity == "full":
            out += ["--recompute-method", self.recompute_method or "uniform",
                    "--recompute-num-layers", str(self.recompute_num_layers or 1)]
        if self.cp > 1 and self.impl == "transformer_engine":
            out += ["--cp-comm-type", self.cp_comm_type]
        if self.dtype != "fp32":
            out.append(f"--{self.dtype}")
        if self.fp8:
            out += ["--fp8-format", "hybrid"]
        out += ["--cross-entropy-impl", self.cross_entropy_impl]
        return out

    def describe(self) -> str:
        """Short text: TP2 CP4 PP1 DP1 mbs1 recompute full/uniform/1."""
        parts = [f"TP{self.tp}", f"CP{self.cp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        parts += [f"DP{self.dp}", f"mbs{self.micro_batch_size}"]
        if self.sequence_parallel:
            parts.append("SP")
        rec = self.recompute_granularity or "none"
        if rec == "full":
            rec += f"/{self.recompute_method or 'uniform'}/{self.recompute_num_layers or 1}"
        parts.append(f"recompute {rec}")
        return " ".join(parts)


# --------------------------------------------------------------------------------------------
# model state
# --------------------------------------------------------------------------------------------
def _stage_chunks(model: ModelConfig, layout: Layout, stage: int) -> list[list[tuple[str, int]]]:
    """Parameter tensors (name, elements) of each model chunk of a PP stage, in megatron's
    registration order (the order DDP lays them out, reversed, in its buffer)."""
    h, t = model.hidden_size, layout.tp
    a = model.num_attention_heads * model.head_dim
    kv = model.query_groups * model.head_dim
    f = model.ffn_hidden_size
    vocab = model.padded_vocab(t)
    chunks = layout.pp * layout.vpp
    per_chunk = model.num_layers // chunks
    out = []
    for v in range(layout.vpp):
        index = v * layout.pp + stage  # the model chunk this (stage, virtual stage) holds
        tensors: list[tuple[str, int]] = []
        first, last = index == 0, index == chunks - 1
        if first:
            tensors.append(("embedding", vocab * h // t))
        for _ in range(per_chunk):
            tensors.append(("input_layernorm", h))
            tensors.append(("linear_proj", h * a // t))
            tensors.append(("linear_qkv", (a + 2 * kv) * h // t))
            if model.add_qkv_bias:
                tensors.append(("linear_qkv.bias", (a + 2 * kv) // t))
            tensors.append(("pre_mlp_layernorm", h))
            tensors.append(("linear_fc1", 2 * f * h // t))
            tensors.append(("linear_fc2", h * f // t))
        if last:
            tensors.append(("final_layernorm", h))
            if model.untie_embeddings_and_output_weights or chunks > 1:
                tensors.append(("output_layer", vocab * h // t))
        out.append(tensors)
    return out


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


def _buffer_layout(numels: list[int], *, distributed: bool, shards: int,
                   bucket_size: int | None) -> tuple[int, list[tuple[int, int]],
                                                     list[tuple[int, int]]]:
    """megatron's `_ParamAndGradBuffer` layout: (total elements, [(start, end)] per parameter,
    [(start, end)] per bucket). Parameters are laid out in reverse registration order."""
    start, bucket_start, ranges, buckets = 0, 0, [], []
    end = 0
    for n in reversed(numels):
        if distributed:
            start = _pad(start, 64)
        end = start + n
        ranges.append((start, end))
        if bucket_size is not None and end - bucket_start >= bucket_size:
            bucket_end = _pad(end, math.lcm(shards, 128)) if distributed else end
            buckets.append((bucket_start, bucket_end))
            bucket_start = start = bucket_end
        else:
            start = end
    if bucket_start < end or not buckets:
        bucket_end = _pad(end, math.lcm(shards, 128)) if distributed else end
        buckets.append((bucket_start, bucket_end))
        end = bucket_end
    total = buckets[-1][1]
    return total, ranges, buckets


@dataclass
class ModelState:
    """Bytes of this rank's model state and how they were counted."""

    weights: int
    gradients: int
    optimizer: int
    parameters: int  # elements of this rank's parameters (unpadded)
    buffer_elements: int  # elements of the gradient buffer (padded)
    fp8_weight_copies: int = 0


def model_state(model: ModelConfig, layout: Layout, stage: int = 0) -> ModelState:
    """Weights, fp32 gradient buffer and optimizer state of one rank of PP stage `stage`."""
    e = DTYPE_BYTES[layout.dtype]
    shards = layout.dp * layout.cp
    bucket_size = max(40_000_000, 1_000_000 * shards) if layout.overlap_grad_reduce else None
    weights = grads = opt = params = buffer = linear = 0
    for index, tensors in enumerate(_stage_chunks(model, layout, stage)):
        numels = [n for _, n in tensors]
        linear += sum(n for name, n in tensors if name.startswith("linear_") and
                      not name.endswith("bias"))
        params += sum(numels)
        # Megatron-LM buckets only the first model chunk's buffer (disable_bucketing).
        total, ranges, buckets = _buffer_layout(
            numels, distributed=layout.distributed_optimizer, shards=shards,
            bucket_size=bucket_size if index == 0 else None)
        buffer += total
        grads += 4 * total
        weights += (e * total) if layout.distributed_optimizer else e * sum(numels)
        per_element = 8 + (4 if layout.dtype != "fp32" else 0)
        if not layout.distributed_optimizer:
            opt += per_element * sum(numels) + 4 * len(numels)
            continue
        worst = 0
        for rank in range(shards):
            owned = pieces = 0
            for b0, b1 in buckets:
                size = (b1 - b0) // shards
                lo, hi = b0 + rank * size, b0 + (rank + 1) * size
                for p0, p1 in ranges:
                    overlap = min(p1, hi) - max(p0, lo)
                    if overlap > 0:
                        owned += overlap
                        pieces += 1
            worst = max(worst, per_element * owned + 4 * pieces)
        opt += worst
    fp8 = 2 * linear if layout.fp8 else 0
    return ModelState(weights=weights, gradients=grads, optimizer=opt, parameters=params,
                      buffer_elements=buffer, fp8_weight_copies=fp8)


# --------------------------------------------------------------------------------------------
# activations
# --------------------------------------------------------------------------------------------
def layer_activation_terms(model: ModelConfig, layout: Layout) -> dict[str, float]:
    """Bytes kept for backward per token per layer, by what keeps them (no recompute).

    Local spec (each entry is what autograd saves; counted by `saved_tensors_hooks` on the
    trainer): per RMSNorm its fp32 input, fp32 output and the output cast to the params dtype
    (8h + e*h; in fp32 runs the input is the layer input itself) plus the fp32 rstd; RoPE's cos
    and sin for Q and K (4 head_dim); SDPA keeps Q, K and V expanded to all query heads, its
    output (the projection's input) and the fp32 log-sum-exp; under CP the all-gathered K/V are
    cut into pieces, each expanded (2 CP + 1 head-sized pieces per local token); SwiGLU keeps
    fc1's output (2f) and, unfused (CPU), the SiLU and product outputs plus one more f-sized
    copy (5f in all; 3f fused on CUDA).

    Transformer Engine: each fused norm + linear keeps its input and normalised output in the
    params dtype plus rstd; flash attention keeps Q, K, V (K/V not expanded for GQA), the
    output and the fp32 log-sum-exp; fused SwiGLU keeps fc1's output, fc2 its input; RoPE is
    fused (nothing kept). With FP8, the GEMM inputs are kept as FP8 casts (1 B).

    Sequence parallelism divides the norm terms (the parts outside the TP region) by TP.
    """
    h, t, e = model.hidden_size, layout.tp, DTYPE_BYTES[layout.dtype]
    a = model.num_attention_heads * model.head_dim
    kv = model.query_groups * model.head_dim
    heads = model.num_attention_heads
    f = model.ffn_hidden_size
    d = model.head_dim
    sp = t if layout.sequence_parallel else 1
    terms: dict[str, float] = {}
    if layout.impl == "local":
        terms["norms"] = 2 * (8 * h + e * h + 4) / sp
        terms["rope"] = 4 * d * e
        kv_pieces = 2 if layout.cp == 1 else 2 * layout.cp + 1
        terms["attention"] = (2 + kv_pieces) * a / t * e + 4 * heads / t
        if layout.recompute_granularity == "selective":
            # core attention rebuilt: only its inputs stay (Q, K, V before the GQA expansion)
            terms["attention"] = (2 * a + 2 * kv) / t * e
        terms["mlp"] = (3 if layout.fused_kernels else 5) * f / t * e
    else:
        g = 1 if layout.fp8 else e  # GEMM inputs kept as FP8 casts under FP8
        terms["norms"] = 2 * (e * h + g * h + 4) / sp
        terms["rope"] = 0.0
        terms["attention"] = (a + 2 * kv) / t * e + a / t * e + 4 * heads / t
        if layout.recompute_granularity == "selective":
            terms["attention"] = (a + 2 * kv) / t * e + a / t * g
        terms["mlp"] = 2 * f / t * e + f / t * g
    offloaded = set(layout.offload_modules)
    if offloaded:
        # Fine-grained offloading moves the listed modules' inputs to host memory.
        if "attn_norm" in offloaded:
            terms["norms"] -= (4 * h if layout.impl == "local" else e * h) / sp
        if "mlp_norm" in offloaded:
            terms["norms"] -= (4 * h if layout.impl == "local" else e * h) / sp
        if "qkv_linear" in offloaded:
            terms["norms"] -= (e * h if layout.impl == "local" else 0) / sp
        if "core_attn" in offloaded:
            terms["attention"] -= (a + 2 * kv) / t * e
        if "attn_proj" in offloaded:
            terms["attention"] -= a / t * e
    return terms


def layer_input_bytes(model: ModelConfig, layout: Layout) -> float:
    """Bytes per token of one layer's input (what full recompute keeps per unit)."""
    sp = layout.tp if layout.sequence_parallel else 1
    return model.hidden_size * DTYPE_BYTES[layout.dtype] / sp


def backward_transient_bytes(model: ModelConfig, layout: Layout) -> float:
    """Bytes per token alive at the peak of the first layer backward beside the kept
    activations: fc1's output gradient (2f), the gradient of the layer output (h), the norms'
    rstd, and in bf16/fp16 runs of the local spec three fp32 h-sized temporaries of our RMSNorm's
    fp32 backward (TE's norm backward is fused)."""
    e = DTYPE_BYTES[layout.dtype]
    h = model.hidden_size
    fp32_norm = 12 * h if e < 4 and layout.impl == "local" else 0
    return (2 * model.ffn_hidden_size / layout.tp + h) * e + 8 + fp32_norm


def loss_bytes(model: ModelConfig, layout: Layout, tokens: int) -> dict[str, float]:
    """Working set of the output layer and the loss on the last stage (bytes)."""
    e = DTYPE_BYTES[layout.dtype]
    h = model.hidden_size
    rows = model.padded_vocab(layout.tp) // layout.tp
    sp = layout.tp if layout.sequence_parallel else 1  # the final norm runs on s / TP tokens
    out: dict[str, float] = {"final norm": tokens * (8 * h + e * h + 4) / sp}
    if layout.cross_entropy_impl == "megatron":
        per = 4 if layout.dtype == "fp32" else 6
        out["logits (stock loss)"] = per * tokens * rows + 2 * e * tokens * h
    else:
        per = 4 if layout.dtype == "fp32" else 6
        out["loss chunk"] = per * min(tokens, layout.cross_entropy_chunk_size) * rows
        out["output-weight grad (fp32)"] = 4 * rows * h
        out["grad_hidden"] = e * tokens * h
    return out


@dataclass
class MemoryEstimate:
    """One rank's estimated peak, by term (bytes), and the notes explaining each term."""

    layout: Layout
    stage: int
    state: ModelState
    activations: dict[str, float]
    margin: float
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def model_state_bytes(self) -> float:
        s = self.state
        return s.weights + s.gradients + s.optimizer + s.fp8_weight_copies

    @property
    def activation_bytes(self) -> float:
        return sum(self.activations.values())

    @property
    def raw_bytes(self) -> float:
        """Model state + working set, without the allocator margin."""
        return self.model_state_bytes + self.activation_bytes

    @property
    def total_bytes(self) -> float:
        return self.raw_bytes + self.margin

    def table(self) -> list[tuple[str, float, str]]:
        """(term, GiB, explanation) rows, model state first."""
        s = self.state
        rows = [("weights", s.weights / GIB, self.notes.get("weights", "")),
                ("gradients (fp32 main_grad)", s.gradients / GIB, self.notes.get("grads", "")),
                ("optimizer state", s.optimizer / GIB, self.notes.get("optimizer", ""))]
        if s.fp8_weight_copies:
            rows.append(("FP8 weight copies", s.fp8_weight_copies / GIB,
                         "TE's FP8 weight and its transpose, 2 B per linear weight element"))
        for name, value in self.activations.items():
            rows.append((name, value / GIB, self.notes.get(name, "")))
        if self.margin:
            rows.append(("allocator margin", self.margin / GIB, self.notes.get("margin", "")))
        return rows


def _in_flight(layout: Layout, stage: int) -> float:
    """Micro-batches whose activations a stage holds at its peak (1F1B / interleaved)."""
    if layout.pp == 1:
        return 1.0
    base = min(layout.pp - stage, layout.num_microbatches)
    if layout.vpp > 1:
        return base * (1 + (layout.pp - 1) / (layout.pp * layout.vpp))
    return float(base)


def _layer_activations(model: ModelConfig, layout: Layout, stage: int,
                       tokens: int) -> tuple[dict[str, float], dict[str, str]]:
    """The transformer layers' kept activations on `stage` (bytes, with notes): all of them,
    or with full recompute (uniform or block) only the recompute units' inputs plus one
    rebuilt unit, times the micro-batches in flight."""
    chunks = layout.pp * layout.vpp
    layers = model.num_layers // layout.pp  # layers on this stage (all its chunks)
    per_layer = sum(layer_activation_terms(model, layout).values()) * tokens
    layer_in = layer_input_bytes(model, layout) * tokens
    flight = _in_flight(layout, stage)
    acts: dict[str, float] = {}
    notes: dict[str, str] = {}
    rec = layout.recompute_granularity
    if rec == "full":
        n = layout.recompute_num_layers or 1
        per_chunk = model.num_layers // chunks
        if layout.recompute_method == "block":
            kept = min(n, per_chunk) * layout.vpp
            acts["layer activations"] = flight * ((layers - kept) * per_layer + kept * layer_in)
            # The recomputed layers come first, so their backward runs last: by then the kept
            # layers' activations are freed and one rebuilt layer replaces them (measured: no
            # extra layer at the peak unless every layer is recomputed).
            acts["recomputed layer"] = per_layer if kept >= layers else 0.0
            notes["layer activations"] = (f"{layers - kept} layers keep activations "
                                          f"({per_layer / GIB:.3f} GiB each), {kept} keep only "
                                          f"their input, x {flight:g} micro-batches in flight")
        else:
            units = math.ceil(layers / n)
            acts["layer activations"] = flight * units * layer_in
            acts["recomputed layer"] = n * per_layer
            notes["layer activations"] = (f"{units} recompute units keep their input "
                                          f"({layer_in / GIB:.3f} GiB each) x {flight:g} "
                                          f"micro-batches in flight")
        notes["recomputed layer"] = "one recompute unit rebuilt during its backward"
        if not acts["recomputed layer"]:
            del acts["recomputed layer"]
    else:
        acts["layer activations"] = flight * layers * per_layer
        notes["layer activations"] = (f"{layers} layers x {per_layer / GIB:.3f} GiB per layer "
                                      f"({tokens} tokens per rank) x {flight:g} micro-batches "
                                      "in flight")
    return acts, notes


def _add_cp_buffers(model: ModelConfig, layout: Layout, tokens: int, acts: dict[str, float],
                    notes: dict[str, str]) -> None:
    """TE's context-parallel communication buffers of one layer (none on the local spec:
    its gathered K/V are in the layer activations)."""
    if layout.cp > 1 and layout.impl == "transformer_engine":
        kv = model.query_groups * model.head_dim
        e = DTYPE_BYTES[layout.dtype]
        if layout.cp_comm_type in ("p2p", "a2a+p2p"):
            acts["CP buffers"] = 2 * 2 * tokens * kv / layout.tp * e
            notes["CP buffers"] = "TE p2p ring: two K/V receive buffers"
        elif layout.cp_comm_type == "all_gather":
            acts["CP buffers"] = 2 * tokens * layout.cp * kv / layout.tp * e
            notes["CP buffers"] = "TE all_gather: the gathered K/V of one layer"
        else:
            acts["CP buffers"] = 3 * tokens * (model.num_attention_heads * model.head_dim) \
                / layout.tp * e
            notes["CP buffers"] = "TE a2a: Q/K/V re-sharded by heads"


def estimate_memory(model: ModelConfig, layout: Layout, *, stage: int | None = None,
                    margin_fraction: float | None = None,
                    margin_fixed: int | None = None) -> MemoryEstimate:
    """Peak memory of one rank; `stage` None = the most loaded PP stage.

    Args:
        model: the model shape (`seq_length` is the training length; vocabulary as the
            trainer pads it).
        layout: parallel sizes, batching, recompute, precision, kernels.
        stage: PP stage to estimate; None returns the stage with the largest total.
        margin_fraction / margin_fixed: allocator margin; None = the GPU defaults
            (DEFAULT_MARGIN_FRACTION, DEFAULT_MARGIN_FIXED) when `layout.fused_kernels`
            (a CUDA run), 0 otherwise.
    """
    if stage is None:
        candidates = [estimate_memory(model, layout, stage=s, margin_fraction=margin_fraction,
                                      margin_fixed=margin_fixed) for s in range(layout.pp)]
        return max(candidates, key=lambda m: m.total_bytes)
    cuda = layout.fused_kernels
    if margin_fraction is None:
        margin_fraction = DEFAULT_MARGIN_FRACTION if cuda else 0.0
    if margin_fixed is None:
        margin_fixed = DEFAULT_MARGIN_FIXED if cuda else 0
    state = model_state(model, layout, stage)
    tokens = model.seq_length // layout.cp * layout.micro_batch_size
    acts, notes = _layer_activations(model, layout, stage, tokens)
    # The peak is reached either while the loss runs (last stage: everything kept plus the
    # loss's working set) or during the first layer backward (kept minus nothing plus that
    # layer's gradients); the larger phase is reported.
    backward = {"backward transient": backward_transient_bytes(model, layout) * tokens}
    phase = backward
    if stage == layout.pp - 1:
        loss = loss_bytes(model, layout, tokens)
        if sum(loss.values()) > sum(backward.values()):
            phase = loss
    acts.update(phase)
    notes["backward transient"] = ("peak during the first layer backward: SwiGLU and output "
                                   "gradients (+ fp32 norm-backward temporaries in bf16)")
    notes["final norm"] = "peak during the loss: the final norm's saved tensors"
    notes["logits (stock loss)"] = "[tokens, V/TP] logits and fp32 softmax/gradient"
    notes["loss chunk"] = "one chunk of fp32 logits (model/loss.py)"
    notes["output-weight grad (fp32)"] = "the chunked loss's fp32 [V/TP, h] weight gradient"
    notes["grad_hidden"] = "the chunked loss's gradient of the last hidden states"
    _add_cp_buffers(model, layout, tokens, acts, notes)
    e = DTYPE_BYTES[layout.dtype]
    shards = layout.dp * layout.cp
    notes["weights"] = (f"{state.parameters / 1e9:.3f}B parameters on this rank x {e} B"
                        + (" (DDP buffer, padded)" if layout.distributed_optimizer else ""))
    notes["grads"] = f"{state.buffer_elements / 1e9:.3f}B buffer elements x 4 B (fp32)"
    notes["optimizer"] = ("Adam moments 8 B" + (" + fp32 main copy 4 B" if layout.dtype != "fp32"
                                                 else "") + " per element"
                          + (f", sharded over DP x CP = {shards}" if layout.distributed_optimizer
                             else ", not sharded"))
    raw = state.weights + state.gradients + state.optimizer + state.fp8_weight_copies + \
        sum(acts.values())
    margin = margin_fraction * raw + margin_fixed
    notes["margin"] = (f"{margin_fraction:.0%} of the estimate + {margin_fixed / GIB:.1f} GiB "
                       "(fragmentation, CUDA context, NCCL/cuBLAS workspaces)")
    return MemoryEstimate(layout=layout, stage=stage, state=state, activations=acts,
                          margin=margin, notes=notes)


def with_sequence(model: ModelConfig, seq_length: int) -> ModelConfig:
    """The model at another training length (max positions raised when needed)."""
    return replace(model, seq_length=seq_length,
                   max_position_embeddings=max(seq_length, model.max_position_embeddings))
