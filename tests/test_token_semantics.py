"""Loss semantics of the token pipeline against megatron-core's own schedule on the same model.

Each test runs stock 1F1B and a token schedule one after the other on the same ranks, model and
micro-batches, and compares what the two return (per-micro-batch loss reports, non-loss data)
and the gradients they leave (norm-relative error per tensor <= 1e-5, fp32).
"""

from __future__ import annotations

import pytest
import torch
from token_semantics_ranks import stock_vs_token_many

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.gpu_check.criteria import BF16_ERROR_RATIO
from megatron_terapipe.testing.reference import relative_error

RTOL = 1e-5
MOE_BF16 = dict(
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=16,
    moe_shared_expert_intermediate_size=16,
    moe_token_dispatcher_type="alltoall",
    moe_router_load_balancing_type="aux_loss",
    moe_aux_loss_coeff=0.1,
    moe_z_loss_coeff=1e-2,
    add_bias_linear=False,  # megatron-core's expert MLP adds its bias in place (see testing.moe)
)
MOE_BF16_SEEDS = range(6)
# At least this many seeds must route every token as the fp32 reference does, in both bf16 runs.
MOE_BF16_MIN_STABLE_SEEDS = 2


def _close(a, b, rtol=RTOL) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    return relative_error(torch.as_tensor(a), torch.as_tensor(b)) <= rtol


def _check(results, forward_only=False, grad_rtol=RTOL, loss_rtol=RTOL):
    for rank, outcome in enumerate(results):
        stock, token = outcome["stock"], outcome["token"]
        if stock["data"] is not None:
            assert len(stock["data"]) == len(token["data"])
            assert _close(stock["data"], token["data"], loss_rtol), (stock["data"], token["data"])
        if not forward_only:
            errors = [relative_error(t, s) for s, t in zip(stock["grads"], token["grads"])]
            assert max(errors) <= grad_rtol, f"rank {rank}: max grad error {max(errors):.2e}"


CASES = {
    "three-value": dict(schedule="token-1f1b", token_slices=[5, 11, 16], num_microbatches=3),
    "per-token-loss": dict(
        schedule="terapipe",
        token_slices=[5, 11, 16],
        num_microbatches=3,
        config_kwargs={"calculate_per_token_loss": True},
    ),
    "two-value-unmasked": dict(
        schedule="token-1f1b", token_slices=[5, 11, 16], num_microbatches=3, loss_kind="two"
    ),
    "forward-only": dict(
        schedule="token-1f1b", token_slices=[8, 8, 16], num_microbatches=3, forward_only=True
    ),
    "non-loss-data": dict(
        schedule="terapipe",
        token_slices=[12, 20],
        num_microbatches=2,
        loss_kind="non_loss",
        forward_only=True,
        collect_non_loss_data=True,
    ),
    "bf16": dict(
        schedule="token-1f1b",
        token_slices=[1, 7, 20, 4],
        num_microbatches=3,
        model_kwargs={"bf16": True},
        # Larger weights than the default 0.02: attention far from uniform, so the keys'
        # gradients (what slicing changes most) are not negligible.
        config_kwargs={"init_method_std": 0.2},
        fp32_reference=True,
    ),
    # MoE in bf16: megatron-core's MoE layers (4 experts top-2, SequentialMLP, alltoall) with a
    # shared expert and the load-balancing and z-losses, which the token pipeline forms over the
    # whole micro-batch from every slice's bf16 router logits. PP 2, one MoE layer per stage,
    # uneven slices; one case per data seed (see test_moe_bf16_gradient_error_at_most_stocks).
    **{
        f"moe-bf16-seed{seed}": dict(
            schedule="token-1f1b",
            token_slices=[3, 13, 16],
            num_microbatches=2,
            model_kwargs={"bf16": True, "num_layers": 2, "config_overrides": MOE_BF16},
            config_kwargs={"init_method_std": 0.2},
            fp32_reference=True,
            data_seed=seed,
        )
        for seed in MOE_BF16_SEEDS
    },
}

# bf16 (Float16Module, fp32 grad buffers): token and stock both differ from exact arithmetic by
# bf16 rounding (eps 7.8e-3); slicing must not add more than a fraction of stock's own error.
# Both measured against stock's fp32 run of an fp32 copy of the same model on the same data.
# Measured here (init std 0.2): gradients max per tensor stock 2.2e-2 / token 1.6e-2, whole
# model 1.27e-2 / 1.25e-2; loss reports 2.9e-4 / 2.5e-4. Scaling the later slices' dK by 0.9
# (a wrong prefix gradient) gives 4.4e-2 and fails. The ratio: BF16_ERROR_RATIO (issue 12).


@pytest.fixture(scope="module")
def outcomes():
    """All cases in one pair of processes; each test reads its own."""
    per_rank = run_distributed(stock_vs_token_many, 2, list(CASES.values()))
    return {name: [rank[i] for rank in per_rank] for i, name in enumerate(CASES)}


@pytest.mark.parametrize("name", ["three-value", "per-token-loss", "two-value-unmasked"])
def test_losses_and_grads_match_stock(outcomes, name):
    _check(outcomes[name])


def test_forward_only_matches_stock(outcomes):
    _check(outcomes["forward-only"], forward_only=True)


def test_collect_non_loss_data_returns_every_slice(outcomes):
    """Non-loss data comes back per micro-batch as the list of its slices' outputs, in order."""
    last = outcomes["non-loss-data"][-1]
    stock, token = last["stock"]["data"], last["token"]["data"]
    assert len(stock) == len(token) == 2
    for whole, slices in zip(stock, token):
        # Per-token losses [b, s]: the slices concatenated along the sequence are the whole.
        assert relative_error(torch.cat(slices, dim=1), whole) <= RTOL


def _errors(grads, reference) -> tuple[float, float]:
    """(max per-tensor, whole-model) norm-relative error against the fp32 reference."""
    per_tensor = max(relative_error(g, r) for g, r in zip(grads, reference))
    whole = relative_error(torch.cat([g.flatten() for g in grads]),
                           torch.cat([r.flatten() for r in reference]))
    return per_tensor, whole


def _assert_bf16_errors_within_stocks(outcome: dict, rank: int, groups: dict) -> None:
    """Per group of parameters (name filter): the token run's error against the fp32 reference,
    max per tensor and over the group, is at most BF16_ERROR_RATIO x stock's."""
    names = outcome["reference"]["names"]
    for group, selects in groups.items():
        picked = [i for i, name in enumerate(names) if selects(name)]
        assert picked, f"no parameter in group {group}"
        reference = [outcome["reference"]["grads"][i] for i in picked]
        stock = _errors([outcome["stock"]["grads"][i] for i in picked], reference)
        token = _errors([outcome["token"]["grads"][i] for i in picked], reference)
        print(f"rank {rank} {group}: error vs fp32 (max per tensor, whole) stock "
              f"({stock[0]:.2e}, {stock[1]:.2e}) token ({token[0]:.2e}, {token[1]:.2e})")
        for kind, s, t in zip(("max per tensor", "whole"), stock, token):
            assert t <= BF16_ERROR_RATIO * s, (
                f"rank {rank} {group} {kind}: token {t:.2e} stock {s:.2e}")


def test_bf16_gradient_error_at_most_stocks(outcomes):
    """The token pipeline's bf16 gradients are as close to fp32 as stock's bf16 gradients."""
    _assert_bf16_within_stocks(outcomes["bf16"], {"model": lambda name: True})


def _routes_as_reference(outcomes_of_case: list) -> bool:
    """Whether both bf16 runs sent every token, on every rank, to the experts fp32 chose."""
    return all(
        torch.equal(outcome[run]["routing"][layer], routing)
        for outcome in outcomes_of_case
        for run in ("stock", "token")
        for layer, routing in outcome["reference"]["routing"].items()
    )


def test_moe_bf16_gradient_error_at_most_stocks(outcomes):
    """MoE in bf16: router, routed experts and shared experts each, and the whole stage, are as
    close to fp32 under the token pipeline as under stock 1F1B (and so are the loss reports).
    The router's gradient carries the aux and z-losses the token pipeline forms per micro-batch
    from the slices' bf16 logits.

    Top-k routing is discrete: bf16 rounding moves a token whose k-th and (k+1)-th router
    logits lie within rounding of each other to another expert, in stock's run as in the token
    pipeline's, and one such token moves whole expert and router gradients by far more than
    rounding does. The error criterion, which compares rounding, is therefore applied to the
    data seeds on which both runs route every token as the fp32 reference does; too few such
    seeds fails the test rather than passing it on nothing. Forming the aux and z-losses per
    slice (stock's router under slicing) fails it on the router's gradient.
    """
    groups = {
        "router": lambda name: ".router." in name,
        "experts": lambda name: ".experts." in name,
        "shared experts": lambda name: ".shared_experts." in name,
        "stage": lambda name: True,
    }
    cases = [f"moe-bf16-seed{seed}" for seed in MOE_BF16_SEEDS]
    stable = [name for name in cases if _routes_as_reference(outcomes[name])]
    print(f"routed as fp32 in both bf16 runs: {stable}")
    assert len(stable) >= MOE_BF16_MIN_STABLE_SEEDS, (
        f"only {stable} of {cases} route every token as the fp32 reference does")
    for name in stable:
        for rank, outcome in enumerate(outcomes[name]):
            _assert_bf16_errors_within_stocks(outcome, rank, groups)
    # Loss reports: two per seed, pooled over the seeds (a ratio of two numbers' errors is noise)
    _assert_loss_reports_within_stocks([outcomes[name] for name in stable])


def _assert_bf16_within_stocks(outcomes_of_case: list, groups: dict) -> None:
    for rank, outcome in enumerate(outcomes_of_case):
        _assert_bf16_errors_within_stocks(outcome, rank, groups)
    _assert_loss_reports_within_stocks([outcomes_of_case])


def _assert_loss_reports_within_stocks(cases: list[list]) -> None:
    """The last stage's loss reports of the given cases, together: token's error against the
    fp32 reference is at most BF16_ERROR_RATIO x stock's."""
    reports = {name: [] for name in ("stock", "token", "reference")}
    for outcomes_of_case in cases:
        last = outcomes_of_case[-1]
        for name in reports:
            reports[name] += [r["lm loss"].float().view(-1) for r in last[name]["data"]]
    stock, token, reference = (torch.cat(reports[name]) for name in reports)
    stock_error = relative_error(stock, reference)
    token_error = relative_error(token, reference)
    print(f"loss reports vs fp32: stock {stock_error:.2e} token {token_error:.2e}")
    assert token_error <= BF16_ERROR_RATIO * stock_error
