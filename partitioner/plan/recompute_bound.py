"""plan.recompute_bound: the least recomputation memory forces on a pipeline, before any split is planned.

The search ranks candidates by a lower bound on their step and prices (plans, replays) only those whose bound can
beat the best so far. The compute a candidate's stages run is bounded from below by the graph's work; what that
misses at scale is the forward a stage must run again because its activations do not fit (gpt3-175b at 64 H100s:
bounds of 12.2-13.7 s against a best step of 15.26 s, every candidate priced). This module bounds that recompute
whatever the split, for the schedules with one stage per rank whose in-flight counts are exact (gpipe, 1f1b).

Relaxation (each step gives up only tightness):
- Memory: stage s holds its static bytes p_s (training state; sum P over the stages) and f_s microbatches' kept
  activations (f_s the schedule's in-flight count), within the limit L: p_s + f_s (a_s - d_s) <= L, where a_s is
  what the stage would keep per microbatch recomputing nothing and d_s what recomputation drops. Summed over the
  stages, sum d_s >= A - sum_s (L - p_s) / f_s (A: the graph's activations per microbatch). The split is relaxed
  away by taking the largest sum_s (L - p_s) / f_s over any placement of P with 0 <= p_s <= L: static bytes go to
  the stages holding the most microbatches first (they lose the least room per byte). Transient bytes (a region's
  regenerated activations, gathered FSDP layers) and kept region inputs only add memory and are left out.
- Time: recomputing region r (plan.recompute: a layer under "full", an attention core under "selective") drops at
  most its `dropped` bytes per batch for its forward seconds again. The cheapest way to drop the bytes needed is a
  fractional knapsack over every region of every mode allowed, highest bytes per second first (regions of two modes
  overlapping only make that cheaper). A stage boundary cutting a region recomputes part of it, whose rate the
  region's does not bound; a part's rate is at most its best node's (bytes it drops over seconds it reruns; the
  ratio of sums never exceeds the largest ratio), and each of the stages - 1 boundaries makes at most two parts:
  2 x (stages - 1) more items of the largest region's bytes at the best node rate, their zero-time nodes' bytes free
  (one stage recomputes whole regions only).
- Microbatches: the search may double a candidate's count on memory; the bound is the least over those counts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from partitioner.plan.graph import PlanningGraph
from partitioner.schedules import get_schedule

__all__ = ["forced_recompute_floor"]


def forced_recompute_floor(
    g: PlanningGraph,
    *,
    stages: int,
    schedule: str,
    microbatch_counts: Sequence[int],
    memory_limit: float,
    modes: Sequence[str],
) -> float:
    """Seconds of forward every split of `g` into `stages` stages (one per rank) must run again per step to fit
    `memory_limit` bytes per rank under `schedule`, at the least over `microbatch_counts` (module docstring); 0 where
    the bound does not apply (several stages per rank, a split backward, an unbounded limit, nothing to recompute)."""
    entry = get_schedule(schedule)
    if not entry.single_stage or entry.split_backward or not np.isfinite(memory_limit) or not g.training:
        return 0.0
    key = ("recompute items", tuple(m for m in modes if m != "none"), 2 * (stages - 1))
    if key not in g._activation_cache:  # what reads activations only: shared by the copies of one dp (plan.graph)
        g._activation_cache[key] = _items(g, list(key[1]), cuts=key[2])
    items = g._activation_cache[key]
    if items is None:
        return 0.0
    rates, dropped = items
    static = float(sum(g.param_static.values()))
    activations = float(g.saved_bytes.sum())  # the whole batch, recomputing nothing
    return min(
        _least_time(activations - m * _room(static, entry.in_flight(stages, m), memory_limit), rates, dropped)
        for m in microbatch_counts
    )


def _room(static: float, in_flight: Sequence[int], limit: float) -> float:
    """The most activation bytes per microbatch the stages can keep, over every placement of `static` bytes (each
    stage at most `limit`): sum_s (limit - p_s) / f_s, the static bytes placed on the stages with the largest f_s."""
    room = 0.0
    for f in sorted(in_flight, reverse=True):
        p = min(static, limit)
        static -= p
        room += (limit - p) / f
    return room if static <= 0 else -np.inf  # the training state alone does not fit: nothing does


def _items(g: PlanningGraph, modes: Sequence[str], cuts: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(bytes dropped per second recomputed, bytes) of every way to drop activations (module docstring): each region
    of `modes` whole, and `cuts` parts of regions cut by stage boundaries; sorted by rate, highest first. None without
    regions. Vectorized over the regions (the search asks this of every candidate's graph)."""
    none = g.activations("none").kept
    rates, dropped = [], []
    largest = best = free = 0.0
    for mode in modes:
        model = g.activations(mode)
        if not model.regions:
            continue
        starts, ends = (np.array(v, dtype=np.int64) for v in zip(*model.regions))
        seconds = _sums(model.recompute, starts, ends)
        size = model.transient[starts]
        kept = size > 0
        if not kept.any():
            continue
        with np.errstate(divide="ignore"):
            rates.append(np.where(seconds > 0, size, 0.0)[kept] / np.where(seconds > 0, seconds, 1.0)[kept])
        rates[-1][seconds[kept] <= 0] = np.inf
        dropped.append(size[kept])
        largest = max(largest, float(size.max()))
        inside = np.zeros(g.n + 1)
        np.add.at(inside, starts, 1.0)
        np.add.at(inside, ends, -1.0)
        inside = np.cumsum(inside[:-1]) > 0
        shed = np.maximum(none - model.kept, 0.0)  # what a node's stage keeps less under this mode
        timed = inside & (model.recompute > 0)
        free = max(free, float(_sums(np.where(inside & ~timed, shed, 0.0), starts, ends).max()))
        if timed.any():
            best = max(best, float((shed[timed] / model.recompute[timed]).max()))
    if not rates:
        return None
    all_rates = np.concatenate(rates + [np.full(cuts, np.inf), np.full(cuts, best)])
    all_dropped = np.concatenate(dropped + [np.full(cuts, free), np.full(cuts, largest)])
    order = np.argsort(all_rates, kind="stable")[::-1]
    return all_rates[order], all_dropped[order]


def _sums(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The sum of values[a:b] for every [a, b) of (starts, ends)."""
    total = np.concatenate(([0.0], np.cumsum(values)))
    return total[ends] - total[starts]


def _least_time(need: float, rates: np.ndarray, dropped: np.ndarray) -> float:
    """The least seconds dropping `need` bytes takes, regions taken highest rate first (fractional knapsack); what
    every region drops together, when that is not enough (no split fits at this count)."""
    if need <= 0:
        return 0.0
    if not np.isfinite(need):
        return np.inf
    before = np.concatenate(([0.0], np.cumsum(dropped)[:-1]))  # bytes dropped by the faster items
    take = np.clip(need - before, 0.0, dropped)
    timed = np.isfinite(rates) & (take > 0)
    return float((take[timed] / rates[timed]).sum())
