"""The pipeline splits people use today, re-implemented as stage assignments over our planning graph.

Each baseline returns `stage_of` (a stage per planned node, like our planner) or raises `NotApplicable`
with the reason; `bench/run.py` prices every assignment with the same cost model (plan.graph.evaluate)
and the same schedule simulator, so the comparison is the split alone. Assignments are repaired to be
valid pipelines (a consumer never before its producer) and renumbered when a method leaves stages
empty (the devices it leaves idle do nothing). Each re-implementation names the source it follows;
tests/test_baselines.py checks each against hand-worked examples of that source's algorithm.

- uniform: the transformer blocks (children of the model's largest nn.ModuleList) split evenly, the
  embedding with the first stage and everything after the blocks with the last (Megatron / torchtitan
  style `layers_per_stage`).
- deepspeed: PipelineModule(partition_method="parameters") of DeepSpeed v0.12.5 .. v0.16.5: the layer
  list (top-level modules and each block, in execution order) weighted by trainable parameters, a tied
  weight counted in every layer that uses it (`_count_layer_params` builds each TiedLayerSpec on its
  own), split by `ds_utils.partition_balanced`, the DP of PR #4312 that minimizes largest - smallest part.
- pippy: PiPPy's `split_into_equal_size` (pippy/ModelSplit.py, the split_policy torch.distributed.
  pipelining's `pipeline()` runs on its exported graph): walk the graph filling buckets of at most
  total // stages parameter and buffer elements, cut before the node that would overflow, keep the first
  stages - 1 cuts.
- smp: SageMaker model parallelism's auto-partition, after its docs (the algorithm is closed source):
  each module's cost mixes its compute and memory shares by `memory_weight` (0.8, the default with
  optimize="memory"); the module tree is walked top-down, devices go to the children by the D'Hondt
  method, and a module with more children than devices first groups them contiguously.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from partitioner.plan.graph import PlanningGraph
from partitioner.plan.recompute import module_path

__all__ = [
    "BASELINES",
    "NotApplicable",
    "repeated_blocks",
    "node_module_paths",
    "dhondt",
    "partition_uniform",
    "partition_balanced",
    "deepspeed_layer_weights",
    "pippy_node_sizes",
    "split_on_size_threshold",
    "smp_costs",
    "smp_seats",
    "SMP_MEMORY_WEIGHT",
]


class NotApplicable(ValueError):
    """The baseline cannot express a split of this model (the reason says why)."""


def node_module_paths(gm: fx.GraphModule, pg: PlanningGraph) -> list[str]:
    """Innermost module path of every planned node ("" for top-level operations; plan.recompute.module_path)."""
    by_name = {n.name: n for n in gm.graph.nodes}
    return [module_path(by_name[name]) for name in pg.names]


def repeated_blocks(model: nn.Module) -> tuple[str, int]:
    """(prefix, count) of the model's largest nn.ModuleList by parameters: its transformer blocks."""
    best: tuple[int, str, int] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1:
            size = sum(p.numel() for p in mod.parameters())
            if best is None or size > best[0]:
                best = (size, name, len(mod))
    if best is None:
        raise NotApplicable("the model has no nn.ModuleList of repeated blocks to split by layers")
    return best[1], best[2]


def _block_of(path: str, prefix: str) -> int | None:
    head = f"{prefix}." if prefix else ""
    if not path.startswith(head):
        return None
    rest = path[len(head) :].split(".")[0]
    return int(rest) if rest.isdigit() else None


def _repair(pg: PlanningGraph, stage_of: Sequence[int]) -> list[int]:
    """Make an assignment a valid pipeline: inputs on stage 0, no consumer before its producer, and
    stages renumbered 0..k-1 without gaps."""
    out = list(stage_of)
    for i in range(pg.num_inputs):
        out[i] = 0
    for v in range(pg.n):  # topological order: producers are final when a consumer is visited
        for u in pg.preds[v]:
            out[v] = max(out[v], out[u])
    used = sorted(set(out))
    index = {s: k for k, s in enumerate(used)}
    return [index[s] for s in out]


def _units(paths: list[str], prefix: str) -> list[str]:
    """The execution-order unit of every node: its block ("<prefix>.<i>"), else its top-level module,
    else the unit before it (top-level operations join their predecessor)."""
    units, last = [], None
    for path in paths:
        b = _block_of(path, prefix)
        if b is not None:
            unit = f"{prefix}.{b}"
        elif path:
            unit = path.split(".")[0]
        else:
            unit = last
        units.append(unit)
        last = unit if unit is not None else last
    first = next((u for u in units if u is not None), "<top>")
    return [u if u is not None else first for u in units]


def uniform_layers(pg: PlanningGraph, gm: fx.GraphModule, model: nn.Module, stages: int) -> list[int]:
    prefix, count = repeated_blocks(model)
    if count < stages:
        raise NotApplicable(f"{count} blocks cannot fill {stages} stages one block at least each")
    paths = node_module_paths(gm, pg)
    blocks = [_block_of(p, prefix) for p in paths]
    first_block = next(i for i, b in enumerate(blocks) if b is not None)
    stage_of, current = [], 0
    for i, b in enumerate(blocks):
        if b is not None:
            current = b * stages // count
        elif i < first_block:
            current = 0
        stage_of.append(current)
    last_block = max(i for i, b in enumerate(blocks) if b is not None)
    for i in range(last_block + 1, pg.n):
        stage_of[i] = stages - 1
    return _repair(pg, stage_of)


# --- DeepSpeed ---------------------------------------------------------------------------------------


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """DeepSpeed's `ds_utils.partition_uniform` (deepspeed/runtime/utils.py, v0.16.5): boundaries
    [0, b1, ..., num_items] of `num_parts` parts whose sizes differ by at most one, the larger ones
    first; with no more items than parts, one item per part and empty parts at the end."""
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    size, extra = divmod(num_items, num_parts)
    return [p * size + min(p, extra) for p in range(num_parts + 1)]


def partition_balanced(weights: Sequence[float], parts: int) -> list[int]:
    """DeepSpeed's `ds_utils.partition_balanced` as rewritten by PR #4312 (Dec 2023, in v0.12.5 and still
    in v0.16.5, deepspeed/runtime/utils.py): boundaries [0, b1, ..., len(weights)] of a contiguous split.

    With no more weights than parts it is `partition_uniform`. Otherwise a DP over (first i weights, j
    parts) keeps for each state ONE split, the one with the smallest largest-minus-smallest part among
    the extensions of the kept (i', j - 1) states (ties: the last i'); it is a greedy DP, not an exact
    minimizer of the spread (the kept state's max and min are what the next part is compared with), and
    that is what DeepSpeed runs. No part is empty."""
    n = len(weights)
    if n <= parts:
        return partition_uniform(n, parts)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    # State (i, j): the kept split of weights[:i] into j parts, its largest and smallest part and spread.
    hi = np.full((n + 1, parts + 1), np.inf)
    lo = np.full((n + 1, parts + 1), np.inf)  # lo[0, 0] stays inf: the first part is then the smallest
    spread = np.full((n + 1, parts + 1), np.inf)
    back = np.zeros((n + 1, parts + 1), dtype=np.int64)
    hi[0, 0] = spread[0, 0] = 0.0
    for i in range(1, n + 1):
        starts = np.arange(i)  # the last part is weights[start:i]
        last = prefix[i] - prefix[starts]
        for j in range(1, min(i, parts) + 1):
            big = np.maximum(hi[starts, j - 1], last)
            small = np.minimum(lo[starts, j - 1], last)
            cost = big - small  # inf where (start, j - 1) is unreachable
            k = int(np.flatnonzero(cost == cost.min())[-1])  # DeepSpeed's `>=` keeps the last best start
            hi[i, j], lo[i, j], spread[i, j], back[i, j] = big[k], small[k], cost[k], k
    bounds = [n]
    for j in range(parts, 0, -1):
        bounds.append(int(back[bounds[-1], j]))
    return bounds[::-1]


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model by every name it has (tied ones under each name)."""
    out: dict[str, torch.Tensor] = dict(model.named_buffers(remove_duplicate=False))
    out.update(model.named_parameters(remove_duplicate=False))
    return out


def deepspeed_layer_weights(
    pg: PlanningGraph, gm: fx.GraphModule, model: nn.Module
) -> tuple[list[str], list[str], list[int]]:
    """(unit of every planned node, the layer list in execution order, trainable parameter count per
    layer) as DeepSpeed's `PipelineModule._count_layer_params` (deepspeed/runtime/pipe/module.py, v0.16.5)
    counts them: each LayerSpec, a TiedLayerSpec included, is built and counts
    `sum(p.numel() for p in layer.parameters() if p.requires_grad)`, so a tied weight counts in full in
    every layer that uses it (the embedding and the LM head both carry the tied matrix); buffers do not
    count."""
    try:
        prefix, _ = repeated_blocks(model)
    except NotApplicable:
        prefix = "\0"  # no blocks: the layer list is the top-level modules
    units = _units(node_module_paths(gm, pg), prefix)
    order = list(dict.fromkeys(units))
    tensors = _tensors(model)
    used: dict[str, set[str]] = {u: set() for u in order}
    for unit, ps in zip(units, pg.params):
        used[unit].update(ps)
    weights = []
    for u in order:
        ts = {id(t): t for p in used[u] if isinstance(t := tensors.get(p), nn.Parameter) and t.requires_grad}
        weights.append(sum(t.numel() for t in ts.values()))
    return units, order, weights


def deepspeed_parameters(pg: PlanningGraph, gm: fx.GraphModule, model: nn.Module, stages: int) -> list[int]:
    units, order, weights = deepspeed_layer_weights(pg, gm, model)
    bounds = partition_balanced(weights, stages)
    stage_of_unit = {}
    for s, (a, b) in enumerate(zip(bounds, bounds[1:])):
        for u in order[a:b]:
            stage_of_unit[u] = s
    return _repair(pg, [stage_of_unit[u] for u in units])


# --- PiPPy / torch.distributed.pipelining -----------------------------------------------------------


def pippy_node_sizes(pg: PlanningGraph, gm: fx.GraphModule, model: nn.Module) -> tuple[list[dict[str, int]], int]:
    """(per planned node, {tensor name: elements} of the parameters and buffers it reads; the model's
    total) as PiPPy's `_analyze_node_size` and `split_into_equal_size` count them on the graph
    `torch.export` gives `pipeline()` (there every module call is inlined to ATen calls that read their
    weights through get_attr nodes, so a node's size is the tensors it reads; a tied weight is one
    tensor under one name). Sizes come from the state dict, so non-persistent buffers count in the
    total (`gm.parameters()` + `gm.buffers()`, each tensor once) but at no node."""
    persistent = set(model.state_dict(keep_vars=True))
    numel = {name: t.numel() for name, t in _tensors(model).items() if name in persistent}
    reads: list[dict[str, int]] = [{p: numel[p] for p in ps if p in numel} for ps in pg.params]
    get_attrs = {n.name for n in gm.graph.nodes if n.op == "get_attr"}
    for i, name in enumerate(pg.names):  # a get_attr node's tensor is read by its users
        if reads[i] and name in get_attrs:
            for v in pg.succs[i]:
                if v < pg.n:
                    reads[v].update(reads[i])
            reads[i] = {}
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return reads, total


def split_on_size_threshold(sizes: Sequence[dict[str, int]], threshold: int, max_stages: int) -> list[int]:
    """PiPPy's `_split_on_size_threshold_with_max_stages` (pippy/ModelSplit.py, pytorch/PiPPy 1bcb2bf,
    Aug 2024): the indices of the nodes a new stage starts at. Walking the nodes in order, a node that
    reads tensors joins the current bucket if the bucket's new tensors still fit in `threshold`
    elements (a tensor already in the bucket adds nothing); else, if the bucket is empty, the node is a
    stage of its own (the cut goes after it and the bucket stays empty), otherwise the cut goes before
    it and it opens the next bucket with every tensor it reads. Only the first max_stages - 1 cuts are
    kept: the rest of the graph is the last stage. Nodes that read nothing never cut."""
    cuts: list[int] = []
    held: set[str] = set()
    size = 0
    for i, reads in enumerate(sizes):
        if not reads:
            continue
        new = sum(n for p, n in reads.items() if p not in held)
        if size + new <= threshold:
            size += new
            held.update(reads)
        elif size == 0:
            cuts.append(i + 1)
        else:
            cuts.append(i)
            size = sum(reads.values())
            held = set(reads)
    return cuts[: max_stages - 1]


def pippy_equal_size(pg: PlanningGraph, gm: fx.GraphModule, model: nn.Module, stages: int) -> list[int]:
    """PiPPy's `split_into_equal_size(stages)` (pippy/ModelSplit.py, pytorch/PiPPy 1bcb2bf): the
    threshold is total // stages elements, then `split_on_size_threshold`; PiPPy asserts the result has
    exactly `stages` stages, so fewer is NotApplicable here. torch 2.13's torch.distributed.pipelining
    ships no size policy of its own: `pipeline(..., split_policy=...)` (_IR.py, `Pipe._from_traced`) runs
    this callable on `torch.export`'s `exported_program.module()`, the graph `pippy_node_sizes` mirrors."""
    sizes, total = pippy_node_sizes(pg, gm, model)
    if total == 0:
        raise NotApplicable("the model has no parameters to split by size")
    cuts = split_on_size_threshold(sizes, total // stages, stages)
    if len(cuts) + 1 < stages:
        raise NotApplicable(f"PiPPy's split_into_equal_size makes {len(cuts) + 1} stages, not {stages}")
    stage_of = np.searchsorted(np.asarray(cuts), np.arange(pg.n), side="right")
    return _repair(pg, [int(s) for s in stage_of])


# --- SageMaker model parallelism (after its docs) ---------------------------------------------------

SMP_MEMORY_WEIGHT = 0.8
"""SMP's `memory_weight` default: 0.8 with optimize="memory" (the default), 0.2 with optimize="speed"."""


def dhondt(costs: Sequence[float], seats: int) -> list[int]:
    """Seats per party by the D'Hondt method: each seat goes to the highest cost / (seats_so_far + 1)
    (ties: the earlier party)."""
    alloc = [0] * len(costs)
    for _ in range(seats):
        k = max(range(len(costs)), key=lambda i: (costs[i] / (alloc[i] + 1), -i))
        alloc[k] += 1
    return alloc


def _min_max_partition(weights: Sequence[float], parts: int) -> list[int]:
    """Boundaries [0, b1, ..., len] of the contiguous split into `parts` non-empty parts with the
    smallest largest part (exact DP; ties: the earliest boundary)."""
    n = len(weights)
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64))])
    best = np.full((parts + 1, n + 1), np.inf)  # best[k][i]: smallest max part for weights[:i] in k parts
    arg = np.zeros((parts + 1, n + 1), dtype=np.int64)
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            js = np.arange(k - 1, i)
            cand = np.maximum(best[k - 1][js], prefix[i] - prefix[js])
            j = int(np.argmin(cand))
            best[k][i], arg[k][i] = cand[j], js[j]
    bounds = [n]
    for k in range(parts, 0, -1):
        bounds.append(int(arg[k][bounds[-1]]))
    return bounds[::-1]


def smp_seats(costs: Sequence[float], devices: int) -> list[tuple[int, int, int]]:
    """One level of the SMP baseline's walk: (start, end, devices) for consecutive groups of children
    [start, end) with costs `costs`. With more children than devices the children are first grouped
    contiguously into `devices` groups with the smallest largest group cost; otherwise each child is a
    group. The devices then go to the groups by D'Hondt on the group costs (a group may get none)."""
    if len(costs) > devices:
        bounds = _min_max_partition(costs, devices)
    else:
        bounds = list(range(len(costs) + 1))
    spans = list(zip(bounds, bounds[1:]))
    seats = dhondt([float(sum(costs[a:b])) for a, b in spans], devices)
    return [(a, b, k) for (a, b), k in zip(spans, seats)]


def smp_costs(
    pg: PlanningGraph, groups: Sequence[Sequence[int]], memory_weight: float = SMP_MEMORY_WEIGHT
) -> list[float]:
    """Cost of each group of nodes (a module): (1 - memory_weight) x its share of the model's compute
    time + memory_weight x its share of the model's memory (the static bytes of the parameters it
    uses, each once per group, plus its saved activations)."""

    def memory(nodes: Sequence[int]) -> float:
        params = {p for i in nodes for p in pg.params[i]}
        return float(sum(pg.param_static[p] for p in params)) + float(pg.saved_bytes[list(nodes)].sum())

    total_time = float(pg.compute.sum()) or 1.0
    total_memory = memory(range(pg.n)) or 1.0
    return [
        (1 - memory_weight) * float(pg.compute[list(ns)].sum()) / total_time + memory_weight * memory(ns) / total_memory
        for ns in groups
    ]


def smp_dhondt(
    pg: PlanningGraph, gm: fx.GraphModule, model: nn.Module, stages: int, memory_weight: float = SMP_MEMORY_WEIGHT
) -> list[int]:
    """SageMaker model parallelism's automated partitioning for PyTorch, after its docs and paper: the
    library is closed source, so this is our reading of them, not its code (labelled "after docs").

    What the sources say: auto-partitioning runs at the first `smp.step`, and in PyTorch assigns whole
    modules to devices, with an algorithm that "balances memory, minimizes communication between
    devices, and optimizes performance" (AWS SageMaker developer guide, "Automated model splitting" /
    "How it works", docs.aws.amazon.com/sagemaker/latest/dg/model-parallel-customize-training-script.html
    and model-parallel-core-features.html); `memory_weight` is "the weight of memory balancing in the
    auto-partitioning objective, as opposed to balancing computational load" (0.0: compute only, 1.0:
    memory only, in between interpolates), default 0.8 with optimize="memory" (the default) and 0.2 with
    "speed" (SageMaker Python SDK, doc/api/training/smd_model_parallel_general.rst, the table for
    smdistributed-modelparallel >= 1.6). The apportionment of a module's devices to its children by the
    D'Hondt method, recursing down the module tree, is the paper's (Karakus et al., "Amazon SageMaker
    Model Parallelism: A General and Flexible Framework for Large Model Training", arXiv:2111.05972,
    2021), as issue #17 summarizes it; we could not read the paper's text here.

    Our reading: a module's cost is `smp_costs` (compute share and memory share mixed by memory_weight);
    communication enters only through cutting between whole modules. From the root with all devices: a
    module with one device, or no children, is one stage. Otherwise `smp_seats` splits its devices over
    its children (in execution order; the module's own operations join the child before them): when the
    children outnumber the devices they are first grouped contiguously, then the devices go to the
    children (or groups) by D'Hondt. A child or group with no device joins the seated one before it
    (after it, for leading ones): its nodes count in that one's cost and go down with it into its last
    (first) child, so the split below balances them too. A seated child recurses with its devices, a
    seated group of several children is split again the same way. (The previous version gave every group one device when
    children outnumbered devices: BERT's root has 10 children, so its layer list, 92% of the compute,
    got one of 8 devices.)"""
    paths = node_module_paths(gm, pg)
    stage_of = [0] * pg.n
    counter = [0]

    def children(prefix: str, nodes: list[int]) -> list[tuple[str, list[int]]]:
        """Direct children of module `prefix` in execution order, with their nodes; the module's own
        operations join the child before them (or the first child)."""
        groups: dict[str, list[int]] = {}
        order: list[str] = []
        pending: list[int] = []
        depth = 0 if not prefix else prefix.count(".") + 1
        for i in nodes:
            parts = paths[i].split(".") if paths[i] else []
            if len(parts) > depth:
                child = ".".join(parts[: depth + 1])
                if child not in groups:
                    groups[child] = []
                    order.append(child)
                groups[child].extend(pending)
                pending = []
                groups[child].append(i)
            elif order:
                groups[order[-1]].append(i)
            else:
                pending.append(i)
        if pending:
            if not order:
                return []
            groups[order[-1]].extend(pending)
        return [(c, sorted(groups[c])) for c in order]

    def one_stage(nodes: list[int]) -> None:
        for i in nodes:
            stage_of[i] = counter[0]
        counter[0] += 1

    # A unit of the walk: (module path, its own nodes, nodes that join it from before, from after). The
    # joined nodes are those of unseated neighbours: they count in the unit's cost and ride along into its
    # first (before) or last (after) child, so the devices below balance them too.
    Unit = tuple[str, list[int], list[int], list[int]]

    def place_module(unit: Unit, devices: int) -> None:
        name, nodes, before, after = unit
        kids = children(name, nodes) if devices > 1 else []
        if not kids:  # one device, or a module that cannot be split: one stage
            one_stage(before + nodes + after)
            return
        units: list[Unit] = [(c, ns, [], []) for c, ns in kids]
        units[0] = (units[0][0], units[0][1], before, [])
        units[-1] = (units[-1][0], units[-1][1], units[-1][2], after)
        if len(units) == 1:
            place_module(units[0], devices)
        else:
            place_siblings(units, devices)

    def place_siblings(units: list[Unit], devices: int) -> None:
        """Split the devices over consecutive sibling units (`smp_seats`) and place each seated group."""
        if devices <= 1:
            one_stage([i for _, ns, bs, as_ in units for i in bs + ns + as_])
            return
        costs = smp_costs(pg, [bs + ns + as_ for _, ns, bs, as_ in units], memory_weight)
        seated: list[tuple[list[Unit], int]] = []
        leading: list[int] = []  # nodes of unseated groups before the first seated one
        for start, end, k in smp_seats(costs, devices):
            group = list(units[start:end])
            nodes = [i for _, ns, bs, as_ in group for i in bs + ns + as_]
            if k == 0:
                if seated:  # joins the seated group before it, at its end
                    last = seated[-1][0][-1]
                    seated[-1][0][-1] = (last[0], last[1], last[2], last[3] + nodes)
                else:
                    leading.extend(nodes)
                continue
            if leading:  # earlier unseated groups join this one, at its start
                first = group[0]
                group[0] = (first[0], first[1], leading + first[2], first[3])
                leading = []
            seated.append((group, k))
        for group, k in seated:
            if len(group) == 1:
                place_module(group[0], k)
            else:
                place_siblings(group, k)

    place_module(("", list(range(pg.num_inputs, pg.n)), [], []), stages)
    for i in range(pg.num_inputs):
        stage_of[i] = 0
    return _repair(pg, stage_of)


BASELINES = {
    "uniform layers": uniform_layers,
    "deepspeed parameters": deepspeed_parameters,
    "pippy equal size": pippy_equal_size,
    "smp d'hondt (after docs)": smp_dhondt,
}
