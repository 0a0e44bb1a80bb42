"""Running a compiled model's stages the way separate devices would, in this process (shared by the tests).

The local runtime passes tensors between stages by reference and every stage reads the model's own
parameters and buffers. On separate devices each stage has its own copy of what it holds, and a value
crossing a boundary arrives as a fresh copy. `run_on_devices` runs the stages that way: a plan that is
correct only because stages share memory fails here.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

import partitioner


def run_on_devices(cm: partitioner.CompiledModel, *args: Any, **kwargs: Any) -> tuple[Any, list[torch.nn.Module]]:
    """Outputs of `cm`'s stages run with per-stage copies of their state and of every value they receive.

    Returns the model's output and the stage modules (their buffers hold what each device would keep).
    """
    modules = [copy.deepcopy(st.module) for st in cm.stages]
    values: tuple = tuple(cm.captured.flatten_inputs(args, kwargs))
    for module in modules:
        values = tuple(v.detach().clone() if isinstance(v, torch.Tensor) else v for v in values)
        values = tuple(module(*values))
    return cm.captured.unflatten_output(list(values)), modules


def assert_buffers_kept(
    cm: partitioner.CompiledModel, modules: list[torch.nn.Module], reference: torch.nn.Module, before: dict
) -> None:
    """Every buffer the reference changed is held, with the reference's value, by each stage that holds it."""
    for name, value in reference.named_buffers():
        if torch.equal(value, before[name]):
            continue
        holders = [m for m in modules if _has_buffer(m, name)]
        assert holders, f"buffer {name} changed in the model but no stage holds it"
        for m in holders:
            torch.testing.assert_close(m.get_buffer(name), value, msg=f"buffer {name} on a stage")


def _has_buffer(module: torch.nn.Module, name: str) -> bool:
    try:
        module.get_buffer(name)
    except AttributeError:
        return False
    return True
