"""Pipeline planning: graph + costs -> the stage of every node (a pure function, no torch state).

Two phases:
1. `contiguous_partition`: the exact optimum over splits of the topological order into S contiguous
   stages, minimizing the bottleneck stage time (compute and communication, see plan.graph), subject
   to per-device memory. Binary search on the bottleneck T; feasibility is a DP over prefixes:
       g[i] = fewest stages covering nodes [0, i) with every stage <= T and within memory
   (g[i] = 1 + min g[j] over cut points j with cost(j, i) <= T). A stage's memory is checked at the
   stage index g[j] it would get, whose in-flight microbatch count is the largest it could have.
   For the coarse plans the search ranks candidates on (cuts only where the fewest values cross, ~2 per transformer
   layer; at most EXACT_MAX_POSITIONS of them), one exact min-max DP over (stage, prefix) replaces the bisection
   (`_least_bottleneck`: exactly S stages, each holding compute, stage s at its own in-flight count; its pairs kept
   to those within the first DP's split, whose bottleneck bounds the optimum's): the 1T GPT's 311 coarse plans took
   14.6 s in 2,049 DP runs by bisection, 7.1 s so. The winner's full plan keeps the bisection: among splits of equal
   bottleneck the two pick differently, and the step search (plan.step) starts from the bisection's, which on DMAGaze
   at 8 stages leads it to a shorter step (16.60 ms against 16.92 from the exact DP's split).
   Activation recomputation is chosen here, per stage (plan.recompute): a segment may use any allowed mode,
   and is priced with the fastest that fits its memory, so the DP stays exact over (cuts, modes). Where both
   "none" and "full" are allowed, a segment may also recompute its first k whole layers in full ("full:k"), k the
   fewest that fit: layer prefix sums of the bytes full recompute saves and of the forward it reruns find k by
   one binary search (the transient counted as the largest layer's, which can only overstate it).
2. `refine_with_mincut` (plan.mincut): moves each boundary to the cheapest cut of the DAG (bytes plus
   a latency per value) within the slack the balance leaves, so non-contiguous cuts (branches, skips)
   are found. Then once more with TIE_TOLERANCE of slack: plans within 1% of the best bottleneck are
   ties, and the one whose stages spend less time on transfers wins. Transfers are the least certain
   part of the cost model (on gloo, an exchange inside a running pipeline measured 3-4x an isolated
   ping-pong of the same bytes), so at equal predicted speed the plan that sends less is the safer one.
Worked example: a 4-node chain with compute [1, 1, 1, 1] and free comm at S = 2 gives stages
[0, 0, 1, 1] and bottleneck 2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from partitioner.plan.graph import PlanningGraph, StageMetrics, evaluate
from partitioner.plan.recompute import ActivationModel, layers_recomputed, partial_mode
from partitioner.simulate import StageCost
from partitioner.units import format_bytes

__all__ = [
    "InfeasibleMemoryError",
    "PipelinePlan",
    "contiguous_partition",
    "devices_needed",
    "max_stages",
    "node_level_optimum",
    "too_many_stages",
    "plan_pipeline",
    "refine_plan",
    "stage_modes",
]


TIE_TOLERANCE = 0.01  # bottlenecks within 1% are ties, broken by transfer time (module docstring)
COARSE_MIN_CUTS = 16  # a coarse DP (cuts where the fewest values cross) needs at least this many places to cut
EXACT_MAX_POSITIONS = 1024  # coarse cut positions up to which contiguous_partition takes the exact min-max DP
# Its first windows, x the lower bound on the bottleneck (then the first split's). One wide window: a window that
# holds no split costs about as much as one that does, and the optimum of a deep pipeline lies 1.0-1.9x over the
# bound (memory forces recompute, sends add to stages); the windows 1.05, 1.25, 1.6 failed 802 times for the 324
# splits they found on the 1T GPT at 3,072 A100s (7.2 s), 1.5 alone about 135 times (4.7 s), the same plans.
WINDOWS = (1.5,)
EXACT_BRACKET = 0.05  # the full DP bisects until its bracket is this narrow (relative), then runs the exact DP once
_PAIRS = 1 << 22  # the most (start, end) pairs that exact pass may build for one stage (a few arrays of this size)


class InfeasibleMemoryError(ValueError):
    """No split into the requested number of stages fits the memory limit."""


@dataclass(frozen=True)
class PipelinePlan:
    stage_of: list[int]  # stage of every planned node
    metrics: list[StageMetrics]
    contiguous_bottleneck: float  # bottleneck of phase 1, before min-cut refinement
    moved_by_mincut: int  # nodes that phase 2 moved to another stage
    recompute: list[str] | None = None  # activation recomputation per stage (plan.recompute); None: "none"

    @property
    def bottleneck(self) -> float:
        return max(m.time for m in self.metrics)


class _Prefix:
    """Prefix sums over the topological order for O(1) contiguous-segment costs, per recompute mode `modes[k]`:
    R[k] the recomputed forward seconds, A[k] the kept activation bytes per microbatch, T_table[k] a range-max table
    of each node's transient bytes per step (its region's, held during its backward; a microbatch's is that over
    `microbatches`)."""

    def __init__(
        self, pg: PlanningGraph, microbatches: int, modes: Sequence[str] = ("none",), coarse: bool = False,
        stages: int = 1,
    ) -> None:  # fmt: skip
        n = pg.n
        self.n = n
        self.modes = tuple(modes)
        compute = pg.compute_at(microbatches)  # per step, each node's fixed part once per microbatch
        self.P = np.concatenate([[0.0], np.cumsum(compute)])
        self.F = np.concatenate([[0.0], np.cumsum(pg.forward_at(microbatches))])
        self.B = np.concatenate([[0.0], np.cumsum(pg.backward_at(microbatches))])  # monotone: differences >= 0
        self.working = np.concatenate([[0], np.cumsum(compute > 0)])  # nodes with compute, prefix counts
        # Bytes crossing a cut between positions b-1 | b of the order (value produced before b,
        # consumed at or after b); the model output counts as a consumer at position n.
        last = pg.last_use()
        used = np.flatnonzero(last > np.arange(n))
        ends = last[used] + 1
        # The removals at a position come from earlier values than its one addition: added in that order, each
        # position's float sum is the node-by-node loop's (np.bincount sums its weights in input order; a position's
        # removals first, then its one addition)
        diff = np.bincount(ends, weights=-pg.out_bytes[used], minlength=n + 2)
        diff += np.bincount(used + 1, weights=pg.out_bytes[used], minlength=n + 2)
        count = np.bincount(used + 1, minlength=n + 2) - np.bincount(ends, minlength=n + 2)
        self.cross = np.cumsum(diff)[: n + 1]
        messages = np.cumsum(count)[: n + 1]  # values crossing each cut, one message each per microbatch
        self.messages = messages
        self.w = pg.comm_times(self.cross, microbatches, messages)
        # One microbatch's send across each cut (the simulator's StageCost.send_time)
        self.hop = pg.comm_times(self.cross / microbatches, 1, messages)
        self.microbatches = microbatches
        self.w[0] = 0.0
        self.w[n] = 0.0
        self.w_in = self.w if pg.training else np.zeros(n + 1)
        self.overlaps_comm = pg.spec.overlaps_comm
        # Static memory attributed to each parameter's first reader; activations per node.
        nodes, pids, names = pg.param_reads
        _, first = np.unique(pids, return_index=True)  # each parameter's first read (reads are in node order)
        first.sort()
        reads = pg.param_arrays()[0][pids[first]]
        static = np.bincount(nodes[first], weights=reads, minlength=n).astype(np.float64, copy=False)
        self.S = np.concatenate([[0.0], np.cumsum(static)])
        models = [pg.activations(mode) for mode in self.modes]
        self.R = [np.concatenate([[0.0], np.cumsum(pg.recompute_at(m, microbatches))]) for m in models]
        self.A = [np.concatenate([[0.0], np.cumsum(m.kept)]) / microbatches for m in models]
        self.T_table = [_transient_table(pg, mode, model) for mode, model in zip(self.modes, models)]
        self.layers = None  # "full:k": per whole layer (plan.recompute's "full" regions), prefix sums
        if "none" in self.modes and "full" in self.modes and pg.regions.get("full"):
            none, full = models[self.modes.index("none")], models[self.modes.index("full")]
            spans = np.array(pg.regions["full"], dtype=np.int64)
            saved = [(none.kept[a:b].sum() - full.kept[a:b].sum()) / microbatches for a, b in spans]
            self.layers = spans
            self.D = np.concatenate([[0.0], np.cumsum(np.maximum(saved, 0.0))])
            redo = pg.recompute_at(full, microbatches)
            self.Q = np.concatenate([[0.0], np.cumsum([redo[a:b].sum() for a, b in spans])])
            self.tau = float(full.transient.max(initial=0.0)) / microbatches
            self.none = self.modes.index("none")
        # In-place writes (plan.ordering): boundaries that may not exist, and how far a stage may reach.
        order = pg.order
        self.allowed = cut_mask(pg, coarse, stages)
        self.limit = order.segment_limits(last) if order is not None else np.full(n + 1, n, dtype=np.int64)
        self.positions = np.flatnonzero(self.allowed)

    def cost(self, j: int | np.ndarray, i: int | np.ndarray, k: int = 0) -> float | np.ndarray:
        """Time of a stage holding nodes [j, i) (one j or i, or an array of them) under mode k:
        plan.graph.stage_time."""
        compute = self.P[i] - self.P[j] + self.R[k][i] - self.R[k][j]
        comm = self.w[i] + self.w_in[j]
        return np.maximum(compute, comm) if self.overlaps_comm else compute + comm

    def partial(
        self, js: np.ndarray, i: int | np.ndarray, in_flight: float | np.ndarray, memory_limit: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """("full:k" for stages [j, i), one i or one per j) k per j, the fewest whole layers of the segment to
        recompute in full for it to fit (0 where none does), and the segment's time with them."""
        lo = np.searchsorted(self.layers[:, 0], js, side="left")  # the first layer starting at or after j
        hi = np.searchsorted(self.layers[:, 1], i, side="right")  # past the last layer ending by i
        plain = self.memory(js, i, self.none, in_flight)
        need = (plain + self.tau - memory_limit) / in_flight  # bytes per microbatch the layers must give up
        idx = np.searchsorted(self.D, self.D[lo] + need, side="left")
        k = np.where((plain > memory_limit) & (idx <= hi) & (idx > lo), idx - lo, 0)
        end = np.minimum(idx, len(self.Q) - 1)
        compute = self.P[i] - self.P[js] + np.where(k > 0, self.Q[end] - self.Q[lo], 0.0)
        comm = self.w[i] + self.w_in[js]
        return k, (np.maximum(compute, comm) if self.overlaps_comm else compute + comm)

    def memory(self, js: np.ndarray, i: int | np.ndarray, k: int, in_flight: float | np.ndarray) -> np.ndarray:
        """Peak bytes of stages [j, i) for each j in js (one i, or one per j) under mode k, `in_flight` microbatches
        each: static, kept activations, and the largest region's transient during its backward (a range max)."""
        mem = self.S[i] - self.S[js] + (self.A[k][i] - self.A[k][js]) * in_flight
        if self.T_table[k] is not None:
            mem = mem + _range_max(self.T_table[k], js, np.broadcast_to(i, np.shape(js))) / self.microbatches
        return mem

    def stage_costs(self, cuts: Sequence[int], modes: Sequence[str]) -> list[StageCost]:
        """Per-microbatch costs of contiguous stages `cuts` with recompute `modes` for the simulator, from the prefix
        sums (what plan.graph.evaluate + to_stage_costs give for the same cuts, up to a parameter read on two stages,
        whose state counts on its first reader's stage only: plan.price.ContiguousState.static_bytes counts it on
        both)."""
        m, out = self.microbatches, []
        last = len(cuts) - 2
        for s, (j, i) in enumerate(zip(cuts, cuts[1:])):
            mode = modes[s]
            forward = self.F[i] - self.F[j]
            backward = self.B[i] - self.B[j]
            layers = layers_recomputed(mode)
            if layers is None:
                k = self.modes.index(mode)
                backward += self.R[k][i] - self.R[k][j]
                kept = self.A[k][i] - self.A[k][j]
                table = self.T_table[k]
                transient = float(_range_max(table, np.array([j]), np.array([i]))[0]) / m if table is not None else 0.0
            else:  # "full:k": the segment's first k whole layers (plan.recompute.partial_mode)
                lo = int(np.searchsorted(self.layers[:, 0], j, side="left"))
                backward += self.Q[lo + layers] - self.Q[lo]
                kept = self.A[self.none][i] - self.A[self.none][j] - (self.D[lo + layers] - self.D[lo])
                transient = self.tau
            out.append(
                StageCost(
                    forward=forward / m,
                    backward=backward / m,
                    send_time=float(self.hop[i]) if s < last else 0.0,
                    activation_bytes=max(float(kept), 0.0),
                    static_bytes=float(self.S[i] - self.S[j]),
                    transient_bytes=transient,
                )
            )
        return out

    def fitting_time(self, js: np.ndarray, i: int | np.ndarray, in_flight: float, memory_limit: float) -> np.ndarray:
        """Time of stages [j, i) for each j in js (one i, or one per j) with the fastest recompute mode that fits
        memory_limit at `in_flight` microbatches (inf where none does; partial "full:k" included)."""
        flight = np.full(js.size, in_flight)
        best = np.full(js.size, np.inf)
        for k in range(len(self.modes)):
            time = np.asarray(self.cost(js, i, k), dtype=np.float64)
            if memory_limit < np.inf:
                time = np.where(self.memory(js, i, k, flight) <= memory_limit, time, np.inf)
            best = np.minimum(best, time)
        if self.layers is not None and memory_limit < np.inf and js.size:
            layers, time = self.partial(js, i, flight, memory_limit)
            best = np.where(layers > 0, np.minimum(best, time), best)
        return best

    def modes_of(self, cuts: Sequence[int], in_flight: np.ndarray, memory_limit: float) -> list[str]:
        """Each segment's mode: the fastest that fits `memory_limit`, the less recomputing at equal time (the last
        mode when none fits). Every segment at once (plan.step asks this of every split it tries)."""
        js, ends = np.asarray(cuts[:-1], dtype=np.int64), np.asarray(cuts[1:], dtype=np.int64)
        flight = np.asarray(in_flight[: js.size], dtype=np.float64)
        # Options in order of recompute (the partial "full:k" between "selective" and "full"): the first of the
        # fastest fitting wins a tie, as the least recomputing
        options: list[tuple[float, np.ndarray, str | None]] = []
        for k, mode in enumerate(self.modes):
            time = np.asarray(self.cost(js, ends, k), dtype=np.float64)
            options.append((float(k), np.where(self.memory(js, ends, k, flight) <= memory_limit, time, np.inf), mode))
        if self.layers is not None and memory_limit < np.inf:
            layers, time = self.partial(js, ends, flight, memory_limit)
            options.append((self.modes.index("full") - 0.5, np.where(layers > 0, time, np.inf), None))
        options.sort(key=lambda option: option[0])
        times = np.stack([option[1] for option in options])
        pick = np.argmin(times, axis=0)  # the first of equal minima
        out = []
        for s, o in enumerate(pick.tolist()):
            if not np.isfinite(times[o, s]):
                out.append(self.modes[-1])
            else:
                out.append(options[o][2] or partial_mode(int(layers[s])))
        return out


def cut_mask(pg: PlanningGraph, coarse: bool = False, stages: int = 1) -> np.ndarray:
    """Where a stage boundary may go (positions 0..n of the order): where in-place writes allow one (plan.ordering);
    `coarse`: of those, only where the fewest values cross (`_coarse_level`), as many as a split into `stages` needs.
    Cached with the graph's structure (every scaled copy shares it: scaling changes no edge)."""
    level = _coarse_level(pg, coarse, stages)
    key = ("cuts", level)
    if key not in pg._structure:
        allowed = _allowed_cuts(pg)
        if level is not None:
            allowed = allowed & (_crossing_values(pg) <= level)
            allowed[0] = allowed[pg.n] = True
        pg._structure[key] = allowed
    return pg._structure[key]


def _allowed_cuts(pg: PlanningGraph) -> np.ndarray:
    """Where in-place writes allow a boundary (plan.ordering; everywhere without them), positions 0..n."""
    return pg.order.allowed_cuts() if pg.order is not None else np.ones(pg.n + 1, dtype=bool)


def _crossing_values(pg: PlanningGraph) -> np.ndarray:
    """The values crossing each cut (positions 0..n), leaving out those read all over the graph (3+ readers spread
    over more than an eighth of it): a torch.export transformer carries its rotary tables and mask from the start
    through every block, crossing every cut alike; without them the residual stream alone crosses a block boundary."""
    key = "crossing values"
    if key not in pg._structure:
        n = pg.n
        last = pg.last_use()
        src, _, returned = pg.edges
        readers = np.bincount(src, minlength=n)
        readers[returned] += 1
        used = np.flatnonzero(last > np.arange(n))
        local = used[(readers[used] < 3) | (last[used] - used <= n // 8)]
        short = np.zeros(n + 2)
        np.add.at(short, last[local] + 1, -1)
        np.add.at(short, local + 1, 1)
        pg._structure[key] = np.cumsum(short)[: n + 1]
    return pg._structure[key]


def _coarse_level(pg: PlanningGraph, coarse: bool, stages: int) -> int | None:
    """The cut set a `coarse` split into `stages` stages takes: m, the allowed cuts where at most m values cross
    (_crossing_values), m the fewest (1 or more) that leaves COARSE_MIN_CUTS places and one per stage boundary; None:
    every allowed place (not coarse, or no m leaves that many).

    A transformer's narrowest cuts are its residual stream, about 2 per layer; more stages than those (128 stages of a
    48-layer GPT) take the next-narrowest, about 11 per layer, not all ~40, which cost what a full plan costs (the
    bisection of breadth-first DPs: GPT 39.1B's 128-stage candidates were half its search). Two places per stage
    would rank deep layouts on better splits, but the next-narrowest set of a 128-layer GPT is past the exact DP's
    size (EXACT_MAX_POSITIONS): the 1T GPT's schedule='auto' search took 1.25x as long for the same plan."""
    if not coarse:
        return None
    key = ("coarse level", stages)
    if key not in pg._structure:
        allowed, messages = _allowed_cuts(pg), _crossing_values(pg)
        need = max(COARSE_MIN_CUTS, stages + 1)
        level = None
        for m in np.unique(messages[allowed]):
            narrow = allowed & (messages <= max(m, 1))
            narrow[0] = narrow[pg.n] = True
            if narrow.sum() >= need:
                level = max(int(m), 1)
                break
        pg._structure[key] = level
    return pg._structure[key]


def bottleneck_floor(pg: PlanningGraph, num_stages: int) -> float:
    """A lower bound on the compute (whole batch) of the slowest stage of a coarse contiguous split into
    `num_stages` (what plan.search ranks its candidates on: plan_pipeline(coarse=True)): the least largest compute of
    any split at the coarse cuts for that many stages (_chain_floor, _coarse_level), or at every position where even
    the widest coarse cuts are too few for them or in-place writes pin nodes together (the coarse plan may then fail
    with cuts to spare, and the plan is made at every position). Any rank runs its stage's work in a step, so it
    bounds the step too."""
    coarse = len(_stage_starts(pg, True, num_stages)) - 1 >= num_stages and pg.order is None
    return chain_floor(pg, num_stages, coarse)


def chain_floor(pg: PlanningGraph, num_stages: int, coarse: bool) -> float:
    """_chain_floor of `pg`'s compute at its (coarse) cut positions, cached with the graph's activation models (what
    copies differing only in training state share: plan.search.scale_replicas): the search bounds a candidate by it
    and contiguous_partition starts its bisection there."""
    key = ("floor", num_stages, coarse)
    if key not in pg._activation_cache:
        prefix = np.concatenate([[0.0], np.cumsum(pg.compute)])
        pg._activation_cache[key] = _chain_floor(prefix[_stage_starts(pg, coarse, num_stages)], num_stages)
    return pg._activation_cache[key]


def node_level_optimum(pg: PlanningGraph, num_stages: int, *, microbatches: int = 1) -> float:
    """The least slowest stage (compute per step at `microbatches` calls) of any contiguous split into at most
    `num_stages` stages at the positions a boundary may take (cut_mask), nodes whole: what no contiguous plan's
    bottleneck goes below, to within 1e-4 and never above it (_chain_floor). The bench reports a plan's bottleneck
    against it: how much of the imbalance is the planner's, how much the graph's."""
    prefix = np.concatenate([[0.0], np.cumsum(pg.compute_at(microbatches))])
    return _chain_floor(prefix[_stage_starts(pg, False)], num_stages)


def _stage_starts(pg: PlanningGraph, coarse: bool, stages: int = 1) -> np.ndarray:
    """The positions a stage boundary may take (cut_mask): 0, n, and the allowed ones after the inputs."""
    cuts = np.flatnonzero(cut_mask(pg, coarse, stages))
    return np.unique(np.concatenate([[0], cuts[cuts >= max(pg.num_inputs, 1)], [pg.n]]))


def _prefix(
    pg: PlanningGraph, microbatches: int, modes: Sequence[str], coarse: bool = False, stages: int = 1
) -> _Prefix:
    """The graph's _Prefix for these arguments, built once (cached on the graph: it never changes); one per cut set
    (a coarse one for few stages, another for many: _coarse_level)."""
    key = (microbatches, tuple(modes), _coarse_level(pg, coarse, stages))
    if key not in pg._prefixes:
        pg._prefixes[key] = _Prefix(pg, microbatches, modes, coarse, stages)
    return pg._prefixes[key]


def _transient_table(pg: PlanningGraph, mode: str, model: ActivationModel) -> np.ndarray | None:
    """_range_max_table of `model`'s transient bytes per node (whole batch; None where there are none), cached with the
    graph's activation models: every microbatch count's prefix reads it, a range's max divided by the count (the same
    floats as a table of the divided bytes: correctly rounded division is monotone)."""
    key = ("transient table", mode)
    if key not in pg._activation_cache:
        pg._activation_cache[key] = _range_max_table(model.transient) if model.transient.any() else None
    return pg._activation_cache[key]


def _range_max_table(values: np.ndarray) -> np.ndarray:
    """Sparse table of `values`: row p holds max(values[x : x + 2^p]) (-inf past the end), for O(1) range maxima."""
    n = len(values)
    rows = [np.asarray(values, dtype=np.float64)]
    width = 1
    while 2 * width <= n:
        prev = rows[-1]
        row = np.full(n, -np.inf)
        row[: n - 2 * width + 1] = np.maximum(prev[: n - 2 * width + 1], prev[width : n - width + 1])
        rows.append(row)
        width *= 2
    return np.stack(rows)


def _range_max(table: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """max(values[a:b]) for each (a, b) of starts, ends (b > a), from _range_max_table."""
    level = np.floor(np.log2(np.maximum(ends - starts, 1))).astype(np.int64)
    return np.maximum(table[level, starts], table[level, ends - (1 << level)])


def _min_stage_dp(
    pre: _Prefix, T: float, num_inputs: int, in_flight: np.ndarray, memory_limit: float, max_stages: int
) -> tuple[np.ndarray, np.ndarray]:
    """g[i], the fewest stages covering prefix i with every stage within T and memory (inf if none), and parent[i],
    the smallest start of its last stage among those reaching it in g[i] stages.

    Breadth first: the prefixes first reached with s stages are the starts of stage s (so a stage's memory is
    checked at its index s, with that stage's in-flight count), and every (start, end) pair of one stage count is
    checked in a few vector operations rather than one end at a time (4-40x faster on zoo graphs than the
    end-by-end DP, which tests/planning_graphs.py keeps as the reference it is checked against)."""
    n, pos = pre.n, pre.positions
    lo_valid = max(num_inputs, 1)
    ends_all = pos[pos >= lo_valid]
    g = np.full(n + 1, np.inf)
    parent = np.full(n + 1, -1, dtype=np.int64)
    g[0] = 0
    sources = np.array([0], dtype=np.int64) if pre.allowed[0] else np.zeros(0, dtype=np.int64)
    finite = memory_limit < np.inf
    for s in range(max_stages):
        if sources.size == 0 or np.isfinite(g[n]):
            break
        # Each start's reachable ends (_stage_pairs), not reached yet
        first = np.searchsorted(ends_all, sources, side="right")
        js, ends = _stage_pairs(pre, ends_all, sources, first, pre.limit[sources], T, memory_limit)
        if js.size == 0:
            break
        keep = ~np.isfinite(g[ends]) & (pre.P[js] >= pre.P[ends] - T)
        js, ends = js[keep], ends[keep]
        flight = float(in_flight[min(s, max_stages - 1)])
        ok = np.zeros(js.size, dtype=bool)
        for k in range(len(pre.modes)):
            ok_k = ~ok & (pre.cost(js, ends, k) <= T)
            if finite and ok_k.any():
                ok_k[ok_k] = pre.memory(js[ok_k], ends[ok_k], k, flight) <= memory_limit
            ok |= ok_k
        if pre.layers is not None and finite and (left := ~ok).any():
            layers, time = pre.partial(js[left], ends[left], flight, memory_limit)
            ok[np.flatnonzero(left)[(layers > 0) & (time <= T)]] = True
        js, ends = js[ok], ends[ok]
        if ends.size == 0:
            break
        best = np.full(n + 1, n + 1, dtype=np.int64)
        np.minimum.at(best, ends, js)
        reached = np.unique(ends)
        g[reached] = s + 1
        parent[reached] = best[reached]
        sources = reached[reached < n]
    return g, parent


def _stage_pairs(
    pre: _Prefix, ends_all: np.ndarray, sources: np.ndarray, first: np.ndarray, top: np.ndarray, T: float,
    memory_limit: float, most: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Every (start, end) pair one stage may span, as two arrays: for each start j of `sources`, the ends of
    `ends_all` from index first[j] up to position top[j] (its in-place-write limit, or less) whose compute alone is
    within T and static bytes alone within memory (both only grow with the end; generous by a hair: the callers'
    exact tests follow). Every pair of one stage count at once, in a few vector operations; none (two empty arrays)
    where they would be more than `most`."""
    last = np.searchsorted(ends_all, top, side="right")
    if np.isfinite(T):
        within = np.searchsorted(pre.P, pre.P[sources] + T * (1 + 1e-9), side="right") - 1
        last = np.minimum(last, np.searchsorted(ends_all, within, side="right"))
    if np.isfinite(memory_limit):
        within = np.searchsorted(pre.S, pre.S[sources] + memory_limit * (1 + 1e-9), side="right") - 1
        last = np.minimum(last, np.searchsorted(ends_all, within, side="right"))
    counts = np.maximum(last - first, 0)
    if most is not None and counts.sum() > most:
        return sources[:0], ends_all[:0]
    offsets = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(sources, counts), ends_all[np.repeat(first, counts) + offsets]


def _least_bottleneck(
    pre: _Prefix, num_inputs: int, in_flight: np.ndarray, memory_limit: float, num_stages: int, hi: float,
    most_pairs: int | None = None,
) -> list[int] | None:  # fmt: skip
    """The contiguous cuts into exactly `num_stages` stages, each holding compute, with the least bottleneck (stage s
    at its fastest recompute mode that fits `in_flight[s]` microbatches in memory), among the splits whose stages all
    take at most `hi`; of equal bottlenecks, the one whose every prefix's last stage starts earliest. None when there
    is no such split.

    A min-max DP over (stages, prefix): best[i] after s stages = min over j of max(best[j] after s - 1, time(j, i)),
    every (j, i) pair of one stage count in a few vector operations. Exact, where the bisection on the bottleneck
    stops within its tolerance; a pair's compute alone bounds its time, so `hi` keeps the pairs to those a stage of at
    most `hi` can span (within one pass of the bisection's cost where the cut positions are few). `most_pairs`: None
    too where one stage count would span more pairs than that."""
    n, pos = pre.n, pre.positions
    ends_all = pos[pos >= max(num_inputs, 1)]
    if ends_all.size < num_stages or ends_all[-1] != n or not pre.allowed[0]:
        return None
    limit = hi * (1 + 1e-9)
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    parents = []
    for s in range(num_stages):
        left = num_stages - 1 - s  # stages after this one, each needing an end of its own
        sources = np.flatnonzero(np.isfinite(best))
        if sources.size == 0:
            return None
        top = np.minimum(pre.limit[sources], ends_all[ends_all.size - 1 - left])  # the furthest end each may take
        first = np.searchsorted(ends_all, sources, side="right")
        if left == 0:
            first = np.maximum(first, ends_all.size - 1)  # the last stage ends at n
        js, ends = _stage_pairs(pre, ends_all, sources, first, top, hi, memory_limit, most_pairs)
        if js.size == 0:
            return None
        keep = (pre.working[js] < pre.working[ends]) & (pre.P[n] - pre.P[ends] <= left * limit)
        js, ends = js[keep], ends[keep]
        value = np.maximum(best[js], pre.fitting_time(js, ends, float(in_flight[s]), memory_limit))
        ok = value <= limit
        js, ends, value = js[ok], ends[ok], value[ok]
        if ends.size == 0:
            return None
        order = np.lexsort((js, value, ends))  # by end, then value, then start: each end's first is its best
        js, ends, value = js[order], ends[order], value[order]
        head = np.concatenate([[True], ends[1:] != ends[:-1]])
        best = np.full(n + 1, np.inf)
        best[ends[head]] = value[head]
        parent = np.full(n + 1, -1, dtype=np.int64)
        parent[ends[head]] = js[head]
        parents.append(parent)
    return _backtrack(parents, n) if np.isfinite(best[n]) else None


def _backtrack(parents: Sequence[np.ndarray], n: int) -> list[int]:
    """The cuts [0, ..., n] of a DP over (stage, prefix) that kept, per stage, the start of each prefix's last stage."""
    cuts = [n]
    for parent in reversed(parents):
        cuts.append(int(parent[cuts[-1]]))
    return cuts[::-1]


def _cuts_from_parents(parent: np.ndarray, n: int) -> list[int]:
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(int(parent[cuts[-1]]))
    return cuts[::-1]  # [0, b1, ..., n]


def _split_to(pre: _Prefix, cuts: list[int], num_stages: int, num_inputs: int) -> list[int]:
    """Add cuts until there are num_stages segments, splitting where the larger half is smallest among the splits
    that leave the fewest stages without compute (a stage of views alone costs a hop and a device for nothing)."""
    cuts = list(cuts)
    w = pre.working
    candidates = np.flatnonzero(pre.allowed)
    candidates = candidates[(candidates >= max(num_inputs, 1)) & (candidates < pre.n)]
    while len(cuts) - 1 < num_stages:
        # Every allowed position strictly inside a segment, with its segment's ends (all segments at once).
        bounds = np.asarray(cuts, dtype=np.int64)
        seg = np.searchsorted(bounds, candidates, side="right") - 1
        j, i = bounds[seg], bounds[seg + 1]  # every candidate is below n, the last cut
        ok = (candidates > j) & (candidates < i) & (pre.limit[candidates] >= i)
        b, j, i = candidates[ok], j[ok], i[ok]
        if b.size == 0:
            why = " and the order of in-place writes (plan.ordering)" if pre.limit.min() < pre.n else ""
            raise ValueError(
                f"cannot make {num_stages} non-empty stages from {pre.n} nodes under their data edges{why}"
            )
        idle = (w[b] == w[j]).astype(np.int64) + (w[i] == w[b]) - (w[i] == w[j])  # stages without compute it adds
        larger = np.maximum(pre.cost(j, b), pre.cost(b, i))
        fewest = idle == idle.min()
        pick = np.flatnonzero(fewest)[np.argmin(larger[fewest])]  # the first (lowest position) of equal keys
        cuts = sorted(cuts + [int(b[pick])])
    return cuts


def _in_flight_array(in_flight: Sequence[int] | None, num_stages: int, microbatches: int) -> np.ndarray:
    if in_flight is None:
        return np.full(num_stages, min(microbatches, num_stages), dtype=np.float64)
    return np.minimum(np.asarray(in_flight, dtype=np.float64), microbatches)


def max_stages(pg: PlanningGraph) -> int:
    """The most non-empty pipeline stages `pg` can be split into (boundaries after the inputs, where in-place
    writes allow one: plan.ordering)."""
    return 1 + int(_allowed_cuts(pg)[max(pg.num_inputs, 1) : pg.n].sum())


def too_many_stages(pg: PlanningGraph, num_stages: int) -> str:
    """Why `pg` cannot make `num_stages` stages (num_stages > max_stages(pg)), naming a pinning write if any."""
    most = max_stages(pg)
    pinned = ""
    if most < pg.n - max(pg.num_inputs, 1) + 1 and pg.order is not None:
        pinned = f"; in-place writes keep some nodes together: {pg.order.reasons_between(0, pg.n)[0]}"
    return (
        f"{num_stages} pipeline stages requested but the graph has only {most} places to put a stage "
        f"({pg.n} nodes, {pg.num_inputs} of them inputs pinned to stage 0{pinned}): use at most {most} stages"
    )


def devices_needed(
    pg: PlanningGraph,
    memory_limit: float,
    *,
    microbatches: int = 1,
    start: int = 1,
    recompute: Sequence[str] = ("none",),
) -> int | None:
    """Fewest stages (>= start) whose contiguous split fits `memory_limit` per device, or None.

    Uses 1F1B in-flight counts and the recompute modes allowed. More stages never need more memory per
    device, so the answer is found by doubling and then bisecting.
    """
    pre = _prefix(pg, microbatches, recompute)
    most = max_stages(pg)

    def fits(s: int) -> bool:
        flight = _in_flight_array([min(s - k, microbatches) for k in range(s)], s, microbatches)
        g, _ = _min_stage_dp(pre, np.inf, pg.num_inputs, flight, memory_limit, s)
        return bool(np.isfinite(g[pre.n]))

    lo, hi = max(start, 1) - 1, max(start, 1)  # fits(lo) is False (or lo == 0), fits(hi) unknown
    while hi <= most and not fits(hi):
        lo, hi = hi, min(hi * 2, most) if hi < most else most + 1
    if hi > most:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def contiguous_partition(
    pg: PlanningGraph,
    num_stages: int,
    *,
    microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    memory_limit: float = np.inf,
    rel_tol: float = 1e-5,
    explain: bool = True,
    recompute: Sequence[str] = ("none",),
    coarse: bool = False,
) -> list[int]:
    """Optimal contiguous cuts [0, b1, ..., n] of the topological order, each stage free to use any of the
    `recompute` modes (see module docstring; `stage_modes` says which each cut's stages use). `coarse`: cut only
    where the fewest values cross (`_coarse_level`: the residual stream of a transformer, about 2 places per layer
    instead of ~30, or ~7 instead of ~70 in an ATen graph), as long as there are COARSE_MIN_CUTS such places and one
    per stage boundary (the next-narrowest cuts for more stages); the search ranks its candidates so, and plans the
    winner in full."""
    if num_stages < 1:
        raise ValueError(f"need at least 1 stage, got {num_stages}")
    # Cut points are 0 and every position after the inputs (where in-place writes allow one); each stage needs
    # one node of its own.
    pre = _prefix(pg, microbatches, recompute, coarse, num_stages)
    if num_stages > max_stages(pg):
        raise ValueError(too_many_stages(pg, num_stages))
    flight = _in_flight_array(in_flight, num_stages, microbatches)

    floor = chain_floor(pg, num_stages, coarse)  # compute alone, node granularity
    lo = max(pre.P[-1] / num_stages, float(pg.compute.max(initial=0.0)), floor)
    exact_path = coarse and pre.positions.size <= EXACT_MAX_POSITIONS
    if exact_path:
        # The exact DP over the splits whose stages all take at most a window, from just above the lower bound up:
        # exact once the window holds the optimum, and a narrow window spans few (start, end) pairs (the optimum is
        # most often within a few tens of percent of the bound: gpt3-175b's coarse plans at 64 H100s 1.00-1.54x)
        for factor in WINDOWS:
            exact = _least_bottleneck(pre, pg.num_inputs, flight, memory_limit, num_stages, lo * factor)
            if exact is not None:
                return exact
    g, parent = _min_stage_dp(pre, np.inf, pg.num_inputs, flight, memory_limit, num_stages)
    if not np.isfinite(g[pre.n]):
        # How many devices would do is worth its cost for a user's error, not inside a search.
        need = (
            devices_needed(pg, memory_limit, microbatches=microbatches, start=num_stages + 1, recompute=recompute)
            if explain else None
        )  # fmt: skip
        if need:
            hint = f"it needs about {need} pipeline stages of this size"
        else:
            hint = (
                "more pipeline stages alone do not help (the first stage holds about as many microbatches in "
                "flight as there are stages): add tensor parallelism, or use smaller microbatches"
            )
        raise InfeasibleMemoryError(
            f"no split into {num_stages} stages fits {format_bytes(memory_limit)} per stage (weights and training "
            f"state {format_bytes(pre.S[-1])} in all, activations {format_bytes(pre.A[-1][-1])} per microbatch in "
            f"flight{_with_recompute(pre)}): {hint}; raise devices, lower the batch or raise microbatches"
        )
    first = _cuts_from_parents(parent, pre.n)
    hi = max(lo, float(max(pre.cost(j, i) for j, i in zip(first, first[1:]))))
    best_parent = parent

    def feasible(t: float) -> bool:
        nonlocal hi, best_parent
        g, parent = _min_stage_dp(pre, t, pg.num_inputs, flight, memory_limit, num_stages)
        if np.isfinite(g[pre.n]) and g[pre.n] <= num_stages:
            # The split found may be better than asked for: its own bottleneck is a feasible bound too
            hi = min(t, _bottleneck(pre, _cuts_from_parents(parent, pre.n), flight, memory_limit))
            best_parent = parent
            return True
        return False

    # Coarse plans (few cut positions): one exact pass over the splits whose stages all take at most the first split's
    # slowest stage. Otherwise (or where that finds no split with compute on every stage) galloping from the lower
    # bound (the optimum is most often within a few percent of it, and the fewest-stages split can be far slower),
    # then bisection.
    if exact_path and hi - lo > rel_tol * max(hi, 1e-30):
        # The window: the first split's slowest stage at its fitting mode (hi prices every stage without recompute)
        window = max(hi, _bottleneck(pre, first, flight, memory_limit))
        exact = _least_bottleneck(pre, pg.num_inputs, flight, memory_limit, num_stages, window)
        if exact is not None:
            return exact
    step = 0.01
    while lo * (1 + step) < hi and hi - lo > rel_tol * max(hi, 1e-30):
        if feasible(lo * (1 + step)):
            break
        lo, step = lo * (1 + step), 2 * step
    exact_tried = False
    while hi - lo > rel_tol * max(hi, 1e-30):
        if not exact_tried and hi - lo <= EXACT_BRACKET * hi:
            # The bracket holds the optimum within a few percent: the exact DP over the splits whose stages all take at
            # most `hi` spans few (start, end) pairs, where bisecting on to rel_tol takes a dozen passes more
            # (gpt3-175b's winner at 64 H100s, 2,605 cut positions: one pass of 1 ms against 12 of 25 ms). None
            # where no split with compute on every stage is that fast, or its pairs would be too many: bisected on,
            # and the split filled up to the stages (_split_to).
            exact_tried = True
            exact = _least_bottleneck(pre, pg.num_inputs, flight, memory_limit, num_stages, hi, most_pairs=_PAIRS)
            if exact is not None:
                return exact
        mid = (lo + hi) / 2
        if not feasible(mid):
            lo = mid
    cuts = _cuts_from_parents(best_parent, pre.n)
    if len(cuts) - 1 < num_stages:
        cuts = _split_to(pre, cuts, num_stages, pg.num_inputs)
    return cuts


def _chain_floor(prefix: np.ndarray, num_stages: int, rel_tol: float = 1e-4) -> float:
    """The least largest segment of any split of a chain into at most `num_stages` segments, cut only at the given
    positions (`prefix`: the compute prefix sum at each, the first at 0, the last at the end), to `rel_tol` and never
    above it. A floor under any contiguous plan's bottleneck at those positions: plans add recompute, transfers and
    memory, and in-place-write limits only remove splits. Where stages hold a few nodes each, node granularity puts it
    well above total / stages.

    For a bound T the fewest segments are the greedy's (each reaching as far as T allows), counted from every position
    at once: the jump function composed num_stages times by repeated squaring."""
    last = len(prefix) - 1
    if last < 1:
        return 0.0
    lo, hi = max(float(np.diff(prefix).max()), float(prefix[-1]) / num_stages), float(prefix[-1])

    def fits(t: float) -> bool:
        jump = np.searchsorted(prefix, prefix + t, side="right") - 1  # the furthest cut one segment reaches
        at, power, left = 0, jump, num_stages
        while left:
            if left & 1:
                at = int(power[at])
            left >>= 1
            if left:
                power = power[power]
        return at == last

    if fits(lo):
        return lo * (1 - 1e-9)
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return lo * (1 - 1e-9)  # never above the optimum: lo was found infeasible (or is the plain bound)


def _bottleneck(pre: _Prefix, cuts: list[int], in_flight: np.ndarray, memory_limit: float) -> float:
    """The slowest stage of contiguous `cuts`, each stage at its fastest recompute mode that fits."""
    return max(
        float(pre.fitting_time(np.array([j]), i, float(in_flight[s]), memory_limit)[0])
        for s, (j, i) in enumerate(zip(cuts, cuts[1:]))
    )


def _with_recompute(pre: _Prefix) -> str:
    """How the activations of the error message were counted: with the most recompute the stages may use."""
    return "" if pre.modes[-1] == "none" else f" with {pre.modes[-1]} recompute"


def stage_modes(
    pg: PlanningGraph,
    cuts: Sequence[int],
    *,
    microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    memory_limit: float = np.inf,
    recompute: Sequence[str] = ("none",),
) -> list[str]:
    """The recompute mode of each stage of contiguous `cuts`: the first allowed one that fits its memory."""
    pre = _prefix(pg, microbatches, recompute)
    return pre.modes_of(cuts, _in_flight_array(in_flight, len(cuts) - 1, microbatches), memory_limit)


def cuts_to_stages(cuts: list[int]) -> list[int]:
    stage_of: list[int] = []
    for s, (j, i) in enumerate(zip(cuts, cuts[1:])):
        stage_of.extend([s] * (i - j))
    return stage_of


def plan_pipeline(
    pg: PlanningGraph,
    num_stages: int,
    *,
    microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    memory_limit: float = np.inf,
    mincut: bool = True,
    explain: bool = True,
    rel_tol: float = 1e-5,
    recompute: Sequence[str] = ("none",),
    coarse: bool = False,
    improve: Callable[[list[int]], list[int]] | None = None,
) -> PipelinePlan:
    """Stage of every planned node and each stage's recompute mode (one of `recompute`): contiguous optimum, then
    `improve` on its cuts if given (plan.step moves them to minimize the simulated step), then min-cut boundary
    refinement."""
    cuts = contiguous_partition(
        pg,
        num_stages,
        microbatches=microbatches,
        in_flight=in_flight,
        memory_limit=memory_limit,
        explain=explain,
        rel_tol=rel_tol,
        recompute=recompute,
        coarse=coarse,
    )
    if improve is not None:
        cuts = improve(cuts)
    stage_of = cuts_to_stages(cuts)
    modes = stage_modes(pg, cuts, microbatches=microbatches, in_flight=in_flight, memory_limit=memory_limit,
                        recompute=recompute)  # fmt: skip
    metrics = evaluate(pg, stage_of, num_stages, microbatches=microbatches, in_flight=in_flight, recompute=modes)
    plan = PipelinePlan(
        stage_of=stage_of, metrics=metrics, contiguous_bottleneck=max(m.time for m in metrics), moved_by_mincut=0,
        recompute=modes,
    )  # fmt: skip
    if not mincut or num_stages == 1:
        return plan
    return refine_plan(pg, plan, microbatches=microbatches, in_flight=in_flight, memory_limit=memory_limit)


def refine_plan(
    pg: PlanningGraph,
    plan: PipelinePlan,
    *,
    microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    memory_limit: float = np.inf,
) -> PipelinePlan:
    """Phase 2 on a contiguous plan: every boundary moved to its cheapest cut (plan.mincut), then the
    tie-break (module docstring).

    Invariant: the result's bottleneck is at most the input's x (1 + TIE_TOLERANCE), and above the input's
    only when its stages spend less time on transfers; no stage of the input holding compute is left without
    (moving a stage's few nodes to its neighbour can send fewer bytes, but leaves a hop and a device for nothing:
    gpt3-tiny's first stage kept only its input ids).
    """
    from partitioner.plan.mincut import refine_with_mincut

    num_stages = len(plan.metrics)
    best = plan
    for tolerance in (0.0, TIE_TOLERANCE):
        refined = refine_with_mincut(
            pg, plan.stage_of, num_stages, microbatches=microbatches, in_flight=in_flight,
            memory_limit=memory_limit, tolerance=tolerance, recompute=plan.recompute,
        )  # fmt: skip
        new = evaluate(pg, refined, num_stages, microbatches=microbatches, in_flight=in_flight,
                       recompute=plan.recompute)  # fmt: skip
        bottleneck, comm = max(m.time for m in new), sum(m.comm for m in new)
        if sum(m.compute > 0 for m in new) < sum(m.compute > 0 for m in plan.metrics):
            continue
        if tolerance == 0.0:
            better = bottleneck <= best.bottleneck * (1 + 1e-9)
        else:
            better = bottleneck <= plan.bottleneck * (1 + tolerance) and comm < sum(m.comm for m in best.metrics)
        if better:
            best = PipelinePlan(
                stage_of=list(map(int, refined)),
                metrics=new,
                contiguous_bottleneck=plan.contiguous_bottleneck,
                moved_by_mincut=sum(a != b for a, b in zip(refined, plan.stage_of)),
                recompute=plan.recompute,
            )
    return best
