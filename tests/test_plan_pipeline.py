"""The pipeline planner against brute force, the chain optimum, and its own invariants."""

from __future__ import annotations

import itertools
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import partitioner
import zoo
from partitioner.plan.graph import evaluate
from partitioner.plan.mincut import refine_with_mincut
from partitioner.plan.pipeline import (
    TIE_TOLERANCE,
    InfeasibleMemoryError,
    _in_flight_array,
    _least_bottleneck,
    _prefix,
    contiguous_partition,
    cuts_to_stages,
    devices_needed,
    plan_pipeline,
    refine_plan,
)
from tests.planning_graphs import brute_force, random_dags, synthetic_graph


def bottleneck(pg, stage_of, s):
    return max(m.time for m in evaluate(pg, stage_of, s))


def test_worked_example_from_docstring():
    pg = synthetic_graph([0, 1, 1, 1, 1], [(0, 1), (1, 2), (2, 3), (3, 4)], [0] * 5)
    plan = plan_pipeline(pg, 2)
    assert plan.stage_of == [0, 0, 0, 1, 1]
    assert plan.bottleneck == pytest.approx(2.0)


@settings(max_examples=60)
@given(random_dags(chain=True), st.integers(1, 3))
def test_chain_equals_exact_optimum(pg, num_stages):
    """On a path graph every valid assignment is contiguous: the DP must find the optimum, or where the optimum
    leaves a stage without compute, may trade it for the best split whose stages all hold some (the planner adds
    stages where the fewest are left idle: plan.pipeline._split_to)."""
    if pg.n - 1 < num_stages:
        return
    ours = plan_pipeline(pg, num_stages, mincut=False)
    best, _ = brute_force(pg, num_stages)
    if ours.bottleneck == pytest.approx(best, rel=1e-6, abs=1e-12):
        return
    busy = brute_force(pg, num_stages, busy=True)
    assert busy is not None and min(m.compute for m in ours.metrics) > 0
    assert best <= ours.bottleneck <= busy[0] * (1 + 1e-6) + 1e-12


@settings(max_examples=60)
@given(random_dags(comm=True), st.integers(1, 3))
def test_random_dag_valid_and_never_below_brute_force(pg, num_stages):
    if pg.n - 1 < num_stages:
        return
    plan = plan_pipeline(pg, num_stages)
    metrics = evaluate(pg, plan.stage_of, num_stages)  # raises on an invalid plan
    assert plan.bottleneck == pytest.approx(max(m.time for m in metrics))
    best, _ = brute_force(pg, num_stages)
    assert plan.bottleneck >= best * (1 - 1e-9)
    # Min-cut never worsens the bottleneck, except within the tie tolerance for less time on transfers.
    if plan.bottleneck > plan.contiguous_bottleneck * (1 + 1e-9):
        assert plan.bottleneck <= plan.contiguous_bottleneck * (1 + TIE_TOLERANCE)
        contiguous = plan_pipeline(pg, num_stages, mincut=False)
        assert sum(m.comm for m in plan.metrics) < sum(m.comm for m in contiguous.metrics)


@settings(max_examples=60)
@given(random_dags(comm=False), st.integers(1, 3))
def test_random_dag_without_comm_within_one_node_of_optimum(pg, num_stages):
    """Without communication a contiguous split is within the largest node of the optimum."""
    if pg.n - 1 < num_stages:
        return
    plan = plan_pipeline(pg, num_stages)
    best, _ = brute_force(pg, num_stages)
    assert plan.bottleneck <= best + pg.compute.max() + 1e-9


@settings(max_examples=40)
@given(random_dags(comm=True, max_nodes=9), st.integers(2, 3))
def test_mincut_never_increases_crossing_bytes(pg, num_stages):
    if pg.n - 1 < num_stages:
        return
    cuts = contiguous_partition(pg, num_stages)
    before = cuts_to_stages(cuts)
    after = refine_with_mincut(pg, before, num_stages)
    m0, m1 = evaluate(pg, before, num_stages), evaluate(pg, after, num_stages)
    assert max(m.time for m in m1) <= max(m.time for m in m0) * (1 + 1e-9)
    assert sum(m.send_bytes for m in m1) <= sum(m.send_bytes for m in m0) + 1e-6


def test_mincut_finds_a_non_contiguous_cut():
    # Order: in, A, C, B, D. A makes a big tensor read only by B; C makes a medium one read by D;
    # a heavy D ends the graph, so stage 0 has slack. The contiguous split [in, A | C, B, D] sends
    # A and the input (1001 bytes); the best cut moves B next to A and leaves C on stage 1 (not
    # contiguous in this order), sending only B and the input.
    compute = [0.0, 0.1, 0.1, 0.1, 6.0]
    edges = [(0, 1), (0, 2), (1, 3), (2, 4), (3, 4)]
    out_bytes = [1.0, 1000.0, 50.0, 1.0, 1.0]
    pg = synthetic_graph(compute, edges, out_bytes, link_bandwidth=1e9)
    before = [0, 0, 1, 1, 1]
    after = refine_with_mincut(pg, before, 2)
    assert after == [0, 0, 1, 0, 1]
    assert evaluate(pg, after, 2)[0].send_bytes == 2.0  # B and the input
    assert evaluate(pg, before, 2)[0].send_bytes == 1001.0


def test_sends_add_to_stage_time_where_they_do_not_overlap_compute():
    # A chain n0 (input) -> n1 -> n2 -> n3 with compute 2, 1, 3 and 1e3 bytes/s. Cutting after n1 (2 | 4)
    # sends 10 bytes (0.01 s each way); cutting after n2 (3 | 3) sends 2000 (2 s each way). Overlapped (NCCL):
    # max(3, 2) = 3 beats max(4, 0.01) = 4. Blocking (gloo on a CPU) each stage pays its own sends, forward
    # activations or returned gradients: 3 + 2 = 5 loses to 4 + 0.01.
    compute, edges = [0.0, 2.0, 1.0, 3.0], [(0, 1), (1, 2), (2, 3)]
    for overlaps, stage_of, want in ((True, [0, 0, 0, 1], 3.0), (False, [0, 0, 1, 1], 4.01)):
        pg = synthetic_graph(compute, edges, [0.0, 10.0, 2000.0, 0.0], overlaps_comm=overlaps)
        plan = plan_pipeline(pg, 2)
        assert plan.stage_of == stage_of
        assert plan.bottleneck == pytest.approx(want)
    # With cheap bytes (20 at the balanced cut) both pick the balanced cut; blocking, its sends still add.
    for overlaps, want in ((True, 3.0), (False, 3.02)):
        pg = synthetic_graph(compute, edges, [0.0, 0.1, 20.0, 0.0], overlaps_comm=overlaps)
        plan = plan_pipeline(pg, 2)
        assert plan.stage_of == [0, 0, 0, 1]
        assert [m.time for m in evaluate(pg, plan.stage_of, 2)] == pytest.approx([want, want])


def test_every_crossing_value_is_a_message():
    # Two values cross after n1 (n0 and n1 both feed n2), one after n2. At 0.1 s per message and free bytes,
    # a cut after n1 costs 2 messages each way and one after n2 costs 1.
    pg = synthetic_graph([0, 1, 1, 1], [(0, 1), (0, 2), (1, 2), (2, 3)], [0, 0, 0, 0], link_latency=0.1)
    two, one = evaluate(pg, [0, 0, 1, 1], 2, microbatches=3), evaluate(pg, [0, 0, 0, 1], 2, microbatches=3)
    assert (two[0].send_messages, two[1].recv_messages, one[0].send_messages) == (2, 2, 1)
    assert two[0].comm == pytest.approx(3 * 2 * 0.1) and one[0].comm == pytest.approx(3 * 1 * 0.1)


def test_ties_within_tolerance_go_to_the_plan_that_sends_less():
    # Chain n0 -> n1 -> n2 -> n3, compute 2.995, 0.02, 3.0. Cutting after n2 gives 3.015 | 3.0 and sends 2000
    # bytes; after n1, 2.995 | 3.02 and 10 bytes. The first is 0.17% faster (transfers hide under compute):
    # a tie within 1%, so the plan that sends less wins.
    edges = [(0, 1), (1, 2), (2, 3)]
    pg = synthetic_graph([0.0, 2.995, 0.02, 3.0], edges, [0.0, 10.0, 2000.0, 0.0], link_bandwidth=1e6)
    strict = plan_pipeline(pg, 2, mincut=False)
    tied = plan_pipeline(pg, 2)
    assert strict.stage_of == [0, 0, 0, 1] and strict.bottleneck == pytest.approx(3.015)
    assert tied.stage_of == [0, 0, 1, 1] and tied.bottleneck == pytest.approx(3.02)
    assert sum(m.comm for m in tied.metrics) < sum(m.comm for m in strict.metrics) / 100
    # n2 at 0.06: 3.055 | 3.0 against 2.995 | 3.06 is still within 1%, but n2 no longer fits the window's
    # slack, (1.01 x 3.055 - 3.0) / 2 = 0.043: the faster plan stays.
    pg = synthetic_graph([0.0, 2.995, 0.06, 3.0], edges, [0.0, 10.0, 2000.0, 0.0], link_bandwidth=1e6)
    assert plan_pipeline(pg, 2).stage_of == plan_pipeline(pg, 2, mincut=False).stage_of == [0, 0, 0, 1]


def test_value_read_by_several_later_nodes_crosses_once():
    # n1 is read by n2 and n3, both on stage 1: it must be counted once.
    pg = synthetic_graph([0, 1, 1, 1], [(0, 1), (1, 2), (1, 3), (2, 3)], [0, 100, 7, 0])
    m = evaluate(pg, [0, 0, 1, 1], 2)
    assert m[0].send_bytes == 100


def test_forwarded_value_crosses_every_boundary_it_passes():
    pg = synthetic_graph([0, 1, 1, 1], [(0, 1), (1, 2), (1, 3), (2, 3)], [0, 100, 7, 0])
    m = evaluate(pg, [0, 0, 1, 2], 3)
    assert m[0].send_bytes == 100 and m[1].send_bytes == 107


def test_evaluate_rejects_invalid_assignments():
    pg = synthetic_graph([0, 1, 1], [(0, 1), (1, 2)], [0, 1, 1])
    with pytest.raises(ValueError, match="back"):
        evaluate(pg, [0, 1, 0], 2)
    with pytest.raises(ValueError, match="empty"):
        evaluate(pg, [0, 0, 0], 2)
    with pytest.raises(ValueError, match="stage 0"):
        evaluate(pg, [1, 1, 1], 2)


def test_too_many_stages_is_a_clear_error():
    pg = synthetic_graph([0, 1, 1], [(0, 1), (1, 2)], [0, 1, 1])
    assert plan_pipeline(pg, 3).stage_of == [0, 1, 2]  # stage 0 may hold only the input
    with pytest.raises(ValueError, match="at most 3 stages"):
        plan_pipeline(pg, 4)


def test_memory_limit_respected_and_infeasible_names_devices_needed():
    n = 9
    params = [[]] + [[f"p{i}"] for i in range(1, n)]
    static = {f"p{i}": 100 for i in range(1, n)}
    pg = synthetic_graph(
        [0] + [1.0] * (n - 1), [(i, i + 1) for i in range(n - 1)], [1.0] * n, params=params, param_static=static
    )
    plan = plan_pipeline(pg, 4, memory_limit=250)
    assert max(m.peak_memory for m in plan.metrics) <= 250
    assert devices_needed(pg, 250) == 4
    with pytest.raises(InfeasibleMemoryError, match="about 4 pipeline stages"):
        plan_pipeline(pg, 2, memory_limit=250)


def test_memory_counts_in_flight_activations():
    # Stage 0 of 1F1B with p = 2 holds 2 microbatches; the last stage 1.
    pg = synthetic_graph([0, 1, 1], [(0, 1), (1, 2)], [0, 1, 1], saved_bytes=[0, 40, 40])
    m = evaluate(pg, [0, 0, 1], 2, microbatches=4, in_flight=[2, 1])
    assert m[0].peak_memory == pytest.approx(40 / 4 * 2)
    assert m[1].peak_memory == pytest.approx(40 / 4 * 1)


def test_planner_is_deterministic():
    rng = np.random.default_rng(0)
    n = 40
    edges = [(i, i + 1) for i in range(n - 1)] + [(i, i + 3) for i in range(n - 3)]
    pg = synthetic_graph([0] + list(rng.uniform(0, 1, n - 1)), edges, list(rng.uniform(0, 100, n)))
    assert plan_pipeline(pg, 5).stage_of == plan_pipeline(pg, 5).stage_of


@settings(max_examples=60, deadline=None)
@given(random_dags(max_nodes=9), st.integers(2, 4), st.sampled_from([1, 4]))
def test_min_cut_refinement_never_empties_a_stage_of_its_compute(pg, stages, m) -> None:
    """refine_plan may move boundaries to cheaper cuts, but never leaves a stage that held compute without any (a stage
    of an input alone costs a hop and a device: the runtime then holds a stage without parameters)."""
    if stages > pg.n - pg.num_inputs:
        return
    try:
        plan = plan_pipeline(pg, stages, microbatches=m, mincut=False)
    except ValueError:
        return
    refined = refine_plan(pg, plan, microbatches=m)
    assert sum(x.compute > 0 for x in refined.metrics) >= sum(x.compute > 0 for x in plan.metrics)


def test_gpt3_tiny_looped_bfs_keeps_compute_on_every_stage() -> None:
    """The plan that found it: gpt3-tiny at pp2 x dp2, two stages per rank, on the cpu cost model, whose min-cut
    refinement had moved the first stage's embedding to the second (fewer bytes sent), leaving the input ids alone."""
    model = zoo.get("gpt3-tiny")
    cm = partitioner.compile(model, devices=4, example_inputs=zoo.example_inputs("gpt3-tiny", batch=16),
                             device_type="cpu", microbatches=4, schedule="looped-bfs", pipeline=2, tensor_parallel=1,
                             stages_per_device=2)  # fmt: skip
    assert all(st.compute_time > 0 for st in cm.plan.stages), [st.compute_time for st in cm.plan.stages]


def test_each_microbatch_pays_every_kernel_launch() -> None:
    """A kernel's launch does not shrink with its batch: the same split run as 4 microbatches pays every node's
    overhead 4 times per step, while the rest of its time is the same in all (plan.graph's fixed part)."""
    import dataclasses

    from partitioner.devices import PRESETS

    model = zoo.get("gpt3-tiny")
    spec = dataclasses.replace(PRESETS["h100"], kernel_overhead=1e-3)  # launches dominate: the test sees them
    cm = partitioner.compile(model, devices=2, example_inputs=zoo.example_inputs("gpt3-tiny", batch=8),
                             device_type=spec, microbatches=1, pipeline=2, tensor_parallel=1)  # fmt: skip
    pg = cm.planning_graph
    kernels_fwd, kernels_bwd = int((pg.forward > 0).sum()), int((pg.backward > 0).sum())
    assert kernels_fwd > 10 and kernels_bwd > 10
    assert pg.forward_fixed[pg.forward > 0] == pytest.approx(spec.kernel_overhead)
    stage_of = [0 if i < pg.n // 2 else 1 for i in range(pg.n)]  # contiguous in the graph order: valid
    one, four = evaluate(pg, stage_of, 2, microbatches=1), evaluate(pg, stage_of, 2, microbatches=4)
    assert sum(s.forward for s in four) - sum(s.forward for s in one) == pytest.approx(3 * kernels_fwd * 1e-3)
    assert sum(s.backward for s in four) - sum(s.backward for s in one) == pytest.approx(3 * kernels_bwd * 1e-3)


def _memory_chains(most: int):
    """Hypothesis arguments (compute, saved, stages, microbatches, tightness, overlaps) for _memory_chain: chains of
    up to `most` nodes after the input, memory limits from below to above the unlimited plan's peak."""
    return given(
        st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=3, max_size=most),
        st.lists(st.floats(0.0, 100.0, allow_nan=False), min_size=most + 1, max_size=most + 1),
        st.integers(2, 4),
        st.sampled_from([1, 4]),
        st.floats(0.2, 1.5),
        st.booleans(),
    )


def _memory_chain(compute, saved, stages, m, tightness, overlaps):
    """(graph, prefix sums, memory limit) of a drawn chain, or None where it has too few nodes for the stages."""
    n = len(compute) + 1
    pg = _chain_with_memory([0.0] + compute, saved[:n], overlaps)
    if stages > n - 1:
        return None
    pre = _prefix(pg, m, ("none",))
    return pg, pre, tightness * float(pre.A[0][-1]) * stages / 2 + 1.0


@settings(max_examples=60, deadline=None)
@_memory_chains(9)
def test_the_exact_min_max_dp_is_the_best_split_with_compute_on_every_stage(
    compute, saved, stages, m, tightness, overlaps
) -> None:
    """plan.pipeline._least_bottleneck (how contiguous_partition ends for coarse plans) against every
    contiguous split whose stages all hold compute: the least bottleneck, each stage at its fastest recompute mode
    that fits its 1F1B in-flight microbatches, at memory limits from below to above the unlimited plan's peak."""
    if (case := _memory_chain(compute, saved, stages, m, tightness, overlaps)) is None:
        return
    pg, pre, limit = case
    n = pg.n
    flight = _in_flight_array([min(stages - s, m) for s in range(stages)], stages, m)
    best = None
    for middle in itertools.combinations(range(1, n), stages - 1):
        cuts = [0, *middle, n]
        if any(pre.working[i] == pre.working[j] for j, i in zip(cuts, cuts[1:])):
            continue
        times = [float(pre.fitting_time(np.array([j]), i, float(flight[s]), limit)[0])
                 for s, (j, i) in enumerate(zip(cuts, cuts[1:]))]  # fmt: skip
        if best is None or max(times) < best:
            best = max(times)
    found = _least_bottleneck(pre, pg.num_inputs, flight, limit, stages, hi=float(pre.P[-1]) * 2 + 1.0)
    if best is None or not np.isfinite(best):
        assert found is None
        return
    assert found is not None and len(found) == stages + 1
    times = [float(pre.fitting_time(np.array([j]), i, float(flight[s]), limit)[0])
             for s, (j, i) in enumerate(zip(found, found[1:]))]  # fmt: skip
    assert max(times) == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert all(pre.working[i] > pre.working[j] for j, i in zip(found, found[1:]))


@settings(max_examples=80, deadline=None)
@_memory_chains(30)
def test_the_full_dp_s_exact_pass_and_its_bisection_find_the_same_bottleneck(
    compute, saved, stages, m, tightness, overlaps
) -> None:
    """contiguous_partition (every cut position) bisects until its bracket is EXACT_BRACKET wide, then runs the exact
    min-max DP once: with that pass refused (no pairs allowed), it bisects to rel_tol as before. Both bottlenecks
    agree to rel_tol, under memory limits from below to above the unlimited plan's peak, where the bisection's stages
    all hold compute (the exact pass gives the best split that does, as the coarse plans' does, and a stage without
    compute may be faster); neither split overflows the limit."""
    if (case := _memory_chain(compute, saved, stages, m, tightness, overlaps)) is None:
        return
    pg, _, limit = case
    flight = [min(stages - s, m) for s in range(stages)]
    kw = dict(microbatches=m, in_flight=flight, memory_limit=limit)

    def metrics(cuts: list[int]) -> list:
        return evaluate(pg, cuts_to_stages(cuts), stages, microbatches=m, in_flight=flight)

    try:
        exact = contiguous_partition(pg, stages, **kw)
    except InfeasibleMemoryError:
        with mock.patch("partitioner.plan.pipeline._PAIRS", 0), pytest.raises(InfeasibleMemoryError):
            contiguous_partition(pg, stages, **kw)
        return
    with mock.patch("partitioner.plan.pipeline._PAIRS", 0):
        bisected = contiguous_partition(pg, stages, **kw)
    ours, theirs = metrics(exact), metrics(bisected)
    assert max(x.peak_memory for x in ours) <= limit * (1 + 1e-9)
    assert max(x.time for x in theirs) <= max(x.time for x in ours) * (1 + 1e-5) + 1e-12
    if all(x.compute > 0 for x in theirs):
        assert max(x.time for x in ours) <= max(x.time for x in theirs) * (1 + 1e-5) + 1e-12


def _chain_with_memory(compute: list[float], saved: list[float], overlaps: bool):
    n = len(compute)
    return synthetic_graph(compute, [(i, i + 1) for i in range(n - 1)], [10.0] * n, saved_bytes=saved,
                           overlaps_comm=overlaps, link_latency=0.01)  # fmt: skip
