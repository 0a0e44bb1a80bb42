"""stage: a stage module as torch.distributed.pipelining's PipelineStage needs it, and the static metadata of every
boundary (the shapes each stage receives and sends for one microbatch), computed on meta without communication.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from partitioner.capture import CapturedGraph
from partitioner.meta import StayOnMeta
from partitioner.passes.split import StageModule

__all__ = ["StageAdapter", "example_microbatch_shapes", "scalar_inputs", "static_metas"]


class StageAdapter(nn.Module):
    """A stage module as torch's PipelineStage needs it: tensors in, tensors out; optionally checkpointed.

    The split can forward Python ints and ``torch.Size``s across a boundary (sizes read with ``x.size()`` and used
    in a later stage's ``view``). PipelineStage moves only tensors and infers their metadata once, so an int
    ``v >= 0`` travels as the *shape* of an empty ``(v, 0)`` tensor and a size ``s`` as that of an empty
    ``(*s, 0)`` one: the value rides in the metadata, no bytes on the wire; inputs at ``scalar_inputs``
    (position -> "int" | "size" | "device") are unboxed before the module runs; a ``torch.device`` becomes the
    receiving stage's own device. Tensor outputs are made contiguous, and
    so are the gradients sent back for the inputs (gloo/NCCL send contiguous buffers; values unchanged). With
    ``clone_outputs`` (zero-bubble schedules) every output is a fresh tensor. With ``checkpoint``, the module runs
    under non-reentrant ``torch.utils.checkpoint`` (only the stage inputs are kept for backward).
    """

    def __init__(
        self,
        module: nn.Module,
        scalar_inputs: Mapping[int, str] | None = None,
        checkpoint: bool = False,
        clone_outputs: bool = False,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.module = module
        self.scalar_inputs = dict(scalar_inputs or {})  # position -> "int" | "size"
        self.checkpoint = checkpoint
        self.clone_outputs = clone_outputs
        self.box_device = torch.device(device)  # where boxed scalars are allocated (the stage's device)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = [
            _unbox(a, self.scalar_inputs[i])
            if i in self.scalar_inputs
            else _ContiguousGrad.apply(a)
            if a.requires_grad
            else a
            for i, a in enumerate(args)
        ]
        if self.checkpoint:
            out = torch.utils.checkpoint.checkpoint(self.module, *values, use_reentrant=False)
        else:
            out = self.module(*values)
        return tuple(_box(v, self.clone_outputs, self.box_device) for v in (out if isinstance(out, tuple) else (out,)))


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient contiguous (it is sent back to the previous stage)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _box(value: Any, clone: bool, device: torch.device) -> torch.Tensor:
    if isinstance(value, torch.Tensor):  # p2p needs contiguous buffers (a boundary may cut after a transpose)
        value = value.contiguous()
        # Zero-bubble's input-grad backward detaches the outputs in place: they must be neither views nor
        # tensors an op of the stage saved for its weight-grad backward.
        return value.clone() if clone or value._is_view() else value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return torch.empty((value, 0), device=device)
    if isinstance(value, torch.device):  # the receiver uses its own device (the stage runs there)
        return torch.empty((0,), device=device)
    if isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        return torch.empty((*value, 0), device=device)
    raise TypeError(
        f"a pipeline stage sends {value!r} ({type(value).__name__}) to the next stage; only tensors, ints >= 0 "
        "(or tuples of them) can cross a stage boundary: move the boundary (plan) or make the value a tensor"
    )


def _unbox(t: torch.Tensor, kind: str) -> int | torch.Size | torch.device:
    if kind == "device":
        return t.device
    return t.shape[0] if kind == "int" else torch.Size(t.shape[:-1])


def scalar_inputs(module: fx.GraphModule) -> dict[int, str]:
    """Positions of the placeholders annotate saw as ints, sizes or devices: position -> kind."""
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    out = {}
    for i, n in enumerate(placeholders):
        val = n.meta.get("val")
        if isinstance(val, tuple) and all(isinstance(v, int) for v in val):
            out[i] = "size"
        elif isinstance(val, int) and not isinstance(val, bool):
            out[i] = "int"
        elif isinstance(val, torch.device):
            out[i] = "device"
    return out


def example_microbatch_shapes(captured: CapturedGraph, chunks: int) -> tuple | None:
    """Shapes of one microbatch of every flat input of the compiled example (batch / `chunks` rows), or None."""
    vals = [n.meta.get("val") for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    if not vals or any(not isinstance(v, torch.Tensor) or v.dim() == 0 for v in vals):
        return None
    return tuple((v.shape[0] // chunks, *v.shape[1:]) for v in vals)


def static_metas(
    captured: CapturedGraph, stages: Sequence[StageModule], shapes: tuple
) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
    """(inputs, outputs) of every stage for one microbatch of input `shapes`, as meta tensors (boxed).

    The whole chain runs on the meta device with meta stand-ins for every stage's tensors (real, meta or
    FSDP-sharded: their full shapes), so every rank knows every boundary's shapes without communication
    and torch's schedules skip their dynamic metadata inference (which feeds later stages uninitialized
    tensors: garbage token ids crossing a boundary would index out of range).
    """
    vals = [n.meta.get("val") for n in captured.graph_module.graph.nodes if n.op == "placeholder"]
    values: tuple = tuple(
        torch.empty(shape, dtype=v.dtype, device="meta").requires_grad_(v.requires_grad and v.is_floating_point())
        for shape, v in zip(shapes, vals)
    )
    out = []
    with torch.enable_grad(), StayOnMeta():
        for st in stages:
            adapter = StageAdapter(st.module, scalar_inputs(st.module), device="meta")
            stand_ins = {
                f"module.{name}": torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
                for name, t in [*st.module.named_parameters(), *st.module.named_buffers()]  # tied: once, tied back
            }
            ins = tuple(v.detach().requires_grad_(v.requires_grad) for v in values)
            values = torch.func.functional_call(adapter, stand_ins, ins)
            out.append((ins, tuple(v.detach().requires_grad_(v.requires_grad) for v in values)))
    return out
