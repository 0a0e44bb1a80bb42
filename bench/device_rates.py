"""Measure what the cost model assumes about a device: GEMM FLOP/s by shape, fused attention, streaming bandwidth and
the fixed cost of a kernel.

    python bench/device_rates.py                  # CUDA: the full sweep (~2 min on an H200), writes bench/results/
    python bench/device_rates.py --quick          # a few points of each kind (a smoke run; also on CPU)

The cost model (partitioner.cost, partitioner.devices) prices a node by the roofline: max(FLOPs / achievable FLOP/s,
bytes / achievable bandwidth) + a fixed cost per kernel. Which FLOP/s a GEMM reaches depends on its shape (tile and
wave quantization, a short reduction dim, a skinny output): these measurements are the data the shape-dependent
efficiency in devices.py is checked against. What is measured, each timed by triton.testing.do_bench (CUDA events,
median) on the current device:

    gemm        torch.mm in bf16 (and fp32 with / without TF32 on a subset): the three GEMMs of every projection of
                a transformer layer (forward x W^T, the input gradient dY W, the weight gradient dY^T x) at hidden
                sizes 1024-12288, tensor-parallel degrees 1-8 and 2k / 8k tokens; and log-uniform random shapes
                (a held-out set for checking a fitted curve). FLOPs = 2 M N K.
    attention   F.scaled_dot_product_attention (flash), bf16, causal or not, head dims 64 / 128, sequence 512-16k,
                forward and forward + backward; with a padding mask (the memory-efficient kernel) at 512 and 2k
                tokens. FLOPs = 4 b h s^2 d forward (half when causal), 2.5x that backward (flash attention's five
                matmuls against two, with the recomputed QK^T).
    stream      memory-bound kernels: add, gelu, layer_norm, softmax, copy at 1M-256M elements (bf16); bytes = what
                each reads and writes once.
    launch      the fixed cost of a kernel: a one-element add timed alone (GPU time per launch in a tight loop) and
                1000 of them issued from Python (host time per launch: what a graph of small ops pays).

Results: bench/results/device-rates-<device>-<date>.json (every point) and .md (a summary). Absolute numbers mean
something only on the GPU that produced them; the file records its name, torch and CUDA versions and the date.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def bench_ms(fn: Callable[[], Any], device: torch.device, rep_ms: float = 25.0) -> float:
    """Median milliseconds of one call of `fn` (CUDA events through do_bench; wall clock on a CPU)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    deadline = time.perf_counter() + rep_ms * 1e-3
    while len(times) < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def transformer_gemms(hidden: list[int], tp: list[int], tokens: list[int]) -> list[dict[str, Any]]:
    """(M, N, K) of the forward, input-gradient and weight-gradient GEMMs of a GPT layer's four projections."""
    shapes = []
    for h in hidden:
        for t in tp:
            for m in tokens:
                for proj, out, inp in (("qkv", 3 * h // t, h), ("proj", h, h // t), ("fc1", 4 * h // t, h),
                                       ("fc2", h, 4 * h // t)):  # fmt: skip
                    for grad, (mm, nn, kk) in (("fwd", (m, out, inp)), ("dgrad", (m, inp, out)),
                                               ("wgrad", (out, inp, m))):  # fmt: skip
                        shapes.append({"set": "transformer", "h": h, "tp": t, "tokens": m, "proj": proj,
                                       "pass": grad, "m": mm, "n": nn, "k": kk})  # fmt: skip
    return shapes


def random_gemms(count: int, seed: int, max_flops: float) -> list[dict[str, Any]]:
    """Log-uniform (M, N, K) in [16, 32768] with 2 M N K <= max_flops: the held-out set."""
    rng = random.Random(seed)
    shapes = []
    while len(shapes) < count:
        m, n, k = (int(round(2 ** rng.uniform(4, 15))) for _ in range(3))
        if 2 * m * n * k <= max_flops:
            shapes.append({"set": "random", "m": m, "n": n, "k": k})
    return shapes


def measure_gemm(shape: dict[str, Any], dtype: str, device: torch.device, tf32: bool = False) -> dict[str, Any]:
    m, n, k = shape["m"], shape["n"], shape["k"]
    a = torch.randn(m, k, device=device, dtype=DTYPES[dtype])
    b = torch.randn(k, n, device=device, dtype=DTYPES[dtype])
    torch.backends.cuda.matmul.allow_tf32 = tf32
    ms = bench_ms(lambda: torch.mm(a, b), device)
    torch.backends.cuda.matmul.allow_tf32 = False
    flops = 2.0 * m * n * k
    return {**shape, "dtype": "tf32" if tf32 else dtype, "ms": ms, "flops": flops, "tflops": flops / ms / 1e9,
            "bytes": float((m * k + k * n + m * n) * a.element_size())}  # fmt: skip


def measure_attention(
    b: int, h: int, s: int, d: int, causal: bool, mode: str, device: torch.device, masked: bool = False
) -> dict[str, Any]:
    """SDPA at (b, h, s, d); `masked`: with a boolean padding mask (b, 1, 1, s) as BERT passes one (the last eighth
    of every sequence masked out), which runs the memory-efficient kernel instead of flash."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q, k, v = (torch.randn(b, h, s, d, device=device, dtype=dtype, requires_grad=mode != "fwd") for _ in range(3))
    mask = None
    if masked:
        mask = torch.ones(b, 1, 1, s, device=device, dtype=torch.bool)
        mask[..., s - s // 8 :] = False
    if mode == "fwd":

        def run() -> None:
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    else:
        g = torch.randn(b, h, s, d, device=device, dtype=dtype)

        def run() -> None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
            torch.autograd.grad(out, (q, k, v), g)

    ms = bench_ms(run, device)
    fwd = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
    flops = fwd if mode == "fwd" else 3.5 * fwd
    return {"set": "attention", "b": b, "heads": h, "s": s, "d": d, "causal": causal, "masked": masked, "mode": mode,
            "dtype": str(dtype).removeprefix("torch."), "ms": ms, "flops": flops,
            "tflops": flops / ms / 1e9}  # fmt: skip


def measure_stream(op: str, numel: int, device: torch.device) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    x = torch.randn(numel // 1024, 1024, device=device, dtype=dtype)
    y = torch.randn_like(x)
    w = torch.ones(1024, device=device, dtype=dtype)
    runs: dict[str, tuple[Callable[[], Any], int]] = {  # the call and how many tensors of x's size it moves
        "add": (lambda: torch.add(x, y), 3),
        "gelu": (lambda: F.gelu(x), 2),
        "layer_norm": (lambda: F.layer_norm(x, (1024,), w, w), 2),
        "softmax": (lambda: torch.softmax(x, dim=-1), 2),
        "copy": (lambda: y.copy_(x), 2),
    }
    fn, tensors = runs[op]
    ms = bench_ms(fn, device)
    nbytes = float(tensors * x.numel() * x.element_size())
    return {"set": "stream", "op": op, "numel": x.numel(), "dtype": str(dtype).removeprefix("torch."), "ms": ms,
            "bytes": nbytes, "gbps": nbytes / ms / 1e6}  # fmt: skip


def measure_launch(device: torch.device) -> dict[str, Any]:
    x = torch.ones(1, device=device)
    gpu_us = bench_ms(lambda: x.add_(1), device) * 1e3
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    host = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(1000):
            x.add_(1)
        sync()
        host.append((time.perf_counter() - t0) * 1e3)  # ms per 1000 = us per launch
    return {"set": "launch", "gpu_us_per_kernel": gpu_us, "host_us_per_kernel": statistics.median(host)}


def sweep(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    cuda = device.type == "cuda"

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        rate = f"{row['tflops']:8.2f} TFLOP/s" if "tflops" in row else f"{row.get('gbps', 0):8.1f} GB/s"
        keys = ("set", "proj", "pass", "h", "tp", "m", "n", "k", "op", "numel", "b", "heads", "s", "d", "causal",
                "mode", "dtype")  # fmt: skip
        print(" ".join(f"{k}={row[k]}" for k in keys if k in row), f"{row.get('ms', 0):9.4f} ms", rate, flush=True)

    rows.append(measure_launch(device))
    print(rows[-1], flush=True)
    if quick:
        hidden, tps, tokens = [256], [1, 2], [128]
    else:
        hidden, tps, tokens = [1024, 2048, 4096, 8192, 12288], [1, 2, 4, 8], [2048, 8192]
    gemm_dtype = "bf16" if cuda else "fp32"
    for shape in transformer_gemms(hidden, tps, tokens):
        add(measure_gemm(shape, gemm_dtype, device))
    for shape in random_gemms(8 if quick else 160, seed=0, max_flops=2e9 if quick else 4e12):
        add(measure_gemm(shape, gemm_dtype, device))
    if cuda:  # fp32 on CUDA cores and on TF32 tensor cores, a subset
        for shape in transformer_gemms([2048, 8192], [1, 4], [4096]) + random_gemms(30, seed=1, max_flops=5e11):
            add(measure_gemm(shape, "fp32", device))
            add(measure_gemm(shape, "fp32", device, tf32=True))
    heads = 16
    for d in (64, 128) if not quick else (32,):
        for s in (512, 1024, 2048, 4096, 8192, 16384) if not quick else (128,):
            b = max(1, 16384 // s) if not quick else 1
            for causal in (True, False):
                for mode in ("fwd", "fwd+bwd"):
                    add(measure_attention(b, heads if not quick else 2, s, d, causal, mode, device))
            if quick or s in (512, 2048):  # a padding mask: the memory-efficient kernel (BERT's attention)
                for mode in ("fwd", "fwd+bwd"):
                    add(measure_attention(b, heads if not quick else 2, s, d, False, mode, device, masked=True))
    for op in ("add", "gelu", "layer_norm", "softmax", "copy"):
        for numel in (2**20, 2**23, 2**26, 2**28) if not quick else (2**16,):
            add(measure_stream(op, numel, device))
    return rows


def summary(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    """A markdown summary: GEMM TFLOP/s quantiles by set and dtype, attention and stream rates, launch cost."""
    lines = [f"# Device rates: {header['device']} ({header['date']})", "",
             f"torch {header['torch']}, CUDA {header['cuda']}; every point is in the .json beside this file.",
             ""]  # fmt: skip
    lines += ["| GEMMs | dtype | points | TFLOP/s min | median | max |", "|---|---|---|---|---|---|"]
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["set"] in ("transformer", "random"):
            groups.setdefault((r["set"], r["dtype"]), []).append(r["tflops"])
    for (name, dtype), vals in sorted(groups.items()):
        lines.append(f"| {name} | {dtype} | {len(vals)} | {min(vals):.1f} | {statistics.median(vals):.1f} | "
                     f"{max(vals):.1f} |")  # fmt: skip
    lines += ["", "| attention | causal | masked | d | s | TFLOP/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r["set"] == "attention":
            lines.append(f"| {r['mode']} | {r['causal']} | {r.get('masked', False)} | {r['d']} | {r['s']} | "
                         f"{r['tflops']:.1f} |")  # fmt: skip
    lines += ["", "| stream op | elements | GB/s |", "|---|---|---|"]
    for r in rows:
        if r["set"] == "stream":
            lines.append(f"| {r['op']} | {r['numel']} | {r['gbps']:.0f} |")
    launch = next(r for r in rows if r["set"] == "launch")
    lines += ["", f"Launch: {launch['gpu_us_per_kernel']:.2f} us of GPU time per tiny kernel, "
              f"{launch['host_us_per_kernel']:.2f} us of host time per launch from Python."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few points of each kind (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("bench/device_rates.py: the sweep needs a CUDA GPU; --quick runs a smoke sweep here", file=sys.stderr)
        return 2
    device = torch.device("cuda" if cuda else "cpu")
    now = dt.datetime.now(dt.timezone.utc)
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    header = {"device": name, "date": now.isoformat(timespec="seconds"), "torch": torch.__version__,
              "cuda": torch.version.cuda, "quick": args.quick}  # fmt: skip
    t0 = time.perf_counter()
    rows = sweep(device, args.quick)
    header["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"device-rates-{''.join(ch if ch.isalnum() else '_' for ch in name)}-{now:%Y%m%d-%H%M}"
    (args.out / f"{stem}.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(summary(rows, header))
    print(summary(rows, header))
    print(f"written: {args.out / stem}.{{md,json}} in {header['seconds']} s")
    return 0 if all(math.isfinite(r.get("ms", 0.0)) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
