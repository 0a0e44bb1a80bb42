"""capture: nn.Module + example call -> one normalized fx.GraphModule.

A fallback chain, most precise first; every step down is recorded (`Fallback`) with the error that
forced it, and carried into `Plan.fallbacks`:
1. "fx": torch.fx symbolic tracing of the whole model (module-level graph: nn.Linear & co. stay
   `call_module`, which the tensor-parallel rewrite relies on; shapes stay dynamic).
2. "export": torch.export, non-strict (ATen-level graph), with every dim of every tensor input marked
   `Dim.AUTO`: export keeps a dim symbolic where the model's code allows and fixes it where the code pins it.
   Calls are checked against what it kept (`input_shapes`, `DynamicDim`) and against the conditions it derived
   for the symbolic dims (its guards), so a graph is never run on a shape it does not hold for. Dim 0 is the
   batch `cm.step` splits into microbatches: when it stays fixed (or only the static export works),
   `Fallback(path="static shapes")` says why and calls with another batch size get an error saying what to do.
   torch's default export assumes what it traced for 2+ rows holds for 1; the batch's range is widened to one
   row only where the graph matches the model on a row of the example (on meta, where nothing runs: where it
   makes the ATen calls of the model's own export at one row, capture.one_row), else `Fallback(path="batch > 1")`
   (see `_trace_export_dynamic`; the size-oblivious export where the default one fails).
3. "module-level": fx tracing with a tracer that keeps every submodule fx cannot trace as one opaque
   `call_module` leaf, found top-down: trace, find the innermost module the failure happened in, make it
   a leaf, trace again (a leaf whose output then breaks its parent makes the parent the leaf). A leaf
   runs the module itself at run time, so its data-dependent control flow still takes the branch the
   real inputs choose. Leaves are profiled on the real weights when they exist (partitioner.leaves).
Neither fx nor export bakes a data-dependent branch silently: fx refuses `bool(proxy)` and export
refuses to guard on data-dependent values, so such code always ends up inside a leaf (or refused when it
is in the model's own forward).

Normal form of the result (what every later pass may assume):
- one placeholder per tensor-valued argument of `forward`, in signature order (`input_names`);
  entries of `**kwargs` count as arguments named by their key, elements of `*args` as `<name>_<i>`;
  every other argument (None, ints, floats, flags) is specialized to its example value and checked
  at call time (`constants`);
- the output node returns a flat tuple of values; `out_spec` (a pytree spec of the model's own return value,
  recorded before fx or export touch it) rebuilds the model's output with its own container types (tensor,
  tuple, list, namedtuple, dict, None, HF ModelOutput ...), on every path;
- parameters and buffers keep their original qualified names;
- export graphs read symbolic dims with `aten.sym_size.int` nodes and compute on them with `operator` nodes
  (Python ints, which may cross stage boundaries like any value); `node.meta["val"]` holds export's symbolic
  example values until annotation replaces them;
- on the export path, attentions whose mask is computed from sizes alone and is causal (or all-true) at the example's
  sizes run with `is_causal=True` (or no mask), a `partitioner::check_attention_mask` node guarding other shapes
  (capture.attention_masks);
- a leaf node (method "module-level") carries `node.meta["capture_leaf"]` (the reason) and, when the
  model could run, `node.meta["leaf_profile"]` (partitioner.leaves.LeafProfile).
Example: `forward(self, x, mask=None, scale=2.0)` called as `m(x)` captures to placeholders `[x]`,
constants `{"mask": None, "scale": 2.0}`; captured by export with x of shape (8, 16) where the model fixes
the feature dim, `input_shapes == {"x": (DynamicDim("s0", 1, None), 16)}`.
"""

from __future__ import annotations

import io
import keyword
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr
from dataclasses import replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.capture.attention_masks import use_causal_attention
from partitioner.capture.export import _trace_export_dynamic
from partitioner.capture.fx import _make_mutations_explicit, _trace_fx, _trace_with_leaves
from partitioner.capture.normal_form import (
    CapturedGraph,
    CaptureError,
    DynamicDim,
    Fallback,
    UncapturableForward,
    _bind,
    _ExportGuards,
    _first_line,
    _flatten_output,
    _forward_signature,
    _rebuild_call,
    flat_arguments,
)

__all__ = [
    "CaptureError",
    "CapturedGraph",
    "DynamicDim",
    "Fallback",
    "UncapturableForward",
    "capture",
    "flat_arguments",
]


def capture(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> CapturedGraph:
    """Capture `model` called as `model(*args, **kwargs)` into the normal form described above.

    The model is not modified (a profiling run of module-level leaves restores buffers and RNG).
    Raises ValueError when the call does not fit `forward`, CaptureError when no path captures it
    (UncapturableForward when what no path captures is the model's own forward: compile places modules instead).
    """
    signature = _forward_signature(model)
    flat = flat_arguments(signature, _bind(signature, tuple(args), dict(kwargs or {})))
    for name, value in flat.items():
        if not isinstance(value, torch.Tensor) and any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(value)):
            raise ValueError(
                f"argument {name!r} is a {type(value).__name__} holding tensors; partitioner takes tensors as "
                f"separate arguments: wrap the model in a module whose forward takes each tensor by name"
            )
        if not (name.isidentifier() and not keyword.iskeyword(name)):
            raise ValueError(f"keyword argument {name!r} is not a Python identifier; pass it under another name")
    tensor_names = [n for n, v in flat.items() if isinstance(v, torch.Tensor)]
    constants = {n: v for n, v in flat.items() if not isinstance(v, torch.Tensor)}
    rebuild = _rebuild_call(signature)

    with _attributes_kept(model):
        return _capture(model, flat, tensor_names, constants, signature, rebuild)


@contextmanager
def _export_quiet() -> Iterator[None]:
    """What torch.export writes to stderr while it runs is held back, and written out only if it succeeds: where export
    fails (a branch on data), torch prints the partial graph (tens of lines per attempt, several attempts) beside the
    error capture reports in a line. Its shape-inference warnings (which go to their logger's own stream) are held
    back too."""
    log = logging.getLogger("torch.fx.experimental.symbolic_shapes")
    level = log.level
    log.setLevel(logging.ERROR)
    held = io.StringIO()
    try:
        with redirect_stderr(held):
            yield
        sys.stderr.write(held.getvalue())
    finally:
        log.setLevel(level)


@contextmanager
def _attributes_kept(model: nn.Module) -> Iterator[None]:
    """Put every module attribute capture replaced back: torch.export (non-strict, torch 2.13) leaves a module's list
    attributes swapped for copies, whether it succeeds or fails, so a model appending to a list it holds (a log, a
    cache) would append to a copy after compile."""
    saved = [(m, dict(vars(m))) for m in model.modules()]
    try:
        yield
    finally:
        for m, attrs in saved:
            for key, value in attrs.items():
                if m.__dict__.get(key) is not value:
                    m.__dict__[key] = value


def _capture(model: nn.Module, flat: dict[str, Any], tensor_names: list[str], constants: dict[str, Any],
             signature: Any, rebuild: Any) -> CapturedGraph:  # fmt: skip
    fallbacks: list[Fallback] = []
    input_shapes: dict[str, tuple[int | DynamicDim, ...]] | None = None
    guards: _ExportGuards | None = None
    leaves: list[str] = []
    try:
        gm = _trace_fx(model, flat, tensor_names, rebuild, frozenset())
        method = "fx"
    except Exception as e_fx:  # data-dependent control flow, unsupported Python, ...
        fx_reason = f"torch.fx.symbolic_trace failed: {_first_line(e_fx)}"
        fallbacks.append(Fallback("", "torch.export", fx_reason))
        try:
            with _export_quiet():
                exported, gave_up = _trace_export_dynamic(model, signature, flat, tensor_names, rebuild)
            gm, input_shapes, guards = exported.graph_module, exported.shapes, exported.guards
            method = "export"
            use_causal_attention(gm, {name: flat[name] for name in tensor_names})
            fallbacks.extend(gave_up)
        except Exception as e_export:
            export_reason = f"torch.export failed: {_export_failure(e_export, flat)}"
            fallbacks.append(Fallback("", "module-level", export_reason))
            gm, leaf_reasons = _trace_with_leaves(model, flat, tensor_names, rebuild, fx_reason, export_reason)
            method = "module-level"
            leaves = list(leaf_reasons)
            fallbacks.extend(Fallback(p, "leaf", r) for p, r in leaf_reasons.items())

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if [p.target for p in placeholders] != tensor_names:
        raise CaptureError(
            f"captured placeholders {[p.target for p in placeholders]} do not match the tensor inputs {tensor_names}"
        )
    out_spec, output_constants = _flatten_output(gm)
    _make_mutations_explicit(gm)
    gm.graph.lint()
    gm.recompile()
    modes = [(m, m.training) for m in model.modules()]
    captured = CapturedGraph(
        gm,
        method,
        tensor_names,
        constants,
        signature,
        out_spec,
        fallbacks,
        input_shapes,
        leaves,
        output_constants,
        modes,
        guards,
        _transient(model, gm),
    )
    if leaves:
        from partitioner.leaves import attach_leaf_profiles

        notes = attach_leaf_profiles(model, gm, rebuild(flat))  # how each leaf's cost was obtained
        captured.fallbacks[:] = [
            replace(f, reason=f"{f.reason}; {notes[f.what]}") if f.path == "leaf" and f.what in notes else f
            for f in captured.fallbacks
        ]
    return captured


def _transient(model: nn.Module, gm: fx.GraphModule) -> frozenset[str]:
    """The tensors the graph reads that are not the model's state: buffers registered with persistent=False, and the
    constants torch.export lifts into the graph (Falcon's index tensors `lifted_tensor_0`, ...)."""
    state = set(model.state_dict(keep_vars=True))
    non_persistent = {
        f"{path}.{name}" if path else name
        for path, m in model.named_modules()
        for name in m._non_persistent_buffers_set
    }
    read = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    return frozenset(non_persistent | {t for t in read if t not in state and isinstance(_attr(gm, t), torch.Tensor)})


def _attr(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


_UNKNOWN_OUTPUT = re.compile(r"Found <class '([\w.]+)'> in output, which is not a known type")


def _export_failure(error: BaseException, flat: dict[str, Any]) -> str:
    """Why torch.export failed, in a line; where it refused a type the model returns, with what to do: a cache an HF
    model returns because `use_cache` is on (training has no use for it: turn it off, in the example call and in the
    calls after), or any other type, which export needs registered as a pytree node."""
    found = _UNKNOWN_OUTPUT.search(str(error))
    if found is None:
        return _first_line(error)
    name = found.group(1).rsplit(".", 1)[-1]
    return f"{type(error).__name__}: {found.group(0)}{_output_type_hint(name, flat)}"


def _output_type_hint(name: str, flat: dict[str, Any]) -> str:
    if "use_cache" in flat and flat["use_cache"] is not False and "cache" in name.lower():
        return (
            f". The model returns a {name} because use_cache is on: pass example_kwargs={{'use_cache': False}} "
            f"and call the compiled model with use_cache=False (training does not use the cache)"
        )
    return (
        f". The model returns a {name}: register it as a pytree node (torch.utils._pytree.register_pytree_node) "
        f"or return tensors, tuples, lists and dicts of them"
    )
