"""Measure the GPU memory no tensor accounts for: what `DeviceSpec.runtime_reserve` estimates.

    python bench/runtime_reserve.py                 # CUDA only; writes bench/results/runtime-reserve-<device>-<date>.*

A plan's default memory limit is `memory_bytes - runtime_reserve`: the device's total as the driver reports it, less
what the process holds outside torch's caching allocator (the CUDA context and its loaded modules, cuBLAS handles and
workspaces, NCCL's communicator buffers). This script measures both on the current GPU, one step at a time, as
`total - free - torch.cuda.memory_reserved()` from `torch.cuda.mem_get_info()` after each step:

    context     torch's CUDA context and one allocation
    gemm        bf16 matmuls forward and backward (cuBLAS / cuBLASLt handles and workspaces)
    attention   F.scaled_dot_product_attention (flash) forward and backward in bf16
    nccl        a one-rank NCCL process group and an all-reduce (a communicator and its buffers)
    groups      three more one-rank NCCL groups (tensor, pipeline, context parallel in a real run), an all-reduce each

What one GPU cannot show: a communicator with peers allocates buffers per channel and peer (NCCL_BUFFSIZE, 4 MiB by
default), which a one-rank group does not; the figure for `nccl` is a lower bound on a multi-GPU run's.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
GiB = 1024**3


def outside_allocator() -> dict[str, float]:
    """Bytes the process holds on the device outside torch's allocator, with the totals they are derived from."""
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved = torch.cuda.memory_reserved()
    return {
        "total": float(total),
        "free": float(free),
        "torch_reserved": float(reserved),
        "outside": float(total - free - reserved),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure() -> list[dict[str, object]]:
    """Each step's reading, in order; what is held outside the allocator only grows: a difference is what a step
    adds."""
    steps: list[dict[str, object]] = []

    def record(name: str) -> None:
        steps.append({"step": name, **outside_allocator()})

    torch.empty(1, device="cuda")
    record("context")
    for dtype in (torch.bfloat16, torch.float32):
        a = torch.randn(4096, 4096, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(4096, 4096, device="cuda", dtype=dtype, requires_grad=True)
        (a @ b).sum().backward()
        del a, b
    record("gemm")
    q, k, v = (torch.randn(4, 16, 2048, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    del q, k, v
    record("attention")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    x = torch.ones(1 << 20, device="cuda")
    dist.all_reduce(x)
    record("nccl")
    for _ in range(3):
        dist.all_reduce(x, group=dist.new_group([0]))
    record("groups")
    dist.destroy_process_group()
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("runtime_reserve.py measures a CUDA device; none is available", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    steps = measure()
    when = dt.datetime.now(dt.timezone.utc)
    lines = [
        f"# Memory outside torch's allocator: {name} ({when:%Y-%m-%dT%H:%M:%S}Z)",
        "",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}; total as the driver reports it: "
        f"{steps[0]['total'] / GiB:.2f} GiB. `outside` = total - free - torch's reserved, after each step.",
        "",
        "| step | outside GiB | added GiB | torch reserved GiB |",
        "|---|---|---|---|",
    ]
    previous = 0.0
    for step in steps:
        outside = float(step["outside"])  # type: ignore[arg-type]
        lines.append(
            f"| {step['step']} | {outside / GiB:.3f} | {(outside - previous) / GiB:+.3f} | "
            f"{float(step['torch_reserved']) / GiB:.3f} |"  # type: ignore[arg-type]
        )
        previous = outside
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"runtime-reserve-{name.replace(' ', '_')}-{when:%Y%m%d-%H%M}"
    record = {"device": name, "date": when.isoformat(), "torch": torch.__version__, "cuda": torch.version.cuda}
    (args.out / f"{stem}.json").write_text(json.dumps({**record, "steps": steps}, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
