"""local runtime: every stage in this process, in order (the embedded default).

Exact numerics: the stages run the original graph's nodes in their original order on the original
parameters, so outputs and gradients equal the unpartitioned model's bit for bit on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from partitioner.capture import CapturedGraph
from partitioner.passes.split import StageModule

__all__ = ["LocalPipeline"]


class LocalPipeline:
    """Runs stage modules in order; stage s's outputs are stage s+1's inputs."""

    def __init__(self, captured: CapturedGraph, stages: list[StageModule]):
        self.captured = captured
        self.stages = stages

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.run(self.captured.flatten_inputs(args, kwargs))

    def run(self, flat: list[Any]) -> Any:
        """The model's output for its flat inputs (the captured graph's placeholders, in order)."""
        values: tuple = tuple(flat)
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
        *,
        batch_dims: dict[str, int | None] | None = None,
        target_dim: int = 0,
    ) -> torch.Tensor:
        """One training step with the distributed runtime's numerics, in this process.

        Every tensor input is split into `microbatches` chunks along its batch dim (`batch_dims[name]`, default 0;
        None: not split, every chunk gets it whole) and every tensor of `targets` along `target_dim`, with torch's
        ``tensor_split`` as the pipeline schedules do; each chunk's ``loss_fn(output, target) / microbatches``
        is back-propagated, so ``.grad`` receives the gradient of the mean microbatch loss (accumulating, like
        ``loss.backward()``). Returns that mean loss, detached.
        """
        batch_dims = batch_dims or {}
        flat = self.captured.flatten_inputs(inputs, dict(kwargs or {}), shapes=False)  # shapes: per chunk, below

        def split(v: Any, dim: int | None) -> list[Any]:
            if isinstance(v, torch.Tensor) and dim is not None:
                return list(torch.tensor_split(v, microbatches, dim=dim))
            return [v] * microbatches

        chunks = [split(v, batch_dims.get(name, 0)) for name, v in zip(self.captured.input_names, flat)]
        leaves, spec = pytree.tree_flatten(targets)
        target_chunks = [split(t, target_dim) for t in leaves]
        for i in range(microbatches):  # the graph runs on chunks: an export graph checks their shapes, before any runs
            self.captured.check_shapes({name: c[i] for name, c in zip(self.captured.input_names, chunks)})
        total = torch.zeros(())
        for i in range(microbatches):
            out = self.run([c[i] for c in chunks])
            loss = loss_fn(out, pytree.tree_unflatten([c[i] for c in target_chunks], spec))
            (loss / microbatches).backward()
            total = total + loss.detach().float().cpu()
        return total / microbatches
