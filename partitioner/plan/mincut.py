"""Min-cut boundary refinement: move each pipeline boundary to where crossing costs least.

A crossing value costs its bytes plus one message latency per microbatch, counted in bytes at link
bandwidth (m x latency x bandwidth), so the cut minimizes transfer time, not bytes alone.

Given a balanced contiguous assignment (plan.pipeline phase 1) with bottleneck T, each boundary k
(between stages k-1 and k) gets a window of nodes that may change sides: at most half of stage k's
slack (T - time of stage k) may move right into it, at most half of stage k-1's slack left, so no
stage can exceed T whatever the cut does. Inside the window a networkx max-flow/min-cut chooses the
sides:

    u --bytes(u)--> u_out --inf--> v        for every value u and each consumer v
    v --inf--> u                            reverse of every edge: v on the earlier side forces u too
    then --inf--> first                     every order edge of an in-place write (plan.ordering)

Splitting u into u -> u_out makes a value consumed by several later nodes cost its bytes once; the
infinite reverse edges make every finite cut a valid pipeline cut (no edge goes backwards). Nodes
before the window are tied to the source, nodes after it to the sink. The contiguous boundary is
itself a cut of this network, so the crossing bytes never grow.
"""

from __future__ import annotations

from collections.abc import Sequence

import networkx as nx
import numpy as np

from partitioner.comm import latency_bytes
from partitioner.plan.graph import PlanningGraph, evaluate

__all__ = ["refine_with_mincut", "boundary_network"]

_SOURCE, _SINK = "S", "T"
_NON_TENSOR_BYTES = 8.0  # Python values (sizes) are cheap to pass but still count as crossing


def _capacity(pg: PlanningGraph, u: int, microbatches: int) -> float:
    nbytes = float(pg.out_bytes[u]) if pg.is_tensor[u] else _NON_TENSOR_BYTES
    return nbytes + microbatches * latency_bytes(pg.spec)


def boundary_network(pg: PlanningGraph, lo: int, hi: int, microbatches: int = 1) -> nx.DiGraph:
    """The flow network for moving the boundary within window [lo, hi) of the topological order."""
    G = nx.DiGraph()
    G.add_node(_SOURCE)
    G.add_node(_SINK)
    window = range(lo, hi)
    for u in window:
        G.add_edge(u, ("out", u), capacity=_capacity(pg, u, microbatches))
        for v in pg.succs[u]:
            if v < hi:  # consumer inside the window (consumers always follow producers in the order)
                G.add_edge(("out", u), v)
                G.add_edge(v, u)
            else:
                G.add_edge(("out", u), _SINK)
        if not pg.succs[u]:
            G.add_edge(("out", u), _SINK, capacity=0.0)
    # Values made before the window: crossing depends on the window only if all their later
    # consumers are inside it (a consumer past the window makes them cross regardless).
    producers = {p for v in window for p in pg.preds[v] if p < lo}
    for u in producers:
        if max(pg.succs[u]) >= hi:
            continue
        G.add_edge(_SOURCE, ("in", u), capacity=_capacity(pg, u, microbatches))
        for v in pg.succs[u]:
            if lo <= v < hi:
                G.add_edge(("in", u), v)
    # In-place writes (plan.ordering): stage(first) <= stage(then), so `then` on the early side pulls `first`
    # there too; an endpoint outside the window is on the early (before lo) or late (from hi) side already.
    for e in pg.order.edges if pg.order is not None else ():
        u, v = e.first, e.then
        if lo <= u < hi and lo <= v < hi:
            G.add_edge(v, u)
        elif lo <= u < hi and v < lo:
            G.add_edge(_SOURCE, u)
        elif lo <= v < hi and u >= hi:
            G.add_edge(v, _SINK)
    return G


def _windows(
    pg: PlanningGraph, cuts: list[int], times: list[float], T: float, microbatches: int
) -> list[tuple[int, int]]:
    P = np.concatenate([[0.0], np.cumsum(pg.compute_at(microbatches))])
    S = len(cuts) - 1
    slack = [max(T - t, 0.0) / 2 for t in times]
    los, his = [], []
    for k in range(1, S):
        b, left_start = cuts[k], cuts[k - 1]
        lo = b
        # Nodes [lo, b) of stage k-1 may move into stage k: bounded by stage k's slack.
        while lo - 1 > max(left_start, pg.num_inputs - 1) and P[b] - P[lo - 1] <= slack[k]:
            lo -= 1
        los.append(lo)
    for k in range(1, S):
        b, right_end = cuts[k], cuts[k + 1]
        hi = b
        limit = min(right_end - 1, los[k] if k < S - 1 else right_end - 1)
        # Nodes [b, hi) of stage k may move into stage k-1: bounded by stage k-1's slack.
        while hi + 1 <= limit and P[hi + 1] - P[b] <= slack[k - 1]:
            hi += 1
        his.append(hi)
    return list(zip(los, his))


def refine_with_mincut(
    pg: PlanningGraph,
    stage_of: Sequence[int],
    num_stages: int,
    *,
    microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    memory_limit: float = np.inf,
    recompute: Sequence[str] | None = None,
    tolerance: float = 0.0,
) -> list[int]:
    """Contiguous assignment -> assignment with every boundary at a min-cost cut (see docstring).

    `tolerance` widens the windows to a bottleneck of T x (1 + tolerance): cuts that send less may then
    make a stage up to that much slower (the caller decides whether the trade is worth it).
    Returns the input unchanged when a refined plan would break memory or leave a stage empty.
    """
    stage_of = list(stage_of)
    cuts = [0] + [i for i in range(1, pg.n) if stage_of[i] != stage_of[i - 1]] + [pg.n]
    if len(cuts) - 1 != num_stages or any(stage_of[i] > stage_of[i + 1] for i in range(pg.n - 1)):
        raise ValueError("refine_with_mincut expects a contiguous assignment of the topological order")
    metrics = evaluate(pg, stage_of, num_stages, microbatches=microbatches, in_flight=in_flight, recompute=recompute)
    times = [m.time for m in metrics]
    T = max(times) * (1 + tolerance)
    new = list(stage_of)
    for k, (lo, hi) in enumerate(_windows(pg, cuts, times, T, microbatches), start=1):
        if hi - lo < 1:
            continue
        G = boundary_network(pg, lo, hi, microbatches)
        _, (source_side, _) = nx.minimum_cut(G, _SOURCE, _SINK)
        for u in range(lo, hi):
            new[u] = k - 1 if u in source_side else k
    try:
        refined = evaluate(pg, new, num_stages, microbatches=microbatches, in_flight=in_flight, recompute=recompute)
    except ValueError:
        return list(stage_of)
    if any(m.peak_memory > memory_limit for m in refined):
        return list(stage_of)
    return new
