"""What a forward-backward function does with megatron-core settings it is handed, observed
the same way under stock 1F1B and the token pipeline (PP = 2, TinyGPT, gloo).

Each observation is taken through a seam both implementations pass: `torch.autocast` (stock
reaches it through megatron-core's schedules, the token pipeline through compat), the model's
`set_is_first_microbatch`, and the process group every P2P op is posted on.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from megatron_terapipe.testing.gpt import (
    TinyGPT,
    build_gpt_chunks,
    gpt_forward_step,
    make_microbatches,
    transformer_config,
)


class _AutocastRecorder:
    """Stands in for torch.autocast: records the contexts entered and which one is open."""

    def __init__(self) -> None:
        self.open: list[tuple[str, Any]] = []

    def __call__(self, device_type, dtype=None, **kwargs):
        recorder = self

        @contextlib.contextmanager
        def context():
            recorder.open.append((device_type, str(dtype)))
            try:
                yield
            finally:
                recorder.open.pop()

        return context()


def settings_probe(rank: int, world_size: int) -> dict[str, Any]:
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func as stock_getter
    from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_terapipe import TokenPipelineConfig, token_pipeline_layer_spec
    from megatron_terapipe import get_forward_backward_func as token_getter

    parallel_state.initialize_model_parallel(pipeline_model_parallel_size=2)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    shape = TinyGPT(num_layers=2)
    config = transformer_config(shape, pipeline_parallel=2)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    chunks = build_gpt_chunks(shape, config, token_pipeline_layer_spec(get_gpt_layer_local_spec()))
    model = chunks[0]
    first_microbatch_calls: list[int] = []
    model.set_is_first_microbatch = lambda: first_microbatch_calls.append(1)
    functions = {
        "stock": stock_getter(),
        "token": token_getter(TokenPipelineConfig(schedule="token-1f1b", num_token_slices=2)),
    }
    # An equivalent pipeline group of its own: whoever posts P2P on it honoured what was passed.
    own_pp = torch.distributed.new_group(ranks=list(range(world_size)), backend="gloo")
    groups_seen: list[Any] = []
    original_batch = torch.distributed.batch_isend_irecv

    def recording_batch(ops):
        groups_seen.extend(op.group for op in ops)
        return original_batch(ops)

    recorder = _AutocastRecorder()
    seen_autocast: list = []

    def forward_step(data_iterator, chunk):
        seen_autocast.append(recorder.open[-1] if recorder.open else None)
        return gpt_forward_step(data_iterator, chunk)

    def run(name: str, forward_only: bool = False, **kwargs) -> None:
        batches = make_microbatches(shape, 1, 2, seed=0)
        functions[name](
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=2, seq_length=shape.seq_length, micro_batch_size=1,
            forward_only=forward_only, **kwargs,
        )
        model.zero_grad(set_to_none=True)

    result: dict[str, Any] = {"autocast": {}, "first_microbatch": {}, "own_group_used": {}}
    original_autocast = torch.autocast
    torch.autocast = recorder
    try:
        for enabled in (False, True):
            config.enable_autocast = enabled
            config.autocast_dtype = torch.bfloat16
            for name in functions:
                seen_autocast.clear()
                run(name)
                result["autocast"][(name, enabled)] = list(seen_autocast)
    finally:
        torch.autocast = original_autocast
        config.enable_autocast = False

    for name in functions:
        for forward_only in (False, True):
            for first_val_step in (None, True, False):
                first_microbatch_calls.clear()
                run(name, forward_only=forward_only, first_val_step=first_val_step)
                key = (name, forward_only, first_val_step)
                result["first_microbatch"][key] = len(first_microbatch_calls)

    torch.distributed.batch_isend_irecv = recording_batch
    try:
        for how in ("p2p_communicator", "pg_collection"):
            if how == "p2p_communicator":
                passed = {"p2p_communicator": P2PCommunicator(own_pp, config)}
            else:
                collection = ProcessGroupCollection.use_mpu_process_groups()
                collection.pp = own_pp
                passed = {"pg_collection": collection}
            groups_seen.clear()
            run("token", **passed)
            result["own_group_used"][how] = bool(groups_seen) and all(
                group is own_pp for group in groups_seen
            )
    finally:
        torch.distributed.batch_isend_irecv = original_batch
    return result
