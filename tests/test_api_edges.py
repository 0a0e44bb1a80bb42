"""Edges of the user-facing API (issue #14): options and inputs are validated with messages naming them, a step
refuses a batch that does not split evenly before any compute, an inference plan refuses to train, and a
model changed after compile is refused instead of silently running the old modules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import partitioner


class Net(nn.Module):
    def __init__(self, d: int = 8) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def _compile(model: nn.Module | None = None, **kw) -> partitioner.CompiledModel:
    kw.setdefault("example_inputs", (torch.randn(8, 8),))
    return partitioner.compile(model or Net(), device_type="cpu", **{"devices": 2, "pipeline": 2, **kw})


# -- a step's batch --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [6, 2, 0])
def test_batch_that_does_not_split_into_microbatches_is_refused_before_compute(batch: int) -> None:
    """Issue #14: batch 6 into 4 microbatches gave loss 1.1066 against 1.0391 on the whole batch; fewer rows than
    microbatches gave NaN. Now the step refuses before touching a gradient."""
    cm = _compile(microbatches=4)
    x, y = torch.randn(batch, 8), torch.randn(batch, 4)
    with pytest.raises(ValueError, match=rf"batch {batch} does not split into 4 equal chunks|the batch is empty"):
        cm.step((x,), y, _mse)
    assert all(p.grad is None for p in cm.parameters())


def test_saved_plan_for_a_larger_batch_is_refused_on_a_smaller_one() -> None:
    cm = _compile(microbatches=8)
    again = partitioner.compile(Net(), devices=2, device_type="cpu", example_inputs=(torch.randn(8, 8),),
                                plan=cm.plan.to_json())  # fmt: skip
    with pytest.raises(ValueError, match="batch 4 does not split into 8 equal chunks"):
        again.step((torch.randn(4, 8),), torch.randn(4, 4), _mse)


def test_inputs_and_targets_of_different_rows_are_refused() -> None:
    cm = _compile(microbatches=2)
    with pytest.raises(ValueError, match=r"all must have the batch's rows; got x: 8, targets\[0\]: 6"):
        cm.step((torch.randn(8, 8),), torch.randn(6, 4), _mse)


def test_even_batch_trains_as_the_mean_of_microbatch_losses() -> None:
    torch.manual_seed(0)
    model = Net()
    reference = Net()
    reference.load_state_dict(model.state_dict())
    cm = _compile(model, microbatches=4)
    x, y = torch.randn(8, 8), torch.randn(8, 4)
    loss = cm.step(x, y, _mse)  # a bare tensor is one positional argument
    want = sum(_mse(reference(xi), yi) for xi, yi in zip(x.chunk(4), y.chunk(4))) / 4
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


# -- inference plans ---------------------------------------------------------------------------------------------------


def test_inference_plan_refuses_to_train() -> None:
    """Issue #14: a training=False plan with tp omits the backward all-reduce, yet step ran (parameters 0.216 off)."""
    cm = _compile(training=False)
    with pytest.raises(RuntimeError, match="compiled with training=False.*compile with training=True"):
        cm.step((torch.randn(8, 8),), torch.randn(8, 4), _mse)


# -- options ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [float("nan"), -1.0, 0, float("inf"), "a lot", "80 parsecs", True])
def test_bad_memory_limit_is_refused_naming_the_option(limit) -> None:
    with pytest.raises(ValueError, match="memory_limit"):
        _compile(memory_limit=limit)


@pytest.mark.parametrize("text, value", [("80GB", 80e9), ("80 GiB", 80 * 2**30), ("512MiB", 512 * 2**20), ("1e9", 1e9)])
def test_memory_limit_with_a_unit(text: str, value: float) -> None:
    assert _compile(memory_limit=text).plan.memory_limit == value


def test_numpy_integers_are_counts() -> None:
    cm = _compile(devices=np.int64(2), pipeline=np.int32(2), microbatches=np.int64(2))
    assert (cm.plan.devices, cm.plan.pipeline_degree, cm.plan.microbatches) == (2, 2, 2)
    assert type(cm.plan.devices) is int


def test_bare_tensor_example_input() -> None:
    """Issue #14: `example_inputs=x` raised "Boolean value of Tensor ... ambiguous"."""
    x = torch.randn(8, 8)
    model = Net()
    cm = partitioner.compile(model, devices=2, pipeline=2, example_inputs=x, device_type="cpu")
    torch.testing.assert_close(cm(x), model(x))


def test_empty_example_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="example input 'x' has 0 rows"):
        partitioner.compile(Net(), devices=2, example_inputs=(torch.randn(0, 8),), device_type="cpu")


def test_plan_before_planning_says_when_planning_happens() -> None:
    cm = partitioner.compile(Net(), devices=2, pipeline=2, device_type="cpu")
    with pytest.raises(RuntimeError, match="planning happens at the first call"):
        cm.plan.summary()
    cm(torch.randn(4, 8))
    assert cm.plan.num_stages == 2


# -- the model after compile -------------------------------------------------------------------------------------------


def test_replaced_submodule_is_refused_at_the_next_call() -> None:
    model = Net()
    cm = _compile(model)
    model.b = nn.Linear(8, 8)
    with pytest.raises(RuntimeError, match=r"submodule 'b' of the model was replaced after compile"):
        cm(torch.randn(4, 8))


def test_replaced_parameter_is_refused_and_in_place_loading_is_fine() -> None:
    model = Net()
    cm = _compile(model)
    fresh = Net()
    model.load_state_dict(fresh.state_dict())  # in place: the stages see it
    x = torch.randn(4, 8)
    torch.testing.assert_close(cm(x), fresh(x))
    model.c.weight = nn.Parameter(torch.zeros(4, 8))
    with pytest.raises(RuntimeError, match=r"parameter 'c.weight' of the model was replaced"):
        cm(x)
