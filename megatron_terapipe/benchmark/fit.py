"""A cost model of this machine fitted to measured per-action times.

The simulator needs per-action costs; the most faithful ones for predicting a measured run are
the run's own. Per stage and per kind (forward, backward), slice times are fitted by least
squares to

    t(l, ctx) = a + b·l + c·l·(ctx + l/2)

(fixed cost, linear layers, attention over ctx earlier tokens plus the causal half of its own
square). The fit pools every token variant of the run, so one model has to explain all slice
counts at once; its error on each variant is part of the report. Stock megatron runs a different
attention kernel (a full s×s masked softmax), so stock actions are priced by their own mean.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from megatron_terapipe.token_slices import slice_offsets

FORWARD, BACKWARD, WEIGHT_GRAD = "F", "B", "W"


def _features(length: Any, context: Any) -> np.ndarray:
    n = np.asarray(length, dtype=np.float64)
    c = np.asarray(context, dtype=np.float64)
    return np.stack([np.ones_like(n * c), n + 0 * c, n * (c + n / 2.0)], axis=-1)


@dataclass
class SliceTimeFit:
    """t(l, ctx) for one stage and one kind of action, seconds."""

    coef: tuple[float, float, float]
    r2: float = float("nan")
    samples: int = 0

    def __call__(self, length: Any, context: Any) -> Any:
        out = _features(length, context) @ np.asarray(self.coef)
        return float(out) if np.ndim(out) == 0 else out


def fit_slice_times(points: Sequence[tuple[int, int, float]]) -> SliceTimeFit:
    """Non-negative least squares over (length, context, seconds) points.

    Every coefficient is a cost, so none may be negative (a negative context term fitted to
    noise would make long contexts look free). With three features the exact NNLS is the best
    non-negative unconstrained fit over the 7 feature subsets.
    """
    data = np.asarray(points, dtype=np.float64)
    if data.size == 0:
        raise ValueError("no measured actions to fit")
    x = _features(data[:, 0], data[:, 1])
    y = data[:, 2]
    best: tuple[float, np.ndarray] | None = None
    for subset in ((0, 1, 2), (0, 1), (0, 2), (1, 2), (0,), (1,), (2,)):
        cols = list(subset)
        part, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
        if (part < 0).any():
            continue
        coef = np.zeros(3)
        coef[cols] = part
        residual = float(((x @ coef - y) ** 2).sum())
        if best is None or residual < best[0] - 1e-18:
            best = (residual, coef)
    coef = best[1] if best is not None else np.zeros(3)
    pred = x @ coef
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - pred) ** 2).sum()) / total if total > 0 else float("nan")
    return SliceTimeFit(tuple(float(v) for v in coef), r2, len(y))


@dataclass
class P2PFit:
    """Seconds to move one activation tensor between two ranks: latency + bytes / rate."""

    latency_s: float = 0.0
    seconds_per_byte: float = 0.0

    def __call__(self, nbytes: Any) -> Any:
        return self.latency_s + np.asarray(nbytes, dtype=np.float64) * self.seconds_per_byte


@dataclass
class FittedCostModel:
    """Per-stage forward/backward slice costs plus P2P, fitted on this machine.

    Implements the planner's StageCostModel protocol (`forward_backward_time`, `p2p_time`; the
    slowest stage, as the planner prices one stage for all) and gives the simulator per-stage,
    per-kind costs.
    """

    forward: list[SliceTimeFit]
    backward: list[SliceTimeFit]
    p2p: P2PFit
    hidden_size: int
    bytes_per_element: int = 4
    extra: dict = field(default_factory=dict)

    supports_arrays = True
    name = "fitted:this-machine"

    def action_time(self, kind: str, stage: int, length: Any, context: Any) -> Any:
        fits = self.forward if kind == FORWARD else self.backward
        return fits[stage](length, context)

    def forward_backward_time(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        totals = [f(slice_len, context_len) + b(slice_len, context_len)
                  for f, b in zip(self.forward, self.backward)]
        out = np.asarray(batch, dtype=np.float64) * np.max(np.stack(
            [np.asarray(t, dtype=np.float64) for t in totals]), axis=0)
        return float(out) if np.ndim(out) == 0 else out

    def p2p_time(self, batch: Any, slice_len: Any) -> Any:
        nbytes = (np.asarray(batch, dtype=np.float64) * np.asarray(slice_len, dtype=np.float64)
                  * self.hidden_size * self.bytes_per_element)
        out = self.p2p(nbytes)
        return float(out) if np.ndim(out) == 0 else out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": "t(l, ctx) = a + b*l + c*l*(ctx + l/2) per stage and kind",
            "forward": [{"coef": f.coef, "r2": f.r2, "samples": f.samples} for f in self.forward],
            "backward": [
                {"coef": b.coef, "r2": b.r2, "samples": b.samples} for b in self.backward
            ],
            "p2p_latency_s": self.p2p.latency_s,
            "p2p_seconds_per_byte": self.p2p.seconds_per_byte,
        }


def action_points(
    token_slices: Sequence[int], records: Iterable[Any], kind: str
) -> list[tuple[int, int, float]]:
    """(length, context, seconds) of every `kind` action in one rank's records; a backward's
    seconds include its split weight-gradient action W, if it had one (a whole backward)."""
    offsets = slice_offsets(tuple(token_slices))
    records = list(records)
    weight_grads = weight_grad_seconds(records) if kind == BACKWARD else {}
    return [
        (
            token_slices[r.token_slice],
            offsets[r.token_slice],
            r.end - r.start + weight_grads.get((r.microbatch, r.token_slice, r.chunk), 0.0),
        )
        for r in records
        if r.kind == kind and r.token_slice >= 0
    ]


def weight_grad_seconds(records: Iterable[Any]) -> dict[tuple[int, int, int], float]:
    """Seconds of each split backward's W action, by (micro-batch, slice, chunk)."""
    return {
        (r.microbatch, r.token_slice, r.chunk): r.end - r.start
        for r in records
        if r.kind == WEIGHT_GRAD
    }


def weight_grad_share(runs: Sequence[Sequence[Sequence[Any]]]) -> float | None:
    """Measured W / (B + W) over every split backward of `runs` (per-rank record lists), None
    when nothing ran split."""
    whole = part = 0.0
    for per_rank in runs:
        for records in per_rank:
            weight_grads = weight_grad_seconds(records)
            for r in records:
                unit = (r.microbatch, r.token_slice, r.chunk)
                if r.kind == BACKWARD and unit in weight_grads:
                    whole += r.end - r.start + weight_grads[unit]
                    part += weight_grads[unit]
    return part / whole if whole > 0 else None


def fit_cost_model(
    runs: Sequence[tuple[tuple[int, ...], Sequence[Sequence[Any]]]],
    num_stages: int,
    hidden_size: int,
    p2p: P2PFit | None = None,
) -> FittedCostModel:
    """Fit from `runs`: (token_slices, per-rank record lists) of one or more token variants."""
    fits: dict[str, list[SliceTimeFit]] = {}
    for kind in (FORWARD, BACKWARD):
        fits[kind] = []
        for stage in range(num_stages):
            points: list[tuple[int, int, float]] = []
            for slices, per_rank in runs:
                points += action_points(slices, per_rank[stage], kind)
            fits[kind].append(fit_slice_times(points))
    return FittedCostModel(fits[FORWARD], fits[BACKWARD], p2p or P2PFit(), hidden_size)


def mean_action_times(per_rank: Sequence[Sequence[Any]]) -> dict[tuple[str, int, int], float]:
    """Mean seconds per (kind, stage, chunk): the cost of a stock (unsliced) action."""
    sums: dict[tuple[str, int, int], list[float]] = {}
    for stage, records in enumerate(per_rank):
        for r in records:
            if r.kind in (FORWARD, BACKWARD):
                sums.setdefault((r.kind, stage, r.chunk), []).append(r.end - r.start)
    return {key: float(np.mean(values)) for key, values in sums.items()}
