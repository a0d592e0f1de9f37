"""Stock generators reproduce megatron-core's own compute order (every supported release).

The reference is not re-derived: megatron-core's `forward_backward_pipelining_without_interleaving`
and `..._with_interleaving` run for real, single-process, with their forward/backward step
functions replaced by recorders and a P2P communicator that moves nothing. Every rank's order is
read off what megatron-core actually calls, and the M values megatron-core refuses must be the ones
the generators refuse.
"""

from __future__ import annotations

import warnings

import pytest

from megatron_terapipe.schedules import build_schedule

torch = pytest.importorskip("torch")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    schedules = pytest.importorskip("megatron.core.pipeline_parallel.schedules")
    pp_utils = pytest.importorskip("megatron.core.pipeline_parallel.utils")
    from megatron.core.enums import ModelType
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.process_groups_config import ProcessGroupCollection


class _Group:
    def __init__(self, rank: int, size: int):
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size


class _SilentP2P:
    """Any P2PCommunicator call: nothing is sent, nothing (None) is received."""

    def __init__(self, pp_group, config, vp_size):
        self.pp_group = pp_group
        self.config = config
        self.virtual_pipeline_model_parallel_size = vp_size
        # read by megatron-core 0.17+ for the warm-up length
        self.total_stages = pp_group.size()
        self.current_stage = pp_group.rank()

    def __getattr__(self, name):
        def call(*args, **kwargs):
            if name == "send_forward_backward_recv_forward_backward":
                return None, None
            return None

        return call


class _Chunk(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model_type = ModelType.encoder_or_decoder


def megatron_order(monkeypatch, P: int, rank: int, M: int, V: int, interleaved: bool):
    """[(kind, microbatch, chunk)] in the order megatron-core runs them on `rank`."""
    log = []

    def forward_step(*args, current_microbatch=None, vp_stage=None, **kwargs):
        chunk = vp_stage or 0
        log.append(("F", current_microbatch, chunk))
        # the "output tensor" names its unit, so the backward that consumes it reveals which
        # micro-batch megatron-core's FIFO bookkeeping picked
        return ("output", current_microbatch, chunk), torch.zeros([], dtype=torch.int)

    def backward_step(input_tensor, output_tensor, output_tensor_grad, *model_type_and_config):
        # (..., model_type, config) before megatron-core 0.17.0, (..., config) since
        _, microbatch, chunk = output_tensor
        log.append(("B", microbatch, chunk))

    zeros = torch.zeros
    with monkeypatch.context() as patch:
        patch.setattr(schedules, "forward_step", forward_step)
        patch.setattr(schedules, "backward_step", backward_step)
        patch.setattr(pp_utils, "get_pg_rank", lambda group=None: group.rank())
        patch.setattr(pp_utils, "get_pg_size", lambda group=None: group.size())
        patch.setattr(torch, "zeros", lambda *a, device=None, **k: zeros(*a, **k))  # no CUDA
        vp = V if interleaved else None
        config = ModelParallelConfig(
            pipeline_model_parallel_size=P,
            virtual_pipeline_model_parallel_size=vp,
            pipeline_dtype=torch.float32,
        )
        config.hidden_size = 8
        config.fine_grained_activation_offloading = False
        group = _Group(rank, P)
        one = _Group(0, 1)
        pg = ProcessGroupCollection()  # megatron-core 0.17+ type-checks it
        for name, value in dict(tp=one, cp=one, embd=None, pos_embd=None, pp=group,
                                dp_cp=one).items():
            setattr(pg, name, value)
        chunks = [_Chunk(config) for _ in range(V)]
        common = dict(
            forward_step_func=None,
            num_microbatches=M,
            seq_length=4,
            micro_batch_size=1,
            p2p_communicator=_SilentP2P(group, config, vp),
            pg_collection=pg,
        )
        if interleaved:
            schedules.forward_backward_pipelining_with_interleaving(
                data_iterator=[None] * V, model=chunks, **common
            )
        else:
            schedules.forward_backward_pipelining_without_interleaving(
                data_iterator=None, model=chunks[0], **common
            )
    return log


def _ours(schedule, rank):
    return [(c.kind, c.microbatch, c.chunk) for c in schedule.computes(rank)]


@pytest.mark.parametrize("P", range(1, 9))
def test_1f1b_matches_megatron_core(monkeypatch, P):
    for M in range(1, 9):
        schedule = build_schedule("1f1b", P, M)
        for rank in range(P):
            assert _ours(schedule, rank) == megatron_order(monkeypatch, P, rank, M, 1, False), (
                P,
                M,
                rank,
            )


@pytest.mark.parametrize("V", [1, 2, 3])
@pytest.mark.parametrize("P", range(2, 7))
def test_interleaved_matches_megatron_core(monkeypatch, P, V):
    for M in range(1, 9):
        try:
            reference = [megatron_order(monkeypatch, P, r, M, V, True) for r in range(P)]
        except (ValueError, RuntimeError):  # megatron-core refuses this M
            with pytest.raises(ValueError, match="divisible by num_stages"):
                build_schedule("interleaved", P, M, 1, V)
            continue
        schedule = build_schedule("interleaved", P, M, 1, V)
        for rank in range(P):
            assert _ours(schedule, rank) == reference[rank], (P, M, V, rank)
