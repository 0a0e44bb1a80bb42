"""plan/placement: which modules a module-placement capture places, on which stage, and what that costs.

The recorded run (capture.placement.CallRecord) is a call tree, not a graph: the model's own Python code (the
"top-level code": the root's forward and the forward of every module that is not placed) runs on the driver, the
rank that holds stage 0, and each call of a placed module (a "unit") runs on the unit's stage, its tensor inputs sent
there and its outputs sent back. So:

- A module whose call writes a tensor argument in place (nn.ReLU(inplace=True), `x += ...`) is never a unit: on
  another stage the write would land on a copy. Its code runs with its caller's (its submodules may be units).
- Units start as the modules the root's forward calls directly; a unit that costs more than a device's fair share
  (the whole run's time / devices) is replaced by the modules its own calls call directly (its forward joins the
  top-level code), until none is too large or none can be split further (`choose_units`). A unit's cost covers
  every call of it made from top-level code; calls made inside another unit's call run there.
- Stages are contiguous runs of units in the order of their first call (a unit called again later, as in a
  data-dependent loop, runs on its one stage each time), stage 0 holding the top-level code too (its compute, the
  activations it saves, the parameters no unit holds). Every stage fits the memory limit with all microbatches in
  flight (the runtime runs every forward, then every backward: GPipe's order).
- A parameter used by code on another stage than the one holding it (a tied LM head reading the embedding's weight
  in top-level code; a unit also called inside another unit's call) is held by each such stage, its gradients
  summed after the backward (`shared_parameters`, `Plan.tied_stages`); the copies' training state counts in those
  stages' memory and the sums in the step (after the split is chosen: the DP does not see them).
- A step is priced with the simulator's GPipe replay over those stages: a stage's forward and backward each include
  the transfers of its units' inputs and outputs to and from the driver (none on stage 0). The layout with the least
  predicted step wins, fewer stages on a tie: with one microbatch the calls run one after another whatever the
  split, so more stages only buy memory.

Costs are the roofline of the cost model (partitioner.cost) on each call's counted FLOPs and the bytes it must move
(its inputs, outputs and parameters; the backward twice the forward's FLOPs): a floor for memory-bound code, whose
real traffic the recording does not see. Microbatches: the recorded batch's figures divided by the count (a call's
parameters are read once per microbatch).
Example: four equal Linear children on 4 devices, one microbatch: one stage (no transfers); with a memory limit
below their weights, as few stages as fit.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from partitioner.capture.placement import METHOD, CallRecord
from partitioner.comm import all_reduce_time, p2p_time
from partitioner.cost import _roofline
from partitioner.devices import DeviceSpec
from partitioner.plan.graph import static_bytes_per_param
from partitioner.plan.schema import Plan, StagePlan
from partitioner.simulate import SimResult, StageCost, simulate
from partitioner.units import format_bytes

__all__ = [
    "PlacementLayout",
    "Unit",
    "choose_units",
    "placement_fingerprint",
    "plan_placement",
    "shared_parameters",
    "units_of",
]

TOP_LEVEL = "<top-level code>"  # the model's own Python code, run by the driver on stage 0


@dataclass(frozen=True)
class Unit:
    """A placed module: its calls from top-level code and their figures summed over the recorded run."""

    path: str
    calls: tuple[int, ...]  # indices of its calls made from top-level code, in order
    flops: int
    saved_bytes: int
    io_bytes: int  # its calls' tensor inputs + outputs
    dtype: str


@dataclass(frozen=True)
class PlacementLayout:
    """Units by stage and what the simulator made of them."""

    stages: list[list[Unit]]
    costs: list[StageCost]
    simulation: SimResult
    params: list[list[str]]  # parameter / buffer names each stage holds (a shared one on each stage using it)
    comms: list[float]  # per stage, seconds per microbatch and direction of transfers (in `costs`' forward / backward)
    shared: dict[str, list[int]] = field(default_factory=dict)  # shared_parameters: name -> the stages using it
    shared_sync: float = 0.0  # seconds summing the shared parameters' gradients after the backward

    @property
    def step_time(self) -> float:
        """The predicted step: the GPipe replay, then the shared parameters' gradient sums."""
        return self.simulation.step_time + self.shared_sync


def _owners(record: CallRecord, units: set[str]) -> dict[int, int]:
    """Call index -> the call of a unit it runs in (the outermost on its chain), for calls inside some unit."""
    owner: dict[int, int] = {}
    for c in record.calls[1:]:
        parent = owner.get(c.parent)
        if parent is not None:
            owner[c.index] = parent
        elif c.path in units:
            owner[c.index] = c.index
    return owner


def units_of(record: CallRecord, paths: set[str]) -> list[Unit]:
    """The units `paths` make, in order of first call (a path whose every call happens inside another unit's
    call is no unit)."""
    owner = _owners(record, paths)
    own: dict[str, list[int]] = {}
    for index, o in owner.items():
        if index == o:
            own.setdefault(record.calls[index].path, []).append(index)
    units = []
    for path, calls in sorted(own.items(), key=lambda kv: kv[1][0]):
        figures = [record.calls[i] for i in calls]
        units.append(
            Unit(path, tuple(calls), sum(c.flops for c in figures), sum(c.saved_bytes for c in figures),
                 sum(c.in_bytes + c.out_bytes for c in figures), figures[0].dtype)
        )  # fmt: skip
    return units


def _call_times(flops: float, nbytes: float, dtype: str, spec: DeviceSpec, training: bool) -> tuple[float, float]:
    """(forward, backward) seconds of a call: the roofline, the backward twice the forward's FLOPs and bytes."""
    forward = _roofline(flops, nbytes, dtype, spec)
    return forward, (_roofline(2 * flops, 2 * nbytes, dtype, spec) if training else 0.0)


def _bytes(record: CallRecord, name: str) -> float:
    """The bytes of parameter / buffer `name`."""
    numel, size, _, _ = record.tensors[name]
    return float(numel * size)


def _param_bytes(record: CallRecord, path: str) -> float:
    prefix = f"{path}." if path else ""
    return sum(_bytes(record, name) for name in record.tensors if name.startswith(prefix))


def choose_units(record: CallRecord, spec: DeviceSpec, devices: int) -> list[Unit]:
    """Units for `devices` (module docstring): the root's direct calls, the costliest split while it costs more than
    the whole run / devices and its calls call modules."""
    root = record.calls[0]

    def cost(u: Unit) -> float:
        return sum(_call_times(u.flops, u.io_bytes + _param_bytes(record, u.path), u.dtype, spec, record.training))

    def descend(u: Unit) -> None:  # u's code joins the top-level code; the modules its calls call may be units
        paths.discard(u.path)
        paths.update(record.calls[j].path for i in u.calls for j in record.children.get(i, []))

    paths = {record.calls[i].path for i in record.children.get(0, [])}
    while True:
        units = units_of(record, paths)
        writers = [u for u in units if _writes_inputs(record, u)]
        if writers:  # never placed: its code runs with its caller's
            for u in writers:
                descend(u)
            continue
        splittable = [u for u in units if any(record.children.get(i) for i in u.calls)]
        if not splittable:
            return units
        top = max(root.flops - sum(u.flops for u in units), 0)  # the top-level code's own FLOPs
        total = sum(map(cost, units)) + sum(_call_times(top, 0.0, root.dtype, spec, record.training))
        big = max(splittable, key=cost)
        if cost(big) <= total / devices:
            return units
        descend(big)


def _writes_inputs(record: CallRecord, u: Unit) -> bool:
    """Whether a call of u wrote a tensor it was given in place (then u may not be placed: module docstring)."""
    return any(record.calls[i].writes_inputs for i in u.calls)


def placement_fingerprint(record: CallRecord) -> str:
    """What a saved placement plan must match: the recorded calls' module paths in order and every tensor's shape."""
    h = hashlib.sha256()
    for c in record.calls:
        h.update(f"{c.path}|{c.parent}\n".encode())
    for name, (n, size, grad, buffer) in sorted(record.tensors.items()):
        h.update(f"{name}|{n}|{size}|{grad}|{buffer}\n".encode())
    return h.hexdigest()[:16]


class _Pricer:
    """Per-microbatch stage costs of a split of units (module docstring), each in O(1) from prefix sums (the DP asks
    for O(stages x units^2) of them)."""

    def __init__(self, record: CallRecord, units: list[Unit], spec: DeviceSpec, microbatches: int):
        self.record, self.units, self.spec, self.m = record, units, spec, microbatches
        training = record.training
        owned: set[str] = set()
        self.params: list[list[str]] = []
        for u in units:  # a tensor two units share (tied) is held by the first
            prefix = f"{u.path}." if u.path else ""
            names = [n for n in record.tensors if n.startswith(prefix) and n not in owned]
            owned.update(names)
            self.params.append(names)
        self.top_params = [n for n in record.tensors if n not in owned]
        self.top_static = sum(self.static_of(n) for n in self.top_params)
        read = [sum(_bytes(record, n) for n in names) for names in self.params]
        times = [
            _call_times(u.flops / self.m, u.io_bytes / self.m + len(u.calls) * r, u.dtype, spec, training)
            for u, r in zip(units, read)
        ]
        root = record.calls[0]
        self.top_times = _call_times(max(root.flops - sum(u.flops for u in units), 0) / self.m, 0.0, root.dtype, spec,
                                     training)  # fmt: skip
        self.top_saved = max(root.saved_bytes - sum(u.saved_bytes for u in units), 0) / self.m
        self.static = [sum(self.static_of(n) for n in names) for names in self.params]
        self._sums = {
            key: np.concatenate([[0.0], np.cumsum(values, dtype=float)])
            for key, values in {
                "forward": [t[0] for t in times], "backward": [t[1] for t in times],
                "io": [u.io_bytes / self.m for u in units], "calls": [len(u.calls) for u in units],
                "saved": [u.saved_bytes / self.m for u in units], "static": self.static,
            }.items()
        }  # fmt: skip

    def _sum(self, key: str, lo: int, hi: int) -> float:
        return float(self._sums[key][hi] - self._sums[key][lo])

    def static_of(self, name: str) -> float:
        """Bytes a copy of parameter / buffer `name` holds for the step (weights, gradients, optimizer state)."""
        n, size, grad, buffer = self.record.tensors[name]
        return static_bytes_per_param(n, size, training=self.record.training and grad, is_buffer=buffer,
                                      master_weights=self.record.master_weights)  # fmt: skip

    def comm(self, index: int, lo: int, hi: int) -> float:
        """Seconds per microbatch and direction to send units[lo:hi]'s inputs from the driver and their outputs back
        (the gradients the same way in the backward); nothing on the driver's own stage 0."""
        return 0.0 if index == 0 else p2p_time(self.spec, self._sum("io", lo, hi), 2 * self._sum("calls", lo, hi))

    def stage(self, index: int, lo: int, hi: int) -> StageCost:
        """Stage `index` holding units[lo:hi] (stage 0 with the top-level code)."""
        top = index == 0
        comm = self.comm(index, lo, hi)
        return StageCost(
            forward=self._sum("forward", lo, hi) + (self.top_times[0] if top else 0.0) + comm,
            backward=self._sum("backward", lo, hi) + (self.top_times[1] if top else 0.0) + comm
            if self.record.training
            else 0.0,
            activation_bytes=self._sum("saved", lo, hi) + (self.top_saved if top else 0.0),
            static_bytes=self._sum("static", lo, hi) + (self.top_static if top else 0.0),
        )

    def memory(self, cost: StageCost) -> float:
        return cost.static_bytes + self.m * cost.activation_bytes


def _splits(pricer: _Pricer, stages: int, limit: float) -> list[int] | None:
    """The boundaries (stage s holds units[b[s]:b[s+1]]) of the contiguous split into `stages` non-empty stages with
    the least largest stage time that fits `limit` (exact DP), or None when none fits."""
    n = len(pricer.units)
    inf = float("inf")
    # best[s][j]: least bottleneck of units[:j] in s stages; stage index s-1 is the last of them
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    parent = [[-1] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for s in range(1, stages + 1):
        for j in range(s, n - (stages - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf:
                    continue
                cost = pricer.stage(s - 1, i, j)
                if pricer.memory(cost) > limit:
                    continue
                value = max(best[s - 1][i], cost.forward + cost.backward)
                if value < best[s][j]:
                    best[s][j], parent[s][j] = value, i
    if best[stages][n] == inf:
        return None
    bounds, j = [n], n
    for s in range(stages, 0, -1):
        j = parent[s][j]
        bounds.append(j)
    return bounds[::-1]


def plan_layout(record: CallRecord, units: list[Unit], spec: DeviceSpec, devices: int, microbatches: int,
                memory_limit: float, stages: int | None = None) -> PlacementLayout:  # fmt: skip
    """The split of `units` over at most `devices` stages (exactly `stages` when given) with the least predicted
    step that fits `memory_limit`. Raises ValueError naming the memory needed when no split fits."""
    pricer = _Pricer(record, units, spec, microbatches)
    counts = [stages] if stages else range(1, min(devices, max(len(units), 1)) + 1)
    best: PlacementLayout | None = None
    for count in counts:
        if count > max(len(units), 1):
            raise ValueError(f"pipeline={count} needs {count} placed modules; this model has {len(units)} to place")
        bounds = _splits(pricer, count, memory_limit) if units else [0, 0]
        if bounds is None:
            continue
        layout = _fixed_layout(pricer, units, bounds, spec, microbatches)
        if max(layout.simulation.peak_memory) > memory_limit:  # the shared parameters' copies do not fit
            continue
        if best is None or layout.step_time < best.step_time * (1 - 1e-9):
            best = layout
    if best is None:
        least = max(pricer.static) if pricer.static else pricer.top_static
        raise ValueError(
            f"no placement of the model's modules over {devices} devices fits {format_bytes(memory_limit)} per device "
            f"with {microbatches} microbatch(es) in flight (its largest placed module alone holds "
            f"{format_bytes(least)} of weights and training state): add devices, raise memory_limit, or use more "
            f"microbatches"
        )
    return best


def plan_placement(
    record: CallRecord,
    *,
    model_name: str,
    devices: int,
    spec: DeviceSpec,
    microbatches: int,
    memory_limit: float,
    pipeline: int | None,
    input_names: Sequence[str],
    constants: dict,
    fallbacks: list[dict[str, str]],
    saved: Plan | None = None,
) -> tuple[Plan, PlacementLayout]:
    """The Plan of a module-placement capture (module docstring); `saved`: a placement plan to apply instead
    (its units and stages, checked against the recording; ValueError when it was made for another model)."""
    fingerprint = placement_fingerprint(record)
    if saved is not None:
        if saved.capture != METHOD or saved.fingerprint != fingerprint:
            raise ValueError(
                f"the saved plan was made for another model (or capture): its fingerprint {saved.fingerprint} "
                f"({saved.capture}) differs from this model's {fingerprint} ({METHOD}); plan again"
            )
        paths = [p for s in saved.stages for p in s.nodes]
        units = units_of(record, set(paths))
        pricer = _Pricer(record, units, spec, saved.microbatches)
        bounds = [0]
        for s in saved.stages:
            bounds.append(bounds[-1] + len(s.nodes))
        if [u.path for u in units] != paths:
            raise ValueError("the saved plan's placed modules are not called in its order by this model; plan again")
        writers = [u.path for u in units if _writes_inputs(record, u)]
        if writers:
            raise ValueError(
                f"the saved plan places {writers[0]!r}, which writes a tensor it is given in place (on another stage "
                f"the write would land on a copy): plan again"
            )
        layout = _fixed_layout(pricer, units, bounds, spec, saved.microbatches)
        microbatches = saved.microbatches
        fallbacks = [f for f in saved.fallbacks if f["path"] == METHOD]  # why the plan was made this way
    else:
        units = choose_units(record, spec, devices)
        layout = plan_layout(record, units, spec, devices, microbatches, memory_limit, stages=pipeline)
    return _to_plan(record, layout, model_name=model_name, fingerprint=fingerprint, devices=devices, spec=spec,
                    microbatches=microbatches, memory_limit=memory_limit, input_names=input_names,
                    constants=constants, fallbacks=fallbacks), layout  # fmt: skip


def _fixed_layout(pricer: _Pricer, units: list[Unit], bounds: list[int], spec: DeviceSpec, m: int) -> PlacementLayout:
    """The layout with stage s holding units[bounds[s]:bounds[s + 1]] (stage 0 also the top-level code), replayed."""
    count = len(bounds) - 1
    costs = [pricer.stage(s, bounds[s], bounds[s + 1]) for s in range(count)]
    held = [sum((pricer.params[i] for i in range(bounds[s], bounds[s + 1])), []) for s in range(count)]
    held[0] = pricer.top_params + held[0]
    split = [units[bounds[s] : bounds[s + 1]] for s in range(count)]
    shared = shared_parameters(pricer.record, split, held)
    copies = [0.0] * count  # the training state of the shared parameters' copies each stage holds besides its own
    for name, stages in shared.items():
        for s in stages:
            if name not in held[s]:
                held[s].append(name)
                copies[s] += pricer.static_of(name)
    costs = [dataclasses.replace(c, static_bytes=c.static_bytes + extra) for c, extra in zip(costs, copies)]
    sim = simulate(costs, num_microbatches=m, schedule="gpipe", blocking_sends=not spec.overlaps_comm)
    # After the backward, each shared parameter's gradient is summed over the stages holding it (one after another)
    sync = sum(all_reduce_time(spec, _bytes(pricer.record, name), len(stages)) for name, stages in shared.items())
    comms = [pricer.comm(s, bounds[s], bounds[s + 1]) for s in range(count)]
    return PlacementLayout(split, costs, sim, held, comms, shared, sync)


def shared_parameters(record: CallRecord, split: list[list[Unit]], held: list[list[str]]) -> dict[str, list[int]]:
    """Trainable parameter -> the stages whose code uses it, where more than the stage holding it does: a tied LM
    head reading the embedding's weight in top-level code, a placed module also called inside another placed
    module's call. Each of those stages keeps a copy and the copies' gradients are summed after the backward (as
    tied weights in a pipeline). A call's reads count on the stage its code runs on: its unit's, or stage 0's for
    top-level code."""
    stage_of = {u.path: s for s, units in enumerate(split) for u in units}
    owner = _owners(record, set(stage_of))
    holder = {name: s for s, names in enumerate(held) for name in names}
    users: dict[str, set[int]] = {}
    for c in record.calls:
        o = owner.get(c.index)
        stage = stage_of[record.calls[o].path] if o is not None else 0
        for name in c.reads:
            if name in holder and record.tensors[name][2]:  # requires grad: buffers are not summed
                users.setdefault(name, {holder[name]}).add(stage)
    return {name: sorted(stages) for name, stages in sorted(users.items()) if len(stages) > 1}


def _to_plan(record: CallRecord, layout: PlacementLayout, *, model_name: str, fingerprint: str, devices: int,
             spec: DeviceSpec, microbatches: int, memory_limit: float, input_names: Sequence[str], constants: dict,
             fallbacks: list[dict[str, str]]) -> Plan:  # fmt: skip
    m = microbatches
    stages = []
    for s, (units, cost, params) in enumerate(zip(layout.stages, layout.costs, layout.params)):
        comm = layout.comms[s] * (2 if record.training else 1)  # forward, and the gradients back
        paths = [u.path for u in units] or [TOP_LEVEL]
        stages.append(
            StagePlan(
                index=s,
                nodes=[u.path for u in units],
                modules=paths[:1] if len(paths) == 1 else [paths[0], paths[-1]],
                params=params,
                param_bytes=sum(_bytes(record, n) for n in params),
                flops=float(sum(u.flops for u in units) + (_top_flops(record, layout) if s == 0 else 0)),
                compute_time=m * (cost.forward + cost.backward - comm),
                comm_time=m * comm,
                peak_memory=layout.simulation.peak_memory[s],
                send_bytes=float(sum(u.io_bytes for u in units)) if s else 0.0,
                activation_bytes=cost.activation_bytes * m,
                overlaps_comm=False,  # the driver waits for each call's outputs
            )
        )
    called = {c.path for c in record.calls}
    never = sorted(
        {name.rsplit(".", 1)[0] for name in record.tensors if "." in name and name.rsplit(".", 1)[0] not in called}
    )
    why = "not called in the recorded run: its weights stay with the top-level code on stage 0, where a call of it on "
    why += "other inputs runs"
    notes = [{"what": path, "path": "top-level code", "reason": why} for path in never]
    inside = _owners(record, {u.path for units in layout.stages for u in units})  # calls running in a unit's call
    writers = sorted({c.path for c in record.calls[1:] if c.writes_inputs and c.index not in inside})
    why = "writes a tensor it is given in place, which on another stage would write a copy: it runs with its caller"
    notes += [{"what": path, "path": "top-level code", "reason": why} for path in writers]
    sim = layout.simulation
    reasons = [
        "captured by running the forward (module placement): the model's own code runs on stage 0's device, each "
        "placed module's calls on its stage",
        f"{m} microbatch(es): no graph proves that the forward's control flow treats samples independently, so the "
        "batch is split only when `microbatches` asks for it (each microbatch then takes its own branches)",
    ]
    return Plan(
        model=model_name,
        fingerprint=fingerprint,
        capture=METHOD,
        devices=devices,
        device_type=spec.to_dict(),
        pipeline_degree=len(stages),
        tensor_degree=1,
        data_degree=1,
        microbatches=m,
        schedule="gpipe",
        training=record.training,
        master_weights=record.master_weights,
        memory_limit=memory_limit,
        stages=stages,
        node_stage={u.path: s for s, units in enumerate(layout.stages) for u in units},
        tied_params={},
        tied_stages=layout.shared,
        fallbacks=fallbacks + notes,
        input_names=list(input_names),
        constants=constants,
        predicted={
            "step_time": layout.step_time,
            "pipeline_time": sim.step_time,
            "tied_weight_sync": layout.shared_sync,
            "bubble_fraction": sim.bubble_fraction,
            "peak_memory": max(sim.peak_memory),
        },
        stage_ranks=list(range(len(stages))),
        reasons=reasons,
    )


def _top_flops(record: CallRecord, layout: PlacementLayout) -> int:
    return max(record.calls[0].flops - sum(u.flops for units in layout.stages for u in units), 0)
