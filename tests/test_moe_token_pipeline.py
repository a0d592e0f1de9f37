"""MoE GPT layers under the token schedules are the stock megatron-core training step.

Every case runs megatron-core's MoE layer spec (SequentialMLP experts) under a token schedule
and is compared with the single-process, unpipelined stock run of the same model and data
(`testing.equivalence`); stock 1F1B / EP cases in the same batches show that reference is what
stock megatron-core's schedules produce. fp32, within 1e-5 norm-relative per tensor: losses,
every gradient (router, experts, shared experts), the aux and z-losses megatron-core's tracker
logs (every tag, per layer), and the expert biases of aux-loss-free balancing.

The global aux loss at DP > 1 depends on how the global batch is split over ranks, so those
cases are compared with stock's schedule on the same ranks instead (`SAME_LAYOUT`).

The load-balancing losses and the z-loss are not per token: stock forms them over the whole
micro-batch. `test_per_slice_aux_losses_are_caught` runs the same cases with stock's router
under slicing (the losses formed per slice) and requires the comparison to fail.
"""

from __future__ import annotations

import pytest

from megatron_terapipe.testing.equivalence import (
    check_run,
    check_same_layout,
    problems_by_world_size,
    run_parallel,
    stock_twin,
)
from megatron_terapipe.testing.moe import (
    aux_losses,
    moe_gpt,
    padding_dropped_cases,
    per_slice_router_cases,
)
from megatron_terapipe.testing.runner import RunCase

UNEVEN = [3, 13, 16]
AUX_Z = moe_gpt(**aux_losses("aux_loss"))
SEQ_Z = moe_gpt(**aux_losses("seq_aux_loss"))
BOTH = moe_gpt(
    moe_router_load_balancing_type=["aux_loss", "seq_aux_loss"],
    moe_aux_loss_coeff=[0.1, 0.05],
    moe_z_loss_coeff=1e-2,
)


def tp(schedule: str = "terapipe", **slices) -> dict:
    return {"schedule": schedule, **(slices or {"token_slices": UNEVEN})}


SINGLE_RANK = {
    "dropless": RunCase(model=moe_gpt(), token_pipeline=tp()),
    "aux-loss+z": RunCase(model=AUX_Z, micro_batch_size=2, token_pipeline=tp(num_token_slices=4)),
    "seq-aux-loss+z": RunCase(model=SEQ_Z, micro_batch_size=2, token_pipeline=tp()),
    "global-aux-loss-M3": RunCase(
        model=moe_gpt(**aux_losses("global_aux_loss", z=None)),
        num_microbatches=3,
        token_pipeline=tp(),
    ),
    "aux+seq-aux+z": RunCase(model=BOTH, token_pipeline=tp(token_slices=[1, 30, 1])),
    "per-token-loss-aux+z": RunCase(
        model=AUX_Z, calculate_per_token_loss=True, token_pipeline=tp()
    ),
    "sigmoid-expert-bias-two-steps": RunCase(
        model=moe_gpt(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
        steps=2,
        optimizer=True,
        optimizer_name="sgd",
        token_pipeline=tp(),
    ),
    "shared-experts+aux": RunCase(
        model=moe_gpt(moe_shared_expert_intermediate_size=16, **aux_losses("aux_loss")),
        token_pipeline=tp(num_token_slices=4),
    ),
    "allgather-aux+z": RunCase(
        model=moe_gpt(moe_token_dispatcher_type="allgather", **aux_losses("aux_loss")),
        token_pipeline=tp(),
    ),
    # padded tokens (the loss mask's zeros) are left out of the counts, aux losses and z-loss
    "padding-mask-aux+z": RunCase(
        model=AUX_Z, micro_batch_size=2, padding_mask=True, token_pipeline=tp()
    ),
    "padding-mask-seq-aux+z": RunCase(
        model=SEQ_Z, micro_batch_size=2, padding_mask=True, token_pipeline=tp(num_token_slices=4)
    ),
}

AUX_Z_4L = moe_gpt(num_layers=4, **aux_losses("aux_loss"))
# The global aux loss averages token counts over the step's micro-batches in forward order.
GLOBAL_4L = moe_gpt(num_layers=4, **aux_losses("global_aux_loss", z=None))
TWO_RANKS = {
    "stock-pp2-1f1b-aux+z": RunCase(model=AUX_Z, pipeline_parallel=2, num_microbatches=3),
    "pp2-token-1f1b-M3-aux+z": RunCase(
        model=AUX_Z, pipeline_parallel=2, num_microbatches=3, token_pipeline=tp("token-1f1b")
    ),
    "pp2-terapipe-M1-seq-aux+z": RunCase(
        model=SEQ_Z, pipeline_parallel=2, num_microbatches=1, micro_batch_size=2,
        token_pipeline=tp(),
    ),
    "pp2-vp2-interleaved-aux+z": RunCase(
        model=AUX_Z_4L,
        pipeline_parallel=2,
        virtual_pipeline=2,
        num_microbatches=2,
        token_pipeline=tp("token-interleaved", num_token_slices=4),
    ),
    "pp2-vp2-interleaved-global-aux-M4": RunCase(
        model=GLOBAL_4L,
        pipeline_parallel=2,
        virtual_pipeline=2,
        num_microbatches=4,
        token_pipeline=tp("token-interleaved", num_token_slices=4),
    ),
    "pp2-token-1f1b-global-aux-M3": RunCase(
        model=GLOBAL_4L, pipeline_parallel=2, num_microbatches=3, token_pipeline=tp("token-1f1b")
    ),
    "stock-ep2-alltoall-aux+z": RunCase(model=AUX_Z, expert_parallel=2),
    "ep2-alltoall-aux+z": RunCase(model=AUX_Z, expert_parallel=2, token_pipeline=tp()),
    "ep2-allgather-shared-dropless": RunCase(
        model=moe_gpt(
            moe_token_dispatcher_type="allgather", moe_shared_expert_intermediate_size=16
        ),
        expert_parallel=2,
        token_pipeline=tp("token-1f1b"),
    ),
    "tp2-sp-alltoall-aux+z": RunCase(
        model=AUX_Z, tensor_parallel=2, sequence_parallel=True, num_microbatches=1,
        token_pipeline=tp(token_slices=[2, 6, 24]),
    ),
    "tp2-sp-allgather-seq-aux+z": RunCase(
        model=moe_gpt(moe_token_dispatcher_type="allgather", **aux_losses("seq_aux_loss")),
        tensor_parallel=2, sequence_parallel=True, num_microbatches=1, micro_batch_size=2,
        token_pipeline=tp(token_slices=[4, 12, 16]),
    ),
}

FOUR_RANKS = {
    # alltoall with expert TP = 2 all-gathers uneven token counts, which gloo cannot
    "tp2-sp-ep2-allgather-aux+z": RunCase(
        model=moe_gpt(moe_token_dispatcher_type="allgather", **aux_losses("aux_loss")),
        tensor_parallel=2, sequence_parallel=True, expert_parallel=2,
        num_microbatches=1, token_pipeline=tp(token_slices=[4, 12, 16]),
    ),
    "pp2-ep2-token-1f1b-aux+z": RunCase(
        model=AUX_Z, pipeline_parallel=2, expert_parallel=2, num_microbatches=3,
        token_pipeline=tp("token-1f1b"),
    ),
}


# Global aux loss and padding-mask cases on several ranks. The global aux loss all-reduces its
# counts over TP x DP x CP and averages them over the step's micro-batches so far: at DP > 1 its
# value depends on how the global batch is split, so the DP > 1 cases (SAME_LAYOUT) are checked
# against stock's schedule on the same layout, rank by rank.
GLOBAL_Z = moe_gpt(**aux_losses("global_aux_loss"))
GLOBAL_Z_4L = moe_gpt(num_layers=4, **aux_losses("global_aux_loss"))
TWO_RANKS |= {
    "dp2-terapipe-global-aux+z-M3": RunCase(
        model=GLOBAL_Z, num_microbatches=3, token_pipeline=tp()
    ),
    "ep2-alltoall-global-aux+z": RunCase(
        model=GLOBAL_Z, expert_parallel=2, token_pipeline=tp("token-1f1b")
    ),
    "tp2-sp-padding-mask-aux+z": RunCase(
        model=AUX_Z, tensor_parallel=2, sequence_parallel=True, num_microbatches=1,
        micro_batch_size=2, padding_mask=True, token_pipeline=tp(token_slices=[2, 6, 24]),
    ),
    "pp2-token-1f1b-padding-mask-global-aux+z": RunCase(
        model=GLOBAL_Z_4L, pipeline_parallel=2, num_microbatches=3, padding_mask=True,
        token_pipeline=tp("token-1f1b"),
    ),
    # DP = 1: the counts' all-reduce spans TP only, which splits each micro-batch's tokens
    "tp2-sp-global-aux+z": RunCase(
        model=GLOBAL_Z, tensor_parallel=2, sequence_parallel=True, num_microbatches=3,
        token_pipeline=tp(token_slices=[2, 6, 24]),
    ),
}
FOUR_RANKS |= {
    "pp2-dp2-token-1f1b-global-aux+z-M3": RunCase(
        model=GLOBAL_Z_4L, pipeline_parallel=2, num_microbatches=3,
        token_pipeline=tp("token-1f1b"),
    ),
    "pp2-ep2-vp2-interleaved-global-aux+z": RunCase(
        model=GLOBAL_Z_4L, pipeline_parallel=2, virtual_pipeline=2, expert_parallel=2,
        num_microbatches=2, token_pipeline=tp("token-interleaved", num_token_slices=4),
    ),
}
SAME_LAYOUT = (
    "dp2-terapipe-global-aux+z-M3",
    "ep2-alltoall-global-aux+z",
    "pp2-dp2-token-1f1b-global-aux+z-M3",
    "pp2-ep2-vp2-interleaved-global-aux+z",
)


@pytest.fixture(scope="module")
def problems(references):
    """Run every case once (one spawn per world size) and keep each case's problems."""
    return problems_by_world_size(
        {1: SINGLE_RANK, 2: TWO_RANKS, 4: FOUR_RANKS},
        references,
        same_layout=SAME_LAYOUT,
        timeout_s=600.0,  # each spawn runs every case of its world size (17 on two ranks)
    )


@pytest.mark.parametrize("name", [*SINGLE_RANK, *TWO_RANKS, *FOUR_RANKS])
def test_moe_matches_stock(problems, name):
    assert not problems[name], "\n".join(problems[name][:10])


# Each kind of micro-batch term, formed per slice by stock's router: each must be caught.
PER_SLICE = {
    name: SINGLE_RANK[name]
    for name in ("aux-loss+z", "seq-aux-loss+z", "global-aux-loss-M3", "per-token-loss-aux+z")
}
PER_SLICE["z-loss-only"] = RunCase(model=moe_gpt(moe_z_loss_coeff=1e-2), token_pipeline=tp())


def assert_mutation_caught(cases: dict[str, RunCase], body, references) -> None:
    """Single-rank `cases` run under a mutated `body` must fail against their references, in
    the logged MoE metrics and in the router gradients."""
    references.prefetch([(case, 1) for case in cases.values()])
    refs = {name: references.get(case, 1) for name, case in cases.items()}
    results = run_parallel(
        [(case, refs[name].initial) for name, case in cases.items()], 1, body=body
    )
    for (name, case), result in zip(cases.items(), results):
        found = check_run(case, result, refs[name])
        assert any("MoE metric" in p for p in found), (name, found[:3])
        assert any(" grad " in p and "router" in p for p in found), (name, found[:3])


def test_per_slice_aux_losses_are_caught(references):
    """The comparison fails, in the logged losses and the gradients, when the router's
    micro-batch terms are formed per slice (stock's TopKRouter under token slicing)."""
    assert_mutation_caught(PER_SLICE, per_slice_router_cases, references)


def test_per_slice_global_aux_loss_at_dp2_is_caught(references):
    """At DP = 2 the comparison with stock's same layout fails, in the logged global aux loss
    and the router gradients, when the loss is formed per slice. And stock itself at DP = 2 is
    not the single-process run: that is why these cases need their stock twin."""
    case = TWO_RANKS["dp2-terapipe-global-aux+z-M3"]
    reference = references.get(case, 2)
    token, stock = run_parallel(
        [(case, reference.initial), (stock_twin(case), reference.initial)],
        2,
        body=per_slice_router_cases,
    )
    found = check_same_layout(case, token, stock, reference.initial)
    assert any("MoE metric global_load_balancing_loss" in p for p in found), found[:3]
    assert any(" grad " in p and "router" in p for p in found), found[:3]
    stock_against_one_process = check_run(stock_twin(case), stock, reference)
    assert any("global_load_balancing_loss" in p for p in stock_against_one_process)


PADDING = {name: case for name, case in SINGLE_RANK.items() if case.padding_mask}


def test_padding_masks_left_out_of_the_terms_are_caught(references):
    """The padding-mask cases fail, in the logged losses and the router gradients, when the
    micro-batch terms are formed without the slices' padding masks."""
    assert_mutation_caught(PADDING, padding_dropped_cases, references)


def test_router_recompute_refused_only_with_microbatch_terms():
    """Recomputing the router runs its forward again inside each slice's backward, after the
    micro-batch's losses were formed: refused by name with aux or z-losses, accepted without."""
    from types import SimpleNamespace

    from megatron_terapipe.unsupported_features import config_problems

    aux = dict(num_moe_experts=4, moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.1)
    for recompute in (
        dict(recompute_granularity="full"),
        dict(recompute_granularity="selective", recompute_modules=["moe"]),
        dict(moe_layer_recompute=True),
    ):
        found = config_problems(SimpleNamespace(**aux, **recompute))
        assert any("router recomputed" in p for p in found), (recompute, found)
        z_only = SimpleNamespace(num_moe_experts=4, moe_z_loss_coeff=1e-3, **recompute)
        assert any("router recomputed" in p for p in config_problems(z_only))
        dropless = SimpleNamespace(num_moe_experts=4, moe_aux_loss_coeff=0.0, **recompute)
        assert config_problems(dropless) == []
        assert config_problems(SimpleNamespace(**recompute)) == []  # dense


def test_layer_spec_swaps_the_router_of_moe_layers_only():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.moe.router import TopKRouter

    from megatron_terapipe import token_pipeline_layer_spec
    from megatron_terapipe.model.layer_spec import _swap_router
    from megatron_terapipe.model.moe import TokenSliceTopKRouter

    def router_of(spec):
        mlp = spec.submodules.mlp
        submodules = getattr(mlp, "submodules", None) or mlp.keywords["submodules"]
        return submodules

    stock = get_gpt_layer_local_spec(num_experts=4, moe_grouped_gemm=False)
    token = token_pipeline_layer_spec(stock)
    assert router_of(token).router is TokenSliceTopKRouter
    assert router_of(stock).router is TopKRouter  # the caller's spec is left as it was
    token_pipeline_layer_spec(get_gpt_layer_local_spec())  # dense: nothing to swap

    class OtherRouter(TopKRouter):
        pass

    router_of(stock).router = OtherRouter
    with pytest.raises(ValueError, match="OtherRouter"):
        _swap_router(stock.submodules.mlp)
