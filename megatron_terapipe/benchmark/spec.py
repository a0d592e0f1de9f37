"""What a benchmark runs: one model and parallel layout, several schedule variants.

A spec is plain data (it crosses process boundaries to the spawned ranks) and is the only input
of the rank-side harness, so a run is reproducible from its JSON. The model is a validated
pretrain_gpt.py namespace (`cli_args.model_args`), built by `training.model` like the trainer's.

Every variant names its attention kernel. Speedups are taken against the stock 1F1B row with the
kernel the token pipeline runs (``sdpa``, `SAME_KERNEL`); a stock row with megatron-core's local
DotProductAttention (``local``) is a kernel difference, reported on its own line.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field
from typing import Any

STOCK_1F1B = "stock-1f1b"
STOCK_INTERLEAVED = "stock-interleaved"
TOKEN = "token"
EQUAL_FLOPS = "equal-flops"  # Seq1F1B's computation-wise split, the peer of our `auto` rows
SAME_KERNEL = "sdpa"  # what the token-pipeline layer spec runs (torch SDPA)
LOCAL_KERNEL = "local"  # megatron-core's local-spec DotProductAttention
KERNEL_DESCRIPTIONS = {
    SAME_KERNEL: "torch scaled_dot_product_attention (token-pipeline layer spec)",
    LOCAL_KERNEL: "megatron-core DotProductAttention (local spec: baddbmm + masked softmax)",
}


@dataclass(frozen=True)
class Variant:
    """One schedule to time.

    `kind` is STOCK_1F1B / STOCK_INTERLEAVED (megatron-core's own functions) or TOKEN (this
    package's executor with `schedule` and either `token_slices` or `num_token_slices`).
    `planned=True` asks the harness to choose `token_slices` with the DP planner from the
    costs measured in the warm-up round, `num_token_slices` then being ignored. `auto=True`
    asks for what `--token-pipeline-slices auto` gives a user: the product's planner
    (`slicing.plan_and_broadcast`) with its default cost model on the benchmark's arguments.
    `split_backward` runs the schedule with split backwards (`--token-pipeline-split-backward`).
    `strategy` names the rule that chose fixed `token_slices` when it is a peer method's
    (EQUAL_FLOPS), so tables can set it beside our planner's row of the same S.
    """

    name: str
    kind: str
    schedule: str = ""
    num_token_slices: int | None = None
    token_slices: tuple[int, ...] | None = None
    planned: bool = False
    auto: bool = False
    virtual_pipeline: int | None = None
    attention: str = SAME_KERNEL
    split_backward: bool = False
    strategy: str = ""

    @property
    def slices_from_planner(self) -> bool:
        """Slices chosen after the warm-up round (by the fit's DP or the product's planner)."""
        return self.planned or self.auto

    @property
    def is_stock(self) -> bool:
        return self.kind != TOKEN

    @property
    def is_baseline(self) -> bool:
        """The row every speedup is taken against: stock 1F1B on the same kernel."""
        return self.kind == STOCK_1F1B and self.attention == SAME_KERNEL


@dataclass(frozen=True)
class BenchSpec:
    """Model, layout, data and timing protocol shared by every variant of one run."""

    model: argparse.Namespace  # validated pretrain_gpt.py arguments (cli_args.model_args)
    variants: tuple[Variant, ...]
    pipeline_parallel: int = 2
    num_microbatches: int = 1
    micro_batch_size: int = 1
    warmup: int = 1  # untimed rounds of every variant, after round 0 (losses, memory, planning)
    iterations: int = 3
    data_seed: int = 0
    init_seed: int = 1234
    # Peak saved-activation bytes need saved-tensor hooks; they run in the warm-up step only,
    # so the timed steps carry no instrumentation beyond two clock reads per action.
    measure_memory: bool = True
    # Each round also times every stage computing alone and all at once (benchmark.contention).
    measure_contention: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stock_1f1b(attention: str = SAME_KERNEL) -> Variant:
    if attention == SAME_KERNEL:
        return Variant("stock 1F1B", STOCK_1F1B)
    return Variant(f"stock 1F1B, {attention} attention", STOCK_1F1B, attention=attention)


def stock_interleaved(chunks: int) -> Variant:
    return Variant(f"stock interleaved V={chunks}", STOCK_INTERLEAVED, virtual_pipeline=chunks)


def token_variant(schedule: str, num_token_slices: int | None = None, planned: bool = False,
                  token_slices: tuple[int, ...] | None = None, auto: bool = False,
                  split_backward: bool = False, strategy: str = "") -> Variant:
    if strategy and token_slices is None:
        raise ValueError(f"a {strategy} variant needs its token_slices")
    if auto:
        name = f"{schedule} auto"
    elif planned:
        name = f"{schedule} DP-planned"
    elif strategy:
        name = f"{schedule} {strategy} S={len(token_slices)}"
    elif token_slices is not None:
        name = f"{schedule} slices={list(token_slices)}"
    else:
        name = f"{schedule} S={num_token_slices}"
    if split_backward:
        name += " split-B/W"
    return Variant(
        name, TOKEN, schedule=schedule, num_token_slices=num_token_slices,
        token_slices=token_slices, planned=planned, auto=auto, split_backward=split_backward,
        strategy=strategy,
    )


def equal_flops_variant(schedule: str, model: argparse.Namespace, num_slices: int) -> Variant:
    """Seq1F1B's split of `model`'s sequence into `num_slices` slices of equal FLOPs (the
    analytic model's count from the model dims), on the grid our planner's `auto` row plans on
    (--token-pipeline-granularity, else the planner's default), so the two differ only in how
    they cut. A count the grid cannot hold is an error naming the flag."""
    from megatron_terapipe.slicing.cost_models import AnalyticCostModel
    from megatron_terapipe.slicing.planner import default_granularity
    from megatron_terapipe.slicing.strategies import attention_to_linear_ratio, equal_flops_slices

    seq = int(model.seq_length)
    tp = int(getattr(model, "tensor_model_parallel_size", 1) or 1)
    multiple_of = tp if getattr(model, "sequence_parallel", False) and tp > 1 else 1
    granularity = (getattr(model, "token_pipeline_granularity", None)
                   or default_granularity(seq, multiple_of))
    if not 1 <= num_slices <= seq // granularity:
        raise ValueError(
            f"--equal-flops-slices {num_slices}: valid counts are 1 to {seq // granularity} "
            f"(--seq-length {seq} in granules of {granularity} tokens)")
    ratio = attention_to_linear_ratio(AnalyticCostModel.from_args(model, preset="cpu"))
    slices = equal_flops_slices(seq, num_slices, granularity, ratio)
    return token_variant(schedule, token_slices=slices, strategy=EQUAL_FLOPS)


SPLIT_BACKWARD_MODES = ("off", "on", "both")


def with_split_backward(variants: list[Variant], mode: str) -> list[Variant]:
    """The token rows under `--split-backward MODE`: as given (off), split (on), or each
    followed by its split twin (both: side by side in the same rounds). Under on/both a
    token-1f1b S=1 split row is added too: megatron-core's 1F1B order with split backwards,
    whose ratio to the stock 1F1B baseline is the gain of the B/W split alone, without
    slicing."""
    if mode not in SPLIT_BACKWARD_MODES:
        raise ValueError(f"--split-backward {mode!r}: valid choices are "
                         f"{', '.join(SPLIT_BACKWARD_MODES)}")
    if mode == "off":
        return list(variants)
    out: list[Variant] = []
    for v in variants:
        if v.kind != TOKEN:
            out.append(v)
            continue
        split = token_variant(v.schedule, v.num_token_slices, v.planned, v.token_slices,
                              v.auto, split_backward=True, strategy=v.strategy)
        out += [v, split] if mode == "both" else [split]
    if not any(v.split_backward and v.schedule == "token-1f1b" and v.num_token_slices == 1
               for v in out):
        out.append(token_variant("token-1f1b", 1, split_backward=True))
    return out


def interleaving_problem(num_layers: int, stages: int, num_microbatches: int, chunks: int
                         ) -> str | None:
    """Why megatron-core cannot run its interleaved schedule here (None: it can)."""
    if chunks <= 1:
        return "V = 1 (no virtual stages)"
    if stages < 2:
        return "PP = 1 (no pipeline)"
    if num_layers % (stages * chunks):
        return f"{num_layers} layers do not split into PP x V = {stages * chunks} equal chunks"
    if num_microbatches % stages:
        return f"M = {num_microbatches} is not divisible by PP = {stages}"
    return None


def stock_variants(num_layers: int, stages: int, num_microbatches: int, chunks: int,
                   local_kernel: bool = True) -> tuple[list[Variant], list[str]]:
    """The baseline rows and notes on rows left out: same-kernel stock 1F1B first, stock
    interleaved where megatron-core can interleave, then (optionally) stock 1F1B on the local
    kernel."""
    variants = [stock_1f1b()]
    notes = []
    problem = interleaving_problem(num_layers, stages, num_microbatches, chunks)
    if problem is None:
        variants.append(stock_interleaved(chunks))
    else:
        notes.append(f"stock interleaved V={chunks} not run: {problem}")
    if local_kernel:
        variants.append(stock_1f1b(LOCAL_KERNEL))
    return variants, notes
