"""Synthetic PlanningGraphs and a brute-force planner, shared by the planner tests."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st

from partitioner.devices import PRESETS
from partitioner.plan.graph import PlanningGraph, evaluate
from partitioner.plan.recompute import ActivationModel

# The H100 preset without its NCCL communicators' memory (0.38 GiB each, plan.communicators): for tests that plan tiny
# models under memory limits of a few MiB, which the communicators of any multi-device layout would exceed alone.
H100_TENSORS_ONLY = dataclasses.replace(PRESETS["h100"], communicator_memory=0.0)


def synthetic_graph(
    compute: list[float],
    edges: list[tuple[int, int]],
    out_bytes: list[float],
    *,
    num_inputs: int = 1,
    outputs: list[int] | None = None,
    link_bandwidth: float = 1e3,
    link_latency: float = 0.0,
    params: list[list[str]] | None = None,
    param_static: dict[str, int] | None = None,
    saved_bytes: list[float] | None = None,
    training: bool = True,
    overlaps_comm: bool = True,
    fixed: float = 0.0,
) -> PlanningGraph:
    """A PlanningGraph over nodes 0..n-1 (topological order; the first num_inputs are inputs).

    edges are (producer, consumer) with producer < consumer; `outputs` are the nodes the model returns
    (default: the last node). compute is split 1:2 into forward and backward; `fixed` seconds of each direction
    (at most all of it) are paid per call, once per microbatch (PlanningGraph.forward_fixed).
    """
    n = len(compute)
    succs: list[set[int]] = [set() for _ in range(n)]
    preds: list[set[int]] = [set() for _ in range(n)]
    for u, v in edges:
        assert u < v, (u, v)
        succs[u].add(v)
        preds[v].add(u)
    for u in outputs if outputs is not None else [n - 1]:
        succs[u].add(n)
    spec = dataclasses.replace(
        PRESETS["h100"],
        link_bandwidth=link_bandwidth,
        link_latency=link_latency,
        overlaps_comm=overlaps_comm,
        link_efficiency=1.0,
        communicator_memory=0.0,  # bytes here are abstract units: no NCCL communicator beside them
    )
    c = np.asarray(compute, dtype=np.float64)
    params = params or [[] for _ in range(n)]
    param_static = param_static or {}
    return PlanningGraph(
        names=[f"n{i}" for i in range(n)],
        forward=c / 3,
        backward=c * 2 / 3,
        forward_fixed=np.minimum(fixed, c / 3),
        backward_fixed=np.minimum(fixed, c * 2 / 3),
        out_bytes=np.asarray(out_bytes, dtype=np.float64),
        saved_bytes=np.asarray(saved_bytes if saved_bytes is not None else [0.0] * n, dtype=np.float64),
        is_tensor=np.ones(n, dtype=bool),
        succs=[sorted(s) for s in succs],
        preds=[sorted(p) for p in preds],
        params=params,
        param_static=param_static,
        param_bytes=dict(param_static),
        tied={},
        num_inputs=num_inputs,
        spec=spec,
        training=training,
    )


def brute_force(
    pg: PlanningGraph, num_stages: int, *, microbatches: int = 1, memory_limit: float = np.inf, busy: bool = False
):
    """Best bottleneck over every valid assignment (exponential: small graphs only), or None; `busy`: over those
    whose every stage holds compute."""
    best = None
    free = range(pg.num_inputs, pg.n)
    for rest in itertools.product(range(num_stages), repeat=len(free)):
        stage_of = [0] * pg.num_inputs + list(rest)
        try:
            metrics = evaluate(pg, stage_of, num_stages, microbatches=microbatches)
        except ValueError:
            continue
        if any(m.peak_memory > memory_limit for m in metrics) or (busy and min(m.compute for m in metrics) <= 0):
            continue
        t = max(m.time for m in metrics)
        if best is None or t < best[0]:
            best = (t, stage_of)
    return best


@st.composite
def random_dags(draw, max_nodes: int = 7, chain: bool = False, comm: bool = True):
    """A random DAG with one input, random compute and bytes; `chain` gives a path graph. Its device's
    transfers overlap compute or not, and pay a latency per message or not, at random."""
    n = draw(st.integers(3, max_nodes))
    compute = [0.0] + [draw(st.floats(0.0, 10.0, allow_nan=False)) for _ in range(n - 1)]
    out_bytes = [draw(st.floats(0.0, 5e3 if comm else 0.0, allow_nan=False)) for _ in range(n)]
    if chain:
        edges = [(i, i + 1) for i in range(n - 1)]
    else:
        edges = []
        for v in range(1, n):
            # every node has at least one producer, so nothing floats free of the input
            producers = draw(st.lists(st.integers(0, v - 1), min_size=1, max_size=3, unique=True))
            edges += [(u, v) for u in producers]
    latency = draw(st.sampled_from([0.0, 0.05])) if comm else 0.0
    fixed = draw(st.sampled_from([0.0, 0.3]))  # per-call (kernel launch) seconds, paid once per microbatch
    return synthetic_graph(
        compute, edges, out_bytes, overlaps_comm=draw(st.booleans()), link_latency=latency, fixed=fixed
    )


def reference_min_stage_dp(
    pre: Any, T: float, num_inputs: int, in_flight: np.ndarray, memory_limit: float, max_stages: int
) -> tuple[np.ndarray, np.ndarray]:
    """The end-by-end DP plan.pipeline._min_stage_dp replaced (one end at a time over its window of starts): g[i]
    (fewest stages for prefix i, inf if none) and parent[i] (the smallest start of the last stage among the fewest).
    Kept as the reference the breadth-first version is checked against."""
    n = pre.n
    g = np.full(n + 1, np.inf)
    parent = np.full(n + 1, -1, dtype=np.int64)
    g[0] = 0
    lo_valid = max(num_inputs, 1)  # a cut may not separate the model inputs from stage 0
    pos = pre.positions
    for i in pos[pos >= lo_valid]:
        i = int(i)
        j_lo = int(np.searchsorted(pre.P, pre.P[i] - T, side="left"))
        js = pos[np.searchsorted(pos, max(j_lo, lo_valid)) : np.searchsorted(pos, i)]
        if j_lo == 0 and pre.allowed[0]:
            js = np.concatenate([[0], js])
        js = js[pre.limit[js] >= i]
        if js.size == 0:
            continue
        gj = g[js]
        valid = np.isfinite(gj) & (gj < max_stages)
        stage_idx = np.minimum(np.where(valid, gj, 0), max_stages - 1).astype(np.int64)
        ok = np.zeros(js.size, dtype=bool)
        for k in range(len(pre.modes)):  # a segment is feasible if some recompute mode makes it so
            ok_k = valid & ~ok & (pre.cost(js, i, k) <= T)
            if memory_limit < np.inf and ok_k.any():
                ok_k &= pre.memory(js, i, k, in_flight[stage_idx]) <= memory_limit
            ok |= ok_k
        if pre.layers is not None and memory_limit < np.inf and (left := valid & ~ok).any():  # "full:k"
            layers, time = pre.partial(js[left], i, in_flight[stage_idx[left]], memory_limit)
            ok[np.flatnonzero(left)[(layers > 0) & (time <= T)]] = True
        if not ok.any():
            continue
        k = int(np.argmin(np.where(ok, gj, np.inf)))
        g[i] = gj[k] + 1
        parent[i] = js[k]
    return g, parent


def reference_activation_model(
    mode: str,
    regions: Sequence[tuple[int, int]],
    saves: Sequence[dict[str, float]],
    created_by: dict[str, int],
    preds: Sequence[Sequence[int]],
    storages: Sequence[Sequence[str]],
    out_bytes: np.ndarray,
    forward: np.ndarray,
) -> ActivationModel:
    """plan.recompute.activation_model as a walk over every saved storage (before RecomputeStructure): the
    reference the structure's figures must equal to the last bit.

    saves[i]: storage name -> bytes node i saves; created_by: storage name -> index of the node that created it
    (absent for parameters and for storages made outside the planned nodes); preds[i]: planned inputs of node i;
    storages[i]: the storages node i's output lives in; out_bytes[i]: its bytes (the size of a region input no
    node saves); forward[i]: node i's forward seconds.
    """
    n = len(saves)
    region_of = np.full(n, -1, dtype=np.int64)
    for r, (a, b) in enumerate(regions):
        region_of[a:b] = r
    size: dict[str, float] = {}
    for node_saves in saves:
        for name, nbytes in node_saves.items():
            size[name] = max(size.get(name, 0.0), nbytes)
    first_keeper: dict[str, int] = {}
    dropped = np.zeros(len(regions))

    def keep(name: str, i: int) -> None:
        if name not in first_keeper or i < first_keeper[name]:
            first_keeper[name] = i

    for i, node_saves in enumerate(saves):
        r = region_of[i]
        for name in node_saves:
            if r < 0:
                keep(name, i)
                continue
            a, b = regions[r]
            if a <= created_by.get(name, -1) < b:
                continue  # recomputed from the region's inputs
            keep(name, a)  # a region input: the checkpoint holds it
    seen_dropped: list[set[str]] = [set() for _ in regions]
    for i, node_saves in enumerate(saves):
        r = region_of[i]
        if r < 0:
            continue
        a, b = regions[r]
        for name, nbytes in node_saves.items():
            if a <= created_by.get(name, -1) < b and name not in seen_dropped[r]:
                seen_dropped[r].add(name)
                dropped[r] += nbytes
        for p in preds[i]:  # inputs the region reads but no node of it saves: held by the checkpoint too
            if not a <= p < b:
                for name in storages[p]:
                    if name in size or name in created_by:
                        size.setdefault(name, float(out_bytes[p]))
                        keep(name, a)
    kept = np.zeros(n)
    for name, i in first_keeper.items():
        kept[i] += size.get(name, 0.0)
    recompute = np.where(region_of >= 0, forward, 0.0)
    transient = np.where(region_of >= 0, dropped[region_of] if len(regions) else 0.0, 0.0)
    return ActivationModel(mode, kept, recompute, transient, tuple(regions))


def reference_split_to(pre: Any, cuts: list[int], num_stages: int, num_inputs: int) -> list[int]:
    """plan.pipeline._split_to one position at a time (before it was vectorized): add cuts until there are num_stages
    segments, splitting where the larger half is smallest among the splits
    that leave the fewest stages without compute (a stage of views alone costs a hop and a device for nothing)."""
    cuts = list(cuts)
    w = pre.working
    while len(cuts) - 1 < num_stages:
        best = None
        for s in range(len(cuts) - 1):
            j, i = cuts[s], cuts[s + 1]
            for b in range(max(j + 1, num_inputs), i):
                if not pre.allowed[b] or pre.limit[b] < i:
                    continue
                idle = int(w[b] == w[j]) + int(w[i] == w[b]) - int(w[i] == w[j])  # stages without compute it adds
                key = (idle, max(pre.cost(j, b), pre.cost(b, i)))
                if best is None or key < best[0]:
                    best = (key, b)
        if best is None:
            why = " and the order of in-place writes (plan.ordering)" if pre.limit.min() < pre.n else ""
            raise ValueError(
                f"cannot make {num_stages} non-empty stages from {pre.n} nodes under their data edges{why}"
            )
        cuts = sorted(cuts + [best[1]])
    return cuts
