"""distributed runtime: one process per pipeline rank, stages run by torch.distributed.pipelining.

Each rank keeps only its own stages of a compiled model (``Schedule.stage_ranks``: ``s % ranks``, V for zbv),
materializes only their parameters (``partitioner.runtime.materialize``), wraps each in a ``PipelineStage`` and
drives them with torch's own schedule classes (``GPipe``, ``1F1B``, ``Interleaved1F1B``, ``LoopedBFS``,
``InterleavedZeroBubble``, and ``ZBVZeroBubble`` with its V placement: rank r holds stages r and 2R-1-r). This
module writes no pipeline engine: it adds what torch leaves to the caller.

    # train.py -- torchrun --nproc-per-node 2 train.py   (same code, or the same saved plan, on every rank)
    meta, init = record_init(lambda: zoo.get("gpt3-tiny"), seed=0)    # weight-free model + replayable init
    cm = partitioner.compile(meta, devices=2, example_inputs=x_meta, plan=open("plan.json").read())
    pipe = cm.distributed(weights=init)                                # only this rank's shard is real
    opt = pipe.make_optimizer(torch.optim.AdamW, lr=3e-4)               # sharded where the plan's mode says
    for x, y in batches:
        loss = pipe.step((x,), y, loss_fn)                             # forward + backward, all microbatches
        opt.step(); pipe.zero_grad()

Contracts (what ``DistributedPipeline`` guarantees):

* Numerics. ``step(inputs, targets, loss_fn)`` splits the batch into ``microbatches`` equal chunks along dim 0
  (torch's ``tensor_split``), computes ``loss_fn(output_i, target_i)`` per chunk on the last stage and leaves in
  every held parameter's ``.grad`` the gradient of ``mean_i loss_i`` (the schedule's per-microbatch backward,
  then one division by the number of microbatches, done here once per parameter so a parameter shared by two
  local stages is not divided twice). Returns ``mean_i loss_i`` (detached), on every rank when
  ``broadcast_loss`` (the default), else on the last stage's rank only (None elsewhere). This equals one
  single-process step of ``sum_i loss_fn(model(x_i), t_i) / m`` to fp32 rounding. Gradients accumulate like
  ``loss.backward()``: zeroing them is the caller's job (``zero_grad``), as is the optimizer step.
* Tied weights (``plan.tied_stages``, e.g. GPT's token embedding and LM head): every rank holding one of the
  stages keeps a copy; copies are made equal at construction (broadcast from the lowest owner rank) and their
  gradients summed over the owners' group after every backward (Megatron's embedding all-reduce), so the same
  optimizer on every owner keeps them equal. Owners on one rank share one Parameter.
* Names. ``state_dict()`` is this rank's shard keyed by the original model's names (every alias of a tied
  tensor included, so ``wte.weight`` and ``lm_head.weight`` both appear where held); ``full_state_dict()``
  gathers every shard to the group's rank 0 (None elsewhere) and equals ``model.state_dict()`` of the
  unpartitioned model, parameters the graph never reads (e.g. BERT's pooler) included: they are held by the
  rank of stage 0. ``load_state_dict(sd)`` takes such a dict (full or shard) and loads what this rank holds, so
  checkpoints move between partitionings.
* Shapes. Every boundary's microbatch shapes come from a meta run of the whole chain (meta stand-ins for the
  weights), handed to ``PipelineStage`` as static metadata. Each step, stage 0's rank broadcasts the
  microbatch input shapes (one small int64 broadcast); a new shape (another batch size or sequence length)
  gets its own PipelineStages and schedule, cached. The batch must split into equal microbatches.
  Export graphs hold for the shapes torch.export kept symbolic (``CapturedGraph.check_shapes``, run on a
  microbatch before any stage runs).
  Python ints, ``torch.Size``s and devices crossing a boundary are carried in tensor shapes (``StageAdapter``).
* Start-up checks. All ranks all-gather (plan fingerprint, plan JSON hash, schedule, stages, microbatches) and
  raise ``PlanMismatchError`` naming the ranks that differ, before any stage communication.
* Faults (``FaultMonitor``). A rank that raises inside ``step`` posts "rank r: <error>" to the rendezvous store
  and re-raises. A rank whose ``step`` fails because of a peer raises ``PeerFailureError`` naming the failed
  rank. A rank blocked in a collective or p2p op while a peer has failed (or died: heartbeat older than
  ``heartbeat_timeout``) is ended by its watchdog thread after ``grace`` seconds with exit code
  ``PEER_FAILURE_EXIT_CODE`` and a message naming the failed rank on stderr, the policy of NCCL's async error
  handling and of torchrun's agent (a blocked gloo op cannot be interrupted from Python). Nothing waits longer
  than the process group timeout.

Meshes: pass ``mesh``, a ``DeviceMesh`` with a "pp" dim and optionally "dp" and "tp". Every line of the mesh
along "pp" is one pipeline (tied-weight groups are built per line from global ranks). Data parallelism ("dp"):
each replica is fed its own shard of the batch; every stage is wrapped over "dp" in the plan's data-parallel
mode (``plan.data_parallel``, ``plan.data_parallel_shard``; ``data_parallel=`` / ``data_parallel_shard=``
override them): torch's ``DistributedDataParallel`` ("ddp", and "zero1" with its optimizer sharded) or
``fully_shard`` (FSDP2: "zero2", "fsdp", and "hsdp" on a (replicate, shard) split of "dp"); see
``partitioner.runtime.data_parallel``. torch's schedules drive the wrappers (DDP: no sync until the last
microbatch's backward; FSDP: a reduce-scatter in every microbatch's backward, layer by layer, then the final
REDUCE_GRAD, through ``runtime.stage.DataParallelStage``; zero-bubble / zbv: torch's own FSDP handling, no sync
until REDUCE_GRAD); tied copies are left out of the wrappers and averaged over "dp" after their owners' sum. A plan
with ``overlap_grad_reduce=False`` (ddp / zero1) wraps nothing: every gradient is averaged over "dp" after the
step's last backward (``runtime.data_parallel.all_reduce_gradients``), as Megatron-LM's own DDP did. The
returned loss is the mean over replicas, so dp x pp equals single-process training on the concatenated batch
(tested: dp=2 x pp=2 with DDP on 1f1b and interleaved, FSDP on 1f1b, interleaved, zero-bubble and zbv; with AdamW:
ddp, zero1, zero2, fsdp at dp=2, zero1 and zero2 at dp=2 x pp=2, hsdp at dp=4, shard 2; with SGD, 4 microbatches:
fsdp on 1f1b, interleaved and zbv, zero2 on 1f1b, gpipe and looped-bfs, at dp=2; hsdp at dp=4).
With FSDP, ``state_dict()`` holds DTensor shards and ``full_state_dict()`` gathers them (collective over the whole
world then). Build the optimizer with ``make_optimizer(cls, **kwargs)``: the plain ``cls`` over ``parameters()``, or
torch's ``ZeroRedundancyOptimizer`` over "dp" for "zero1" (its ``state_dict()`` then needs
``consolidate_state_dict()`` first, torch's rule).

Tensor parallelism ("tp"): the stage modules given are then one tp rank's
(``passes.tensor_parallel.tensor_parallel_rank`` before the split), their collectives run over the "tp" group
inside the stage; this runtime does not look inside (tested: pp=2 x tp=2 on GPT-3 and BERT tiny).
``state_dict()`` then holds tp shards under the original names (see ``local_param_slices``);
``full_state_dict()`` merges them into full tensors (``merge_shards``) and ``load_state_dict`` slices full
tensors to this rank's shards, so checkpoints move between tp degrees too. The plan check and the fault
monitor span the whole world.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

from partitioner.apply import apply, context_layout, plan_layout
from partitioner.capture import CapturedGraph
from partitioner.passes.context_parallel import scatter_input
from partitioner.passes.retarget import retarget_devices
from partitioner.passes.split import StageModule
from partitioner.passes.tensor_parallel import merge_shards, shard_of
from partitioner.plan.schema import Plan
from partitioner.plan.sharding import NON_OVERLAPPED_MODES
from partitioner.runtime.data_parallel import (
    all_reduce_gradients,
    data_parallel_mode,
    full_tensor,
    hsdp_mesh,
    hsdp_sizes,
    load_into,
    make_optimizer,
    sum_gradients,
    wrap_stage,
)
from partitioner.runtime.device import init_process_group
from partitioner.runtime.faults import PEER_FAILURE_EXIT_CODE, FaultMonitor, PeerFailureError
from partitioner.runtime.materialize import StateDictSource, WeightSource, materialize_modules
from partitioner.runtime.stage import (
    DataParallelStage,
    StageAdapter,
    example_microbatch_shapes,
    scalar_inputs,
    static_metas,
)
from partitioner.schedules import get_schedule

__all__ = [
    "PEER_FAILURE_EXIT_CODE",
    "DistributedPipeline",
    "FaultMonitor",
    "PeerFailureError",
    "PlanMismatchError",
    "StageAdapter",
    "data_parallel_mode",
    "distribute",
]


class PlanMismatchError(RuntimeError):
    """Ranks were started with different plans (or schedules, or stage counts)."""


def distribute(
    plan: Plan,
    captured: CapturedGraph,
    stages: Sequence[StageModule],
    *,
    unused: Mapping[str, nn.Parameter | torch.Tensor] | None = None,
    weights: WeightSource | Mapping[str, torch.Tensor] | None = None,
    mesh: DeviceMesh | None = None,
    device: torch.device | str | None = None,
    backend: str | None = None,
    **kwargs: Any,
) -> DistributedPipeline:
    """This rank's ``DistributedPipeline`` of a plan (the entry point under torchrun; ``cm.distributed()`` calls it).

    `stages`: the plan's unsharded stage modules (``apply(plan, captured)``), used as they are at tensor degree 1;
    with tp > 1 this rank's are rebuilt by the applier for its tp coordinate, sharded weights sliced from
    `weights`. Joins the default group from torchrun's environment if needed, on the rank's device
    (cuda:LOCAL_RANK with NCCL when CUDA is available, else the CPU with gloo; `device` / `backend` override:
    runtime.device). Without `mesh`, builds one on that device type from the plan's degrees over the world: dims
    ("dp", "pp", "tp") of sizes (data_degree, pipeline_degree, tensor_degree), dropping size-1 "dp"/"tp"; their
    product must equal the world size. The other keyword arguments are ``DistributedPipeline``'s. Raises
    ValueError when the world does not match the plan.
    """
    device = init_process_group(backend=backend, device=device)
    dp, pp, tp, cp = plan.data_degree, plan.pipeline_degree, plan.tensor_degree, plan.context_degree
    world = dist.get_world_size()
    if mesh is None:
        if dp * pp * cp * tp != world:
            context = f" x context {cp}" if cp > 1 else ""
            raise ValueError(
                f"the plan needs data {dp} x pipeline {pp}{context} x tensor {tp} = {dp * pp * cp * tp} ranks, the "
                f"world has {world}: launch torchrun with --nproc-per-node matching compile(devices=...)"
            )
        sizes = [(n, d) for n, d in (("dp", dp), ("pp", pp), ("cp", cp), ("tp", tp)) if d > 1 or n == "pp"]
        if len(sizes) > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(device.type, tuple(d for _, d in sizes), mesh_dim_names=tuple(n for n, _ in sizes))
    if tp > 1:
        if mesh is None or "tp" not in (mesh.mesh_dim_names or ()):
            raise ValueError("a tensor-parallel plan needs a mesh with a 'tp' dim")
        from partitioner.passes.tensor_parallel import GroupComm

        comm = GroupComm(mesh.get_group("tp"))
        source = StateDictSource(weights) if isinstance(weights, Mapping) else weights
        stages = apply(plan, captured, tp_rank=comm.rank, comm=comm, weights=source)
    if cp > 1:  # this rank's tokens; under tp, its tp rank's graph rewritten for them
        if mesh is None or "cp" not in (mesh.mesh_dim_names or ()):
            raise ValueError("a context-parallel plan needs a mesh with a 'cp' dim")
        from partitioner.passes.tensor_parallel import GroupComm

        cp_comm = GroupComm(mesh.get_group("cp"))
        tp_args = {}
        if tp > 1:
            tp_args = {"tp_rank": comm.rank, "comm": comm, "weights": source}
        stages = apply(plan, captured, cp_rank=cp_comm.rank, cp_comm=cp_comm, **tp_args)
    return DistributedPipeline(
        plan, captured, stages, weights=weights, mesh=mesh, unused=unused, device=device, **kwargs
    )


# --------------------------------------------------------------------------------------------------------------
# The pipeline
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Tied:
    canonical: str
    ranks: list[int]  # group ranks of the owners
    group: dist.ProcessGroup | None  # None when this rank is not an owner or there is one owner
    held: torch.Tensor | None  # this rank's copy (one Parameter for every local alias), None when not an owner


class DistributedPipeline:
    """This rank's share of a compiled model, trained with a torch.distributed.pipelining schedule.

    Build it with ``cm.distributed(...)`` (or ``distribute``) on every rank of `group` (see the module docstring
    for the contracts). ``local_stages`` are this rank's ``StageModule``s; ``parameters()`` their
    unique parameters (what an optimizer takes; ``make_optimizer`` builds the one the data-parallel mode needs).
    ``data_parallel`` is the mode the stages run in over "dp", ``data_parallel_shard`` HSDP's shard-group size
    (0 in the other modes).
    """

    def __init__(
        self,
        plan: Plan,
        captured: CapturedGraph,
        stages: Sequence[StageModule],
        *,
        group: dist.ProcessGroup | None = None,
        mesh: DeviceMesh | None = None,
        schedule: str | None = None,
        weights: WeightSource | Mapping[str, torch.Tensor] | None = None,
        unused: Mapping[str, nn.Parameter | torch.Tensor] | None = None,
        checkpoint: bool | Sequence[int] = False,
        device: torch.device | str = "cpu",
        store: dist.Store | None = None,
        monitor: bool = True,
        heartbeat_timeout: float = 10.0,
        grace: float = 5.0,
        data_parallel: str | None = None,
        data_parallel_shard: int | None = None,
    ):
        self.plan, self.captured = plan, captured
        dims = tuple(mesh.mesh_dim_names or ()) if mesh is not None else ()
        if mesh is not None:  # the "pp" lines are pipelines; "dp" (optional) replicas; "tp" lives inside the stages
            if "pp" not in dims or not set(dims) <= {"dp", "pp", "cp", "tp"}:
                raise ValueError(f"mesh dims must be 'pp' plus optionally 'dp', 'cp' and 'tp', got {dims}")
            group = mesh.get_group("pp")
        self.mesh = mesh
        self.dp_group = mesh.get_group("dp") if "dp" in dims else None
        self.dp = mesh.size(dims.index("dp")) if "dp" in dims else 1
        self.tp_group = mesh.get_group("tp") if "tp" in dims else None
        self.tp = mesh.size(dims.index("tp")) if "tp" in dims else 1
        self.tp_rank = mesh.get_local_rank("tp") if "tp" in dims else 0
        if self.tp != plan.tensor_degree:
            raise ValueError(f"the mesh has tp={self.tp}, the plan tensor degree {plan.tensor_degree}")
        # context parallelism: the cp ranks run the same weights on their tokens of every sequence (plan.context)
        self.cp = mesh.size(dims.index("cp")) if "cp" in dims else 1
        self.cp_rank = mesh.get_local_rank("cp") if "cp" in dims else 0
        if self.cp != plan.context_degree:
            raise ValueError(f"the mesh has cp={self.cp}, the plan context degree {plan.context_degree}")
        self.context = context_layout(plan, captured.graph_module)
        # the ranks holding the same weights, whose gradients are averaged (and optimizer state sharded): dp x cp
        # (DDP / FSDP wrap the stages over them, as torchtitan shards over its flattened dp x cp mesh)
        self.grad_size = self.dp * self.cp
        self.grad_mesh = None
        if self.cp > 1:
            self.grad_mesh = mesh["dp", "cp"]._flatten("dp_cp") if self.dp > 1 else mesh["cp"]
        elif self.dp > 1:
            self.grad_mesh = mesh["dp"]
        self.grad_group = self.grad_mesh.get_group() if self.grad_mesh is not None else None
        # the plan's layout merges and slices tensor-parallel shards by original names (checkpoints)
        self.tensor_plan = plan_layout(plan)
        self.group = group or dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.ranks = dist.get_world_size(self.group)
        self.device = torch.device(device)
        self.schedule_name = schedule or plan.schedule
        # the plan's data-parallel mode (checked against the schedule) unless overridden; HSDP's shard size likewise
        self.data_parallel = data_parallel_mode(data_parallel or plan.data_parallel or None, self.schedule_name)
        shard = plan.data_parallel_shard if data_parallel_shard is None else data_parallel_shard
        self.data_parallel_shard = shard if self.data_parallel == "hsdp" else 0
        if self.data_parallel == "hsdp" and self.cp > 1:
            raise ValueError("hsdp with context parallelism is not supported: pass data_parallel='fsdp' or plan again")
        if self.data_parallel == "hsdp" and self.dp > 1:
            hsdp_sizes(self.dp, self.data_parallel_shard)  # raises with the numbers before any communication
        # overlap_grad_reduce=False: no wrapper; every gradient is averaged over "dp" after the step's last backward
        self.reduce_after_backward = self.grad_size > 1 and not plan.overlap_grad_reduce
        if self.reduce_after_backward and self.data_parallel not in NON_OVERLAPPED_MODES:
            raise ValueError(
                f"the plan reduces gradients after the backward (overlap_grad_reduce=False), which runs in "
                f"{NON_OVERLAPPED_MODES}, not data_parallel={self.data_parallel!r}: pass one of those or plan again"
            )
        self.num_stages = plan.num_stages
        self.microbatches = plan.microbatches
        self.stage_rank = get_schedule(self.schedule_name).stage_ranks(self.num_stages, self.ranks)
        if plan.stage_ranks and self.schedule_name == plan.schedule and plan.stage_ranks != self.stage_rank:
            raise ValueError(
                f"the plan places stages on ranks {plan.stage_ranks}, but schedule {self.schedule_name!r} runs them "
                f"on {self.stage_rank} for {self.ranks} ranks: the plan was made for another pipeline width"
            )
        if len(stages) != self.num_stages:
            raise ValueError(f"the plan has {self.num_stages} stages, {len(stages)} stage modules were given")

        # Phase 1: every rank runs the same plan (checked before any stage communication).
        self._check_plans()

        # Phase 2: the compiled example's microbatch input shapes (stage metadata follows from them, per shape).
        self._all_stages = list(stages)
        self._example_shapes = self._local_shapes(
            example_microbatch_shapes(captured, self.microbatches * plan.data_degree)
        )

        # Phase 3: keep only this rank's stages and materialize exactly their tensors (+ unused ones on stage 0's rank).
        self.local_stages = [st for st in stages if self.stage_rank[st.index] == self.rank]
        for st in self.local_stages:  # export graphs bake the capture device: compute on this rank's instead
            retarget_devices(st.module, self.device)
        holders: list[nn.Module] = [st.module for st in self.local_stages]
        self._unused_holder = _holder(unused) if unused and self.stage_rank[0] == self.rank else None
        if self._unused_holder is not None:
            holders.append(self._unused_holder)
        materialize_modules(holders, weights, self.device, aliases=self._aliases())
        self._unused = dict(_named_tensors(self._unused_holder)) if self._unused_holder is not None else {}

        # Phase 4: tied copies: one group per tied tensor held by several ranks, copies made equal.
        self._tied = self._tie()
        with torch.no_grad():
            for tied in self._tied:
                if tied.group is not None:
                    dist.broadcast(tied.held.data, src=self._global(tied.ranks[0]), group=tied.group)

        # Phase 5: torch stages (optionally checkpointed; wrapped in DDP or FSDP over "dp"), static metadata when known.
        ckpt = set(range(self.num_stages)) if checkpoint is True else set(checkpoint or ())
        split = get_schedule(self.schedule_name).split_backward
        tied_tensors = [tied.held for tied in self._tied if tied.held is not None]
        if self.grad_size > 1:  # hsdp: "dp" split into (replicate, shard), collective: every rank builds it here
            dp_mesh = hsdp_mesh(self.mesh, self.data_parallel_shard) if self.data_parallel == "hsdp" else self.grad_mesh
        self.stage_submodules: list[nn.Module] = []
        for st in self.local_stages:
            adapter: nn.Module = StageAdapter(
                st.module,
                scalar_inputs(st.module),
                checkpoint=st.index in ckpt,
                clone_outputs=split,
                device=self.device,
            )
            if self.grad_size > 1 and not self.reduce_after_backward:
                adapter = wrap_stage(adapter, self.data_parallel, dp_mesh, tied_tensors, split_backward=split)
            self.stage_submodules.append(adapter)
        # Sequence parallelism's replicated parameters read by split ops (norms, row-parallel biases): each tp rank's
        # gradient holds its tokens' share, summed over "tp" once per step after the backward (step).
        layout = plan_layout(plan) if self.tp_group is not None else None
        summed = set(layout.step_summed_params()) if layout is not None else set()
        self._tp_summed = [p for n, p in self.named_parameters() if n in summed]
        # torch's PipelineStages fix every boundary's shapes: one set per microbatch input shape seen (cached).
        self._by_shape: dict[tuple, list[PipelineStage]] = {}
        self._shape: tuple | None = None
        self.pipeline_stages = self._stages_for(self._example_shapes)
        self._schedule: Any = None
        self._schedule_key: tuple | None = None
        store = store if store is not None else dist.distributed_c10d._get_default_store()
        prefix = f"partitioner/{plan.fingerprint}/{hashlib.sha256(plan.to_json().encode()).hexdigest()[:8]}"
        self.monitor = (
            FaultMonitor(
                dist.PrefixStore(prefix, store),
                dist.get_rank(),  # the whole world: a failure in another replica stops this one too
                dist.get_world_size(),
                heartbeat_timeout=heartbeat_timeout,
                grace=grace,
            )
            if monitor
            else None
        )

    def _aliases(self) -> dict[str, list[str]]:
        return {n: group for group in self.plan.tied_params.values() for n in group}

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not dist.group.WORLD else group_rank

    def _check_plans(self) -> None:
        mine = (
            self.plan.fingerprint,
            hashlib.sha256(self.plan.to_json().encode()).hexdigest()[:16],
            self.schedule_name,
            self.num_stages,
            self.microbatches,
            self.data_parallel,
            self.data_parallel_shard,
        )
        group = None if self.mesh is not None else self.group  # every replica must run the same plan too
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, mine, group=group)
        if len(set(gathered)) > 1:
            lines = [
                f"rank {r}: fingerprint {g[0]}, plan hash {g[1]}, schedule {g[2]}, {g[3]} stages, {g[4]} microbatches, "
                f"data_parallel {g[5]!r} (shard {g[6]})"
                for r, g in enumerate(gathered)
            ]
            odd = [r for r, g in enumerate(gathered) if g != gathered[0]]
            raise PlanMismatchError(
                f"pipeline ranks were started with different plans (ranks {odd} differ from rank 0); every rank must "
                "apply the same saved plan (compile(..., plan=Plan.from_json(text))):\n  " + "\n  ".join(lines)
            )

    def _tie(self) -> list[_Tied]:
        # new_group is collective over the world: every rank creates the owners' group of every pipeline replica,
        # in the same order, and keeps its own replica's.
        if self.mesh is not None:  # every line of the mesh along "pp" is one pipeline
            dims = list(self.mesh.mesh_dim_names)
            lines = self.mesh.mesh.movedim(dims.index("pp"), -1).reshape(-1, self.ranks)
            rows = lines.tolist()
        else:
            rows = [[self._global(r) for r in range(self.ranks)]]
        me = dist.get_rank()
        out = []
        for canonical in sorted(self.plan.tied_stages):
            owners = sorted({self.stage_rank[s] for s in self.plan.tied_stages[canonical]})
            mine = None
            if len(owners) > 1:
                for row in rows:
                    ranks = [row[r] for r in owners]
                    group = dist.new_group(ranks)
                    mine = group if me in ranks else mine
            held = self._tensors_named(canonical)
            out.append(_Tied(canonical, owners, mine, held[0] if held else None))
        return out

    # -- tensors --------------------------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """This rank's unique trainable parameters under their original names (a tied one once)."""
        seen: set[int] = set()
        for st in self.local_stages:
            for name, p in st.module.named_parameters(remove_duplicate=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    yield name, p

    def parameters(self) -> list[nn.Parameter]:
        """This rank's unique trainable parameters (``named_parameters()`` without the names): what an optimizer
        takes."""
        return [p for _, p in self.named_parameters()]

    def make_optimizer(self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> torch.optim.Optimizer:
        """An `optimizer_class` (e.g. ``torch.optim.AdamW``) over ``parameters()`` for this pipeline's data-parallel
        mode; `kwargs` are its arguments (lr, weight_decay, ...).

        "zero1" (at dp > 1): torch's ``ZeroRedundancyOptimizer`` with `optimizer_class` over the "dp" group, so each
        replica holds the optimizer state of 1/dp of the parameters. Other modes: `optimizer_class` itself (FSDP
        shards its state already). Tied copies are updated like every parameter: their gradients are reduced by
        ``step`` before the optimizer sees them. Call on every rank (ZeRO's step is collective over "dp").
        """
        return make_optimizer(self.parameters(), optimizer_class, self.data_parallel, self.grad_group, **kwargs)

    def _tensors_named(self, name: str) -> list[torch.Tensor]:
        names = set(self._aliases().get(name, [name]))
        return [t for n, t in self.state_dict(keep_vars=True).items() if n in names]

    def zero_grad(self) -> None:
        """Set the gradient of every parameter this rank trains to None (gradients accumulate over steps)."""
        for p in self.parameters():
            p.grad = None

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """This rank's shard, original names, every alias of a tied tensor included (see module docstring); like
        ``nn.Module.state_dict``, without the model's non-persistent buffers."""
        out: dict[str, torch.Tensor] = {}
        aliases = self._aliases()
        for st in self.local_stages:
            for name, t in _named_tensors(st.module):
                for alias in aliases.get(name, [name]):
                    out[alias] = t if keep_vars else t.detach()
        for name, t in self._unused.items():
            out[name] = t if keep_vars else t.detach()
        return {k: v for k, v in out.items() if k not in self.captured.transient}

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's tensors by original names (CPU copies) on the replica's first rank, None elsewhere.

        Collective over the world: every pipeline gathers to its rank 0; with tp > 1 those ranks then gather the
        tp shards to tp rank 0, which merges them (``merge_shards``); FSDP shards are gathered over dp first. One
        dict per data-parallel replica (equal ones), on the rank with pp = tp = 0.
        """
        shard = {k: full_tensor(v).detach().cpu() for k, v in self.state_dict().items()}  # FSDP: gathered over dp
        gathered: list[Any] = [None] * self.ranks if self.rank == 0 else None
        dist.gather_object(shard, gathered, dst=self._global(0), group=self.group)
        if self.rank != 0:
            return None
        full: dict[str, torch.Tensor] = {}
        for part in gathered:
            full.update(part)
        if self.tensor_plan is not None:
            parts: list[Any] = [None] * self.tp if self.tp_rank == 0 else None
            dist.gather_object(full, parts, dst=dist.get_global_rank(self.tp_group, 0), group=self.tp_group)
            if self.tp_rank != 0:
                return None
            full = merge_shards(self.tensor_plan, parts)
        return dict(sorted(full.items()))

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Copy the entries this rank holds from `state` (full or a shard, original names).

        Full tensors of tensor-parallel parameters are sliced to this rank's shard; FSDP shards take their chunk.
        """
        aliases = self._aliases()
        with torch.no_grad():
            for name, t in self.state_dict(keep_vars=True).items():
                src = next((state[a] for a in aliases.get(name, [name]) if a in state), None)
                if src is None:
                    if strict:
                        raise KeyError(f"rank {self.rank}: the state dict has no entry for {name!r} (nor its aliases)")
                    continue
                if self.tensor_plan is not None and tuple(src.shape) != tuple(t.shape):
                    src = shard_of(self.tensor_plan, name, src, self.tp_rank)
                load_into(t, src)

    # -- training ---------------------------------------------------------------------------------------------------
    def _stages_for(self, shapes: tuple | None) -> list[PipelineStage]:
        """This rank's PipelineStages for microbatch inputs of `shapes` (static metadata from a meta run; None:
        unknown, torch infers the metadata at the first step and fixes it)."""
        if shapes not in self._by_shape:
            static = static_metas(self.captured, self._all_stages, shapes) if shapes is not None else None
            split = get_schedule(self.schedule_name).split_backward
            self._by_shape[shapes] = [
                DataParallelStage(  # torch's PipelineStage; FSDP stages reduce-scatter every microbatch's gradients
                    adapter,
                    st.index,
                    self.num_stages,
                    self.device,
                    input_args=static[st.index][0] if static else None,
                    output_args=static[st.index][1] if static else None,
                    group=self.group,
                    data_parallel=self.data_parallel if self.grad_size > 1 else "",
                    split_backward=split,
                )
                for st, adapter in zip(self.local_stages, self.stage_submodules)
            ]
        self._shape = shapes
        return self._by_shape[shapes]

    def _local_shapes(self, shapes: tuple | None) -> tuple | None:
        """Microbatch input shapes as this cp rank holds them (its tokens of each sequence input)."""
        if shapes is None or self.context is None:
            return shapes
        splits = self.context.inputs
        return tuple(
            tuple(d // self.cp if name in splits and i == splits[name].dim else d for i, d in enumerate(shape))
            for name, shape in zip(self.captured.input_names, shapes)
        )

    def _agree_on_shapes(self, args: tuple, holds_first: bool) -> tuple | None:
        """The step's microbatch input shapes, sent by stage 0's rank to the pipeline (one small broadcast).

        None when the compiled example has no recorded shapes (torch then infers them at the first step).
        """
        if self._example_shapes is None:
            return None
        ndims = [len(s) for s in self._example_shapes]
        buf = torch.zeros(sum(ndims), dtype=torch.int64, device=self.device)  # NCCL moves device tensors only
        if holds_first:
            if [a.dim() for a in args] != ndims:
                raise ValueError(f"inputs have {[a.dim() for a in args]} dims, the model was compiled for {ndims}")
            for a in args:
                if a.shape[0] % self.microbatches:
                    raise ValueError(
                        f"batch {a.shape[0]} does not split into {self.microbatches} equal microbatches: pass a "
                        f"multiple of {self.microbatches} rows (torch's schedules need equal microbatch shapes)"
                    )
            buf = torch.tensor(
                [d for a in args for d in (a.shape[0] // self.microbatches, *a.shape[1:])], device=self.device
            )
        if self.ranks > 1:
            dist.broadcast(buf, src=self._global(self.stage_rank[0]), group=self.group)
        flat, out = buf.tolist(), []
        for n in ndims:
            out.append(tuple(flat[:n]))
            flat = flat[n:]
        return tuple(out)

    def _make_schedule(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> Any:
        captured = self.captured

        def stage_loss(output: Any, target: Any) -> torch.Tensor:  # the last stage returns the flat outputs
            flat = list(output) if isinstance(output, (tuple, list)) else [output]
            return loss_fn(captured.unflatten_output(flat), target)

        cls = get_schedule_class(get_schedule(self.schedule_name).torch_class)
        stages: Any = self.pipeline_stages[0] if issubclass(cls, PipelineScheduleSingle) else self.pipeline_stages
        # scale_grads=False: we divide once per parameter after the step (a tied parameter may sit in two stages).
        return cls(stages, n_microbatches=self.microbatches, loss_fn=stage_loss, scale_grads=False)

    def step(
        self,
        inputs: tuple | None,
        targets: Any | None,
        loss_fn: Callable[[Any, Any], torch.Tensor],
        *,
        kwargs: dict[str, Any] | None = None,
        broadcast_loss: bool = True,
    ) -> torch.Tensor | None:
        """One forward + backward over all microbatches (see the module docstring); collective over the group.

        inputs/kwargs: the model's call for the whole batch (read on stage 0's rank only; others may pass None).
        targets: the whole batch's targets (read on the last stage's rank only).
        """
        holds_first = any(st.index == 0 for st in self.local_stages)
        holds_last = any(st.index == self.num_stages - 1 for st in self.local_stages)
        # Gradients of earlier steps (accumulation) are set aside: the scaling and reductions below are this step's.
        params = self.parameters()
        earlier = {id(p): p.grad for p in params if p.grad is not None}
        guard = self.monitor.watch() if self.monitor is not None else _Nothing()
        with guard:  # bad inputs on stage 0's rank are reported to the peers waiting for its shapes
            flat = (
                self.captured.flatten_inputs(tuple(inputs or ()), dict(kwargs or {}), shapes=False)
                if holds_first
                else ()
            )
            if flat:  # the graph runs on microbatches (equal ones): an export graph checks their shapes
                first = {
                    n: torch.tensor_split(a, self.microbatches)[0] for n, a in zip(self.captured.input_names, flat)
                }
                self.captured.check_shapes(first)
            if flat and self.context is not None:  # this cp rank's tokens of every sequence input
                splits = self.context.inputs
                flat = [
                    scatter_input(a, splits[name], self.context, self.cp_rank) if name in splits else a
                    for name, a in zip(self.captured.input_names, flat)
                ]
            args = tuple(a.to(self.device) for a in flat)
            shapes = self._agree_on_shapes(args, holds_first)
            if shapes is not None and shapes != self._shape:
                self.pipeline_stages = self._stages_for(shapes)
            key = (id(loss_fn), shapes)
            if self._schedule is None or self._schedule_key != key:
                self._schedule, self._schedule_key = self._make_schedule(loss_fn), key
            target = targets.to(self.device) if holds_last and isinstance(targets, torch.Tensor) else targets
            losses: list[torch.Tensor] = []
            for p in params:
                p.grad = None
            self._schedule.step(*args, target=target if holds_last else None, losses=losses, return_outputs=False)
            with torch.no_grad():
                for p in self.parameters():
                    if p.grad is not None:
                        p.grad.div_(self.microbatches)
                if self.reduce_after_backward:
                    tied = {id(t.held) for t in self._tied if t.held is not None}
                    all_reduce_gradients([p for p in params if id(p) not in tied], self.grad_group)
                if self._tp_summed:
                    sum_gradients(self._tp_summed, self.tp_group)
                self._reduce_tied_grads()
                for p in params:
                    if id(p) in earlier:
                        p.grad = earlier[id(p)] if p.grad is None else p.grad.add_(earlier[id(p)])
                loss = torch.stack([x.detach() for x in losses]).mean() if holds_last else None
                if broadcast_loss:
                    buf = loss.clone() if loss is not None else torch.zeros((), device=self.device)
                    dist.broadcast(buf, src=self._global(self.stage_rank[-1]), group=self.group)
                    if self.dp_group is not None:
                        dist.all_reduce(buf, group=self.dp_group)
                        buf /= self.dp
                    loss = buf
        return loss

    def _reduce_tied_grads(self) -> None:
        """Tied copies (left out of DDP/FSDP): sum the gradient over the owner ranks, then average it over dp."""
        for tied in self._tied:
            p = tied.held
            if p is None:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if tied.group is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=tied.group)
            if self.grad_group is not None and self.grad_size > 1:  # the replicas: dp, and cp's token shares
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, group=self.grad_group)
                p.grad /= self.grad_size

    def close(self) -> None:
        """Stop the watchdog (the process group is the caller's)."""
        if self.monitor is not None:
            self.monitor.close()


class _Nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return False


def unused_tensors(model: nn.Module, stages: Sequence[StageModule], plan: Plan) -> dict[str, torch.Tensor]:
    """Parameters and buffers of `model` that no stage reads (e.g. BERT's pooler), by original name: kept on stage
    0's rank so that checkpoints are complete."""
    used = {name for st in stages for name, _ in _named_tensors(st.module)}
    aliases = {n: group for group in plan.tied_params.values() for n in group}
    used |= {a for n in list(used) for a in aliases.get(n, [n])}
    return {
        name: t
        for name, t in _named_tensors(model)
        if name not in used and not any(a in used for a in aliases.get(name, []))
    }


def _holder(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A module holding `tensors` under their qualified names (parameters stay parameters)."""
    root = nn.Module()
    for name, t in sorted(tensors.items()):
        *path, leaf = name.split(".")
        sub = root
        for part in path:
            if not hasattr(sub, part):
                sub.add_module(part, nn.Module())
            sub = getattr(sub, part)
        if isinstance(t, nn.Parameter):
            sub.register_parameter(leaf, t)
        else:
            sub.register_buffer(leaf, t)
    return root


def _named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters then buffers with every name they are reachable under (tied ones repeated)."""
    yield from module.named_parameters(remove_duplicate=False)
    yield from module.named_buffers(remove_duplicate=False)
