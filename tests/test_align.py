"""passes.align: misaligned tensor-core GEMMs padded and sliced back.

- the rewrite computes what the original did, forward and gradients, for every matrix-product form it handles
  (nn.Linear, F.linear, matmul / mm / bmm as functions or methods, addmm), any K / N padding (hypothesis), on fx and
  export graphs; node names are kept;
- compile pads where the device penalizes misaligned rows (GPU presets, bf16) and the cost model says it pays, records
  the nodes in the plan, and the compiled model (pipelined, tied LM head) trains as the model does; nothing is padded
  on the CPU preset, in fp32, with aligned rows or with pad_gemms=False;
- at tensor degree > 1 only the nodes the layout leaves whole are padded, and the TP ranks still equal the model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import partitioner
import zoo
from partitioner.annotate import annotate
from partitioner.cost import NodeCost
from partitioner.devices import PRESETS, DeviceSpec
from partitioner.passes.align import applicable_pads, gemm_pads, pad_gemms, row_pads
from partitioner.plan.schema import Plan


class Products(nn.Module):
    """Every matrix-product form the pass handles, on an input (B, T, K), each giving (B, T, N)."""

    def __init__(self, k: int, n: int) -> None:
        super().__init__()
        self.proj = nn.Linear(k, n)
        self.w = nn.Parameter(torch.randn(n, k) / k**0.5)
        self.b = nn.Parameter(torch.randn(n))
        self.c = nn.Parameter(torch.randn(k, n) / k**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(0, 1)
        outs = [
            self.proj(x),
            F.linear(x, self.w, self.b),
            F.linear(x, self.w),
            torch.matmul(x, self.c),
            x.matmul(self.c),
            torch.bmm(x, self.c.expand(x.shape[0], -1, -1)),
            torch.addmm(self.b, flat, self.c).view(x.shape[0], x.shape[1], -1),
            torch.mm(flat, self.c).view(x.shape[0], x.shape[1], -1),
        ]
        return torch.stack(outs).sum(0).view(-1)  # a view merging every dim: needs contiguous products


def _pads(gm: fx.GraphModule, spec: DeviceSpec) -> dict[str, list[int]]:
    """What gemm_pads pads when every node's unpadded cost is a second (so padding always pays), with its pads."""
    by_name = {n.name: n for n in gm.graph.nodes}
    chosen = gemm_pads(gm, spec, {name: NodeCost(1.0, 1.0) for name in by_name})
    return {name: list(row_pads(by_name[name], spec)) for name in chosen}


def _products(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.meta.get("flops", 0) > 0]


def _same_training(model: nn.Module, rewritten: fx.GraphModule, x: torch.Tensor) -> None:
    params = list(model.parameters())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = model(xa), rewritten(xb)
    torch.testing.assert_close(yb, ya)
    ga = torch.autograd.grad((ya * ya).sum(), [xa, *params])
    gb = torch.autograd.grad((yb * yb).sum(), [xb, *params])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a)


@given(
    k=st.integers(1, 24), n=st.integers(1, 24), pad_k=st.integers(0, 9), pad_n=st.integers(0, 9),
    b=st.integers(1, 3), t=st.integers(1, 5),
)  # fmt: skip
def test_padding_any_product_keeps_outputs_and_gradients(k: int, n: int, pad_k: int, pad_n: int, b: int, t: int):
    if not pad_k and not pad_n:
        pad_n = 1
    torch.manual_seed(k * 100 + n)
    model = Products(k, n).double()  # float64: a kernel's rounding stays far below assert_close's tolerance
    gm = fx.symbolic_trace(model)
    x = torch.randn(b, t, k, dtype=torch.float64)
    annotate(gm, [x], training=True)
    names = _products(gm)
    assert len(names) == 8
    rewritten = pad_gemms(gm, {name: [pad_k, pad_n] for name in names})
    assert {n.name for n in gm.graph.nodes} <= {n.name for n in rewritten.graph.nodes}  # every name kept
    assert all(n.target is not torch.ops.aten.constant_pad_nd.default for n in gm.graph.nodes)  # gm untouched
    _same_training(model, rewritten, x)


def test_padding_an_export_graph() -> None:
    torch.manual_seed(0)
    model = Products(13, 21).double()
    x = torch.randn(2, 3, 13, dtype=torch.float64)
    gm = torch.export.export(model, (x,)).module()
    annotate(gm, [x], training=True)
    names = _products(gm)
    assert len(names) >= 6, names
    rewritten = pad_gemms(gm, {name: [3, 3] for name in names})
    _same_training(model, rewritten, x)


def test_a_node_that_is_not_a_product_is_refused() -> None:
    gm = fx.symbolic_trace(Products(8, 8))
    with pytest.raises(ValueError, match="not a matrix product"):
        pad_gemms(gm, {"flatten": [0, 8]})


def _tiny(vocab: int, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, tuple[torch.Tensor], torch.Tensor]:
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny", vocab_size=vocab).to(dtype)
    x = (torch.randint(0, vocab, (4, 64)),)
    y = torch.randint(0, vocab, (4, 64))
    return model, x, y


def _wide(vocab: int, dtype: torch.dtype = torch.bfloat16) -> tuple[nn.Module, tuple[torch.Tensor]]:
    """gpt3-tiny 8x wider on meta, 16,384 tokens: an LM head large enough that its launch costs do not dominate."""
    with torch.device("meta"):
        model = zoo.get("gpt3-tiny", vocab_size=vocab, d_model=512).to(dtype)
    return model, zoo.example_inputs("gpt3-tiny", batch=256, device="meta")


def test_gemm_pads_choose_the_misaligned_lm_head_on_gpus_only() -> None:
    h100 = PRESETS["h100"]
    for vocab, dtype, spec, expect in [
        (509, torch.bfloat16, h100, {"lm_head": [0, 3]}),
        (512, torch.bfloat16, h100, {}),  # aligned
        (509, torch.float32, h100, {}),  # CUDA cores: no penalty
        (509, torch.bfloat16, PRESETS["cpu"], {}),  # no penalty on the CPU
    ]:
        model, x = _wide(vocab, dtype)
        cm = partitioner.compile(model, devices=1, example_inputs=x, device_type=spec, verbose=False)
        assert cm.plan.padded_gemms == expect, (vocab, dtype, spec.name)
    model, x = _wide(509)
    assert partitioner.compile(model, devices=1, example_inputs=x, device_type="h100", pad_gemms=False,
                               verbose=False).plan.padded_gemms == {}  # fmt: skip
    small, x, _ = _tiny(509)  # 256 tokens of width 64: the pads' and the copy's launches cost more than they save
    assert partitioner.compile(small, devices=1, example_inputs=x, device_type="h100",
                               verbose=False).plan.padded_gemms == {}  # fmt: skip


def test_padding_is_priced_below_the_misaligned_product() -> None:
    model, x = _wide(509)
    padded = partitioner.compile(model, devices=1, example_inputs=x, device_type="h100", verbose=False)
    plain = partitioner.compile(model, devices=1, example_inputs=x, device_type="h100", verbose=False, pad_gemms=False)
    assert padded.plan.predicted["step_time"] < plain.plan.predicted["step_time"]


def _trains_as(compiled: partitioner.CompiledModel, model: nn.Module, ref: nn.Module, x: tuple, y: torch.Tensor):
    """One step of `compiled` (over `model`'s parameters) leaves the gradients one step of `ref` does."""
    loss_fn = zoo.loss_fn("gpt3-tiny")
    compiled.step(x, y, loss_fn)
    loss_fn(ref(*x), y).backward()
    grads = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, msg=name)


def test_a_pipelined_model_with_a_padded_tied_lm_head_trains_as_the_model() -> None:
    """fp32 on the CPU (the cost model pads only tensor-core dtypes): the plan's record is set by hand, and the
    pipelined model with its LM head (tied to the embedding, on the other stage) padded trains as the model does."""
    model, x, y = _tiny(509, torch.float32)
    ref = zoo.get("gpt3-tiny", vocab_size=509)
    ref.load_state_dict(model.state_dict())
    cm = partitioner.compile(model, devices=2, pipeline=2, microbatches=2, example_inputs=x, device_type="h100",
                             verbose=False)  # fmt: skip
    assert cm.plan.padded_gemms == {} and cm.plan.node_stage["lm_head"] != cm.plan.node_stage["wte"]
    saved = dataclasses.replace(cm.plan, padded_gemms={"lm_head": [0, 3]})
    padded = partitioner.compile(model, devices=2, example_inputs=x, device_type="h100", plan=saved, verbose=False)
    assert padded.plan.padded_gemms == {"lm_head": [0, 3]}
    stage = padded.stages[padded.plan.node_stage["lm_head"]].module
    assert any(n.name == "lm_head_padded" for n in stage.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(padded(*x), ref(*x))
    _trains_as(padded, model, ref, x, y)


def test_a_saved_plan_keeps_its_padding_and_refuses_a_bad_record() -> None:
    model, x = _wide(509)
    cm = partitioner.compile(model, devices=1, example_inputs=x, device_type="h100", verbose=False)
    assert Plan.from_json(cm.plan.to_json()).padded_gemms == {"lm_head": [0, 3]}
    assert "padded GEMMs (rows not a multiple of 16 bytes, zero-padded and sliced back): lm_head (N +3)" in (
        cm.plan.summary()
    )
    bad = cm.plan.to_json().replace('"lm_head": [\n   0,\n   3\n  ]', '"nowhere": [\n   0,\n   3\n  ]')
    assert bad != cm.plan.to_json()
    with pytest.raises(ValueError, match="padded_gemms names"):
        Plan.from_json(bad)


def test_tensor_parallel_pads_only_what_its_layout_leaves_whole() -> None:
    model, x = _wide(509)
    cm = partitioner.compile(model, devices=2, tensor_parallel=2, example_inputs=x, device_type="h100", verbose=False)
    layout = cm.tensor_parallel_plan
    gm = cm.captured.graph_module
    pads = _pads(gm, PRESETS["h100"])
    assert pads == {"lm_head": [0, 3]}
    assert layout.node_layout["lm_head"] != "replicated"  # the vocabulary-parallel LM head: each rank a shard
    assert applicable_pads(pads, gm, layout) == {} == cm.plan.padded_gemms
    assert applicable_pads(pads, gm, None) == pads  # the unsharded graph (local runs) pads it


class Attention(nn.Module):
    """q k^T over a misaligned sequence (two activations) and a projection whose weight is misaligned."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 61)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.softmax(q @ k.transpose(-1, -2), -1) @ k)


def test_products_of_two_activations_are_never_padded() -> None:
    """Their rows can be a sequence that context or sequence parallelism splits after planning: only weight GEMMs
    (a parameter's rows) are padded."""
    gm = fx.symbolic_trace(Attention().to(torch.bfloat16))
    q = torch.randn(64, 509, 64, dtype=torch.bfloat16)
    annotate(gm, [q, q], training=True)
    pads = _pads(gm, PRESETS["h100"])
    assert pads == {"proj": [0, 3]}, pads


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_a_vocabulary_padded_to_aligned_shards_keeps_outputs_and_gradients(tp: int) -> None:
    """On a device that pays for misaligned rows, a vocabulary tp does not divide is padded so that every rank's LM
    head rows are a multiple of the alignment (Megatron's 128 x tp), not only so that tp divides it: 1,025 rows at
    tp 4 and alignment 8 are padded by 31 to 4 x 264; the ranks still compute what the model does. A vocabulary tp
    divides is not padded (graphs that read its size would refuse a padded one): nanoGPT's 1,028 rows at tp 2 stay
    2 x 514 and sharded, its loss in the graph."""
    from partitioner.plan.tensor import plan_tensor_parallel
    from partitioner.runtime.tp_local import check_tensor_parallel
    from tests.test_tensor_parallel import nano_graph, zoo_graph

    gm, inputs = zoo_graph("gpt3-tiny", vocab_size=1025)
    layout = plan_tensor_parallel(gm, tp, vocab_alignment=8)
    pad = layout.param_shard["lm_head.weight"]["pad"]
    assert pad == -1025 % (8 * tp) and (1025 + pad) // tp % 8 == 0 and layout.param_shard["wte.weight"]["pad"] == pad
    assert plan_tensor_parallel(gm, tp).param_shard["lm_head.weight"]["pad"] == -1025 % tp  # alignment 1: tp only
    check_tensor_parallel(gm, layout, inputs)
    gm, inputs = nano_graph("sdpa", targets=True, vocab=1028)
    layout = plan_tensor_parallel(gm, 2, vocab_alignment=8)
    assert layout.param_shard["lm_head.weight"] == {"dim": 0, "parts": 1}
    check_tensor_parallel(gm, layout, inputs, loss_fn=lambda out: out[0])


def test_the_search_pads_a_bf16_vocabulary_to_aligned_shards_on_gpus() -> None:
    model, x = _wide(509)
    cm = partitioner.compile(model, devices=2, tensor_parallel=2, example_inputs=x, device_type="h100", verbose=False)
    assert cm.tensor_parallel_plan.param_shard["lm_head.weight"]["pad"] == 3  # 512 / 2 = 32 x 8 rows
    cpu = partitioner.compile(model, devices=2, tensor_parallel=2, example_inputs=x, device_type="cpu", verbose=False)
    assert cpu.tensor_parallel_plan.param_shard["lm_head.weight"]["pad"] == 1  # tp only


def test_padded_products_inside_recompute_regions_train_as_the_model() -> None:
    """An MLP of 250 columns (misaligned) with both of its Linears padded, inside the full-recompute regions of a
    two-stage pipeline: the pads and the padded products run inside the checkpointed regions, and training equals the
    model's (fp32: the record is set by hand, as above)."""
    torch.manual_seed(0)
    model = zoo.get("gpt3-tiny", vocab_size=509, d_ff=250)
    ref = zoo.get("gpt3-tiny", vocab_size=509, d_ff=250)
    ref.load_state_dict(model.state_dict())
    x, y = (torch.randint(0, 509, (4, 64)),), torch.randint(0, 509, (4, 64))
    cm = partitioner.compile(model, devices=2, pipeline=2, microbatches=2, recompute="full", example_inputs=x,
                             device_type="h100", verbose=False)  # fmt: skip
    gm = cm.captured.graph_module
    mlp = {n.name: gm.get_submodule(n.target) for n in gm.graph.nodes if n.op == "call_module" and ".mlp." in n.target}
    pads = {name: [0, 6] if m.out_features == 250 else [6, 0] for name, m in mlp.items() if isinstance(m, nn.Linear)}
    regions = [r for s in cm.plan.stages for r in s.recompute_regions]
    assert len(pads) == 4 and regions
    saved = dataclasses.replace(cm.plan, padded_gemms=pads)
    padded = partitioner.compile(model, devices=2, example_inputs=x, device_type="h100", plan=saved, verbose=False)
    _trains_as(padded, model, ref, x, y)
