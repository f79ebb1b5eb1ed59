"""Optional CUDA-graph replay of a repeated call, for the source's forward at launch-bound sizes.

A UNet forward at 512 px launches over a thousand small kernels, and on a fast GPU the host takes longer to launch
them than the GPU takes to run them. A CUDA graph records the kernels of one call once and replays them with a
single launch. The recorded kernels read and write fixed addresses, so :class:`GraphedCall`:

- copies the call's tensor arguments into its own static buffers before each replay, and clones the outputs
  after it (the next replay overwrites them);
- records a new graph whenever the tensors' shapes, dtypes or devices, the non-tensor arguments, or the caller's
  ``fingerprint()`` change. The fingerprint must name everything else the call reads: where the weights live
  (:func:`storage_fingerprint`), which LoRA patch and row plan are active. A change to weights *in place*
  (``copy_`` into the same storage) needs nothing: the replay reads the new values;
- falls back to the plain call, and remembers to, when capture fails (a host sync or a CPU tensor inside it).

Where a host may use it: a private source model that stays on one GPU for the whole generation. Not under the
WebUI's lowvram/medvram modes (they move modules between CPU and GPU inside the forward, so nothing stays put and
each call would re-record), nor with per-call hooks on the model that are not in the fingerprint. Each recorded
graph holds one call's activation memory until :meth:`GraphedCall.reset`; graphs of one ``GraphedCall`` share
a memory pool, which is safe because they replay one at a time on one stream and their outputs are cloned.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree


class GraphBackend(Protocol):
    """Records ``run()`` (which reads only the static inputs) and returns ``(replay, outputs)``."""

    def usable(self, tensors: list[Tensor]) -> bool: ...

    def capture(self, run: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], Any]: ...


class CudaGraphs:
    """The real backend: ``torch.cuda.CUDAGraph``, warmed up on a side stream as PyTorch requires."""

    def __init__(self, warmup: int = 2) -> None:
        self.warmup = warmup
        self.pool: Any = None

    def usable(self, tensors: list[Tensor]) -> bool:
        return bool(tensors) and torch.cuda.is_available() and all(t.is_cuda for t in tensors) \
            and len({t.device for t in tensors}) == 1

    def capture(self, run: Callable[[], Any], device: torch.device) -> tuple[Callable[[], None], Any]:
        with torch.cuda.device(device):
            side = _capture_stream(torch.cuda.current_device())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(self.warmup):  # lazy inits (cuBLAS handles, autotuning) stay out of the graph
                    run()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            # name the capture stream: torch.cuda.graph's default one lives on whichever GPU first captured.
            # thread_local: the WebUI decodes live previews on the GPU from another thread meanwhile, which the
            # global mode would count as an illegal call during capture.
            with torch.cuda.graph(graph, pool=self.pool, stream=side, capture_error_mode="thread_local"):
                outputs = run()
        return graph.replay, outputs


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream(index: int) -> torch.cuda.Stream:
    """One side stream per GPU for every recording. cuBLAS keeps a workspace for each stream that has run a matrix
    product (32 MiB on Hopper) until the process ends: a new stream per recording kept 32 MiB of VRAM for good
    after every generation."""
    if index not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[index] = torch.cuda.Stream(index)
    return _CAPTURE_STREAMS[index]


@dataclass
class _Graph:
    replay: Callable[[], None]
    inputs: list[Tensor]
    outputs: Any


class GraphedCall:
    """``fn(*args, **kwargs)`` replayed from a recorded graph where possible; see the module doc.

    Tensors may sit anywhere in ``args``/``kwargs`` (lists, tuples, dicts); other leaves must be hashable or are
    keyed by identity. ``max_graphs`` bounds how many shapes are kept (least recently used dropped).
    """

    def __init__(self, fn: Callable[..., Any], fingerprint: Callable[[], Hashable] | None = None,
                 max_graphs: int = 4, backend: GraphBackend | None = None, enabled: bool = True) -> None:
        self.fn = fn
        self.fingerprint = fingerprint or (lambda: None)
        self.max_graphs = max_graphs
        self.backend = backend or CudaGraphs()
        self.enabled = enabled
        self._graphs: OrderedDict[Hashable, _Graph] = OrderedDict()
        self._eager: set[Hashable] = set()
        self.captures = 0
        self.replays = 0
        self.failures: list[str] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, Tensor)]
        if not self.enabled or not self.backend.usable(tensors):
            return self.fn(*args, **kwargs)
        key = (spec, tuple(_leaf_key(leaf) for leaf in leaves), self.fingerprint())
        if key in self._eager:
            return self.fn(*args, **kwargs)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._record(key, leaves, spec, tensors[0].device)
            if graph is None:
                return self.fn(*args, **kwargs)
        else:
            self._graphs.move_to_end(key)
        for static, t in zip(graph.inputs, tensors, strict=True):
            static.copy_(t)
        graph.replay()
        self.replays += 1
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, graph.outputs)

    def reset(self) -> None:
        """Drop every recorded graph (and, with the last reference, their memory)."""
        self._graphs.clear()
        self._eager.clear()

    def _record(self, key: Hashable, leaves: list, spec: Any, device: torch.device) -> _Graph | None:
        statics = [leaf.detach().clone() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(statics, spec)

        def run() -> Any:
            return self.fn(*args, **kwargs)

        try:
            replay, outputs = self.backend.capture(run, device)
        except Exception as e:  # a sync or host tensor inside the call: it cannot be a graph, run it plainly
            self.failures.append(f"{type(e).__name__}: {e}")
            self._eager.add(key)
            return None
        self.captures += 1
        graph = _Graph(replay, [s for s in statics if isinstance(s, Tensor)], outputs)
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph


def _leaf_key(leaf: Any) -> Hashable:
    if isinstance(leaf, Tensor):
        return ("tensor", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride())
    try:
        hash(leaf)
    except TypeError:
        return ("id", id(leaf))
    return leaf


def storage_fingerprint(modules: Iterable[nn.Module], tensors: Callable[[], Iterable[Tensor]] | None = None
                        ) -> Callable[[], tuple]:
    """Where the modules' parameters and buffers (and ``tensors()``) live now, as a fingerprint function.

    Moving a model (``.to()``, offloading) or replacing a parameter changes it, so a graph recorded over the old
    storage is never replayed; in-place updates keep it, and the replay reads the new values. It runs before every
    replay, so the slots (each module's parameter and buffer dicts, and their names) are listed once here; a
    parameter or buffer registered later is not watched.
    """
    slots = [(d, name) for root in modules for m in root.modules() for d in (m._parameters, m._buffers)
             for name, t in d.items() if t is not None]

    def fingerprint() -> tuple:
        ptrs = [t.data_ptr() if (t := d.get(name)) is not None else None for d, name in slots]
        if tensors is not None:
            ptrs.append(None)
            ptrs.extend(t.data_ptr() for t in tensors())
        return tuple(ptrs)

    return fingerprint


__all__ = ["CudaGraphs", "GraphBackend", "GraphedCall", "storage_fingerprint"]
