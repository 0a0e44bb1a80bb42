"""Save a plan, compile again from it, and check the compiled model computes what the plain model does.

    python examples/reuse_saved_plan.py              # gpt3-tiny with real weights, 2 pipeline stages on this CPU

A plan is data: `cm.plan.to_json()` written once (say, after a long search) is applied later with
`partitioner.compile(..., plan=text)`, which skips the search and checks the plan fits the model.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

import partitioner
import zoo


def build(name: str) -> torch.nn.Module:
    """The zoo model with seeded weights, in eval mode (no dropout): every build is the same model."""
    torch.manual_seed(0)
    return zoo.get(name).eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt3-tiny", help="a small zoo model (default: %(default)s)")
    parser.add_argument("--devices", type=int, default=2, help="pipeline stages (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="default: %(default)s")
    args = parser.parse_args(argv)

    x = zoo.example_inputs(args.model, batch=args.batch)
    first = partitioner.compile(
        build(args.model), devices=args.devices, example_inputs=x, device_type="cpu", pipeline=args.devices
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(first.plan.to_json())
        print(f"compiled {args.model}: {first.plan.num_stages} stages; plan saved to {path} ({path.stat().st_size} B)")
        text = path.read_text()

    model = build(args.model)  # a fresh build, as a later run would make
    cm = partitioner.compile(model, devices=args.devices, example_inputs=x, device_type="cpu", plan=text)
    assert cm.plan == first.plan, "the plan compiled from the saved JSON differs from the saved one"
    print(f"compiled again from the saved plan: stages own {[len(s.nodes) for s in cm.plan.stages]} nodes")

    with torch.no_grad():
        expected, got = model(*x), cm(*x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    print(f"forward on {tuple(x[0].shape)} inputs: outputs equal the plain model's (max abs difference "
          f"{(got - expected).abs().max().item():.1e})")  # fmt: skip


if __name__ == "__main__":
    main()
