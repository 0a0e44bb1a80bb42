"""plan.tensor_ops: the op vocabulary of the sharding rules (plan.tensor_rules), one table for fx and ATen graphs.

An fx capture names an op by a torch function (`torch.reshape`, `F.linear`), a Tensor method name (`"view"`) or an
`nn.Module`; a torch.export capture names it by an ATen overload (`aten.view.default`, `aten.addmm.default`). The
rules are written once, against *keys*: `op_key(node)` is the node's own target for fx graphs and, for an ATen
overload, the fx key it stands for (`aten.view.*` -> `"view"`, `aten.add.Tensor` -> `operator.add`). Only ops whose
ATen schema reads its arguments in the position and meaning of the fx key's are mapped; the few that differ have
keys of their own and an accessor here (`weight_op`: where a linear-like op keeps its input, weight and bias).

Example: `aten.split_with_sizes.default(x, [64, 64, 64], 2)` -> `"split"`, read like `x.split([64, 64, 64], 2)`;
`aten.addmm.default(b, x, W)` -> `"addmm"`, a linear whose weight W is (in, out), as in HF's GPT-2 `Conv1D`.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from partitioner.checks import CHECK_ATTENTION_MASK

__all__ = [
    "GROUPED_MM",
    "CrossEntropy",
    "WeightOp",
    "cross_entropy_call",
    "is_grouped_mm",
    "node_arg",
    "op_key",
    "op_name",
    "weight_op",
]

_UNARY_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Mish, nn.LeakyReLU,
                  nn.ELU, nn.Softplus)  # fmt: skip
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)
_UNARY_FUNCTIONS = {F.gelu, F.relu, F.silu, F.dropout, F.tanh, F.sigmoid, F.mish, F.softplus, F.leaky_relu, F.elu,
                    torch.tanh, torch.sigmoid, torch.relu, torch.exp, torch.neg, operator.neg, torch.sqrt,
                    torch.rsqrt, torch.abs, torch.erf, torch.square, torch.clone, torch.cos, torch.sin, torch.log,
                    torch.zeros_like, torch.ones_like, torch.full_like, torch.empty_like, torch.clamp,
                    torch.reciprocal}  # fmt: skip
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "neg", "sqrt", "rsqrt", "abs", "square", "erf", "contiguous",
                  "clone", "detach", "float", "half", "bfloat16", "double", "cos", "sin", "log"}  # fmt: skip
_FIRST_ARG_METHODS = {"to", "type_as", "type"}  # other tensor arguments only give a dtype/device
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, torch.add, torch.sub,
                     torch.mul, torch.div, torch.where, torch.maximum, torch.minimum, torch.masked_fill,
                     operator.eq, operator.ne, operator.lt, operator.gt, operator.le, operator.ge, operator.and_,
                     operator.or_}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "where", "maximum", "minimum", "pow", "eq", "ne"}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", torch.reshape, torch.flatten, torch.unflatten}
_TRANSPOSE = {"transpose", "permute", "t", "numpy_T", torch.transpose, torch.permute}
_SPLIT = {"split", "chunk", torch.split, torch.chunk}
_UNBIND = {"unbind", torch.unbind}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SDPA = {F.scaled_dot_product_attention}
_CROSS_ENTROPY = {F.cross_entropy, "cross_entropy_loss"}
_UNSQUEEZE = {"unsqueeze", torch.unsqueeze}
_SQUEEZE = {"squeeze", torch.squeeze}
_SLICE = {"slice"}  # ATen's slice(x, dim, start, end, step); fx graphs index with getitem instead
_SELECT = {"select", torch.select}
_INDEX = {"index"}  # ATen's index.Tensor(x, [None, ..., idx, ...]): advanced indexing
_EXPAND = {"expand"}
_CAT = {torch.cat, torch.concat, "cat"}
_STACK = {torch.stack, "stack"}
_REDUCE = {"mean", "sum", "amax", "amin", torch.mean, torch.sum, torch.amax, torch.amin}
_NORM_FUNCTIONS = {F.layer_norm, F.rms_norm}
_NEW_TENSOR = {"new_ones", "new_zeros", "new_full", "new_empty", "new_tensor"}  # shape from arguments, not input
_META_METHODS = {"dim", "ndimension", "is_floating_point", "is_complex", "element_size", "assert_metadata"}
_WEIGHT_OPS = {F.linear, "linear", torch.addmm, "addmm", torch.mm, "mm", F.embedding, "embedding", torch.matmul,
               "matmul", operator.matmul}  # fmt: skip


def _aten_keys() -> dict[Any, Any]:
    """ATen overload packet -> the fx key whose argument positions and meaning it shares."""
    a = torch.ops.aten
    table: dict[str, Any] = {
        "view": "view", "_unsafe_view": "view", "reshape": "reshape", "flatten": "flatten", "unflatten": "unflatten",
        "transpose": "transpose", "permute": "permute", "t": "t", "numpy_T": "numpy_T",
        "split": "split", "split_with_sizes": "split", "chunk": "chunk", "unbind": "unbind",
        "softmax": "softmax", "_softmax": "softmax", "log_softmax": "log_softmax", "_log_softmax": "log_softmax",
        "matmul": "matmul", "bmm": "bmm", "mm": "mm", "baddbmm": "baddbmm", "linear": "linear", "addmm": "addmm",
        "embedding": "embedding", "index": "index",
        "scaled_dot_product_attention": F.scaled_dot_product_attention,
        "sym_size": "size", "sym_numel": "numel",
        "unsqueeze": "unsqueeze", "squeeze": "squeeze", "slice": "slice", "select": "select", "expand": "expand",
        "broadcast_to": "expand",
        "cat": "cat", "stack": "stack", "mean": "mean", "sum": "sum", "amax": "amax", "amin": "amin",
        "layer_norm": F.layer_norm, "rms_norm": F.rms_norm,
        "cross_entropy_loss": "cross_entropy_loss", "to": "to", "type_as": "type_as",
        "_assert_tensor_metadata": "assert_metadata",
        "new_ones": "new_ones", "new_zeros": "new_zeros", "new_full": "new_full", "new_empty": "new_empty",
        "add": operator.add, "add_": operator.add, "sub": operator.sub, "rsub": operator.sub, "mul": operator.mul,
        "mul_": operator.mul, "div": operator.truediv, "div_": operator.truediv, "pow": operator.pow,
        "where": torch.where, "masked_fill": torch.masked_fill, "masked_fill_": torch.masked_fill,
        "maximum": torch.maximum, "minimum": torch.minimum,
        "eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "gt": operator.gt, "le": operator.le,
        "ge": operator.ge, "__and__": operator.and_, "__or__": operator.or_, "logical_and": operator.and_,
        "logical_or": operator.or_, "clamp": torch.clamp, "clamp_min": torch.clamp, "clamp_max": torch.clamp,
        "neg": torch.neg, "rsqrt": torch.rsqrt, "sqrt": torch.sqrt, "exp": torch.exp, "log": torch.log,
        "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu, "gelu": F.gelu, "relu": F.relu,
        "erf": torch.erf, "abs": torch.abs, "cos": torch.cos, "sin": torch.sin, "reciprocal": torch.reciprocal,
        "square": torch.square, "clone": torch.clone, "contiguous": "contiguous", "alias": "detach",
        "detach": "detach", "lift_fresh_copy": torch.clone, "_to_copy": torch.clone, "dropout": F.dropout,
        "zeros_like": torch.zeros_like, "ones_like": torch.ones_like, "full_like": torch.full_like,
        "empty_like": torch.empty_like,
    }  # fmt: skip
    keys = {getattr(a, name): key for name, key in table.items() if hasattr(a, name)}
    keys[CHECK_ATTENTION_MASK.overloadpacket] = "assert_metadata"  # a check without output, like export's asserts
    return keys


_ATEN = _aten_keys()
_ATEN_OVERLOADS = {torch.ops.aten.max.other: torch.maximum, torch.ops.aten.min.other: torch.minimum}  # not max.dim


def op_key(node: fx.Node) -> Any:
    """The rule-table key of a call_function / call_method node (module docstring); other nodes: their target."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return _ATEN_OVERLOADS.get(target) or _ATEN.get(target.overloadpacket, target)
    return target


def op_name(node: fx.Node) -> str:
    """The key's name: "view" for `x.view`, `torch.reshape` -> "reshape", `aten.view.default` -> "view"."""
    key = op_key(node)
    return key if isinstance(key, str) else str(getattr(key, "__name__", key))


def node_arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """A call's argument by position `i` or keyword `name` (fx keeps each where the call passed it), else `default`."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def key_in(node: fx.Node, keys: set) -> bool:
    try:
        return op_key(node) in keys
    except TypeError:  # unhashable target
        return False


@dataclass(frozen=True)
class WeightOp:
    """A linear-like or embedding call whose weight is a parameter read by get_attr (an fx `F.linear(x, self.w)`,
    an ATen `linear` / `addmm` / `mm` / `embedding`).

    kind: "linear" (y = x W^T + b, W (out, in)), "addmm" (y = b + x W, W (in, out): HF's Conv1D; "mm" without b),
    "grouped" (a mixture of experts' grouped product: rows of x (rows, in) grouped by offsets, each group times its
    expert's (in, out) matrix of a 3-D W, (experts, out, in) read through a transpose of its last two dims as HF's
    experts are, or (experts, in, out)) or "embedding". out_dim / in_dim: W's output and input dims (embedding: rows
    are the vocabulary, in_dim 0).
    """

    kind: str
    x: fx.Node  # the input (embedding: the ids)
    weight: fx.Node  # a get_attr node of a parameter
    bias: fx.Node | None
    out_dim: int
    in_dim: int
    padding_idx: int | None = None
    via: fx.Node | None = None  # the transpose the op reads the weight through (x @ W.T), which reads it too

    @property
    def param(self) -> str:
        return str(self.weight.target)

    @property
    def bias_param(self) -> str | None:
        return str(self.bias.target) if self.bias is not None else None


def _transposed_2d(w: Any) -> fx.Node | None:
    """The node a 2-D transpose of `w` reads (`w.T`, `w.t()`, `transpose(w, 0, 1)`, `permute(w, [1, 0])`; ATen or
    fx), or None when `w` is not one."""
    if not isinstance(w, fx.Node) or w.op != "call_function" or not w.args:
        return None
    src, name = w.args[0], op_name(w)
    if w.target is getattr and len(w.args) == 2 and w.args[1] in ("T", "mT"):
        return src if isinstance(src, fx.Node) else None
    if name in ("t", "numpy_T"):
        return src if isinstance(src, fx.Node) else None
    if name == "transpose" and len(w.args) == 3 and {w.args[1], w.args[2]} in ({0, 1}, {-1, -2}, {0, -1}, {1, -2}):
        return src if isinstance(src, fx.Node) else None
    if name == "permute" and len(w.args) == 2 and list(w.args[1]) == [1, 0]:
        return src if isinstance(src, fx.Node) else None
    return None


def _param_node(gm: fx.GraphModule, x: Any, ndim: int) -> bool:
    if not (isinstance(x, fx.Node) and x.op == "get_attr"):
        return False
    try:
        p = gm.get_parameter(str(x.target))
    except AttributeError:  # a buffer or constant, not a parameter
        return False
    return p.dim() == ndim and p.is_floating_point()


# grouped matrix products: (rows, k) x (groups, k, n) by group offsets (annotate prices them; FlopCounterMode does not)
GROUPED_MM = ("transformers::grouped_mm_fallback", "aten::_grouped_mm")


def is_grouped_mm(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema is not None and schema.name in GROUPED_MM


def _grouped_weight_op(gm: fx.GraphModule, node: fx.Node) -> WeightOp | None:
    """A grouped product of rows and a 3-D parameter: (experts, out, in) through a transpose of its last two dims, or
    (experts, in, out) read directly; offsets (or none) as the third argument."""
    if len(node.args) < 2 or not isinstance(node.args[0], fx.Node):
        return None
    w = node.args[1]
    source = None
    if isinstance(w, fx.Node) and w.op == "call_function" and op_name(w) == "transpose" and len(w.args) == 3:
        if {w.args[1], w.args[2]} in ({-2, -1}, {1, 2}, {1, -1}, {-2, 2}):
            source = w.args[0]
    if source is not None and _param_node(gm, source, 3):
        return WeightOp("grouped", node.args[0], source, None, 1, 2, via=w)
    if _param_node(gm, w, 3):
        return WeightOp("grouped", node.args[0], w, None, 2, 1)
    return None


def weight_op(gm: fx.GraphModule, node: fx.Node) -> WeightOp | None:
    """The WeightOp of `node`, or None when it is none (another op, or a weight that is not a parameter)."""
    if node.op == "call_function" and is_grouped_mm(node):
        return _grouped_weight_op(gm, node)
    if node.op != "call_function" or not key_in(node, _WEIGHT_OPS):
        return None
    key, aten = op_key(node), isinstance(node.target, torch._ops.OpOverload)
    args, kw = node.args, node.kwargs

    def arg(i: int, name: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kw.get(name, default)

    if key in (F.linear, "linear"):
        x, w, b = arg(0, "input"), arg(1, "weight"), arg(2, "bias")
        found = WeightOp("linear", x, w, b, 0, 1)
    elif key in (torch.addmm, "addmm"):
        if arg(3, "beta", 1) != 1 or arg(4, "alpha", 1) != 1:
            return None
        b, x, w = arg(0, "input" if not aten else "self"), arg(1, "mat1"), arg(2, "mat2")
        found = WeightOp("addmm", x, w, b, 1, 0)
    elif key in (torch.mm, "mm"):
        found = WeightOp("addmm", arg(0, "input" if not aten else "self"), arg(1, "mat2"), None, 1, 0)
    elif key in (torch.matmul, "matmul", operator.matmul):
        # x @ W.T (FalconLinear, any hand-written linear): W (out, in) read through a transpose; x @ W: W (in, out)
        x, w = args[0] if args else kw.get("input", kw.get("self")), args[1] if len(args) > 1 else kw.get("other")
        source = _transposed_2d(w)
        if source is not None:
            found = WeightOp("linear", x, source, None, 0, 1, via=w)
        else:
            found = WeightOp("addmm", x, w, None, 1, 0)
    else:  # embedding: F.embedding(ids, weight, padding_idx, max_norm, ...); aten.embedding(weight, ids, pad, ...)
        if aten:
            w, x, pad = arg(0, "weight"), arg(1, "indices"), arg(2, "padding_idx", -1)
            if arg(3, "scale_grad_by_freq", False) or arg(4, "sparse", False):
                return None
        else:
            x, w, pad = arg(0, "input"), arg(1, "weight"), arg(2, "padding_idx")
            if arg(3, "max_norm") is not None or arg(5, "scale_grad_by_freq", False) or arg(6, "sparse", False):
                return None
        found = WeightOp("embedding", x, w, None, 0, 0, None if pad is None or pad < 0 else int(pad))
    if not _param_node(gm, found.weight, 2) or not isinstance(found.x, fx.Node):
        return None
    if found.bias is not None and not _param_node(gm, found.bias, 1):
        return None
    return found


@dataclass(frozen=True)
class CrossEntropy:
    """A cross_entropy call's arguments: fx `F.cross_entropy(input, target, weight, size_average, ignore_index,
    reduce, reduction, label_smoothing)` or ATen `cross_entropy_loss(self, target, weight, reduction (0 none,
    1 mean, 2 sum), ignore_index, label_smoothing)`."""

    logits: Any
    target: Any
    weight: Any
    ignore_index: int
    reduction: str
    label_smoothing: float


def cross_entropy_call(node: fx.Node) -> CrossEntropy:
    args, kw = node.args, node.kwargs

    def arg(i: int, name: str, default: Any = None) -> Any:
        return args[i] if len(args) > i else kw.get(name, default)

    if op_key(node) == "cross_entropy_loss":
        reduction = {0: "none", 1: "mean", 2: "sum"}[arg(3, "reduction", 1)]
        return CrossEntropy(arg(0, "self"), arg(1, "target"), arg(2, "weight"), arg(4, "ignore_index", -100),
                            reduction, arg(5, "label_smoothing", 0.0))  # fmt: skip
    if arg(3, "size_average") is not None or arg(5, "reduce") is not None:
        raise ValueError("cross_entropy with the deprecated size_average / reduce arguments")
    return CrossEntropy(arg(0, "input"), arg(1, "target"), arg(2, "weight"), arg(4, "ignore_index", -100),
                        arg(6, "reduction", "mean"), arg(7, "label_smoothing", 0.0))  # fmt: skip
