"""Bad input to compile: each gets an error naming the problem and the fix, and leaves the model as it
was (state_dict values and training flags)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import partitioner
from partitioner.capture import CaptureError


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.c = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bn(self.b(torch.relu(self.a(x)))))


X = torch.randn(4, 8)


def _compile(model: nn.Module, **kw: Any) -> partitioner.CompiledModel:
    kw.setdefault("example_inputs", (X,))
    return partitioner.compile(model, device_type="cpu", **{"devices": 2, **kw})


def _refused(
    make: Callable[[nn.Module], Any], error: type[Exception], match: str, model: nn.Module | None = None
) -> None:
    """`make(model)` raises `error` matching `match` and changes neither the weights nor the modes."""
    model = model if model is not None else Small()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    with pytest.raises(error, match=match):
        make(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("devices", [0, -1, 2.5, True, "4"])
def test_devices_not_a_positive_integer(devices: Any) -> None:
    _refused(lambda m: _compile(m, devices=devices), ValueError, "devices must be a positive integer")


def test_more_pipeline_stages_than_capturable_units() -> None:
    _refused(
        lambda m: _compile(m, devices=8, pipeline=8),
        ValueError,
        r"8 pipeline stages requested but the graph has only \d+ places to put a stage .*: use at most \d+ stages",
    )


def test_more_devices_than_the_model_can_use_names_the_limit() -> None:
    _refused(lambda m: _compile(m, devices=100), ValueError, r"100 devices are more .* at most \d+ devices")


def test_example_inputs_of_the_wrong_shape() -> None:
    _refused(
        lambda m: _compile(m, example_inputs=(torch.randn(4, 5),)),
        ValueError,
        r"node %a .* failed on the example inputs.*Check that the example inputs have the shapes",
    )


def test_example_inputs_of_the_wrong_count_or_name() -> None:
    _refused(lambda m: _compile(m, example_inputs=(X, X)), ValueError, "do not match the model's forward.*too many")
    _refused(
        lambda m: _compile(m, example_inputs=None, example_kwargs={"y": X}),
        ValueError,
        "do not match the model's forward.*missing a required argument: 'x'",
    )


def test_example_inputs_of_the_wrong_dtype() -> None:
    _refused(lambda m: _compile(m, example_inputs=(X.long(),)), ValueError, "dtype")


def test_call_inputs_that_do_not_match_the_compiled_ones() -> None:
    cm = _compile(Small())
    with pytest.raises(ValueError, match="compiled for 2 dims"):
        cm(torch.randn(8))
    with pytest.raises(ValueError, match="do not match the model's forward"):
        cm(X, X)


def test_model_without_parameters_compiles_and_runs() -> None:
    """Not an error: a parameter-free model is partitioned by its compute like any other."""

    class NoParams(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(x) * 2.0 + torch.tanh(x)

    cm = _compile(NoParams(), pipeline=2)
    assert cm.plan.num_stages == 2 and all(s.params == [] for s in cm.plan.stages)
    torch.testing.assert_close(cm(X), NoParams()(X))


def test_outputs_that_are_not_tensors() -> None:
    class ReturnsText(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> str:
            self.a(x)
            return "done"

    _refused(lambda m: _compile(m), CaptureError, "returns a str \\('done'\\).*return tensors", ReturnsText())

    class ReturnsSizeAndNone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, None]:
            return self.a(x), x.shape[0], None

    model = ReturnsSizeAndNone()
    out = _compile(model, devices=1)(X)  # values computed from the inputs are fine, even non-tensors
    assert out[1] == 4 and out[2] is None
    torch.testing.assert_close(out[0], model(X)[0])


def _drop_first_node(js: str) -> str:
    data = json.loads(js)
    del data["stages"][0]["nodes"][0]
    return json.dumps(data)


def _plan_json() -> str:
    return _compile(Small(), pipeline=2).plan.to_json()


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (lambda js: js[:50], "not a partitioner plan: invalid JSON"),
        (lambda js: "hello", "not a partitioner plan: invalid JSON"),
        (lambda js: json.dumps({"a": 1}), "not a partitioner plan: missing"),
        (lambda js: json.dumps({**json.loads(js), "version": 99}), "plan version 99 is not supported"),
        (lambda js: json.dumps({**json.loads(js), "surprise": 1}), r"unknown fields \['surprise'\]"),
        (lambda js: _drop_first_node(js), "corrupt partitioner plan: node_stage disagrees"),
        (
            lambda js: json.dumps({**json.loads(js), "stages": json.loads(js)["stages"][:1]}),
            "corrupt partitioner plan",
        ),
    ],
    ids=["truncated", "not-json", "not-a-plan", "version", "unknown-field", "stages-disagree", "stage-missing"],
)
def test_corrupt_plan(corrupt: Callable[[str], str], match: str) -> None:
    bad = corrupt(_plan_json())
    _refused(lambda m: _compile(m, plan=bad), ValueError, match)


def test_plan_of_another_model() -> None:
    class Other(Small):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.c(self.b(self.a(x)))

    plan = _plan_json()
    _refused(
        lambda m: _compile(m, plan=plan), ValueError, "plan was made for another model.*plan this model again", Other()
    )


def test_plan_for_another_device_count() -> None:
    plan = _plan_json()
    _refused(lambda m: _compile(m, devices=4, plan=plan), ValueError, "plan .* 2 devices")


def test_example_inputs_of_the_wrong_shape_on_the_module_level_path() -> None:
    """A model with an untraceable submodule is run for real to profile it: a mismatch is named there."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.bn = nn.BatchNorm1d(8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.bn(self.a(x))
            return h if h.sum() > 0 else -h

    class Host(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gated = Gated()
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.gated(x))

    _refused(
        lambda m: _compile(m, example_inputs=(torch.randn(4, 5),)),
        ValueError,
        r"Host fails on the example inputs \(RuntimeError: .*\); pass example inputs the model accepts",
        Host(),
    )
