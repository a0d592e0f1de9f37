"""Every tensor a step hands to torch.distributed sits on the model's device.

CPU runs cannot see a host tensor handed to NCCL, so the check mode (testing/device_check.py)
puts tensors created without a device on 'meta' and checks each torch.distributed call against
the device of the model's parameters.
"""

from __future__ import annotations

import pytest
import torch

from megatron_terapipe.testing.device_check import DeviceMismatch, distributed_tensors_on
from megatron_terapipe.testing.equivalence import ReferenceCache, run_and_check
from megatron_terapipe.testing.runner import RunCase


def test_check_catches_a_tensor_on_another_device():
    """Direct: the wrapper raises for a tensor off the expected device before calling through."""
    with distributed_tensors_on(torch.device("meta")):
        with pytest.raises(
            DeviceMismatch, match=r"all_reduce got a \(\) torch.int32 tensor on cpu"
        ):
            torch.distributed.all_reduce(torch.zeros([], dtype=torch.int32))
    torch.distributed.init_process_group(
        "gloo", store=torch.distributed.HashStore(), rank=0, world_size=1
    )
    try:
        with distributed_tensors_on(torch.device("cpu"), default_device="meta"):
            assert torch.zeros(2).device.type == "meta"
            assert torch.zeros(2, device="cpu").device.type == "cpu"
            op = torch.distributed.P2POp(torch.distributed.isend, torch.zeros(1), 0)
            with pytest.raises(DeviceMismatch, match="batch_isend_irecv got a .* on meta"):
                torch.distributed.batch_isend_irecv([op])
            torch.distributed.all_reduce(torch.ones(1, device="cpu"))  # on the model's device
    finally:
        torch.distributed.destroy_process_group()
    assert torch.zeros(1).device.type == "cpu"  # restored


CASES = {
    # per-token loss: the token count goes through finalize_model_grads' all-reduce
    "pp2-token-1f1b-per-token-loss": RunCase(
        pipeline_parallel=2,
        num_microbatches=2,
        calculate_per_token_loss=True,
        check_devices=True,
        token_pipeline={"schedule": "token-1f1b", "num_token_slices": 2},
    ),
    "pp2-terapipe": RunCase(
        pipeline_parallel=2,
        num_microbatches=2,
        check_devices=True,
        token_pipeline={"schedule": "terapipe", "num_token_slices": 2},
    ),
    "pp2-vp2-token-interleaved": RunCase(
        pipeline_parallel=2,
        virtual_pipeline=2,
        num_microbatches=2,
        check_devices=True,
        token_pipeline={"schedule": "token-interleaved", "num_token_slices": 2},
    ),
}


def test_token_pipeline_hands_only_model_device_tensors_to_torch_distributed():
    problems = run_and_check(CASES, 2, ReferenceCache())
    for name, found in problems.items():
        assert not found, f"{name}: " + "\n".join(found[:5])
