"""compile(): the user-facing entry point, wiring the passes of docs/design.md's picture together.

capture -> annotate -> cost -> batch proof -> plan (plan.model) -> apply -> run (local). The model itself is never
modified: capture traces it, annotate swaps in meta tensors only while it runs, and the stage
modules share the model's parameters (so training the compiled model trains the model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from partitioner.annotate import annotate
from partitioner.apply import apply, plan_layout
from partitioner.capture import CapturedGraph, UncapturableForward, capture
from partitioner.capture.normal_form import _bind, _forward_signature, flat_arguments
from partitioner.capture.placement import METHOD as PLACEMENT
from partitioner.capture.placement import record_calls
from partitioner.cost import NodeCost, node_costs, profile_node_times
from partitioner.devices import DeviceSpec
from partitioner.options import DEFAULT_SCHEDULES, CompileOptions
from partitioner.passes.align import applicable_pads, gemm_pads, row_pads
from partitioner.passes.split import StageModule
from partitioner.plan.batch import BatchFlow, batch_flow
from partitioner.plan.graph import PlanningGraph, build_planning_graph
from partitioner.plan.model import _json_value, batch_dims_of, plan_model
from partitioner.plan.placement import plan_placement
from partitioner.plan.schema import Plan
from partitioner.progress import Progress, logger
from partitioner.runtime.local import LocalPipeline
from partitioner.runtime.placement import PlacementRunner
from partitioner.simulate import SimResult
from partitioner.units import format_seconds
from partitioner.validate import as_call, check_batch_split

__all__ = ["CompiledModel", "compile"]


@dataclass
class CompiledModel:
    """A partitioned model. Call it like the original; `plan` says how it was split.

    The stages hold the model's own parameters, buffers and submodules (training the compiled model trains the
    model); replacing a submodule or parameter of the model after compile is refused at the next call, since the
    stages would keep running the old one. Loading weights in place (`load_state_dict`) is fine.
    """

    model: nn.Module
    options: CompileOptions
    _plan: Plan | None = None
    captured: CapturedGraph | None = None
    stages: list[StageModule] = field(default_factory=list)
    planning_graph: PlanningGraph | None = None
    compile_times: dict[str, float] = field(default_factory=dict)
    simulation: SimResult | None = None  # the schedule replayed with the plan's stage costs
    _runner: LocalPipeline | PlacementRunner | None = None
    _pipeline: Any = None  # this rank's DistributedPipeline under torchrun, built by distributed()
    _input_meta: list[tuple[str, int, torch.dtype]] = field(default_factory=list)
    _structure: dict[str, int] = field(default_factory=dict)  # module/parameter/buffer name -> id at compile

    @property
    def plan(self) -> Plan:
        """The plan; planning happens at compile with example inputs, otherwise at the first call."""
        if self._plan is None:
            raise RuntimeError(
                "not planned yet: planning happens at the first call of the compiled model (or pass example_inputs "
                "to compile to plan right away)"
            )
        return self._plan

    @plan.setter
    def plan(self, plan: Plan) -> None:
        self._plan = plan

    @property
    def is_planned(self) -> bool:
        """Whether the model is planned yet: True after compile with example inputs, else after the first call."""
        return self._plan is not None

    @property
    def tensor_parallel_plan(self) -> Any:
        """The plan's tensor-parallel layout (plan.tensor.TensorParallelPlan), None at tensor degree 1."""
        return plan_layout(self.plan)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the model: every stage runs in this process, in order, and the output equals the model's.

        Plans first when compile had no example inputs. Raises RuntimeError when a submodule or parameter of the
        model was replaced after compile, ValueError when an input's dims or dtype differ from the compiled ones.
        """
        if self._plan is None:  # planned lazily on the first call, like torch.compile
            _build(self, args, kwargs)
        self._check_structure()
        if not self.is_placement:  # a placement plan runs the model's own forward, which takes any call it takes
            self._check_inputs(args, kwargs)
        return self._runner(*args, **kwargs)

    @property
    def is_placement(self) -> bool:
        """Whether the plan places modules of a forward no graph captured (capture "module-placement",
        partitioner.plan.placement): the model's own forward runs; there is no captured graph."""
        return self._plan is not None and self._plan.capture == PLACEMENT

    def _check_structure(self) -> None:
        """The stages run in this process hold the model's own submodules and tensors: refuse if one was replaced."""
        changed = _changed_structure(self.model, self._structure)
        if changed:
            raise RuntimeError(
                f"{changed} of the model was replaced after compile; the compiled stages still hold the old one: "
                f"compile again (or load new weights in place with load_state_dict)"
            )

    def _check_inputs(self, args: tuple, kwargs: dict, *, shapes: bool = True) -> dict[str, torch.Tensor]:
        """The call's tensor inputs by name, after checking them against the compiled example's (shapes=False:
        the shapes are checked per microbatch by the runtime)."""
        flat = self.captured.flatten_inputs(args, kwargs, shapes=shapes)
        for (name, ndim, dtype), value in zip(self._input_meta, flat):
            if value.dim() != ndim or value.dtype != dtype:
                raise ValueError(
                    f"input {name!r} has {value.dim()} dims of {value.dtype}; the model was compiled for "
                    f"{ndim} dims of {dtype}: pass inputs like the example inputs, or compile again"
                )
        return dict(zip(self.captured.input_names, flat))

    def verify_tensor_parallel(self, *args: Any, **kwargs: Any) -> Any:
        """Run every tensor-parallel rank of the plan in this process (threads with an in-process
        all-reduce) and assert that outputs and gradients equal the unsharded model's.

        The local runtime (`cm(...)`) runs the pipeline split of the unsharded graph; the TP shards run
        under torchrun. This checks the shards without torchrun. Returns the check's report.
        """
        from partitioner.runtime.tp_local import check_tensor_parallel

        if self._plan is None or self.plan.tensor_degree == 1:
            raise ValueError("this plan has no tensor parallelism (tensor_degree 1): nothing to verify")
        inputs = self.captured.flatten_inputs(args, kwargs)
        # An inference plan places no backward collectives: only its outputs are the model's.
        # The ranks recompute what the plan says they recompute (recompute regions re-run their collectives too).
        regions = [r for stage in self.plan.stages for r in stage.recompute_regions]
        return check_tensor_parallel(
            self.captured.graph_module, self.tensor_parallel_plan, inputs, backward=self.plan.training,
            recompute_regions=regions,
        )  # fmt: skip

    def verify_context_parallel(
        self,
        degree: int,
        *args: Any,
        seq_dims: dict[str, int] | None = None,
        balance: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """Split the sequence of every activation over `degree` context-parallel ranks (plan.context: k and v
        gathered for attention, causal masks by global position), run every rank in this process (threads) on these
        inputs, and assert that each rank's outputs equal the model's and that the ranks' gradients sum to its
        gradients. Returns the check's report; `report.layout.fallbacks` names the ops that read a split value whole.

        seq_dims: input name -> its sequence dim (default: the dim after the batch dim of every input of the first
        input's sequence length); balance: the load-balanced chunk order (default: when 2 x degree divides it).
        This checks, without torchrun, that the model runs correctly that way at any degree, whatever the plan chose
        (compile's context_parallel option and search; runtime.distributed runs the plan's degree under torchrun).
        """
        from partitioner.plan.context import plan_context_parallel
        from partitioner.runtime.cp_local import check_context_parallel

        if self._plan is None:
            raise ValueError("compile with example_inputs (or call the model once) before verifying it")
        if self.is_placement:
            raise ValueError("this plan places the modules of a forward no graph captured: there is no graph to split")
        inputs = self.captured.flatten_inputs(args, kwargs)
        gm = self.captured.graph_module
        layout = plan_context_parallel(gm, degree, seq_dims=seq_dims, balance=balance)
        return check_context_parallel(gm, layout, inputs, backward=self.plan.training)

    def distributed(
        self,
        *,
        weights: Any = None,
        mesh: Any = None,
        data_parallel: str | None = None,
        data_parallel_shard: int | None = None,
        **kwargs: Any,
    ) -> Any:
        """This rank's share of the model on torch.distributed.pipelining (partitioner.runtime.distributed).

        Call on every rank under torchrun (world size = plan.devices) after compiling with the same
        options or the same saved plan. weights: a state dict by original names, or a ReplayInit from
        partitioner.runtime.materialize.record_init when the model was built on the meta device.
        data_parallel / data_parallel_shard: override the plan's data-parallel mode ("ddp", "zero1", "zero2",
        "fsdp", "hsdp"; partitioner.runtime.data_parallel) and HSDP's shard-group size; every rank must pass the
        same (checked at start-up). Returns a DistributedPipeline: step(inputs, targets, loss_fn),
        make_optimizer(torch.optim.AdamW, lr=...) (ZeRO-1's sharded optimizer where the mode is "zero1"),
        state_dict(), full_state_dict(); `cm.step` / `cm.parameters()` use it from then on.
        """
        from partitioner.runtime.distributed import distribute, unused_tensors

        if self._plan is None:
            raise ValueError("compile with example_inputs (or call the model once) before distributing it")
        if self.is_placement:  # no graph, no stage modules: rank 0 runs the forward, the others serve module calls
            from partitioner.runtime.placement_remote import RemotePlacement

            if weights is not None or mesh is not None or data_parallel is not None or data_parallel_shard is not None:
                raise ValueError(
                    "a module-placement plan takes no weights, mesh or data-parallel options: build the same model "
                    "(same seed or weights) on every rank"
                )
            self._pipeline = RemotePlacement(self.model, self.plan, **kwargs)
            return self._pipeline
        unused = unused_tensors(self.model, self.stages, self.plan)
        self._pipeline = distribute(
            self.plan, self.captured, self.stages, unused=unused, weights=weights, mesh=mesh,
            data_parallel=data_parallel, data_parallel_shard=data_parallel_shard, **kwargs,
        )  # fmt: skip
        return self._pipeline

    # -- training: the same script in one process or under torchrun --------------------------------------------
    @property
    def pipeline(self) -> Any:
        """This rank's DistributedPipeline once ``distributed()`` (or a step under torchrun) built it, else None."""
        return self._pipeline

    def step(
        self, inputs: tuple | torch.Tensor, targets: Any, loss_fn: Any, *, kwargs: dict[str, Any] | None = None
    ) -> torch.Tensor | None:
        """One training step (forward + backward over the plan's microbatches); returns the mean loss.

        `inputs`/`targets` are the global batch on every rank. Under torchrun (WORLD_SIZE == plan.devices > 1)
        this rank runs its stages with torch's pipeline schedule (``distributed()`` is called on the first
        step unless it was called already, e.g. with weights for a meta model) on its data-parallel replica's
        rows (``tensor_split`` of dim 0 into data-degree parts); otherwise every stage runs here on the whole
        batch, split into microbatches x data-degree chunks. Same loss either way: the gradient of the mean
        microbatch loss lands in ``.grad``. The optimizer step and ``zero_grad()`` are the caller's.
        `inputs` may be a bare tensor (one positional argument). Every tensor input and target is split along
        dim 0: all must have the batch's rows, a positive multiple of microbatches x data degree (checked first).
        """
        inputs = as_call(inputs, "inputs")
        if self._plan is None:
            _build(self, inputs, dict(kwargs or {}))
        if not self.plan.training:
            raise RuntimeError(
                "this model was compiled with training=False: its plan has no backward (no gradient all-reduces for "
                "tensor parallelism, no activation memory for backward); compile with training=True to train it"
            )
        if self.is_placement:  # the model's own forward runs: here, or on the driver rank under torchrun
            signature = _forward_signature(self.model)
            flat = flat_arguments(signature, _bind(signature, tuple(inputs), dict(kwargs or {})))
            named = {n: v for n, v in flat.items() if isinstance(v, torch.Tensor)}
            check_batch_split(named, targets, microbatches=self.plan.microbatches, data_degree=1)
            self._check_structure()
            if self._pipeline is None and _torchrun_world(self.plan.devices) > 1:
                self.distributed()
            runner = self._pipeline if self._pipeline is not None else self._runner
            return runner.step(inputs, targets, loss_fn, self.plan.microbatches, kwargs)
        named = self._check_inputs(inputs, dict(kwargs or {}), shapes=False)
        dims = {n: self.plan.batch_dims.get(n, 0) for n in self.captured.input_names}
        target_dim = self.plan.batch_dims.get("targets", 0)
        check_batch_split(
            named, targets, microbatches=self.plan.microbatches, data_degree=self.plan.data_degree,
            batch_dims=dims, target_dim=target_dim,
        )  # fmt: skip
        if self._pipeline is None and _torchrun_world(self.plan.devices) > 1:
            self.distributed()
        if self._pipeline is not None:
            if any(d != 0 for d in [*dims.values(), target_dim]):
                raise NotImplementedError(
                    f"under torchrun a step splits every input and target along dim 0; this plan's batch dims are "
                    f"{self.plan.batch_dims}: move the batch to dim 0 (e.g. a wrapper module that transposes), or "
                    f"train "
                    f"in one process"
                )
            pipe = self._pipeline
            if pipe.dp > 1:  # every rank is given the global batch; its replica trains on its rows
                replica = pipe.mesh.get_local_rank("dp")
                rows = lambda v: torch.tensor_split(v, pipe.dp)[replica] if isinstance(v, torch.Tensor) else v
                inputs, targets = tuple(rows(a) for a in inputs), rows(targets)
                kwargs = {k: rows(v) for k, v in (kwargs or {}).items()}
            return pipe.step(inputs, targets, loss_fn, kwargs=kwargs)
        self._check_structure()
        chunks = self.plan.microbatches * self.plan.data_degree
        return self._runner.step(inputs, targets, loss_fn, chunks, kwargs, batch_dims=dims, target_dim=target_dim)

    def parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: this rank's parameters under torchrun, else every stage's (the model's own).

        Under torchrun this builds the rank's pipeline (``distributed()``) if the first step has not yet: a
        tensor-parallel rank trains shards, new tensors that the model does not hold, so an optimizer made from the
        model's parameters would never update them.
        """
        if self._pipeline is None and self._plan is not None and _torchrun_world(self.plan.devices) > 1:
            self.distributed()
        if self._pipeline is not None:
            return self._pipeline.parameters()
        if self._plan is None:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise RuntimeError(
                    "under torchrun the parameters a rank trains exist once the model is planned: compile with "
                    "example_inputs / example_kwargs (or run a step) before making the optimizer"
                )
            return list(self.model.parameters())
        if self.is_placement:
            return list(self.model.parameters())  # in one process (under torchrun: the pipeline's, above)
        seen: dict[int, nn.Parameter] = {}
        for st in self.stages:
            for p in st.module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def make_optimizer(self, optimizer_class: type[torch.optim.Optimizer], **kwargs: Any) -> torch.optim.Optimizer:
        """An `optimizer_class` (e.g. ``torch.optim.AdamW``; `kwargs`: its arguments, e.g. lr) over ``parameters()``,
        the one script in one process or under torchrun: there, the optimizer the plan's data-parallel mode needs
        (ZeRO-1's sharded one at "zero1": ``DistributedPipeline.make_optimizer``), and on a rank whose stages hold no
        trainable parameter (a stage of parameter-free nodes) one whose step does nothing, where torch's optimizers
        refuse an empty list. Call on every rank (ZeRO's step is collective over the replicas)."""
        from partitioner.runtime.data_parallel import make_optimizer

        params = self.parameters()  # under torchrun: builds this rank's pipeline
        if self._pipeline is not None:
            return self._pipeline.make_optimizer(optimizer_class, **kwargs)
        return make_optimizer(params, optimizer_class, "", None, **kwargs)

    def zero_grad(self) -> None:
        """Set the gradient of every parameter in ``parameters()`` to None (as ``Optimizer.zero_grad`` does)."""
        for p in self.parameters():
            p.grad = None

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The model's state by original names: gathered from every rank under torchrun (on the first rank of each
        replica, None elsewhere; collective), else the model's own ``state_dict()``."""
        if self._pipeline is not None:
            return self._pipeline.full_state_dict()
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    @property
    def stage_modules(self) -> list[fx.GraphModule]:
        """The stage GraphModules, stage order; they hold the model's own parameters and buffers."""
        return [s.module for s in self.stages]


def compile(  # noqa: A001  (the product's name for it, as torch.compile)
    model: nn.Module,
    devices: int = 8,
    example_inputs: tuple | torch.Tensor | None = None,
    example_kwargs: dict[str, Any] | None = None,
    *,
    device_type: str | DeviceSpec | None = None,
    microbatches: int | None = None,
    training: bool = True,
    memory_limit: float | str | None = None,
    schedule: str | None = None,
    pipeline: int | None = None,
    tensor_parallel: int | None = None,
    stages_per_device: int | None = None,
    plan: Plan | str | None = None,
    mincut: bool = True,
    cost: str = "roofline",
    batch_dim: int | dict[str, int | None] = 0,
    recompute: str | None = None,
    data_parallel: str | None = None,
    overlap_grad_reduce: bool = True,
    sequence_parallel: bool | None = None,
    context_parallel: int | None = None,
    verbose: bool = True,
    capture: str = "auto",
    pad_gemms: bool = True,
    master_weights: bool | None = None,
) -> CompiledModel:
    """Partition `model` over `devices` and return a callable compiled model.

    example_inputs/example_kwargs: a call of the model used for capture and costing (shapes only
    matter; meta tensors work; a bare tensor is one positional argument; dim 0 of the tensor inputs is the
    batch the search splits into microbatches and data-parallel replicas). Omitted: planning happens at the
    first call. memory_limit also takes a string with a unit ("80GB", "80GiB").
    device_type: a DeviceSpec or preset name ("h100", "h200", "a100", "cpu") the cost model prices; None: the saved
    plan's device when `plan` is given (and its memory limit, unless memory_limit says otherwise), else "h100". A
    saved plan priced on another device or memory limit than compile's is priced again: `cm.plan` then carries
    compile's device, limit and figures, with the saved layout unchanged.
    pipeline / tensor_parallel: force those degrees; otherwise the search (partitioner.plan.search)
    picks pipeline x tensor x data degrees by simulated step time under the memory limit.
    microbatches: per training step (default: searched; it starts at the largest count <= 4 x pipeline degree
    dividing the batch per replica, doubles while a layout does not fit or is faster, and the winner falls to fewer
    while that is faster; a requested count must divide every replica's batch). memory_limit: bytes per device
    for the plan's tensors and the NCCL communicators of its process groups (partitioner.plan.communicators; default:
    the device's `usable_memory`, what the driver reports less the CUDA context's and libraries' reserve).
    schedule: a torch.distributed.pipelining schedule ("gpipe", "1f1b", "interleaved", "looped-bfs",
    "zero-bubble", "zbv"), "auto" (the best of 1f1b, interleaved, zero-bubble, zbv), or None (1f1b and
    gpipe, both priced: torch's 1F1B needs a microbatch per stage at least, and GPipe can win on memory); the
    multi-stage ones place stages_per_device stages on each device (default: searched from 2). plan: a Plan (or
    its JSON) to apply instead of planning.
    cost: "roofline" (analytic, from FLOPs and bytes on `device_type`; meta models work) or "profile" (every
    node's forward and backward timed on this machine with the real weights and example inputs, calibrated to
    a whole step: partitioner.cost.profile_node_times; `device_type` then prices only memory and links).
    batch_dim: the dim of the tensor inputs that holds the samples, which a training step splits into microbatches
    and data-parallel replicas: an int for every input and the targets, or a dict by input name (None: not per
    sample, passed whole to every microbatch; the key "targets" for the targets; absent: 0). When training, compile
    proves that samples stay independent through the graph (partitioner.plan.batch); where they meet (a reduction,
    a product or an attention over the batch dim) the batch is not split (one microbatch, no data parallelism),
    or, when `microbatches` > 1 asks for a split, compile raises ValueError naming the node.
    recompute: activation recomputation, "none", "selective" (each layer's attention core) or "full" (each layer;
    only its inputs are kept) on every stage; None: each stage uses the least that fits its memory
    (partitioner.plan.recompute). data_parallel: how data-parallel replicas hold their training state, "ddp",
    "zero1" (optimizer state sharded), "zero2" (and gradients), "fsdp" (and parameters: ZeRO-3) or "hsdp" (FSDP
    inside a node, replicated across); None: the search picks the fastest that fits (partitioner.plan.sharding).
    overlap_grad_reduce: False all-reduces the gradients after the last backward instead of during it, as
    Megatron-LM's DDP did in 2021 and DeepSpeed's ZeRO-1 does (ddp and zero1 only; never faster: for pricing and
    running such layouts as they were run).
    sequence_parallel: at tensor degree > 1, split the token-wise ops tensor parallelism leaves whole (residual adds,
    layer norms, dropout) over the tp ranks along the sequence, reduce-scattering and all-gathering in place of its
    all-reduces (Megatron's sequence parallelism; partitioner.plan.tensor_sequence); None: priced with and without,
    the search takes the faster that fits.
    context_parallel: split the sequence of every activation over this many ranks (partitioner.plan.context: k and v
    gathered for attention, causal masks by global position, the loss all-reduced); pipeline x tensor x data share
    the rest of the devices, the data-parallel mode runs over data x context. None (the default): searched where the
    layouts without it recompute activations or do not fit (plan.model._search_context); 1: never.
    verbose: a compile over 2 s draws one progress line on stderr when it is a terminal (erased when done; never in
    pipes or logs); False: never. Either way the passes' times are logged on the "partitioner" logger
    (partitioner.progress).
    capture: "auto" captures a graph (torch.fx, then torch.export, then fx with opaque module-level leaves) and, when
    none can (the forward branches or loops on tensor values in its own code), places modules instead: the forward
    runs once on the example inputs (real weights needed) to record its module calls, whole modules are placed on
    stages (partitioner.plan.placement), and the model's own forward runs at every call, each placed module on its
    stage (under torchrun rank 0 runs the forward and sends each call of a module placed on stage s to rank s); one
    microbatch unless `microbatches` says otherwise, no tensor, context or data parallelism. "module-placement": that
    mode whatever the graph captures would do.
    pad_gemms: on a device whose tensor-core GEMMs slow down when a row length (K or N) is not a multiple of 16 bytes
    (the GPU presets), pad such matrix products with zeros and slice the result (partitioner.passes.align: e.g. an
    LM head over a 50,257-token vocabulary), where the cost model prices the padded product and its copies lower;
    the plan records them (`padded_gemms`). Outputs equal the model's up to the rounding of another GEMM kernel.
    master_weights: how the memory and the optimizer step are priced for training. False: Adam's two moments in each
    parameter's dtype, as torch's optimizers keep them over the model's own parameters (what `make_optimizer` runs:
    8 bytes per bf16 parameter with its weight and gradient, 16 per fp32 one). True: fp32 moments and an fp32 master
    copy of every 16-bit parameter, as the mixed-precision optimizers of Megatron-LM and DeepSpeed keep them (16
    bytes per parameter): for plans of runs whose optimizer does that (the runtime itself keeps no master copy).
    None: a saved plan's setting, else False. The plan records it (`master_weights`).
    Raises ValueError on bad options, inputs that do not fit the model, or memory no layout satisfies.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"compile expects an nn.Module, got {type(model).__name__}")
    options = CompileOptions.create(
        devices=devices, device_type=device_type, microbatches=microbatches, training=training,
        memory_limit=memory_limit, schedule=schedule, pipeline=pipeline, tensor_parallel=tensor_parallel,
        stages_per_device=stages_per_device, plan=plan, mincut=mincut, cost=cost, batch_dim=batch_dim,
        recompute=recompute, data_parallel=data_parallel, overlap_grad_reduce=overlap_grad_reduce,
        sequence_parallel=sequence_parallel, context_parallel=context_parallel, verbose=verbose, capture=capture,
        pad_gemms=pad_gemms, master_weights=master_weights,
    )  # fmt: skip
    example_inputs = as_call(example_inputs)
    if example_kwargs is not None and not isinstance(example_kwargs, dict):
        raise ValueError(f"example_kwargs must be a dict of keyword arguments, got {type(example_kwargs).__name__}")
    compiled = CompiledModel(model=model, options=options)
    if example_inputs or example_kwargs is not None:
        _build(compiled, example_inputs, dict(example_kwargs or {}))
    return compiled


def _profile(model: nn.Module, gm: fx.GraphModule, inputs: list[Any], training: bool) -> dict[str, tuple[float, float]]:
    """Profile mode's per-node (forward, backward) seconds on this machine, or a clear error on meta tensors."""
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta or any(isinstance(x, torch.Tensor) and x.is_meta for x in inputs):
        what = f"parameter {meta[0]!r} is" if meta else "the example inputs are"
        raise ValueError(
            f'cost="profile" times the model on this machine, but {what} on the meta device: pass real weights '
            'and example inputs, or use cost="roofline" (the default) to plan a meta model'
        )
    return profile_node_times(gm, inputs, backward=training)


def _torchrun_world(devices: int) -> int:
    """WORLD_SIZE under torchrun (1 without it); a world that does not match the plan is a clear error."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != devices:
        raise ValueError(
            f"running under torchrun with WORLD_SIZE={world}, but the model was compiled for devices={devices}: "
            f"launch torchrun with --nproc-per-node {devices} (x nodes), or compile with devices={world}"
        )
    return world


def _structure_of(model: nn.Module) -> dict[str, int]:
    """Identity of every submodule, parameter and buffer by name: what the compiled stages hold."""
    ids = {f"submodule {n or '<root>'!r}": id(m) for n, m in model.named_modules(remove_duplicate=False)}
    ids.update((f"parameter {n!r}", id(p)) for n, p in model.named_parameters(remove_duplicate=False))
    ids.update((f"buffer {n!r}", id(b)) for n, b in model.named_buffers(remove_duplicate=False))
    return ids


def _changed_structure(model: nn.Module, structure: dict[str, int]) -> str | None:
    """The first submodule / parameter / buffer whose object differs from `structure` (None: unchanged)."""
    now = _structure_of(model)
    if now == structure:
        return None
    return next((k for k in (*structure, *now) if structure.get(k) != now.get(k)), None)


def _build(cm: CompiledModel, args: tuple, kwargs: dict[str, Any]) -> None:
    """The passes of docs/design.md's picture: capture -> annotate -> cost -> batch proof -> plan -> apply."""
    o = cm.options
    label = f"{type(cm.model).__name__} on {o.devices} devices"
    if o.capture == PLACEMENT or (o.saved_plan is not None and o.saved_plan.capture == PLACEMENT):
        why = "compile(capture='module-placement')" if o.capture == PLACEMENT else "the saved plan places modules"
        _build_placement(cm, args, kwargs, why)
        return
    try:
        with Progress(label, enabled=o.verbose) as progress:
            _build_graph(cm, args, kwargs, progress)
    except UncapturableForward as e:  # no graph holds the forward: place its modules instead
        logger.warning("%s is compiled by module placement (its own forward runs, whole modules placed): %s",
                       type(cm.model).__name__, e)  # fmt: skip
        _build_placement(cm, args, kwargs, str(e))


def _build_graph(cm: CompiledModel, args: tuple, kwargs: dict[str, Any], progress: Progress) -> None:
    """The graph path: capture -> annotate -> cost -> batch proof -> plan -> apply."""
    o = cm.options
    label = f"{type(cm.model).__name__} on {o.devices} devices"
    with progress.phase("capture"):
        captured = capture(cm.model, args, kwargs)  # UncapturableForward: the caller places modules instead
        gm = captured.graph_module
        if captured.leaves:  # each leaf runs whole on one stage and is priced as one block: say so, and why
            why = "; ".join(f.reason for f in captured.fallbacks if f.path in ("torch.export", "module-level"))
            logger.warning(
                "%s: neither torch.fx nor torch.export captured the whole model, so %d module(s) stay opaque "
                "leaves that no stage boundary, tensor or context parallelism goes into (%s): %s",
                type(cm.model).__name__, len(captured.leaves), ", ".join(captured.leaves[:5])
                + (", ..." if len(captured.leaves) > 5 else ""), why,
            )  # fmt: skip
    with progress.phase("annotate"):
        inputs = captured.flatten_inputs(args, kwargs)
        annotate(gm, inputs, training=o.training)
        measured = _profile(cm.model, gm, inputs, o.training) if o.cost == "profile" else None
        costs = node_costs(gm, o.spec, training=o.training, measured=measured)
        pads = _gemm_pads(gm, o, costs) if measured is None and o.saved_plan is None else {}
        pg = build_planning_graph(gm, costs, o.spec, training=o.training, master_weights=o.master_weights)
    # Training splits the batch: prove that samples stay independent (plan.batch) before planning a split.
    with progress.phase("batch"):
        dims = batch_dims_of(o.batch_dim, captured.input_names, inputs)
        flow = batch_flow(gm, inputs, captured.input_names, dims) if o.training else BatchFlow(dims)
    with progress.phase("plan"):
        planned = plan_model(type(cm.model).__name__, captured, pg, flow, inputs, o)
    p = planned.plan
    if pads:  # a saved plan keeps its own record
        p = replace(p, padded_gemms=applicable_pads(pads, gm, plan_layout(p)))
    logger.info(
        "%s: pipeline %d x tensor %d x data %d, %d microbatches, %s; predicted step %s",
        label, p.pipeline_degree, p.tensor_degree, p.data_degree, p.microbatches, p.schedule,
        format_seconds(p.predicted["step_time"]),
    )  # fmt: skip
    with progress.phase("split"):
        stages = apply(p, captured)  # the Plan decides what runs (partitioner.apply)
    times = progress.times

    cm._plan, cm.captured, cm.stages, cm.compile_times = p, captured, stages, times
    cm.planning_graph, cm.simulation = planned.best.graph, planned.best.simulation
    cm._runner = LocalPipeline(captured, stages)
    cm._input_meta = [(n, v.dim(), v.dtype) for n, v in zip(captured.input_names, inputs)]
    cm._structure = _structure_of(cm.model)


def _gemm_pads(gm: fx.GraphModule, o: CompileOptions, costs: dict[str, NodeCost]) -> dict[str, list[int]]:
    """The misaligned GEMMs worth padding on the options' device (passes.align.gemm_pads), node -> [K pad, N pad];
    their entries of `costs` become the padded ones. Empty when pad_gemms is off or the device has no penalty."""
    if not o.pad_gemms or o.spec.misaligned_gemm_efficiency >= 1.0:
        return {}
    padded = gemm_pads(gm, o.spec, costs, training=o.training)
    costs.update(padded)
    by_name = {n.name: n for n in gm.graph.nodes}
    return {name: list(row_pads(by_name[name], o.spec) or (0, 0)) for name in padded}


def _build_placement(cm: CompiledModel, args: tuple, kwargs: dict[str, Any], reason: str) -> None:
    """The module-placement path (no graph): record the forward's module calls, place modules on stages, run the
    model's own forward (partitioner.capture.placement, plan.placement, runtime.placement)."""
    o = cm.options
    refused = {
        "tensor_parallel": o.tensor_parallel not in (None, 1), "context_parallel": o.context_parallel not in (None, 1),
        "data_parallel": o.data_parallel is not None, "recompute": o.recompute not in (None, "none"),
        "schedule": o.schedules not in (DEFAULT_SCHEDULES, ("gpipe",)), "cost": o.cost != "roofline",
    }  # fmt: skip
    if any(refused.values()):
        raise ValueError(
            f"{type(cm.model).__name__} is compiled by module placement ({reason}), which runs whole modules on "
            f"pipeline stages in GPipe's order and prices them with the roofline: the options "
            f"{sorted(k for k, v in refused.items() if v)} do not apply to it; leave them at their defaults"
        )
    signature = _forward_signature(cm.model)
    flat = flat_arguments(signature, _bind(signature, tuple(args), dict(kwargs)))
    input_names = [n for n, v in flat.items() if isinstance(v, torch.Tensor)]
    constants = {n: _json_value(v) for n, v in flat.items() if not isinstance(v, torch.Tensor)}
    label = f"{type(cm.model).__name__} on {o.devices} devices (module placement)"
    with Progress(label, enabled=o.verbose) as progress:
        with progress.phase("record"):
            record = record_calls(cm.model, tuple(args), dict(kwargs), training=o.training)
            record.master_weights = o.master_weights
        with progress.phase("plan"):
            plan, layout = plan_placement(
                record, model_name=type(cm.model).__name__, devices=o.devices, spec=o.spec,
                microbatches=o.microbatches or 1, memory_limit=o.memory_limit, pipeline=o.pipeline,
                input_names=input_names, constants=constants,
                fallbacks=[{"what": "", "path": PLACEMENT, "reason": reason}], saved=o.saved_plan,
            )  # fmt: skip
    logger.info(
        "%s: %d stage(s) over %d placed modules, %d microbatch(es); predicted step %s", label, plan.pipeline_degree,
        len(plan.node_stage), plan.microbatches, format_seconds(plan.predicted["step_time"]),
    )  # fmt: skip
    cm._plan, cm.compile_times, cm.simulation = plan, progress.times, layout.simulation
    cm._runner = PlacementRunner(cm.model)
    cm._structure = _structure_of(cm.model)
