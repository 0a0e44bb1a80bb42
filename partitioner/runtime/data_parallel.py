"""Data parallelism for pipeline stages: torch's DDP, ZeRO-1, or FSDP2 around each stage, as torch pipelining expects.

The modes (``partitioner.schedules.DATA_PARALLEL_MODES``; the plan records one in ``Plan.data_parallel``, and HSDP's
shard-group size in ``Plan.data_parallel_shard``), over a data-parallel group of dp ranks:

    mode    stage wrapper                             gradients                     optimizer state   params at rest
    ddp     DistributedDataParallel                   all-reduce                    replicated        replicated
    zero1   DistributedDataParallel                   all-reduce                    sharded over dp   replicated
    zero2   fully_shard(reshard_after_forward=False)  reduce-scatter                sharded over dp   sharded
    fsdp    fully_shard                               reduce-scatter                sharded over dp   sharded
    hsdp    fully_shard on a (replicate, shard) mesh  reduce-scatter + all-reduce   sharded over s    sharded over s

"zero1" differs from "ddp" only in the optimizer: ``make_optimizer`` builds torch's ``ZeroRedundancyOptimizer``
over the dp group (each rank steps its part of the parameters, then broadcasts them). "zero2" keeps a stage's
gathered parameters from its forward to its backward (no second all-gather; ZeRO-2's peak memory), "fsdp" frees
them after the forward (ZeRO-3; not under zero-bubble schedules, see ``reshard_after_forward``). "hsdp" shards
over groups of s = ``data_parallel_shard`` ranks and replicates across the dp / s groups (``hsdp_mesh``):
all-gathers stay inside a group, gradients are reduce-scattered in the group then all-reduced across groups.

``torch.distributed.pipelining`` knows both wrappers: with a ``DistributedDataParallel`` stage it runs every
microbatch's backward but the last under ``no_sync`` and lets the last one all-reduce the accumulated
gradients (bucketed, overlapped with the rest of that backward); with a ``fully_shard`` (FSDP2) stage it
all-gathers parameters before each forward/backward, skips gradient sync until the schedule's final
``REDUCE_GRAD`` action, then reduce-scatters, which keeps every gradient unsharded and every parameter gathered
from the first microbatch's backward to the step's end (w + g + o/d in zero2 and fsdp alike). So the runtime's
stages (``runtime.stage.DataParallelStage``) reduce-scatter in every microbatch's backward instead, each FSDP2
layer group as soon as the backward has passed it, accumulating 1/d gradient shards; fsdp / hsdp also reshard a
layer after its backward (the memory of ``plan.sharding``: zero2 w + g/d + o/d, fsdp w/d + g/d + o/d, plus one
layer's full weights or gradients in flight). For that each layer of a stage is its own FSDP2 group
(``layer_groups``), the stage root holding the rest. Schedules that split the backward (zero-bubble, zbv) keep
torch's behaviour and one group per stage (``plan.sharding.state_divisors``' ``split_backward``). All average
over the data-parallel group once, so a step over dp replicas equals one step over their concatenated batches.

Invariants:

* Parameters in ``exclude`` (tied weights: one Parameter may sit in two stages of one rank, or be owned by
  several pipeline ranks) are left out of every wrapper and stay plain tensors; the caller reduces their
  gradients itself (over the owners, then over dp), because two wrappers hooking one Parameter would reduce
  it twice, at the wrong times. The optimizer updates them like the others (ZeRO-1: on one dp rank, then
  broadcast), from gradients already equal on every replica, so they stay equal.
* Buffers are not synced each forward (DDP's ``forward_sync_buffers=False``): that would add a collective per
  microbatch, and the replicas start equal (same init or the same checkpoint); BatchNorm statistics are each
  replica's own, as with DDP's default off.
* FSDP shards are made from parameters that are already materialized on every replica (``fully_shard`` of a
  real module keeps this rank's dim-0 chunk and frees the rest): a stage's full weights exist transiently at
  start-up, never during training.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Collection, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from partitioner.plan.sharding import DDP_BUCKET_BYTES
from partitioner.schedules import DATA_PARALLEL_MODES, get_schedule

__all__ = [
    "DATA_PARALLEL_MODES",
    "all_reduce_gradients",
    "data_parallel_mode",
    "full_tensor",
    "hsdp_mesh",
    "hsdp_sizes",
    "layer_groups",
    "load_into",
    "make_optimizer",
    "reshard_after_forward",
    "sum_gradients",
    "wrap_stage",
]

_FSDP_MODES = ("zero2", "fsdp", "hsdp")


def data_parallel_mode(requested: str | None, schedule: str) -> str:
    """The data-parallel mode for `schedule` (partitioner.schedules.Schedule.data_parallel_mode)."""
    return get_schedule(schedule).data_parallel_mode(requested)


def hsdp_sizes(dp: int, shard: int) -> tuple[int, int]:
    """(replicate, shard) group sizes of HSDP over `dp` ranks sharded in groups of `shard`.

    >>> hsdp_sizes(8, 2)
    (4, 2)
    """
    if not 1 < shard < dp or dp % shard:
        raise ValueError(
            f"data_parallel='hsdp' shards over groups of data_parallel_shard={shard} ranks, which must divide the "
            f"data-parallel degree {dp} and lie strictly between 1 and {dp} (shard={dp} is 'fsdp', 1 is 'ddp')"
        )
    return dp // shard, shard


def hsdp_mesh(mesh: DeviceMesh, shard: int) -> DeviceMesh:
    """The 2-D ("dp_replicate", "dp_shard") mesh HSDP runs on: `mesh`'s "dp" dim unflattened into dp / shard
    replicas of `shard` consecutive dp ranks. Collective over `mesh` (creates the groups of both new dims)."""
    names = tuple(mesh.mesh_dim_names or ())
    replicate, shard = hsdp_sizes(mesh.size(names.index("dp")), shard)
    # torch's own way to split a mesh dim (torchtitan's ParallelDims does the same); it keeps the other dims
    split = mesh._unflatten("dp", (replicate, shard), ("dp_replicate", "dp_shard"))
    return split["dp_replicate", "dp_shard"]


def wrap_stage(
    module: nn.Module,
    mode: str,
    dp_mesh: DeviceMesh,
    exclude: Collection[nn.Parameter],
    *,
    split_backward: bool = False,
) -> nn.Module:
    """`module` wrapped for data parallelism over `dp_mesh` (1-D; 2-D (replicate, shard) for "hsdp", see
    ``hsdp_mesh``); `exclude` parameters are left out. `split_backward`: the schedule runs separate input and
    weight gradient actions (zero-bubble; see ``reshard_after_forward``). FSDP modes: ``fully_shard`` on each of
    ``layer_groups(module)`` first, then on `module` (the root: every other parameter), unless `split_backward`
    (one group per stage there)."""
    if mode not in DATA_PARALLEL_MODES:
        raise ValueError(f"data_parallel={mode!r}: choose one of {DATA_PARALLEL_MODES}")
    if (dp_mesh.ndim == 2) != (mode == "hsdp"):
        raise ValueError(f"data_parallel={mode!r} runs on a {2 if mode == 'hsdp' else 1}-D mesh, got {dp_mesh}")
    excluded = {id(p) for p in exclude}
    if mode in ("ddp", "zero1"):  # zero1: DDP's gradients; the optimizer is sharded (make_optimizer)
        from torch.nn.parallel import DistributedDataParallel

        names = [
            f"{prefix}.{name}" if prefix else name
            for prefix, sub in module.named_modules(remove_duplicate=False)
            for name, p in sub.named_parameters(recurse=False, remove_duplicate=False)
            if id(p) in excluded
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
        if not any(p.requires_grad and id(p) not in excluded for p in module.parameters()):
            return module  # nothing for DDP to reduce (it refuses such a module)
        # Buffers are not broadcast each forward (torch >= 2.13 names that forward_sync_buffers).
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_buffer_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(module, process_group=dp_mesh.get_group(), **no_buffer_sync)
    from torch.distributed.fsdp import fully_shard

    reshard = reshard_after_forward(mode, split_backward)
    if not split_backward:  # each layer its own FSDP group, before the root (FSDP2 shards bottom-up)
        for group in layer_groups(module, excluded):
            fully_shard(group, mesh=dp_mesh, reshard_after_forward=reshard)
    ignored = {p for p in module.parameters() if id(p) in excluded}
    return fully_shard(module, mesh=dp_mesh, reshard_after_forward=reshard, ignored_params=ignored or None)


def layer_groups(module: nn.Module, exclude: Collection[int] = ()) -> list[list[nn.Module]]:
    """The layers of a stage as FSDP groups: per layer (``plan.recompute.layer_path``: a module path up to its first
    list index, ``h.3``), the submodules its fx graph calls (``call_module``) that hold its parameters, in call order.

    The split keeps the original module paths, but a layer's own module (``h.3``) is a plain container the graph
    never calls: FSDP2, which gathers and frees on module forward hooks, groups the called leaves instead
    (``fully_shard([q, k, v, ...])``: gathered at the first one's forward, freed after the last one's, gradients
    reduce-scattered once the backward reaches the first one's inputs). Left to the root group (gathered for the
    whole stage): parameters outside every layer, those whose ids are in `exclude` (tied copies), those read by
    ``get_attr`` (no module forward to hook) or reachable from another layer or from outside one (shared), and
    modules called more than once; a whole layer when one of its called modules holds another, or when the graph
    writes the output of its last call in place (``_mutated_in_place``). `module` is searched for fx GraphModules
    (the stage modules); none (or export graphs, which read every parameter by ``get_attr``): no groups.
    """
    from torch import fx

    from partitioner.plan.recompute import layer_path

    graphs: dict[str, fx.GraphModule] = {}  # the outermost ones (one called by another is a leaf of it)
    for name, m in module.named_modules():
        if isinstance(m, fx.GraphModule) and not any(name.startswith(f"{g}.") or g == "" for g in graphs):
            graphs[name] = m
    exclude = set(exclude)
    out: list[list[nn.Module]] = []
    for gm in graphs.values():
        owners: dict[int, set[str | None]] = {}  # parameter -> the layers (None: outside) that reach it
        for path, sub in gm.named_modules(remove_duplicate=False):
            for _, p in sub.named_parameters(recurse=False, remove_duplicate=False):
                owners.setdefault(id(p), set()).add(layer_path(path))
        read_directly = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                *path, leaf = str(node.target).split(".")
                t = getattr(gm.get_submodule(".".join(path)), leaf, None)
                read_directly.add(id(t))
        calls: dict[int, int] = {}
        targets: list[tuple[str, nn.Module]] = []
        for node in gm.graph.nodes:
            if node.op == "call_module":
                sub = gm.get_submodule(str(node.target))
                calls[id(sub)] = calls.get(id(sub), 0) + 1
                targets.append((str(node.target), sub))
        groups: dict[str, list[nn.Module]] = {}
        for target, sub in targets:
            layer = layer_path(target)
            params = list(sub.parameters())
            if (
                layer is None
                or not params
                or calls[id(sub)] > 1
                or any(id(p) in exclude or id(p) in read_directly or owners.get(id(p)) != {layer} for p in params)
            ):
                continue
            members = groups.setdefault(layer, [])
            if not any(sub is m for m in members):
                members.append(sub)
        last: dict[str, fx.Node] = {}  # per layer, the call that completes its forward (FSDP's pre-backward hook)
        for node in gm.graph.nodes:
            if node.op == "call_module" and (layer := layer_path(str(node.target))) in groups:
                if any(gm.get_submodule(str(node.target)) is m for m in groups[layer]):
                    last[layer] = node
        for layer, members in groups.items():
            nested = any(s is not m and any(s is o for o in members) for m in members for s in m.modules())
            if not nested and not _mutated_in_place(gm, last[layer]):
                out.append(members)
    return out


# Tensor methods / functions whose result aliases their first argument (what an in-place op on it would reach).
_VIEWS = frozenset(
    "view view_as reshape reshape_as transpose permute t expand expand_as squeeze unsqueeze flatten unflatten narrow "
    "select split chunk unbind as_strided contiguous detach movedim swapaxes diagonal unfold getitem __getitem__ "
    "split_with_sizes view_as_real view_as_complex".split()
)
_INPLACE_OPERATORS = frozenset(
    getattr(operator, f"i{name}")
    for name in "add sub mul truediv floordiv mod pow and_ or_ xor lshift rshift matmul".split()
    if hasattr(operator, f"i{name}")
) | {operator.setitem}


def _mutated_in_place(gm: Any, node: Any) -> bool:
    """Whether the graph writes `node`'s output (or a view of it) in place. FSDP2 gathers a group for its backward
    from a hook on the output of the module that completes the group's forward; an in-place op on that output, a
    view, drops the hook (FSDP warns), and a resharded layer would then run its backward on freed storage."""
    aliases, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            if user.op not in ("call_method", "call_function", "call_module"):
                continue
            if user.op == "call_module":
                if (
                    getattr(gm.get_submodule(str(user.target)), "inplace", False)
                    and user.args[:1]
                    and user.args[0] in aliases
                ):
                    return True
                continue
            target = user.target
            name = target if isinstance(target, str) else getattr(target, "__name__", "")
            first = user.args[0] if user.args else None
            if first not in aliases:
                continue
            schema = getattr(target, "_schema", None)
            if (
                target in _INPLACE_OPERATORS
                or (name.endswith("_") and not name.endswith("__"))
                or user.kwargs.get("inplace") is True
                or (schema is not None and schema.is_mutable)
            ):
                return True
            if name in _VIEWS or name.split(".")[0] in _VIEWS:
                aliases.add(user)
                todo.append(user)
    return False


def reshard_after_forward(mode: str, split_backward: bool) -> bool:
    """Whether FSDP2 frees a stage's gathered parameters after each forward (and gathers them again for its
    backward): in "fsdp" and "hsdp" (ZeRO-3), except under a split backward; never in "zero2".

    The split backward's weight action takes ``submod.parameters()`` as they are when it runs, and FSDP2's own
    post-forward reshard, which torch pipelining's UNSHARD / RESHARD bookkeeping does not track, may by then have
    swapped the gathered parameters the autograd graph holds for their shards. Measured on zbv (gloo, dp=2 x
    pp=2, fsdp resharding after forward): losses 0.02 off single-process training. So there the parameters stay
    gathered from the schedule's UNSHARD to its RESHARD, zero2's memory. (A default ``fully_shard`` does the
    same: as a root module it skips the post-forward reshard; torchtitan turns it off under pipelining too.)
    """
    return mode in ("fsdp", "hsdp") and not split_backward


def make_optimizer(
    params: Iterable[nn.Parameter],
    optimizer_class: type[torch.optim.Optimizer],
    mode: str,
    dp_group: dist.ProcessGroup | None,
    **defaults: Any,
) -> torch.optim.Optimizer:
    """An `optimizer_class` over `params` for data-parallel `mode` (`defaults`: its keyword arguments, e.g. lr).

    "zero1" with a dp group: torch's ``ZeroRedundancyOptimizer`` over `dp_group` (each rank keeps the state of
    its part of the parameters, steps it, and broadcasts it). FSDP modes: the sharded (DTensor) parameters and
    the plain ones (excluded tied copies) in two parameter groups, so foreach / fused kernels never mix them.
    Otherwise the plain class. No parameters (a rank whose stages read none; then every rank of its dp group, which
    runs the same stages, has none): the class over one empty group, whose step does nothing, so the same training
    loop runs on every rank (torch's optimizers refuse an empty parameter list).
    """
    params = list(params)
    if not params:
        return optimizer_class([{"params": []}], **defaults)
    if mode == "zero1" and dp_group is not None and dist.get_world_size(dp_group) > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class, process_group=dp_group, **defaults)
    if mode in _FSDP_MODES:
        sharded = [p for p in params if isinstance(p, DTensor)]
        plain = [p for p in params if not isinstance(p, DTensor)]
        if sharded and plain:
            return optimizer_class([{"params": sharded}, {"params": plain}], **defaults)
    return optimizer_class(params, **defaults)


def all_reduce_gradients(
    params: Iterable[nn.Parameter], group: dist.ProcessGroup, *, bucket_bytes: int = DDP_BUCKET_BYTES
) -> int:
    """Average the gradients of `params` over `group` after the backward, in flat buckets of one dtype of at most
    `bucket_bytes` (one tensor larger than that is a bucket of its own); the number of all-reduces it ran.

    What a stage runs instead of DDP under ``overlap_grad_reduce=False`` (plan.sharding): nothing is reduced during
    the backward, every gradient once after it, as Megatron-LM's own DDP did. Parameters without a gradient are
    skipped: every replica runs the same stage graph, so the same ones have none on each. Collective over `group`.
    """
    grads = [p.grad for p in params if p.grad is not None]
    return _all_reduce_buckets(grads, group, bucket_bytes, dist.get_world_size(group))


def sum_gradients(params: Iterable[nn.Parameter], group: dist.ProcessGroup) -> int:
    """Sum the gradients of `params` over `group` in place, in as few calls as their dtypes allow (one flat buffer
    each, up to DDP's bucket size); the number of all-reduces it ran. A sharded (FSDP) gradient sums its local shard:
    the ranks of `group` hold the same shard of the same parameter (tensor parallelism's replicated ones).
    Parameters without a gradient are skipped: every rank of `group` runs the same stage graph. Collective."""
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
    return _all_reduce_buckets(grads, group, DDP_BUCKET_BYTES, 1)


def _all_reduce_buckets(grads: list[torch.Tensor], group: dist.ProcessGroup, bucket_bytes: int, divisor: int) -> int:
    """Sum `grads` over `group` in flat buckets of one dtype of at most `bucket_bytes`, then divide by `divisor`."""
    buckets: list[list[torch.Tensor]] = []
    for dtype in sorted({g.dtype for g in grads}, key=str):
        current: list[torch.Tensor] = []
        size_of_current = 0
        for g in (g for g in grads if g.dtype == dtype):
            nbytes = g.numel() * g.element_size()
            if current and size_of_current + nbytes > bucket_bytes:
                buckets.append(current)
                current, size_of_current = [], 0
            current.append(g)
            size_of_current += nbytes
        if current:
            buckets.append(current)
    with torch.no_grad():
        for bucket in buckets:
            flat = torch.cat([g.reshape(-1) for g in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            if divisor != 1:
                flat /= divisor
            offset = 0
            for g in bucket:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
    return len(buckets)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a possibly FSDP-sharded tensor (collective over its mesh when it is a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def load_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy the full value `src` into `dst`, a plain tensor or this rank's shard of a DTensor (no communication)."""
    with torch.no_grad():
        if isinstance(dst, DTensor):
            local = distribute_tensor(src.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
            dst.to_local().copy_(local.to_local())
        else:
            dst.copy_(src)
