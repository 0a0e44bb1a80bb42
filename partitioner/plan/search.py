"""search: choose pipeline x tensor x data degrees, microbatches and schedule for `devices=N`.

Every candidate is priced with the same machinery: the planning graph is scaled for its degrees
(`scale_graph`), planned (plan.pipeline), and its schedule replayed (partitioner.simulate):

    node time  = (forward, backward) x node_scale[tp] + the node's TP collectives    (per replica)
                 / dp                                                                 (batch per replica)
    bytes      = sharded values / tp, all values / dp; sharded parameters / tp
    step time  = simulated pipeline step, its actions lengthened by the data-parallel collectives they cannot hide,
                 + the data-parallel tail after the last backward (plan.sharding: what the gradient reduction
                 leaves, all of it under overlap_grad_reduce=False; zero1's all-gather)
                 + tied-weight gradient all-reduce over the ranks holding a copy (plan.graph.tied_sync_time)
                 + the optimizer step (plan.sharding.optimizer_step_time)

TP collectives sit on the critical path inside a stage (an all-reduce separates two matmuls), so
they add to node time; the pipeline's point-to-point sends overlap compute on GPUs and add to it on
CPUs (plan.graph, DeviceSpec.overlaps_comm). Placement is
Megatron's: tp innermost (inside a node of `devices_per_node`), then dp, then pp across nodes.

Candidates are evaluated best-bound first (branch and bound): a candidate's step time can be no less
than its lower bound (total node time / pp; for gpipe and 1f1b also their fill and drain over the most
microbatches it may use, simulate.step_lower_bound), so once that bound exceeds the best step time
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

import numpy as np

from partitioner.plan.communicators import communicator_bytes, rank_communicators
from partitioner.plan.context_cost import ContextParallelModel
from partitioner.plan.graph import PlanningGraph, StageMetrics, evaluate, tied_sync_time, to_stage_costs
from partitioner.plan.pipeline import (
    InfeasibleMemoryError,
    bottleneck_floor,
    devices_needed,
    max_stages,
    plan_pipeline,
    refine_plan,
    too_many_stages,
)
from partitioner.plan.price import Layout, first_stages, price_step, stage_state, step_end, step_floor, step_parts
from partitioner.plan.recompute import ScaledSaves
from partitioner.plan.recompute_bound import forced_recompute_floor
from partitioner.plan.sharding import (
    DP_MODES,
    NON_OVERLAPPED_MODES,
    data_parallel_floor,
    hsdp_shard,
    state_divisors,
)
from partitioner.plan.step import step_improver
from partitioner.progress import current, logger
from partitioner.schedules import get_schedule
from partitioner.simulate import SimResult, in_flight_peaks, step_lower_bound
from partitioner.units import format_bytes

__all__ = [
    "Candidate",
    "Degrees",
    "NoBetterLayout",
    "TensorParallelModel",
    "default_microbatches",
    "microbatch_counts",
    "other_counts",
    "price_candidate",
    "refine_winner",
    "scale_graph",
    "search",
]


class NoBetterLayout(ValueError):
    """search(incumbent=...) found nothing better: no candidate's lower bound was below the incumbent's step, or
    (with ranked_incumbent) the best candidate did not rank below the incumbent's ranked step."""


@dataclass(frozen=True, order=True)
class Degrees:
    pp: int
    tp: int
    dp: int
    cp: int = 1  # context parallelism (plan.context): ranks splitting every sequence, replicas of the weights

    def __str__(self) -> str:
        return f"pp{self.pp} x tp{self.tp}" + (f" x cp{self.cp}" if self.cp > 1 else "") + f" x dp{self.dp}"

    @property
    def grad_group(self) -> int:
        """The ranks holding the same weights whose gradients are summed (and state sharded): dp x cp."""
        return self.dp * self.cp


@dataclass(frozen=True)
class TensorParallelModel:
    """What the search needs from a TP layout at one degree (from plan.tensor: plan + tp_cost)."""

    tp: int
    node_scale: dict[str, float]  # node -> factor on its compute (1/tp if sharded)
    comm_by_node: dict[str, tuple[float, float]]  # node -> (forward, backward) collective seconds
    sharded_params: set[str]  # parameters held as 1/tp shards
    sharded_values: set[str]  # nodes whose outputs are sharded or sequence-split (crossing and saved bytes / tp)
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    gathered_saves: set[str] = field(default_factory=set)  # split values whose consumers save a gathered copy
    sequence_parallel: bool = False
    sharded_share: float = 1.0  # the fraction of the parameter bytes held as shards
    # node -> (forward, backward) seconds of comm_by_node paid per microbatch whatever the batch (the latencies)
    latency_by_node: dict[str, tuple[float, float]] = field(default_factory=dict)
    step_sync: float = 0.0  # seconds every rank spends once per step after its backward (TPCost.step_sync)
    # parameter or node -> the fraction a rank holds where it is not 1/tp (a tail kept whole: multi-query q | k | v)
    shares: dict[str, float] = field(default_factory=dict)
    # split value -> (column-parallel readers, s of its gather and of its reduce-scatter) beside their matmuls
    # (TPCost.overlapped)
    overlapped: dict[str, tuple[tuple[str, ...], float]] = field(default_factory=dict)

    def share(self, name: str) -> float:
        """The fraction of a sharded parameter or value one rank holds."""
        return self.shares.get(name, 1.0 / self.tp)


# A tp degree sharding less than this share of the parameters is no layout (plan.tensor would only copy the model
# onto tp ranks); the search leaves it out, and a forced one says why (TensorParallelLayouts).
MIN_SHARDED_SHARE = 0.05


@dataclass
class Candidate:
    degrees: Degrees
    microbatches: int
    schedule: str
    stages_per_device: int
    data_parallel: str = ""  # how replicas hold training state (plan.sharding); "" at dp 1
    data_parallel_shard: int = 0  # HSDP's shard group; 0 otherwise
    overlap_grad_reduce: bool = True  # ddp / zero1 reduce during the backward (False: after it; plan.sharding)
    sequence_parallel: bool = False  # the tp layout splits its token-wise ops over the tp ranks (plan.tensor_sequence)
    step_time: float = math.inf
    bound: float = 0.0  # lower bound on the step time (simulate.step_lower_bound; plan.pipeline.bottleneck_floor)
    ranked_step: float = math.inf  # the step it was ranked on (coarse cuts); a winner's step_time is then refined
    refined_step: float = math.inf  # a loser's step refined as the winner's was (refine_winner's rivals)
    peak_memory: float = math.inf
    pipeline_time: float = math.inf
    dp_sync: float = 0.0
    tied_sync: float = 0.0
    optimizer_time: float = 0.0  # the optimizer step after the last backward (plan.sharding.optimizer_step_time)
    note: str = ""  # why it was skipped or does not fit
    out_of_memory: bool = False  # it failed on memory alone (more, smaller microbatches may help)
    skipped: bool = False  # not priced: its lower bound could not beat the best
    stage_of: list[int] | None = None
    recompute: list[str] | None = None  # activation recomputation per stage (plan.recompute)
    metrics: list[StageMetrics] | None = None
    simulation: SimResult | None = None  # the replayed schedule (the search keeps only its winner's)
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
            **({"cp": d.cp} if d.cp > 1 else {}),
            "microbatches": self.microbatches,
            "schedule": self.schedule,
        }
        if self.sequence_parallel:
            out["sequence_parallel"] = True
        if self.data_parallel:
            out["data_parallel"] = self.data_parallel
            if not self.overlap_grad_reduce:
                out["overlap_grad_reduce"] = False
        if self.fits and self.recompute and set(self.recompute) != {"none"}:
            used = set(self.recompute)
            ks = sorted(int(m.partition(":")[2]) for m in used if m.startswith("full:"))
            layers = [f"full:{ks[0]}" + (f"-{ks[-1]}" if len(ks) > 1 else "")] if ks else []  # "full:2-6": 2 to 6
            whole = [m for m in ("selective", "full") if m in used]
            out["recompute"] = "/".join((["none"] if "none" in used else []) + layers + whole)
        if self.fits:
            out["step_time"] = float(f"{self.step_time:.12g}")
            if math.isfinite(self.refined_step):  # refined as the winner was (refine_winner's rivals)
                out["refined_step_time"] = float(f"{self.refined_step:.12g}")
            out["peak_memory_gib"] = round(self.peak_memory / 2**30, 3)
            out["peak_memory"] = float(f"{self.peak_memory:.12g}")
        else:
            out["note"] = self.note
        return out


def scale_graph(
    pg: PlanningGraph,
    tp: TensorParallelModel | None,
    dp: int,
    data_parallel: str = "",
    shard: int = 0,
    *,
    split_backward: bool = False,
    pp: int = 1,
    cp: ContextParallelModel | None = None,
) -> PlanningGraph:
    """The planning graph one (tp rank, dp replica) sees: see the module docstring for the rules; the training
    state of every parameter is sharded as `data_parallel` says (plan.sharding.state_divisors; `shard`: HSDP's
    group; `split_backward`: the schedule splits the backward). `pp`: the pipeline degree, which with tp and dp says
    whether stage-to-stage sends leave the node (PlanningGraph.p2p_internode). `cp`: a context-parallel layout
    (plan.context_cost): its split nodes' compute, crossing and saved bytes / cp, its collectives added; its ranks
    hold the parameters whole and count with dp in the state's sharding group.

    Two steps, the first shared by every data-parallel degree and mode (the search keeps it): `scale_ranks` (what
    tensor and context parallelism change per node), then `scale_replicas` (the batch / dp, the state's sharding)."""
    return scale_replicas(
        scale_ranks(pg, tp, cp), dp, data_parallel, shard, split_backward=split_backward, pp=pp,
        ranks=(tp.tp if tp is not None else 1) * (cp.cp if cp is not None else 1),
        state_group=cp.cp if cp is not None else 1,
    )  # fmt: skip


def scale_ranks(pg: PlanningGraph, tp: TensorParallelModel | None, cp: ContextParallelModel | None) -> PlanningGraph:
    """The planning graph of one tensor / context-parallel rank with the whole batch (scale_graph's first step)."""
    if tp is None and cp is None:
        return pg
    tp_degree = tp.tp if tp is not None else 1
    fwd, bwd = pg.without_fixed()  # a rank's share scales the rest; every rank pays each call's fixed part
    fixed_f, fixed_b = pg.forward_fixed.copy(), pg.backward_fixed.copy()

    def add(
        scale: dict[str, float], comm: dict[str, tuple[float, float]], latency: dict[str, tuple[float, float]]
    ) -> None:
        """Each node's share `scale` of its work, plus its collectives `comm`, of which `latency` is paid per call
        (by node name; a node not named: all of its work, no collectives). Elementwise, the loop's arithmetic."""
        nonlocal fwd, bwd, fixed_f, fixed_b
        none = (0.0, 0.0)
        share = np.array([scale.get(name, 1.0) for name in pg.names], dtype=np.float64)
        c = np.array([comm.get(name, none) for name in pg.names], dtype=np.float64).reshape(-1, 2)
        lat = np.array([latency.get(name, none) for name in pg.names], dtype=np.float64).reshape(-1, 2)
        if not pg.training:
            c[:, 1], lat[:, 1] = 0.0, 0.0
        fwd = fwd * share + c[:, 0] - lat[:, 0]
        bwd = bwd * share + c[:, 1] - lat[:, 1]
        fixed_f = fixed_f + lat[:, 0]
        fixed_b = fixed_b + lat[:, 1]

    out_bytes, saved = pg.out_bytes.copy(), pg.saved_bytes.copy()
    node_saves = pg.saves
    structure = pg.recompute_structure() if len(pg.saves) == pg.n else None  # shared: the copy saves the same storages
    if cp is not None and cp.extra_saves and len(pg.saves) == pg.n:  # gathered operands' copies, held whole
        index = {name: i for i, name in enumerate(pg.names)}
        node_saves = [dict(s) for s in pg.saves]
        for name, extra in cp.extra_saves.items():
            node_saves[index[name]][f"{name}#whole"] = extra
            saved[index[name]] += extra
        structure = None  # storages the graph does not save: a structure of its own
    param_static, param_bytes = dict(pg.param_static), dict(pg.param_bytes)

    def divisor(storage: str) -> int:
        """What a storage (`node`, or `node#k` for one it saved but did not return) is divided by: tp when the node
        that created it has a sharded or sequence-split output, unless it is an output the runtime saves gathered
        whole (sequence parallelism's inputs of rank-dependent consumers other than column-parallel groups); times
        cp where the context-parallel layout splits it."""
        by_cp = cp.divisor(storage) if cp is not None else 1
        if tp is None or tp.tp == 1 or storage in tp.gathered_saves:
            return by_cp
        node = storage.split("#")[0]
        return (1.0 / tp.share(node) if node in tp.sharded_values else 1) * by_cp

    if tp is not None and tp.tp > 1:
        comm = _hide_column_backward(pg, tp, bwd) if tp.overlapped and pg.training else tp.comm_by_node
        add(tp.node_scale, comm, tp.latency_by_node)
        for i, name in enumerate(pg.names):
            if name in tp.sharded_values:
                out_bytes[i] *= tp.share(name)
        for p in tp.sharded_params:
            canonical = pg.alias_of.get(p, p)
            if canonical in param_static:
                param_static[canonical] = pg.param_static[canonical] * tp.share(p)
                param_bytes[canonical] = pg.param_bytes[canonical] * tp.share(p)
    if cp is not None and cp.cp > 1:
        sharded = tp.sharded_values if tp is not None and tp.tp > 1 else frozenset()
        cp_comm = cp.comm_by_node(pg.spec, tp=tp_degree, sharded=sharded, training=pg.training)
        cp_latency = cp.comm_by_node(pg.spec, tp=tp_degree, sharded=sharded, training=pg.training, latency=True)
        add(cp.node_scale, cp_comm, cp_latency)
        for i, name in enumerate(pg.names):
            if name in cp.split_values:
                out_bytes[i] /= cp.cp
    if (tp is not None and tp.tp > 1) or (cp is not None and cp.cp > 1):
        if len(node_saves) == pg.n:
            seen: set[str] = set()
            for i, node in enumerate(node_saves):  # saved_bytes: each storage paid by its first saver (annotate)
                first = [k for k in node if k not in seen]
                saved[i] -= sum(node[k] * (1 - 1 / divisor(k)) for k in first)
                seen.update(first)
        else:  # a graph without storage names (synthetic): what a node saves is as sharded as its output
            saved = np.array([b / divisor(name) for name, b in zip(pg.names, saved)])
    saves = [{k: v / divisor(k) for k, v in node.items()} for node in node_saves]
    return dataclasses.replace(
        pg,
        forward=fwd + fixed_f,
        backward=bwd + fixed_b,
        forward_fixed=fixed_f,
        backward_fixed=fixed_b,
        step_sync=tp.step_sync if tp is not None and tp.tp > 1 and pg.training else 0.0,
        out_bytes=out_bytes,
        saved_bytes=saved,
        param_static=param_static,
        param_bytes=param_bytes,
        saves=saves,
        _recompute_structure=structure,
    )


def _hide_column_backward(
    pg: PlanningGraph, tp: TensorParallelModel, backward: np.ndarray
) -> dict[str, tuple[float, float]]:
    """tp.comm_by_node less what the column groups' backward collectives hide behind their readers' matmuls
    (TPCost.overlapped): a rank's share of the readers' backward (`backward`: without the fixed parts) is half input
    gradients, which the gather runs beside, and half weight gradients, which the reduce-scatter runs beside; of the
    ideal saving, min(collective, matmuls) each, the device realizes DeviceSpec.overlap_efficiency (the kernels
    share the SMs). Computed at the graph's batch: both sides shrink with a microbatch."""
    index = {name: i for i, name in enumerate(pg.names)}
    realized = pg.spec.overlap_efficiency
    comm = dict(tp.comm_by_node)
    for value, (readers, each) in tp.overlapped.items():
        half = sum(backward[index[r]] * tp.node_scale.get(r, 1.0) for r in readers if r in index) / 2
        forward, back = comm.get(value, (0.0, 0.0))
        comm[value] = (forward, back - realized * 2 * min(each, half))
    return comm


def scale_replicas(
    pg: PlanningGraph,
    dp: int,
    data_parallel: str = "",
    shard: int = 0,
    *,
    split_backward: bool = False,
    pp: int = 1,
    ranks: int = 1,
    state_group: int = 1,
) -> PlanningGraph:
    """A rank's planning graph (scale_ranks) at dp replicas: compute, crossing and saved bytes / dp, the training
    state sharded as `data_parallel` says over the dp x `state_group` ranks holding the same weights (the cp ranks);
    `ranks`: the devices of one stage of one replica (tp x cp), which with dp and pp say whether stage-to-stage sends
    leave the node (scale_graph's second step)."""
    pp_spans_nodes = pp > 1 and ranks * dp * pp > pg.spec.devices_per_node
    param_static = pg.param_static
    if data_parallel and dp * state_group > 1:  # the state is sharded over the dp x cp ranks (all hold it whole)
        param_static = dict(param_static)
        fw, fg, fo = state_divisors(data_parallel, dp * state_group, shard, split_backward=split_backward)
        for p, static in param_static.items():
            w = pg.param_bytes[p]
            g = w if static > w else 0.0  # a trainable parameter has a gradient of its own size
            param_static[p] = w / fw + g / fg + (static - w - g) / fo
    if dp == 1 and param_static is pg.param_static and pp_spans_nodes == pg.p2p_internode:
        return pg
    fwd, bwd = pg.without_fixed()  # each replica pays every call's fixed part
    scaled = dataclasses.replace(
        pg,
        p2p_internode=pp_spans_nodes,
        forward=fwd / dp + pg.forward_fixed,
        backward=bwd / dp + pg.backward_fixed,
        out_bytes=pg.out_bytes / dp,
        saved_bytes=pg.saved_bytes / dp,
        param_static=param_static,
        saves=ScaledSaves(pg.saves, dp, pg._saved_entries) if dp > 1 else pg.saves,
        _recompute_structure=pg.recompute_structure() if len(pg.saves) == pg.n else None,
    )
    # The activation models (plan.recompute: kept, recomputed and transient bytes per mode and regions) and the chain
    # floors read only what dp scales, not the training state: every data-parallel mode's copy at this dp shares them
    scaled._activation_cache = pg._replica_caches.setdefault(dp, {})
    return scaled


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def microbatch_counts(per_replica: int, min_chunk: int = 1) -> list[int]:
    """The microbatch counts a replica's `per_replica` samples split into: equal chunks of at least `min_chunk`
    samples (what the captured graph holds for), ascending. The one rule behind the default count, the retries on
    memory and the winner's moves (search)."""
    return [m for m in _divisors(per_replica) if per_replica // m >= min_chunk] if per_replica > 0 else []


def default_microbatches(batch: int | None, dp: int, pp: int, requested: int | None, min_chunk: int = 1) -> int | None:
    """Requested count, else the largest count <= 4 pp that divides the replica's batch into chunks of at least
    `min_chunk` samples (what the captured graph holds for: an export graph may need 2). None: no such split (a
    requested count too: the batch must split into dp x `requested` equal chunks, or no step could run the layout).

    4 pp is where the search starts: a small bubble at few microbatches. More are priced for memory (`_Evaluator.run`)
    and for speed (`_finer_microbatches`), fewer for the winner (`_around_the_winner`)."""
    if batch is None:
        return requested if requested is not None else 4 * pp
    if batch % dp:
        return None
    counts = microbatch_counts(batch // dp, min_chunk)
    if requested is not None:
        return requested if requested in counts else None
    return max((m for m in counts if m <= 4 * pp), default=None)


def search(
    pg: PlanningGraph,
    devices: int,
    *,
    tp_model: Callable[..., TensorParallelModel | None],
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
    recompute: Sequence[str] | None = None,
    data_parallel: Sequence[str] | None = None,
    overlap_grad_reduce: bool = True,
    sequence_parallel: bool | None = False,
    context: ContextParallelModel | None = None,
    incumbent: float = math.inf,
    ranked_incumbent: float = math.inf,
    refine: bool = True,
) -> tuple[Candidate, list[Candidate]]:
    """Best candidate and the evaluated ones (best first). Raises InfeasibleMemoryError if none fits.

    `recompute`: the activation recomputation modes stages may use (plan.recompute; default: every mode the graph
    offers), each stage taking the least recompute that fits. `data_parallel`: the modes replicas may hold their
    training state in (plan.sharding; default all of them); `overlap_grad_reduce=False` prices ddp / zero1 reducing
    after the backward and leaves the other modes out (plan.sharding.NON_OVERLAPPED_MODES). `sequence_parallel`: the
    tp layouts priced at tp > 1, with (True), without (False) or both (None) their token-wise ops split over the tp
    ranks; `tp_model(tp, sequence_parallel=True)` gives the split one. A tp degree whose layout
    cannot be planned is left out with its reason (unless forced). When nothing fits, the error gives the fewest
    devices the search would need (over the tp degrees it may use), and for forced degrees it reports their own
    layouts' figures only. `context`: a context-parallel layout every candidate uses (its degree divides the
    devices; pp x tp x dp share the rest; the data-parallel modes other than hsdp run over the dp x cp ranks).
    `incumbent`: the step of a plan found elsewhere (without context parallelism): candidates whose lower bound is
    not below it are not priced, and when none is the search raises NoBetterLayout. `ranked_incumbent`: that plan's
    step as it was ranked (before its refinement): a best candidate not ranking below it is not refined (what
    refining costs: seconds at scale) and the search raises NoBetterLayout, as candidates of one search are compared.
    `refine=False`: the best is returned as ranked (coarse cuts, a fast replay), for a caller that compares the winners
    of several searches on those figures and refines only the one it keeps (`refine_winner`).
    """
    devices_per_node = pg.spec.devices_per_node
    cp = context.cp if context is not None else 1
    if devices % cp:
        raise ValueError(f"context parallelism over {cp} ranks needs a multiple of {cp} devices, got {devices}")
    devices //= cp
    if cp > 1:  # the dp x cp ranks are one gradient group (runtime.distributed); HSDP's split of it is not supported
        data_parallel = [m for m in (data_parallel or DP_MODES) if m != "hsdp"]
    degrees = []
    for tp in _divisors(devices):
        if tensor_parallel is not None and tp != tensor_parallel:
            continue
        if tensor_parallel is None and (tp > min(max_tp, devices_per_node)):
            continue
        for pp in _divisors(devices // tp):
            if pipeline is not None and pp != pipeline:
                continue
            degrees.append(Degrees(pp=pp, tp=tp, dp=devices // (tp * pp), cp=cp))
    if not degrees:
        raise ValueError(
            f"no pipeline x tensor x data degrees multiply to {devices} with pipeline={pipeline}, "
            f"tensor_parallel={tensor_parallel} (tensor parallelism up to {min(max_tp, devices_per_node)})"
        )

    modes = tuple(recompute) if recompute is not None else pg.recompute_modes()
    ev = _Evaluator(pg, tp_model, memory_limit, schedules, batch, microbatches, stages_per_device,
                    forced_tp=tensor_parallel, min_chunk=min_chunk, recompute=modes,
                    data_parallel=tuple(data_parallel or DP_MODES),
                    overlap_grad_reduce=overlap_grad_reduce, sequence_parallel=sequence_parallel,
                    context=context)  # fmt: skip
    progress, at = current(), f" at cp{cp}" if cp > 1 else ""
    progress.work(f"degrees bounded{at}", total=len(degrees))
    candidates: list[Candidate] = []
    for d in degrees:
        candidates += ev.candidates(d)
        progress.advance()

    best: Candidate | None = None
    # Every data-parallel mode of a layout is priced, the more sharded ones too where a less sharded one fits with
    # nothing recomputed: they can be faster (each rank steps the optimizer over its shard alone; FSDP / ZeRO-2 hide
    # their collectives behind every microbatch, DDP only behind the last one's backward). gpt3-1.3b on 8 H100s,
    # batch 32: dp8 with FSDP, 0.1359 s, where the search stopped at DDP's 0.1482 s.
    bounded: set[int] = set()  # ids of the candidates skipped on their lower bound alone
    rank = {mode: k for k, mode in enumerate(("",) + DP_MODES)}
    progress.work(f"layouts searched{at}", total=len(candidates))
    for c in sorted(candidates, key=lambda c: (bool(c.note), c.bound, c.degrees, c.schedule, rank[c.data_parallel])):
        progress.advance()
        if c.note:
            continue
        if c.bound >= min(best.step_time if best is not None else math.inf, incumbent):
            c.note, c.skipped = _skip_note(c.bound), True
            bounded.add(id(c))
            continue
        # Replayed only where its coarse split could come within the margins of the best that refine_winner refines
        # rivals in. Not against the incumbent alone: a layout slower than it here may beat it at more microbatches
        # (_finer_microbatches, which starts from this search's best).
        ev.run(c, beat=(1 + _MARGIN) * best.step_time if best is not None else math.inf)
        if c.skipped:
            bounded.add(id(c))  # as one skipped before its split: _finer_microbatches may try it at more
        if c.fits and (best is None or _better(c, best)):
            best, c = c, best  # from here on c is the one that lost (if any)
        if c is not None:
            c.simulation = None  # only the winner's replay is read; a deep pipeline's holds millions of events
    if best is None and math.isfinite(incumbent) and any(c.skipped for c in candidates):
        raise NoBetterLayout(f"no layout's lower bound is below the incumbent step of {incumbent:.4g} s")
    if best is not None:
        best = _price_at_the_twins_count(ev, candidates, best)
        best = _finer_microbatches(ev, candidates, best, bounded, incumbent)
        best = _around_the_winner(ev, candidates, best)
        _price_the_twins(ev, candidates, best)
        best.ranked_step = best.step_time
        if best.step_time >= ranked_incumbent:
            raise NoBetterLayout(
                f"the best layout ranks at {best.step_time:.4g} s, not below the incumbent's {ranked_incumbent:.4g} s"
            )
    if best is not None and refine:
        best = refine_winner(best, candidates, memory_limit=memory_limit, devices_per_node=devices_per_node,
                             recompute=modes, mincut=mincut)  # fmt: skip
    evaluated = sorted(candidates, key=lambda c: (not c.fits, c is not best, c.step_time, c.bound))
    if best is None:
        raise _no_layout_error(ev, evaluated, devices, max_tp, pipeline, tensor_parallel, keep)
    return best, evaluated


def refine_winner(
    best: Candidate, candidates: list[Candidate], *, memory_limit: float, devices_per_node: int,
    recompute: Sequence[str], mincut: bool = True,
) -> Candidate:  # fmt: skip
    """The ranked winner planned in full and replayed: what `search` returns, or what a caller comparing the ranked
    winners of several searches keeps (plan.model's search over context-parallel degrees refines one plan, not one per
    degree: at gpt3-175b on 64 H100s the cp1 winner's refinement was 1,225 replays for a plan cp4 then beat).

    Candidates are compared on their coarse contiguous plans; with `mincut` the winner is planned at every cut
    position, its boundaries moved by the simulated step (plan.step), then to min-bytes cuts, which never raises its
    bottleneck (plan.mincut). Should that plan not be better, or not fit (the simulated peak can exceed the DP's), the
    ranked plan stays. The same layout at another microbatch count ranked within RIVAL_MARGIN of the winner is
    refined too, and wins if its refined step is better: moving boundaries gains more where the bubble is larger, at
    fewer microbatches, so coarse ranking can put the wrong count first (a random chain: 8 ranked 3.7% ahead of 4,
    which refined to 3.852 s against 3.977 s). So is the best-ranked candidate of each other schedule ranked within
    its margin (schedule_margin): coarse cuts fit each schedule's stages differently (several stages per rank get
    fewer cut places each), so refinement gains more for some (Llama 2 13B on 64 A100s: zbv ranked 0.2% behind
    zero-bubble and refined 2.1% ahead of it, 3.563 against 3.639 s). The result replaces its entry in
    `candidates` (other entries stay as ranked; a refined loser records its refined step) and carries its full
    replay."""
    winner = best
    if mincut:
        entry, winner = best, _refined(best, memory_limit, devices_per_node, recompute)
        for rival in _rivals(best, candidates):
            rival.ranked_step = rival.step_time
            refined_rival = _refined(rival, memory_limit, devices_per_node, recompute)
            if _better(refined_rival, winner):
                entry.refined_step = winner.step_time
                entry, winner = rival, refined_rival
            else:
                rival.refined_step = refined_rival.step_time
        candidates[:] = [winner if c is entry else c for c in candidates]
    if winner.simulation is None:  # ranked on a fast replay: its events for the plan and Gantt
        num_stages = winner.degrees.pp * winner.stages_per_device
        flight = in_flight_peaks(winner.schedule, num_stages, winner.microbatches, winner.degrees.pp)
        price_candidate(winner, winner.stage_of, flight, devices_per_node, winner.recompute)
    return winner


RIVAL_MARGIN = 0.05  # a count ranked this close to the winner's is refined too (refine_winner)
SCHEDULE_MARGIN = 0.02  # another schedule's best ranked this close to the winner's is refined too (refine_winner)
# ... or this close, for a schedule whose coarse ranking is further off its refined step (several stages per rank, or
# a split backward): Llama 2 13B on 64 A100s ranked zbv 2.4% behind pp1 HSDP, refined it 0.7% ahead
COARSE_SCHEDULE_MARGIN = 0.05


_MARGIN = max(RIVAL_MARGIN, SCHEDULE_MARGIN, COARSE_SCHEDULE_MARGIN)  # the widest of refine_winner's margins


def schedule_margin(schedule: str) -> float:
    """How close to the winner's ranked step another schedule's best must rank to be refined too (refine_winner)."""
    entry = get_schedule(schedule)
    return SCHEDULE_MARGIN if entry.single_stage and not entry.split_backward else COARSE_SCHEDULE_MARGIN


def other_counts(best: Candidate, candidates: Sequence[Candidate]) -> list[Candidate]:
    """The fitting candidates of `best`'s layout (degrees, schedule, stages per rank, data-parallel mode, sequence
    parallelism) at other microbatch counts."""
    return [
        c for c in candidates
        if c.fits and c.microbatches != best.microbatches and c.degrees == best.degrees
        and c.schedule == best.schedule and c.stages_per_device == best.stages_per_device
        and c.data_parallel == best.data_parallel and c.sequence_parallel == best.sequence_parallel
    ]  # fmt: skip


def _count_rival(best: Candidate, candidates: Sequence[Candidate]) -> Candidate | None:
    """The fastest of `other_counts` ranked within RIVAL_MARGIN of the winner; None if there is none."""
    close = [c for c in other_counts(best, candidates) if c.step_time <= best.step_time * (1 + RIVAL_MARGIN)]
    return min(close, key=lambda c: c.step_time, default=None)


def _rivals(best: Candidate, candidates: Sequence[Candidate]) -> list[Candidate]:
    """What refine_winner refines besides `best`: its count rival (_count_rival), then the best-ranked fitting
    candidate of each other schedule ranked within its margin of it (schedule_margin), closest first. Each
    schedule's, not only the closest one's: refinement gains unevenly by schedule, so the second closest can overtake
    both (Llama 2 13B on 64 A100s: pp1 HSDP ranked 3.587 s, zero-bubble 2.1% and zbv 2.4% behind it; zero-bubble
    refined to 3.639 s, zbv to 3.563 s). The default schedules (1F1B, GPipe) give one rival at most."""
    closest: dict[str, Candidate] = {}
    for c in candidates:
        if c.fits and c.schedule != best.schedule and c.step_time <= best.step_time * (1 + schedule_margin(c.schedule)):
            if c.schedule not in closest or c.step_time < closest[c.schedule].step_time:
                closest[c.schedule] = c
    count = _count_rival(best, candidates)
    return ([count] if count is not None else []) + sorted(closest.values(), key=lambda c: c.step_time)


def _refined(c: Candidate, memory_limit: float, devices_per_node: int, recompute: Sequence[str]) -> Candidate:
    """`c` refined (refine_winner), or `c` itself where the refined plan is slower or does not fit."""
    current().work(f"refining {c.degrees}")
    refined = dataclasses.replace(c)
    _evaluate(refined, memory_limit, devices_per_node, {}, refine=True, recompute=recompute)
    return refined if refined.fits and refined.step_time <= c.step_time * (1 + 1e-9) else c


def _price_the_twins(ev: _Evaluator, candidates: list[Candidate], best: Candidate) -> None:
    """Price the winner's twins (its degrees and schedule: other data-parallel modes, with or without sequence
    parallelism) skipped on a bound that the final best step does not exceed: the summary says why the plan holds its
    state and splits its token-wise ops as it does by them (plan.model._reasons). A twin's lower bound below the best
    step means that the search ran its split and skipped only its replay (`ev.run`'s `beat`, within a margin of the
    best), or its bound was compared with an incumbent; it cannot win either way."""
    for c in candidates:
        if c.skipped and c is not best and c.degrees == best.degrees and c.schedule == best.schedule:
            if ev.bound(c, [c.microbatches]) < best.step_time:
                c.note, c.skipped = "", False
                ev.run(c)
                c.simulation = None


def _price_at_the_twins_count(ev: _Evaluator, candidates: list[Candidate], best: Candidate) -> Candidate:
    """Price again, at more microbatches, the layouts whose twins (same degrees and schedule: other data-parallel
    modes, with or without sequence parallelism) ran at more; the best of all after.

    A candidate starts at the default microbatch count and doubles it only when out of memory, and more microbatches
    shrink the fill-and-drain bubble: a layout holding more memory would otherwise win by being forced to the finer
    split its lighter twin (sequence parallel, more sharded) was never priced at. Only candidates whose lower bound
    is under the best step time are priced again; a candidate's entry is replaced when the finer split is better.
    """
    most: dict[tuple[Degrees, str], int] = {}
    for c in candidates:
        if c.fits:
            key = (c.degrees, c.schedule)
            most[key] = max(most.get(key, 0), c.microbatches)
    for k, c in enumerate(candidates):
        m = most.get((c.degrees, c.schedule), 0)
        if not c.fits or c.microbatches >= m or c.bound >= best.step_time:
            continue
        finer = dataclasses.replace(c, microbatches=m, simulation=None)
        _evaluate(finer, ev.memory_limit, ev.devices_per_node, ev.plans, recompute=ev.recompute)
        if finer.fits and _better(finer, c):
            candidates[k] = finer
            if _better(finer, best):
                best, finer = finer, best
        if finer is not best:
            finer.simulation = None
    return best


def _finer_microbatches(
    ev: _Evaluator, candidates: list[Candidate], best: Candidate, bounded: set[int], incumbent: float = math.inf
) -> Candidate:
    """Price the layouts again at more microbatches while that makes them faster; the best of all after.

    The search prices a layout at its default count (4 pp, the fewest that keep the bubble small) and more only where
    memory needs them; more shrink the fill-and-drain bubble but pay each kernel's launch and each send's latency once
    more per microbatch, which the cost model prices (on an H200 the GEMM rate + launch fits GEMMs of 2,048 and 8,192
    rows alike: docs/design.md, "The pp x tp x dp search"). Each layout that fits, or was skipped on its lower bound
    alone (`bounded`: ids), moves to the next count (`_Evaluator.finer`) while its lower bound there is under the best
    step and the step improves by more than the search's tie; a candidate's entry is replaced by its best count, and
    the first count found no faster joins `candidates` (what the summary compares the chosen count with). The fastest
    layouts go first, so the best step falls early and bounds the rest. As in the search, a count whose split cannot
    come within the widest refinement margin of the best (plan.price.step_floor) is not replayed unless it could still
    beat the layout's own coarser count; a layout not priced fitting at its coarser count goes on to the next then
    (the 1T GPT at 3,072 A100s: 499 -> 436 replays, the same plan)."""
    order = sorted((k for k, c in enumerate(candidates) if c.fits or id(c) in bounded),
                   key=lambda k: candidates[k].step_time)  # fmt: skip
    for k in order:
        current = candidates[k]
        while (more := ev.finer(current)) is not None:
            trial = dataclasses.replace(current, microbatches=more, simulation=None, note="", skipped=False,
                                        out_of_memory=False)  # fmt: skip
            trial.bound = ev.bound(trial, [more])
            if trial.bound >= min(best.step_time, incumbent):
                break
            # Replayed only where it could come within the margins of the best (as the search's own candidates) or
            # beat its own coarser count: a split that can do neither would end the loop here anyway. The winner's
            # layout is always priced: the summary compares its count with this one.
            beat = math.inf if current is best else (1 + _MARGIN) * best.step_time
            ev.run(trial, beat=max(beat, current.step_time) if current.fits else beat)
            if trial.skipped and not current.fits:
                current = trial  # not near the best at this count either; fewer bubbles at the next may bring it there
                continue
            # a layout skipped on its bound may not fit at this count either: more, as the search would
            if not trial.fits or (current.fits and not _better(trial, current)):
                if trial.fits:
                    trial.simulation = None
                    candidates.append(trial)  # priced: what the summary's runners-up and reasons may show
                break
            candidates[k] = current = trial
            if _better(trial, best):
                best.simulation, best = None, trial
            else:
                trial.simulation = None  # only the winner's replay is read
    return best


def _around_the_winner(ev: _Evaluator, candidates: list[Candidate], best: Candidate) -> Candidate:
    """The winner at fewer microbatches and, where its schedule runs several stages per rank, at other counts of
    stages per rank: the two dimensions the search otherwise moves up only (4 pp microbatches or fewer where the
    batch holds fewer, more where memory needs them or they are faster; a schedule's default stages per rank). Fewer
    microbatches grow the fill-and-drain bubble but pay each send's latency and each kernel's launch fewer times;
    more stages per rank shrink the bubble but add hops. From the winner, each moves one step at a time (the next
    count dividing the batch; one stage per rank more or fewer, two at least: one is another schedule) while the
    step improves by more than the search's tie. More microbatches were priced before (`_finer_microbatches`).
    Counts the user fixed (`microbatches`, `stages_per_device`) stay, and those a schedule fixes (zbv: 2). Every
    candidate priced here joins `candidates`."""

    def improves(**change: int) -> bool:
        """Price the winner with `change`; adopt it if it fits and is better."""
        nonlocal best
        trial = dataclasses.replace(best, simulation=None, **change)
        _evaluate(trial, ev.memory_limit, ev.devices_per_node, ev.plans, recompute=ev.recompute)
        if not trial.fits:
            return False
        candidates.append(trial)
        if not _better(trial, best):
            trial.simulation = None
            return False
        best.simulation, best = None, trial
        return True

    if ev.microbatches is None and ev.batch is not None and ev.batch % best.degrees.dp == 0:
        counts = microbatch_counts(ev.batch // best.degrees.dp, ev.min_chunk)
        while best.microbatches in counts and (k := counts.index(best.microbatches)) > 0:
            if not improves(microbatches=counts[k - 1]):
                break
    if ev.stages_per_device is None and get_schedule(best.schedule).stages_per_rank is None:  # zbv: 2 always
        for step in (1, -1):
            while (k := best.stages_per_device + step) >= 2 and best.degrees.pp * k <= max_stages(best.graph):
                if not improves(stages_per_device=k):
                    break
    return best


@dataclass
class _Evaluator:
    """Builds and prices candidates the way `search` does, microbatch retries included (the device-count hint
    prices layouts the search did not try with it). Scaled graphs are kept: the plan cache keys on their id."""

    pg: PlanningGraph
    tp_model: Callable[..., TensorParallelModel | None]
    memory_limit: float
    schedules: Sequence[str]
    batch: int | None
    microbatches: int | None
    stages_per_device: int | None
    forced_tp: int | None  # a forced degree whose layout cannot be planned is the user's error (others are left out)
    min_chunk: int = 1  # the fewest samples a microbatch may hold (the captured graph's smallest batch)
    recompute: tuple[str, ...] = ("none",)  # the recompute modes stages may use
    data_parallel: tuple[str, ...] = DP_MODES  # the data-parallel modes replicas may use (plan.sharding)
    overlap_grad_reduce: bool = True  # False: ddp / zero1 reduce after the backward; the other modes are left out
    sequence_parallel: bool | None = False  # None: price tp layouts with and without sequence parallelism
    context: ContextParallelModel | None = None  # the context-parallel layout every candidate uses
    tp_models: dict[tuple[int, bool], TensorParallelModel | None] = field(
        default_factory=lambda: {(1, False): None, (1, True): None}
    )
    tp_failed: dict[tuple[int, bool], str] = field(default_factory=dict)
    scaled: dict[tuple[int, int, str, bool, bool], PlanningGraph] = field(default_factory=dict)
    ranks: dict[tuple[int, bool], PlanningGraph] = field(default_factory=dict)  # scale_ranks by (tp, sp)
    plans: dict = field(default_factory=dict)

    @property
    def devices_per_node(self) -> int:
        return self.pg.spec.devices_per_node

    def layout(self, tp: int, sp: bool = False) -> TensorParallelModel | None:
        """The tp layout (sequence-split if `sp`), or None when it cannot be planned (reason in tp_failed[(tp, sp)]);
        a sequence-parallel layout that splits nothing counts as one that cannot be planned."""
        key = (tp, sp)
        if key not in self.tp_models and key not in self.tp_failed:
            try:
                model = self.tp_model(tp, sequence_parallel=True) if sp else self.tp_model(tp)
                if sp and (model is None or not model.sequence_parallel):
                    raise ValueError("sequence parallelism finds no token-wise ops to split")
                if model is not None and model.sharded_share < MIN_SHARDED_SHARE and tp != self.forced_tp:
                    raise ValueError(
                        f"it shards {model.sharded_share:.1%} of the parameter bytes "
                        f"(< {MIN_SHARDED_SHARE:.0%}): every rank would compute nearly the whole model"
                    )
                self.tp_models[key] = model
            except (ValueError, RuntimeError) as e:
                if tp == self.forced_tp and not sp:
                    raise
                what = "sequence-parallel " if sp else ""
                self.tp_failed[key] = f"no {what}tensor-parallel layout at tp={tp}: {e}"
        return self.tp_models.get(key)

    def sp_options(self, tp: int) -> list[bool]:
        """Whether the layouts priced at tp split their token-wise ops: both unless told (never at tp 1)."""
        if tp == 1:
            return [False]
        return [False, True] if self.sequence_parallel is None else [self.sequence_parallel]

    def preferred_sp(self, tp: int) -> bool:
        """The layout holding the least (the sequence-split one where allowed and available): the device hint's."""
        return self.sp_options(tp)[-1] and self.layout(tp, True) is not None

    def graph(self, tp: int, dp: int, mode: str = "", pp: int = 1, sp: bool = False) -> PlanningGraph | None:
        """The planning graph of (tp, dp) with training state held as `mode` says, or None when the tp layout
        cannot be planned (reason in tp_failed)."""
        model = self.layout(tp, sp)
        if (tp, sp) in self.tp_failed:
            return None
        cp = self.context.cp if self.context is not None else 1
        crosses = pp > 1 and tp * cp * dp * pp > self.devices_per_node
        key = (tp, dp, mode, crosses, sp)
        if key not in self.scaled:
            base, split = mode.removesuffix(":split"), mode.endswith(":split")
            shard = hsdp_shard(tp, dp * cp, self.devices_per_node) if base == "hsdp" else 0
            if (tp, sp) not in self.ranks:  # what tp and cp change, shared by every dp degree and mode
                self.ranks[(tp, sp)] = scale_ranks(self.pg, model, self.context)
            self.scaled[key] = scale_replicas(
                self.ranks[(tp, sp)], dp, base, shard, split_backward=split, pp=pp, ranks=tp * cp, state_group=cp
            )
        return self.scaled[key]

    def modes(self, d: Degrees, schedule: str) -> list[str]:
        """The data-parallel modes worth pricing at degrees d with `schedule` ("" alone at dp 1)."""
        if d.grad_group == 1 or not self.pg.training:
            return [""]
        out = []
        for mode in self.data_parallel:
            if mode in ("ddp", "zero1") and get_schedule(schedule).split_backward:
                continue  # DDP's reducer does not follow a split backward (schedules.Schedule.data_parallel_mode)
            if mode == "hsdp" and not hsdp_shard(d.tp, d.grad_group, self.devices_per_node):
                continue
            if not self.overlap_grad_reduce and mode not in NON_OVERLAPPED_MODES:
                continue
            out.append(mode)
        return out

    def candidates(self, d: Degrees) -> list[Candidate]:
        """One candidate per schedule and data-parallel mode at degrees d; a note says why one cannot run."""
        m = default_microbatches(self.batch, d.dp, d.pp, self.microbatches, self.min_chunk)
        out = []
        # On one pipeline rank every schedule runs the microbatches one after another on one device, and 1F1B holds
        # one microbatch's activations at a time, the fewest: GPipe holds them all, the others add hops between a
        # device's own stages. Where 1F1B is searched, the others are left out there (`schedule="auto"` labelled
        # pp1 layouts "interleaved" that 1F1B runs as fast).
        alone = d.pp == 1 and "1f1b" in self.schedules and self.stages_per_device is None
        schedules = ("1f1b",) if alone else self.schedules
        combos = [(s, mode, sp) for sp in self.sp_options(d.tp) for s in schedules for mode in self.modes(d, s)]
        limit = self.memory_limit
        for schedule, mode, sp in combos:
            split = get_schedule(schedule).split_backward and mode in ("zero2", "fsdp", "hsdp")
            g = self.graph(d.tp, d.dp, mode + (":split" if split else ""), d.pp, sp)
            if g is None and sp and self.sequence_parallel is None:
                continue  # nothing to split: the layout without is priced already
            k = self.stages_per_device or get_schedule(schedule).default_stages_per_rank()
            shard = hsdp_shard(d.tp, d.grad_group, self.devices_per_node) if mode == "hsdp" else 0
            c = Candidate(d, m or 0, schedule, k, data_parallel=mode, data_parallel_shard=shard,
                          overlap_grad_reduce=self.overlap_grad_reduce, sequence_parallel=sp,
                          graph=g if g is not None else self.pg)  # fmt: skip
            c.bound = self.bound(
                c, self.microbatch_ladder(d, m) if m is not None else [1], planned=g is not None and m is not None
            )
            if g is None:
                c.note = self.tp_failed[(d.tp, sp)]
            elif m is None:
                c.note = f"batch {self.batch} does not split over {d.dp} data-parallel replicas"
                if self.microbatches is not None:
                    c.note += f" x {self.microbatches} microbatches"
                if self.min_chunk > 1:
                    c.note += f" of at least {self.min_chunk} samples (the captured graph's smallest batch)"
            elif d.pp * k > max_stages(g):
                c.note = too_many_stages(g, d.pp * k)
            elif (static := sum(g.param_static.values()) / d.pp) + (comms := _communicator_bytes(c)) > limit:
                # Even a perfectly even split of the training state overflows: no DP needed to know.
                c.note = f"its weights and training state alone need {format_bytes(static)} per device"
                if comms:
                    count = rank_communicators(d.pp, d.tp, d.cp, d.dp, mode)
                    c.note += f" and its {count} NCCL communicators {format_bytes(comms)}"
                c.note += f", over {format_bytes(limit)}"
                c.out_of_memory = True
            out.append(c)
        return out

    def bound(self, c: Candidate, counts: Sequence[int], *, planned: bool = True) -> float:
        """A lower bound on c's step at any of the microbatch counts `counts` (ascending; its split into stages and
        recompute modes free). `planned=False`: c's layout could not be built (its graph is the unsharded one) or its
        batch does not split, and only the work bound holds (such a candidate is never priced).

        Whatever the split, some rank runs its stage for the whole batch: with more stages than blocks the heaviest
        block between two coarse cuts (plan.pipeline.bottleneck_floor), not the balanced share, bounds the step, and
        ranks such layouts after shallower ones. The work: the graph's compute, and the recompute memory forces on the
        stages (one per rank), at the least over the counts; the fill and drain at the most of them."""
        d, g, k = c.degrees, c.graph, c.stages_per_device
        work = float(g.compute.sum())
        if planned and k == 1:
            work += forced_recompute_floor(g, stages=d.pp, schedule=c.schedule, microbatch_counts=counts,
                                           memory_limit=self.memory_limit, modes=self.recompute)  # fmt: skip
        bound = step_lower_bound(c.schedule, work, d.pp, counts[-1])
        if planned and d.pp * k <= max_stages(g):
            bound = max(bound, bottleneck_floor(g, d.pp * k))
        if planned and g.training:  # the rank holding the most weights: its collectives and optimizer
            bound = max(bound, data_parallel_floor(
                c.data_parallel, g.spec, tp=d.tp, dp=d.grad_group, weight_bytes=g.trainable_bytes / d.pp,
                microbatches=counts[0], element_size=g.param_element_size, shard=c.data_parallel_shard,
                split_backward=get_schedule(c.schedule).split_backward, overlap_grad_reduce=self.overlap_grad_reduce,
                master_weights=g.master_weights,
            ))  # fmt: skip
        return bound

    def finer(self, c: Candidate) -> int | None:
        """The next microbatch count above c's the search may try for speed (not memory): twice as many where they
        divide the replica's batch (chunks of at least min_chunk samples), else the most it divides into; None when
        the count is fixed (requested, or no batch) or c's is already the most."""
        if self.microbatches is not None or self.batch is None or self.batch % c.degrees.dp:
            return None
        above = [k for k in microbatch_counts(self.batch // c.degrees.dp, self.min_chunk) if k > c.microbatches]
        return min((k for k in above if k >= 2 * c.microbatches), default=max(above, default=None))

    def doubled(self, d: Degrees, m: int) -> int | None:
        """The microbatch count `run` retries after `m` on memory (twice as many, while they divide the replica's
        batch into chunks of at least min_chunk samples), or None when it may not."""
        if self.microbatches is not None or self.batch is None:
            return None
        return 2 * m if 2 * m in microbatch_counts(self.batch // d.dp, self.min_chunk) else None

    def microbatch_ladder(self, d: Degrees, m: int) -> list[int]:
        """The microbatch counts a candidate starting at `m` may be priced at: m, then doubled while `run` may (on
        memory); the last is the most it may end up with."""
        counts = [m]
        while (more := self.doubled(d, counts[-1])) is not None:
            counts.append(more)
        return counts

    def run(self, c: Candidate, beat: float = math.inf) -> None:
        """Price c; out of memory, retry with twice as many microbatches while they divide the batch: smaller
        microbatches hold fewer activations in flight (1F1B holds about pp of them on the first stage). `beat`:
        `_evaluate`'s (c is skipped where its split's step cannot go below it)."""
        _evaluate(c, self.memory_limit, self.devices_per_node, self.plans, recompute=self.recompute, beat=beat)
        while not c.fits and c.out_of_memory and (more := self.doubled(c.degrees, c.microbatches)) is not None:
            c.microbatches = more
            _evaluate(c, self.memory_limit, self.devices_per_node, self.plans, recompute=self.recompute, beat=beat)

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
    reasons = "; ".join(list(dict.fromkeys(f"{c.degrees} {c.schedule}: {c.note}" for c in evaluated))[:keep])
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
    m = default_microbatches(batch, 1, pp, requested, min_chunk) or 1
    counts = microbatch_counts(batch, min_chunk) if requested is None and batch is not None else []
    while 2 * m in counts:
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
        g = ev.graph(tp, 1, sp=ev.preferred_sp(tp))
        if g is None:
            continue
        if pipeline is not None:  # the forced pipeline degree: can it fit at this tp?
            m = _most_microbatches(ev.batch, pipeline, ev.microbatches, ev.min_chunk)
            fits = pipeline * tp > devices
            if fits and devices_needed(g, ev.memory_limit, microbatches=m, start=pipeline,
                                       recompute=ev.recompute) == pipeline:  # fmt: skip
                queue.append((pipeline * tp, pipeline, tp))
            continue
        stages, start = None, devices // tp + 1
        for _ in range(4):  # the count of microbatches grows with the stages: settle both
            m = _most_microbatches(ev.batch, start, ev.microbatches, ev.min_chunk)
            stages = devices_needed(g, ev.memory_limit, microbatches=m, start=start, recompute=ev.recompute)
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


def price_candidate(
    c: Candidate, stage_of: list[int], in_flight: Sequence[int], devices_per_node: int,
    recompute: Sequence[str] | None = None, *, fast: bool = False, metrics: Sequence[StageMetrics] | None = None,
    beat: float = math.inf,
) -> float | None:  # fmt: skip
    """Fill a candidate's figures for an assignment (and each stage's recompute mode): stage metrics with the
    data-parallel collectives each microbatch exposes, the replayed schedule, its peak memory, and the step time
    (plan.price: the pipeline, each rank's data-parallel tail, tied-weight gradient sync and optimizer step).
    `fast`: the same figures from simulate.fast_replay, without the replay's events (c.simulation stays None).
    `metrics`: the assignment's plan.graph.evaluate (c.graph, its microbatches, `in_flight`, `recompute`), when
    the caller has them (a PipelinePlan's): not computed twice. `beat`: a step the candidate matters only below;
    where plan.price.step_floor shows it cannot go below, nothing is replayed or filled in and that floor comes back
    (None: priced)."""
    d, m, g = c.degrees, c.microbatches, c.graph
    num_stages = d.pp * c.stages_per_device
    if metrics is None:
        metrics = evaluate(g, stage_of, num_stages, microbatches=m, in_flight=in_flight, recompute=recompute)
    layout, costs, state = _layout(c), to_stage_costs(g, metrics, m), stage_state(g, stage_of, num_stages)
    parts = step_parts(g, layout, costs, state)
    if math.isfinite(beat) and (floor := step_floor(parts, layout)) >= beat:
        return floor
    priced = price_step(g, layout, costs, state, fast=fast, parts=parts)
    # a rank's communicators on its first stage, as step_parts holds them
    first = first_stages(get_schedule(c.schedule).stage_ranks(num_stages, d.pp)) if layout.rank_overhead else set()
    metrics = [
        dataclasses.replace(
            met,
            forward=met.forward + m * extra.forward,
            backward=met.backward + m * extra.backward,
            static_bytes=met.static_bytes + extra.transient + (layout.rank_overhead if s in first else 0.0),
            peak_memory=met.peak_memory + extra.transient + (layout.rank_overhead if s in first else 0.0),
        )  # fmt: skip
        for s, (met, extra) in enumerate(zip(metrics, priced.data_parallel))
    ]
    sim = priced.simulation
    c.stage_of, c.metrics = list(stage_of), metrics
    c.simulation = sim if isinstance(sim, SimResult) else None
    c.recompute = [met.recompute for met in metrics]
    c.peak_memory = priced.peak_memory
    c.pipeline_time = sim.step_time
    c.dp_sync = max(priced.tails)
    spans_nodes = d.pp * d.tp * d.cp * d.dp > devices_per_node
    c.tied_sync = tied_sync_time(c.graph, stage_of, sim.stage_to_rank, internode=spans_nodes)
    c.optimizer_time = max(priced.optimizer)
    tied = set(g.tied)
    holders = sorted({sim.stage_to_rank[stage_of[i]] for i, ps in enumerate(g.params) if tied.intersection(ps)})
    c.step_time = step_end(priced, c.tied_sync, holders)
    return None


def _layout(c: Candidate) -> Layout:
    """The pricing layout: its dp is the gradient group (dp x cp: the cp ranks hold the same weights)."""
    d = c.degrees
    return Layout(d.pp, d.tp, d.grad_group, c.microbatches, c.schedule, c.data_parallel, c.data_parallel_shard,
                  c.overlap_grad_reduce, _communicator_bytes(c))  # fmt: skip


def _communicator_bytes(c: Candidate) -> float:
    """What the NCCL communicators of one of the candidate's ranks take (plan.communicators)."""
    d = c.degrees
    return communicator_bytes(c.graph.spec, d.pp, d.tp, d.cp, d.dp, c.data_parallel)


def _data_parallel_transient(c: Candidate) -> float:
    """The most the candidate's data-parallel mode holds transiently on a device: its largest layer's gathered
    weights and gradients (plan.sharding.data_parallel_cost, with the largest layer of the whole graph)."""
    if c.degrees.grad_group <= 1 or c.data_parallel not in ("zero2", "fsdp", "hsdp") or not c.graph.training:
        return 0.0
    if get_schedule(c.schedule).split_backward:
        return 0.0
    return c.graph.largest_layer_bytes * (1 if c.data_parallel == "zero2" else 3)


def _evaluate(
    c: Candidate, memory_limit: float, devices_per_node: int, plans: dict, refine: bool = False,
    recompute: Sequence[str] = ("none",), beat: float = math.inf,
) -> None:  # fmt: skip
    """Plan and price candidate `c` (its figures, or its note where it does not fit), within `memory_limit` per device.

    A device running several stages (interleaved, zbv) holds them all: the split is planned with a memory limit per
    stage, a share of the device's. An equal share (the device over its stages) is safe, since the stages together
    stay within the device, but rigid: a rank's first stage holds more microbatches in flight than its last, so a
    split balanced by compute needs more than an equal share for one stage and less for another, and an equal share
    forces recompute (or refuses the layout) where the rank as a whole fits. So the winner's refinement (`refine`)
    tries looser shares too, up to the whole device per stage, each plan kept only if the replayed schedule's peak on
    every rank (its stages together, over time) fits the device; the fastest that fits wins, never slower than the
    equal share. Ranking stays at equal shares: a looser share flatters the coarse plans candidates are ranked on
    more than it improves their refined ones (Korthikanti et al.'s 175B on 64 A100s ranked pp8 x tp8 first and
    refined it to 12.185 s, where the equal shares pick pp8 x tp4 x cp2 at 12.016 s). gpt3-175b pp8 x tp4 interleaved
    at 4 stages per rank on 64 H100s: 17.203 s with a first stage recomputing, 15.589 s with nothing recomputed.

    `beat` (ranking only): a split whose step cannot go below it (plan.price.step_floor) is not replayed; where no
    split of c's in-flight models was priced fitting and some were skipped so, c is noted as skipped, its bound the
    least of their floors."""
    # What FSDP / ZeRO-2 hold besides the stage's state (a layer's gathered weights and gradients) and what the rank's
    # NCCL communicators take are known before the split: the DP plans within what is left (plan.price adds both
    # after).
    room = memory_limit - _data_parallel_transient(c) - _communicator_bytes(c)
    v = c.stages_per_device
    # 2x, 4x, ... the equal share, up to the whole room per stage (one stage per rank: its share is the whole room)
    looser = [2**k for k in range(1, v.bit_length()) if 2**k < v] + [v] if v > 1 else []
    looser = looser if refine and math.isfinite(room) else []
    models = _in_flight_models(c) if math.isfinite(room) else [None]
    fresh = dataclasses.replace(c) if len(models) > 1 or looser else None
    first, bound, floors = True, c.bound, []
    searched: dict = {}  # the step searches from each model's split: one per objective and start (plan.step)
    for flight in models:
        for factor in [1, *looser]:  # the equal share, then 2x, 4x, ... up to the whole room per stage
            trial = c if first else dataclasses.replace(fresh)
            _evaluate_within(trial, memory_limit, room * factor / v, devices_per_node, plans, refine, recompute,
                             flight, beat, searched)  # fmt: skip
            if trial.skipped:
                floors.append(trial.bound)
            if not first and trial.fits and (not c.fits or trial.step_time < c.step_time * (1 - 1e-9)):
                for f in dataclasses.fields(c):
                    setattr(c, f.name, getattr(trial, f.name))
            first = False
    if floors and not c.fits:  # no split fits as priced, and one that was not priced may: c cannot beat `beat`
        c.bound = max(bound, min(floors))
        c.note, c.out_of_memory, c.skipped = _skip_note(c.bound), False, True
        c.step_time = c.peak_memory = math.inf


def _skip_note(bound: float) -> str:
    """The note of a candidate skipped on its lower bound."""
    return f"skipped: its lower bound {bound:.4g} s is above the best step time"


def _in_flight_models(c: Candidate) -> list[tuple[int, ...] | None]:
    """The in-flight counts per stage `c`'s split is planned with, each plan checked by the replay after: None, the
    schedule's own (simulate.in_flight_peaks); with several stages per rank also `Schedule.in_flight`'s min(p - s, m)
    where it differs.

    With several stages per rank, each stage held to an equal share of the device at its own peak count overstates
    the rank, whose stages do not peak together; where the form is lower on some stages the plan it gives can fit the
    replay with nothing recomputed where the own counts recompute (Llama 3 405B at 16,384 H100s, interleaved at 3
    stages per rank: 8.189 s against 8.390 s, which then stopped the search at 2 stages per rank, 8.184 s, instead
    of 4, 7.306 s), and where it is higher (the first stages of deep interleaved pipelines) the own counts win
    (Korthikanti's 530B + SP at 3 stages per rank, 34.083 s against 35.998 s at 2). Planning with both and keeping
    the faster that fits is never worse than either."""
    entry = get_schedule(c.schedule)
    if entry.single_stage:
        return [None]
    stages = c.degrees.pp * c.stages_per_device
    try:
        own = in_flight_peaks(c.schedule, stages, c.microbatches, c.degrees.pp)
    except ValueError:  # the schedule refuses the layout: _evaluate_within notes why
        return [None]
    form = tuple(entry.in_flight(stages, c.microbatches))
    return [None] if form == own else [None, form]


def _evaluate_within(
    c: Candidate, memory_limit: float, share: float, devices_per_node: int, plans: dict, refine: bool,
    recompute: Sequence[str], flight: Sequence[int] | None = None, beat: float = math.inf,
    searched: dict | None = None,
) -> None:  # fmt: skip
    """_evaluate with each stage's split held to `share` bytes (the rank's check against `memory_limit` after), at
    `flight` microbatches in flight per stage (None: the schedule's own, simulate.in_flight_peaks). `searched`: what
    the refinement's step searches came to, by objective and start (plan.step.step_improver)."""
    g = c.graph
    num_stages = c.degrees.pp * c.stages_per_device
    priced = False
    try:
        # A schedule refusing this layout (zbv at other than 2 stages per rank, too few microbatches) raises here.
        own = in_flight_peaks(c.schedule, num_stages, c.microbatches, c.degrees.pp)
        flight = own if flight is None else tuple(flight)
        # The split may be planned at other counts than the schedule's own (_in_flight_models), but the figures it
        # is priced and recorded with are the own counts': each stage's memory is its real peak, as a saved plan
        # repriced (plan.model) and the summary's reasons (plan.model._reasons) count it.
        at_own = flight == own
        # Schedules with the same stages, microbatches and in-flight pattern get the same pipeline plan.
        # (Without a memory limit the in-flight pattern cannot change the plan.)
        key = (id(g), num_stages, c.microbatches, tuple(flight) if math.isfinite(share) else None, share)
        args = dict(microbatches=c.microbatches, in_flight=flight, memory_limit=share, mincut=False, explain=False,
                    recompute=recompute)  # fmt: skip
        if refine:
            # The winner: planned in full (every cut position), its boundaries moved by the step (plan.step), then
            # by min-cut (plan.mincut: same bottleneck or within its tie, fewer bytes sent); the faster of the two.
            internode = c.degrees.pp * c.degrees.tp * c.degrees.cp * c.degrees.dp > devices_per_node
            improve = step_improver(g, _layout(c), num_stages, recompute=recompute, stage_memory=share,
                                    rank_memory=memory_limit, internode=internode, searched=searched)  # fmt: skip
            plan = plan_pipeline(g, num_stages, rel_tol=1e-5, improve=improve, **args)
            moved = refine_plan(g, plan, microbatches=c.microbatches, in_flight=flight, memory_limit=share)
            if moved.stage_of != plan.stage_of:
                other = dataclasses.replace(c, simulation=None)
                price_candidate(other, moved.stage_of, own, devices_per_node, moved.recompute,
                                metrics=moved.metrics if at_own else None)  # fmt: skip
                price_candidate(c, plan.stage_of, own, devices_per_node, plan.recompute,
                                metrics=plan.metrics if at_own else None)  # fmt: skip
                if not (other.peak_memory <= memory_limit and other.step_time < c.step_time * (1 - 1e-9)):
                    priced = True  # c holds the plan's figures already
                else:
                    plan = moved
        else:
            if key not in plans:
                # Candidates are ranked on coarse plans (cuts where the fewest values cross: plan.pipeline) to 0.1%
                # of the bottleneck: ample to rank layouts. Where the coarse cuts cannot make the stages, in full;
                # where they do not fit in memory, the candidate does not (the microbatch retry may still make it
                # fit). Planning such candidates in full took gpt3-175b at 64 devices from 15 s to 22 s and Llama-70B
                # from 72 s to 96 s, for the same plans.
                try:
                    plans[key] = plan_pipeline(g, num_stages, rel_tol=1e-3, coarse=True, **args)
                except InfeasibleMemoryError:
                    raise
                except ValueError:  # too few coarse cuts with compute between them (or in-place writes)
                    plans[key] = plan_pipeline(g, num_stages, rel_tol=1e-3, **args)
            plan = plans[key]
        # Candidates are ranked on fast replays; the one the search returns is replayed in full (search)
        # The plan's stage metrics are this candidate's where they were computed at its in-flight counts (a cached
        # plan without a memory limit may come from another schedule's)
        metrics = plan.metrics if (refine or math.isfinite(share)) and at_own else None
        if not priced:
            floor = price_candidate(c, plan.stage_of, own, devices_per_node, plan.recompute, fast=not refine,
                                    metrics=metrics, beat=beat)  # fmt: skip
            if floor is not None:  # it cannot beat `beat`: not replayed
                c.bound = max(c.bound, floor)
                c.note, c.out_of_memory, c.skipped = _skip_note(c.bound), False, True
                c.step_time = c.peak_memory = math.inf
                return
    except InfeasibleMemoryError as e:
        c.note, c.out_of_memory = str(e), True
        if c.stages_per_device > 1:  # the limit the split was held to is a share of the device's
            c.note += (
                f" (each of a device's {c.stages_per_device} stages held to {format_bytes(share)} of its "
                f"{format_bytes(memory_limit)})"
            )
        return
    except ValueError as e:  # a schedule refusing this microbatch count, too few nodes, ...
        c.note, c.out_of_memory = str(e).splitlines()[0][:200], False
        if refine:  # the ranked plan of the same layout was priced: this is a fault of the refinement, not the layout
            logger.warning("refining the winner %s failed (the ranked plan stays): %s", c.degrees, e)
        return
    c.note, c.out_of_memory = "", False
    if c.peak_memory > memory_limit:
        c.note = f"peaks at {format_bytes(c.peak_memory)} per device, over {format_bytes(memory_limit)}"
        c.out_of_memory = True
