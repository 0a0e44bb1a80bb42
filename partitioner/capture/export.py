"""capture.export: torch.export with symbolic batch (and sequence) dims (capture path 2): which dims stayed
symbolic, export's guards, and the one-row special case (see partitioner.capture's docstring)."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.capture.fx import _NoTraceTimeMutation
from partitioner.capture.normal_form import CaptureError, DynamicDim, Fallback, _ExportGuards, _first_line
from partitioner.capture.one_row import graphs_differ_at_one_row


@dataclass
class _Exported:
    graph_module: fx.GraphModule
    shapes: dict[str, tuple[int | DynamicDim, ...]]  # CapturedGraph.input_shapes
    guards: _ExportGuards | None


def _trace_export_dynamic(
    model: nn.Module, signature: inspect.Signature, flat: dict[str, Any], tensor_names: list[str], rebuild: Callable
) -> tuple[_Exported, list[Fallback]]:
    """Path 2: export with every input dim left to export (Dim.AUTO); the static export if that fails. Returns the
    export and what it gave up: `Fallback(path="static shapes")` when dim 0 of some input stayed fixed, `"batch > 1"`
    when the graph does not take one-row batches (the model's code tells them apart, and they could not be shown to
    be computed alike). Raises when the static export fails too.

    One-row batches: torch's default export assumes that what it traced for 2+ rows holds for 1 (its 0/1
    specialization: every symbolic size starts at 2). Right for HF's `if batch_size != position_ids.shape[0]:
    expand(...)`, a no-op at one row; wrong for a branch that computes something else at 1. So the batch's range is
    widened to 1 only where that is checked: with real weights the graph must give what the model gives on the
    example's first row; on meta (nothing runs) it must make the ATen calls the model's own export at one row makes
    (capture.one_row, one static export). Where the default export fails, the size-oblivious one (no size assumed to
    be != 1: a branch on `size == 1` becomes a guard) is tried, and its guards decide.

    Why not size-oblivious first (safe by construction, no check needed): every HF causal LM given input ids alone
    branches on one row, so it exported twice, three times on meta; the default export and a check cost one dynamic
    export (plus a static one on meta). Invariant either way: a range that includes one row was exported for it or
    shown to compute alike there.
    """
    try:
        exported = _trace_export(model, signature, flat, tensor_names, rebuild, dynamic=True, oblivious=False)
    except Exception:
        return _trace_export_oblivious(model, signature, flat, tensor_names, rebuild)
    fixed = _fixed_batch(exported)
    if fixed is not None:
        return exported, [fixed]
    refusal = _one_row_refusal(exported, flat, tensor_names, allow=True)
    if refusal is None:
        if _on_meta(model, flat):  # nothing runs on meta: the two graphs' calls at one row are compared instead
            different = _same_calls_on_one_row(model, signature, exported, flat, tensor_names, rebuild)
        else:
            different = _same_on_first_row(model, exported.graph_module, flat, tensor_names, rebuild)
        if different is None:
            _widen_batch_to_one_row(exported)
            return exported, []
        why = f" ({different}): torch.export assumed 2 rows or more"
    else:
        why = f": {refusal}"
    reason = f"the graph does not take batches of one row{why}; calls and microbatches need more rows"
    return exported, [Fallback("", "batch > 1", reason)]


def _trace_export_oblivious(
    model: nn.Module, signature: inspect.Signature, flat: dict[str, Any], tensor_names: list[str], rebuild: Callable
) -> tuple[_Exported, list[Fallback]]:
    """The size-oblivious export, then the static one: where torch's default export failed."""
    try:
        exported = _trace_export(model, signature, flat, tensor_names, rebuild, dynamic=True)
    except Exception as e:
        exported = _trace_export(model, signature, flat, tensor_names, rebuild, dynamic=False)
        return exported, [Fallback("", "static shapes", f"torch.export with dynamic dims failed: {_first_line(e)}")]
    fixed = _fixed_batch(exported)
    if fixed is not None:
        return exported, [fixed]
    refusal = _one_row_refusal(exported, flat, tensor_names)
    if refusal is None:
        return exported, []
    reason = f"the graph does not take batches of one row: {refusal}; calls and microbatches need more rows"
    return exported, [Fallback("", "batch > 1", reason)]


def _fixed_batch(exported: _Exported) -> Fallback | None:
    """`Fallback("static shapes")` naming the inputs whose dim 0 export fixed, or None."""
    fixed = [n for n, dims in exported.shapes.items() if dims and isinstance(dims[0], int)]
    if not fixed:
        return None
    pinned = ", ".join(f"{n!r} to {exported.shapes[n][0]}" for n in fixed)
    reason = (
        f"torch.export fixed dim 0 of {pinned}: the model's code pins it (e.g. it combines the input with a "
        f"tensor of that size, reshapes it to a constant shape, or branches on it)"
    )
    return Fallback("", "static shapes", reason)


def _batch_symbols(exported: _Exported) -> set[str]:
    """The symbols of the inputs' dim 0 that export kept dynamic."""
    return {dims[0].symbol for dims in exported.shapes.values() if dims and isinstance(dims[0], DynamicDim)}


def _widen_batch_to_one_row(exported: _Exported) -> None:
    """Let the batch's ranges start at 1 (where one row was shown to compute as the graph does)."""
    batch = _batch_symbols(exported)
    exported.shapes = {
        n: tuple(replace(d, min=1) if isinstance(d, DynamicDim) and d.symbol in batch else d for d in dims)
        for n, dims in exported.shapes.items()
    }


def _one_row_refusal(
    exported: _Exported, flat: dict[str, Any], tensor_names: list[str], *, allow: bool = False
) -> str | None:
    """Why `exported` refuses the example cut to one row in dim 0, or None. allow: take one row where export's
    range starts at 2 (torch's default 0/1 assumption, which the caller then checks)."""
    batch = _batch_symbols(exported)
    for name, dims in exported.shapes.items():
        for i, d in enumerate(dims):
            if isinstance(d, DynamicDim) and d.symbol in batch and d.min > (2 if allow else 1):
                return f"dim {i} of {name!r} must be {d.min} or more"
    if exported.guards is None:
        return None
    stand_ins = dict(flat)  # meta tensors of the example's shapes, one row where dim 0 is symbolic
    for n in tensor_names:
        dims, t = exported.shapes[n], flat[n]
        rows = (1,) if dims and isinstance(dims[0], DynamicDim) else tuple(t.shape[:1])
        stand_ins[n] = torch.empty((*rows, *t.shape[1:]), dtype=t.dtype, device="meta")
    failed = exported.guards.failure(stand_ins)
    return None if failed is None else f"export's guard {failed}"


def _same_on_first_row(
    model: nn.Module, gm: fx.GraphModule, flat: dict[str, Any], tensor_names: list[str], rebuild: Callable
) -> str | None:
    """None when `gm` (export's flat outputs) gives what the model gives on the first row of the example (dim 0
    of every tensor input cut to 1), under the same RNG seed; else why not. The model's buffers, Python
    attributes and the RNG states are put back. Needs real weights (the caller does not ask for a model on meta)."""
    from partitioner.leaves import _State

    one = {**flat, **{n: flat[n][:1] if flat[n].dim() else flat[n] for n in tensor_names}}
    args, kwargs = rebuild(one)
    state = _State(model)
    cuda = sorted({t.device for t in [*model.parameters(), *model.buffers()] if t.device.type == "cuda"}, key=str)
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad():
            torch.manual_seed(0)
            expected = [t for t in pytree.tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            state.restore()
            torch.manual_seed(0)
            got = [t for t in pytree.tree_leaves(gm(*[one[n] for n in tensor_names])) if isinstance(t, torch.Tensor)]
    except Exception as e:
        return f"the model fails on one row: {_first_line(e)}"
    finally:
        state.restore()
    try:
        torch.testing.assert_close(got, expected)
    except AssertionError:
        return "it computes something else for one row"
    return None


def _same_calls_on_one_row(
    model: nn.Module, signature: inspect.Signature, assumed: _Exported, flat: dict[str, Any], tensor_names: list[str],
    rebuild: Callable,
) -> str | None:  # fmt: skip
    """None when `assumed` makes, on one row, the ATen calls the model's own export at one row makes
    (capture.one_row: for models on meta, where nothing can be run); else why not."""
    batch = _batch_symbols(assumed)
    one = dict(flat)
    for n in tensor_names:
        dims, t = assumed.shapes[n], flat[n]
        if dims and isinstance(dims[0], DynamicDim) and dims[0].symbol in batch:
            one[n] = torch.empty((1, *t.shape[1:]), dtype=t.dtype, device="meta")
        else:
            one[n] = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")
    try:
        at_one_row = _trace_export(model, signature, one, tensor_names, rebuild, dynamic=False)
        return graphs_differ_at_one_row(
            assumed.graph_module, at_one_row.graph_module, {n: one[n] for n in tensor_names}, tensor_names
        )
    except Exception as e:
        return f"the one-row graphs could not be compared: {_first_line(e)}"


def _on_meta(model: nn.Module, flat: dict[str, Any]) -> bool:
    tensors = [*model.parameters(), *model.buffers(), *(v for v in flat.values() if isinstance(v, torch.Tensor))]
    return any(t.is_meta for t in tensors)


def _trace_export(
    model: nn.Module,
    signature: inspect.Signature,
    flat: dict[str, Any],
    tensor_names: list[str],
    rebuild: Callable,
    *,
    dynamic: bool,
    oblivious: bool = True,
) -> _Exported:
    # A view's base is no part of the call: given `tokens[:, :-1]`, export guards on `_base`'s sizes, which calls
    # with plain tensors (and the meta stand-ins of `_one_row_refusal`) break. Export traces a copy instead.
    flat = {n: v.clone() if isinstance(v, torch.Tensor) and v._is_view() else v for n, v in flat.items()}
    args, kwargs = rebuild(flat)
    dynamic_shapes = _auto_dynamic_shapes(signature, args, kwargs) if dynamic else None
    with _NoTraceTimeMutation(model), _size_oblivious(dynamic and oblivious):
        ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    gm = ep.module()
    # Export's input guards leave the graph (CapturedGraph.check_shapes runs them on our flat arguments), and so
    # does its pytree codegen: we bind inputs ourselves.
    guards = None
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            names = [str(a.target) if a.op == "placeholder" else a.name for a in node.args]  # the inputs' own names
            guards = _ExportGuards(gm.get_submodule("_guards_fn"), names)
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    out_spec = gm.graph._codegen.pytree_info.out_spec if hasattr(gm.graph._codegen, "pytree_info") else None
    gm.graph._codegen = fx.graph.CodeGen()
    # Export makes one placeholder per input leaf, its target the argument's name (its node name may differ: fx
    # renames `input` to `input_1`, a builtin's name); non-tensor ones are specialized (unused) and dropped.
    placeholders = {str(n.target): n for n in gm.graph.nodes if n.op == "placeholder"}
    for name in tensor_names:
        if name not in placeholders:
            raise CaptureError(f"torch.export made placeholders {list(placeholders)} for tensor inputs {tensor_names}")
    for name, ph in placeholders.items():
        if name in tensor_names:
            ph.target = name
        elif ph.users:
            raise CaptureError(f"torch.export reads the non-tensor input {name!r} in the graph; it must be specialized")
        else:
            gm.graph.erase_node(ph)
    shapes = {n: _input_dims(placeholders[n].meta.get("val"), flat[n], ep.range_constraints) for n in tensor_names}
    # A plain GraphModule on the same parameters, buffers and constants, without export's input-spec hooks.
    plain = fx.GraphModule(gm, gm.graph, type(model).__name__)
    plain.meta["out_spec"] = out_spec
    return _Exported(plain, shapes, guards)


def _auto_dynamic_shapes(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """export's `dynamic_shapes` for this call: Dim.AUTO (min 1) on every dim of every tensor, keyed by the
    parameters of `forward` as export binds the call (`*args` a tuple, `**kwargs` a dict)."""
    auto = torch.export.Dim.AUTO
    hint = auto(min=1) if callable(auto) else auto  # bounded hints: recent torch

    def dims(value: Any) -> dict[int, Any] | None:
        return {i: hint for i in range(value.dim())} if isinstance(value, torch.Tensor) and value.dim() else None

    spec: dict[str, Any] = {}
    for name, value in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            spec[name] = tuple(dims(v) for v in value)
        elif kind == inspect.Parameter.VAR_KEYWORD:
            spec[name] = {k: dims(v) for k, v in value.items()}
        else:
            spec[name] = dims(value)
    return spec


def _size_oblivious(on: bool) -> Any:
    """Size-oblivious reasoning for export's symbolic sizes: no 0/1 specialization, so a dim seen as 8 is not
    assumed to be != 1 (a branch on `size == 1` becomes a guard, not a silent assumption)."""
    from torch.fx.experimental import _config

    if on and hasattr(_config, "backed_size_oblivious"):
        return _config.patch(backed_size_oblivious=True)
    return contextlib.nullcontext()


def _input_dims(val: Any, example: torch.Tensor, ranges: dict[Any, Any]) -> tuple[int | DynamicDim, ...]:
    """An input's dims from export's example value: ints where fixed, DynamicDim (with its range) where symbolic."""
    if not isinstance(val, torch.Tensor):
        return tuple(int(d) for d in example.shape)
    dims: list[int | DynamicDim] = []
    for d in val.shape:
        expr = d.node.expr if isinstance(d, torch.SymInt) else None
        if expr is None or expr.is_Integer:
            dims.append(int(d) if expr is None else int(expr))
            continue
        vr = ranges.get(expr)
        low = int(vr.lower) if vr is not None and vr.lower.is_Integer else 0
        high = int(vr.upper) if vr is not None and vr.upper.is_Integer else None
        dims.append(DynamicDim(str(expr), low, high))
    return tuple(dims)
