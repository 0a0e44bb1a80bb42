"""Partition a model whose forward branches and loops on tensor values, and train it: no graph holds such a forward,
so compile places its modules (module placement) and runs the model's own forward.

    python examples/control_flow.py                                  # in this process
    torchrun --nproc-per-node 2 examples/control_flow.py             # rank 0 runs the forward, rank 1 its stage

The same script either way: `cm.step` trains (every microbatch's forward, then every backward), `cm.make_optimizer`
builds each rank's optimizer, `cm.full_state_dict()` gathers the trained weights on rank 0, and the script checks
them against the plain model trained in one process on the same microbatches.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

import partitioner


class Gated(nn.Module):
    """Refines its hidden state until it settles (at most 4 times), then takes one of two heads by its sign."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.refine = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.positive, self.negative = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for _ in range(4):
            update = self.refine(h)
            if (update - h).abs().mean() < 0.1:  # a data-dependent trip count
                break
            h = 0.5 * (h + update)
        return self.positive(h) if h.mean() > 0 else self.negative(h)  # a data-dependent branch


def build() -> nn.Module:
    torch.manual_seed(0)
    return Gated()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--microbatches", type=int, default=2, help="default: %(default)s")
    args = parser.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    devices = max(world, 2)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 32, generator=g), torch.randn(8, 32, generator=g)

    model = build()
    cm = partitioner.compile(
        model, devices=devices, example_inputs=(x,), device_type="cpu", microbatches=args.microbatches,
        pipeline=devices, verbose=False,
    )  # fmt: skip
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(cm.plan.summary())
    opt = cm.make_optimizer(torch.optim.SGD, lr=0.1)
    losses = []
    for _ in range(args.steps):
        losses.append(float(cm.step((x,), y, nn.functional.mse_loss)))
        opt.step()
        cm.zero_grad()
    state = cm.full_state_dict()
    if not rank0:
        return

    plain = build()  # the same training on the plain model, one process, the same microbatches
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    expected = []
    for _ in range(args.steps):
        parts = [
            nn.functional.mse_loss(plain(a), b)
            for a, b in zip(x.tensor_split(args.microbatches), y.tensor_split(args.microbatches))
        ]
        for part in parts:
            (part / args.microbatches).backward()
        expected.append(float(torch.stack([p.detach() for p in parts]).mean()))
        plain_opt.step()
        plain_opt.zero_grad()
    worst = max(float((state[k] - v).abs().max()) for k, v in plain.state_dict().items())
    print(f"losses {[round(v, 6) for v in losses]}; the plain model's {[round(v, 6) for v in expected]}")
    print(f"largest weight difference from the plain model after {args.steps} steps: {worst:.2e}")
    if worst > 1e-5 or max(abs(a - b) for a, b in zip(losses, expected)) > 1e-5:
        raise SystemExit("the partitioned training differs from the plain model's")
    print("trained equal to the plain model")


if __name__ == "__main__":
    main()
