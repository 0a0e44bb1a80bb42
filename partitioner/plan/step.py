"""Stage boundaries chosen by the simulated step, not by the slowest stage alone.

plan.pipeline's DP finds the contiguous split with the smallest bottleneck (the slowest stage). A training step
pays more than its bottleneck: the first microbatch's forward and the last one's backward cross every stage (fill
and drain), every hop between ranks adds its send to that path, and schedules treat uneven stages unevenly. Among
splits of equal bottleneck, or one slightly worse, another can be faster; and a stage holding no compute (a view
left alone by the DP's filling) costs a hop and a device for nothing. This module moves the boundaries of
contiguous cuts to minimize

    (stages without compute, the step plan.price prices: the schedule replayed (simulate.fast_replay), each rank's
     data-parallel tail, tied-weight sync and optimizer step)

in that order: a stage without compute is used only where the graph has too few nodes with compute for the stages.
Each stage's recompute mode is chosen as the DP chooses it (the fastest that fits, plan.pipeline._Prefix.modes_of)
and a split is allowed only if the replay's peak per rank fits the memory limit.

How:
- when the graph offers at most EXHAUSTIVE contiguous splits (small graphs), every one is priced: exact;
- otherwise a local search from up to three starts, the given cuts (the DP's), the split that minimizes the sum of
  squared stage times under the same bottleneck with compute on every stage (`balanced_cuts`), and the split with
  the shortest sends across its cuts within a little more than that bottleneck (`_fewest_hops`: DMAGaze at 4
  stages, 3.83 -> 3.65 ms, where SageMaker's split had beaten the other two starts), each taking the first move
  that improves until none does or its share of the budget is spent (BUDGET replays, fewer for deep pipelines:
  ACTION_BUDGET; the first two share it, the third gets a share as large again). Moves: (a) one boundary to
  another position between its neighbours (the nearest ones, then doubling distances, and the position that
  balances the two stages); (c) every boundary after (or before) one shifted together, moving work between the
  pipeline's ends; (b) one boundary removed, merging the lightest stages, and another added at the balanced point
  of a heavy stage.
A split whose replay cannot beat the best so far (simulate.replay_lower_bound over its stage costs: the fill before
each rank, its work, the drain after) is not replayed, and does not count against the budget: near a local optimum
most moves lengthen the slowest stage, which that bound sees (gpt3-175b at 64 H100s: 523 of 792 splits skipped).
The given cuts are a candidate, so the result is never worse than them by this objective. Stage costs come from prefix
sums (plan.pipeline._Prefix.stage_costs, plan.price.ContiguousState), equal to plan.graph.evaluate's; plan.search
prices the result in full (and its min-cut refinement) and keeps whichever that price prefers.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np

from partitioner.plan.graph import PlanningGraph, tied_sync_time
from partitioner.plan.pipeline import _backtrack, _in_flight_array, _Prefix, _prefix
from partitioner.plan.price import ContiguousState, Layout, price_step, step_end
from partitioner.simulate import in_flight_peaks, replay_lower_bound

__all__ = ["StepObjective", "balanced_cuts", "best_cuts_by_step", "step_improver"]

EXHAUSTIVE = 256  # price every contiguous split when there are at most this many
BUDGET = 1000  # replays the local search may spend (simulate.fast_replay: about 1 ms each at 8 stages)
# ... and at most this many replayed actions (stages x microbatches x 2 each): gpt3-175b's pp8 x 256 microbatches
# keeps its 1000 replays, the 1T GPT's pp32 x 256 gets 250 (its full 1000 took 9.5 s for a step 0.03% shorter).
ACTION_BUDGET = 1000 * 8 * 256 * 2


class StepObjective:
    """The objective of contiguous cuts of `pg` into `num_stages` stages run as `layout` says: (stages without
    compute, step time as plan.price prices it), infinite when a rank's replayed peak memory exceeds `rank_memory`
    or a stage's nodes cannot be one stage (plan.ordering). Each stage's recompute mode is the fastest that fits
    `stage_memory` with the schedule's in-flight counts (plan.pipeline._Prefix.modes_of)."""

    def __init__(
        self, pg: PlanningGraph, layout: Layout, num_stages: int, *, recompute: Sequence[str] = ("none",),
        coarse: bool = False, stage_memory: float = math.inf, rank_memory: float | None = None, internode: bool = False,
    ) -> None:  # fmt: skip
        self.pg, self.layout, self.internode = pg, layout, internode
        self.pre = _prefix(pg, layout.microbatches, recompute, coarse, num_stages)
        self.in_flight = _in_flight_array(in_flight_peaks(layout.schedule, num_stages, layout.microbatches, layout.pp),
                                          num_stages, layout.microbatches)  # fmt: skip
        self.stage_memory = stage_memory
        self.rank_memory = rank_memory if rank_memory is not None else stage_memory * (num_stages // layout.pp)
        self.state = ContiguousState(pg)
        self.evaluations = 0  # replays
        self.skipped = 0  # splits whose lower bound could not beat the best: no replay
        # cuts -> (value, exact): what each split came to, shared by the local searches from every start (they often
        # meet on the same splits); a bound is kept with exact=False, and serves only a `beat` it still cannot beat
        self._memo: dict[tuple[int, ...], tuple[tuple[int, float], bool]] = {}

    def __call__(self, cuts: Sequence[int], beat: tuple[int, float] | None = None) -> tuple[int, float]:
        """The objective of `cuts`; with `beat`, a value that cannot beat it may come back as a lower bound >= `beat`
        instead (simulate.replay_lower_bound: the replay skipped), so only a value below `beat` is sure to be exact."""
        key = tuple(int(c) for c in cuts)
        known = self._memo.get(key)
        if known is not None and (known[1] or (beat is not None and known[0] >= beat)):
            return known[0]
        value, exact = self._value(cuts, beat)
        self._memo[key] = (value, exact)
        return value

    def _value(self, cuts: Sequence[int], beat: tuple[int, float] | None) -> tuple[tuple[int, float], bool]:
        """`__call__`'s value, and whether it is exact (not a bound standing in for it)."""
        pre = self.pre
        if any(pre.limit[j] < i for j, i in zip(cuts, cuts[1:])):
            return (0, math.inf), True
        empty = sum(1 for j, i in zip(cuts, cuts[1:]) if pre.working[i] == pre.working[j])
        if beat is not None and empty > beat[0]:
            return (empty, math.inf), False
        modes = pre.modes_of(cuts, self.in_flight, self.stage_memory)
        costs = pre.stage_costs(cuts, modes)
        if beat is not None and empty == beat[0]:
            bound = replay_lower_bound(costs, num_microbatches=self.layout.microbatches, schedule=self.layout.schedule,
                                       num_ranks=self.layout.pp)  # fmt: skip
            if bound >= beat[1]:
                self.skipped += 1
                return (empty, bound), False
        self.evaluations += 1
        costs = [dataclasses.replace(cost, static_bytes=static)
                 for cost, static in zip(costs, self.state.static_bytes(cuts))]  # fmt: skip
        priced = price_step(self.pg, self.layout, costs, self.state(cuts), fast=True)
        if priced.peak_memory > self.rank_memory * (1 + 1e-9):
            return (0, math.inf), True
        tied, ranks = 0.0, ()
        if self.pg.tied and self.pg.training:
            stage_of = np.repeat(np.arange(len(cuts) - 1), np.diff(cuts))
            tied = tied_sync_time(self.pg, stage_of, priced.simulation.stage_to_rank, internode=self.internode)
            ranks = sorted({priced.simulation.stage_to_rank[s] for s in self.state.tied_stages(cuts)})
        return (empty, step_end(priced, tied, ranks)), True


def step_improver(
    pg: PlanningGraph, layout: Layout, num_stages: int, *, recompute: Sequence[str] = ("none",), coarse: bool = False,
    stage_memory: float = math.inf, rank_memory: float | None = None, internode: bool = False,
    budget: int | None = None, searched: dict | None = None,
) -> Callable[[list[int]], list[int]]:  # fmt: skip
    """What plan.pipeline.plan_pipeline(improve=...) takes: contiguous cuts -> the cuts minimizing the step of
    `layout` (StepObjective's arguments). `budget`: replays (default BUDGET, fewer where each replays more than
    ACTION_BUDGET / BUDGET actions). `searched`: what each search came to, by its objective's arguments and its
    start, kept by the caller: a search from the same cuts under the same objective is not run again (plan.search
    refines a multi-stage winner from the DP splits of two in-flight models, which are often the same cuts:
    gpt3-175b's zero-bubble and interleaved rivals at 64 H100s ran each such search twice, about 7 s each)."""
    if budget is None:
        budget = max(min(BUDGET, ACTION_BUDGET // (2 * num_stages * layout.microbatches)), 1)

    def search(cuts: list[int]) -> list[int]:
        objective = StepObjective(pg, layout, num_stages, recompute=recompute, coarse=coarse,
                                  stage_memory=stage_memory, rank_memory=rank_memory, internode=internode)  # fmt: skip
        return best_cuts_by_step(objective, cuts, pg.num_inputs, budget=budget)

    if searched is None:
        return search
    key = (id(pg), layout, num_stages, tuple(recompute), coarse, stage_memory, rank_memory, internode, budget)

    def improve(cuts: list[int]) -> list[int]:
        start = (key, tuple(int(c) for c in cuts))
        if start not in searched:
            searched[start] = (search(cuts), pg)  # pg kept alive with it: its id stays its own while `searched` lives
        return list(searched[start][0])

    return improve


def best_cuts_by_step(
    objective: StepObjective, cuts: Sequence[int], num_inputs: int, *, budget: int = BUDGET
) -> list[int]:
    """The cuts [0, b1, ..., n] minimizing `objective` (module docstring), starting from `cuts`."""
    pre = objective.pre
    start = list(map(int, cuts))
    num_stages = len(start) - 1
    if num_stages == 1:
        return start
    inner = [int(b) for b in pre.positions if max(num_inputs, 1) <= b < pre.n]
    if math.comb(len(inner), num_stages - 1) <= EXHAUSTIVE:
        best, best_value = start, objective(start)
        for middle in itertools.combinations(inner, num_stages - 1):
            candidate = [0, *middle, pre.n]
            value = objective(candidate, beat=best_value)
            if value < best_value:
                best, best_value = candidate, value
        return best
    starts = [start]
    bottleneck = max(float(pre.cost(j, i)) for j, i in zip(start, start[1:]))
    even = balanced_cuts(pre, num_stages, bottleneck, objective.in_flight, objective.stage_memory, num_inputs)
    if even is not None and even != start:
        starts.append(even)
    share = budget // len(starts)
    few = _fewest_hops(objective, start, bottleneck, num_inputs)
    if few is not None and few not in starts:
        starts.append(few)  # with a share of its own: taking replays from the other two starts lost elsewhere
    positions = np.asarray(inner, dtype=np.int64)
    found = [_local_search(objective, s, positions, objective.evaluations + share) for s in starts]
    return min(found, key=lambda pair: pair[1])[0]


def balanced_cuts(pre: _Prefix, num_stages: int, bottleneck: float, in_flight: np.ndarray, memory_limit: float,
                  num_inputs: int, *, score: str = "squares") -> list[int] | None:  # fmt: skip
    """The contiguous cuts with every stage within `bottleneck` and memory, each holding some compute, that minimize
    `score`: "squares", the sum of squared stage times (every stage as even as the slowest allows, not just the
    slowest as fast as it can be: the DP leaves the others anywhere under it); "hops", the sum of one microbatch's
    sends across the cuts (what the first microbatch's forward and the last one's backward wait for on their way
    through the pipeline). An exact DP over (stage, prefix); None when no such split exists.

    Each stage's layer is one vector pass over every (start, end) pair within the bottleneck (a stage spans about
    n / stages positions, so a layer holds about n^2 / stages pairs), in chunks of at most _PAIRS; of equal totals
    the earliest start wins, as a loop over the ends taking np.argmin would choose."""
    n, pos = pre.n, pre.positions
    lo_valid = max(num_inputs, 1)
    ends = pos[pos >= lo_valid]
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    parents = []
    limit = bottleneck * (1 + 1e-6)  # a little over the DP's own tolerance: pruning less never changes the result
    within = bottleneck * (1 + 1e-9)
    for s in range(num_stages):
        nxt, parent = np.full(n + 1, np.inf), np.full(n + 1, -1, dtype=np.int64)
        starts = np.flatnonzero(np.isfinite(best))
        if starts.size == 0:
            return None
        # Only ends a stage from some start can reach with compute <= bottleneck, and from which the stages left can
        # still cover the rest at <= bottleneck each: every other end gets no finite score or none that completes.
        if s < num_stages - 1:
            reach = (pre.P[ends] >= pre.P[starts[0]]) & (pre.P[ends] <= pre.P[starts[-1]] + limit)
            reach &= pre.P[n] - pre.P[ends] <= (num_stages - 1 - s) * limit
            layer_ends = ends[reach]
        else:
            layer_ends = np.array([n], dtype=np.int64)
        # the starts of each end: from the first whose stage compute stays <= bottleneck, up to the end itself
        first = np.searchsorted(starts, np.searchsorted(pre.P, pre.P[layer_ends] - within, side="left"), side="left")
        counts = np.maximum(np.searchsorted(starts, layer_ends, side="left") - first, 0)
        for lo, hi in _chunks(counts, _PAIRS):
            c = counts[lo:hi]
            group = np.repeat(np.arange(lo, hi), c)
            offset = np.arange(group.size) - np.repeat(np.cumsum(c) - c, c)
            js = starts[np.repeat(first[lo:hi], c) + offset]
            ie = layer_ends[group]
            keep = (pre.limit[js] >= ie) & (pre.working[js] < pre.working[ie])  # one stage may hold it; it computes
            js, ie, group = js[keep], ie[keep], group[keep]
            if js.size == 0:
                continue
            time = pre.fitting_time(js, ie, float(in_flight[s]), memory_limit)
            if score == "squares":
                cost = time * time
            else:
                cost = np.zeros(js.size)
                inner = ie < n
                cost[inner] = pre.hop[ie[inner]]
            total = best[js] + np.where(time <= within, cost, np.inf)
            # per end (groups are contiguous, starts ascending in each): the least total, the earliest start of it
            heads = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
            least = np.minimum.reduceat(total, heads)
            at = np.flatnonzero(total == np.repeat(least, np.diff(np.r_[heads, total.size])))
            ends_of, pick = np.unique(group[at], return_index=True)
            pick = at[pick]
            found = np.isfinite(total[pick])
            nxt[layer_ends[ends_of[found]]] = total[pick[found]]
            parent[layer_ends[ends_of[found]]] = js[pick[found]]
        best = nxt
        parents.append(parent)
    return _backtrack(parents, n) if np.isfinite(best[n]) else None


_PAIRS = 1 << 20  # (start, end) pairs balanced_cuts prices at once: bounds its memory (a few arrays of this size)


def _chunks(counts: np.ndarray, most: int) -> list[tuple[int, int]]:
    """Consecutive ranges [lo, hi) of `counts` whose sums stay within `most` (a single count above it alone)."""
    cum = np.cumsum(counts)
    out, lo = [], 0
    while lo < counts.size:
        base = cum[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(cum, base + most, side="right")), lo + 1)
        out.append((lo, hi))
        lo = hi
    return out


HOP_SLACK = (1.0, 1.02, 1.05, 1.1, 1.15, 1.2, 1.3)  # bottlenecks the fewest-hops start may trade for shorter sends


def _fewest_hops(objective: StepObjective, start: list[int], bottleneck: float, num_inputs: int) -> list[int] | None:
    """The best by `objective` of the splits with the shortest sends across their cuts (balanced_cuts' "hops")
    within each of HOP_SLACK x `bottleneck`: a step pays the slowest stage once per microbatch, but every hop twice
    (the first forward and the last backward cross them all), so a little less balance for much shorter sends can
    win. Only the slacks whose extra bottleneck, paid m - 1 times, could be bought back by the hops of `start` (the
    DP's cuts, at the least bottleneck), counted four times over, are tried: at scale (gpt3-175b, 64 microbatches of
    one sequence) the sends are so short that only the first is. None when no split exists."""
    pre, num_stages, m = objective.pre, len(objective.in_flight), objective.layout.microbatches
    hops = float(sum(pre.hop[b] for b in start[1:-1]))
    paid = (m - 1) / m * bottleneck  # the bottleneck's share of the step
    found = []
    for slack in HOP_SLACK:
        if slack > 1.0 and (slack - 1.0) * paid > 4 * hops:
            break
        cuts = balanced_cuts(pre, num_stages, bottleneck * slack, objective.in_flight, objective.stage_memory,
                             num_inputs, score="hops")  # fmt: skip
        if cuts is not None and cuts not in found:
            found.append(cuts)
    return min(found, key=objective) if found else None


def _local_search(
    objective: StepObjective, cuts: list[int], inner: np.ndarray, budget: int
) -> tuple[list[int], tuple[int, float]]:
    """First improvement: the moves of the current cuts are tried in order, and the first that improves becomes the
    current cuts; stops when none does or the budget is spent. A split priced before (from this start or another) is
    not replayed again (StepObjective keeps what each came to)."""
    best, best_value = cuts, objective(cuts)
    improved = True
    while improved and objective.evaluations < budget:
        improved = False
        for moves in (_shifts, _block_shifts, _merge_and_split):
            for candidate in moves(objective.pre, best, inner):
                if objective.evaluations >= budget:
                    break
                v = objective(candidate, best_value)
                if v < best_value:
                    best, best_value, improved = candidate, v, True
                    break
            if improved:
                break
    return best, best_value


def _between(inner: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The allowed cut positions strictly between lo and hi."""
    return inner[np.searchsorted(inner, lo, side="right") : np.searchsorted(inner, hi, side="left")]


def _balanced(pre: _Prefix, j: int, i: int, options: np.ndarray) -> int | None:
    """The position among `options` (inside (j, i)) where stages [j, b) and [b, i) are most even (cost model time),
    None when there is none."""
    if options.size == 0:
        return None
    worst = np.maximum(pre.cost(j, options), pre.cost(options, i))
    return int(options[int(np.argmin(worst))])


def _shifts(pre: _Prefix, cuts: list[int], inner: np.ndarray) -> list[list[int]]:
    """Move (a): each boundary to the nearest positions on either side, then at doubling distances, and to the point
    that balances its two stages."""
    out = []
    for r in range(1, len(cuts) - 1):
        options = _between(inner, cuts[r - 1], cuts[r + 1])
        if options.size <= 1:
            continue
        here = int(np.searchsorted(options, cuts[r]))
        picks = {here + d for step in (1, 2, 4, 8, 16, 32, 64) for d in (-step, step)}
        targets = {int(options[k]) for k in picks if 0 <= k < options.size}
        if (b := _balanced(pre, cuts[r - 1], cuts[r + 1], options)) is not None:
            targets.add(b)
        targets.discard(cuts[r])
        out += [cuts[:r] + [b] + cuts[r + 1 :] for b in sorted(targets)]
    return out


def _block_shifts(pre: _Prefix, cuts: list[int], inner: np.ndarray) -> list[list[int]]:
    """Move (c): every boundary from the r-th on (or up to the r-th) moved by the same number of positions, so the
    stages between keep their size while work moves between the ends of the pipeline (one boundary at a time, each
    step would unbalance a stage and be refused)."""
    index = np.searchsorted(inner, cuts[1:-1])
    out = []
    for step in (1, 2, 4, 8, 16):
        for d in (-step, step):
            for r in range(len(index)):
                for part in (slice(r, None), slice(None, r + 1)):
                    moved = index.copy()
                    moved[part] += d
                    if moved.min() < 0 or moved.max() >= inner.size or (np.diff(moved) <= 0).any():
                        continue
                    out.append([0, *map(int, inner[moved]), cuts[-1]])
    return out


def _merge_and_split(pre: _Prefix, cuts: list[int], inner: np.ndarray, width: int = 3) -> list[list[int]]:
    """Move (b): remove the boundary between the lightest adjacent pair of stages (the `width` lightest pairs) and add
    one at the balanced point of one of the `width` heaviest stages."""
    times = np.array([float(pre.cost(j, i)) for j, i in zip(cuts, cuts[1:])])
    pairs = np.argsort(times[:-1] + times[1:], kind="stable")[:width]  # boundary r = pair + 1
    heavy = np.argsort(-times, kind="stable")[:width]
    out = []
    for pair in pairs:
        r = int(pair) + 1
        merged = cuts[:r] + cuts[r + 1 :]
        for s in map(int, heavy):
            if s in (r - 1, r):
                continue  # splitting the merged pair again is move (a)
            j, i = cuts[s], cuts[s + 1]
            b = _balanced(pre, j, i, _between(inner, j, i))
            if b is not None and b not in merged:
                out.append(sorted(merged + [b]))
    return out
