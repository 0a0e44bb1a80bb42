"""apply: the one way from a Plan to the modules a run executes (shared/ARCHITECTURE.md's applier).

    Plan + captured graph (+ tensor-parallel rank)  ->  rank graph (TP rewrite)  ->  stage modules (the split)
        ->  padded GEMMs (passes.align)
        ->  recompute regions (each stage's `recompute_regions` under torch.utils.checkpoint)
        ->  gated activations saving only their inputs (passes.fuse_gated)

Every runtime runs what this builds: the local pipeline (no TP rank: the unsharded graph split by the plan) and
the distributed pipeline (this rank's TP graph, split); the in-process TP check (runtime.tp_local) runs each TP
rank's whole graph, checkpointing the regions it is given as this does per stage. Nothing
here decides anything: the node -> stage map and the TP layout are read from the Plan, so a saved plan runs the
same tomorrow as today. Example: a pp2 x tp2 plan applied for tp rank 1 gives two stage modules holding rank 1's
shards, the inserted collectives on their anchors' stages.

Recompute regions name captured nodes; the TP rewrite keeps those names (inserted nodes get new `tp_` ones), so a
region covers the same run of the rank graph's stage, from its first name to its last, the collectives and bias
adds inserted between them included (recomputed too, as in Megatron).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.fx as fx

from partitioner.capture import CapturedGraph
from partitioner.passes.align import applicable_pads, pad_gemms
from partitioner.passes.context_parallel import context_parallel_rank, stage_of_inserted_nodes
from partitioner.passes.fuse_gated import fuse_gated_activations
from partitioner.passes.recompute import checkpoint_regions
from partitioner.passes.split import StageModule, split_stages
from partitioner.passes.tensor_parallel import TPComm, stage_of_rank_nodes, tensor_parallel_rank
from partitioner.plan.context import ContextLayout, plan_context_parallel
from partitioner.plan.schema import Plan
from partitioner.plan.tensor_layout import TensorParallelPlan

__all__ = ["apply", "context_layout", "plan_layout", "rank_graph"]


def plan_layout(plan: Plan) -> TensorParallelPlan | None:
    """The tensor-parallel layout a plan records (None at tensor degree 1); ValueError when it records none or a
    malformed one."""
    if plan.tensor_degree == 1:
        return None
    if not plan.tensor:
        raise ValueError(f"the plan has tensor degree {plan.tensor_degree} but records no layout: plan again")
    try:
        layout = TensorParallelPlan(**plan.tensor)
    except TypeError as e:
        raise ValueError(f"corrupt partitioner plan: its tensor-parallel layout: {e}") from None
    if layout.tp != plan.tensor_degree:
        raise ValueError(
            f"corrupt partitioner plan: layout for tp={layout.tp} in a plan of tensor degree {plan.tensor_degree}"
        )
    return layout


def context_layout(plan: Plan, gm: fx.GraphModule) -> ContextLayout | None:
    """The context-parallel layout a plan records (None at context degree 1), derived again from the captured graph
    by its record (degree, chunk order, sequence dims): the layout is a function of those and the graph."""
    if plan.context_degree == 1:
        return None
    record = plan.context
    return plan_context_parallel(
        gm, plan.context_degree, seq_dims=record.get("seq_dims"), balance=record.get("balance")
    )


def rank_graph(
    plan: Plan,
    captured: CapturedGraph,
    *,
    tp_rank: int | None = None,
    comm: TPComm | None = None,
    weights: Any = None,
    share_replicated: bool = True,
) -> fx.GraphModule:
    """The graph tensor-parallel rank `tp_rank` runs: the captured graph rewritten under the plan's layout (its
    shards sliced from `weights` where given), or the captured graph itself (tensor degree 1, or tp_rank None)."""
    layout = plan_layout(plan)
    if layout is None or tp_rank is None:
        return captured.graph_module
    if comm is None:
        raise ValueError("a tensor-parallel rank graph needs the rank's communicator (comm)")
    return tensor_parallel_rank(
        captured.graph_module, layout, tp_rank, comm, source=weights, share_replicated=share_replicated
    )


def apply(
    plan: Plan,
    captured: CapturedGraph,
    *,
    tp_rank: int | None = None,
    comm: TPComm | None = None,
    weights: Any = None,
    cp_rank: int | None = None,
    cp_comm: TPComm | None = None,
) -> list[StageModule]:
    """The plan's stage modules for tensor-parallel rank `tp_rank` (None: the unsharded graph) and context-parallel
    rank `cp_rank` (None: the whole sequence): `rank_graph`, the context-parallel rewrite (passes.context_parallel;
    output gradients left whole: the runtime averages gradients over dp x cp), then the split by the plan's
    node -> stage map (inserted nodes go with their anchors or consumers), then the padding of the plan's
    misaligned GEMMs in the stages that hold them (passes.align; at tp > 1 only those the layout leaves whole), then
    each stage's recompute regions (`passes.recompute.checkpoint_regions`), then the gated activations that save only
    their inputs (`passes.fuse_gated`, as annotate priced them). ValueError when a stage's regions do not fit its
    graph."""
    gm = rank_graph(plan, captured, tp_rank=tp_rank, comm=comm, weights=weights)
    stage_of = plan.node_stage if gm is captured.graph_module else stage_of_rank_nodes(gm, plan.node_stage)
    layout = context_layout(plan, captured.graph_module) if cp_rank is not None else None  # local runs: whole
    if layout is not None:
        if cp_comm is None:
            raise ValueError("a context-parallel rank graph needs the rank's communicator (cp_comm)")
        gm = context_parallel_rank(gm, layout, cp_rank, cp_comm, divide_output_grads=False)
        stage_of = stage_of_inserted_nodes(gm, stage_of, plan.num_stages)
    stages = split_stages(gm, stage_of, plan.num_stages)
    pads = applicable_pads(plan.padded_gemms, captured.graph_module, plan_layout(plan) if tp_rank is not None else None)
    for s, stage in enumerate(stages):  # each stage pads its own products: a small graph copied, not the whole
        mine = {name: pad for name, pad in pads.items() if plan.node_stage.get(name) == s}
        if mine:
            stages[s] = dataclasses.replace(stage, module=pad_gemms(stage.module, mine))
    for s, stage in enumerate(stages):
        regions = plan.stages[s].recompute_regions
        if not regions:
            continue
        try:
            stages[s] = dataclasses.replace(stage, module=checkpoint_regions(stage.module, regions))
        except ValueError as e:
            raise ValueError(f"plan stage {s} ({plan.stages[s].recompute} recompute): {e}") from None
    return [dataclasses.replace(stage, module=fuse_gated_activations(stage.module)) for stage in stages]
