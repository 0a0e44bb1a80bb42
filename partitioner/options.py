"""options: compile()'s options as one validated, keyword-only record (`CompileOptions`).

Every field is checked at construction, with a message naming the option and the fix, so the passes read typed
values (`options.spec.usable_memory`, `options.schedules`) instead of a bare dict. Example:
`CompileOptions.create(devices=8, device_type="h100", schedule="auto")` has spec = the h100 preset, schedules =
("1f1b", "interleaved", "zero-bubble", "zbv") and memory_limit = 77.6 GiB (the h100's usable memory: what the driver
reports, 79.1 GiB, less the CUDA context's and NCCL's reserve).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from partitioner.devices import DeviceSpec, get_device_spec
from partitioner.plan.recompute import MODES
from partitioner.plan.schema import Plan
from partitioner.plan.sharding import DP_MODES, NON_OVERLAPPED_MODES
from partitioner.schedules import SCHEDULES, get_schedule
from partitioner.validate import memory_bytes, positive_int

__all__ = ["AUTO_SCHEDULES", "CAPTURES", "COST_MODELS", "DEFAULT_SCHEDULES", "CompileOptions"]

AUTO_SCHEDULES = ("1f1b", "interleaved", "zero-bubble", "zbv")
DEFAULT_SCHEDULES = ("1f1b", "gpipe")
COST_MODELS = ("roofline", "profile")
CAPTURES = ("auto", "module-placement")


@dataclass(frozen=True, kw_only=True)
class CompileOptions:
    devices: int
    spec: DeviceSpec  # the device the cost model prices
    microbatches: int | None  # None: the search's default
    training: bool
    memory_limit: float  # bytes per device
    schedules: tuple[str, ...]  # the schedules the search may choose from
    pipeline: int | None  # forced degrees (None: searched)
    tensor_parallel: int | None
    stages_per_device: int | None
    saved_plan: Plan | None  # a plan to apply instead of planning
    mincut: bool
    cost: str  # "roofline" | "profile"
    batch_dim: int | dict[str, int | None]
    recompute: str | None = None  # forced activation recomputation mode (plan.recompute.MODES); None: searched
    data_parallel: str | None = None  # forced data-parallel mode (plan.sharding.DP_MODES); None: searched
    overlap_grad_reduce: bool = True  # False: ddp / zero1 all-reduce after the backward (plan.sharding)
    sequence_parallel: bool | None = None  # tp's token-wise ops split over its ranks (plan.tensor_sequence)
    context_parallel: int | None = None  # ranks splitting every sequence (plan.context); None: searched; 1: none
    verbose: bool = True  # a progress line on a terminal for compiles over 2 s (partitioner.progress)
    capture: str = "auto"  # "auto": fx, export, module-level leaves, then module placement; or "module-placement"
    pad_gemms: bool = True  # pad tensor-core GEMMs with misaligned rows where the cost model says so (passes.align)
    master_weights: bool = False  # Adam's state priced as fp32 moments and masters (plan.graph.static_bytes_per_param)

    @classmethod
    def create(
        cls,
        *,
        devices: Any,
        device_type: str | DeviceSpec | None = None,
        microbatches: Any = None,
        training: bool = True,
        memory_limit: Any = None,
        schedule: str | None = None,
        pipeline: Any = None,
        tensor_parallel: Any = None,
        stages_per_device: Any = None,
        plan: Plan | str | None = None,
        mincut: bool = True,
        cost: str = "roofline",
        batch_dim: int | dict[str, int | None] = 0,
        recompute: str | None = None,
        data_parallel: str | None = None,
        overlap_grad_reduce: bool = True,
        sequence_parallel: bool | None = None,
        context_parallel: int | None = None,
        verbose: bool = True,
        capture: str = "auto",
        pad_gemms: bool = True,
        master_weights: bool | None = None,
    ) -> CompileOptions:
        """compile()'s arguments, checked and normalized (see compile's docstring for their meaning).

        Raises ValueError naming the option: counts that are not positive integers (NumPy integers are fine),
        degrees that do not divide `devices`, an unknown schedule or cost model, stages_per_device a schedule
        does not run, a memory limit that is no positive size ("80GB" is fine), a malformed batch_dim.
        """
        devices = positive_int("devices", devices)
        microbatches, pipeline, tensor_parallel, stages_per_device = (
            None if value is None else positive_int(name, value)
            for name, value in (
                ("microbatches", microbatches),
                ("pipeline", pipeline),
                ("tensor_parallel", tensor_parallel),
                ("stages_per_device", stages_per_device),
            )
        )
        for name, value in (("pipeline", pipeline), ("tensor_parallel", tensor_parallel)):
            if value is not None and devices % value:
                raise ValueError(f"{name}={value} does not divide devices={devices}")
        if pipeline and tensor_parallel and devices % (pipeline * tensor_parallel):
            raise ValueError(
                f"pipeline x tensor_parallel = {pipeline * tensor_parallel} does not divide devices={devices}"
            )
        if schedule is not None and schedule != "auto" and schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose 'auto' or one of {sorted(SCHEDULES)}")
        fixed = get_schedule(schedule).stages_per_rank if schedule in SCHEDULES else None
        if stages_per_device is not None and fixed is not None and stages_per_device != fixed:
            raise ValueError(
                f"schedule {schedule!r} runs exactly {fixed} stage{'s' if fixed > 1 else ''} per device; got "
                f"stages_per_device={stages_per_device}"
            )
        if cost not in COST_MODELS:
            raise ValueError(f"cost={cost!r}: choose one of {COST_MODELS}")
        if not (isinstance(batch_dim, dict) or (isinstance(batch_dim, int) and not isinstance(batch_dim, bool))):
            raise ValueError(f"batch_dim must be an int or a dict of input name -> dim (or None), got {batch_dim!r}")
        if recompute is not None and recompute not in MODES:
            raise ValueError(f"recompute={recompute!r}: choose one of {MODES}, or None to let each stage choose")
        if data_parallel is not None and data_parallel not in DP_MODES:
            raise ValueError(f"data_parallel={data_parallel!r}: choose one of {DP_MODES}, or None to search")
        if not overlap_grad_reduce and data_parallel is not None and data_parallel not in NON_OVERLAPPED_MODES:
            raise ValueError(
                f"overlap_grad_reduce=False means one gradient all-reduce after the backward, which only "
                f"{NON_OVERLAPPED_MODES} do; data_parallel={data_parallel!r} reduce-scatters during every backward"
            )
        if sequence_parallel is not None and not isinstance(sequence_parallel, bool):
            raise ValueError(f"sequence_parallel must be True, False or None (searched), got {sequence_parallel!r}")
        if sequence_parallel and tensor_parallel == 1:
            raise ValueError("sequence_parallel=True splits tensor parallelism's token-wise ops, but tensor_parallel=1")
        if context_parallel is not None and (
            isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1
        ):
            raise ValueError(f"context_parallel must be an int >= 1 or None (searched), got {context_parallel!r}")
        if capture not in CAPTURES:
            raise ValueError(f"capture={capture!r}: choose one of {CAPTURES}")
        saved = Plan.from_json(plan) if isinstance(plan, str) else plan
        if device_type is None:  # a saved plan is priced on its own device unless told otherwise
            spec = _saved_device(saved) if saved is not None and saved.device_type else get_device_spec("h100")
        else:
            spec = get_device_spec(device_type)
        if memory_limit is None and saved is not None and device_type is None:
            memory_limit = saved.memory_limit
        if master_weights is None:  # a saved plan is priced with its own optimizer state
            master_weights = saved.master_weights if saved is not None else False
        if not isinstance(master_weights, bool):
            raise ValueError(f"master_weights must be True, False or None, got {master_weights!r}")
        return cls(
            devices=devices,
            spec=spec,
            microbatches=microbatches,
            training=bool(training),
            memory_limit=memory_bytes(memory_limit) if memory_limit is not None else spec.usable_memory,
            schedules=AUTO_SCHEDULES if schedule == "auto" else DEFAULT_SCHEDULES if schedule is None else (schedule,),
            pipeline=pipeline,
            tensor_parallel=tensor_parallel,
            stages_per_device=stages_per_device,
            saved_plan=saved,
            mincut=mincut,
            cost=cost,
            batch_dim=batch_dim,
            recompute=recompute,
            data_parallel=data_parallel,
            overlap_grad_reduce=bool(overlap_grad_reduce),
            sequence_parallel=sequence_parallel,
            context_parallel=context_parallel,
            verbose=bool(verbose),
            capture=capture,
            pad_gemms=bool(pad_gemms),
            master_weights=master_weights,
        )


def _saved_device(saved: Plan) -> DeviceSpec:
    """The DeviceSpec a saved plan was priced on (its `device_type` record)."""
    try:
        return DeviceSpec.from_dict(saved.device_type)
    except TypeError as e:
        raise ValueError(
            f"the saved plan's device_type record is not a DeviceSpec ({e}): pass device_type= to price it on a preset"
        ) from None
