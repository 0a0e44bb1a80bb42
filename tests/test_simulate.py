"""Tests for partitioner.simulate (replay of torch.distributed.pipelining schedules) and partitioner.gantt.

Closed forms used (p ranks, m microbatches, equal stages with forward f and backward b per rank, no comm):
GPipe and 1F1B take (m + p - 1)(f + b) with bubble (p - 1) / (m + p - 1); interleaved 1F1B with v stages per
rank (each 1/v of the work) takes (m + (p - 1) / v)(f + b), bubble (p - 1) / (v m + p - 1), once m >= p.
"""

import math
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.pipelining import schedules as torch_schedules

import partitioner.simulate as simulate_module
from partitioner.schedule_rules import COUNTED_SCHEDULES, FORM_EXACT, interleaved_in_flight
from partitioner.schedules import SCHEDULES, get_schedule
from partitioner.simulate import (
    Action,
    Event,
    SimResult,
    StageCost,
    check_events,
    fast_replay,
    in_flight_peaks,
    replay,
    replay_lower_bound,
    schedule_actions,
    simulate,
    step_lower_bound,
)

F, B = 1.0, 2.0


def equal_stages(num_stages: int, per_rank: int = 1, **kw: float) -> list[StageCost]:
    """`num_stages` equal stages; a rank's total work per microbatch is F + B whatever `per_rank` is."""
    return [StageCost(forward=F / per_rank, backward=B / per_rank, **kw) for _ in range(num_stages)]


def sim(
    schedule: str, stages: list[StageCost], m: int, ranks: int | None = None, *, blocking: bool = False
) -> SimResult:
    result = simulate(stages, num_microbatches=m, schedule=schedule, num_ranks=ranks, blocking_sends=blocking)
    check_events(result, stages)  # every simulation in this file obeys the written rules
    return result


# --- Action lists come from torch -----------------------------------------------------------------------------


class StandInStage:
    """Just enough of ``torch.distributed.pipelining.PipelineStage`` for a schedule to compute its order.

    Attributes read by the torch 2.13 constructors: ``num_stages`` (all), ``group_size`` / ``group_rank``
    (``PipelineScheduleMulti``: pipeline width and this rank), ``submod`` (the zero-bubble torch.compile check;
    ``None`` is skipped); the constructor writes ``stage_index_to_group_rank``. Read by the single-stage
    ``_step_microbatches`` loops, which the tests record to check ``schedule_rules.single_stage_orders``:
    ``stage_index``, ``is_first``, ``is_last`` and the methods below, where the
    p2p-op getters return no ops (so nothing is sent) and the compute methods only record the call; the
    schedule's ``_initialize_stage`` (shape inference and p2p warm-up) is replaced by a no-op on that instance.
    If torch starts reading anything else, construction fails with AttributeError here: the simulator never builds
    torch's classes (it writes their orders out: partitioner.schedule_rules), these
    tests do, to check what it writes.
    """

    submod = None

    def __init__(self, stage_index: int, num_stages: int, num_ranks: int, rank: int) -> None:
        self.stage_index = stage_index
        self.num_stages = num_stages
        self.group_size = num_ranks
        self.group_rank = rank
        self.is_first = stage_index == 0
        self.is_last = stage_index == num_stages - 1
        self.output_chunks: list[Any] = []
        self.calls: list[Action] = []

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> None:
        self.calls.append(Action(self.stage_index, "F", fwd_chunk_id))

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> None:
        self.calls.append(Action(self.stage_index, "B", bwd_chunk_id))

    def _no_ops(self, *args: Any, **kwargs: Any) -> list[Any]:
        return []

    get_fwd_recv_ops = get_fwd_send_ops = get_bwd_recv_ops = get_bwd_send_ops = _no_ops

    def clear_runtime_states(self) -> None:
        pass

    def perform_reduce_grad(self, *args: Any, **kwargs: Any) -> None:
        pass


def torch_ir(schedule: str, num_stages: int, m: int, ranks: int) -> dict[int, list[Action]]:
    """torch's compute-only `pipeline_order` IR (Nones and REDUCE_GRAD dropped), rank -> actions."""
    cls = torch_schedules.get_schedule_class(get_schedule(schedule).torch_class)
    if schedule in ("gpipe", "1f1b"):
        order = cls(StandInStage(0, num_stages, ranks, 0), m).pipeline_order
    else:
        order = cls([StandInStage(-1, num_stages, ranks, 0) for _ in range(num_stages // ranks)], m).pipeline_order
    return {
        r: [Action(a.stage_index, a.computation_type.value, a.microbatch_index) for a in acts if a and a.is_compute_op]
        for r, acts in order.items()
    }


def well_formed(actions: list[Action], stages: set[int], m: int) -> bool:
    """Each of the rank's stages runs F for microbatches 0..m-1 once, and B (or I and W) once."""
    for kinds in (("F",), ("B", "I")):
        for s in stages:
            if sorted(a.microbatch for a in actions if a.stage == s and a.kind in kinds) != list(range(m)):
                return False
    return True


def test_every_name_maps_to_a_torch_schedule_class() -> None:
    for name, entry in SCHEDULES.items():
        cls = torch_schedules.get_schedule_class(entry.torch_class)
        assert cls.__name__ in torch_schedules.__all__, name


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 7), (3, 9)])
def test_gpipe_recording_equals_torch_ir(p: int, m: int) -> None:
    assert schedule_actions("gpipe", p, m) == torch_ir("gpipe", p, m, p)


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 7), (3, 9)])
def test_1f1b_recording_matches_torch_ir_where_the_ir_is_well_formed(p: int, m: int) -> None:
    recorded, ir = schedule_actions("1f1b", p, m), torch_ir("1f1b", p, m, p)
    for r in range(p):
        assert well_formed(recorded[r], {r}, m)
        # torch 2.13's Schedule1F1B IR starts the last rank at F1 and lists F{m}; its executed loop does not.
        if well_formed(ir[r], {r}, m):
            assert recorded[r] == ir[r], r
    assert sum(well_formed(ir[r], {r}, m) for r in range(p)) >= p - 1


def test_1f1b_recording_is_the_textbook_order() -> None:
    # rank r: min(m, p - r) warmup forwards, then alternate B and F, then the remaining backwards
    p, m = 4, 6
    for r, actions in schedule_actions("1f1b", p, m).items():
        warm = min(m, p - r)
        expected = [Action(r, "F", i) for i in range(warm)]
        for i in range(m):
            expected.append(Action(r, "B", i))
            if warm + i < m:
                expected.append(Action(r, "F", warm + i))
        assert actions == expected


@pytest.mark.parametrize(
    "schedule,num_stages,ranks,m",
    [("interleaved", 8, 4, 8), ("interleaved", 6, 2, 3), ("looped-bfs", 8, 4, 5), ("zero-bubble", 8, 4, 8),
     ("zero-bubble", 6, 3, 2), ("zbv", 8, 4, 8), ("zbv", 4, 2, 2)],
)  # fmt: skip
def test_multi_stage_lists_are_torch_orders(schedule: str, num_stages: int, ranks: int, m: int) -> None:
    actions = schedule_actions(schedule, num_stages, m, ranks)
    assert actions == torch_ir(schedule, num_stages, m, ranks)  # the lowered list keeps torch's compute order
    result = sim(schedule, equal_stages(num_stages, num_stages // ranks), m, ranks)
    for r, acts in actions.items():
        assert well_formed(acts, {s for s, rr in enumerate(result.stage_to_rank) if rr == r}, m)


def unmodified_torch_orders(schedule: str, num_stages: int, m: int, ranks: int) -> dict[int, list[Action]]:
    """What the unmodified torch classes run: single-stage loops recorded rank by rank, multi-stage orders lowered
    with their communication (the compute actions of `pipeline_order_with_comms`)."""
    cls = torch_schedules.get_schedule_class(get_schedule(schedule).torch_class)
    if get_schedule(schedule).single_stage:
        out = {}
        for r in range(ranks):
            stage = StandInStage(r, num_stages, ranks, r)
            sched = cls(stage, m)
            sched._initialize_stage = lambda *a, **k: None
            sched._step_microbatches()
            out[r] = stage.calls
        return out
    lowered = cls([StandInStage(-1, num_stages, ranks, 0) for _ in range(num_stages // ranks)], m)
    return {
        r: [Action(a.stage_index, a.computation_type.value, a.microbatch_index) for a in acts if a and a.is_compute_op]
        for r, acts in lowered.pipeline_order_with_comms.items()
    }


@pytest.mark.parametrize(
    "schedule,num_stages,ranks,m",
    [("gpipe", 4, 4, 3), ("gpipe", 6, 6, 9), ("1f1b", 4, 4, 4), ("1f1b", 5, 5, 11), ("interleaved", 8, 4, 8),
     ("interleaved", 12, 4, 6), ("interleaved", 6, 2, 3), ("looped-bfs", 8, 4, 5), ("looped-bfs", 9, 3, 7),
     ("zero-bubble", 8, 4, 8), ("zero-bubble", 6, 3, 2), ("zero-bubble", 12, 4, 12), ("zbv", 8, 4, 8),
     ("zbv", 4, 2, 2), ("zbv", 10, 5, 7)],
)  # fmt: skip
def test_orders_equal_what_the_unmodified_torch_classes_run(schedule: str, num_stages: int, ranks: int, m: int) -> None:
    """The simulator builds its orders without the IR and lowering torch needs to run them (simulate._order_only):
    the compute actions must be exactly the ones the unmodified classes execute."""
    assert schedule_actions(schedule, num_stages, m, ranks) == unmodified_torch_orders(schedule, num_stages, m, ranks)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_single_stage_orders_are_what_torch_s_loops_run(schedule: str) -> None:
    """GPipe and 1F1B are written out (schedule_rules.single_stage_orders), not recorded: every rank's order over a grid
    of stage and microbatch counts equals what torch's unmodified loop runs, and where torch refuses the counts
    (1F1B with fewer microbatches than stages) so do we."""
    for p in (1, 2, 3, 5, 8):
        for m in (1, 2, 3, p, p + 1, 2 * p + 3):
            try:
                want = unmodified_torch_orders(schedule, p, m, p)
            except (ValueError, AssertionError) as e:
                with pytest.raises(ValueError, match="torch refuses"):
                    schedule_actions(schedule, p, m, p)
                assert "microbatches" in str(e)
                continue
            assert schedule_actions(schedule, p, m, p) == want, (p, m)


def test_zbv_places_stages_in_a_v() -> None:
    assert sim("zbv", equal_stages(8, 2), 8).stage_to_rank == (0, 1, 2, 3, 3, 2, 1, 0)
    assert sim("interleaved", equal_stages(8, 2), 8, 4).stage_to_rank == (0, 1, 2, 3, 0, 1, 2, 3)


def test_records_print_like_torch() -> None:
    a = Action(2, "F", 0)
    assert str(a) == repr(a) == "2F0" == str(torch_schedules._Action(2, torch_schedules.F, 0))
    for text in ("2F0", "13B7", "0I11", "3W2"):
        assert str(Action.from_str(text)) == text
    with pytest.raises(ValueError, match="invalid action"):
        Action.from_str("2X0")
    e = Event(1, 2, 0, "F", 0.5, 1.5)
    assert str(e) == "r1:2F0@[0.5,1.5]" and e.action == a


# --- Closed forms -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
@pytest.mark.parametrize("p,m", [(1, 1), (2, 2), (2, 5), (4, 4), (4, 8), (4, 13), (8, 8), (8, 32)])
def test_gpipe_and_1f1b_closed_form(schedule: str, p: int, m: int) -> None:
    r = sim(schedule, equal_stages(p), m)
    assert r.step_time == pytest.approx((m + p - 1) * (F + B))
    assert r.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert r.busy == pytest.approx([m * (F + B)] * p)


@pytest.mark.parametrize("p,v,m", [(2, 2, 2), (2, 2, 6), (4, 2, 4), (4, 2, 8), (4, 2, 12), (4, 3, 5), (8, 2, 16)])
def test_interleaved_closed_form_when_m_at_least_p(p: int, v: int, m: int) -> None:
    r = sim("interleaved", equal_stages(p * v, v), m, p)
    assert r.step_time == pytest.approx((m + (p - 1) / v) * (F + B))
    assert r.bubble_fraction == pytest.approx((p - 1) / (v * m + p - 1))
    one_f_one_b = sim("1f1b", equal_stages(p), m)
    assert r.bubble_fraction < one_f_one_b.bubble_fraction


@pytest.mark.parametrize("p,v,m", [(4, 2, 1), (4, 2, 3), (8, 2, 4), (4, 3, 2)])
def test_interleaved_with_fewer_microbatches_than_ranks_is_worse_than_closed_form(p: int, v: int, m: int) -> None:
    # torch's order for m < p cannot keep every rank busy through the warmup: the formula is only a bound
    r = sim("interleaved", equal_stages(p * v, v), m, p)
    assert r.bubble_fraction > (p - 1) / (v * m + p - 1) + 1e-9


@pytest.mark.parametrize("p,m", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 16)])
def test_zero_bubble_beats_1f1b(p: int, m: int) -> None:
    base = sim("1f1b", equal_stages(p), m).bubble_fraction
    zb = sim("zero-bubble", equal_stages(2 * p, 2), m, p)
    zbv = sim("zbv", equal_stages(2 * p, 2), m)
    assert zb.bubble_fraction <= base and zbv.bubble_fraction <= base
    assert {e.kind for e in zb.events} == {"F", "I", "W"}


def test_worked_example_of_the_module_docstring() -> None:
    r = sim("1f1b", equal_stages(4), 8)
    assert (r.step_time, r.bubble_fraction, r.peak_inflight) == (33.0, pytest.approx(3 / 11), (4, 3, 2, 1))


# --- Memory ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p,m", [(2, 2), (4, 4), (4, 9), (6, 12)])
def test_1f1b_holds_p_minus_r_microbatches_gpipe_holds_all(p: int, m: int) -> None:
    stages = equal_stages(p, activation_bytes=10.0, static_bytes=1000.0)
    r1, rg = sim("1f1b", stages, m), sim("gpipe", stages, m)
    assert r1.peak_inflight == tuple(min(p - r, m) for r in range(p))
    assert rg.peak_inflight == (m,) * p
    assert r1.peak_memory == pytest.approx([1000.0 + 10.0 * min(p - r, m) for r in range(p)])
    assert rg.peak_memory == pytest.approx([1000.0 + 10.0 * m] * p)
    for timeline in r1.memory_timeline + rg.memory_timeline:
        assert timeline[0] == (0.0, 1000.0) and timeline[-1][1] == pytest.approx(1000.0)  # all freed at the end
        assert all(t0 < t1 for (t0, _), (t1, _) in pairwise(timeline[1:]))


def test_memory_sums_the_stages_of_a_rank() -> None:
    stages = [
        StageCost(forward=0.5, backward=1.0, activation_bytes=s + 1.0, static_bytes=100.0 * (s + 1)) for s in range(4)
    ]
    r = sim("looped-bfs", stages, 3, 2)  # BFS runs every forward before any backward
    assert r.peak_inflight == (6, 6)
    assert r.peak_memory == pytest.approx([100 + 300 + 3 * (1 + 3), 200 + 400 + 3 * (2 + 4)])


def counted_peaks(schedule: str, num_stages: int, m: int, ranks: int) -> list[int]:
    """Each stage's most microbatches in flight, counted action by action over its rank's order as the unmodified
    torch class builds it: F adds one, the action that ends its backward (B; W where the backward is split) frees
    one."""
    orders = unmodified_torch_orders(schedule, num_stages, m, ranks)
    split = {a.kind for acts in orders.values() for a in acts} >= {"W"}
    held, peak = [0] * num_stages, [0] * num_stages
    for actions in orders.values():
        for a in actions:
            held[a.stage] += 1 if a.kind == "F" else -1 if a.kind == ("W" if split else "B") else 0
            peak[a.stage] = max(peak[a.stage], held[a.stage])
    assert held == [0] * num_stages
    return peak


@pytest.mark.parametrize(
    "schedule,num_stages,ranks,m",
    [("interleaved", 8, 2, 8), ("interleaved", 12, 4, 8), ("interleaved", 9, 3, 12), ("looped-bfs", 8, 4, 4),
     ("zero-bubble", 8, 4, 8), ("zero-bubble", 12, 4, 12), ("zbv", 8, 4, 8), ("zbv", 6, 3, 9), ("1f1b", 5, 5, 7),
     ("gpipe", 4, 4, 6)],
)  # fmt: skip
def test_in_flight_peaks_count_the_schedule_s_own_order(schedule: str, num_stages: int, ranks: int, m: int) -> None:
    peaks = in_flight_peaks(schedule, num_stages, m, ranks)
    assert list(peaks) == counted_peaks(schedule, num_stages, m, ranks)
    stages = equal_stages(num_stages, num_stages // ranks, activation_bytes=1.0)
    rank_of = get_schedule(schedule).stage_ranks(num_stages, ranks)
    for rank, held in enumerate(sim(schedule, stages, m, ranks).peak_inflight):  # at once, on the whole rank
        own = [peaks[s] for s in range(num_stages) if rank_of[s] == rank]
        assert max(own) <= held <= sum(own)


@settings(max_examples=80, deadline=None)
@given(
    schedule=st.sampled_from(sorted(s.name for s in SCHEDULES.values() if not s.single_stage)),
    ranks=st.integers(1, 6),
    per_rank=st.integers(2, 4),
    m=st.integers(1, 30),
)
def test_multi_stage_counts_from_the_rule_equal_torch_s_built_order(
    schedule: str, ranks: int, per_rank: int, m: int
) -> None:
    # the simulator writes torch's interleaved orders out from the rule they follow (schedule_rules) and
    # in_flight_peaks counts them from it, or takes the form for zbv / looped-bfs, building no schedule; against the
    # orders the unmodified torch classes build, the orders are equal, the counts too, and both refuse the same counts
    assert schedule in COUNTED_SCHEDULES or schedule in FORM_EXACT  # a new schedule: count it, or check its form
    num_stages = ranks * (2 if schedule == "zbv" else per_rank)
    try:
        built = counted_peaks(schedule, num_stages, m, ranks)
    except (ValueError, AssertionError):
        with pytest.raises(ValueError, match="torch refuses .*multiple of the number of rounds"):
            schedule_actions(schedule, num_stages, m, ranks)
        with pytest.raises(ValueError, match="multiple of the number of rounds"):
            in_flight_peaks(schedule, num_stages, m, ranks)
        return
    assert schedule_actions(schedule, num_stages, m, ranks) == unmodified_torch_orders(schedule, num_stages, m, ranks)
    assert list(in_flight_peaks(schedule, num_stages, m, ranks)) == built
    if schedule in COUNTED_SCHEDULES:
        assert list(interleaved_in_flight(schedule, num_stages, m, ranks)) == built


def test_multi_stage_peaks_differ_from_the_closed_form() -> None:
    # torch's Interleaved1F1B warms up one round of microbatches per local stage: at 4 ranks x 3 stages the first
    # stage holds 8, not min(stages - s, m) = 12; the interleaved zero-bubble schedule keeps its last stage's
    # microbatches until their weight gradients run, more than the form's 1
    closed = get_schedule("interleaved").in_flight(12, 12)
    assert in_flight_peaks("interleaved", 12, 12, 4)[0] < closed[0]
    assert in_flight_peaks("zero-bubble", 12, 12, 4)[-1] > closed[-1]


# --- Unequal stages, communication ----------------------------------------------------------------------------

costs = st.floats(min_value=0.01, max_value=10.0, allow_nan=False)


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[list[StageCost], int]:
    p = draw(st.integers(1, 6))
    m = draw(st.integers(p, 12))
    stages = [
        StageCost(forward=draw(costs), backward=draw(costs), backward_input_fraction=draw(st.floats(0.0, 1.0)))
        for _ in range(p)
    ]
    return stages, m


def bottleneck_bound(stages: list[StageCost], m: int) -> float:
    """No schedule beats max over s of: upstream forwards of microbatch 0, all m microbatches of stage s, then
    the upstream backwards of the last microbatch. With the bottleneck last this is (m-1) max(f+b) + sum(f+b)."""
    work = [s.forward + s.backward for s in stages]
    return max(m * work[s] + sum(work[:s]) for s in range(len(stages)))


@given(pipelines(), st.sampled_from(["gpipe", "1f1b"]))
def test_the_split_free_bound_is_below_every_split_s_bound_and_step(
    pipe: tuple[list[StageCost], int], schedule: str
) -> None:
    stages, m = pipe
    work = m * sum(s.forward + s.backward for s in stages)
    bound = step_lower_bound(schedule, work, len(stages), m)
    assert work / len(stages) <= bound * (1 + 1e-12)
    assert bound <= bottleneck_bound(stages, m) * (1 + 1e-9)
    assert bound <= sim(schedule, stages, m).step_time * (1 + 1e-9)


@pytest.mark.parametrize(("p", "m"), [(2, 2), (4, 8), (8, 9)])
def test_the_split_free_bound_is_reached_by_the_geometric_split(p: int, m: int) -> None:
    """Stage work falling by (m - 1) / m per stage makes every stage's fill-and-drain bound equal: the minimum."""
    per_mb = [((m - 1) / m) ** s for s in range(p)]
    stages = [StageCost(forward=t / 3, backward=2 * t / 3) for t in per_mb]
    bound = step_lower_bound("1f1b", m * sum(per_mb), p, m)
    assert bound == pytest.approx(bottleneck_bound(stages, m)) and bound == pytest.approx(m * per_mb[0])
    assert step_lower_bound("zero-bubble", 12.0, p, m) == step_lower_bound("interleaved", 12.0, p, m) == 12.0 / p


@given(pipelines(), st.sampled_from(["gpipe", "1f1b"]))
def test_unequal_stages_respect_the_bottleneck_bound(pipe: tuple[list[StageCost], int], schedule: str) -> None:
    stages, m = pipe
    r = sim(schedule, stages, m)
    assert r.step_time >= bottleneck_bound(stages, m) - 1e-9
    assert 0.0 <= r.bubble_fraction < 1.0
    work = [s.forward + s.backward for s in stages]
    if work[-1] == max(work):
        assert r.step_time >= (m - 1) * max(work) + sum(work) - 1e-9


def test_the_fill_drain_formula_is_not_a_bound_when_the_bottleneck_is_upstream() -> None:
    # (m-1) max(f+b) + sum(f+b) = 8 here, but 1F1B finishes in 7, which is optimal (bottleneck_bound = 7):
    # stage 0's forwards overlap stage 1's work, so the upstream bottleneck is not paid in full after the fill.
    stages = [StageCost(forward=1.0, backward=2.0), StageCost(forward=1.0, backward=1.0)]
    r = sim("1f1b", stages, 2)
    assert r.step_time == 7.0 == bottleneck_bound(stages, 2) < (2 - 1) * 3.0 + 5.0


@given(pipelines(), st.floats(0.0, 5.0), st.sampled_from(["1f1b", "interleaved", "zero-bubble", "zbv"]))
def test_send_time_never_helps(pipe: tuple[list[StageCost], int], send: float, schedule: str) -> None:
    stages, m = pipe
    ranks = len(stages)
    if schedule != "1f1b":
        stages = stages + stages[::-1]  # two stages per rank
        if schedule in ("interleaved", "zero-bubble") and m % max(1, m // ranks):
            return  # a microbatch count torch refuses (tested below)
    slow = [StageCost(**{**vars(s), "send_time": send}) for s in stages]
    fast_r, slow_r = sim(schedule, stages, m, ranks), sim(schedule, slow, m, ranks)
    assert slow_r.step_time >= fast_r.step_time - 1e-9


@pytest.mark.parametrize("schedule,num_stages", [("gpipe", 4), ("1f1b", 4), ("interleaved", 8), ("looped-bfs", 8),
                                                 ("zero-bubble", 8), ("zbv", 8)])  # fmt: skip
def test_send_time_increases_step_time(schedule: str, num_stages: int) -> None:
    ranks, per_rank = 4, num_stages // 4
    base = sim(schedule, equal_stages(num_stages, per_rank), 8, ranks)
    slow = sim(schedule, equal_stages(num_stages, per_rank, send_time=0.25), 8, ranks)
    # microbatch 0 crosses the p - 1 rank boundaries forward and back on the critical path
    assert slow.step_time >= base.step_time + 2 * (ranks - 1) * 0.25 - 1e-9


def test_same_rank_hand_offs_are_free() -> None:
    # zbv keeps stages p-1 and p on rank p-1, so that hop costs nothing; every other hop does
    stages = [StageCost(forward=1.0, backward=2.0, send_time=0.5) for _ in range(4)]
    r = sim("zbv", stages, 4)
    ev = {(e.stage, e.kind, e.microbatch): e for e in r.events}
    assert ev[(2, "F", 0)].start == ev[(1, "F", 0)].end
    assert ev[(1, "F", 0)].start == ev[(0, "F", 0)].end + 0.5


# --- Sends that hold their sender (CPUs with gloo) ------------------------------------------------------------


def test_blocking_sends_by_hand() -> None:
    # 2 stages, 1F1B, 2 microbatches, f=1, b=2, send 0.5. Rank 0 runs F0 F1 B0 B1, rank 1 F0 B0 F1 B1.
    # Rank 0: F0 [0,1] send [1,1.5], F1 [1.5,2.5] send [2.5,3]; rank 1: F0 [1.5,2.5], B0 [2.5,4.5] send [4.5,5],
    # F1 (arrived at 3) [5,6], B1 [6,8] send [8,8.5]; rank 0: B0 (gradient at 5) [5,7], B1 (at 8.5) [8.5,10.5].
    stages = equal_stages(2, send_time=0.5)
    r = sim("1f1b", stages, 2, blocking=True)
    assert r.step_time == 10.5
    assert r.send_holds == ((0, 1.0, 1.5), (0, 2.5, 3.0), (1, 4.5, 5.0), (1, 8.0, 8.5))
    assert r.busy == (6.0, 6.0)  # compute only
    # Overlapped sends: rank 1 starts F1 at 4.5 instead of 5, rank 0 gets the last gradient at 8 instead of 8.5.
    assert sim("1f1b", stages, 2).step_time == 10.0


@given(pipelines(), st.floats(0.0, 5.0), st.sampled_from(["gpipe", "1f1b", "interleaved", "zero-bubble", "zbv"]))
def test_blocking_sends_never_help_and_vanish_without_send_time(
    pipe: tuple[list[StageCost], int], send: float, schedule: str
) -> None:
    stages, m = pipe
    ranks = len(stages)
    if schedule not in ("gpipe", "1f1b"):
        stages = stages + stages[::-1]  # two stages per rank
        if schedule in ("interleaved", "zero-bubble") and m % max(1, m // ranks):
            return  # a microbatch count torch refuses (tested below)
    timed = [StageCost(**{**vars(s), "send_time": send}) for s in stages]
    held, overlapped = sim(schedule, timed, m, ranks, blocking=True), sim(schedule, timed, m, ranks)
    assert held.step_time >= overlapped.step_time - 1e-9
    assert sim(schedule, stages, m, ranks, blocking=True).step_time == sim(schedule, stages, m, ranks).step_time


def test_validator_catches_a_missing_or_misplaced_send_hold() -> None:
    stages = equal_stages(2, send_time=0.5)
    good = sim("1f1b", stages, 2, blocking=True)
    with pytest.raises(AssertionError, match="holds no time"):
        check_events(SimResult(**{**vars(good), "send_holds": good.send_holds[1:]}), stages)
    early = ((0, 1.0, 2.0),) + good.send_holds[1:]  # lasts 1.0 and runs into F1
    with pytest.raises(AssertionError, match="rule 2"):
        check_events(SimResult(**{**vars(good), "send_holds": early}), stages)
    with pytest.raises(AssertionError, match="without blocking_sends"):
        check_events(SimResult(**{**vars(good), "blocking_sends": False}), stages)


# --- Failures -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "schedule,num_stages,m,ranks,match",
    [
        ("pipedream", 4, 4, None, "unknown schedule 'pipedream'"),
        ("interleaved", 6, 4, 4, r"divisible by ranks: 6 stages, 4 ranks"),
        ("interleaved", 8, 4, None, "pass num_ranks"),
        ("zbv", 6, 4, 2, r"exactly 2 stages per rank: 6 stages, 2 ranks"),
        ("gpipe", 4, 4, 2, r"one stage per rank: 4 stages for 2 ranks"),
        ("1f1b", 4, 3, None, r"torch refuses Schedule1F1B\(num_stages=4, num_ranks=4, n_microbatches=3\)"),
        ("interleaved", 8, 9, 4, r"torch refuses ScheduleInterleaved1F1B.*multiple of the number of rounds \(2\)"),
        ("zero-bubble", 8, 9, 4, r"n_microbatches=9.*rounds \(2\)"),
        ("gpipe", 4, 0, None, "num_microbatches >= 1"),
    ],
)
def test_invalid_combinations_raise_value_error(
    schedule: str, num_stages: int, m: int, ranks: int | None, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        simulate(equal_stages(num_stages), num_microbatches=m, schedule=schedule, num_ranks=ranks)


def test_bad_costs_raise_value_error() -> None:
    with pytest.raises(ValueError, match="backward_input_fraction"):
        StageCost(forward=1.0, backward=1.0, backward_input_fraction=1.5)
    with pytest.raises(ValueError, match="forward"):
        StageCost(forward=-1.0, backward=1.0)


def test_deadlock_is_detected_and_named() -> None:
    # rank 1 wants stage 1's backward before its forward; rank 0 then waits forever for that gradient
    actions = {0: [Action(0, "F", 0), Action(0, "B", 0)], 1: [Action(1, "B", 0), Action(1, "F", 0)]}
    with pytest.raises(RuntimeError, match=r"deadlocked.*rank 0: 0B0, rank 1: 1B0"):
        replay(actions, equal_stages(2), [0, 1], num_microbatches=1)


def test_validator_catches_a_broken_dependency() -> None:
    stages = equal_stages(2)
    good = sim("1f1b", stages, 2)
    moved = tuple(
        e._replace(start=e.start - 1.0, end=e.end - 1.0) if (e.stage, e.kind, e.microbatch) == (0, "B", 1) else e
        for e in good.events
    )
    bad = SimResult(**{**vars(good), "events": moved})
    with pytest.raises(AssertionError, match="rule 4"):
        check_events(bad, stages)
    with pytest.raises(AssertionError, match="rule 1"):
        check_events(SimResult(**{**vars(good), "events": good.events[1:]}), stages)


# --- Gantt ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule,num_stages,ranks", [("1f1b", 4, 4), ("zero-bubble", 8, 4)])
def test_gantt_png_is_written(tmp_path, schedule: str, num_stages: int, ranks: int) -> None:
    pytest.importorskip("matplotlib")
    from partitioner.gantt import plot_gantt

    r = sim(schedule, equal_stages(num_stages, num_stages // ranks, send_time=0.05), 8, ranks, blocking=True)
    assert r.send_holds
    out = plot_gantt(r, tmp_path / f"{schedule}.png", title=schedule)
    data = out.read_bytes()
    assert out.exists() and len(data) > 5000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not math.isnan(r.step_time)


@pytest.mark.parametrize(
    "schedule,num_stages,ids", [("1f1b", 4, "microbatch id"), ("interleaved", 8, "stage:microbatch")]
)
def test_gantt_legend_says_what_the_box_labels_are(tmp_path, monkeypatch, schedule, num_stages, ids) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from partitioner.gantt import plot_gantt

    legends = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: legends.extend(fig.legends))
    plot_gantt(sim(schedule, equal_stages(num_stages, 1), 8, 4), tmp_path / "g.png")
    labels = [t.get_text() for legend in legends for t in legend.get_texts()]
    assert f"box label: {ids}" in labels and "forward" in labels, labels


def _drawn_stages(data: st.DataObject, num_stages: int, *, shortest: float) -> list[StageCost]:
    """Random stage costs: durations from `shortest` to 5 s, sends, bytes and the input-gradient share at random."""
    positive, duration = st.floats(0.0, 5.0, allow_nan=False), st.floats(shortest, 5.0, allow_nan=False)
    return [
        StageCost(
            forward=data.draw(duration),
            backward=data.draw(duration),
            send_time=data.draw(positive),
            backward_input_fraction=data.draw(st.floats(0.1, 0.9)),
            activation_bytes=data.draw(positive),
            static_bytes=data.draw(positive),
            transient_bytes=data.draw(positive),
        )
        for _ in range(num_stages)
    ]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from([("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("looped-bfs", 2), ("zero-bubble", 2), ("zbv", 2)]),
    st.integers(2, 4),  # ranks
    st.integers(0, 6),  # microbatches beyond the ranks
    st.booleans(),  # blocking sends
    st.data(),
)
def test_fast_replay_gives_the_replay_s_step_rank_ends_and_peaks(case, ranks, extra, blocking, data) -> None:
    """fast_replay (the planner's boundary search) must agree with simulate on every figure it returns."""
    schedule, per_rank = case
    num_stages, m = ranks * per_rank, ranks * per_rank + extra
    if schedule == "zero-bubble":
        m = max(m, num_stages)  # torch's interleaved zero-bubble wants at least as many microbatches as stages
    # Positive durations: at zero length a transient's allocation and release fall at one time, ordered by replay's
    # tie rule (release first), while fast_replay counts it
    stages = _drawn_stages(data, num_stages, shortest=0.01)
    try:
        full = simulate(stages, num_microbatches=m, schedule=schedule, num_ranks=ranks, blocking_sends=blocking)
    except ValueError:  # a count torch refuses
        return
    fast = fast_replay(stages, num_microbatches=m, schedule=schedule, num_ranks=ranks, blocking_sends=blocking)
    assert fast.step_time == pytest.approx(full.step_time, rel=1e-12, abs=1e-12)
    assert fast.rank_ends == pytest.approx(full.rank_ends, rel=1e-12, abs=1e-12)
    assert fast.peak_memory == pytest.approx(full.peak_memory, rel=1e-12, abs=1e-12)
    assert fast.stage_to_rank == full.stage_to_rank


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(
        [
            ("gpipe", 1),
            ("1f1b", 1),
            ("interleaved", 2),
            ("interleaved", 3),
            ("looped-bfs", 2),
            ("zero-bubble", 2),
            ("zbv", 2),
        ]
    ),
    st.integers(1, 4),  # ranks
    st.integers(0, 6),  # microbatches beyond the stages
    st.booleans(),  # blocking sends
    st.data(),
)
def test_the_replay_lower_bound_is_below_every_replay(case, ranks, extra, blocking, data) -> None:
    """plan.step skips the replay of a split whose replay_lower_bound cannot beat the best: the bound must never
    exceed the replayed step, whatever the schedule, costs, sends and ranks."""
    schedule, per_rank = case
    num_stages = ranks * per_rank
    m = num_stages + extra
    stages = _drawn_stages(data, num_stages, shortest=0.0)
    try:
        step = fast_replay(stages, num_microbatches=m, schedule=schedule, num_ranks=ranks, blocking_sends=blocking)
    except ValueError:  # a count torch refuses
        return
    bound = replay_lower_bound(stages, num_microbatches=m, schedule=schedule, num_ranks=ranks)
    assert bound <= step.step_time * (1 + 1e-12)


def test_the_replay_lower_bound_is_the_step_of_even_one_f_one_b() -> None:
    """Equal stages under 1F1B without sends run (m + p - 1)(F + B): the bound is that step, so a split is skipped
    only when it truly cannot win. (With sends 1F1B's steady state waits for them too, which the bound leaves out.)"""
    p, m = 4, 9
    stages = [StageCost(forward=1.0, backward=2.0) for _ in range(p)]
    step = fast_replay(stages, num_microbatches=m, schedule="1f1b").step_time
    bound = replay_lower_bound(stages, num_microbatches=m, schedule="1f1b")
    assert bound == pytest.approx(step) and step == pytest.approx((m + p - 1) * 3.0)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("looped-bfs", 2), ("zero-bubble", 2), ("zbv", 2)]),
    st.integers(2, 6),  # ranks
    st.integers(0, 20),  # microbatches beyond the ranks
    st.booleans(),  # blocking sends
    st.data(),
)
def test_replay_by_levels_is_the_loop_to_the_bit(case, ranks, extra, blocking, data) -> None:
    """Deep pipelines are replayed a level of independent actions at a time (simulate._replay_by_levels): every
    figure must be exactly what the one-action-at-a-time loop gives, whatever the schedule, costs and sends."""
    schedule, per_rank = case
    num_stages, m = ranks * per_rank, ranks * per_rank + extra
    if schedule == "zero-bubble":
        m = max(m, num_stages)
    stages = _drawn_stages(data, num_stages, shortest=0.0)
    runs, default = [], simulate_module.WIDE_LEVELS
    try:
        for wide in (10**9, 0):  # the loop always, then the levels always
            simulate_module.WIDE_LEVELS = wide
            runs.append(fast_replay(stages, num_microbatches=m, schedule=schedule, num_ranks=ranks,
                                    blocking_sends=blocking))  # fmt: skip
    except ValueError:  # a count torch refuses
        return
    finally:
        simulate_module.WIDE_LEVELS = default
    assert runs[0] == runs[1]


def test_schedule_caches_keep_a_budget_of_stage_microbatches_least_recent_out_first() -> None:
    """simulate._bounded_cache: entries weigh stages x microbatches; past the budget the least recently used go, the
    newest always stays (a deep schedule alone over the budget is still reused by the calls that follow it)."""
    from partitioner.simulate import _bounded_cache

    built = []

    @_bounded_cache(budget=100)
    def order(schedule: str, stages: int, microbatches: int, ranks: int) -> int:
        built.append((stages, microbatches))
        return stages * microbatches

    assert order("1f1b", 2, 10, 2) == order("1f1b", 2, 10, 2) == 20 and built == [(2, 10)]
    order("1f1b", 5, 10, 5)  # 70 held
    order("1f1b", 2, 10, 2)  # used again: (5, 10) is now the least recent
    order("1f1b", 4, 10, 4)  # 110 > 100: (5, 10) goes
    order("1f1b", 2, 10, 2)
    order("1f1b", 5, 10, 5)
    assert built == [(2, 10), (5, 10), (4, 10), (5, 10)]
    order("1f1b", 20, 10, 20)  # 200 alone: every other entry goes, it stays
    order("1f1b", 20, 10, 20)
    order("1f1b", 2, 10, 2)
    assert built[-2:] == [(20, 10), (2, 10)]
    order.cache_clear()
    order("1f1b", 2, 10, 2)
    assert built[-1] == (2, 10) and len(built) == 7
