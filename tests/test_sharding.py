"""Sharded data parallelism in the planner (partitioner.plan.sharding): ZeRO's per-parameter bytes, what each mode's
collectives cost and hide, and the search choosing a mode that fits where DDP does not."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import partitioner
import zoo
from partitioner.devices import PRESETS
from partitioner.plan.price import Layout, StageState, price_step, step_end, step_floor, step_parts
from partitioner.plan.search import scale_graph, search
from partitioner.plan.sharding import (
    DP_MODES,
    data_parallel_cost,
    data_parallel_floor,
    hsdp_shard,
    optimizer_step_time,
    state_divisors,
)
from partitioner.schedules import get_schedule
from partitioner.simulate import StageCost
from tests.planning_graphs import synthetic_graph


def _one_parameter_graph(numel: int, element_size: int, master_weights: bool = True):
    """One node reading one trainable parameter of `numel` elements (Adam: plan.graph.static_bytes_per_param)."""
    from partitioner.plan.graph import static_bytes_per_param

    static = static_bytes_per_param(numel, element_size, training=True, master_weights=master_weights)
    pg = synthetic_graph([0.0, 1.0], [(0, 1)], [0.0, 0.0], params=[[], ["w"]], param_static={"w": static})
    return dataclasses.replace(pg, param_bytes={"w": numel * element_size}, trainable=frozenset({"w"}))


@pytest.mark.parametrize("d", [2, 8, 64])
def test_bytes_per_parameter_are_zero_s(d: int) -> None:
    # Rajbhandari et al. 2020, Fig. 1: mixed-precision Adam holds 2 + 2 + 12 bytes per parameter (fp16 weight,
    # fp16 gradient; fp32 master copy and two moments); ZeRO-1 divides the 12, ZeRO-2 the gradient too, ZeRO-3 all.
    pg = _one_parameter_graph(1000, 2)
    want = {"ddp": 16, "zero1": 4 + 12 / d, "zero2": 2 + 14 / d, "fsdp": 16 / d}
    for mode, per_param in want.items():
        g = scale_graph(pg, None, d, mode)
        assert g.param_static["w"] / 1000 == pytest.approx(per_param), mode
    # hsdp shards over its group only; fp32 training (no master copy) holds 4 + 4 + 8 under ddp.
    assert scale_graph(pg, None, d, "hsdp", shard=2).param_static["w"] / 1000 == pytest.approx(8)
    assert scale_graph(_one_parameter_graph(1000, 4), None, d, "ddp").param_static["w"] / 1000 == pytest.approx(16)
    # Without master weights (torch's Adam over bf16 parameters): moments in bf16, 2 + 2 + 4 bytes, sharded the same
    plain = _one_parameter_graph(1000, 2, master_weights=False)
    want = {"ddp": 8, "zero1": 4 + 4 / d, "zero2": 2 + 6 / d, "fsdp": 8 / d}
    for mode, per_param in want.items():
        assert scale_graph(plain, None, d, mode).param_static["w"] / 1000 == pytest.approx(per_param), mode
    assert scale_graph(_one_parameter_graph(1000, 4, False), None, d, "ddp").param_static["w"] / 1000 == 16


def test_schedules_that_split_the_backward_keep_fsdp_state_gathered() -> None:
    assert state_divisors("fsdp", 8) == (8, 8, 8)
    assert state_divisors("fsdp", 8, split_backward=True) == (1, 1, 8)
    assert state_divisors("zero2", 8, split_backward=True) == (1, 1, 8)
    assert state_divisors("zero1", 8, split_backward=True) == (1, 1, 8)
    with pytest.raises(ValueError, match="zero9"):
        state_divisors("zero9", 8)


def test_hsdp_shards_inside_a_node() -> None:
    assert hsdp_shard(tp=1, dp=16, devices_per_node=8) == 8
    assert hsdp_shard(tp=2, dp=16, devices_per_node=8) == 4
    assert hsdp_shard(tp=8, dp=16, devices_per_node=8) == 0  # one dp rank per node: nothing to shard inside it
    assert hsdp_shard(tp=1, dp=8, devices_per_node=8) == 0  # the group would be all of dp: that is fsdp


def _cost(mode: str, **kw):
    spec = PRESETS["h100"]
    args = dict(tp=1, dp=8, weight_bytes=4e9, grad_bytes=4e9, forward=0.1, backward=0.2, layers=10,
                largest_layer=4e8)  # fmt: skip
    return data_parallel_cost(mode, spec, **{**args, **kw})


def test_collectives_hide_behind_compute_where_they_can() -> None:
    spec = PRESETS["h100"]
    bw = spec.link_bandwidth * spec.link_efficiency
    ddp = _cost("ddp")
    # 4 GB all-reduced over 8 NVLink ranks: 2 x 7/8 x 4e9 / bw = 0.024 s, under the last backward (0.2 s): only
    # DDP's last 25 MiB bucket is exposed.
    assert ddp.tail == pytest.approx(2 * spec.link_latency + 2 * 7 / 8 * 25 * 2**20 / bw)
    assert ddp.forward == ddp.backward == 0.0
    # A backward too short to hide it exposes the rest.
    assert _cost("ddp", backward=0.001).tail == pytest.approx(2 * spec.link_latency + 2 * 7 / 8 * 4e9 / bw - 0.001)
    zero1 = _cost("zero1")
    assert zero1.tail == pytest.approx(ddp.tail + spec.link_latency + 7 / 8 * 4e9 / bw)  # + the weights' all-gather
    fsdp = _cost("fsdp")
    gather = spec.link_latency + 7 / 8 * 4e9 / bw
    assert fsdp.forward == pytest.approx(gather / 10)  # only the first layer's gather shows
    assert fsdp.transient == pytest.approx(2 * 4e8 + 4e8)  # a layer in use, the next prefetched, a layer's grads
    slow = _cost("fsdp", forward=0.001, backward=0.001)
    assert slow.forward == pytest.approx(gather - 0.001)  # compute too short: the collective paces the step
    assert _cost("ddp", dp=1) == _cost("fsdp", dp=1) == type(ddp)()


def test_dp_groups_that_leave_the_node_use_the_network() -> None:
    inside, across = _cost("fsdp", tp=1, dp=8, forward=0.0), _cost("fsdp", tp=2, dp=8, forward=0.0)
    spec = PRESETS["h100"]
    assert across.forward / inside.forward == pytest.approx(
        (spec.link_latency + 7 / 8 * 4e9 / (spec.internode_bandwidth * spec.link_efficiency))
        / (spec.link_latency + 7 / 8 * 4e9 / (spec.link_bandwidth * spec.link_efficiency)),
        rel=1e-6,
    )


def test_the_optimizer_step_is_memory_bound_and_sharded_with_its_state() -> None:
    spec = PRESETS["h100"]
    # 1e9 bf16 parameters with fp32 masters and moments: 4 x 2 + 4 x 4 + 2 x 4 = 32 bytes each.
    step = optimizer_step_time(spec, 2e9, 1, 2, master_weights=True)
    assert step == pytest.approx(32e9 / spec.bytes_per_second() + spec.kernel_overhead)
    step = optimizer_step_time(spec, 2e9, 8, 2, master_weights=True)
    assert step == pytest.approx(4e9 / spec.bytes_per_second() + spec.kernel_overhead)
    # torch's Adam over bf16 parameters: bf16 moments, no master, 4 x 2 + 4 x 2 = 16 bytes each; fp32 the same
    # either way (4 x 4 + 4 x 4).
    assert optimizer_step_time(spec, 2e9, 1, 2) == pytest.approx(16e9 / spec.bytes_per_second() + spec.kernel_overhead)
    assert optimizer_step_time(spec, 4e9, 1, 4) == optimizer_step_time(spec, 4e9, 1, 4, master_weights=True)


def test_the_search_shards_the_training_state_when_replicas_do_not_fit() -> None:
    # 11 parameters of 100 bytes of Adam state each, a replica needs 1100 bytes; at 300 bytes per device DDP needs a
    # pipeline of 4 or more, sharding the state over 8 replicas needs none.
    params = [[]] + [[f"p{i}"] for i in range(1, 12)]
    pg = synthetic_graph([0] + [1.0] * 11, [(i, i + 1) for i in range(11)], [1.0] * 12, params=params,
                         param_static={f"p{i}": 100 for i in range(1, 12)}, saved_bytes=[8.0] * 12)  # fmt: skip
    pg = dataclasses.replace(pg, param_bytes={f"p{i}": 10 for i in range(1, 12)}, trainable=frozenset(pg.param_static))
    kw = dict(tp_model=lambda tp: None, max_tp=1, batch=16, memory_limit=300.0, schedules=("1f1b",))
    ddp_only, _ = search(pg, 8, data_parallel=("ddp",), **kw)
    assert ddp_only.degrees.pp >= 4
    best, evaluated = search(pg, 8, **kw)
    assert best.data_parallel != "ddp" and best.peak_memory <= 300
    assert best.step_time <= ddp_only.step_time
    assert {c.data_parallel for c in evaluated if c.degrees.dp > 1} <= set(DP_MODES)


def test_compile_records_the_chosen_mode_and_a_forced_one() -> None:
    with torch.device("meta"):
        model = zoo.get("gpt3-1.3b").to(torch.bfloat16)
    x = zoo.example_inputs("gpt3-1.3b", batch=64, device="meta", seq=2048)
    # 1.3B parameters x 16 bytes (fp32 masters and moments) = 21 GB of training state: at 16 GB per device a DDP
    # replica cannot hold it.
    kw = dict(pipeline=1, tensor_parallel=1, master_weights=True)
    cm = partitioner.compile(model, 8, x, memory_limit="16GB", **kw)
    assert cm.plan.data_parallel in ("zero1", "zero2", "fsdp") and cm.plan.data_degree == 8
    assert cm.plan.predicted["peak_memory"] <= 16e9
    assert cm.plan.master_weights and "with fp32 master weights" in cm.plan.summary()
    forced = partitioner.compile(model, 8, x, memory_limit="80GB", data_parallel="fsdp", **kw)
    assert forced.plan.data_parallel == "fsdp"
    assert partitioner.Plan.from_json(forced.plan.to_json()) == forced.plan
    with pytest.raises(partitioner.InfeasibleMemoryError):
        partitioner.compile(model, 8, x, memory_limit="16GB", data_parallel="ddp", **kw)


def test_split_backward_schedules_price_hsdp_with_its_shard_group() -> None:
    params = [[]] + [[f"p{i}"] for i in range(1, 12)]
    pg = synthetic_graph([0] + [1.0] * 11, [(i, i + 1) for i in range(11)], [1.0] * 12, params=params,
                         param_static={f"p{i}": 100 for i in range(1, 12)}, saved_bytes=[8.0] * 12)  # fmt: skip
    pg = dataclasses.replace(pg, param_bytes={f"p{i}": 10 for i in range(1, 12)}, trainable=frozenset(pg.param_static))
    kw = dict(tp_model=lambda tp: None, max_tp=1, batch=32, memory_limit=float("inf"))
    best, evaluated = search(pg, 32, schedules=("zero-bubble",), pipeline=2, data_parallel=("hsdp",), **kw)
    assert best.data_parallel == "hsdp" and best.data_parallel_shard == 8


def test_a_reduction_after_the_backward_exposes_the_whole_all_reduce() -> None:
    spec = PRESETS["h100"]
    bw = spec.link_bandwidth * spec.link_efficiency
    whole = 2 * spec.link_latency + 2 * 7 / 8 * 4e9 / bw
    # The same 4 GB under a backward long enough to hide all but DDP's last bucket: after it, none of it hides.
    assert _cost("ddp").tail < whole / 10
    assert _cost("ddp", overlap_grad_reduce=False).tail == pytest.approx(whole)
    assert _cost("zero1", overlap_grad_reduce=False).tail == pytest.approx(whole + spec.link_latency + 7 / 8 * 4e9 / bw)
    with pytest.raises(ValueError, match="reduce-scatters during every backward"):
        _cost("fsdp", overlap_grad_reduce=False)


def test_the_search_prices_and_records_a_reduction_after_the_backward() -> None:
    params = [[]] + [[f"p{i}"] for i in range(1, 12)]
    pg = synthetic_graph([0] + [1.0] * 11, [(i, i + 1) for i in range(11)], [1.0] * 12, params=params,
                         param_static={f"p{i}": 100 for i in range(1, 12)}, saved_bytes=[8.0] * 12)  # fmt: skip
    pg = dataclasses.replace(pg, param_bytes={f"p{i}": 1e9 for i in range(1, 12)}, trainable=frozenset(pg.param_static))
    kw = dict(tp_model=lambda tp: None, max_tp=1, batch=16, memory_limit=float("inf"), schedules=("1f1b",), pipeline=1)
    during, _ = search(pg, 8, data_parallel=("ddp",), **kw)
    after, evaluated = search(pg, 8, overlap_grad_reduce=False, **kw)
    assert {c.data_parallel for c in evaluated} <= {"ddp", "zero1"}  # the modes that reduce once, after the backward
    assert not after.overlap_grad_reduce and after.row()["overlap_grad_reduce"] is False
    assert after.step_time > during.step_time and after.dp_sync > during.dp_sync


def test_compile_records_a_reduction_after_the_backward_and_refuses_it_for_sharded_gradients() -> None:
    with torch.device("meta"):
        model = zoo.get("gpt3-125m")  # 500 MB of fp32 gradients: many DDP buckets, most of them hidden when overlapped
    x = zoo.example_inputs("gpt3-125m", batch=16, device="meta", seq=256)
    cm = partitioner.compile(model, 4, x, device_type="a100", pipeline=1, tensor_parallel=1, overlap_grad_reduce=False)
    assert cm.plan.data_degree == 4 and cm.plan.data_parallel in ("ddp", "zero1")
    assert cm.plan.overlap_grad_reduce is False and "gradients reduced after the backward" in cm.plan.summary()
    assert partitioner.Plan.from_json(cm.plan.to_json()) == cm.plan
    during = partitioner.compile(model, 4, x, device_type="a100", pipeline=1, tensor_parallel=1,
                                 data_parallel=cm.plan.data_parallel)  # fmt: skip
    assert cm.plan.predicted["data_parallel_sync"] > during.plan.predicted["data_parallel_sync"]
    with pytest.raises(ValueError, match="overlap_grad_reduce=False"):
        partitioner.compile(model, 4, x, data_parallel="fsdp", overlap_grad_reduce=False)


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["ddp", "zero1", "zero2", "fsdp", "hsdp"]),
    st.sampled_from(["1f1b", "gpipe", "interleaved", "zero-bubble"]),
    st.integers(1, 4),  # pp
    st.sampled_from([2, 4, 16]),  # dp
    st.sampled_from([1, 2]),  # tp
    st.lists(st.floats(0.0, 1e-2), min_size=8, max_size=8),  # per-stage compute
    st.lists(st.floats(0.0, 4e9), min_size=8, max_size=8),  # per-stage trainable bytes
    st.sampled_from([True, False]),
)
def test_the_data_parallel_floor_never_exceeds_a_priced_step(mode, schedule, pp, dp, tp, compute, held, overlap):
    """data_parallel_floor at the average weights per rank is a lower bound on the step plan.price prices, for any
    split of compute and weights over the stages (what the search skips layouts by before it plans them)."""
    spec = PRESETS["h100"]
    if mode == "hsdp" and not hsdp_shard(tp, dp, spec.devices_per_node):
        return
    if not overlap and mode not in ("ddp", "zero1"):
        return
    k = 2 if schedule == "interleaved" else 1
    stages = pp * k
    if schedule == "interleaved" and pp == 1:
        return
    m = 2 * stages
    shard = hsdp_shard(tp, dp, spec.devices_per_node) if mode == "hsdp" else 0
    layout = Layout(pp, tp, dp, m, schedule, mode, shard, overlap)
    costs = [StageCost(forward=c / 3, backward=2 * c / 3, send_time=1e-5) for c in compute[:stages]]
    state = [StageState(trainable=w, layers=2, largest=w / 2) for w in held[:stages]]
    pg = dataclasses.replace(synthetic_graph([0.0, 1.0], [(0, 1)], [0.0, 0.0]), spec=spec)
    priced = price_step(pg, layout, costs, state, fast=True)
    split = get_schedule(schedule).split_backward
    floor = data_parallel_floor(mode, spec, tp=tp, dp=dp, weight_bytes=sum(held[:stages]) / pp, microbatches=m,
                                element_size=pg.param_element_size, shard=shard, split_backward=split,
                                overlap_grad_reduce=overlap)  # fmt: skip
    assert floor <= step_end(priced) * (1 + 1e-9)


@settings(max_examples=80, deadline=None)
@given(
    st.sampled_from(["ddp", "zero1", "zero2", "fsdp"]),
    st.sampled_from(["1f1b", "gpipe", "interleaved", "zero-bubble", "zbv"]),
    st.integers(1, 4),  # pp
    st.sampled_from([1, 2, 16]),  # dp
    st.lists(st.floats(0.0, 1e-2), min_size=8, max_size=8),  # per-stage compute
    st.lists(st.floats(0.0, 4e9), min_size=8, max_size=8),  # per-stage trainable bytes
    st.lists(st.floats(0.0, 1e-3), min_size=8, max_size=8),  # per-stage sends
    st.sampled_from(["h100", "cpu"]),  # sends beside compute, or holding their rank
)
def test_the_step_floor_never_exceeds_the_priced_step(mode, schedule, pp, dp, compute, held, sends, device):
    """plan.price.step_floor (what the search skips a candidate's replay by) is a lower bound on the step price_step
    and step_end give the same stages, tied-weight sync or not, for every schedule and data-parallel mode; and close
    to it where the replay is simple (one stage, no sends)."""
    spec = PRESETS[device]
    k = 2 if schedule in ("interleaved", "zbv") else 1
    if k > 1 and pp == 1:
        return
    stages, m = pp * k, 2 * pp * k
    layout = Layout(pp, 1, dp, m, schedule, mode if dp > 1 else "")
    costs = [StageCost(forward=c / 3, backward=2 * c / 3, send_time=t) for c, t in zip(compute, sends)][:stages]
    state = [StageState(trainable=w, layers=2, largest=w / 2) for w in held[:stages]]
    pg = dataclasses.replace(synthetic_graph([0.0, 1.0], [(0, 1)], [0.0, 0.0]), spec=spec)
    priced = price_step(pg, layout, costs, state, fast=True)
    floor = step_floor(step_parts(pg, layout, costs, state), layout)
    assert floor <= step_end(priced) * (1 + 1e-9) + 1e-15
    assert floor <= step_end(priced, tied_sync=1e-3, tied_ranks=[0]) * (1 + 1e-9) + 1e-15
    if stages == 1:
        assert floor == pytest.approx(step_end(priced), rel=1e-9, abs=1e-15)


def test_zero2_under_a_split_backward_is_priced_as_the_runtime_runs_it() -> None:
    # The runtime runs zero2 and fsdp alike under zero-bubble / zbv (one FSDP2 group per stage, gathered from the
    # first forward to the last weight gradient, reduce-scattered once): no per-microbatch scatter and nothing
    # transient beyond the gathered state that state_divisors already holds.
    kw = dict(tp=1, dp=8, weight_bytes=4e9, grad_bytes=4e9, forward=1e-3, backward=2e-3, layers=4, largest_layer=1e9,
              split_backward=True)  # fmt: skip
    zero2 = data_parallel_cost("zero2", PRESETS["h100"], **kw)
    assert zero2 == data_parallel_cost("fsdp", PRESETS["h100"], **kw)
    assert zero2.transient == 0.0 and zero2.backward == 0.0
    assert data_parallel_cost("zero2", PRESETS["h100"], **{**kw, "split_backward": False}).transient == 1e9


@pytest.mark.parametrize("mode", ["zero2", "fsdp"])
def test_a_rank_holds_one_layer_in_flight_whatever_its_stages(mode: str) -> None:
    # A rank runs one layer at a time: with 4 stages per rank (interleaved) it holds the largest of its stages' gathered
    # layers / unreduced gradients once, not once per stage.
    pp, per_rank, dp = 2, 4, 8
    stages = pp * per_rank
    largest = [1e9 * (1 + s) for s in range(stages)]
    layout = Layout(pp, 1, dp, 2 * stages, "interleaved", mode, 0, True)
    costs = [StageCost(forward=1e-3, backward=2e-3, static_bytes=5e9) for _ in range(stages)]
    state = [StageState(trainable=4 * big, layers=4, largest=big) for big in largest]
    pg = dataclasses.replace(synthetic_graph([0.0, 1.0], [(0, 1)], [0.0, 0.0]), spec=PRESETS["h100"])
    priced = price_step(pg, layout, costs, state, fast=True)
    rank_of = get_schedule("interleaved").stage_ranks(stages, pp)
    per_stage = [extra.transient for extra in priced.data_parallel]
    assert min(per_stage) > 0
    want = [per_rank * 5e9 + max(t for s, t in enumerate(per_stage) if rank_of[s] == r) for r in range(pp)]
    assert list(priced.simulation.peak_memory) == pytest.approx(want)


def test_master_weights_price_fp32_moments_and_masters_and_travel_with_the_plan() -> None:
    """A bf16 model's training state: 8 bytes per parameter as torch's Adam keeps it (bf16 moments), 16 with fp32
    masters and moments; the plan records which, and a saved plan is priced again with its own."""
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny").to(torch.bfloat16)
    x = zoo.example_inputs("gpt3-tiny", batch=8, device="meta")
    kw = dict(pipeline=1, tensor_parallel=1, microbatches=1, verbose=False)
    plain = partitioner.compile(model, 1, x, **kw)
    master = partitioner.compile(model, 1, x, master_weights=True, **kw)
    params = sum(p.numel() for p in model.parameters())  # tied copies once, as the plan holds them
    assert (plain.plan.master_weights, master.plan.master_weights) == (False, True)
    gap = master.plan.predicted["peak_memory"] - plain.plan.predicted["peak_memory"]
    assert gap == pytest.approx(8 * params)
    assert master.plan.predicted["optimizer_step"] > plain.plan.predicted["optimizer_step"]
    again = partitioner.compile(model, 1, x, plan=master.plan.to_json(), verbose=False)
    assert again.plan.master_weights and again.plan.predicted == pytest.approx(master.plan.predicted)
    with pytest.raises(ValueError, match="master_weights"):
        partitioner.compile(model, 1, x, master_weights="yes", **kw)
