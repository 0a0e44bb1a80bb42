"""Whether a graph traced for batches of 2+ rows computes, at one row, what the model's own one-row trace computes.

torch.export assumes by default that what it traced for a symbolic batch of 2+ rows holds for 1 (its 0/1
specialization). Code that tells one row apart breaks that assumption when its two branches compute different things;
where they compute the same (HF's `if batch_size != position_ids.shape[0]: position_ids = position_ids.expand(...)`,
a no-op at one row), one-row microbatches are safe. With real weights the caller runs both on a row of the example
(capture.export._same_on_first_row). On the meta device nothing can be run, so this module compares what the two
graphs do instead: each is replayed on meta tensors of one row (shapes and strides only), its symbolic sizes evaluated,
and the ATen calls it makes are listed with their arguments; the lists must be equal once the calls that return their
input unchanged (a view of the same shape and strides, e.g. an expand to the size it has) are dropped.

Invariant: None ("the same") only when the two graphs make the same ATen calls, in the same order, on the same
inputs, parameters and constants, with the same non-tensor arguments, and return the same values: then they compute
the same thing at one row whatever the weights. Any other difference (an op, an argument, an order) is reported,
never explained away: a false "different" costs one-row microbatches, a false "same" would cost correctness.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

Event = tuple[str, tuple[Any, ...]]  # (op, its arguments with tensors as references): one ATen call


def graphs_differ_at_one_row(
    assumed: fx.GraphModule, one_row: fx.GraphModule, inputs: dict[str, torch.Tensor], names: Sequence[str]
) -> str | None:
    """None when `assumed` (traced for 2+ rows) and `one_row` (the model traced at one row) make the same ATen calls
    on `inputs` (meta tensors of one row, keyed by placeholder target; `names` in call order); else the first
    difference, in words."""
    a = _calls(assumed, inputs, names)
    b = _calls(one_row, inputs, names)
    for i, (x, y) in enumerate(zip(a[0], b[0])):
        if x != y:
            return f"call {i} differs at one row: {_describe(x)} against {_describe(y)} traced at one row"
    if len(a[0]) != len(b[0]):
        return f"{len(a[0])} calls against {len(b[0])} traced at one row"
    if a[1] != b[1]:
        return "the outputs differ at one row"
    return None


def _describe(event: Event) -> str:
    return f"{event[0]}{event[1]}"[:160]


class _Recorder(fx.Interpreter):
    """Runs a graph on meta tensors and lists its ATen calls, each tensor argument named by where it came from:
    ("input", name), ("attr", qualified name) or ("call", index of the listed call that made it)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.events: list[Event] = []
        self.origin: dict[int, Any] = {}  # id(tensor) -> its reference
        self.keep: list[torch.Tensor] = []  # every tensor referenced, alive, so that no id is reused

    def _name(self, t: torch.Tensor, ref: Any) -> None:
        self.origin.setdefault(id(t), ref)
        self.keep.append(t)

    def placeholder(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().placeholder(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            self._name(value, ("input", str(target)))
        return value

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        if isinstance(value, torch.Tensor):
            value = value.to("meta") if not value.is_meta else value
            self._name(value, ("attr", str(target)))
        return value

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        out = super().call_function(target, args, kwargs)
        if target is operator.getitem:  # an element of a call's tuple or list: named by that call already
            return out
        tensors_out = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        # A call that writes its arguments is listed whatever it returns (an in-place op returns its input, named
        # already): dropping it would hide a write one graph makes and the other does not.
        mutates = bool(getattr(getattr(target, "_schema", None), "is_mutable", False))
        if not tensors_out and not mutates:  # sizes, int arithmetic, asserts: their values enter the calls reading them
            return out
        first = next((a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)), None)
        if (
            not mutates
            and first is not None
            and len(tensors_out) == 1
            and _returns_input_unchanged(target, first, tensors_out[0])
        ):
            self._name(tensors_out[0], self.origin.get(id(first), ("unknown",)))
            return out
        index = len(self.events)
        self.events.append((str(target), self._refs((args, kwargs))))
        for k, t in enumerate(tensors_out):
            self._name(t, ("call", index, k))
        return out

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        raise NotImplementedError("export graphs call no modules")

    def output(self, target: Any, args: Any, kwargs: Any) -> Any:
        self.result = self._refs(args)
        return super().output(target, args, kwargs)

    def _refs(self, value: Any) -> Any:
        """`value` with every tensor replaced by its reference (an unnamed one by its shape: a mismatch either way)."""
        if isinstance(value, torch.Tensor):
            return self.origin.get(id(value), ("unnamed", tuple(value.shape), str(value.dtype)))
        if isinstance(value, (list, tuple)):
            return tuple(self._refs(v) for v in value)
        if isinstance(value, dict):
            return tuple(sorted((k, self._refs(v)) for k, v in value.items()))
        if isinstance(value, (torch.dtype, torch.device, torch.memory_format, torch.layout)):
            return str(value)
        if isinstance(value, fx.GraphModule):  # a higher-order op's subgraph: the same only if its code is
            return ("graph", value.code)
        if isinstance(value, torch.SymInt | torch.SymFloat | torch.SymBool):
            raise ValueError(f"a symbolic value {value} is left at one row")
        return value


def _returns_input_unchanged(target: Any, first: torch.Tensor, out: torch.Tensor) -> bool:
    """A view op whose result has its input's shape, strides and offset: the input itself (e.g. expand(1, -1) of a
    tensor of one row, or a reshape to the shape it has)."""
    is_view = getattr(target, "is_view", False)
    return bool(
        is_view
        and out.shape == first.shape
        and out.stride() == first.stride()
        and out.storage_offset() == first.storage_offset()
        and out.dtype == first.dtype
    )


def _calls(gm: fx.GraphModule, inputs: dict[str, torch.Tensor], names: Sequence[str]) -> tuple[list[Event], Any]:
    recorder = _Recorder(gm)
    placeholders = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    if sorted(placeholders) != sorted(names):
        raise ValueError(f"placeholders {placeholders} are not the inputs {list(names)}")
    with torch.no_grad():
        recorder.run(*[inputs[p] for p in placeholders])
    return recorder.events, recorder.result
