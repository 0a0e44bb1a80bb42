"""meta: running graphs on the meta device (shapes and dtypes, no data), shared by the analyses and the runtime.

Invariant: nothing here allocates real memory; a meta tensor stands for a real one of the same shape, strides,
dtype and requires_grad.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

__all__ = ["StayOnMeta", "meta_device", "storage_key", "to_meta"]


def to_meta(value: Any) -> Any:
    """Replace every tensor in a pytree by a meta tensor of the same shape, dtype and requires_grad."""

    def conv(t: Any) -> Any:
        if isinstance(t, torch.Tensor):
            m = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
            return m.requires_grad_(t.requires_grad)
        return t

    return pytree.tree_map(conv, value)


def storage_key(t: torch.Tensor) -> int:
    """Identity of a tensor's storage (views share it): unique among storages alive at once, so an analysis keying
    storages by it keeps every tensor it has seen alive."""
    return t.untyped_storage()._cdata


def meta_device(x: Any) -> Any:
    """A torch.device becomes the meta device; anything else stays."""
    return torch.device("meta") if isinstance(x, torch.device) else x


class StayOnMeta(TorchFunctionMode):
    """Every device argument of a torch call becomes "meta" while active: export graphs bake the capture device
    (`aten.to.device(x, cpu)`, `arange(..., device=cpu)`), which would copy a meta tensor's (absent) data."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        args, kwargs = pytree.tree_map(meta_device, (args, kwargs or {}))
        return func(*args, **kwargs)
