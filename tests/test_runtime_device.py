"""runtime.device (which device and backend a rank uses) and passes.retarget (a graph captured on one device runs
on another), on the CPU; the CUDA paths themselves are in tests/test_gpu.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.passes.retarget import retarget_devices
from partitioner.runtime.device import backend_for, rank_device


def test_rank_device_follows_cuda_and_local_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert rank_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_device() == torch.device("cuda", 1)
    assert rank_device("cpu") == torch.device("cpu")  # an explicit device wins
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK=2 but this node has 2 CUDA devices"):
        rank_device()


def test_backend_for_the_device() -> None:
    assert backend_for(torch.device("cuda", 0)) == "nccl"
    assert backend_for(torch.device("cpu")) == "gloo"


class BakesDevices(nn.Module):
    """A Python branch on a shape sends capture to torch.export (fx cannot branch on a proxy), which bakes the
    example's device (cpu) into `arange(..., device=x.device)` and `.to(x.device, ...)`."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            raise ValueError("2-D inputs")
        positions = torch.arange(x.shape[1], device=x.device)
        return self.lin(x) * mask.to(x.device, torch.float32).unsqueeze(-1)[:, :, 0] + positions


def test_retarget_points_every_baked_device_at_the_rank_s() -> None:
    x, mask = torch.randn(2, 4), torch.ones(2, 4, dtype=torch.long)
    captured = capture(BakesDevices(), (x, mask))
    gm = captured.graph_module
    baked = [n for n in gm.graph.nodes if any(isinstance(a, torch.device) for a in [*n.args, *n.kwargs.values()])]
    assert captured.method == "export" and baked
    assert retarget_devices(gm, "meta") >= len(baked)
    annotate(gm, [x, mask])
    (out,) = gm.to("meta")(torch.empty(2, 4, device="meta"), torch.empty(2, 4, dtype=torch.long, device="meta"))
    assert out.device.type == "meta"
    assert retarget_devices(gm, "meta") == 0  # nothing left to move
