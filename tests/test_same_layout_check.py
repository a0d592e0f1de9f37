"""`testing.equivalence.check_same_layout` finds every kind of difference, and never passes on
nothing: fabricated per-rank results (no spawn) of a DP-2 MoE case and its stock twin."""

from __future__ import annotations

import copy

import pytest
import torch

from megatron_terapipe.model.weights import ParamPlace
from megatron_terapipe.testing.equivalence import check_same_layout, stock_twin
from megatron_terapipe.testing.moe import aux_losses, moe_gpt
from megatron_terapipe.testing.runner import RunCase

CASE = RunCase(
    model=moe_gpt(**aux_losses("global_aux_loss")),
    token_pipeline={"num_token_slices": 2},
    optimizer=True,
    optimizer_name="sgd",
)
PLACE = ParamPlace("w", "decoder.w", (slice(None),), (3,))
INITIAL = {"decoder.w": torch.zeros(3)}


def rank(dp: int) -> dict:
    report = {"lm loss": torch.tensor([10.0 + dp, 5.0])}
    return {
        "rank_info": {"tp": 0, "pp": 0, "dp": dp},
        "losses": [[report, report]],
        "grads": [[(PLACE, torch.tensor([1.0, 2.0, 3.0]))]],
        "weights": [[(PLACE, torch.tensor([0.1, 0.2, 0.3]))]],
        "moe_metrics": [{"global_load_balancing_loss": 1.0026, "z_loss": 2.0}],
        "expert_bias": [{}],
    }


def stock() -> list[dict]:
    return [rank(0), rank(1)]


def problems(token: list[dict]) -> list[str]:
    return check_same_layout(CASE, token, stock(), INITIAL)


def test_equal_runs_pass():
    assert problems(stock()) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda r: r[1]["losses"][0].__setitem__(0, {"lm loss": torch.ones(2)}), "'lm loss'"),
        (lambda r: r[0]["grads"][0][0][1].mul_(1.01), "grad w"),
        (lambda r: r[0]["weights"][0][0][1].add_(0.01), "update w"),
        (lambda r: r[1]["moe_metrics"][0].update(global_load_balancing_loss=1.003), "global_load"),
        (lambda r: r[0]["moe_metrics"][0].pop("z_loss"), "MoE metrics"),
        (lambda r: r[0]["rank_info"].update(dp=1), "layout"),
        (lambda r: r.pop(), "against the stock run's 2"),
        (lambda r: [x.update(losses=[None]) for x in r], "losses reported for DP ranks []"),
    ],
)
def test_each_difference_is_found(change, expected):
    token = stock()
    change(token)
    found = problems(token)
    assert any(expected in p for p in found), found


def test_nothing_to_compare_is_a_problem():
    token, reference = stock(), stock()
    for result in (*token, *reference):
        result["moe_metrics"] = [{}]
    assert any("no MoE metric" in p for p in check_same_layout(CASE, token, reference, INITIAL))


def test_a_stock_run_has_no_twin():
    with pytest.raises(ValueError, match="stock twin"):
        check_same_layout(stock_twin(CASE), stock(), copy.deepcopy(stock()), INITIAL)
