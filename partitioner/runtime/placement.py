"""runtime/placement: run a module-placement plan in this process (the embedded default).

The model's real Python forward runs, so its control flow takes the branches the real inputs choose; every placed
module's call runs where the plan put it, which in one process is where the model's weights are (the local
runtime of graph plans does the same: stages in order on the model's device). A forward therefore equals the
model's bit for bit. A training step runs every microbatch's forward, then every backward (GPipe's order, what the
plan's simulation priced), each microbatch's `loss_fn(output, target) / microbatches` back-propagated, so `.grad`
receives the gradient of the mean microbatch loss, as in the graph runtimes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["PlacementRunner", "split_batch"]


def split_batch(value: Any, chunks: int) -> list[Any]:
    """Every tensor in `value` (a pytree) cut into `chunks` along dim 0 (torch.tensor_split, as the pipeline
    schedules cut); other leaves repeated. The caller has checked the rows split evenly (validate.check_batch_split,
    in CompiledModel.step)."""
    leaves, spec = pytree.tree_flatten(value)
    parts = [
        torch.tensor_split(t, chunks) if isinstance(t, torch.Tensor) and t.dim() > 0 else [t] * chunks for t in leaves
    ]
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(chunks)]


class PlacementRunner:
    """Calls the model itself (module docstring); `step` runs a GPipe-ordered training step."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def step(
        self,
        inputs: tuple,
        targets: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        microbatches: int,
        kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Forward every microbatch, then backward each (module docstring); returns the mean loss, detached."""
        calls = split_batch((tuple(inputs), dict(kwargs or {})), microbatches)
        target_chunks = split_batch(targets, microbatches)
        losses = [loss_fn(self.model(*a, **kw), t) for (a, kw), t in zip(calls, target_chunks)]
        for loss in losses:
            (loss / microbatches).backward()
        return torch.stack([loss.detach().float().cpu() for loss in losses]).mean()
