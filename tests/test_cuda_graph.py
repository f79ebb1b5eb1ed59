"""GraphedCall's bookkeeping, with a stand-in backend that records by running the call on the static buffers.

The real CUDA backend is exercised by the benchmark on a GPU (bench/, docs/performance.md), where every graphed
scheme is checked against the eager result.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

from lib_delta.cuda_graph import CudaGraphs, GraphedCall, storage_fingerprint


class FakeGraphs:
    """"Records" by running once; a replay runs again on the same static inputs and writes the same outputs."""

    def __init__(self, fail: bool = False):
        self.fail = fail

    def usable(self, tensors):
        return bool(tensors)

    def capture(self, run, device):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        outputs = run()

        def replay():
            fresh = run()
            for old, new in zip(pytree.tree_leaves(outputs), pytree.tree_leaves(fresh), strict=True):
                old.copy_(new)

        return replay, outputs


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).eval()


def test_replays_give_the_plain_results_for_fresh_inputs():
    m = _model()
    g = GraphedCall(lambda x, scale: m(x) * scale, backend=FakeGraphs())
    with torch.no_grad():
        for seed in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(seed))
            assert torch.equal(g(x, 2.0), m(x) * 2.0)
    assert (g.captures, g.replays) == (1, 3)


def test_shapes_non_tensor_arguments_and_fingerprint_each_record_a_new_graph():
    m = _model()
    version = [0]
    g = GraphedCall(lambda x, scale: m(x) * scale, fingerprint=lambda: version[0], backend=FakeGraphs())
    with torch.no_grad():
        g(torch.randn(4, 8), 1.0)
        g(torch.randn(2, 8), 1.0)  # another batch
        g(torch.randn(2, 8), 3.0)  # another non-tensor argument
        g(torch.randn(2, 8).double().float(), 3.0)  # same again: replayed
        version[0] += 1  # e.g. another LoRA patch
        x = torch.randn(2, 8)
        assert torch.equal(g(x, 3.0), m(x) * 3.0)
    assert g.captures == 4 and g.replays == 5


def test_nested_arguments_are_copied_and_outputs_are_not_aliased():
    def fn(x, cond):
        return {"a": x + cond["ctx"][0], "b": [x * 2]}

    g = GraphedCall(fn, backend=FakeGraphs())
    x, ctx = torch.randn(3), [torch.randn(3)]
    first = g(x, {"ctx": ctx})
    x2 = torch.randn(3)
    second = g(x2, {"ctx": ctx})
    assert torch.equal(first["a"], x + ctx[0]) and torch.equal(second["a"], x2 + ctx[0])
    assert torch.equal(second["b"][0], x2 * 2)


def test_a_failed_capture_falls_back_to_the_plain_call_once_and_for_all():
    calls = []

    def fn(x):
        calls.append(1)
        return x + 1

    g = GraphedCall(fn, backend=FakeGraphs(fail=True))
    x = torch.randn(3)
    assert torch.equal(g(x), x + 1) and torch.equal(g(x), x + 1)
    assert g.captures == 0 and len(g.failures) == 1 and len(calls) == 2


def test_least_recently_used_graphs_are_dropped():
    g = GraphedCall(lambda x: x * 2, max_graphs=2, backend=FakeGraphs())
    for n in (1, 2, 3, 1):
        g(torch.randn(n))
    assert g.captures == 4  # shape 1 was dropped when shape 3 came


def test_disabled_or_on_the_cpu_the_real_backend_calls_plainly():
    x = torch.randn(3)
    g = GraphedCall(lambda t: t * 2)  # CudaGraphs: CPU tensors are not usable
    assert torch.equal(g(x), x * 2) and g.captures == 0
    off = GraphedCall(lambda t: t * 2, backend=FakeGraphs(), enabled=False)
    assert torch.equal(off(x), x * 2) and off.captures == 0
    assert not CudaGraphs().usable([x])


def test_storage_fingerprint_follows_moved_or_replaced_weights_but_not_in_place_updates():
    m = _model()
    extra = [torch.randn(2)]
    fp = storage_fingerprint([m], lambda: extra)
    before = fp()
    with torch.no_grad():
        m[0].weight.add_(1.0)
    assert fp() == before  # in place: a replay reads the new values
    m[0].weight = nn.Parameter(m[0].weight.detach().clone())
    assert fp() != before
    now = fp()
    extra[0] = torch.randn(2)
    assert fp() != now


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_replay_matches_eager():
    m = _model().cuda()
    g = GraphedCall(m)
    with torch.no_grad():
        for _ in range(3):
            x = torch.randn(4, 8, device="cuda")
            torch.testing.assert_close(g(x), m(x))
    assert g.captures == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_recording_anew_for_each_generation_keeps_no_memory():
    """Each generation records its own graphs and drops them at its end: nothing may stay. A new side stream per
    recording kept cuBLAS's per-stream workspace (32 MiB on Hopper) for good, generation after generation."""
    m = _model().cuda()

    def generation() -> None:
        g = GraphedCall(m)
        with torch.no_grad():
            for _ in range(3):
                g(torch.randn(4, 8, device="cuda"))
        g.reset()

    generation()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(4):
        generation()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < 1 << 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_recording_while_another_thread_uses_the_gpu():
    """The WebUI decodes live previews on the GPU from another thread while the source records."""
    import threading

    m = _model().cuda()
    stop = threading.Event()

    def previews() -> None:
        a = torch.randn(256, 256, device="cuda")
        while not stop.is_set():
            (a @ a).sum().item()

    worker = threading.Thread(target=previews)
    worker.start()
    try:
        g = GraphedCall(m)
        with torch.no_grad():
            for _ in range(3):
                x = torch.randn(4, 8, device="cuda")
                torch.testing.assert_close(g(x), m(x))
        assert g.captures == 1
    finally:
        stop.set()
        worker.join()
