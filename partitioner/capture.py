"""capture: nn.Module + example call -> one normalized fx.GraphModule.

A fallback chain, most precise first; every step down is recorded (`Fallback`) with the error that
forced it, and carried into `Plan.fallbacks`:
1. "fx": torch.fx symbolic tracing of the whole model (module-level graph: nn.Linear & co. stay
   `call_module`, which the tensor-parallel rewrite relies on; shapes stay dynamic).
2. "export": torch.export, non-strict (ATen-level graph), with every dim of every tensor input marked
   `Dim.AUTO` (min 1, size-oblivious: no size is assumed to be != 1): export keeps a dim symbolic where the
   model's code allows and fixes it where the code pins it. Calls are checked against what it kept
   (`input_shapes`, `DynamicDim`) and against the conditions it derived for the symbolic dims (its guards),
   so a graph is never run on a shape it does not hold for. Dim 0 is the batch `cm.step` splits into
   microbatches: when it stays fixed (or only the static export works), `Fallback(path="static shapes")` says
   why and calls with another batch size get an error saying what to do; when the code tells a one-row batch
   apart, torch's default export (2+ rows assumed to hold for 1) is taken if its graph matches the model on a
   row of the example, else `Fallback(path="batch > 1")` (see `_trace_export_dynamic`).
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
- a leaf node (method "module-level") carries `node.meta["capture_leaf"]` (the reason) and, when the
  model could run, `node.meta["leaf_profile"]` (partitioner.leaves.LeafProfile).
Example: `forward(self, x, mask=None, scale=2.0)` called as `m(x)` captures to placeholders `[x]`,
constants `{"mask": None, "scale": 2.0}`; captured by export with x of shape (8, 16) where the model fixes
the feature dim, `input_shapes == {"x": (DynamicDim("s0", 1, None), 16)}`.
"""

from __future__ import annotations

import contextlib
import inspect
import keyword
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["CaptureError", "CapturedGraph", "DynamicDim", "Fallback", "capture", "flat_arguments"]

_MAX_LEAF_ROUNDS = 256  # module-level fallback: re-traces at most this many times


class CaptureError(RuntimeError):
    """No capture path worked; the message lists each path's error and what to change."""


@dataclass(frozen=True)
class Fallback:
    """A place where partitioner took a less precise path than the default, and why."""

    what: str  # the module path ("" = the whole model), or node name
    path: str  # the path taken: "torch.export", "module-level", "leaf", "replicated", ...
    reason: str  # the error or rule that forced it

    def __str__(self) -> str:
        return f"{self.what or '<model>'}: {self.path} ({self.reason})"


@dataclass(frozen=True)
class DynamicDim:
    """A dim of an input that torch.export kept symbolic: any size from `min` to `max` (None: no bound).

    Dims with the same `symbol` must be equal in a call (export found the model needs them equal).
    """

    symbol: str  # export's symbol or expression for the dim ("s43")
    min: int
    max: int | None = None

    def __str__(self) -> str:
        return f"{self.symbol} in [{self.min}, {'inf' if self.max is None else self.max}]"


@dataclass
class CapturedGraph:
    graph_module: fx.GraphModule
    method: str  # "fx" | "export" | "module-level"
    input_names: list[str]  # flat arguments that are graph placeholders, in order
    constants: dict[str, Any]  # flat arguments specialized to a non-tensor value
    signature: inspect.Signature
    out_spec: pytree.TreeSpec
    fallbacks: list[Fallback] = field(default_factory=list)
    # export graphs: per tensor input, each dim's size where the graph fixes it, a DynamicDim where it is symbolic.
    # None (fx, module-level): the graph takes any shape the model's code takes.
    input_shapes: dict[str, tuple[int | DynamicDim, ...]] | None = None
    leaves: list[str] = field(default_factory=list)  # module paths kept opaque (method "module-level")
    output_constants: dict[int, None] = field(default_factory=dict)  # position in the flat output -> None
    # (module, its `training` flag at capture): the graph bakes the mode (functional dropout, export's
    # batch-norm ops), so a model switched with .train()/.eval() afterwards is refused, not silently run.
    modes: list[tuple[nn.Module, bool]] = field(default_factory=list, repr=False)
    # export: the conditions export derived for the symbolic dims (e.g. "seq > 1", "seq <= 40"), run on every call
    input_guards: _ExportGuards | None = field(default=None, repr=False)
    # buffers registered with persistent=False (qualified names): not part of the model's state_dict()
    transient: frozenset[str] = frozenset()

    def flatten_inputs(self, args: tuple, kwargs: dict[str, Any], *, shapes: bool = True) -> list[torch.Tensor]:
        """Bind a call to `forward`'s signature and return the placeholder values in order.

        Raises ValueError when a specialized argument differs from its captured value, a tensor
        argument is missing, or (export graphs) a tensor's shape is one the graph does not hold for
        (`check_shapes`; shapes=False leaves that to the caller, e.g. for a batch it will cut into
        microbatches), naming the argument and the fix.
        """
        for module, training in self.modes:
            if module.training != training:
                root = self.modes[0][0]
                raise ValueError(
                    f"{type(root).__name__} was compiled in {'training' if training else 'eval'} mode and "
                    f"{type(module).__name__} is now in {'training' if module.training else 'eval'} mode; the "
                    f"captured graph is specialized to the mode (dropout, batch-norm statistics): compile again "
                    f"after .train()/.eval()"
                )
        flat = flat_arguments(self.signature, _bind(self.signature, args, kwargs))
        extra = [n for n in flat if n not in self.constants and n not in self.input_names]
        if extra:
            raise ValueError(
                f"arguments {extra} were not passed when the model was compiled; the compiled graph does not "
                f"read them: compile again with them in the example inputs"
            )
        for name, expected in self.constants.items():
            got = flat.get(name)
            if not _same_constant(got, expected):
                raise ValueError(
                    f"argument {name!r} was {expected!r} when the model was compiled and is {got!r} now; "
                    f"the compiled graph is specialized to it: compile again with this value in the example inputs"
                )
        values = []
        for name in self.input_names:
            value = flat.get(name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(
                    f"argument {name!r} was a tensor when the model was compiled and is {type(value).__name__} now"
                )
            values.append(value)
        if shapes:
            self.check_shapes(dict(zip(self.input_names, values)))
        return values

    def check_shapes(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse tensor inputs (name -> value, every input) the graph does not hold for; fx graphs take any.

        Export graphs: every fixed dim must match, symbolic dims must be in their range and equal where
        they share a symbol, and export's own guards must pass. A runtime that splits a batch into
        microbatches checks one microbatch (that is what the graph runs on).
        """
        if self.input_shapes is None:
            return
        bound: dict[str, tuple[str, int, int]] = {}  # symbol -> (argument, dim, size) that set it
        for name, value in tensors.items():
            dims = self.input_shapes[name]
            if value.dim() != len(dims):
                raise ValueError(
                    f"argument {name!r} has {value.dim()} dims; the model was captured with torch.export for "
                    f"{len(dims)} ({_shape_str(dims)}): pass inputs with {len(dims)} dims, or compile again"
                )
            for i, (size, dim) in enumerate(zip(value.shape, dims)):
                if isinstance(dim, int):
                    if size != dim:
                        raise ValueError(self._fixed_dim_error(name, i, size, dim))
                    continue
                if size < dim.min or (dim.max is not None and size > dim.max):
                    step = (
                        "; cm.step cuts its batch into plan.microbatches x plan.data_degree chunks, which must be in "
                        "that range too: step on bigger batches or compile with fewer microbatches"
                    )
                    raise ValueError(
                        f"argument {name!r} has size {size} in dim {i}; the graph captured with torch.export holds "
                        f"for sizes {dim.min} to {dim.max if dim.max is not None else 'any'} there (the model's "
                        f"code requires it): pass a size in that range{step if i == 0 else ''}"
                    )
                if dim.symbol in bound and bound[dim.symbol][2] != size:
                    other, j, other_size = bound[dim.symbol]
                    raise ValueError(
                        f"argument {name!r} has size {size} in dim {i} and {other!r} has {other_size} in dim {j}; "
                        f"the graph captured with torch.export needs them equal (the model's code combines them)"
                    )
                bound.setdefault(dim.symbol, (name, i, size))
        if self.input_guards is not None:
            self.input_guards({**self.constants, **tensors})

    def _fixed_dim_error(self, name: str, dim: int, size: int, expected: int) -> str:
        head = f"argument {name!r} has size {size} in dim {dim}; the model was captured by torch.export for {expected}"
        static = next((f.reason for f in self.fallbacks if f.path == "static shapes"), None)
        if dim != 0 or static is None:
            return (
                f"{head} there and the graph is specialized to it (the model's code fixes that dim): pass inputs "
                f"with {expected} in dim {dim}, or compile again with inputs of this shape"
            )
        return (
            f"{head} there: the batch dim could not be made dynamic ({static}). Every call must have {expected} rows, "
            f"and so must every microbatch of cm.step, which splits its batch into plan.microbatches x "
            f"plan.data_degree chunks: to train on this graph, compile with microbatches=1 and pipeline=devices (one "
            f"chunk: no data parallelism) and step on batches of {expected}; to lift the limit, change the code that "
            f"fixes the batch size"
        )

    def unflatten_output(self, flat: list[Any] | tuple[Any, ...]) -> Any:
        values = list(flat)
        for position, constant in sorted(self.output_constants.items()):
            values.insert(position, constant)
        return pytree.tree_unflatten(values, self.out_spec)


class _ExportGuards:
    """torch.export's guards on the inputs (its `_guards_fn` module, which `ep.module()` calls first thing),
    run on our flat arguments."""

    def __init__(self, fn: Callable[..., Any], names: list[str]):
        self.fn = fn
        self.names = names  # export's placeholders the guards read, in order (tensors and constants)

    def failure(self, flat: dict[str, Any]) -> str | None:
        """The first condition `flat` breaks (e.g. "input_ids.size()[1] > 1"), or None."""
        try:
            self.fn(*[flat[n] for n in self.names])
        except Exception as e:
            return str(e).strip().removeprefix("Guard failed: ") or type(e).__name__
        return None

    def __call__(self, flat: dict[str, Any]) -> None:
        failed = self.failure(flat)
        if failed is not None:
            raise ValueError(
                f"the inputs break the condition {failed} of the graph captured with torch.export (export derived it "
                f"from the model's code for the dims it kept dynamic): pass inputs that satisfy it, or compile again "
                f"with inputs of this shape"
            )


def _shape_str(dims: tuple[int | DynamicDim, ...]) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else d.symbol for d in dims) + ")"


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict[str, Any]) -> inspect.BoundArguments:
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"the inputs do not match the model's forward{signature}: {e}") from None
    bound.apply_defaults()
    return bound


def flat_arguments(signature: inspect.Signature, bound: inspect.BoundArguments) -> dict[str, Any]:
    """The call's arguments as one ordered name -> value dict (the normal form's argument names).

    Named parameters keep their name; `*args` elements become `<name>_<i>`; `**kwargs` entries keep
    their key. Example: `forward(self, x, *rest, **kw)` called as `m(a, b, y=c)` gives
    `{"x": a, "rest_0": b, "y": c}`.
    """
    flat: dict[str, Any] = {}
    for p in signature.parameters.values():
        value = bound.arguments.get(p.name, () if p.kind == p.VAR_POSITIONAL else {})
        if p.kind == p.VAR_POSITIONAL:
            flat.update({f"{p.name}_{i}": v for i, v in enumerate(value)})
        elif p.kind == p.VAR_KEYWORD:
            flat.update(value)
        else:
            flat[p.name] = value
    return flat


def _rebuild_call(signature: inspect.Signature) -> Callable[[dict[str, Any]], tuple[tuple, dict[str, Any]]]:
    """Inverse of flat_arguments: flat dict -> (args, kwargs) for `forward`."""
    params = list(signature.parameters.values())
    has_varargs = any(p.kind == p.VAR_POSITIONAL for p in params)

    def rebuild(flat: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        named = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        for p in params:
            if p.kind == p.POSITIONAL_ONLY or (p.kind == p.POSITIONAL_OR_KEYWORD and has_varargs):
                args.append(flat[p.name])
            elif p.kind == p.VAR_POSITIONAL:
                prefix = f"{p.name}_"
                args.extend(v for k, v in flat.items() if k.startswith(prefix) and k[len(prefix) :].isdigit())
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                kwargs[p.name] = flat[p.name]
            else:  # **kwargs: every flat entry that is no named parameter nor a *args element
                var = next((q.name for q in params if q.kind == q.VAR_POSITIONAL), None)
                for k, v in flat.items():
                    if k in named or (var is not None and k.startswith(f"{var}_") and k[len(var) + 1 :].isdigit()):
                        continue
                    kwargs[k] = v
        return tuple(args), kwargs

    return rebuild


def _same_constant(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _forward_signature(model: nn.Module) -> inspect.Signature:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError) as e:
        raise ValueError(f"cannot read the signature of {type(model).__name__}.forward: {e}") from None


def capture(model: nn.Module, args: tuple = (), kwargs: dict[str, Any] | None = None) -> CapturedGraph:
    """Capture `model` called as `model(*args, **kwargs)` into the normal form described above.

    The model is not modified (a profiling run of module-level leaves restores buffers and RNG).
    Raises ValueError when the call does not fit `forward`, CaptureError when no path captures it.
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
            exported, gave_up = _trace_export_dynamic(model, signature, flat, tensor_names, rebuild)
            gm, input_shapes, guards = exported.graph_module, exported.shapes, exported.guards
            method = "export"
            fallbacks.extend(gave_up)
        except Exception as e_export:
            export_reason = f"torch.export failed: {_first_line(e_export)}"
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
        frozenset(
            f"{path}.{name}" if path else name
            for path, m in model.named_modules()
            for name in m._non_persistent_buffers_set
        ),
    )
    if leaves:
        from partitioner.leaves import attach_leaf_profiles

        notes = attach_leaf_profiles(model, gm, rebuild(flat))  # how each leaf's cost was obtained
        captured.fallbacks[:] = [
            replace(f, reason=f"{f.reason}; {notes[f.what]}") if f.path == "leaf" and f.what in notes else f
            for f in captured.fallbacks
        ]
    return captured


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


# ---------------------------------------------------------------------------------------------------
# fx (paths 1 and 3)


class _Tracer(fx.Tracer):
    """fx.Tracer over a generated root function with one parameter per tensor input (constants are
    closed over, so no guard nodes), keeping the modules in `leaves` opaque. A failure is tagged with
    the innermost module whose code raised it (`_partitioner_module`)."""

    def __init__(self, root_fn: Callable[..., Any], leaves: frozenset[str]):
        super().__init__()
        self._root_fn = root_fn
        self._leaves = leaves
        # Buffers become get_attr nodes, so `self.counter.add_(1)` is recorded, not run once at trace time.
        self.proxy_buffer_attributes = True

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> tuple:
        return super().create_args_for_root(self._root_fn, is_module, None)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves or super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as e:
            path = self.submodule_paths.get(m) if self.submodule_paths else None
            # A leaf that fails while being recorded (unsupported argument type) blames its caller.
            if not hasattr(e, "_partitioner_module") and path is not None and path not in self._leaves:
                e._partitioner_module = path  # type: ignore[attr-defined]
            raise


def _root_function(
    model: nn.Module, flat: dict[str, Any], tensor_names: list[str], rebuild: Callable, recorded: dict[str, Any]
) -> Any:
    """`def forward(self, <tensor inputs>)` calling the model's forward with the constants of `flat` filled in.

    It returns the flat leaves of the model's output and puts their pytree spec in `recorded["out_spec"]`:
    flattened here, before fx turns lists and dicts into its immutable_list / immutable_dict (and a
    ModelOutput into an immutable_dict), the spec keeps the model's own container types.
    """
    call_args = ", ".join(f"{n!r}: {n}" for n in tensor_names)
    source = f"def forward(self, {', '.join(tensor_names)}):\n    return _call({{{call_args}}})\n"
    forward = model.forward

    def call(tensors: dict[str, Any]) -> tuple:
        args, kwargs = rebuild({n: tensors.get(n, v) for n, v in flat.items()})
        leaves, recorded["out_spec"] = pytree.tree_flatten(forward(*args, **kwargs))
        return tuple(leaves)

    namespace: dict[str, Any] = {"_call": call}
    exec(compile(source, f"<partitioner.capture root of {type(model).__name__}>", "exec"), namespace)
    return namespace["forward"]


def _trace_fx(
    model: nn.Module, flat: dict[str, Any], tensor_names: list[str], rebuild: Callable, leaves: frozenset[str]
) -> fx.GraphModule:
    recorded: dict[str, Any] = {}
    tracer = _Tracer(_root_function(model, flat, tensor_names, rebuild, recorded), leaves)
    with _NoTraceTimeMutation(model):
        graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.meta["out_spec"] = recorded["out_spec"]
    for ph, name in zip([n for n in gm.graph.nodes if n.op == "placeholder"], tensor_names):
        ph.target = name
        ph.args = ()
    return gm


class _NoTraceTimeMutation:
    """Fails a trace that changed the model while tracing (something fx or export ran once instead of
    recording it: an in-place update of a parameter or buffer, `self.steps += 1` on a Python attribute),
    after putting everything back (buffers, Python attributes, the RNG state). Such a graph would silently
    lack the update. The error names the module, so the module-level fallback makes that module a leaf.
    """

    _SCALARS = (bool, int, float, str)

    def __init__(self, model: nn.Module):
        self.tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()]]
        self.versions = [t._version for _, t in self.tensors]
        self.buffers = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
        self.modules = list(model.named_modules())
        self.attrs = [{k: v for k, v in vars(m).items() if type(v) in self._SCALARS} for _, m in self.modules]
        self.rng = torch.get_rng_state()

        self.changed_in_call: list[tuple[str, str]] = []  # export puts attributes back before returning
        self._setattr = nn.Module.__setattr__

    def __enter__(self) -> None:
        # Export restores module attributes before it returns, so watch attribute writes while it runs:
        # nn.Module.__setattr__ is wrapped for the duration of the trace (reads are untouched).
        paths = {id(m): path for path, m in self.modules}
        original, changed, scalars = self._setattr, self.changed_in_call, self._SCALARS

        def watching_setattr(mod: nn.Module, name: str, value: Any) -> None:
            if id(mod) in paths and name != "training" and type(value) in scalars:
                old = mod.__dict__.get(name)
                if type(old) in scalars and old != value:
                    changed.append((paths[id(mod)], name))
            original(mod, name, value)

        nn.Module.__setattr__ = watching_setattr  # type: ignore[method-assign]

    def __exit__(self, *exc: object) -> None:
        nn.Module.__setattr__ = self._setattr  # type: ignore[method-assign]
        torch.set_rng_state(self.rng)
        changed_attrs = list(self.changed_in_call)
        for (path, m), attrs in zip(self.modules, self.attrs):
            for k, v in attrs.items():
                if getattr(m, k, None) is not v and getattr(m, k, None) != v:
                    changed_attrs.append((path, k))
                    object.__setattr__(m, k, v)
        changed = [n for (n, t), v in zip(self.tensors, self.versions) if t._version != v]
        if changed:
            with torch.no_grad():
                for b, saved in self.buffers:
                    b.copy_(saved)
        if exc[0] is not None or not (changed or changed_attrs):
            return
        if changed_attrs:
            path, attr = changed_attrs[0]
            error = CaptureError(
                f"tracing changed the Python attribute {attr!r} of {path or 'the model'} (Python state updated in "
                f"forward cannot be recorded in a graph)"
            )
            error._partitioner_module = path  # type: ignore[attr-defined]
            raise error
        raise CaptureError(f"tracing ran an in-place update of {changed} instead of recording it")


def _make_mutations_explicit(gm: fx.GraphModule) -> None:
    """Give in-place ops data edges: a use of a value after an in-place op on it reads the op's result.

    Pipeline planning only sees data edges; without this, `h.relu_()` (no users) could be placed on a
    later stage than a reader of `h`, which would then read the value before the update. An in-place op
    returns the tensor it updated, so the rewrite computes the same values. Reads of a buffer or parameter
    (get_attr of the same target) after an in-place op on it are rewired the same way.
    """
    latest: dict[Any, fx.Node] = {}  # value (node, or get_attr target) -> node holding its updated version

    def key(v: fx.Node) -> Any:
        return ("attr", v.target) if v.op == "get_attr" else v

    def newest(v: fx.Node) -> fx.Node:
        # Versions chain: `buf.add_(1)` makes add_ the buffer's version, `add_.add_(1)` then add__1 add_'s.
        while key(v) in latest:
            v = latest[key(v)]
        return v

    for node in list(gm.graph.nodes):
        node.args = fx.node.map_arg(node.args, newest)
        node.kwargs = fx.node.map_arg(node.kwargs, newest)
        if node.op == "output":  # the model returns the updated version too (one value crosses, not two)
            break
        target = _mutated_argument(gm, node)
        if target is not None:
            latest[key(target)] = node


def _mutated_argument(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    """The argument `node` updates in place and returns (`x.add_(1)`, `F.relu(x, inplace=True)`), if any."""
    first = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    if first is None:
        return None
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return first
    if node.op == "call_module":
        return first if getattr(gm.get_submodule(node.target), "inplace", False) is True else None
    if node.op != "call_function":
        return None
    schema = getattr(node.target, "_schema", None)
    if schema is not None:  # ATen op (export graphs): mutates and returns its first argument
        arg0 = schema.arguments[0].alias_info if schema.arguments else None
        ret0 = schema.returns[0].alias_info if schema.returns else None
        return first if arg0 is not None and arg0.is_write and ret0 is not None else None
    if node.kwargs.get("inplace") is True:
        return first
    name = getattr(node.target, "__name__", "")
    return first if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name) else None


def _trace_with_leaves(
    model: nn.Module,
    flat: dict[str, Any],
    tensor_names: list[str],
    rebuild: Callable,
    fx_reason: str,
    export_reason: str,
) -> tuple[fx.GraphModule, dict[str, str]]:
    """Path 3: trace, make the innermost failing module a leaf, repeat. Returns the graph and leaf -> reason."""
    reasons: dict[str, str] = {}
    for _ in range(_MAX_LEAF_ROUNDS):
        try:
            gm = _trace_fx(model, flat, tensor_names, rebuild, frozenset(reasons))
        except Exception as e:
            path = getattr(e, "_partitioner_module", "")
            if not path:
                raise CaptureError(
                    f"could not capture {type(model).__name__}: {fx_reason}; {export_reason}; and the failure is in "
                    f"{type(model).__name__}.forward's own code, not in a submodule that could be kept opaque "
                    f"({_first_line(e)}). Fix: move that code (e.g. a branch on a tensor's value) into a submodule, "
                    f"or express it with torch.cond"
                ) from e
            # The new leaf subsumes the leaves inside it.
            reasons = {p: r for p, r in reasons.items() if not p.startswith(path + ".")}
            reasons[path] = f"torch.fx cannot trace it: {_first_line(e)}"
            continue
        for node in gm.graph.nodes:
            if node.op == "call_module" and node.target in reasons:
                node.meta["capture_leaf"] = reasons[node.target]
        return gm, reasons
    raise CaptureError(f"could not capture {type(model).__name__}: more than {_MAX_LEAF_ROUNDS} untraceable modules")


# ---------------------------------------------------------------------------------------------------
# torch.export (path 2)


@dataclass
class _Exported:
    graph_module: fx.GraphModule
    shapes: dict[str, tuple[int | DynamicDim, ...]]  # CapturedGraph.input_shapes
    guards: _ExportGuards | None


def _trace_export_dynamic(
    model: nn.Module, signature: inspect.Signature, flat: dict[str, Any], tensor_names: list[str], rebuild: Callable
) -> tuple[_Exported, list[Fallback]]:
    """Path 2: export with every input dim left to export (Dim.AUTO, size-oblivious); the static export if that
    fails. Returns the export and what it gave up: `Fallback(path="static shapes")` when dim 0 of some input
    stayed fixed, `"batch > 1"` when the graph does not take one-row batches (the model's code tells them
    apart, and they could not be shown to be computed alike). Raises when the static export fails too.

    One-row batches: with size-oblivious symbols, code such as HF's `if batch_size != position_ids.shape[0]:
    expand(...)` becomes a guard `batch != 1`, refusing the one-row microbatches a step may cut. torch's default
    export assumes instead that what it traced for 2+ rows holds for 1 (right for such an expand, wrong for a
    branch that computes something else at 1). That export is taken only where it is checked: its graph must
    give what the model gives on the example's first row (so this needs real weights).
    """
    try:
        exported = _trace_export(model, signature, flat, tensor_names, rebuild, dynamic=True)
    except Exception as e:
        exported = _trace_export(model, signature, flat, tensor_names, rebuild, dynamic=False)
        return exported, [Fallback("", "static shapes", f"torch.export with dynamic dims failed: {_first_line(e)}")]
    fixed = [n for n, dims in exported.shapes.items() if dims and isinstance(dims[0], int)]
    if fixed:
        pinned = ", ".join(f"{n!r} to {exported.shapes[n][0]}" for n in fixed)
        reason = (
            f"torch.export fixed dim 0 of {pinned}: the model's code pins it (e.g. it combines the input with a "
            f"tensor of that size, reshapes it to a constant shape, or branches on it)"
        )
        return exported, [Fallback("", "static shapes", reason)]
    refusal = _one_row_refusal(exported, flat, tensor_names)
    if refusal is None:
        return exported, []
    try:
        assumed: _Exported | None = _trace_export(
            model, signature, flat, tensor_names, rebuild, dynamic=True, oblivious=False
        )
    except Exception:
        assumed = None
    why = ""
    if assumed is not None and _one_row_refusal(assumed, flat, tensor_names, allow=True) is None:
        different = _same_on_first_row(model, assumed.graph_module, flat, tensor_names, rebuild)
        if different is None:
            return assumed, []
        why = f" ({different})"
    reason = f"the graph does not take batches of one row{why}: {refusal}; calls and microbatches need more rows"
    return exported, [Fallback("", "batch > 1", reason)]


def _one_row_refusal(
    exported: _Exported, flat: dict[str, Any], tensor_names: list[str], *, allow: bool = False
) -> str | None:
    """Why `exported` refuses the example cut to one row in dim 0, or None. allow: take one row where export's
    range starts at 2 (torch's default 0/1 assumption); those ranges then start at 1."""
    batch = {dims[0].symbol for dims in exported.shapes.values() if dims and isinstance(dims[0], DynamicDim)}
    for name, dims in exported.shapes.items():
        for i, d in enumerate(dims):
            if isinstance(d, DynamicDim) and d.symbol in batch and d.min > (2 if allow else 1):
                return f"dim {i} of {name!r} must be {d.min} or more"
    if allow:
        exported.shapes = {
            n: tuple(replace(d, min=1) if isinstance(d, DynamicDim) and d.symbol in batch else d for d in dims)
            for n, dims in exported.shapes.items()
        }
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
    attributes and the RNG states are put back."""
    if _on_meta(model, flat):
        return "it may: the model is on meta, so it was not checked"
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
            guards = _ExportGuards(gm.get_submodule("_guards_fn"), [a.name for a in node.args])
            gm.graph.erase_node(node)
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    out_spec = gm.graph._codegen.pytree_info.out_spec if hasattr(gm.graph._codegen, "pytree_info") else None
    gm.graph._codegen = fx.graph.CodeGen()
    # Export makes one placeholder per input leaf, named after its argument; non-tensor ones are
    # specialized (unused) and dropped.
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
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


def _flatten_output(gm: fx.GraphModule) -> tuple[pytree.TreeSpec, dict[int, None]]:
    """Make the output node return a flat tuple of nodes; return the spec that rebuilds the model's output
    (recorded by the capture path in `gm.meta["out_spec"]`) and the positions of None leaves (kept out of the
    graph, put back by `unflatten_output`)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    flat = list(value) if isinstance(value, (list, tuple)) else [value]
    spec = gm.meta.pop("out_spec", None)
    if spec is None:  # an export without its output spec: the graph's own output structure
        flat, spec = pytree.tree_flatten(value)
    nones = {i: None for i, leaf in enumerate(flat) if leaf is None}
    for leaf in flat:
        if not isinstance(leaf, fx.Node) and leaf is not None:
            raise CaptureError(
                f"the model returns a {type(leaf).__name__} ({leaf!r}) among its outputs; return tensors (in tuples, "
                f"lists, dicts or containers registered with torch.utils._pytree) only, or drop it"
            )
    out.args = (tuple(leaf for leaf in flat if leaf is not None),)
    return spec, nones
