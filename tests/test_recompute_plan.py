"""Activation recomputation as a plan choice (partitioner.plan.recompute): the memory model against Korthikanti et
al.'s closed forms, the per-stage choice of the pipeline DP, and plans that recompute running equal to the model."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.fx as fx

import partitioner
import zoo
from partitioner.annotate import annotate
from partitioner.cost import node_costs
from partitioner.devices import get_device_spec
from partitioner.plan.graph import build_planning_graph, evaluate
from partitioner.plan.model import TensorParallelLayouts
from partitioner.plan.recompute import activation_model, layer_path, module_path
from partitioner.plan.search import scale_graph
from tests.planning_graphs import H100_TENSORS_ONLY, reference_activation_model
from zoo.gpt3 import GPT, GPTConfig


def _megatron_layer_module(s: int, b: int, h: int, a: int, layers: int = 2) -> fx.GraphModule:
    """A GPT written as Megatron-LM writes it (attention probabilities materialized, dropout 0.1, fp16), annotated."""
    cfg = GPTConfig(n_layer=layers, d_model=h, n_head=a, vocab_size=1024, n_ctx=s, attention="math", dropout=0.1)
    with torch.device("meta"):
        model = GPT(cfg).half()
    gm = fx.symbolic_trace(model)
    annotate(gm, [torch.zeros(b, s, dtype=torch.long, device="meta")])
    return gm


def _megatron_layer_graph(s: int, b: int, h: int, a: int, layers: int = 2):
    """The planning graph of _megatron_layer_module."""
    gm = _megatron_layer_module(s, b, h, a, layers)
    spec = get_device_spec("a100")
    return build_planning_graph(gm, node_costs(gm, spec), spec, training=True)


@pytest.mark.parametrize("s, b, h, a", [(256, 4, 512, 8), (512, 2, 256, 4), (128, 8, 768, 12)])
def test_activation_memory_per_layer_matches_korthikanti_et_al(s: int, b: int, h: int, a: int) -> None:
    # Per layer, fp16, with dropout: no recompute sbh (34 + 5as/h), selective (attention core) 34 sbh, full 2 sbh
    # (Korthikanti et al. 2022, Table 2 / eq. 1-2). Not in the paper's count: the two layer norms' fp32 statistics
    # (mean and rstd, 16 bytes per token) and the layer's s x s bool causal mask, which the paper's fused softmax
    # kernel does not materialize.
    pg = _megatron_layer_graph(s, b, h, a)
    first, last = pg.regions["full"][1]  # the second layer: its input comes from a layer, as in the paper
    sbh = s * b * h
    extra = (16 * s * b + s * s) / sbh
    expected = {"none": 34 + 5 * a * s / h + extra, "selective": 34.0 + 16 / h, "full": 2.0}
    for mode, per_layer in expected.items():
        kept = pg.activations(mode).kept[first:last].sum()
        assert kept / sbh == pytest.approx(per_layer, rel=1e-3), mode
    # Full recompute regenerates the layer while its backward runs: the transient is all of it but its kept input.
    full = pg.activations("full")
    assert full.transient[first] / sbh == pytest.approx(expected["none"] - 2.0, rel=1e-3)
    # The recomputed forward: every node of a full region, only the core's for selective.
    assert full.recompute[first:last].sum() == pytest.approx(pg.forward[first:last].sum())
    core = pg.activations("selective").recompute[first:last].sum()
    assert 0 < core < full.recompute[first:last].sum() / 2


def test_under_no_recompute_the_kept_bytes_are_annotate_s() -> None:
    # The general rule with no regions (every storage kept, on its first saver) is annotate's own accounting.
    pg = _megatron_layer_graph(128, 2, 256, 4)
    created_by = {name: i for i, name in enumerate(pg.names)}
    created_by |= {k: created_by[k.split("#")[0]] for node in pg.saves for k in node if k.split("#")[0] in created_by}
    none = activation_model("none", [], pg.saves, created_by, pg.preds, pg.storages, pg.out_bytes, pg.forward)
    assert none.kept == pytest.approx(pg.saved_bytes)
    assert not none.recompute.any() and not none.transient.any()


def test_shared_recompute_structures_give_the_walk_s_figures_to_the_bit() -> None:
    # The structure of which node keeps / which region drops each storage is built once per set of regions and shared
    # by the scaled copies of a graph (tensor parallel with and without sequence parallelism, data parallel): each
    # copy's figures must be what walking its own saves gives (tests/planning_graphs.reference_activation_model),
    # for every mode's regions and for stage-sized subsets of them ("full:k" and stages cut through a layer).
    gm = _megatron_layer_module(128, 2, 256, 4, layers=4)
    spec = get_device_spec("a100")
    pg = build_planning_graph(gm, node_costs(gm, spec), spec, training=True)
    layouts = TensorParallelLayouts(gm, spec, True, strict=False)
    copies = [pg, scale_graph(pg, None, 2), scale_graph(pg, layouts(2), 1), scale_graph(pg, layouts(4, True), 2)]
    assert all(c.recompute_structure() is pg.recompute_structure() for c in copies)
    # A replica's saves are divided when read (plan.recompute.ScaledSaves), as a dict-by-dict copy would hold them
    assert list(copies[1].saves) == [{k: v / 2 for k, v in node.items()} for node in pg.saves]
    _assert_structure_is_the_walk(pg, copies)


def _assert_structure_is_the_walk(pg, copies, draws: int = 6) -> None:  # noqa: ANN001 - planning graphs
    """Every copy's activation models, for every mode's regions and random subsets of them, equal the walk's."""
    rng = np.random.default_rng(0)
    subsets = [tuple(pg.regions[m]) for m in ("selective", "full")]
    for mode in ("selective", "full"):
        regions = pg.regions[mode]
        for _ in range(draws):
            k = int(rng.integers(1, len(regions) + 1))
            subsets.append(tuple(regions[j] for j in sorted(rng.choice(len(regions), size=k, replace=False))))
    for c in copies:
        index = {name: i for i, name in enumerate(c.names)}
        stored = {name for node in c.saves for name in node} | {n for ss in c.storages for n in ss}
        created_by = {name: index[name.split("#")[0]] for name in stored if name.split("#")[0] in index}
        for regions in subsets:
            got = c._model("full", regions)
            want = reference_activation_model("full", regions, c.saves, created_by, c.preds, c.storages, c.out_bytes,
                                              c.forward)  # fmt: skip
            for field in ("kept", "recompute", "transient"):
                assert np.array_equal(getattr(got, field), getattr(want, field)), (field, regions)
            assert got.regions == want.regions


def test_recompute_structures_of_an_export_graph_give_the_walk_s_figures_to_the_bit() -> None:
    """The same on a torch.export graph (HF Llama: storages a node saves but does not return, `node#k`; rotary
    tables and the mask read by every layer), unscaled and as a data-parallel replica."""
    transformers = pytest.importorskip("transformers")
    from partitioner.capture import capture

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, use_cache=False))  # fmt: skip
    call = {"input_ids": torch.randint(0, 128, (2, 8))}
    cg = capture(model, (), call)
    assert cg.method == "export"
    annotate(cg.graph_module, cg.flatten_inputs((), call), training=True)
    spec = get_device_spec("h100")
    pg = build_planning_graph(cg.graph_module, node_costs(cg.graph_module, spec), spec, training=True)
    assert pg.regions.get("full") and pg.regions.get("selective")
    _assert_structure_is_the_walk(pg, [pg, scale_graph(pg, None, 2)])


def test_layers_are_found_from_module_paths() -> None:
    assert layer_path("h.3.attn.q_proj") == "h.3"
    assert layer_path("model.layers.11.mlp") == "model.layers.11"
    assert layer_path("model.layers[2].self_attn") == "model.layers.2"
    assert layer_path("encoder.layer.0") == "encoder.layer.0"
    assert layer_path("wte") is None and layer_path("") is None and layer_path("3.conv") is None


def _tiny(batch: int = 32):
    return zoo.get("gpt3-tiny"), zoo.example_inputs("gpt3-tiny", batch=batch)


def test_each_stage_recomputes_the_least_that_fits() -> None:
    model, x = _tiny()
    kw = dict(device_type="cpu", pipeline=2, microbatches=4)
    plain = partitioner.compile(model, 2, x, recompute="none", **kw).plan
    full = partitioner.compile(model, 2, x, recompute="full", **kw).plan
    assert full.predicted["peak_memory"] < plain.predicted["peak_memory"]
    assert full.predicted["step_time"] > plain.predicted["step_time"]  # the recomputed forward costs time
    # Between the two: 1F1B's first stage holds more microbatches in flight than the last, so only it recomputes.
    limit = full.predicted["peak_memory"] + 0.25 * (plain.predicted["peak_memory"] - full.predicted["peak_memory"])
    chosen = partitioner.compile(model, 2, x, memory_limit=limit, **kw).plan
    assert chosen.predicted["peak_memory"] <= limit
    first, last = (s.recompute for s in chosen.stages)  # "full", or its first k whole layers ("full:k")
    assert first.startswith("full") and last == "none"
    assert chosen.stages[0].recompute_regions and not chosen.stages[1].recompute_regions
    assert plain.predicted["step_time"] < chosen.predicted["step_time"] < full.predicted["step_time"]
    assert partitioner.Plan.from_json(chosen.to_json()) == chosen
    # Every region is a run of the stage's own nodes, in graph order.
    for stage in chosen.stages:
        order = {n: i for i, n in enumerate(stage.nodes)}
        for region in stage.recompute_regions:
            assert [order[n] for n in region] == list(range(order[region[0]], order[region[0]] + len(region)))


@pytest.mark.parametrize("fraction", [0.9, 0.75, 0.6])
def test_a_stage_recomputes_the_fewest_whole_layers_that_fit(fraction: float) -> None:
    """Megatron's --recompute-num-layers k as the search's choice: between keeping everything and recomputing every
    layer, the fewest whole layers recomputed in full (brute force over k below), and the run equals the model."""
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny", n_layer=6)
    x = zoo.example_inputs("gpt3-tiny", batch=8, seq=64)
    kw = dict(device_type="cpu", microbatches=1)
    plain = partitioner.compile(model, 1, x, recompute="none", **kw)
    full = partitioner.compile(model, 1, x, recompute="full", **kw)
    limit = fraction * plain.plan.predicted["peak_memory"]
    cm = partitioner.compile(model, 1, x, memory_limit=limit, recompute=None, data_parallel=None, **kw)
    mode = cm.plan.stages[0].recompute
    k = int(mode.removeprefix("full:"))
    assert 1 <= k < 6 and len(cm.plan.stages[0].recompute_regions) == k
    assert cm.plan.predicted["peak_memory"] <= limit
    assert plain.plan.predicted["step_time"] < cm.plan.predicted["step_time"] < full.plan.predicted["step_time"]
    # Brute force: no fewer layers fit; the planning graph's own evaluation of each k.
    gm, spec = cm.captured.graph_module, get_device_spec("cpu")
    pg = build_planning_graph(gm, node_costs(gm, spec, training=True), spec, training=True)
    stage_of = np.zeros(pg.n, dtype=np.int64)
    peaks = [evaluate(pg, stage_of, 1, microbatches=1, recompute=[f"full:{j}"])[0].peak_memory for j in range(1, 6)]
    assert peaks == sorted(peaks, reverse=True)  # each layer more gives up its activations
    assert peaks[k - 1] <= limit and (k == 1 or peaks[k - 2] > limit)
    torch.testing.assert_close(cm(*x), model(*x))
    again = partitioner.compile(model, 1, x, plan=cm.plan.to_json(), **kw)  # a saved plan keeps it
    assert again.plan.stages[0].recompute == mode
    assert again.plan.stages[0].recompute_regions == cm.plan.stages[0].recompute_regions


def test_a_plan_that_recomputes_trains_as_the_model_does() -> None:
    torch.manual_seed(0)
    model, x = _tiny(batch=8)
    y = zoo.example_targets("gpt3-tiny", batch=8)
    cm = partitioner.compile(model, 2, x, device_type="cpu", pipeline=2, microbatches=2, recompute="full")
    assert all(s.recompute == "full" and s.recompute_regions for s in cm.plan.stages)
    loss = cm.step(x, y, _lm_loss)
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (idx,) = x
    reference = (_lm_loss(model(idx[:4]), y[:4]) + _lm_loss(model(idx[4:]), y[4:])) / 2  # the mean microbatch loss
    reference.backward()
    torch.testing.assert_close(loss, reference.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def _lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())


def test_the_free_search_is_never_slower_than_a_forced_layout() -> None:
    # The forced layout (degrees, microbatches, recompute, dp mode) is one of the search's candidates, so the search
    # can only do as well or better under the same memory limit.
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny", n_head=8)
    x = zoo.example_inputs("gpt3-tiny", batch=32, device="meta")
    limit = 3 * 2**20
    kw = dict(memory_limit=limit, device_type=H100_TENSORS_ONLY)
    forced = partitioner.compile(model, 8, x, pipeline=2, tensor_parallel=2, microbatches=4, recompute="full",
                                 data_parallel="ddp", **kw)  # fmt: skip
    free = partitioner.compile(model, 8, x, **kw)
    assert free.plan.predicted["step_time"] <= forced.plan.predicted["step_time"] * (1 + 1e-9)
    assert free.plan.predicted["peak_memory"] <= limit


def test_bad_recompute_options_are_refused() -> None:
    model, x = _tiny(batch=4)
    with pytest.raises(ValueError, match="recompute='some'"):
        partitioner.compile(model, 2, x, device_type="cpu", recompute="some")
    with pytest.raises(ValueError, match="data_parallel='zero4'"):
        partitioner.compile(model, 2, x, device_type="cpu", data_parallel="zero4")


def test_a_saved_plan_s_recompute_is_what_runs() -> None:
    from partitioner.apply import apply
    from partitioner.passes.recompute import CheckpointedRegion

    model, x = _tiny(batch=8)
    plan = partitioner.compile(model, 2, x, device_type="cpu", pipeline=2, microbatches=2, recompute="full").plan
    first = dataclasses.replace(plan.stages[0], recompute="none", recompute_regions=[])
    edited = dataclasses.replace(plan, stages=[first, plan.stages[1]])
    cm = partitioner.compile(model, 2, x, device_type="cpu", plan=edited)
    stages = apply(cm.plan, cm.captured)
    counts = [sum(isinstance(m, CheckpointedRegion) for m in st.module.modules()) for st in stages]
    assert counts == [0, len(plan.stages[1].recompute_regions)] and counts[1] > 0


def test_module_path_skips_the_stand_in_export_gives_nodes_without_a_module() -> None:
    graph = fx.Graph()
    node = graph.placeholder("x")
    hook = "_empty_nn_module_stack_from_metadata_hook"  # torch._export.passes._node_metadata_hook
    node.meta["nn_module_stack"] = {hook: (hook, hook)}
    assert module_path(node) == ""
    node.meta["nn_module_stack"] = {"L__self___h_0": ("h.0", object), hook: (hook, hook)}
    assert module_path(node) == "h.0"
