"""torch's multi-stage pipeline schedules from the rules their orders follow, without building the schedule: each
rank's compute order as arrays (what the simulator replays) and each stage's peak microbatches in flight.

torch's ``ScheduleInterleaved1F1B`` and ``ScheduleInterleavedZeroBubble`` (torch 2.13, ``_get_1f1b_rank_ops``) give
rank r of p, with v local stages and m microbatches, this order: R = m // max(1, m // p) microbatches per round
(torch refuses an m that the rounds do not divide); forward k (k = 0 .. m v - 1) runs local stage (k // R) mod v,
the j-th backward local stage v - 1 - (j // R) mod v; rank r warms up with

    W = min((v - 1) R + f (p - 1 - r), m v)     (f = 2 interleaved, 1 zero-bubble)

forwards, then runs forward k then backward k - W for every k >= W, then the backwards left. A backward ends its
microbatch's hold on the stage's activations where it is whole (interleaved: B); where it is split (zero-bubble: I
then W), its weight-gradient action does, and rank r runs those r backwards behind (torch's
``num_1f1b_microbatches = rank``), in the backwards' order. The zero-bubble schedule then inserts idle slots
(``_add_bubbles_to_actions``), which never reorder a rank's actions.

The other multi-stage schedules need no counting: ``ScheduleLoopedBFS`` runs every forward of a rank before any
backward (m in flight on every stage), and ``ScheduleZBVZeroBubble`` (exactly two stages per rank, rank r holding
stages r and 2p - 1 - r) warms up 2p - r - 1 forwards of its first stage, then r pairs of forwards of both, then
p - r times a forward of its second stage followed by that stage's I and W, and in its steady phase runs each
stage's forward before its next I and W: its first stage peaks at 2p - r, its second at r + 1, both
min(2p - s, m) for stage s (below 2p - 1 microbatches torch's order holds only the m there are). For these
`Schedule.in_flight`'s form is exact (`FORM_EXACT`).

The orders: torch's rule emits, at its op o, forward o (o < m v), backward o - W (W <= o < m v + W) and, zero-bubble,
the weight gradient of backward o - W - r (while o < m v + W), then the weight gradients left; each action here is
keyed by its op and its place within the op, and sorted. A stage's count rises only at its forwards, so its peak
is the count right after one of them: forward k follows every forward before it and max(0, k - W - lag) of the
freeing actions (lag 0 interleaved, r zero-bubble). Both are array work, O(stages x microbatches), with no Python
per action, where torch's schedule constructor runs Python per action of every rank (the planner asks for
thousands of deep pipelines). tests/test_simulate.py checks both against torch's own built orders.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "COUNTED_SCHEDULES", "FORM_EXACT", "WRITTEN_OUT", "interleaved_in_flight", "interleaved_orders",
    "looped_bfs_orders", "rule_orders", "single_stage_orders", "zbv_orders",
]  # fmt: skip

# Schedules whose peaks `Schedule.in_flight`'s form gives exactly: the single-stage ones, and the multi-stage ones
# above. A schedule in neither set is counted over its built order (simulate.in_flight_peaks).
FORM_EXACT = frozenset({"gpipe", "1f1b", "looped-bfs", "zbv"})

# The registry's schedules (partitioner.schedules) whose order this module follows: name -> (warm-up factor f,
# whether the backward is split and its weight gradients lag by the rank's index).
COUNTED_SCHEDULES: dict[str, tuple[int, bool]] = {"interleaved": (2, False), "zero-bubble": (1, True)}

# The multi-stage schedules whose orders `rule_orders` writes out.
WRITTEN_OUT = frozenset({*COUNTED_SCHEDULES, "zbv", "looped-bfs"})


def interleaved_in_flight(schedule: str, num_stages: int, num_microbatches: int, num_ranks: int) -> tuple[int, ...]:
    """The most microbatches each stage holds at once (forwards run, their freeing action not yet) in torch's
    `schedule` ("interleaved" or "zero-bubble") at `num_stages` stages over `num_ranks` ranks (stage s on rank
    s % ranks) and `num_microbatches` microbatches. Raises ValueError where torch refuses the counts.

    >>> interleaved_in_flight("interleaved", 8, 8, 2)
    (4, 4, 4, 3, 2, 2, 2, 1)
    """
    rule = _Rule(schedule, num_stages, num_microbatches, num_ranks)
    k = np.arange(rule.ops)
    # freed[l, d]: how many of the first d freeing actions (in the backwards' order) free local stage l.
    freed = np.zeros((rule.v, rule.ops + 1), dtype=np.int64)
    freed[rule.local_backward, k + 1] = 1
    freed = np.cumsum(freed, axis=1)
    peaks = np.zeros(num_stages, dtype=np.int64)
    for rank in range(rule.p):
        lag = rank if rule.split else 0
        done = np.clip(k - rule.warm(rank) - lag, 0, None)  # freeing actions run before forward k
        held = rule.nth - freed[rule.local_forward, done]
        peak = np.zeros(rule.v, dtype=np.int64)
        np.maximum.at(peak, rule.local_forward, held)
        peaks[rank :: rule.p] = peak  # local stage l is stage l p + rank
    return tuple(int(x) for x in peaks)


def interleaved_orders(
    schedule: str, num_stages: int, num_microbatches: int, num_ranks: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each rank's compute actions in torch's `schedule` ("interleaved" or "zero-bubble"), in its execution order, as
    arrays (stage, kind, microbatch); kind indexes ("F", "B", "I", "W"). Raises ValueError where torch refuses the
    counts.

    >>> [(s.tolist(), k.tolist()) for s, k, _ in interleaved_orders("interleaved", 4, 2, 2)][1]
    ([1, 1, 3, 3, 3, 3, 1, 1], [0, 0, 0, 1, 0, 1, 1, 1])
    """
    rule = _Rule(schedule, num_stages, num_microbatches, num_ranks)
    n = rule.ops
    k = np.arange(n)
    backward_kind = 2 if rule.split else 1  # I where the backward is split, else B
    orders = []
    for rank in range(rule.p):
        warm = rule.warm(rank)
        local = [rule.local_forward, rule.local_backward]
        kinds = [np.zeros(n, dtype=np.int64), np.full(n, backward_kind, dtype=np.int64)]
        keys = [3 * k, 3 * (k + warm) + 1]  # forward k at op k; backward j at op j + W, after that op's forward
        if rule.split:  # weight gradient j at op j + W + r, after that op's I; past the last op, in order after all
            at = k + warm + rank
            local.append(rule.local_backward)
            kinds.append(np.full(n, 3, dtype=np.int64))
            keys.append(np.where(at < n + warm, 3 * at + 2, 3 * (n + warm) + k))
        order = np.argsort(np.concatenate(keys), kind="stable")
        nth = np.concatenate([rule.nth, rule.nth_backward] + ([rule.nth_backward] if rule.split else []))
        stage = np.concatenate(local)[order] * rule.p + rank
        orders.append((stage, np.concatenate(kinds)[order], nth[order] - 1))
    return orders


def zbv_orders(num_stages: int, num_microbatches: int, num_ranks: int) -> list[tuple[np.ndarray, ...]]:
    """Each rank's compute actions in torch's ScheduleZBVZeroBubble (two stages per rank: r and 2p - 1 - r), as
    `interleaved_orders` gives them. Rank r, with n = max(2p - 1, m): 2p - 2r - 1 forwards of its first stage (chunk
    0); r times F1, F0; p - r times F1, I1, W1; then n - p steady steps F0 (while fewer than n have run), I0, W0, F1,
    I1, W1; then r times I0, I1; p - r times I0, W0; the W1 left, the W0 left. Each (chunk, kind) runs its
    microbatches in order; those numbered m or more are dropped (torch's n pads the steady phase).

    >>> stage, kind, mb = zbv_orders(4, 2, 2)[1]  # rank 1 of 2: stages 1 and 2
    >>> " ".join(f"{s}{'FBIW'[k]}{i}" for s, k, i in zip(stage, kind, mb))
    '1F0 2F0 1F1 2F1 2I0 2W0 1I0 1W0 2I1 2W1 1I1 1W1'
    """
    p, m = num_ranks, num_microbatches
    if p < 1 or m < 1 or num_stages != 2 * p:
        raise ValueError(f"zbv runs two stages on each of its ranks: {num_stages} stages, {p} ranks, {m} microbatches")
    n = max(2 * p - 1, m)
    f0, i0, w0, f1, i1, w1 = range(6)  # stream = 3 chunk + (F, I, W)
    orders = []
    for r in range(p):
        steady = np.tile([f0, i0, w0, f1, i1, w1], n - 2 * p + r + 1)
        streams = np.concatenate([
            np.full(2 * p - 2 * r - 1, f0), np.tile([f1, f0], r), np.tile([f1, i1, w1], p - r),
            steady, np.tile([i0, w0, f1, i1, w1], p - r - 1),
            np.tile([i0, i1], r), np.tile([i0, w0], p - r), np.full(r, w1), np.full(r, w0),
        ]).astype(np.int64)  # fmt: skip
        mb = np.zeros(streams.size, dtype=np.int64)
        for stream in range(6):
            at = streams == stream
            mb[at] = np.arange(int(at.sum()))
        keep = mb < m
        streams, mb = streams[keep], mb[keep]
        stage = np.where(streams < 3, r, 2 * p - 1 - r)
        kind = np.array([0, 2, 3])[streams % 3]  # F, I, W in ("F", "B", "I", "W")
        orders.append((stage, kind, mb))
    return orders


def looped_bfs_orders(num_stages: int, num_microbatches: int, num_ranks: int) -> list[tuple[np.ndarray, ...]]:
    """Each rank's compute actions in torch's ScheduleLoopedBFS, as `interleaved_orders` gives them: every forward
    of its stages r, r + p, ... (stage by stage, microbatches in order), then every backward, the stages and the
    microbatches reversed.

    >>> [(s.tolist(), k.tolist(), i.tolist()) for s, k, i in looped_bfs_orders(4, 2, 2)][0]
    ([0, 0, 2, 2, 2, 2, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1], [0, 1, 0, 1, 1, 0, 1, 0])
    """
    p, m = num_ranks, num_microbatches
    if p < 1 or m < 1 or num_stages % p:
        raise ValueError(f"need stages divisible by ranks >= 1 and microbatches >= 1: {num_stages}, {p}, {m}")
    v = num_stages // p
    local = np.repeat(np.arange(v), m)
    forward_mb = np.tile(np.arange(m), v)
    orders = []
    for r in range(p):
        stage = local * p + r
        orders.append((
            np.concatenate([stage, stage[::-1]]),
            np.repeat(np.array([0, 1], dtype=np.int64), v * m),
            np.concatenate([forward_mb, forward_mb[::-1]]),
        ))  # fmt: skip
    return orders


def single_stage_orders(schedule: str, num_stages: int, num_microbatches: int) -> list[tuple[np.ndarray, ...]]:
    """Each rank's compute actions in torch's single-stage `schedule` ("gpipe" or "1f1b"), as `interleaved_orders`
    gives them, as their loops run it (``ScheduleGPipe`` / ``Schedule1F1B._step_microbatches``): gpipe, every forward,
    then every backward, in microbatch order; 1f1b, rank r runs min(m, p - r) forwards, then one backward and one
    forward in turn, then the backwards left. torch refuses 1F1B with fewer microbatches than stages.

    >>> stage, kind, mb = single_stage_orders("1f1b", 2, 3)[0]
    >>> " ".join(f"{s}{'FBIW'[k]}{i}" for s, k, i in zip(stage, kind, mb))
    '0F0 0F1 0B0 0F2 0B1 0B2'
    """
    p, m = num_stages, num_microbatches
    if p < 1 or m < 1:
        raise ValueError(f"need stages >= 1 and microbatches >= 1: {p}, {m}")
    if schedule == "1f1b" and m < p:
        raise ValueError(f"Number of microbatches ({m}) must be greater than or equal to the number of stages ({p}).")
    orders = []
    for r in range(p):
        warm = m if schedule == "gpipe" else min(m, p - r)
        steady = m - warm  # backward i, then forward warm + i
        kind = np.concatenate([np.zeros(warm), np.tile([1, 0], steady), np.ones(warm)]).astype(np.int64)
        mb = np.concatenate([
            np.arange(warm), np.stack([np.arange(steady), warm + np.arange(steady)], axis=1).ravel(),
            np.arange(steady, m),
        ]).astype(np.int64)  # fmt: skip
        orders.append((np.full(kind.size, r, dtype=np.int64), kind, mb))
    return orders


def rule_orders(
    schedule: str, num_stages: int, num_microbatches: int, num_ranks: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Each rank's compute actions in torch's `schedule` (gpipe, 1f1b and WRITTEN_OUT), in its execution order, as
    arrays (stage, kind, microbatch); kind indexes ("F", "B", "I", "W"). ValueError where torch refuses the counts,
    or for a schedule not written out here."""
    if schedule in ("gpipe", "1f1b"):
        if num_ranks != num_stages:
            raise ValueError(f"{schedule} runs one stage per rank: {num_stages} stages, {num_ranks} ranks")
        return single_stage_orders(schedule, num_stages, num_microbatches)
    if schedule in COUNTED_SCHEDULES:
        return interleaved_orders(schedule, num_stages, num_microbatches, num_ranks)
    if schedule == "zbv":
        return zbv_orders(num_stages, num_microbatches, num_ranks)
    if schedule == "looped-bfs":
        return looped_bfs_orders(num_stages, num_microbatches, num_ranks)
    raise ValueError(
        f"schedule {schedule!r} has no order written out in partitioner.schedule_rules: write its rule there, "
        "checked against torch's class in tests/test_simulate.py"
    )


class _Rule:
    """The numbers torch's interleaved rule is written in (module docstring), checked as torch checks them."""

    def __init__(self, schedule: str, num_stages: int, num_microbatches: int, num_ranks: int) -> None:
        if schedule not in COUNTED_SCHEDULES:
            raise ValueError(
                f"{schedule!r} does not follow the interleaved rule; choose one of {sorted(COUNTED_SCHEDULES)}"
            )
        p, m = num_ranks, num_microbatches
        if p < 1 or m < 1 or num_stages % p:
            raise ValueError(f"need stages divisible by ranks >= 1 and microbatches >= 1: {num_stages}, {p}, {m}")
        rounds = max(1, m // p)
        if m % rounds:
            raise ValueError(
                f"torch's {schedule} schedule needs the microbatches ({m}) to be a multiple of the number of rounds "
                f"({rounds}), max(1, microbatches // ranks)"
            )
        self.p, self.m, self.v = p, m, num_stages // p
        self.factor, self.split = COUNTED_SCHEDULES[schedule]
        self.per_round = m // rounds
        self.ops = m * self.v  # forwards per rank, and backwards
        k = np.arange(self.ops)
        self.local_forward = (k // self.per_round) % self.v
        self.local_backward = self.v - 1 - self.local_forward
        # The k-th forward (or backward) is the how-many-th into its local stage (1-based): whole rounds of v blocks,
        # then its offset in its block; the backwards visit the blocks in the same rhythm, the stages reversed.
        self.nth = (k // (self.per_round * self.v)) * self.per_round + k % self.per_round + 1
        self.nth_backward = self.nth

    def warm(self, rank: int) -> int:
        """Rank `rank`'s warm-up forwards (torch's _get_warmup_ops)."""
        return min((self.v - 1) * self.per_round + self.factor * (self.p - 1 - rank), self.ops)
