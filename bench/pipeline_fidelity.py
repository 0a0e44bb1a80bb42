"""Simulator fidelity on a real pipeline: predicted vs measured step time of 2 gloo processes on this CPU.

    OMP_NUM_THREADS=1 python bench/pipeline_fidelity.py                 # 3 rounds, writes bench/results/
    OMP_NUM_THREADS=1 python bench/pipeline_fidelity.py --rounds 1 --no-write

The model is gpt3-tiny resized so that compute dominates (4 blocks of width 256, vocabulary 512, batch 16 x 128
tokens, 4 microbatches, 1f1b). The splits: the one the planner picks for this machine, and every hand-placed split
at a block boundary (what a user of torch.distributed.pipelining or DeepSpeed would write).

For every split, in every round:
    predicted (roofline)  the schedule replayed (``bench.distributed_run.predict_step``: sends hold their sender,
                          as gloo's copies take the CPU; then the tied-weight gradient sync) with node times from
                          the roofline on ``measure_cpu(link=True)``
    predicted (profile)   the same with profile-mode node times (every node's forward and backward measured on one
                          microbatch, one thread, calibrated to the whole graph, loss included), measured just before
                          this split runs, so that machine drift (boost clocks, neighbours) hits both alike
    measured              median wall time of ``--steps`` training steps on 2 gloo processes, each one thread,
                          barrier to barrier, each rank holding only its own stage (``DistributedPipeline``)
    throughput            batch x sequence / measured step time (tokens/s)
A single-process run of the whole model (one thread, same microbatches and loss) runs first: it is the baseline
and it brings the machine to its steady clock before anything is timed.
Results go to bench/results/pipeline-fidelity-<machine>-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0], where bench/kernels.py would shadow any top-level `kernels` (Hugging
# Face's, which transformers imports): import from the repo root (run from a checkout without installing).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import partitioner  # noqa: E402
import zoo  # noqa: E402
from bench.distributed_run import predict_step, profiled_graph  # noqa: E402
from partitioner.launch import spawn  # noqa: E402

__all__ = ["MODEL", "main", "splits"]

RESULTS = Path(__file__).resolve().parent / "results"
MODEL = dict(n_layer=4, d_model=256, n_head=4, vocab_size=512, n_ctx=128)  # gpt3-tiny resized: compute-bound


def splits(pg: Any, plan: partitioner.Plan) -> dict[str, list[int]]:
    """Stage of every planned node for the planned split and each hand-placed block-boundary split."""
    out = {"planned": [plan.node_stage[n] for n in pg.names]}
    layers = MODEL["n_layer"]
    for k in range(1, layers):
        cut = next(i for i, n in enumerate(pg.names) if n.startswith(f"h_{k}_"))
        out[f"blocks 0-{k - 1} / {k}-{layers - 1}"] = [0] * cut + [1] * (pg.n - cut)
    return out


def _with_split(plan: partitioner.Plan, names: list[str], stage_of: list[int]) -> partitioner.Plan:
    node_stage = dict(zip(names, stage_of))
    stages = [dataclasses.replace(st, nodes=[n for n in names if node_stage[n] == st.index]) for st in plan.stages]
    return dataclasses.replace(plan, node_stage=node_stage, stages=stages)


def _single_process(batch: int, seq: int, microbatches: int, steps: int, warmup: int) -> float:
    """Median seconds of one training step of the whole model here (one thread), microbatched like the pipeline."""
    torch.manual_seed(0)
    net = zoo.get("gpt3-tiny", **MODEL)
    x = zoo.example_inputs("gpt3-tiny", batch=batch, seq=seq, **MODEL)[0]
    y = zoo.example_targets("gpt3-tiny", batch=batch, seq=seq, **MODEL)
    loss_fn = zoo.loss_fn("gpt3-tiny")
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        for xs, ys in zip(x.chunk(microbatches), y.chunk(microbatches)):
            (loss_fn(net(xs), ys) / microbatches).backward()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        net.zero_grad()
    return statistics.median(times)


def _measure(plan: partitioner.Plan, batch: int, seq: int, steps: int, warmup: int) -> float:
    """Median seconds of a training step of `plan` on 2 gloo processes (bench.distributed_run.rank_step_times)."""
    with tempfile.TemporaryDirectory() as tmp:
        plan_path, out = f"{tmp}/plan.json", f"{tmp}/times.pt"
        Path(plan_path).write_text(plan.to_json())
        kw = dict(name="gpt3-tiny", overrides=MODEL, plan_path=plan_path, batch=batch, seq=seq, steps=steps,
                  warmup=warmup, out=out)  # fmt: skip
        results = spawn("bench.distributed_run:rank_step_times", 2, kw, timeout=600, env={"OMP_NUM_THREADS": "1"})
        failed = [r for r in results if r.returncode]
        if failed:
            raise RuntimeError(f"rank {failed[0].rank} failed:\n{failed[0].stderr[-2000:]}")
        return statistics.median(torch.load(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per split and round")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="every split is predicted and measured once per round")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1)
    b, s, m = args.batch, args.seq, args.microbatches

    single = _single_process(b, s, m, args.steps, args.warmup)
    spec = partitioner.measure_cpu(link=True)
    with torch.device("meta"):
        meta = zoo.get("gpt3-tiny", **MODEL)
    example = zoo.example_inputs("gpt3-tiny", batch=b, seq=s, device="meta", **MODEL)
    cm = partitioner.compile(meta, devices=2, example_inputs=example, device_type=spec, microbatches=m,
                             schedule="1f1b", pipeline=2, tensor_parallel=1)  # fmt: skip
    pg, plan = cm.planning_graph, cm.plan
    candidates = splits(pg, plan)
    print(f"gpt3-tiny resized {MODEL}, batch {b} x seq {s}, {m} microbatches, 1f1b, 2 gloo ranks, 1 thread each")
    print(f"device: {spec.source}; {spec.peak_flops['float32'] / 1e9:.1f} GFLOP/s fp32")
    first = next(n for n, st in plan.node_stage.items() if st == 1)
    print(f"planned split: stage 1 starts at {first!r}; stage 0 sends {cm.stages[0].output_names}")
    print(f"single process, 1 thread: {single:.3f} s/step, {b * s / single:.0f} tokens/s")
    print(f"{'round':5s} {'split':22s} {'roofline s':>10s} {'profile s':>9s} {'measured s':>10s} {'meas/roof':>9s} "
          f"{'meas/prof':>9s} {'tokens/s':>9s}")  # fmt: skip

    rows = []
    for r in range(args.rounds):
        for name, stage_of in candidates.items():
            torch.manual_seed(0)
            real = zoo.get("gpt3-tiny", **MODEL)
            profiled = profiled_graph("gpt3-tiny", MODEL, real, spec, batch=b, seq=s, microbatches=m)
            assert profiled.names == pg.names
            roof = predict_step(pg, stage_of, 2, microbatches=m, schedule="1f1b", ranks=2)
            prof = predict_step(profiled, stage_of, 2, microbatches=m, schedule="1f1b", ranks=2)
            measured = _measure(_with_split(plan, pg.names, stage_of), b, s, args.steps, args.warmup)
            row = dict(round=r, split=name, roofline_s=roof, profile_s=prof, measured_s=measured,
                       measured_over_roofline=measured / roof, measured_over_profile=measured / prof,
                       tokens_per_s=b * s / measured)  # fmt: skip
            rows.append(row)
            print(f"{r:5d} {name:22s} {roof:10.3f} {prof:9.3f} {measured:10.3f} {measured / roof:9.2f} "
                  f"{measured / prof:9.2f} {b * s / measured:9.0f}", flush=True)  # fmt: skip

    summary = _summary(rows, list(candidates))
    print("\n" + summary)
    if not args.no_write:
        _write(args, spec, single, plan, rows, summary)
    return 0


def _summary(rows: list[dict[str, Any]], names: list[str]) -> str:
    """Per split: the range of measured / profile-predicted over the rounds, and the median throughput."""
    lines = ["| split | measured / profile | measured / roofline | tokens/s (median) |", "|---|---|---|---|"]
    for name in names:
        mine = [r for r in rows if r["split"] == name]
        prof = [r["measured_over_profile"] for r in mine]
        roof = [r["measured_over_roofline"] for r in mine]
        tps = statistics.median(r["tokens_per_s"] for r in mine)
        lines.append(f"| {name} | {min(prof):.2f}-{max(prof):.2f} | {min(roof):.2f}-{max(roof):.2f} | {tps:.0f} |")
    ratios = [r["measured_over_profile"] for r in rows]
    lines.append(f"\nall {len(rows)} measurements: measured / profile {min(ratios):.2f}-{max(ratios):.2f}")
    return "\n".join(lines)


def _write(args: argparse.Namespace, spec: Any, single: float, plan: Any, rows: list, summary: str) -> None:
    stamp = datetime.now(timezone.utc)
    stem = args.out / f"pipeline-fidelity-{platform.machine()}-{stamp:%Y%m%d}"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": stamp.isoformat(timespec="seconds"), "machine": platform.processor() or platform.machine(),
        "cpus": __import__("os").cpu_count(), "torch": torch.__version__, "device": spec.source,
        "model": MODEL, "batch": args.batch, "seq": args.seq, "microbatches": args.microbatches,
        "steps": args.steps, "rounds": args.rounds, "single_process_s": single,
        "planned_split_sends": [st.send_bytes for st in plan.stages],
    }  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    head = (f"# Pipeline fidelity, 2 gloo processes, {meta['cpus']} CPUs, {meta['date']}\n\n"
            f"`OMP_NUM_THREADS=1 python bench/pipeline_fidelity.py` (torch {torch.__version__}; {spec.source}).\n"
            f"Single process, 1 thread: {single:.3f} s/step.\n\n")  # fmt: skip
    stem.with_suffix(".md").write_text(head + summary + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    raise SystemExit(main())
