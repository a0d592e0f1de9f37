"""Is a parallel run the same training step as one process running the whole model?

Every schedule in this project (megatron-core's own, and the token pipeline) must produce the
losses, gradients and weight updates of a single-process, unpipelined run of the same model on
the same data. This module runs that reference once per (model, data, optimizer) setting,
caches it, runs parallel cases in batches, and turns any disagreement into readable messages:

    cache = ReferenceCache()
    case = RunCase(pipeline_parallel=2, token_pipeline={"num_token_slices": 4})
    problems = run_and_check({"terapipe": case}, world_size=2, references=cache)["terapipe"]
    assert not problems, "\\n".join(problems)

Errors are norm-relative per tensor: ‖actual − expected‖ / ‖expected‖ (see `relative_error`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import torch

from megatron_terapipe.testing.reference import ParamPlace, relative_error
from megatron_terapipe.testing.runner import RunCase, run_cases

DEFAULT_RTOL = 1e-5


def data_parallel_size(case: RunCase, world_size: int) -> int:
    model_parallel = case.tensor_parallel * case.pipeline_parallel
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not a multiple of TP×PP = {model_parallel}")
    return world_size // model_parallel


def reference_case(case: RunCase, world_size: int) -> RunCase:
    """The single-process stock run that `case` on `world_size` ranks must reproduce.

    Data parallelism splits the global batch, so the reference runs all DP ranks' micro-batches;
    the distributed optimizer only changes where the optimizer state lives.
    """
    dp = data_parallel_size(case, world_size)
    return replace(
        case,
        tensor_parallel=1,
        pipeline_parallel=1,
        expert_parallel=1,
        virtual_pipeline=None,
        sequence_parallel=False,
        num_microbatches=case.num_microbatches * dp,
        distributed_optimizer=False,
        token_pipeline=None,
        check_devices=False,
    )


def _key(case: RunCase) -> str:
    # RunCase holds dicts, so it is not hashable; its repr is a faithful key.
    return repr(case)


def global_tensors(local: list[tuple[ParamPlace, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Assemble global tensors from (place, value) pairs that together cover the model."""
    out: dict[str, torch.Tensor] = {}
    for place, value in local:
        out.setdefault(place.key, torch.zeros(place.global_shape))[place.index] = value
    return out


@dataclass
class Reference:
    """A single-process run: global initial weights, and per step losses, grads and weights."""

    case: RunCase
    initial: dict[str, torch.Tensor]
    losses: list[list[dict[str, torch.Tensor]]]
    grads: list[dict[str, torch.Tensor]]
    weights: list[dict[str, torch.Tensor]]
    # Per step, what megatron-core's MoE tracker logs (aux and z-losses); None for dense models.
    moe_metrics: list[dict[str, float]] | None = None
    # Per step, each MoE router's expert bias (aux-loss-free balancing) by global layer number.
    expert_bias: list[dict[int, torch.Tensor]] | None = None
    # Step-1 gradients from plain autograd on the same model and data, without megatron's
    # schedule or DDP: an independent check of the reference itself.
    autograd_grads: dict[str, torch.Tensor] | None = None

    @classmethod
    def from_result(cls, case: RunCase, result: dict, autograd_grads=None) -> Reference:
        return cls(
            case=case,
            initial=result["initial"],
            losses=result["losses"],
            grads=[global_tensors(step) for step in result["grads"]],
            weights=[global_tensors(step) for step in result["weights"]],
            moe_metrics=result.get("moe_metrics"),
            expert_bias=result.get("expert_bias"),
            autograd_grads=autograd_grads,
        )


def plain_autograd_grads(case: RunCase, init_state: dict) -> dict[str, torch.Tensor]:
    """Step-1 global gradients of `case` (one rank, TP=PP=1) by a hand-written loop.

    Reproduces the loss scaling of megatron-core's forward_step (per-micro-batch token mean,
    divided by the number of micro-batches; or a token sum over the whole step when
    `calculate_per_token_loss`) so it must agree with the stock schedule.
    """
    from megatron.core import parallel_state, tensor_parallel

    from megatron_terapipe.testing.gpt import (
        build_gpt_chunks,
        make_microbatches,
        transformer_config,
    )
    from megatron_terapipe.testing.reference import global_state, load_global_state

    parallel_state.initialize_model_parallel()
    try:
        tensor_parallel.model_parallel_cuda_manual_seed(case.init_seed)
        # plain autograd: weight gradients in .grad, never fused into a DDP main_grad
        config = transformer_config(case.model, gradient_accumulation_fusion=False)
        (model,) = build_gpt_chunks(case.model, config)
        load_global_state([model], init_state)
        batches = make_microbatches(
            case.model, case.micro_batch_size, case.num_microbatches, seed=case.data_seed
        )
        total_tokens = sum(b["loss_mask"].sum() for b in batches)
        for batch in batches:
            per_token = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            mask = batch["loss_mask"]
            loss = (per_token.float() * mask).sum()
            if case.calculate_per_token_loss:
                loss = loss / total_tokens
            else:
                loss = loss / mask.sum().clamp(min=1) / case.num_microbatches
            loss.backward()
        return global_state([model], grads=True)
    finally:
        parallel_state.destroy_model_parallel()


def _reference_body(rank: int, world_size: int, cases: list[RunCase]) -> list[dict[str, Any]]:
    results = run_cases(rank, world_size, [(case, None) for case in cases])
    for case, result in zip(cases, results):
        # megatron-core's MoE aux losses reach autograd through a scale only its schedules set;
        # the hand-written loop below is the dense models' independent check.
        moe = "num_moe_experts" in case.model.config_overrides
        if not case.forward_only and not moe:
            result["autograd_grads"] = plain_autograd_grads(case, result["initial"])
    return results


class ReferenceCache:
    """Single-process reference runs, computed once per setting and shared by all callers.

    `prefetch` computes every missing reference in one spawned process, because process start-up,
    not the tiny model, dominates the cost.
    """

    def __init__(self, timeout_s: float = 240.0) -> None:
        self._refs: dict[str, Reference] = {}
        self.timeout_s = timeout_s
        self.runs = 0  # spawned reference runs, for tests of the cache itself

    def prefetch(self, cases: list[tuple[RunCase, int]]) -> None:
        from megatron_terapipe.compat import run_distributed

        missing: dict[str, RunCase] = {}
        for case, world_size in cases:
            ref = reference_case(case, world_size)
            if _key(ref) not in self._refs:
                missing[_key(ref)] = ref
        if not missing:
            return
        refs = list(missing.values())
        (results,) = run_distributed(_reference_body, 1, refs, timeout_s=self.timeout_s)
        self.runs += 1
        for ref, result in zip(refs, results):
            self._refs[_key(ref)] = Reference.from_result(
                ref, result, autograd_grads=result.get("autograd_grads")
            )

    def get(self, case: RunCase, world_size: int) -> Reference:
        self.prefetch([(case, world_size)])
        return self._refs[_key(reference_case(case, world_size))]


def _ulp_norm(weights: torch.Tensor) -> float:
    """‖one fp32 unit in the last place of each weight‖: how finely an update can be observed."""
    w = weights.float().abs()
    return (torch.nextafter(w, torch.full_like(w, float("inf"))) - w).norm().item()


def _compare(
    what: str,
    local: list[tuple[ParamPlace, torch.Tensor]],
    expected: dict[str, torch.Tensor],
    rtol: float,
    baseline: dict[str, torch.Tensor] | None = None,
    local_baseline: list[tuple[ParamPlace, torch.Tensor]] | None = None,
) -> list[str]:
    """Per-tensor relative errors; with baselines, of the change from them (weight updates).

    An update is read as (weights after) − (weights before), and each of those is rounded to
    fp32: an update can't be observed more finely than one ulp of the weights it was added to.
    So an update mismatch counts only beyond rtol·‖update‖ plus that resolution (for layer-norm
    weights near 1.0 and a small learning rate, the resolution alone is ~1e-5 of the update).
    """
    problems = []
    # Both lists come from the same rank's param_places(), so they are in the same order.
    before = [value for _, value in local_baseline] if local_baseline else None
    for i, (place, value) in enumerate(local):
        target = expected[place.key][place.index]
        floor = 0.0
        if baseline is not None:
            floor = _ulp_norm(target)
            origin = before[i] if before is not None else baseline[place.key][place.index]
            value = value - origin
            target = target - baseline[place.key][place.index]
        if tuple(target.shape) != tuple(value.shape):
            problems.append(
                f"{what} {place.name}: shape {tuple(value.shape)} != {tuple(target.shape)}"
            )
            continue
        diff = (value.float() - target.float()).norm().item()
        scale = target.float().norm().item()
        if not diff <= rtol * scale + floor:
            err = relative_error(value, target)
            extra = f" (fp32 resolution {floor / scale:.1e} of it)" if floor and scale else ""
            problems.append(f"{what} {place.name} ({place.key}): relative error {err:.3e}{extra}")
    return problems


def _compare_losses(
    step: int, rank: int, losses: list[dict], expected: list[dict], rtol: float
) -> list[str]:
    if len(losses) != len(expected):
        return [f"step {step} rank {rank}: {len(losses)} loss reports, expected {len(expected)}"]
    problems = []
    for mb, (got, want) in enumerate(zip(losses, expected)):
        if set(got) != set(want):
            problems.append(
                f"step {step} rank {rank} mb {mb}: keys {sorted(got)} != {sorted(want)}"
            )
            continue
        for key in want:
            err = relative_error(got[key], want[key])
            if not err <= rtol:
                problems.append(
                    f"step {step} rank {rank} mb {mb} {key!r}: {got[key].tolist()} vs "
                    f"{want[key].tolist()} (relative error {err:.3e})"
                )
    return problems


def _compare_moe_metrics(
    step: int,
    rank_results: list[dict[str, Any]],
    reference: Reference,
    rtol: float,
    tokens_split: bool,
) -> list[str]:
    """Every rank's logged MoE metrics (tag -> value) against the reference's, relative.

    A metric megatron-core logs unreduced (each rank's own mean: 0.16's z-loss) is a property
    of the layout when tensor or data parallelism splits the tokens, so it is compared only
    where no rank shares a micro-batch's tokens with another.
    """
    if reference.moe_metrics is None:
        return []
    problems = []
    for rank, result in enumerate(rank_results):
        where = f"step {step} rank {rank}"
        got = result.get("moe_metrics", [None] * (step + 1))[step] or {}
        local = set(result.get("moe_rank_local", [])) if tokens_split else set()
        problems += _metric_problems(where, got, reference.moe_metrics[step], rtol, local)
        if reference.expert_bias is not None:
            problems += _bias_problems(
                where, result["expert_bias"][step], reference.expert_bias[step], rtol
            )
    return problems


def _metric_problems(
    where: str,
    got: dict[str, float],
    want: dict[str, float],
    rtol: float,
    rank_local: set[str] = frozenset(),
) -> list[str]:
    """Logged MoE metrics (tag -> value) against expected ones, relative; the metrics named
    in `rank_local` (by tracker name, any layer) are not compared."""
    problems = []
    if set(got) != set(want):
        problems.append(f"{where}: MoE metrics {sorted(got)} != {sorted(want)}")
    for tag in sorted(set(got) & set(want)):
        if tag.removeprefix("moe/").rsplit("_layer_", 1)[0] in rank_local:
            continue
        if not abs(got[tag] - want[tag]) <= rtol * abs(want[tag]) + 1e-12:
            problems.append(f"{where} MoE metric {tag}: {got[tag]!r} vs {want[tag]!r}")
    return problems


def _bias_problems(
    where: str, got: dict[int, torch.Tensor], want: dict[int, torch.Tensor], rtol: float
) -> list[str]:
    """Expert biases by layer number against expected ones, absolute."""
    problems = []
    if set(got) != set(want):
        problems.append(f"{where}: expert biases of layers {sorted(got)} != {sorted(want)}")
    for layer in sorted(set(got) & set(want)):
        if not torch.allclose(got[layer], want[layer], rtol=0, atol=rtol):
            problems.append(
                f"{where} layer {layer} expert bias: {got[layer].tolist()} vs "
                f"{want[layer].tolist()}"
            )
    return problems


def check_run(
    case: RunCase,
    rank_results: list[dict[str, Any]],
    reference: Reference,
    rtol: float = DEFAULT_RTOL,
) -> list[str]:
    """Every way the per-rank results of `case` differ from the reference; empty if none.

    Checked per step: each last-stage rank's loss reports against the reference's for the same
    micro-batches; every rank's gradients (not with the distributed optimizer, whose gradient
    buffer after reduce-scatter is valid only on the rank's own shard); and, with an optimizer,
    every rank's weight update (weights after the step minus before), which the distributed
    optimizer all-gathers.
    """
    world_size = len(rank_results)
    dp = data_parallel_size(case, world_size)
    problems: list[str] = []
    for step in range(case.steps):
        reporters = set()
        for rank, result in enumerate(rank_results):
            losses = result["losses"][step]
            if losses is None:
                continue
            d = result["rank_info"]["dp"]
            reporters.add(d)
            want = reference.losses[step][
                d * case.num_microbatches : (d + 1) * case.num_microbatches
            ]
            problems += _compare_losses(step, rank, losses, want, rtol)
        if reporters != set(range(dp)):
            problems.append(
                f"step {step}: losses reported for DP ranks {sorted(reporters)} of {dp}"
            )
        problems += _compare_moe_metrics(
            step, rank_results, reference, rtol, tokens_split=world_size > case.pipeline_parallel
        )
        for rank, result in enumerate(rank_results):
            where = f"step {step} rank {rank} {result['rank_info']}"
            if not case.distributed_optimizer and not case.forward_only:
                problems += _compare(
                    f"{where} grad", result["grads"][step], reference.grads[step], rtol
                )
            if case.optimizer:
                problems += _compare(
                    f"{where} update",
                    result["weights"][step],
                    reference.weights[step],
                    rtol,
                    baseline=reference.weights[step - 1] if step else reference.initial,
                    local_baseline=result["weights"][step - 1] if step else None,
                )
    return problems


def check_same_layout(
    case: RunCase,
    rank_results: list[dict[str, Any]],
    stock_results: list[dict[str, Any]],
    initial: dict[str, torch.Tensor],
    rtol: float = DEFAULT_RTOL,
) -> list[str]:
    """Every way a token run differs from stock's schedule on the same ranks; empty if none.

    For what the single-process run is not a reference of: megatron-core's global aux loss
    all-reduces its token counts over TP x DP x CP and averages them over the step's
    micro-batches so far, so at DP > 1 its value (and gradient) depends on how the global
    batch is split across ranks. Compared rank by rank with the same layout under stock's
    schedule, both started from `initial`: loss reports (every DP rank's), gradients, weight
    updates, every logged MoE metric (rank-local ones too: both runs hold the same tokens per
    rank) and the expert biases. A check with nothing to compare is a problem, not a pass.
    """
    if case.token_pipeline is None:
        raise ValueError("check_same_layout compares a token-pipeline run with its stock twin")
    if len(rank_results) != len(stock_results):
        return [f"{len(rank_results)} ranks against the stock run's {len(stock_results)}"]
    problems = [
        f"rank {rank}: layout {got['rank_info']} against stock's {want['rank_info']}"
        for rank, (got, want) in enumerate(zip(rank_results, stock_results))
        if got["rank_info"] != want["rank_info"]
    ]
    moe = "num_moe_experts" in case.model.config_overrides and not case.forward_only
    dp = data_parallel_size(case, len(rank_results))
    for step in range(case.steps):
        reporters = set()
        for rank, (got, want) in enumerate(zip(rank_results, stock_results)):
            where = f"step {step} rank {rank} {got['rank_info']}"
            if (got["losses"][step] is None) != (want["losses"][step] is None):
                problems.append(f"{where}: loss reports on one run only")
            elif want["losses"][step] is not None:
                reporters.add(want["rank_info"]["dp"])
                problems += _compare_losses(
                    step, rank, got["losses"][step], want["losses"][step], rtol
                )
            if not case.distributed_optimizer and not case.forward_only:
                got_keys = {place.key for place, _ in got["grads"][step]}
                want_keys = {place.key for place, _ in want["grads"][step]}
                if got_keys != want_keys:
                    problems.append(f"{where}: gradients of {sorted(got_keys ^ want_keys)} "
                                    "on one run only")
                problems += _compare(
                    f"{where} grad", got["grads"][step], global_tensors(want["grads"][step]), rtol
                )
            if case.optimizer:
                problems += _compare(
                    f"{where} update",
                    got["weights"][step],
                    global_tensors(want["weights"][step]),
                    rtol,
                    baseline=global_tensors(want["weights"][step - 1]) if step else initial,
                    local_baseline=got["weights"][step - 1] if step else None,
                )
            if moe:
                if not want["moe_metrics"][step]:
                    problems.append(f"{where}: stock logged no MoE metric to compare with")
                problems += _metric_problems(
                    where, got["moe_metrics"][step], want["moe_metrics"][step], rtol
                )
                problems += _bias_problems(
                    where, got["expert_bias"][step], want["expert_bias"][step], rtol
                )
        if reporters != set(range(dp)):
            problems.append(f"step {step}: losses reported for DP ranks {sorted(reporters)} "
                            f"of {dp}")
    return problems


def stock_twin(case: RunCase) -> RunCase:
    """The same layout, data and steps under megatron-core's own schedule.

    Device checking is the token run's own test (tensors handed to torch.distributed); the
    twin is only a reference, so it runs without that instrumentation.
    """
    return replace(case, token_pipeline=None, check_devices=False)


def max_abs_differences_same_layout(
    rank_results: list[dict[str, Any]], stock_results: list[dict[str, Any]]
) -> dict[str, float]:
    """`max_abs_differences` for a run checked against its stock twin, rank by rank (tables)."""
    out = {"loss": 0.0, "grad": 0.0, "moe_metric": 0.0}
    for got, want in zip(rank_results, stock_results, strict=True):
        for got_step, want_step in zip(got["losses"], want["losses"], strict=True):
            for got_mb, want_mb in zip(got_step or [], want_step or [], strict=True):
                for key, value in want_mb.items():
                    diff = (got_mb[key].float() - value.float()).abs().max().item()
                    out["loss"] = max(out["loss"], diff)
        for got_step, want_step in zip(got["grads"], want["grads"], strict=True):
            expected = global_tensors(want_step)
            for place, value in got_step:
                diff = (value - expected[place.key][place.index]).abs().max().item()
                out["grad"] = max(out["grad"], diff)
        for got_step, want_step in zip(
            got.get("moe_metrics", []), want.get("moe_metrics", []), strict=True
        ):
            for tag, value in want_step.items():
                out["moe_metric"] = max(out["moe_metric"], abs(got_step[tag] - value))
    return out


def run_parallel(
    runs: list[tuple[RunCase, dict | None]],
    world_size: int,
    timeout_s: float = 240.0,
    body: Callable = run_cases,
) -> list[list[dict[str, Any]]]:
    """Run several (case, initial global weights) on `world_size` ranks in one spawn.

    Returns, per case, the list of per-rank results. `body` is `run_cases` or a stand-in with
    its signature (a mutation test's, which changes one thing before running the cases).
    """
    from megatron_terapipe.compat import run_distributed

    per_rank = run_distributed(body, world_size, runs, timeout_s=timeout_s)
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(runs))]


def run_and_check(
    cases: dict[str, RunCase],
    world_size: int,
    references: ReferenceCache | None = None,
    rtol: float = DEFAULT_RTOL,
    timeout_s: float = 240.0,
    same_layout: Collection[str] = (),
) -> dict[str, list[str]]:
    """Run named cases on `world_size` ranks (one spawn) and check each against its reference.

    The cases named in `same_layout` are checked against their `stock_twin`, run in the same
    spawn from the same initial weights (`check_same_layout`), instead of the single-process run.
    """
    _check_names(same_layout, [cases])
    references = references or ReferenceCache(timeout_s=timeout_s)
    references.prefetch([(case, world_size) for case in cases.values()])
    refs = {name: references.get(case, world_size) for name, case in cases.items()}
    runs = [(case, refs[name].initial) for name, case in cases.items()]
    twins = [name for name in cases if name in same_layout]
    runs += [(stock_twin(cases[name]), refs[name].initial) for name in twins]
    results = run_parallel(runs, world_size, timeout_s)
    twin_results = dict(zip(twins, results[len(cases):]))
    return {
        name: (
            check_same_layout(case, result, twin_results[name], refs[name].initial, rtol)
            if name in twin_results
            else check_run(case, result, refs[name], rtol)
        )
        for (name, case), result in zip(cases.items(), results)
    }


def _check_names(same_layout: Collection[str], groups: list[dict[str, RunCase]]) -> None:
    unknown = set(same_layout).difference(*groups)
    if unknown:
        raise ValueError(f"same_layout names no case: {sorted(unknown)}")


def problems_by_world_size(
    groups: dict[int, dict[str, RunCase]],
    references: ReferenceCache | None = None,
    rtol: float = DEFAULT_RTOL,
    same_layout: Collection[str] = (),
    timeout_s: float = 240.0,
) -> dict[str, list[str]]:
    """Every case of every world size (one spawn per world size, one shared reference cache):
    what an exactness module's `problems` fixture hands its per-case tests. The cases named in
    `same_layout` are checked against stock's schedule on their own layout (`run_and_check`)."""
    _check_names(same_layout, list(groups.values()))
    if references is None:
        references = ReferenceCache(timeout_s=timeout_s)
    found: dict[str, list[str]] = {}
    for world_size, cases in groups.items():
        names = [name for name in same_layout if name in cases]
        found.update(
            run_and_check(cases, world_size, references, rtol, timeout_s, same_layout=names)
        )
    return found


def max_abs_differences(
    case: RunCase, rank_results: list[dict[str, Any]], reference: Reference
) -> dict[str, float]:
    """The largest absolute difference of losses, gradients and logged MoE metrics, for tables.

    `check_run` decides; this only reports how far from the reference a passing run is.
    """
    out = {"loss": 0.0, "grad": 0.0, "moe_metric": 0.0}
    for step in range(case.steps):
        for result in rank_results:
            losses = result["losses"][step]
            if losses is not None:
                d = result["rank_info"]["dp"]
                want = reference.losses[step][d * case.num_microbatches:][: len(losses)]
                for got, exp in zip(losses, want):
                    for key in exp:
                        diff = (got[key].float() - exp[key].float()).abs().max().item()
                        out["loss"] = max(out["loss"], diff)
            for place, value in result["grads"][step]:
                target = reference.grads[step][place.key][place.index]
                out["grad"] = max(out["grad"], (value - target).abs().max().item())
            if reference.moe_metrics is not None:
                for tag, value in reference.moe_metrics[step].items():
                    got = result["moe_metrics"][step][tag]
                    out["moe_metric"] = max(out["moe_metric"], abs(got - value))
    return out
