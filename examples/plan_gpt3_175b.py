"""Plan GPT-3 175B for 64 H100s on the meta device (no weights allocated) and print the plan's summary.

    python examples/plan_gpt3_175b.py                                        # about 20 s on 2 cores
    python examples/plan_gpt3_175b.py --model gpt3-1.3b --devices 8 --batch 16   # a smaller run, seconds
    python examples/plan_gpt3_175b.py --model gpt3-13b --seq 65536 --batch 16    # long context: context parallel

The same as `partitioner plan gpt3-175b --devices 64 --batch 256 --seq 2048` (README: Use).
"""

from __future__ import annotations

import argparse
import time

import torch

import partitioner
import zoo


def plan(model_name: str, devices: int, batch: int, seq: int, device_type: str) -> partitioner.Plan:
    """Build `model_name` in bf16 on the meta device, compile it for `devices` x `device_type`, return the plan."""
    with torch.device("meta"):
        model = zoo.get(model_name)
        if seq > model.cfg.n_ctx:  # a longer context than the paper's: a position for every token
            model = zoo.get(model_name, n_ctx=seq)
        model = model.to(torch.bfloat16)
    x = (torch.empty(batch, seq, dtype=torch.long, device="meta"),)  # token ids
    return partitioner.compile(model, devices=devices, example_inputs=x, device_type=device_type).plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt3-175b", choices=zoo.names("gpt3"), help="default: %(default)s")
    parser.add_argument("--devices", type=int, default=64, help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=256, help="global batch (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default: %(default)s)")
    parser.add_argument("--device-type", default="h100", choices=sorted(partitioner.PRESETS), help="default: h100")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    result = plan(args.model, args.devices, args.batch, args.seq, args.device_type)
    print(result.summary())
    print(f"\nplanned {args.model} for {args.devices} x {args.device_type} in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
