"""device: which device and collective backend a rank uses, and joining the world on them.

A rank runs on `cuda:LOCAL_RANK` with NCCL when CUDA is available, on the CPU with gloo otherwise; both can be
overridden (e.g. gloo on GPUs for debugging, or a CPU run on a GPU machine). Everything the runtime allocates
for a step (stage modules, microbatches, losses, the buffers of its own collectives) lives on that device, since
NCCL only moves CUDA tensors.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["backend_for", "init_process_group", "rank_device"]


def rank_device(device: torch.device | str | None = None) -> torch.device:
    """The device this rank computes on: `device` if given, else cuda:LOCAL_RANK when CUDA is available, else cpu."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} CUDA devices: launch at most that "
                f"many processes per node (torchrun --nproc-per-node), or pass device= explicitly"
            )
        return torch.device("cuda", local)
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA devices, gloo for the CPU (and anything else)."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(
    timeout_s: float = 60.0, backend: str | None = None, device: torch.device | str | None = None
) -> torch.device:
    """Join the default group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) if not joined yet,
    on `backend` (default: `backend_for` the rank's device). Returns the rank's device (CUDA: made current).

    `timeout_s` bounds every collective and p2p wait, so no rank hangs forever.
    """
    device = rank_device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = backend or backend_for(device)
        extra = {"device_id": device} if backend == "nccl" else {}  # NCCL: bind the communicator to this GPU
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **extra)
    return device
