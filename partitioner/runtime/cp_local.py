"""cp_local: run every context-parallel rank of a layout in this process and check it against the whole graph.

As runtime.tp_local does for tensor parallelism: rank r runs in thread r with a ThreadComm, on its tokens of every
sequence input (passes.context_parallel.scatter_input) and a private copy of the parameters. Each rank's outputs
are whole (gathered), so they must equal the model's on every rank; the ranks' parameter gradients must sum to the
model's (plan.context's invariant; under torchrun that sum is the cp group's gradient all-reduce).

Example: `check_context_parallel(gm, plan_context_parallel(gm, 2), [idx])` -> CPCheckReport(max_output_diff=2e-7, ...)
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from partitioner.passes.context_parallel import context_parallel_rank, scatter_input
from partitioner.plan.context import ContextLayout
from partitioner.plan.tensor_layout import TensorParallelPlan, unshard_tensor
from partitioner.runtime.tp_local import ThreadGroup, _default_loss, _run_threads

__all__ = ["CPCheckReport", "check_context_parallel", "check_tensor_context_parallel", "run_context_parallel_local"]


def run_context_parallel_local(
    gm: fx.GraphModule,
    layout: ContextLayout,
    inputs: Sequence[Any],
    *,
    loss_fn: Callable[[Sequence[Any]], torch.Tensor] | None = None,
    backward: bool = True,
) -> tuple[list[tuple], list[fx.GraphModule]]:
    """Run all cp ranks on `inputs` in threads; returns (each rank's flat outputs, the rank modules, whose
    parameters are private copies holding that rank's gradients)."""
    group = ThreadGroup(layout.degree)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    ranks, rank_inputs = [], []
    for r in range(layout.degree):
        ranks.append(context_parallel_rank(copy.deepcopy(gm), layout, r, group.comm(r)))
        local = [
            scatter_input(x, layout.inputs[name], layout, r) if name in layout.inputs else x
            for name, x in zip(names, inputs)
        ]
        rank_inputs.append(local)
    loss_fn = loss_fn or _default_loss

    def step(module: fx.GraphModule, local: list[Any]) -> Callable[[], tuple]:
        def run() -> tuple:
            out = module(*local)
            flat = out if isinstance(out, (tuple, list)) else (out,)
            if backward:
                loss_fn(flat).backward()
            return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in flat)

        return run

    outputs = _run_threads([step(m, x) for m, x in zip(ranks, rank_inputs)], group)
    return outputs, ranks


@dataclass
class CPCheckReport:
    """What check_context_parallel compared: the largest differences and how many parameters."""

    max_output_diff: float
    max_grad_diff: float
    params: list[str] = field(default_factory=list)
    layout: ContextLayout | None = None  # what was checked


def check_context_parallel(
    gm: fx.GraphModule,
    layout: ContextLayout,
    inputs: Sequence[Any],
    *,
    loss_fn: Callable[[Sequence[Any]], torch.Tensor] | None = None,
    backward: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> CPCheckReport:
    """Assert that the cp ranks of `layout` reproduce `gm`: every rank's outputs, and the sum of the ranks' gradients
    of every parameter. Raises AssertionError naming what differs; `gm` needs real weights."""
    loss_fn = loss_fn or _default_loss
    reference = copy.deepcopy(gm)
    ref_out = reference(*inputs)
    ref_flat = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    if backward:
        loss_fn(ref_flat).backward()
    outputs, ranks = run_context_parallel_local(gm, layout, inputs, loss_fn=loss_fn, backward=backward)
    report = CPCheckReport(0.0, 0.0, layout=layout)
    for r, out in enumerate(outputs):
        for i, (a, b) in enumerate(zip(out, ref_flat)):
            torch.testing.assert_close(
                a, b.detach(), rtol=rtol, atol=atol, msg=lambda m, r=r, i=i: f"rank {r} output {i}: {m}"
            )
            if a.is_floating_point():
                report.max_output_diff = max(report.max_output_diff, (a - b.detach()).abs().max().item())
    if not backward:
        return report
    rank_params = [dict(m.named_parameters(remove_duplicate=False)) for m in ranks]
    for name, ref in reference.named_parameters(remove_duplicate=False):
        grads = [rp[name].grad for rp in rank_params]
        if ref.grad is None:
            assert all(g is None or not g.any() for g in grads), f"{name}: no gradient in the model, one on a rank"
            continue
        assert all(g is not None for g in grads), f"{name}: a rank got no gradient"
        total = torch.stack(grads).sum(0)
        scale = max(1.0, ref.grad.abs().max().item())
        torch.testing.assert_close(total, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, k=name: f"{k}: {m}")
        report.max_grad_diff = max(report.max_grad_diff, (total - ref.grad).abs().max().item())
        report.params.append(name)
    return report


def check_tensor_context_parallel(
    gm: fx.GraphModule,
    tp_plan: TensorParallelPlan,
    layout: ContextLayout,
    inputs: Sequence[Any],
    *,
    loss_fn: Callable[[Sequence[Any]], torch.Tensor] | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> CPCheckReport:
    """tp x cp ranks in threads: rank (c, t) runs tensor-parallel rank t's graph (`tp_plan`) rewritten for context
    rank c, with a ThreadComm over the tp ranks of its cp coordinate and one over the cp ranks of its tp coordinate.
    Asserts every rank's outputs equal `gm`'s and that each parameter's gradient, summed over cp and reassembled
    over tp, equals the model's."""
    from partitioner.passes.tensor_parallel import tensor_parallel_rank

    loss_fn = loss_fn or _default_loss
    tp, cp = tp_plan.tp, layout.degree
    reference = copy.deepcopy(gm)
    ref_out = reference(*inputs)
    ref_flat = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    loss_fn(ref_flat).backward()
    tp_groups, cp_groups = [ThreadGroup(tp) for _ in range(cp)], [ThreadGroup(cp) for _ in range(tp)]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    modules, fns = {}, []
    for c in range(cp):
        for t in range(tp):
            rank_gm = tensor_parallel_rank(gm, tp_plan, t, tp_groups[c].comm(t), share_replicated=False)
            module = modules[c, t] = context_parallel_rank(rank_gm, layout, c, cp_groups[t].comm(c))
            local = [
                scatter_input(x, layout.inputs[name], layout, c) if name in layout.inputs else x
                for name, x in zip(names, inputs)
            ]
            fns.append(_step(module, local, loss_fn))
    outputs = _run_all(fns, tp_groups + cp_groups)
    report = CPCheckReport(0.0, 0.0, layout=layout)
    for r, out in enumerate(outputs):
        for i, (a, b) in enumerate(zip(out, ref_flat)):
            msg = lambda m, r=r, i=i: f"rank (cp {r // tp}, tp {r % tp}) output {i}: {m}"  # noqa: E731
            torch.testing.assert_close(a, b.detach(), rtol=rtol, atol=atol, msg=msg)
            if a.is_floating_point():
                report.max_output_diff = max(report.max_output_diff, (a - b.detach()).abs().max().item())
    params = {key: dict(m.named_parameters(remove_duplicate=False)) for key, m in modules.items()}
    for name, ref in reference.named_parameters(remove_duplicate=False):
        if ref.grad is None:
            continue
        per_tp = [torch.stack([params[c, t][name].grad for c in range(cp)]).sum(0) for t in range(tp)]
        spec = tp_plan.param_shard.get(name, {"dim": None, "parts": 1})
        full = (
            per_tp[0] if spec["dim"] is None else unshard_tensor(per_tp, spec["dim"], spec["parts"], spec.get("pad", 0))
        )
        if spec["dim"] is None:
            for t, g in enumerate(per_tp):
                scale = max(1.0, ref.grad.abs().max().item())
                torch.testing.assert_close(
                    g, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, k=name, t=t: f"{k} tp {t}: {m}"
                )
        scale = max(1.0, ref.grad.abs().max().item())
        torch.testing.assert_close(full, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, k=name: f"{k}: {m}")
        report.max_grad_diff = max(report.max_grad_diff, (full - ref.grad).abs().max().item())
        report.params.append(name)
    return report


def _step(module: fx.GraphModule, local: list[Any], loss_fn: Callable[[Sequence[Any]], torch.Tensor]) -> Callable:
    def run() -> tuple:
        out = module(*local)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        loss_fn(flat).backward()
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in flat)

    return run


def _run_all(fns: list[Callable[[], Any]], groups: list[ThreadGroup]) -> list[Any]:
    """Run `fns` in threads; an error in one aborts every group's barrier (no thread waits out the timeout)."""
    results: list[Any] = [None] * len(fns)
    errors: list[BaseException] = []

    def body(i: int) -> None:
        try:
            results[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001  (re-raised below)
            errors.append(e)
            for g in groups:
                g.barrier.abort()

    threads = [threading.Thread(target=body, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return results
