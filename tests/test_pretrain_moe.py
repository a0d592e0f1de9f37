"""The trainer trains an MoE GPT under the token pipeline as stock 1F1B does.

configs/tiny-cpu-moe.args: 4 layers, 4 experts top-2 dropless (alltoall), load-balancing loss
and z-loss on, PP = 2. Over 20 iterations the token pipeline's per-iteration lm loss (uneven
slices) equals stock 1F1B's: any gradient difference, the aux and z-losses' included, would
move the weights and so the later losses.
"""

from __future__ import annotations

import os

from test_pretrain import REPO, RTOL, _check, losses, torchrun

MOE = os.path.join(REPO, "configs", "tiny-cpu-moe.args")


def test_moe_token_pipeline_matches_stock_1f1b_for_20_iterations():
    stock = losses(_check(torchrun(["--config", MOE])))
    token = losses(
        _check(
            torchrun(
                ["--config", MOE, "--token-pipeline", "--token-pipeline-schedule", "token-1f1b",
                 "--token-pipeline-slices", "32,48,48"]
            )
        )
    )  # fmt: skip
    assert sorted(stock) == list(range(1, 21))
    for it in range(1, 21):
        assert it in token, (it, sorted(token))
        assert abs(token[it] - stock[it]) <= RTOL * abs(stock[it]), (it, token[it], stock[it])
    assert stock[20] < stock[1]  # it trains
