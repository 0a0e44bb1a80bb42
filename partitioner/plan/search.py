"""search: choose pipeline x tensor x data degrees, microbatches and schedule for `devices=N`.

Every candidate is priced with the same machinery: the planning graph is scaled for its degrees
(`scale_graph`), planned (plan.pipeline), and its schedule replayed (partitioner.simulate):

    node time  = (forward, backward) x node_scale[tp] + the node's TP collectives    (per replica)
                 / dp                                                                 (batch per replica)
    bytes      = sharded values / tp, all values / dp; sharded parameters / tp
    step time  = simulated pipeline step + data-parallel gradient all-reduce
                 (ring: 2 (dp-1)/dp x a stage's gradient bytes / bandwidth; not overlapped with backward,
                 a conservative choice: DDP overlaps part of it)
                 + tied-weight gradient all-reduce over the ranks holding a copy (plan.graph.tied_sync_time)

TP collectives sit on the critical path inside a stage (an all-reduce separates two matmuls), so
they add to node time; the pipeline's point-to-point sends overlap compute on GPUs and add to it on
CPUs (plan.graph, DeviceSpec.overlaps_comm). Placement is
Megatron's: tp innermost (inside a node of `devices_per_node`), then dp, then pp across nodes.

Candidates are evaluated best-bound first (branch and bound): a candidate's step time can be no less
than its perfect-balance bound (total node time / pp), so once that bound exceeds the best step time
found the rest are skipped. Each evaluated candidate is kept with its figures, so the summary can say
why the winner beats the runners-up.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from partitioner.plan.graph import PlanningGraph, StageMetrics, price, tied_sync_time
from partitioner.plan.pipeline import InfeasibleMemoryError, devices_needed, plan_pipeline, refine_plan
from partitioner.simulate import SimResult

__all__ = [
    "Candidate",
    "Degrees",
    "TensorParallelModel",
    "dp_sync_time",
    "price_candidate",
    "scale_graph",
    "search",
]


@dataclass(frozen=True, order=True)
class Degrees:
    pp: int
    tp: int
    dp: int

    def __str__(self) -> str:
        return f"pp{self.pp} x tp{self.tp} x dp{self.dp}"


@dataclass(frozen=True)
class TensorParallelModel:
    """What the search needs from a TP layout at one degree (from plan.tensor: plan + tp_cost)."""

    tp: int
    node_scale: dict[str, float]  # node -> factor on its compute (1/tp if sharded)
    comm_by_node: dict[str, tuple[float, float]]  # node -> (forward, backward) collective seconds
    sharded_params: set[str]  # parameters held as 1/tp shards
    sharded_values: set[str]  # nodes whose outputs are sharded (crossing bytes / tp)
    fallbacks: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Candidate:
    degrees: Degrees
    microbatches: int
    schedule: str
    stages_per_device: int
    step_time: float = math.inf
    bound: float = 0.0  # perfect-balance lower bound on the step time
    peak_memory: float = math.inf
    pipeline_time: float = math.inf
    dp_sync: float = 0.0
    tied_sync: float = 0.0
    note: str = ""  # why it was skipped or does not fit
    stage_of: list[int] | None = None
    metrics: list[StageMetrics] | None = None
    simulation: SimResult | None = None
    graph: PlanningGraph | None = None

    @property
    def fits(self) -> bool:
        return self.stage_of is not None and not self.note

    def row(self) -> dict[str, object]:
        d = self.degrees
        out: dict[str, object] = {
            "pp": d.pp,
            "tp": d.tp,
            "dp": d.dp,
            "microbatches": self.microbatches,
            "schedule": self.schedule,
        }
        if self.fits:
            out["step_time"] = round(self.step_time, 9)
            out["peak_memory_gib"] = round(self.peak_memory / 2**30, 3)
        else:
            out["note"] = self.note
        return out


def scale_graph(pg: PlanningGraph, tp: TensorParallelModel | None, dp: int) -> PlanningGraph:
    """The planning graph one (tp rank, dp replica) sees: see the module docstring for the rules."""
    if tp is None and dp == 1:
        return pg
    fwd, bwd = pg.forward.copy(), pg.backward.copy()
    out_bytes, saved = pg.out_bytes.copy(), pg.saved_bytes.copy()
    param_static, param_bytes = dict(pg.param_static), dict(pg.param_bytes)
    if tp is not None and tp.tp > 1:
        for i, name in enumerate(pg.names):
            s = tp.node_scale.get(name, 1.0)
            cf, cb = tp.comm_by_node.get(name, (0.0, 0.0))
            fwd[i] = fwd[i] * s + cf
            bwd[i] = bwd[i] * s + (cb if pg.training else 0.0)
            if name in tp.sharded_values:
                out_bytes[i] /= tp.tp
                saved[i] /= tp.tp
        for p in tp.sharded_params:
            canonical = pg.alias_of.get(p, p)
            if canonical in param_static:
                param_static[canonical] = pg.param_static[canonical] / tp.tp
                param_bytes[canonical] = pg.param_bytes[canonical] / tp.tp
    return dataclasses.replace(
        pg,
        forward=fwd / dp,
        backward=bwd / dp,
        out_bytes=out_bytes / dp,
        saved_bytes=saved / dp,
        param_static=param_static,
        param_bytes=param_bytes,
    )


def dp_sync_time(pg: PlanningGraph, metrics: Sequence[StageMetrics], degrees: Degrees, devices_per_node: int) -> float:
    """Gradient all-reduce across data-parallel replicas after the last backward (slowest stage)."""
    if degrees.dp == 1 or not pg.training:
        return 0.0
    spec = pg.spec
    bw = spec.link_bandwidth if degrees.tp * degrees.dp <= devices_per_node else spec.internode_bandwidth
    factor = 2 * (degrees.dp - 1) / degrees.dp
    return max(spec.link_latency + factor * m.param_bytes / bw for m in metrics)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _microbatch_choice(batch: int | None, dp: int, pp: int, requested: int | None) -> int | None:
    """Requested count, else the largest count <= 4 pp that divides the replica's batch.

    4 pp keeps the bubble small without microbatches so small that GEMMs lose efficiency (which
    the roofline does not model)."""
    if requested is not None:
        return requested
    if batch is None:
        return 4 * pp
    if batch % dp:
        return None
    per_replica = batch // dp
    return max(m for m in range(1, min(per_replica, 4 * pp) + 1) if per_replica % m == 0)


def search(
    pg: PlanningGraph,
    devices: int,
    *,
    tp_model: Callable[[int], TensorParallelModel | None],
    max_tp: int,
    batch: int | None,
    memory_limit: float,
    schedules: Sequence[str],
    in_flight: Callable[[str, int, int], list[int]],
    pipeline: int | None = None,
    tensor_parallel: int | None = None,
    microbatches: int | None = None,
    stages_per_device: int | None = None,
    mincut: bool = True,
    keep: int = 5,
) -> tuple[Candidate, list[Candidate]]:
    """Best candidate and the evaluated ones (best first). Raises InfeasibleMemoryError if none fits."""
    devices_per_node = pg.spec.devices_per_node
    degrees = []
    for tp in _divisors(devices):
        if tensor_parallel is not None and tp != tensor_parallel:
            continue
        if tensor_parallel is None and (tp > min(max_tp, devices_per_node)):
            continue
        for pp in _divisors(devices // tp):
            if pipeline is not None and pp != pipeline:
                continue
            degrees.append(Degrees(pp=pp, tp=tp, dp=devices // (tp * pp)))
    if not degrees:
        raise ValueError(
            f"no pipeline x tensor x data degrees multiply to {devices} with pipeline={pipeline}, "
            f"tensor_parallel={tensor_parallel} (tensor parallelism up to {min(max_tp, devices_per_node)})"
        )

    tp_models = {d.tp: tp_model(d.tp) if d.tp > 1 else None for d in degrees}
    scaled: dict[tuple[int, int], PlanningGraph] = {}
    candidates: list[Candidate] = []
    for d in degrees:
        key = (d.tp, d.dp)
        if key not in scaled:
            scaled[key] = scale_graph(pg, tp_models[d.tp], d.dp)
        g = scaled[key]
        m = _microbatch_choice(batch, d.dp, d.pp, microbatches)
        for schedule in schedules:
            k = stages_per_device or (1 if schedule in ("gpipe", "1f1b") else 2)
            c = Candidate(d, m or 0, schedule, k, graph=g, bound=float(g.compute.sum()) / d.pp)
            if m is None:
                c.note = f"batch {batch} does not split over {d.dp} data-parallel replicas"
            elif d.pp * k > (most := g.n - max(g.num_inputs, 1) + 1):
                c.note = (
                    f"{d.pp * k} pipeline stages requested but the graph has only {most} places to put a stage: "
                    f"use at most {most} stages"
                )
            candidates.append(c)

    best: Candidate | None = None
    plans: dict = {}
    for c in sorted(candidates, key=lambda c: (bool(c.note), c.bound, c.degrees, c.schedule)):
        if c.note:
            continue
        if best is not None and c.bound >= best.step_time:
            c.note = f"skipped: its perfect-balance bound {c.bound:.4g} s is above the best step time"
            continue
        _evaluate(c, memory_limit, in_flight, devices_per_node, plans)
        # Out of memory: smaller microbatches hold fewer activations in flight (1F1B holds about pp
        # of them on the first stage), so retry with twice as many while they divide the batch.
        while not c.fits and _memory_failure(c) and microbatches is None and batch is not None:
            per_replica = batch // c.degrees.dp
            more = c.microbatches * 2
            if more > per_replica or per_replica % more:
                break
            c.microbatches = more
            _evaluate(c, memory_limit, in_flight, devices_per_node, plans)
        if c.fits and (best is None or _better(c, best)):
            best = c
    if best is not None and mincut:
        # Candidates are compared on their contiguous plans; the winner's boundaries then move to
        # min-bytes cuts, which never raises its bottleneck (plan.mincut).
        _evaluate(best, memory_limit, in_flight, devices_per_node, plans, refine=True)
    evaluated = sorted(candidates, key=lambda c: (not c.fits, c.step_time, c.bound))
    if best is None:
        reasons = "; ".join(f"{c.degrees} {c.schedule}: {c.note}" for c in evaluated[:keep])
        memory = all(_memory_failure(c) for c in evaluated if c.note and not c.note.startswith("skipped"))
        if not memory:
            most = pg.n - max(pg.num_inputs, 1) + 1
            if pipeline is not None and pipeline > most:
                raise ValueError(
                    f"{pipeline} pipeline stages requested but the graph has only {most} places to put a stage: "
                    f"use at most {most} stages"
                )
            usable = most * min(max_tp, devices_per_node) * (batch or 1)
            if devices > usable:
                raise ValueError(
                    f"{devices} devices are more than this model and batch can use: at most {usable} devices "
                    f"(pipeline <= {most} stages x tensor <= {min(max_tp, devices_per_node)} x data <= batch "
                    f"{batch or 1}); use fewer devices or a larger batch"
                )
            raise ValueError(f"no parallel layout of {devices} devices works: {reasons}")
        # One device-count estimate for the user, from the most model-parallel layout tried.
        widest = max((c for c in evaluated if c.degrees.dp == 1), key=lambda c: c.degrees.tp, default=evaluated[0])
        stages = devices_needed(
            widest.graph, memory_limit, microbatches=max(widest.microbatches, 1), start=widest.degrees.pp + 1
        )
        hint = (
            f"it needs about {stages * widest.degrees.tp} devices of this size "
            f"(pipeline {stages} x tensor {widest.degrees.tp})"
            if stages
            else "no number of devices of this size holds it"
        )
        raise InfeasibleMemoryError(f"no parallel layout of {devices} devices fits in memory: {hint}. Tried: {reasons}")
    return best, evaluated


def _better(c: Candidate, best: Candidate, tie: float = 1e-3) -> bool:
    """Faster by more than `tie` (relative), or as fast and lighter on memory: at equal speed GPipe
    holds every microbatch's activations, 1F1B only about pp of them."""
    if c.step_time < best.step_time * (1 - tie):
        return True
    return c.step_time <= best.step_time * (1 + tie) and c.peak_memory < best.peak_memory


def _memory_failure(c: Candidate) -> bool:
    return "fits" in c.note or "GiB per device" in c.note


def price_candidate(c: Candidate, stage_of: list[int], in_flight: Sequence[int], devices_per_node: int) -> None:
    """Fill a candidate's figures for an assignment: stage metrics, the replayed schedule, its peak
    memory, and the step time (pipeline + data-parallel and tied-weight gradient syncs)."""
    num_stages = c.degrees.pp * c.stages_per_device
    metrics, sim = price(c.graph, stage_of, num_stages, microbatches=c.microbatches, schedule=c.schedule,
                         num_ranks=c.degrees.pp, in_flight=in_flight)  # fmt: skip
    c.stage_of, c.metrics, c.simulation = list(stage_of), metrics, sim
    c.peak_memory = max(sim.peak_memory)
    c.pipeline_time = sim.step_time
    c.dp_sync = dp_sync_time(c.graph, metrics, c.degrees, devices_per_node)
    d = c.degrees
    c.tied_sync = tied_sync_time(c.graph, stage_of, sim.stage_to_rank, internode=d.pp * d.tp * d.dp > devices_per_node)
    c.step_time = sim.step_time + c.dp_sync + c.tied_sync


def _evaluate(
    c: Candidate,
    memory_limit: float,
    in_flight: Callable[[str, int, int], list[int]],
    devices_per_node: int,
    plans: dict,
    refine: bool = False,
) -> None:
    g = c.graph
    num_stages = c.degrees.pp * c.stages_per_device
    flight = in_flight(c.schedule, num_stages, c.microbatches)
    share = memory_limit / c.stages_per_device
    # Schedules with the same stages, microbatches and in-flight pattern get the same pipeline plan.
    # (Without a memory limit the in-flight pattern cannot change the plan.)
    key = (id(g), num_stages, c.microbatches, tuple(flight) if math.isfinite(share) else None, share)
    try:
        if key not in plans:
            plans[key] = plan_pipeline(
                g,
                num_stages,
                microbatches=c.microbatches,
                in_flight=flight,
                memory_limit=share,
                mincut=False,
                explain=False,
                rel_tol=1e-3,  # 0.1% of the bottleneck is ample to rank layouts
            )
        plan = plans[key]
        if refine:
            plan = refine_plan(g, plan, microbatches=c.microbatches, in_flight=flight, memory_limit=share)
        price_candidate(c, plan.stage_of, flight, devices_per_node)
    except InfeasibleMemoryError as e:
        c.note = str(e)
        return
    except ValueError as e:  # a schedule refusing this microbatch count, too few nodes, ...
        c.note = str(e).splitlines()[0][:200]
        return
    c.note = ""
    if c.peak_memory > memory_limit:
        c.note = f"peaks at {c.peak_memory / 2**30:.1f} GiB per device, over {memory_limit / 2**30:.1f} GiB"
