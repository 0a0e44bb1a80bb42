"""Data parallelism for pipeline stages: torch's DDP or FSDP2 around each stage, as torch pipelining expects.

``torch.distributed.pipelining`` knows both wrappers: with a ``DistributedDataParallel`` stage it runs every
microbatch's backward but the last under ``no_sync`` and lets the last one all-reduce the accumulated
gradients (bucketed, overlapped with the rest of that backward); with a ``fully_shard`` (FSDP2) stage it
all-gathers parameters before each forward/backward, skips gradient sync until the schedule's final
``REDUCE_GRAD`` action, then reduce-scatters. Both average over the data-parallel group, so a step over dp
replicas equals one step over their concatenated batches.

Invariants:

* Parameters in ``exclude`` (tied weights: one Parameter may sit in two stages of one rank, or be owned by
  several pipeline ranks) are left out of both wrappers and stay plain tensors; the caller reduces their
  gradients itself (over the owners, then over dp), because two wrappers hooking one Parameter would reduce
  it twice, at the wrong times.
* Buffers are not synced each forward (DDP's ``forward_sync_buffers=False``): that would add a collective per
  microbatch, and the replicas start equal (same init or the same checkpoint); BatchNorm statistics are each
  replica's own, as with DDP's default off.
* FSDP shards are made from parameters that are already materialized on every replica (``fully_shard`` of a
  real module keeps this rank's dim-0 chunk and frees the rest): a stage's full weights exist transiently at
  start-up, never during training.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from partitioner.schedules import DATA_PARALLEL_MODES, get_schedule

__all__ = ["DATA_PARALLEL_MODES", "data_parallel_mode", "full_tensor", "load_into", "wrap_stage"]


def data_parallel_mode(requested: str | None, schedule: str) -> str:
    """The data-parallel wrapper for `schedule` (partitioner.schedules.Schedule.data_parallel_mode)."""
    return get_schedule(schedule).data_parallel_mode(requested)


def wrap_stage(module: nn.Module, mode: str, dp_mesh: DeviceMesh, exclude: Collection[nn.Parameter]) -> nn.Module:
    """`module` wrapped for data parallelism over the 1-D `dp_mesh`; `exclude` parameters are left out."""
    if mode not in DATA_PARALLEL_MODES:
        raise ValueError(f"data_parallel={mode!r}: choose one of {DATA_PARALLEL_MODES}")
    excluded = {id(p) for p in exclude}
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        names = [
            f"{prefix}.{name}" if prefix else name
            for prefix, sub in module.named_modules(remove_duplicate=False)
            for name, p in sub.named_parameters(recurse=False, remove_duplicate=False)
            if id(p) in excluded
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        if not any(p.requires_grad and id(p) not in excluded for p in module.parameters()):
            return module  # nothing for DDP to reduce (it refuses such a module)
        # Buffers are not broadcast each forward (torch >= 2.13 names that forward_sync_buffers).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(module, process_group=dp_mesh.get_group(), **no_buffer_sync)
    from torch.distributed.fsdp import fully_shard

    ignored = {p for p in module.parameters() if id(p) in excluded}
    return fully_shard(module, mesh=dp_mesh, ignored_params=ignored or None)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly FSDP-sharded tensor (collective over its mesh when it is a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def load_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the full value `src` into `dst`, a plain tensor or this rank's shard of a DTensor (no communication)."""
    with torch.no_grad():
        if isinstance(dst, DTensor):
            local = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
            dst.to_local().copy_(local.to_local())
        else:
            dst.copy_(src)
