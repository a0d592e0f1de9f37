"""Measured latency tables (`.npz`, format in docs/latency_table.md) as a stage cost model.

File format: `latency` float64 [B+1, U+1, U+1], `latency[b, l, c]` = one stage's forward+backward
seconds for b sequences, a slice of l units of `granularity` tokens after c units of context
(inf = not allowed); scalars `granularity` and `seq_length` (= U·granularity). An optional
`p2p` float64 [B+1, U+1] gives the P2P seconds of a slice's activations (zero when absent).
Tables are checked on load, so a bad file fails with its path and the rule it breaks rather
than as a strange plan.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class LatencyTableCostModel:
    latency: np.ndarray
    granularity: int
    seq_length: int
    p2p: np.ndarray | None = None
    source: str = "<array>"

    supports_arrays = True

    def __post_init__(self) -> None:
        self.latency = np.asarray(self.latency, dtype=np.float64)
        self.granularity = _scalar_int(self.granularity, "granularity", self.source)
        self.seq_length = _scalar_int(self.seq_length, "seq_length", self.source)
        validate_latency_table(self.latency, self.granularity, self.seq_length, self.source)
        if self.p2p is not None:
            self.p2p = np.asarray(self.p2p, dtype=np.float64)
            want = self.latency.shape[:2]
            if self.p2p.shape != want:
                raise ValueError(
                    f"{self.source}: p2p has shape {list(self.p2p.shape)}, expected {list(want)} "
                    "([B+1, U+1] of the latency table)"
                )
            _check_values(self.p2p, "p2p", self.source)

    # -- file I/O ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> LatencyTableCostModel:
        path = os.fspath(path)
        if not os.path.exists(path):
            raise ValueError(f"latency table {path!r} does not exist")
        try:
            archive = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"latency table {path!r} is not an .npz archive ({exc.__class__.__name__}); "
                "format in docs/latency_table.md"
            ) from None
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise ValueError(
                f"latency table {path!r} is a single .npy array, not an .npz archive; "
                "format in docs/latency_table.md"
            )
        with archive as data:
            missing = [k for k in ("latency", "granularity", "seq_length") if k not in data]
            if missing:
                raise ValueError(
                    f"latency table {path!r} lacks {missing}; it needs 'latency' [B+1, U+1, U+1], "
                    "'granularity' and 'seq_length' (docs/latency_table.md)"
                )
            return cls(
                latency=data["latency"],
                granularity=data["granularity"],
                seq_length=data["seq_length"],
                p2p=data["p2p"] if "p2p" in data else None,
                source=path,
            )

    def save(self, path: str | os.PathLike) -> None:
        arrays: dict[str, Any] = {
            "latency": self.latency,
            "granularity": np.int64(self.granularity),
            "seq_length": np.int64(self.seq_length),
        }
        if self.p2p is not None:
            arrays["p2p"] = self.p2p
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def from_cost_model(
        cls, model: Any, max_batch: int, seq_length: int, granularity: int
    ) -> LatencyTableCostModel:
        """Tabulate another model (the table is then exactly what the planner would use)."""
        from megatron_terapipe.slicing.cost_models import build_latency_table

        latency = build_latency_table(model, max_batch, seq_length, granularity, include_p2p=False)
        units = seq_length // granularity
        b, n = np.meshgrid(np.arange(max_batch + 1), np.arange(units + 1), indexing="ij")
        p2p = np.zeros_like(b, dtype=np.float64)
        ok = (b > 0) & (n > 0)
        p2p[ok] = [model.p2p_time(int(x), int(y) * granularity) for x, y in zip(b[ok], n[ok])]
        return cls(latency, granularity, seq_length, p2p, source=f"table({model.name})")

    # -- the interface -----------------------------------------------------------------------
    @property
    def name(self) -> str:
        return f"table:{os.path.basename(self.source)}"

    @property
    def max_batch(self) -> int:
        return self.latency.shape[0] - 1

    @property
    def units(self) -> int:
        return self.latency.shape[1] - 1

    def _index(self, value: Any, what: str) -> Any:
        arr = np.asarray(value)
        if np.any(arr % self.granularity):
            raise ValueError(
                f"{what}={value} is not a multiple of the latency table's granularity "
                f"{self.granularity} ({self.source})"
            )
        return arr // self.granularity

    def _check_batch(self, batch: Any) -> Any:
        arr = np.asarray(batch)
        if np.any(arr < 1) or np.any(arr > self.max_batch):
            raise ValueError(
                f"batch={batch} is outside the latency table's range 1..{self.max_batch} "
                f"({self.source})"
            )
        return arr

    def forward_backward_time(self, batch: Any, slice_len: Any, context_len: Any) -> Any:
        b = self._check_batch(batch)
        n = self._index(slice_len, "slice_len")
        c = self._index(context_len, "context_len")
        if np.any(n < 1) or np.any(n + c > self.units):
            raise ValueError(
                f"slice ({slice_len} tokens after {context_len}) does not fit seq_length="
                f"{self.seq_length} ({self.source})"
            )
        out = self.latency[b, n, c]
        return float(out) if np.ndim(out) == 0 else out

    def p2p_time(self, batch: Any, slice_len: Any) -> Any:
        b = self._check_batch(batch)
        n = self._index(slice_len, "slice_len")
        out = np.zeros(np.broadcast(b, n).shape) if self.p2p is None else self.p2p[b, n]
        return float(out) if np.ndim(out) == 0 else out

    def table(self, granularity: int | None = None, include_p2p: bool = True) -> np.ndarray:
        """The planner's table at `granularity` (a multiple of the file's), P2P added as in
        `build_latency_table`."""
        g = self.granularity if granularity is None else int(granularity)
        if g % self.granularity or self.seq_length % g:
            raise ValueError(
                f"granularity {g} must be a multiple of the latency table's granularity "
                f"{self.granularity} and divide seq_length={self.seq_length} ({self.source})"
            )
        step = g // self.granularity
        table = np.array(self.latency[:, ::step, ::step])
        if include_p2p and self.p2p is not None:
            table = table + 2.0 * self.p2p[:, ::step, None]
        return table


def validate_latency_table(
    latency: np.ndarray, granularity: int, seq_length: int, source: str = "<array>"
) -> None:
    """Raise ValueError naming the file and the broken rule; silent for a good table."""
    if granularity < 1:
        raise ValueError(f"{source}: granularity must be >= 1, got {granularity}")
    if seq_length < 1 or seq_length % granularity:
        raise ValueError(
            f"{source}: seq_length={seq_length} is not a positive multiple of "
            f"granularity={granularity}"
        )
    units = seq_length // granularity
    if latency.ndim != 3:
        raise ValueError(
            f"{source}: latency must be 3-D [B+1, U+1, U+1], got shape {list(latency.shape)}"
        )
    if latency.shape[0] < 2 or latency.shape[1:] != (units + 1, units + 1):
        raise ValueError(
            f"{source}: latency has shape {list(latency.shape)}, but seq_length={seq_length} / "
            f"granularity={granularity} = {units} units needs [B+1, {units + 1}, {units + 1}] "
            "with B >= 1"
        )
    _check_values(latency, "latency", source)
    b, n, c = np.meshgrid(*(np.arange(n) for n in latency.shape), indexing="ij")
    valid = (b >= 1) & (n >= 1) & (n + c <= units)
    if not np.isfinite(latency[valid]).any():
        raise ValueError(f"{source}: every latency entry is inf; no slicing is allowed")


def _check_values(array: np.ndarray, what: str, source: str) -> None:
    if np.isnan(array).any():
        where = tuple(int(i) for i in np.argwhere(np.isnan(array))[0])
        raise ValueError(f"{source}: {what} holds NaN (first at index {list(where)})")
    if (array < 0).any():
        where = tuple(int(i) for i in np.argwhere(array < 0)[0])
        raise ValueError(
            f"{source}: {what} holds negative values (first at index {list(where)}: "
            f"{array[where]}); times must be >= 0 or inf"
        )


def _scalar_int(value: Any, what: str, source: str) -> int:
    arr = np.asarray(value)
    ok = arr.ndim == 0 and np.issubdtype(arr.dtype, np.number) and np.isfinite(arr)
    if not ok or float(arr) != int(arr):
        raise ValueError(f"{source}: {what} must be an integer scalar, got {value!r}")
    return int(arr)
