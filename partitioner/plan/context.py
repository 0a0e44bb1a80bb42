"""plan.context: context parallelism, the sequence of every activation split across `degree` ranks.

Each cp rank holds the tokens at its `positions` of every sequence (all layers, all ops) and computes only those:
activation memory and compute per rank fall by the degree. Almost every op of a transformer is token-wise (each
token's output depends on that token alone), so it runs unchanged on the rank's tokens. Attention is not: each rank's
queries read the keys and values of every token, so k and v are all-gathered before attention (Llama 3's context
parallelism, Grattafiori et al. 2024, section 3.3.2: all-gather k/v rather than a ring, simpler and exact) and the
causal mask is built from the rank's global positions. With `balance` (the default, when the sequence allows) rank r
holds chunks r and 2·cp-1-r of 2·cp equal chunks, so every rank does the same share of causal attention.

Derived per node from the global shapes annotate recorded (`meta["val"]`):

    value / op                                      context parallel
    sequence inputs (seq_dims)                      split: each rank its positions
    token-wise op of split operands                 split; a replicated operand spanning the split dim
                                                    (position embedding rows, a causal mask) reads its positions
    SDPA / matmul of split queries                  k, v (the right operand) gathered whole; causal -> mask rows
    sum / mean over the split dim; cross entropy    local reduction, then all-reduced (mean: / degree; cross entropy
                                                    with mean: sum and valid-token count both all-reduced)
    x.size(S), x.shape, x.numel() of split values   made global, so positions (arange) and masks stay global
    view / reshape / expand of split values         their size argument at the split dim made local
    anything else reading a split value             reads it gathered (a fallback, named in `fallbacks`)

A split is (dim, outer, inner): dim S of the global value has outer · T · inner elements, T the sequence (a
(B, T, V) value viewed as (B·T, V) is split on dim 0 with outer B). The rewrite is passes.context_parallel.

Gradient invariant (what makes training exact): the true gradient of a rank's split value is the rank's own; the
true gradient of a replicated value (a parameter, the loss) is the sum over the cp ranks. So gathers reduce-scatter
their gradient, all-reduces all-reduce it, scatters pass it through, every output's gradient is divided by the
degree, and parameter gradients are summed over the cp group (as data parallelism averages over its group).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from partitioner.plan.tensor_ops import (
    _BINARY_FUNCTIONS,
    _BINARY_METHODS,
    _CAT,
    _CROSS_ENTROPY,
    _EXPAND,
    _FIRST_ARG_METHODS,
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
    _TRANSPOSE,
    _UNARY_FUNCTIONS,
    _UNARY_METHODS,
    _UNARY_MODULES,
    _UNBIND,
    _UNSQUEEZE,
    cross_entropy_call,
    key_in,
    op_key,
    op_name,
    weight_op,
)
from partitioner.plan.tensor_ops import node_arg as _arg

__all__ = ["ContextLayout", "Split", "infer_sequence_dims", "plan_context_parallel", "rank_positions"]

_CASTS = {"long", "int", "bool", "short", "byte", "char"}  # dtype casts tensor_ops does not list (ids, masks)
# ops that only rearrange or repeat their input's elements: a gather may move above them (hoist_gathers)
_MOVABLE = _RESHAPE | _TRANSPOSE | _UNSQUEEZE | _SQUEEZE | _EXPAND | {"contiguous", "clone", torch.clone}
_ELEMENTWISE = _UNARY_FUNCTIONS | _UNARY_METHODS | _BINARY_FUNCTIONS | _BINARY_METHODS | _CASTS
_INFO_ATTRS = {"device", "dtype", "is_cuda", "requires_grad", "ndim", "layout"}


@dataclass(frozen=True)
class Split:
    """Dim `dim` of the global value holds outer · T · inner elements, T the sequence; a rank holds its positions."""

    dim: int
    outer: int = 1
    inner: int = 1

    def moved(self, dim: int) -> Split:
        return Split(dim, self.outer, self.inner)


@dataclass
class ContextLayout:
    """Which values a context-parallel rank holds split, and what the rewrite must add (node names throughout).

    split: value -> Split (a tuple of Split | None for tuple outputs). gather: value -> its consumers that read it
    whole. scatter: consumer -> {replicated operand: Split} read at the rank's positions. reduce: node -> "sum" or
    "mean", all-reduced after the local op. attention: SDPA node -> "causal" | "mask" | "none". cross_entropy: nodes
    rewritten as local sum + count. global_sizes: size / shape / numel reads -> the split dim. local_shape: view,
    reshape, expand, unflatten nodes -> the position in their size list to divide by the degree. outputs: indices
    of the flat graph outputs that are split (gathered at the output). fallbacks: node -> why it reads a value whole.
    """

    degree: int
    seq_len: int
    balance: bool
    inputs: dict[str, Split] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    gather: dict[str, list[str]] = field(default_factory=dict)
    scatter: dict[str, dict[str, Split]] = field(default_factory=dict)
    reduce: dict[str, str] = field(default_factory=dict)
    attention: dict[str, str] = field(default_factory=dict)
    cross_entropy: set[str] = field(default_factory=set)
    global_sizes: dict[str, int] = field(default_factory=dict)
    local_shape: dict[str, int] = field(default_factory=dict)
    outputs: dict[int, Split] = field(default_factory=dict)
    float_outputs: set[int] = field(default_factory=set)  # flat outputs that are floating tensors (have gradients)
    # value -> consumers that read it whole, before hoist_gathers moved gathers above views: what the consumers
    # see (their saved copies are whole), where `gather` says what is communicated
    whole_reads: dict[str, list[str]] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    def planned_reads(self) -> list[tuple[str, str]]:
        """(consumer, value) of every read the rewrite must change: gathered whole, or at the rank's positions."""
        pairs = [(c, v) for v, cs in self.gather.items() for c in cs]
        return pairs + [(c, v) for c, reads in self.scatter.items() for v in reads]


def rank_positions(seq_len: int, degree: int, rank: int, balance: bool) -> torch.Tensor:
    """The global token positions rank `rank` holds, in the order it holds them.

    balance=False: one contiguous chunk. balance=True: chunks r and 2·degree-1-r of 2·degree, so that every rank's
    queries see the same number of causal keys in total (Megatron-LM's and torch's load-balanced layout).
    """
    if not balance:
        n = seq_len // degree
        return torch.arange(rank * n, (rank + 1) * n)
    n = seq_len // (2 * degree)
    first, second = rank * n, (2 * degree - 1 - rank) * n
    return torch.cat([torch.arange(first, first + n), torch.arange(second, second + n)])


def _val(n: Any) -> Any:
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _is_tensor(n: Any) -> bool:
    return isinstance(_val(n), torch.Tensor)


def _shape(n: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in _val(n).shape)


def _norm(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def infer_sequence_dims(gm: fx.GraphModule, batch_dims: dict[str, int] | None = None) -> dict[str, int]:
    """The sequence dim of each placeholder: the dim after its batch dim (dim 1 by default) of every input with one,
    where that dim has the sequence length of the first such input (token ids, masks, labels, position ids)."""
    found: dict[str, int] = {}
    length = None
    for n in gm.graph.nodes:
        if n.op != "placeholder" or not _is_tensor(n):
            continue
        b = (batch_dims or {}).get(n.name, 0)
        shape = _shape(n)
        if b is None or len(shape) <= b + 1:
            continue
        if length is None:
            length = shape[b + 1]
        if shape[b + 1] == length:
            found[n.name] = b + 1
    return found


class _Fallback(Exception):
    """The node cannot run on split values; it reads them whole."""


class _Propagation:
    def __init__(self, gm: fx.GraphModule, layout: ContextLayout):
        self.gm, self.lay = gm, layout
        self.modules = dict(gm.named_modules())

    # ------------------------------------------------------------------------------------------- bookkeeping
    def sp(self, a: Any) -> Split | None:
        if not isinstance(a, fx.Node):
            return None
        s = self.lay.split.get(a.name)
        return s if isinstance(s, Split) else None

    def split_inputs(self, n: fx.Node) -> list[fx.Node]:
        seen: list[fx.Node] = []
        for a in n.all_input_nodes:
            if a.name in self.lay.split and a not in seen:
                seen.append(a)
        return seen

    def gather_all(self, n: fx.Node, why: str) -> None:
        if n.meta.get("writes"):  # it would write into the gathered copy, not the rank's tokens the graph goes on with
            raise ValueError(
                f"context parallelism cannot split the sequence through {n.name} ({op_name(n)}): it writes in place "
                f"into a value it would have to read whole ({why}); write it out of place, or plan with "
                f"context_parallel=1"
            )
        for a in self.split_inputs(n):
            if isinstance(self.lay.split[a.name], Split):
                self.lay.gather.setdefault(a.name, []).append(n.name)
            else:  # a tuple of splits read whole: cannot gather a tuple
                raise ValueError(f"{n.name} reads the tuple {a.name} of split values whole ({why})")
        self.lay.fallbacks[n.name] = why

    def gather_one(self, n: fx.Node, a: fx.Node) -> None:
        self.lay.gather.setdefault(a.name, []).append(n.name)

    def scatter(self, n: fx.Node, a: fx.Node, s: Split) -> None:
        self.lay.scatter.setdefault(n.name, {})[a.name] = s

    # ------------------------------------------------------------------------------------------- the walk
    def run(self) -> None:
        for n in self.gm.graph.nodes:
            if n.op == "placeholder":
                if n.name in self.lay.inputs:
                    self.lay.split[n.name] = self.lay.inputs[n.name]
                continue
            if n.op == "output":
                self.visit_output(n)
                continue
            if n.op == "get_attr" or not self.split_inputs(n):
                continue
            try:
                out = self.visit(n)
            except _Fallback as e:
                self.gather_all(n, str(e))
                continue
            if out is not None:
                self.lay.split[n.name] = out
        self.refuse_writes_through_whole_copies()
        self.hoist_gathers()

    def refuse_writes_through_whole_copies(self) -> None:
        """An in-place write into a split value's memory through a value read whole (a view of a gathered copy,
        e.g. `h[:, 0] = 0`) would land in the copy, not in the rank's tokens the graph goes on with: refuse it."""
        nodes = list(self.gm.graph.nodes)
        split_storages = {st for n in nodes if self.sp(n) is not None for st in n.meta.get("storages", [])}
        for n in nodes:
            written = set(n.meta.get("writes") or ()) & split_storages
            target = n.args[0] if n.args else None
            if written and not (isinstance(target, fx.Node) and self.sp(target) is not None):
                raise ValueError(
                    f"context parallelism cannot split the sequence through {n.name} ({op_name(n)}): it writes in "
                    f"place into {sorted(written)}, which each rank holds split, through a value read whole "
                    f"(e.g. one position of the sequence); write it out of place, or plan with context_parallel=1"
                )

    def hoist_gathers(self) -> None:
        """Gather a value before the views, expands and copies that alone lead from it to the consumers reading it
        whole, and run those whole: GQA's repeat_kv (expand + reshape of k and v to every query head) then gathers
        kv_heads' bytes, not heads'."""
        nodes = {n.name: n for n in self.gm.graph.nodes}
        self.lay.whole_reads = {v: list(cs) for v, cs in self.lay.gather.items()}
        for value in list(self.lay.gather):
            consumers = set(self.lay.gather[value])
            v, chain = nodes[value], []
            while (
                {u.name for u in v.users} <= (consumers if not chain else {chain[-1].name})
                and v.op in ("call_function", "call_method")
                and key_in(v, _MOVABLE)
                and isinstance(v.args[0], fx.Node)
                and self.sp(v.args[0]) is not None
                and [a for a in v.all_input_nodes if a.name in self.lay.split] == [v.args[0]]
            ):
                chain.append(v)
                v = v.args[0]
            if not chain:
                continue
            for n in chain:  # now whole on every rank: no local sizes, nothing split
                self.lay.split.pop(n.name, None)
                self.lay.local_shape.pop(n.name, None)
            del self.lay.gather[value]
            self.lay.gather.setdefault(v.name, []).append(chain[-1].name)

    def visit_output(self, n: fx.Node) -> None:
        flat, _ = torch.utils._pytree.tree_flatten(n.args[0])
        for i, a in enumerate(flat):
            val = _val(a)
            if isinstance(val, torch.Tensor) and val.is_floating_point():
                self.lay.float_outputs.add(i)
            s = self.sp(a)
            if s is not None:
                self.lay.outputs[i] = s
            elif isinstance(a, fx.Node) and a.name in self.lay.split:
                raise ValueError(f"output {a.name} is a tuple of split values")

    def visit(self, n: fx.Node) -> Any:
        if n.op == "call_module":
            return self.module(n, self.modules[str(n.target)])
        if n.op == "call_function" and n.target is getattr:
            return self.attribute(n)
        key = op_key(n)
        if key == "size" or key == "numel":
            return self.size(n)
        if key_in(n, _META_METHODS) or op_name(n) == "assert_metadata":
            return None
        if key is operator.getitem:
            return self.getitem(n)
        if not _is_tensor(n) and not isinstance(_val(n), (tuple, list)):
            raise _Fallback(f"{op_name(n)} of a split value returns a Python value")
        wop = weight_op(self.gm, n)
        if wop is not None and wop.kind != "grouped":  # a grouped product reads rows sorted by expert, not tokens
            return self.weight(n, wop)
        if key_in(n, _SDPA):
            return self.attention(n)
        if key_in(n, _CROSS_ENTROPY):
            return self.cross_entropy(n)
        if key_in(n, _MATMUL):
            return self.matmul(n)
        if key_in(n, _SOFTMAX):
            return self.softmax(n)
        if key_in(n, _NORM_FUNCTIONS):
            x, ns = n.args[0], _arg(n, 1, "normalized_shape")
            return self.normalized(n, x, len(ns) if isinstance(ns, (list, tuple)) else 1)
        if key_in(n, _REDUCE):
            return self.reduction(n)
        if key_in(n, _RESHAPE):
            return self.reshape(n)
        if key_in(n, _TRANSPOSE):
            return self.transpose(n)
        if key_in(n, _UNSQUEEZE | _SQUEEZE):
            return self.unsqueeze(n)
        if key_in(n, _SPLIT | _UNBIND):
            return self.split(n)
        if key_in(n, _SLICE | _SELECT):
            return self.slice(n)
        if key_in(n, _EXPAND):
            return self.expand(n)
        if key_in(n, _CAT):
            return self.cat(n)
        if key_in(n, _NEW_TENSOR):
            return None  # shape from (global) arguments: a replicated value
        if key_in(n, _FIRST_ARG_METHODS):  # other tensor arguments only give a dtype / device
            return self.tokenwise(n, [n.args[0]]) if n.args[0].name in self.lay.split else None
        if op_name(n) == "baddbmm":  # input + b1 @ b2 (BLOOM's ALiBi scores)
            out = self.matmul(n, n.args[1], n.args[2])
            return self.tokenwise(n, [n.args[0]], out) if out is not None else None
        if key_in(n, _ELEMENTWISE):
            return self.tokenwise(n, [a for a in n.all_input_nodes if _is_tensor(a)])
        raise _Fallback(f"{op_name(n)} is not known to be token-wise")

    # ------------------------------------------------------------------------------------------- rules
    def module(self, n: fx.Node, mod: nn.Module) -> Split | None:
        if len(n.all_input_nodes) != 1:  # (positional or keyword: a module called as m(x=h) has no args[0])
            raise _Fallback(f"module {type(mod).__name__} with {len(n.all_input_nodes)} inputs")
        x = n.all_input_nodes[0]
        s = self.sp(x)
        if s is None:
            raise _Fallback(f"module {type(mod).__name__} reads a split value through a container")
        ndim = len(_shape(x))
        if isinstance(mod, nn.Embedding):
            return s
        if isinstance(mod, nn.Linear):
            if s.dim == ndim - 1:
                raise _Fallback("Linear over the split dim")
            return s
        if isinstance(mod, _NORM_MODULES):
            return self.normalized(n, x, len(mod.normalized_shape))
        if isinstance(mod, _UNARY_MODULES):
            return s
        raise _Fallback(f"module {type(mod).__name__} is not known to be token-wise")

    def attribute(self, n: fx.Node) -> Any:
        attr = n.args[1]
        if attr == "shape":
            self.lay.global_sizes[n.name] = self.sp(n.args[0]).dim
            return None
        if attr in _INFO_ATTRS:
            return None
        raise _Fallback(f"attribute {attr} of a split value")

    def size(self, n: fx.Node) -> None:
        s = self.sp(n.args[0])
        if s is None:
            raise _Fallback("size of a tuple")
        dim = _arg(n, 1, "dim")
        if op_key(n) == "numel" or dim is None or _norm(dim, len(_shape(n.args[0]))) == s.dim:
            self.lay.global_sizes[n.name] = s.dim
        return None

    def getitem(self, n: fx.Node) -> Any:
        src, index = n.args
        whole = self.lay.split.get(src.name)
        if isinstance(whole, tuple):
            return whole[index]
        s = self.sp(src)
        if not _is_tensor(src) or s is None:
            return None
        items = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) or isinstance(i, torch.Tensor) for i in items):
            raise _Fallback("indexing with tensors")
        ndim = len(_shape(src))
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        src_dim = out_dim = 0
        for i in items:
            if i is Ellipsis:
                skip = ndim - explicit
                if src_dim <= s.dim < src_dim + skip:
                    return s.moved(out_dim + s.dim - src_dim)
                src_dim, out_dim = src_dim + skip, out_dim + skip
            elif i is None:
                out_dim += 1
            elif isinstance(i, int):
                if src_dim == s.dim:
                    raise _Fallback("indexing a single position of the sequence")
                src_dim += 1
            elif isinstance(i, slice):
                if src_dim == s.dim:
                    if i != slice(None):
                        raise _Fallback("slicing the sequence")
                    return s.moved(out_dim)
                src_dim, out_dim = src_dim + 1, out_dim + 1
            else:
                raise _Fallback(f"index {i!r}")
        return s.moved(out_dim + s.dim - src_dim)

    def weight(self, n: fx.Node, wop: Any) -> Split:
        s = self.sp(wop.x)
        if s is None or len([a for a in n.all_input_nodes if a.name in self.lay.split]) != 1:
            raise _Fallback("a weight op reading a split value other than its input")
        if wop.kind != "embedding" and s.dim == len(_shape(wop.x)) - 1:
            raise _Fallback("a matmul over the split dim")
        return s

    def normalized(self, n: fx.Node, x: fx.Node, trailing: int) -> Split:
        s = self.sp(x)
        others = [a for a in n.all_input_nodes if a is not x and a.name in self.lay.split]
        if s is None or others or s.dim >= len(_shape(x)) - trailing:
            raise _Fallback("a norm over the split dim")
        return s

    def softmax(self, n: fx.Node) -> Split:
        x, s = n.args[0], self.sp(n.args[0])
        dim = _arg(n, 1, "dim")
        if s is None or dim is None or _norm(dim, len(_shape(x))) == s.dim:
            raise _Fallback("softmax over the split dim")
        return s

    def tokenwise(self, n: fx.Node, operands: list[fx.Node], target: Split | None = None) -> Split:
        """Broadcasting op, split like its first split operand (or `target`, where another operand decided it:
        baddbmm's product). Operands split otherwise are read whole; replicated ones spanning the split dim are read
        at the rank's positions."""
        out = _shape(n)
        whole: set[str] = set()
        for a in operands:
            s = self.sp(a)
            if s is None:
                if a.name in self.lay.split:
                    raise _Fallback("a tuple operand")
                continue
            shape = _shape(a)
            d = s.dim + len(out) - len(shape)
            if target is None:
                target = s.moved(d)
            elif target != s.moved(d):
                self.gather_one(n, a)
                whole.add(a.name)
        for a in operands:
            if a.name in self.lay.split and a.name not in whole:
                continue
            shape = _shape(a)
            d = target.dim - (len(out) - len(shape))
            if d >= 0 and shape[d] != 1:
                self.scatter(n, a, target.moved(d))
        return target

    def matmul(self, n: fx.Node, a: fx.Node | None = None, b: fx.Node | None = None) -> Split | None:
        a, b = (n.args[0], n.args[1]) if a is None else (a, b)
        sa, sb = self.sp(a), self.sp(b)
        ndim, out = len(_shape(a)), _shape(n)
        if sa is not None and sa.dim < ndim - 2:  # split on a batch dim: b's matching dim reads its positions
            d = sa.dim + len(out) - ndim
            bshape = _shape(b)
            bd = d - (len(out) - len(bshape))
            if sb is not None:
                if sb != sa.moved(bd):
                    raise _Fallback("a batched matmul of differently split operands")
            elif 0 <= bd < len(bshape) - 2 and bshape[bd] != 1:
                self.scatter(n, b, sa.moved(bd))
            return sa.moved(d)
        if sa is not None and (ndim < 2 or sa.dim == ndim - 1):
            raise _Fallback("a matmul over the split dim")
        if b.name in self.lay.split:
            self.gather_one(n, b)  # the right operand (k^T, v): every query row reads all of it
        if sa is None:
            self.lay.fallbacks[n.name] = "a matmul of a replicated left operand reads its split right operand whole"
            return None
        return sa.moved(sa.dim + len(out) - ndim)

    def attention(self, n: fx.Node) -> Split:
        q, k, v = n.args[0], _arg(n, 1, "key"), _arg(n, 2, "value")
        sq = self.sp(q)
        ndim = len(_shape(q))
        if sq is None or sq != Split(ndim - 2):
            raise _Fallback("attention whose queries are not split on their sequence dim")
        for x in (k, v):
            if x.name in self.lay.split:
                self.gather_one(n, x)
        mask = _arg(n, 3, "attn_mask")
        if isinstance(mask, fx.Node):
            ms, mshape = self.sp(mask), _shape(mask)
            if ms is not None and ms.dim != len(mshape) - 2:  # split elsewhere (the keys): read it whole
                self.gather_one(n, mask)
                ms = None
            if ms is None and len(mshape) >= 2 and mshape[-2] != 1:  # rows for every query: the rank's rows
                self.scatter(n, mask, Split(len(mshape) - 2))
        causal = _arg(n, 5, "is_causal", False)
        self.lay.attention[n.name] = "causal" if causal else "mask" if isinstance(mask, fx.Node) else "none"
        return sq

    def cross_entropy(self, n: fx.Node) -> Split | None:
        ce = cross_entropy_call(n)
        s = self.sp(ce.logits)
        if s is None or ce.weight is not None or s.dim == 1 or len(_shape(ce.logits)) < 2:
            raise _Fallback("cross entropy over a split class dim, with class weights or on a replicated input")
        t_dim = 0 if s.dim == 0 else s.dim - 1
        st = self.sp(ce.target)
        if st is None:
            if ce.target.name in self.lay.split:
                raise _Fallback("a tuple target")
            self.scatter(n, ce.target, s.moved(t_dim))
        elif st != s.moved(t_dim):
            raise _Fallback("logits and targets split differently")
        if ce.reduction == "none":
            return s.moved(t_dim)
        self.lay.cross_entropy.add(n.name)
        return None

    def reduction(self, n: fx.Node) -> Split | None:
        x, s = n.args[0], self.sp(n.args[0])
        if s is None:
            raise _Fallback("a reduction of a tuple")
        ndim = len(_shape(x))
        dims = _arg(n, 1, "dim")
        dims = list(range(ndim)) if dims is None or dims == [] else [dims] if isinstance(dims, int) else list(dims)
        dims = sorted(_norm(d, ndim) for d in dims)
        keep = _arg(n, 2, "keepdim", False)
        if s.dim not in dims:
            return s.moved(s.dim if keep else s.dim - sum(d < s.dim for d in dims))
        name = op_name(n)
        if name not in ("sum", "mean") or _arg(n, 3, "dtype") is not None:
            raise _Fallback(f"{name} over the split dim")
        self.lay.reduce[n.name] = name
        return None

    def reshape(self, n: fx.Node) -> Split:
        x, s = n.args[0], self.sp(n.args[0])
        if s is None:
            raise _Fallback("a reshape of a tuple")
        shape_in, shape_out = _shape(x), _shape(n)
        T = self.lay.seq_len
        before = math.prod(shape_in[: s.dim]) * s.outer  # elements before the token factor, in row-major order
        for d in range(len(shape_out)):
            head, upto = math.prod(shape_out[:d]), math.prod(shape_out[: d + 1])
            if before % head == 0 and upto % (before * T) == 0:
                outer, inner = before // head, upto // (before * T)
                name = op_name(n)
                if name in ("view", "reshape", "unflatten", "_unsafe_view"):
                    self.lay.local_shape[n.name] = d
                return Split(d, outer, inner)
        raise _Fallback("a reshape that splits the sequence dim")

    def transpose(self, n: fx.Node) -> Split:
        x, s = n.args[0], self.sp(n.args[0])
        ndim = len(_shape(x))
        name = op_name(n)
        if name in ("t", "numpy_T"):
            perm = list(reversed(range(ndim)))
        elif name == "transpose":
            a, b = _norm(n.args[1], ndim), _norm(n.args[2], ndim)
            perm = list(range(ndim))
            perm[a], perm[b] = b, a
        else:
            dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (list, tuple)) else n.args[1:]
            perm = [_norm(d, ndim) for d in (dims or _arg(n, 1, "dims"))]
        return s.moved(perm.index(s.dim))

    def unsqueeze(self, n: fx.Node) -> Split:
        x, s = n.args[0], self.sp(n.args[0])
        shape_in, shape_out = _shape(x), _shape(n)
        # the token dim keeps its size; find it by the dims before it (squeeze/unsqueeze only add or drop 1s)
        before = [d for d in range(s.dim) if shape_in[d] != 1]
        seen = 0
        for d, size in enumerate(shape_out):
            if seen == len(before) and size == shape_in[s.dim]:
                return s.moved(d)
            if size != 1:
                seen += 1
        raise _Fallback("a squeeze of the split dim")

    def split(self, n: fx.Node) -> tuple:
        x, s = n.args[0], self.sp(n.args[0])
        ndim = len(_shape(x))
        name = op_name(n)
        dim = _norm(_arg(n, 1 if name == "unbind" else 2, "dim", 0), ndim)
        if dim == s.dim:
            raise _Fallback(f"{name} along the split dim")
        count = len(_val(n))
        item = s.moved(s.dim - (1 if name == "unbind" and dim < s.dim else 0))
        return tuple(item for _ in range(count))

    def slice(self, n: fx.Node) -> Split:
        x, s = n.args[0], self.sp(n.args[0])
        ndim = len(_shape(x))
        dim = _norm(_arg(n, 1, "dim", 0), ndim)
        if op_name(n) == "select":
            if dim == s.dim:
                raise _Fallback("selecting one position of the sequence")
            return s.moved(s.dim - (dim < s.dim))
        if dim == s.dim:
            start, end, step = _arg(n, 2, "start"), _arg(n, 3, "end"), _arg(n, 4, "step", 1)
            full = (start in (None, 0)) and (end is None or (isinstance(end, int) and end >= _shape(x)[dim]))
            if not full or step != 1:
                raise _Fallback("slicing the sequence")
        return s

    def expand(self, n: fx.Node) -> Split:
        x, s = n.args[0], self.sp(n.args[0])
        d = s.dim + len(_shape(n)) - len(_shape(x))
        self.lay.local_shape[n.name] = d
        return s.moved(d)

    def cat(self, n: fx.Node) -> Split:
        parts = n.args[0]
        out = _shape(n)
        dim = _norm(_arg(n, 1, "dim", 0), len(out))
        splits = {self.sp(p) for p in parts if isinstance(p, fx.Node) and p.name in self.lay.split}
        if len(splits) != 1 or None in splits or next(iter(splits)).dim == dim:
            raise _Fallback("a cat along the split dim or of differently split parts")
        s = next(iter(splits))
        for p in parts:
            if isinstance(p, fx.Node) and p.name not in self.lay.split:
                self.scatter(n, p, s)
        return s


def plan_context_parallel(
    gm: fx.GraphModule,
    degree: int,
    *,
    seq_dims: dict[str, int] | None = None,
    balance: bool | None = None,
) -> ContextLayout:
    """The context-parallel layout of an annotated graph (module docstring) at `degree` ranks.

    seq_dims: placeholder -> its sequence dim (default: `infer_sequence_dims`). balance: the load-balanced chunk
    order (default: when 2·degree divides the sequence). Raises ValueError naming the fix when the degree does not
    divide the sequence or no input has one.
    """
    if degree < 1:
        raise ValueError(f"context parallel degree must be >= 1, got {degree}")
    seq_dims = infer_sequence_dims(gm) if seq_dims is None else dict(seq_dims)
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    unknown = sorted(set(seq_dims) - set(nodes))
    if unknown:
        raise ValueError(f"seq_dims names {unknown}, which are not inputs of the graph (inputs: {sorted(nodes)})")
    if not seq_dims:
        raise ValueError("context parallelism splits the sequence, but no input has one: pass seq_dims={input: dim}")
    lengths = {name: _shape(nodes[name])[d] for name, d in seq_dims.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"the inputs' sequence dims differ in length: {lengths}; pass seq_dims for the right ones")
    seq_len = next(iter(lengths.values()))
    if seq_len % degree:
        raise ValueError(
            f"context parallelism over {degree} ranks splits the sequence of {seq_len} tokens, which {degree} does "
            f"not divide: use a sequence length divisible by {degree} (or a smaller degree)"
        )
    if balance is None:
        balance = seq_len % (2 * degree) == 0
    elif balance and seq_len % (2 * degree):
        raise ValueError(f"balance needs 2 x {degree} chunks of the {seq_len}-token sequence: use balance=False")
    layout = ContextLayout(degree, seq_len, balance, inputs={k: Split(_norm(d, len(_shape(nodes[k])))) for k, d in
                                                              seq_dims.items()})  # fmt: skip
    _Propagation(gm, layout).run()
    return layout
