"""TeraPipe's fitted latency model: a table for context 0 plus a linear context term.

    t(b, l, c) = t0(b, l) + [c > 0]·(w_bl·b·l + w_bc·b·c + w_blc·b·l·c)

t0 is measured on a grid of (b, l) and interpolated (linearly, extrapolated from the end
segments); the context term is a least-squares fit of the measured excess over t0. Unlike
TeraPipe's fit it has no intercept and non-negative weights: the excess must vanish with the
context and cannot be negative, which keeps t continuous and non-decreasing in c even when
the measurements are noisy. Fits are saved as JSON so a large job profiles once and every later run
(and the CLI) loads the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROFILE_FORMAT = "megatron-terapipe/profile/v1"


@dataclass
class ProfiledCostModel:
    batches: tuple[int, ...]
    slice_lens: tuple[int, ...]
    no_context: np.ndarray  # [len(batches), len(slice_lens)] seconds at context 0
    context_coef: tuple[float, float, float]  # w_bl, w_bc, w_blc
    r2: float = float("nan")  # of the whole model on every measured point
    r2_context: float = float("nan")  # of the context term on its points
    p2p_latency_s: float = 0.0
    p2p_bytes_per_token: float = 0.0
    p2p_bandwidth_gbps: float = float("inf")
    # Backward over forward time, measured; the simulator splits each slice's time with it.
    backward_ratio: float = 2.0
    meta: dict = field(default_factory=dict)
    source: str = "<fit>"

    supports_arrays = True

    def __post_init__(self) -> None:
        self.batches = tuple(int(b) for b in self.batches)
        self.slice_lens = tuple(int(x) for x in self.slice_lens)
        self.no_context = np.asarray(self.no_context, dtype=np.float64)
        self.context_coef = tuple(float(w) for w in self.context_coef)
        if self.no_context.shape != (len(self.batches), len(self.slice_lens)):
            raise ValueError(
                f"{self.source}: no_context has shape {list(self.no_context.shape)}, expected "
                f"[{len(self.batches)}, {len(self.slice_lens)}] (batches x slice_lens)"
            )
        if list(self.batches) != sorted(set(self.batches)) or list(self.slice_lens) != sorted(
            set(self.slice_lens)
        ):
            raise ValueError(f"{self.source}: batches and slice_lens must be strictly increasing")
        if not np.isfinite(self.no_context).all() or (self.no_context < 0).any():
            raise ValueError(f"{self.source}: no_context times must be finite and >= 0")
        if not self.backward_ratio > 0:
            raise ValueError(f"{self.source}: backward_ratio must be > 0, got "
                             f"{self.backward_ratio}")

    @property
    def name(self) -> str:
        return f"profile:{os.path.basename(self.source)}"

    # -- the interface -----------------------------------------------------------------------
    def no_context_time(self, batch: Any, slice_len: Any) -> Any:
        b, n = np.broadcast_arrays(
            np.asarray(batch, dtype=np.float64), np.asarray(slice_len, dtype=np.float64)
        )
        shape, b, n = b.shape, b.ravel(), n.ravel()
        rows = np.stack([_interp(n, self.slice_lens, row) for row in self.no_context])
        if len(self.batches) == 1:  # one measured batch size: scale linearly in b
            return (rows[0] * b / self.batches[0]).reshape(shape)
        bp = np.asarray(self.batches, dtype=np.float64)
        # Linear in batch between (and beyond) the measured batch sizes.
        k = np.clip(np.searchsorted(bp, b, side="right") - 1, 0, bp.size - 2)
        w = (b - bp[k]) / (bp[k + 1] - bp[k])
        col = np.arange(b.size)
        return (rows[k, col] * (1 - w) + rows[k + 1, col] * w).reshape(shape)

    def context_time(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        b, n, c = (np.asarray(x, dtype=np.float64) for x in (batch, slice_len, context_len))
        w_bl, w_bc, w_blc = self.context_coef
        return np.where(c > 0, w_bl * b * n + w_bc * b * c + w_blc * b * n * c, 0.0)

    def forward_backward_time(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        out = np.maximum(
            self.no_context_time(batch, slice_len) + self.context_time(batch, slice_len,
                                                                         context_len),
            0.0,
        )
        return float(out) if np.ndim(out) == 0 else out

    def p2p_time(self, batch: Any, slice_len: Any) -> Any:
        nbytes = np.asarray(batch, dtype=np.float64) * np.asarray(slice_len) * (
            self.p2p_bytes_per_token
        )
        out = self.p2p_latency_s + nbytes / (self.p2p_bandwidth_gbps * 1e9)
        return float(out) if np.ndim(out) == 0 else out

    # -- fitting -----------------------------------------------------------------------------
    @classmethod
    def fit(
        cls, samples: list[tuple[int, int, int, float]], **extra: Any
    ) -> ProfiledCostModel:
        """Fit from (batch, slice_len, context_len, seconds) samples; every (b, l) of the grid
        needs a context-0 sample (duplicates are averaged)."""
        if not samples:
            raise ValueError("cannot fit a latency model from zero samples")
        data = np.asarray(samples, dtype=np.float64)
        if data.ndim != 2 or data.shape[1] != 4:
            raise ValueError("samples must be (batch, slice_len, context_len, seconds) tuples")
        if not np.isfinite(data).all() or (data < 0).any():
            raise ValueError("samples must be finite and >= 0")
        zero = data[data[:, 2] == 0]
        batches = tuple(sorted({int(b) for b in zero[:, 0]}))
        lens = tuple(sorted({int(x) for x in zero[:, 1]}))
        if not batches:
            raise ValueError("the profile grid needs context_len=0 samples")
        table = np.full((len(batches), len(lens)), np.nan)
        for i, b in enumerate(batches):
            for j, x in enumerate(lens):
                hit = zero[(zero[:, 0] == b) & (zero[:, 1] == x), 3]
                if hit.size:
                    table[i, j] = hit.mean()
        holes = np.argwhere(np.isnan(table))
        if holes.size:
            i, j = holes[0]
            raise ValueError(
                f"the profile grid lacks a context-0 sample for batch={batches[i]}, "
                f"slice_len={lens[j]}: it must be a full grid over batches x slice_lens"
            )
        base = cls(batches, lens, table, (0.0, 0.0, 0.0), **extra)
        ctx = data[data[:, 2] > 0]
        if ctx.shape[0]:
            b, n, c, t = ctx.T
            features = np.stack([b * n, b * c, b * n * c], axis=1)
            excess = t - base.no_context_time(b, n)
            coef = _nonnegative_lstsq(features, excess)
            base.context_coef = tuple(float(w) for w in coef)
            base.r2_context = r_squared(excess, features @ coef)
        predicted = base.forward_backward_time(data[:, 0], data[:, 1], data[:, 2])
        base.r2 = r_squared(data[:, 3], predicted)
        return base

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROFILE_FORMAT,
            "batches": list(self.batches),
            "slice_lens": list(self.slice_lens),
            "no_context": self.no_context.tolist(),
            "context_coef": list(self.context_coef),
            "r2": _num(self.r2),
            "r2_context": _num(self.r2_context),
            "p2p_latency_s": self.p2p_latency_s,
            "p2p_bytes_per_token": self.p2p_bytes_per_token,
            "p2p_bandwidth_gbps": _num(self.p2p_bandwidth_gbps),
            "backward_ratio": self.backward_ratio,
            "meta": self.meta,
        }

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as handle:
            json.dump(self.to_dict(), handle, indent=1)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ProfiledCostModel:
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read latency profile {path!r}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"{path!r} is not a latency profile (format {PROFILE_FORMAT})")
        return cls(
            batches=data["batches"],
            slice_lens=data["slice_lens"],
            no_context=data["no_context"],
            context_coef=data["context_coef"],
            r2=_unnum(data.get("r2")),
            r2_context=_unnum(data.get("r2_context")),
            p2p_latency_s=float(data.get("p2p_latency_s", 0.0)),
            p2p_bytes_per_token=float(data.get("p2p_bytes_per_token", 0.0)),
            p2p_bandwidth_gbps=_unnum(data.get("p2p_bandwidth_gbps"), float("inf")),
            backward_ratio=float(data.get("backward_ratio", 2.0)),
            meta=dict(data.get("meta", {})),
            source=path,
        )


def _nonnegative_lstsq(features: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least squares with every coefficient ≥ 0 (context never makes a slice cheaper), by
    trying each subset of the three features: exact, and cheap at this size."""
    scale = np.maximum(np.abs(features).max(axis=0), 1e-300)  # conditioning; undone below
    x = features / scale
    best, best_err = np.zeros(x.shape[1]), float((target**2).sum())
    for mask in range(1, 1 << x.shape[1]):
        cols = [k for k in range(x.shape[1]) if mask >> k & 1]
        sol, *_ = np.linalg.lstsq(x[:, cols], target, rcond=None)
        if (sol < 0).any():
            continue
        err = float(((x[:, cols] @ sol - target) ** 2).sum())
        if err < best_err:
            best, best_err = np.zeros(x.shape[1]), err
            best[cols] = sol
    return best / scale


def r_squared(y: np.ndarray, predicted: np.ndarray) -> float:
    y, predicted = np.asarray(y, dtype=np.float64), np.asarray(predicted, dtype=np.float64)
    total = float(((y - y.mean()) ** 2).sum())
    if total == 0.0:
        return 1.0 if np.allclose(y, predicted) else float("nan")
    return 1.0 - float(((y - predicted) ** 2).sum()) / total


def _interp(x: np.ndarray, xp: tuple[int, ...], fp: np.ndarray) -> np.ndarray:
    """np.interp, but extrapolating linearly from the end segments instead of clamping."""
    xp_arr = np.asarray(xp, dtype=np.float64)
    if xp_arr.size == 1:
        return fp[0] * x / xp_arr[0]  # one point: proportional to length
    out = np.interp(x, xp_arr, fp)
    lo_slope = (fp[1] - fp[0]) / (xp_arr[1] - xp_arr[0])
    hi_slope = (fp[-1] - fp[-2]) / (xp_arr[-1] - xp_arr[-2])
    out = np.where(x < xp_arr[0], fp[0] + (x - xp_arr[0]) * lo_slope, out)
    return np.where(x > xp_arr[-1], fp[-1] + (x - xp_arr[-1]) * hi_slope, out)


def _num(value: float) -> float | None:
    return value if np.isfinite(value) else None


def _unnum(value: Any, default: float = float("nan")) -> float:
    return default if value is None else float(value)
