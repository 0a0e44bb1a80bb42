"""cp_local: run every context-parallel rank of a layout in this process and check it against the whole graph.

As runtime.tp_local does for tensor parallelism: rank r runs in thread r with a ThreadComm, on its tokens of every
sequence input (passes.context_parallel.scatter_input) and a private copy of the parameters. Each rank's outputs
are whole (gathered), so they must equal the model's on every rank; the ranks' parameter gradients must sum to the
model's (plan.context's invariant; under torchrun that sum is the cp group's gradient all-reduce).

Example: `check_context_parallel(gm, plan_context_parallel(gm, 2), [idx])` -> CPCheckReport(max_output_diff=2e-7, ...)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from partitioner.passes.context_parallel import context_parallel_rank, scatter_input
from partitioner.plan.context import ContextLayout
from partitioner.runtime.tp_local import ThreadGroup, _default_loss, _run_threads

__all__ = ["CPCheckReport", "check_context_parallel", "run_context_parallel_local"]


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
