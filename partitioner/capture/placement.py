"""capture/placement: record a model's module calls by running its real forward ("module-placement").

The capture for models no graph can hold: a forward that branches or loops on tensor values in its own code
(fx refuses `bool(proxy)`, export refuses to guard on data, and the module-level fallback cannot make the root
a leaf). Like SageMaker's model parallelism, this mode never needs a graph: it runs the forward once on the
example inputs with a pre- and post-hook on every submodule and records the call tree: for each call its module
path, its parent call, and, inclusive of everything it calls, the forward FLOPs (FlopCounterMode), the activation
bytes autograd saves for backward (saved_tensors_hooks, each storage once) and the bytes of its tensor inputs and
outputs; besides, which named parameters and buffers its own code hands to torch functions (a TorchFunctionMode: how
plan.placement finds a weight two stages use) and whether it wrote one of its tensor arguments in place (their
version counters). `plan.placement` chooses which modules to place and where; at
run time the real forward runs and each placed module's calls run on its stage (`runtime.placement`).

Invariants: the model is left as it was (buffers, Python scalar attributes and the RNG state restored; the example
inputs cloned before use; no gradient produced); call 0 is the root's call and every other call's parent precedes
it; a call's figures include its descendants'. The recording is of one run: the branch the example inputs take.
A module that run never calls has no call (plan.placement puts it with the top-level code and says so).
Example: `M.forward` = `a(x)`, then `b(x)` or `-b(x)` by `x.sum() > 0`, then `d(relu(c(x)))` records the calls
"" (root), "a", "b", "c", "d", each with parent 0.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils.flop_counter import FlopCounterMode

from partitioner.leaves import _clone, _State, _tensors
from partitioner.meta import storage_key

__all__ = ["METHOD", "CallRecord", "ModuleCall", "record_calls"]

METHOD = "module-placement"


@dataclass(frozen=True)
class ModuleCall:
    """One call of one module in the recorded run; figures inclusive of the calls it makes."""

    index: int  # position in call order (0: the root's call)
    path: str  # the module's qualified name ("" for the root)
    parent: int  # index of the call it happened in (-1 for the root's call)
    flops: int  # forward FLOPs
    saved_bytes: int  # activation bytes autograd keeps for backward (0 when not training)
    in_bytes: int  # bytes of its tensor arguments
    out_bytes: int  # bytes of its tensor outputs
    dtype: str  # the dtype its floating-point outputs (else inputs) have, for the cost model ("float32" if none)
    # parameters and buffers its own code hands to torch functions (not those of the calls it makes), by the first
    # name of each: `self.weight` in F.linear, or another module's weight read directly (a tied LM head)
    reads: tuple[str, ...] = ()
    # it wrote one of its tensor arguments in place (nn.ReLU(inplace=True), `x += ...`): run elsewhere, the write would
    # land on a copy, so plan.placement never places such a module (its code runs where its caller's does)
    writes_inputs: bool = False


@dataclass
class CallRecord:
    """The recorded run: its calls in order and the model's parameters and buffers."""

    calls: list[ModuleCall]
    training: bool
    # qualified name -> (numel, element size, requires_grad, is_buffer): every parameter and buffer once (a tied one
    # under its first name)
    tensors: dict[str, tuple[int, int, bool, bool]] = field(default_factory=dict)
    children: dict[int, list[int]] = field(default_factory=dict)  # call index -> the calls made directly in it
    master_weights: bool = False  # the optimizer's state as plan.graph.static_bytes_per_param prices it

    def __post_init__(self) -> None:
        for c in self.calls[1:]:
            self.children.setdefault(c.parent, []).append(c.index)


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(value))


def _dtype(args: Any, out: Any) -> str:
    floating = [t.dtype for t in _tensors(out) + _tensors(args) if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


class _Reads(TorchFunctionMode):
    """Adds, to the innermost running call's "reads", every named parameter or buffer a torch function is given."""

    def __init__(self, names: dict[int, str], stack: list[int], calls: list[dict[str, Any]]):
        super().__init__()
        self.names, self.stack, self.calls = names, stack, calls

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if self.stack:
            for t in pytree.tree_leaves((args, kwargs)):
                name = self.names.get(id(t)) if isinstance(t, torch.Tensor) else None
                if name is not None:
                    self.calls[self.stack[-1]].setdefault("reads", set()).add(name)
        return func(*args, **(kwargs or {}))


def record_calls(model: nn.Module, args: tuple, kwargs: dict[str, Any], *, training: bool) -> CallRecord:
    """Run `model(*args, **kwargs)` once with every submodule hooked and return its calls (see module docstring).

    Training runs the forward with gradients enabled (to count what autograd saves) and never runs a backward.
    Raises ValueError when the forward fails on the example inputs; on meta tensors that is the usual case (a branch
    on a value needs the value), and the message says to build the model with real weights.
    """
    names = {id(m): path for path, m in model.named_modules()}
    calls: list[dict[str, Any]] = []
    stack: list[int] = []
    seen: set[int] = set()
    params = {storage_key(p) for p in model.parameters()}
    saved = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in params and key not in seen:
            seen.add(key)
            saved[0] += t.untyped_storage().nbytes()
            kept.append(t)  # alive until the end, so no later storage takes over its key
        return t

    kept: list[torch.Tensor] = []
    counter = FlopCounterMode(display=False)
    tensor_names = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    reads = _Reads(tensor_names, stack, calls)

    def pre(module: nn.Module, a: tuple, kw: dict[str, Any]) -> None:
        index = len(calls)
        calls.append({
            "index": index, "path": names[id(module)], "parent": stack[-1] if stack else -1,
            "in_bytes": _nbytes((a, kw)), "flops": counter.get_total_flops(), "saved": saved[0],
            "args": (a, kw), "versions": [t._version for t in _tensors((a, kw))],
        })  # fmt: skip
        stack.append(index)

    def post(module: nn.Module, a: tuple, kw: dict[str, Any], out: Any) -> None:
        c = calls[stack.pop()]
        c["flops"] = counter.get_total_flops() - c["flops"]
        c["saved"] = saved[0] - c["saved"]
        c["out_bytes"] = _nbytes(out)
        c["writes_inputs"] = [t._version for t in _tensors(c["args"])] != c.pop("versions")
        c["dtype"] = _dtype(c.pop("args"), out)

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(m.register_forward_hook(post, with_kwargs=True))
    state = _State(model)
    call_args, call_kwargs = _clone((args, kwargs))
    try:
        with torch.set_grad_enabled(training), counter, saved_tensors_hooks(pack, lambda t: t), reads:
            model(*call_args, **call_kwargs)
    except Exception as e:
        on_meta = any(t.is_meta for t in [*model.parameters(), *_tensors((args, kwargs))])
        fix = (
            "build the model with real weights and pass real example inputs: a branch on a tensor's value needs the "
            "value, which meta tensors do not have"
            if on_meta
            else "pass example inputs the model accepts"
        )
        raise ValueError(
            f"module placement runs {type(model).__name__}'s forward on the example inputs to record its calls, and "
            f"it failed ({type(e).__name__}: {e}): {fix}"
        ) from e
    finally:
        for h in handles:
            h.remove()
        state.restore()
    if stack or any("out_bytes" not in c for c in calls):
        raise ValueError(f"{type(model).__name__}'s forward left a module call unfinished; it cannot be recorded")
    records = [
        ModuleCall(c["index"], c["path"], c["parent"], int(c["flops"]), c["saved"] if training else 0,
                   c["in_bytes"], c["out_bytes"], c["dtype"], tuple(sorted(c.get("reads", ()))),
                   c["writes_inputs"])
        for c in calls
    ]  # fmt: skip
    tensors = {n: (p.numel(), p.element_size(), p.requires_grad, False) for n, p in model.named_parameters()}
    tensors.update((n, (b.numel(), b.element_size(), False, True)) for n, b in model.named_buffers())
    return CallRecord(records, training, tensors)
