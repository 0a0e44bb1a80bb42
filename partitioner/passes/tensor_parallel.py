"""tensor_parallel: apply a TensorParallelPlan -> one rank's fx.GraphModule.

Preserves: running the tp rank modules together (one per rank, collectives connected through `comm`) returns,
on every rank, exactly the flat outputs of the input graph, and the gradients of every parameter equal the
unsharded model's (sharded parameters: each rank holds its shard's gradient; replicated ones: the full
gradient on every rank). Numerics differ from the unsharded run only by the summation order of all-reduces.

What the applier does, table-driven like gpt-fast's `tp.py` (`_SHARD_MODULE`):

    rule               module after            weight shard   derived attributes   then
    column             nn.Linear               dim 0          out_features /= tp   -
    row                RowParallelLinear       dim 1          in_features /= tp    g (all-reduce), + bias
    vocab_embedding    VocabParallelEmbedding  dim 0          num_embeddings /= tp g (all-reduce)
    vocab_cross_entropy VocabParallelCrossEntropy  -          -                    (3 all-reduces inside)

A column-parallel weight whose last rows every rank holds whole (a multi-query q | k | v, "whole" in its spec) is
two products joined along the last dim: the q rows from f(x), the kept rows from x itself (`_kept_whole_column`).

plus: size arguments in `arg_rewrites` become size // tp (an int, or a new `floordiv` node when the size was
computed in the graph; -1 is left alone and infers the local size; in `whole_rewrites`, (size - whole) // tp +
whole), ints in `global_sizes` are multiplied by
tp, `f` (identity forward, all-reduce backward) is inserted in front of the rank-dependent consumers of each
replicated value needing a gradient, and sharded outputs are all-gathered (backward: each rank keeps its slice).

Collectives are `TPCollective` call_module nodes named `tp_<kind>_<node>`, so tests count them in the graph.
Communication goes through a `TPComm`: `GroupComm` uses torch's functional collectives on a process group;
`partitioner.runtime.tp_local` has an in-process one. The autograd rules are our own (`_CopyToTP`,
`_ReduceFromTP`, `_GatherFromTP`, Megatron's f / g / gather): torch 2.13's functional `all_reduce` differentiates
to another all-reduce, which would multiply the (replicated) gradient by tp if used as g.

Parameters: a sharded parameter is sliced from the full tensor (`shard_tensor`) when it is real, or fetched
from `source` (a `partitioner.runtime.materialize.WeightSource`, full tensor by original name, then sliced),
or left on meta with its local shape (deferred init fills it; `local_param_slices` says which indices of the
full tensor each local parameter holds). Replicated parameters are shared with `gm` unless
`share_replicated=False` (the in-process check needs private copies so ranks do not sum gradients).

Apply it to the whole graph before the pipeline split (`split_stages` then splits the rank graph): column/row
pairs, tied embedding/head and size producers are visible there; `stage_of_rank_nodes` extends a pipeline
node -> stage map to the inserted nodes.

Worked example (MLP x -> fc -> gelu -> proj, tp=2, rank 1): fc becomes Linear(64, 128) holding rows 128:256,
proj becomes RowParallelLinear(128, 64) holding columns 128:256; the graph is
`f(x) -> fc -> gelu -> proj -> tp_all_reduce_proj -> add(proj.bias)`.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from partitioner.plan.tensor_layout import TensorParallelPlan, shard_slices, shard_tensor, unshard_tensor
from partitioner.plan.tensor_ops import cross_entropy_call, op_name, weight_op
from partitioner.plan.tensor_rules import PARTIAL_REDUCTIONS

__all__ = [
    "GroupComm",
    "RowParallelLinear",
    "SequenceParallelColumns",
    "TPCollective",
    "TPComm",
    "VocabParallelCrossEntropy",
    "VocabParallelEmbedding",
    "count_collectives",
    "local_param_slices",
    "merge_shards",
    "shard_of",
    "stage_of_rank_nodes",
    "tensor_parallel_rank",
]


# ----------------------------------------------------------------------------------------------- communication
class TPComm(Protocol):
    """The collectives a rank graph needs; none of them is differentiable (autograd is ours, below)."""

    rank: int
    world_size: int

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor: ...

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor: ...

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Sum over the ranks, each keeping its 1/world_size chunk of `dim`."""
        ...


Pending = Callable[[], torch.Tensor]  # a started collective: calling it waits for it and returns its result


def start(comm: TPComm, kind: str, x: torch.Tensor, dim: int) -> Pending:
    """Start comm's `kind` ("all_gather" or "reduce_scatter") of `x` along `dim`; the returned callable waits.

    A comm with `start_<kind>` (GroupComm) runs the collective while the caller computes until it waits (what
    Megatron-LM's async tensor-parallel backward does); any other comm runs it now (the in-process ThreadComm)."""
    begin = getattr(comm, f"start_{kind}", None)
    if begin is not None:
        return begin(x, dim)
    result = getattr(comm, kind)(x, dim)
    return lambda: result


class GroupComm:
    """TPComm over a torch.distributed process group, with torch's functional collectives."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)

    def __deepcopy__(self, memo: dict) -> GroupComm:  # process groups are shared, never copied
        return self

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        import torch.distributed._functional_collectives as funcol

        return _wait(funcol.all_reduce(x.contiguous(), op, self.group))

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self.start_all_gather(x, dim)()

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self.start_reduce_scatter(x, dim)()

    def start_all_gather(self, x: torch.Tensor, dim: int) -> Pending:
        """all_gather, waited for only when the result is asked for. Gathered along dim 0 (the moved `dim`):
        torch's functional all-gather along another dim waits at once to reorder its chunks."""
        import torch.distributed._functional_collectives as funcol

        # all_gather_single where torch has it (the *_tensor names warn that they are deprecated from 2.13)
        gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
        gathered = gather(x.movedim(dim, 0).contiguous(), 0, self.group)
        return lambda: _wait(gathered).movedim(0, dim).contiguous()

    def start_reduce_scatter(self, x: torch.Tensor, dim: int) -> Pending:
        """reduce_scatter, waited for only when the result is asked for."""
        import torch.distributed._functional_collectives as funcol

        scatter = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor
        pending = scatter(x.contiguous(), "sum", dim, self.group)
        return lambda: _wait(pending)


def _check_splits(x: torch.Tensor, dim: int, ranks: int) -> None:
    """Sequence parallelism splits a dim the plan checked at its example's size; another size must split too."""
    if x.shape[dim] % ranks:
        raise ValueError(
            f"sequence parallelism splits dim {dim} of a {list(x.shape)} activation over {ranks} tensor-parallel "
            f"ranks, which does not divide {x.shape[dim]}: use a sequence length (or, where that dim is the batch, a "
            f"microbatch size) divisible by {ranks}, or plan with sequence_parallel=False"
        )


def own_chunk(x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
    """This rank's 1/world_size of `x` along `dim` (rank order; what a reduce-scatter leaves it)."""
    return x.chunk(comm.world_size, dim)[comm.rank].contiguous()


def _wait(t: torch.Tensor) -> torch.Tensor:
    return t.wait() if hasattr(t, "wait") else t


class _CopyToTP(torch.autograd.Function):
    """Megatron's f: identity forward; backward all-reduces the partial input gradients of the ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm) -> torch.Tensor:
        ctx.comm = comm
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return ctx.comm.all_reduce(grad, "sum"), None


class _ReduceFromTP(torch.autograd.Function):
    """Megatron's g: all-reduce forward (partial -> replicated); backward passes the replicated grad through."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, op: str) -> torch.Tensor:
        return comm.all_reduce(x, op)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return grad, None, None


class _GatherFromTP(torch.autograd.Function):
    """All-gather along `dim` forward; backward keeps this rank's slice of the (replicated) gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return own_chunk(grad, ctx.comm, ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    """Sequence parallelism's g: partial -> summed and split along `dim`; backward all-gathers the split gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        _check_splits(x, dim, comm.world_size)
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.comm.all_gather(grad, ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    """Sequence parallelism's f: split -> whole along `dim` for rank-dependent consumers, whose input gradients are
    partial over the ranks: backward reduce-scatters them."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.comm.reduce_scatter(grad, ctx.dim), None, None


class _ScatterToSequence(torch.autograd.Function):
    """A replicated value read by split consumers: each rank takes its chunk of `dim`; backward all-gathers the
    chunks' gradients, so the value's gradient is whole (and equal) on every rank."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, dim: int) -> torch.Tensor:
        ctx.comm, ctx.dim = comm, dim
        _check_splits(x, dim, comm.world_size)
        return own_chunk(x, comm, dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.comm.all_gather(grad, ctx.dim), None, None


_KINDS = {
    "copy": lambda x, comm, dim: _CopyToTP.apply(x, comm),
    "reduce": lambda x, comm, dim: _ReduceFromTP.apply(x, comm, "sum"),
    # the mean of the ranks' means of equally many elements (a mean over the sharded dim); gloo has no "avg"
    "reduce_mean": lambda x, comm, dim: _ReduceFromTP.apply(x, comm, "sum") / comm.world_size,
    "gather": _GatherFromTP.apply,
    "reduce_scatter": _ReduceScatterToSequence.apply,
    "gather_sequence": _GatherFromSequence.apply,
    "scatter": _ScatterToSequence.apply,
}


class _ColumnsFromSequence(torch.autograd.Function):
    """Column-parallel matmuls of a split value, Megatron-LM's way: all-gather the shard, y_k = x W_k^T + b_k; save
    only the shard, gather it again in the backward for the weight gradients, reduce-scatter the input gradient.

    The backward overlaps both collectives with compute as Megatron-LM's LinearWithGradAccumulationAndAsync-
    Communication does: the shard's gather runs while the input gradients (g_k W_k) are computed, the input
    gradient's reduce-scatter while the weight gradients (g_k^T x) are (`start`; plan.tensor_cost prices it so)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, comm: TPComm, dim: int, *weights: torch.Tensor | None) -> tuple:
        ctx.comm, ctx.dim = comm, dim
        ctx.has_bias = [b is not None for b in weights[1::2]]
        ctx.save_for_backward(x, *weights[0::2])
        full = comm.all_gather(x, dim)
        return tuple(F.linear(full, w, b) for w, b in zip(weights[0::2], weights[1::2]))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple:
        x, *ws = ctx.saved_tensors
        gather = start(ctx.comm, "all_gather", x, ctx.dim)  # in flight during the input gradients
        grad_full = None
        for g, w in zip(grads, ws):
            if g is not None:
                grad_in = g @ w
                grad_full = grad_in if grad_full is None else grad_full + grad_in
        full = gather()
        scatter = start(ctx.comm, "reduce_scatter", grad_full, ctx.dim) if grad_full is not None else None
        rows, out = full.reshape(-1, full.shape[-1]), []  # the weight gradients, while the reduce-scatter runs
        for g, has_bias in zip(grads, ctx.has_bias):
            if g is None:
                out += [None, None]
                continue
            g_rows = g.reshape(-1, g.shape[-1])
            out += [g_rows.t() @ rows, g_rows.sum(0) if has_bias else None]
        return (scatter() if scatter is not None else None, None, None, *out)


class SequenceParallelColumns(nn.Module):
    """The column-parallel Linears reading one split value, as one graph node: forward(shard, w_0, b_0, w_1, ...)
    -> (y_0, y_1, ...), the weights read by get_attr under their own names (`_ColumnsFromSequence`)."""

    def __init__(self, comm: TPComm, dim: int, count: int):
        super().__init__()
        self.comm, self.dim, self.count = comm, dim, count

    def forward(self, x: torch.Tensor, *weights: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        return _ColumnsFromSequence.apply(x, self.comm, self.dim, *weights)

    def extra_repr(self) -> str:
        return f"{self.count} linears, dim {self.dim}, rank={self.comm.rank}/{self.comm.world_size}"


class TPCollective(nn.Module):
    """One collective of the plan as a graph node: "copy" (f), "reduce" (g), "gather" (backward: own slice), and
    sequence parallelism's "reduce_scatter", "gather_sequence" (backward: reduce-scatter) and "scatter"."""

    def __init__(self, kind: str, comm: TPComm, dim: int = -1):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown collective kind {kind!r}")
        self.kind, self.comm, self.dim = kind, comm, dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "scatter" and not x.is_floating_point():  # a mask: no gradient to gather back
            _check_splits(x, self.dim, self.comm.world_size)
            return own_chunk(x, self.comm, self.dim)
        return _KINDS[self.kind](x, self.comm, self.dim)

    def extra_repr(self) -> str:
        return f"{self.kind}, rank={self.comm.rank}/{self.comm.world_size}"


# ----------------------------------------------------------------------------------------------- sharded modules
class RowParallelLinear(nn.Linear):
    """x (…, in/tp) -> partial (…, out) = x @ W_shard^T. The bias (full, replicated) is added after the all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + num_embeddings) of a table; other ids give 0 (partial sum over ranks)."""

    vocab_start: int

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_embedding(ids, self.weight, self.vocab_start, self.padding_idx)


def vocab_parallel_embedding(
    ids: torch.Tensor, weight: torch.Tensor, vocab_start: int, padding_idx: int | None = None
) -> torch.Tensor:
    """The lookup of `ids` in rows [vocab_start, vocab_start + len(weight)) of a table; other ids give 0, so the
    sum over the ranks is the whole lookup. padding_idx: a local row that gets no gradient."""
    outside = (ids < vocab_start) | (ids >= vocab_start + weight.shape[0])  # (B, T)
    local = (ids - vocab_start).masked_fill(outside, 0)
    out = F.embedding(local, weight, padding_idx)  # (B, T, d)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


class VocabParallelCrossEntropy(nn.Module):
    """cross_entropy(logits (N, V/tp, …), target (N, …)) with the classes sharded (Megatron's vocab-parallel CE).

    loss_i = log(sum_r sum_v exp(z_iv - m_i)) - (z_i,t_i - m_i), m_i the global max (all-reduce max, no grad:
    it cancels), the two sums all-reduced with g (identity backward: each rank's share of the grad is local).
    """

    def __init__(
        self,
        comm: TPComm,
        vocab_start: int,
        ignore_index: int = -100,
        reduction: str = "mean",
        vocab_size: int | None = None,
    ):
        super().__init__()
        self.comm, self.vocab_start, self.ignore_index, self.reduction = comm, vocab_start, ignore_index, reduction
        self.vocab_size = vocab_size  # classes past it are vocabulary padding: masked out, they never win

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        z = logits.movedim(1, -1).float()  # (…, V/tp)
        if self.vocab_size is not None and self.vocab_start + z.shape[-1] > self.vocab_size:
            columns = torch.arange(z.shape[-1], device=z.device) + self.vocab_start
            z = z.masked_fill(columns >= self.vocab_size, float("-inf"))
        m = self.comm.all_reduce(z.detach().amax(-1), "max")  # (…,)
        z = z - m.unsqueeze(-1)
        sum_exp = _ReduceFromTP.apply(z.exp().sum(-1), self.comm, "sum")  # (…,)
        local_t = target - self.vocab_start
        mine = (local_t >= 0) & (local_t < z.shape[-1])
        picked = z.gather(-1, local_t.clamp(0, z.shape[-1] - 1).unsqueeze(-1)).squeeze(-1) * mine
        target_logit = _ReduceFromTP.apply(picked, self.comm, "sum")
        loss = (sum_exp.log() - target_logit).masked_fill(target == self.ignore_index, 0.0)
        if self.reduction == "none":
            return loss.to(logits.dtype)
        if self.reduction == "sum":
            return loss.sum().to(logits.dtype)
        return (loss.sum() / (target != self.ignore_index).sum()).to(logits.dtype)


# ----------------------------------------------------------------------------------------------- parameters
def _local_tensor(full: torch.Tensor, spec: dict, rank: int, tp: int, name: str, source: Any) -> torch.Tensor:
    dim, parts, pad, whole = spec["dim"], spec["parts"], spec.get("pad", 0), spec.get("whole", 0)
    if full.is_meta and source is not None:
        full = source.tensors([name], torch.device("cpu"))[name]
    if full.is_meta:
        shape = list(full.shape)
        shape[dim] = (shape[dim] - whole + pad) // tp + whole
        return torch.empty(shape, dtype=full.dtype, device="meta")
    return shard_tensor(full.detach(), dim, parts, rank, tp, pad, whole).clone()


def local_param_slices(plan: TensorParallelPlan, gm: fx.GraphModule, rank: int) -> dict[str, list[tuple]]:
    """Per sharded parameter name: the index tuples into the full tensor this rank holds, in local order.

    The contract for deferred init / checkpoint loading: local = cat([full[s] for s in slices], dim), followed by
    zero rows up to the local size where the plan pads a vocabulary (the last rank's padding rows).
    """
    out = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        spec = plan.param_shard.get(name, {"dim": None})
        if spec["dim"] is not None:
            out[name] = shard_slices(
                tuple(p.shape), spec["dim"], spec["parts"], rank, plan.tp, spec.get("pad", 0), spec.get("whole", 0)
            )
    return out


def merge_shards(plan: TensorParallelPlan, shards: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Full tensors by original name from every tp rank's tensors (``shards[r]``: rank r's, original names).

    The inverse of the slicing in ``local_param_slices``: sharded entries are joined with ``unshard_tensor``
    (fused QKV parts interleave back), replicated ones are taken from rank 0. Every rank must hold the same
    names (a pipeline stage's tp ranks do).
    """
    if len(shards) != plan.tp:
        raise ValueError(f"merging tensor-parallel shards needs all {plan.tp} ranks' tensors, got {len(shards)}")
    out = {}
    for name, t in shards[0].items():
        spec = plan.param_shard.get(name, {"dim": None})
        if spec["dim"] is None:
            out[name] = t
        else:
            out[name] = unshard_tensor(
                [s[name] for s in shards], spec["dim"], spec["parts"], spec.get("pad", 0), spec.get("whole", 0)
            )
    return out


def shard_of(plan: TensorParallelPlan, name: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    """Rank `rank`'s local value of parameter `name` given its full value (itself when replicated)."""
    spec = plan.param_shard.get(name, {"dim": None})
    if spec["dim"] is None:
        return full
    return shard_tensor(full, spec["dim"], spec["parts"], rank, plan.tp, spec.get("pad", 0), spec.get("whole", 0))


class _Params:
    """Local parameters, one per (original tensor, spec): tied weights stay one Parameter on the rank."""

    def __init__(self, plan: TensorParallelPlan, rank: int, source: Any, share_replicated: bool):
        self.plan, self.rank, self.source, self.share = plan, rank, source, share_replicated
        self.cache: dict[int, nn.Parameter] = {}
        self.memo: dict[int, Any] = {}  # one deepcopy memo per rank: tied replicated tensors stay tied

    def get(self, name: str, full: torch.Tensor) -> nn.Parameter:
        if id(full) not in self.cache:
            spec = self.plan.param_shard[name]
            if spec["dim"] is None:  # replicated (a row-parallel bias)
                self.cache[id(full)] = full if self.share else copy.deepcopy(full, self.memo)
                return self.cache[id(full)]
            local = _local_tensor(full, spec, self.rank, self.plan.tp, name, self.source)
            self.cache[id(full)] = nn.Parameter(local, requires_grad=full.requires_grad)
        return self.cache[id(full)]


def _shard_module(mod: nn.Module, rule: str, target: str, params: _Params, tp: int, rank: int) -> nn.Module:
    """The rank's module for a sharded call_module node (the table in the module docstring)."""
    weight = params.get(f"{target}.weight", mod.weight)
    with torch.device("meta"):
        if rule == "column":
            new = nn.Linear(mod.in_features, weight.shape[0], bias=mod.bias is not None)
        elif rule == "row":
            new = RowParallelLinear(weight.shape[1], mod.out_features, bias=mod.bias is not None)
        else:
            new = VocabParallelEmbedding(weight.shape[0], mod.embedding_dim)
    spec = params.plan.param_shard[f"{target}.weight"]
    rows, pad, whole = mod.weight.shape[0], spec.get("pad", 0), spec.get("whole", 0)
    local_rows = rows if rule == "row" else (rows - whole + pad) // tp + whole
    assert weight.shape[0] == local_rows, (rule, target)
    new.weight = weight
    if rule == "column" and mod.bias is not None:
        new.bias = params.get(f"{target}.bias", mod.bias)
    elif rule == "row" and mod.bias is not None:
        new.bias = params.get(f"{target}.bias", mod.bias)  # replicated; the graph adds it after the all-reduce
    elif rule == "vocab_embedding":
        new.vocab_start = rank * weight.shape[0]
        pad = mod.padding_idx
        inside = pad is not None and new.vocab_start <= pad < new.vocab_start + weight.shape[0]
        new.padding_idx = pad - new.vocab_start if inside else None
    new.train(mod.training)
    return new


# ----------------------------------------------------------------------------------------------- the applier
def _get_path(container: Any, path: list[Any]) -> Any:
    for p in path:
        container = container[p]
    return container


def _set_path(args: tuple, kwargs: dict, path: list[Any], value: Any) -> tuple[tuple, dict]:
    def put(c: Any, rest: list[Any]) -> Any:
        if not rest:
            return value
        if isinstance(c, dict):
            return {**c, rest[0]: put(c[rest[0]], rest[1:])}
        items = list(c)
        items[rest[0]] = put(items[rest[0]], rest[1:])
        return type(c)(items) if isinstance(c, tuple) else items

    if path[0] == "args":
        return put(args, path[1:]), kwargs
    return args, put(kwargs, path[1:])


def tensor_parallel_rank(
    gm: fx.GraphModule,
    plan: TensorParallelPlan,
    rank: int,
    comm: TPComm,
    *,
    source: Any = None,
    share_replicated: bool = True,
) -> fx.GraphModule:
    """Rank `rank`'s GraphModule of `gm` under `plan` (see the module docstring); `gm` is not modified."""
    tp = plan.tp
    if comm.world_size != tp or comm.rank != rank:
        raise ValueError(f"comm is rank {comm.rank} of {comm.world_size}; the plan needs rank {rank} of tp={tp}")
    params = _Params(plan, rank, source, share_replicated)
    root: dict[str, Any] = {}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    # value -> [(node standing for it, the consumers that read that node instead)]: f, and sequence parallelism's
    # gathers and scatters, each in front of the consumers it feeds.
    feeds: dict[fx.Node, list[tuple[fx.Node, set[str]]]] = {}
    redirects: dict[str, list[dict[str, Any]]] = {}
    for c in plan.collectives:
        if "users" in c and (c["phase"] == "forward" or c["kind"] == "all_reduce"):
            redirects.setdefault(c["after"], []).append(c)
    gathers = {c["after"]: c["dim"] for c in plan.collectives if c["kind"] == "all_gather" and "users" not in c
               and c["phase"] == "forward"}  # fmt: skip
    gather_pads = {c["after"]: c["pad"] for c in plan.collectives if c["kind"] == "all_gather" and c.get("pad")}
    padded = _padded_vocabularies(gm, plan)
    reduce_scatters = {c["after"]: c["dim"] for c in plan.collectives if c["kind"] == "reduce_scatter"
                       and c["phase"] == "forward"}  # fmt: skip
    param_grads = {c["after"]: c["params"] for c in plan.collectives if "params" in c}
    # partial values all-reduced forward (g) after the node: row-parallel outputs and lookups, or the end of a chain of
    # ops linear in a partial value (those before it are not in here); not the vocab-parallel loss's own reductions
    reduced = {c["after"] for c in plan.collectives if c["kind"] == "all_reduce" and c["phase"] == "forward"
               and "users" not in c and plan.module_rules.get(c["after"]) != "vocab_cross_entropy"}  # fmt: skip
    # summed once per step by the runtime (TensorParallelPlan.step_summed_params), not per call in the graph
    summed_per_step = {c["after"] for c in plan.collectives if "params" in c and c["phase"] == "step"}
    global_sizes = set(plan.global_sizes)

    def collective(kind: str, after: fx.Node, x: fx.Node, dim: int = -1, suffix: str = "") -> fx.Node:
        what = {"copy": "all_reduce", "reduce": "all_reduce", "reduce_mean": "all_reduce", "gather": "all_gather"}.get(
            kind, kind
        )
        target = f"tp_{what}_{after.name}{suffix}"
        root[target] = TPCollective(kind, comm, dim)
        node = graph.create_node("call_module", target, (x,), {}, name=target)
        node.meta["tp_anchor"] = after.name
        return node

    columns: dict[str, tuple[fx.Node, int]] = {}  # a grouped Linear node -> (its group, its output's index)

    def column_group(value: fx.Node, c: dict[str, Any]) -> fx.Node:
        """The SequenceParallelColumns call computing every Linear of `c["users"]` from `value`'s shard."""
        weights: list[fx.Node | None] = []
        for name in c["users"]:
            target = str(by_name[name].target)
            mod = gm.get_submodule(target)
            for what in ("weight", "bias"):
                full = getattr(mod, what)
                if full is None:
                    weights.append(None)
                    continue
                root[f"{target}.{what}"] = params.get(f"{target}.{what}", full)
                attr = graph.create_node("get_attr", f"{target}.{what}", (), {}, name=f"tp_{name}_{what}")
                weights.append(attr)
        target = f"tp_all_gather_{value.name}_columns"
        root[target] = SequenceParallelColumns(comm, c["dim"], len(c["users"]))
        node = graph.create_node("call_module", target, (env[value], *weights), {}, name=target)
        node.meta["tp_anchor"] = value.name
        node.meta["tp_feeds"] = True
        return node

    by_name = {n.name: n for n in gm.graph.nodes}

    def summed_param(target: str, value: nn.Parameter, anchor: fx.Node) -> fx.Node:
        """A parameter read by a sequence-split op, its gradient summed over the ranks (each saw its tokens): after the
        step's backward by the runtime (`sum_step_gradients`), or, for a plan saved before, per call in the graph."""
        root[target] = value
        attr = graph.create_node("get_attr", target, (), {}, name=f"tp_param_{target.replace('.', '_')}")
        if anchor.name in summed_per_step:
            return attr
        return collective("copy", anchor, attr, suffix=f"_{target.rsplit('.', 1)[-1]}_sum")

    def build_feed(n: fx.Node, c: dict[str, Any]) -> None:
        """The collective `c` in front of its consumers, made where the first of them is: after every in-place write
        to `n` before it (DeepSeek's key, `new_empty` then `copy_` into its slices, read as each rank's heads), which a
        copy made right after `n` would miss."""
        if c["kind"] == "all_reduce":  # f
            node = collective("copy", n, env[n], suffix="_grad")
        elif c["kind"] == "scatter" and c.get("parts", 1) > 1:  # each rank's slice of every block of the dim
            blocks = graph.create_node("call_function", torch.unflatten, (env[n], c["dim"], (c["parts"], -1)),
                                       {}, name=f"tp_blocks_{n.name}_{c['dim']}")  # fmt: skip
            blocks.meta["tp_anchor"] = n.name
            node = collective("scatter", n, blocks, c["dim"] + 1, suffix=f"_{c['dim']}")
            node = graph.create_node("call_function", torch.flatten, (node, c["dim"], c["dim"] + 1), {},
                                     name=f"tp_unblocks_{n.name}_{c['dim']}")  # fmt: skip
            node.meta["tp_anchor"] = n.name
        elif c["kind"] == "scatter" and c.get("repeat", 1) > 1:  # kv heads several ranks share (GQA)
            repeated = graph.create_node("call_function", torch.repeat_interleave, (env[n], c["repeat"]),
                                         {"dim": c["dim"]}, name=f"tp_repeat_{n.name}_{c['dim']}")  # fmt: skip
            repeated.meta["tp_anchor"] = n.name
            node = collective("scatter", n, repeated, c["dim"], suffix=f"_{c['dim']}")
        elif c["kind"] == "scatter":
            node = collective("scatter", n, env[n], c["dim"], suffix=f"_{c['dim']}")
        elif c["grad"] == "reduce_scatter":
            node = collective("gather_sequence", n, env[n], c["dim"], suffix="_for_sharded")
        else:
            node = collective("gather", n, env[n], c["dim"], suffix="_for_replicated")
        node.meta["tp_feeds"] = True
        feeds.setdefault(n, []).append((node, set(c["users"])))

    # value -> the collectives of the plan in front of its consumers, not made yet (build_feed: at the first of them)
    pending: dict[fx.Node, list[dict[str, Any]]] = {}
    for n in gm.graph.nodes:
        for x in n.all_input_nodes:  # the collectives in front of this consumer, made here (build_feed)
            for c in [c for c in pending.get(x, ()) if n.name in c["users"]]:
                pending[x].remove(c)
                build_feed(x, c)

        def lookup(x: fx.Node, user: fx.Node = n) -> fx.Node:
            for node, users in feeds.get(x, ()):
                if user.name in users:
                    return node
            return env[x]

        if n.op == "output":
            outs = []
            for x in n.args[0]:
                if x.name not in gathers:
                    outs.append(lookup(x))
                    continue
                out = collective("gather", x, env[x], gathers[x.name])
                if x.name in gather_pads:  # drop the vocabulary padding: the model's own logits
                    dim, size = gathers[x.name], x.meta["val"].shape[gathers[x.name]]
                    out = graph.create_node("call_function", torch.narrow, (out, dim, 0, size), {},
                                            name=f"tp_unpad_{x.name}")  # fmt: skip
                    out.meta["tp_anchor"] = x.name
                outs.append(out)
            graph.output(tuple(outs))
            continue

        # Phase 1: copy the node, with size arguments made local.
        args, kwargs = fx.map_arg((n.args, n.kwargs), lookup)
        for path in plan.arg_rewrites.get(n.name, []):
            value = _get_path(args if path[0] == "args" else kwargs, path[1:])
            if isinstance(value, fx.Node):
                local = graph.create_node(
                    "call_function", operator.floordiv, (value, tp), {}, name=f"tp_local_size_{n.name}"
                )
                local.meta["tp_anchor"] = n.name
            elif value == -1:
                continue
            elif value % tp and value in padded:  # a padded vocabulary's local size
                local = padded[value] // tp
            else:
                if value % tp:
                    raise ValueError(f"{n.name}: size {value} at {path} is not divisible by tp={tp}")
                local = value // tp
            args, kwargs = _set_path(args, kwargs, path, local)
        for rewrite in plan.whole_rewrites.get(n.name, []):  # along a dim whose last `whole` every rank holds whole
            path, whole = rewrite["path"], rewrite["whole"]
            value = _get_path(args if path[0] == "args" else kwargs, path[1:])
            args, kwargs = _set_path(args, kwargs, path, _kept_whole_size(graph, n, value, whole, tp))
        rule = plan.module_rules.get(n.name)
        if rule == "vocab_cross_entropy":
            target = f"tp_vocab_cross_entropy_{n.name}"
            call = cross_entropy_call(n)
            classes = call.logits.meta["val"].shape[1]
            local_classes = -(-classes // tp)  # a vocabulary tp does not divide is padded (plan.tensor)
            root[target] = VocabParallelCrossEntropy(
                comm, rank * local_classes, call.ignore_index, call.reduction, vocab_size=classes
            )
            logits, labels = (lookup(v) if isinstance(v, fx.Node) else v for v in (call.logits, call.target))
            new = graph.create_node("call_module", target, (logits, labels), {}, name=n.name)
        elif rule == "row" and (op := weight_op(gm, n)) is not None and op.kind == "grouped":
            new = graph.create_node("call_function", n.target, args, kwargs, name=n.name)  # on the rank's experts' rows
        elif rule in ("row", "vocab_embedding") and n.op == "call_function":
            new = graph.create_node("call_function", *_weight_op_call(gm, n, rule, lookup, env, rank, tp), name=n.name)
        elif rule == "column" and (whole := _kept_whole_rows(gm, plan, n)):
            new = _kept_whole_column(gm, graph, root, params, n, whole, feeds, env, tp, rank)
        elif n.name in columns:  # computed by its group: this node reads its output
            group, k = columns[n.name]
            new = graph.create_node("call_function", operator.getitem, (group, k), {}, name=n.name)
        elif n.name in param_grads and rule is None:  # a norm on split tokens: its weights' gradients are summed
            mod = gm.get_submodule(str(n.target))
            weights = {p: summed_param(f"{n.target}.{p}", w, n) for p, w in mod.named_parameters()}
            fn, fargs = _functional_norm(mod, args[0], weights)
            new = graph.create_node("call_function", fn, fargs, {}, name=n.name)
        else:
            new = graph.create_node(n.op, n.target, args, kwargs, name=n.name)
        new.meta = dict(n.meta)
        new.meta["tp_layout"] = plan.node_layout.get(n.name, "replicated")
        env[n] = new

        # Phase 2: the module this node calls, and what follows it.
        if n.op == "call_module" and new.op == "call_module" and rule != "vocab_cross_entropy":
            mod = gm.get_submodule(str(n.target))
            if rule in ("column", "row", "vocab_embedding"):
                root[str(n.target)] = _shard_module(mod, rule, str(n.target), params, tp, rank)
            elif share_replicated:
                root[str(n.target)] = mod
            else:
                root[str(n.target)] = copy.deepcopy(mod, params.memo)
            if rule in ("row", "vocab_embedding"):
                if n.name in reduce_scatters:
                    env[n] = collective("reduce_scatter", n, new, reduce_scatters[n.name])
                elif n.name in reduced:  # else its reader keeps it partial: reduced where that chain ends
                    env[n] = collective("reduce", n, new)
                if rule == "row" and mod.bias is not None:
                    bias_target = f"{n.target}.bias"
                    root[bias_target] = root[str(n.target)].bias
                    if n.name in param_grads:
                        bias = summed_param(bias_target, root[bias_target], n)
                    else:
                        bias = graph.create_node("get_attr", bias_target, (), {}, name=f"tp_bias_attr_{n.name}")
                    env[n] = graph.create_node(
                        "call_function", operator.add, (env[n], bias), {}, name=f"tp_bias_{n.name}"
                    )
                    env[n].meta["tp_anchor"] = n.name
        elif rule in PARTIAL_REDUCTIONS.values():  # a mean / sum over the sharded dim: each rank's part, then g
            env[n] = collective("reduce_mean" if rule == PARTIAL_REDUCTIONS["mean"] else "reduce", n, new)
        elif rule in ("row", "vocab_embedding") and n.op == "call_function":  # a functional / ATen weight op
            op = weight_op(gm, n)
            if n.name in reduce_scatters:
                env[n] = collective("reduce_scatter", n, new, reduce_scatters[n.name])
            elif n.name in reduced:
                env[n] = collective("reduce", n, new)
            if op is not None and op.bias is not None:
                target = str(op.bias.target)
                bias = summed_param(target, root[target], n) if n.name in param_grads else env[op.bias]
                add = torch.ops.aten.add.Tensor if isinstance(n.target, torch._ops.OpOverload) else operator.add
                env[n] = graph.create_node("call_function", add, (env[n], bias), {}, name=f"tp_bias_{n.name}")
                env[n].meta["tp_anchor"] = n.name
        elif rule is None and n.name in reduced:  # the end of a chain of ops linear in a partial value
            env[n] = collective("reduce", n, new)
        elif n.name in param_grads and n.op == "call_module" and new.op == "call_function" and not share_replicated:
            for p, w in gm.get_submodule(str(n.target)).named_parameters():  # private copies (the in-process check)
                root[f"{n.target}.{p}"] = copy.deepcopy(w, params.memo)
        elif n.op == "get_attr":
            value = _get_path_attr(gm, str(n.target))
            if isinstance(value, nn.Parameter) and str(n.target) in plan.param_shard:
                value = params.get(str(n.target), value)  # the rank's shard, or the replicated parameter
            elif isinstance(value, nn.Parameter) and not share_replicated:
                value = copy.deepcopy(value, params.memo)
            root[str(n.target)] = value
        if n.name in global_sizes:
            env[n] = graph.create_node("call_function", operator.mul, (new, tp), {}, name=f"tp_global_size_{n.name}")
            env[n].meta["tp_anchor"] = n.name
        if n.name in plan.global_shapes:
            env[n] = graph.create_node(
                "call_function", global_shape, (new, plan.global_shapes[n.name], tp), {},
                name=f"tp_global_shape_{n.name}",
            )  # fmt: skip
            env[n].meta["tp_anchor"] = n.name
        for c in redirects.get(n.name, []):
            if c.get("columns"):  # column-parallel matmuls reading a split value: one group, its gather inside
                group = column_group(n, c)
                columns.update({u: (group, k) for k, u in enumerate(c["users"])})
                continue
            pending.setdefault(n, []).append(c)

    names = {m.name for m in graph.nodes}
    lost = [n.name for n in gm.graph.nodes if n.op != "output" and n.name not in names]
    if lost:
        raise RuntimeError(f"node names changed in the rank graph (names starting with tp_ are reserved): {lost[:5]}")
    out = fx.GraphModule(root, graph, class_name=f"TPRank{rank}")
    out.meta["tp_plan"] = plan
    out.meta["tp_rank"] = rank
    return out


def _kept_whole_size(graph: fx.Graph, n: fx.Node, value: Any, whole: int, tp: int) -> Any:
    """A global size or index v along a dim whose last `whole` elements every rank holds whole -> (v - whole) // tp +
    whole (an int, or nodes computing it when v is computed in the graph)."""
    if isinstance(value, fx.Node):
        head = graph.create_node("call_function", operator.sub, (value, whole), {}, name=f"tp_head_size_{n.name}")
        local = graph.create_node("call_function", operator.floordiv, (head, tp), {}, name=f"tp_local_head_{n.name}")
        out = graph.create_node("call_function", operator.add, (local, whole), {}, name=f"tp_local_size_{n.name}")
        for node in (head, local, out):
            node.meta["tp_anchor"] = n.name
        return out
    if (value - whole) % tp:
        raise ValueError(f"{n.name}: {value - whole} of size {value} before the {whole} kept whole is not divisible "
                         f"by tp={tp}")  # fmt: skip
    return (value - whole) // tp + whole


def _kept_whole_rows(gm: fx.GraphModule, plan: TensorParallelPlan, n: fx.Node) -> int:
    """How many of a column-parallel node's output rows every rank computes whole (param_shard's "whole"), or 0."""
    op = weight_op(gm, n)
    name = op.param if op is not None else f"{n.target}.weight"
    return int(plan.param_shard.get(name, {}).get("whole", 0))


def _kept_whole_column(
    gm: fx.GraphModule,
    graph: fx.Graph,
    root: dict[str, Any],
    params: _Params,
    n: fx.Node,
    whole: int,
    feeds: dict[fx.Node, list[tuple[fx.Node, set[str]]]],
    env: dict[fx.Node, fx.Node],
    tp: int,
    rank: int,
) -> fx.Node:
    """A column-parallel projection whose last `whole` output rows every rank computes (a multi-query q | k | v): the
    rank's q rows from f(x), the kept rows from x itself, joined along the last dim.

    Why two products, not one over the rank's rows: the kept rows' outputs are the same on every rank, and so are their
    gradients (their readers put f in front of the rank-dependent ones). Read through f, each rank's x gradient would
    hold that part once, and f's all-reduce would sum it tp times; read from x directly, it enters once per rank, as
    any replicated computation's does, and the weight rows' gradients are the full ones on every rank. Under sequence
    parallelism x is split along the tokens: the q rows read it through the all-gather whose backward reduce-scatters
    (as any column-parallel reader), the kept rows through the one whose backward keeps the rank's own slice."""
    op = weight_op(gm, n)
    aten = isinstance(n.target, torch._ops.OpOverload)
    narrow = torch.ops.aten.narrow.default if aten else torch.narrow

    def add(target: Any, args: tuple, kwargs: dict, name: str, op_kind: str = "call_function") -> fx.Node:
        node = graph.create_node(op_kind, target, args, kwargs, name=f"{name}_{n.name}")
        node.meta["tp_anchor"] = n.name
        return node

    x = op.x if op is not None else n.args[0]

    def fed(value: fx.Node, *kinds: str) -> fx.Node:
        """`value` as `n` reads it through the collective in front of it (f, a gather; one of `kinds` if given), or
        itself."""
        for node, users in feeds.get(value, ()):
            if n.name in users and (not kinds or root[str(node.target)].kind in kinds):
                return node
        return env[value]

    if op is None:  # an nn.Linear module: its rank's rows as a module (state dict names), called as F.linear twice
        target = str(n.target)
        mod = gm.get_submodule(target)
        root[target] = _shard_module(mod, "column", target, params, tp, rank)
        root[f"{target}.weight"] = root[target].weight
        if mod.bias is not None:
            root[f"{target}.bias"] = root[target].bias
        weight = add(f"{target}.weight", (), {}, "tp_weight", "get_attr")
        bias = add(f"{target}.bias", (), {}, "tp_bias", "get_attr") if mod.bias is not None else None
        rows = root[target].weight.shape[0]
    else:
        rows = params.get(op.param, gm.get_parameter(op.param)).shape[op.out_dim]
    pieces = []
    halves = ((0, rows - whole, fed(x, "copy", "gather_sequence")), (rows - whole, whole, fed(x, "gather")))
    for i, (start, length, xin) in enumerate(halves):
        if op is None:
            w = add(narrow, (weight, 0, start, length), {}, f"tp_rows{i}")
            b = add(narrow, (bias, 0, start, length), {}, f"tp_bias{i}") if bias is not None else None
            pieces.append(add(F.linear, (xin, w, b), {}, f"tp_part{i}"))
            continue
        w = add(narrow, (env[op.weight], op.out_dim, start, length), {}, f"tp_rows{i}")
        swap = {op.weight: w, x: xin}
        if op.via is not None:  # x @ W.T: the transpose of those rows
            via_args = fx.map_arg(op.via.args, lambda a, w=w: w if a is op.weight else env[a])
            swap[op.via] = add(op.via.target, via_args, dict(op.via.kwargs), f"tp_via{i}")
        if op.bias is not None:
            swap[op.bias] = add(narrow, (env[op.bias], 0, start, length), {}, f"tp_bias{i}")
        args, kwargs = fx.map_arg((n.args, n.kwargs), lambda a, s=swap: s[a] if a in s else fed(a))
        pieces.append(add(n.target, args, kwargs, f"tp_part{i}"))
    cat = torch.ops.aten.cat.default if aten else torch.cat
    return graph.create_node("call_function", cat, (pieces, -1), {}, name=n.name)


def _padded_vocabularies(gm: fx.GraphModule, plan: TensorParallelPlan) -> dict[int, int]:
    """Vocabulary size -> padded size, for the parameters the plan pads (a size literal equal to one of these that
    tp does not divide can only be that vocabulary: plan.tensor shards no other dim tp does not divide)."""
    out = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        spec = plan.param_shard.get(name, {})
        if spec.get("pad"):
            size = p.shape[spec["dim"]]
            out[size] = size + spec["pad"]
    return out


def _weight_op_call(
    gm: fx.GraphModule, n: fx.Node, rule: str, lookup: Any, env: dict[fx.Node, fx.Node], rank: int, tp: int
) -> tuple[Any, tuple, dict]:
    """(target, args, kwargs) of rank `rank`'s call for a functional / ATen weight op (tensor_ops.WeightOp) under
    `rule`: row-parallel without its bias (added after the all-reduce), or the vocab-parallel lookup."""
    op = weight_op(gm, n)
    if op is None:
        raise ValueError(f"{n.name}: the plan shards it as {rule}, but it reads no parameter weight")
    x, w = lookup(op.x, n), env[op.weight]
    aten = isinstance(n.target, torch._ops.OpOverload)
    if rule == "vocab_embedding":
        rows = -(-op.weight.meta["val"].shape[0] // tp)  # a padded vocabulary: the padded rows per rank
        start = rank * rows
        pad = op.padding_idx - start if op.padding_idx is not None and start <= op.padding_idx < start + rows else None
        return vocab_parallel_embedding, (x, w, start, pad), {}
    if op.kind == "linear":  # x W^T, whether written F.linear or x @ W.T
        return (torch.ops.aten.linear.default if aten else F.linear), (x, w), {}
    if op_name(n) == "matmul":  # x @ W of any rank
        return (torch.ops.aten.matmul.default if aten else torch.matmul), (x, w), {}
    return (torch.ops.aten.mm.default if aten else torch.mm), (x, w), {}


def _functional_norm(mod: nn.Module, x: fx.Node, weights: dict[str, fx.Node]) -> tuple[Any, tuple]:
    """The call of torch.nn.functional equal to `mod(x)` with its parameters read from `weights`."""
    if isinstance(mod, nn.LayerNorm):
        return F.layer_norm, (x, tuple(mod.normalized_shape), weights.get("weight"), weights.get("bias"), mod.eps)
    if isinstance(mod, nn.RMSNorm):
        return F.rms_norm, (x, tuple(mod.normalized_shape), weights.get("weight"), mod.eps)
    raise ValueError(f"sequence parallelism sums the gradients of {type(mod).__name__}'s parameters, which it cannot")


def global_shape(size: torch.Size, dim: int, tp: int) -> torch.Size:
    """The whole value's torch.Size from a sequence-split one's (dim `dim` holds 1/tp of it)."""
    return torch.Size((*size[:dim], size[dim] * tp, *size[dim + 1 :]))


def _get_path_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def count_collectives(rank_gm: fx.GraphModule) -> dict[str, int]:
    """{"all_reduce_forward", "all_reduce_backward", "all_gather_forward", "vocab_cross_entropy"} counts, and with
    sequence parallelism also "reduce_scatter", "gather_sequence" and "scatter"."""
    counts = {"all_reduce_forward": 0, "all_reduce_backward": 0, "all_gather_forward": 0, "vocab_cross_entropy": 0}
    for n in rank_gm.graph.nodes:
        if n.op != "call_module":
            continue
        mod = rank_gm.get_submodule(str(n.target))
        if isinstance(mod, TPCollective):
            key = {"copy": "all_reduce_backward", "reduce": "all_reduce_forward", "reduce_mean": "all_reduce_forward",
                   "gather": "all_gather_forward"}  # fmt: skip
            what = key.get(mod.kind, mod.kind)  # sequence parallelism's kinds under their own names
            counts[what] = counts.get(what, 0) + 1
        elif isinstance(mod, VocabParallelCrossEntropy):
            counts["vocab_cross_entropy"] += 1
        elif isinstance(mod, SequenceParallelColumns):  # the gather in front of column-parallel matmuls
            counts["gather_sequence"] = counts.get("gather_sequence", 0) + 1
    return counts


def stage_of_rank_nodes(rank_gm: fx.GraphModule, stage_of: dict[str, int]) -> dict[str, int]:
    """Extend a pipeline plan's node -> stage map (original names) to a rank graph's inserted nodes.

    Collectives and bias adds go with their anchor node, except an f (`_grad`), which goes with its first
    consumer so that the replicated value, not its copy, is what crosses a stage boundary.
    """
    out: dict[str, int] = {}
    for n in rank_gm.graph.nodes:
        if n.op in ("get_attr", "output"):
            continue
        if n.name in stage_of:
            out[n.name] = stage_of[n.name]
        elif (n.meta.get("tp_feeds") or str(n.target).endswith("_grad")) and n.users and n.op != "get_attr":
            # a consumer may itself be inserted (the halves of a column with rows kept whole): its anchor's stage
            stages = [stage_of.get(u.name, stage_of.get(u.meta.get("tp_anchor", ""))) for u in n.users]
            out[n.name] = min(s for s in stages if s is not None)
        else:
            anchor = n.meta["tp_anchor"]
            out[n.name] = stage_of[anchor] if anchor in stage_of else out[anchor]
    return out
