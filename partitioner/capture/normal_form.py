"""capture.normal_form: what capture returns (`CapturedGraph`: the normal form of partitioner.capture's docstring),
how a call binds to it (flat arguments, constants, shapes checked against an export's symbolic dims) and the
fallback records every capture path writes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

__all__ = ["CaptureError", "CapturedGraph", "DynamicDim", "Fallback", "UncapturableForward", "flat_arguments"]


class CaptureError(RuntimeError):
    """No capture path worked; the message lists each path's error and what to change."""


class UncapturableForward(CaptureError):
    """No graph holds the model's own forward (a branch on a tensor's value in its code, Python state it updates, too
    many untraceable modules), while the model itself runs: compile places its modules instead (capture.placement)."""


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


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
