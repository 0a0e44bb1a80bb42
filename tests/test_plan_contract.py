"""The Plan is the contract (issue #18): a saved plan's tensor-parallel layout is what runs, type-checked against
the captured graph and never planned again; a layout that does not type-check is refused, naming the node."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import partitioner
import zoo
from partitioner.plan.tensor import check_tensor_parallel_plan, plan_tensor_parallel
from partitioner.runtime.tp_local import run_tensor_parallel_local

MODEL = "gpt3-tiny"


def _compiled() -> tuple[partitioner.CompiledModel, tuple]:
    torch.manual_seed(0)
    x = zoo.example_inputs(MODEL, batch=4)
    cm = partitioner.compile(
        zoo.get(MODEL), devices=2, tensor_parallel=2, pipeline=1, example_inputs=x, device_type="cpu"
    )
    return cm, x


def _with_layout(cm: partitioner.CompiledModel, tensor: dict) -> str:
    d = json.loads(cm.plan.to_json())
    d["tensor"] = tensor
    return json.dumps(d)


def test_an_edited_saved_layout_is_what_runs() -> None:
    """Keep the first MLP replicated in a saved plan: compile(plan=...) adopts exactly that layout, the ranks
    it builds hold that MLP whole, and they still compute the model."""
    cm, x = _compiled()
    gm = cm.captured.graph_module
    edited = plan_tensor_parallel(gm, 2, exclude={"h_0_mlp_fc"})
    assert edited != cm.tensor_parallel_plan and "h_0_mlp_proj" not in edited.module_rules
    again = partitioner.compile(
        copy.deepcopy(cm.model), devices=2, example_inputs=x, device_type="cpu",
        plan=_with_layout(cm, json.loads(edited.to_json())),
    )  # fmt: skip
    assert again.tensor_parallel_plan == edited
    _, ranks = run_tensor_parallel_local(again.captured.graph_module, again.tensor_parallel_plan, list(x))
    full = cm.model.get_parameter("h.0.mlp.fc.weight").shape
    assert all(r.get_parameter("h.0.mlp.fc.weight").shape == full for r in ranks)
    assert all(r.get_parameter("h.1.mlp.fc.weight").shape[0] == full[0] // 2 for r in ranks)  # still sharded
    again.verify_tensor_parallel(*x)


def test_a_saved_layout_is_not_planned_again(monkeypatch: pytest.MonkeyPatch) -> None:
    cm, x = _compiled()

    def no_planning(*args, **kwargs):  # noqa: ANN002, ANN003
        raise AssertionError("compile(plan=...) planned the tensor-parallel layout again")

    monkeypatch.setattr("partitioner.plan.tensor.plan_tensor_parallel", no_planning)
    again = partitioner.compile(copy.deepcopy(cm.model), devices=2, example_inputs=x, device_type="cpu",
                                plan=cm.plan.to_json())  # fmt: skip
    assert again.tensor_parallel_plan == cm.tensor_parallel_plan


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t["node_layout"].update(h_0_mlp_proj="replicated"), r"node 'h_0_mlp_proj' is recorded 'replicated'"),
        (lambda t: t["param_shard"].update({"h.0.mlp.fc.weight": {"dim": 1, "parts": 1}}), r"parameter 'h.0.mlp.fc"),
        (lambda t: t["collectives"].pop(), r"collectives differ .* at node"),
        (lambda t: t["module_rules"].update(h_0_mlp_proj="column"), r"node 'h_0_mlp_proj'|module_rules differ"),
        (lambda t: t["node_layout"].pop("h_0_mlp_fc"), r"nodes \['h_0_mlp_fc'\] are missing"),
    ],
    ids=["layout", "param", "collective", "rule", "missing"],
)
def test_a_layout_that_does_not_type_check_is_refused(edit, match: str) -> None:
    cm, x = _compiled()
    tensor = json.loads(cm.tensor_parallel_plan.to_json())
    edit(tensor)
    with pytest.raises(ValueError, match=match):
        partitioner.compile(copy.deepcopy(cm.model), devices=2, example_inputs=x, device_type="cpu",
                            plan=_with_layout(cm, tensor))  # fmt: skip


def test_the_planner_s_own_layouts_type_check() -> None:
    cm, _ = _compiled()
    gm = cm.captured.graph_module
    for tp in (2, 4):
        check_tensor_parallel_plan(gm, plan_tensor_parallel(gm, tp))
        check_tensor_parallel_plan(gm, plan_tensor_parallel(gm, tp, exclude={"wte", "h_1_attn_q_proj"}))


@pytest.mark.parametrize(
    "schedule, devices, pipeline, ranks, wrapper",
    [("1f1b", 4, 2, [0, 1], "ddp"), ("zbv", 2, 2, [0, 1, 1, 0], ""), ("zero-bubble", 4, 2, [0, 1, 0, 1], "zero2")],
)
def test_the_plan_records_stage_ranks_and_the_data_parallel_wrapper(
    schedule: str, devices: int, pipeline: int, ranks: list[int], wrapper: str
) -> None:
    x = zoo.example_inputs(MODEL, batch=8)
    cm = partitioner.compile(zoo.get(MODEL), devices=devices, pipeline=pipeline, tensor_parallel=1, schedule=schedule,
                             example_inputs=x, device_type="cpu")  # fmt: skip
    assert cm.plan.stage_ranks == ranks
    assert cm.plan.data_parallel == wrapper
    assert partitioner.Plan.from_json(cm.plan.to_json()) == cm.plan


def test_a_saved_plan_is_priced_on_its_own_device_unless_told_otherwise() -> None:
    """compile(plan=...) without device_type prices the plan on the device it was made for (and its memory limit):
    the plan comes back equal. With another device, the same layout comes back priced there: its device, limit,
    stage figures and predictions are compile's, consistent with the replay the compiled model holds."""
    model, x = zoo.get("gpt3-tiny"), zoo.example_inputs("gpt3-tiny", batch=4)
    cm = partitioner.compile(model, 2, x, device_type="cpu", pipeline=2)
    text = cm.plan.to_json()
    assert partitioner.compile(model, 2, x, plan=text).plan == cm.plan
    h100 = partitioner.compile(model, 2, x, plan=text, device_type="h100").plan
    assert h100.device_type["name"] == "h100" and h100.memory_limit == partitioner.PRESETS["h100"].usable_memory
    assert h100.node_stage == cm.plan.node_stage and h100.tensor == cm.plan.tensor
    assert [s.nodes for s in h100.stages] == [s.nodes for s in cm.plan.stages]
    assert h100.predicted["step_time"] < cm.plan.predicted["step_time"] / 5  # an H100 against the cpu preset
    assert [s.compute_time for s in h100.stages] != [s.compute_time for s in cm.plan.stages]


def test_a_saved_plan_refuses_another_training_mode_or_a_batch_its_split_does_not_divide() -> None:
    """A training plan's memory, recompute and data-parallel choices are training's; its microbatches x replicas
    must divide the batch it is compiled with. Both are refused with the fix instead of running another plan."""
    model, x = zoo.get("gpt3-tiny"), zoo.example_inputs("gpt3-tiny", batch=4)
    cm = partitioner.compile(model, 2, x, device_type="cpu", pipeline=2, microbatches=4, training=True)
    text = cm.plan.to_json()
    with pytest.raises(ValueError, match="made for training.*pass training=True"):
        partitioner.compile(model, 2, x, plan=text, training=False)
    with pytest.raises(ValueError, match="4 equal chunks, which do not divide this example's batch of 6"):
        partitioner.compile(model, 2, zoo.example_inputs("gpt3-tiny", batch=6), plan=text, training=True)
    assert partitioner.compile(model, 2, zoo.example_inputs("gpt3-tiny", batch=8), plan=text).plan.microbatches == 4
