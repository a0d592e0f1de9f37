"""Stock megatron-core on CPU+gloo is the same training step as one process, unpipelined.

Every case runs megatron-core's GPTModel (local layer spec) through megatron-core's own
`get_forward_backward_func()`, DistributedDataParallel, `finalize_model_grads` and optimizer,
and is compared with a single-process run without pipelining of the same model, weights and
data (`testing.equivalence`). Per step, the loss reports, every gradient and every weight update
must agree within 1e-5, measured norm-relative per tensor: ‖actual − expected‖ / ‖expected‖ in
fp32 (an update's error also allows one fp32 ulp of the weights it was added to).

That reference is then checked against a hand-written autograd loop, so the whole chain —
hand-written loop = no pipelining = 1F1B / interleaved / TP / DP / distributed optimizer — holds,
and the token pipeline's tests can lean on it. Cases are batched per world size because spawning
ranks costs seconds and a TinyGPT step milliseconds.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from megatron_terapipe.testing.equivalence import (
    DEFAULT_RTOL,
    check_run,
    reference_case,
    relative_error,
    run_parallel,
)
from megatron_terapipe.testing.gpt import TinyGPT
from megatron_terapipe.testing.runner import RunCase

# Two steps, so the second step's forward runs on weights the first step's optimizer changed.
# SGD: its update is linear in the gradient, so it stays exact under reordered sums (Adam's
# g/(|g|+eps) is not, for tiny gradients; see RunCase.adam_eps).
SGD = RunCase(num_microbatches=4, steps=2, optimizer=True, optimizer_name="sgd")
# megatron's DistributedOptimizer only supports Adam.
ADAM = RunCase(num_microbatches=2, steps=2, optimizer=True, adam_eps=1e-3)

TWO_RANKS = {
    "pp2-1f1b": replace(SGD, pipeline_parallel=2),
    # 4 layers = PP 2 × VP 2 chunks of one layer; M must be a multiple of PP (group size).
    "pp2-vp2-interleaved": replace(SGD, pipeline_parallel=2, virtual_pipeline=2),
    "pp2-1f1b-per-token-loss": replace(SGD, pipeline_parallel=2, calculate_per_token_loss=True),
    "pp2-1f1b-two-value-loss": replace(SGD, pipeline_parallel=2, two_value_loss=True, steps=1),
    "tp2": replace(SGD, tensor_parallel=2),
    "tp2-sp": replace(SGD, tensor_parallel=2, sequence_parallel=True),
    # DP splits the global batch: 2 micro-batches per rank = the reference's 4.
    "dp2-ddp": replace(SGD, num_microbatches=2),
    "dp2-distopt-adam": replace(ADAM, distributed_optimizer=True),
}
FOUR_RANKS = {
    "tp2-pp2-1f1b": replace(SGD, tensor_parallel=2, pipeline_parallel=2),
    # 8 layers = PP 4 x VP 2 chunks of one layer; no two P2P directions share a peer here.
    "pp4-vp2-interleaved": replace(
        SGD, model=TinyGPT(num_layers=8), pipeline_parallel=4, virtual_pipeline=2
    ),
}
# Stock interleaving at PP 2 in megatron-core's batched P2P mode, the one
# `model.transformer_config` does not choose: each rank's batch sends to the next and to the
# previous stage, the same peer, in an order that peer's receives do not match.
BATCHED_P2P = replace(
    TWO_RANKS["pp2-vp2-interleaved"],
    model=TinyGPT(config_overrides=dict(overlap_p2p_comm=False, batch_p2p_comm=True)),
)
# A parallel run started from slightly different weights: the comparison must object.
PERTURBED = replace(SGD, pipeline_parallel=2)
PERTURBED_KEY = "decoder.layers.mlp.linear_fc1.weight"
# The reference of a run on other data.
OTHER_DATA = replace(SGD, pipeline_parallel=2, data_seed=1)


def _perturbed(initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {key: value.clone() for key, value in initial.items()}
    state[PERTURBED_KEY][1, 0, 0] += 1e-2  # layer 1: on PP stage 0
    return state


@pytest.fixture(scope="module")
def results(references):
    """Each case's per-rank results: one spawn per world size, one for all references."""
    references.prefetch(
        [(case, 2) for case in [*TWO_RANKS.values(), OTHER_DATA, BATCHED_P2P]]
        + [(case, 4) for case in FOUR_RANKS.values()]
    )
    runs = [(case, references.get(case, 2).initial) for case in TWO_RANKS.values()]
    runs.append((PERTURBED, _perturbed(references.get(PERTURBED, 2).initial)))
    runs.append((BATCHED_P2P, references.get(BATCHED_P2P, 2).initial))
    two = run_parallel(runs, 2)
    four = run_parallel(
        [(case, references.get(case, 4).initial) for case in FOUR_RANKS.values()], 4
    )
    out = dict(zip(TWO_RANKS, two))
    out["perturbed"], out["batched-p2p"] = two[-2:]
    out.update(zip(FOUR_RANKS, four))
    return out


@pytest.mark.parametrize("name", [*TWO_RANKS, *FOUR_RANKS])
def test_stock_schedule_matches_unpipelined_reference(results, references, name):
    case = {**TWO_RANKS, **FOUR_RANKS}[name]
    world_size = 2 if name in TWO_RANKS else 4
    problems = check_run(case, results[name], references.get(case, world_size), DEFAULT_RTOL)
    assert not problems, "\n".join(problems[:10])


@pytest.mark.parametrize(
    "name", ["pp2-1f1b", "pp2-1f1b-per-token-loss", "pp2-1f1b-two-value-loss", "dp2-distopt-adam"]
)
def test_no_pipelining_reference_equals_plain_autograd(results, references, name):
    """The reference (megatron's forward_backward_no_pipelining + DDP) against a bare loop."""
    ref = references.get(TWO_RANKS[name], 2)
    assert ref.case.pipeline_parallel == ref.case.tensor_parallel == 1
    assert ref.autograd_grads is not None
    assert set(ref.autograd_grads) == set(ref.grads[0])
    for key, expected in ref.autograd_grads.items():
        assert expected.norm() > 0, key
        assert relative_error(ref.grads[0][key], expected) <= DEFAULT_RTOL, key


def test_reference_runs_once_per_setting(results, references):
    """All references above came from one spawn, and asking again spawns nothing."""
    runs = references.runs
    for case in TWO_RANKS.values():
        references.get(case, 2)
    assert references.runs == runs
    assert reference_case(TWO_RANKS["dp2-ddp"], 2) == reference_case(TWO_RANKS["pp2-1f1b"], 2)


def test_comparison_detects_a_perturbed_weight(results, references):
    """A test that cannot fail proves nothing: one weight off by 1e-2 must be reported."""
    problems = check_run(PERTURBED, results["perturbed"], references.get(PERTURBED, 2))
    text = "\n".join(problems)
    assert "'lm loss'" in text  # the losses differ ...
    assert "grad chunk0.decoder.layers.1.mlp.linear_fc1.weight" in text  # ... and that grad
    assert "grad chunk0.decoder.layers.0." in text  # ... and grads upstream of it
    assert "update" in text  # ... and, with SGD, the updates


def test_batched_p2p_at_pp2_is_not_megatron_cores_result(results, references):
    """Why stock interleaving runs overlapped P2P: the batched mode at PP 2 pairs activations
    with gradients (equal shapes, so silently) and its step is not the unpipelined one."""
    config = TWO_RANKS["pp2-vp2-interleaved"].model
    assert not config.config_overrides  # the interleaved case above runs the chosen mode
    problems = check_run(BATCHED_P2P, results["batched-p2p"], references.get(BATCHED_P2P, 2))
    assert any(" grad " in p for p in problems), problems


def test_comparison_detects_different_data(results, references):
    """The same run checked against a reference on other data must fail too."""
    case = TWO_RANKS["pp2-1f1b"]
    problems = check_run(case, results["pp2-1f1b"], references.get(OTHER_DATA, 2))
    assert any("'lm loss'" in p for p in problems)
    assert any(" grad " in p for p in problems)
