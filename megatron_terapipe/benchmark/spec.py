"""What a benchmark runs: one model and parallel layout, several schedule variants.

A spec is plain data (it crosses process boundaries to the spawned ranks) and is the only input
of the rank-side harness, so a run is reproducible from its JSON.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_terapipe.testing.gpt import TinyGPT

STOCK_1F1B = "stock-1f1b"
STOCK_INTERLEAVED = "stock-interleaved"
TOKEN = "token"


@dataclass(frozen=True)
class Variant:
    """One schedule to time.

    `kind` is STOCK_1F1B / STOCK_INTERLEAVED (megatron-core's own functions) or TOKEN (this
    package's executor with `schedule` and either `token_slices` or `num_token_slices`).
    `planned=True` asks the harness to choose `token_slices` with the DP planner from the
    costs measured in the warm-up round, `num_token_slices` then being ignored.
    """

    name: str
    kind: str
    schedule: str = ""
    num_token_slices: int | None = None
    token_slices: tuple[int, ...] | None = None
    planned: bool = False
    virtual_pipeline: int | None = None

    @property
    def is_stock(self) -> bool:
        return self.kind != TOKEN


@dataclass(frozen=True)
class BenchSpec:
    """Model, layout, data and timing protocol shared by every variant of one run."""

    model: TinyGPT
    variants: tuple[Variant, ...]
    pipeline_parallel: int = 2
    num_microbatches: int = 1
    micro_batch_size: int = 1
    warmup: int = 1
    iterations: int = 3
    data_seed: int = 0
    init_seed: int = 1234
    # Peak saved-activation bytes need saved-tensor hooks; they run in the warm-up step only,
    # so the timed steps carry no instrumentation beyond two clock reads per action.
    measure_memory: bool = True
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stock_1f1b() -> Variant:
    return Variant("stock 1F1B", STOCK_1F1B)


def stock_interleaved(chunks: int) -> Variant:
    return Variant(f"stock interleaved V={chunks}", STOCK_INTERLEAVED, virtual_pipeline=chunks)


def token_variant(schedule: str, num_token_slices: int | None = None, planned: bool = False,
                  token_slices: tuple[int, ...] | None = None) -> Variant:
    if planned:
        name = f"{schedule} DP-planned"
    elif token_slices is not None:
        name = f"{schedule} slices={list(token_slices)}"
    else:
        name = f"{schedule} S={num_token_slices}"
    return Variant(
        name, TOKEN, schedule=schedule, num_token_slices=num_token_slices,
        token_slices=token_slices, planned=planned,
    )
