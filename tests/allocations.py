"""Allocation recorder for tests that measure what an operation allocates (CPU: no CUDA memory
counters): every aten op run under it, with the shapes of the tensors it allocated."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class Allocations(TorchDispatchMode):
    """Records (op name, [shapes of new tensors]) per aten op; an output that shares storage
    with an input (a view, an in-place or out= result) is not an allocation."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[str, list[tuple[int, ...]]]] = []
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        new = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)
               and t.untyped_storage().data_ptr() not in inputs]
        self.ops.append((func.overloadpacket.__name__, [tuple(t.shape) for t in new]))
        self.bytes += sum(t.numel() * t.element_size() for t in new)
        return out

    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for _, out in self.ops for shape in out]
