"""local runtime: every stage in this process, in order (the embedded default).

Exact numerics: the stages run the original graph's nodes in their original order on the original
parameters, so outputs and gradients equal the unpartitioned model's bit for bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from partitioner.capture import CapturedGraph
from partitioner.passes.split import StageModule

__all__ = ["LocalPipeline"]


class LocalPipeline:
    """Runs stage modules in order; stage s's outputs are stage s+1's inputs."""

    def __init__(self, captured: CapturedGraph, stages: list[StageModule]):
        self.captured = captured
        self.stages = stages

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values: tuple = tuple(self.captured.flatten_inputs(args, kwargs))
        for stage in self.stages:
            if any(p.is_meta for p in stage.module.parameters()):
                raise RuntimeError(
                    "the model is on the meta device: planning works without weights, running needs them; "
                    "build the model on a real device (or load a state dict) and compile again"
                )
            try:
                values = stage.module(*values)
            except Exception as e:
                if hasattr(e, "add_note"):  # Python >= 3.11: keep the type and traceback, say where
                    e.add_note(f"raised in pipeline stage {stage.index} (nodes {stage.module.graph})"[:300])
                raise
        return self.captured.unflatten_output(list(values))

    def step(
        self,
        inputs: tuple,
        targets: Any,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        microbatches: int,
        kwargs: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """One training step with the distributed runtime's numerics, in this process.

        Every tensor of the call and `targets` is split into `microbatches` chunks along dim 0 (torch's
        ``tensor_split``, as the pipeline schedules do); each chunk's ``loss_fn(output, target) / microbatches``
        is back-propagated, so ``.grad`` receives the gradient of the mean microbatch loss (accumulating, like
        ``loss.backward()``). Returns that mean loss, detached.
        """
        split = lambda v: torch.tensor_split(v, microbatches) if isinstance(v, torch.Tensor) else [v] * microbatches
        args = [split(a) for a in inputs]
        kw = {k: split(v) for k, v in (kwargs or {}).items()}
        tgt = split(targets)
        total = torch.zeros(())
        for i in range(microbatches):
            out = self(*[a[i] for a in args], **{k: v[i] for k, v in kw.items()})
            loss = loss_fn(out, tgt[i])
            (loss / microbatches).backward()
            total = total + loss.detach().float().cpu()
        return total / microbatches
