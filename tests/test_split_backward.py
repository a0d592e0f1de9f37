"""Split backwards (`--token-pipeline-split-backward`) compute bitwise the unsplit gradients.

A split B queues megatron-core's weight-gradient kernel calls and its W runs them with the same
kernel in the same order, so on two gloo ranks (PP = 2, gradient-accumulation fusion, three
micro-batches, uneven slices) the split run's losses and every main_grad equal the unsplit
run's exactly (`torch.equal`), while its timeline shows W actions that took time and no rank
warns that its W had nothing to run. Without the deferral wrapper the split B would queue
nothing: the step then says so (a warning on that rank) instead of running unsplit silently.
"""

from __future__ import annotations

import pytest
import torch

from megatron_terapipe.compat import run_distributed
from megatron_terapipe.testing.gpt import TinyGPT
from megatron_terapipe.testing.runner import RunCase, run_cases

FUSED = TinyGPT(config_overrides={"gradient_accumulation_fusion": True})


def _case(schedule: str, split: bool) -> RunCase:
    return RunCase(
        model=FUSED,
        pipeline_parallel=2,
        num_microbatches=3,
        steps=2,
        optimizer=True,
        optimizer_name="sgd",
        token_pipeline={"schedule": schedule, "token_slices": [1, 9, 14, 8],
                        "split_backward": split, "record_timeline": True},
    )


CASES = [_case(s, split) for s in ("token-1f1b", "terapipe") for split in (False, True)]


def _run_recording_warnings(rank: int, world_size: int, runs: list) -> list[dict]:
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = run_cases(rank, world_size, runs)
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    for result in results:
        result["runtime_warnings"] = messages
    return results


@pytest.fixture(scope="module")
def results():
    return run_distributed(_run_recording_warnings, 2, [(case, None) for case in CASES],
                           timeout_s=240)


@pytest.mark.parametrize("index", [0, 2], ids=["token-1f1b", "terapipe"])
def test_split_gradients_and_losses_are_bitwise_the_unsplit_ones(results, index):
    for rank, per_rank in enumerate(results):
        plain, split = per_rank[index], per_rank[index + 1]
        for step, (a, b) in enumerate(zip(plain["grads"], split["grads"])):
            assert len(a) == len(b) > 0
            for (place, want), (_, got) in zip(a, b):
                assert want.abs().sum() > 0, (rank, step, place)
                assert torch.equal(got, want), (rank, step, place)
        if plain["losses"][0] is not None:
            for want, got in zip(plain["losses"], split["losses"]):
                for x, y in zip(want, got):
                    assert all(torch.equal(x[k], y[k]) for k in x)
        # after two SGD steps the weights are still identical
        for (_, want), (_, got) in zip(plain["weights"][-1], split["weights"][-1]):
            assert torch.equal(got, want)
        # ... and not because nothing was deferred: every split B queued its GEMMs
        assert not [m for m in split["runtime_warnings"] if "deferred no" in m]


@pytest.mark.parametrize("index", [1, 3], ids=["token-1f1b", "terapipe"])
def test_split_runs_w_actions_on_the_stage_that_sends_gradients(results, index):
    """Stage 1 sends gradients: one W per backward, each after its B; stage 0 has none."""
    stage0, stage1 = (per_rank[index]["timelines"][-1] for per_rank in results)
    assert not [r for r in stage0 if r["kind"] == "W"]
    backwards = [r for r in stage1 if r["kind"] == "B"]
    weight_grads = [r for r in stage1 if r["kind"] == "W"]
    assert len(weight_grads) == len(backwards) == 3 * 4
    for w in weight_grads:
        b = next(r for r in backwards
                 if (r["microbatch"], r["token_slice"]) == (w["microbatch"], w["token_slice"]))
        assert b["end"] <= w["start"] < w["end"]


def _without_deferral(rank: int, world_size: int) -> list[str]:
    """The split step with install_weight_grad_deferral disabled: what does the step say?"""
    import warnings

    from megatron_terapipe.schedules import executor

    executor.install_weight_grad_deferral = lambda: None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_cases(rank, world_size, [(_case("terapipe", True), None)])
    return [str(w.message) for w in caught if w.category is RuntimeWarning]


def test_a_split_that_defers_nothing_says_so():
    """Stage 1 splits its backwards; with nothing deferred (the GEMMs ran inside B, still
    exact) it warns rather than passing silently; stage 0 splits nothing and stays quiet."""
    stage0, stage1 = run_distributed(_without_deferral, 2, timeout_s=240)
    assert not any("split" in m for m in stage0)
    assert any("deferred no weight-gradient GEMM" in m for m in stage1), stage1


def test_models_without_megatron_linears_are_rejected_by_name():
    from megatron_terapipe.model.weight_grad_deferral import split_backward_problems

    class Config:
        gradient_accumulation_fusion = True
        sequence_parallel = False

    problems = split_backward_problems(Config(), [torch.nn.Sequential(torch.nn.Linear(4, 4))])
    assert len(problems) == 1 and "ColumnParallelLinear/RowParallelLinear" in problems[0]


def test_overlapped_ddp_without_no_sync_for_a_chunk_is_rejected():
    """With overlap_grad_reduce, only DDP's no_sync keeps the hooks that run during a split B
    from starting the reduction before W; a chunk without one is named."""
    from types import SimpleNamespace

    from megatron_terapipe.schedules.grad_sync import unsynced_overlap

    class Ddp(torch.nn.Module):
        ddp_config = SimpleNamespace(overlap_grad_reduce=True)

        def start_grad_sync(self):
            pass

        def no_sync(self):
            pass

    chunks = [Ddp(), Ddp()]
    single = SimpleNamespace(no_sync_func=chunks[0].no_sync)  # covers chunk 0 only
    problems = unsynced_overlap(single, chunks)
    assert len(problems) == 1 and "model chunk(s) [1]" in problems[0]
    assert unsynced_overlap(SimpleNamespace(no_sync_func=[c.no_sync for c in chunks]),
                            chunks) == []
    assert "[0, 1]" in unsynced_overlap(SimpleNamespace(no_sync_func=None), chunks)[0]
    Ddp.ddp_config = SimpleNamespace(overlap_grad_reduce=False)
    assert unsynced_overlap(SimpleNamespace(no_sync_func=None), chunks) == []
