"""The activation-memory tracker counts exactly the storages autograd keeps for backward."""

import torch

from megatron_terapipe.benchmark.memory import ActivationMemoryTracker

N = 1000
FLOAT = 4


def test_saved_tensors_of_a_known_graph():
    x = torch.randn(N, requires_grad=True)
    w = torch.randn(N, requires_grad=True)
    tracker = ActivationMemoryTracker()
    with tracker.saved_tensors():
        y = x * w  # saves x and w
        z = y.exp()  # saves its output z
        loss = z.sum()  # saves nothing but sizes
    assert tracker.live_bytes == 3 * N * FLOAT
    loss.backward()
    assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 3 * N * FLOAT


def test_parameters_are_not_activations():
    x = torch.randn(N, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(N))
    tracker = ActivationMemoryTracker(exclude=[w])
    with tracker.saved_tensors():
        loss = (x * w).sum()
    assert tracker.peak_bytes == N * FLOAT  # x only
    loss.backward()
    assert tracker.live_bytes == 0


def test_views_of_one_storage_count_once_and_whole():
    base = torch.randn(2 * N, requires_grad=True)
    tracker = ActivationMemoryTracker()
    with tracker.saved_tensors():
        a = base * 1.0  # saves nothing (multiplication by a Python scalar)
        loss = (a[:N] * a[N:]).sum()  # saves two views of a's storage
    assert tracker.peak_bytes == 2 * N * FLOAT
    loss.backward()
    assert tracker.live_bytes == 0


def test_dropping_the_graph_without_backward_releases():
    x = torch.randn(N, requires_grad=True)
    tracker = ActivationMemoryTracker()
    with tracker.saved_tensors():
        z = x.exp()
    assert tracker.live_bytes == N * FLOAT
    del z
    assert tracker.live_bytes == 0


def test_held_tensors_share_the_count_with_saved_ones():
    x = torch.randn(N, requires_grad=True)
    tracker = ActivationMemoryTracker()
    owner = object()
    with tracker.saved_tensors():
        z = x.exp()  # saves z
    tracker.hold(owner, [z.detach(), torch.zeros(N)])  # z's storage again (no new bytes) + N
    assert tracker.live_bytes == 2 * N * FLOAT
    z.sum().backward()
    assert tracker.live_bytes == 2 * N * FLOAT  # the held ones are still held
    tracker.drop(owner)
    assert tracker.live_bytes == 0
    assert tracker.peak_bytes == 2 * N * FLOAT


def test_token_pipeline_observer_counts_buffers_and_accumulators_until_release():
    """K/V buffers from slice 0 until the micro-batch's last slice is released, accumulators
    from the first backward that writes them; the context's own held_bytes is the reference."""
    from megatron_terapipe.benchmark import memory
    from megatron_terapipe.model.slice_context import TokenSliceContext

    context = TokenSliceContext([4, 4], requires_grad=True)
    layer = object()
    kv = torch.randn(1, 2, 4, 8)
    tracker = ActivationMemoryTracker()
    with memory.observe_token_pipeline(tracker):
        with context.running(0, 0, 0) as unit:
            buffer = context.prefix_kv(layer, unit, kv, kv)
        assert tracker.live_bytes == context.held_bytes() == 2 * 1 * 2 * 8 * 8 * FLOAT
        with context.running(0, 0, 1) as unit:
            assert context.prefix_kv(layer, unit, kv, kv) is buffer
        buffer.accumulate_grad(4, kv, kv)  # slice 1's backward sends dK/dV to slice 0's rows
        assert tracker.live_bytes == context.held_bytes() == 4 * 1 * 2 * 8 * 8 * FLOAT
        context.release(0, 0, 1)
        assert tracker.live_bytes == context.held_bytes() > 0  # slice 0 still needs them
        context.release(0, 0, 0)
        assert tracker.live_bytes == context.held_bytes() == 0
    assert tracker.peak_bytes == 4 * 1 * 2 * 8 * 8 * FLOAT


def test_token_pipeline_observer_counts_weight_gradients_queued_for_w():
    """A split B's queued GEMM operands (input, output gradient) count until W runs them; the
    main_grad they accumulate into is a parameter's buffer, not an activation. The queued call
    is the kernel megatron-core gets on the CPU, and what W adds to main_grad is checked against
    autograd's own weight gradient of the same linear layer."""
    from megatron_terapipe.benchmark import memory
    from megatron_terapipe.compat.cpu import _CpuWeightGradAccumulation
    from megatron_terapipe.model.weight_grad_deferral import DeferredWeightGrads

    x, g = torch.randn(N, 4), torch.randn(N, 2)
    before = torch.randn(2, 4)
    main_grad = before.clone()
    weight = torch.zeros(2, 4, requires_grad=True)
    torch.nn.functional.linear(x, weight).backward(g)  # the reference: weight.grad
    tracker = ActivationMemoryTracker()
    with memory.observe_token_pipeline(tracker):
        queue = DeferredWeightGrads()
        queue.add(_CpuWeightGradAccumulation.wgrad_gemm_accum_fp32, (x, g, main_grad))
        assert tracker.live_bytes == (N * 4 + N * 2) * FLOAT
        torch.testing.assert_close(main_grad, before, rtol=0, atol=0)  # deferred: not yet run
        queue.run()
        assert tracker.live_bytes == 0
        queue.run()  # the queue is empty now: nothing is added twice
    torch.testing.assert_close(main_grad, before + weight.grad)
    assert tracker.peak_bytes == (N * 4 + N * 2) * FLOAT
