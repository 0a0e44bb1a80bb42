"""passes.context_parallel: one context-parallel rank's graph, rewritten from the whole graph by a ContextLayout.

The rank's graph reads its tokens of every sequence input (`scatter_input`) and computes only those; the layout
(plan.context) says where it must read a value whole (an all-gather of every rank's tokens, put back in sequence
order), where a replicated value is read at the rank's positions, which reductions are all-reduced, which size
reads are made global and which size arguments local. Autograd follows plan.context's invariant: a gather's
backward reduce-scatters, an all-reduce's backward all-reduces, each output's gradient is divided by the degree,
and the ranks' parameter gradients sum to the model's.

Example: `context_parallel_rank(gm, plan_context_parallel(gm, 2), rank=1, comm=comm)` runs on the tokens
`rank_positions(T, 2, 1, balance=True)` of every sequence input.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from partitioner.passes.tensor_parallel import TPComm, _GatherFromSequence, global_shape
from partitioner.plan.context import ContextLayout, Split, rank_positions
from partitioner.plan.tensor_ops import _CROSS_ENTROPY, _SDPA, cross_entropy_call, key_in, op_key

__all__ = [
    "CPAttention", "CPCollective", "causal_runs", "context_parallel_rank", "scatter_input", "stage_of_inserted_nodes",
]  # fmt: skip


def _positions_split(x: torch.Tensor, s: Split, positions: torch.Tensor) -> torch.Tensor:
    """x's elements at `positions` of its token factor (dim s.dim holds outer x T x inner)."""
    size = x.shape[s.dim]
    tokens = size // (s.outer * s.inner)
    parts = x.unflatten(s.dim, (s.outer, tokens, s.inner))
    return parts.index_select(s.dim + 1, positions.to(x.device)).flatten(s.dim, s.dim + 2)


def scatter_input(x: torch.Tensor, s: Split, layout: ContextLayout, rank: int) -> torch.Tensor:
    """The tokens of a whole sequence input that context-parallel rank `rank` runs on."""
    return _positions_split(x, s, rank_positions(layout.seq_len, layout.degree, rank, layout.balance))


class _AllReduceSum(torch.autograd.Function):
    """Sum of the ranks' partial reductions; the sum's gradient is summed over the ranks too (plan.context)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return comm.all_reduce(x, "sum")

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(grad, "sum"), None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward divides the gradient by the degree, so that the ranks' gradients sum to it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, degree: int) -> torch.Tensor:
        ctx.degree = degree
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad / ctx.degree, None


class CPCollective(nn.Module):
    """One context-parallel step of a rank graph. kind: "gather" (every rank's tokens, in sequence order),
    "scatter" (a replicated value's rank positions), "sum" / "mean" (all-reduce of a partial reduction),
    "output" (divide the gradient by the degree)."""

    def __init__(self, kind: str, comm: TPComm, layout: ContextLayout, split: Split | None = None):
        super().__init__()
        self.kind, self.comm, self.split, self.degree = kind, comm, split, layout.degree
        every = [rank_positions(layout.seq_len, layout.degree, r, layout.balance) for r in range(layout.degree)]
        # index tensors, not buffers: no state dict, materialization or data-parallel wrapper should see them
        self._index = {"positions": every[comm.rank], "order": torch.argsort(torch.cat(every))}

    def index(self, name: str, device: torch.device) -> torch.Tensor:
        """An index tensor on `device` (moved once per device; meta stays meta-shaped)."""
        key = f"{name}@{device}"
        if key not in self._index:
            self._index[key] = self._index[name].to(device)
        return self._index[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.split
        if self.kind == "scatter":
            return _positions_split(x, s, self.index("positions", x.device))
        if self.kind == "gather":
            whole = _GatherFromSequence.apply(x, self.comm, s.dim)  # rank-major: (degree, outer, T/degree, inner)
            local = x.shape[s.dim] // (s.outer * s.inner)
            parts = whole.unflatten(s.dim, (self.degree, s.outer, local, s.inner)).transpose(s.dim, s.dim + 1)
            tokens = parts.flatten(s.dim + 1, s.dim + 2).index_select(s.dim + 1, self.index("order", x.device))
            return tokens.flatten(s.dim, s.dim + 2)
        if self.kind in ("sum", "mean"):
            total = _AllReduceSum.apply(x, self.comm)
            return total / self.degree if self.kind == "mean" else total
        if self.kind == "output":
            return _ScaleGrad.apply(x, self.degree)
        raise ValueError(f"unknown context-parallel step {self.kind!r}")

    def extra_repr(self) -> str:
        return f"{self.kind}, degree={self.degree}, split={self.split}"


class CPAttention(nn.Module):
    """scaled_dot_product_attention of the rank's queries over every key, causal by the queries' global positions.

    The rank's positions are runs of consecutive tokens (one, or two with the balanced order). Run [a, b) attends to
    keys [0, b) under a lower-right causal bias (query a + i sees keys <= a + i): one SDPA call per run, so that a
    GPU runs flash (or memory-efficient) attention with its causal block skipping, the useful 1 / cp of the causal
    work that plan.context_cost prices; a boolean mask over every key would run the masked kernel on all of them
    (twice the work, at a lower rate)."""

    def __init__(self, positions: torch.Tensor):
        super().__init__()
        self.runs = causal_runs(positions)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        kwargs = {"dropout_p": dropout_p, "scale": scale, "enable_gqa": enable_gqa}
        if not is_causal:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, **kwargs)
        if attn_mask is not None:
            raise ValueError("scaled_dot_product_attention with both attn_mask and is_causal")
        # imported here: torch.nn.attention.bias imports torch._dynamo (1.3 s), which planning never needs
        from torch.nn.attention.bias import causal_lower_right

        outs = []
        for row, start, end in self.runs:
            n = end - start
            bias = causal_lower_right(n, end)
            q, k, v = query.narrow(-2, row, n), key.narrow(-2, 0, end), value.narrow(-2, 0, end)
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=bias, **kwargs))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)

    def extra_repr(self) -> str:
        return "runs=" + ", ".join(f"[{a}, {b})" for _, a, b in self.runs)


def causal_runs(positions: torch.Tensor) -> list[tuple[int, int, int]]:
    """(first row, first position, end position) of each maximal run of consecutive global positions, in row order:
    rows row .. row + end - start - 1 hold positions start .. end - 1."""
    values = positions.tolist()
    runs: list[tuple[int, int, int]] = []
    for row, p in enumerate(values):
        if runs and runs[-1][2] == p:
            first, start, _ = runs[-1]
            runs[-1] = (first, start, p + 1)
        else:
            runs.append((row, p, p + 1))
    return runs


class CPCrossEntropy(nn.Module):
    """Cross entropy of the rank's tokens: the local sum all-reduced; a mean divides by the valid tokens of all
    ranks (also all-reduced), as the whole sequence's mean does."""

    def __init__(self, comm: TPComm, reduction: str, ignore_index: int, label_smoothing: float):
        super().__init__()
        self.comm, self.reduction = comm, reduction
        self.ignore_index, self.label_smoothing = ignore_index, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = F.cross_entropy(
            logits, target, ignore_index=self.ignore_index, reduction="sum", label_smoothing=self.label_smoothing
        )
        total = _AllReduceSum.apply(total, self.comm)
        if self.reduction == "sum":
            return total
        count = self.comm.all_reduce((target != self.ignore_index).sum().to(total.dtype), "sum")
        return total / count


def _localize(sizes: Any, index: int, degree: int, graph: fx.Graph) -> Any:
    """`sizes` (a list / tuple of ints and size nodes) with entry `index` divided by the degree (-1 kept)."""
    items = list(sizes)
    entry = items[index]
    if isinstance(entry, fx.Node):
        items[index] = graph.call_function(operator.floordiv, (entry, degree))
        if isinstance(entry.meta.get("val"), int):  # a stage boundary carrying it needs its kind (a Python int)
            items[index].meta["val"] = entry.meta["val"] // degree
    elif entry != -1:
        items[index] = entry // degree
    return type(sizes)(items)


def _local_shape_args(n: fx.Node, args: tuple, out_dim: int, degree: int, graph: fx.Graph) -> tuple:
    """view / reshape / expand / unflatten arguments with the size at the split output dim made local."""
    name = op_key(n)
    if name == "unflatten" or n.target is torch.unflatten:
        dim = args[1] if args[1] >= 0 else args[1] + len(n.args[0].meta["val"].shape)
        if dim <= out_dim < dim + len(args[2]):
            return (args[0], dim, _localize(args[2], out_dim - dim, degree, graph), *args[3:])
        return args
    if len(args) == 2 and isinstance(args[1], (list, tuple)):  # x.view((B, T, d)), aten.view(x, [B, T, d])
        return (args[0], _localize(args[1], out_dim, degree, graph))
    return (args[0], *_localize(args[1:], out_dim, degree, graph))  # x.view(B, T, d)


def context_parallel_rank(
    gm: fx.GraphModule, layout: ContextLayout, rank: int, comm: TPComm, *, divide_output_grads: bool = True
) -> fx.GraphModule:
    """The graph context-parallel rank `rank` runs (module docstring); it shares gm's parameters and submodules.

    divide_output_grads: divide each output's gradient by the degree, so that the ranks' parameter gradients sum
    to the model's (the in-process check); False where the caller averages gradients over the cp ranks instead
    (runtime.distributed averages over dp x cp)."""
    if comm.world_size != layout.degree or comm.rank != rank:
        raise ValueError(f"a comm of rank {comm.rank} of {comm.world_size} for rank {rank} of {layout.degree}")
    graph = fx.Graph()
    owned: dict[str, Any] = {}  # the rank's own modules (collectives, attention), by name
    positions = rank_positions(layout.seq_len, layout.degree, rank, layout.balance)
    count = [0]

    def step(kind: str, x: fx.Node, split: Split | None = None) -> fx.Node:
        name = f"cp_{kind}_{count[0]}"
        count[0] += 1
        owned[name] = CPCollective(kind, comm, layout, split)
        return graph.call_module(name, (x,))

    whole_of: dict[str, fx.Node] = {}
    scattered: dict[tuple, fx.Node] = {}
    reader = _readers(gm, layout)
    reads_whole: dict[str, set[str]] = {}
    for value, consumers in layout.gather.items():
        for c in consumers:
            reads_whole.setdefault(reader.get((c, value), c), set()).add(value)
    scatters: dict[str, dict[str, Split]] = {}
    for c, reads in layout.scatter.items():
        for value, split in reads.items():
            scatters.setdefault(reader.get((c, value), c), {})[value] = split
    env: dict[str, fx.Node] = {}

    applied: set[tuple[str, str]] = set()  # (consumer, value) reads the layout asks for that were rewritten

    def read(consumer: fx.Node, a: fx.Node) -> fx.Node:
        v, whole = env[a.name], a.name in reads_whole.get(consumer.name, ())
        if whole or a.name in scatters.get(consumer.name, {}):
            applied.add((consumer.name, a.name))
        if whole:
            if a.name not in whole_of:
                whole_of[a.name] = step("gather", env[a.name], layout.split[a.name])
            v = whole_of[a.name]
        s = scatters.get(consumer.name, {}).get(a.name)
        if s is not None:
            key = (a.name, whole, s)
            if key not in scattered:
                scattered[key] = step("scatter", v, s)
            v = scattered[key]
        return v

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            extra = {"default_value": n.args[0]} if n.args else {}
            env[n.name] = graph.placeholder(n.name, type_expr=n.type, **extra)
            env[n.name].meta = dict(n.meta)
            continue
        if n.op == "output":
            flat, spec = tree_flatten(n.args[0])
            outs = []
            for i, a in enumerate(flat):
                if not isinstance(a, fx.Node):
                    outs.append(a)
                    continue
                v = env[a.name]
                if i in layout.outputs:
                    v = whole_of.get(a.name) or step("gather", v, layout.outputs[i])
                if divide_output_grads and i in layout.float_outputs:  # the captured graph's output i, by position
                    v = step("output", v)
                outs.append(v)
            graph.output(tree_unflatten(outs, spec))
            continue
        args = fx.map_arg(n.args, lambda a, n=n: read(n, a))
        kwargs = fx.map_arg(n.kwargs, lambda a, n=n: read(n, a))
        if n.name in layout.local_shape:
            args = _local_shape_args(n, args, layout.local_shape[n.name], layout.degree, graph)
        if layout.attention.get(n.name) == "causal":
            name = f"cp_attention_{n.name}"
            owned[name] = CPAttention(positions)
            new = graph.call_module(name, args, kwargs)
        elif n.name in layout.cross_entropy:
            ce = cross_entropy_call(n)
            name = f"cp_cross_entropy_{n.name}"
            owned[name] = CPCrossEntropy(comm, ce.reduction, ce.ignore_index, ce.label_smoothing)
            new = graph.call_module(name, (read(n, ce.logits), read(n, ce.target)))
        else:
            new = graph.create_node(n.op, n.target, args, kwargs, name=n.name)
        new.meta = dict(n.meta)
        if n.name in layout.global_sizes:
            dim = layout.global_sizes[n.name]
            single = op_key(n) == "numel" or (op_key(n) == "size" and len(n.args) + len(n.kwargs) > 1)
            if single:
                new = graph.call_function(operator.mul, (new, layout.degree))
            else:
                new = graph.call_function(global_shape, (new, dim, layout.degree))
            new.meta = dict(n.meta)  # the whole graph's (global) size: what a stage boundary carrying it expects
        if n.name in layout.reduce:
            new = step(layout.reduce[n.name], new)
        env[n.name] = new
    _check_applied(gm, layout, {(c, v) for (r, v) in applied for c in _consumers_of(reader, r, v)})
    graph.lint()
    targets = {str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr")}
    root = {t: owned[t] if t in owned else _lookup(gm, t) for t in targets}
    return fx.GraphModule(root, graph)


def _readers(gm: fx.GraphModule, layout: ContextLayout) -> dict[tuple[str, str], str]:
    """(consumer, value) pairs of the layout whose consumer, in `gm`, reads the value through a node tensor
    parallelism inserted (its sequence-parallel scatter, its f): that node reads the value whole or at the rank's
    positions instead, so the tp op sees this rank's tokens (SP then splits those further)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[tuple[str, str], str] = {}
    for c, v in layout.planned_reads():
        node = nodes.get(c)
        if node is None or v in {a.name for a in node.all_input_nodes}:
            continue
        for a in node.all_input_nodes:
            if "tp_anchor" in a.meta and v in {b.name for b in a.all_input_nodes}:
                out[c, v] = a.name
                break
    return out


def _consumers_of(reader: dict[tuple[str, str], str], r: str, v: str) -> list[str]:
    """The layout's consumers whose read of `v` node `r` carried out (itself, or those it stands in for)."""
    return [r] + [c for (c, value), by in reader.items() if value == v and by == r]


def _check_applied(gm: fx.GraphModule, layout: ContextLayout, applied: set[tuple[str, str]]) -> None:
    """Every rewrite the layout asks for found its node in `gm`. The layout names the captured graph's nodes; a
    graph rewritten before (tensor parallelism's) may have replaced one (a vocab-parallel loss for the cross entropy)
    or put a node between a consumer and the value it must read whole: refuse rather than run it unrewritten."""
    nodes = {n.name: n for n in gm.graph.nodes}
    missing = [f"{c} reading {v}" for c, v in layout.planned_reads() if (c, v) not in applied]
    kinds = {"attention": (layout.attention, _SDPA), "cross entropy": (layout.cross_entropy, _CROSS_ENTROPY)}
    for what, (names, keys) in kinds.items():
        missing += [f"{what} {n}" for n in names if n not in nodes or not key_in(nodes[n], keys)]
    missing += [f"reduction {n}" for n in layout.reduce if n not in nodes]
    missing += [f"size argument of {n}" for n in layout.local_shape if n not in nodes]
    missing += [f"size read {n}" for n in layout.global_sizes if n not in nodes]
    if missing:
        raise ValueError(
            f"context parallelism cannot be applied to this graph: {', '.join(sorted(missing)[:5])}"
            f"{' ...' if len(missing) > 5 else ''} no longer as the layout planned it (a rewrite before it, e.g. "
            f"tensor parallelism's, changed those nodes): plan without one of them"
        )


def _lookup(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def stage_of_inserted_nodes(rank_gm: fx.GraphModule, stage_of: dict[str, int], num_stages: int) -> dict[str, int]:
    """A pipeline plan's node -> stage map extended to the nodes the context-parallel rewrite inserted: each goes
    with its earliest consumer (so the rank's own tokens, not a gathered copy, cross a stage boundary), and what
    feeds the graph's output with the last stage."""
    out = dict(stage_of)
    for n in reversed(list(rank_gm.graph.nodes)):
        if n.op in ("get_attr", "output") or n.name in out:
            continue
        users = [
            num_stages - 1 if u.op == "output" else out[u.name] for u in n.users if u.op == "output" or u.name in out
        ]
        out[n.name] = min(users) if users else num_stages - 1
    return out
