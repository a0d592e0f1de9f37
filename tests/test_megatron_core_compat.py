"""compat.megatron_core against the installed megatron-core (CI runs it on 0.16.1 and 0.19.x).

The end-to-end consequences (token steps equal stock, resumes with a new --lr) are checked by
the exactness and resume tests on both pairs; these pin each bridge to the release fact it
bridges and to megatron-core's own result.
"""

from __future__ import annotations

import inspect
from importlib.metadata import version

import torch
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel import schedules

from megatron_terapipe.compat import megatron_core


def _release() -> tuple[int, int]:
    major, minor = version("megatron-core").split(".")[:2]
    return int(major), int(minor)


def test_backward_step_bridge_knows_which_signature_is_installed():
    parameters = list(inspect.signature(schedules.backward_step).parameters)
    assert megatron_core.BACKWARD_STEP_TAKES_MODEL_TYPE == ("model_type" in parameters)
    # the release fact the bridge is named for
    assert megatron_core.BACKWARD_STEP_TAKES_MODEL_TYPE == (_release() < (0, 17))


def test_backward_step_returns_megatron_cores_input_gradient():
    """A mid-pipeline stage: y = x * w received a gradient g; backward_step must return
    dx = g * w (and accumulate dw = g * x), as autograd does."""
    config = ModelParallelConfig()
    w = torch.tensor([2.0, -3.0], requires_grad=True)
    x = torch.tensor([0.5, 4.0], requires_grad=True)
    x.retain_grad()
    g = torch.tensor([1.5, 0.25])
    y = x * w
    dx = megatron_core.backward_step(x, y, g, config)
    assert torch.equal(dx, g * w.detach())
    assert torch.equal(w.grad, g * x.detach())


def test_saved_param_groups_follow_the_optimizers_order():
    """A chained optimizer's state lists each inner optimizer's groups in turn; the bridge
    pairs them with `optimizer.param_groups` by that order."""
    state = [
        {"optimizer": {"state": {}, "param_groups": [{"max_lr": 1.0}, {"max_lr": 2.0}]}},
        {"optimizer": {"state": {}, "param_groups": [{"max_lr": 3.0}]}},
    ]
    assert [g["max_lr"] for g in megatron_core._saved_param_groups(state)] == [1.0, 2.0, 3.0]


def test_load_optimizer_state_loads_a_checkpoint_saved_with_another_lr():
    """A torch optimizer with megatron-core's per-group keys, loading state saved at another
    --lr: every release must load it and come back with the checkpoint's values."""
    param = torch.nn.Parameter(torch.ones(2))

    def optimizer(lr):
        return torch.optim.SGD([{"params": [param], "max_lr": lr, "min_lr": lr / 10}], lr=lr)

    saved = optimizer(0.5).state_dict()
    current = optimizer(0.1)
    megatron_core.load_optimizer_state(current, saved)
    assert current.param_groups[0]["max_lr"] == 0.5
    assert current.param_groups[0]["min_lr"] == 0.05


def test_interleaved_deallocation_bridge_knows_whether_the_send_is_awaited():
    """Releases before 0.18 free an output while its overlapped send may still read it; the
    config keeps such outputs allocated there (`model.transformer_config`)."""
    fact = megatron_core.INTERLEAVED_SCHEDULE_WAITS_FOR_SEND_BEFORE_DEALLOCATING
    assert fact == (_release() >= (0, 18))
    source = inspect.getsource(schedules.forward_backward_pipelining_with_interleaving)
    folded = "".join(source.split())
    assert megatron_core.interleaved_schedule_waits_for_send(folded) == fact
    # the installed schedule with its guarded waits taken out reads as an older release
    unguarded = folded.replace("andconfig.deallocate_pipeline_outputs:", ":")
    assert not megatron_core.interleaved_schedule_waits_for_send(unguarded)

