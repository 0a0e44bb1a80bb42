"""plan.model: the annotated graph, its costs and the batch proof -> the Plan (a saved one is checked, not redone).

    planning graph + batch flow + options  ->  search over pp x tp x dp, microbatches, schedule  ->  Plan
    (or: a saved Plan  ->  its stages, layout and degrees checked against this graph and priced again)

compile (partitioner.api) runs the analyses (capture, annotate, cost, the batch proof) and hands their results
here; what leaves is plain data. Nothing here touches real weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from partitioner.apply import context_layout, plan_layout
from partitioner.capture import CapturedGraph
from partitioner.devices import DeviceSpec
from partitioner.options import CompileOptions
from partitioner.plan.batch import BatchFlow
from partitioner.plan.context import ContextLayout, infer_sequence_dims, plan_context_parallel
from partitioner.plan.context_cost import context_parallel_model
from partitioner.plan.graph import PlanningGraph, evaluate
from partitioner.plan.recompute import module_path
from partitioner.plan.schema import Plan, StagePlan, graph_fingerprint
from partitioner.plan.search import (
    Candidate,
    Degrees,
    TensorParallelModel,
    microbatch_counts,
    other_counts,
    price_candidate,
    refine_winner,
    scale_graph,
    search,
)
from partitioner.plan.sharding import DP_MODES, hsdp_shard
from partitioner.schedules import get_schedule
from partitioner.simulate import in_flight_peaks
from partitioner.units import format_bytes, format_seconds

DP_ORDER = ("",) + DP_MODES  # least sharded first

__all__ = ["PlannedModel", "TensorParallelLayouts", "batch_dims_of", "plan_model"]


@dataclass
class PlannedModel:
    """What planning produced: the Plan, and the priced layout it came from (its graph and simulation)."""

    plan: Plan
    best: Candidate
    evaluated: list[Candidate]


@dataclass
class TensorParallelLayouts:
    """(tp, sequence parallel) -> TensorParallelModel for the search: each degree's layout planned once
    (plan.tensor), or the saved plan's layout (`adopt`), which is then the one priced and run; `layouts` holds every
    one built, keyed the same way."""

    gm: fx.GraphModule
    spec: DeviceSpec
    training: bool
    strict: bool
    layouts: dict[tuple[int, bool], Any] = field(default_factory=dict)  # -> plan.tensor.TensorParallelPlan
    models: dict[tuple[int, bool], TensorParallelModel] = field(default_factory=dict)
    propagations: dict[int, Any] = field(default_factory=dict)  # tp -> plan.tensor.TensorParallelPropagation

    def __call__(self, tp: int, sequence_parallel: bool = False) -> TensorParallelModel:
        if (tp, sequence_parallel) not in self.models:
            if tp not in self.propagations:  # both layouts of a degree share its sharding decisions
                from partitioner.plan.tensor import propagate_tensor_parallel

                self.propagations[tp] = propagate_tensor_parallel(self.gm, tp, strict=self.strict,
                                                                  vocab_alignment=self.vocab_alignment)  # fmt: skip
            self._priced(self.propagations[tp].layout(sequence_parallel=sequence_parallel))
        return self.models[(tp, sequence_parallel)]

    @cached_property
    def vocab_alignment(self) -> int:
        """Rows per rank a sharded vocabulary is padded to a multiple of: the device's GEMM row alignment in elements
        where its tensor-core GEMMs pay for misaligned rows and the graph computes in such a dtype, else 1."""
        from partitioner.cost import gemm_row_step

        return gemm_row_step(self.spec, main_dtype(self.gm))

    def adopt(self, layout: Any) -> TensorParallelModel:
        """A saved plan's layout, type-checked against this graph (ValueError naming the node), never replanned."""
        from partitioner.plan.tensor import check_tensor_parallel_plan

        check_tensor_parallel_plan(self.gm, layout)
        return self._priced(layout)

    def _priced(self, layout: Any) -> TensorParallelModel:
        from partitioner.plan.tensor_cost import tp_cost

        cost = tp_cost(layout, self.gm, self.spec, training=self.training)
        key = (layout.tp, layout.sequence_parallel)
        self.layouts[key] = layout
        self.models[key] = TensorParallelModel(
            tp=layout.tp,
            node_scale=cost.node_scale,
            comm_by_node=cost.comm_by_node,
            latency_by_node=cost.latency_by_node,
            step_sync=cost.step_sync,
            overlapped=cost.overlapped,
            sharded_params={p for p, sh in layout.param_shard.items() if sh.get("dim") is not None},
            sharded_values={n for n, lay in layout.node_layout.items() if lay.startswith(("shard", "seq"))},
            fallbacks=list(layout.fallbacks),
            gathered_saves={
                c["after"] for c in layout.collectives if c.get("grad") == "reduce_scatter" and not c.get("columns")
            },  # fmt: skip
            sequence_parallel=layout.sequence_parallel
            and any(v.startswith("seq") for v in layout.node_layout.values()),
            sharded_share=_sharded_share(self.gm, layout),
            shares={**layout.local_shares, **_param_shares(self.gm, layout)},
        )
        return self.models[key]


def _param_shares(gm: fx.GraphModule, layout: Any) -> dict[str, float]:
    """Parameter -> the fraction a rank holds, for the sharded ones with a tail kept whole (others hold 1/tp)."""
    out = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        spec = layout.param_shard.get(name, {})
        if spec.get("whole") and spec.get("dim") is not None:
            out[name] = layout.param_share(name, p.shape[spec["dim"]])
    return out


def _sharded_share(gm: fx.GraphModule, layout: Any) -> float:
    """The fraction of `gm`'s parameter bytes (each tensor once) that `layout` holds as shards."""
    total = sharded = 0
    for name, p in gm.named_parameters():
        nbytes = p.numel() * p.element_size()
        total += nbytes
        if layout.param_shard.get(name, {}).get("dim") is not None:
            sharded += nbytes
    return sharded / total if total else 0.0


def plan_model(
    model_name: str,
    captured: CapturedGraph,
    pg: PlanningGraph,
    flow: BatchFlow,
    inputs: list[Any],
    options: CompileOptions,
) -> PlannedModel:
    """The Plan of an annotated, costed capture (`pg` its planning graph, `flow` its batch proof): the search's
    choice, or `options.saved_plan` checked against this graph (fingerprint, devices, batch split, TP layout)
    and priced again. Raises ValueError naming what does not fit."""
    o = options
    gm = captured.graph_module
    dims = flow.batch_dims
    refusal = None if flow.splittable else flow.refusal()
    min_chunk = _smallest_chunk(captured, dims)
    if min_chunk is None and not refusal:  # an export graph whose batch dim stayed fixed
        refusal = "the captured graph is specialized to the example's batch size (see plan.fallbacks)"
    fingerprint = graph_fingerprint(gm)
    saved = o.saved_plan
    tp_model = TensorParallelLayouts(gm, o.spec, o.training, strict=o.tensor_parallel is not None)
    context = _context_layout(gm, saved, o)
    cp_model = context_parallel_model(gm, context) if context is not None else None
    if saved is not None:
        if saved.fingerprint != fingerprint:
            raise ValueError(
                f"the plan was made for another model or another call signature (plan fingerprint "
                f"{saved.fingerprint} for {saved.model}, this model {fingerprint}): plan this model again"
            )
        if saved.devices != o.devices:
            raise ValueError(
                f"the plan is for {saved.devices} devices, compile was asked for {o.devices}: "
                f"pass devices={saved.devices} or plan again"
            )
        if saved.training != o.training:
            made, asked = ("training", "inference") if saved.training else ("inference", "training")
            raise ValueError(
                f"the plan was made for {made} (its memory, recompute and data-parallel choices are {made}'s), "
                f"compile was asked for {asked}: pass training={saved.training} or plan again"
            )
        chunks = saved.microbatches * saved.data_degree
        batch = _batch_size(inputs, captured.input_names, dims)
        if batch is not None and chunks > 1 and not refusal and batch % chunks:
            raise ValueError(
                f"the plan splits a step's batch into {saved.data_degree} replica(s) x {saved.microbatches} "
                f"microbatches = {chunks} equal chunks, which do not divide this example's batch of {batch}: use a "
                f"batch divisible by {chunks} or plan again"
            )
        if refusal and saved.microbatches * saved.data_degree > 1:
            raise ValueError(
                f"the plan splits the batch into {saved.microbatches * saved.data_degree} chunks, but {refusal}"
            )
        degrees = Degrees(saved.pipeline_degree, saved.tensor_degree, saved.data_degree, saved.context_degree)
        saved_layout = plan_layout(saved)
        mode = saved.data_parallel if degrees.grad_group > 1 and o.training else ""
        split = get_schedule(saved.schedule).split_backward
        scaled = scale_graph(pg, tp_model.adopt(saved_layout) if saved_layout is not None else None, degrees.dp,
                             mode, saved.data_parallel_shard, split_backward=split, pp=degrees.pp,
                             cp=cp_model)  # fmt: skip
        best = Candidate(
            degrees, saved.microbatches, saved.schedule, saved.num_stages // saved.pipeline_degree,
            data_parallel=mode, data_parallel_shard=saved.data_parallel_shard,
            overlap_grad_reduce=saved.overlap_grad_reduce, graph=scaled,
            sequence_parallel=saved_layout is not None and saved_layout.sequence_parallel,
        )  # fmt: skip
        flight = in_flight_peaks(saved.schedule, saved.num_stages, saved.microbatches, saved.pipeline_degree)
        price_candidate(best, [saved.node_stage[name] for name in pg.names], flight, o.spec.devices_per_node,
                        [st.recompute for st in saved.stages])  # fmt: skip
        return PlannedModel(_repriced(saved, best, gm, o), best, [best])

    max_tp = 1
    if o.tensor_parallel != 1:  # even where the devices leave no room for tp: the memory hint counts it
        from partitioner.plan.tensor import max_tensor_parallel

        max_tp = max_tensor_parallel(gm, limit=o.spec.devices_per_node)
    batch = _batch_size(inputs, captured.input_names, dims)
    if refusal and (o.microbatches or 1) > 1:
        raise ValueError(f"microbatches={o.microbatches} asks for a split, but {refusal}")
    if o.microbatches and batch and batch % o.microbatches:
        fits = microbatch_counts(batch, min_chunk or 1)
        raise ValueError(
            f"microbatches={o.microbatches} does not divide the batch of {batch} rows into equal microbatches "
            f"(with data parallelism, dp x microbatches must divide it): use one of {fits}"
        )
    if o.microbatches and batch and min_chunk and batch // o.microbatches < min_chunk:
        raise ValueError(
            f"microbatches={o.microbatches} cuts the batch of {batch} into chunks of {batch // o.microbatches}, "
            f"but the captured graph holds only for batches of {min_chunk} or more: use fewer microbatches"
        )

    modes = (o.recompute,) if o.recompute else pg.recompute_modes()  # what stages may recompute

    def run(
        layout: ContextLayout | None, like: Candidate | None = None, incumbent: Candidate | None = None
    ) -> tuple[Candidate, list[Candidate]]:
        """The search at context layout `layout`; `like`: a plan found without it, whose sequence parallelism (where
        it used tp) the search keeps; `incumbent`: the best plan so far, which it must beat (search's incumbent and
        ranked_incumbent). Every schedule is searched again: context parallelism takes devices from data
        parallelism, so each replica runs more microbatches, and which schedule is fastest can change (Llama 3 405B
        on 16,384 H100s: zbv without it, 1f1b at cp 4 and 8)."""
        schedules, sp = o.schedules, o.sequence_parallel
        if like is not None:
            sp = like.sequence_parallel if like.degrees.tp > 1 and sp is None else sp
        return search(
            pg,
            o.devices,
            tp_model=tp_model,
            max_tp=max_tp,
            batch=1 if refusal else batch,  # not splittable: one chunk, no microbatches, no data parallelism
            memory_limit=o.memory_limit,
            schedules=schedules,
            pipeline=o.pipeline,
            tensor_parallel=o.tensor_parallel,
            microbatches=o.microbatches,
            stages_per_device=o.stages_per_device,
            mincut=o.mincut,
            min_chunk=min_chunk or 1,
            recompute=modes,
            data_parallel=(o.data_parallel,) if o.data_parallel else None,
            overlap_grad_reduce=o.overlap_grad_reduce,
            sequence_parallel=sp,
            context=context_parallel_model(gm, layout) if layout is not None else None,
            incumbent=incumbent.step_time if incumbent is not None else math.inf,
            ranked_incumbent=incumbent.ranked_step if incumbent is not None else math.inf,
            refine=False,  # the winners of the context degrees compare as ranked; the one kept is refined below
        )

    try:
        if o.context_parallel is None:
            best, evaluated, context = _search_context(gm, o, run, batch=1 if refusal else batch)
        else:
            best, evaluated = run(context)
    except ValueError as e:
        if refusal:
            raise ValueError(f"{e}; the batch stays whole because {refusal}") from e
        raise
    best = refine_winner(best, evaluated, memory_limit=o.memory_limit, devices_per_node=o.spec.devices_per_node,
                         recompute=modes, mincut=o.mincut)  # fmt: skip
    evaluated.sort(key=lambda c: (not c.fits, c is not best, c.step_time, c.bound))
    tp_layout = tp_model.layouts.get((best.degrees.tp, best.sequence_parallel)) if best.degrees.tp > 1 else None
    plan = _make_plan(model_name, captured, gm, best, evaluated, fingerprint, o, tp_layout, flow, context)
    return PlannedModel(plan, best, evaluated)


def _context_layout(gm: fx.GraphModule, saved: Plan | None, o: CompileOptions) -> ContextLayout | None:
    """The context-parallel layout compile asked for, or the saved plan's (re-derived from this graph by its
    record: the layout is a function of the graph, the degree, the chunk order and the sequence dims)."""
    if saved is not None:
        return context_layout(saved, gm)
    if o.context_parallel in (None, 1):  # None: searched (_search_context)
        return None
    return plan_context_parallel(gm, o.context_parallel)


def _search_context(
    gm: fx.GraphModule, o: CompileOptions, run: Callable[..., tuple[Candidate, list[Candidate]]], *, batch: int | None
) -> tuple[Candidate, list[Candidate], ContextLayout | None]:
    """The search without context parallelism, then with it where it can pay: when no layout fits, when the best one
    recomputes activations (context parallelism divides activations, not weights), or when the batch has fewer
    samples than devices (some devices must then share a sample: by pipeline, tensor or context parallelism; a
    batch of one long sequence on 4 devices: pp2 x tp2 with one microbatch, half bubble, against cp4). cp degrees
    are tried upwards (each dividing the devices and the sequence) until two in a row do not beat the best: the step
    falls while the activations' recompute and the attention's share shrink, then rises as the gathers grow
    (gpt3-13b at 64K tokens on 64 H100s: 6.667, 6.191, 5.862, 7.713 s at cp 1, 2, 4, 8); but a degree that frees a
    pipeline stage can win after one that did not (one 2048-token sequence of a 4-layer GPT on 4 H100s: 985, 988,
    884 us at cp 1, 2, 4: cp2 still runs two stages with one microbatch). They keep the sequence parallelism the
    search chose without it and search every schedule again (cp leaves each replica more microbatches)."""
    best: Candidate | None = None
    evaluated: list[Candidate] = []
    error: ValueError | None = None
    try:
        best, evaluated = run(None)
    except ValueError as e:
        error = e
    starved = batch is not None and batch < o.devices
    if best is not None and set(best.recompute or ["none"]) == {"none"} and not starved:
        return best, evaluated, None
    if not infer_sequence_dims(gm):
        if best is None:
            raise error
        return best, evaluated, None
    like = best
    chosen: ContextLayout | None = None
    misses = 0  # degrees in a row that did not beat the best
    for cp in range(2, o.devices + 1):
        if o.devices % cp:
            continue
        found = None
        try:
            layout = plan_context_parallel(gm, cp)
            found, tried = run(layout, like, best)
            evaluated += tried
        except ValueError:  # the sequence does not split cp ways, or nothing fits / beats the best at this degree
            pass
        if found is not None and (best is None or found.step_time < best.step_time):
            best, chosen, misses = found, layout, 0
        elif best is not None and (misses := misses + 1) == 2:
            break
    if best is None:
        raise error
    evaluated.sort(key=lambda c: (not c.fits, c is not best, c.step_time, c.bound))
    return best, evaluated, chosen


def _repriced(saved: Plan, best: Candidate, gm: fx.GraphModule, o: CompileOptions) -> Plan:
    """The saved plan as compile priced it: itself when priced on the same device, memory limit and cost model;
    else the same layout (stages, nodes, regions, tensor layout) with compile's device, limit, stage figures and
    predictions (its runners-up and reasons were another device's: dropped)."""
    same = (saved.device_type == o.spec.to_dict() and saved.memory_limit == float(o.memory_limit)
            and saved.cost_model == o.cost)  # fmt: skip
    if same:
        return saved
    stages = [
        dataclasses.replace(
            st,
            compute_time=met.compute,
            comm_time=met.comm,
            peak_memory=met.peak_memory,
            param_bytes=met.param_bytes,
            send_bytes=met.send_bytes,
            activation_bytes=met.activation_bytes,
            overlaps_comm=met.overlaps_comm,
        )  # fmt: skip
        for st, met in zip(saved.stages, best.metrics)
    ]
    return dataclasses.replace(
        saved, stages=stages, device_type=o.spec.to_dict(), memory_limit=float(o.memory_limit), cost_model=o.cost,
        predicted=_predicted(gm, best, o.spec, o.devices), alternatives=[], reasons=[],
    )  # fmt: skip


def batch_dims_of(option: int | dict[str, int | None], names: list[str], inputs: list[Any]) -> dict[str, int | None]:
    """compile's batch_dim as input name -> dim (None: not per sample), checked against the example inputs."""
    if isinstance(option, dict):
        unknown = sorted(set(option) - set(names) - {"targets"})
        if unknown:
            raise ValueError(f"batch_dim names {unknown}, which are not tensor inputs of the model (those are {names})")
    dims = {n: option.get(n, 0) if isinstance(option, dict) else option for n in names}
    for (name, d), t in zip(dims.items(), inputs):
        if d is not None and not -t.dim() <= d < t.dim():
            raise ValueError(
                f"batch_dim {d} of input {name!r} is out of range for its {t.dim()} dims: name that input's batch dim "
                f"in a dict (batch_dim={{{name!r}: ...}}), or None if it is not per sample"
            )
    return {n: (d % t.dim() if d is not None else None) for (n, d), t in zip(dims.items(), inputs)}


def _smallest_chunk(captured: CapturedGraph, dims: dict[str, int | None]) -> int | None:
    """The fewest samples a microbatch may hold: 1 for fx graphs, the smallest size an export graph holds for on
    every batched input's batch dim, None where export fixed that dim (the batch cannot be split)."""
    if captured.input_shapes is None:
        return 1
    smallest = 1
    for name, d in dims.items():
        if d is None:
            continue
        spec = captured.input_shapes[name][d]
        if isinstance(spec, int):
            return None
        smallest = max(smallest, spec.min)
    if any(f.path == "batch > 1" for f in captured.fallbacks):  # refused by a guard (`batch != 1`), not the range
        smallest = max(smallest, 2)
    return smallest


def _batch_size(inputs: list[torch.Tensor], names: list[str], dims: dict[str, int | None]) -> int | None:
    """The example's number of samples: the size of the first batched input's batch dim."""
    name, t = next(((n, t) for n, t in zip(names, inputs) if dims.get(n) is not None), (None, None))
    if t is None:
        return None
    batch = int(t.shape[dims[name]])
    if batch == 0:
        raise ValueError(
            f"example input {name!r} has 0 rows: compile needs a non-empty example batch (its batch dim is what the "
            f"search splits into microbatches and data-parallel replicas)"
        )
    return batch


def _batch_dims_record(option: int | dict[str, int | None], dims: dict[str, int | None]) -> dict[str, int | None]:
    """What the plan records: each input's batch dim, and the targets' under "targets"."""
    target = option.get("targets", 0) if isinstance(option, dict) else option
    return {**dims, "targets": target}


def _json_value(v: Any) -> Any:
    return v if isinstance(v, (str, int, float, bool, type(None))) else repr(v)


def main_dtype(gm: fx.GraphModule) -> str:
    """The dtype an annotated graph computes in: that of its node with the most FLOPs ("float32" without any)."""
    flop_nodes = [n for n in gm.graph.nodes if n.meta.get("flops", 0) > 0]
    return max(flop_nodes, key=lambda n: n.meta["flops"]).meta["dtype"] if flop_nodes else "float32"


def _predicted(gm: fx.GraphModule, best: Candidate, spec: DeviceSpec, devices: int) -> dict[str, float]:
    """Headline predictions. MFU = model FLOPs per step / (step time x devices x peak FLOP/s), with
    model FLOPs = forward + backward FLOPs of the annotated graph, at the peak of its main dtype."""
    flops = sum(n.meta["flops"] + n.meta.get("bwd_flops", 0) for n in gm.graph.nodes if n.meta.get("flops", 0) > 0)
    dtype = main_dtype(gm)
    peak = spec.flops_per_second(dtype) / spec.compute_efficiency
    sim = best.simulation
    return {
        "step_time": best.step_time,
        # the step it ranked at among the others (coarse stage boundaries), before its boundaries were refined: what
        # the runners-up, priced the same way, compare with
        "ranked_step_time": best.ranked_step if math.isfinite(best.ranked_step) else best.step_time,
        "pipeline_time": sim.step_time,
        "data_parallel_sync": best.dp_sync,
        "tied_weight_sync": best.tied_sync,
        "optimizer_step": best.optimizer_time,
        "bubble_fraction": sim.bubble_fraction,
        "peak_memory": max(sim.peak_memory),
        "model_flops": float(flops),
        "mfu": flops / (best.step_time * devices * peak) if best.step_time > 0 else 0.0,
    }


def _make_plan(
    model_name: str,
    captured: CapturedGraph,
    gm: fx.GraphModule,
    best: Candidate,
    evaluated: list[Candidate],
    fingerprint: str,
    o: CompileOptions,
    tp_layout: Any,
    flow: BatchFlow,
    context: ContextLayout | None = None,
) -> Plan:
    pg, stage_of, metrics = best.graph, best.stage_of, best.metrics
    num_stages = len(metrics)
    by_name = {n.name: n for n in gm.graph.nodes}
    stage_nodes: list[list[str]] = [[] for _ in range(num_stages)]
    for name, s in zip(pg.names, stage_of):
        stage_nodes[s].append(name)
    held: list[set[str]] = [set() for _ in range(num_stages)]
    for i, ps in enumerate(pg.params):
        held[stage_of[i]].update(ps)
    stages = []
    for s, met in enumerate(metrics):
        paths = [p for p in (module_path(by_name[n]) for n in stage_nodes[s]) if p]
        span = [paths[0], paths[-1]] if paths else [""]
        flops = float(sum(by_name[n].meta["flops"] for n in stage_nodes[s]))
        regions = _stage_regions(pg, stage_of, s, met.recompute)
        stages.append(
            StagePlan(
                index=s,
                nodes=stage_nodes[s],
                modules=span if span[0] != span[-1] else span[:1],
                params=sorted(held[s]),
                param_bytes=met.param_bytes,
                flops=flops,
                compute_time=met.compute,
                comm_time=met.comm,
                peak_memory=met.peak_memory,
                send_bytes=met.send_bytes,
                activation_bytes=met.activation_bytes,
                overlaps_comm=met.overlaps_comm,
                recompute=met.recompute if regions else "none",
                recompute_regions=regions,
            )
        )
    shared = {p: sorted(s for s in range(num_stages) if p in held[s]) for p in pg.param_static}
    fallbacks = [vars(f) for f in captured.fallbacks]
    if tp_layout is not None:
        fallbacks += [{"what": f["node"], "path": "replicated", "reason": f["reason"]} for f in tp_layout.fallbacks]
    # Where the batch analysis could not prove samples independent (or refused a split), and why.
    fallbacks += [{"what": node, "path": "batch not split", "reason": reason} for node, reason in flow.mixing]
    fallbacks += [{"what": node, "path": "batch", "reason": reason} for node, reason in flow.notes]
    if context is not None:
        fallbacks += [
            {"what": n, "path": "context parallel: read whole", "reason": r} for n, r in context.fallbacks.items()
        ]
    d = best.degrees
    return Plan(
        model=model_name,
        fingerprint=fingerprint,
        capture=captured.method,
        devices=o.devices,
        device_type=o.spec.to_dict(),
        pipeline_degree=d.pp,
        tensor_degree=d.tp,
        data_degree=d.dp,
        microbatches=best.microbatches,
        schedule=best.schedule,
        training=o.training,
        memory_limit=float(o.memory_limit),
        stages=stages,
        node_stage={n: int(s) for n, s in zip(pg.names, stage_of)},
        tied_params=pg.tied,
        tied_stages={p: ss for p, ss in shared.items() if len(ss) > 1},
        fallbacks=fallbacks,
        input_names=list(captured.input_names),
        constants={k: _json_value(v) for k, v in captured.constants.items()},
        predicted=_predicted(gm, best, o.spec, o.devices),
        alternatives=[c.row() for c in evaluated if c is not best][:6],
        tensor=json.loads(tp_layout.to_json()) if tp_layout is not None else {},
        cost_model=o.cost,
        batch_dims=_batch_dims_record(o.batch_dim, flow.batch_dims),
        stage_ranks=get_schedule(best.schedule).stage_ranks(num_stages, d.pp),
        data_parallel=best.data_parallel
        or (get_schedule(best.schedule).data_parallel_mode() if d.grad_group > 1 else ""),
        data_parallel_shard=hsdp_shard(d.tp, d.dp, o.spec.devices_per_node) if best.data_parallel == "hsdp" else 0,
        overlap_grad_reduce=best.overlap_grad_reduce,
        master_weights=pg.master_weights,
        reasons=_reasons(best, evaluated, o, [st.recompute for st in stages]),
        context_degree=d.cp,
        context=(
            {"balance": context.balance, "seq_dims": {k: s.dim for k, s in context.inputs.items()}}
            if context is not None
            else {}
        ),
    )


def _reasons(best: Candidate, evaluated: list[Candidate], o: CompileOptions, planned: list[str]) -> list[str]:
    """Why the plan recomputes where it does and holds its training state as it does, in the search's own figures:
    the peak each recomputing stage would reach without recompute, and how the layout fares under less sharding.
    `planned`: each stage's mode as the plan records it ("none" where the search's mode has no region there, e.g.
    selective on a stage without an attention core: a tie the search may break either way)."""
    out = []
    modes = best.recompute or []
    if best.metrics and any(m != "none" for m in planned):
        flight = in_flight_peaks(best.schedule, len(modes), best.microbatches, best.degrees.pp)
        args = (best.graph, best.stage_of, len(modes))
        plain = evaluate(*args, microbatches=best.microbatches, in_flight=flight)
        chosen = evaluate(*args, microbatches=best.microbatches, in_flight=flight, recompute=modes)
        for s, (mode, met) in enumerate(zip(planned, best.metrics)):
            if mode != "none":  # best.metrics also hold what data parallelism adds (plan.search.price_candidate)
                out.append(
                    f"stage {s} recomputes ({mode}): keeping every activation it would peak at about "
                    f"{format_bytes(plain[s].peak_memory + met.peak_memory - chosen[s].peak_memory)}, over "
                    f"{format_bytes(o.memory_limit)}; recomputing costs {format_seconds(met.recompute_time)} per step"
                )
        if len(out) > 4:
            out = out[:2] + [f"... {len(out) - 3} more stages alike ..."] + out[-1:]
    out += _microbatch_reason(best, evaluated)
    if best.degrees.tp > 1:
        out += _sequence_reason(best, evaluated)
    out += _context_reason(best, evaluated)
    if best.data_parallel and best.data_parallel != "ddp":
        same = [c for c in evaluated if c.degrees == best.degrees and c.schedule == best.schedule and c is not best
                and c.sequence_parallel == best.sequence_parallel]  # fmt: skip
        for c in sorted(same, key=lambda c: DP_ORDER.index(c.data_parallel)):
            if DP_ORDER.index(c.data_parallel) >= DP_ORDER.index(best.data_parallel):
                continue
            if c.fits:
                at = f" at {c.microbatches} microbatches" if c.microbatches != best.microbatches else ""
                why = f"fits but takes {format_seconds(c.step_time)}{at} ({c.step_time / best.step_time:.3f}x)"
            elif c.skipped:
                continue
            else:
                why = "does not fit" + (f": {c.note[:160]}" if c.note else "")
            out.append(f"data parallel {best.data_parallel}, not {c.data_parallel}: {c.data_parallel} {why}")
    return out


def _microbatch_reason(best: Candidate, evaluated: list[Candidate]) -> list[str]:
    """Why the plan runs as many microbatches as it does: the same layout at the nearest counts below and above that
    the search priced (fewer: a larger bubble; more: each kernel's launch and each send's latency paid more often)."""
    same = other_counts(best, evaluated)
    below = max((c for c in same if c.microbatches < best.microbatches), key=lambda c: c.microbatches, default=None)
    above = min((c for c in same if c.microbatches > best.microbatches), key=lambda c: c.microbatches, default=None)
    priced = [_count_priced(c, best) for c in (below, above) if c is not None]
    chosen = f"{best.microbatches} microbatch{'es' if best.microbatches != 1 else ''}"
    return [f"{chosen}: " + "; ".join(priced)] if priced else []


def _count_priced(c: Candidate, best: Candidate) -> str:
    """How the same layout at another count compares: refined, where it was refined as the chosen one was (the
    rival count of plan.search.refine_winner), else as ranked."""
    if math.isfinite(c.refined_step):
        ratio = c.refined_step / best.step_time
        return (f"{c.microbatches} take {format_seconds(c.refined_step)} refined ({ratio:.3f}x the chosen one's; "
                f"{format_seconds(c.step_time)} as ranked)")  # fmt: skip
    ratio = c.step_time / _ranked(best)
    return f"{c.microbatches} take {format_seconds(c.step_time)} as ranked ({ratio:.3f}x the chosen one's)"


def _sequence_reason(best: Candidate, evaluated: list[Candidate]) -> list[str]:
    """Why the tp layout splits its token-wise ops over the ranks (or not): the same layout the other way, priced."""
    same = (c for c in evaluated if c.degrees == best.degrees and c.schedule == best.schedule)
    twin = next((c for c in same if c.sequence_parallel != best.sequence_parallel
                 and c.data_parallel == best.data_parallel and not c.skipped), None)  # fmt: skip
    if twin is None:
        return []
    how = "sequence parallel" if best.sequence_parallel else "no sequence parallelism"
    other = "without" if best.sequence_parallel else "with"
    if twin.fits:
        return [f"{how}: {other} it the layout takes {format_seconds(twin.step_time)} as ranked "
                f"({twin.step_time / _ranked(best):.3f}x the chosen one's), "
                f"peak {format_bytes(twin.peak_memory)}"]  # fmt: skip
    return [f"{how}: {other} it the layout does not fit" + (f": {twin.note[:160]}" if twin.note else "")]


def _ranked(best: Candidate) -> float:
    """The step the chosen candidate ranked at (before its refinement): the basis every other candidate, priced on
    coarse boundaries and never refined, is compared on."""
    return best.ranked_step if math.isfinite(best.ranked_step) else best.step_time


def _context_reason(best: Candidate, evaluated: list[Candidate]) -> list[str]:
    """Why the plan splits every sequence over cp ranks (or not), where the search priced layouts both ways."""
    fits = [c for c in evaluated if c.fits and c is not best]
    others = [c for c in fits if (c.degrees.cp > 1) != (best.degrees.cp > 1)]
    if not others:
        return []
    other = min(others, key=lambda c: c.step_time)
    ratio = f"{format_seconds(other.step_time)} as ranked ({other.step_time / _ranked(best):.3f}x the chosen one's)"
    recomputes = sorted(set(other.recompute or []) - {"none"})
    also = f", recomputing {'/'.join(recomputes)}" if recomputes else ""
    if best.degrees.cp > 1:
        return [f"context parallel {best.degrees.cp}: without it the best layout ({other.degrees}) takes {ratio}{also}"]
    return [f"no context parallelism: the best layout with it ({other.degrees}) takes {ratio}{also}"]


def _stage_regions(pg: PlanningGraph, stage_of: list[int], stage: int, mode: str) -> list[list[str]]:
    """The recompute regions of `stage` under `mode`, as node names: each region's nodes on this stage, in runs of
    consecutive planned nodes (a boundary inside a layer leaves each stage its part); "full:k": its first k whole
    layers."""
    out = []
    if mode == "none":
        return out
    for a, b in pg.stage_regions(np.asarray(stage_of), stage, mode):
        run: list[str] = []
        for i in range(a, b + 1):
            if i < b and stage_of[i] == stage:
                run.append(pg.names[i])
            elif run:
                out.append(run)
                run = []
    return out
