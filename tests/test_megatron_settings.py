"""megatron-core settings a forward-backward function is handed: the token pipeline does with
each what stock 1F1B does (observed the same way on both, PP = 2 over gloo), or refuses it by
name (the unsupported-features table; tests/test_arguments_megatron_lm.py)."""

from __future__ import annotations

import pytest

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.testing.settings_probe import settings_probe


@pytest.fixture(scope="module")
def observed():
    return run_distributed(settings_probe, 2, timeout_s=240)


def test_autocast_wraps_every_forward_as_stocks_does(observed):
    for rank in observed:
        for enabled in (False, True):
            stock = rank["autocast"][("stock", enabled)]
            token = rank["autocast"][("token", enabled)]
            expected = ("cuda", "torch.bfloat16") if enabled else None
            assert stock and set(stock) == {expected}, stock
            # one forward per slice: 2 micro-batches x 2 slices
            assert token == [expected] * 4


def test_first_val_step_marks_the_first_micro_batch_as_stock_does(observed):
    for rank in observed:
        counts = rank["first_microbatch"]
        for forward_only in (False, True):
            for first_val_step in (None, True, False):
                assert counts[("token", forward_only, first_val_step)] == counts[
                    ("stock", forward_only, first_val_step)
                ], (forward_only, first_val_step, counts)
        # the case that distinguishes honouring from ignoring it
        assert counts[("stock", True, False)] == 0 < counts[("stock", True, None)]


@pytest.mark.parametrize("how", ["p2p_communicator", "pg_collection"])
def test_passed_pipeline_group_carries_the_p2p(observed, how):
    assert all(rank["own_group_used"][how] for rank in observed)
