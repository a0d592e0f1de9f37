"""Peak activation memory of each pipeline rank: what the implementation holds, walked in the
schedule's order.

The planner's memory cap, the check of explicit `--token-pipeline-slices` against it and the
printed plan all read this model, so it has to describe the code that runs, not a textbook
count. It has two parts.

What one unit holds (per token, on one tensor-parallel rank). Enumerated from what megatron-core's
GPT layer and the token pipeline's attention save for backward, tensor by tensor:
- the attention half of a layer: the input norm's input and statistics, the QKV GEMM's input,
  the attention kernel's query, output and log-sum-exp (its keys and values are views of the
  K/V buffer below; the output projection's input is the kernel's output storage), the hidden
  dropout mask when dropout is on, RoPE's cos and sin tables, and with attention dropout the
  kernel's mask over every key column the slice attends;
- the MLP half: the pre-MLP norm's, fc1's input, the activation's saved tensors and fc2's input;
- the first stage's embedding (token ids, its dropout mask) and the last stage's final norm,
  output GEMM input and fp32 logits of the loss.
Under sequence parallelism the tensors of the sequence-sharded region are 1/t per rank.

What the token pipeline adds (its own code, exact):
- one K/V buffer of the whole sequence per (micro-batch, model chunk, layer), from the
  micro-batch's first slice until its last slice's backward on that chunk;
- its fp32 dK/dV accumulators, made by the first backward that sends gradient to earlier rows
  (never with one slice) and dropped with the buffer;
- under split backwards, each GEMM's input and output gradient from B until the unit's W.

The walk reads the order of every rank's computes from the schedule IR (the generators'
output, the one the executor runs), adding a unit at its forward and freeing it layer by layer,
top down, at its backward: the accumulators of a layer appear while that layer's attention half
is still held, so a backward can raise the peak beyond the end of the forwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from megatron_terapipe.schedules.in_flight import lifetimes
from megatron_terapipe.schedules.ir import BACKWARD, FORWARD, WEIGHT_GRAD, Schedule

GIB = float(1 << 30)
FP32 = 4
INT64 = 8
NORMS = ("LayerNorm", "RMSNorm")
RECOMPUTE_METHODS = ("uniform", "block")


def memory_model_problem(args: Any) -> str | None:
    """Why the model cannot price these arguments' layers (None: it can): it enumerates dense
    GPT layers, so a number it printed for others would not be true."""
    if getattr(args, "num_experts", None):
        return (f"--num-experts={args.num_experts}: the planner's memory model describes dense "
                "GPT layers, not MoE ones")
    return None


@dataclass(frozen=True)
class ActivationMemoryModel:
    """Dims and layout of the model. `num_layers` is the whole model's, split evenly over
    `pipeline_model_parallel_size` × `num_chunks` model chunks (megatron-core's default layout).
    `mask_bytes` is the size of one hidden-dropout mask element: torch's CUDA dropout keeps a
    bool mask, its CPU dropout a mask in the tensor's dtype (None: the element size)."""

    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int | None = None
    kv_channels: int | None = None
    ffn_hidden_size: int | None = None
    gated_linear_unit: bool = False
    normalization: str = "LayerNorm"
    vocab_size: int = 0
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_chunks: int = 1
    sequence_parallel: bool = False
    bytes_per_element: int = 2
    rotary: bool = False
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    mask_bytes: int | None = None
    recompute_method: str | None = None
    recompute_num_layers: int = 1

    def __post_init__(self) -> None:
        if self.normalization not in NORMS:
            raise ValueError(f"normalization={self.normalization!r}; valid: {', '.join(NORMS)}")
        if self.recompute_method not in (None, *RECOMPUTE_METHODS):
            raise ValueError(f"recompute_method={self.recompute_method!r}; valid: "
                             f"{', '.join(RECOMPUTE_METHODS)} or None")

    @classmethod
    def from_args(cls, args: Any) -> ActivationMemoryModel:
        """From a validated pretrain_gpt.py / Megatron-LM argument namespace."""
        heads = args.num_attention_heads
        groups = getattr(args, "num_query_groups", None)
        if not getattr(args, "group_query_attention", groups is not None):
            groups = None
        dtype = 2 if getattr(args, "bf16", False) or getattr(args, "fp16", False) else FP32
        full = getattr(args, "recompute_granularity", None) == "full"
        swiglu = bool(getattr(args, "swiglu", False))
        ffn = getattr(args, "ffn_hidden_size", None)
        if ffn is None:  # Megatron-LM's default, applied after argument checks
            ffn = (int(8 * args.hidden_size / 3 / 64) * 64 if swiglu else 4 * args.hidden_size)
        return cls(
            num_layers=args.num_layers,
            hidden_size=args.hidden_size,
            num_attention_heads=heads,
            num_query_groups=groups,
            kv_channels=getattr(args, "kv_channels", None),
            ffn_hidden_size=ffn,
            gated_linear_unit=swiglu,
            normalization=getattr(args, "normalization", None) or "LayerNorm",
            vocab_size=int(getattr(args, "padded_vocab_size", None)
                           or getattr(args, "vocab_size", None) or 0),
            tensor_model_parallel_size=getattr(args, "tensor_model_parallel_size", 1) or 1,
            pipeline_model_parallel_size=getattr(args, "pipeline_model_parallel_size", 1) or 1,
            num_chunks=getattr(args, "virtual_pipeline_model_parallel_size", None) or 1,
            sequence_parallel=bool(getattr(args, "sequence_parallel", False)),
            bytes_per_element=dtype,
            rotary=getattr(args, "position_embedding_type", "learned_absolute") == "rope",
            hidden_dropout=float(getattr(args, "hidden_dropout", 0.0) or 0.0),
            attention_dropout=float(getattr(args, "attention_dropout", 0.0) or 0.0),
            recompute_method=getattr(args, "recompute_method", None) if full else None,
            recompute_num_layers=getattr(args, "recompute_num_layers", None) or 1,
        )

    # -- per-token bytes on one TP rank ----------------------------------------------------------
    @property
    def _groups(self) -> int:
        return self.num_query_groups or self.num_attention_heads

    @property
    def _head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def _ffn(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def _sharded(self) -> float:
        """Share of a sequence-region tensor ([s, b, h]) this rank holds."""
        return 1.0 / self.tensor_model_parallel_size if self.sequence_parallel else 1.0

    def _hidden(self) -> float:
        """One [s, b, h] activation of the sequence region, per token."""
        return self.hidden_size * self.bytes_per_element * self._sharded

    def _norm(self) -> float:
        # LayerNorm keeps its input, mean and rstd. torch's RMSNorm computes in fp32 whatever
        # the dtype: it keeps the fp32 input, the normalised input (for the weight's gradient)
        # and rstd.
        e = self.bytes_per_element
        if self.normalization == "RMSNorm":
            width = max(FP32, e)
            return (2.0 * self.hidden_size * width + width) * self._sharded
        return self._hidden() + 2.0 * e * self._sharded

    def _dropout(self) -> float:
        if self.hidden_dropout <= 0.0:
            return 0.0
        mask = self.mask_bytes or self.bytes_per_element
        return self.hidden_size * mask * self._sharded

    def attention_bytes_per_token(self) -> float:
        """The attention half of one layer per token of each sequence (K/V buffer, RoPE
        tables and attention-dropout masks apart: see `layer_bytes`)."""
        t, e = self.tensor_model_parallel_size, self.bytes_per_element
        heads = self.num_attention_heads / t
        query = heads * self._head_dim * e
        # norm, QKV input (the norm's output), query, kernel output, log-sum-exp (fp32)
        return self._norm() + self._hidden() + 2.0 * query + heads * FP32 + self._dropout()

    def mlp_bytes_per_token(self) -> float:
        """The MLP half of one layer."""
        ffn = self._ffn / self.tensor_model_parallel_size * self.bytes_per_element
        # gelu: its input and output (fc2's input); swiglu: fc1's 2·ffn output, the SiLU half
        # with the product's other operand (2·ffn) and fc2's input.
        activation = 5.0 * ffn if self.gated_linear_unit else 2.0 * ffn
        return self._norm() + self._hidden() + activation + self._dropout()

    def layer_bytes_per_token(self) -> float:
        """Both halves of one layer, per token of each sequence."""
        return self.attention_bytes_per_token() + self.mlp_bytes_per_token()

    def layer_bytes(self, batch: int, length: int, context: int) -> tuple[float, float]:
        """(attention half, MLP half) one layer holds for a slice of `length` tokens after
        `context` earlier ones, in each of `batch` sequences. Beyond the per-token bytes: RoPE's
        cos and sin tables for the query and the key ([l, 1, 1, d] each, shared by the
        batch), and with attention dropout the math kernel's bool mask over the slice's rows
        and every key column it attends (context + length), per head."""
        attention = batch * length * self.attention_bytes_per_token()
        if self.rotary:
            attention += 4.0 * length * self._head_dim * self.bytes_per_element
        if self.attention_dropout > 0.0:
            heads = self.num_attention_heads / self.tensor_model_parallel_size
            attention += batch * heads * length * (context + length)
        return attention, batch * length * self.mlp_bytes_per_token()

    def kv_bytes_per_token(self) -> float:
        """One layer's K/V buffer row: keys and values of the query groups on this rank."""
        per_rank = max(1, self._groups // self.tensor_model_parallel_size)
        return 2.0 * per_rank * self._head_dim * self.bytes_per_element

    def kv_grad_bytes_per_token(self) -> float:
        """Its dK/dV accumulator row (fp32 at least)."""
        return self.kv_bytes_per_token() / self.bytes_per_element * max(FP32,
                                                                        self.bytes_per_element)

    def first_stage_bytes_per_token(self) -> float:
        """The embedding: token ids (the lookup and the vocab-parallel mask) and its dropout."""
        return 2.0 * INT64 + self._dropout()

    def last_stage_bytes_per_token(self) -> float:
        """Final norm, output GEMM input, the loss's fp32 logits, targets, mask and loss."""
        logits = self.vocab_size / self.tensor_model_parallel_size * FP32
        return self._norm() + self._hidden() + logits + INT64 + 1 + FP32

    def weight_operand_bytes_per_token(self, last_stage: bool) -> tuple[float, float]:
        """What a split backward's B leaves to W (per layer, and the output layer's): each
        GEMM's input (a saved activation W still needs) and output gradient."""
        t, e = self.tensor_model_parallel_size, self.bytes_per_element
        query = self.num_attention_heads * self._head_dim / t * e
        qkv = (self.num_attention_heads + 2 * self._groups) * self._head_dim / t * e
        ffn = self._ffn / t * e
        fc1 = (2 if self.gated_linear_unit else 1) * ffn
        inputs = 2.0 * self._hidden() + query + ffn  # QKV, projection, fc1, fc2
        grads = qkv + self._hidden() + fc1 + self._hidden()
        head = self._hidden() + self.vocab_size / t * e if last_stage else 0.0
        return inputs + grads, head

    # -- layout --------------------------------------------------------------------------------
    @property
    def layers_per_chunk(self) -> int:
        """Layers of one model chunk (the highest count where they do not divide evenly)."""
        return math.ceil(self.num_layers / (self.pipeline_model_parallel_size * self.num_chunks))

    @property
    def layers_per_stage(self) -> int:
        """Layers of one pipeline rank, all its chunks together."""
        return self.layers_per_chunk * self.num_chunks

    def _recomputed(self) -> int:
        """Layers of a chunk whose activations are recomputed (full recompute)."""
        if self.recompute_method is None:
            return 0
        if self.recompute_method == "uniform":
            return self.layers_per_chunk
        return min(self.recompute_num_layers, self.layers_per_chunk)

    def unit_bytes(self, rank: int, chunk: int, batch: int, length: int, context: int
                   ) -> float:
        """What a unit (a slice of `length` tokens after `context`, `batch` sequences) holds
        on (rank, chunk) between its forward and its backward."""
        layers = self.layers_per_chunk
        recomputed = self._recomputed()
        if self.recompute_method == "uniform":
            kept = math.ceil(layers / self.recompute_num_layers) * self._hidden()
        else:
            kept = recomputed * self._hidden()
        per_token = kept
        if rank == 0 and chunk == 0:
            per_token += self.first_stage_bytes_per_token()
        if self._is_last(rank, chunk):
            per_token += self.last_stage_bytes_per_token()
        return batch * length * per_token + (layers - recomputed) * sum(
            self.layer_bytes(batch, length, context))

    def _is_last(self, rank: int, chunk: int) -> bool:
        return rank == self.pipeline_model_parallel_size - 1 and chunk == self.num_chunks - 1

    # -- the walk ------------------------------------------------------------------------------
    def rank_peaks(
        self,
        schedule: Schedule,
        token_slices: Sequence[Sequence[int]],
        batch_sizes: Sequence[int],
    ) -> list[float]:
        """Peak bytes of every rank running `schedule`; micro-batch m has `batch_sizes[m]`
        sequences cut into `token_slices[m]`."""
        if schedule.num_stages != self.pipeline_model_parallel_size or (
                schedule.num_chunks != self.num_chunks):
            raise ValueError(
                f"schedule has PP={schedule.num_stages}, V={schedule.num_chunks}; the memory "
                f"model PP={self.pipeline_model_parallel_size}, V={self.num_chunks}"
            )
        return [self._walk(schedule, rank, token_slices, batch_sizes)
                for rank in range(schedule.num_stages)]

    def _recompute_groups(self) -> list[int]:
        """Top-down over a chunk's layers: how many layers a backward rebuilds on reaching
        each (0 where none starts): megatron-core's uniform method checkpoints groups of
        `recompute_num_layers` counted from the chunk's first layer, its block method each of
        the first `recompute_num_layers` layers."""
        layers, recomputed = self.layers_per_chunk, self._recomputed()
        starts = [0] * layers
        group = self.recompute_num_layers if self.recompute_method == "uniform" else 1
        for bottom in range(0, recomputed, group):
            top = min(bottom + group, recomputed) - 1
            starts[layers - 1 - top] = top - bottom + 1
        return starts

    def _walk(self, schedule: Schedule, rank: int, token_slices: Sequence[Sequence[int]],
              batch_sizes: Sequence[int]) -> float:
        layers = self.layers_per_chunk
        kv, kv_grad = self.kv_bytes_per_token(), self.kv_grad_bytes_per_token()
        rebuilds = self._recompute_groups()
        held = peak = 0.0
        accumulating: set[tuple[int, int]] = set()
        waiting: dict[tuple[int, int, int], float] = {}  # a split B's operands until its W
        counts = [len(s) for s in token_slices]
        for event in lifetimes(schedule, rank, counts):
            c = event.compute
            key = (c.microbatch, c.chunk)
            slices = token_slices[c.microbatch]
            b, seq = batch_sizes[c.microbatch], sum(slices)
            length, context = slices[c.token_slice], sum(slices[: c.token_slice])
            tokens = b * length
            unit = self.unit_bytes(rank, c.chunk, b, length, context)
            last = self._is_last(rank, c.chunk)
            if c.kind == FORWARD:
                if event.opens_buffer:
                    held += b * seq * kv * layers
                held += unit
                peak = max(peak, held)
            elif c.kind == BACKWARD:
                before = held
                attention, mlp = self.layer_bytes(b, length, context)
                if last:
                    held -= tokens * self.last_stage_bytes_per_token()
                # The first backward that sends gradient to earlier rows makes the buffer's
                # accumulators, layer by layer, while that layer's attention half is held.
                grows = c.token_slice > 0 and key not in accumulating
                for index in range(layers):
                    if rebuilds[index]:  # a checkpoint group rebuilt, then walked
                        held += (attention + mlp) * rebuilds[index]
                        peak = max(peak, held)
                    held -= mlp
                    if grows:
                        held += b * seq * kv_grad
                    peak = max(peak, held)
                    held -= attention
                # Whatever the layers did not free goes too: the embedding's, the checkpoints'.
                held = before - unit + (b * seq * kv_grad * layers if grows else 0.0)
                if grows:
                    accumulating.add(key)
                if event.leaves_weight_grad:
                    per_layer, head = self.weight_operand_bytes_per_token(last)
                    waiting[c.unit] = tokens * (layers * per_layer + head)
                    held += waiting[c.unit]
                    peak = max(peak, held)
                if event.closes_buffer:
                    held -= b * seq * layers * (kv + (kv_grad if key in accumulating else 0.0))
                    accumulating.discard(key)
            elif c.kind == WEIGHT_GRAD:
                held -= waiting.pop(c.unit, 0.0)
        return peak

    # -- the planner's questions ---------------------------------------------------------------
    def peak_bytes(
        self,
        schedule: str,
        batch_slices: Sequence[int],
        token_slices_per_batch_slice: Sequence[Sequence[int]],
        num_stages: int,
        split_backward: bool = False,
        schedules: dict | None = None,
    ) -> float:
        """The highest rank's peak when `schedule` runs one micro-batch per batch slice.
        `schedules` caches the IR by its shape across calls (a planner scores many slicings
        of one shape; the IR depends on their count only)."""
        from megatron_terapipe.schedules.generators import build_schedule

        counts = {len(s) for s in token_slices_per_batch_slice}
        if len(counts) > 1:
            # Batch slices with their own slice counts (TeraPipe's batch DP): all forwards then
            # all backwards, the unsplit terapipe order on one chunk, is what runs them.
            if schedule != "terapipe" or split_backward or self.num_chunks != 1:
                raise ValueError(
                    f"batch slices with different token-slice counts run only under the "
                    f"unsplit terapipe order on one chunk, not {schedule!r} (split backward "
                    f"{split_backward}, {self.num_chunks} chunks)")
            return self._terapipe_peak(batch_slices, token_slices_per_batch_slice, num_stages)
        shape = (schedule, num_stages, len(batch_slices), counts.pop(), self.num_chunks,
                 split_backward)
        cache = {} if schedules is None else schedules
        if shape not in cache:
            cache[shape] = build_schedule(*shape[:5], split_backward=split_backward)
        return max(self.rank_peaks(cache[shape], token_slices_per_batch_slice, batch_slices))

    def _terapipe_peak(self, batch_slices: Sequence[int],
                       slices: Sequence[Sequence[int]], num_stages: int) -> float:
        from megatron_terapipe.schedules.generators import schedule_from_orders
        from megatron_terapipe.schedules.ir import Compute

        forwards = [Compute(FORWARD, m, t) for m, s in enumerate(slices) for t in range(len(s))]
        backwards = [Compute(BACKWARD, c.microbatch, c.token_slice) for c in reversed(forwards)]
        ir = schedule_from_orders("terapipe", num_stages, len(batch_slices),
                                  max(len(s) for s in slices), 1,
                                  [forwards + backwards] * num_stages)
        return max(self.rank_peaks(ir, slices, batch_slices))
