"""The main benchmark: plan a zoo model, compare the plan with the splits people use today, predict.

    python bench/run.py --model gpt3-1.3b                    # 8 x h100, bf16, 1f1b
    python bench/run.py --model all --devices 8 --json       # every zoo model, a JSON per run
    python bench/run.py --model gpt3-tiny --execute          # also run it here and measure

Prints, per model, first the headline: what a user gets on --devices devices, our compile(devices=N)
recommendation (the pp x tp x dp search) against each tool at its best pipeline degree with the remaining
devices as data parallelism (DDP), and data parallelism alone; then the planner's quality on a fixed
pipeline (pp = devices): compile time by phase, the plan table, the predicted step time, throughput, model
FLOP utilization, bubble, peak memory per device against the limit, fallbacks; then every baseline
split (bench/baselines.py) priced by the same cost model and replayed by the same schedule simulator,
as predicted step time and its ratio to ours, each tool at its best microbatch count (every count that splits the
batch evenly, as its user would tune gradient accumulation; also in the headline); then the layout the pp x tp x
dp search picks for the same devices. Figures and their formulas:
    throughput      = batch x sequence tokens (or batch samples) / predicted step time
    MFU             = model FLOPs per step / (step time x devices x peak FLOP/s of the dtype),
                      model FLOPs = forward + backward FLOPs counted on the annotated graph
    perfect balance = the schedule replayed with every stage at total compute / stages, no
                      communication: no split of this model can beat it
    node-level bound = max(total compute / stages, the heaviest node's compute): no split's slowest
                      stage is below it (a node is never cut)
    node-level optimum = the least slowest stage (compute) of any contiguous split into the stages at the
                      positions a boundary may take, nodes whole (plan.pipeline.chain_floor, to 1e-4):
                      bottleneck / it says how much of the imbalance is the planner's and how much the
                      graph's (above 1 where the step, not the slowest stage, picked the split)
Each run writes a JSON per model (git commit, options, machine, every figure; bench/compare.py diffs two) and a
Gantt PNG of our plan's step, both named by model, devices and a UTC timestamp: into bench/results/ only with
--save (records to commit), otherwise into ~/.cache/partitioner/bench ($XDG_CACHE_HOME), or --out DIR.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
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
from bench.baselines import BASELINES, NotApplicable  # noqa: E402
from partitioner.plan.pipeline import node_level_optimum  # noqa: E402
from partitioner.plan.search import (  # noqa: E402
    Candidate,
    Degrees,
    microbatch_counts,
    price_candidate,
    scale_graph,
)
from partitioner.simulate import StageCost, in_flight_peaks, simulate  # noqa: E402
from partitioner.units import format_bytes, format_seconds  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"  # records kept in the repository (--save)


def default_out(save: bool) -> Path:
    """Where a run's JSON and Gantt go without --out: bench/results/ with --save, else the user's cache."""
    if save:
        return RESULTS
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "partitioner" / "bench"


SCHEDULE_CHOICES = ["gpipe", "1f1b", "interleaved", "looped-bfs", "zero-bubble", "zbv", "auto"]


def _git() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, check=True)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
    }


def _overrides(name: str, layers: int | None, width: int | None) -> dict[str, Any]:
    fields = zoo.entry(name).config
    out: dict[str, Any] = {}
    if layers is not None:
        if "n_layer" not in fields:
            raise SystemExit(f"--layers: {name} has no n_layer field (fields: {sorted(fields)})")
        out["n_layer"] = layers
    if width is not None:
        if "d_model" not in fields:
            raise SystemExit(f"--width: {name} has no d_model field (fields: {sorted(fields)})")
        out["d_model"] = width
        if "d_ff" in fields:
            out["d_ff"] = 4 * width
    return out


def _example(name: str, batch: int, seq: int | None, device: str, overrides: dict[str, Any]) -> tuple:
    kwargs = dict(overrides)
    if seq is not None:
        kwargs["seq"] = seq
    try:
        return zoo.example_inputs(name, batch=batch, device=device, **kwargs)
    except TypeError:  # a family without sequences (NCF, vision models)
        kwargs.pop("seq", None)
        return zoo.example_inputs(name, batch=batch, device=device, **kwargs)


def _default_seq(name: str) -> int | None:
    """The model's context: n_ctx, or max_positions less RoBERTa's padding offset (positions start after it)."""
    cfg = zoo.entry(name).config
    if cfg.get("n_ctx"):
        return cfg["n_ctx"]
    if cfg.get("max_positions"):
        offset = cfg.get("pad_token_id", 0) + 1 if cfg.get("roberta_positions") else 0
        return cfg["max_positions"] - offset
    return None


def _counts(batch: int, dp: int, requested: int | None) -> list[int]:
    """The microbatch counts a baseline is priced at: the requested one, else every count splitting a replica's
    batch into equal chunks (a user of the tool tunes its gradient accumulation; it gets its best)."""
    if requested is not None:
        return [requested]
    return microbatch_counts(batch // dp) if batch % dp == 0 else []


def _at_best_count(
    price: Callable[[int], dict[str, Any]], counts: list[int], limit: float = float("inf")
) -> dict[str, Any]:
    """The fastest of price(m) over the counts (its row, with "microbatches"), counts whose row peaks above `limit`
    (its "peak_memory") only where none fits; the last error if none prices."""
    best, error = None, ValueError("no microbatch count divides the batch")

    def rank(row: dict[str, Any]) -> tuple[bool, float]:
        return row.get("peak_memory", 0.0) > limit, row["step_time"]

    for m in counts:
        try:
            row = {**price(m), "microbatches": m}
        except ValueError as e:  # a schedule refusing the count (1F1B: fewer microbatches than stages)
            error = e
            continue
        if best is None or rank(row) < rank(best):
            best = row
    if best is None:
        raise error
    return best


def _price_split(layout: Candidate, stage_of: list[int], limit: float, m: int) -> dict[str, Any]:
    """A tool's split in `layout` (degrees, schedule, data-parallel mode) at m microbatches, fast-replayed as our
    search ranks candidates; ValueError where it does not fit `limit` bytes per device."""
    c = dataclasses.replace(layout, microbatches=m)
    flight = in_flight_peaks(c.schedule, c.degrees.pp, m, c.degrees.pp)
    price_candidate(c, stage_of, flight, c.graph.spec.devices_per_node, fast=True)
    if c.peak_memory > limit:  # a count that does not fit is no option
        raise ValueError(f"pp{c.degrees.pp} x dp{c.degrees.dp} peaks at {format_bytes(c.peak_memory)}")
    return {"step_time": c.step_time}


def _simulate(pg: Any, stage_of: list[int], stages: int, m: int, schedule: str, ranks: int) -> dict[str, float]:
    # Priced as the plan's own step is (plan.search.price_candidate): the replayed pipeline, then each rank's
    # tied-weight gradient sync and optimizer step (pp only, no dp).
    c = Candidate(Degrees(pp=ranks, tp=1, dp=1), m, schedule, stages // ranks, graph=pg)
    price_candidate(c, stage_of, in_flight_peaks(schedule, stages, m, ranks), pg.spec.devices_per_node)
    return {
        "step_time": c.step_time,
        "bubble_fraction": c.simulation.bubble_fraction,
        "bottleneck": max(s.time for s in c.metrics),
        "peak_memory": c.peak_memory,
        "stages_used": stages,
    }


def _tools_at(pg: Any, gm: Any, model: Any, devices: int, batch: int, schedule: str, limit: float,
              microbatches: int | None) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Each tool as a user would run it on `devices` devices: its own pipeline split at every pipeline degree pp
    dividing the devices, the remaining devices as data parallelism (DDP, the default of each tool's docs), priced
    like our plans at its best microbatch count; its fastest layout that fits. "data parallel only" is pp 1 (the
    same for every tool)."""
    out: dict[str, dict[str, Any]] = {}
    tools: dict[str, Any] = {"data parallel only": None, **BASELINES}
    for label, fn in tools.items():
        best: dict[str, Any] | None = None
        notes = []
        for pp in [d for d in range(1, devices + 1) if devices % d == 0]:
            if (fn is None) != (pp == 1):
                continue  # pp 1 is the data-parallel row; a tool's own rows split into pipelines
            dp = devices // pp
            counts = _counts(batch, dp, microbatches)
            if not counts:
                continue
            try:
                stage_of = [0] * pg.n if fn is None else fn(pg, gm, model, pp)
            except (NotApplicable, ValueError) as e:
                notes.append(str(e).splitlines()[0])
                continue
            used = max(stage_of) + 1  # a tool may leave stages empty: its ranks then idle
            g = scale_graph(pg, None, dp, "ddp" if dp > 1 else "", pp=used)
            c = Candidate(Degrees(pp=used, tp=1, dp=dp), 0, schedule if used == pp else "1f1b", 1,
                          data_parallel="ddp" if dp > 1 else "", graph=g)  # fmt: skip
            try:
                row = _at_best_count(functools.partial(_price_split, c, stage_of, limit), counts)
            except ValueError as e:
                notes.append(str(e).splitlines()[0])
                continue
            if best is None or row["step_time"] < best["step_time"]:
                best = {"pp": pp, "dp": dp, "microbatches": row["microbatches"], "stages_used": used,
                        "step_time": row["step_time"]}  # fmt: skip
        out[label] = best if best is not None else {"note": "; ".join(notes[:2]) or "no layout fits"}
    return out


def _perfect_balance(pg: Any, stages: int, m: int, schedule: str, ranks: int) -> dict[str, float]:
    fwd, bwd = float(pg.forward_at(m).sum()) / stages / m, float(pg.backward_at(m).sum()) / stages / m
    sim = simulate(
        [StageCost(forward=fwd, backward=bwd)] * stages, num_microbatches=m, schedule=schedule, num_ranks=ranks
    )
    # No split beats the even share of the work, nor the heaviest node (a node is never cut in two); no contiguous
    # split beats the least slowest stage over all of them at node granularity
    compute = pg.compute_at(m)
    node_level = max(float(compute.sum()) / stages, float(compute.max(initial=0.0)))
    node_optimum = node_level_optimum(pg, stages, microbatches=m)
    return {"step_time": sim.step_time, "bottleneck": float(compute.sum()) / stages, "node_level": node_level,
            "node_optimum": node_optimum}  # fmt: skip


def _throughput(name: str, inputs: tuple, step: float) -> tuple[float, str]:
    x = inputs[0]
    family = zoo.entry(name).family
    if family in ("gpt3", "bert", "roberta") and x.dim() == 2:
        return x.shape[0] * x.shape[1] / step, "tokens/s"
    return x.shape[0] / step, "samples/s"


def _execute(name: str, args: argparse.Namespace, overrides: dict[str, Any], devices: int) -> dict[str, Any]:
    """Run the model for real and time a training step against the predictions of the roofline on this
    CPU and of profile mode: on `devices` gloo processes (torch.distributed.pipelining, each rank
    building only its stage) when devices > 1 and the model has a training loss; otherwise all stages
    in this process, whose step is the sum of every node's time."""
    if devices > 1 and zoo.entry(name).loss is not None and zoo.entry(name).example_targets is not None:
        from bench.distributed_run import measure

        schedule = None if args.schedule == "auto" else args.schedule
        return measure(name, overrides, devices, args.batch, args.seq, microbatches=args.microbatches,
                       schedule=schedule)  # fmt: skip
    from partitioner.annotate import annotate
    from partitioner.capture import capture
    from partitioner.cost import profile_node_times

    torch.manual_seed(0)
    model = zoo.get(name, **overrides)
    inputs = _example(name, args.batch, args.seq, "cpu", overrides)
    spec = partitioner.measure_cpu()
    cm = partitioner.compile(
        model,
        devices=devices,
        example_inputs=inputs,
        device_type=spec,
        pipeline=devices,
        schedule=None if args.schedule == "auto" else args.schedule,
    )
    times = []
    for i in range(4):
        t0 = time.perf_counter()
        out = cm(*inputs)
        (out if isinstance(out, torch.Tensor) else torch.utils._pytree.tree_leaves(out)[0]).float().mean().backward()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    measured = statistics.median(times)
    # The local runtime runs stages one after another: its step is the sum of all node times.
    roofline = float(cm.planning_graph.compute.sum())
    cap = capture(model, inputs)
    annotate(cap.graph_module, list(cap.flatten_inputs(inputs, {})), training=True)
    prof = profile_node_times(cap.graph_module, list(cap.flatten_inputs(inputs, {})), repeats=3)
    profiled = sum(f + b for f, b in prof.values())
    return {
        "measured_step_time": measured, "roofline_prediction": roofline, "profile_prediction": profiled,
        "measured_over_roofline": measured / roofline, "measured_over_profile": measured / profiled,
        "device": spec.source, "processes": 1,
    }  # fmt: skip


def run_model(name: str, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """Plan one model, price ours and every baseline, print the report, write the JSON; return it."""
    overrides = _overrides(name, args.layers, args.width)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[
        args.dtype or ("fp32" if args.device_type == "cpu" else "bf16")
    ]
    seq = args.seq if args.seq is not None else _default_seq(name)
    with torch.device("meta"):
        model = zoo.get(name, **overrides).to(dtype)
    inputs = _example(name, args.batch, seq, "meta", overrides)
    inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    params = sum(p.numel() for p in model.parameters())
    schedule = None if args.schedule == "auto" else args.schedule
    kw = dict(device_type=args.device_type, microbatches=args.microbatches, training=True)

    t0 = time.perf_counter()
    ours = partitioner.compile(
        model, devices=args.devices, example_inputs=inputs, pipeline=args.devices, schedule=schedule or "1f1b", **kw
    )
    compile_total = time.perf_counter() - t0
    plan, pg, gm = ours.plan, ours.planning_graph, ours.captured.graph_module
    m, stages, sched = plan.microbatches, plan.num_stages, plan.schedule
    predicted = plan.predicted
    throughput, unit = _throughput(name, inputs, predicted["step_time"])

    baselines: dict[str, dict[str, Any]] = {}
    # Counts the fixed pipeline runs (torch's 1F1B takes no fewer microbatches than stages): a split leaving stages
    # empty would otherwise be compared as a shorter pipeline at fewer microbatches
    counts = [k for k in _counts(args.batch, 1, args.microbatches) if k >= stages or args.microbatches]
    for label, fn in BASELINES.items():
        try:
            stage_of = fn(pg, gm, model, stages)
            used = max(stage_of) + 1
            ranks = args.devices if used == stages else used
            schedule_used = sched if used == stages else "1f1b"
            price = functools.partial(_simulate, pg, stage_of, used, schedule=schedule_used, ranks=ranks)
            row = _at_best_count(price, counts, plan.memory_limit)
            row["ratio"] = row["step_time"] / predicted["step_time"]
            row["fits"] = row["peak_memory"] <= plan.memory_limit
        except (NotApplicable, ValueError) as e:
            row = {"note": str(e).splitlines()[0]}
        baselines[label] = row
    # One device at the plan's own count: the reference the pipeline's speedup is read against, not a tool's split
    single = {**_simulate(pg, [0] * pg.n, 1, m, "1f1b", 1), "microbatches": m}
    single["ratio"], single["fits"] = (
        single["step_time"] / predicted["step_time"],
        single["peak_memory"] <= plan.memory_limit,
    )
    baselines["single device"] = single
    bound = _perfect_balance(pg, stages, m, sched, args.devices)

    searched: dict[str, Any]
    try:
        t1 = time.perf_counter()
        found = partitioner.compile(
            model,
            devices=args.devices,
            example_inputs=inputs,
            schedule=args.schedule if args.schedule == "auto" else schedule,
            **kw,
        ).plan
        searched = {"pp": found.pipeline_degree, "tp": found.tensor_degree, "cp": found.context_degree,
                    "dp": found.data_degree, "data_parallel": found.data_parallel,
                    "microbatches": found.microbatches, "schedule": found.schedule, "compile_time":
                    time.perf_counter() - t1, **found.predicted}  # fmt: skip
    except ValueError as e:
        searched = {"note": str(e).splitlines()[0][:300]}
    tools = _tools_at(pg, gm, model, args.devices, args.batch, schedule or "1f1b", plan.memory_limit,
                      args.microbatches)  # fmt: skip
    for row in tools.values():
        if "step_time" in row and "step_time" in searched:
            row["ratio"] = row["step_time"] / searched["step_time"]

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{args.devices}dev-{args.device_type}-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
    gantt = None
    if args.gantt:
        gantt = _gantt(ours.simulation, out_dir / f"{stem}-gantt.png", f"{name} on {args.devices} x {args.device_type}")
    executed = _execute(name, args, _overrides(name, args.layers, args.width), args.devices) if args.execute else None

    valid = [r for r in baselines.values() if "step_time" in r]
    best_base = min(valid, key=lambda r: r["step_time"]) if valid else None
    best_label = next(k for k, r in baselines.items() if r is best_base) if best_base else None
    result = {
        "model": name, "params": params, "options": {k: v for k, v in vars(args).items() if k != "model"},
        "dtype": str(dtype).removeprefix("torch."), "seq": seq, "git": _git(), "machine": _machine(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "compile_time": compile_total, "compile_phases": ours.compile_times,
        "plan": {"devices": args.devices, "stages": stages, "microbatches": m, "schedule": sched,
                 "balance": plan.balance, "bottleneck": plan.bottleneck_time, "memory_limit": plan.memory_limit,
                 "peak_memory_per_stage": [s.peak_memory for s in plan.stages], "fallbacks": plan.fallbacks,
                 "capture": plan.capture},
        "predicted": {**predicted, "throughput": throughput, "throughput_unit": unit},
        "baselines": baselines, "perfect_balance": bound,
        "best_baseline": best_label,
        "speedup_over_best_baseline": best_base["step_time"] / predicted["step_time"] if best_base else None,
        "bottleneck_over_perfect_balance": plan.bottleneck_time / bound["bottleneck"],
        "bottleneck_over_node_level_bound": plan.bottleneck_time / bound["node_level"],
        "bottleneck_over_node_level_optimum": plan.bottleneck_time / bound["node_optimum"],
        "searched_layout": searched, "tools_at_devices": tools, "gantt": gantt, "execute": executed,
    }  # fmt: skip
    _print(result, plan)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(result, indent=1, sort_keys=True, default=str))
    result["json"] = str(path)
    print(f"results: {path}")
    if args.json:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return result


def _gantt(simulation: Any, path: Path, title: str) -> str:
    """Our plan's simulated step as a PNG at `path` (its path), or why it was not drawn."""
    from partitioner.gantt import plot_gantt

    try:
        return str(plot_gantt(simulation, path, title=f"{title}, {simulation.schedule}"))
    except ImportError:  # matplotlib is the bench extra's
        return "not drawn: it needs matplotlib (pip install -e '.[bench]')"


def _print(r: dict[str, Any], plan: partitioner.Plan) -> None:
    p = r["predicted"]
    print(f"\n=== {r['model']} ({r['params'] / 1e6:.1f}M parameters, {r['dtype']}, seq {r['seq']}) ===")
    _print_headline(r)
    print(
        "\n--- planner quality: every split on the same fixed pipeline (pp = devices, no data parallelism; "
        "each split at its best microbatch count) ---"
    )
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in r["compile_phases"].items())
    print(f"compile: {r['compile_time']:.2f} s ({phases})")
    print(plan.summary())
    print(
        f"\npredicted step time {format_seconds(p['step_time'])}; throughput {p['throughput']:,.0f} "
        f"{p['throughput_unit']}; MFU {p['mfu']:.1%}; bubble {p['bubble_fraction']:.1%}"
    )
    print(
        "peak memory per stage: "
        + ", ".join(format_bytes(x) for x in r["plan"]["peak_memory_per_stage"])
        + f" (limit {format_bytes(r['plan']['memory_limit'])})"
    )
    print("\nsplit                    predicted step   ratio to ours   microbatches   bottleneck      fits memory")
    print(
        f"{'ours':24s} {format_seconds(p['step_time']):>14s}   {1.0:>13.3f}   {r['plan']['microbatches']:>12d}   "
        f"{format_seconds(r['plan']['bottleneck']):>10s}      yes"
    )
    for label, row in r["baselines"].items():
        if "step_time" in row:
            used = "" if row["stages_used"] == r["plan"]["stages"] else f" ({row['stages_used']} stages used)"
            print(
                f"{label:24s} {format_seconds(row['step_time']):>14s}   {row['ratio']:>13.3f}   "
                f"{row['microbatches']:>12d}   {format_seconds(row['bottleneck']):>10s}      "
                f"{'yes' if row['fits'] else 'no'}{used}"
            )
        else:
            print(f"{label:24s} {'n/a':>14s}   ({row['note']})")
    b = r["perfect_balance"]
    print(
        f"{'perfect balance (bound)':24s} {format_seconds(b['step_time']):>14s}   "
        f"{b['step_time'] / p['step_time']:>13.3f}   {r['plan']['microbatches']:>12d}   "
        f"{format_seconds(b['bottleneck']):>10s}"
    )
    if r["speedup_over_best_baseline"]:
        speedup = r["speedup_over_best_baseline"]
        verdict = "as fast as" if abs(speedup - 1) < 5e-4 else "faster than" if speedup > 1 else "slower than"
        print(
            f"\nours is {speedup:.3f}x {verdict} the best baseline ({r['best_baseline']}; its step / ours); "
            f"bottleneck / perfect balance = {r['bottleneck_over_perfect_balance']:.3f}; "
            f"bottleneck / node-level optimum (the least slowest stage of any contiguous split, nodes whole) = "
            f"{r['bottleneck_over_node_level_optimum']:.3f}"
        )
    s = r["searched_layout"]
    if "step_time" in s:
        print(
            f"searched layout for {r['plan']['devices']} devices: pp{s['pp']} x tp{s['tp']}"
            + (f" x cp{s['cp']}" if s.get("cp", 1) > 1 else "")
            + f" x dp{s['dp']}{' ' + s['data_parallel'] if s.get('data_parallel') else ''}, "
            f"{s['microbatches']} microbatches, {s['schedule']}: {format_seconds(s['step_time'])} per step "
            f"({s['step_time'] / p['step_time']:.3f}x the pipeline-only plan), compiled in {s['compile_time']:.2f} s"
        )
    else:
        print(f"searched layout: {s['note']}")
    if r["execute"]:
        e = r["execute"]
        print(
            f"executed here on {e['processes']} process(es): {format_seconds(e['measured_step_time'])} per step "
            f"measured; predicted "
            f"{format_seconds(e['roofline_prediction'])} (roofline on this CPU, x{e['measured_over_roofline']:.2f}) "
            f"and {format_seconds(e['profile_prediction'])} (profile mode, x{e['measured_over_profile']:.2f})"
        )
    if r["gantt"]:
        print(f"gantt: {r['gantt']}")


def _print_headline(r: dict[str, Any]) -> None:
    """What a user gets on these devices: our compile(devices=N) recommendation against each tool at its best
    pipeline degree with the remaining devices as data parallelism. Every figure is predicted."""
    s, o = r["searched_layout"], r["options"]
    print(f"on {o['devices']} x {o['device_type']}, batch {o['batch']} (predicted by our cost model and simulator):")
    if "step_time" not in s:
        print(f"  ours: {s['note']}")
        return
    layout = f"pp{s['pp']} x tp{s['tp']} x dp{s['dp']}, {s['microbatches']} microbatches, {s['schedule']}"
    print(f"  {'ours: compile(devices=N)':42s} {format_seconds(s['step_time']):>10s}   {layout}")
    for label, row in r["tools_at_devices"].items():
        if "step_time" not in row:
            print(f"  {label:42s} {'n/a':>10s}   ({row['note'][:100]})")
            continue
        ratio = row["ratio"]
        slower = "slower" if ratio > 1 else "faster"
        verdict = "as fast as ours" if abs(ratio - 1) < 5e-4 else f"{ratio:.3f}x ours ({slower})"
        used = "" if row["stages_used"] == row["pp"] else f", {row['stages_used']} stages used"
        name = label if label == "data parallel only" else f"{label} at its best pp"
        print(f"  {name:42s} {format_seconds(row['step_time']):>10s}   pp{row['pp']} x dp{row['dp']}, "
              f"{row['microbatches']} microbatches{used}: {verdict}")  # fmt: skip


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", default="gpt3-1.3b", help="a zoo model name, or 'all' (default: gpt3-1.3b)")
    parser.add_argument("--devices", type=int, default=8, help="devices the pipeline splits over (default: 8)")
    parser.add_argument("--device-type", default="h100", choices=sorted(partitioner.PRESETS),
                        help="the device the cost model prices (default: h100)")  # fmt: skip
    parser.add_argument("--microbatches", type=int, default=None,
                        help="per step (default: the largest count <= 4 x stages dividing the batch)")  # fmt: skip
    parser.add_argument("--schedule", default="1f1b", choices=SCHEDULE_CHOICES,
                        help="the pipeline schedule of the fixed-pipeline table (default: 1f1b)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=32, help="samples per step (default: 32)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: the model's context)")
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on GPUs, fp32 on cpu")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--width", type=int, default=None, help="override the model width (d_ff = 4 x width)")
    parser.add_argument("--save", action="store_true",
                        help="write the JSON and Gantt into bench/results/, to commit as a record (default: the "
                             "user cache, ~/.cache/partitioner/bench)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None, help="write the JSON and Gantt here instead")
    parser.add_argument("--execute", action="store_true", help="also run the model here (use small --layers/--width)")
    parser.add_argument("--gantt", action=argparse.BooleanOptionalAction, default=True,
                        help="a PNG timeline of our plan's simulated step next to the JSON (default: on)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="also print the JSON to stdout")
    args = parser.parse_args(argv)

    names = zoo.names() if args.model == "all" else [args.model]
    for name in names:
        zoo.entry(name)  # unknown names fail before any work, with the close matches
    if len(names) > 1:
        from tqdm import tqdm

        names = tqdm(names, desc="models", file=sys.stderr)
    failures = []
    for name in names:
        try:
            run_model(name, args, args.out or default_out(args.save))
        except (ValueError, NotApplicable) as e:  # e.g. a model that does not fit: report, go on
            print(f"\n=== {name}: {e}")
            failures.append(name)
    return 1 if failures and len(failures) == (len(zoo.names()) if args.model == "all" else 1) else 0


if __name__ == "__main__":
    raise SystemExit(main())
