"""tp_local: run every tensor-parallel rank of a plan in this process and check it against the unsharded graph.

No torchrun, no process group: rank r runs in thread r with a `ThreadComm`, whose collectives meet at a
barrier and combine the ranks' tensors in rank order (so every rank gets a bit-identical result). Autograd
runs in the same threads (CPU backward executes on the calling thread), so f's backward all-reduce works too.

`check_tensor_parallel(gm, plan, inputs)` is what CI tests and users call to verify a plan: it runs the
original graph and the tp rank graphs forward (and backward on a loss), and asserts that every rank's
outputs and every parameter gradient (sharded ones reassembled with `unshard_tensor`) match. The rank graphs are
whole (no pipeline split); `recompute_regions` (a Plan's, all stages together) checkpoints them as the applier
checkpoints stages (`passes.recompute`), so the collectives a region holds are recomputed in backward here too.
Example: `check_tensor_parallel(gm, plan_tensor_parallel(gm, 2), [idx])` -> TPCheckReport(max_output_diff=3e-7, ...).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from partitioner.passes.fuse_gated import fuse_gated_activations
from partitioner.passes.recompute import checkpoint_regions
from partitioner.passes.tensor_parallel import own_chunk, tensor_parallel_rank
from partitioner.plan.tensor_layout import TensorParallelPlan, unshard_tensor

__all__ = [
    "TPCheckReport",
    "ThreadComm",
    "ThreadGroup",
    "check_tensor_parallel",
    "run_tensor_parallel_local",
    "sum_step_gradients_local",
]


class ThreadGroup:
    """The shared state of `world_size` ThreadComm ranks: one slot per rank and a barrier (timeout in seconds)."""

    def __init__(self, world_size: int, timeout: float = 120.0):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=timeout)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def comm(self, rank: int) -> ThreadComm:
        return ThreadComm(self, rank)

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order (a collective: all ranks must call it)."""
        self.slots[rank] = x.detach().clone()
        self.barrier.wait()
        got = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before all have read
        return got


class ThreadComm:
    """TPComm for rank `rank` of a ThreadGroup (see partitioner.passes.tensor_parallel.TPComm)."""

    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def __deepcopy__(self, memo: dict) -> ThreadComm:
        return self

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        parts = self.group.exchange(self.rank, x)
        out = parts[0]
        for p in parts[1:]:
            out = out + p if op == "sum" else torch.maximum(out, p) if op == "max" else None
            if out is None:
                raise ValueError(f"unsupported reduce op {op!r}")
        return out

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat(self.group.exchange(self.rank, x), dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return own_chunk(self.all_reduce(x, "sum"), self, dim)


def _run_threads(fns: list[Callable[[], Any]], group: ThreadGroup | Sequence[ThreadGroup]) -> list[Any]:
    """Run `fns` in threads, one per rank; an error in one aborts the barriers of every group (`group`: the ranks'
    ThreadGroup, or several: cp_local's tp and cp groups), so no thread waits out the timeout. Re-raises it."""
    groups = [group] if isinstance(group, ThreadGroup) else list(group)
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001  (re-raised in the caller)
            errors.append(e)
            for g in groups:  # wake the other ranks instead of letting them wait out the timeout
                g.barrier.abort()

    threads = [threading.Thread(target=body, args=(i,), name=f"tp-rank-{i}") for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        first = next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
        raise first
    return results


def _default_loss(outputs: Sequence[Any]) -> torch.Tensor:
    """A loss touching every output element with distinct weights: sum_i sum(o_i * sin(arange))."""
    total = 0.0
    for o in outputs:
        if isinstance(o, torch.Tensor) and o.is_floating_point():
            w = torch.sin(torch.arange(o.numel(), dtype=o.dtype)).view(o.shape)
            total = total + (o * w).sum()
    return total


def run_tensor_parallel_local(
    gm: fx.GraphModule,
    plan: TensorParallelPlan,
    inputs: Sequence[torch.Tensor],
    *,
    loss_fn: Callable[[Sequence[Any]], torch.Tensor] | None = None,
    backward: bool = True,
    recompute_regions: Sequence[Sequence[str]] = (),
) -> tuple[list[tuple], list[fx.GraphModule]]:
    """Run all tp ranks of `plan` on `inputs` in threads; returns (each rank's flat outputs, the rank modules).

    With backward=True each rank computes `loss_fn(outputs)` (default `_default_loss`) and runs backward; the
    gradients are on the rank modules' parameters (which are private copies: `gm` is left untouched). Each rank
    graph runs `recompute_regions` under torch.utils.checkpoint (`passes.recompute.checkpoint_regions`) and its gated
    activations as apply.py runs them (`passes.fuse_gated`).
    """
    group = ThreadGroup(plan.tp)
    ranks = [
        fuse_gated_activations(
            checkpoint_regions(
                tensor_parallel_rank(gm, plan, r, group.comm(r), share_replicated=False), recompute_regions
            )
        )
        for r in range(plan.tp)
    ]
    loss_fn = loss_fn or _default_loss

    def step(module: fx.GraphModule) -> Callable[[], tuple]:
        def run() -> tuple:
            out = module(*inputs)
            if backward:
                loss_fn(out).backward()
            return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in out)

        return run

    outputs = _run_threads([step(m) for m in ranks], group)
    if backward:
        sum_step_gradients_local(ranks, plan)
    return outputs, ranks


def sum_step_gradients_local(ranks: Sequence[torch.nn.Module], plan: TensorParallelPlan) -> None:
    """What the runtime does after a step's backward, for rank modules run in this process: every rank's gradient of
    each of `plan`'s step-summed parameters (TensorParallelPlan.step_summed_params) becomes the sum over the ranks,
    added in rank order (the same on every rank, as ThreadComm's all-reduce). A rank without one counts zeros."""
    for name in plan.step_summed_params():
        params = [m.get_parameter(name) for m in ranks]
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            continue
        total = torch.zeros_like(grads[0])
        for g in grads:
            total = total + g
        for p in params:
            p.grad = total.clone()


@dataclass
class TPCheckReport:
    """What check_tensor_parallel compared: largest differences and the names checked."""

    max_output_diff: float
    max_grad_diff: float
    sharded_params: list[str] = field(default_factory=list)
    replicated_params: list[str] = field(default_factory=list)


def check_tensor_parallel(
    gm: fx.GraphModule,
    plan: TensorParallelPlan,
    inputs: Sequence[torch.Tensor],
    *,
    loss_fn: Callable[[Sequence[Any]], torch.Tensor] | None = None,
    backward: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    recompute_regions: Sequence[Sequence[str]] = (),
) -> TPCheckReport:
    """Assert that the tp ranks of `plan` reproduce `gm` (outputs on every rank; every parameter's gradient).

    Raises AssertionError naming the output or parameter that differs. `gm` needs real (not meta) weights.
    Gradients are compared with atol scaled by the parameter gradient's largest magnitude (all-reduces sum
    in another order than the unsharded kernels, and a gradient summed over many tokens cancels).
    `recompute_regions`: run on the rank graphs under torch.utils.checkpoint (run_tensor_parallel_local).
    """
    loss_fn = loss_fn or _default_loss
    reference = copy.deepcopy(gm)
    for p in reference.parameters():
        p.grad = None
    ref_out = reference(*inputs)
    if backward:
        loss_fn(ref_out).backward()
    outputs, ranks = run_tensor_parallel_local(
        gm, plan, inputs, loss_fn=loss_fn, backward=backward, recompute_regions=recompute_regions
    )

    out_diff = 0.0
    for r, out in enumerate(outputs):
        for i, (a, b) in enumerate(zip(out, ref_out)):
            torch.testing.assert_close(
                a, b.detach(), rtol=rtol, atol=atol, msg=lambda m, r=r, i=i: f"rank {r} output {i}: {m}"
            )
            out_diff = max(out_diff, (a - b.detach()).abs().max().item() if a.is_floating_point() else 0.0)

    report = TPCheckReport(out_diff, 0.0)
    if not backward:
        return report
    ref_params = dict(reference.named_parameters(remove_duplicate=False))
    rank_params = [dict(m.named_parameters(remove_duplicate=False)) for m in ranks]
    for name, ref in ref_params.items():
        spec = plan.param_shard.get(name, {"dim": None, "parts": 1})
        grads = [rp[name].grad if name in rp else None for rp in rank_params]
        scale = max(1.0, ref.grad.abs().max().item()) if ref.grad is not None else 1.0
        if ref.grad is None:
            assert all(g is None or not g.any() for g in grads), f"{name}: no gradient in the model, one on a rank"
            continue
        assert all(g is not None for g in grads), f"{name}: a rank got no gradient"
        if spec["dim"] is None:
            report.replicated_params.append(name)
            for r, g in enumerate(grads):
                torch.testing.assert_close(
                    g, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, r=r, k=name: f"{k} rank {r}: {m}"
                )
                report.max_grad_diff = max(report.max_grad_diff, (g - ref.grad).abs().max().item())
        else:
            report.sharded_params.append(name)
            full = unshard_tensor(grads, spec["dim"], spec["parts"], spec.get("pad", 0), spec.get("whole", 0))
            torch.testing.assert_close(
                full, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, k=name: f"{k} (sharded): {m}"
            )
            report.max_grad_diff = max(report.max_grad_diff, (full - ref.grad).abs().max().item())
    return report
