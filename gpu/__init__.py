"""kvfs.gpu: moving KV chunks into (and out of) device memory.

* :func:`load` / :func:`load_layer`: the cached prefix of a token sequence
  (all layers, or some layers across every chunk) as a tensor on a device.
* :class:`Prefetcher` (``ns.prefetch(tokens, device=...)``): the same, in the
  background, layer by layer, while the engine computes; ``wait_layer(i)``.
* :class:`LayerSaver` (``ns.saver(tokens)``): the other direction, layer by
  layer as the engine computes them, written at ``finish()``.
* :class:`PinnedPool`: the bounded pool of page-locked staging buffers.
* :class:`StagingPool`: host buffers of any size, recycled between requests
  (a connector's staged saves, a CPU prefetch's layer buffers).

Paths: CPU tensors share memory with the store's reads (no extra copy);
CUDA with the file backend and kvikio reads straight into device memory;
other backends go through pinned buffers and async copies on a side stream.
See docs/gpu.md.
"""

from .load import DeviceReader, load, load_layer
from .hostpool import StagingPool
from .pinned import PinnedBuffer, PinnedPool, default_pool
from .prefetch import PrefetchCancelled, Prefetcher
from .saver import ChunkBuilder, LayerSaver, SaveFailed

__all__ = [
    "ChunkBuilder",
    "DeviceReader",
    "LayerSaver",
    "PinnedBuffer",
    "PinnedPool",
    "PrefetchCancelled",
    "Prefetcher",
    "SaveFailed",
    "StagingPool",
    "default_pool",
    "load",
    "load_layer",
]
