"""The step a layout takes, from its stages' per-microbatch costs: what plan.search prices every candidate by and what
plan.step moves boundaries by.

    stage costs   + the data-parallel collectives each microbatch's forward / backward cannot hide (plan.sharding)
    replay        the schedule over those costs (partitioner.simulate): each rank's last action, its peak memory
    step end      per rank: its last action (or blocking send), + its data-parallel tail and the tensor-parallel
                  gradient sums of the step (PlanningGraph.step_sync), + the tied-weight gradient
                  sync if it holds a tied copy (after the last holder is ready), + its optimizer step

Ranks finish the schedule at different times (1F1B's first stage last), so a rank that finishes early updates its
weights while others still compute: the step is the latest rank's end, not the replay's end plus every tail.

A stage's training state (`StageState`: its trainable bytes, the layers they are spread over, its largest layer)
sets its optimizer step and how much of its data-parallel collectives hides; `stage_state` reads it from any
assignment, `ContiguousState` from prefix sums for contiguous cuts (the local search prices thousands of them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from partitioner.plan.graph import PlanningGraph
from partitioner.plan.sharding import DataParallelCost, data_parallel_cost, optimizer_step_time, state_divisors
from partitioner.schedules import get_schedule
from partitioner.simulate import SimResult, StageCost, StepTimes, fast_replay, replay_lower_bound, simulate

__all__ = [
    "ContiguousState", "Layout", "PricedStep", "StageState", "StepParts", "first_stages", "price_step", "stage_state",
    "step_end", "step_floor", "step_parts",
]  # fmt: skip


@dataclass(frozen=True)
class StageState:
    trainable: float  # bytes of the stage's trainable parameters
    layers: int  # the layers they are spread over (plan.recompute's; parameters outside every layer count as one)
    largest: float  # the largest layer's bytes


@dataclass(frozen=True)
class Layout:
    """What pricing needs of a candidate besides its stages."""

    pp: int
    tp: int
    dp: int
    microbatches: int
    schedule: str
    data_parallel: str = ""
    data_parallel_shard: int = 0
    overlap_grad_reduce: bool = True
    rank_overhead: float = 0.0  # bytes each rank holds whatever it runs (its NCCL communicators: plan.communicators)


@dataclass(frozen=True)
class PricedStep:
    costs: list[StageCost]  # the stage costs with the data-parallel collectives added
    data_parallel: list[DataParallelCost]  # per stage (zeros at dp 1 or without training)
    simulation: SimResult | StepTimes  # StepTimes: priced with fast_replay (no events)
    tails: list[float]  # per rank: the data-parallel work after its last backward
    optimizer: list[float]  # per rank: its optimizer step

    @property
    def peak_memory(self) -> float:
        return max(self.simulation.peak_memory)


@dataclass(frozen=True)
class StepParts:
    """What price_step replays and adds after it (step_parts)."""

    costs: list[StageCost]  # the stage costs with the data-parallel collectives each microbatch exposes
    data_parallel: list[DataParallelCost]  # those collectives per stage
    tails: list[float]  # per rank: the data-parallel work after its last backward
    optimizer: list[float]  # per rank: its optimizer step


def price_step(
    pg: PlanningGraph, layout: Layout, costs: Sequence[StageCost], state: Sequence[StageState], *, fast: bool = False,
    parts: StepParts | None = None,
) -> PricedStep:  # fmt: skip
    """Replay `layout`'s schedule over `costs` (per microbatch, one per stage) with the data-parallel collectives
    added, and each rank's tail and optimizer step (module docstring). `fast`: replayed by simulate.fast_replay
    (the same figures, no events). `parts`: step_parts of the same arguments, when the caller has them."""
    parts = parts if parts is not None else step_parts(pg, layout, costs, state)
    replay = fast_replay if fast else simulate
    sim = replay(parts.costs, num_microbatches=layout.microbatches, schedule=layout.schedule, num_ranks=layout.pp,
                 blocking_sends=not pg.spec.overlaps_comm)  # fmt: skip
    return PricedStep(list(parts.costs), parts.data_parallel, sim, parts.tails, parts.optimizer)


def step_floor(parts: StepParts, layout: Layout) -> float:
    """A lower bound on price_step's step (step_end, whatever the tied-weight sync) from its `parts`, in O(stages),
    without the replay: simulate.replay_lower_bound over the costs with the data-parallel collectives added, plus the
    least any rank spends after its last action (its tail and optimizer step). The step is the latest rank's end; the
    rank that ends the replay ends it no earlier than the replay's bound and still runs its own tail and optimizer
    step after."""
    bound = replay_lower_bound(parts.costs, num_microbatches=layout.microbatches, schedule=layout.schedule,
                               num_ranks=layout.pp)  # fmt: skip
    return bound + min(t + o for t, o in zip(parts.tails, parts.optimizer))


def first_stages(rank_of: Sequence[int]) -> set[int]:
    """The first stage each rank runs (what holds a rank's own bytes, counted once per rank)."""
    first: dict[int, int] = {}
    for s, r in enumerate(rank_of):
        first.setdefault(r, s)
    return set(first.values())


def step_parts(pg: PlanningGraph, layout: Layout, costs: Sequence[StageCost], state: Sequence[StageState]) -> StepParts:
    """What price_step replays and adds after it (StepParts): the data-parallel collectives of every stage
    (plan.sharding), each rank's tail and its optimizer step."""
    num_stages = len(costs)
    entry = get_schedule(layout.schedule)
    rank_of = entry.stage_ranks(num_stages, layout.pp)
    tails, optimizer = [0.0] * layout.pp, [0.0] * layout.pp
    split = entry.split_backward
    if pg.training:
        _, _, fo = state_divisors(layout.data_parallel, layout.dp, layout.data_parallel_shard, split_backward=split)
        held = [0.0] * layout.pp
        for s, st in enumerate(state):
            held[rank_of[s]] += st.trainable  # stages share their rank's optimizer step
        optimizer = [optimizer_step_time(pg.spec, w, fo, pg.param_element_size, pg.master_weights) for w in held]
    dp_costs = [DataParallelCost()] * num_stages
    if layout.dp > 1 and pg.training:
        dp_costs = [
            data_parallel_cost(
                layout.data_parallel or "ddp",
                pg.spec,
                tp=layout.tp,
                dp=layout.dp,
                weight_bytes=st.trainable,
                grad_bytes=st.trainable,
                forward=cost.forward,
                backward=cost.backward,
                layers=st.layers,
                largest_layer=st.largest,
                shard=layout.data_parallel_shard,
                split_backward=split,
                overlap_grad_reduce=layout.overlap_grad_reduce,
            )  # fmt: skip
            for cost, st in zip(costs, state)
        ]
        for s, extra in enumerate(dp_costs):
            tails[rank_of[s]] += extra.tail
        # A rank runs one layer at a time, so it holds one layer's gathered weights / unreduced gradients whichever of
        # its stages runs: the largest of its stages' transients, held by one stage's static bytes (adding each
        # stage's would count a rank of v stages v times: Llama 3 405B at zero-bubble x 2 stages per rank was refused
        # at 81.2 GiB for a split the DP held to 80).
        holder = {}
        for s, extra in enumerate(dp_costs):
            r = rank_of[s]
            if r not in holder or extra.transient > dp_costs[holder[r]].transient:
                holder[r] = s
        costs = [
            dataclasses.replace(
                cost,
                forward=cost.forward + extra.forward,
                backward=cost.backward + extra.backward,
                static_bytes=cost.static_bytes + (extra.transient if holder[rank_of[s]] == s else 0.0),
            )  # fmt: skip
            for s, (cost, extra) in enumerate(zip(costs, dp_costs))
        ]
    if layout.rank_overhead > 0:  # held by each rank's first stage
        first = first_stages(rank_of)
        costs = [
            dataclasses.replace(cost, static_bytes=cost.static_bytes + layout.rank_overhead) if s in first else cost
            for s, cost in enumerate(costs)
        ]
    # Every rank sums its stages' step-phase gradients once the backward is over, priced at the whole graph's (one
    # call, latency-bound: a rank's share moves fewer bytes for the same latencies)
    if pg.training and pg.step_sync > 0:
        tails = [t + pg.step_sync for t in tails]
    return StepParts(list(costs), dp_costs, tails, optimizer)


def step_end(priced: PricedStep, tied_sync: float = 0.0, tied_ranks: Sequence[int] = ()) -> float:
    """When the step ends (module docstring): `tied_sync` the tied-weight gradient all-reduce over `tied_ranks`."""
    ready = [end + tail for end, tail in zip(priced.simulation.rank_ends, priced.tails)]
    if tied_sync > 0 and tied_ranks:
        synced = max(ready[r] for r in tied_ranks) + tied_sync
        ready = [synced if r in tied_ranks else t for r, t in enumerate(ready)]
    return max(t + opt for t, opt in zip(ready, priced.optimizer))


def _units(pg: PlanningGraph) -> np.ndarray:
    """Each node's layer (index into pg.regions["full"]), -1 outside every layer."""
    unit = np.full(pg.n, -1, dtype=np.int64)
    for u, (a, b) in enumerate(pg.regions.get("full", [])):
        unit[a:b] = u
    return unit


def stage_state(pg: PlanningGraph, stage_of: Sequence[int], num_stages: int) -> list[StageState]:
    """Each stage's StageState under any assignment (a parameter read on two stages counts on both)."""
    unit = _units(pg)
    groups: list[dict[int, set[str]]] = [{} for _ in range(num_stages)]
    for i, ps in enumerate(pg.params):
        trainable = [p for p in ps if p in pg.trainable]
        if trainable:
            groups[stage_of[i]].setdefault(int(unit[i]), set()).update(trainable)
    out = []
    for per_unit in groups:
        sizes = [sum(pg.param_bytes[p] for p in ps) for ps in per_unit.values()]
        everything = set().union(*per_unit.values()) if per_unit else set()
        out.append(StageState(float(sum(pg.param_bytes[p] for p in everything)), max(len(sizes), 1),
                              max(sizes, default=0.0)))  # fmt: skip
    return out


class ContiguousState:
    """stage_state for contiguous cuts, from prefix sums over the parameters one node reads and a direct check of
    those several nodes read (tied or shared ones: on every stage that reads them, as stage_state counts them); a
    layer a boundary cuts counts whole on each side. Also each stage's static bytes (weights and training state),
    and which stages read a tied parameter."""

    def __init__(self, pg: PlanningGraph) -> None:
        unit = _units(pg)
        spans = pg.regions.get("full", [])
        readers: dict[str, list[int]] = {}
        for i, ps in enumerate(pg.params):
            for p in ps:
                readers.setdefault(p, []).append(i)
        trainable, static = np.zeros(pg.n), np.zeros(pg.n)
        per_unit = np.zeros(len(spans))
        loose = np.zeros(pg.n, dtype=np.int64)  # nodes reading a trainable parameter outside every layer
        self.shared: list[tuple[np.ndarray, float, float]] = []  # (readers, trainable bytes, static bytes)
        for p, nodes in readers.items():
            w = float(pg.param_bytes[p]) if p in pg.trainable else 0.0
            if len(set(nodes)) > 1:
                self.shared.append((np.unique(nodes), w, float(pg.param_static[p])))
            else:
                trainable[nodes[0]] += w
                static[nodes[0]] += pg.param_static[p]
            if w > 0:
                for i in set(nodes):
                    if unit[i] >= 0:
                        per_unit[unit[i]] += w / len(set(nodes))
                    else:
                        loose[i] = 1
        self.trainable = np.concatenate([[0.0], np.cumsum(trainable)])
        self.static = np.concatenate([[0.0], np.cumsum(static)])
        self.loose = np.concatenate([[0], np.cumsum(loose)])
        self.starts = np.array([a for a, _ in spans], dtype=np.int64)
        self.ends = np.array([b for _, b in spans], dtype=np.int64)
        self.unit_bytes = per_unit
        tied = set(pg.tied)
        self.tied_nodes = np.array([i for i, ps in enumerate(pg.params) if tied.intersection(ps)], dtype=np.int64)

    def _shared(self, cuts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(trainable, static) bytes per stage of the parameters several nodes read."""
        trainable, static = np.zeros(len(cuts) - 1), np.zeros(len(cuts) - 1)
        bounds = np.asarray(cuts)
        for nodes, w, st in self.shared:
            stages = np.unique(np.searchsorted(bounds, nodes, side="right") - 1)
            trainable[stages] += w
            static[stages] += st
        return trainable, static

    def __call__(self, cuts: Sequence[int]) -> list[StageState]:
        out = []
        shared, _ = self._shared(cuts)
        for s, (j, i) in enumerate(zip(cuts, cuts[1:])):
            lo = int(np.searchsorted(self.ends, j, side="right"))  # the first layer ending after j
            hi = int(np.searchsorted(self.starts, i, side="left"))  # past the last layer starting before i
            sizes = self.unit_bytes[lo:hi]
            used = int((sizes > 0).sum()) + (1 if self.loose[i] > self.loose[j] else 0)
            trainable = float(self.trainable[i] - self.trainable[j] + shared[s])
            out.append(StageState(trainable, max(used, 1), float(sizes.max(initial=0.0))))
        return out

    def static_bytes(self, cuts: Sequence[int]) -> list[float]:
        """Each stage's weights and training state (plan.graph.evaluate's static_bytes)."""
        _, shared = self._shared(cuts)
        return [float(self.static[i] - self.static[j] + shared[s]) for s, (j, i) in enumerate(zip(cuts, cuts[1:]))]

    def tied_stages(self, cuts: Sequence[int]) -> set[int]:
        """The stages holding a node that reads a tied parameter."""
        return {int(s) for s in np.searchsorted(np.asarray(cuts), self.tied_nodes, side="right") - 1}
