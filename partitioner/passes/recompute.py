"""recompute: run regions of a graph under torch.utils.checkpoint (activation recomputation, plan.recompute).

`checkpoint_regions(gm, regions)` outlines each region, the contiguous run of `gm`'s nodes from the region's first
name to its last (inclusive, in graph order), into a `CheckpointedRegion` called through non-reentrant
``torch.utils.checkpoint.checkpoint``. Autograd then keeps only the region's inputs for backward and runs the
region's forward again during backward; the RNG state is restored for that rerun, so dropout draws the same masks.
Nodes another pass inserted between two planned names (a tensor-parallel all-reduce, a bias add) are inside the
run and are recomputed too, as in Megatron's full recomputation.

Preserves:
- the outputs: the same nodes run in the same order on the same values (bit-exact on the CPU), and so do the
  gradients up to fp32 summation order (the rerun replays the forward's RNG);
- the names: every node outside a region keeps its name, a value a region gives back is a `getitem` named after
  the node that made it, and the region's body keeps the node names;
- the state: parameters and buffers stay the same objects under the same qualified names, registered in the same
  order (`named_parameters()` is unchanged, so optimizers, state dicts, tied weights and DDP/FSDP see the model
  they saw). A region's body holds no state: it receives the modules it calls and the tensors it reads
  (`get_attr`) as arguments from the outer graph, so whatever swaps them by name (materialization,
  ``torch.func.functional_call``, FSDP's unsharded parameters) reaches the body. The `torch.device` constants of
  the body's nodes are arguments of the region's call too, so passes over the outer graph (`retarget_devices`)
  reach them.
- `node.meta` on every copied node.
Refused (ValueError naming the region and the node): a name that is not in `gm`; names out of graph order; a
placeholder or output inside a run; runs that overlap; an in-place write inside a region to a storage the region
did not create (the rerun would write it twice, e.g. BatchNorm's running statistics) and an in-place write, after
the region, to a storage the region reads (the rerun would read the written value). The write checks use
annotate's `node.meta["writes"/"reads"/"storages"]`; nodes without them are judged by the op (in-place method
names, mutable ATen schemas, `out=`, setitem, batch norm in training); a write this pass cannot see (another
stage's) trips autograd's version counter on the region's saved inputs at backward. Python values (ints, sizes,
devices) cross a region's boundary either way as they are.

Example (gpt3-tiny, its first block as one region, as plan.recompute's "full" gives it):

    gm2 = checkpoint_regions(gm, [["h_0_ln_1", "size_1", ..., "h_0_mlp_drop", "add_2"]])
    # gm2.code:  h_0_ln_1_mod = getattr(self.h, "0").ln_1  ...  h_0_mlp_drop_mod = getattr(self.h, "0").mlp.drop
    #            recompute_region_0 = self.recompute_region_0(drop, h_0_ln_1_mod, ..., h_0_mlp_drop_mod)
    #            add_2 = recompute_region_0[0]
    # gm2.recompute_region_0.body.code: the block's 27 nodes, e.g. `h_0_attn_q_proj = _call_module(
    #            h_0_attn_q_proj_mod, h_0_ln_1)`; backward keeps the block's input `drop` (B, T, d) and
    #            recomputes the rest
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

__all__ = ["CheckpointedRegion", "checkpoint_regions"]


class CheckpointedRegion(nn.Module):
    """One outlined region: `body` (a GraphModule without state) run under non-reentrant checkpoint.

    With autograd off (inference, no_grad) the body runs plainly: nothing would be saved for backward anyway.
    """

    def __init__(self, body: fx.GraphModule, first: str, last: str):
        super().__init__()
        self.body = body
        self.first, self.last = first, last  # the region's span in the outer graph, for printing

    def forward(self, *args: Any) -> tuple:
        if not torch.is_grad_enabled():
            return self.body(*args)
        return checkpoint(self.body, *args, use_reentrant=False)

    def extra_repr(self) -> str:
        return f"{self.first} .. {self.last}"


def _call_module(module: nn.Module, /, *args: Any, **kwargs: Any) -> Any:
    """A body's call of a module it received as an argument (the outer graph's `call_module`)."""
    return module(*args, **kwargs)


@dataclass(frozen=True)
class _Span:
    index: int  # the region's position in `regions`
    start: int  # positions in gm's node list, inclusive
    end: int
    label: str  # "recompute region 2 (first .. last)", for messages


def checkpoint_regions(gm: fx.GraphModule, regions: Sequence[Sequence[str]]) -> fx.GraphModule:
    """A GraphModule computing what `gm` computes, each region run under torch.utils.checkpoint (module docstring).

    `regions`: lists of node names of `gm`, each in graph order; a region covers `gm`'s nodes from its first name to
    its last. `gm` itself is not modified; no regions returns `gm`. Raises ValueError as the module docstring says.
    """
    if not regions:
        return gm
    nodes = list(gm.graph.nodes)
    spans = _spans(nodes, regions)
    for span in spans:
        _check_writes(nodes, span)

    # Phase 1: the outer graph; each region becomes one call plus a getitem per value it gives back.
    taken = {n.name for n in nodes}

    def fresh(base: str) -> str:
        name, i = base, 0
        while name in taken or hasattr(gm, name):
            i += 1
            name = f"{base}_{i}"
        taken.add(name)
        return name

    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    outlined: dict[str, CheckpointedRegion] = {}
    starts = {span.start: span for span in spans}
    i = 0
    while i < len(nodes):
        span = starts.get(i)
        if span is None:
            env[nodes[i]] = graph.node_copy(nodes[i], env.__getitem__)
            i += 1
            continue
        name = fresh(f"recompute_region_{span.index}")
        outlined[name] = _outline(nodes[span.start : span.end + 1], graph, env, name, fresh)
        i = span.end + 1
    graph.lint()

    # Phase 2: the GraphModule. GraphModule(gm, graph) takes every attribute the graph names from gm (the same
    # objects, registered in graph order, as split_stages built gm); the region modules join gm for that copy only.
    for name, module in outlined.items():
        gm.add_module(name, module)
    try:
        out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    finally:
        for name in outlined:
            delattr(gm, name)
    out.meta.update(gm.meta)
    return out


def _spans(nodes: list[fx.Node], regions: Sequence[Sequence[str]]) -> list[_Span]:
    """Each region's run of positions, validated (names known and in order, no placeholder/output, no overlap)."""
    position = {n.name: i for i, n in enumerate(nodes)}
    spans = []
    for k, region in enumerate(regions):
        if isinstance(region, str) or not region:
            raise ValueError(f"recompute region {k} must be a non-empty list of node names, got {region!r}")
        label = f"recompute region {k} ({region[0]} .. {region[-1]})"
        for name in region:
            if name not in position:
                raise ValueError(f"{label}: node {name!r} is not in this graph")
        for a, b in zip(region, region[1:]):
            if position[b] <= position[a]:
                raise ValueError(f"{label}: node {b!r} does not come after {a!r} in graph order")
        span = _Span(k, position[region[0]], position[region[-1]], label)
        for n in nodes[span.start : span.end + 1]:
            if n.op in ("placeholder", "output"):
                raise ValueError(f"{label}: node {n.name!r} is a graph {n.op}, which cannot be recomputed")
        spans.append(span)
    spans.sort(key=lambda s: s.start)
    for a, b in zip(spans, spans[1:]):
        if b.start <= a.end:
            raise ValueError(f"{b.label} overlaps {a.label}: node {nodes[b.start].name!r} would be in both")
    return spans


def _outline(
    inside: list[fx.Node], graph: fx.Graph, env: dict[fx.Node, fx.Node], name: str, fresh: Any
) -> CheckpointedRegion:
    """Append region `inside` to the outer `graph` as a call of the returned module, and its outputs to `env`."""
    members = set(inside)
    computed = [n for n in inside if n.op != "get_attr"]

    # What the body receives: values made before the region, the tensors it reads and the modules it calls (the
    # outer graph fetches both, in region order, so they register where they did), and its device constants.
    inputs: dict[fx.Node, None] = {}
    for n in computed:
        for x in n.all_input_nodes:
            if x not in members or x.op == "get_attr":
                inputs.setdefault(x, None)
    modules: dict[str, fx.Node] = {}  # target -> the outer get_attr fetching the module
    for n in inside:
        if n.op == "get_attr":
            env[n] = graph.node_copy(n, env.__getitem__)  # kept outside: the body may not hold state
        elif n.op == "call_module" and n.target not in modules:
            fetch = graph.create_node("get_attr", n.target, name=fresh(f"{str(n.target).replace('.', '_')}_mod"))
            modules[str(n.target)] = fetch
    devices: dict[torch.device, None] = {}
    for n in computed:
        for leaf in pytree.tree_leaves((n.args, n.kwargs)):
            if isinstance(leaf, torch.device):
                devices.setdefault(leaf, None)
    outputs = [n for n in computed if any(u not in members for u in n.users)]

    # The body: those as placeholders, then the region's nodes, module calls through `_call_module`.
    body = fx.Graph()
    benv: dict[fx.Node, fx.Node] = {}
    for x in inputs:
        benv[x] = body.placeholder(x.name)
        benv[x].meta = dict(x.meta)
    module_args = {target: body.placeholder(fetch.name) for target, fetch in modules.items()}
    device_args = {d: body.placeholder(fresh("device")) for d in devices}

    def lift(v: Any) -> Any:
        return device_args[v] if isinstance(v, torch.device) else v

    for n in computed:
        args, kwargs = pytree.tree_map(lift, fx.map_arg((n.args, n.kwargs), benv.__getitem__))
        if n.op == "call_module":
            new = body.create_node("call_function", _call_module, (module_args[n.target], *args), kwargs, name=n.name)
        else:
            new = body.create_node(n.op, n.target, args, kwargs, name=n.name)
        new.meta = dict(n.meta)
        benv[n] = new
    body.output(tuple(benv[o] for o in outputs))
    body.lint()

    # The outer call and the values it gives back, named as before.
    call_args = (*(env[x] for x in inputs), *modules.values(), *devices)
    call = graph.create_node("call_module", name, call_args, {}, name=name)
    for k, o in enumerate(outputs):
        env[o] = graph.create_node("call_function", operator.getitem, (call, k), {}, name=o.name)
        env[o].meta = dict(o.meta)
    body_module = fx.GraphModule(nn.Module(), body, class_name="RecomputeRegion")  # stateless: nothing to copy
    return CheckpointedRegion(body_module, inside[0].name, inside[-1].name)


# ---------------------------------------------------------------------------------------------- in-place writes
def _check_writes(nodes: list[fx.Node], span: _Span) -> None:
    """Refuse a region whose rerun would not reproduce its forward: it writes what it did not create, or reads
    what a later node writes (module docstring)."""
    inside = nodes[span.start : span.end + 1]
    created = {n.name for n in inside}  # a storage is named after the node that first held it (annotate)
    read: dict[str, str] = {}  # storage made outside the region -> a region node reading it
    for n in inside:
        for s in sorted(_writes(n)):
            if s not in created:
                raise ValueError(
                    f"{span.label}: node {n.name!r} writes {s!r} in place, which the region did not create; "
                    f"recomputing the region in backward would write it a second time: leave {n.name!r} out of the "
                    "region"
                )
        for s in _reads(n):
            if s not in created:
                read.setdefault(s, n.name)
    for n in nodes[span.end + 1 :]:
        for s in sorted(_writes(n).intersection(read)):
            raise ValueError(
                f"{span.label}: node {n.name!r} writes {s!r} in place after the region, and the region reads it "
                f"(node {read[s]!r}); recomputing the region in backward would read the written value: leave "
                f"{read[s]!r} out of the region"
            )


def _storage(x: Any) -> set[str]:
    """Storages a value lives in: annotate's record, else the node's own name (a get_attr: its target)."""
    if not isinstance(x, fx.Node):
        return set()
    if "storages" in x.meta:
        return set(x.meta["storages"])
    return {str(x.target) if x.op == "get_attr" else x.name}


def _reads(n: fx.Node) -> set[str]:
    if "reads" in n.meta:
        return set(n.meta["reads"])
    return set().union(*(_storage(x) for x in n.all_input_nodes))


def _writes(n: fx.Node) -> set[str]:
    """Storages `n` writes in place: annotate's record, else what the op says (its first argument)."""
    if "writes" in n.meta:
        return set(n.meta["writes"])
    if n.op == "call_module":
        mod = n.graph.owning_module.get_submodule(str(n.target)) if n.graph.owning_module is not None else None
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.training and mod.track_running_stats:
            return {f"{n.target}.running_mean", f"{n.target}.running_var"}
        return set()
    if n.op not in ("call_function", "call_method"):
        return set()
    target = n.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    in_place = (
        (name.endswith("_") and not name.endswith("__"))
        or target is operator.setitem
        or "out" in n.kwargs
        or (isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable)
    )
    return _storage(n.args[0]) if in_place and n.args else set()
