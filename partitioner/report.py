"""report: human-readable views of a Plan (the summary table)."""

from __future__ import annotations

from partitioner.plan.schema import Plan

__all__ = ["format_plan", "format_bytes", "format_seconds"]


def format_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def format_seconds(t: float) -> str:
    if t >= 1:
        return f"{t:.3f} s"
    if t >= 1e-3:
        return f"{t * 1e3:.2f} ms"
    return f"{t * 1e6:.1f} us"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_plan(plan: Plan) -> str:
    """The plan as a table: one row per stage, then the headline figures and every fallback."""
    dev = plan.device_type
    lines = [
        f"Plan for {plan.model} on {plan.devices} x {dev['name']} "
        f"(pipeline {plan.pipeline_degree} x tensor {plan.tensor_degree} x data {plan.data_degree}; "
        f"{plan.microbatches} microbatches, {plan.schedule}; {'training' if plan.training else 'inference'}; "
        f"captured with {plan.capture}; {plan.cost_model} costs)",
        "",
    ]
    rows = []
    for s in plan.stages:
        span = s.modules[0] if len(s.modules) == 1 else f"{s.modules[0] or '<top>'} .. {s.modules[-1] or '<top>'}"
        rows.append(
            [
                str(s.index),
                str(len(s.nodes)),
                span,
                f"{s.param_bytes / 2**20:.1f}",
                f"{s.flops / 1e9:.2f}",
                format_seconds(s.compute_time),
                format_seconds(s.comm_time),
                format_bytes(s.peak_memory),
                format_bytes(s.send_bytes),
            ]
        )
    lines.append(
        _table(["stage", "nodes", "modules", "params MiB", "fwd GFLOP", "compute", "comm", "memory", "sends"], rows)
    )
    lines += [
        "",
        f"bottleneck stage time: {format_seconds(plan.bottleneck_time)} per step "
        f"(balance {plan.balance:.3f} = bottleneck / (total compute / {plan.num_stages}); "
        + (
            "sends overlap compute)"
            if all(s.overlaps_comm for s in plan.stages)
            else "sends add to compute on this device)"
        ),
        f"memory limit per device: {format_bytes(plan.memory_limit)}; "
        f"peak stage: {format_bytes(max(s.peak_memory for s in plan.stages))}",
    ]
    for key, value in sorted(plan.predicted.items()):
        lines.append(f"predicted {key}: {value:.6g}")
    if plan.tied_stages:
        for name, stages in sorted(plan.tied_stages.items()):
            names = plan.tied_params.get(name)  # tied under several names, or one module reused by several stages
            what = f"tied parameter {name} ({', '.join(names)})" if names else f"shared parameter {name}"
            lines.append(f"{what} held by stages {stages}")
    if plan.alternatives:
        lines.append("runners-up (why the chosen layout wins):")
        chosen = plan.predicted.get("step_time")
        for alt in plan.alternatives:
            what = (
                f"pp{alt['pp']} x tp{alt['tp']} x dp{alt['dp']}, {alt['microbatches']} microbatches, {alt['schedule']}"
            )
            if "step_time" in alt:
                ratio = f" ({alt['step_time'] / chosen:.3f}x the chosen step)" if chosen else ""
                lines.append(
                    f"  {what}: {format_seconds(alt['step_time'])}{ratio}, peak {alt['peak_memory_gib']:.2f} GiB/device"
                )
            else:
                lines.append(f"  {what}: {alt['note']}")
    lines.append("fallbacks: " + ("none" if not plan.fallbacks else ""))
    for fb in plan.fallbacks:
        lines.append(f"  {fb['what'] or '<model>'}: {fb['path']} ({fb['reason']})")
    return "\n".join(lines)
