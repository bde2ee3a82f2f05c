"""Peak tensor memory of a piece of work, on any device.

CUDA has `max_memory_allocated`; the CPU allocator keeps no such count, and process RSS is
dominated by the interpreter and libraries, which would flatten every ratio towards 1. So on the
CPU we count tensor storages ourselves: a dispatch mode sees every op (forward and backward), and
each output storage is counted until the storage is garbage collected.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of live tensor storage: what existed at entry (`start_tensors`) plus what ops made."""

    def __init__(self, start_tensors=()):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self._refs: list = []
        for t in start_tensors:
            self._track(t)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if not key or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        self._refs.append(weakref.ref(storage, lambda _r, k=key: self._free(k)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._track(t)
        return out
