"""One training run of a TinyGPT on the current ranks, under a stock or a token schedule.

Every correctness test is "run the same steps twice and compare": once as a single-process
reference (TP=PP=DP=1, stock schedule), once under the layout and schedule being tested. Both
go through this module, so they share model construction, data, DDP and optimizer set-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_terapipe.testing.device_check import distributed_tensors_on
from megatron_terapipe.testing.gpt import (
    TinyGPT,
    build_gpt_chunks,
    gpt_forward_step,
    gpt_forward_step_mean_loss,
    make_microbatches,
    transformer_config,
)
from megatron_terapipe.testing.reference import (
    global_state,
    load_global_state,
    local_grads,
    local_weights,
)


@dataclass(frozen=True)
class RunCase:
    """A parallel layout, a schedule and the steps to run."""

    model: TinyGPT = TinyGPT()
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    # MoE experts split across this many ranks (carved out of data parallelism, as megatron's)
    expert_parallel: int = 1
    virtual_pipeline: int | None = None
    sequence_parallel: bool = False
    num_microbatches: int = 2  # per data-parallel rank
    micro_batch_size: int = 1
    steps: int = 1
    optimizer: bool = False
    # "adam" or "sgd". Adam's update m/sqrt(v) amplifies last-bit differences of tiny gradients,
    # so weight comparisons across layouts after a step are only exact with "sgd".
    optimizer_name: str = "adam"
    distributed_optimizer: bool = False
    lr: float = 1e-2
    # Adam's epsilon. A large one (e.g. 1e-3) makes Adam's update smooth in the gradient, so
    # runs that sum gradients in a different order still agree to fp32 rounding; megatron's
    # DistributedOptimizer supports only Adam.
    adam_eps: float = 1e-8
    # None: megatron-core's own get_forward_backward_func(); else kwargs of TokenPipelineConfig.
    token_pipeline: dict | None = None
    two_value_loss: bool = False
    calculate_per_token_loss: bool = False
    forward_only: bool = False
    data_seed: int = 0
    init_seed: int = 1234
    # Check every tensor handed to torch.distributed during forward-backward against the
    # model's device, with tensors created without a device landing on 'meta' (testing/
    # device_check.py): what would be a host tensor on a GPU fails here too.
    check_devices: bool = False
    # Hand the model a padding mask (True where the loss mask is 0): megatron-core's MoE
    # router leaves those tokens out of its counts, aux losses and z-loss.
    padding_mask: bool = False
    extra: dict = field(default_factory=dict)


def _forward_backward_func(case: RunCase):
    if case.token_pipeline is None:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()
    from megatron_terapipe import TokenPipelineConfig, get_forward_backward_func

    return get_forward_backward_func(TokenPipelineConfig(**case.token_pipeline))


def _layer_spec(case: RunCase):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    # An MoE model (num_moe_experts in the config) gets megatron-core's MoE layer spec, whose
    # experts are SequentialMLP (no grouped GEMM on the CPU).
    num_experts = case.model.config_overrides.get("num_moe_experts")
    spec = get_gpt_layer_local_spec(num_experts=num_experts, moe_grouped_gemm=False)
    if case.token_pipeline is None:
        return spec
    from megatron_terapipe import token_pipeline_layer_spec

    return token_pipeline_layer_spec(spec)


def run_case(rank: int, world_size: int, case: RunCase, init_state: dict | None) -> dict[str, Any]:
    """Body of one rank. Returns losses (last stage), grads and weights with their global places.

    `init_state=None` means "initialise from `case.init_seed` and return the global weights"
    (only meaningful on a single rank: the reference).
    """
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=case.tensor_parallel,
        pipeline_model_parallel_size=case.pipeline_parallel,
        virtual_pipeline_model_parallel_size=case.virtual_pipeline,
        expert_model_parallel_size=case.expert_parallel,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(case.init_seed)
    torch.manual_seed(case.init_seed)
    config = transformer_config(
        case.model,
        tensor_parallel=case.tensor_parallel,
        pipeline_parallel=case.pipeline_parallel,
        virtual_pipeline=case.virtual_pipeline,
        sequence_parallel=case.sequence_parallel,
        calculate_per_token_loss=case.calculate_per_token_loss,
        expert_model_parallel_size=case.expert_parallel,
    )
    chunks = build_gpt_chunks(case.model, config, _layer_spec(case))
    initial = None
    if init_state is None:
        initial = global_state(chunks)
    else:
        load_global_state(chunks, init_state)

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=case.distributed_optimizer,
    )
    model = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=(index > 0))
        for index, chunk in enumerate(chunks)
    ]
    config.no_sync_func = [m.no_sync for m in model]
    if len(model) == 1:
        config.no_sync_func = config.no_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads

    optimizer = None
    if case.optimizer:
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=case.optimizer_name,
                lr=case.lr,
                adam_eps=case.adam_eps,
                weight_decay=0.01,
                clip_grad=1.0,
                use_distributed_optimizer=case.distributed_optimizer,
                params_dtype=config.params_dtype,
            ),
            model,
        )

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    forward_backward = _forward_backward_func(case)
    forward_step = gpt_forward_step_mean_loss if case.two_value_loss else gpt_forward_step
    result: dict[str, Any] = {"losses": [], "grads": [], "weights": [], "initial": initial}
    for step in range(case.steps):
        for m in model:
            m.zero_grad_buffer()
        if optimizer is not None:
            optimizer.zero_grad()
        all_batches = make_microbatches(
            case.model,
            case.micro_batch_size,
            case.num_microbatches * dp_size,
            seed=case.data_seed + 1000 * step,
        )
        batches = all_batches[
            dp_rank * case.num_microbatches : (dp_rank + 1) * case.num_microbatches
        ]
        if case.padding_mask:
            batches = [{**b, "padding_mask": b["loss_mask"] == 0} for b in batches]
        iterators = [iter(list(batches)) for _ in model]
        checking = contextlib.nullcontext()
        if case.check_devices:
            device = next(model[0].parameters()).device
            checking = distributed_tensors_on(device, default_device="meta")
        with checking:
            losses = forward_backward(
                forward_step_func=forward_step,
                data_iterator=iterators if len(model) > 1 else iterators[0],
                model=model if len(model) > 1 else model[0],
                num_microbatches=case.num_microbatches,
                seq_length=case.model.seq_length,
                micro_batch_size=case.micro_batch_size,
                forward_only=case.forward_only,
            )
        timeline = getattr(forward_backward, "last_timeline", None)
        if timeline:
            result.setdefault("timelines", []).append([dataclasses.asdict(r) for r in timeline])
        result["losses"].append(
            [{k: v.detach().float().clone() for k, v in item.items()} for item in losses]
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            else None
        )
        result["grads"].append(local_grads(model))
        if config.num_moe_experts is not None and not case.forward_only:
            from megatron_terapipe.compat.megatron_core import (
                moe_logged_metrics,
                moe_rank_local_metrics,
            )

            result["moe_rank_local"] = sorted(moe_rank_local_metrics())
            # what a Megatron-LM run logs for the step (aux and z-losses; every rank takes part)
            result.setdefault("moe_metrics", []).append(
                moe_logged_metrics(config.num_layers, 1.0 / case.num_microbatches, step)
            )
            # aux-loss-free balancing: each router's bias after the step (updated from the
            # step's token counts in finalize_model_grads), by global layer number
            result.setdefault("expert_bias", []).append(
                {
                    module.layer_number: module.expert_bias.detach().float().clone()
                    for chunk in model
                    for module in chunk.modules()
                    if getattr(module, "expert_bias", None) is not None
                }
            )
        if optimizer is not None:
            optimizer.step()
            result["weights"].append(local_weights(model))
    result["rank_info"] = {
        "tp": parallel_state.get_tensor_model_parallel_rank(),
        "pp": parallel_state.get_pipeline_model_parallel_rank(),
        "dp": dp_rank,
    }
    return result


def run_cases(
    rank: int, world_size: int, runs: list[tuple[RunCase, dict | None]]
) -> list[dict[str, Any]]:
    """Several `run_case`s one after another in the same processes.

    Spawning ranks and importing megatron-core costs seconds per run on a small machine, while a
    TinyGPT step costs milliseconds; tests batch their cases through here. Model-parallel state
    is torn down between cases, so each one starts from the same blank process state.
    """
    from megatron.core import parallel_state

    results = []
    for case, init_state in runs:
        try:
            results.append(run_case(rank, world_size, case, init_state))
        finally:
            parallel_state.destroy_model_parallel()
            if "num_moe_experts" in case.model.config_overrides:
                from megatron_terapipe.compat.megatron_core import reset_moe_metrics

                reset_moe_metrics()
    return results
