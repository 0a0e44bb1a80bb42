"""Discrete-event replay of a torch.distributed.pipelining schedule with cost-model times.

The simulator does not model a schedule by a formula: it replays the per-rank action lists of the schedule class
the distributed runtime would run (``schedule_actions``): every rank executes its list strictly in order, and an
action starts when its rank is free and its inputs have arrived. Per-stage times come from the cost model as
``StageCost``.

The action lists are torch's (2.13; classes looked up with ``torch.distributed.pipelining.schedules
.get_schedule_class``), written out from the rule each class builds them by, not obtained by constructing it:

============  =============================  ===================================================================
name          torch class                    written out by
============  =============================  ===================================================================
gpipe         ScheduleGPipe                  ``schedule_rules.single_stage_orders`` (``_step_microbatches``)
1f1b          Schedule1F1B                   ``schedule_rules.single_stage_orders`` (``_step_microbatches``)
interleaved   ScheduleInterleaved1F1B        ``schedule_rules.interleaved_orders`` (``_get_1f1b_rank_ops``)
looped-bfs    ScheduleLoopedBFS              ``schedule_rules.looped_bfs_orders``
zero-bubble   ScheduleInterleavedZeroBubble  ``schedule_rules.interleaved_orders`` (``_get_1f1b_rank_ops``)
zbv           ScheduleZBVZeroBubble          ``schedule_rules.zbv_orders``
============  =============================  ===================================================================

ScheduleDualPipeV is not offered: its OVERLAP_F_B actions run a forward and a backward concurrently, which
this one-action-at-a-time replay does not model.

Why written out: the multi-stage classes build the order of *every* rank in their constructor, in Python per
action, and the planner prices thousands of deep pipelines (a 1T GPT's search at 3,072 GPUs built schedules of
hundreds of thousands of actions for most of its time); the single-stage classes run hand-written loops whose
``_get_pipeline_order()`` IR is only documentation (in torch 2.13 ``Schedule1F1B``'s IR is wrong for the last rank:
it starts at F1 and lists F{m}, never F0). ``tests/test_simulate.py`` checks every written order against the
unmodified classes over grids of counts: the multi-stage ones against the compute actions of the
``pipeline_order_with_comms`` their runtime executes, the single-stage ones against the real ``_step_microbatches``
run once per rank on a stand-in stage that records its ``forward_one_chunk`` / ``backward_one_chunk`` calls; and
the counts torch refuses are refused alike. The stage -> rank map is the schedule's (``s % ranks``; V-shaped for
zbv).

Replay rules (checked independently by ``check_events``), for stage ``s``, microbatch ``i``, ``S`` stages:

* ``F(s, i)`` needs ``F(s-1, i)`` finished, plus ``stages[s-1].send_time`` when ``s-1`` is on another rank.
* ``B(s, i)`` / ``I(s, i)`` need ``F(s, i)`` finished and, for ``s < S-1``, the input gradient of ``s+1``:
  ``B(s+1, i)`` or ``I(s+1, i)`` finished plus ``stages[s].send_time`` across ranks (the gradient of ``s``'s
  output has the activation's size). The last stage's backward follows its own forward (loss is in F).
* ``W(s, i)`` needs ``I(s, i)``. Durations: F = ``forward``, B = ``backward``,
  I = ``backward_input_fraction * backward``, W = the rest.
* Sends are asynchronous and links unlimited: communication overlaps compute and never queues; a dependent
  action waits for arrival. Same-rank stage hand-offs are free.
* With ``blocking_sends=True`` (devices whose transfers do not overlap compute, ``DeviceSpec.overlaps_comm``:
  gloo on CPUs) a send also holds its sender: after an F whose output goes to another rank, or a B / I whose
  input gradient does, the rank is free only ``send_time`` later (``SimResult.send_holds``). The data still
  arrives at the end of that send. This is what torch's 1F1B loop does on any backend (it waits on each fused
  send/recv pair before the next action), and what gloo's copies cost a CPU in every schedule.
* Memory on a rank = static bytes of its stages + ``activation_bytes`` of every microbatch whose F has
  started and whose backward (B, or W for split backward) has not finished. Frees at a time are applied before
  allocations at the same time.

Worked example (4 equal stages, f=1, b=2, 8 microbatches, 1f1b): step time (8+4-1)*(1+2)=33,
bubble 3/11, rank r holds at most 4-r microbatches' activations; ``simulate`` reproduces these exactly.
"""

from __future__ import annotations

import functools
import math
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from itertools import pairwise
from typing import Any, NamedTuple

import numpy as np

from partitioner.schedule_rules import COUNTED_SCHEDULES, FORM_EXACT, interleaved_in_flight, rule_orders
from partitioner.schedules import get_schedule

__all__ = [
    "Action",
    "Event",
    "SimResult",
    "StageCost",
    "StepTimes",
    "check_events",
    "fast_replay",
    "in_flight_peaks",
    "replay",
    "replay_lower_bound",
    "schedule_actions",
    "simulate",
    "step_lower_bound",
]

_KINDS = ("F", "B", "I", "W")
_EPS = 1e-9


@dataclass(frozen=True, kw_only=True)
class StageCost:
    """Cost of one pipeline stage for one microbatch (from the cost model or a profile)."""

    forward: float  # seconds
    backward: float  # seconds, full backward (input + weight grads)
    # share of `backward` that is the input-grad part; zero-bubble schedules split B into I and W
    backward_input_fraction: float = 0.5
    # seconds to send this stage's output activation to the next stage (same for the gradient coming back)
    send_time: float = 0.0
    activation_bytes: float = 0.0  # held per in-flight microbatch, freed by its backward
    static_bytes: float = 0.0  # weights + grads + optimizer state, held throughout
    transient_bytes: float = 0.0  # held only while a backward runs (activations a recomputed region regenerates)

    def __post_init__(self) -> None:
        for name in ("forward", "backward", "send_time", "activation_bytes", "static_bytes", "transient_bytes"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"StageCost.{name} must be finite and >= 0, got {value}")
        if not 0.0 <= self.backward_input_fraction <= 1.0:
            raise ValueError(f"StageCost.backward_input_fraction must be in [0, 1], got {self.backward_input_fraction}")

    def duration(self, kind: str) -> float:
        """Seconds one action of `kind` ("F", "B", "I", "W") takes on this stage."""
        if kind == "F":
            return self.forward
        if kind == "B":
            return self.backward
        if kind == "I":
            return self.backward_input_fraction * self.backward
        if kind == "W":
            return self.backward - self.backward_input_fraction * self.backward
        raise ValueError(f"unknown action kind {kind!r}, expected one of {_KINDS}")


class Action(NamedTuple):
    """One compute action of a schedule; prints and parses like torch's ``_Action`` ("2F0")."""

    stage: int
    kind: str  # "F" forward, "B" full backward, "I" input-grad backward, "W" weight-grad backward
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    __repr__ = __str__

    @staticmethod
    def from_str(text: str) -> Action:
        """Inverse of ``str``: ``Action.from_str("2F0") == Action(2, "F", 0)``."""
        text = text.strip()
        for kind in _KINDS:
            stage, sep, mb = text.partition(kind)
            if sep and stage.isdigit() and mb.isdigit():
                return Action(int(stage), kind, int(mb))
        raise ValueError(f"invalid action {text!r}, expected [stage][F|B|I|W][microbatch] like '2F0'")


class Event(NamedTuple):
    """One executed action: rank, stage, microbatch, kind, start and end (seconds from step start)."""

    rank: int
    stage: int
    microbatch: int
    kind: str
    start: float
    end: float

    @property
    def action(self) -> Action:
        return Action(self.stage, self.kind, self.microbatch)

    def __str__(self) -> str:
        return f"r{self.rank}:{self.stage}{self.kind}{self.microbatch}@[{self.start:.6g},{self.end:.6g}]"

    __repr__ = __str__


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """Outcome of replaying one training step.

    Invariants: ``step_time`` is the latest event or send-hold end (the step starts at 0); ``busy[r]`` is the
    sum of event (compute) durations on rank ``r``, send holds excluded;
    ``bubble_fraction == 1 - sum(busy) / (num_ranks * step_time)`` (0 for an empty step); ``memory_timeline[r]``
    is a step function [(time, bytes)] starting at (0, static bytes), times increasing after that first point
    (a change at time 0 is a second point at 0), whose maximum is ``peak_memory[r]``; ``peak_inflight[r]`` is
    the most microbatch-stages whose activations rank ``r`` holds.
    """

    schedule: str
    num_ranks: int
    num_microbatches: int
    stage_to_rank: tuple[int, ...]  # index = stage
    step_time: float
    bubble_fraction: float
    busy: tuple[float, ...]  # per rank, seconds
    events: tuple[Event, ...]  # sorted by (start, rank)
    peak_memory: tuple[float, ...]  # per rank, bytes
    peak_inflight: tuple[int, ...]  # per rank
    memory_timeline: tuple[tuple[tuple[float, float], ...], ...]  # per rank: ((time, bytes), ...)
    blocking_sends: bool = False  # sends held their sender (see the module docstring)
    # (rank, start, end) of each time a rank was held by its own send (blocking_sends only), sorted
    send_holds: tuple[tuple[int, float, float], ...] = ()

    @property
    def rank_ends(self) -> tuple[float, ...]:
        """When each rank is done with the schedule: its last action, or its last send when sends block it."""
        ends = [0.0] * self.num_ranks
        for e in self.events:
            ends[e.rank] = max(ends[e.rank], e.end)
        for rank, _start, end in self.send_holds:
            ends[rank] = max(ends[rank], end)
        return tuple(ends)

    def summary(self) -> str:
        """A few lines: step time, bubble, and per-rank busy time and peak memory."""
        lines = [
            f"{self.schedule}: {self.num_ranks} ranks, {len(self.stage_to_rank)} stages, "
            f"{self.num_microbatches} microbatches: step {self.step_time:.6g} s, bubble {self.bubble_fraction:.1%}"
        ]
        for r in range(self.num_ranks):
            lines.append(
                f"  rank {r}: busy {self.busy[r]:.6g} s, peak {self.peak_memory[r]:.6g} B "
                f"({self.peak_inflight[r]} microbatch-stages in flight)"
            )
        return "\n".join(lines)


def _check_counts(schedule: str, num_stages: int, num_microbatches: int, num_ranks: int | None) -> int:
    """Validate the names and numbers we can judge without torch; return the number of ranks."""
    entry = get_schedule(schedule)
    if num_stages < 1 or num_microbatches < 1:
        raise ValueError(f"need num_stages >= 1 and num_microbatches >= 1, got {num_stages} and {num_microbatches}")
    if num_ranks is None:
        if entry.stages_per_rank is None:
            raise ValueError(f"schedule {schedule!r} places several stages per rank: pass num_ranks")
        num_ranks = num_stages // entry.stages_per_rank
    if num_ranks < 1:
        raise ValueError(f"need num_ranks >= 1, got {num_ranks}")
    entry.check_counts(num_stages, num_ranks)
    return num_ranks


def _bounded_cache(budget: int) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """An LRU cache of a schedule function of (schedule, num_stages, num_microbatches, num_ranks) that keeps at most
    `budget` stage-microbatches (stages x microbatches summed over its entries, about the actions they hold), the
    newest entry always.

    The search asks for the same orders many times (a candidate's in-flight counts, its replay, its refinement's
    replays), so many small schedules are worth keeping; a deep interleaved pipeline's hold millions of actions
    (hundreds of MB each), so few of those are. A count bound cannot do both: 256 entries took the 1T GPT's
    `schedule="auto"` search at 3,072 GPUs past 24 GB (killed for memory; session 45), 8 cost the default
    schedules' compile of the same model 30% (more rebuilt orders). Each cache sets its budget by what an entry
    weighs (`_torch_orders`: Python objects per action; `_compiled`: arrays)."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        entries: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        held = [0]

        @functools.wraps(fn)
        def cached(*args: Any) -> Any:
            if args in entries:
                entries.move_to_end(args)
                return entries[args][0]
            value = fn(*args)
            weight = int(args[1]) * int(args[2])
            entries[args] = (value, weight)
            held[0] += weight
            while held[0] > budget and len(entries) > 1:
                _, (_, dropped) = entries.popitem(last=False)
                held[0] -= dropped
            return value

        def cache_clear() -> None:
            entries.clear()
            held[0] = 0

        cached.cache_clear = cache_clear  # type: ignore[attr-defined]
        return cached

    return wrap


@_bounded_cache(budget=2_000_000)  # Action objects, ~100 bytes each: read by `simulate` (a winner's full replay)
def _torch_orders(
    schedule: str, num_stages: int, num_microbatches: int, num_ranks: int
) -> tuple[tuple[tuple[Action, ...], ...], tuple[int, ...]]:
    """(compute actions per rank, rank per stage) of torch's schedule for these numbers, written out from the rule
    torch builds it by (schedule_rules.rule_orders; torch's multi-stage constructors run Python per action of every
    rank, seconds for the deep pipelines a search at thousands of devices prices), as Action objects: what
    `simulate` replays and `schedule_actions` returns (the planner's replays read `_compiled`'s arrays).
    tests/test_simulate.py checks every one against the unmodified torch classes."""
    new = tuple.__new__
    orders = _rule_orders(schedule, num_stages, num_microbatches, num_ranks)
    actions = tuple(
        tuple(new(Action, (s, _KINDS[k], i)) for s, k, i in zip(*(a.tolist() for a in order))) for order in orders
    )
    return actions, tuple(get_schedule(schedule).stage_ranks(num_stages, num_ranks))


def _rule_orders(
    schedule: str, num_stages: int, num_microbatches: int, num_ranks: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """schedule_rules.rule_orders, a refusal worded as torch's constructor's would be."""
    try:
        return rule_orders(schedule, num_stages, num_microbatches, num_ranks)
    except ValueError as e:
        name = "Schedule" + get_schedule(schedule).torch_class
        where = f"{name}(num_stages={num_stages}, num_ranks={num_ranks}, n_microbatches={num_microbatches})"
        raise ValueError(f"torch refuses {where}: {e}") from e


def schedule_actions(
    schedule: str, num_stages: int, num_microbatches: int, num_ranks: int | None = None
) -> dict[int, list[Action]]:
    """Per-rank compute actions, in execution order, of the torch schedule that would run.

    ``schedule`` is a name of ``partitioner.schedules.SCHEDULES``; ``num_ranks`` defaults to ``num_stages`` for
    gpipe/1f1b (which need them equal) and to ``num_stages // 2`` for zbv; the other multi-stage schedules need it.
    Invalid names or combinations, including microbatch counts torch refuses, raise ValueError with the numbers.
    Invariant: every (stage, microbatch) appears once as F and once as B or as I and W, on the stage's rank.
    """
    ranks = _check_counts(schedule, num_stages, num_microbatches, num_ranks)
    orders = _torch_orders(schedule, num_stages, num_microbatches, ranks)[0]
    return {rank: list(actions) for rank, actions in enumerate(orders)}


def _arrival(
    producer: Event | None, stages: Sequence[StageCost], send_stage: int, mapping: Sequence[int], rank: int
) -> float | None:
    """When the producer's output is usable on `rank`: its end, plus the send time across ranks."""
    if producer is None:
        return None
    return producer.end + (stages[send_stage].send_time if mapping[producer.stage] != rank else 0.0)


def _send_stage(a: Action, stage_ranks: Sequence[int]) -> int | None:
    """The stage whose send time `a`'s cross-rank send costs (its output or input gradient), or None."""
    if a.kind == "F" and a.stage + 1 < len(stage_ranks) and stage_ranks[a.stage + 1] != stage_ranks[a.stage]:
        return a.stage
    if a.kind in ("B", "I") and a.stage > 0 and stage_ranks[a.stage - 1] != stage_ranks[a.stage]:
        return a.stage - 1
    return None


def replay(
    actions: dict[int, list[Action]],
    stages: Sequence[StageCost],
    stage_ranks: Sequence[int],
    *,
    num_microbatches: int,
    schedule: str = "custom",
    blocking_sends: bool = False,
) -> SimResult:
    """Replay per-rank action lists with `stages`' costs; the core of ``simulate`` (any lists, e.g. hand-made).

    Each rank runs its list in order; an action starts at max(rank free, inputs arrived) (rules in the module
    docstring); with `blocking_sends` a cross-rank send also holds its sender. Raises RuntimeError naming the
    stuck actions if no rank can make progress.
    """
    num_stages = len(stages)
    num_ranks = len(actions)
    if sorted(actions) != list(range(num_ranks)) or len(stage_ranks) != num_stages:
        raise ValueError(
            f"need actions for ranks 0..{num_ranks - 1} (got {sorted(actions)}) and a rank for each of the "
            f"{num_stages} stages (got {len(stage_ranks)})"
        )
    last = num_stages - 1
    done: dict[Action, Event] = {}
    heads = {r: 0 for r in actions}
    free = {r: 0.0 for r in actions}
    holds: list[tuple[int, float, float]] = []

    def ready_time(rank: int, a: Action) -> float | None:
        """Earliest start allowed by dependencies, or None while one of them has not run yet."""
        if a.kind == "F":
            if a.stage == 0:
                return 0.0
            return _arrival(done.get(Action(a.stage - 1, "F", a.microbatch)), stages, a.stage - 1, stage_ranks, rank)
        if a.kind == "W":
            i = done.get(Action(a.stage, "I", a.microbatch))
            return None if i is None else i.end
        own_f = done.get(Action(a.stage, "F", a.microbatch))
        if own_f is None:
            return None
        if a.stage == last:
            return own_f.end
        grad = done.get(Action(a.stage + 1, "B", a.microbatch)) or done.get(Action(a.stage + 1, "I", a.microbatch))
        arrived = _arrival(grad, stages, a.stage, stage_ranks, rank)
        return None if arrived is None else max(own_f.end, arrived)

    # Phase 1: list scheduling. Start times depend only on earlier actions, so sweeping ranks until no head
    # can start gives the same times as an event queue.
    progress = True
    while progress:
        progress = False
        for rank, order in actions.items():
            while heads[rank] < len(order):
                a = order[heads[rank]]
                if a.stage >= num_stages or stage_ranks[a.stage] != rank:
                    raise ValueError(f"action {a} listed on rank {rank}, but stage {a.stage} is not on it")
                t = ready_time(rank, a)
                if t is None:
                    break
                start = max(free[rank], t)
                event = Event(rank, a.stage, a.microbatch, a.kind, start, start + stages[a.stage].duration(a.kind))
                if a in done:
                    raise ValueError(f"action {a} appears twice")
                done[a] = event
                free[rank] = event.end
                sent = _send_stage(a, stage_ranks) if blocking_sends else None
                if sent is not None and stages[sent].send_time > 0:
                    free[rank] = event.end + stages[sent].send_time
                    holds.append((rank, event.end, free[rank]))
                heads[rank] += 1
                progress = True
    stuck = {r: order[heads[r]] for r, order in actions.items() if heads[r] < len(order)}
    if stuck:
        raise RuntimeError(
            "pipeline replay deadlocked; each rank's next action waits for one that cannot run: "
            + ", ".join(f"rank {r}: {a}" for r, a in sorted(stuck.items()))
        )

    # Phase 2: time and utilization.
    events = tuple(sorted(done.values(), key=lambda e: (e.start, e.rank)))
    step_time = max([e.end for e in events] + [end for _, _, end in holds], default=0.0)
    busy = [0.0] * num_ranks
    for e in events:
        busy[e.rank] += e.end - e.start
    bubble = 1.0 - sum(busy) / (num_ranks * step_time) if step_time > 0 else 0.0

    # Phase 3: memory. +activation at F start, - at the end of the backward that completes the microbatch.
    # rank -> (time, order, bytes, in-flight change); at one time frees (order 0) sort before allocations (1, 2)
    deltas: dict[int, list[tuple[float, int, float, int]]] = defaultdict(list)
    split = {(e.stage, e.microbatch) for e in events if e.kind == "W"}
    for e in events:
        act = stages[e.stage].activation_bytes
        if e.kind == "F":
            deltas[e.rank].append((e.start, 1, +act, +1))
        elif e.kind == "W" or (e.kind == "B" and (e.stage, e.microbatch) not in split):
            deltas[e.rank].append((e.end, 0, -act, -1))
        transient = stages[e.stage].transient_bytes
        if e.kind in ("B", "I") and transient > 0:  # a recomputed region's activations, during its backward
            deltas[e.rank].append((e.start, 2, +transient, 0))
            deltas[e.rank].append((e.end, 0, -transient, 0))
    static = [0.0] * num_ranks
    for s, cost in enumerate(stages):
        static[stage_ranks[s]] += cost.static_bytes
    timelines, peaks, inflight = [], [], []
    for r in range(num_ranks):
        level, count, peak, peak_count = static[r], 0, static[r], 0
        timeline = [(0.0, level)]
        for t, _, delta, change in sorted(deltas[r]):
            level += delta
            count += change
            peak, peak_count = max(peak, level), max(peak_count, count)
            if len(timeline) > 1 and timeline[-1][0] == t:  # keep (0, static) as the first point
                timeline[-1] = (t, level)
            else:
                timeline.append((t, level))
        timelines.append(tuple(timeline))
        peaks.append(peak)
        inflight.append(peak_count)

    return SimResult(
        schedule=schedule,
        num_ranks=num_ranks,
        num_microbatches=num_microbatches,
        stage_to_rank=tuple(stage_ranks),
        step_time=step_time,
        bubble_fraction=bubble,
        busy=tuple(busy),
        events=events,
        peak_memory=tuple(peaks),
        peak_inflight=tuple(inflight),
        memory_timeline=tuple(timelines),
        blocking_sends=blocking_sends,
        send_holds=tuple(sorted(holds, key=lambda h: (h[1], h[0]))),
    )


def simulate(
    stages: Sequence[StageCost],
    *,
    num_microbatches: int,
    schedule: str,
    num_ranks: int | None = None,
    blocking_sends: bool = False,
) -> SimResult:
    """Predict one training step of ``schedule`` over ``stages`` by replaying torch's own action lists.

    ``len(stages)`` is the number of pipeline stages; stage ``s`` runs on rank ``result.stage_to_rank[s]``.
    ``blocking_sends``: sends hold their sender (devices whose transfers do not overlap compute).
    Raises ValueError for an unknown schedule or a combination torch refuses (numbers in the message).
    """
    ranks = _check_counts(schedule, len(stages), num_microbatches, num_ranks)
    orders, stage_ranks = _torch_orders(schedule, len(stages), num_microbatches, ranks)
    actions = {rank: list(order) for rank, order in enumerate(orders)}
    return replay(
        actions, stages, stage_ranks, num_microbatches=num_microbatches, schedule=schedule,
        blocking_sends=blocking_sends,
    )  # fmt: skip


@dataclass(frozen=True)
class StepTimes:
    """What `fast_replay` gives: `simulate`'s step time, each rank's end (SimResult.rank_ends) and peak memory."""

    step_time: float
    rank_ends: tuple[float, ...]
    peak_memory: tuple[float, ...]
    stage_to_rank: tuple[int, ...]


@dataclass(frozen=True)
class _Replay:
    """A schedule's replay reduced to arrays: actions in an order where every dependency and every earlier action of
    the same rank comes first (a topological order, which depends on the action lists alone, never on durations),
    each with its rank, stage, kind, dependencies (action index, the stage whose send it waits for or -1) and the
    stage whose send it holds its rank for under blocking sends (-1: none).

    The order is by level (an action's level is one more than the highest of its dependencies' and its rank
    predecessor's): the actions of level k lie in level_starts[k]:level_starts[k + 1] and depend only on earlier
    levels, which `_replay_by_levels` times a level at a time."""

    rank: np.ndarray
    stage: np.ndarray
    sends: np.ndarray
    frees: np.ndarray  # True: the action frees its microbatch's activations at its end (B, or W when split)
    per_rank: tuple[np.ndarray, ...]  # each rank's actions in its execution order
    stage_ranks: tuple[int, ...]
    level_starts: np.ndarray
    kind_code: np.ndarray  # index into _KINDS
    previous: np.ndarray  # the rank's previous action, or -1
    dep_index: np.ndarray  # (n, 2): dependencies, -1 where fewer
    dep_send: np.ndarray  # (n, 2): the stage whose send a dependency waits for, -1 for none

    # Arrays, read as they are by the vector replay and the memory sums; fast_replay's per-action loop reads the
    # Python lists below, made once on first use (a deep pipeline's tuple of 500k ints took ~25 ms to turn back into
    # an array on every replay when the structure held tuples).

    @cached_property
    def rank_list(self) -> list[int]:
        return self.rank.tolist()

    @cached_property
    def sends_list(self) -> list[int]:
        return self.sends.tolist()

    @cached_property
    def deps(self) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per action, its (dependency, send stage) pairs (fast_replay's loop)."""
        return tuple(
            tuple((d, s) for d, s in zip(ds, ss) if d >= 0)
            for ds, ss in zip(self.dep_index.tolist(), self.dep_send.tolist())
        )


# About 120 bytes a stage-microbatch (2-3 actions of int32 / int8 arrays): 8M is about 1 GB at most. The 1T GPT's
# schedule="auto" search at 3,072 GPUs builds 88 distinct structures of 20M stage-microbatches in all; at a budget of
# 2M it built 195 (52M), the deep ones evicted between the candidates that share them.
@_bounded_cache(budget=8_000_000)
def _compiled(schedule: str, num_stages: int, num_microbatches: int, num_ranks: int) -> _Replay:
    """The replay structure of a schedule: every action's data dependencies and its rank predecessor as edges, put
    in a topological order by Kahn's algorithm a level at a time (each wave of actions whose inputs are all placed is
    handled in a few vector operations: a deep pipeline has hundreds of thousands of actions in thousands of
    levels). Any topological order gives replay's times: an action starts at the latest of its rank's previous action
    and its inputs' arrivals. Dependencies: F(s, i) on F(s - 1, i); B or I(s, i) on F(s, i) and on the gradient of
    stage s + 1 (its B, else its I); W(s, i) on I(s, i); each waiting for the sender's send when they sit on
    different ranks."""
    F, B, I, W = range(4)  # noqa: E741 (the action kinds, in _KINDS order)
    arrays = _rule_orders(schedule, num_stages, num_microbatches, num_ranks)  # no Action object per action
    stage, kind, mb = (np.concatenate(column) for column in zip(*arrays))  # rank-major, each rank in its order
    counts = np.array([len(a[0]) for a in arrays], dtype=np.int64)
    stage_ranks = tuple(get_schedule(schedule).stage_ranks(num_stages, num_ranks))
    rank = np.repeat(np.arange(num_ranks), counts)
    n, last = len(stage), num_stages - 1
    ranks_of = np.asarray(stage_ranks, dtype=np.int64)
    table = np.full((4, num_stages, max(num_microbatches, 1)), -1, dtype=np.int64)  # (kind, stage, mb) -> action
    table[kind, stage, mb] = np.arange(n)

    dep_index, dep_send = np.full((n, 2), -1, dtype=np.int64), np.full((n, 2), -1, dtype=np.int64)
    needed = np.zeros((n, 2), dtype=bool)
    is_f, is_w, is_bi = kind == F, kind == W, (kind == B) | (kind == I)
    f_dep = is_f & (stage > 0)
    dep_index[f_dep, 0] = table[F, stage[f_dep] - 1, mb[f_dep]]
    dep_send[f_dep, 0] = np.where(ranks_of[stage[f_dep] - 1] != rank[f_dep], stage[f_dep] - 1, -1)
    needed[f_dep, 0] = True
    dep_index[is_w, 0] = table[I, stage[is_w], mb[is_w]]
    needed[is_w, 0] = True
    dep_index[is_bi, 0] = table[F, stage[is_bi], mb[is_bi]]
    needed[is_bi, 0] = True
    grad = is_bi & (stage < last)
    nxt = stage[grad] + 1
    from_b = table[B, nxt, mb[grad]]
    dep_index[grad, 1] = np.where(from_b >= 0, from_b, table[I, nxt, mb[grad]])
    dep_send[grad, 1] = np.where(ranks_of[nxt] != rank[grad], stage[grad], -1)
    needed[grad, 1] = True
    deadlock = RuntimeError(f"{schedule} with {num_stages} stages, {num_microbatches} microbatches deadlocks")
    if np.any(needed & (dep_index < 0)):  # an input no action produces: never ready
        raise deadlock
    dep_send[dep_index < 0] = -1

    previous = np.arange(n) - 1
    previous[np.concatenate([[0], np.cumsum(counts)[:-1]])[counts > 0]] = -1  # each rank's first action
    # Kahn's algorithm by waves over the edges (producer -> consumer), successors grouped by producer (CSR).
    src = np.concatenate([previous, dep_index[:, 0], dep_index[:, 1]])
    dst = np.concatenate([np.arange(n)] * 3)
    valid = src >= 0
    src, dst = src[valid], dst[valid]
    waiting = np.bincount(dst, minlength=n)
    by_src = np.argsort(src, kind="stable")
    succ = dst[by_src]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(src, minlength=n))])
    level = np.full(n, -1, dtype=np.int64)
    wave, depth = np.flatnonzero(waiting == 0), 0
    slot = np.zeros(n, dtype=np.int64)  # scratch: where in `ready` an action was last written
    while wave.size:
        level[wave] = depth
        lengths = offsets[wave + 1] - offsets[wave]
        if not lengths.sum():
            break
        firsts = np.repeat(offsets[wave] - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
        reached = succ[firsts]
        np.subtract.at(waiting, reached, 1)
        ready = reached[waiting[reached] == 0]  # an action reached by two edges of this wave is listed twice
        slot[ready] = np.arange(ready.size)  # the last write of each wins: keep that one occurrence (no sort)
        wave = ready[slot[ready] == np.arange(ready.size)]
        depth += 1
    if np.any(level < 0):
        raise deadlock
    order = np.argsort(level, kind="stable")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)

    def moved(index: np.ndarray) -> np.ndarray:  # action indices -> positions in the order (-1 stays)
        return np.where(index >= 0, position[np.maximum(index, 0)], -1)

    sends = np.full(n, -1, dtype=np.int64)
    ahead = is_f & (stage < last)
    ahead[ahead] = ranks_of[stage[ahead] + 1] != rank[ahead]
    sends[ahead] = stage[ahead]
    behind = is_bi & (stage > 0)
    behind[behind] = ranks_of[stage[behind] - 1] != rank[behind]
    sends[behind] = stage[behind] - 1
    frees = is_w | ((kind == B) & (table[W, stage, mb] < 0))
    levels = level[order]
    bounds = np.cumsum(counts)
    i32 = np.int32  # indices and stages fit 32 bits; half the bytes of a cached structure (`_compiled`'s budget)
    return _Replay(
        rank=rank[order].astype(i32),
        stage=stage[order].astype(i32),
        sends=sends[order].astype(i32),
        frees=frees[order],
        per_rank=tuple(np.split(position.astype(i32), bounds[:-1])),
        stage_ranks=tuple(stage_ranks),
        level_starts=np.searchsorted(levels, np.arange(levels[-1] + 2 if n else 1)),
        kind_code=kind[order].astype(np.int8),
        previous=moved(previous[order]).astype(i32),
        dep_index=moved(dep_index[order]).astype(i32),
        dep_send=dep_send[order].astype(i32),
    )


def fast_replay(
    stages: Sequence[StageCost], *, num_microbatches: int, schedule: str, num_ranks: int | None = None,
    blocking_sends: bool = False,
) -> StepTimes:  # fmt: skip
    """`simulate`'s step time, rank ends and peak memory without its events and timelines: the schedule's replay is
    reduced to arrays once per (schedule, stages, microbatches, ranks), then each call is one pass over its actions
    (what the planner's boundary search prices thousands of splits with). Equal to `simulate`'s figures
    (tests/test_simulate.py)."""
    ranks = _check_counts(schedule, len(stages), num_microbatches, num_ranks)
    plan = _compiled(schedule, len(stages), num_microbatches, ranks)
    if len(plan.rank) >= WIDE_LEVELS * (len(plan.level_starts) - 1):
        return _replay_by_levels(plan, stages, ranks, blocking_sends, schedule, num_microbatches)
    durations = np.array([[c.duration(k) for c in stages] for k in _KINDS], dtype=np.float64)
    duration = durations[plan.kind_code, plan.stage].tolist()  # each action's, looked up once
    send = [c.send_time for c in stages] + [0.0]  # index -1: no send (x + 0.0 is x)
    rank, deps = plan.rank_list, plan.deps
    n = len(rank)
    end = [0.0] * n
    free = [0.0] * ranks
    holds = [send[h] if h >= 0 else 0.0 for h in plan.sends_list] if blocking_sends else None
    for i in range(n):
        r = rank[i]
        t = free[r]
        for d, s in deps[i]:
            arrive = end[d] + send[s]
            if arrive > t:
                t = arrive
        t += duration[i]
        end[i] = t
        free[r] = t + holds[i] if holds is not None and holds[i] > 0 else t
    ends = tuple(free)  # after a rank's last action, or its last blocking send
    peaks = _peaks(plan, stages, ranks, schedule, num_microbatches)
    return StepTimes(max(ends, default=0.0), ends, peaks, plan.stage_ranks)


@lru_cache(maxsize=4096)  # a tuple per stage: small
def in_flight_peaks(
    schedule: str, num_stages: int, num_microbatches: int, num_ranks: int | None = None
) -> tuple[int, ...]:
    """The most microbatches whose activations each stage holds at once in torch's schedule (forwards started, their
    freeing backward not yet run), counted over its rank's action order: what the planner holds a stage's memory to.

    Single-stage schedules: `Schedule.in_flight`'s closed form, which is exact there (no schedule is built). Several
    stages per rank: torch's interleaved and interleaved zero-bubble orders counted from the rule they follow
    (partitioner.schedule_rules: no schedule built, so the search can ask for thousands of deep pipelines); the
    form again for looped-bfs and zbv, where it is exact (ibid.); a schedule of neither kind over the replay's order
    (`_compiled`). The form min(stages - s, m) is far
    off there: torch's Interleaved1F1B warms up a round of microbatches per local stage, so at 35 ranks x 3 stages
    and 280 microbatches rank 0's stages peak at 70 / 69 / 35 where the form says 105 / 70 / 35, and the interleaved
    zero-bubble schedule keeps 35 on its last stages, where the form says 1 to 35.
    tests/test_simulate.py checks the counts against `replay`'s events.

    >>> in_flight_peaks("1f1b", 4, 8), in_flight_peaks("interleaved", 8, 8, num_ranks=2)
    ((4, 3, 2, 1), (4, 4, 4, 3, 2, 2, 2, 1))
    """
    entry = get_schedule(schedule)
    if entry.single_stage:
        return tuple(entry.in_flight(num_stages, num_microbatches))
    ranks = _check_counts(schedule, num_stages, num_microbatches, num_ranks)
    if schedule in COUNTED_SCHEDULES:  # torch's interleaved orders follow a rule: counted without building them
        return interleaved_in_flight(schedule, num_stages, num_microbatches, ranks)
    if schedule in FORM_EXACT:  # torch refuses none of their microbatch counts
        return tuple(entry.in_flight(num_stages, num_microbatches))
    # Any other written-out schedule: counted over its order, F adding one, the action ending a backward freeing one.
    stage, kind, mb = (np.concatenate(c) for c in zip(*_rule_orders(schedule, num_stages, num_microbatches, ranks)))
    split = np.zeros((num_stages, num_microbatches), dtype=bool)
    split[stage[kind == 3], mb[kind == 3]] = True  # (stage, microbatch) whose backward is split: W frees
    frees = (kind == 3) | ((kind == 1) & ~split[stage, mb])
    delta = np.where(kind == 0, 1, -frees.astype(np.int64))
    by_stage = np.argsort(stage, kind="stable")  # a stage's actions keep its rank's order
    stage, held = stage[by_stage], np.cumsum(delta[by_stage])
    starts = np.searchsorted(stage, np.arange(num_stages))
    held -= np.repeat(np.concatenate([[0], held[starts[1:] - 1]]), np.diff(np.append(starts, stage.size)))
    return tuple(int(x) for x in np.maximum.reduceat(held, starts))


def _peaks(
    plan: _Replay, stages: Sequence[StageCost], ranks: int, schedule: str, num_microbatches: int
) -> tuple[float, ...]:
    """Each rank's peak bytes over its actions: static, plus the activations of the microbatches in flight (added
    by F, freed at the end of the action that frees them), plus a B / I's region transient on top before it frees.
    A running sum per rank (np.cumsum adds in action order, as a loop would).

    One stage per rank with a whole backward (1F1B, GPipe): a rank's first backward follows its in-flight peak of
    forwards with nothing freed, so its peak is static + in-flight peak x activations + transient, in closed form
    (equal to the running sum's to rounding; the step search prices thousands of splits so)."""
    entry = get_schedule(schedule)
    if entry.single_stage and not entry.split_backward:
        flights = in_flight_peaks(schedule, len(stages), num_microbatches, ranks)
        return tuple(
            c.static_bytes + f * c.activation_bytes + (max(c.transient_bytes, 0.0) if f else 0.0)
            for c, f in zip(stages, flights)
        )
    stage, frees, kind = plan.stage, plan.frees, plan.kind_code
    static = _static_by_rank(stages, plan.stage_ranks, ranks)
    activation = np.array([c.activation_bytes for c in stages], dtype=np.float64)
    transient = np.array([c.transient_bytes for c in stages], dtype=np.float64)
    peaks = []
    for r, idx in enumerate(plan.per_rank):
        level = static[r]
        if not idx.size:
            peaks.append(level)
            continue
        st, k = stage[idx], kind[idx]
        forward = k == 0
        delta = np.where(forward, activation[st], np.where(frees[idx], -activation[st], 0.0))
        after = np.cumsum(np.concatenate([[level], delta]))  # after[j]: the level after the rank's j-th action
        spikes = ((k == 1) | (k == 2)) & (transient[st] > 0)  # B / I: its region's transient on top, before freeing
        peak = max(level, float(after[1:][forward].max(initial=-np.inf)))
        peak = max(peak, float((after[:-1][spikes] + transient[st][spikes]).max(initial=-np.inf)))
        peaks.append(peak)
    return tuple(peaks)


def _static_by_rank(stages: Sequence[StageCost], stage_ranks: Sequence[int], ranks: int) -> list[float]:
    """Each rank's static bytes: its stages' summed in stage order (one pass over the stages, not one per rank)."""
    static = [0] * ranks
    for st, c in enumerate(stages):
        static[stage_ranks[st]] += c.static_bytes
    return static


WIDE_LEVELS = 24  # actions per level from which `_replay_by_levels` beats one Python step per action


def _replay_by_levels(
    plan: _Replay, stages: Sequence[StageCost], ranks: int, blocking_sends: bool, schedule: str, num_microbatches: int
) -> StepTimes:
    """fast_replay with each level's actions (independent of one another) timed in a few vector operations, and each
    rank's memory as a running sum: a deep pipeline's hundreds of thousands of actions in thousands of levels. Every
    figure is computed by the same additions and maxima, in the same order per value, as fast_replay's loop, so the
    two agree to the last bit (tests/test_simulate.py)."""
    n = len(plan.rank)
    duration = np.array([[c.duration(k) for c in stages] for k in _KINDS], dtype=np.float64)[plan.kind_code, plan.stage]
    send = np.array([c.send_time for c in stages] + [0.0])  # index -1: no send
    hold = send[plan.sends] if blocking_sends else np.zeros(n)  # a blocking send holds its rank after the action
    # Index -1 (no previous action, no dependency) reads the zero at the end of `end` / `free` and of `send`: a time
    # of 0, never later than any start, so no case needs a branch (x + 0.0 and max(x, 0.0) are x for x >= 0).
    end, free = np.zeros(n + 1), np.zeros(n + 1)  # free[i]: when action i's rank is free again
    previous, dep0, dep1 = plan.previous, plan.dep_index[:, 0], plan.dep_index[:, 1]
    send0, send1 = send[plan.dep_send[:, 0]], send[plan.dep_send[:, 1]]
    starts = plan.level_starts.tolist()
    for a, b in zip(starts[:-1], starts[1:]):
        t = np.maximum(free[previous[a:b]], end[dep0[a:b]] + send0[a:b])
        np.maximum(t, end[dep1[a:b]] + send1[a:b], out=t)
        t += duration[a:b]
        end[a:b] = t
        free[a:b] = t + hold[a:b]
    ends = tuple(float(free[actions[-1]]) if actions.size else 0.0 for actions in plan.per_rank)
    peaks = _peaks(plan, stages, ranks, schedule, num_microbatches)
    return StepTimes(max(ends, default=0.0), ends, peaks, plan.stage_ranks)


def step_lower_bound(schedule: str, work: float, num_ranks: int, num_microbatches: int) -> float:
    """A lower bound on the step of `schedule` over `num_ranks` ranks for `work` seconds of stage work per step (the
    sum over stages and microbatches), whatever the split into stages.

    Every schedule: work / num_ranks (perfect balance, no bubble). One stage per rank with a whole backward (gpipe,
    1f1b) also pays its fill and drain: with t_s stage s's work per microbatch, rank k starts no earlier than the
    first microbatch's forward through the stages before it, and after its last backward those stages still run
    theirs, so step >= m t_k + sum_{s<k} t_s for every k. The split that minimizes the largest of these makes them
    all equal (t_s falls geometrically by (m - 1) / m per stage), which gives
        step >= (work / m) / (1 - (1 - 1/m)^p)
    for p ranks and m microbatches: p = 1 gives work, m -> infinity work / p. Not for multi-stage or split-backward
    schedules, whose ranks interleave stages or fill the drain with weight gradients.
    """
    balanced = work / max(num_ranks, 1)
    entry = get_schedule(schedule)
    if num_ranks <= 1 or not entry.single_stage or entry.split_backward or num_microbatches < 1:
        return balanced
    m = num_microbatches
    return max(balanced, (work / m) / (1.0 - (1.0 - 1.0 / m) ** num_ranks))


def replay_lower_bound(
    stages: Sequence[StageCost], *, num_microbatches: int, schedule: str, num_ranks: int | None = None
) -> float:
    """A lower bound on `fast_replay`'s (and `simulate`'s) step time for these stage costs, in O(stages): what the
    planner's boundary search checks before it replays a split (plan.step).

    For a rank r whose lowest stage is s: none of its actions can start before the first microbatch's forward has
    crossed the stages below s (their forwards and the sends between ranks: the fill). Every forward and input-grad
    backward of r for microbatch j precedes, through the dependency chain, the input-grad backward of stage s for
    j; so the last of those ends no earlier than the fill plus all of r's forward and input-grad work, and the step
    after it still runs the input-grad backwards of the stages below s (the drain). The rank's whole work, weight
    gradients included, also follows the fill. Hence, with I the input-grad share of a backward (all of it unless
    the schedule splits the backward),

        step >= fill(s) + max(m * sum_r (F + B), m * sum_r (F + I) + drain(s))    for every rank r.

    Exact for 1F1B over equal stages without sends: (m + p - 1)(F + B). Sends that hold their rank (blocking sends)
    only lengthen the step, so the bound ignores them."""
    entry = get_schedule(schedule)
    ranks = _check_counts(schedule, len(stages), num_microbatches, num_ranks)
    rank_of = entry.stage_ranks(len(stages), ranks)
    m = num_microbatches
    fill = drain = 0.0  # over the stages below the current one
    lowest: dict[int, tuple[float, float]] = {}  # rank -> (fill, drain) at its lowest stage
    everything, forward_input = [0.0] * ranks, [0.0] * ranks
    for s, c in enumerate(stages):
        r = rank_of[s]
        lowest.setdefault(r, (fill, drain))
        input_grad = c.backward_input_fraction * c.backward if entry.split_backward else c.backward
        everything[r] += m * (c.forward + c.backward)
        forward_input[r] += m * (c.forward + input_grad)
        hop = c.send_time if s + 1 < len(stages) and rank_of[s + 1] != r else 0.0
        fill += c.forward + hop
        drain += input_grad + hop
    return max(
        (f + max(everything[r], forward_input[r] + d) for r, (f, d) in lowest.items()),
        default=0.0,
    )


def check_events(result: SimResult, stages: Sequence[StageCost]) -> None:
    """Assert the replay rules on a result's events (written independently of ``replay``, for tests).

    Rules: (1) every (stage, microbatch) has exactly one F and either one B or one I and one W, each on the
    stage's rank, lasting its cost; (2) events and send holds on a rank never overlap, and with blocking sends
    each F or B/I whose output or input gradient goes to another rank is directly followed by a send hold of
    that send time (and nothing else is); (3) F(s,i) starts after F(s-1,i) ends (+ send time across ranks);
    (4) B/I(s,i) start after F(s,i) and after B/I(s+1,i) (+ send time across ranks);
    (5) W(s,i) starts after I(s,i). Raises AssertionError naming the first broken rule and the events.
    """
    by_action: dict[tuple[int, str, int], list[Event]] = defaultdict(list)
    for e in result.events:
        by_action[(e.stage, e.kind, e.microbatch)].append(e)
    ranks = result.stage_to_rank

    def one(stage: int, kind: str, mb: int) -> Event | None:
        found = by_action.get((stage, kind, mb), [])
        assert len(found) <= 1, f"rule 1: {stage}{kind}{mb} ran {len(found)} times: {found}"
        return found[0] if found else None

    def cross(src: int, dst: int, send_stage: int) -> float:
        return stages[send_stage].send_time if ranks[src] != ranks[dst] else 0.0

    # Rule 1: completeness, placement and durations.
    for e in result.events:
        assert e.rank == ranks[e.stage], f"rule 1: {e} is not on stage {e.stage}'s rank {ranks[e.stage]}"
        want = stages[e.stage].duration(e.kind)
        assert abs((e.end - e.start) - want) <= _EPS * max(1.0, want), f"rule 1: {e} should last {want}"
    for s in range(len(stages)):
        for i in range(result.num_microbatches):
            assert one(s, "F", i) is not None, f"rule 1: {s}F{i} missing"
            b, i_, w = one(s, "B", i), one(s, "I", i), one(s, "W", i)
            assert (b is not None) != (i_ is not None and w is not None) and (i_ is None) == (w is None), (
                f"rule 1: stage {s} microbatch {i} needs one B or one I+W, got B={b} I={i_} W={w}"
            )
    assert len(result.events) == sum(len(v) for v in by_action.values())

    # Rule 2: a rank does one thing at a time; a send hold follows the event that sends.
    ends = {(e.rank, round(e.end, 12)): e for e in result.events}
    for r, start, end in result.send_holds:
        e = ends.get((r, round(start, 12)))
        assert e is not None, f"rule 2: send hold on rank {r} at {start} follows no event"
        receiver = e.stage + 1 if e.kind == "F" else e.stage - 1
        assert e.kind != "W" and 0 <= receiver < len(stages) and ranks[receiver] != r, (
            f"rule 2: send hold after {e}, which sends nothing across ranks"
        )
        want = stages[min(e.stage, receiver)].send_time
        assert abs((end - start) - want) <= _EPS * max(1.0, want), f"rule 2: hold after {e} should last {want}"
    if result.blocking_sends:
        held = {(r, round(start, 12)) for r, start, _ in result.send_holds}
        for e in result.events:
            receiver = e.stage + 1 if e.kind == "F" else e.stage - 1
            sends = e.kind != "W" and 0 <= receiver < len(stages) and ranks[receiver] != e.rank
            if sends and stages[min(e.stage, receiver)].send_time > 0:
                assert (e.rank, round(e.end, 12)) in held, f"rule 2: {e} sends across ranks but holds no time"
    else:
        assert not result.send_holds, "rule 2: send holds without blocking_sends"
    per_rank: dict[int, list[tuple[float, float, object]]] = defaultdict(list)
    for e in result.events:
        per_rank[e.rank].append((e.start, e.end, e))
    for r, start, end in result.send_holds:
        per_rank[r].append((start, end, f"send hold [{start:.6g},{end:.6g}]"))
    for r, spans in per_rank.items():
        spans.sort(key=lambda span: (span[0], span[1]))
        for a, b in pairwise(spans):
            assert b[0] >= a[1] - _EPS, f"rule 2: {a[2]} and {b[2]} overlap on rank {r}"

    # Rules 3-5: data dependencies.
    last = len(stages) - 1
    for e in result.events:
        s, i = e.stage, e.microbatch
        if e.kind == "F" and s > 0:
            prev = one(s - 1, "F", i)
            assert prev is not None and e.start >= prev.end + cross(s - 1, s, s - 1) - _EPS, (
                f"rule 3: {e} before {prev}"
            )
        elif e.kind in ("B", "I"):
            fwd = one(s, "F", i)
            assert fwd is not None and e.start >= fwd.end - _EPS, f"rule 4: {e} before its forward {fwd}"
            if s < last:
                grad = one(s + 1, "B", i) or one(s + 1, "I", i)
                assert grad is not None and e.start >= grad.end + cross(s + 1, s, s) - _EPS, (
                    f"rule 4: {e} before the gradient from {grad}"
                )
        elif e.kind == "W":
            inp = one(s, "I", i)
            assert inp is not None and e.start >= inp.end - _EPS, f"rule 5: {e} before {inp}"
