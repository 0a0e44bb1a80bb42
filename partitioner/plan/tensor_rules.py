"""plan.tensor_rules: the sharding propagation of plan.tensor (its module docstring has the model and the rule
table): layouts, the per-op rules (`_RULES` through `_rule`), and one propagation pass over a graph (`_propagate`).

Internal to plan.tensor: the entry points there choose the seeds, iterate the passes and record the result.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.plan.tensor_layout import REPLICATED


# ----------------------------------------------------------------------------------------------- layouts
# ----------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Shard:
    dim: int
    parts: int = 1
    origins: frozenset[str] = frozenset()  # the seeds whose sharding produced this value


@dataclass(frozen=True)
class _Partial:
    origins: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _SizeOf:  # the torch.Size of a sharded tensor
    dim: int
    origins: frozenset[str] = frozenset()


@dataclass(frozen=True)
class _Tuple:  # a tuple of layouts (split outputs)
    items: tuple


Layout = Any  # None (replicated) | _Shard | _Partial | _SizeOf | _Tuple


class _Conflict(Exception):
    def __init__(self, reason: str, divisibility: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.divisibility = divisibility


class _PartsRequest(Exception):
    """Re-seed column producer `seed` as `parts` blocks (a fused q|k|v); `reason`: why one block did not do."""

    def __init__(self, seed: str, parts: int, reason: str = "", divisibility: bool = False):
        super().__init__(f"{seed} needs {parts} parts")
        self.seed, self.parts, self.reason, self.divisibility = seed, parts, reason, divisibility


def _layout_str(lay: Layout) -> str:
    if isinstance(lay, _Shard):
        return f"shard({lay.dim})"
    if isinstance(lay, _Partial):
        return "partial"
    if isinstance(lay, _Tuple):
        inner = [_layout_str(x) for x in lay.items]
        return next((s for s in inner if s != REPLICATED), REPLICATED)
    return REPLICATED


def _origins(lay: Layout) -> frozenset[str]:
    if isinstance(lay, _Tuple):
        return frozenset().union(*(_origins(x) for x in lay.items)) if lay.items else frozenset()
    return getattr(lay, "origins", frozenset()) if lay is not None else frozenset()


# ----------------------------------------------------------------------------------------------- op tables
_UNARY_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.Mish, nn.LeakyReLU,
                  nn.ELU, nn.Softplus)  # fmt: skip
_NORM_MODULES = (nn.LayerNorm, nn.RMSNorm)
_UNARY_FUNCTIONS = {F.gelu, F.relu, F.silu, F.dropout, F.tanh, F.sigmoid, F.mish, F.softplus, F.leaky_relu, F.elu,
                    torch.tanh, torch.sigmoid, torch.relu, torch.exp, torch.neg, operator.neg, torch.sqrt,
                    torch.rsqrt, torch.abs, torch.erf, torch.square, torch.clone}  # fmt: skip
_UNARY_METHODS = {"relu", "tanh", "sigmoid", "exp", "neg", "sqrt", "rsqrt", "abs", "square", "erf", "contiguous",
                  "clone", "detach", "float", "half", "bfloat16", "double"}  # fmt: skip
_FIRST_ARG_METHODS = {"to", "type_as", "type"}  # other tensor arguments only give a dtype/device
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.pow, torch.add, torch.sub,
                     torch.mul, torch.div, torch.where, torch.maximum, torch.minimum, torch.masked_fill,
                     operator.eq, operator.ne, operator.lt, operator.gt, operator.le, operator.ge}  # fmt: skip
_BINARY_METHODS = {"add", "sub", "mul", "div", "masked_fill", "where", "maximum", "minimum", "pow", "eq", "ne"}
_SOFTMAX = {F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax", "log_softmax"}
_RESHAPE = {"view", "reshape", "flatten", "unflatten", torch.reshape, torch.flatten, torch.unflatten}
_TRANSPOSE = {"transpose", "permute", torch.transpose, torch.permute}
_SPLIT = {"split", "chunk", torch.split, torch.chunk}
_UNBIND = {"unbind", torch.unbind}
_MATMUL = {operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"}
_SDPA = {F.scaled_dot_product_attention}
_CROSS_ENTROPY = {F.cross_entropy}


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _shape(n: fx.Node) -> tuple[int, ...]:
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        raise _Conflict(f"{n.name} has no tensor metadata")
    return tuple(v.shape)


def _arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


# ----------------------------------------------------------------------------------------------- propagation
@dataclass
class _State:
    gm: fx.GraphModule
    tp: int | None  # None: collect mode (no divisibility checks; requirements recorded instead)
    seeds: set[str]
    seed_parts: dict[str, int]
    gather_output: bool
    vocab: set[int] = field(default_factory=set)  # embedding row counts: strict mode lets these fall back
    layout: dict[fx.Node, Layout] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    params: dict[str, tuple[dict[str, int | None], frozenset[str]]] = field(default_factory=dict)
    arg_rewrites: dict[str, list[list[Any]]] = field(default_factory=dict)
    global_sizes: list[str] = field(default_factory=list)
    gathers: dict[str, int] = field(default_factory=dict)
    requirements: list[dict[str, Any]] = field(default_factory=list)

    def eff(self, x: Any) -> Layout:
        """Layout as consumers see it: a partial value is all-reduced right after its producer."""
        if not isinstance(x, fx.Node):
            return None
        lay = self.layout.get(x)
        return None if isinstance(lay, _Partial) else lay

    def divides(self, node: fx.Node, size: int, parts: int, what: str) -> None:
        if size % parts:
            raise _Conflict(f"{what}={size} does not split into {parts} equal parts")
        if self.tp is None:
            self.requirements.append({"node": node.name, "size": size // parts})
        elif size % (parts * self.tp):
            raise _Conflict(
                f"{what}={size} is not divisible by tp={self.tp}" + (f" x {parts} parts" if parts > 1 else ""),
                divisibility=size not in self.vocab,
            )

    def rewrite(self, node: fx.Node, path: list[Any]) -> None:
        self.arg_rewrites.setdefault(node.name, []).append(path)


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    return [x for x in node.all_input_nodes if isinstance(_val(x), torch.Tensor)]


def _broadcast(st: _State, node: fx.Node, inputs: list[fx.Node]) -> Layout:
    """Elementwise with broadcasting: sharded inputs agree on the (right-aligned) dim; replicated ones have size 1."""
    if all(st.eff(x) is None for x in inputs):
        return None
    out_nd = len(_shape(node))
    shard: _Shard | None = None
    for x in inputs:
        lay = st.eff(x)
        if isinstance(lay, _Shard):
            d = lay.dim + out_nd - len(_shape(x))
            if shard is None:
                shard = _Shard(d, lay.parts, lay.origins)
            elif (shard.dim, shard.parts) != (d, lay.parts):
                raise _Conflict(f"operands are sharded on different dims ({shard.dim} and {d})")
            else:
                shard = _Shard(d, lay.parts, shard.origins | lay.origins)
        elif lay is not None:
            raise _Conflict(f"input {x.name} has layout {_layout_str(lay)}")
    if shard is None:
        return None
    for x in inputs:
        if st.eff(x) is None:
            shape = _shape(x)
            d_in = shard.dim - (out_nd - len(shape))
            if d_in >= 0 and shape[d_in] != 1:
                raise _Conflict(f"replicated operand {x.name} {list(shape)} spans the sharded dim {shard.dim}")
    return shard


def _rule_call_module(st: _State, node: fx.Node) -> Layout:
    mod = st.gm.get_submodule(str(node.target))
    x = node.args[0] if node.args else None
    lay = st.eff(x)
    if isinstance(mod, nn.Linear):
        if isinstance(lay, _Shard):  # rowwise: (…, in/tp) @ W[:, in/tp]^T -> partial (…, out)
            if lay.dim != len(_shape(x)) - 1:
                raise _Conflict(f"Linear input is sharded on dim {lay.dim}, not on in_features")
            st.divides(node, mod.in_features, lay.parts, "in_features")
            st.rules[node.name] = "row"
            st.params[f"{node.target}.weight"] = ({"dim": 1, "parts": lay.parts}, lay.origins)
            if mod.bias is not None:
                st.params[f"{node.target}.bias"] = ({"dim": None, "parts": 1}, lay.origins)
            return _Partial(lay.origins)
        if node.name in st.seeds:  # colwise: W[out/tp, :] -> (…, out/tp)
            parts = st.seed_parts.get(node.name, 1)
            st.divides(node, mod.out_features, parts, "out_features")
            st.rules[node.name] = "column"
            mine = frozenset([node.name])
            st.params[f"{node.target}.weight"] = ({"dim": 0, "parts": parts}, mine)
            if mod.bias is not None:
                st.params[f"{node.target}.bias"] = ({"dim": 0, "parts": parts}, mine)
            return _Shard(len(_shape(node)) - 1, parts, mine)
        return None
    if isinstance(mod, nn.Embedding):
        if lay is not None:
            raise _Conflict("Embedding indices are sharded")
        if node.name in st.seeds:
            st.divides(node, mod.num_embeddings, 1, "num_embeddings")
            st.rules[node.name] = "vocab_embedding"
            st.params[f"{node.target}.weight"] = ({"dim": 0, "parts": 1}, frozenset([node.name]))
            return _Partial(frozenset([node.name]))
        return None
    if isinstance(mod, _NORM_MODULES):
        if isinstance(lay, _Shard):
            normalized = len(mod.normalized_shape) if mod.normalized_shape else 1
            if lay.dim >= len(_shape(x)) - normalized:
                raise _Conflict(f"{type(mod).__name__} normalizes over the sharded dim {lay.dim}")
            if any(True for _ in mod.parameters()):
                raise _Conflict(f"{type(mod).__name__} with weights on a sharded input (grads would be partial)")
        return lay
    if isinstance(mod, _UNARY_MODULES):
        return lay if len(node.all_input_nodes) == 1 else _broadcast(st, node, _tensor_inputs(node))
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        if isinstance(lay, _Shard) and _norm_dim(mod.dim, len(_shape(x))) == lay.dim:
            raise _Conflict("softmax over the sharded dim")
        return lay
    return _default(st, node)


def _op_name(st: _State, node: fx.Node) -> str:
    what = node.target if node.op != "call_module" else type(st.gm.get_submodule(str(node.target))).__name__
    return str(getattr(what, "__name__", what))


def _replicated_inputs_only(st: _State, node: fx.Node, sharded: str) -> Layout:
    """Replicated if no input is sharded; a whole torch.Size of a sharded tensor, or a sharded input (`sharded`
    says why that is a conflict here), is a conflict naming the input."""
    for x in node.all_input_nodes:
        lay = st.eff(x)
        if isinstance(lay, _SizeOf):
            raise _Conflict(
                f"{_op_name(st, node)} takes {x.name}, the torch.Size of a sharded tensor, as a whole (only single "
                f"sizes, x.shape[i] or x.size(i), are made global)"
            )
        if lay is not None:
            raise _Conflict(sharded.format(op=_op_name(st, node), input=x.name))
    return None


def _default(st: _State, node: fx.Node) -> Layout:
    return _replicated_inputs_only(st, node, "no sharding rule for {op} on a sharded input")


def _rule_reshape(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    a, b = _shape(x), _shape(node)
    # The rank's elements are the same set iff the sharded block length L = inner * size / parts matches:
    # L_in == L_out (rank index = floor(flat mod L / (L / tp)) on both sides).
    block = math.prod(a[lay.dim + 1 :]) * a[lay.dim] // lay.parts
    for k in range(len(b)):
        span = math.prod(b[k + 1 :]) * b[k]
        if span % block or b[k] % (span // block) or b[k] // (span // block) <= 1:
            continue
        parts = span // block
        local = b[k] // parts
        seed = next(iter(lay.origins)) if len(lay.origins) == 1 else None
        if local % (st.tp or 2) and lay.parts == 1 and seed and seed not in st.seed_parts and span > b[k]:
            # e.g. (B, T, 3*C) -> (B, T, 3, nh, hd): dim k counts blocks (q|k|v), not heads; shard the
            # producer as `local` blocks so that the next dim (heads) carries the shard.
            why = f"view dim {k}={local} is not divisible by tp={st.tp}"
            raise _PartsRequest(seed, local, why, divisibility=True)
        st.divides(node, b[k], parts, f"view dim {k}")
        path = _size_arg_path(node, k, len(b))
        if path is not None:
            _check_size_arg(st, node, path, k)
            st.rewrite(node, path)
        return _Shard(k, parts, lay.origins)
    raise _Conflict(f"view {list(a)} -> {list(b)} does not keep sharded dim {lay.dim} whole in one output dim")


def _size_arg_path(node: fx.Node, k: int, out_ndim: int) -> list[Any] | None:
    """Where the size of output dim k is written in a reshape call (None: derived, e.g. flatten)."""
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name in ("view", "reshape"):
        if len(node.args) == 2 and isinstance(node.args[1], (tuple, list)):
            return ["args", 1, k]
        if "shape" in node.kwargs:
            return ["kwargs", "shape", k]
        return ["args", 1 + k]
    if name == "unflatten":
        dim = _norm_dim(_arg(node, 1, "dim"), len(_shape(node.args[0])))
        sizes_i = 2
        if dim <= k < dim + len(_arg(node, 2, "sizes")):
            return ["args", sizes_i, k - dim] if len(node.args) > 2 else ["kwargs", "sizes", k - dim]
    return None


def _check_size_arg(st: _State, node: fx.Node, path: list[Any], k: int) -> None:
    """The size written at `path` must be one global int (a literal or an int node) for the applier to divide by tp."""
    value: Any = node.args if path[0] == "args" else node.kwargs
    try:
        for p in path[1:]:
            value = value[p]
    except (IndexError, KeyError, TypeError):
        value = None
    if isinstance(value, fx.Node):
        if isinstance(_val(value), (int, torch.SymInt)) and not isinstance(_val(value), bool) and st.eff(value) is None:
            return
    elif isinstance(value, int) and not isinstance(value, bool):
        return
    sizes = node.args[1] if len(node.args) == 2 else node.kwargs.get("shape")
    if isinstance(sizes, fx.Node) and not isinstance(_val(sizes), int):  # x.view(t) with t = x.shape[:-1] + (4, 16)
        raise _Conflict(f"view sizes come as one computed tuple {sizes.name}: only int sizes can be made local")
    got = value.name if isinstance(value, fx.Node) else repr(value)
    raise _Conflict(f"the size of sharded view dim {k} is {got}, not an int that can be made local")


def _rule_transpose(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    nd = len(_shape(x))
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "transpose":
        d0, d1 = (_norm_dim(_arg(node, 1, "dim0"), nd), _norm_dim(_arg(node, 2, "dim1"), nd))
        perm = list(range(nd))
        perm[d0], perm[d1] = d1, d0
    else:
        dims = node.args[1:] if len(node.args) > 2 or isinstance(node.args[1], int) else node.args[1]
        perm = [_norm_dim(d, nd) for d in (dims or node.kwargs["dims"])]
    return _Shard(perm.index(lay.dim), lay.parts, lay.origins)


def _rule_split(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    nd = len(_shape(x))
    dim = _norm_dim(_arg(node, 2, "dim", 0), nd)
    pieces = [tuple(v.shape) for v in _val(node)]
    if dim != lay.dim:
        return _Tuple(tuple(_Shard(lay.dim, lay.parts, lay.origins) for _ in pieces))
    n = len(pieces)
    if len({p[dim] for p in pieces}) != 1:
        raise _Conflict("split of the sharded dim into unequal pieces")
    if lay.parts % n:
        if lay.parts == 1 and len(lay.origins) == 1:  # re-seed the column producer with one block per piece
            raise _PartsRequest(next(iter(lay.origins)), n)
        raise _Conflict(f"split into {n} pieces of a dim made of {lay.parts} blocks")
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "split":
        sizes = _arg(node, 1, "split_size_or_sections" if not isinstance(node.target, str) else "split_size")
        path = ["args", 1] if len(node.args) > 1 else ["kwargs", "split_size"]
        if isinstance(sizes, (list, tuple)):
            for j in range(len(sizes)):
                st.rewrite(node, path + [j])
        else:
            st.rewrite(node, path)
        st.divides(node, pieces[0][dim], lay.parts // n, "split size")
    return _Tuple(tuple(_Shard(dim, lay.parts // n, lay.origins) for _ in pieces))


def _rule_unbind(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(x)))
    if dim == lay.dim:
        raise _Conflict("unbind of the sharded dim")
    out = _Shard(lay.dim - (dim < lay.dim), lay.parts, lay.origins)
    return _Tuple(tuple(out for _ in _val(node)))


def _rule_getitem(st: _State, node: fx.Node) -> Layout:
    src, idx = node.args
    lay = st.eff(src)
    if isinstance(lay, _Tuple):
        return lay.items[idx]
    if isinstance(lay, _SizeOf):
        if isinstance(idx, int):
            if _norm_dim(idx, len(_val(src))) == lay.dim:
                st.global_sizes.append(node.name)
            return None
        if isinstance(idx, slice) and all(isinstance(i, (int, type(None))) for i in (idx.start, idx.stop, idx.step)):
            dims = list(range(len(_val(src))))[idx]  # x.shape[:-1]: the source dims it keeps
            return _SizeOf(dims.index(lay.dim), lay.origins) if lay.dim in dims else None
        raise _Conflict(f"index {idx!r} into the torch.Size of a sharded tensor")
    if isinstance(lay, _Shard):  # tensor indexing: only full slices (and None / ...) around the sharded dim
        index = idx if isinstance(idx, tuple) else (idx,)
        if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
            raise _Conflict("advanced indexing of a sharded tensor")
        nd, out_nd = len(_shape(src)), len(_shape(node))
        ell = index.index(Ellipsis) if Ellipsis in index else len(index)
        consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
        expanded = list(index[:ell]) + [slice(None)] * (nd - consumed) + list(index[ell + 1 :])
        d_in, d_out = 0, 0
        for i in expanded:
            if i is None:
                d_out += 1
                continue
            if d_in == lay.dim:
                if i != slice(None):
                    raise _Conflict("indexing into the sharded dim")
                return _Shard(d_out, lay.parts, lay.origins)
            d_out += 0 if isinstance(i, int) else 1
            d_in += 1
        return _Shard(lay.dim - (nd - out_nd), lay.parts, lay.origins)
    return _default(st, node)


def _rule_size(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _rule_value(st, node) if not isinstance(_val(node), torch.Tensor) else _default(st, node)
    if node.target == "numel":  # the shard's numel x tp: shards are equal
        st.global_sizes.append(node.name)
        return None
    if node.op == "call_function":  # getattr(x, name)
        if node.args[1] == "shape":
            return _SizeOf(lay.dim, lay.origins)
        if node.args[1] in ("dtype", "device", "ndim", "is_cuda", "requires_grad"):
            return None
        raise _Conflict(f"attribute {node.args[1]!r} of a sharded tensor")
    d = _arg(node, 1, "dim")
    if d is None:
        return _SizeOf(lay.dim, lay.origins)
    if _norm_dim(d, len(_shape(x))) == lay.dim:
        st.global_sizes.append(node.name)
    return None


def _rule_value(st: _State, node: fx.Node) -> Layout:
    """A Python value (int, float, bool, SymInt, torch.Size, dtype) computed in the graph: replicated.

    Its inputs are replicated values, or sizes already made global (`global_sizes`), so it equals the unsharded
    model's value on every rank. Reading a sharded tensor's data, or a whole torch.Size spanning the sharded dim,
    would give each rank a different value: a conflict.
    """
    return _replicated_inputs_only(st, node, "{op} computes a Python value from the sharded tensor {input}")


def _is_value(node: fx.Node) -> bool:
    """Whether a node computes a non-tensor value (no tensor anywhere in its output; None is a side effect's)."""
    v = _val(node)
    if v is None or isinstance(v, torch.Tensor):
        return False
    return not any(isinstance(t, torch.Tensor) for t in pytree.tree_leaves(v))


def _rule_elementwise(st: _State, node: fx.Node) -> Layout:
    if node.op == "call_method" and node.target in _FIRST_ARG_METHODS:
        for x in node.all_input_nodes[1:]:
            if st.eff(x) is not None and x is not node.args[0]:
                raise _Conflict("sharded dtype/device argument")
        return st.eff(node.args[0])
    return _broadcast(st, node, _tensor_inputs(node))


def _rule_softmax(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if isinstance(lay, _Shard) and _norm_dim(_arg(node, 1, "dim"), len(_shape(x))) == lay.dim:
        raise _Conflict("softmax over the sharded dim")
    return lay


def _rule_matmul(st: _State, node: fx.Node) -> Layout:
    a, b = node.args[0], node.args[1]
    la, lb = st.eff(a), st.eff(b)
    if la is None and lb is None:
        return None
    sa, sb, out_nd = _shape(a), _shape(b), len(_shape(node))
    if len(sa) < 2 or len(sb) < 2:
        raise _Conflict("matmul with a vector operand on a sharded input")

    def batch_dim(lay: Layout, nd: int) -> int | None:
        if not isinstance(lay, _Shard):
            return None
        if lay.dim >= nd - 2:
            raise _Conflict(f"matmul sharded on a matrix dim ({lay.dim} of {nd})")
        return lay.dim + out_nd - nd

    da, db = batch_dim(la, len(sa)), batch_dim(lb, len(sb))
    d = da if da is not None else db
    if da is not None and db is not None and (da, la.parts) != (db, lb.parts):
        raise _Conflict("matmul operands sharded on different batch dims")
    for lay, shape in ((la, sa), (lb, sb)):
        if lay is None:
            d_in = d - (out_nd - len(shape))
            if d_in >= 0 and shape[d_in] != 1:
                raise _Conflict("replicated matmul operand spans the sharded batch dim")
    src = la if isinstance(la, _Shard) else lb
    return _Shard(d, src.parts, _origins(la) | _origins(lb))


def _rule_sdpa(st: _State, node: fx.Node) -> Layout:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    lays = [st.eff(t) for t in (q, k, v)]
    if all(st.eff(x) is None for x in node.all_input_nodes):
        return None
    nd = len(_shape(q))
    head = nd - 3
    if nd < 3 or not all(isinstance(lay, _Shard) and lay.dim == head and lay.parts == 1 for lay in lays):
        raise _Conflict(f"attention needs q, k, v all sharded on the head dim {head}; got {lays}")
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        ml = st.eff(mask)
        ms = _shape(mask)
        d_in = head - (nd - len(ms))
        if ml is None and d_in >= 0 and ms[d_in] != 1:
            raise _Conflict(f"attention mask {list(ms)} has a head dim; it would need slicing per rank")
        if ml is not None and not (isinstance(ml, _Shard) and ml.dim == d_in):
            raise _Conflict("attention mask sharded on another dim")
    return _Shard(head, 1, frozenset().union(*(lay.origins for lay in lays)))


def _rule_cross_entropy(st: _State, node: fx.Node) -> Layout:
    x, target = node.args[0], _arg(node, 1, "target")
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    if lay.dim != 1 or lay.parts != 1 or st.eff(target) is not None:
        raise _Conflict("cross_entropy on logits not sharded on the class dim 1")
    if _arg(node, 2, "weight") is not None or _arg(node, 7, "label_smoothing", 0.0):
        raise _Conflict("vocab-parallel cross_entropy supports no class weights or label smoothing")
    if isinstance(target, fx.Node) and _val(target).is_floating_point():
        raise _Conflict("vocab-parallel cross_entropy needs class-index targets")
    st.divides(node, _shape(x)[1], 1, "classes")
    st.rules[node.name] = "vocab_cross_entropy"
    return None


def _rule_output(st: _State, node: fx.Node) -> Layout:
    for x in node.args[0]:
        lay = st.eff(x)
        if isinstance(lay, _Shard):
            if not st.gather_output:
                raise _Conflict("a sharded value reaches the model output (gather_output=False)")
            if lay.parts != 1:
                raise _Conflict("a value of several sharded blocks reaches the model output")
            st.gathers[x.name] = lay.dim
        elif lay is not None:
            raise _Conflict(f"output {x.name} has layout {_layout_str(lay)}")
    return None


_FUNCTION_RULES: list[tuple[set, Callable[[_State, fx.Node], Layout]]] = [
    (_RESHAPE, _rule_reshape),
    (_TRANSPOSE, _rule_transpose),
    (_SPLIT, _rule_split),
    (_UNBIND, _rule_unbind),
    (_SOFTMAX, _rule_softmax),
    (_MATMUL, _rule_matmul),
    (_SDPA, _rule_sdpa),
    (_CROSS_ENTROPY, _rule_cross_entropy),
    (_UNARY_FUNCTIONS | _UNARY_METHODS | _BINARY_FUNCTIONS | _BINARY_METHODS | _FIRST_ARG_METHODS, _rule_elementwise),
    ({operator.getitem}, _rule_getitem),
    ({"size", "numel", getattr}, _rule_size),
]
_SIZE_RULES = {operator.getitem, "size", "numel", getattr}  # these read sizes of sharded tensors themselves
_META_METHODS = {"dim", "ndimension", "is_floating_point", "is_complex", "element_size"}  # the same on every rank


def _rule(st: _State, node: fx.Node) -> Layout:
    if node.op in ("placeholder", "get_attr"):
        return None
    if node.op == "output":
        return _rule_output(st, node)
    if node.op == "call_module":
        return _rule_call_module(st, node)
    if node.op == "call_method" and node.target in _META_METHODS:
        return None
    if _is_value(node) and not (node.op in ("call_function", "call_method") and _hashable_in(node.target, _SIZE_RULES)):
        return _rule_value(st, node)
    for keys, rule in _FUNCTION_RULES:
        try:
            if node.target in keys:
                return rule(st, node)
        except TypeError:  # unhashable target
            break
    return _default(st, node)


def _hashable_in(target: Any, keys: set) -> bool:
    try:
        return target in keys
    except TypeError:  # unhashable target
        return False


@dataclass
class _Outcome:
    state: _State
    conflicts: list[tuple[fx.Node, _Conflict, frozenset[str]]]
    parts: dict[str, _PartsRequest]


def _propagate(st: _State) -> _Outcome:
    conflicts: list[tuple[fx.Node, _Conflict, frozenset[str]]] = []
    parts: dict[str, _PartsRequest] = {}
    tainted: set[fx.Node] = set()
    for node in st.gm.graph.nodes:
        try:
            st.layout[node] = _rule(st, node)
        except _Conflict as c:
            origins = frozenset().union(*(_origins(st.layout.get(x)) for x in node.all_input_nodes))
            if not origins and node.name in st.seeds:  # the seed itself cannot be sharded
                origins = frozenset([node.name])
            if not any(x in tainted for x in node.all_input_nodes):  # downstream of a conflict: maybe spurious
                conflicts.append((node, c, origins))
            if origins:  # without sharded inputs, replicated is this node's true layout: nothing downstream is off
                tainted.add(node)
            st.layout[node] = None
        except _PartsRequest as r:
            parts.setdefault(r.seed, r)
            tainted.add(node)
            st.layout[node] = None
        if any(x in tainted for x in node.all_input_nodes):
            tainted.add(node)
    if not any(origins for _, _, origins in conflicts) and not parts:
        conflicts += _tied_conflicts(st)
    return _Outcome(st, conflicts, parts)


def _tied_conflicts(st: _State) -> list[tuple[fx.Node, _Conflict, frozenset[str]]]:
    """A parameter used under several names (tied) must have one shard spec everywhere."""
    by_tensor: dict[int, list[str]] = {}
    for name, p in st.gm.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    nodes = {n.name: n for n in st.gm.graph.nodes}
    out = []
    calls: dict[str, list[fx.Node]] = {}  # a module called from several nodes needs one rule for all
    for n in st.gm.graph.nodes:
        if n.op == "call_module":
            calls.setdefault(str(n.target), []).append(n)
    for target, users in calls.items():
        if len({st.rules.get(n.name) for n in users}) > 1:
            origins = frozenset().union(*(_origins(st.layout.get(n)) for n in users))
            origins |= frozenset(n.name for n in users if n.name in st.seeds and n.name in st.rules)
            reason = f"module {target} is called {len(users)} times with different shardings"
            out.append((users[0], _Conflict(reason), origins))
    for names in by_tensor.values():
        specs = {json.dumps(st.params.get(n, ({"dim": None, "parts": 1}, None))[0]) for n in names}
        if len(specs) > 1:
            origins = frozenset().union(*(st.params[n][1] for n in names if n in st.params))
            node = nodes[next(iter(sorted(origins)))] if origins else next(iter(nodes.values()))
            out.append((node, _Conflict(f"tied parameter {names} would get different shardings"), origins))
    return out
