"""plan.sharding: how data-parallel replicas hold their training state, and what keeping it in step costs.

Per parameter, with w its bytes, g its gradient's, o its optimizer state's (Adam: two moments, fp32 with an fp32
master copy of a 16-bit weight under master_weights: plan.graph.static_bytes_per_param) and d the ranks that shard
(the data degree; HSDP's shard group):

    mode     held per rank            collectives per step (ring; k ranks move (k - 1)/k of the bytes)
    ddp      w + g + o                all-reduce g once, bucketed into the last microbatch's backward
    zero1    w + g + o/d              as ddp, then all-gather the updated w after the optimizer step
    zero2    w + g/d + o/d            reduce-scatter g in every microbatch's backward; all-gather w once
    fsdp     w/d + g/d + o/d          all-gather w in every microbatch's forward and again in its backward;
                                      reduce-scatter g in every backward (ZeRO-3)
    hsdp     as fsdp over the shard   fsdp inside the shard group, then all-reduce the gradient shards
             group, replicated        across groups once per step
             across groups

These are Rajbhandari et al. 2020 ("ZeRO"), Fig. 1, with master weights: 16 bytes per parameter for
mixed-precision Adam under ddp, 4 + 12/d (zero1), 2 + 14/d (zero2), 16/d (fsdp); without them (bf16 moments) 8,
4 + 4/d, 2 + 6/d and 8/d. fsdp and zero2 also hold one layer's full gradient while it is reduced, and fsdp one
layer's full weights while they are used plus the next one's prefetched (`transient`).

Overlap: a collective that runs in a microbatch's forward or backward hides behind that compute (FSDP2 prefetches
the next layer's parameters, DDP all-reduces a bucket while the backward goes on), so it adds
max(first layer's share, collective - compute) to the action: the first layer's gather cannot hide. The tail
after the last backward (ddp's last bucket or all of it if the backward is too short, zero1's all-gather,
hsdp's all-reduce) adds to the step.

Not overlapped (`overlap_grad_reduce=False`, ddp and zero1): the gradients are all-reduced whole after the last
backward. Megatron-LM's own DDP did so before later versions added --overlap-grad-reduce: its train_step called
`allreduce_gradients()` once `forward_backward_func` had returned (the runs of Narayanan et al. 2021); so does
DeepSpeed's ZeRO-1, which hooks nothing into the backward (microsoft/DeepSpeed#1246). The search never prefers it
(it is never faster); it exists so such runs are priced, and run, as they ran.

Groups: Megatron's placement puts tp innermost, then dp: a dp group spans nodes when tp x dp > devices_per_node,
and its collectives then run at the inter-node bandwidth. HSDP's shard group is the dp ranks inside one node.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from partitioner.comm import all_gather_time, all_reduce_time
from partitioner.devices import DeviceSpec

__all__ = [
    "DDP_BUCKET_BYTES",
    "NON_OVERLAPPED_MODES",
    "DP_MODES",
    "DataParallelCost",
    "data_parallel_cost",
    "data_parallel_floor",
    "hsdp_shard",
    "optimizer_step_time",
    "state_divisors",
]

DP_MODES = ("ddp", "zero1", "zero2", "fsdp", "hsdp")  # least sharded (fastest) first
DDP_BUCKET_BYTES = 25 * 2**20  # DistributedDataParallel's default bucket_cap_mb
NON_OVERLAPPED_MODES = ("ddp", "zero1")  # the modes that may all-reduce after the backward (overlap_grad_reduce)


def hsdp_shard(tp: int, dp: int, devices_per_node: int) -> int:
    """HSDP's shard group: the dp ranks that fit in one node next to tp (0: no HSDP layout, the group would be all
    of dp or a single rank)."""
    shard = max(devices_per_node // tp, 1)
    return shard if 1 < shard < dp and dp % shard == 0 else 0


def state_divisors(mode: str, dp: int, shard: int = 0, *, split_backward: bool = False) -> tuple[int, int, int]:
    """(weights, gradients, optimizer state) divisors of `mode` over `dp` replicas (`shard`: HSDP's group).

    Under a schedule that splits the backward (zero-bubble, zbv) the runtime keeps FSDP's parameters and gradients
    gathered through the step (runtime.data_parallel: torch computes the weight gradients outside FSDP's hooks), so
    only the optimizer state is sharded there, as with zero1."""
    if mode not in DP_MODES and mode != "":
        raise ValueError(f"data_parallel={mode!r}: choose one of {DP_MODES}")
    d = shard if mode == "hsdp" else dp
    if split_backward and mode in ("zero2", "fsdp", "hsdp"):
        return (1, 1, d)
    return {
        "": (1, 1, 1),
        "ddp": (1, 1, 1),
        "zero1": (1, 1, d),
        "zero2": (1, d, d),
        "fsdp": (d, d, d),
        "hsdp": (d, d, d),
    }[mode]


@dataclass(frozen=True)
class DataParallelCost:
    """One stage's data-parallel figures: seconds added to each microbatch's forward and backward, seconds after
    the last backward, and bytes held transiently (a layer's full weights / gradients)."""

    forward: float = 0.0
    backward: float = 0.0
    tail: float = 0.0
    transient: float = 0.0


def _hidden(comm: float, compute: float, layers: int) -> float:
    """What a collective spread over `layers` layers adds to `compute` it overlaps (module docstring)."""
    if comm <= 0:
        return 0.0
    return max(comm / max(layers, 1), comm - compute)


def data_parallel_cost(
    mode: str,
    spec: DeviceSpec,
    *,
    tp: int,
    dp: int,
    weight_bytes: float,
    grad_bytes: float,
    forward: float,
    backward: float,
    layers: int,
    largest_layer: float,
    shard: int = 0,
    split_backward: bool = False,
    overlap_grad_reduce: bool = True,
) -> DataParallelCost:
    """A stage's DataParallelCost under `mode` (module docstring): `weight_bytes` / `grad_bytes` its unsharded
    parameters and gradients (per tp rank), `forward` / `backward` one microbatch's compute, `layers` how many
    layers its parameters are spread over, `largest_layer` the bytes of its largest layer's weights, `shard` HSDP's
    shard group (0: the one hsdp_shard gives), `split_backward` whether the schedule splits the backward (FSDP then
    keeps its state gathered: state_divisors), `overlap_grad_reduce` whether ddp / zero1 reduce during the backward
    (False: after it, whole; other modes always reduce during it)."""
    if dp <= 1 or mode in ("", None) or grad_bytes <= 0:
        return DataParallelCost()
    if not overlap_grad_reduce and mode not in NON_OVERLAPPED_MODES:
        raise ValueError(
            f"overlap_grad_reduce=False applies to {NON_OVERLAPPED_MODES} (one all-reduce after the backward); "
            f"data_parallel={mode!r} reduce-scatters during every backward"
        )
    node = spec.devices_per_node
    across = tp * dp > node  # the dp group leaves the node
    if mode in ("ddp", "zero1"):
        reduce = all_reduce_time(spec, grad_bytes, dp, internode=across)
        last_bucket = all_reduce_time(spec, min(grad_bytes, DDP_BUCKET_BYTES), dp, internode=across)
        tail = max(last_bucket, reduce - backward) if overlap_grad_reduce else reduce
        if mode == "zero1":
            tail += all_gather_time(spec, weight_bytes, dp, internode=across)
        return DataParallelCost(tail=tail)
    grad_share = largest_layer * grad_bytes / max(weight_bytes, 1.0)
    if mode == "zero2" and not split_backward:  # split: one FSDP2 group per stage, gathered all step, as fsdp's below
        scatter = all_gather_time(spec, grad_bytes, dp, internode=across)  # a reduce-scatter moves as much
        gather = all_gather_time(spec, weight_bytes, dp, internode=across)
        return DataParallelCost(backward=_hidden(scatter, backward, layers), tail=gather, transient=grad_share)
    shard = (shard or hsdp_shard(tp, dp, node)) if mode == "hsdp" else dp
    if shard <= 1:
        raise ValueError(f"hsdp needs a shard group of more than one rank inside a node (tp {tp}, dp {dp})")
    inside = tp * shard > node
    if split_backward:  # gathered once, reduced once (state_divisors)
        gather = all_gather_time(spec, weight_bytes, shard, internode=inside)
        scatter = all_gather_time(spec, grad_bytes, shard, internode=inside)
        tail = scatter
        if mode == "hsdp":
            tail += all_reduce_time(spec, grad_bytes / shard, dp // shard, internode=True)
        return DataParallelCost(forward=_hidden(gather, forward, layers), tail=tail)
    gather = all_gather_time(spec, weight_bytes, shard, internode=inside)
    scatter = all_gather_time(spec, grad_bytes, shard, internode=inside)
    tail = 0.0
    if mode == "hsdp":
        tail = all_reduce_time(spec, grad_bytes / shard, dp // shard, internode=True)
    return DataParallelCost(
        forward=_hidden(gather, forward, layers),
        backward=_hidden(gather + scatter, backward, layers),
        tail=tail,
        transient=2 * largest_layer + grad_share,
    )


def data_parallel_floor(
    mode: str,
    spec: DeviceSpec,
    *,
    tp: int,
    dp: int,
    weight_bytes: float,
    microbatches: int,
    element_size: int,
    shard: int = 0,
    split_backward: bool = False,
    overlap_grad_reduce: bool = True,
    master_weights: bool = False,
) -> float:
    """A lower bound on the step of a rank holding `weight_bytes` of trainable parameters (per tp rank) under
    `mode`, whatever its compute and its split into stages: each of its `microbatches` forwards and backwards lasts
    at least the collectives it runs (data_parallel_cost with no compute to hide them behind), its tail at least what
    no backward hides (DDP's last bucket, ZeRO's gathers), then its optimizer step. Every term grows with the bytes
    and splitting them over stages only adds latencies, so the rank holding the most (at least the average) bounds
    the step: what the search ranks layouts by before it plans them (FSDP over 64 ranks of a 175B model: 100 s of
    gathers a compute-only bound does not see)."""
    fo = state_divisors(mode, dp, shard, split_backward=split_backward)[2] if mode and dp > 1 else 1
    floor = optimizer_step_time(spec, weight_bytes, fo, element_size, master_weights)
    if dp <= 1 or not mode or weight_bytes <= 0:
        return floor
    kw = dict(tp=tp, dp=dp, weight_bytes=weight_bytes, grad_bytes=weight_bytes, layers=1, largest_layer=0.0,
              shard=shard, split_backward=split_backward, overlap_grad_reduce=overlap_grad_reduce)  # fmt: skip
    bare = data_parallel_cost(mode, spec, forward=0.0, backward=0.0, **kw)
    hidden = data_parallel_cost(mode, spec, forward=math.inf, backward=math.inf, **kw)
    return floor + microbatches * (bare.forward + bare.backward) + hidden.tail


def optimizer_step_time(
    spec: DeviceSpec, weight_bytes: float, divisor: int, element_size: int, master_weights: bool = False
) -> float:
    """Seconds of one Adam step over `weight_bytes` of parameters whose optimizer state is split `divisor` ways.

    Memory-bound: per parameter it reads the weight, the gradient (once more for the gradient norm that clipping
    needs), two moments and, for a 16-bit weight under `master_weights`, its fp32 master copy, and writes the weight,
    the moments and the master copy: 4 e + 4 s + 2 m bytes for element size e, moments of s bytes (4 under
    `master_weights`, else e: plan.graph.static_bytes_per_param) and m = 4 master bytes (0 for an fp32 weight or
    without master weights)."""
    if weight_bytes <= 0:
        return 0.0
    params = weight_bytes / element_size / max(divisor, 1)
    moment = 4 if master_weights else element_size
    master = 4 if master_weights and element_size < 4 else 0
    per_param = 4 * element_size + 4 * moment + 2 * master
    return params * per_param / spec.bytes_per_second() + spec.kernel_overhead
