"""plan.tensor_sequence: Megatron sequence parallelism (Korthikanti et al. 2022) on top of a tensor-parallel layout.

Tensor parallelism leaves the ops between a row-parallel output and the next column-parallel input (residual
adds, layer norms, dropout) replicated: every rank computes them on the whole activation and keeps the whole
activation for backward. Those ops are token-wise (each token's output depends on that token alone), so the
tokens can be split across the tp ranks instead. Derived here from a finished propagation (plan.tensor_rules'
`_State`), never changing its decisions:

    value                                   tensor parallel            sequence parallel
    partial (row / vocab-parallel output)   all-reduce (g)             reduce-scatter on dim S -> seq(S)
    token-wise op of seq(S) inputs          replicated                 seq(S): 1/tp of the tokens, 1/tp compute
    seq value -> rank-dependent consumer    f (all-reduce backward)    all-gather; backward reduce-scatter
    seq value -> other replicated consumer  -                          all-gather; backward keeps own slice
    replicated operand spanning S           -                          scatter (own slice); backward all-gather
    parameter read by a seq op (LN weight)  -                          its gradient all-reduced (each rank saw
                                                                       only its tokens)
    x.size(S) / x.shape of a seq value      -                          made global (x tp on dim S)

S is dim ndim - 2 of the partial value (the sequence of a (batch, seq, hidden) activation; any dim but the last
would do, since the ops are token-wise, so this also holds for (seq, batch, hidden) layouts, where it splits the
batch). A partial value of fewer than 3 dims, or whose dim S tp does not divide, keeps its all-reduce.

Token-wise ops: unary elementwise ops and modules (dropout, activations, casts), broadcasting binary ops,
LayerNorm / RMSNorm (modules or functional) over trailing dims other than S, softmax over another dim. Any other
consumer sees the gathered value.

Column-parallel matmuls reading a split value (the q, k, v or fc projections after a norm) run as one group, as
Megatron-LM's LinearWithGradAccumulationAndAsyncCommunication does: the group all-gathers the value once, saves only
the shard for its backward and gathers it again there (`column_groups`), so a layer's activations are the paper's
sbh(34/t + 5as/(ht)). Other rank-dependent consumers read a gathered copy that autograd keeps whole
(`gathered_saves`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from partitioner.plan.tensor_ops import (
    _BINARY_FUNCTIONS,
    _BINARY_METHODS,
    _FIRST_ARG_METHODS,
    _META_METHODS,
    _NORM_FUNCTIONS,
    _NORM_MODULES,
    _SOFTMAX,
    _UNARY_FUNCTIONS,
    _UNARY_METHODS,
    _UNARY_MODULES,
    key_in,
    op_key,
)
from partitioner.plan.tensor_rules import _Partial, _State, _val

__all__ = ["SequenceLayout", "counts_as_sequence_user", "sequence_parallel_layout"]

_ELEMENTWISE = _UNARY_FUNCTIONS | _UNARY_METHODS | _BINARY_FUNCTIONS | _BINARY_METHODS | _FIRST_ARG_METHODS


@dataclass
class SequenceLayout:
    """Which values are split on the sequence and what that needs (node names throughout).

    seq: value -> its sharded dim S. reduce_scatter: the partial values whose all-reduce becomes a reduce-scatter
    (a subset of seq). gather_partial / gather_replicated: seq value -> the consumers that read it gathered, whose
    gradients are partial over the ranks (reduce-scatter backward) / the same on every rank (keep own slice).
    scatter: replicated value -> [(dim, consumers)] that read its own slice. param_grads: seq call_module node ->
    the parameters whose gradients are all-reduced. global_sizes: x.size(S) reads; global_shapes: whole-shape
    reads -> the dim to multiply by tp. column_groups: seq value -> the column-parallel Linear nodes that read it
    through one gather saving the shard (a subset of its gather_partial). gathered_saves: seq values some consumer
    saves gathered, whole (module docstring).
    """

    seq: dict[str, int] = field(default_factory=dict)
    reduce_scatter: set[str] = field(default_factory=set)
    column_groups: dict[str, list[str]] = field(default_factory=dict)
    gather_partial: dict[str, list[str]] = field(default_factory=dict)
    gather_replicated: dict[str, list[str]] = field(default_factory=dict)
    scatter: dict[str, list[tuple[int, list[str]]]] = field(default_factory=dict)
    param_grads: dict[str, list[str]] = field(default_factory=dict)
    global_sizes: list[str] = field(default_factory=list)
    global_shapes: dict[str, int] = field(default_factory=dict)

    @property
    def gathered_saves(self) -> set[str]:
        return {v for v, users in self.gather_partial.items() if set(users) - set(self.column_groups.get(v, ()))}


def _tensor(n: object) -> torch.Tensor | None:
    v = _val(n) if isinstance(n, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _token_wise(st: _State, node: fx.Node, seq: dict[fx.Node, int], tp: int) -> tuple[int, list] | None:
    """(S of the output, [(replicated operand, its dim to scatter)]) if `node` can run on seq-split inputs."""
    out = _tensor(node)
    if out is None:
        return None
    ins = [x for x in node.all_input_nodes if _tensor(x) is not None]
    split = [x for x in ins if x in seq]
    if not split:
        return None
    nd = out.dim()
    dims = {seq[x] + nd - _tensor(x).dim() for x in split}
    if len(dims) != 1:
        return None
    s = dims.pop()
    if node.op == "call_module":
        mod = st.module(node.target)
        if isinstance(mod, _NORM_MODULES):
            normalized = len(mod.normalized_shape) if mod.normalized_shape else 1
            return (s, []) if s < nd - normalized and len(ins) == 1 else None
        return (s, []) if isinstance(mod, _UNARY_MODULES) and len(ins) == 1 else None
    if node.op not in ("call_function", "call_method"):
        return None
    if key_in(node, _NORM_FUNCTIONS):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("normalized_shape")
        normalized = len(shape) if isinstance(shape, (list, tuple)) else 1
        return (s, []) if s < nd - normalized and node.args[0] in seq and len(split) == 1 else None
    if key_in(node, _SOFTMAX):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return (s, []) if isinstance(dim, int) and dim % nd != s and len(ins) == 1 else None
    if not key_in(node, _ELEMENTWISE):
        return None
    if key_in(node, _FIRST_ARG_METHODS):
        return (s, []) if node.args[0] in seq else None
    scatters = []
    for x in ins:
        if x in seq:
            continue
        shape = _tensor(x).shape
        d = s - (nd - len(shape))
        if d >= 0 and shape[d] != 1:  # spans the split dim: read its own slice of it
            if shape[d] != out.shape[s] or shape[d] % tp:
                return None
            scatters.append((x, d))
    return s, scatters


def _reads_size(node: fx.Node) -> bool:
    """x.size(), x.size(d), ATen's sym_size(x, d) or x.shape."""
    if node.op in ("call_method", "call_function") and op_key(node) == "size":
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] == "shape"


def _size_dim(node: fx.Node) -> int | None:
    """The dim a `_reads_size` node reads; None: the whole torch.Size."""
    if node.target is getattr:
        return None
    return node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")


def _harmless(node: fx.Node) -> bool:
    """Reads only what every rank has the same (dtype, device, dim count)."""
    if node.op in ("call_method", "call_function") and key_in(node, _META_METHODS):
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] != "shape"


def sequence_parallel_layout(st: _State) -> SequenceLayout:
    """The sequence-parallel layout on top of the finished tensor-parallel propagation `st` (module docstring)."""
    tp = st.tp or 1
    out = SequenceLayout()
    seq: dict[fx.Node, int] = {}
    for n in st.gm.graph.nodes:
        lay = st.layout.get(n)
        v = _tensor(n)
        if isinstance(lay, _Partial):
            # a row-parallel or vocab-parallel sum over the features: its tokens can be split; a reduction's (a norm's
            # statistics over sharded features) is read whole by the sharded features: all-reduced
            summed = st.rules.get(n.name) in ("row", "vocab_embedding") and n.name not in st.partial_taken
            if summed and v is not None and v.dim() >= 3 and v.shape[v.dim() - 2] % tp == 0:
                seq[n] = v.dim() - 2
                out.reduce_scatter.add(n.name)
            continue
        if lay is not None:
            continue
        found = _token_wise(st, n, seq, tp)
        if found is None:
            continue
        seq[n], scatters = found
        for x, d in scatters:
            entries = out.scatter.setdefault(x.name, [])
            users = next((u for dim, u in entries if dim == d), None)
            if users is None:
                entries.append((d, users := []))
            users.append(n.name)
        if n.op == "call_module":
            names = [f"{n.target}.{p}" for p, _ in st.module(n.target).named_parameters()]
            if names:
                out.param_grads[n.name] = names
    attrs = {n.name: str(n.target) for n in st.gm.graph.nodes if n.op == "get_attr"}
    for name in out.reduce_scatter:  # a row-parallel bias is added after the reduce-scatter, to 1/tp of the tokens
        if st.rules.get(name) == "row":
            node = next(n for n in seq if n.name == name)
            if name in st.row_bias:  # a functional / ATen linear: its bias is a get_attr input
                out.param_grads[name] = [attrs[st.row_bias[name]]]
            elif node.op == "call_module" and st.module(node.target).bias is not None:
                out.param_grads[name] = [f"{node.target}.bias"]
    for n, s in seq.items():
        out.seq[n.name] = s
        for u in n.users:
            if u in seq:
                continue
            if u.op == "output":
                out.gather_replicated.setdefault(n.name, []).append(u.name)
            elif _reads_size(u):
                d = _size_dim(u)
                if d is None:  # x.shape, x.size(): a whole torch.Size
                    out.global_shapes[u.name] = s
                elif d % _tensor(n).dim() == s:
                    out.global_sizes.append(u.name)
            elif _harmless(u):
                continue
            elif st.layout.get(u) is not None:  # rank-dependent: its input gradient is partial over the ranks
                out.gather_partial.setdefault(n.name, []).append(u.name)
                if u.name in st.seed_whole:  # its rows kept whole read `n` as a replicated computation does too
                    out.gather_replicated.setdefault(n.name, []).append(u.name)
                elif st.rules.get(u.name) == "column" and u.args == (n,) and not u.kwargs:
                    out.column_groups.setdefault(n.name, []).append(u.name)
            else:
                out.gather_replicated.setdefault(n.name, []).append(u.name)
    return out


def counts_as_sequence_user(layout: SequenceLayout, value: str, user: str) -> bool:
    """Whether `user` is a seq-split op reading replicated `value` whole (a broadcast operand: its gradient there is
    partial over the ranks, so `value` needs Megatron's f in front of it), not through a scatter."""
    if user not in layout.seq:
        return False
    return not any(user in users for _, users in layout.scatter.get(value, []))
