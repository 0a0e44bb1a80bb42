"""plan.tensor_rules: the sharding propagation of plan.tensor (its module docstring has the model and the rule
table): layouts, the per-op rules (`_RULES` through `_rule`), and one propagation pass over a graph (`_propagate`).

Internal to plan.tensor: the entry points there choose the seeds, iterate the passes and record the result.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.plan.tensor_layout import REPLICATED
from partitioner.plan.tensor_ops import (
    _BINARY_FUNCTIONS,
    _BINARY_METHODS,
    _CAT,
    _CROSS_ENTROPY,
    _EXPAND,
    _FIRST_ARG_METHODS,
    _INDEX,
    _MATMUL,
    _META_METHODS,
    _NEW_TENSOR,
    _NORM_FUNCTIONS,
    _NORM_MODULES,
    _REDUCE,
    _RESHAPE,
    _SDPA,
    _SELECT,
    _SLICE,
    _SOFTMAX,
    _SPLIT,
    _SQUEEZE,
    _STACK,
    _TRANSPOSE,
    _UNARY_FUNCTIONS,
    _UNARY_METHODS,
    _UNARY_MODULES,
    _UNBIND,
    _UNSQUEEZE,
    _WEIGHT_OPS,
    WeightOp,
    cross_entropy_call,
    is_grouped_mm,
    key_in,
    op_key,
    op_name,
    weight_op,
)
from partitioner.plan.tensor_ops import node_arg as _arg


# ----------------------------------------------------------------------------------------------- layouts
# ----------------------------------------------------------------------------------------------- layouts
@dataclass(frozen=True)
class _Shard:
    dim: int
    parts: int = 1
    origins: frozenset[str] = frozenset()  # the seeds whose sharding produced this value
    pad: int = 0  # a vocabulary dim padded by `pad` columns so that tp divides it (the last rank holds them)
    # the last `whole` elements of `dim` are held whole by every rank, after its 1/tp of the others (a fused q | k | v
    # whose one k and v tp does not split: Falcon's or GPTBigCode's multi-query attention); parts 1, no pad
    whole: int = 0


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
    """A node cannot take its inputs' layouts. blame: the seeds to undo (default: all that reach the node)."""

    def __init__(self, reason: str, divisibility: bool = False, blame: frozenset[str] | None = None):
        super().__init__(reason)
        self.reason = reason
        self.divisibility = divisibility
        self.blame = blame


class _PartsRequest(Exception):
    """Re-seed column producer `seed` as `parts` blocks (a fused q|k|v); `reason`: why one block did not do."""

    def __init__(self, seed: str, parts: int, reason: str = "", divisibility: bool = False):
        super().__init__(f"{seed} needs {parts} parts")
        self.seed, self.parts, self.reason, self.divisibility = seed, parts, reason, divisibility


class _WholeRequest(Exception):
    """Re-seed column producer `seed` with the last `kept` / `of` of its outputs held whole by every rank (the k and v
    of a fused multi-query q | k | v, sliced off after the q heads); `reason`: why the plain shard did not do."""

    def __init__(self, seed: str, kept: int, of: int, reason: str):
        super().__init__(f"{seed} needs its last {kept}/{of} kept whole")
        self.seed, self.kept, self.of, self.reason = seed, kept, of, reason


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


# ----------------------------------------------------------------------------------------------- helpers
def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _shape(n: fx.Node) -> tuple[int, ...]:
    v = _val(n)
    if not isinstance(v, torch.Tensor):
        raise _Conflict(f"{n.name} has no tensor metadata")
    return tuple(v.shape)


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
    # a padded vocabulary's rows per rank are a multiple of this (the device's GEMM row alignment, in elements)
    vocab_alignment: int = 1
    layout: dict[fx.Node, Layout] = field(default_factory=dict)
    rules: dict[str, str] = field(default_factory=dict)
    params: dict[str, tuple[dict[str, int | None], frozenset[str]]] = field(default_factory=dict)
    arg_rewrites: dict[str, list[list[Any]]] = field(default_factory=dict)
    whole_rewrites: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # column seed -> (kept, of): its last kept / of outputs are held whole by every rank (_WholeRequest)
    seed_whole: dict[str, tuple[int, int]] = field(default_factory=dict)
    global_sizes: list[str] = field(default_factory=list)
    gathers: dict[str, int] = field(default_factory=dict)
    gather_pads: dict[str, int] = field(default_factory=dict)  # gathered outputs with vocabulary padding to drop
    requirements: list[dict[str, Any]] = field(default_factory=list)
    param_users: dict[str, set[str]] = field(default_factory=dict)  # parameter -> the nodes that shard it
    row_bias: dict[str, str] = field(default_factory=dict)  # row-parallel WeightOp -> its bias get_attr node
    # replicated value -> (dim, parts, repeat) -> readers of each rank's slice (repeat > 1: of the value repeated that
    # many times along dim, each slice a whole kv head several ranks share: grouped-query attention, kv heads < tp)
    slices: dict[str, dict[tuple[int, int, int], list[str]]] = field(default_factory=dict)
    # module path -> module, filled on first use (get_submodule walks the path each time: half of a 1T GPT's search
    # went there); one dict may serve every propagation over the same graph
    modules: dict[str, nn.Module] = field(default_factory=dict)
    # partial values whose one reader keeps them partial (a sum of row-parallel outputs, their views, scalings): the
    # all-reduce moves to the end of the chain (_partial_through)
    partial_taken: set[str] = field(default_factory=set)

    def module(self, target: Any) -> nn.Module:
        """The submodule a call_module node calls."""
        name = str(target)
        found = self.modules.get(name)
        if found is None:
            found = self.modules[name] = self.gm.get_submodule(name)
        return found

    def slice(self, value: fx.Node, dim: int, reader: fx.Node, parts: int = 1, repeat: int = 1) -> None:
        """`reader` reads its rank's 1/tp slice of replicated `value` along `dim` (of each of `parts` blocks; with
        `repeat`, of `value` with each index along dim repeated that many times, as repeat_interleave)."""
        self.divides(reader, _shape(value)[dim] * repeat, parts, f"{value.name} dim {dim}")
        self.slices.setdefault(value.name, {}).setdefault((dim, parts, repeat), []).append(reader.name)

    def claim(self, node: fx.Node, name: str, spec: dict[str, int | None], origins: frozenset[str]) -> None:
        """Record parameter `name`'s shard as `node` needs it; one parameter read by several nodes (tied, or a
        module called twice) must get one spec from all of them."""
        held = self.params.get(name)
        if held is not None and held[0] != spec and node.name not in self.param_users.get(name, ()):
            raise _Conflict(f"parameter {name} is read by several nodes that need different shardings")
        self.params[name] = (spec, origins | (held[1] if held is not None else frozenset()))
        self.param_users.setdefault(name, set()).add(node.name)

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

    def vocab_pad(self, node: fx.Node, size: int, parts: int, what: str) -> int:
        """0 when tp divides `size`; when it does not and `size` is a vocabulary (an embedding's row count) in one
        part, the padding that makes it divide into rows a multiple of `vocab_alignment`; else the divisibility
        conflict of `divides`. (A vocabulary tp divides is not padded for alignment: a padded one is refused by
        graphs that read its size, the loss's view of the logits among them, and would then stay replicated.)"""
        if self.tp is not None and parts == 1 and size in self.vocab and size % self.tp:
            return -size % (self.tp * self.vocab_alignment)
        self.divides(node, size, parts, what)
        return 0

    def rewrite(self, node: fx.Node, path: list[Any], whole: int = 0) -> None:
        """The size or index at `path` becomes local: v // tp, or with `whole`, (v - whole) // tp + whole."""
        if whole:
            self.whole_rewrites.setdefault(node.name, []).append({"path": path, "whole": whole})
        else:
            self.arg_rewrites.setdefault(node.name, []).append(path)

    def seed_whole_rows(self, node: fx.Node, out: int) -> int:
        """How many of a column seed's `out` outputs every rank holds whole (0 unless re-seeded so); tp must divide
        the others."""
        if node.name not in self.seed_whole:
            return 0
        kept, of = self.seed_whole[node.name]
        if (out * kept) % of:
            raise _Conflict(f"its last {kept}/{of} of {out} outputs are not a whole number of rows")
        whole = out * kept // of
        self.divides(node, out - whole, 1, f"out_features {out} - {whole} kept whole")
        return whole


def _spec(dim: int, parts: int, pad: int, whole: int = 0) -> dict[str, int | None]:
    """A parameter's shard spec (TensorParallelPlan.param_shard); "pad" only where a vocabulary is padded, "whole"
    only where the last rows are held whole."""
    spec: dict[str, int | None] = {"dim": dim, "parts": parts}
    if pad:
        spec["pad"] = pad
    if whole:
        spec["whole"] = whole
    return spec


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
            if d_in < 0 or shape[d_in] == 1 or _shard_own_parameter(st, node, x, d_in, shard):
                continue
            if _constant_table(x) and not shard.whole and not shard.pad:  # MPT's ALiBi bias per head: each rank
                st.slice(x, d_in, node, shard.parts)  # reads the rows of its heads (no gradient to gather back)
                continue
            raise _Conflict(f"replicated operand {x.name} {list(shape)} spans the sharded dim {shard.dim}")
    return shard


def _constant_table(x: fx.Node, limit: int = 256) -> bool:
    """Whether `x` is a table the model computes from its buffers and constants alone, sizes aside (no input's values,
    no gradient: an ALiBi bias per head, built for the input's length), found by walking back at most `limit` tensor
    nodes; an activation is not one."""
    if x.meta.get("requires_grad", True):
        return False
    frontier, seen = [x], {x}
    while frontier:
        n = frontier.pop()
        if n.op == "placeholder" or len(seen) > limit:
            return False
        for a in n.all_input_nodes:
            if a not in seen and isinstance(_val(a), torch.Tensor):  # a size read off an input is no input value
                seen.add(a)
                frontier.append(a)
    return True


def _shard_own_parameter(st: _State, node: fx.Node, x: fx.Node, d: int, shard: _Shard) -> bool:
    """Shard parameter `x` along its dim `d` as `shard` is, when `node` is the only reader of it: a norm's weight
    scaling a sharded projection elementwise (OLMo's qk-norm over all heads: `q_norm.weight * rms_normed(q)`), which
    each rank then holds its slice of, as Megatron shards it. Only a parameter read once by one get_attr (another
    reader would get the shard too), never across a dim partly kept whole or padded."""
    if x.op != "get_attr" or shard.whole or shard.pad or len(x.users) != 1:
        return False
    target = str(x.target)
    try:
        param = st.gm.get_parameter(target)
    except AttributeError:  # a buffer or constant
        return False
    if sum(1 for n in st.gm.graph.nodes if n.op == "get_attr" and str(n.target) == target) != 1:
        return False
    if sum(1 for _, p in st.gm.named_parameters(remove_duplicate=False) if p is param) != 1:  # tied elsewhere
        return False
    st.divides(node, _shape(x)[d], shard.parts, f"{target} dim {d}")
    st.claim(node, target, _spec(d, shard.parts, 0), shard.origins)
    return True


def _rule_call_module(st: _State, node: fx.Node) -> Layout:
    mod = st.module(node.target)
    x = node.args[0] if node.args else None
    lay = st.eff(x)
    if isinstance(lay, _Shard) and lay.whole and not isinstance(mod, _UNARY_MODULES):
        raise _Conflict(f"{type(mod).__name__} on a value whose sharded dim is partly kept whole on every rank")
    if isinstance(mod, nn.Linear):
        target = str(node.target)

        def record(name: str, spec: dict[str, int | None], origins: frozenset[str]) -> None:
            st.params[name] = (spec, origins)  # a module's own parameters: its calls share them (_tied_conflicts)

        bias = f"{target}.bias" if mod.bias is not None else None
        return _linear(st, node, x, tuple(mod.weight.shape), f"{target}.weight", bias, 1, 0, "Linear", record)
    if isinstance(mod, nn.Embedding):
        if lay is not None:
            raise _Conflict("Embedding indices are sharded")
        if node.name in st.seeds:
            pad = st.vocab_pad(node, mod.num_embeddings, 1, "num_embeddings")
            st.rules[node.name] = "vocab_embedding"
            st.params[f"{node.target}.weight"] = (_spec(0, 1, pad), frozenset([node.name]))
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
    if node.op == "call_module":
        return type(st.module(node.target)).__name__
    return op_name(node)


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
    if lay.whole:
        return _reshape_partly_whole(st, node, lay, a, b)
    if lay.pad:  # a padded vocabulary: only views that keep it as the last dim, its size a literal (made local)
        k = len(b) - 1
        if lay.dim != len(a) - 1 or b[-1] != a[-1]:
            raise _Conflict(f"view {list(a)} -> {list(b)} of a padded vocabulary shard does not keep it the last dim")
        path = _size_arg_path(node, k, len(b))
        value = _get(node, path) if path is not None else None
        if path is not None and not (isinstance(value, int) and not isinstance(value, bool)):
            raise _Conflict(f"the size of a padded vocabulary dim in a view is {value!r}, not an int literal")
        if path is not None and value != -1:
            st.rewrite(node, path)
        return _Shard(k, 1, lay.origins)
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
        kept = _tail_cut_by_readers(st, node, k, b[k]) if st.tp and local % st.tp and not lay.pad else 0
        if kept and (b[k] - kept) % st.tp == 0:  # (B, T, nh + 2, hd) of a multi-query q | k | v, tp not dividing nh + 2
            _ask_whole(st, lay, kept, b[k], f"view dim {k}={b[k]} is not divisible by tp={st.tp}")
        blocks = seed and seed not in st.seed_parts and seed not in st.seed_whole  # a seed is re-seeded one way
        if local % (st.tp or 2) and lay.parts == 1 and blocks and span > b[k]:
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


def _reshape_partly_whole(st: _State, node: fx.Node, lay: _Shard, a: tuple, b: tuple) -> Layout:
    """A view of a dim whose last `whole` elements every rank holds whole: it must map the dim (with the dims after
    it) onto one output dim k and those after it, the head and the tail each a whole number of dim-k elements, e.g.
    (B, T, (nh + 2) * hd) <-> (B, T, nh + 2, hd). The size of dim k becomes (size - whole_k) / tp + whole_k."""
    inner_a = math.prod(a[lay.dim + 1 :])
    span, tail = a[lay.dim] * inner_a, lay.whole * inner_a
    for k in range(len(b)):
        inner_b = math.prod(b[k + 1 :])
        if b[k] * inner_b != span or tail % inner_b or b[k] == 1:
            continue
        whole = tail // inner_b
        st.divides(node, b[k] - whole, 1, f"view dim {k}'s {b[k]} - {whole} kept whole")
        path = _size_arg_path(node, k, len(b))
        if path is not None and _get(node, path) != -1:
            _check_size_arg(st, node, path, k)
            st.rewrite(node, path, whole=whole)
        return _Shard(k, 1, lay.origins, whole=whole)
    raise _Conflict(f"view {list(a)} -> {list(b)} does not keep the sharded dim {lay.dim}'s kept-whole tail in one dim")


def _size_arg_path(node: fx.Node, k: int, out_ndim: int) -> list[Any] | None:
    """Where the size of output dim k is written in a reshape call (None: derived, e.g. flatten)."""
    name = op_name(node)
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
    name = op_name(node)
    if name in ("transpose", "t"):
        d0, d1 = (_norm_dim(_arg(node, 1, "dim0", 0), nd), _norm_dim(_arg(node, 2, "dim1", 1), nd))
        perm = list(range(nd))
        perm[d0], perm[d1] = d1, d0
    elif name == "numpy_T":  # x.T: every dim reversed
        perm = list(reversed(range(nd)))
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
        return _Tuple(tuple(lay for _ in pieces))
    n = len(pieces)
    sizes = [p[dim] for p in pieces]
    if lay.whole or len(set(sizes)) != 1:  # q | k | v of unequal sizes: q sharded, k and v whole on every rank
        return _split_head_from_tail(st, node, lay, sizes)
    if lay.parts % n:
        seed = next(iter(lay.origins)) if len(lay.origins) == 1 else None
        if lay.parts == 1 and seed is not None and seed not in st.seed_whole:  # re-seed with one block per piece
            raise _PartsRequest(seed, n)
        raise _Conflict(f"split into {n} pieces of a dim made of {lay.parts} blocks")
    if op_name(node) == "split":
        sizes = _arg(node, 1, "split_size_or_sections" if not isinstance(node.target, str) else "split_size")
        path = ["args", 1] if len(node.args) > 1 else ["kwargs", "split_size"]
        if isinstance(sizes, (list, tuple)):
            for j in range(len(sizes)):
                st.rewrite(node, path + [j])
        else:
            st.rewrite(node, path)
        st.divides(node, pieces[0][dim], lay.parts // n, "split size")
    return _Tuple(tuple(_Shard(dim, lay.parts // n, lay.origins) for _ in pieces))


def _split_head_from_tail(st: _State, node: fx.Node, lay: _Shard, sizes: list[int]) -> Layout:
    """split([head, tail pieces...]) of the sharded dim, the first piece exactly the part sharded over the ranks (the
    rest held whole by each: GPTBigCode's `c_attn(x).split((embed, 2 * kv), dim=2)`): a shard, then replicated pieces.
    On a plain shard, the seed is asked to keep what follows the first piece whole."""
    size, head = sum(sizes), sum(sizes) - lay.whole
    if not lay.whole:
        _ask_whole(st, lay, size - sizes[0], size, "split of the sharded dim into unequal pieces")
    if sizes[0] != head:
        raise _Conflict(f"split {sizes} of a dim whose last {lay.whole} are kept whole does not cut there")
    if op_name(node) != "split" or not isinstance(_arg(node, 1, "split_size"), (list, tuple)):
        raise _Conflict("split of a partly whole dim by a size, not by the pieces' sizes")
    st.rewrite(node, ["args", 1, 0] if len(node.args) > 1 else ["kwargs", "split_size", 0])
    return _Tuple((_Shard(lay.dim, 1, lay.origins),) + (None,) * (len(sizes) - 1))


def _ask_whole(st: _State, lay: _Shard, kept: int, size: int, why: str) -> None:
    """Raise the request that re-seeds the column producer of `lay` with its last `kept` / `size` outputs held whole
    by every rank, or, where that cannot be (several seeds, blocks, a padded vocabulary, or its seed keeps at least as
    much whole already, so requests only grow and the restarts end), the conflict `why`."""
    seed = next(iter(lay.origins)) if len(lay.origins) == 1 else None
    if 0 < kept < size and seed is not None and lay.parts == 1 and not lay.pad and seed not in st.seed_parts:
        held = st.seed_whole.get(seed)
        if held is None or kept * held[1] > held[0] * size:
            raise _WholeRequest(seed, kept, size, why)
    raise _Conflict(why)


def _cut(st: _State, node: fx.Node, lay: _Shard, size: int, lo: int, hi: int, paths: tuple) -> Layout:
    """Elements [lo, hi) (normalized, step 1) of the sharded dim of `size`: all of it keeps the shard; exactly the
    part sharded over the ranks (before a tail kept whole) is a plain shard; a piece of the kept-whole tail is the same
    on every rank, replicated. `paths`: where the start and the end are written (None where the value needs no
    rewrite: absent, negative, or past the end; "fixed" where it could not be rewritten, e.g. inside a slice object)."""
    head = size - lay.whole
    if lo == 0 and hi == size:
        return lay
    start_path, end_path = paths
    if lay.whole and lo == 0 and hi == head:
        if end_path == "fixed":
            raise _Conflict("a positive end of a slice of the sharded dim that cannot be made local")
        if end_path is not None:
            st.rewrite(node, end_path)
        return _Shard(lay.dim, 1, lay.origins)
    if lay.whole and lo >= head:
        for path, value in ((start_path, lo), (end_path, hi)):
            if path == "fixed":
                raise _Conflict("a positive index into the kept-whole part that cannot be made local")
            if path is not None:
                st.rewrite(node, path, whole=value - head)
        return None
    if lo == 0 and hi < size:
        _ask_whole(st, lay, size - hi, size, f"slice [0:{hi}] of the sharded dim of {size}")
    if hi == size and lo > 0:
        _ask_whole(st, lay, size - lo, size, f"slice [{lo}:] of the sharded dim of {size}")
    raise _Conflict(f"slice [{lo}:{hi}] of the sharded dim of {size}")


def _tail_cut_by_readers(st: _State, node: fx.Node, k: int, size: int) -> int:
    """How many trailing elements of dim k (of `size`) the readers of `node` keep apart as a tail: some reader takes the
    head [0:size - t] as a slice and the others read inside the last t (slices, selects and constant indices, by
    negative positions), Falcon's `qkv[..., :-2, :]`, `qkv[..., [-2], :]`, `qkv[..., [-1], :]`, or a split into unequal
    pieces cuts it after the first (Falcon's `qkv.split([nh, 1, 1], dim=-2)` in transformers >= 5.25); 0 otherwise (a
    packed q | k | v read by positions 0, 1, 2, or split into equal pieces, is cut into blocks instead)."""
    heads, tails = set(), [0]
    nd = len(_shape(node))
    for u in node.users:
        name = op_name(u) if u.op == "call_function" else ""
        try:
            if name == "slice" and _norm_dim(_arg(u, 1, "dim", 0), nd) == k:
                piece: Any = slice(_arg(u, 2, "start"), _arg(u, 3, "end"))
            elif name == "select" and _norm_dim(_arg(u, 1, "dim"), nd) == k:
                piece = _arg(u, 2, "index")
            elif u.op == "call_function" and u.target is operator.getitem and u.args[0] is node:
                piece = _index_at(u.args[1], k, nd)
            elif name == "index":
                indices = list(_arg(u, 1, "indices") or [])
                idx = indices[k] if len(indices) > k else None
                piece = _constant_ints(st, idx) if isinstance(idx, fx.Node) else None
            elif name == "split" and _norm_dim(_arg(u, 2, "dim", 0), nd) == k:
                sizes = [tuple(v.shape)[k] for v in _val(u)]
                if len(set(sizes)) == 1:  # equal pieces: blocks (q | k | v), not a head and a tail
                    continue
                heads.add(size - sizes[0])  # _split_head_from_tail's cut: the first piece, then the rest whole
                tails.append(size - sizes[0])
                continue
            else:
                continue
            if isinstance(piece, slice) and piece.step in (None, 1):
                lo, _ = _bound(piece.start, size, 0, None)
                hi, _ = _bound(piece.stop, size, size, None)
                if lo == 0 and hi < size:
                    heads.add(size - hi)
                elif isinstance(piece.start, int) and piece.start < 0 and hi > lo:  # inside the last size - lo
                    tails.append(size - lo)
            elif isinstance(piece, int) and not isinstance(piece, bool) and piece < 0:
                tails.append(-piece)
            elif isinstance(piece, list) and piece and all(v < 0 for v in piece):
                tails.append(-min(piece))
        except _Conflict:
            continue
    kept = max(tails)
    return kept if 0 < kept < size and kept in heads else 0


def _index_at(idx: Any, k: int, nd: int) -> Any:
    """The entry of a getitem index (an int, slice, None, ... or a tuple of them) that applies to input dim k."""
    index = idx if isinstance(idx, tuple) else (idx,)
    if any(not (i is None or i is Ellipsis or isinstance(i, (int, slice))) for i in index):
        return None
    ell = index.index(Ellipsis) if Ellipsis in index else len(index)
    consumed = sum(1 for i in index if i is not None and i is not Ellipsis)
    expanded = [i for i in [*index[:ell], *[slice(None)] * (nd - consumed), *index[ell + 1 :]] if i is not None]
    return expanded[k] if k < len(expanded) else None


def _bound(value: Any, size: int, default: int, path: Any) -> tuple[int, Any]:
    """A slice bound normalized into [0, size], and the path to rewrite it at (None: nothing to rewrite)."""
    if value is None:
        return default, None
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Conflict(f"a slice bound of the sharded dim is {value!r}, not an int")
    if value < 0:
        return max(0, value + size), None
    return min(value, size), (path if value < size else None)


def _rule_unbind(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(x)))
    if dim == lay.dim:
        raise _Conflict("unbind of the sharded dim")
    out = dataclasses.replace(lay, dim=lay.dim - (dim < lay.dim))
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
                if i == slice(None):
                    return dataclasses.replace(lay, dim=d_out)
                return _getitem_sharded_dim(st, node, lay, _shape(src)[lay.dim], i, d_out)
            d_out += 0 if isinstance(i, int) else 1
            d_in += 1
        return dataclasses.replace(lay, dim=lay.dim - (nd - out_nd))
    return _default(st, node)


def _getitem_sharded_dim(st: _State, node: fx.Node, lay: _Shard, size: int, i: Any, d_out: int) -> Layout:
    """x[..., i, ...] or x[..., a:b, ...] on the sharded dim (fx graphs): as the slice / select rules, with the bounds
    inside the index, where a positive one cannot be made local."""
    if isinstance(i, int):
        lo = i + size if i < 0 else i
        out = _cut(st, node, lay, size, lo, lo + 1, (None if i < 0 else "fixed", None if i < 0 else "fixed"))
        if out is not None:
            raise _Conflict("indexing into the sharded dim")
        return None
    if i.step not in (None, 1):
        raise _Conflict("a strided slice of the sharded dim")
    lo, lo_path = _bound(i.start, size, 0, "fixed")
    hi, hi_path = _bound(i.stop, size, size, "fixed")
    out = _cut(st, node, lay, size, lo, hi, (lo_path, hi_path))
    return dataclasses.replace(out, dim=d_out) if isinstance(out, _Shard) else out


def _rule_size(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _rule_value(st, node) if not isinstance(_val(node), torch.Tensor) else _default(st, node)
    key = op_key(node)
    reads_dim = key == "numel" or (key is getattr and node.args[1] == "shape")
    reads_dim |= key == "size" and _arg(node, 1, "dim") in (None, lay.dim, lay.dim - len(_shape(x)))
    if lay.pad and reads_dim:
        raise _Conflict("the size of a padded vocabulary dim is read (a rank's size x tp is the padded size)")
    if lay.whole and reads_dim:
        raise _Conflict("the size of a dim partly kept whole is read (a rank's size x tp is not the model's)")
    if key == "numel":  # the shard's numel x tp: shards are equal
        st.global_sizes.append(node.name)
        return None
    if key is getattr:  # getattr(x, name)
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
    if key_in(node, _FIRST_ARG_METHODS):  # the other tensors give only a dtype / device (`x.type_as(y)`), the same
        # on every rank however they are sharded (Gemma 3's qk-norm casts back by type_as(normed, sharded q))
        for x in node.all_input_nodes[1:]:
            if st.eff(x) is not None and x is not node.args[0] and not isinstance(_val(x), torch.Tensor):
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
    return _matmul_layout(st, node, node.args[0], node.args[1])


def _rule_baddbmm(st: _State, node: fx.Node) -> Layout:
    """beta * input + alpha * (batch1 @ batch2): the bmm's layout; a replicated input spanning its sharded batch dim
    (BLOOM's ALiBi bias per batch x head) is read as each rank's slice of every block."""
    x, b1, b2 = node.args[0], node.args[1], node.args[2]
    out = _matmul_layout(st, node, b1, b2)
    lx = st.eff(x)
    if out is None:
        return _default(st, node)
    shape, out_shape = _shape(x), _shape(node)
    d = out.dim - (len(out_shape) - len(shape))
    if isinstance(lx, _Shard) and (lx.dim, lx.parts) == (d, out.parts):
        return _Shard(out.dim, out.parts, out.origins | lx.origins)
    if lx is not None:
        raise _Conflict(f"baddbmm input is {_layout_str(lx)}, the product is sharded on dim {out.dim}")
    if d >= 0 and shape[d] != 1:
        if shape[d] != out_shape[out.dim]:
            raise _Conflict(f"baddbmm input {list(shape)} spans the sharded dim {out.dim} with another size")
        st.slice(x, d, node, out.parts)
    return out


def _matmul_layout(st: _State, node: fx.Node, a: Any, b: Any) -> Layout:
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
    """Attention sharded on the heads: q sharded on its head dim; k, v and the mask sharded alike, or replicated
    with all heads (k / v projections left whole, e.g. fewer kv heads than tp after repeat_kv; a per-head bias such
    as T5's): each rank reads its heads' slice of those (`slices`: no communication forward, the gradient's
    slices all-gathered backward)."""
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    if all(st.eff(x) is None for x in node.all_input_nodes):
        return None
    gqa = bool(_arg(node, 7, "enable_gqa") or False)  # k / v hold heads / r kv heads, each read by r query heads
    nd = len(_shape(q))
    head = nd - 3
    lq = st.eff(q)
    if nd < 3 or not (isinstance(lq, _Shard) and lq.dim == head and lq.parts == 1):
        raise _Conflict(f"attention needs q sharded on the head dim {head}; got {_layout_str(lq)}")
    heads = _shape(q)[head]
    operands = [(k, "key"), (v, "value")]
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        operands.append((mask, "mask"))
    origins = set(lq.origins)
    slices = []
    for t, what in operands:
        lay, shape = st.eff(t), _shape(t)
        d = head - (nd - len(shape))
        if isinstance(lay, _Shard) and lay.dim == d and lay.parts == 1:
            origins |= lay.origins
        elif lay is None and (d < 0 or shape[d] == 1):  # broadcast over the heads (one kv head: every q head's)
            continue
        elif lay is None and shape[d] == heads:
            slices.append((t, d, 1))
        elif lay is None and gqa and what != "mask" and heads % shape[d] == 0:
            # grouped-query kv heads: rank j's q heads [j g, (j + 1) g), g = heads / tp (q is sharded, so tp divides
            # heads), read kv heads from j g / r on (r = heads / kv): a whole chunk of kv / tp heads where tp divides
            # kv, else (kv divides tp, so g divides r) the one kv head tp / kv ranks share: kv repeated tp / kv
            # times, then sliced
            kv = shape[d]
            if kv % st.tp == 0:
                slices.append((t, d, 1))
            elif st.tp % kv == 0:
                slices.append((t, d, st.tp // kv))
            else:
                raise _Conflict(f"attention {what} has {kv} kv heads for {heads} query heads: tp={st.tp} splits "
                                f"neither the kv heads nor each kv head's query heads evenly")  # fmt: skip
        elif lay is None:
            raise _Conflict(f"attention {what} {list(shape)} has {shape[d]} heads, q has {heads}")
        else:  # q's heads are right: undo what made this operand wrong
            reason = f"attention {what} is {_layout_str(lay)}, not sharded on the head dim {d}"
            raise _Conflict(reason, blame=_origins(lay))
    for t, d, repeat in slices:
        st.slice(t, d, node, repeat=repeat)
    return _Shard(head, 1, frozenset(origins))


def _rule_cross_entropy(st: _State, node: fx.Node) -> Layout:
    x = node.args[0]
    lay = st.eff(x)
    if not isinstance(lay, _Shard):
        return _default(st, node)
    try:
        call = cross_entropy_call(node)
    except ValueError as e:
        raise _Conflict(str(e)) from None
    target = call.target
    if lay.dim != 1 or lay.parts != 1 or st.eff(target) is not None:
        raise _Conflict("cross_entropy on logits not sharded on the class dim 1")
    if call.weight is not None or call.label_smoothing:
        raise _Conflict("vocab-parallel cross_entropy supports no class weights or label smoothing")
    if isinstance(target, fx.Node) and _val(target).is_floating_point():
        raise _Conflict("vocab-parallel cross_entropy needs class-index targets")
    if not lay.pad:
        st.divides(node, _shape(x)[1], 1, "classes")
    st.rules[node.name] = "vocab_cross_entropy"
    return None


def _rule_output(st: _State, node: fx.Node) -> Layout:
    returned: list[fx.Node] = []  # a node, or nodes in any tuple / list / dict structure
    fx.node.map_arg(node.args[0], returned.append)
    for x in returned:
        lay = st.eff(x)
        if isinstance(lay, _Shard):
            if not st.gather_output:
                raise _Conflict("a sharded value reaches the model output (gather_output=False)")
            if lay.parts != 1:
                raise _Conflict("a value of several sharded blocks reaches the model output")
            if lay.whole:
                raise _Conflict("a value partly kept whole on every rank reaches the model output")
            st.gathers[x.name] = lay.dim
            if lay.pad:
                st.gather_pads[x.name] = lay.pad
        elif lay is not None:
            raise _Conflict(f"output {x.name} has layout {_layout_str(lay)}")
    return None


def _rule_weight_op(st: _State, node: fx.Node) -> Layout:
    """A linear-like or embedding call on a parameter read by get_attr (tensor_ops.WeightOp): the functional twin
    of the nn.Linear / nn.Embedding module rules. Row-parallel: the bias is added after the all-reduce (`row_bias`)."""
    op = weight_op(st.gm, node)
    if op is None:  # the weight is computed, not a parameter: an ordinary matmul
        return _rule_matmul(st, node) if op_name(node) in ("mm", "matmul") else _default(st, node)
    lay = st.eff(op.x)
    w = _shape(op.weight)
    if op.kind == "embedding":
        if lay is not None:
            raise _Conflict("embedding indices are sharded")
        if node.name not in st.seeds:
            return None
        pad = st.vocab_pad(node, w[0], 1, "num_embeddings")
        st.rules[node.name] = "vocab_embedding"
        st.claim(node, op.param, _spec(0, 1, pad), frozenset([node.name]))
        return _Partial(frozenset([node.name]))

    if op.kind == "grouped" and lay is None and st.tp:  # experts' columns: never padded nor partly kept whole
        st.divides(node, w[op.out_dim], st.seed_parts.get(node.name, 1), "expert out_features")

    def record(name: str, spec: dict[str, int | None], origins: frozenset[str]) -> None:
        st.claim(node, name, spec, origins)
        if name == op.param:
            _claim_via(st, op)

    out = _linear(st, node, op.x, w, op.param, op.bias_param, op.in_dim, op.out_dim, op_name(node), record)
    if st.rules.get(node.name) == "row" and op.bias is not None:
        st.row_bias[node.name] = op.bias.name  # added after the all-reduce
    return out


def _linear(
    st: _State,
    node: fx.Node,
    x: fx.Node,
    w: tuple[int, ...],
    weight: str,
    bias: str | None,
    in_dim: int,
    out_dim: int,
    what: str,
    record: Callable[[str, dict[str, int | None], frozenset[str]], None],
) -> Layout:
    """A linear-like call (an nn.Linear module or a functional / ATen weight op) reading parameters `weight` (shape
    `w`; its `in_dim` and `out_dim`) and `bias`: row-parallel when its input is sharded on the features (partial
    output, the bias replicated and added after the all-reduce), column-parallel when it is a seed (its output rows
    sharded: as blocks, padded to a vocabulary, or with a tail kept whole, as the seed was asked), else replicated.
    `record` notes a parameter's shard spec (a module's calls share its parameters; a functional op claims them)."""
    lay = st.eff(x)
    if isinstance(lay, _Shard):  # rowwise: (…, in/tp) @ W[:, in/tp]^T -> partial (…, out)
        if lay.dim != len(_shape(x)) - 1:
            raise _Conflict(f"{what} input is sharded on dim {lay.dim}, not on its in_features")
        if _normalized_across_ranks(st, x):
            raise _Conflict(
                f"{what} reads a value normalized over the sharded dim: a norm between two projections (a low-rank "
                f"latent, DeepSeek's MLA) costs an all-reduce on each side; the first projection stays whole"
            )
        st.divides(node, w[in_dim], lay.parts, "in_features")
        st.rules[node.name] = "row"
        record(weight, {"dim": in_dim, "parts": lay.parts}, lay.origins)
        if bias is not None:
            record(bias, {"dim": None, "parts": 1}, lay.origins)
        return _Partial(lay.origins)
    if lay is not None:
        raise _Conflict(f"{what} input has layout {_layout_str(lay)}")
    if node.name not in st.seeds:
        return None
    # colwise: W[out/tp, :] -> (…, out/tp)
    if st.tp and w[out_dim] < st.tp:  # a gate's single output (Qwen2-MoE's shared_expert_gate): no degree splits it,
        # so even a forced one (strict) leaves it replicated rather than refusing: it is no head or hidden size
        raise _Conflict(f"out_features={w[out_dim]} is fewer than tp={st.tp}: nothing to split")
    parts = st.seed_parts.get(node.name, 1)
    whole = st.seed_whole_rows(node, w[out_dim])
    pad = st.vocab_pad(node, w[out_dim], parts, "out_features") if not whole else 0
    st.rules[node.name] = "column"
    mine = frozenset([node.name])
    record(weight, _spec(out_dim, parts, pad, whole), mine)
    if bias is not None:
        record(bias, _spec(0, parts, pad, whole), mine)
    return _Shard(len(_shape(node)) - 1, parts, mine, pad, whole)


def _claim_via(st: _State, op: WeightOp) -> None:
    """The transpose an op reads its weight through (x @ W.T) reads the shard too: it transposes the rank's rows."""
    if op.via is not None:
        st.param_users.setdefault(op.param, set()).add(op.via.name)


def _on_shard(rule: Callable[[_State, fx.Node, fx.Node, _Shard], Layout]) -> Callable[[_State, fx.Node], Layout]:
    """A rule for ops whose first argument is sharded (`rule(st, node, x, its shard)`); others take `_default`."""

    @functools.wraps(rule)
    def apply(st: _State, node: fx.Node) -> Layout:
        x = node.args[0] if node.args else None
        lay = st.eff(x)
        return rule(st, node, x, lay) if isinstance(lay, _Shard) else _default(st, node)

    return apply


@_on_shard
def _rule_unsqueeze(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    d = _norm_dim(_arg(node, 1, "dim"), len(_shape(node)))
    return _Shard(lay.dim + (d <= lay.dim), lay.parts, lay.origins)


@_on_shard
def _rule_squeeze(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    shape = _shape(x)
    dims = _arg(node, 1, "dim")
    if dims is None:
        dims = [i for i, n in enumerate(shape) if n == 1]
    dims = {_norm_dim(d, len(shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims]) if shape[d] == 1}
    if lay.dim in dims:
        raise _Conflict("squeeze of the sharded dim")
    return _Shard(lay.dim - sum(1 for d in dims if d < lay.dim), lay.parts, lay.origins)


@_on_shard
def _rule_slice(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    """ATen's slice(x, dim, start, end, step): any slice of another dim; of the sharded dim, only all of it."""
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(x)))
    if dim != lay.dim:
        return lay
    if _arg(node, 4, "step", 1) != 1:
        raise _Conflict("a strided slice of the sharded dim")
    size = _shape(x)[dim]
    lo, lo_path = _bound(_arg(node, 2, "start"), size, 0, ["args", 2] if len(node.args) > 2 else ["kwargs", "start"])
    hi, hi_path = _bound(_arg(node, 3, "end"), size, size, ["args", 3] if len(node.args) > 3 else ["kwargs", "end"])
    return _cut(st, node, lay, size, lo, hi, (lo_path, hi_path))


@_on_shard
def _rule_select(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    dim = _norm_dim(_arg(node, 1, "dim"), len(_shape(x)))
    if dim == lay.dim:  # an index into the kept-whole tail: the same row on every rank
        size, i = _shape(x)[dim], _arg(node, 2, "index")
        if not isinstance(i, int) or isinstance(i, bool):
            raise _Conflict("select of the sharded dim at a computed index")
        lo = i + size if i < 0 else i
        path = None if i < 0 else (["args", 2] if len(node.args) > 2 else ["kwargs", "index"])
        if _cut(st, node, lay, size, lo, lo + 1, (path, None)) is not None:
            raise _Conflict("select of an index in the sharded dim")
        return None
    return dataclasses.replace(lay, dim=lay.dim - (dim < lay.dim))


@_on_shard
def _rule_index(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    """ATen's index.Tensor(x, indices) with one 1-D replicated index tensor, on another dim than the sharded one
    (Falcon's `qkv[:, :, :, [-2]]`): x's dims stay in place, that one resized, so the shard stays where it is."""
    indices = list(_arg(node, 1, "indices") or [])
    used = [d for d, i in enumerate(indices) if i is not None]
    if len(used) != 1:
        raise _Conflict(f"advanced indexing with {len(used)} index tensors of a sharded input")
    (d,) = used
    idx = indices[d]
    if not isinstance(idx, fx.Node) or st.eff(idx) is not None or len(_shape(idx)) != 1:
        raise _Conflict("an index tensor that is not one replicated 1-D tensor")
    if d != lay.dim:
        return lay
    # rows of the kept-whole tail, by negative constant indices (Falcon's `qkv[..., [-2], :]`): the same on every rank
    values = _constant_ints(st, idx)
    size = _shape(x)[d]
    if not values or any(not -size <= v < size for v in values):
        raise _Conflict("advanced indexing of the sharded dim by a computed index")
    lo = min(v + size if v < 0 else v for v in values)
    if lay.whole and lo >= size - lay.whole and all(v < 0 for v in values):
        return None
    _ask_whole(st, lay, size - lo, size, f"advanced indexing of the sharded dim at {values}")
    raise AssertionError("unreachable")


def _constant_ints(st: _State, node: fx.Node) -> list[int] | None:
    """The values of a 1-D integer tensor the graph holds as a constant (a get_attr, maybe through export's
    lift_fresh_copy or a copy), or None."""
    while node.op == "call_function" and op_name(node) in ("clone", "detach", "to") and node.args:
        node = node.args[0]
    if node.op != "get_attr":
        return None
    value = st.gm
    for part in str(node.target).split("."):
        value = getattr(value, part, None)
    if not isinstance(value, torch.Tensor) or value.is_meta or value.dim() != 1 or value.is_floating_point():
        return None
    return [int(v) for v in value.tolist()]


@_on_shard
def _rule_expand(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    """x.expand(sizes): new leading dims and size-1 dims broadcast; the sharded dim's size (unless -1) made local."""
    k = lay.dim + len(_shape(node)) - len(_shape(x))
    packed = len(node.args) == 2 and isinstance(node.args[1], (list, tuple))
    path: list[Any] = ["args", 1, k] if packed else ["args", 1 + k]
    if "size" in node.kwargs:
        path = ["kwargs", "size", k]
    value = _get(node, path)
    if not (isinstance(value, int) and value == -1):
        st.divides(node, _shape(node)[k], lay.parts, f"expand dim {k}")
        _check_size_arg(st, node, path, k)
        st.rewrite(node, path)
    return _Shard(k, lay.parts, lay.origins)


def _get(node: fx.Node, path: list[Any]) -> Any:
    value: Any = node.args if path[0] == "args" else node.kwargs
    try:
        for p in path[1:]:
            value = value[p]
    except (IndexError, KeyError, TypeError):
        return None
    return value


def _sharded_alike(st: _State, node: fx.Node, what: str) -> tuple[_Shard | None, bool]:
    """The shard of a cat's / stack's tensors, all sharded on the same dim (origins joined), or None when none is
    sharded; and whether every entry of the list is a node. A mix is the conflict `what` names."""
    tensors = _arg(node, 0, "tensors")
    inputs = [t for t in tensors if isinstance(t, fx.Node)] if isinstance(tensors, (list, tuple)) else []
    lays = [st.eff(t) for t in inputs]
    if all(lay is None for lay in lays):
        return None, len(inputs) == len(tensors or ())
    first = next(lay for lay in lays if lay is not None)
    if not isinstance(first, _Shard) or any(
        not isinstance(lay, _Shard) or (lay.dim, lay.parts) != (first.dim, first.parts) for lay in lays
    ):
        raise _Conflict(f"{what} of tensors not all sharded on the same dim")
    origins = frozenset().union(*(lay.origins for lay in lays))
    return _Shard(first.dim, first.parts, origins), len(inputs) == len(tensors)


def _rule_cat(st: _State, node: fx.Node) -> Layout:
    """cat of tensors sharded alike on a dim other than the cat dim."""
    shard, _ = _sharded_alike(st, node, "cat")
    if shard is None:
        return _default(st, node)
    if _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node))) == shard.dim:
        raise _Conflict("cat along the sharded dim")
    return shard


def _rule_stack(st: _State, node: fx.Node) -> Layout:
    """stack of tensors sharded alike (interleaved rotary embeddings, GPT-J's and GLM's `rotate_every_two`:
    `stack((-x2, x1), dim=-1)` on the head dim while the heads are sharded): the shard moves one dim right when the
    new dim comes before it."""
    shard, all_nodes = _sharded_alike(st, node, "stack")
    if shard is None:
        return _default(st, node)
    if not all_nodes:
        raise _Conflict("stack of tensors not all sharded on the same dim")
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(_shape(node)))
    return _Shard(shard.dim + (dim <= shard.dim), shard.parts, shard.origins)


@_on_shard
def _rule_reduce(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    """mean / sum / amax / amin over dims other than the sharded one."""
    nd = len(_shape(x))
    dims = _arg(node, 1, "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and not dims):
        raise _Conflict(f"{op_name(node)} over all dims of a sharded tensor")
    dims = {_norm_dim(d, nd) for d in (dims if isinstance(dims, (list, tuple)) else [dims])}
    if lay.dim in dims:
        return _reduce_over_shard(st, node, lay)
    keep = _arg(node, 2, "keepdim", False)
    return _Shard(lay.dim - (0 if keep else sum(1 for d in dims if d < lay.dim)), lay.parts, lay.origins)


_ELEMENTWISE = _UNARY_FUNCTIONS | _UNARY_METHODS | _BINARY_FUNCTIONS | _BINARY_METHODS | _FIRST_ARG_METHODS
_LAYOUT_ONLY = _ELEMENTWISE | _RESHAPE | _TRANSPOSE | _UNSQUEEZE | _SQUEEZE


def _normalized_across_ranks(st: _State, x: fx.Node, depth: int = 12) -> bool:
    """Whether sharded `x` is, through elementwise ops and views only, scaled by a statistic reduced over the ranks (a
    norm over the sharded dim, `_reduce_over_shard`): walking back along the sharded operands, a replicated operand
    that a few elementwise ops make from a reduce_mean / reduce_sum node. Attention and projections end the walk:
    OLMo's qk-norm, whose normalized q is split into heads and attended, never reaches a row-parallel projection so."""
    frontier, seen = [x], set()
    while frontier and depth > 0:
        depth -= 1
        nxt = []
        for n in frontier:
            if n in seen or n.op not in ("call_function", "call_method") or not key_in(n, _LAYOUT_ONLY):
                continue
            seen.add(n)
            for a in n.all_input_nodes:
                if isinstance(st.eff(a), _Shard):
                    nxt.append(a)
                elif st.layout.get(a) is None and _made_from_reduction(st, a, 4):
                    return True
        frontier = nxt
    return False


def _made_from_reduction(st: _State, n: fx.Node, depth: int) -> bool:
    if st.rules.get(n.name) in PARTIAL_REDUCTIONS.values():
        return True
    if depth == 0 or n.op not in ("call_function", "call_method") or not key_in(n, _ELEMENTWISE):
        return False
    return any(_made_from_reduction(st, a, depth - 1) for a in n.all_input_nodes)


# module rule of a mean / sum over the sharded dim -> the collective its partial result gets (plan.tensor, the rewrite)
PARTIAL_REDUCTIONS = {"mean": "reduce_mean", "sum": "reduce_sum"}


def _reduce_over_shard(st: _State, node: fx.Node, lay: _Shard) -> Layout:
    """mean / sum over the sharded dim (an RMSNorm written out over a column-parallel projection, OLMo's qk-norm): each
    rank reduces its own elements, a partial value all-reduced right after (g; a mean's sum divided by tp, every rank
    holding as many elements). Not amax / amin: a max's gradient reaches one rank's element, not every rank's."""
    rule = PARTIAL_REDUCTIONS.get(op_name(node))
    if rule is None:
        raise _Conflict(f"{op_name(node)} over the sharded dim")
    if lay.whole:
        raise _Conflict(f"{op_name(node)} over a sharded dim partly kept whole on every rank")
    st.rules[node.name] = rule
    return _Partial(lay.origins)


@_on_shard
def _rule_norm_function(st: _State, node: fx.Node, x: fx.Node, lay: _Shard) -> Layout:
    """F.layer_norm / F.rms_norm (or ATen's): like the module rule, over trailing dims other than the sharded one."""
    shape = _arg(node, 1, "normalized_shape")
    normalized = len(shape) if isinstance(shape, (list, tuple)) else 1
    if lay.dim >= len(_shape(x)) - normalized:
        raise _Conflict(f"{op_name(node)} normalizes over the sharded dim {lay.dim}")
    if any(isinstance(w, fx.Node) for w in node.args[2:4]) or any(
        isinstance(node.kwargs.get(k), fx.Node) for k in ("weight", "bias")
    ):
        raise _Conflict(f"{op_name(node)} with weights on a sharded input (grads would be partial)")
    return lay


def _rule_new_tensor(st: _State, node: fx.Node) -> Layout:
    """x.new_ones(sizes): the input gives only a dtype and device; the sizes are global values."""
    for x in node.all_input_nodes[1:]:
        if st.eff(x) is not None:
            return _replicated_inputs_only(st, node, "{op} takes the sharded tensor {input} as a size")
    return None


_FUNCTION_RULES: list[tuple[set, Callable[[_State, fx.Node], Layout]]] = [
    (_WEIGHT_OPS, _rule_weight_op),
    (_RESHAPE, _rule_reshape),
    (_TRANSPOSE, _rule_transpose),
    (_SPLIT, _rule_split),
    (_UNBIND, _rule_unbind),
    (_SOFTMAX, _rule_softmax),
    (_MATMUL, _rule_matmul),
    ({"baddbmm", torch.baddbmm}, _rule_baddbmm),
    (_SDPA, _rule_sdpa),
    (_CROSS_ENTROPY, _rule_cross_entropy),
    (_UNARY_FUNCTIONS | _UNARY_METHODS | _BINARY_FUNCTIONS | _BINARY_METHODS | _FIRST_ARG_METHODS, _rule_elementwise),
    ({operator.getitem}, _rule_getitem),
    ({"size", "numel", getattr}, _rule_size),
    (_UNSQUEEZE, _rule_unsqueeze),
    (_SQUEEZE, _rule_squeeze),
    (_SLICE, _rule_slice),
    (_SELECT, _rule_select),
    (_INDEX, _rule_index),
    (_EXPAND, _rule_expand),
    (_CAT, _rule_cat),
    (_STACK, _rule_stack),
    (_REDUCE, _rule_reduce),
    (_NORM_FUNCTIONS, _rule_norm_function),
    (_NEW_TENSOR, _rule_new_tensor),
]
# ops that keep a kept-whole tail where it is, and ops that cut it (their rules read `_Shard.whole`)
_WHOLE_KEEPS = {_rule_elementwise, _rule_transpose, _rule_unsqueeze, _rule_squeeze, _rule_softmax, _rule_reduce,
                _rule_norm_function, _rule_cat, _rule_unbind}  # fmt: skip
_WHOLE_AWARE = {_rule_reshape, _rule_split, _rule_getitem, _rule_size, _rule_slice, _rule_select, _rule_index}
_SIZE_RULES = {operator.getitem, "size", "numel", getattr}  # these read sizes of sharded tensors themselves
_PAD_AWARE = {_rule_elementwise, _rule_reshape, _rule_transpose, _rule_getitem, _rule_unsqueeze, _rule_slice,
              _rule_select, _rule_softmax, _rule_cross_entropy, _rule_size}  # fmt: skip


def _rule(st: _State, node: fx.Node) -> Layout:
    if node.op in ("placeholder", "get_attr"):
        return None
    if node.op == "output":
        return _rule_output(st, node)
    if node.op == "call_module":
        return _rule_call_module(st, node)
    if key_in(node, _META_METHODS):
        return None
    if _is_value(node) and not key_in(node, _SIZE_RULES):
        return _rule_value(st, node)
    taken = _partial_through(st, node)
    if taken is not None:
        return taken
    if is_grouped_mm(node):  # an OpOverload of no fx key: a mixture of experts' grouped product
        return _padded(st, node, _rule_weight_op)
    key = op_key(node)
    for keys, rule in _FUNCTION_RULES:
        try:
            if key in keys:
                return _padded(st, node, rule)
        except TypeError:  # unhashable target
            break
    return _default(st, node)


# ops linear in their first argument, the others replicated (indices, sizes, dtypes): a partial first argument stays
# partial. Not dropout (each summand's mask must be the same), nor anything that adds a constant.
_PARTIAL_UNARY = {
    "view", "reshape", "flatten", "unflatten", "transpose", "permute", "t", "contiguous", "clone", "to", "squeeze",
    "unsqueeze", "neg", "sum", "mean", "index", "select", "slice", "expand", operator.getitem, operator.neg,
    torch.reshape, torch.flatten, torch.unflatten, torch.transpose, torch.permute, torch.squeeze, torch.unsqueeze,
    torch.neg, torch.sum, torch.mean, torch.select, torch.clone,
}  # fmt: skip
_PARTIAL_SUM = {operator.add, operator.sub, torch.add, torch.sub, "add", "sub"}  # every operand partial
_PARTIAL_SCALE = {operator.mul, torch.mul, "mul", operator.truediv, torch.div, "div"}  # one partial, the other not


def _partial_through(st: _State, node: fx.Node) -> _Partial | None:
    """A partial value read only by an op linear in it stays partial: its all-reduce moves past the op (Falcon's and
    GPT-J's attention and MLP outputs summed before one all-reduce instead of two; a mixture of experts' outputs
    weighted, permuted back and summed over the top k before it, k times fewer bytes). The chain starts at a
    row-parallel output without a bias (a bias is added after the all-reduce, once) and ends at a reader that is not
    linear in it, where the all-reduce goes (`partial_taken` lists the values it went past). Else None: the ordinary
    rules then see the partial value all-reduced right after its producer (`_State.eff`)."""
    if node.op not in ("call_function", "call_method"):
        return None
    partials = [x for x in node.all_input_nodes if isinstance(st.layout.get(x), _Partial)]
    if not partials or not all(len(x.users) == 1 and _starts_or_continues_chain(st, x) for x in partials):
        return None
    others = [x for x in node.all_input_nodes if x not in partials]
    if any(st.layout.get(x) is not None for x in others):  # a sharded or size-of operand: the usual rules
        return None
    try:
        key = op_key(node)
        unary, summed, scaled = key in _PARTIAL_UNARY, key in _PARTIAL_SUM, key in _PARTIAL_SCALE
    except TypeError:
        return None
    if unary:
        ok = node.args and node.args[0] is partials[0] and len(partials) == 1
    elif summed:
        operands = [_arg(node, 0, "input"), _arg(node, 1, "other")]
        ok = all(isinstance(a, fx.Node) and a in partials for a in operands) and len(partials) == 2
    elif scaled:  # x * y or y * x, x / y: the partial x once (x * x is no scaling), y replicated or a number
        operands = [_arg(node, 0, "input"), _arg(node, 1, "other")]
        first = operands[0] is partials[0]
        once = sum(a is partials[0] for a in operands) == 1
        ok = len(partials) == 1 and once and (first or key in (operator.mul, torch.mul, "mul"))
        ok = ok and node.kwargs.get("rounding_mode") is None
    else:
        return None
    if not ok or not isinstance(_val(node), torch.Tensor) or not _val(node).is_floating_point():
        return None
    st.partial_taken.update(x.name for x in partials)
    return _Partial(frozenset().union(*(st.layout[x].origins for x in partials)))


def _starts_or_continues_chain(st: _State, x: fx.Node) -> bool:
    """A partial value a chain may start at (a row-parallel output without a bias: the bias goes after the all-reduce)
    or continue from (a value a chain made)."""
    rule = st.rules.get(x.name)
    if rule is None:  # made partial by a chain (every other partial value has a rule: row, vocab, reduce_*)
        return True
    if rule != "row" or x.name in st.row_bias:
        return False
    if x.op == "call_module":
        return getattr(st.module(x.target), "bias", None) is None
    return True


def _padded(st: _State, node: fx.Node, rule: Callable[[_State, fx.Node], Layout]) -> Layout:
    """Apply `rule`; a padded vocabulary shard may only reach the ops that keep its padding apart (`_PAD_AWARE`:
    casts and elementwise ops, views and indexing that keep the vocab dim, cross_entropy, which masks it, and the
    output, which drops it), and what they make stays padded. Likewise a shard with a tail kept whole on every rank
    reaches only the ops that keep it (`_WHOLE_KEEPS`: what they make has the same tail) or cut it (`_WHOLE_AWARE`:
    the rule decides)."""
    sharded = [lay for x in node.all_input_nodes if isinstance(lay := st.eff(x), _Shard)]
    wholes = {lay.whole for lay in sharded}
    if wholes - {0}:
        if rule in _WHOLE_AWARE:
            return rule(st, node)
        if rule not in _WHOLE_KEEPS or len(wholes) > 1:
            kept = max(wholes)
            raise _Conflict(f"{op_name(node)} on a shard whose last {kept} elements every rank holds whole")
        out = rule(st, node)
        return dataclasses.replace(out, whole=wholes.pop()) if isinstance(out, _Shard) else out
    pads = {lay.pad for lay in sharded}
    if not pads - {0}:
        return rule(st, node)
    if rule not in _PAD_AWARE or len(pads) > 1:
        raise _Conflict(f"{op_name(node)} on a padded vocabulary shard (tp does not divide the vocabulary)")
    out = rule(st, node)
    return dataclasses.replace(out, pad=pads.pop()) if isinstance(out, _Shard) else out


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
    whole: dict[str, _WholeRequest] = field(default_factory=dict)


def _propagate(st: _State) -> _Outcome:
    conflicts: list[tuple[fx.Node, _Conflict, frozenset[str]]] = []
    parts: dict[str, _PartsRequest] = {}
    whole: dict[str, _WholeRequest] = {}
    tainted: set[fx.Node] = set()
    for node in st.gm.graph.nodes:
        try:
            st.layout[node] = _rule(st, node)
        except _Conflict as c:
            # Blame the seeds whose shards reach this node as shards: a partial input is all-reduced before it (eff),
            # so its seed is not at fault (Falcon's parallel MLP + attention add); else every input's seeds.
            origins = frozenset().union(*(_origins(st.eff(x)) for x in node.all_input_nodes)) or frozenset().union(
                *(_origins(st.layout.get(x)) for x in node.all_input_nodes)
            )
            if c.blame is not None:
                origins = c.blame
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
        except _WholeRequest as r:
            held = whole.get(r.seed)
            if held is None or r.kept * held.of > held.kept * r.of:  # the most any reader needs kept whole
                whole[r.seed] = r
            tainted.add(node)
            st.layout[node] = None
        if any(x in tainted for x in node.all_input_nodes):
            tainted.add(node)
    if not any(origins for _, _, origins in conflicts) and not parts and not whole:
        conflicts += _tied_conflicts(st)
    return _Outcome(st, conflicts, parts, whole)


def read_parameter_names(gm: fx.GraphModule) -> set[str]:
    """The parameter names the graph reads: targets of get_attr nodes with users, parameters of called modules."""
    read = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users:
            read.add(str(n.target))
        elif n.op == "call_module":
            read.update(f"{n.target}.{p}" for p, _ in gm.get_submodule(str(n.target)).named_parameters())
    return read


def _tied_conflicts(st: _State) -> list[tuple[fx.Node, _Conflict, frozenset[str]]]:
    """A parameter used under several names (tied) must have one shard spec everywhere."""
    read = read_parameter_names(st.gm)
    by_tensor: dict[int, list[str]] = {}
    for name, p in st.gm.named_parameters(remove_duplicate=False):
        if name in read:  # an alias no node reads (export reads a tied weight under one name) has no say
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
    for n in st.gm.graph.nodes:  # a sharded parameter read by get_attr: every reader must be one that shards it
        held = st.params.get(str(n.target)) if n.op == "get_attr" else None
        if held is None or held[0]["dim"] is None:
            continue
        for u in n.users:
            if u.name not in st.param_users.get(str(n.target), ()):
                reason = f"parameter {n.target} is sharded, but {u.name} reads it whole"
                out.append((u, _Conflict(reason), held[1]))
    for names in by_tensor.values():
        specs = {json.dumps(st.params.get(n, ({"dim": None, "parts": 1}, None))[0]) for n in names}
        if len(specs) > 1:
            origins = frozenset().union(*(st.params[n][1] for n in names if n in st.params))
            node = nodes[next(iter(sorted(origins)))] if origins else next(iter(nodes.values()))
            out.append((node, _Conflict(f"tied parameter {names} would get different shardings"), origins))
    return out
