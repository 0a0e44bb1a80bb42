"""Plan: the result of planning, as plain data, and its text view (`Plan.summary()`).

Invariants: a Plan holds only JSON-native values (str, int, float, bool, list, dict); the same model
and options give an identical `to_json()`; `Plan.from_json(p.to_json()) == p`; `fingerprint`
identifies the captured graph and parameter shapes, so a plan cannot be applied to another model.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch.fx as fx

from partitioner.plan.graph import stage_time
from partitioner.units import format_bytes, format_flops, format_seconds

__all__ = ["PLAN_VERSION", "Plan", "StagePlan", "graph_fingerprint"]

PLAN_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class StagePlan:
    """One pipeline stage. Times are seconds per training step (all microbatches), bytes per device."""

    index: int
    nodes: list[str]  # planned node names, topological order
    modules: list[str]  # first and last module paths the stage covers ("" = top level)
    params: list[str]  # qualified names of the parameters and buffers it holds
    param_bytes: float
    flops: float  # forward FLOPs per step
    compute_time: float  # forward + backward
    comm_time: float  # activations sent forward + gradients sent back
    peak_memory: float  # weights, grads, optimizer state, in-flight activations
    send_bytes: float  # activation bytes sent to the next stage per step
    activation_bytes: float
    overlaps_comm: bool = True  # the device's transfers run beside compute (DeviceSpec.overlaps_comm)
    # Activation recomputation (plan.recompute): "none" | "selective" | "full" | "full:k" (the stage's first k whole
    # layers), and the regions the runtime runs
    # under torch.utils.checkpoint, each a run of consecutive node names of this stage (graph order).
    recompute: str = "none"
    recompute_regions: list[list[str]] = field(default_factory=list)

    @property
    def time(self) -> float:
        """Steady-state stage time: compute and transfers overlapped, or added (partitioner.plan.graph)."""
        return stage_time(self.compute_time, self.comm_time, overlaps_comm=self.overlaps_comm)


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A partitioning plan. `stages[s].nodes` lists the nodes of stage s; `node_stage` the inverse."""

    model: str  # the model's class name
    fingerprint: str
    capture: str  # "fx" | "export" | "module-level"
    devices: int
    device_type: dict[str, Any]  # DeviceSpec.to_dict()
    pipeline_degree: int
    tensor_degree: int
    data_degree: int
    microbatches: int
    schedule: str
    training: bool
    memory_limit: float
    stages: list[StagePlan]
    node_stage: dict[str, int]
    tied_params: dict[str, list[str]]  # canonical name -> all names of the same tensor
    tied_stages: dict[str, list[int]]  # canonical name -> stages holding a copy (grads all-reduced)
    fallbacks: list[dict[str, str]]  # {"what", "path", "reason"}
    input_names: list[str]
    constants: dict[str, Any]  # non-tensor arguments the graph is specialized to (JSON-able repr)
    predicted: dict[str, float] = field(default_factory=dict)  # step_time, bubble_fraction, ...
    alternatives: list[dict[str, Any]] = field(default_factory=list)  # runners-up of the search
    tensor: dict[str, Any] = field(default_factory=dict)  # the TP layout (plan.tensor) when tensor_degree > 1
    cost_model: str = "roofline"  # "roofline" | "profile": how node times were priced (compile's `cost`)
    # input name -> the dim a step splits into microbatches (None: passed whole), "targets" -> the targets' dim;
    # empty: dim 0 everywhere (plans saved before batch_dim existed)
    batch_dims: dict[str, int | None] = field(default_factory=dict)
    # the pipeline rank of every stage (what the schedule runs: s % ranks, zbv's V) and the data-parallel wrapper
    # ("ddp" | "zero1" | "zero2" | "fsdp" | "hsdp"; "" at data degree 1); empty in plans saved before they were
    # recorded. data_parallel_shard: HSDP's shard group size (ranks that shard; the rest replicate), 0 otherwise.
    stage_ranks: list[int] = field(default_factory=list)
    data_parallel: str = ""
    data_parallel_shard: int = 0
    # False: the gradients are all-reduced after the last backward, not during it (ddp / zero1; plan.sharding)
    overlap_grad_reduce: bool = True
    reasons: list[str] = field(default_factory=list)  # why: recompute, microbatches, sp, cp, dp mode (plan.model)
    # context parallelism (plan.context): the sequence of every activation split over context_degree ranks;
    # `context` holds what re-derives the layout from the graph: {"balance": bool, "seq_dims": {input: dim}}
    context_degree: int = 1
    context: dict[str, Any] = field(default_factory=dict)
    # matrix-product node -> [pad of K, pad of N]: tensor-core GEMMs whose rows the applier pads to the device's
    # alignment and slices back (passes.align); at tensor degree > 1 only those the layout leaves whole
    padded_gemms: dict[str, list[int]] = field(default_factory=dict)
    # the optimizer state the memory and the optimizer step were priced with (compile's master_weights): fp32 moments
    # and masters, or moments in the parameters' dtype; False in plans saved before it was recorded
    master_weights: bool = False
    version: int = PLAN_VERSION

    @property
    def num_stages(self) -> int:
        """Pipeline stages: pipeline degree x stages per device."""
        return len(self.stages)

    @property
    def bottleneck_time(self) -> float:
        """Time of the slowest stage, StagePlan.time (seconds per step)."""
        return max(s.time for s in self.stages)

    @property
    def total_compute(self) -> float:
        """Sum of the stages' compute times (seconds per step)."""
        return sum(s.compute_time for s in self.stages)

    @property
    def balance(self) -> float:
        """bottleneck / (total compute / stages): 1.0 is a perfect split."""
        return self.bottleneck_time / (self.total_compute / self.num_stages) if self.total_compute else 1.0

    def summary(self) -> str:
        """The plan as a table: one row per stage, then the headline figures, runners-up and every fallback."""
        return _format_plan(self)

    def to_json(self) -> str:
        """The plan as JSON text (sorted keys, indent 1): identical for the same model and options; `from_json`
        reads it back equal."""
        return json.dumps(asdict(self), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a plan; a ValueError says what is wrong when the text is not a valid plan."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as e:
            raise ValueError(f"not a partitioner plan: invalid JSON ({e})") from None
        if not isinstance(data, dict) or "fingerprint" not in data or "stages" not in data:
            raise ValueError("not a partitioner plan: missing 'fingerprint' or 'stages'")
        if data.get("version") != PLAN_VERSION:
            raise ValueError(
                f"plan version {data.get('version')} is not supported (this partitioner reads {PLAN_VERSION})"
            )
        expected = {f.name for f in fields(cls)}
        unknown, missing = (
            set(data) - expected,
            {f.name for f in fields(cls) if f.name not in data}
            - {
                "predicted",
                "alternatives",
                "tensor",
                "cost_model",
                "batch_dims",
                "stage_ranks",
                "data_parallel",
                "data_parallel_shard",
                "overlap_grad_reduce",
                "reasons",
                "context_degree",
                "context",
                "padded_gemms",
                "master_weights",
            },
        )
        if unknown or missing:
            raise ValueError(
                f"not a partitioner plan: unknown fields {sorted(unknown)}, missing fields {sorted(missing)}"
            )
        try:
            stages = [StagePlan(**s) for s in data["stages"]]
            node_stage = {str(k): int(v) for k, v in data["node_stage"].items()}
            plan = cls(**{**data, "stages": stages, "node_stage": node_stage})
        except (TypeError, ValueError) as e:
            raise ValueError(f"corrupt partitioner plan: {e}") from None
        if [s.index for s in stages] != list(range(len(stages))):
            raise ValueError(f"corrupt partitioner plan: stage indices {[s.index for s in stages]} are not 0..n-1")
        outside = sorted({v for v in node_stage.values() if not 0 <= v < len(stages)})
        if outside:
            raise ValueError(f"corrupt partitioner plan: nodes are assigned to stages {outside} the plan does not have")
        counts = [sum(1 for v in node_stage.values() if v == s.index) for s in stages]
        if counts != [len(s.nodes) for s in stages]:
            raise ValueError("corrupt partitioner plan: node_stage disagrees with the stages' node lists")
        bad = sorted(n for n, pad in plan.padded_gemms.items() if n not in node_stage or not _pad_pair(pad))
        if bad:
            raise ValueError(
                f"corrupt partitioner plan: padded_gemms names {bad}, not planned nodes with [pad K, pad N]"
            )
        return plan


def _pad_pair(pad: Any) -> bool:
    return isinstance(pad, list) and len(pad) == 2 and all(isinstance(p, int) and p >= 0 for p in pad) and any(pad)


def graph_fingerprint(gm: fx.GraphModule) -> str:
    """Hash of the graph's structure and parameter shapes/dtypes (not values)."""
    h = hashlib.sha256()
    for n in gm.graph.nodes:
        target = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
        h.update(f"{n.op}|{n.name}|{target}|{[a.name for a in n.all_input_nodes]}\n".encode())
    for name, t in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}\n".encode())
    return h.hexdigest()[:16]


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _percent(x: float) -> str:
    """A fraction as a percentage with the digits it needs (0.0003 -> "0.03%", not "0.0%")."""
    return f"{100 * x:.3g}%" if x else "0%"


def _predicted_lines(p: dict[str, float]) -> list[str]:
    """The plan's predicted figures with units, the step's parts named (all are the cost model's predictions)."""
    if not p:
        return []
    out = []
    if "step_time" in p:
        parts = [("pipeline", "pipeline_time"), ("data-parallel sync", "data_parallel_sync"),
                 ("tied-weight sync", "tied_weight_sync"), ("optimizer step", "optimizer_step")]  # fmt: skip
        shown = [f"{name} {format_seconds(p[key])}" for name, key in parts if p.get(key)]
        out.append(f"predicted step: {format_seconds(p['step_time'])}" + (f" ({' + '.join(shown)})" if shown else ""))
    if "bubble_fraction" in p:
        out.append(f"predicted bubble: {_percent(p['bubble_fraction'])} of the pipeline's time")
    if "peak_memory" in p:
        out.append(f"predicted peak memory: {format_bytes(p['peak_memory'])} per device")
    if "model_flops" in p and "mfu" in p:
        out.append(
            f"predicted MFU: {_percent(p['mfu'])} ({p['model_flops']:.3g} model FLOPs per step over the devices' peak)"
        )
    known = {"step_time", "pipeline_time", "data_parallel_sync", "tied_weight_sync", "optimizer_step",
             "bubble_fraction", "peak_memory", "model_flops", "mfu", "ranked_step_time"}  # fmt: skip
    out += [f"predicted {key}: {value:.6g}" for key, value in sorted(p.items()) if key not in known]
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _format_plan(plan: Plan) -> str:
    """The plan as a table: one row per stage, then the headline figures and every fallback."""
    dev = plan.device_type
    lines = [
        f"Plan for {plan.model} on {plan.devices} x {dev['name']} "
        f"(pipeline {plan.pipeline_degree} x tensor {plan.tensor_degree}"
        + (" sequence parallel" if plan.tensor.get("sequence_parallel") else "")
        + (f" x context {plan.context_degree}" if plan.context_degree > 1 else "")
        + f" x data {plan.data_degree}; "
        f"{_count(plan.microbatches, 'microbatch', 'microbatches')}, {plan.schedule}"
        + (f", data parallel {plan.data_parallel}" if plan.data_degree > 1 and plan.data_parallel else "")
        + (" (gradients reduced after the backward)" if plan.data_degree > 1 and not plan.overlap_grad_reduce else "")
        + f"; {'training' if plan.training else 'inference'}"
        + (" with fp32 master weights" if plan.training and plan.master_weights else "")
        + f"; captured with {plan.capture}; {plan.cost_model} costs)",
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
                format_bytes(s.param_bytes),
                format_flops(s.flops),
                format_seconds(s.compute_time),
                format_seconds(s.comm_time),
                format_bytes(s.peak_memory),
                format_bytes(s.send_bytes),
                s.recompute,
            ]
        )
    header = ["stage", "nodes", "modules", "params", "forward", "compute", "comm", "memory", "sends", "recompute"]
    lines.append(_table(header, rows))
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
    lines += _predicted_lines(plan.predicted)
    shared: dict[tuple[int, ...], list[str]] = {}  # one module reused by several stages: grouped by its stages
    for name, stages in sorted(plan.tied_stages.items()):
        names = plan.tied_params.get(name)  # tied under several names, or one module reused by several stages
        if names:
            lines.append(f"tied parameter {name} ({', '.join(names)}) held by stages {stages}")
        else:
            shared.setdefault(tuple(stages), []).append(name)
    for stages, names in shared.items():
        lines.append(f"{_shared_names(names)} held by stages {list(stages)}")
    if plan.reasons:
        placed = plan.capture == "module-placement"  # (capture.placement.METHOD; schema imports no capture code)
        lines.append("why it is placed as it is:" if placed else "why it is laid out as it is:")
        lines += [f"  {r}" for r in plan.reasons]
    if plan.alternatives:
        # Runners-up are priced as the search ranked them (coarse stage boundaries); so is the chosen one here
        chosen = plan.predicted.get("ranked_step_time", plan.predicted.get("step_time"))
        basis = ""
        if chosen and chosen != plan.predicted.get("step_time"):
            basis = f"; each as ranked, on coarse stage boundaries; the chosen one ranked at {format_seconds(chosen)}"
        lines.append(f"runners-up (why the chosen layout wins{basis}):")
        for alt in plan.alternatives:
            what = (
                f"pp{alt['pp']} x tp{alt['tp']}{'+sp' if alt.get('sequence_parallel') else ''}"
                f"{f' x cp{cp}' if (cp := alt.get('cp') or 1) > 1 else ''} x dp{alt['dp']}, "
                f"{_count(alt['microbatches'], 'microbatch', 'microbatches')}, {alt['schedule']}"
            )
            if alt.get("data_parallel"):
                what += f", {alt['data_parallel']}"
            if alt.get("recompute"):
                what += f", recompute {alt['recompute']}"
            if "step_time" in alt:
                peak = alt.get("peak_memory", alt.get("peak_memory_gib", 0.0) * 2**30)
                ratio = alt["step_time"] / chosen if chosen else None
                if ratio is None:
                    versus = ""
                elif abs(ratio - 1) < 5e-4:  # a tie: the search keeps the lighter plan, or the first it priced
                    lighter = peak > plan.predicted.get("peak_memory", peak) * (1 + 1e-9)
                    versus = f" (a tie with the chosen {'ranked ' if basis else ''}step" + (
                        "; the chosen one holds less memory)" if lighter else ")"
                    )
                else:
                    versus = f" ({ratio:.3f}x the chosen {'ranked ' if basis else ''}step)"
                if "refined_step_time" in alt:  # refined as the chosen one was: the comparison that decided
                    refined = alt["refined_step_time"]
                    versus += (f"; refined {format_seconds(refined)} "
                               f"({refined / plan.predicted['step_time']:.3f}x the chosen step)")  # fmt: skip
                lines.append(f"  {what}: {format_seconds(alt['step_time'])}{versus}, peak {format_bytes(peak)}/device")
            else:
                lines.append(f"  {what}: {alt['note']}")
    if plan.padded_gemms:  # passes.align: what the applier changes in the graph, and why
        pads = ", ".join(
            f"{name} (" + " ".join(f"{dim} +{p}" for dim, p in zip("KN", pad) if p) + ")"
            for name, pad in sorted(plan.padded_gemms.items())
        )
        align = plan.device_type.get("gemm_alignment", 16)
        lines.append(f"padded GEMMs (rows not a multiple of {align} bytes, zero-padded and sliced back): {pads}")
    lines.append("fallbacks: " + ("none" if not plan.fallbacks else ""))
    for fb in plan.fallbacks:
        lines.append(f"  {fb['what'] or '<model>'}: {fb['path']} ({fb['reason']})")
    return "\n".join(lines)


def _shared_names(names: list[str]) -> str:
    """Parameters several stages read, in a few words: one by name; more by the module holding them all, else the
    first three and a count."""
    if len(names) == 1:
        return f"shared parameter {names[0]}"
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    if common and len(common) < min(len(p) for p in parts):
        return f"{len(names)} shared parameters of {'.'.join(common)}"
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(names)} shared parameters ({', '.join(names[:3])}{more})"
