"""Shared fixtures.

`references` is session-scoped so that every test file comparing a parallel run with the
single-process reference (stock schedules here, the token pipeline elsewhere) shares one
reference run per (model, data, optimizer) setting.
"""

from __future__ import annotations

import pytest

from megatron_terapipe.testing.equivalence import ReferenceCache


@pytest.fixture(scope="session")
def references() -> ReferenceCache:
    return ReferenceCache()
