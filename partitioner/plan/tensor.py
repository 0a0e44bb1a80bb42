"""plan.tensor: sharding propagation over a captured graph -> a plain-data tensor-parallel layout plan.

Pure analysis: reads the graph and `node.meta["val"]` (run `partitioner.annotate.annotate` first, with
`training=True` when the plan will be trained: backward collectives are placed on values that need a grad),
touches no weights and returns a `TensorParallelPlan` (JSON-able). `passes.tensor_parallel` applies it.

Model (Megatron-LM, Shoeybi et al. 2019). Every value is `replicated`, `shard(d)` (each rank holds 1/tp of
dimension d; `parts` > 1 means d is made of `parts` equal blocks, e.g. a fused q|k|v, and each rank holds its
1/tp of every block) or `partial` (each rank holds a summand). Seeds: every `nn.Linear` may become
column-parallel and every large or tied `nn.Embedding` vocab-parallel; layouts then flow forward through a
table of rules, one per op family (`_RULES`):

    op                         input layout          output        rewrite
    Linear (seed)              replicated            shard(-1)     weight/bias dim 0 ("colwise")
    Linear                     shard(-1)             partial       weight dim 1 ("rowwise"), all-reduce, + bias
    Embedding (seed)           replicated ids        partial       weight dim 0 (vocab), masked lookup, all-reduce
    elementwise / activations  shard + broadcasts    shard         -
    view/reshape/flatten       shard(d)              shard(k)      size argument of k divided by tp
    transpose/permute          shard(d)              shard(p(d))   -
    split/chunk on d           shard(d, parts=n)     n x shard(d)  split size divided by tp
    unbind / x[i] on other d   shard(d)              shard(d')     -
    softmax / norm on other d  shard(d)              shard(d)      -
    SDPA / matmul on heads     shard(head dim)       shard         -
    cross_entropy on classes   shard(1)              replicated    vocab-parallel CE (3 small all-reduces)
    x.size()[d], x.numel()     shard(d)              int           multiplied by tp (ints stay global)
    x.shape[i:j] without d     shard(d)              replicated    -
    int / float arithmetic     replicated values     replicated    - (sizes are global, so it computes the
                                                                   unsharded model's numbers)
    model output               shard(d)              replicated    all-gather (backward: take own slice)

Non-tensor values (ints, floats, SymInts, torch.Size, dtypes) are replicated Python values: every int read from a
sharded dim is made global right where it is read, so `h * h.shape[-1] ** -0.5`, `view(x.shape[0] * x.shape[1],
-1)` or `C // n_head` compute what the unsharded model computes, and the only place a local size is needed, a
view/split size of the sharded dim, divides that global value by tp (a literal, or a `floordiv` node in the graph).
A Python value that reads a sharded tensor's data, or a whole torch.Size spanning the sharded dim used in another
way, is a conflict like any other.

A replicated value that needs a gradient and feeds rank-dependent nodes gets Megatron's `f` (identity
forward, all-reduce backward) in front of those consumers only; a partial value gets `g` (all-reduce forward,
identity backward) right away. Per transformer layer that is the optimum: 2 all-reduces forward, 2 backward.

Anything a rule cannot take (a LayerNorm over the sharded dim, a residual add with a full-width replicated
operand, a size that tp does not divide, an unknown op) is a conflict: the seeds whose shards reached it go
back to replicated, with the reason recorded in `fallbacks`, and propagation restarts (seeds only shrink, so
it terminates). `strict=True` turns divisibility fallbacks into a ValueError. A rule that fails on a node none of
whose inputs is sharded (so no seed to blame) leaves that node replicated, which is what it is on every rank, and
records the reason in `fallbacks` under the node's name; `strict=True` raises a ValueError naming it instead, and
refuses a tp > 1 that would shard nothing at all.

Worked example (GPT block, tp=2): `q = q_proj(ln_1)` column -> shard(2); `view(B, T, 4, 16)` -> shard(2) with
args `(B, T, 2, 16)`; `transpose(1, 2)` -> shard(1); SDPA(q, k, v) -> shard(1); `transpose` -> shard(2);
`view(B, T, -1)` -> shard(2) (-1 infers 32); `out_proj` row -> partial + all-reduce; `add` replicated. `f` sits
on `ln_1` in front of q/k/v (one backward all-reduce). Same for the MLP: fc column, gelu shard, proj row.
Fused `c_attn(x).split(64, dim=2)`: the split needs 3 blocks, so c_attn is re-seeded with parts=3 and each
rank holds rows [q_r | k_r | v_r] of the weight; the split size becomes 32. A packed view
`qkv(x).view(B, T, 3, nh, hd)` re-seeds the same way (dim 2 counts blocks, so heads, dim 3, carry the shard).
A module called from several nodes, or a parameter tied across modules, gets one sharding for all its uses.

Position/type embeddings smaller than `min_vocab` stay replicated (a vocab-parallel lookup costs an
all-reduce of the whole activation to save a small table) unless tied to a sharded LM head. When the loss is
outside the graph a column-parallel LM head's logits are all-gathered at the output (`gather_output=True`,
the default: the head's weight, the largest matrix and tied to the vocab-parallel embedding, stays sharded);
`gather_output=False` keeps such heads replicated instead.
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from partitioner.comm import all_gather_time, all_reduce_time
from partitioner.devices import DeviceSpec

__all__ = [
    "TPCost",
    "TensorParallelPlan",
    "check_tensor_parallel_plan",
    "max_tensor_parallel",
    "plan_tensor_parallel",
    "shard_slices",
    "shard_tensor",
    "tp_cost",
    "unshard_tensor",
]

REPLICATED = "replicated"


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


# ----------------------------------------------------------------------------------------------- the plan
@dataclass
class TensorParallelPlan:
    """The layout plan of one graph at one tp degree: plain data, `to_json()` / `from_json()` round-trip.

    node_layout: node name -> "replicated" | "shard(d)" | "partial" (every node of the graph).
    param_shard: parameter name -> {"dim": int | None, "parts": int} (dim None = replicated); tied names both.
    module_rules: node name -> "column" | "row" | "vocab_embedding" | "vocab_cross_entropy".
    arg_rewrites: node name -> argument paths (["args", i] or ["args", i, j] or ["kwargs", k(, j)]) whose value
        (a global size: int, or an int node) becomes value // tp.
    global_sizes: int-valued nodes read from a sharded dimension; the applier multiplies them by tp so every
        int in the graph stays a global size.
    collectives: {"kind": "all_reduce" | "all_gather", "phase": "forward" | "backward", "after": node,
        "users": [nodes] (backward f: the consumers it feeds), "op": "sum" | "max", "dim": gather dim,
        "bytes": bytes of the full tensor per call}.
    fallbacks: {"node": seed node, "reason": why it stays replicated}.
    requirements: sizes a tp must divide for the sharded nodes of this plan ({"node", "size"}).
    """

    tp: int
    node_layout: dict[str, str]
    param_shard: dict[str, dict[str, int | None]]
    module_rules: dict[str, str]
    arg_rewrites: dict[str, list[list[Any]]]
    global_sizes: list[str]
    collectives: list[dict[str, Any]]
    fallbacks: list[dict[str, str]]
    requirements: list[dict[str, Any]] = field(default_factory=list)
    gather_output: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TensorParallelPlan:
        return cls(**json.loads(text))

    def sharded_nodes(self) -> list[str]:
        return [n for n, lay in self.node_layout.items() if lay != REPLICATED]

    def summary(self) -> str:
        """A short table: counts per layout, collectives per kind/phase, fallbacks with reasons."""
        lines = [f"tensor parallel tp={self.tp}: {len(self.sharded_nodes())}/{len(self.node_layout)} nodes sharded"]
        kinds: dict[str, int] = {}
        for c in self.collectives:
            key = f"{c['kind']}({c.get('op', 'cat')}) {c['phase']}"
            kinds[key] = kinds.get(key, 0) + 1
        lines += [f"  {k}: {v}" for k, v in sorted(kinds.items())]
        lines += [f"  replicated {f['node']}: {f['reason']}" for f in self.fallbacks]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- shard math
def shard_slices(shape: tuple[int, ...] | torch.Size, dim: int, parts: int, rank: int, tp: int) -> list[tuple]:
    """Index tuples into the full tensor that rank `rank` holds, in local order (one per part).

    Example: shape (192, 64), dim 0, parts 3, tp 2, rank 1 -> rows [32:64], [96:128], [160:192].
    """
    size = shape[dim]
    if size % (parts * tp):
        raise ValueError(f"dimension {dim} of size {size} does not split into {parts} parts x tp={tp}")
    block, chunk = size // parts, size // (parts * tp)
    lead = (slice(None),) * dim
    return [lead + (slice(i * block + rank * chunk, i * block + (rank + 1) * chunk),) for i in range(parts)]


def shard_tensor(full: torch.Tensor, dim: int, parts: int, rank: int, tp: int) -> torch.Tensor:
    """Rank `rank`'s shard of `full` (a copy when parts > 1, else a view)."""
    pieces = [full[s] for s in shard_slices(full.shape, dim, parts, rank, tp)]
    return pieces[0] if parts == 1 else torch.cat(pieces, dim)


def unshard_tensor(shards: list[torch.Tensor], dim: int, parts: int) -> torch.Tensor:
    """Inverse of `shard_tensor` over all ranks: `unshard_tensor([shard_tensor(t, d, p, r, n) ...]) == t`."""
    blocks = [s.chunk(parts, dim) for s in shards]
    return torch.cat([blocks[r][i] for i in range(parts) for r in range(len(shards))], dim)


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


# ----------------------------------------------------------------------------------------------- entry points
_FUNCTIONAL_WEIGHTS = {F.linear, F.embedding, torch.ops.aten.linear.default, torch.ops.aten.embedding.default}


def _initial_seeds(gm: fx.GraphModule, min_vocab: int) -> tuple[set[str], dict[str, str]]:
    linear_params = {id(m.weight) for m in gm.modules() if isinstance(m, nn.Linear)}
    seeds, skipped = set(), {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _FUNCTIONAL_WEIGHTS:
            skipped[n.name] = (
                f"{getattr(n.target, '__name__', n.target)} on a weight read by get_attr: the TP rules shard "
                f"nn.Linear / nn.Embedding modules (an fx capture; a torch.export ATen graph has none)"
            )
        if n.op != "call_module":
            continue
        mod = gm.get_submodule(str(n.target))
        if isinstance(mod, nn.Linear):
            seeds.add(n.name)
        elif isinstance(mod, nn.Embedding):
            tied = id(mod.weight) in linear_params
            if mod.max_norm is not None or mod.sparse or mod.scale_grad_by_freq:
                skipped[n.name] = "embedding with max_norm / sparse / scale_grad_by_freq"
            elif tied or mod.num_embeddings >= min_vocab:
                seeds.add(n.name)
            else:
                skipped[n.name] = (
                    f"embedding table of {mod.num_embeddings} rows < min_vocab={min_vocab} and not tied to an LM "
                    f"head: a vocab-parallel lookup's all-reduce costs more than the table saves"
                )
    return seeds, skipped


def _run(
    gm: fx.GraphModule,
    tp: int | None,
    *,
    strict: bool,
    gather_output: bool,
    min_vocab: int,
    exclude: frozenset[str] = frozenset(),
) -> tuple[_State, dict[str, str]]:
    _require_annotation(gm)
    seeds, fallbacks = _initial_seeds(gm, min_vocab)
    for name in sorted(seeds & exclude):
        seeds.discard(name)
        fallbacks[name] = "kept replicated on request (exclude)"
    if tp == 1:  # nothing to shard: the plan is all replicated, with no collectives
        seeds, fallbacks = set(), {}
    seed_parts: dict[str, int] = {}
    parts_why: dict[str, _PartsRequest] = {}  # why a seed was re-seeded as blocks
    vocab = {m.num_embeddings for m in gm.modules() if isinstance(m, nn.Embedding)}
    for _ in range(4 * len(seeds) + 8):
        st = _State(gm, tp, set(seeds), dict(seed_parts), gather_output, vocab)
        outcome = _propagate(st)
        if tp == 1 or (not outcome.conflicts and not outcome.parts):  # tp 1: nothing sharded, nothing to undo
            return st, fallbacks
        for seed, req in outcome.parts.items():
            seed_parts[seed] = req.parts
            parts_why.setdefault(seed, req)
        restart = bool(outcome.parts)
        for node, c, origins in outcome.conflicts:
            if strict and (c.divisibility or not origins):
                raise ValueError(f"tensor parallel tp={tp} (strict): {node.name}: {c.reason}")
            if not origins:  # no sharded input: the node is replicated, as on every rank; nothing to undo
                fallbacks.setdefault(node.name, f"no sharding analysis: {c.reason}")
                continue
            restart = True
            for s in origins:
                seeds.discard(s)
                where = "" if s == node.name else f" its shard reaches {node.name}:"
                reason = f"{where} {c.reason}".strip()
                if s in parts_why:  # the first reason is the real one; the block split did not help either
                    first = parts_why[s]
                    if strict and first.divisibility:
                        raise ValueError(f"tensor parallel tp={tp} (strict): {s}: {first.reason}")
                    reason = f"{first.reason}; as {first.parts} blocks: {reason}"
                fallbacks.setdefault(s, reason)
        if not restart:
            return st, fallbacks
    raise RuntimeError("sharding propagation did not converge")  # unreachable: seeds shrink every round


def _require_annotation(gm: fx.GraphModule) -> None:
    if not all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output",)):
        raise ValueError("tensor-parallel planning needs node.meta['val']: run partitioner.annotate.annotate first")


def plan_tensor_parallel(
    gm: fx.GraphModule,
    tp: int,
    *,
    strict: bool = False,
    gather_output: bool = True,
    min_vocab: int = 1024,
    exclude: frozenset[str] | set[str] = frozenset(),
) -> TensorParallelPlan:
    """The tensor-parallel layout plan of annotated `gm` at degree `tp` (see the module docstring).

    strict (a tensor_parallel degree the user forced): raise ValueError when tp does not divide a head or hidden
    size a shardable node needs (instead of falling back), when a rule fails on a node without a seed to blame,
    and when nothing at all is sharded at tp > 1; a vocabulary tp does not divide still falls back (pad it to a
    multiple of tp to shard it), and so do other conflicts, with their reasons in `fallbacks`.
    gather_output: all-gather sharded model outputs (LM head logits) rather than keeping their producers
    replicated. min_vocab: embeddings with fewer rows stay replicated unless tied to a sharded LM head.
    exclude: Linear / Embedding nodes to keep replicated (their partners follow: a row-parallel Linear needs a
    sharded input).
    """
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    st, fallbacks = _run(
        gm, tp, strict=strict, gather_output=gather_output, min_vocab=min_vocab, exclude=frozenset(exclude)
    )
    if strict and tp > 1 and not st.rules:  # every rank would compute the whole model: refuse rather than copy it
        why = "; ".join(f"{node}: {reason}" for node, reason in list(fallbacks.items())[:3])
        raise ValueError(
            f"tensor parallel tp={tp} (strict): nothing in this graph can be sharded "
            f"({why or 'it calls no nn.Linear or nn.Embedding module'})"
        )
    return _to_plan(st, tp, fallbacks)


def check_tensor_parallel_plan(gm: fx.GraphModule, plan: TensorParallelPlan) -> None:
    """Type-check a layout (a saved plan's, maybe edited by hand) against the annotated graph it will run on.

    The layout's decisions are its column-parallel and vocab-parallel seeds (with their block counts) and
    gather_output; everything else follows from them by the rules of this module. The check propagates those
    decisions once, never choosing others, and requires the result to be exactly what the layout records: every
    node's layout, every parameter's shard, the module rules, the argument rewrites, the global sizes and the
    collectives. Raises ValueError naming the first node (or parameter) that cannot take its recorded layout or
    records something else. Example: a plan whose MLP `fc` is edited from column-parallel to replicated must
    also record `proj` as replicated (no sharded input reaches it), without the all-reduce after it.
    """
    _require_annotation(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    where = f"the tensor-parallel layout (tp={plan.tp}) does not fit this graph"
    missing = [n for n in nodes if n not in plan.node_layout]
    unknown = [n for n in plan.node_layout if n not in nodes]
    if missing or unknown:
        raise ValueError(
            f"{where}: nodes {(missing or unknown)[:3]} are {'missing' if missing else 'not in the graph'}"
        )
    seeds = {n for n, rule in plan.module_rules.items() if rule in ("column", "vocab_embedding") and n in nodes}
    seed_parts = {}
    for n in seeds:
        spec = plan.param_shard.get(f"{nodes[n].target}.weight", {})
        seed_parts[n] = int(spec.get("parts") or 1)
    vocab = {m.num_embeddings for m in gm.modules() if isinstance(m, nn.Embedding)}
    st = _State(gm, plan.tp, seeds, seed_parts, plan.gather_output, vocab)
    outcome = _propagate(st)
    for node, conflict, origins in outcome.conflicts:
        if origins:  # a recorded sharding reaches a node that cannot take it
            raise ValueError(f"{where}: node {node.name!r}: {conflict.reason}")
    if outcome.parts:
        seed, request = next(iter(outcome.parts.items()))
        raise ValueError(f"{where}: node {seed!r} must be sharded as {request.parts} blocks ({request.reason})")
    derived = _to_plan(st, plan.tp, {})
    for name in nodes:  # graph order: the first difference is the one to fix
        if derived.node_layout[name] != plan.node_layout[name]:
            raise ValueError(
                f"{where}: node {name!r} is recorded {plan.node_layout[name]!r}, but its inputs' recorded layouts "
                f"make it {derived.node_layout[name]!r}"
            )
    for name, spec in derived.param_shard.items():
        if plan.param_shard.get(name) != spec:
            raise ValueError(
                f"{where}: parameter {name!r} is recorded {plan.param_shard.get(name)}, its node makes it {spec}"
            )
    for what in ("module_rules", "arg_rewrites", "global_sizes", "collectives"):
        got, want = getattr(plan, what), getattr(derived, what)
        if _canonical(got) != _canonical(want):
            node = _first_difference(got, want)
            raise ValueError(f"{where}: its {what} differ from what its layouts imply, at node {node!r}")


def _canonical(value: Any) -> str:
    items = sorted(json.dumps(v, sort_keys=True) for v in value) if isinstance(value, list) else None
    return json.dumps(items if items is not None else value, sort_keys=True)


def _first_difference(got: Any, want: Any) -> str:
    """A node named by the first entry on one side only (dicts by key, lists of records by their anchor)."""
    if isinstance(got, dict):
        keys = sorted(set(got) | set(want))
        return next((k for k in keys if got.get(k) != want.get(k)), "?")
    a = {json.dumps(v, sort_keys=True) for v in got}
    b = {json.dumps(v, sort_keys=True) for v in want}
    odd = sorted(a ^ b)
    if not odd:
        return "?"
    record = json.loads(odd[0])
    return record.get("after", "?") if isinstance(record, dict) else str(record)


def max_tensor_parallel(gm: fx.GraphModule, limit: int = 8, *, min_vocab: int = 1024) -> int:
    """The largest tp <= limit dividing every head and hidden size the shardable nodes need.

    Vocabulary sizes (rows of the graph's embeddings) do not limit it: a vocabulary tp does not divide just
    stays replicated (pad it to a multiple of tp to shard it), as in gpt3-1.3b's 50257.
    Example: GPT with 4 heads, d 64, d_ff 256, vocab 512 -> gcd(4, 64, 256) = 4; gpt3-1.3b -> 16 heads -> 16.
    """
    st, _ = _run(gm, None, strict=False, gather_output=True, min_vocab=min_vocab)
    vocab = {m.num_embeddings for m in gm.modules() if isinstance(m, nn.Embedding)}
    g = 0
    for r in st.requirements:
        if r["size"] not in vocab:
            g = math.gcd(g, r["size"])
    if g == 0:
        return 1
    return max(t for t in range(1, limit + 1) if g % t == 0)


def _nbytes(n: fx.Node) -> int:
    v = _val(n)
    return v.numel() * v.element_size() if isinstance(v, torch.Tensor) else 0


def _to_plan(st: _State, tp: int, fallbacks: dict[str, str]) -> TensorParallelPlan:
    gm = st.gm
    layout = {n.name: _layout_str(st.layout.get(n)) for n in gm.graph.nodes}
    params = {name: {"dim": None, "parts": 1} for name, _ in gm.named_parameters(remove_duplicate=False)}
    params.update({name: spec for name, (spec, _) in st.params.items()})
    collectives: list[dict[str, Any]] = []
    for n in gm.graph.nodes:
        lay = st.layout.get(n)
        # g: a partial sum becomes replicated right after its producer
        if isinstance(lay, _Partial):
            collectives.append(dict(kind="all_reduce", phase="forward", after=n.name, op="sum", bytes=_nbytes(n)))
        # f: a replicated value needing a grad feeds rank-dependent nodes -> all-reduce its grad
        v = _val(n)
        if st.eff(n) is None and isinstance(v, torch.Tensor) and v.is_floating_point():
            users = [u.name for u in n.users if u.op != "output" and st.layout.get(u) is not None
                     and not isinstance(st.layout.get(u), (_SizeOf,))]  # fmt: skip
            if users and n.meta.get("requires_grad", True):
                collectives.append(
                    dict(kind="all_reduce", phase="backward", after=n.name, op="sum", users=users, bytes=_nbytes(n))
                )
        if st.rules.get(n.name) == "vocab_cross_entropy":
            rows = _val(n.args[0]).shape[0] * 4
            for op in ("max", "sum", "sum"):  # max logit, sum of exp, target logit
                collectives.append(dict(kind="all_reduce", phase="forward", after=n.name, op=op, bytes=rows))
        if n.name in st.gathers:
            collectives.append(
                dict(kind="all_gather", phase="forward", after=n.name, dim=st.gathers[n.name], bytes=_nbytes(n))
            )
    return TensorParallelPlan(
        tp=tp,
        node_layout=layout,
        param_shard=params,
        module_rules=dict(st.rules),
        arg_rewrites=st.arg_rewrites,
        global_sizes=list(st.global_sizes),
        collectives=collectives,
        fallbacks=[{"node": k, "reason": v} for k, v in fallbacks.items()],
        requirements=st.requirements,
        gather_output=st.gather_output,
    )


# ----------------------------------------------------------------------------------------------- cost
@dataclass(frozen=True)
class TPCost:
    """Per-step tensor-parallel figures for the pp x tp x dp search (seconds; FLOPs of the annotated batch).

    comm_forward / comm_backward: time of the plan's collectives (ring: all-reduce 2(tp-1)/tp x bytes / bw,
    all-gather (tp-1)/tp x bytes / bw, plus one latency per call). flops_per_rank: sharded nodes' FLOPs / tp
    plus replicated nodes' FLOPs (forward + backward). node_scale: node -> factor on its compute time.
    comm_by_node: node -> (forward, backward) seconds of the collectives anchored after it (to sum per stage).
    param_bytes_per_rank: parameter bytes one tp rank holds (tied parameters once; sharded ones / tp).
    """

    comm_forward: float
    comm_backward: float
    flops_per_rank: float
    flops_total: float
    node_scale: dict[str, float]
    comm_by_node: dict[str, tuple[float, float]]
    param_bytes_per_rank: float

    @property
    def comm(self) -> float:
        return self.comm_forward + self.comm_backward


def _collective_time(c: dict[str, Any], tp: int, spec: DeviceSpec) -> float:
    collective = all_reduce_time if c["kind"] == "all_reduce" else all_gather_time
    return collective(spec, c["bytes"], tp, internode=tp > spec.devices_per_node)


def tp_cost(plan: TensorParallelPlan, gm: fx.GraphModule, spec: DeviceSpec, *, training: bool = True) -> TPCost:
    """Communication time and per-rank compute of `plan` on `spec` (see TPCost). Bytes are per annotated batch."""
    comm_by_node: dict[str, tuple[float, float]] = {}
    fwd = bwd = 0.0
    for c in plan.collectives:
        t = _collective_time(c, plan.tp, spec)
        f, b = comm_by_node.get(c["after"], (0.0, 0.0))
        if c["phase"] == "forward":
            fwd += t
            comm_by_node[c["after"]] = (f + t, b)
        elif training:
            bwd += t
            comm_by_node[c["after"]] = (f, b + t)
    scale, per_rank, total = {}, 0.0, 0.0
    for n in gm.graph.nodes:
        s = 1.0 / plan.tp if plan.node_layout.get(n.name, REPLICATED) != REPLICATED else 1.0
        scale[n.name] = s
        flops = n.meta.get("flops", 0) + (n.meta.get("bwd_flops", 0) if training else 0)
        per_rank += flops * s
        total += flops
    seen: dict[int, float] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        sharded = plan.param_shard.get(name, {"dim": None})["dim"] is not None
        seen[id(p)] = p.numel() * p.element_size() / (plan.tp if sharded else 1)
    return TPCost(fwd, bwd, per_rank, total, scale, comm_by_node, sum(seen.values()))
