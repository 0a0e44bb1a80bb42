"""retarget: run a captured graph on another device than the one it was captured on.

torch.export bakes the example's device into the graph (`aten.to.device(mask, cpu, torch.bool)`,
`aten.arange(..., device=cpu)`); run on a GPU rank, those nodes would move activations back to the CPU. This pass
replaces every torch.device constant among the node arguments by the rank's device (tensor constants fx folds
in are buffers of the graph module: they move with the weights). Preserves: the values the graph computes (only
where they live changes). Example: `arange(8, device=cpu)` -> `arange(8, device=cuda:1)`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

__all__ = ["retarget_devices"]


def retarget_devices(gm: fx.GraphModule, device: torch.device | str) -> int:
    """Point every torch.device argument of `gm`'s nodes at `device` (in place); returns how many changed."""
    device = torch.device(device)
    changed = 0

    def swap(x: Any) -> Any:
        nonlocal changed
        if isinstance(x, torch.device) and x != device:
            changed += 1
            return device
        return x

    for node in gm.graph.nodes:
        node.args = pytree.tree_map(swap, node.args)
        node.kwargs = pytree.tree_map(swap, node.kwargs)
    if changed:
        gm.recompile()
    return changed
