"""partitioner: compiler-style automatic partitioning of PyTorch models.

    cm = partitioner.compile(model, devices=8, example_inputs=(x,))
    y = cm(x)              # runs all stages in this process (exactly the original numerics)
    print(cm.plan.summary())
    loss = cm.step(inputs, targets, loss_fn)  # training: all stages here, or this rank's under torchrun
    pipe = cm.distributed()  # under torchrun: this rank's stages on torch.distributed.pipelining

README.md walks through the rest; docs/design.md records the design decisions.
"""

from partitioner.api import CompiledModel, compile
from partitioner.capture import CaptureError, Fallback
from partitioner.devices import PRESETS, DeviceSpec, get_device_spec, measure_cpu
from partitioner.plan.pipeline import InfeasibleMemoryError
from partitioner.plan.schema import Plan, StagePlan
from partitioner.runtime.materialize import record_init

__all__ = [
    "PRESETS",
    "CaptureError",
    "CompiledModel",
    "DeviceSpec",
    "DistributedPipeline",
    "Fallback",
    "InfeasibleMemoryError",
    "Plan",
    "StagePlan",
    "compile",
    "distribute",
    "get_device_spec",
    "measure_cpu",
    "record_init",
]


def __getattr__(name: str) -> object:
    """The distributed runtime, imported on first use: torch.distributed.pipelining takes about a second to import,
    and planning never needs it."""
    if name in ("DistributedPipeline", "distribute"):
        from partitioner.runtime import distributed

        return getattr(distributed, name)
    raise AttributeError(f"module 'partitioner' has no attribute {name!r}")
