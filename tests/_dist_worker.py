"""Rank-side functions for tests/test_distributed.py, run by ``partitioner.launch.spawn`` (one process per rank).

Every function builds the zoo model on the meta device (``record_init``: nothing real is allocated outside
this rank's shard), plans or re-applies a plan, trains with ``DistributedPipeline`` and, on rank 0, writes what
the test compares to `out` (``torch.save``).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import torch
import torch.distributed as dist

import partitioner
import zoo
from partitioner.runtime.materialize import record_init


def _compiled(model: str, stages: int, batch: int, microbatches: int, schedule: str, seed: int, plan: str | None):
    """Meta model + its recorded init, compiled to `stages` pipeline stages (no tensor/data parallelism)."""
    meta, init = record_init(lambda: zoo.get(model), seed=seed)
    ranks = stages if schedule in ("gpipe", "1f1b") else stages // 2  # multi-stage schedules: 2 stages per rank
    cm = partitioner.compile(
        meta,
        devices=ranks,
        example_inputs=zoo.example_inputs(model, batch=batch, device="meta"),
        device_type="cpu",
        microbatches=microbatches,
        schedule=schedule,
        pipeline=ranks,
        tensor_parallel=1,
        stages_per_device=stages // ranks,
        plan=plan,
    )
    assert cm.plan.num_stages == stages, (cm.plan.num_stages, stages)
    return cm, init


def train(
    *,
    model: str,
    stages: int,
    schedule: str = "1f1b",
    microbatches: int = 4,
    batch: int = 8,
    steps: int = 3,
    lr: float = 0.1,
    seed: int = 0,
    out: str | None = None,
    plan_path: str | None = None,
    save_plan: str | None = None,
    checkpoint: bool = False,
    fail_rank: int | None = None,
    fail_step: int | None = None,
    fail_mode: str = "raise",
    plan_tamper_rank: int | None = None,
    load_path: str | None = None,
    heartbeat_timeout: float = 10.0,
    grace: float = 5.0,
    hang_s: float = 12.0,
    dp: int = 1,
    data_parallel: str | None = None,
    accumulate: int = 1,
    calls: list[dict[str, int]] | None = None,
) -> None:
    """Train `steps` SGD steps of zoo `model` on the pipeline; rank 0 saves losses and the full state dict."""
    rank = dist.get_rank()
    plan = open(plan_path).read() if plan_path else None
    mesh = None
    if dp > 1:  # rows are pipelines, columns data-parallel replicas; replica d trains on rows [d*batch, (d+1)*batch)
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dp, dist.get_world_size() // dp), mesh_dim_names=("dp", "pp"))
    cm, init = _compiled(model, stages, batch, microbatches, schedule, seed, plan)
    if plan_tamper_rank == rank:  # a rank started with a different plan (another microbatch count)
        cm, init = _compiled(model, stages, batch, microbatches * 2, schedule, seed, None)
    if save_plan and rank == 0:
        with open(save_plan, "w") as f:
            f.write(cm.plan.to_json())
    # Weights: replayed seeded init, or a checkpoint by original names (read lazily: only this rank's entries).
    weights = torch.load(load_path, mmap=True) if load_path else init
    pipe = cm.distributed(
        weights=weights,
        schedule=schedule,
        checkpoint=checkpoint,
        heartbeat_timeout=heartbeat_timeout,
        grace=grace,
        mesh=mesh,
        data_parallel=data_parallel,
    )
    materialized = sum(t.numel() for t in pipe.state_dict().values() if not t.is_meta)
    opt = torch.optim.SGD(pipe.parameters(), lr=lr)
    replica = mesh.get_local_rank("dp") if mesh is not None else 0
    rows = slice(replica * batch, (replica + 1) * batch)
    inputs = tuple(x[rows] for x in zoo.example_inputs(model, batch=batch * dp))
    targets = zoo.example_targets(model, batch=batch * dp)[rows]
    loss_fn = zoo.loss_fn(model)
    step = [0]

    if fail_rank == rank:

        def fail(module: Any, args: Any) -> None:
            if step[0] == fail_step:
                if fail_mode == "die":  # the process vanishes mid-step
                    os._exit(3)
                if fail_mode == "hang":  # raises, but the process stays alive and holds its connections
                    try:
                        raise ValueError(f"injected failure at step {step[0]}")
                    except ValueError as e:
                        pipe.monitor.report(e)
                        time.sleep(hang_s)
                        os._exit(4)
                raise ValueError(f"injected failure at step {step[0]}")

        for st in pipe.local_stages:
            st.module.register_forward_pre_hook(fail)

    losses, times = [], []
    for i in range(steps):
        step[0] = i
        if calls:  # another batch size / sequence length this step
            inputs, targets = zoo.example_inputs(model, **calls[i]), zoo.example_targets(model, **calls[i])
        t0 = time.perf_counter()
        loss = pipe.step(inputs, targets, loss_fn)
        for _ in range(accumulate - 1):  # gradient accumulation: the same batch again adds the same gradient
            pipe.step(inputs, targets, loss_fn)
        opt.step()
        pipe.zero_grad()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    state = pipe.full_state_dict()
    pipe.close()
    if rank == 0 and out:
        wrappers = [type(m).__name__ for m in pipe.stage_submodules]
        torch.save(
            {"losses": losses, "state": state, "times": times, "materialized": materialized, "wrappers": wrappers},
            out,
        )


def reference(
    model: str,
    *,
    microbatches: int,
    batch: int,
    steps: int,
    lr: float,
    seed: int,
    start: str | None = None,
    calls: list[dict[str, int]] | None = None,
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Single-process training with the pipeline's loss: mean over equal microbatches of loss_fn, SGD.

    From the seeded init, or from the checkpoint saved at `start` (full state dict, original names). `calls`:
    per step, the zoo example's keyword arguments (e.g. {"batch": 4, "seq": 8}) instead of `batch`.
    """
    torch.manual_seed(seed)
    net = zoo.get(model)
    if start:
        net.load_state_dict(torch.load(start))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    loss_fn = zoo.loss_fn(model)
    losses = []
    for step in range(steps):
        call = calls[step] if calls else {"batch": batch}
        inputs, targets = zoo.example_inputs(model, **call), zoo.example_targets(model, **call)
        chunks = [torch.tensor_split(x, microbatches) for x in inputs]
        tchunks = torch.tensor_split(targets, microbatches)
        total = 0.0
        for i in range(microbatches):
            loss = loss_fn(net(*[c[i] for c in chunks]), tchunks[i])
            (loss / microbatches).backward()
            total += loss.detach().item() / microbatches
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


def _max_weight_error(cm: Any, pipe: Any, ref: dict[str, torch.Tensor]) -> torch.Tensor:
    """The largest difference of any rank's local tensor from single-process training's (`ref`, full tensors): a tp
    shard against its slices of the full tensor, an FSDP shard gathered first. Collective (max over the world)."""
    from partitioner.passes.tensor_parallel import local_param_slices

    plan = cm.tensor_parallel_plan
    slices = local_param_slices(plan, cm.captured.graph_module, pipe.tp_rank) if plan is not None else {}
    err = torch.zeros(())
    for name, t in pipe.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        expected = ref[name]
        if name in slices:  # local = cat(full[s] for s in slices)
            expected = torch.cat([expected[s] for s in slices[name]], plan.param_shard[name]["dim"])
        err = torch.maximum(err, (t.detach() - expected).abs().max())
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    return err


def train_pp_tp(
    *, model: str, pp: int, tp: int, dp: int = 1, microbatches: int = 4, batch: int = 8, steps: int = 3,
    lr: float = 0.1, seed: int = 0, out: str | None = None, load_path: str | None = None,
    data_parallel: str | None = None, sequence_parallel: bool | None = False,
) -> None:  # fmt: skip
    """dp x pp x tp through `distribute` (the torchrun entry point): tp-rewritten stages on a mesh from the plan
    (its token-wise ops split over the tp ranks under `sequence_parallel`).

    Weights: the replayed seeded init, or a full single-process checkpoint (`load_path`) sliced to the shards.
    Rank 0 saves the losses, the merged ``full_state_dict()``, and the largest difference of any rank's local
    tensors from the single-process weights (`reference` after `steps` more steps, from the checkpoint if any).
    """

    meta, init = record_init(lambda: zoo.get(model), seed=seed)
    cm = partitioner.compile(
        meta, devices=dp * pp * tp, example_inputs=zoo.example_inputs(model, batch=batch, device="meta"),
        device_type="cpu", microbatches=microbatches, schedule="1f1b", pipeline=pp, tensor_parallel=tp,
        sequence_parallel=sequence_parallel,
    )  # fmt: skip
    assert cm.tensor_parallel_plan is not None and cm.plan.num_stages == pp and cm.plan.data_degree == dp
    assert sequence_parallel is None or cm.tensor_parallel_plan.sequence_parallel == sequence_parallel
    pipe = cm.distributed(weights=init, data_parallel=data_parallel)  # the mesh from the plan's degrees
    if load_path:
        pipe.load_state_dict(torch.load(load_path))
    replica = pipe.mesh.get_local_rank("dp") if dp > 1 else 0
    rows = slice(replica * batch, (replica + 1) * batch)
    inputs = tuple(x[rows] for x in zoo.example_inputs(model, batch=batch * dp))
    targets = zoo.example_targets(model, batch=batch * dp)[rows]
    opt = torch.optim.SGD(pipe.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(float(pipe.step(inputs, targets, zoo.loss_fn(model))))
        opt.step()
        pipe.zero_grad()
    full = pipe.full_state_dict()
    # Every local tensor (a tp shard: local = cat(full[s] for s in slices)) against single-process training.
    _, ref = reference(
        model, microbatches=microbatches * dp, batch=batch * dp, steps=steps, lr=lr, seed=seed, start=load_path
    )
    err = _max_weight_error(cm, pipe, ref)
    wrappers = [type(m).__name__ for m in pipe.stage_submodules]
    pipe.close()
    if dist.get_rank() == 0 and out:
        torch.save({"losses": losses, "max_weight_error": float(err), "state": full, "wrappers": wrappers}, out)


def train_with_compiled_step(
    *, model: str, devices: int, pipeline: int, microbatches: int = 4, batch: int = 8, steps: int = 3,
    lr: float = 0.1, seed: int = 0, out: str | None = None,
) -> None:  # fmt: skip
    """The same training script in one process or under torchrun: ``cm.step`` / ``cm.parameters()`` only.

    Every rank passes the global batch; with devices / pipeline data-parallel replicas each trains on its rows.
    """
    torch.manual_seed(seed)
    net = zoo.get(model)
    cm = partitioner.compile(
        net, devices=devices, example_inputs=zoo.example_inputs(model, batch=batch), device_type="cpu",
        microbatches=microbatches, schedule="1f1b", pipeline=pipeline, tensor_parallel=1,
    )  # fmt: skip
    assert cm.plan.data_degree == devices // pipeline
    opt = cm.make_optimizer(torch.optim.SGD, lr=lr)
    inputs, targets = zoo.example_inputs(model, batch=batch), zoo.example_targets(model, batch=batch)
    losses, rows = [], [0]

    def loss_fn(output: Any, target: torch.Tensor) -> torch.Tensor:  # counts the rows this rank's loss sees
        rows[0] += target.shape[0]
        return zoo.loss_fn(model)(output, target)

    for _ in range(steps):
        rows[0] = 0  # the last step's count (torch infers stage shapes with an extra call at the first)
        losses.append(float(cm.step(inputs, targets, loss_fn)))
        opt.step()
        cm.zero_grad()
    if dist.is_initialized():  # the last stage's rank computed the loss
        seen = torch.tensor(rows[0])
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        rows[0] = int(seen)
    state = cm.full_state_dict()
    distributed = cm.pipeline is not None
    if distributed:
        cm.pipeline.close()
    if (not dist.is_initialized() or dist.get_rank() == 0) and out:
        torch.save({"losses": losses, "state": state, "distributed": distributed, "rows": rows[0]}, out)


def train_hf_with_compiled_step(
    *, case: str, devices: int, pipeline: int, batch: int = 8, seq: int = 8, steps: int = 2, lr: float = 0.1,
    seed: int = 0, out: str | None = None, tensor_parallel: int = 1, context_parallel: int = 1,
) -> None:  # fmt: skip
    """A HuggingFace model (captured by torch.export, tests/test_hf_training.py's tiny configs) trained with
    ``cm.step`` at the plan's default microbatches: in one process, or one stage per rank under torchrun (with
    `tensor_parallel` > 1, each stage's tp-rewritten shard; with `context_parallel` > 1, each rank's tokens of every
    sequence; in one process the unsharded stages run)."""
    from tests.test_hf_training import CASES, MORE_CASES

    spec = next(c for c in CASES + MORE_CASES if c.name == case)
    torch.manual_seed(seed)
    model = spec.build()
    kwargs, targets = spec.call(batch, seq)
    cm = partitioner.compile(
        model,
        devices=devices,
        pipeline=pipeline,
        tensor_parallel=tensor_parallel,
        context_parallel=context_parallel,
        example_kwargs=kwargs,
        device_type="cpu",
    )
    assert cm.plan.tensor_degree == tensor_parallel and cm.plan.context_degree == context_parallel
    # A rank whose stage reads no parameter (the plan may give a stage parameter-free nodes alone) gets an optimizer
    # whose step does nothing (torch's own refuse an empty list): the same loop runs on every rank.
    opt = cm.make_optimizer(torch.optim.SGD, lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(float(cm.step((), targets, spec.loss, kwargs=kwargs)))
        opt.step()
        cm.zero_grad()
    state = cm.full_state_dict()
    distributed = cm.pipeline is not None
    # the process groups this rank joined (the default one included): what plan.communicators counts
    groups = len(dist.distributed_c10d._world.pg_map) if distributed else 0
    if distributed:
        cm.pipeline.close()
    if (not dist.is_initialized() or dist.get_rank() == 0) and out:
        chunks = cm.plan.microbatches * cm.plan.data_degree
        sharded = sorted(p for p, s in cm.tensor_parallel_plan.param_shard.items() if s["dim"] is not None) if (
            cm.tensor_parallel_plan is not None) else []  # fmt: skip
        torch.save(
            {"losses": losses, "state": state, "distributed": distributed, "chunks": chunks, "sharded": sharded,
             "groups": groups, "data_parallel": cm.plan.data_parallel, "data_degree": cm.plan.data_degree},
            out,
        )  # fmt: skip


def nccl_pipeline_step(*, steps: int = 2, lr: float = 0.1, seed: int = 0, out: str | None = None) -> None:
    """One rank launched with backend="nccl": gpt3-tiny built on meta, compiled for one device, its weights
    materialized on the rank's GPU by ``cm.distributed``, trained with SGD; saves losses and the full state."""
    meta, init = record_init(lambda: zoo.get("gpt3-tiny"), seed=seed)
    x = zoo.example_inputs("gpt3-tiny", batch=8, device="meta")
    cm = partitioner.compile(meta, devices=1, example_inputs=x, device_type="h100", microbatches=2)
    pipe = cm.distributed(weights=init)
    assert pipe.device.type == "cuda", pipe.device
    opt = torch.optim.SGD(pipe.parameters(), lr=lr)
    inputs, targets = zoo.example_inputs("gpt3-tiny", batch=8), zoo.example_targets("gpt3-tiny", batch=8)
    losses = []
    for _ in range(steps):
        losses.append(float(pipe.step(inputs, targets, zoo.loss_fn("gpt3-tiny"))))
        opt.step()
        pipe.zero_grad()
    state = pipe.full_state_dict()
    pipe.close()
    if out:
        torch.save({"losses": losses, "state": state}, out)


def train_pp_cp(
    *, model: str, pp: int, cp: int, dp: int = 1, tp: int = 1, microbatches: int = 4, batch: int = 8,
    steps: int = 3, lr: float = 0.1, seed: int = 0, out: str | None = None, data_parallel: str | None = None,
    sequence_parallel: bool = False, schedule: str = "1f1b",
) -> None:  # fmt: skip
    """dp x pp x cp through `distribute`: every stage rewritten for this rank's tokens of each sequence (k and v
    gathered for attention), the batch's rows split over dp, gradients averaged over dp x cp after the backward.
    Rank 0 saves the losses, ``full_state_dict()`` and the largest difference of any rank's tensors from
    single-process training."""
    meta, init = record_init(lambda: zoo.get(model), seed=seed)
    cm = partitioner.compile(
        meta, devices=dp * pp * cp * tp, example_inputs=zoo.example_inputs(model, batch=batch, device="meta"),
        device_type="cpu", microbatches=microbatches, schedule=schedule, pipeline=pp, context_parallel=cp,
        data_parallel=data_parallel, tensor_parallel=tp, sequence_parallel=sequence_parallel if tp > 1 else None,
    )  # fmt: skip
    per_rank = 1 if schedule in ("1f1b", "gpipe") else 2
    assert cm.plan.context_degree == cp and cm.plan.num_stages == pp * per_rank and cm.plan.data_degree == dp
    assert cm.plan.tensor_degree == tp
    pipe = cm.distributed(weights=init)
    replica = pipe.mesh.get_local_rank("dp") if dp > 1 else 0
    rows = slice(replica * batch, (replica + 1) * batch)
    inputs = tuple(x[rows] for x in zoo.example_inputs(model, batch=batch * dp))
    targets = zoo.example_targets(model, batch=batch * dp)[rows]
    opt = pipe.make_optimizer(torch.optim.SGD, lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(float(pipe.step(inputs, targets, zoo.loss_fn(model))))
        opt.step()
        pipe.zero_grad()
    full = pipe.full_state_dict()
    _, ref = reference(model, microbatches=microbatches * dp, batch=batch * dp, steps=steps, lr=lr, seed=seed)
    err = _max_weight_error(cm, pipe, ref)
    pipe.close()
    if dist.get_rank() == 0 and out:
        torch.save({"losses": losses, "max_weight_error": float(err), "state": full}, out)


def train_placement(
    *, models: list[str], devices: int, pipeline: int | None, microbatches: int = 1, batch: int = 8, steps: int = 3,
    lr: float = 0.1, seed: int = 0, out: str | None = None,
) -> None:  # fmt: skip
    """Models whose forward branches on data (tests.control_flow_models), each compiled by module placement and
    trained with ``cm.step`` / ``cm.make_optimizer``: the same script in one process or under torchrun (one world for
    all of them: a process start each would cost more than the training). `out`: {model: results}."""
    results = {}
    for model in models:
        results[model] = _train_placement(model, devices, pipeline, microbatches, batch, steps, lr, seed)
    if (not dist.is_initialized() or dist.get_rank() == 0) and out:
        torch.save(results, out)


def _train_placement(model: str, devices: int, pipeline: int | None, microbatches: int, batch: int, steps: int,
                     lr: float, seed: int) -> dict[str, Any]:  # fmt: skip
    from tests import control_flow_models

    net = control_flow_models.build(model, seed)
    x, y = control_flow_models.batch(batch)
    cm = partitioner.compile(
        net, devices=devices, example_inputs=(x,), device_type="cpu", microbatches=microbatches, pipeline=pipeline,
        verbose=False,
    )  # fmt: skip
    assert cm.plan.capture == "module-placement", cm.plan.capture
    opt = cm.make_optimizer(torch.optim.SGD, lr=lr)
    losses = []
    for _ in range(steps):
        losses.append(float(cm.step((x,), y, torch.nn.functional.mse_loss)))
        opt.step()
        cm.zero_grad()
    return {"losses": losses, "state": cm.full_state_dict(), "stages": cm.plan.num_stages}


def reference_placement(
    model: str, *, microbatches: int, batch: int = 8, steps: int = 3, lr: float = 0.1, seed: int = 0
) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training on the original model in one process: each step the mean loss of the microbatches (each
    through the model's own forward), SGD."""
    from tests import control_flow_models

    net = control_flow_models.build(model, seed)
    x, y = control_flow_models.batch(batch)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        parts = [torch.nn.functional.mse_loss(net(a), b) for a, b in zip(x.tensor_split(microbatches),
                                                                           y.tensor_split(microbatches))]  # fmt: skip
        for part in parts:
            (part / microbatches).backward()
        losses.append(float(torch.stack([p.detach() for p in parts]).mean()))
        opt.step()
        opt.zero_grad()
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


_DEVICE = threading.Lock()  # one device per process: its calls run one at a time, whatever thread makes them


class _Sleepy(torch.nn.Module):
    """A Linear that takes `seconds` longer (to see calls overlap) and logs its start and end."""

    def __init__(self, name: str, seconds: float, log: list) -> None:
        super().__init__()
        self.lin, self.name, self.seconds, self.log = torch.nn.Linear(4, 4), name, seconds, log

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with _DEVICE:
            start = time.monotonic()
            time.sleep(self.seconds)
            out = self.lin(x)
            self.log.append((self.name, start, time.monotonic()))
        return out


class _TwoSleepy(torch.nn.Module):
    def __init__(self, seconds: float, log: list) -> None:
        super().__init__()
        self.first, self.second = _Sleepy("first", seconds, log), _Sleepy("second", seconds, log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        return self.second(h) if h.sum() > -1e9 else h


def placement_overlap(*, microbatches: int = 4, seconds: float = 0.2, out: str | None = None) -> None:
    """Two placed modules on two ranks, each call sleeping `seconds`: rank 0's log of its own calls and of the remote
    calls it waited for (start, end), to show the microbatches overlap."""
    torch.manual_seed(0)
    log: list = []
    net = _TwoSleepy(seconds, log)
    x = torch.randn(2 * microbatches, 4)
    cm = partitioner.compile(net, devices=2, example_inputs=(x,), device_type="cpu", microbatches=microbatches,
                             pipeline=2, verbose=False)  # fmt: skip
    log.clear()
    start = time.monotonic()
    cm.step((x,), torch.zeros_like(x), torch.nn.functional.mse_loss)
    wall = time.monotonic() - start
    logs = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(log, logs, dst=0)
    if dist.get_rank() == 0 and out:
        torch.save({"logs": logs, "wall": wall, "stages": cm.plan.node_stage}, out)


def placement_remote_failure() -> None:
    """A module failing where its stage runs (rank 1; a stand-in for a bug in the user's module): the driver's step
    raises, naming the module and the rank."""
    from tests import control_flow_models

    net = control_flow_models.build("branch")
    x, y = control_flow_models.batch()
    cm = partitioner.compile(net, devices=2, example_inputs=(x,), device_type="cpu", pipeline=2, verbose=False)
    assert cm.plan.node_stage["d"] == 1

    def broken(module: torch.nn.Module, args: tuple) -> None:
        if dist.get_rank() == 1:
            raise ValueError("broken on purpose")

    net.d.register_forward_pre_hook(broken)
    cm.step((x,), y, torch.nn.functional.mse_loss)
