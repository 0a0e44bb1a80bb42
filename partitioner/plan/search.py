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

When nothing fits in memory, the error names the fewest devices that would do: over every tp degree the model
allows (up to `devices_per_node`, even those `devices` leaves no room for), each tp's stage count estimated by
plan.pipeline.devices_needed and the smallest confirmed by pricing it as the search would. With forced degrees
the error gives those layouts' own figures, and the count keeps the forced degrees (or says it does not).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from partitioner.comm import all_reduce_time
from partitioner.plan.graph import PlanningGraph, StageMetrics, price, tied_sync_time
from partitioner.plan.pipeline import (
    InfeasibleMemoryError,
    devices_needed,
    max_stages,
    plan_pipeline,
    refine_plan,
    too_many_stages,
)
from partitioner.schedules import get_schedule
from partitioner.simulate import SimResult
from partitioner.units import format_bytes

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
    out_of_memory: bool = False  # it failed on memory alone (more, smaller microbatches may help)
    skipped: bool = False  # not priced: its lower bound could not beat the best
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
    internode = degrees.tp * degrees.dp > devices_per_node
    return max(all_reduce_time(pg.spec, m.param_bytes, degrees.dp, internode=internode) for m in metrics)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _microbatch_choice(batch: int | None, dp: int, pp: int, requested: int | None, min_chunk: int = 1) -> int | None:
    """Requested count, else the largest count <= 4 pp that divides the replica's batch into chunks of at least
    `min_chunk` samples (what the captured graph holds for: an export graph may need 2). None: no such split.

    4 pp keeps the bubble small without microbatches so small that GEMMs lose efficiency (which
    the roofline does not model)."""
    if requested is not None:
        return requested
    if batch is None:
        return 4 * pp
    if batch % dp or batch // dp < min_chunk:
        return None
    per_replica = batch // dp
    return max(m for m in range(1, min(per_replica // min_chunk, 4 * pp) + 1) if per_replica % m == 0)


def search(
    pg: PlanningGraph,
    devices: int,
    *,
    tp_model: Callable[[int], TensorParallelModel | None],
    max_tp: int,
    batch: int | None,
    memory_limit: float,
    schedules: Sequence[str],
    pipeline: int | None = None,
    tensor_parallel: int | None = None,
    microbatches: int | None = None,
    stages_per_device: int | None = None,
    mincut: bool = True,
    keep: int = 5,
    min_chunk: int = 1,
) -> tuple[Candidate, list[Candidate]]:
    """Best candidate and the evaluated ones (best first). Raises InfeasibleMemoryError if none fits.

    A tp degree whose layout cannot be planned is left out with its reason (unless forced). When nothing fits,
    the error gives the fewest devices the search would need (over the tp degrees it may use), and for forced
    degrees it reports their own layouts' figures only.
    """
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

    ev = _Evaluator(pg, tp_model, memory_limit, schedules, batch, microbatches, stages_per_device,
                    forced_tp=tensor_parallel, min_chunk=min_chunk)  # fmt: skip
    candidates: list[Candidate] = []
    for d in degrees:
        candidates += ev.candidates(d)

    best: Candidate | None = None
    for c in sorted(candidates, key=lambda c: (bool(c.note), c.bound, c.degrees, c.schedule)):
        if c.note:
            continue
        if best is not None and c.bound >= best.step_time:
            c.note, c.skipped = f"skipped: its perfect-balance bound {c.bound:.4g} s is above the best step time", True
            continue
        ev.run(c)
        if c.fits and (best is None or _better(c, best)):
            best = c
    if best is not None and mincut:
        # Candidates are compared on their contiguous plans; the winner's boundaries then move to
        # min-bytes cuts, which never raises its bottleneck (plan.mincut).
        _evaluate(best, memory_limit, devices_per_node, ev.plans, refine=True)
    evaluated = sorted(candidates, key=lambda c: (not c.fits, c.step_time, c.bound))
    if best is None:
        raise _no_layout_error(ev, evaluated, devices, max_tp, pipeline, tensor_parallel, keep)
    return best, evaluated


@dataclass
class _Evaluator:
    """Builds and prices candidates the way `search` does, microbatch retries included (the device-count hint
    prices layouts the search did not try with it). Scaled graphs are kept: the plan cache keys on their id."""

    pg: PlanningGraph
    tp_model: Callable[[int], TensorParallelModel | None]
    memory_limit: float
    schedules: Sequence[str]
    batch: int | None
    microbatches: int | None
    stages_per_device: int | None
    forced_tp: int | None  # a forced degree whose layout cannot be planned is the user's error (others are left out)
    min_chunk: int = 1  # the fewest samples a microbatch may hold (the captured graph's smallest batch)
    tp_models: dict[int, TensorParallelModel | None] = field(default_factory=lambda: {1: None})
    tp_failed: dict[int, str] = field(default_factory=dict)
    scaled: dict[tuple[int, int], PlanningGraph] = field(default_factory=dict)
    plans: dict = field(default_factory=dict)

    @property
    def devices_per_node(self) -> int:
        return self.pg.spec.devices_per_node

    def graph(self, tp: int, dp: int) -> PlanningGraph | None:
        """The planning graph of (tp, dp), or None when the tp layout cannot be planned (reason in tp_failed)."""
        if tp not in self.tp_models and tp not in self.tp_failed:
            try:
                self.tp_models[tp] = self.tp_model(tp)
            except (ValueError, RuntimeError) as e:
                if tp == self.forced_tp:
                    raise
                self.tp_failed[tp] = f"no tensor-parallel layout at tp={tp}: {e}"
        if tp in self.tp_failed:
            return None
        if (tp, dp) not in self.scaled:
            self.scaled[(tp, dp)] = scale_graph(self.pg, self.tp_models[tp], dp)
        return self.scaled[(tp, dp)]

    def candidates(self, d: Degrees) -> list[Candidate]:
        """One candidate per schedule at degrees d; a note says why one cannot run."""
        g = self.graph(d.tp, d.dp)
        m = _microbatch_choice(self.batch, d.dp, d.pp, self.microbatches, self.min_chunk)
        out = []
        for schedule in self.schedules:
            k = self.stages_per_device or get_schedule(schedule).default_stages_per_rank()
            c = Candidate(d, m or 0, schedule, k, graph=g if g is not None else self.pg)
            c.bound = float(c.graph.compute.sum()) / d.pp
            if g is None:
                c.note = self.tp_failed[d.tp]
            elif m is None:
                c.note = f"batch {self.batch} does not split over {d.dp} data-parallel replicas"
                if self.min_chunk > 1:
                    c.note += f" of at least {self.min_chunk} samples (the captured graph's smallest batch)"
            elif d.pp * k > max_stages(g):
                c.note = too_many_stages(g, d.pp * k)
            out.append(c)
        return out

    def run(self, c: Candidate) -> None:
        """Price c; out of memory, retry with twice as many microbatches while they divide the batch: smaller
        microbatches hold fewer activations in flight (1F1B holds about pp of them on the first stage)."""
        _evaluate(c, self.memory_limit, self.devices_per_node, self.plans)
        while not c.fits and c.out_of_memory and self.microbatches is None and self.batch is not None:
            per_replica = self.batch // c.degrees.dp
            more = c.microbatches * 2
            if more * self.min_chunk > per_replica or per_replica % more:
                break
            c.microbatches = more
            _evaluate(c, self.memory_limit, self.devices_per_node, self.plans)

    def fits(self, d: Degrees) -> bool:
        """Whether the search at pp x tp x dp devices would find a layout at degrees d."""
        for c in self.candidates(d):
            if not c.note:
                self.run(c)
                if c.fits:
                    return True
        return False


def _no_layout_error(
    ev: _Evaluator,
    evaluated: list[Candidate],
    devices: int,
    max_tp: int,
    pipeline: int | None,
    tensor_parallel: int | None,
    keep: int,
) -> ValueError:
    """Why no candidate of `search` fits: a non-memory reason, or the memory error with a device-count hint."""
    pg, devices_per_node, batch = ev.pg, ev.devices_per_node, ev.batch
    reasons = "; ".join(f"{c.degrees} {c.schedule}: {c.note}" for c in evaluated[:keep])
    if not all(c.out_of_memory for c in evaluated if c.note and not c.skipped):
        most = max_stages(pg)
        if pipeline is not None and pipeline > most:
            return ValueError(too_many_stages(pg, pipeline))
        usable = most * min(max_tp, devices_per_node) * (batch or 1)
        if devices > usable:
            return ValueError(
                f"{devices} devices are more than this model and batch can use: at most {usable} devices "
                f"(pipeline <= {most} stages x tensor <= {min(max_tp, devices_per_node)} x data <= batch "
                f"{batch or 1}); use fewer devices or a larger batch"
            )
        return ValueError(f"no parallel layout of {devices} devices works: {reasons}")
    free = _divisors(min(max_tp, devices_per_node))
    if tensor_parallel is None and pipeline is None:
        hint = _devices_hint(ev, free, devices, None) or "no number of devices of this size holds it"
        return InfeasibleMemoryError(
            f"no parallel layout of {devices} devices fits in memory: {hint}. Tried: {reasons}"
        )
    # Forced degrees: their own layouts' figures, then how many devices would do with (or else without) them.
    forced = ", ".join(f"{k}={v}" for k, v in (("pipeline", pipeline), ("tensor_parallel", tensor_parallel)) if v)
    own = "; ".join(f"{c.degrees} {c.schedule}, {c.microbatches} microbatches: {c.note}" for c in evaluated[:keep])
    hint = _devices_hint(ev, [tensor_parallel] if tensor_parallel else free, devices, pipeline)
    if hint:
        hint = f" With {forced}, {hint}."
    elif hint := _devices_hint(ev, free, devices, None):
        hint = f" Without {forced}, {hint}."
    return InfeasibleMemoryError(f"{forced} on {devices} devices does not fit in memory: {own}.{hint}")


def _most_microbatches(batch: int | None, pp: int, requested: int | None, min_chunk: int = 1) -> int:
    """The most microbatches the search tries at pp stages and dp 1: its default count, doubled while a layout
    fails on memory and the count divides the batch into chunks of at least min_chunk (`_Evaluator.run`)."""
    m = _microbatch_choice(batch, 1, pp, requested, min_chunk) or 1
    while requested is None and batch is not None and batch % (2 * m) == 0 and batch // (2 * m) >= min_chunk:
        m *= 2
    return m


def _devices_hint(ev: _Evaluator, tps: Sequence[int], devices: int, pipeline: int | None, tries: int = 6) -> str:
    """The fewest devices N > `devices` at which the search finds a layout, over the tp degrees `tps` at dp 1 (a
    forced pipeline degree stays fixed), as "it needs about N devices of this size (pipeline p x tensor t)".

    Why over tp: under 1F1B the first stage holds about pp microbatches of 1/pp of the layers, one batch's worth
    of their activations whatever pp is, so a model whose activations alone exceed a device needs tp to split them
    (gpt3-175b, batch 256 x 2048 tokens, on 80 GiB: no pipeline alone holds it, pipeline 8 x tensor 8 does).
    Each tp's stage count is estimated with plan.pipeline.devices_needed (contiguous DP, 1F1B in-flight counts, the
    most microbatches), the smallest estimate is then priced as the search would (the simulated peak can exceed
    the DP's); one that does not fit moves on to one more stage. After `tries` prices the smallest estimate left
    is given as one; "" when no count holds the model.
    """
    queue: list[tuple[int, int, int]] = []  # (devices, pp, tp) estimates
    for tp in tps:
        g = ev.graph(tp, 1)
        if g is None:
            continue
        if pipeline is not None:  # the forced pipeline degree: can it fit at this tp?
            m = _most_microbatches(ev.batch, pipeline, ev.microbatches, ev.min_chunk)
            fits = pipeline * tp > devices
            if fits and devices_needed(g, ev.memory_limit, microbatches=m, start=pipeline) == pipeline:
                queue.append((pipeline * tp, pipeline, tp))
            continue
        stages, start = None, devices // tp + 1
        for _ in range(4):  # the count of microbatches grows with the stages: settle both
            m = _most_microbatches(ev.batch, start, ev.microbatches, ev.min_chunk)
            stages = devices_needed(g, ev.memory_limit, microbatches=m, start=start)
            if stages is None or _most_microbatches(ev.batch, stages, ev.microbatches, ev.min_chunk) >= m:
                break
            start = stages
        if stages is not None:
            queue.append((stages * tp, stages, tp))
    most = ev.pg.n - max(ev.pg.num_inputs, 1) + 1
    for _ in range(tries):
        if not queue:
            return ""
        n, pp, tp = min(queue)
        queue.remove((n, pp, tp))
        if ev.fits(Degrees(pp=pp, tp=tp, dp=1)):
            return f"it needs about {n} devices of this size (pipeline {pp} x tensor {tp})"
        if pipeline is None and pp < most:
            queue.append(((pp + 1) * tp, pp + 1, tp))
    if not queue:
        return ""
    n, pp, tp = min(queue)
    return f"it needs about {n} devices of this size (pipeline {pp} x tensor {tp}; an estimate, not simulated)"


def _better(c: Candidate, best: Candidate, tie: float = 1e-3) -> bool:
    """Faster by more than `tie` (relative), or as fast and lighter on memory: at equal speed GPipe
    holds every microbatch's activations, 1F1B only about pp of them."""
    if c.step_time < best.step_time * (1 - tie):
        return True
    return c.step_time <= best.step_time * (1 + tie) and c.peak_memory < best.peak_memory


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


def _evaluate(c: Candidate, memory_limit: float, devices_per_node: int, plans: dict, refine: bool = False) -> None:
    g = c.graph
    num_stages = c.degrees.pp * c.stages_per_device
    flight = get_schedule(c.schedule).in_flight(num_stages, c.microbatches)
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
        c.note, c.out_of_memory = str(e), True
        return
    except ValueError as e:  # a schedule refusing this microbatch count, too few nodes, ...
        c.note, c.out_of_memory = str(e).splitlines()[0][:200], False
        return
    c.note, c.out_of_memory = "", False
    if c.peak_memory > memory_limit:
        c.note = f"peaks at {format_bytes(c.peak_memory)} per device, over {format_bytes(memory_limit)}"
        c.out_of_memory = True
