"""Rank body for the data-parallel gradient-sync test: when does each chunk's reduction start?

Runs the token pipeline on DP x PP ranks with megatron-core DDP set up as Megatron-LM sets it up
for `--overlap-grad-reduce` (no_sync_func per chunk; with `--align-grad-reduce` also
grad_sync_func = start_grad_sync per chunk) and records, in order: each backward action (begin,
end, chunk), each split backward's weight-gradient action (end, chunk), each no_sync exit, and
each bucket-group dispatch of a gradient reduction.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch


def grad_sync_events(
    rank: int, world_size: int, modes: list[tuple[bool, bool, bool]], steps: int = 2
) -> list[dict[str, Any]]:
    """For each (overlap_grad_reduce, align_grad_reduce, split_backward): per step the grads and
    the events. Split runs use gradient-accumulation fusion (what the split defers)."""
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.distributed.param_and_grad_buffer import _ParamAndGradBucketGroup
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_terapipe import (
        TokenPipelineConfig,
        get_forward_backward_func,
        token_pipeline_layer_spec,
    )
    from megatron_terapipe.model.slice_context import get_slice_context
    from megatron_terapipe.schedules import step_loop
    from megatron_terapipe.testing.gpt import (
        TinyGPT,
        build_gpt_chunks,
        gpt_forward_step,
        make_microbatches,
        transformer_config,
    )
    from megatron_terapipe.testing.reference import local_grads

    model_shape = TinyGPT()
    pp, vp, microbatches = 2, 2, 2
    events: list[tuple] = []
    chunk_of_group: dict[int, int] = {}

    original_dispatch = _ParamAndGradBucketGroup.start_grad_sync
    original_backward = step_loop.backward_step
    original_weight_grad = step_loop.StepRunner.weight_grad

    def dispatch(self, *args, **kwargs):
        if self.grad_reduce_handle is None and id(self) in chunk_of_group:
            events.append(("dispatch", chunk_of_group[id(self)]))
        return original_dispatch(self, *args, **kwargs)

    def backward(*args, **kwargs):
        chunk = get_slice_context().current.chunk
        events.append(("backward-begin", chunk))
        try:
            return original_backward(*args, **kwargs)
        finally:
            events.append(("backward-end", chunk))

    def weight_grad(self, action):
        queue = self.weight_grads[action.unit]
        run = queue.run

        def recorded_run():
            run()
            events.append(("weight-grad-end", action.chunk))  # the GEMMs are in main_grad

        queue.run = recorded_run
        return original_weight_grad(self, action)

    def recording_no_sync(chunk, no_sync):
        @contextlib.contextmanager
        def wrapped():
            with no_sync():
                yield
            events.append(("no_sync-exit", chunk))

        return wrapped

    _ParamAndGradBucketGroup.start_grad_sync = dispatch
    step_loop.backward_step = backward
    step_loop.StepRunner.weight_grad = weight_grad
    results = []
    try:
        for overlap, align, split in modes:
            parallel_state.initialize_model_parallel(
                pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vp
            )
            try:
                tensor_parallel.model_parallel_cuda_manual_seed(1234)
                torch.manual_seed(1234)
                config = transformer_config(
                    model_shape,
                    pipeline_parallel=pp,
                    virtual_pipeline=vp,
                    gradient_accumulation_fusion=split,
                )
                spec = token_pipeline_layer_spec(get_gpt_layer_local_spec())
                chunks = build_gpt_chunks(model_shape, config, spec)
                ddp_config = DistributedDataParallelConfig(
                    grad_reduce_in_fp32=True, overlap_grad_reduce=overlap
                )
                model = [
                    DistributedDataParallel(config, ddp_config, c, disable_bucketing=(i > 0))
                    for i, c in enumerate(chunks)
                ]
                chunk_of_group.clear()
                for i, m in enumerate(model):
                    for group in m.bucket_groups:
                        chunk_of_group[id(group)] = i
                config.no_sync_func = [recording_no_sync(i, m.no_sync) for i, m in enumerate(model)]
                if align:
                    config.grad_sync_func = [m.start_grad_sync for m in model]
                config.finalize_model_grads_func = finalize_model_grads
                forward_backward = get_forward_backward_func(
                    TokenPipelineConfig(
                        schedule="token-interleaved", num_token_slices=2, split_backward=split
                    )
                )
                dp_rank = parallel_state.get_data_parallel_rank()
                steps_out = []
                for step in range(steps):
                    for m in model:
                        m.zero_grad_buffer()
                    batches = make_microbatches(model_shape, 1, 2 * microbatches, seed=step)
                    mine = batches[dp_rank * microbatches : (dp_rank + 1) * microbatches]
                    events.clear()
                    forward_backward(
                        forward_step_func=gpt_forward_step,
                        data_iterator=[iter(list(mine)) for _ in model],
                        model=model,
                        num_microbatches=microbatches,
                        seq_length=model_shape.seq_length,
                        micro_batch_size=1,
                    )
                    steps_out.append({"grads": local_grads(model), "events": list(events)})
                results.append(
                    {"overlap": overlap, "align": align, "split": split, "steps": steps_out}
                )
            finally:
                parallel_state.destroy_model_parallel()
    finally:
        _ParamAndGradBucketGroup.start_grad_sync = original_dispatch
        step_loop.backward_step = original_backward
        step_loop.StepRunner.weight_grad = original_weight_grad
    return results
