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
