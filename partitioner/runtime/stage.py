"""stage: a stage module as torch.distributed.pipelining's PipelineStage needs it (``StageAdapter``), the
PipelineStage that runs it under FSDP as the planner's memory model says (``DataParallelStage``), and the static
metadata of every boundary (the shapes each stage receives and sends for one microbatch), computed on meta without
communication.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage

from partitioner.capture import CapturedGraph
from partitioner.meta import StayOnMeta
from partitioner.passes.split import StageModule

__all__ = [
    "DataParallelStage",
    "StageAdapter",
    "example_microbatch_shapes",
    "fsdp_param_groups",
    "scalar_inputs",
    "static_metas",
]


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
        """Run the stage on the received tensors, boxed scalars unboxed, and return its outputs as a tuple of
        tensors (ints, sizes and devices boxed as in the class docstring)."""
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


class DataParallelStage(PipelineStage):
    """torch's PipelineStage, with an FSDP2 stage's gradients reduce-scattered in every microbatch's backward.

    torch's stage (``_PipelineStageBase.backward_maybe_with_nosync``) turns FSDP's gradient sync and its reshard
    after backward off before every microbatch's backward and does both once, at the schedule's final
    ``REDUCE_GRAD`` (``perform_reduce_grad``): from the first backward to the step's end every gradient sits
    unsharded and every parameter gathered, w + g + o/d per rank in zero2 and fsdp alike. Here, for
    `data_parallel` "zero2", "fsdp" and "hsdp" under a schedule whose backward is not split:

    * every microbatch's (full) backward reduce-scatters (``set_requires_gradient_sync(True)``): each FSDP group's
      ``post_backward`` reduces its layer's unsharded gradients as soon as the backward has passed the layer and
      adds the result to the sharded ``.grad`` (FSDP2's ``foreach_reduce`` accumulates into an existing sharded
      gradient), so gradients accumulate over microbatches as 1/d shards;
    * "fsdp" and "hsdp" free a layer's gathered parameters after its backward (``set_reshard_after_backward``;
      after its forward too, ``reshard_after_forward``); "zero2" keeps them gathered until the step's end (full
      weights: ZeRO-2);
    * "hsdp" all-reduces the reduce-scattered shards across replica groups once, in the last microbatch's
      backward (``set_requires_all_reduce``; the earlier ones add into FSDP's partial reduce output);
    * "fsdp" and "hsdp" gather one layer at a time in the multi-stage schedules too: their ``UNSHARD`` action
      (``_PipelineScheduleRuntime``) calls ``unshard()`` on every FSDP module of a stage ahead of its first
      forward, which would gather all its layers at once; the layers' FSDP modules (``layer_groups``) answer it
      with a done handle instead, and FSDP's own pre-forward / pre-backward hooks gather each layer when it runs.
      (The root group, the parameters outside the layers, is still prefetched.)

    Each reduction averages over the data-parallel group (FSDP's divide factor is the group size), and the sums
    over microbatches are this step's: the runtime divides by the number of microbatches once. The final
    ``REDUCE_GRAD`` is torch's: it calls every group's ``post_backward``, which finds no unsharded gradient left
    (nothing is reduced twice), reshards, and finalizes (``_root_post_backward_final_callback`` with
    ``is_last_backward``). Split backwards (zero-bubble, zbv: input and weight actions) keep torch's behaviour,
    as do DDP stages.
    """

    def __init__(self, *args: Any, data_parallel: str = "", split_backward: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reduce_every_backward = data_parallel in ("zero2", "fsdp", "hsdp") and not split_backward
        self.reshard_after_backward = data_parallel in ("fsdp", "hsdp")
        self.all_reduce_once = data_parallel == "hsdp"
        if self.reduce_every_backward and self.reshard_after_backward and isinstance(self.submod, FSDPModule):
            for m in self.submod.modules():  # FSDP itself gathers through its param groups, never module.unshard
                if m is not self.submod and isinstance(m, FSDPModule):
                    m.unshard = _gathered_when_run  # type: ignore[method-assign]

    def backward_maybe_with_nosync(
        self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False
    ) -> tuple[tuple[torch.Tensor | None, ...], list[dict[str, Any]] | None]:
        if not (self.reduce_every_backward and backward_type == "full" and isinstance(self.submod, FSDPModule)):
            return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward=last_backward)
        from torch.distributed.pipelining._backward import stage_backward

        fsdp = self.submod
        fsdp.set_is_last_backward(False)  # the schedule's REDUCE_GRAD finalizes, as in torch's stage
        fsdp.set_reshard_after_backward(self.reshard_after_backward)
        fsdp.set_requires_gradient_sync(True)
        if self.all_reduce_once:
            fsdp.set_requires_all_reduce(last_backward)
        grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
        return grads, None

    def perform_reduce_grad(self, grad_scale_factor: int) -> None:
        if self.reduce_every_backward and isinstance(self.submod, FSDPModule):
            # hsdp: shards reduce-scattered but never all-reduced would be dropped by torch's final post_backward
            pending = [
                g for g in fsdp_param_groups(self.submod) if getattr(g, "_partial_reduce_output", None) is not None
            ]
            if pending:
                raise RuntimeError(
                    f"stage {self.stage_index}: {len(pending)} FSDP group(s) hold gradients reduce-scattered but not "
                    "all-reduced across replica groups after the last microbatch's backward"
                )
        super().perform_reduce_grad(grad_scale_factor)


def _gathered_when_run(async_op: bool = False) -> _Done | None:
    """A layer's ``FSDPModule.unshard`` under fsdp / hsdp (``DataParallelStage``): nothing now, FSDP's forward and
    backward hooks gather the layer when it runs; a done handle for the schedule's ``UNSHARD`` to wait on."""
    return _Done() if async_op else None


class _Done:
    def wait(self) -> None:
        return None


def fsdp_param_groups(module: nn.Module) -> list[Any]:
    """The FSDP2 parameter groups (``FSDPParamGroup``, torch-private) of every FSDP module under `module`, once each."""
    out: dict[int, Any] = {}
    for m in module.modules():
        if isinstance(m, FSDPModule):
            for group in m._get_fsdp_state()._fsdp_param_groups:
                out.setdefault(id(group), group)
    return list(out.values())


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
            hooked = any(isinstance(m, FSDPModule) for m in st.module.modules())  # FSDP layers (layer_groups)
            runner = _WithoutFSDPHooks(st.module) if hooked else st.module
            prefix = "module.module." if hooked else "module."
            adapter = StageAdapter(runner, scalar_inputs(st.module), device="meta")
            stand_ins = {
                f"{prefix}{name}": torch.empty(t.shape, dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
                for name, t in [*st.module.named_parameters(), *st.module.named_buffers()]  # tied: once, tied back
            }
            ins = tuple(v.detach().requires_grad_(v.requires_grad) for v in values)
            values = torch.func.functional_call(adapter, stand_ins, ins)
            out.append((ins, tuple(v.detach().requires_grad_(v.requires_grad) for v in values)))
    return out


class _WithoutFSDPHooks(nn.Module):
    """Runs a stage's graph calling its FSDP-managed submodules' ``forward`` without their hooks: FSDP's would
    gather (collectively) and reshard the real parameters, where the meta run of ``static_metas`` only needs shapes
    (the parameters are swapped for meta stand-ins under ``module.``)."""

    def __init__(self, module: fx.GraphModule):
        super().__init__()
        self.module = module

    def forward(self, *args: Any) -> Any:
        return _HookFreeInterpreter(self.module).run(*args)


class _HookFreeInterpreter(fx.Interpreter):
    def call_module(self, target: Any, args: tuple, kwargs: dict) -> Any:
        sub = self.fetch_attr(target)
        if isinstance(sub, FSDPModule):
            return type(sub).forward(sub, *args, **kwargs)
        return sub(*args, **kwargs)
