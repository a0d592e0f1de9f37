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


def test_externally_reported_bytes_join_the_peak():
    """What an owner reports (the slice context's held_bytes) counts on top of saved tensors."""
    x = torch.randn(N, requires_grad=True)
    tracker = ActivationMemoryTracker()
    reported = {"bytes": 0}
    tracker.external = lambda: reported["bytes"]
    with tracker.saved_tensors():
        y = x.exp()  # saves y: N floats
        reported["bytes"] = 5 * N * FLOAT  # a buffer appears
        z = y.exp()  # saves z: the peak is sampled here
    assert tracker.peak_bytes == (2 + 5) * N * FLOAT
    (z.sum()).backward()


def test_token_pipeline_observer_uses_held_bytes_when_the_context_has_it(monkeypatch):
    from megatron_terapipe.benchmark import memory
    from megatron_terapipe.model import slice_context

    class Context:
        def held_bytes(self) -> int:
            return 7 * N * FLOAT

    monkeypatch.setattr(slice_context.TokenSliceContext, "held_bytes",
                        lambda self: 0, raising=False)
    monkeypatch.setattr(slice_context, "get_slice_context", lambda: Context())
    x = torch.randn(N, requires_grad=True)
    tracker = ActivationMemoryTracker()
    with memory.observe_token_pipeline(tracker), tracker.saved_tensors():
        y = x.exp()
    assert tracker.peak_bytes == (1 + 7) * N * FLOAT
    assert tracker.external is None  # restored
    y.sum().backward()
