"""The single-stage helper's slice-by-slice forward/backward equals the unsliced model (fp32).

Reference: the same model instance run on the whole micro-batch with plain autograd. Loss and
every gradient within 1e-5 norm-relative.
"""

from __future__ import annotations

import pytest
from single_stage_ranks import sliced_vs_unsliced

from megatron_terapipe.compat import run_distributed


@pytest.mark.parametrize(
    "token_slices", [[1, 7, 100, 20], [1, 126, 1]], ids=["uneven", "one-long-one"]
)
def test_sliced_equals_unsliced_uneven_rope_gqa(token_slices):
    (result,) = run_distributed(
        sliced_vs_unsliced,
        1,
        token_slices,
        {"seq_length": 128, "position_embedding_type": "rope", "num_query_groups": 2},
    )
    sliced, whole = result["loss"]
    assert abs(sliced - whole) <= 1e-5 * abs(whole)
    assert result["max_grad_error"] <= 1e-5


def test_document_masks_and_reset_positions_equal_unsliced_and_stock():
    """--reset-attention-mask --reset-position-ids: each slice gets its rows of megatron-core's
    document mask (keys [0, offset + l)) and its position ids; slice boundaries fall inside
    and on document ends. Reference: the unsliced model and stock local-spec attention."""
    (result,) = run_distributed(
        sliced_vs_unsliced,
        1,
        [20, 30, 14, 64],
        {"seq_length": 128, "num_query_groups": 2},
        document_ends=[9, 49, 50, 100],
    )
    sliced, whole = result["loss"]
    assert abs(sliced - whole) <= 1e-5 * abs(whole)
    assert abs(sliced - result["stock_loss"]) <= 1e-5 * abs(result["stock_loss"])
    assert result["max_grad_error"] <= 1e-5
    assert result["max_grad_error_vs_stock"] <= 1e-5
    # The documents matter: without their mask the loss is another number.
    assert abs(result["loss_without_document_mask"] - whole) > 1e-4 * abs(whole)
