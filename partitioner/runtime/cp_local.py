"""cp_local: run every context-parallel rank of a layout in this process and check it against the whole graph.

As runtime.tp_local does for tensor parallelism: rank r runs in thread r with a ThreadComm, on its tokens of every
sequence input (passes.context_parallel.scatter_input) and a private copy of the parameters. Each rank's outputs
are whole (gathered), so they must equal the model's on every rank; the ranks' parameter gradients must sum to the
model's (plan.context's invariant; under torchrun the dp x cp group's average does the same, with the output
gradients left whole). With a tensor-parallel layout as well, rank (c, t) runs tp rank t's graph rewritten for cp
rank c, with one ThreadComm over the tp ranks of its cp coordinate and one over the cp ranks of its tp coordinate.

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
from partitioner.plan.tensor_layout import TensorParallelPlan, unshard_tensor
from partitioner.runtime.tp_local import ThreadGroup, _default_loss, _run_threads, sum_step_gradients_local

__all__ = ["CPCheckReport", "check_context_parallel", "check_tensor_context_parallel", "run_context_parallel_local"]

Loss = Callable[[Sequence[Any]], torch.Tensor]


def run_context_parallel_local(
    gm: fx.GraphModule,
    layout: ContextLayout,
    inputs: Sequence[Any],
    *,
    tp_plan: TensorParallelPlan | None = None,
    loss_fn: Loss | None = None,
    backward: bool = True,
) -> tuple[list[tuple], dict[tuple[int, int], fx.GraphModule]]:
    """Run every (cp, tp) rank on `inputs` in threads (tp 1 without `tp_plan`); returns each rank's flat outputs (in
    cp-major order) and the rank modules by (cp rank, tp rank), whose parameters are private copies holding that
    rank's gradients."""
    from partitioner.passes.tensor_parallel import tensor_parallel_rank

    tp, cp = tp_plan.tp if tp_plan is not None else 1, layout.degree
    tp_groups, cp_groups = [ThreadGroup(tp) for _ in range(cp)], [ThreadGroup(cp) for _ in range(tp)]
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    loss_fn = loss_fn or _default_loss
    modules, runs = {}, []
    for c in range(cp):
        local = [
            scatter_input(x, layout.inputs[name], layout, c) if name in layout.inputs else x
            for name, x in zip(names, inputs)
        ]
        for t in range(tp):
            if tp_plan is None:
                rank_gm = copy.deepcopy(gm)
            else:
                rank_gm = tensor_parallel_rank(gm, tp_plan, t, tp_groups[c].comm(t), share_replicated=False)
            modules[c, t] = context_parallel_rank(rank_gm, layout, c, cp_groups[t].comm(c))
            runs.append(_step(modules[c, t], local, loss_fn if backward else None))
    outputs = _run_threads(runs, tp_groups + cp_groups)
    if backward and tp_plan is not None:  # each cp rank's tp group sums its step-phase gradients (runtime's order)
        for c in range(cp):
            sum_step_gradients_local([modules[c, t] for t in range(tp)], tp_plan)
    return outputs, modules


def _step(module: fx.GraphModule, local: list[Any], loss_fn: Loss | None) -> Callable[[], tuple]:
    def run() -> tuple:
        out = module(*local)
        flat = out if isinstance(out, (tuple, list)) else (out,)
        if loss_fn is not None:
            loss_fn(flat).backward()
        return tuple(o.detach() if isinstance(o, torch.Tensor) else o for o in flat)

    return run


@dataclass
class CPCheckReport:
    """What the check compared: the largest differences, the parameters checked and the layout."""

    max_output_diff: float
    max_grad_diff: float
    params: list[str] = field(default_factory=list)
    layout: ContextLayout | None = None  # what was checked


def check_context_parallel(
    gm: fx.GraphModule,
    layout: ContextLayout,
    inputs: Sequence[Any],
    *,
    loss_fn: Loss | None = None,
    backward: bool = True,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> CPCheckReport:
    """Assert that the cp ranks of `layout` reproduce `gm`: every rank's outputs, and the sum of the ranks' gradients
    of every parameter. Raises AssertionError naming what differs; `gm` needs real weights."""
    return _check(gm, layout, inputs, None, loss_fn, backward, rtol, atol)


def check_tensor_context_parallel(
    gm: fx.GraphModule,
    tp_plan: TensorParallelPlan,
    layout: ContextLayout,
    inputs: Sequence[Any],
    *,
    loss_fn: Loss | None = None,
    rtol: float = 1e-5,
    atol: float = 1e-5,
) -> CPCheckReport:
    """tp x cp ranks (module docstring): every rank's outputs equal `gm`'s, and each parameter's gradient, summed over
    cp and reassembled over tp, equals the model's (replicated ones on every tp rank)."""
    return _check(gm, layout, inputs, tp_plan, loss_fn, True, rtol, atol)


def _check(
    gm: fx.GraphModule,
    layout: ContextLayout,
    inputs: Sequence[Any],
    tp_plan: TensorParallelPlan | None,
    loss_fn: Loss | None,
    backward: bool,
    rtol: float,
    atol: float,
) -> CPCheckReport:
    loss_fn = loss_fn or _default_loss
    reference = copy.deepcopy(gm)
    ref_out = reference(*inputs)
    ref_flat = ref_out if isinstance(ref_out, (tuple, list)) else (ref_out,)
    if backward:
        loss_fn(ref_flat).backward()
    outputs, modules = run_context_parallel_local(
        gm, layout, inputs, tp_plan=tp_plan, loss_fn=loss_fn, backward=backward
    )
    tp = tp_plan.tp if tp_plan is not None else 1
    report = CPCheckReport(0.0, 0.0, layout=layout)
    for r, out in enumerate(outputs):
        for i, (a, b) in enumerate(zip(out, ref_flat)):
            msg = lambda m, r=r, i=i: f"rank (cp {r // tp}, tp {r % tp}) output {i}: {m}"  # noqa: E731
            torch.testing.assert_close(a, b.detach(), rtol=rtol, atol=atol, msg=msg)
            if a.is_floating_point():
                report.max_output_diff = max(report.max_output_diff, (a - b.detach()).abs().max().item())
    if not backward:
        return report
    params = {key: dict(m.named_parameters(remove_duplicate=False)) for key, m in modules.items()}
    for name, ref in reference.named_parameters(remove_duplicate=False):
        grads = [[params[c, t][name].grad for c in range(layout.degree)] for t in range(tp)]
        if ref.grad is None:
            assert all(g is None or not g.any() for gs in grads for g in gs), f"{name}: no gradient in the model"
            continue
        assert all(g is not None for gs in grads for g in gs), f"{name}: a rank got no gradient"
        per_tp = [torch.stack(gs).sum(0) for gs in grads]  # summed over the cp ranks
        spec = tp_plan.param_shard.get(name, {"dim": None}) if tp_plan is not None else {"dim": None}
        scale = max(1.0, ref.grad.abs().max().item())
        if spec["dim"] is None:  # replicated over tp: whole on every tp rank
            for t, g in enumerate(per_tp):
                torch.testing.assert_close(
                    g, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, k=name, t=t: f"{k} (tp {t}): {m}"
                )
            full = per_tp[0]
        else:
            full = unshard_tensor(per_tp, spec["dim"], spec["parts"], spec.get("pad", 0), spec.get("whole", 0))
            torch.testing.assert_close(full, ref.grad, rtol=rtol, atol=atol * scale, msg=lambda m, k=name: f"{k}: {m}")
        report.max_grad_diff = max(report.max_grad_diff, (full - ref.grad).abs().max().item())
        report.params.append(name)
    return report
