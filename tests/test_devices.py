"""Device specs: which links overlap compute, the measured gloo link, and what the planner does with both."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import partitioner
import zoo
from partitioner.devices import PRESETS, measure_link
from partitioner.options import CompileOptions
from partitioner.plan.graph import tied_sync_time


def test_gpus_overlap_transfers_and_the_cpu_does_not() -> None:
    assert all(PRESETS[name].overlaps_comm for name in ("h100", "h200", "a100"))
    assert not PRESETS["cpu"].overlaps_comm


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_measure_link_times_two_gloo_processes() -> None:
    latency, bandwidth = measure_link(repeats=5)
    # Loopback gloo between two processes: tens to hundreds of microseconds, 0.1-100 GB/s.
    assert 1e-6 < latency < 5e-3
    assert 1e8 < bandwidth < 1e11
    spec = partitioner.measure_cpu(link=True)
    assert 1e-6 < spec.link_latency < 5e-3 and 1e8 < spec.link_bandwidth < 1e11
    assert not spec.overlaps_comm and "ping-pong" in spec.source


def _gpt(devices: int, spec: partitioner.DeviceSpec) -> partitioner.CompiledModel:
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny")
    example = zoo.example_inputs("gpt3-tiny", batch=8, device="meta")
    return partitioner.compile(model, devices=devices, example_inputs=example, device_type=spec, pipeline=devices,
                               microbatches=4, schedule="1f1b")  # fmt: skip


def test_tied_embedding_sync_is_priced_once_per_step() -> None:
    spec = dataclasses.replace(PRESETS["cpu"], link_latency=1e-4, link_bandwidth=1e9, internode_bandwidth=1e9)
    two = _gpt(2, spec)
    wte = two.planning_graph.param_bytes["wte.weight"]
    # Ring all-reduce over the 2 owners (first and last stage): 2 latencies + 2 (2-1)/2 x bytes / bandwidth.
    assert two.plan.predicted["tied_weight_sync"] == pytest.approx(2e-4 + wte / 1e9)
    p = two.plan.predicted
    assert p["step_time"] == pytest.approx(p["pipeline_time"] + p["tied_weight_sync"] + p["optimizer_step"])
    pg = two.planning_graph
    stage_of = [two.plan.node_stage[n] for n in pg.names]
    assert tied_sync_time(pg, stage_of, [0, 0]) == 0.0  # both copies on one rank: nothing to send
    assert _gpt(1, spec).plan.predicted["tied_weight_sync"] == 0.0


def test_summary_says_whether_sends_overlap_compute() -> None:
    assert "sends add to compute" in _gpt(2, PRESETS["cpu"]).plan.summary()
    assert "sends overlap compute" in _gpt(2, PRESETS["h100"]).plan.summary()


def test_the_default_memory_limit_leaves_the_runtime_its_reserve() -> None:
    h100 = PRESETS["h100"]
    assert 0 < h100.runtime_reserve < h100.memory_bytes < 80 * 2**30  # the driver reports less than the datasheet
    options = CompileOptions.create(devices=8, device_type="h100")
    assert options.memory_limit == h100.usable_memory == h100.memory_bytes - h100.runtime_reserve
    assert CompileOptions.create(devices=8, device_type="h100", memory_limit="70GiB").memory_limit == 70 * 2**30
    assert PRESETS["cpu"].usable_memory == PRESETS["cpu"].memory_bytes  # no CUDA context, no NCCL
    assert partitioner.DeviceSpec.from_dict(h100.to_dict()) == h100
    with pytest.raises(ValueError, match="runtime_reserve"):
        dataclasses.replace(h100, runtime_reserve=h100.memory_bytes)
