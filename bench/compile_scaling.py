"""Compile time against model depth and device count (issue #17: planning at thousands of devices in seconds).

    python bench/compile_scaling.py                                   # gpt3-175b's width, 24/48/96 layers, 8/64
    python bench/compile_scaling.py --layers 96 --devices 64 512 4096 # the issue's larger points (11, 16, 12 s here)

Each point builds a GPT-3-style model on the meta device (d_model and heads of --model, --layers layers), a batch of
4 x devices sequences of 2048 tokens, and times `partitioner.compile(model, devices=N)` with the full pp x tp x dp
search, printing the time per phase (capture, annotate, batch, plan, split) and the layout found. Times are this
machine's wall clock; compare points of one run, not runs of different machines.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0], where bench/kernels.py would shadow any top-level `kernels` (Hugging
# Face's, which transformers imports): import from the repo root (run from a checkout without installing).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import partitioner  # noqa: E402
import zoo  # noqa: E402


def compile_point(model_name: str, layers: int, devices: int, seq: int, sequence_parallel: bool | None) -> dict:
    """Compile one point; returns its wall time, phases and the layout found (or the error)."""
    with torch.device("meta"):
        model = zoo.get(model_name, n_layer=layers).to(torch.bfloat16)
    inputs = zoo.example_inputs(model_name, batch=4 * devices, device="meta", seq=seq)
    start = time.perf_counter()
    try:
        cm = partitioner.compile(model, devices=devices, example_inputs=inputs, sequence_parallel=sequence_parallel)
    except ValueError as e:
        return {"seconds": time.perf_counter() - start, "error": str(e).splitlines()[0][:160]}
    plan = cm.plan
    layout = (
        f"pp{plan.pipeline_degree} x tp{plan.tensor_degree} x dp{plan.data_degree}, {plan.microbatches} microbatches, "
        f"{plan.schedule}"
    )
    return {"seconds": time.perf_counter() - start, "phases": cm.compile_times, "layout": layout,
            "step": plan.predicted["step_time"]}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-175b", help="zoo GPT-3 size whose width is used (default: gpt3-175b)")
    parser.add_argument("--layers", type=int, nargs="+", default=[24, 48, 96], help="depths (default: 24 48 96)")
    parser.add_argument("--devices", type=int, nargs="+", default=[8, 64], help="device counts (default: 8 64)")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length (default: 2048)")
    parser.add_argument(
        "--sequence-parallel", choices=["on", "off", "both"], default="both",
        help="price tp layouts with sequence parallelism, without, or both (default: both)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    sp = {"on": True, "off": False, "both": None}[args.sequence_parallel]
    print(f"{'layers':>6s} {'devices':>7s} {'compile':>9s}  phases / layout")
    for layers in args.layers:
        for devices in args.devices:
            r = compile_point(args.model, layers, devices, args.seq, sp)
            if "error" in r:
                print(f"{layers:>6d} {devices:>7d} {r['seconds']:>8.1f}s  {r['error']}")
                continue
            phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items())
            print(f"{layers:>6d} {devices:>7d} {r['seconds']:>8.1f}s  {phases}; {r['layout']}, {r['step']:.3f} s/step")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
