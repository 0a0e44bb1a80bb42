"""leaves: what an opaque module-level leaf (capture's last fallback) costs, measured or estimated.

A leaf is a submodule neither torch.fx nor torch.export can capture (typically: Python control flow on
a tensor's value). It cannot run on meta tensors (a branch needs the value), so annotate cannot derive
its output shapes and FLOPs the usual way. Two sources, best first:
1. measured (`attach_leaf_profiles`, at capture): when the model has real weights and the example
   inputs are real, the model runs once (no grad) with a pre-hook recording each leaf call's inputs;
   then each leaf call runs again alone under FlopCounterMode (grad enabled, to count the activations
   autograd saves), timed. Invariant: the model is left as it was: buffers (BatchNorm statistics,
   counters, Python attributes) and the RNG state are restored, the example inputs are cloned before use, no gradient is
   produced.
2. estimated (`leaf_cost`, at annotate, on meta): a copy of the leaf on the CPU with freshly drawn
   weights runs on random inputs of the annotated shapes; the branch it takes may differ from real data,
   which the fallback's reason says. Refused above `ESTIMATE_LIMIT_BYTES` of weights.
Example: `Gate(nn.Module)` with `if x.sum() > 0:` on a real model gives node.meta["leaf_profile"] =
LeafProfile(output=<meta tensor>, flops=..., saved_bytes=..., seconds=..., source="measured").
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from partitioner.meta import to_meta

__all__ = ["ESTIMATE_LIMIT_BYTES", "LeafProfile", "attach_leaf_profiles", "leaf_cost"]

ESTIMATE_LIMIT_BYTES = 1 << 30  # a leaf with more weights than this is not materialized to estimate it


@dataclass(frozen=True)
class LeafProfile:
    """One call of a leaf module: its output (meta tensors) and what it cost."""

    output: Any  # pytree of meta tensors (shapes, dtypes, requires_grad)
    flops: int  # forward FLOPs (FlopCounterMode)
    saved_bytes: int  # activation bytes autograd keeps for backward
    seconds: float  # forward wall time on this machine (0 when estimated)
    source: str  # "measured" | "estimated"


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]


def _clone(value: Any, *, requires_grad: bool = False) -> Any:
    def conv(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().clone()
        return c.requires_grad_(requires_grad and c.is_floating_point())

    return pytree.tree_map(conv, value)


def _run_profiled(module: nn.Module, args: tuple, kwargs: dict[str, Any], *, grad: bool) -> tuple[Any, int, int, float]:
    """Run one call; return (output, flops, saved bytes, seconds)."""
    seen: set[int] = set()
    saved = [0]
    params = {p.untyped_storage()._cdata for p in module.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
        return t

    with (
        torch.set_grad_enabled(grad),
        FlopCounterMode(display=False) as counter,
        saved_tensors_hooks(pack, lambda t: t),
    ):
        t0 = time.perf_counter()
        out = module(*args, **kwargs)
        seconds = time.perf_counter() - t0
    return out, int(counter.get_total_flops()), saved[0], seconds


class _State:
    """Buffers (restored in place: stage modules share these tensors), Python scalar attributes of every
    module (step counters) and the RNG state of a model."""

    def __init__(self, model: nn.Module):
        self.buffers = [(b, b.detach().clone()) for b in model.buffers()]
        self.attrs = [
            (m, {k: v for k, v in vars(m).items() if type(v) in (bool, int, float, str)}) for m in model.modules()
        ]
        self.rng = torch.get_rng_state()

    def restore(self) -> None:
        with torch.no_grad():
            for b, saved in self.buffers:
                b.copy_(saved)
        for m, attrs in self.attrs:
            m.__dict__.update(attrs)
        torch.set_rng_state(self.rng)


def attach_leaf_profiles(model: nn.Module, gm: fx.GraphModule, call: tuple[tuple, dict[str, Any]]) -> dict[str, str]:
    """Measure every leaf call of `gm` (nodes with node.meta["capture_leaf"]) on the real model (see module
    docstring, source 1).

    Writes node.meta["leaf_profile"] on each leaf node and returns, per leaf module path, how its cost was
    obtained (for its Fallback reason). Measures nothing when the weights or inputs are on meta (annotate then
    estimates). Raises ValueError when the model itself fails on the example inputs.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_module" and "capture_leaf" in n.meta]
    leaves = sorted({str(n.target) for n in nodes})
    state = [*model.parameters(), *model.buffers(), *_tensors(call)]
    if any(t.is_meta for t in state):
        note = "cost estimated at annotate from a copy with random weights on random inputs (the model is on meta)"
        return dict.fromkeys(leaves, note)

    # Phase 1: run the model once, recording the inputs of every leaf call in order.
    calls: dict[str, list[tuple[tuple, dict[str, Any]]]] = defaultdict(list)
    handles = []
    for path in leaves:

        def record(mod: nn.Module, args: tuple, kwargs: dict[str, Any], path: str = path) -> None:
            calls[path].append(_clone((args, kwargs)))

        handles.append(model.get_submodule(path).register_forward_pre_hook(record, with_kwargs=True))
    saved = _State(model)
    args, kwargs = _clone(call)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:
        raise ValueError(
            f"{type(model).__name__} fails on the example inputs ({type(e).__name__}: {e}); pass example inputs "
            f"the model accepts"
        ) from e
    finally:
        for h in handles:
            h.remove()
        saved.restore()

    # Phase 2: each leaf call alone, counted and timed; state restored after each.
    grad = any(p.requires_grad for p in model.parameters())
    seen: dict[str, int] = defaultdict(int)
    flops_of: dict[str, int] = defaultdict(int)
    for n in nodes:
        path = str(n.target)
        k = seen[path]
        seen[path] += 1
        if k >= len(calls[path]):
            continue  # called by the graph more often than by the model: annotate estimates it
        args, kwargs = _clone(calls[path][k], requires_grad=grad)
        try:
            out, flops, saved_bytes, seconds = _run_profiled(model.get_submodule(path), args, kwargs, grad=grad)
        finally:
            saved.restore()
        n.meta["leaf_profile"] = LeafProfile(to_meta(out), flops, saved_bytes, seconds, "measured")
        flops_of[path] += flops
    # FLOPs only: the reason goes into the plan, whose JSON must not depend on timing noise.
    return {p: f"cost measured on the real weights: {f} forward FLOPs" for p, f in flops_of.items()}


def _materialize(value: Any) -> Any:
    """Meta tensors -> real CPU tensors of the same shape: floats ~ N(0, 1), integers and bools 0."""

    def conv(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        real = torch.randn(t.shape, dtype=t.dtype) if t.is_floating_point() else torch.zeros(t.shape, dtype=t.dtype)
        return real.requires_grad_(t.requires_grad)

    return pytree.tree_map(conv, value)


def _materialized_copy(module: nn.Module) -> nn.Module:
    """A copy of `module` (weights on meta, possibly plain tensors swapped in by annotate) with real random
    weights on the CPU; tied weights stay tied."""
    clone = copy.deepcopy(module)
    real: dict[int, torch.Tensor] = {}
    for sub in clone.modules():
        for store, as_param in ((sub._parameters, True), (sub._buffers, False)):
            for name, t in store.items():
                if t is None:
                    continue
                if id(t) not in real:
                    value = _materialize(t.detach().to("meta"))
                    real[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if as_param else value
                store[name] = real[id(t)]
    return clone


def leaf_cost(module: nn.Module, node: fx.Node, args: tuple, kwargs: dict[str, Any], *, training: bool) -> LeafProfile:
    """The cost of leaf `node` (calling `module`) for annotate: the measured profile, else an estimate.

    Raises ValueError when the leaf is too large to estimate on the CPU.
    """
    profile = node.meta.get("leaf_profile")
    if profile is None:
        weight_bytes = sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
        if weight_bytes > ESTIMATE_LIMIT_BYTES:
            raise ValueError(
                f"leaf module {node.target!r} cannot run on meta tensors and has {weight_bytes / 2**30:.1f} GiB of "
                f"weights, too many to estimate on the CPU: compile the model with real weights"
            )
        clone = _materialized_copy(module)
        rng = torch.get_rng_state()
        try:
            out, flops, saved_bytes, _ = _run_profiled(clone, *_materialize((args, kwargs)), grad=training)
        finally:
            torch.set_rng_state(rng)
        profile = LeafProfile(to_meta(out), flops, saved_bytes, 0.0, "estimated")
        node.meta["leaf_profile"] = profile
    if not training:
        profile = replace(profile, output=pytree.tree_map(_detach, profile.output), saved_bytes=0)
    return profile


def _detach(t: Any) -> Any:
    return t.detach() if isinstance(t, torch.Tensor) else t
