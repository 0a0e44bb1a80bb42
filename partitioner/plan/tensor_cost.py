"""plan.tensor_cost: what a tensor-parallel layout costs on a device (collectives, per-rank compute and weights),
as the pp x tp x dp search prices it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.fx as fx

from partitioner.comm import all_gather_time, all_reduce_time
from partitioner.devices import DeviceSpec
from partitioner.plan.tensor_layout import REPLICATED, TensorParallelPlan

__all__ = ["TPCost", "tp_cost"]


@dataclass(frozen=True)
class TPCost:
    """Per-step tensor-parallel figures for the pp x tp x dp search (seconds; FLOPs of the annotated batch).

    comm_forward / comm_backward: time of the plan's collectives (ring: all-reduce 2(tp-1)/tp x bytes / bw,
    all-gather and reduce-scatter (tp-1)/tp x bytes / bw, plus one latency per call). flops_per_rank: sharded
    nodes' FLOPs / tp plus replicated nodes' FLOPs (forward + backward). node_scale: node -> factor on its compute time.
    comm_by_node: node -> (forward, backward) seconds of the collectives anchored after it (to sum per stage).
    param_bytes_per_rank: parameter bytes one tp rank holds (tied parameters once; sharded ones / tp).
    latency_by_node: node -> (forward, backward) seconds of comm_by_node that do not shrink with the batch (each
    collective's latency: paid once per call, per microbatch).
    step_sync: seconds of the step-phase all-reduce (sequence parallelism's parameter gradients, all of them in one
    call once per step, after the backward; not in comm_forward / comm_backward).
    overlapped: split value -> (its column-parallel readers, seconds of each): the backward gather and
    reduce-scatter of a sequence-parallel column group (both move the value's bytes), without their latencies, which
    the runtime runs beside the
    readers' input- and weight-gradient matmuls (passes.tensor_parallel._ColumnsFromSequence); in comm_by_node in
    full, the search hides them behind those matmuls (plan.search.scale_ranks). Empty where the device's
    collectives do not run beside compute (DeviceSpec.overlaps_comm) or nothing is trained.
    """

    comm_forward: float
    comm_backward: float
    flops_per_rank: float
    flops_total: float
    node_scale: dict[str, float]
    comm_by_node: dict[str, tuple[float, float]]
    param_bytes_per_rank: float
    latency_by_node: dict[str, tuple[float, float]] = field(default_factory=dict)
    step_sync: float = 0.0
    overlapped: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)

    @property
    def comm(self) -> float:
        return self.comm_forward + self.comm_backward


def _collective_time(c: dict[str, Any], tp: int, spec: DeviceSpec, nbytes: float | None = None) -> float:
    """A ring all-reduce, or an all-gather / reduce-scatter ((tp - 1) / tp of the whole tensor's bytes each);
    sequence parallelism's scatter only slices. `nbytes`: other bytes than the collective's (0: its latency)."""
    if c["kind"] == "scatter":
        return 0.0
    collective = all_reduce_time if c["kind"] == "all_reduce" else all_gather_time
    return collective(spec, c["bytes"] if nbytes is None else nbytes, tp, internode=tp > spec.devices_per_node)


def tp_cost(plan: TensorParallelPlan, gm: fx.GraphModule, spec: DeviceSpec, *, training: bool = True) -> TPCost:
    """Communication time and per-rank compute of `plan` on `spec` (see TPCost). Bytes are per annotated batch."""
    comm_by_node: dict[str, tuple[float, float]] = {}
    latency_by_node: dict[str, tuple[float, float]] = {}
    fwd = bwd = 0.0
    step_params = {id(p): p for p in map(gm.get_parameter, plan.step_summed_params())} if training else {}
    step_bytes = sum(p.numel() * p.element_size() for p in step_params.values())  # a shared parameter once
    for c in plan.collectives:
        if c["phase"] == "step":
            continue
        t, fixed = _collective_time(c, plan.tp, spec), _collective_time(c, plan.tp, spec, 0.0)
        f, b = comm_by_node.get(c["after"], (0.0, 0.0))
        lf, lb = latency_by_node.get(c["after"], (0.0, 0.0))
        if c["phase"] == "forward":
            fwd += t
            comm_by_node[c["after"]] = (f + t, b)
            latency_by_node[c["after"]] = (lf + fixed, lb)
        elif training:
            bwd += t
            comm_by_node[c["after"]] = (f, b + t)
            latency_by_node[c["after"]] = (lf, lb + fixed)
    scale, per_rank, total = {}, 0.0, 0.0
    for n in gm.graph.nodes:
        layout = plan.node_layout.get(n.name, REPLICATED)
        # a partial value made by ops linear in one (no module rule) is whole-sized on every rank: full compute
        sharded = layout != REPLICATED and not (layout == "partial" and n.name not in plan.module_rules)
        s = plan.local_shares.get(n.name, 1.0 / plan.tp) if sharded else 1.0
        scale[n.name] = s
        flops = n.meta.get("flops", 0) + (n.meta.get("bwd_flops", 0) if training else 0)
        per_rank += flops * s
        total += flops
    seen: dict[int, float] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        dim = plan.param_shard.get(name, {"dim": None})["dim"]
        seen[id(p)] = p.numel() * p.element_size() * (plan.param_share(name, p.shape[dim]) if dim is not None else 1)
    internode = plan.tp > spec.devices_per_node
    step_sync = all_reduce_time(spec, step_bytes, plan.tp, internode=internode) if step_bytes else 0.0
    overlapped = _overlapped_backward(plan, spec) if training and spec.overlaps_comm else {}
    return TPCost(
        fwd, bwd, per_rank, total, scale, comm_by_node, sum(seen.values()), latency_by_node, step_sync, overlapped
    )


def _overlapped_backward(plan: TensorParallelPlan, spec: DeviceSpec) -> dict[str, tuple[tuple[str, ...], float]]:
    """TPCost.overlapped: each column group's backward gather and reduce-scatter (both of the split value's bytes,
    so one time for each), bandwidth terms only (a collective's latency is not hidden)."""
    backward = {(c["after"], c["kind"]) for c in plan.collectives if c["phase"] == "backward"}
    out = {}
    for c in plan.collectives:
        value = c["after"]
        if c.get("columns") and {(value, "all_gather"), (value, "reduce_scatter")} <= backward:
            moving = _collective_time(c, plan.tp, spec) - _collective_time(c, plan.tp, spec, 0.0)
            out[value] = (tuple(c["users"]), moving)
    return out
