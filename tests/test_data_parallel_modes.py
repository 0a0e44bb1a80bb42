"""Data-parallel modes of the distributed runtime (ddp, zero1, zero2, fsdp, hsdp) against single-process training.

Every case compiles gpt3-tiny for pp x dp CPU devices (the plan's data degree is dp), forces the mode the way a
planner would record it (``dataclasses.replace(plan, data_parallel=..., data_parallel_shard=...)`` applied with
``compile(plan=...)``; one case through ``cm.distributed(data_parallel=...)`` instead), spawns pp x dp gloo ranks
that train 3 AdamW steps through ``pipe.make_optimizer``, and compares the gathered weights with one process
training the whole batch (its microbatches x dp chunks, loss averaged over them): a gradient left unreduced, or
a ZeRO shard's parameters not stepped or not broadcast, shows in the weights. AdamW is blind to a gradient's
scale (m / sqrt(v)); the SGD cases here (the sharded modes, 4 microbatches, each reduce-scattered in its own
backward) and in tests/test_distributed.py check the averaging. Equality is to 1e-5 (fp32), as there; lr is 1e-3
because AdamW turns gradients that are zero up to rounding (the key bias: softmax ignores a shift) into updates of
up to lr x |g| / eps, whose rounding noise the distributed sum does not reproduce bit for bit.

Memory (plan.sharding's model): after every microbatch's backward, zero2's and fsdp's gradients are 1/dp shards and
fsdp's parameters are freed; under multi-stage schedules fsdp gathers no layer ahead of its forward. Each check is
also run against torch's own behaviour, where it fails. CI runs the fast cases; ``pytest -m slow`` the rest.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

import partitioner
import zoo
from partitioner.devices import DeviceSpec, get_device_spec
from partitioner.launch import spawn
from partitioner.runtime.data_parallel import hsdp_sizes, layer_groups, make_optimizer
from partitioner.runtime.stage import fsdp_param_groups
from partitioner.schedules import DATA_PARALLEL_MODES, get_schedule

MODEL, BATCH, MICRO, LR, SEED, STEPS = "gpt3-tiny", 8, 2, 1e-3, 0, 3  # BATCH: rows per replica
SGD_LR = 0.1  # SGD's update is lr x the gradient: a gradient averaged twice over dp (or never) shows at 1e-5


def _compile(meta: torch.nn.Module, pp: int, dp: int, schedule: str, micro: int = MICRO) -> partitioner.CompiledModel:
    return partitioner.compile(
        meta, devices=pp * dp, example_inputs=zoo.example_inputs(MODEL, batch=BATCH * dp, device="meta"),
        device_type=_spec(dp), microbatches=micro, schedule=schedule, pipeline=pp, tensor_parallel=1,
        stages_per_device=get_schedule(schedule).default_stages_per_rank(),
    )  # fmt: skip


def _spec(dp: int) -> DeviceSpec:
    """The CPU, with nodes of 2 devices at dp 4: HSDP's shard group is the dp ranks of one node (plan.sharding)."""
    cpu = get_device_spec("cpu")
    return dataclasses.replace(cpu, devices_per_node=2) if dp == 4 else cpu


def train_rank(
    *, mode: str, pp: int, dp: int, shard: int = 0, schedule: str = "1f1b", override: bool = False, out: str,
    optimizer: str = "adamw", micro: int = MICRO, overlap: bool = True,
) -> None:  # fmt: skip
    """One rank: compile for pp x dp, record (or override) the mode (and with `overlap` False, a gradient reduction
    after the backward), train STEPS steps (AdamW, or SGD) on this replica's rows."""
    import torch.distributed as dist

    from partitioner.runtime.materialize import record_init

    meta, init = record_init(lambda: zoo.get(MODEL), seed=SEED)
    cm = _compile(meta, pp, dp, schedule, micro)
    assert (cm.plan.pipeline_degree, cm.plan.data_degree) == (pp, dp), cm.plan.summary()
    if override:
        if not overlap:  # the plan says: reduce after the backward (ddp); the override asks for another mode
            after = dataclasses.replace(cm.plan, data_parallel="ddp", data_parallel_shard=0, overlap_grad_reduce=False)
            cm = partitioner.compile(
                meta, devices=pp * dp, example_inputs=zoo.example_inputs(MODEL, batch=BATCH * dp, device="meta"),
                device_type=_spec(dp), plan=after,
            )  # fmt: skip
        pipe = cm.distributed(weights=init, data_parallel=mode, data_parallel_shard=shard)
    else:  # what the planner records: the runtime must run it
        plan = dataclasses.replace(cm.plan, data_parallel=mode, data_parallel_shard=shard, overlap_grad_reduce=overlap)
        cm = partitioner.compile(
            meta, devices=pp * dp, example_inputs=zoo.example_inputs(MODEL, batch=BATCH * dp, device="meta"),
            device_type=_spec(dp), plan=plan,
        )  # fmt: skip
        pipe = cm.distributed(weights=init)
    assert (pipe.data_parallel, pipe.data_parallel_shard) == (mode, shard)
    assert pipe.reduce_after_backward == (not overlap)
    opt = (
        pipe.make_optimizer(torch.optim.SGD, lr=SGD_LR)
        if optimizer == "sgd"
        else pipe.make_optimizer(torch.optim.AdamW, lr=LR)
    )
    replica = pipe.mesh.get_local_rank("dp")
    rows = slice(replica * BATCH, (replica + 1) * BATCH)
    inputs = tuple(x[rows] for x in zoo.example_inputs(MODEL, batch=BATCH * dp))
    targets = zoo.example_targets(MODEL, batch=BATCH * dp)[rows]
    losses = []
    for _ in range(STEPS):
        losses.append(float(pipe.step(inputs, targets, zoo.loss_fn(MODEL))))
        opt.step()
        pipe.zero_grad()
    # parameters whose optimizer state this rank holds (ZeroRedundancyOptimizer's local optimizer: its part only)
    held = (len(opt.optim.state) if hasattr(opt, "optim") else len(opt.state), len(pipe.parameters()))
    state = pipe.full_state_dict()
    wrappers = [type(m).__name__ for m in pipe.stage_submodules]
    groups = [len(fsdp_param_groups(m)) for m in pipe.stage_submodules]
    placements = sorted({str(p.placements) for p in pipe.parameters() if hasattr(p, "placements")})
    # FSDP2 frees a stage's gathered parameters after its forward unless zero2 (torch's private record of it, per
    # FSDP group: the layers' and the root's; a stage may have no parameters outside its layers)
    reshards = [sorted({g._reshard_after_forward for g in fsdp_param_groups(m)}) for m in pipe.stage_submodules
                if hasattr(m, "_get_fsdp_state")]  # fmt: skip
    pipe.close()
    if dist.get_rank() == 0:
        torch.save(
            {"losses": losses, "state": state, "wrappers": wrappers, "optimizer": type(opt).__name__,
             "placements": placements, "reshards": reshards, "held": held, "groups": groups},
            out,
        )  # fmt: skip


def _reference(dp: int, optimizer: str = "adamw", micro: int = MICRO) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process, the whole batch (BATCH x dp rows) in micro x dp microbatches, AdamW (or SGD)."""
    torch.manual_seed(SEED)
    net = zoo.get(MODEL)
    sgd = optimizer == "sgd"
    opt = torch.optim.SGD(net.parameters(), lr=SGD_LR) if sgd else torch.optim.AdamW(net.parameters(), lr=LR)
    loss_fn, chunks = zoo.loss_fn(MODEL), micro * dp
    inputs, targets = zoo.example_inputs(MODEL, batch=BATCH * dp), zoo.example_targets(MODEL, batch=BATCH * dp)
    xs, ts = [torch.tensor_split(x, chunks) for x in inputs], torch.tensor_split(targets, chunks)
    losses = []
    for _ in range(STEPS):
        total = 0.0
        for i in range(chunks):
            loss = loss_fn(net(*[x[i] for x in xs]), ts[i])
            (loss / chunks).backward()
            total += loss.item() / chunks
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}


_WRAPPER = {
    "ddp": "DistributedDataParallel",
    "zero1": "DistributedDataParallel",
    "zero2": "FSDPStageAdapter",
    "fsdp": "FSDPStageAdapter",
    "hsdp": "FSDPStageAdapter",
}
_OPTIMIZER = {"zero1": "ZeroRedundancyOptimizer"}

_CASES = [  # (mode, pp, dp, shard, schedule, override)
    ("zero1", 2, 2, 0, "1f1b", False),  # ZeRO over dp with a tied embedding / LM head across the pipeline ranks
    ("zero2", 1, 2, 0, "1f1b", False),
    pytest.param("ddp", 1, 2, 0, "1f1b", True, marks=pytest.mark.slow),
    pytest.param("zero1", 1, 2, 0, "1f1b", False, marks=pytest.mark.slow),
    pytest.param("fsdp", 1, 2, 0, "1f1b", False, marks=pytest.mark.slow),
    pytest.param("zero2", 2, 2, 0, "1f1b", True, marks=pytest.mark.slow),
    pytest.param("zero2", 2, 2, 0, "zbv", False, marks=pytest.mark.slow),  # split backward, tied copies on one rank
    pytest.param("hsdp", 1, 4, 2, "1f1b", False, marks=pytest.mark.slow),
]


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("mode", "pp", "dp", "shard", "schedule", "override"), _CASES)
def test_mode_matches_single_process_adamw_on_the_whole_batch(
    mode: str, pp: int, dp: int, shard: int, schedule: str, override: bool, tmp_path: Path
) -> None:
    kw: dict[str, Any] = dict(mode=mode, pp=pp, dp=dp, shard=shard, schedule=schedule, override=override)
    _check_training(_train(tmp_path, pp * dp, **kw), **kw)


_SGD_CASES = [  # (mode, pp, dp, shard, schedule): 4 microbatches per replica, each reduce-scattered in its backward
    ("fsdp", 1, 2, 0, "1f1b"),
    pytest.param("zero2", 1, 2, 0, "1f1b", marks=pytest.mark.slow),
    pytest.param("zero2", 1, 2, 0, "gpipe", marks=pytest.mark.slow),
    pytest.param("fsdp", 2, 2, 0, "interleaved", marks=pytest.mark.slow),  # the schedule's UNSHARD / RESHARD actions
    pytest.param("zero2", 2, 2, 0, "looped-bfs", marks=pytest.mark.slow),
    pytest.param("hsdp", 1, 4, 2, "1f1b", marks=pytest.mark.slow),  # all-reduced across groups in the last backward
    pytest.param("fsdp", 2, 2, 0, "zbv", marks=pytest.mark.slow),  # split backward: torch's own FSDP handling
]


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("mode", "pp", "dp", "shard", "schedule"), _SGD_CASES)
def test_sharded_modes_match_single_process_sgd_on_the_whole_batch(
    mode: str, pp: int, dp: int, shard: int, schedule: str, tmp_path: Path
) -> None:
    """SGD moves by lr x the gradient: a gradient averaged over dp twice (reduced per microbatch and again at the
    step's end), or summed instead of averaged, shows in the weights, where AdamW's m / sqrt(v) hides it."""
    kw: dict[str, Any] = dict(mode=mode, pp=pp, dp=dp, shard=shard, schedule=schedule, override=True)
    _check_training(_train(tmp_path, pp * dp, optimizer="sgd", micro=4, **kw), optimizer="sgd", micro=4, **kw)


def probe_rank(*, modes: list[str], out: str) -> None:
    """dp=2, 4 microbatches, per mode: FSDP's state after every microbatch's backward but the last, and at the step's
    end, over one step as the runtime runs it and one with torch's own PipelineStage behaviour (no sync and no
    reshard until REDUCE_GRAD); the two steps' reduced gradients too (no optimizer step between them)."""
    import torch.distributed as dist

    from partitioner.runtime.data_parallel import full_tensor
    from partitioner.runtime.materialize import record_init

    got: dict[str, Any] = {}
    for mode in modes:
        meta, init = record_init(lambda: zoo.get(MODEL), seed=SEED)
        pipe = _compile(meta, 1, 2, "1f1b", 4).distributed(weights=init, data_parallel=mode)
        replica = pipe.mesh.get_local_rank("dp")
        rows = slice(replica * BATCH, (replica + 1) * BATCH)
        inputs = tuple(x[rows] for x in zoo.example_inputs(MODEL, batch=BATCH * 2))
        targets = zoo.example_targets(MODEL, batch=BATCH * 2)[rows]
        (stage,) = pipe.pipeline_stages
        during: list[list[dict[str, Any]]] = []
        retained: list[tuple[int, int]] = []
        backward = stage.backward_maybe_with_nosync

        def probed(
            backward_type: str, bwd_kwargs: dict, last_backward: bool = False, *, backward: Any = backward,
            during: list = during, retained: list = retained, submod: torch.nn.Module = stage.submod,
        ) -> Any:  # fmt: skip
            result = backward(backward_type, bwd_kwargs, last_backward=last_backward)
            if not last_backward:
                during.append(_fsdp_snapshot(submod))
                retained.append(_reduce_scatter_buffers(submod))
            return result

        stage.backward_maybe_with_nosync = probed  # the schedule calls it through the instance
        for behaviour, ours in (("runtime", True), ("torch", False)):
            stage.reduce_every_backward = ours
            during.clear()
            retained.clear()
            pipe.step(inputs, targets, zoo.loss_fn(MODEL))
            grads = {n: full_tensor(p.grad) for n, p in pipe.named_parameters()}
            got[f"{mode}/{behaviour}"] = {
                "during": list(during), "retained": list(retained), "after": _fsdp_snapshot(stage.submod),
                "grads": grads,
                "groups": [[type(m).__name__ for m in g] for g in layer_groups(stage.submod)],
            }  # fmt: skip
            pipe.zero_grad()
        pipe.close()
    if dist.get_rank() == 0:
        torch.save(got, out)


def _fsdp_snapshot(module: torch.nn.Module, only: set[int] | None = None) -> list[dict[str, Any]]:
    """Per FSDP-managed parameter (torch-private FSDPParam): its sharded state, the bytes of its gathered copy, whether
    an unsharded gradient is held, and the sizes of its gradient shard and of the whole parameter. `only`: the ids of
    the modules whose groups to look at."""
    rows = []
    for group in fsdp_param_groups(module):
        if only is not None and not any(id(m) in only for m in group.modules):
            continue
        for fp in group.fsdp_params:
            unsharded = getattr(fp, "_unsharded_param", None)
            grad = fp.sharded_param.grad
            rows.append({
                "name": fp._param_fqn, "state": fp.sharded_state.name,
                "gathered_bytes": sum(t.untyped_storage().nbytes() for t in fp.all_gather_outputs),
                "full_grad": (unsharded is not None and unsharded.grad is not None)
                or fp.unsharded_accumulated_grad is not None,
                "grad_numel": None if grad is None else grad.to_local().numel(),
                "numel": fp.sharded_param.numel(), "rows": fp.sharded_param.shape[0],
            })  # fmt: skip
    return rows


def _reduce_scatter_buffers(module: torch.nn.Module, dp: int = 2) -> tuple[int, int]:
    """(bytes of the reduce-scatter inputs FSDP still holds, the largest group's padded full gradient in bytes).
    FSDP keeps the last reduce-scatter's input (a group's gradients, flattened) until the next group's reduction
    needs the buffer (``set_reduce_scatter_max_input_buffers``, 1 by default): the model's transient."""
    groups = fsdp_param_groups(module)
    contexts = {id(g.comm_ctx): g.comm_ctx for g in groups}.values()
    held = sum(st.reduce_scatter_input.untyped_storage().nbytes() for c in contexts for st in c.reduce_scatter_states)
    largest = max(
        sum(-(-fp.sharded_param.shape[0] // dp) * dp * (fp.sharded_param.numel() // fp.sharded_param.shape[0])
            * fp.sharded_param.element_size() for fp in g.fsdp_params)
        for g in groups
    )  # fmt: skip
    return held, largest


def _sharded_grad(row: dict[str, Any], dp: int = 2) -> bool:
    """A gradient held as this rank's dim-0 chunk of 1/dp (ceil) of the parameter, and no unsharded one."""
    chunk = -(-row["rows"] // dp) * (row["numel"] // row["rows"])
    return not row["full_grad"] and row["grad_numel"] is not None and row["grad_numel"] <= chunk < row["numel"]


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("modes", [["zero2", "fsdp"]])
def test_gradients_are_sharded_and_fsdp_parameters_freed_between_microbatch_backwards(
    modes: list[str], tmp_path: Path
) -> None:
    """The planner's memory model (plan.sharding): zero2 holds w + g/d + o/d, fsdp w/d + g/d + o/d. After every
    microbatch's backward each gradient is this rank's 1/dp shard and no unsharded gradient is left, and fsdp's
    parameters are freed (zero2's stay gathered: full weights). torch's own stage, run on the same pipeline, fails
    this check (every gradient unsharded, every parameter gathered until REDUCE_GRAD); both give the same gradients."""
    out = tmp_path / "out.pt"
    results = spawn("tests.test_data_parallel_modes:probe_rank", 2, dict(modes=modes, out=str(out)), timeout=140,
                    pg_timeout=30)  # fmt: skip
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    got = torch.load(out)
    for mode in modes:
        ours, torchs = got[f"{mode}/runtime"], got[f"{mode}/torch"]
        # h.0 and h.1 are FSDP groups of the leaves the stage graph calls (the layer containers are never called)
        assert ours["groups"] == [["FSDPLayerNorm", "FSDPLinear", "FSDPLinear", "FSDPLinear", "FSDPLinear",
                                   "FSDPLayerNorm", "FSDPLinear", "FSDPLinear"]] * 2, ours["groups"]  # fmt: skip
        # wte (lm_head's tied weight), wpe, 16 per layer, ln_f: every parameter, after each of 3 backwards
        assert len(ours["during"]) == 3 and len(ours["during"][0]) == 2 + 16 * 2 + 2
        for rows in ours["during"]:
            assert all(_sharded_grad(r) for r in rows), [r for r in rows if not _sharded_grad(r)]
            gathered = {r["state"] for r in rows}, all(r["gathered_bytes"] > 0 for r in rows)
            assert gathered == (({"UNSHARDED"}, True) if mode == "zero2" else ({"SHARDED"}, False)), gathered
            if mode == "fsdp":
                assert sum(r["gathered_bytes"] for r in rows) == 0
        # no other gradient: FSDP's last reduce-scatter input, at most one group's (plan.sharding's `transient`)
        assert all(0 < held <= largest for held, largest in ours["retained"]), ours["retained"]
        for rows in torchs["during"]:  # the previous behaviour: the same check fails
            assert not any(_sharded_grad(r) for r in rows) and all(r["full_grad"] for r in rows)
            assert {r["state"] for r in rows} == {"UNSHARDED"}
        for behaviour in (ours, torchs):  # at the step's end both are sharded, gradients reduced
            assert all(_sharded_grad(r) and r["state"] == "SHARDED" for r in behaviour["after"])
        assert set(ours["grads"]) == set(torchs["grads"])
        for name, g in torchs["grads"].items():
            torch.testing.assert_close(ours["grads"][name], g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def prefetch_rank(*, schedule: str, out: str) -> None:
    """fsdp at pp=2 x dp=2 on a multi-stage schedule: the bytes of gathered layer parameters (layer_groups) of this
    rank's stages at the start of every forward, one step as the runtime runs it, one with the schedule's UNSHARD
    reaching the layers again (the runtime's override of their ``unshard`` removed)."""
    import torch.distributed as dist

    from partitioner.runtime.materialize import record_init

    meta, init = record_init(lambda: zoo.get(MODEL), seed=SEED)
    pipe = _compile(meta, 2, 2, schedule, 4).distributed(weights=init, data_parallel="fsdp")
    replica = pipe.mesh.get_local_rank("dp")
    rows = slice(replica * BATCH, (replica + 1) * BATCH)
    inputs = tuple(x[rows] for x in zoo.example_inputs(MODEL, batch=BATCH * 2))
    targets = zoo.example_targets(MODEL, batch=BATCH * 2)[rows]
    layers = {id(m) for st in pipe.pipeline_stages for g in layer_groups(st.submod) for m in g}
    starts: list[int] = []
    for st in pipe.pipeline_stages:
        forward = st.forward_one_chunk

        def probed(*args: Any, forward: Any = forward, **kwargs: Any) -> Any:
            starts.append(sum(r["gathered_bytes"] for s in pipe.pipeline_stages
                              for r in _fsdp_snapshot(s.submod, only=layers)))  # fmt: skip
            return forward(*args, **kwargs)

        st.forward_one_chunk = probed
    got = {}
    for behaviour in ("runtime", "torch"):
        if behaviour == "torch":
            for st in pipe.pipeline_stages:
                for m in st.submod.modules():
                    vars(m).pop("unshard", None)
        starts.clear()
        pipe.step(inputs, targets, zoo.loss_fn(MODEL))
        pipe.zero_grad()
        got[behaviour] = list(starts)
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, got)
    pipe.close()
    if dist.get_rank() == 0:
        torch.save({"ranks": gathered, "layers": len(layers)}, out)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize("schedule", ["interleaved", "looped-bfs"])
def test_fsdp_gathers_no_layer_ahead_of_its_forward_under_multi_stage_schedules(schedule: str, tmp_path: Path) -> None:
    """torch's multi-stage schedules UNSHARD every FSDP module of a stage before its first forward: all its layers
    at once. The runtime leaves the layers to FSDP's hooks (one at a time); with the schedule's UNSHARD reaching them
    the same check fails."""
    out = tmp_path / "out.pt"
    results = spawn("tests.test_data_parallel_modes:prefetch_rank", 4, dict(schedule=schedule, out=str(out)),
                    timeout=140, pg_timeout=30)  # fmt: skip
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    got = torch.load(out)
    assert got["layers"] > 0
    for rank in got["ranks"]:
        assert len(rank["runtime"]) == 2 * 4 and set(rank["runtime"]) == {0}, rank
    assert any(max(rank["torch"]) > 0 for rank in got["ranks"]), got["ranks"]


def _train(tmp_path: Path, ranks: int, **kw: Any) -> dict[str, Any]:
    out = tmp_path / "out.pt"
    results = spawn(
        "tests.test_data_parallel_modes:train_rank", ranks, dict(kw, out=str(out)), timeout=140, pg_timeout=30
    )
    for r in results:
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    return torch.load(out)


def _check_training(
    got: dict[str, Any], *, mode: str, pp: int, dp: int, shard: int, schedule: str, override: bool,
    optimizer: str = "adamw", micro: int = MICRO, overlap: bool = True,
) -> None:  # fmt: skip
    stages_per_rank = get_schedule(schedule).default_stages_per_rank()
    assert got["wrappers"] == [_WRAPPER[mode] if overlap else "StageAdapter"] * stages_per_rank
    assert got["optimizer"] == _OPTIMIZER.get(mode, "AdamW" if optimizer == "adamw" else "SGD")
    held, total = got["held"]
    if optimizer == "adamw":  # (plain SGD keeps no state)
        assert 0 < held < total if mode == "zero1" else held == total, got["held"]
    if mode in ("zero2", "fsdp", "hsdp") and pp == 1:  # FSDP groups: h.0, h.1 and the root's (runtime.data_parallel)
        assert got["groups"] == [1 if get_schedule(schedule).split_backward else 3], got["groups"]
    # FSDP2 frees the gathered parameters after forward in fsdp / hsdp (ZeRO-3), except under a split backward
    reshards = mode in ("fsdp", "hsdp") and not get_schedule(schedule).split_backward
    assert got["reshards"] == ([[reshards]] * stages_per_rank if mode in ("zero2", "fsdp", "hsdp") else [])
    if mode == "hsdp":  # replicated across the dp / shard groups, sharded inside each
        assert got["placements"] == ["(Replicate(), Shard(dim=0))"]
    losses, state = _reference(dp, optimizer, micro)
    assert got["losses"] == pytest.approx(losses, abs=1e-5, rel=0)
    assert set(got["state"]) == set(state)
    for name, ref in state.items():
        torch.testing.assert_close(got["state"][name], ref, atol=1e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


_AFTER_BACKWARD_CASES = [  # (mode, pp, dp, schedule): no wrapper, every gradient averaged once after the backward
    ("ddp", 2, 2, "1f1b"),  # with the tied embedding / LM head across the pipeline ranks (reduced on their own path)
    pytest.param("zero1", 1, 2, "1f1b", marks=pytest.mark.slow),
]


@pytest.mark.distributed
@pytest.mark.timeout(150)
@pytest.mark.parametrize(("mode", "pp", "dp", "schedule"), _AFTER_BACKWARD_CASES)
def test_gradients_reduced_after_the_backward_match_single_process_sgd(
    mode: str, pp: int, dp: int, schedule: str, tmp_path: Path
) -> None:
    """overlap_grad_reduce=False (Megatron-LM's own DDP, 2021): SGD sees the averaging a missing or doubled
    reduction would break; 4 microbatches, so the reduction must come after all of them."""
    kw: dict[str, Any] = dict(mode=mode, pp=pp, dp=dp, shard=0, schedule=schedule, override=False, optimizer="sgd",
                              micro=4, overlap=False)  # fmt: skip
    _check_training(_train(tmp_path, pp * dp, **kw), **kw)


# ----------------------------------------------------------------------------------------------------------------
# Refusals and in-process pieces
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_a_plan_with_an_impossible_hsdp_shard_is_refused_on_every_rank(tmp_path: Path) -> None:
    """hsdp with shard = dp (that is fsdp) is refused at construction, with the numbers, before any stage traffic."""
    kw = dict(mode="hsdp", pp=1, dp=2, shard=2, override=True, out=str(tmp_path / "out.pt"))
    results = spawn("tests.test_data_parallel_modes:train_rank", 2, kw, timeout=50, pg_timeout=20)
    for r in results:
        assert r.returncode == 1 and not r.timed_out, r.stderr[-2000:]
        assert "data_parallel_shard=2 ranks, which must divide the data-parallel degree 2" in r.stderr


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_a_reduction_after_the_backward_is_refused_for_a_sharded_override(tmp_path: Path) -> None:
    """A plan that all-reduces after the backward (ddp) run as fsdp: refused on every rank, naming both."""
    kw = dict(mode="fsdp", pp=1, dp=2, override=True, overlap=False, out=str(tmp_path / "out.pt"))
    results = spawn("tests.test_data_parallel_modes:train_rank", 2, kw, timeout=50, pg_timeout=20)
    for r in results:
        assert r.returncode == 1 and not r.timed_out, r.stderr[-2000:]
        assert "overlap_grad_reduce=False" in r.stderr and "data_parallel='fsdp'" in r.stderr


def all_reduce_rank(*, out: str) -> None:
    """Mixed dtypes, one parameter without a gradient, buckets of 64 bytes: the averages and the bucket count."""
    import torch.distributed as dist

    from partitioner.runtime.data_parallel import all_reduce_gradients

    rank = dist.get_rank()
    f32, bf16 = torch.float32, torch.bfloat16
    shapes = [(8, f32), (4, f32), (20, f32), (6, bf16), (3, f32)]
    params = [torch.nn.Parameter(torch.zeros(n, dtype=dt)) for n, dt in shapes]
    for i, p in enumerate(params[:4]):
        p.grad = torch.full_like(p, float(rank + 1) * (i + 1))
    buckets = all_reduce_gradients(params, dist.group.WORLD, bucket_bytes=64)
    if rank == 0:
        torch.save({"buckets": buckets, "grads": [p.grad for p in params]}, out)


@pytest.mark.distributed
@pytest.mark.timeout(60)
def test_all_reduce_gradients_averages_in_buckets_of_one_dtype(tmp_path: Path) -> None:
    out = tmp_path / "out.pt"
    results = spawn("tests.test_data_parallel_modes:all_reduce_rank", 2, dict(out=str(out)), timeout=50, pg_timeout=20)
    for r in results:
        assert r.returncode == 0, r.stderr[-2000:]
    got = torch.load(out)
    # float32: 32 B + 16 B fit one 64 B bucket, the 80 B tensor is a bucket of its own; bfloat16: one more
    assert got["buckets"] == 3
    for i, g in enumerate(got["grads"][:4]):
        torch.testing.assert_close(g, torch.full_like(g, 1.5 * (i + 1)))  # (1 + 2) / 2 x (i + 1)
    assert got["grads"][4] is None


@pytest.mark.parametrize(("dp", "shard"), [(4, 1), (4, 4), (6, 4), (4, 0), (2, 2)])
def test_hsdp_shard_must_divide_dp_strictly_between_1_and_dp(dp: int, shard: int) -> None:
    with pytest.raises(ValueError, match=f"data_parallel_shard={shard} .* degree {dp}"):
        hsdp_sizes(dp, shard)
    assert hsdp_sizes(8, 4) == (2, 4) and hsdp_sizes(6, 3) == (2, 3)


class _Block(torch.nn.Module):
    def __init__(self, shared: torch.nn.Module, inplace: bool = False, view_inplace: bool = False) -> None:
        super().__init__()
        self.norm, self.fc, self.twice = torch.nn.LayerNorm(4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.ones(4))  # read by get_attr: no module forward gathers it
        self.act, self.shared, self.view_inplace = torch.nn.ReLU(inplace=inplace), shared, view_inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(self.norm(x))
        if self.view_inplace:
            y.view(-1).mul_(2)
        y = self.act(y) * self.scale
        return x + self.shared(self.twice(self.twice(y)))


class _Layered(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, shared = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)  # `shared`: one module in every layer
        self.h = torch.nn.ModuleList(
            [
                _Block(shared),
                _Block(shared),
                _Block(shared),
                _Block(shared, inplace=True),
                _Block(shared, view_inplace=True),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.emb(x)
        for block in self.h:
            x = block(x)
        return x


def test_layer_groups_are_the_called_modules_that_only_their_layer_reaches() -> None:
    """FSDP groups per layer (runtime.data_parallel.layer_groups): the leaves the graph calls, under h.i, in call
    order; parameters read by get_attr, modules called twice, modules shared across layers, excluded (tied)
    parameters and everything outside the layers stay with the root group, and so do layers whose last module's
    output is written in place (h.3's ReLU(inplace=True), h.4's view(-1).mul_: FSDP's pre-backward hook sits there)."""
    gm = torch.fx.symbolic_trace(_Layered())
    assert any(n.op == "get_attr" and n.target == "h.0.scale" for n in gm.graph.nodes)
    excluded = {id(gm.get_submodule("h.2.fc").weight)}
    groups = layer_groups(torch.nn.Sequential(gm), excluded)  # the stage module may sit inside a wrapper
    names = {id(m): n for n, m in gm.named_modules()}
    assert [[names[id(m)] for m in g] for g in groups] == [["h.0.norm", "h.0.fc"], ["h.1.norm", "h.1.fc"], ["h.2.norm"]]
    assert layer_groups(torch.nn.Linear(2, 2)) == []  # not an fx graph: no groups (FSDP on the whole stage)


def test_make_optimizer_without_a_dp_group_is_the_plain_class() -> None:
    net = torch.nn.Linear(3, 2)
    for mode in DATA_PARALLEL_MODES:
        opt = make_optimizer(net.parameters(), torch.optim.AdamW, mode, None, lr=0.5)
        assert type(opt) is torch.optim.AdamW and opt.defaults["lr"] == 0.5
        assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 2


def test_make_optimizer_over_no_parameters_steps_nothing() -> None:
    """A rank whose stages read no parameter runs the same loop as the others: its optimizer (any mode, even with a
    dp group) holds one empty group and its step and zero_grad do nothing (torch's own refuse an empty list)."""
    for mode in DATA_PARALLEL_MODES:
        opt = make_optimizer([], torch.optim.AdamW, mode, None, lr=0.5)
        assert type(opt) is torch.optim.AdamW and [g["params"] for g in opt.param_groups] == [[]]
        opt.zero_grad()
        opt.step()
        assert opt.state_dict()["state"] == {}


def test_compiled_make_optimizer_trains_what_parameters_returns() -> None:
    """In one process cm.make_optimizer is the plain class over cm.parameters() (every stage's): one SGD step on the
    compiled model moves the weights as the same step on the model itself."""
    torch.manual_seed(0)
    net = zoo.get("gpt3-tiny")
    reference = copy.deepcopy(net)
    inputs, targets = zoo.example_inputs("gpt3-tiny", batch=4), zoo.example_targets("gpt3-tiny", batch=4)
    cm = partitioner.compile(net, devices=2, example_inputs=inputs, device_type="cpu", pipeline=2, microbatches=2)
    opt = cm.make_optimizer(torch.optim.SGD, lr=0.1)
    assert type(opt) is torch.optim.SGD
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in cm.parameters()}
    cm.step(inputs, targets, zoo.loss_fn("gpt3-tiny"))
    opt.step()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    zoo.loss_fn("gpt3-tiny")(reference(*inputs), targets).backward()
    ref_opt.step()
    for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
