"""Cost-model fidelity on one GPU: the planner's predicted training step against a measured one, per zoo model.

    python bench/step_fidelity.py                          # CUDA: the default models, writes bench/results/
    python bench/step_fidelity.py --models gpt3-125m --steps 5

For each model (bf16 weights on the GPU, the batch and sequence given below) it compiles with devices=1 and
microbatches=1 for the preset of the device it runs on (H100 SXM -> "h100", H200 -> "h200"; --device-type to
choose), and reads the plan's prediction: the step, its forward + backward part (pipeline_time) and the optimizer
step, and the peak memory. Then it measures, median of --steps after 3 warm-up steps, CUDA-synchronized wall time:

    eager fwd+bwd     the original model: loss(model(x), y).backward()
    eager step        the same plus torch.optim.AdamW (foreach) step and zero_grad: what the prediction prices
    compiled step     the compiled model's step (cm.step, then its make_optimizer(AdamW) step and zero_grad), which
                      pads the GEMMs with misaligned rows (passes.align; predicted by the same compile), where the
                      eager model's prediction comes from a compile with pad_gemms=False
    peak memory       torch.cuda.max_memory_allocated over one eager step, parameters included

and prints measured / predicted for each. Results: bench/results/step-fidelity-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0]; there bench/kernels.py would shadow any top-level `kernels` (Hugging Face's,
# which transformers imports), so it goes and the repository root takes its place.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

# (model, batch, sequence): ~16k tokens per step for the GPTs, BERT at its 512 positions.
DEFAULT_RUNS = [
    ("gpt3-125m", 8, 2048),
    ("gpt3-350m", 8, 2048),
    ("gpt3-760m", 8, 2048),
    ("gpt3-1.3b", 8, 2048),
    ("gpt3-2.7b", 4, 2048),
    ("bert-large", 32, 512),
]


def _median_seconds(fn: Callable[[], None], steps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def node_category(node: Any) -> str:
    """ "gemm", "attention" or "other" (memory-bound: elementwise, norms, embedding, loss) for an fx node, as the cost
    model tells them apart (partitioner.cost)."""
    from partitioner.cost import attention_shape, matmul_form

    if attention_shape(node) is not None:
        return "attention"
    return "gemm" if matmul_form(node) is not None else "other"


def kernel_category(kernel: str) -> str:
    """The category of a CUDA kernel by its name: cuBLAS / CUTLASS GEMMs, flash / memory-efficient attention, the
    optimizer's multi-tensor kernels, everything else."""
    k = kernel.lower()
    if "flash" in k or "fmha" in k or "attention" in k:
        return "attention"
    if any(s in k for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas")):
        return "gemm"
    if "multi_tensor" in k or "adam" in k:
        return "optimizer"
    return "other"


def predicted_breakdown(cm: Any, spec: Any) -> dict[str, float]:
    """Seconds the cost model gives each category over one step (forward + backward of every node)."""
    from partitioner.cost import node_costs

    gm = cm.captured.graph_module
    costs = node_costs(gm, spec, training=True)
    out: dict[str, float] = {}
    for n in gm.graph.nodes:
        c = costs[n.name]
        if c.forward or c.backward:
            cat = node_category(n)
            out[cat] = out.get(cat, 0.0) + c.forward + c.backward
    return out


def measured_breakdown(step: Callable[[], None]) -> dict[str, Any]:
    """Seconds of GPU kernel time by category over one step (torch.profiler), the kernel count, and the 20 kernels
    that took the most time."""
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    out: dict[str, Any] = {"kernels": 0.0}
    top: list[tuple[float, str, int]] = []
    for e in prof.key_averages():
        us = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        if us <= 0:
            continue
        cat = kernel_category(e.key)
        out[cat] = out.get(cat, 0.0) + us * 1e-6
        out["kernels"] += e.count
        top.append((us * 1e-6, e.key[:120], e.count))
    # the kernels that took the most time, with their category: what a category's gap is made of
    out["top"] = [
        {"s": t, "kernel": k, "calls": c, "category": kernel_category(k)} for t, k, c in sorted(top, reverse=True)[:20]
    ]
    return out


def measure_model(
    name: str, batch: int, seq: int, device_type: str, steps: int, breakdown: bool = False
) -> dict[str, Any]:
    import partitioner
    import zoo

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = zoo.get(name).to(torch.bfloat16)
    x = tuple(t.cuda() for t in zoo.example_inputs(name, batch=batch, seq=seq))
    y = zoo.example_targets(name, batch=batch, seq=seq).cuda()
    loss_fn = zoo.loss_fn(name)

    t0 = time.perf_counter()
    cm = partitioner.compile(model, devices=1, example_inputs=x, device_type=device_type, microbatches=1,
                             verbose=False)  # fmt: skip
    compile_s = time.perf_counter() - t0
    padded = cm.plan.predicted  # with misaligned GEMMs padded (passes.align), as the compiled model runs
    # The eager model runs unpadded: its prediction comes from the same compile without padding.
    predicted = partitioner.compile(model, devices=1, example_inputs=x, device_type=device_type, microbatches=1,
                                    verbose=False, pad_gemms=False).plan.predicted  # fmt: skip

    def fwd_bwd() -> None:
        loss_fn(model(*x), y).backward()
        for p in model.parameters():
            p.grad = None

    opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)

    def eager_step() -> None:
        loss_fn(model(*x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    fwd_bwd_s = _median_seconds(fwd_bwd, steps)
    step_s = _median_seconds(eager_step, steps)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    eager_step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    opt.state.clear()  # the eager optimizer's moments, before the compiled step makes its own
    gc.collect()

    copt = cm.make_optimizer(torch.optim.AdamW, lr=1e-6, foreach=True)

    def compiled_step() -> None:
        cm.step(x, y, loss_fn)
        copt.step()
        cm.zero_grad()

    compiled_s = _median_seconds(compiled_step, steps)
    if breakdown:
        from partitioner.devices import get_device_spec

        copt.state.clear()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-6, foreach=True)
        predicted_parts = predicted_breakdown(cm, get_device_spec(device_type))
        measured_parts = measured_breakdown(eager_step)
    row = {
        "model": name, "batch": batch, "seq": seq, "params": sum(p.numel() for p in model.parameters()),
        "compile_s": compile_s,
        "predicted_step_s": predicted["step_time"], "predicted_fwd_bwd_s": predicted["pipeline_time"],
        "predicted_optimizer_s": predicted.get("optimizer_step", 0.0),
        "predicted_peak_bytes": predicted["peak_memory"],
        "measured_fwd_bwd_s": fwd_bwd_s, "measured_step_s": step_s, "measured_compiled_step_s": compiled_s,
        "padded_gemms": sorted(cm.plan.padded_gemms), "predicted_compiled_step_s": padded["step_time"],
        "measured_peak_bytes": peak,
    }  # fmt: skip
    if breakdown:
        row["predicted_parts_s"], row["measured_kernel_parts_s"] = predicted_parts, measured_parts
    row["step_ratio"] = step_s / row["predicted_step_s"]
    row["compiled_step_ratio"] = compiled_s / row["predicted_compiled_step_s"]
    row["fwd_bwd_ratio"] = fwd_bwd_s / row["predicted_fwd_bwd_s"]
    row["peak_ratio"] = peak / row["predicted_peak_bytes"]
    return row


def _markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"# Step fidelity: {header['device']} as {header['device_type']!r} ({header['date']})", "",
             f"torch {header['torch']}; bf16 weights, devices=1, microbatches=1; measured = median of "
             f"{header['steps']} steps (CUDA-synchronized wall time); ratio = measured / predicted.", "",
             "| model | batch x seq | predicted step ms | measured step ms | ratio | predicted fwd+bwd ms | "
             "measured fwd+bwd ms | ratio | predicted compiled step ms | compiled step ms | ratio | "
             "predicted peak GiB | measured peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['batch']} x {r['seq']} | error: {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['batch']} x {r['seq']} | {r['predicted_step_s'] * 1e3:.2f} | "
            f"{r['measured_step_s'] * 1e3:.2f} | {r['step_ratio']:.3f} | {r['predicted_fwd_bwd_s'] * 1e3:.2f} | "
            f"{r['measured_fwd_bwd_s'] * 1e3:.2f} | {r['fwd_bwd_ratio']:.3f} | "
            f"{r.get('predicted_compiled_step_s', float('nan')) * 1e3:.2f} | "
            f"{r['measured_compiled_step_s'] * 1e3:.2f} | "
            f"{r.get('compiled_step_ratio', float('nan')):.3f} | {r['predicted_peak_bytes'] / 2**30:.2f} | "
            f"{r['measured_peak_bytes'] / 2**30:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=[r[0] for r in DEFAULT_RUNS])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--breakdown", action="store_true", help="also GPU kernel time by category (torch.profiler)")
    parser.add_argument("--device-type", default=None, help="the preset to predict for (default: from the GPU name)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/step_fidelity.py: needs a CUDA GPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name()
    upper = name.upper()
    device_type = args.device_type or ("h200" if "H200" in upper else "h100" if "H100" in upper else "a100")
    runs = {r[0]: r for r in DEFAULT_RUNS}
    now = dt.datetime.now(dt.timezone.utc)
    header = {"device": name, "device_type": device_type, "date": now.isoformat(timespec="seconds"),
              "torch": torch.__version__, "steps": args.steps}  # fmt: skip
    rows = []
    for model in args.models:
        _, batch, seq = runs.get(model, (model, 8, 1024))
        try:
            row = measure_model(model, batch, seq, device_type, args.steps, args.breakdown)
        except Exception as e:  # one model's failure (memory, capture) is reported, the others still run
            row = {"model": model, "batch": batch, "seq": seq, "error": f"{type(e).__name__}: {e}"[:300]}
            gc.collect()
            torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        gc.collect()  # the model, its optimizers and the compiled model went with measure_model's frame
        torch.cuda.empty_cache()
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"step-fidelity-{''.join(ch if ch.isalnum() else '_' for ch in name)}-{now:%Y%m%d-%H%M}"
    (args.out / f"{stem}.json").write_text(json.dumps({**header, "rows": rows}, indent=1))
    (args.out / f"{stem}.md").write_text(_markdown(rows, header))
    print(_markdown(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
