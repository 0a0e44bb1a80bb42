"""plan.communicators: the NCCL communicators a rank of the distributed runtime holds, and the memory they take.

Each process group a rank joins gets an NCCL communicator of its own, and each takes device memory outside torch's
allocator (`DeviceSpec.communicator_memory`: 0.38 GiB on an H200 with NCCL 2.28, whatever NCCL_BUFFSIZE; devices.py).
A rank of pp x tp x cp x dp joins, as runtime.distributed builds its groups:

    the default group        bound to the rank's GPU when the process group starts (runtime.device)
    one group per mesh dim   "pp" always, "dp", "cp" and "tp" where their degree is above 1 (a mesh exists
                             once a second dim does; pipeline parallelism alone runs on the default group)
    "dp_cp"                  the flattened dp x cp group gradients are averaged over, when both are above 1
    HSDP's two               "dp_replicate" and "dp_shard" (runtime.data_parallel.hsdp_mesh)

except that torch's DeviceMesh reuses the default group for a dim (or a flattened group) that spans every rank,
and makes a one-rank group for a dim of size 1 (the "pp" of a layout without pipeline parallelism). Seen on gloo
(torch 2.13, 4 ranks): a (dp 2, pp 1, cp 2) mesh adds groups of 2, 1 and 2 ranks to the default one, its flattened
dp x cp (all four) none; tests/test_distributed.py checks the count against the groups a run makes.

One process (the embedded runtime, one device) holds none. Not counted: the group of the ranks that hold a tied
weight's copies (its stages are not known before the split; one communicator on those ranks only).
"""

from __future__ import annotations

__all__ = ["communicator_bytes", "rank_communicators"]

from partitioner.devices import DeviceSpec


def rank_communicators(pp: int, tp: int, cp: int, dp: int, data_parallel: str = "") -> int:
    """How many NCCL communicators each rank of a pp x tp x cp x dp layout holds (module docstring); `data_parallel`:
    the dp mode ("hsdp" adds its two groups)."""
    world = pp * tp * cp * dp
    if world == 1:
        return 0
    dims = [d for d in (dp, cp, tp) if d > 1]
    count = 1 + (sum(d != world for d in [pp, *dims]) if dims else 0)
    if dp > 1 and cp > 1 and dp * cp != world:
        count += 1
    if dp > 1 and data_parallel == "hsdp":
        count += 2
    return count


def communicator_bytes(spec: DeviceSpec, pp: int, tp: int, cp: int, dp: int, data_parallel: str = "") -> float:
    """Device bytes a rank's communicators take (`spec.communicator_memory` each)."""
    return spec.communicator_memory * rank_communicators(pp, tp, cp, dp, data_parallel)
