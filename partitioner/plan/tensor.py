"""plan.tensor: sharding propagation over a captured graph -> a plain-data tensor-parallel layout plan.

Pure analysis: reads the graph and `node.meta["val"]` (run `partitioner.annotate.annotate` first, with
`training=True` when the plan will be trained: backward collectives are placed on values that need a grad),
touches no weights and returns a `TensorParallelPlan` (JSON-able). `passes.tensor_parallel` applies it.

Model (Megatron-LM, Shoeybi et al. 2019). Every value is `replicated`, `shard(d)` (each rank holds 1/tp of
dimension d; `parts` > 1 means d is made of `parts` equal blocks, e.g. a fused q|k|v, and each rank holds its
1/tp of every block) or `partial` (each rank holds a summand). Seeds: every `nn.Linear`, and every linear-like call
on a parameter read by get_attr (fx `F.linear(x, self.w)`; ATen `linear`, `addmm` / `mm` with an (in, out) weight
as HF's GPT-2 Conv1D), may become column-parallel, and every large or tied embedding (module, functional or
ATen) vocab-parallel; layouts then flow forward through one table of rules, one per op family, which serves fx
and torch.export (ATen) graphs alike: `plan.tensor_ops.op_key` names an ATen op by the fx key it stands for:

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
    SDPA / matmul on heads     shard(head dim)       shard         - (SDPA: k / v / mask replicated with all the
                                                                   heads are read as each rank's slice: a scatter)
    slice / index / split      shard(d, whole w)     shard(d) or   the head: a plain shard; in the last w: replicated
      cutting d                                      replicated    (positive bounds made local)
    unsqueeze/squeeze/select   shard(d)              shard(d')     - (not on d)
    slice / cat / mean / sum   shard(d)              shard(d')     - (not along d; slice: all of d only)
    expand                     shard(d)              shard(d')     size argument of d divided by tp
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
identity backward) right away. Per transformer layer that is the optimum: 2 all-reduces forward, 2 backward. One
exception moves a `g` later: a row-parallel output without a bias read only by an op linear in it (a sum with another
partial value, a scaling by a replicated one, a view, a gather, a sum over a dim) stays partial through that op, and
the all-reduce goes where such ops end (`tensor_rules._partial_through`): Falcon's parallel attention and MLP, summed
before the residual, take one all-reduce forward instead of two; a mixture of experts' outputs are weighted,
permuted back and summed over the top k before it, k times fewer bytes.

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
A module called from several nodes, or a parameter tied across modules, gets one sharding for all its uses; a
sharded parameter read by get_attr may only be read by nodes that shard it the same way (export reads a tied
weight under one name, e.g. GPT-2's `lm_head.weight` for both the lookup and the head; its aliases share its spec).

ATen example (HF Llama, 4 heads, 2 kv heads, tp=4): q_proj / o_proj / gate / up / down shard as above; k_proj's
`view(B, T, -1, 16)` would hold 2/4 heads, a divisibility conflict, so k_proj and v_proj stay replicated (Megatron's
rule for tp > kv heads) and SDPA reads each rank's slice of the repeated k / v heads (`expand` + `reshape` of
repeat_kv keep the heads whole); T5's per-head position bias is read the same way.

Sequence parallelism (`sequence_parallel=True`, plan.tensor_sequence) is derived from the finished propagation: the
token-wise ops left replicated between a g and an f run on 1/tp of the tokens, each g a reduce-scatter and each f
an all-gather; the tensor-parallel decisions (seeds, shards, rewrites) are the same with or without it.

A tail kept whole (multi-query q | k | v fused in one weight: Falcon-7B, GPTBigCode): the seed keeps the last rows
of its output whole on every rank (its q rows sharded, its one k and v not), asked for by the first reader that cuts
the sharded dim into a head and a tail (docs/design.md); views map the tail, size arguments become (v - w) / tp + w
(`whole_rewrites`).

Vocabulary padding: a vocabulary (an embedding's row count) tp does not divide is padded to the next multiple of tp
(`pad` rows at the end, on the last rank; the parameter's spec records "pad"). The lookup never reads them (ids <
vocab), the vocab-parallel cross-entropy masks the padded logits to -inf (never the max, no probability, no
gradient), gathered logits drop them, and merged checkpoints hold the model's own size. A padded shard may only
reach casts, elementwise ops, views and indexing that keep the vocab dim whole, the loss and the output; anything
else (or reading the padded dim's size, which would be the padded one) is a conflict.

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
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from partitioner.plan.tensor_cost import TPCost, tp_cost
from partitioner.plan.tensor_layout import (
    REPLICATED,
    TensorParallelPlan,
    kept_whole_share,
    shard_slices,
    shard_tensor,
    unshard_tensor,
)
from partitioner.plan.tensor_ops import key_in as _key_in
from partitioner.plan.tensor_ops import weight_op
from partitioner.plan.tensor_rules import (
    _layout_str,
    _Partial,
    _PartsRequest,
    _propagate,
    _Shard,
    _SizeOf,
    _State,
    _val,
    _WholeRequest,
)
from partitioner.plan.tensor_sequence import SequenceLayout, counts_as_sequence_user, sequence_parallel_layout

__all__ = [
    "REPLICATED",
    "TPCost",
    "TensorParallelPlan",
    "TensorParallelPropagation",
    "check_tensor_parallel_plan",
    "max_tensor_parallel",
    "plan_tensor_parallel",
    "propagate_tensor_parallel",
    "shard_slices",
    "shard_tensor",
    "tp_cost",
    "unshard_tensor",
]


# ----------------------------------------------------------------------------------------------- entry points
def _initial_seeds(gm: fx.GraphModule, min_vocab: int) -> tuple[set[str], dict[str, str]]:
    """Every nn.Linear call and linear-like call on a parameter (tensor_ops.WeightOp: fx `F.linear(x, self.w)`,
    ATen `linear` / `addmm` / `mm`) may be column-parallel; every large or tied embedding vocab-parallel."""
    linear_params = {id(m.weight) for m in gm.modules() if isinstance(m, nn.Linear)}
    ops = {n.name: op for n in gm.graph.nodes if (op := weight_op(gm, n)) is not None}
    linear_params |= {id(gm.get_parameter(op.param)) for op in ops.values() if op.kind != "embedding"}
    seeds, skipped = set(), {}
    for n in gm.graph.nodes:
        op = ops.get(n.name)
        if op is not None and op.kind != "embedding":
            seeds.add(n.name)
        elif op is not None:
            rows = _val(op.weight).shape[0]
            if id(gm.get_parameter(op.param)) in linear_params or rows >= min_vocab:
                seeds.add(n.name)
            else:
                skipped[n.name] = f"{_small_vocab(rows, min_vocab)} (weight {op.param})"
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
                skipped[n.name] = _small_vocab(mod.num_embeddings, min_vocab)
    return seeds, skipped


def _small_vocab(rows: int, min_vocab: int) -> str:
    return (
        f"embedding table of {rows} rows < min_vocab={min_vocab} and not tied to an LM head: a vocab-parallel "
        f"lookup's all-reduce costs more than the table saves"
    )


def _vocab_sizes(gm: fx.GraphModule) -> set[int]:
    """Row counts of the graph's embedding tables (modules and functional lookups)."""
    rows = {m.num_embeddings for m in gm.modules() if isinstance(m, nn.Embedding)}
    for n in gm.graph.nodes:
        op = weight_op(gm, n)
        if op is not None and op.kind == "embedding":
            rows.add(_val(op.weight).shape[0])
    return rows


def _seed_weight(gm: fx.GraphModule, node: fx.Node) -> str:
    """The parameter name a seed node's shard spec is recorded under."""
    op = weight_op(gm, node)
    return op.param if op is not None else f"{node.target}.weight"


def _indivisible_seeds(gm: fx.GraphModule, seeds: set[str], tp: int, vocab: set[int]) -> dict[str, str]:
    """The linear-like seeds tp can shard in no role: it divides neither dim of the weight (column-parallel needs its
    outputs to divide, row-parallel its inputs, a block split more) and neither is a vocabulary (which is padded).
    Left out before propagating: the propagation would find each such conflict in turn, one restart per layer (a
    1T GPT at tp 3: 128 restarts, 10 s), and end with them replicated all the same."""
    nodes = {n.name: n for n in gm.graph.nodes}
    out = {}
    for name in sorted(seeds):
        node = nodes[name]
        op = weight_op(gm, node)
        if op is not None and op.kind == "embedding":
            continue
        if op is not None:
            weight = gm.get_parameter(op.param)
        else:
            mod = gm.get_submodule(str(node.target))
            if not isinstance(mod, nn.Linear):
                continue
            weight = mod.weight
        dims = tuple(weight.shape)
        if len(dims) == 2 and all(d % tp and d not in vocab for d in dims):
            out[name] = f"tp={tp} divides neither dim of its {dims[0]} x {dims[1]} weight"
    return out


def _run(
    gm: fx.GraphModule,
    tp: int | None,
    *,
    strict: bool,
    gather_output: bool,
    min_vocab: int,
    exclude: frozenset[str] = frozenset(),
    vocab_alignment: int = 1,
) -> tuple[_State, dict[str, str]]:
    _require_annotation(gm)
    seeds, fallbacks = _initial_seeds(gm, min_vocab)
    for name in sorted(seeds & exclude):
        seeds.discard(name)
        fallbacks[name] = "kept replicated on request (exclude)"
    if tp == 1:  # nothing to shard: the plan is all replicated, with no collectives
        seeds, fallbacks = set(), {}
    seed_parts: dict[str, int] = {}
    parts_why: dict[str, _PartsRequest | _WholeRequest] = {}  # why a seed was re-seeded as blocks / partly whole
    seed_whole: dict[str, tuple[int, int]] = {}
    vocab = _vocab_sizes(gm)
    if tp is not None and tp > 1 and not strict:
        for name, reason in _indivisible_seeds(gm, seeds, tp, vocab).items():
            seeds.discard(name)
            fallbacks[name] = reason
    weights = {n.name: op.param for n in gm.graph.nodes if (op := weight_op(gm, n)) is not None}
    refused: dict[str, str] = {}  # strict: seeds tp does not divide -> the error, unless Megatron's kv rule covers it
    modules: dict[str, nn.Module] = {}  # shared by every restart's state (the graph's modules do not change)
    for _ in range(4 * len(seeds) + 8):
        st = _State(gm, tp, set(seeds), dict(seed_parts), gather_output, vocab, vocab_alignment=vocab_alignment,
                    modules=modules, seed_whole=dict(seed_whole))  # fmt: skip
        outcome = _propagate(st)
        if tp == 1 or (not outcome.conflicts and not outcome.parts and not outcome.whole):  # tp 1: nothing to undo
            return st, _finish(st, refused, fallbacks)
        for seed, req in outcome.parts.items():
            seed_parts[seed] = req.parts
            parts_why.setdefault(seed, req)
        for seed, wreq in outcome.whole.items():
            seed_whole[seed] = (wreq.kept, wreq.of)
            parts_why.setdefault(seed, wreq)
        restart = bool(outcome.parts or outcome.whole)
        reseeded = set(outcome.parts) | set(outcome.whole)
        for node, c, origins in outcome.conflicts:
            # a seed re-seeded this round is judged next round: another reader's conflict with its old shard (the k
            # slice of a q | k | v whose q slice asked for k and v kept whole) is what the new one may resolve
            if origins & reseeded:
                continue
            if strict and not origins:
                raise ValueError(f"tensor parallel tp={tp} (strict): {node.name}: {c.reason}")
            if strict and c.divisibility:
                for s in origins:
                    refused.setdefault(s, f"tensor parallel tp={tp} (strict): {node.name}: {c.reason}")
            if not origins:  # no sharded input: the node is replicated, as on every rank; nothing to undo
                fallbacks.setdefault(node.name, f"no sharding analysis: {c.reason}")
                continue
            restart = True
            for s in origins:
                seeds.discard(s)
                where = "" if s == node.name else f" its shard reaches {node.name}:"
                reason = f"{where} {c.reason}".strip()
                if s in parts_why:  # the first reason is the real one; the re-seeding did not help either
                    first = parts_why[s]
                    if isinstance(first, _WholeRequest):
                        reason = f"{first.reason}; with its last {first.kept}/{first.of} kept whole: {reason}"
                    else:
                        if strict and first.divisibility:
                            refused.setdefault(s, f"tensor parallel tp={tp} (strict): {s}: {first.reason}")
                        reason = f"{first.reason}; as {first.parts} blocks: {reason}"
                if s in weights:  # a functional / ATen op: its node name says little, its weight's name says which
                    reason = f"{reason} (weight {weights[s]})"
                fallbacks.setdefault(s, reason)
        if not restart:
            return st, _finish(st, refused, fallbacks)
    raise RuntimeError("sharding propagation did not converge")  # unreachable: seeds shrink every round


def _finish(st: _State, refused: dict[str, str], fallbacks: dict[str, str]) -> dict[str, str]:
    """The converged propagation's fallbacks, saying so where a seed left replicated feeds attention's per-rank
    slices: its heads are fewer than tp (or do not split), and every rank reads the slice its q heads need (k / v
    projections, Megatron's rule for tp > kv heads). Strict mode (`refused`): raise the first divisibility error of
    a seed left replicated other than those."""
    whole = _sliced_sources(st)
    for seed, error in refused.items():
        if seed not in whole:
            raise ValueError(error)
    return {
        seed: (f"kept whole, attention reads each rank's slice of its heads (tp={st.tp} does not split them): {reason}"
               if seed in whole else reason)
        for seed, reason in fallbacks.items()
    }  # fmt: skip


def _sliced_sources(st: _State) -> set[str]:
    """The linear-like nodes whose outputs become values read as per-rank slices (`_State.slices`): walking back
    from each such value through the ops between (views, repeat_kv's expand, rotary arithmetic), stopping at
    linear-like ops (collected), attention and matmuls (another computation's inputs)."""
    stop = {"matmul", "bmm", "baddbmm", F.scaled_dot_product_attention, operator.matmul, torch.matmul}
    nodes = {n.name: n for n in st.gm.graph.nodes}
    found: set[str] = set()
    frontier = [nodes[name] for name in st.slices]
    seen = set(frontier)
    while frontier:
        nxt = []
        for n in frontier:
            op = weight_op(st.gm, n)
            if n.op == "call_module" or op is not None:
                linear = isinstance(st.module(n.target), nn.Linear) if op is None else op.kind != "embedding"
                if linear:
                    found.add(n.name)
                continue
            if n.op not in ("call_function", "call_method") or _key_in(n, stop):  # fx: x.view(...) is a method
                continue
            for x in n.all_input_nodes:
                if x not in seen:
                    seen.add(x)
                    nxt.append(x)
        frontier = nxt
    return found


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
    sequence_parallel: bool = False,
    vocab_alignment: int = 1,
) -> TensorParallelPlan:
    """The tensor-parallel layout plan of annotated `gm` at degree `tp` (see the module docstring).

    strict (a tensor_parallel degree the user forced): raise ValueError when tp does not divide a head or hidden
    size a shardable node needs (instead of falling back), when a rule fails on a node without a seed to blame,
    and when nothing at all is sharded at tp > 1; a vocabulary tp does not divide is padded (module docstring), k / v
    projections with fewer heads than tp stay whole with each rank reading its slice (Megatron's rule), and other
    conflicts fall back, with their reasons in `fallbacks`.
    gather_output: all-gather sharded model outputs (LM head logits) rather than keeping their producers
    replicated. min_vocab: embeddings with fewer rows stay replicated unless tied to a sharded LM head.
    exclude: Linear / Embedding nodes to keep replicated (their partners follow: a row-parallel Linear needs a
    sharded input). sequence_parallel: split the token-wise ops between row- and column-parallel matmuls over the
    tp ranks along the sequence (plan.tensor_sequence); the tensor-parallel decisions are the same either way.
    vocab_alignment: a vocabulary tp does not divide is padded so that every rank's rows are a multiple of this many
    (the device's GEMM row alignment in elements, 8 for bf16 on the GPU presets; Megatron pads to 128 x tp), not
    only so that tp divides it: an LM head shard of misaligned rows runs ~6x slower (passes.align).
    """
    propagation = propagate_tensor_parallel(gm, tp, strict=strict, gather_output=gather_output, min_vocab=min_vocab,
                                            exclude=exclude, vocab_alignment=vocab_alignment)  # fmt: skip
    return propagation.layout(sequence_parallel=sequence_parallel)


@dataclass(frozen=True)
class TensorParallelPropagation:
    """The sharding decisions of `propagate_tensor_parallel` at one degree: what the layouts with and without
    sequence parallelism share (sequence parallelism splits the token-wise ops between the decisions, never changes
    them), so a search pricing both propagates once per degree."""

    state: _State
    tp: int
    fallbacks: dict[str, str]

    def layout(self, *, sequence_parallel: bool = False) -> TensorParallelPlan:
        """The layout plan, its token-wise ops split along the sequence if `sequence_parallel`."""
        return _to_plan(self.state, self.tp, dict(self.fallbacks), sequence_parallel)


def propagate_tensor_parallel(
    gm: fx.GraphModule,
    tp: int,
    *,
    strict: bool = False,
    gather_output: bool = True,
    min_vocab: int = 1024,
    exclude: frozenset[str] | set[str] = frozenset(),
    vocab_alignment: int = 1,
) -> TensorParallelPropagation:
    """plan_tensor_parallel's sharding decisions (its arguments, but sequence parallelism), before the layout plan
    is written: `.layout(sequence_parallel=...)` writes it. Raises what plan_tensor_parallel raises."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive integer, got {tp!r}")
    st, fallbacks = _run(
        gm, tp, strict=strict, gather_output=gather_output, min_vocab=min_vocab, exclude=frozenset(exclude),
        vocab_alignment=vocab_alignment,
    )  # fmt: skip
    if strict and tp > 1 and not st.rules:  # every rank would compute the whole model: refuse rather than copy it
        why = "; ".join(f"{node}: {reason}" for node, reason in list(fallbacks.items())[:3])
        raise ValueError(
            f"tensor parallel tp={tp} (strict): nothing in this graph can be sharded "
            f"({why or 'it calls no nn.Linear or nn.Embedding module'})"
        )
    return TensorParallelPropagation(st, tp, fallbacks)


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
    seed_parts, seed_whole = {}, {}
    for n in seeds:
        weight = _seed_weight(gm, nodes[n])
        spec = plan.param_shard.get(weight, {})
        seed_parts[n] = int(spec.get("parts") or 1)
        if spec.get("whole") and spec.get("dim") is not None:
            seed_whole[n] = (int(spec["whole"]), gm.get_parameter(weight).shape[spec["dim"]])
    vocab = _vocab_sizes(gm)
    st = _State(gm, plan.tp, seeds, seed_parts, plan.gather_output, vocab, seed_whole=seed_whole)
    outcome = _propagate(st)
    for node, conflict, origins in outcome.conflicts:
        if origins:  # a recorded sharding reaches a node that cannot take it
            raise ValueError(f"{where}: node {node.name!r}: {conflict.reason}")
    if outcome.parts:
        seed, request = next(iter(outcome.parts.items()))
        raise ValueError(f"{where}: node {seed!r} must be sharded as {request.parts} blocks ({request.reason})")
    if outcome.whole:
        seed, wreq = next(iter(outcome.whole.items()))
        raise ValueError(f"{where}: node {seed!r} must keep its last {wreq.kept}/{wreq.of} whole ({wreq.reason})")
    derived = _to_plan(st, plan.tp, {}, plan.sequence_parallel)
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
    for what in ("module_rules", "arg_rewrites", "whole_rewrites", "global_sizes", "global_shapes", "collectives"):
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

    Vocabulary sizes (rows of the graph's embeddings) do not limit it: a vocabulary tp does not divide is padded,
    as gpt3-1.3b's 50257.
    Example: GPT with 4 heads, d 64, d_ff 256, vocab 512 -> gcd(4, 64, 256) = 4; gpt3-1.3b -> 16 heads -> 16.
    """
    st, _ = _run(gm, None, strict=False, gather_output=True, min_vocab=min_vocab)
    vocab = _vocab_sizes(gm)
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


def _local_shares(st: _State, tp: int) -> dict[str, float]:
    """Node -> the fraction of its elements a rank holds, where a tail kept whole makes it more than 1/tp."""
    out = {}
    for n, lay in st.layout.items():
        if isinstance(lay, _Shard) and lay.whole:
            out[n.name] = kept_whole_share(_val(n).shape[lay.dim], lay.whole, tp)
    return out


def _read_whole_too(gm: fx.GraphModule, sl: SequenceLayout) -> set[str]:
    """The parameters of sequence-split ops (`sl.param_grads`) that an op on all the tokens reads too (a norm module
    called on the replicated input first and on split tokens later): their gradient is not one per-token share to sum
    once per step, so each split call's share is summed over the ranks where it is made (phase "backward")."""
    if not sl.param_grads:
        return set()
    split = set(sl.param_grads)
    readers: dict[str, set[str]] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            readers.setdefault(str(n.target), set()).add(n.name)
        elif n.op == "get_attr":
            readers.setdefault(str(n.target), set()).update(u.name for u in n.users)
    names = {p for ps in sl.param_grads.values() for p in ps}
    return {p for p in names if (readers.get(p, set()) | readers.get(p.rpartition(".")[0], set())) - split}


def _to_plan(st: _State, tp: int, fallbacks: dict[str, str], sequence_parallel: bool = False) -> TensorParallelPlan:
    gm = st.gm
    sl = sequence_parallel_layout(st) if sequence_parallel and tp > 1 else SequenceLayout()
    layout = {n.name: _layout_str(st.layout.get(n)) for n in gm.graph.nodes}
    layout.update({name: f"seq({s})" for name, s in sl.seq.items()})
    params = {name: {"dim": None, "parts": 1} for name, _ in gm.named_parameters(remove_duplicate=False)}
    params.update({name: spec for name, (spec, _) in st.params.items()})
    by_tensor: dict[int, list[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    for names in by_tensor.values():  # an alias no node reads (a tied weight export reads once) shares the spec
        spec = next((st.params[n][0] for n in names if n in st.params), None)
        if spec is not None:
            params.update({n: spec for n in names})
    param_bytes = {name: p.numel() * p.element_size() for name, p in gm.named_parameters(remove_duplicate=False)}
    # get_attr nodes of sharded parameters hold each rank's own shard: no f on them (their gradients are the
    # shard's); nor on a row-parallel bias, added after the all-reduce (sequence parallelism sums it: param_grads).
    sharded = {name for name, spec in params.items() if spec.get("dim") is not None}
    no_f = {n.name for n in gm.graph.nodes if n.op == "get_attr" and str(n.target) in sharded}
    # ... nor on the transpose a weight op reads a sharded weight through (x @ W.T): it is the rank's shard too
    no_f |= {op.via.name for n in gm.graph.nodes if (op := weight_op(gm, n)) is not None and op.via is not None
             and op.param in sharded}  # fmt: skip
    collectives: list[dict[str, Any]] = []
    mixed = _read_whole_too(gm, sl)
    for n in gm.graph.nodes:
        lay = st.layout.get(n)
        v = _val(n)
        needs_grad = isinstance(v, torch.Tensor) and v.is_floating_point() and n.meta.get("requires_grad", True)
        if n.name in sl.reduce_scatter:  # g under sequence parallelism: each rank keeps the sum of its tokens
            d = sl.seq[n.name]
            collectives.append(dict(kind="reduce_scatter", phase="forward", after=n.name, dim=d, bytes=_nbytes(n)))
            collectives.append(dict(kind="all_gather", phase="backward", after=n.name, dim=d, bytes=_nbytes(n)))
        elif isinstance(lay, _Partial) and n.name not in st.partial_taken:  # g: a partial sum becomes replicated
            # right after its producer, or where the chain of ops linear in it ends (tensor_rules._partial_through)
            collectives.append(dict(kind="all_reduce", phase="forward", after=n.name, op="sum", bytes=_nbytes(n)))
        if n.name in sl.seq:  # a split value read whole: gathered in front of those readers
            d = sl.seq[n.name]
            grouped = sl.column_groups.get(n.name, [])
            if grouped:  # the column-parallel matmuls reading it: one gather, the shard saved, gathered again
                collectives.append(dict(kind="all_gather", phase="forward", after=n.name, dim=d, users=grouped,
                                        grad="reduce_scatter", columns=True, bytes=_nbytes(n)))  # fmt: skip
                if needs_grad:
                    collectives.append(dict(kind="all_gather", phase="backward", after=n.name, dim=d,
                                            bytes=_nbytes(n)))  # fmt: skip
                    collectives.append(dict(kind="reduce_scatter", phase="backward", after=n.name, dim=d,
                                            bytes=_nbytes(n)))  # fmt: skip
            others = [u for u in sl.gather_partial.get(n.name, []) if u not in grouped]
            if others:
                collectives.append(dict(kind="all_gather", phase="forward", after=n.name, dim=d, users=others,
                                        grad="reduce_scatter", bytes=_nbytes(n)))  # fmt: skip
                if needs_grad:
                    collectives.append(dict(kind="reduce_scatter", phase="backward", after=n.name, dim=d,
                                            bytes=_nbytes(n)))  # fmt: skip
            if n.name in sl.gather_replicated:
                users = sl.gather_replicated[n.name]
                collectives.append(dict(kind="all_gather", phase="forward", after=n.name, dim=d, users=users,
                                        grad="slice", bytes=_nbytes(n)))  # fmt: skip
        # f: a replicated value needing a grad feeds rank-dependent nodes -> all-reduce its grad
        elif st.eff(n) is None and needs_grad and n.name not in no_f and n.name not in st.partial_taken:
            sliced = {u for readers in st.slices.get(n.name, {}).values() for u in readers}
            users = [u.name for u in n.users if u.op != "output" and st.row_bias.get(u.name) != n.name
                     and u.name not in sliced and (
                (st.layout.get(u) is not None and not isinstance(st.layout.get(u), _SizeOf))
                or counts_as_sequence_user(sl, n.name, u.name))]  # fmt: skip
            if users:
                collectives.append(
                    dict(kind="all_reduce", phase="backward", after=n.name, op="sum", users=users, bytes=_nbytes(n))
                )
        sliced_dims = [(d, parts, repeat, users) for (d, parts, repeat), users in st.slices.get(n.name, {}).items()]
        for d, parts, repeat, users in sliced_dims + [(d, 1, 1, users) for d, users in sl.scatter.get(n.name, [])]:
            # a replicated operand of sharded or split values: each rank reads its slice (of each of `parts` blocks;
            # of the value repeated `repeat` times along d: grouped-query kv heads shared by several ranks)
            scatter = dict(kind="scatter", phase="forward", after=n.name, dim=d, users=users, bytes=0)
            if parts > 1:
                scatter["parts"] = parts
            if repeat > 1:
                scatter["repeat"] = repeat
            collectives.append(scatter)
            if needs_grad:
                collectives.append(dict(kind="all_gather", phase="backward", after=n.name, dim=d,
                                        bytes=_nbytes(n) * repeat))  # fmt: skip
        # Parameters of split ops saw 1/tp of the tokens: their gradients are summed once per step, after the backward
        # (as Megatron-LM all-reduces its layer norms' gradients), not per microbatch in the graph.
        if n.name in sl.param_grads:
            names = sl.param_grads[n.name]
            # read whole by another op too: this call's share summed in the graph (the other's is whole already)
            phase = "backward" if any(p in mixed for p in names) else "step"
            collectives.append(dict(kind="all_reduce", phase=phase, after=n.name, op="sum", params=names,
                                    bytes=sum(param_bytes[p] for p in names)))  # fmt: skip
        if st.rules.get(n.name) == "vocab_cross_entropy":
            rows = _val(n.args[0]).shape[0] * 4
            for op in ("max", "sum", "sum"):  # max logit, sum of exp, target logit
                collectives.append(dict(kind="all_reduce", phase="forward", after=n.name, op=op, bytes=rows))
        if n.name in st.gathers:
            gather = dict(kind="all_gather", phase="forward", after=n.name, dim=st.gathers[n.name], bytes=_nbytes(n))
            if n.name in st.gather_pads:  # the padding columns are dropped after the gather
                gather["pad"] = st.gather_pads[n.name]
            collectives.append(gather)
    return TensorParallelPlan(
        tp=tp,
        node_layout=layout,
        param_shard=params,
        module_rules=dict(st.rules),
        arg_rewrites=st.arg_rewrites,
        whole_rewrites=st.whole_rewrites,
        local_shares=_local_shares(st, tp),
        global_sizes=list(st.global_sizes) + sl.global_sizes,
        collectives=collectives,
        fallbacks=[{"node": k, "reason": v} for k, v in fallbacks.items()],
        requirements=st.requirements,
        gather_output=st.gather_output,
        sequence_parallel=sequence_parallel and tp > 1,
        global_shapes=dict(sl.global_shapes),
    )
