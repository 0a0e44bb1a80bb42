"""Activation memory: what a plan prices against what the runtime keeps for backward, per model, measured.

    python bench/activation_memory.py                        # CUDA if there is one, else the CPU; bench/results/
    python bench/activation_memory.py --runs llama-small:4:512 gpt3-125m:4:1024

For each run (zoo preset, batch, sequence) it compiles on one device (devices=1, one microbatch; bf16 on CUDA, fp32
on a CPU) and runs one forward with gradients of (a) the model itself (eager) and (b) the compiled model's stage
module, what the runtime executes (gated activations fused: partitioner.gated), measuring what autograd keeps:

    CUDA   torch.cuda.memory_allocated after the forward, less before it, less the outputs
    CPU    the bytes of the distinct storages the saved-tensor hooks see (parameters and inputs left out)

against the plan's prediction for one microbatch (annotate's saved bytes, summed). The prediction prices the kernels a
GPU runs (SDPA's flash kernel, torch's fused RMSNorm); a CPU runs some as decompositions that keep more, so
measured / predicted is the memory model's check on a GPU, and on a CPU only the fused / eager ratio is.
Results: bench/results/activation-memory-<device>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# bench/kernels.py would shadow any top-level `kernels` (Hugging Face's, which transformers imports)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import partitioner  # noqa: E402
import zoo  # noqa: E402

RESULTS = ROOT / "bench" / "results"
# A Llama of a realistic width (GQA, SwiGLU at 3.5 d) that fits any GPU, and a GPT-3 (GELU MLP: nothing to fuse)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-small": (
        "llama-tiny",
        dict(n_layer=4, d_model=1024, n_head=16, n_kv_head=4, d_ff=3584, vocab_size=32000, n_ctx=4096),
    ),  # fmt: skip
}
DEFAULT_RUNS = ["llama-small:4:1024", "gpt3-125m:4:1024"]


def build(name: str, dtype: torch.dtype, device: str) -> torch.nn.Module:
    base, overrides = PRESETS.get(name, (name, {}))
    torch.manual_seed(0)
    return zoo.get(base, **overrides).to(device=device, dtype=dtype)


def kept_bytes(fn: Any, inputs: tuple, frozen: list[torch.Tensor]) -> int:
    """Bytes autograd keeps for backward while `fn(*inputs)` runs: on CUDA the allocator's growth less the outputs,
    elsewhere the distinct storages the saved-tensor hooks see, the tensors of `frozen` (state, inputs) left out."""
    if inputs[0].is_cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = fn(*inputs)
        torch.cuda.synchronize()
        outs = [t for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor)]
        return torch.cuda.memory_allocated() - before - sum(t.untyped_storage().nbytes() for t in outs)
    skip = {t.untyped_storage().data_ptr() for t in frozen}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def measure(run: str, device: str) -> dict[str, Any]:
    name, batch, seq = run.split(":")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(name, dtype, device)
    base, overrides = PRESETS.get(name, (name, {}))
    x = zoo.example_inputs(base, batch=int(batch), device=device, seq=int(seq), **overrides)
    cm = partitioner.compile(model, devices=1, example_inputs=x, microbatches=1, verbose=False,
                             device_type="h100" if device == "cuda" else "cpu")  # fmt: skip
    gm = cm.captured.graph_module
    predicted = sum(n.meta.get("saved_bytes", 0) for n in gm.graph.nodes)
    gated = sum("gated_activation" in n.meta for n in gm.graph.nodes)
    frozen = [*model.parameters(), *model.buffers(), *x]
    stage = cm.stages[0].module
    flat = cm.captured.flatten_inputs(x, {})
    eager = kept_bytes(model, x, frozen)
    runtime = kept_bytes(stage, tuple(flat), frozen)
    return {"run": run, "dtype": str(dtype).removeprefix("torch."), "gated_activations": gated,
            "predicted_bytes": predicted, "eager_bytes": eager, "runtime_bytes": runtime,
            "runtime_over_predicted": runtime / predicted, "runtime_over_eager": runtime / eager}  # fmt: skip


def report(rows: list[dict[str, Any]], device: str) -> str:
    columns = ["run", "dtype", "fused pairs", "predicted", "runtime kept", "eager kept", "runtime / predicted",
               "runtime / eager"]  # fmt: skip
    header = "| " + " | ".join(columns) + " |"
    lines = [f"# Activation memory on {device} ({dt.date.today()})", "", header, "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['dtype']} | {r['gated_activations']} | {r['predicted_bytes'] / 2**20:.1f} MiB "
                     f"| {r['runtime_bytes'] / 2**20:.1f} MiB | {r['eager_bytes'] / 2**20:.1f} MiB "
                     f"| {r['runtime_over_predicted']:.3f} | {r['runtime_over_eager']:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, help="model:batch:seq (zoo presets, llama-small)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = [measure(run, args.device) for run in args.runs]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    text = report(rows, name)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"activation-memory-{name.replace(' ', '_')}-{dt.date.today():%Y%m%d}"
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"device": name, "date": str(dt.date.today()), "rows": rows},
                                                      indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
