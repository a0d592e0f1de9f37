"""The audit of megatron-core's settings in docs/gpu.md names every ModelParallelConfig field of
the installed release, so a field a new megatron-core adds is decided (honoured, accepted or
refused by name) before the token pipeline runs with it."""

from __future__ import annotations

import dataclasses
import os
import re

from megatron.core.model_parallel_config import ModelParallelConfig

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "gpu.md")


def _audited_names() -> set[str]:
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    table = text[text.index("Audit of megatron-core"):text.index("`--reset-attention-mask`")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    return {name for row in rows for name in re.findall(r"`([A-Za-z_0-9*]+)`", row.split("|")[1])}


def test_every_model_parallel_config_field_is_audited():
    names = _audited_names()
    prefixes = [name[:-1] for name in names if name.endswith("*")]
    missing = [
        f.name for f in dataclasses.fields(ModelParallelConfig)
        if f.name not in names and not any(f.name.startswith(p) for p in prefixes)
    ]
    assert missing == [], f"add to the audit in docs/gpu.md: {missing}"
