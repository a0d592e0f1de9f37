"""The trainer trains an MoE GPT under the token pipeline as stock 1F1B does.

configs/tiny-cpu-moe.args: 4 layers, 4 experts top-2 dropless (alltoall), load-balancing loss
and z-loss on, PP = 2. Over 20 iterations the token pipeline's per-iteration lm loss (uneven
slices) equals stock 1F1B's: any gradient difference, the aux and z-losses' included, would
move the weights and so the later losses. The iteration lines also carry the MoE aux losses,
as Megatron-LM prints them (megatron-core's tracker, mean over MoE layers, per micro-batch):
the token pipeline's equal stock's, where the token pipeline forms them over whole
micro-batches from the slices' router logits.
"""

from __future__ import annotations

import os
import re

import pytest
from test_pretrain import REPO, RTOL, _check, losses, torchrun

MOE = os.path.join(REPO, "configs", "tiny-cpu-moe.args")
NUM_EXPERTS, TOPK = 4, 2  # the config's


def _metric_line(name: str) -> re.Pattern:
    return re.compile(rf"iteration\s+(\d+)/\s*\d+ \|.*? {name}: ([-+.0-9Ee]+) \|")


@pytest.fixture(scope="module")
def runs() -> dict[str, str]:
    stock = _check(torchrun(["--config", MOE]))
    token = _check(
        torchrun(
            ["--config", MOE, "--token-pipeline", "--token-pipeline-schedule", "token-1f1b",
             "--token-pipeline-slices", "32,48,48"]
        )
    )  # fmt: skip
    return {"stock": stock, "token": token}


def _assert_equal_per_iteration(token: dict[int, float], stock: dict[int, float]) -> None:
    assert sorted(stock) == list(range(1, 21)), sorted(stock)
    for it in range(1, 21):
        assert it in token, (it, sorted(token))
        assert abs(token[it] - stock[it]) <= RTOL * abs(stock[it]), (it, token[it], stock[it])


def test_moe_token_pipeline_matches_stock_1f1b_for_20_iterations(runs):
    stock, token = losses(runs["stock"]), losses(runs["token"])
    _assert_equal_per_iteration(token, stock)
    assert stock[20] < stock[1]  # it trains


@pytest.mark.parametrize("name", ["load_balancing_loss", "z_loss"])
def test_moe_aux_losses_are_logged_as_stocks(runs, name):
    """Each iteration line names the aux losses after the lm loss, with stock's values."""
    stock = losses(runs["stock"], _metric_line(name))
    token = losses(runs["token"], _metric_line(name))
    _assert_equal_per_iteration(token, stock)
    line = next(ln for ln in runs["token"].splitlines() if "iteration       20/" in ln)
    assert line.index(" lm loss: ") < line.index(f" {name}: "), line
    if name == "load_balancing_loss":
        # megatron-core logs the switch loss over its coefficient: 1 with balanced routing,
        # E / k with every token on the same k experts; so does the mean over layers of the
        # per-micro-batch values. A sum over layers or micro-batches would lie above.
        for it, value in stock.items():
            assert 0.5 <= value <= NUM_EXPERTS / TOPK, (it, value)
