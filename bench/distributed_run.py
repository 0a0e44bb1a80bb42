"""Measured pipeline training steps on N local gloo processes, for bench/run.py --execute.

`measure(name, overrides, devices, batch, seq, microbatches, schedule)` compiles the zoo model for this
CPU (pipeline = devices), saves the plan, starts `devices` ranks (partitioner.launch.spawn, as torchrun
would), and each rank builds only its own stage from a meta model with the seeded deferred init
(partitioner.record_init), then times `steps` training steps of torch.distributed.pipelining after
`warmup` (barrier to barrier). Predictions for the same plan come two ways: the roofline on
`measure_cpu(link=True)` and profile mode (each node's forward and backward measured here, one thread as each
rank runs), both replayed by the schedule simulator with sends holding their sender (gloo on a CPU) and the
tied-weight gradient all-reduce added (`predict_step`).
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import partitioner
import zoo

__all__ = ["add_loss_cost", "measure", "predict_step", "profiled_graph", "rank_step_times", "time_loss"]


def time_loss(model: torch.nn.Module, inputs: tuple, targets: torch.Tensor, loss_fn: Any, repeats: int = 10) -> tuple:
    """Median (forward, backward) seconds of `loss_fn` on the model's output for one microbatch.

    The loss runs on the last stage in every training step, outside the captured graph, so neither cost
    model sees it; the bench adds it to the node that produces the output (``add_loss_cost``).
    """
    with torch.no_grad():
        output = model(*inputs)
    fwds, bwds = [], []
    for _ in range(repeats + 1):
        out = output.detach().requires_grad_(True) if isinstance(output, torch.Tensor) else output
        t0 = time.perf_counter()
        loss = loss_fn(out, targets)
        t1 = time.perf_counter()
        loss.backward()
        fwds.append(t1 - t0)
        bwds.append(time.perf_counter() - t1)
    return statistics.median(fwds[1:]), statistics.median(bwds[1:])


def add_loss_cost(pg: Any, forward: float, backward: float) -> Any:
    """`pg` with the loss's seconds added to the last node that feeds the model output."""
    last = max(i for i, succ in enumerate(pg.succs) if pg.n in succ)
    fwd, bwd = pg.forward.copy(), pg.backward.copy()
    fwd[last] += forward
    bwd[last] += backward
    return dataclasses.replace(pg, forward=fwd, backward=bwd)


def profiled_graph(
    name: str, overrides: dict[str, Any], model: torch.nn.Module, spec: Any, *, batch: int, seq: int | None,
    microbatches: int, repeats: int = 10,
) -> Any:  # fmt: skip
    """Profile mode for a zoo model: a PlanningGraph of one training step priced by measurement here.

    Every node's forward and backward is measured on one microbatch of `model`'s real weights, one thread as
    each rank runs (``profile_node_times``, calibrated to the whole graph), the loss is added to the output
    node (``time_loss``), and times and bytes are scaled from one microbatch to the step.
    """
    from partitioner.annotate import annotate
    from partitioner.capture import capture
    from partitioner.cost import node_costs, profile_node_times
    from partitioner.plan.graph import build_planning_graph

    extra = dict(overrides, **({"seq": seq} if seq is not None else {}))
    rows = max(batch // microbatches, 1)
    one = zoo.example_inputs(name, batch=rows, **extra)
    cap = capture(model, one)
    flat = cap.flatten_inputs(one, {})
    annotate(cap.graph_module, flat, training=True)
    times = profile_node_times(cap.graph_module, flat, repeats=repeats, threads=1)
    pg = build_planning_graph(cap.graph_module, node_costs(cap.graph_module, spec, measured=times), spec, training=True)
    pg = add_loss_cost(pg, *time_loss(model, one, zoo.example_targets(name, batch=rows, **extra), zoo.loss_fn(name)))
    scale = batch / rows  # the graph's times are one call's: the fixed part once (plan.graph.PlanningGraph)
    fwd, bwd = pg.without_fixed()
    return dataclasses.replace(pg, forward=fwd * scale + pg.forward_fixed, backward=bwd * scale + pg.backward_fixed,
                               out_bytes=pg.out_bytes * scale, saved_bytes=pg.saved_bytes * scale)  # fmt: skip


def predict_step(
    pg: Any, stage_of: list[int], num_stages: int, *, microbatches: int, schedule: str, ranks: int
) -> float:
    """Predicted seconds of one training step: the replayed schedule, then the tied-weight gradient sync."""
    from partitioner.plan.graph import price, tied_sync_time

    _, sim = price(pg, stage_of, num_stages, microbatches=microbatches, schedule=schedule, num_ranks=ranks)
    return sim.step_time + tied_sync_time(pg, stage_of, sim.stage_to_rank)


def rank_step_times(
    *, name: str, overrides: dict[str, Any], plan_path: str, batch: int, seq: int | None, steps: int, warmup: int,
    out: str,
) -> None:  # fmt: skip
    """Rank side: time training steps of the saved plan; rank 0 saves the per-step seconds to `out`."""
    extra = dict(overrides, **({"seq": seq} if seq is not None else {}))
    meta, init = partitioner.record_init(lambda: zoo.get(name, **overrides), seed=0)
    inputs = zoo.example_inputs(name, batch=batch, **extra)
    targets = zoo.example_targets(name, batch=batch, **extra)
    example = tuple(x.to("meta") for x in inputs)
    plan = Path(plan_path).read_text()
    cm = partitioner.compile(meta, devices=dist.get_world_size(), example_inputs=example, device_type="cpu", plan=plan)
    pipe = cm.distributed(weights=init)
    loss_fn = zoo.loss_fn(name)
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        pipe.step(inputs, targets, loss_fn, broadcast_loss=False)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        pipe.zero_grad()
    pipe.close()
    if dist.get_rank() == 0:
        torch.save(times, out)


def measure(
    name: str, overrides: dict[str, Any], devices: int, batch: int, seq: int | None, *, microbatches: int | None,
    schedule: str | None, steps: int = 5, warmup: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Measured vs predicted step time of the planned split on `devices` gloo processes."""
    from partitioner.launch import spawn

    entry = zoo.entry(name)
    if entry.example_targets is None or entry.loss is None:
        raise ValueError(f"{name} defines no training targets and loss: it can only be executed in-process")
    extra = dict(overrides, **({"seq": seq} if seq is not None else {}))
    torch.set_num_threads(1)  # each rank runs one thread (OMP_NUM_THREADS=1 below)
    spec = partitioner.measure_cpu(link=True)
    torch.manual_seed(0)
    model = zoo.get(name, **overrides)
    inputs = zoo.example_inputs(name, batch=batch, **extra)
    cm = partitioner.compile(model, devices=devices, example_inputs=inputs, device_type=spec, pipeline=devices,
                             microbatches=microbatches, schedule=schedule)  # fmt: skip
    plan = cm.plan
    m = plan.microbatches

    pg = profiled_graph(name, overrides, model, spec, batch=batch, seq=seq, microbatches=m, repeats=5)
    stage_of = [plan.node_stage[n] for n in pg.names]
    profiled = predict_step(pg, stage_of, plan.num_stages, microbatches=m, schedule=plan.schedule, ranks=devices)

    with tempfile.TemporaryDirectory() as tmp:
        plan_path, out = str(Path(tmp) / "plan.json"), str(Path(tmp) / "times.pt")
        Path(plan_path).write_text(plan.to_json())
        kw = dict(name=name, overrides=overrides, plan_path=plan_path, batch=batch, seq=seq, steps=steps,
                  warmup=warmup, out=out)  # fmt: skip
        results = spawn("bench.distributed_run:rank_step_times", devices, kw, timeout=600,
                        env={"OMP_NUM_THREADS": "1"})  # fmt: skip
        failed = [r for r in results if r.returncode]
        if failed:
            raise RuntimeError(f"rank {failed[0].rank} failed: {failed[0].stderr[-2000:]}")
        measured = statistics.median(torch.load(out))
    roofline = plan.predicted["step_time"]
    return {
        "processes": devices, "schedule": plan.schedule, "microbatches": m, "measured_step_time": measured,
        "roofline_prediction": roofline, "profile_prediction": profiled,
        "measured_over_roofline": measured / roofline, "measured_over_profile": measured / profiled,
        "device": spec.source,
    }  # fmt: skip
