"""Measured pipeline training steps on N local gloo processes, for bench/run.py --execute.

`measure(name, overrides, devices, batch, seq, microbatches, schedule)` compiles the zoo model for this
CPU (pipeline = devices), saves the plan, starts `devices` ranks (partitioner.launch.spawn, as torchrun
would), and each rank builds only its own stage from a meta model with the seeded deferred init
(partitioner.record_init), then times `steps` training steps of torch.distributed.pipelining after
`warmup` (barrier to barrier). Predictions for the same plan come two ways: the roofline on
`measure_cpu()` and profile mode (each node's forward and backward measured here, one thread as each
rank runs), both replayed by the schedule simulator.
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

__all__ = ["add_loss_cost", "measure", "rank_step_times", "time_loss"]


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


def rank_step_times(
    *, name: str, overrides: dict[str, Any], plan_path: str, batch: int, seq: int | None, steps: int, warmup: int,
    out: str,
) -> None:  # fmt: skip
    """Rank side: time training steps of the saved plan; rank 0 saves the per-step seconds to `out`."""
    from partitioner.runtime.distributed import DistributedPipeline

    extra = dict(overrides, **({"seq": seq} if seq is not None else {}))
    meta, init = partitioner.record_init(lambda: zoo.get(name, **overrides), seed=0)
    inputs = zoo.example_inputs(name, batch=batch, **extra)
    targets = zoo.example_targets(name, batch=batch, **extra)
    example = tuple(x.to("meta") for x in inputs)
    plan = Path(plan_path).read_text()
    cm = partitioner.compile(meta, devices=dist.get_world_size(), example_inputs=example, device_type="cpu", plan=plan)
    pipe = DistributedPipeline.from_compiled(cm, weights=init)
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
    from partitioner.annotate import annotate
    from partitioner.capture import capture
    from partitioner.cost import node_costs, profile_node_times
    from partitioner.launch import spawn
    from partitioner.plan.graph import build_planning_graph, price

    entry = zoo.entry(name)
    if entry.example_targets is None or entry.loss is None:
        raise ValueError(f"{name} defines no training targets and loss: it can only be executed in-process")
    extra = dict(overrides, **({"seq": seq} if seq is not None else {}))
    torch.set_num_threads(1)  # each rank runs one thread (OMP_NUM_THREADS=1 below)
    spec = partitioner.measure_cpu()
    torch.manual_seed(0)
    model = zoo.get(name, **overrides)
    inputs = zoo.example_inputs(name, batch=batch, **extra)
    cm = partitioner.compile(model, devices=devices, example_inputs=inputs, device_type=spec, pipeline=devices,
                             microbatches=microbatches, schedule=schedule)  # fmt: skip
    plan = cm.plan
    m = plan.microbatches

    # Profile mode: every node measured on one microbatch of real weights, scaled to the step.
    one = zoo.example_inputs(name, batch=max(batch // m, 1), **extra)
    cap = capture(model, one)
    flat = cap.flatten_inputs(one, {})
    annotate(cap.graph_module, flat, training=True)
    times = profile_node_times(cap.graph_module, flat, repeats=5, threads=1)
    pg = build_planning_graph(cap.graph_module, node_costs(cap.graph_module, spec, measured=times), spec, training=True)
    pg = add_loss_cost(pg, *time_loss(model, one, zoo.example_targets(name, batch=max(batch // m, 1), **extra),
                                      zoo.loss_fn(name)))  # fmt: skip
    scale = batch / max(batch // m, 1)
    pg = dataclasses.replace(pg, forward=pg.forward * scale, backward=pg.backward * scale,
                             out_bytes=pg.out_bytes * scale, saved_bytes=pg.saved_bytes * scale)  # fmt: skip
    stage_of = [plan.node_stage[n] for n in pg.names]
    _, sim = price(pg, stage_of, plan.num_stages, microbatches=m, schedule=plan.schedule, num_ranks=devices)
    profiled = sim.step_time

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
