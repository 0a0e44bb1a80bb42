"""capture.fx: torch.fx tracing of the whole model (capture path 1), and of everything but the submodules fx cannot
trace, kept as opaque leaves (path 3); the trace-time mutation guard both paths and export share; in-place ops
given data edges (`_make_mutations_explicit`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.capture.normal_form import CaptureError, UncapturableForward, _first_line

_MAX_LEAF_ROUNDS = 256  # module-level fallback: re-traces at most this many times


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
                raise UncapturableForward(
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
    raise UncapturableForward(
        f"could not capture {type(model).__name__}: more than {_MAX_LEAF_ROUNDS} untraceable modules"
    )
