"""Activation recomputation at runtime (passes.recompute, wired by partitioner.apply): a checkpointed graph computes
what the plain one does, gradients and dropout included, keeps far fewer activations, keeps every parameter's
name and identity, runs through the applier on the local pipeline and on tensor-parallel ranks (collectives
recomputed), and refuses regions it cannot recompute faithfully, naming the region and the node."""

from __future__ import annotations

import copy
import dataclasses
import math
import operator
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import partitioner
import zoo
from partitioner.annotate import annotate
from partitioner.apply import apply
from partitioner.capture import capture
from partitioner.launch import spawn
from partitioner.passes.recompute import CheckpointedRegion, checkpoint_regions
from partitioner.passes.retarget import retarget_devices
from partitioner.runtime.local import LocalPipeline
from partitioner.runtime.tp_local import ThreadGroup, _run_threads, check_tensor_parallel, run_tensor_parallel_local

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests._dist_worker import reference  # noqa: E402


# ---------------------------------------------------------------------------------------------------------- models
class CoreAttentionBlock(nn.Module):
    """Pre-LN block whose attention core is written out: q k^T, scaled in place, causal mask (a buffer), softmax,
    dropout, @ v."""

    def __init__(self, d: int, heads: int, seq: int, p: float):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.fc_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.drop = nn.Dropout(p)
        self.register_buffer("mask", torch.tril(torch.ones(seq, seq, dtype=torch.bool)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, h, T, hd)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = q @ k.transpose(-2, -1)  # (B, h, T, T)
        att.mul_(1.0 / math.sqrt(C // self.heads))  # in place, on a value the core creates
        att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
        att = self.drop(att.softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, d)
        x = x + self.drop(self.proj(y))
        return x + self.drop(self.fc_out(F.gelu(self.fc(self.ln_2(x)))))


class CoreAttentionNet(nn.Module):
    def __init__(self, d: int = 32, heads: int = 4, seq: int = 16, layers: int = 2, p: float = 0.2):
        super().__init__()
        self.layers = nn.ModuleList(CoreAttentionBlock(d, heads, seq, p) for _ in range(layers))
        self.head = nn.Linear(d, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _gpt() -> tuple[nn.Module, tuple]:
    return zoo.get("gpt3-tiny", dropout=0.1), zoo.example_inputs("gpt3-tiny", batch=4)


def _core() -> tuple[nn.Module, tuple]:
    return CoreAttentionNet(), (torch.randn(4, 16, 32),)


MODELS = {"gpt3-tiny": _gpt, "core-attention": _core}


def _captured(model: str) -> tuple[torch.fx.GraphModule, tuple]:
    torch.manual_seed(0)
    net, inputs = MODELS[model]()
    gm = capture(net, inputs, {}).graph_module
    annotate(gm, list(inputs))
    return gm, inputs


# --------------------------------------------------------------------------------------------------------- regions
_LAYER = re.compile(r"^(h|layers)\.\d+$")
_CORE = (F.scaled_dot_product_attention, operator.matmul)


def _layer(n: torch.fx.Node) -> str | None:
    return next((k for k in n.meta.get("nn_module_stack") or {} if _LAYER.match(k)), None)


def regions_of(gm: torch.fx.GraphModule, mode: str, names: set[str] | None = None) -> list[list[str]]:
    """ "full": every layer's run of nodes; "selective": each layer's attention core (first to last matmul, or
    the SDPA call). Planned nodes only (no get_attr), restricted to `names` (a stage's) when given."""
    planned = [n for n in gm.graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    planned = [n for n in planned if names is None or n.name in names]
    runs: dict[str, list[torch.fx.Node]] = {}
    for n in planned:
        if _layer(n) is not None:
            runs.setdefault(_layer(n), []).append(n)
    if mode == "full":
        return [[n.name for n in run] for run in runs.values()]
    out = []
    for run in runs.values():
        core = [i for i, n in enumerate(run) if n.op == "call_function" and n.target in _CORE]
        if core:
            out.append([n.name for n in run[core[0] : core[-1] + 1]])
    return out


def _run(gm: nn.Module, inputs: tuple, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Output and parameter gradients of loss = mean(out^2), dropout drawn from `seed`."""
    for p in gm.parameters():
        p.grad = None
    torch.manual_seed(seed)
    out = gm(*inputs)[0]
    out.float().pow(2).mean().backward()
    return out.detach(), {k: p.grad.clone() for k, p in gm.named_parameters() if p.grad is not None}


def _saved_bytes(gm: nn.Module, inputs: tuple) -> int:
    """Bytes of the activation storages autograd keeps for backward after a forward (each storage once;
    parameters and buffers left out). A checkpointed region's inputs count: checkpoint saves them."""
    state = {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in state:
            kept[s.data_ptr()] = s.nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gm(*inputs)
    return sum(kept.values())


# ------------------------------------------------------------------------------------------------------- the pass
@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("model", list(MODELS))
def test_a_checkpointed_graph_gives_the_plain_graph_s_outputs_and_gradients(model: str, mode: str) -> None:
    gm, inputs = _captured(model)
    regions = regions_of(gm, mode)
    assert len(regions) == 2
    recomputed = checkpoint_regions(gm, regions)
    assert sum(isinstance(m, CheckpointedRegion) for m in recomputed.modules()) == 2

    out, grads = _run(gm, inputs, seed=1)
    other_seed, _ = _run(gm, inputs, seed=2)
    assert not torch.allclose(out, other_seed), "dropout must be active for this test to check the RNG replay"
    got, got_grads = _run(recomputed, inputs, seed=1)
    torch.testing.assert_close(got, out)
    assert got_grads.keys() == grads.keys() and len(grads) == len(list(gm.parameters()))
    for name, g in grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=lambda m, k=name: f"{k}: {m}")


def test_python_values_cross_region_boundaries() -> None:
    """Regions taking and giving back ints, sizes and devices (sizes read with x.size(), a device from idx.device)."""
    gm, inputs = _captured("gpt3-tiny")
    regions = [["size", "getitem", "getitem_1", "getattr_1", "arange"], ["size_1", "getitem_2", "getitem_3"],
               ["view", "transpose", "h_0_attn_k_proj"]]  # fmt: skip
    recomputed = checkpoint_regions(gm, regions)
    body = recomputed.get_submodule("recompute_region_1").body
    assert [n.name for n in body.graph.output_node().args[0]] == ["size_1", "getitem_2", "getitem_3"]  # a size, ints
    out, grads = _run(gm, inputs, seed=3)
    got, got_grads = _run(recomputed, inputs, seed=3)
    torch.testing.assert_close(got, out)
    for name, g in grads.items():
        torch.testing.assert_close(got_grads[name], g)


@pytest.mark.parametrize("model", list(MODELS))
def test_checkpointed_layers_keep_far_fewer_activations(model: str) -> None:
    gm, inputs = _captured(model)
    plain = _saved_bytes(gm, inputs)
    selective = _saved_bytes(checkpoint_regions(gm, regions_of(gm, "selective")), inputs)
    full = _saved_bytes(checkpoint_regions(gm, regions_of(gm, "full")), inputs)
    assert full < 0.25 * plain, (plain, selective, full)
    assert full < selective < plain, (plain, selective, full)


def test_state_keeps_its_names_objects_and_order() -> None:
    gm, inputs = _captured("core-attention")
    recomputed = checkpoint_regions(gm, regions_of(gm, "full"))
    for named in ("named_parameters", "named_buffers"):
        before = list(getattr(gm, named)(remove_duplicate=False))
        after = list(getattr(recomputed, named)(remove_duplicate=False))
        assert [k for k, _ in after] == [k for k, _ in before]
        assert all(a is b for (_, a), (_, b) in zip(after, before))
    assert list(recomputed.state_dict()) == list(gm.state_dict())
    # What swaps tensors by name (materialize, functional_call on meta stand-ins) reaches the region bodies.
    zeros = {k: torch.zeros_like(v) for k, v in gm.named_parameters()}
    torch.testing.assert_close(
        torch.func.functional_call(recomputed, zeros, inputs)[0], torch.func.functional_call(gm, zeros, inputs)[0]
    )
    # Copies (tests/stage_runs.py) and inference (no_grad: the body runs plainly) work.
    clone = copy.deepcopy(recomputed)
    assert clone.get_parameter("layers.0.qkv.weight") is not gm.get_parameter("layers.0.qkv.weight")
    with torch.no_grad():
        gm.eval(), clone.eval()
        torch.testing.assert_close(clone(*inputs)[0], gm(*inputs)[0])


def test_device_constants_in_a_region_are_retargeted_with_the_outer_graph() -> None:
    class Ones(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.sin() + torch.ones(x.shape[1], device=torch.device("cpu"))).cos()  # (traced: x.shape)

    gm = capture(Ones(), (torch.randn(2, 3),), {}).graph_module
    names = [n.name for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert any(isinstance(v, torch.device) for n in gm.graph.nodes for v in n.kwargs.values())
    recomputed = checkpoint_regions(gm, [names])
    assert retarget_devices(recomputed, torch.device("cpu", 0)) == 1
    x = torch.randn(2, 3, requires_grad=True)
    torch.testing.assert_close(recomputed(x)[0], gm(x)[0])


def test_no_regions_is_the_graph_itself() -> None:
    gm, _ = _captured("gpt3-tiny")
    assert checkpoint_regions(gm, []) is gm


# --------------------------------------------------------------------------------------------- through the applier
def _with_regions(plan: partitioner.Plan, gm: torch.fx.GraphModule, mode: str) -> partitioner.Plan:
    stages = [
        dataclasses.replace(st, recompute=mode, recompute_regions=regions_of(gm, mode, set(st.nodes)))
        for st in plan.stages
    ]
    return dataclasses.replace(plan, stages=stages)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_the_applier_runs_a_plan_s_regions_on_the_local_pipeline(mode: str) -> None:
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny", dropout=0.1)
    x, y = zoo.example_inputs("gpt3-tiny", batch=8), zoo.example_targets("gpt3-tiny", batch=8)
    plan = partitioner.compile(
        model, 2, x, device_type="cpu", pipeline=2, tensor_parallel=1, microbatches=2, recompute=mode
    ).plan  # fmt: skip  (the planner's own regions)
    assert any(st.recompute_regions for st in plan.stages)
    plain = [dataclasses.replace(st, recompute="none", recompute_regions=[]) for st in plan.stages]
    cm = partitioner.compile(model, 2, x, device_type="cpu", plan=dataclasses.replace(plan, stages=plain))
    again = partitioner.compile(model, 2, x, device_type="cpu", plan=plan)  # a saved plan: applied, not planned
    regions = [m for st in again.stages for m in st.module.modules() if isinstance(m, CheckpointedRegion)]
    assert len(regions) == sum(len(st.recompute_regions) for st in plan.stages)
    assert [st.recompute_regions for st in again.plan.stages] == [st.recompute_regions for st in plan.stages]
    for st, plain in zip(again.stages, cm.stages):
        assert [(k, id(p)) for k, p in st.module.named_parameters()] == [
            (k, id(p)) for k, p in plain.module.named_parameters()
        ]

    def step(runner: LocalPipeline) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        loss = runner.step(x, y, zoo.loss_fn("gpt3-tiny"), microbatches=2)
        return loss, {k: p.grad.clone() for k, p in model.named_parameters()}

    loss, grads = step(LocalPipeline(cm.captured, cm.stages))
    got, got_grads = step(LocalPipeline(again.captured, apply(plan, again.captured)))
    torch.testing.assert_close(got, loss)
    for name, g in grads.items():
        torch.testing.assert_close(got_grads[name], g, msg=lambda m, k=name: f"{k}: {m}")
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    torch.testing.assert_close(again.step(x, y, zoo.loss_fn("gpt3-tiny")), loss)  # cm.step runs again.stages


def test_tensor_parallel_stages_recompute_their_collectives() -> None:
    """pp2 x tp2 through the applier, every rank in a thread: full-layer regions of the rank graphs hold the
    inserted all-reduces (recomputed in backward, on every rank in step) and change no output or gradient; the
    in-process TP check takes the same regions."""
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny")  # no dropout: the ranks' threads share one generator
    x = zoo.example_inputs("gpt3-tiny", batch=4)
    cm = partitioner.compile(model, 4, x, device_type="cpu", pipeline=2, tensor_parallel=2, microbatches=1)
    plan = _with_regions(cm.plan, cm.captured.graph_module, "full")

    def run(p: partitioner.Plan) -> tuple[list, list[dict[str, torch.Tensor]], list]:
        model.zero_grad(set_to_none=True)
        group = ThreadGroup(2, timeout=60)
        ranks = [apply(p, cm.captured, tp_rank=r, comm=group.comm(r)) for r in range(2)]

        def body(stages: list) -> torch.Tensor:
            values = tuple(cm.captured.flatten_inputs(x, {}))
            for st in stages:
                values = st.module(*values)
            values[0].float().pow(2).mean().backward()
            return values[0].detach()

        outs = _run_threads([lambda s=s: body(s) for s in ranks], group)
        grads = [{k: t.grad.clone() for st in s for k, t in st.module.named_parameters()} for s in ranks]
        return outs, grads, ranks

    outs, grads, _ = run(cm.plan)
    got, got_grads, ranks = run(plan)
    for stages in ranks:  # each layer's row-parallel all-reduces run (and rerun) inside its regions
        inside = {n.name for st in stages for m in st.module.modules() if isinstance(m, CheckpointedRegion)
                  for n in m.body.graph.nodes}  # fmt: skip
        assert {f"tp_all_reduce_h_{i}_{p}" for i in (0, 1) for p in ("attn_out_proj", "mlp_proj")} <= inside
    for r in range(2):
        torch.testing.assert_close(got[r], outs[r])
        assert got_grads[r].keys() == grads[r].keys()
        for name, g in grads[r].items():
            torch.testing.assert_close(got_grads[r][name], g, msg=lambda m, k=name, r=r: f"rank {r} {k}: {m}")
    # The in-process TP check runs whole rank graphs: given the plan's regions, it checkpoints them too.
    regions = [region for st in plan.stages for region in st.recompute_regions]
    gm, layout, inputs = cm.captured.graph_module, cm.tensor_parallel_plan, cm.captured.flatten_inputs(x, {})
    _, rank_modules = run_tensor_parallel_local(gm, layout, inputs, backward=False, recompute_regions=regions)
    assert all(sum(isinstance(m, CheckpointedRegion) for m in r.modules()) == len(regions) for r in rank_modules)
    assert check_tensor_parallel(gm, layout, inputs, recompute_regions=regions).sharded_params


@pytest.mark.distributed
@pytest.mark.timeout(120)
def test_a_saved_plan_s_regions_run_in_the_distributed_pipeline(tmp_path: Path) -> None:
    """Two gloo ranks re-apply a saved zero-bubble plan with full recompute (meta model, replayed init, split
    backward): the losses and weights after 3 steps equal single-process training."""
    with torch.device("meta"):
        meta = zoo.get("gpt3-tiny")
    cm = partitioner.compile(
        meta, devices=2, example_inputs=zoo.example_inputs("gpt3-tiny", batch=8, device="meta"), device_type="cpu",
        microbatches=4, schedule="zero-bubble", pipeline=2, tensor_parallel=1, stages_per_device=2,
    )  # fmt: skip
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(_with_regions(cm.plan, cm.captured.graph_module, "full").to_json())
    kw = dict(model="gpt3-tiny", stages=4, schedule="zero-bubble", microbatches=4, batch=8, lr=0.1, seed=0, steps=3,
              out=str(tmp_path / "out.pt"), plan_path=str(plan_path))  # fmt: skip
    for r in spawn("tests._dist_worker:train", 2, kw, timeout=100, pg_timeout=30):
        assert r.returncode == 0, f"rank {r.rank} exited {r.returncode}:\n{r.stderr[-4000:]}"
    got = torch.load(tmp_path / "out.pt")
    losses, state = reference("gpt3-tiny", microbatches=4, batch=8, steps=3, lr=0.1, seed=0)
    assert got["losses"] == pytest.approx(losses, abs=1e-5, rel=0)
    for name, t in state.items():
        torch.testing.assert_close(got["state"][name], t, atol=1e-5, rtol=0, msg=lambda m, k=name: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "regions, match",
    [
        ([["h_0_ln_1", "nope"]], r"recompute region 0 \(h_0_ln_1 \.\. nope\): node 'nope' is not in this graph"),
        ([["add_1", "h_0_ln_1"]], r"region 0 .*node 'h_0_ln_1' does not come after 'add_1'"),
        ([["idx", "size"]], r"region 0 .*node 'idx' is a graph placeholder"),
        ([["ln_f", "lm_head", "output"]], r"node 'output' is a graph output"),
        (
            [["h_0_ln_1", "add_1"], ["h_0_attn_out_proj", "add_2"]],
            r"region 1 .* overlaps .*region 0.*'h_0_attn_out_proj'",
        ),
        ([[]], r"region 0 must be a non-empty list"),
        (["h_0_ln_1"], r"region 0 must be a non-empty list of node names, got 'h_0_ln_1'"),
    ],
    ids=["unknown", "order", "placeholder", "output", "overlap", "empty", "string"],
)
def test_regions_that_do_not_fit_the_graph_are_refused(regions: list, match: str) -> None:
    gm, _ = _captured("gpt3-tiny")
    with pytest.raises(ValueError, match=match):
        checkpoint_regions(gm, regions)


class _Writes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bn = nn.Linear(4, 4), nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        r = h.relu()
        h.add_(1.0)  # writes the linear's output in place
        s = r * 2.0
        s.mul_(3.0)  # writes a value made just before
        return self.bn(s + h)  # BatchNorm in training writes its running statistics


@pytest.mark.parametrize("annotated", [True, False], ids=["annotated", "op-names"])
@pytest.mark.parametrize(
    "region, match",
    [
        (["relu", "add_"], r"node 'add_' writes 'lin' in place, which the region did not create"),
        (["bn"], r"node 'bn' writes 'bn\.(running_mean|running_var|num_batches_tracked)' in place"),
        (["relu"], r"node 'add_' writes 'lin' in place after the region, and the region reads it \(node 'relu'\)"),
    ],
    ids=["inside", "batchnorm", "after"],
)
def test_in_place_writes_a_rerun_would_repeat_or_see_are_refused(annotated: bool, region: list, match: str) -> None:
    x = torch.randn(8, 4)
    gm = capture(_Writes(), (x,), {}).graph_module
    if annotated:
        annotate(gm, [x])
    with pytest.raises(ValueError, match=match):
        checkpoint_regions(gm, [region])
    fine = checkpoint_regions(gm, [["mul", "mul_", "add"]])  # writing what the region itself made is fine
    torch.testing.assert_close(fine(x)[0], gm(x)[0])


def test_the_applier_names_the_stage_of_a_bad_region() -> None:
    x = zoo.example_inputs("gpt3-tiny", batch=8)
    cm = partitioner.compile(zoo.get("gpt3-tiny"), 2, x, device_type="cpu", pipeline=2, tensor_parallel=1)
    other = cm.plan.stages[1].nodes[0]
    stages = [dataclasses.replace(cm.plan.stages[0], recompute="full", recompute_regions=[[other]]), cm.plan.stages[1]]
    with pytest.raises(ValueError, match=rf"plan stage 0 \(full recompute\): .*node '{other}' is not in this graph"):
        apply(dataclasses.replace(cm.plan, stages=stages), cm.captured)
