"""Sequence parallelism (plan.tensor_sequence): the token-wise ops tensor parallelism leaves whole, split over the tp
ranks along the sequence (Korthikanti et al. 2022). The layout, the rewrite run in-process against the unsharded
graph (outputs and every gradient), the collectives per layer, the memory model against the closed form of what the
runtime holds, and the search and compile choosing it. The gloo runs are in test_distributed.py
(test_pipeline_of_sequence_parallel_stages_matches_single_process)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

import partitioner
import zoo
from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.comm import all_gather_time
from partitioner.cost import node_costs
from partitioner.devices import get_device_spec
from partitioner.passes.tensor_parallel import (
    SequenceParallelColumns,
    TPCollective,
    count_collectives,
    tensor_parallel_rank,
)
from partitioner.plan.graph import build_planning_graph
from partitioner.plan.model import TensorParallelLayouts
from partitioner.plan.search import scale_graph
from partitioner.plan.tensor import TensorParallelPlan, check_tensor_parallel_plan, plan_tensor_parallel
from partitioner.runtime.tp_local import ThreadGroup, _run_threads, check_tensor_parallel
from partitioner.simulate import StageCost
from tests.test_tensor_parallel import LAYER, nano_graph, zoo_graph
from zoo.gpt3 import GPT, GPTConfig

ZOO = ["gpt3-tiny", "bert-tiny", "roberta-tiny"]


# ----------------------------------------------------------------------------------------------- equivalence
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("tp", [2, 4])
def test_zoo_outputs_and_gradients_match(name: str, tp: int) -> None:
    gm, inputs = zoo_graph(name)
    plan = plan_tensor_parallel(gm, tp, sequence_parallel=True)
    assert plan.sequence_parallel and sum(v.startswith("seq") for v in plan.node_layout.values()) >= 10
    report = check_tensor_parallel(gm, plan, inputs)
    assert any(".ln" in p for p in report.replicated_params)  # layer norms on split tokens, gradients summed


@pytest.mark.timeout(120)
@pytest.mark.parametrize("style", ["sdpa", "explicit", "minus_one"])
def test_nanogpt_styles_match(style: str) -> None:
    """Fused c_attn + split, `C // n_head` / -1 views, explicit softmax, the loss in the graph (vocab-parallel CE)."""
    gm, inputs = nano_graph(style, targets=True)
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    assert plan.sequence_parallel and any(v.startswith("seq") for v in plan.node_layout.values())
    check_tensor_parallel(gm, plan, inputs, loss_fn=lambda out: out[0])


class _Block(nn.Module):
    """RMSNorm (functional weights path), SwiGLU MLP, a broadcast learned scale: token-wise ops other than GPT's."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.norm = nn.RMSNorm(d)
        self.gate, self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        h = self.down(torch.nn.functional.silu(self.gate(h)) * self.up(h))
        return (x + h) * self.scale


class _Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(2048, 32)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.head = nn.Linear(32, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        for layer in self.layers:
            x = layer(x)
        return self.head(x).mean(1)  # a reduction over the sequence: read whole


@pytest.mark.timeout(120)
def test_rms_norm_swiglu_and_broadcast_parameters_match() -> None:
    torch.manual_seed(0)
    model = _Stack()
    ids = torch.randint(0, 2048, (2, 8))
    cg = capture(model, (ids,))
    gm, inputs = cg.graph_module, cg.flatten_inputs((ids,), {})
    annotate(gm, inputs, training=True)
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    layouts = plan.node_layout
    assert layouts["layers_0_norm"] == "seq(1)" and layouts["mul_1"] == "seq(1)"  # (x + h) * scale: split
    # The broadcast parameter `scale` and the norm weight get their gradients summed; the head reads x whole.
    summed = {p for c in plan.collectives for p in c.get("params", [])}
    assert {"layers.0.norm.weight", "layers.1.norm.weight"} <= summed
    assert any(c["kind"] == "all_reduce" and c["after"].startswith("layers_0_scale") for c in plan.collectives)
    report = check_tensor_parallel(gm, plan, inputs)
    assert "layers.0.scale" in report.replicated_params


@pytest.mark.timeout(120)
def test_the_column_parallel_matmuls_save_the_shard_not_the_gathered_input() -> None:
    """What autograd keeps in a rank's forward: with sequence parallelism no (batch, seq, hidden) activation at all
    (the split ones are (batch, seq / tp, hidden), the gathered inputs of q/k/v and fc are saved as their shard);
    plain tensor parallelism keeps several (the norms' outputs the column-parallel matmuls read)."""
    gm, inputs = zoo_graph("gpt3-tiny")
    whole = tuple(gm.graph.find_nodes(op="call_module", target="h.0.ln_1")[0].meta["val"].shape)

    def saved_shapes(plan: TensorParallelPlan) -> list[tuple[int, ...]]:
        group = ThreadGroup(2)
        ranks = [tensor_parallel_rank(gm, plan, r, group.comm(r), share_replicated=False) for r in range(2)]
        shapes: list[list[tuple[int, ...]]] = [[], []]

        def run(r: int) -> None:
            def pack(t: torch.Tensor) -> torch.Tensor:
                shapes[r].append(tuple(t.shape))
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                ranks[r](*inputs)

        _run_threads([lambda r=r: run(r) for r in range(2)], group)
        return shapes[0]

    assert whole in saved_shapes(plan_tensor_parallel(gm, 2))
    split = saved_shapes(plan_tensor_parallel(gm, 2, sequence_parallel=True))
    assert whole not in split and (whole[0], whole[1] // 2, whole[2]) in split


class _RecordingComm:
    """A one-rank TPComm (every collective the identity) that logs when each collective starts and is waited for."""

    rank, world_size = 0, 1

    def __init__(self, log: list[str]):
        self.log = log

    def all_reduce(self, x: torch.Tensor, op: str) -> torch.Tensor:
        self.log.append("all_reduce")
        return x

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.log.append("all_gather")
        return x

    def reduce_scatter(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self.log.append("reduce_scatter")
        return x

    def _start(self, kind: str, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        self.log.append(f"start {kind}")

        def wait() -> torch.Tensor:
            self.log.append(f"wait {kind}")
            return x

        return wait

    def start_all_gather(self, x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
        return self._start("all_gather", x)

    def start_reduce_scatter(self, x: torch.Tensor, dim: int) -> Callable[[], torch.Tensor]:
        return self._start("reduce_scatter", x)


def test_the_column_parallel_backward_overlaps_its_collectives_with_the_matmuls() -> None:
    """Megatron-LM's order, which plan.tensor_cost prices as overlapped: the shard's gather is in flight while the
    input gradients are computed, the input gradient's reduce-scatter while the weight gradients are; the
    gradients are those of the plain linears."""
    from torch.utils._python_dispatch import TorchDispatchMode

    log: list[str] = []

    class Matmuls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            if func.overloadpacket.__name__ in ("mm", "bmm", "addmm"):
                log.append("matmul")
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, requires_grad=True)
    w0, b0, w1 = (torch.randn(6, 8, requires_grad=True), torch.randn(6, requires_grad=True),
                  torch.randn(5, 8, requires_grad=True))  # fmt: skip
    y0, y1 = SequenceParallelColumns(_RecordingComm(log), dim=1, count=2)(x, w0, b0, w1, None)
    log.clear()
    with Matmuls():
        (y0.sum() + (y1 * y1).sum()).backward()
    assert log == ["start all_gather", "matmul", "matmul", "wait all_gather", "start reduce_scatter", "matmul",
                   "matmul", "wait reduce_scatter"]  # fmt: skip
    got = [t.grad for t in (x, w0, b0, w1)]
    for t in (x, w0, b0, w1):
        t.grad = None
    (torch.nn.functional.linear(x, w0, b0).sum() + (torch.nn.functional.linear(x, w1) ** 2).sum()).backward()
    for g, t in zip(got, (x, w0, b0, w1)):
        torch.testing.assert_close(g, t.grad)


def test_without_summing_the_norm_gradients_the_check_fails() -> None:
    """The sum of the layer norms' gradients over the ranks is what makes them right: a plan without it is wrong."""
    gm, inputs = zoo_graph("gpt3-tiny")
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    plan.collectives = [c for c in plan.collectives if "params" not in c]
    with pytest.raises(AssertionError, match="ln"):
        check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(120)
def test_a_sequence_length_tp_does_not_divide_is_refused_at_run_time() -> None:
    gm, _ = zoo_graph("gpt3-tiny")  # planned at 8 tokens
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    odd = [zoo.example_inputs("gpt3-tiny", batch=2, seq=7)[0]]
    with pytest.raises(ValueError, match="does not divide 7"):
        check_tensor_parallel(gm, plan, odd)


# ----------------------------------------------------------------------------------------------- the layout
def test_collectives_per_layer_are_megatron_sp_s() -> None:
    """Per layer: 2 reduce-scatters in place of g and 2 all-gathers in place of f (forward); the rest of the layer
    runs on 1/tp of the tokens. The plan's records say the same as the rank graph. The norms' and row biases'
    gradient sums are not in the graph: the runtime sums them once per step (TensorParallelPlan.step_summed_params)."""
    gm, _ = zoo_graph("gpt3-tiny")
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    rank_gm = tensor_parallel_rank(gm, plan, 0, ThreadGroup(2).comm(0))
    per_layer: dict[str, dict[str, int]] = {}
    for n in rank_gm.graph.nodes:
        mod = rank_gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, (TPCollective, SequenceParallelColumns)):
            m = LAYER.match(n.meta["tp_anchor"].replace("_", ".", 2))
            key = m.group(0) if m else "<model>"
            kind = mod.kind if isinstance(mod, TPCollective) else "gather_sequence"
            per_layer.setdefault(key, {}).setdefault(kind, 0)
            per_layer[key][kind] += 1
    model = per_layer.pop("<model>")
    assert len(per_layer) == 2
    for counts in per_layer.values():
        assert counts == {"reduce_scatter": 2, "gather_sequence": 2}, counts
    # Outside: the embedding's reduce-scatter, wpe's scatter, ln_f's gather in front of the head, the logits' gather.
    assert model == {"reduce_scatter": 1, "scatter": 1, "gather_sequence": 1, "gather": 1}
    # Summed per step: per layer the two norms' weights and biases and the two row-parallel biases, and ln_f's two
    summed = plan.step_summed_params()
    assert len(summed) == 2 * 6 + 2 and "ln_f.weight" in summed and "h.0.attn.out_proj.bias" in summed, summed
    counts = count_collectives(rank_gm)
    assert counts["all_reduce_forward"] == 0
    assert sum(c["kind"] == "reduce_scatter" and c["phase"] == "forward" for c in plan.collectives) == 5
    assert counts["reduce_scatter"] == 5


def test_plan_round_trips_and_is_checked() -> None:
    gm, _ = zoo_graph("gpt3-tiny")
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    again = TensorParallelPlan.from_json(plan.to_json())
    assert again == plan
    check_tensor_parallel_plan(gm, again)
    edited = json.loads(plan.to_json())
    edited["node_layout"]["h_0_ln_1"] = "replicated"
    with pytest.raises(ValueError, match="h_0_ln_1"):
        check_tensor_parallel_plan(gm, TensorParallelPlan(**edited))
    plain = plan_tensor_parallel(gm, 2)
    assert not plain.sequence_parallel and not any(v.startswith("seq") for v in plain.node_layout.values())
    # Same tensor-parallel decisions either way: the shards are the same.
    assert plain.param_shard == plan.param_shard and plain.module_rules == plan.module_rules


# ----------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("s, b, h, a", [(256, 4, 512, 8), (128, 8, 768, 12)])
def test_activation_memory_per_layer_matches_the_closed_forms(s: int, b: int, h: int, a: int) -> None:
    """Per layer, fp16, dropout (Korthikanti et al. 2022, Table 2): tensor parallel sbh(10 + 24/t + 5as/(ht)); with
    sequence parallelism sbh(34/t + 5as/(ht)) (the column-parallel matmuls save the shard of their input and gather
    it again in the backward, as Megatron-LM does). Plus what the paper leaves out: the norms' fp32 statistics (16
    bytes a token, split under SP) and the s x s causal mask. Full recompute keeps the layer input: 2sbh, 2sbh/t
    under SP (the paper's figures)."""
    cfg = GPTConfig(n_layer=2, d_model=h, n_head=a, vocab_size=1024, n_ctx=s, attention="math", dropout=0.1)
    with torch.device("meta"):
        model = GPT(cfg).half()
    x = torch.zeros(b, s, dtype=torch.long, device="meta")
    cg = capture(model, (x,))
    gm = cg.graph_module
    annotate(gm, cg.flatten_inputs((x,), {}), training=True)
    spec = get_device_spec("a100")
    pg = build_planning_graph(gm, node_costs(gm, spec), spec, training=True)
    first, last = pg.regions["full"][1]
    sbh = s * b * h
    layouts = TensorParallelLayouts(gm, spec, True, strict=False)
    for t in (t for t in (2, 4, 8) if a % t == 0):  # degrees that divide the heads (others leave attention whole)
        plain = scale_graph(pg, layouts(t), 1)
        split = scale_graph(pg, layouts(t, True), 1)
        tensor = 10 + 24 / t + 5 * a * s / (h * t) + (16 * s * b + s * s) / sbh
        sequence = 34 / t + 5 * a * s / (h * t) + (16 * s * b / t + s * s) / sbh
        assert plain.activations("none").kept[first:last].sum() / sbh == pytest.approx(tensor, rel=1e-4), t
        assert split.activations("none").kept[first:last].sum() / sbh == pytest.approx(sequence, rel=1e-4), t
        assert split.activations("full").kept[first:last].sum() / sbh == pytest.approx(2 / t, rel=1e-4), t
        assert plain.activations("full").kept[first:last].sum() / sbh == pytest.approx(2, rel=1e-4), t


def test_gradient_sums_of_the_step_are_priced_once_per_step() -> None:
    """The norms' and row biases' gradient sums run once per step, in one call, after the backward: priced as one
    all-reduce of all their bytes added to every rank's tail, neither in the backward's collectives nor per
    microbatch."""
    from partitioner.comm import all_reduce_time
    from partitioner.plan.price import Layout, price_step, stage_state
    from partitioner.plan.tensor_cost import tp_cost

    gm, _ = zoo_graph("gpt3-tiny")
    spec = get_device_spec("h100")
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    cost = tp_cost(plan, gm, spec)
    step = [c for c in plan.collectives if c["phase"] == "step"]
    assert len(step) == 4 * 2 + 1  # per layer its two norms and two row-parallel biases, and ln_f
    assert cost.step_sync == pytest.approx(all_reduce_time(spec, sum(c["bytes"] for c in step), 2))
    backward = [c for c in plan.collectives if c["phase"] == "backward"]
    ring = {"all_reduce": all_reduce_time, "all_gather": all_gather_time, "reduce_scatter": all_gather_time}
    assert cost.comm_backward == pytest.approx(sum(ring[c["kind"]](spec, c["bytes"], 2) for c in backward))
    pg = build_planning_graph(gm, node_costs(gm, spec), spec, training=True)
    g = scale_graph(pg, TensorParallelLayouts(gm, spec, True, strict=False)(2, True), 1)
    assert g.step_sync == pytest.approx(cost.step_sync)
    state = stage_state(g, [0] * g.n, 1)
    for m in (1, 4):
        costs = [StageCost(forward=g.forward_at(m).sum() / m, backward=g.backward_at(m).sum() / m)]
        priced = price_step(g, Layout(1, 2, 1, m, "gpipe"), costs, state)
        assert priced.tails == [pytest.approx(g.step_sync)]


def test_the_column_groups_backward_collectives_hide_behind_their_matmuls() -> None:
    """Where a device's collectives run beside compute, each column group's backward gather overlaps its readers'
    input-gradient matmuls and its reduce-scatter their weight-gradient ones (half the readers' backward each): the
    planning graph's backward at that value is shorter by the device's overlap efficiency times the ideal saving
    (each collective up to its matmuls' time), and nothing else moves. On a device whose collectives stop compute
    (the CPU preset) nothing hides."""
    import dataclasses

    from partitioner.plan.search import scale_ranks
    from partitioner.plan.tensor_cost import tp_cost

    gm, _ = zoo_graph("gpt3-tiny")
    spec = get_device_spec("h100")
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    cost = tp_cost(plan, gm, spec)
    groups = {c["after"]: c["users"] for c in plan.collectives if c.get("columns")}
    assert groups and set(cost.overlapped) == set(groups)
    assert not tp_cost(plan, gm, get_device_spec("cpu")).overlapped
    assert not tp_cost(plan, gm, spec, training=False).overlapped
    pg = build_planning_graph(gm, node_costs(gm, spec), spec, training=True)
    tp = TensorParallelLayouts(gm, spec, True, strict=False)(2, True)
    hidden, exposed = scale_ranks(pg, tp, None), scale_ranks(pg, dataclasses.replace(tp, overlapped={}), None)
    index = {name: i for i, name in enumerate(pg.names)}
    _, backward = pg.without_fixed()
    shorter = exposed.backward - hidden.backward
    for value, (readers, each) in cost.overlapped.items():
        matmuls = sum(backward[index[r]] * tp.node_scale[r] for r in readers)
        assert 0 < 2 * each < cost.comm_by_node[value][1]  # the latencies stay exposed
        ideal = min(each, matmuls / 2) + min(each, matmuls / 2)
        assert shorter[index[value]] == pytest.approx(spec.overlap_efficiency * ideal)
    others = [i for name, i in index.items() if name not in cost.overlapped]
    assert np.all(shorter[others] == 0) and np.all(hidden.forward == exposed.forward)
    assert 0 < spec.overlap_efficiency < 1


# ----------------------------------------------------------------------------------------------- search, compile
def test_compile_prices_both_and_records_the_choice() -> None:
    """gpt3-1.3b at tp 4: both are priced, the faster is chosen and named; splitting the token-wise ops saves their
    memory for the same bytes moved; a saved plan keeps the choice."""
    with torch.device("meta"):
        model = zoo.get("gpt3-1.3b")
    x = zoo.example_inputs("gpt3-1.3b", batch=64, device=torch.device("meta"))
    cm = partitioner.compile(model, 8, x, tensor_parallel=4, pipeline=1)
    chosen = cm.tensor_parallel_plan.sequence_parallel
    other = [a for a in cm.plan.alternatives if bool(a.get("sequence_parallel")) != chosen and "step_time" in a]
    assert other and all(a["step_time"] > cm.plan.predicted["step_time"] for a in other)
    assert ("sequence parallel" in cm.plan.summary().splitlines()[0]) == chosen
    on = partitioner.compile(model, 8, x, tensor_parallel=4, pipeline=1, sequence_parallel=True, microbatches=4)
    off = partitioner.compile(model, 8, x, tensor_parallel=4, pipeline=1, sequence_parallel=False, microbatches=4)
    assert on.tensor_parallel_plan.sequence_parallel and not off.tensor_parallel_plan.sequence_parallel
    assert off.plan.predicted["peak_memory"] > on.plan.predicted["peak_memory"]
    for compiled in (on, off):
        again = partitioner.compile(model, 8, x, plan=compiled.plan.to_json())  # a saved plan keeps it
        assert again.tensor_parallel_plan.sequence_parallel == compiled.tensor_parallel_plan.sequence_parallel
        assert again.plan.predicted["step_time"] == pytest.approx(compiled.plan.predicted["step_time"])


@pytest.mark.timeout(120)
def test_a_compiled_plan_with_full_recompute_verifies() -> None:
    """The checkpointed layers hold the gathers, scatters and gradient sums, rerun in their backward."""
    model = zoo.get("gpt3-tiny")
    x = zoo.example_inputs("gpt3-tiny", batch=4, seq=16)
    cm = partitioner.compile(model, 4, x, pipeline=2, tensor_parallel=2, sequence_parallel=True, recompute="full",
                             device_type="cpu")  # fmt: skip
    assert cm.tensor_parallel_plan.sequence_parallel and all(st.recompute_regions for st in cm.plan.stages)
    assert cm.verify_tensor_parallel(*x).sharded_params


def test_bad_options_are_refused() -> None:
    model = zoo.get("gpt3-tiny")
    x = zoo.example_inputs("gpt3-tiny", batch=4)
    with pytest.raises(ValueError, match="tensor_parallel=1"):
        partitioner.compile(model, 2, x, tensor_parallel=1, sequence_parallel=True)
    with pytest.raises(ValueError, match="sequence_parallel must be"):
        partitioner.compile(model, 2, x, sequence_parallel="yes")
