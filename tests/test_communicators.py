"""NCCL communicators in the memory model (plan.communicators): what each rank of a layout holds besides its tensors.

The count is checked against the process groups the distributed runtime really makes in tests/test_distributed.py
(HF Llama at pp2 x tp2 and pp2 x cp2 under torchrun); here, how a plan prices them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import partitioner
import zoo
from partitioner.devices import PRESETS, GiB
from partitioner.plan.communicators import communicator_bytes, rank_communicators


def test_a_rank_holds_a_communicator_per_group_it_joins() -> None:
    assert rank_communicators(1, 1, 1, 1) == 0  # one process: no NCCL
    assert rank_communicators(8, 1, 1, 1) == 1  # a pipeline alone runs on the default group
    assert rank_communicators(1, 1, 1, 8, "ddp") == 2  # default (also "dp": every rank), and the one-rank "pp"
    assert rank_communicators(1, 1, 2, 2, "ddp") == 4  # default (also dp x cp), pp of 1, dp and cp of 2
    assert rank_communicators(2, 2, 1, 2, "zero1") == 4  # default, pp, dp, tp
    assert rank_communicators(2, 2, 2, 2, "fsdp") == 6  # ... cp, and the flattened dp x cp group
    assert rank_communicators(2, 2, 1, 4, "hsdp") == rank_communicators(2, 2, 1, 4, "fsdp") + 2  # replicate, shard
    h100 = PRESETS["h100"]
    assert communicator_bytes(h100, 2, 2, 1, 2, "zero1") == 4 * h100.communicator_memory
    assert 0.3 * GiB < h100.communicator_memory < 0.5 * GiB and h100.runtime_reserve < 1.0 * GiB


def test_the_plan_holds_each_ranks_communicators_on_its_first_stage() -> None:
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny").to(torch.bfloat16)
    x = zoo.example_inputs("gpt3-tiny", batch=8, device="meta")
    kw = dict(pipeline=2, tensor_parallel=2, microbatches=4, recompute="none", verbose=False)
    spec = PRESETS["h100"]
    bare = partitioner.compile(model, 4, x, device_type=dataclasses.replace(spec, communicator_memory=0.0), **kw).plan
    held = partitioner.compile(model, 4, x, device_type=spec, **kw).plan
    extra = 3 * spec.communicator_memory  # default, pp and tp groups
    assert [s.nodes for s in held.stages] == [s.nodes for s in bare.stages]
    for with_, without in zip(held.stages, bare.stages):
        assert with_.peak_memory - without.peak_memory == pytest.approx(extra)
    assert held.predicted["peak_memory"] - bare.predicted["peak_memory"] == pytest.approx(extra)
    assert held.predicted["step_time"] == pytest.approx(bare.predicted["step_time"])


def test_a_limit_the_communicators_alone_exceed_is_refused_naming_them() -> None:
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny").to(torch.bfloat16)
    x = zoo.example_inputs("gpt3-tiny", batch=8, device="meta")
    with pytest.raises(partitioner.InfeasibleMemoryError, match=r"its 4 NCCL communicators 1\.52 GiB"):
        partitioner.compile(model, 8, x, pipeline=2, tensor_parallel=2, memory_limit="1GiB", verbose=False)
