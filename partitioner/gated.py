"""gated: a gated activation `act(gate) * up` (SwiGLU, GeGLU, ReGLU, GLU) that saves only its two inputs.

Run as two eager ops, `s = silu(gate)` and `s * up`, autograd keeps gate (for silu's backward), s and up (for the
product's): three tensors of the MLP's width per token, and the down projection keeps the product, a fourth.
Megatron's fused `bias_swiglu_impl` and Transformer Engine keep the two inputs and recompute the activation in the
backward: one width fewer per token and layer (a quarter of the MLP's saved activations; in a Llama layer 6.5 of
about 25 units of tokens x hidden at d_ff = 3.25 d). `gated_activation` does the same in eager torch:

    forward:   act(gate) * up                       (the same kernels, bit-identical outputs)
    backward:  s = act(gate) again;  grad_up = grad * s;  grad_gate = act_backward(grad * up, gate or s)

with the ATen backward kernels autograd itself calls for each activation (`silu_backward`, `gelu_backward`,
`threshold_backward`, `sigmoid_backward`, `tanh_backward`), so the gradients are bit-identical to the unfused
pair's. The price: one more elementwise pass over the gate in the backward (annotate charges it).

`gated_pair(mul)` finds the pattern in a captured graph (fx or torch.export: `F.silu` / `nn.SiLU` / `aten.silu`
and the other activations, then `*` / `torch.mul` / `aten.mul.Tensor` with an operand of its own); annotate prices
a node it matches as fused, and passes.fuse_gated rewrites the same nodes in the graphs the runtime executes.
The call falls back to the two eager ops where the fusion would not be the pair (operands of different shapes or
dtypes: a broadcast or type promotion), where nothing needs a gradient, and under double backward.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["ACTIVATIONS", "GatedPair", "gated_activation", "gated_pair", "runs_fused"]

_aten = torch.ops.aten

# activation name -> (forward from (input, gelu's approximation), backward from (grad of the activation's output, its
# input, its output, gelu's approximation)): the ATen backward kernels autograd calls for each
ACTIVATIONS: dict[str, Any] = {
    "silu": (lambda x, approximate: F.silu(x), lambda g, x, y, approximate: _aten.silu_backward(g, x)),
    "gelu": (
        lambda x, approximate: F.gelu(x, approximate=approximate),
        lambda g, x, y, approximate: _aten.gelu_backward(g, x, approximate=approximate),
    ),
    "relu": (lambda x, approximate: torch.relu(x), lambda g, x, y, approximate: _aten.threshold_backward(g, y, 0)),
    "sigmoid": (lambda x, approximate: torch.sigmoid(x), lambda g, x, y, approximate: _aten.sigmoid_backward(g, y)),
    "tanh": (lambda x, approximate: torch.tanh(x), lambda g, x, y, approximate: _aten.tanh_backward(g, y)),
}


def _activate(x: torch.Tensor, act: str, approximate: str) -> torch.Tensor:
    return ACTIVATIONS[act][0](x, approximate)


def runs_fused(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Whether `gated_activation` runs the fused op for operands like these (gate, or the activation's output, which
    has its shape and dtype) when gradients are on: something needs a gradient and the product is elementwise, with
    no broadcast or type promotion. annotate prices by the same test."""
    return (
        (gate.requires_grad or up.requires_grad)
        and gate.shape == up.shape
        and gate.dtype == up.dtype
        and gate.device == up.device
    )


class _GatedActivation(torch.autograd.Function):
    """act(gate) * up (or up * act(gate) where `gate_first` is False), saving gate and up only."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: str, approximate: str, gate_first: bool) -> Any:
        ctx.save_for_backward(gate, up)
        ctx.act, ctx.approximate = act, approximate
        s = _activate(gate, act, approximate)
        return s * up if gate_first else up * s

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> Any:
        gate, up = ctx.saved_tensors
        s = _activate(gate, ctx.act, ctx.approximate)
        grad_up = grad * s if ctx.needs_input_grad[1] else None
        grad_gate = None
        if ctx.needs_input_grad[0]:
            grad_gate = ACTIVATIONS[ctx.act][1](grad * up, gate, s, ctx.approximate)
        return grad_gate, grad_up, None, None, None


def gated_activation(
    gate: torch.Tensor, up: torch.Tensor, act: str = "silu", approximate: str = "none", gate_first: bool = True
) -> torch.Tensor:
    """`act(gate) * up` (`up * act(gate)` where gate_first is False), saving only gate and up for backward (module
    docstring). `act`: a key of ACTIVATIONS; `approximate`: gelu's ("none" or "tanh")."""
    if act not in ACTIVATIONS:
        raise ValueError(f"gated_activation: unknown activation {act!r}; known: {sorted(ACTIVATIONS)}")
    if not (torch.is_grad_enabled() and runs_fused(gate, up)):
        s = _activate(gate, act, approximate)
        return s * up if gate_first else up * s
    return _GatedActivation.apply(gate, up, act, approximate, gate_first)


@dataclass(frozen=True)
class GatedPair:
    """A matched `act(gate) * up`: the activation node (whose only use is the product), the activation's name and
    gelu's approximation, the gate (the activation's input) and the other operand, and the operands' order."""

    activation: fx.Node
    act: str
    approximate: str
    gate: fx.Node
    up: Any
    gate_first: bool


_FUNCTIONS = {F.silu: "silu", F.gelu: "gelu", F.relu: "relu", torch.relu: "relu", torch.sigmoid: "sigmoid",
              F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh"}  # fmt: skip
_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_ATEN = {_aten.silu.default: "silu", _aten.gelu.default: "gelu", _aten.relu.default: "relu",
         _aten.sigmoid.default: "sigmoid", _aten.tanh.default: "tanh"}  # fmt: skip
_MODULES = {nn.SiLU: "silu", nn.GELU: "gelu", nn.ReLU: "relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
_MULS = {operator.mul, torch.mul, _aten.mul.Tensor}


def _activation(n: Any, root: nn.Module | None) -> tuple[str, str] | None:
    """(activation, gelu's approximation) of an out-of-place activation node applied to one tensor, else None."""
    if not isinstance(n, fx.Node) or len(n.args) != 1 or not isinstance(n.args[0], fx.Node):
        return None
    kwargs = dict(n.kwargs)
    approximate = kwargs.pop("approximate", "none")
    if kwargs.pop("inplace", False) or kwargs:
        return None
    if n.op == "call_function":
        act = _ATEN.get(n.target) if isinstance(n.target, torch._ops.OpOverload) else _FUNCTIONS.get(n.target)
    elif n.op == "call_method":
        act = _METHODS.get(str(n.target))
    elif n.op == "call_module" and root is not None:
        module = root.get_submodule(str(n.target))
        act = _MODULES.get(type(module))  # the class itself: a subclass may compute something else
        if act is None or getattr(module, "inplace", False):
            return None
        approximate = getattr(module, "approximate", "none")
    else:
        return None
    if act is None or (act != "gelu" and approximate != "none") or approximate not in ("none", "tanh"):
        return None
    return act, approximate


def gated_pair(mul: fx.Node, root: nn.Module | None = None) -> GatedPair | None:
    """The gated activation product `mul` computes, or None: `mul` is an out-of-place product of two values (`*`,
    `torch.mul`, `Tensor.mul`, `aten.mul.Tensor`), one of them an activation node (`_activation`) whose only use is
    `mul`, the other another value. `root`: the module holding the graph's submodules (default: its owner).
    Shapes and dtypes are checked at each call (`gated_activation` falls back to the pair where they differ)."""
    root = root if root is not None else mul.graph.owning_module
    is_mul = mul.op == "call_function" and mul.target in _MULS or mul.op == "call_method" and mul.target == "mul"
    if not is_mul:
        return None
    if len(mul.args) != 2 or mul.kwargs or mul.args[0] is mul.args[1]:
        return None
    for i, operand in enumerate(mul.args):
        found = _activation(operand, root)
        if found is not None and len(operand.users) == 1:
            other = mul.args[1 - i]
            if not isinstance(other, fx.Node):
                return None  # a product with a number: nothing saved for the activation's output anyway
            return GatedPair(operand, found[0], found[1], operand.args[0], other, gate_first=i == 0)
    return None
