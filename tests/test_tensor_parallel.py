"""Tensor parallelism: sharding propagation (plan.tensor), the rewrite (passes.tensor_parallel) and the in-process
check (runtime.tp_local), on the zoo's GPT-3 / BERT / RoBERTa tiny and on nanoGPT-style attention (fused c_attn +
split, `C // self.n_head` views, `-1` views, explicit softmax attention, loss inside the graph), and on sizes read from
tensors in Python arithmetic (`h.shape[-1] ** -0.5`, `view(x.shape[0] * x.shape[1], -1)`, a torchvision-style ViT).

Everything here runs all tp ranks in one process (threads + barrier collectives); the multi-process gloo checks
are in test_tp_distributed.py. Equality is fp32 assert_close at 1e-5 against the unsharded graph: outputs on
every rank and every parameter's gradient (sharded gradients reassembled).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import partitioner
import partitioner.plan.tensor as tensor_plan_module
import partitioner.plan.tensor_rules as tensor_rules
import zoo
from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.devices import get_device_spec
from partitioner.passes.split import split_stages
from partitioner.passes.tensor_parallel import (
    TPCollective,
    count_collectives,
    local_param_slices,
    merge_shards,
    shard_of,
    stage_of_rank_nodes,
    tensor_parallel_rank,
)
from partitioner.plan.tensor import (
    TensorParallelPlan,
    check_tensor_parallel_plan,
    max_tensor_parallel,
    plan_tensor_parallel,
    shard_tensor,
    tp_cost,
    unshard_tensor,
)
from partitioner.runtime.tp_local import ThreadGroup, _run_threads, check_tensor_parallel

ZOO = ["gpt3-tiny", "bert-tiny", "roberta-tiny"]
LAYER = re.compile(r"^(h|layers)\.(\d+)\.")


# ----------------------------------------------------------------------------------------------- nanoGPT models
class NanoAttention(nn.Module):
    """nanoGPT's attention: fused c_attn + split, views by `C // self.n_head` (or -1), SDPA or explicit softmax."""

    def __init__(self, d: int, n_head: int, n_ctx: int, style: str):
        super().__init__()
        self.n_head, self.n_embd, self.style = n_head, d, style
        self.scale = 1.0 / math.sqrt(d // n_head)  # nanoGPT writes math.sqrt(k.size(-1)), which fx cannot trace
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)  # 3 x (B, T, C)
        if self.style == "minus_one":
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        else:
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.style == "explicit":
            att = (q @ k.transpose(-2, -1)) * self.scale  # (B, nh, T, T)
            # nanoGPT slices its causal buffer, self.bias[:, :, :T, :T], which fx cannot trace (T is a proxy
            # and buffers are not proxied); the same mask built in the graph:
            causal = x.new_ones(T, T).tril().view(1, 1, T, T)
            att = att.masked_fill(causal == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v  # (B, nh, T, hd)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): C is the global width, rewritten to C // tp
        return self.c_proj(y)


class NanoBlock(nn.Module):
    def __init__(self, d: int, n_head: int, n_ctx: int, style: str):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = NanoAttention(d, n_head, n_ctx, style)
        self.c_fc, self.c_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.c_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """forward(idx (B, T), targets (B, T) | None) -> logits, or the loss when targets are given (loss in graph)."""

    def __init__(self, style: str = "sdpa", d: int = 32, n_head: int = 4, vocab: int = 96, n_layer: int = 2):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(16, d)
        self.blocks = nn.ModuleList([NanoBlock(d, n_head, 16, style) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        b, t = idx.size()
        x = self.wte(idx) + self.wpe(torch.arange(0, t, dtype=torch.long, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def prepare(model: nn.Module, args: tuple) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    cg = capture(model, args)
    inputs = cg.flatten_inputs(args, {})
    annotate(cg.graph_module, inputs, training=True)
    return cg.graph_module, inputs


def zoo_graph(name: str, **overrides: int) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    torch.manual_seed(0)
    return prepare(zoo.get(name, **overrides), zoo.example_inputs(name, batch=2, seq=8))


def nano_graph(style: str, targets: bool = False, **kw: int) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = NanoGPT(style, **kw)
    idx = torch.randint(0, 96, (2, 8))
    tgt = torch.randint(0, 96, (2, 8))
    tgt[0, :3] = -1  # ignored positions
    return prepare(model, (idx, tgt) if targets else (idx,))


# ----------------------------------------------------------------------------------------------- collective counts
def per_layer_collectives(rank_gm: fx.GraphModule) -> dict[str, dict[str, int]]:
    """{layer prefix: {"forward": n, "backward": n}}; an f counts for the layer of its first consumer."""
    by_name = {n.name: n for n in rank_gm.graph.nodes}
    layers: dict[str, dict[str, int]] = {}
    for n in rank_gm.graph.nodes:
        if n.op != "call_module" or not isinstance(rank_gm.get_submodule(n.target), TPCollective):
            continue
        kind = rank_gm.get_submodule(n.target).kind
        anchor = next(iter(n.users)) if kind == "copy" else by_name[n.meta["tp_anchor"]]
        path = str(anchor.target) if anchor.op == "call_module" else next(reversed(anchor.meta["nn_module_stack"]))
        m = LAYER.match(path)
        key = m.group(0) if m else "<model>"
        phase = {"copy": "backward", "reduce": "forward", "gather": "gather"}[kind]
        layers.setdefault(key, {"forward": 0, "backward": 0, "gather": 0})[phase] += 1
    return layers


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("tp", [2, 4])
def test_megatron_collective_counts_per_layer(name: str, tp: int) -> None:
    gm, _ = zoo_graph(name)
    plan = plan_tensor_parallel(gm, tp)
    rank_gm = tensor_parallel_rank(gm, plan, 0, ThreadGroup(tp).comm(0))
    layers = per_layer_collectives(rank_gm)
    model = layers.pop("<model>")
    assert len(layers) == 2  # the tiny presets have 2 layers
    for key, counts in layers.items():  # exactly Megatron's optimum: 2 all-reduces forward, 2 backward
        assert counts == {"forward": 2, "backward": 2, "gather": 0}, (key, counts)
    # Outside the layers: the vocab-parallel embedding's all-reduce, f in front of the LM head, the logits gather.
    assert model == {"forward": 1, "backward": 1, "gather": 1}
    assert count_collectives(rank_gm) == {
        "all_reduce_forward": 5,
        "all_reduce_backward": 5,
        "all_gather_forward": 1,
        "vocab_cross_entropy": 0,
    }
    # The plan lists the same collectives the graph has.
    assert sum(c["kind"] == "all_reduce" and c["phase"] == "forward" for c in plan.collectives) == 5
    assert sum(c["phase"] == "backward" for c in plan.collectives) == 5


# ----------------------------------------------------------------------------------------------- equivalence
@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("tp", [2, 4])
def test_zoo_outputs_and_gradients_match(name: str, tp: int) -> None:
    gm, inputs = zoo_graph(name)
    plan = plan_tensor_parallel(gm, tp)
    report = check_tensor_parallel(gm, plan, inputs)
    assert not [f for f in plan.fallbacks if "proj" in f["node"] or "fc" in f["node"]], plan.fallbacks
    assert len(report.sharded_params) >= 20  # q/k/v/out/fc/proj of both layers, embedding, head


@pytest.mark.timeout(120)
def test_gpt3_tiny_tp8_with_8_heads_shards_everything() -> None:
    gm, inputs = zoo_graph("gpt3-tiny", n_head=8)
    plan = plan_tensor_parallel(gm, 8, strict=True)
    assert [f["node"] for f in plan.fallbacks] == ["wpe"]
    check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(120)
def test_tp8_with_4_heads_keeps_attention_replicated_with_reason() -> None:
    gm, inputs = zoo_graph("gpt3-tiny")
    plan = plan_tensor_parallel(gm, 8)
    reasons = {f["node"]: f["reason"] for f in plan.fallbacks}
    assert "view dim 2=4 is not divisible by tp=8" in reasons["h_0_attn_q_proj"]
    assert plan.module_rules["h_0_mlp_fc"] == "column" and plan.module_rules["h_0_mlp_proj"] == "row"
    check_tensor_parallel(gm, plan, inputs)
    with pytest.raises(ValueError, match=r"tp=8 \(strict\).*not divisible by tp=8"):
        plan_tensor_parallel(gm, 8, strict=True)


@pytest.mark.timeout(120)
def test_vocab_that_tp_does_not_divide_is_padded() -> None:
    """gpt3-tiny with 510 tokens at tp=4: the tied wte / head get 2 padding rows (128 per rank, the last rank's last
    2 never read); the gathered logits are the model's 510 columns; merged shards are the model's tensors."""
    gm, inputs = zoo_graph("gpt3-tiny", vocab_size=510)
    plan = plan_tensor_parallel(gm, 4, strict=True)
    assert plan.param_shard["wte.weight"] == {"dim": 0, "parts": 1, "pad": 2}
    assert plan.module_rules["wte"] == "vocab_embedding" and plan.module_rules["h_0_attn_q_proj"] == "column"
    gather = next(c for c in plan.collectives if c["kind"] == "all_gather")
    assert gather["pad"] == 2
    report = check_tensor_parallel(gm, plan, inputs)
    assert "wte.weight" in report.sharded_params
    full = dict(gm.named_parameters())
    merged = merge_shards(plan, [{k: shard_of(plan, k, v, r) for k, v in full.items()} for r in range(4)])
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    assert shard_of(plan, "wte.weight", full["wte.weight"], 3).shape[0] == 128


@pytest.mark.timeout(120)
@pytest.mark.parametrize("style", ["sdpa", "explicit", "minus_one"])
@pytest.mark.parametrize("tp", [2, 4])
def test_nanogpt_attention_styles(style: str, tp: int) -> None:
    gm, inputs = nano_graph(style)
    plan = plan_tensor_parallel(gm, tp)
    # fused c_attn: each rank holds its heads' slice of q, k and v
    assert plan.param_shard["blocks.0.attn.c_attn.weight"] == {"dim": 0, "parts": 3}
    assert plan.module_rules["blocks.0.attn.c_proj".replace(".", "_")] == "row"
    assert not plan.fallbacks or [f["node"] for f in plan.fallbacks] == ["wpe"]
    check_tensor_parallel(gm, plan, inputs)


class PackedQKVAttention(nn.Module):
    """HF/NeoX style: one qkv Linear viewed as (B, T, 3, nh, hd), permuted, then unbind or indexing."""

    def __init__(self, d: int = 32, n_head: int = 4, unbind: bool = True):
        super().__init__()
        self.n_head, self.unbind = n_head, unbind
        self.qkv, self.proj, self.ln = nn.Linear(d, 3 * d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(self.ln(x)).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0) if self.unbind else (qkv[0], qkv[1], qkv[2])  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.proj(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("unbind", [True, False])
@pytest.mark.parametrize("tp", [2, 4])
def test_packed_qkv_view_reseeds_as_three_blocks(unbind: bool, tp: int) -> None:
    torch.manual_seed(0)
    gm, inputs = prepare(PackedQKVAttention(unbind=unbind), (torch.randn(2, 5, 32),))
    plan = plan_tensor_parallel(gm, tp, strict=True)
    assert plan.param_shard["qkv.weight"] == {"dim": 0, "parts": 3}
    assert plan.module_rules == {"qkv": "column", "proj": "row"}
    check_tensor_parallel(gm, plan, inputs)
    assert max_tensor_parallel(gm, 16) == 4


def test_size_arguments_are_rewritten_to_local_sizes() -> None:
    gm, _ = nano_graph("sdpa")
    plan = plan_tensor_parallel(gm, 2)
    rank = tensor_parallel_rank(gm, plan, 1, ThreadGroup(2).comm(1))
    code = rank.code
    assert "split(16, dim = 2)" in code  # split(self.n_embd=32) -> 16
    assert re.search(r"view\(getitem_\d+, getitem_\d+, 2, floordiv", code)  # view(B, T, n_head=4 -> 2, C // 4)
    assert re.search(r"tp_local_size_view_\d+ = getitem_\d+ // 2", code)  # view(B, T, C): C in the graph -> C // 2
    gm, _ = zoo_graph("gpt3-tiny")
    code = tensor_parallel_rank(gm, plan_tensor_parallel(gm, 4), 0, ThreadGroup(4).comm(0)).code
    assert "h_0_attn_q_proj.view(getitem_2, getitem_3, 1, 16)" in code  # 4 heads -> 1 per rank
    assert "contiguous.view(getitem_2, getitem_3, -1)" in code  # -1 infers the local width


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tp", [2, 4])
def test_loss_in_graph_uses_vocab_parallel_cross_entropy(tp: int) -> None:
    gm, inputs = nano_graph("sdpa", targets=True)
    plan = plan_tensor_parallel(gm, tp)
    assert "vocab_cross_entropy" in plan.module_rules.values()
    assert not any(c["kind"] == "all_gather" for c in plan.collectives)  # the logits are never gathered
    rank = tensor_parallel_rank(gm, plan, 0, ThreadGroup(tp).comm(0))
    assert count_collectives(rank)["vocab_cross_entropy"] == 1
    check_tensor_parallel(gm, plan, inputs, loss_fn=lambda out: out[0])


def test_sizes_read_from_sharded_tensors_stay_global() -> None:
    class HeadsFromSize(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.qkv(x)  # (B, T, 16) shard(2)
            B, T, C = h.shape  # C is read from the sharded tensor: the graph multiplies it back to 16
            y = h.reshape(B, T, 4, C // 4).relu().reshape(B, T, C)
            return self.out(y)

    torch.manual_seed(0)
    gm, inputs = prepare(HeadsFromSize(), (torch.randn(2, 3, 16),))
    plan = plan_tensor_parallel(gm, 2)
    assert plan.global_sizes and plan.module_rules == {"qkv": "column", "out": "row"}
    check_tensor_parallel(gm, plan, inputs)


# ----------------------------------------------------------------------------------------------- fallbacks
def test_unshardable_ops_fall_back_with_reasons() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(8, 12), nn.Linear(12, 8), nn.Linear(8, 6)
            self.ln = nn.LayerNorm(12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln(self.a(x))  # LayerNorm over the sharded dim: a stays replicated
            return self.c(x + self.b(h)).cumsum(-1)  # c's 6 columns: column-parallel then an unknown op

    torch.manual_seed(0)
    gm, inputs = prepare(Odd(), (torch.randn(3, 8),))
    plan = plan_tensor_parallel(gm, 4)
    reasons = {f["node"]: f["reason"] for f in plan.fallbacks}
    assert "LayerNorm normalizes over the sharded dim" in reasons["a"]
    assert "out_features=6 is not divisible by tp=4" in reasons["c"]
    assert plan.sharded_nodes() == [] and plan.collectives == []
    check_tensor_parallel(gm, plan, inputs)
    plan2 = plan_tensor_parallel(gm, 2)
    assert "no sharding rule for cumsum" in {f["node"]: f["reason"] for f in plan2.fallbacks}["c"]


def test_a_module_called_twice_gets_one_sharding() -> None:
    class Reuse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x + self.down(self.up(x).relu())  # up: column, down: row here ...
            return self.up(h)  # ... and up again on the output: would need a gather; one rule must hold for both

    torch.manual_seed(0)
    gm, inputs = prepare(Reuse(), (torch.randn(3, 8),))
    plan = plan_tensor_parallel(gm, 2, gather_output=False)
    assert "called 2 times with different shardings" in " ".join(f["reason"] for f in plan.fallbacks)
    check_tensor_parallel(gm, plan, inputs)
    plan = plan_tensor_parallel(gm, 2)  # gathering the output, both calls of `up` are column-parallel
    assert plan.module_rules == {"up": "column", "down": "row", "up_1": "column"}
    check_tensor_parallel(gm, plan, inputs)


def test_bad_inputs_are_refused() -> None:
    gm, _ = zoo_graph("gpt3-tiny")
    for tp in (0, -2, 1.5):
        with pytest.raises(ValueError, match="tp must be a positive integer"):
            plan_tensor_parallel(gm, tp)  # type: ignore[arg-type]
    raw = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="run partitioner.annotate.annotate first"):
        plan_tensor_parallel(raw, 2)
    plan = plan_tensor_parallel(gm, 2)
    with pytest.raises(ValueError, match="comm is rank 0 of 4"):
        tensor_parallel_rank(gm, plan, 0, ThreadGroup(4).comm(0))


# ----------------------------------------------------------------------------------------------- plan data & cost
def test_plan_is_json_data_and_deterministic() -> None:
    gm, _ = zoo_graph("bert-tiny")
    plan = plan_tensor_parallel(gm, 2)
    text = plan.to_json()
    json.loads(text)
    assert TensorParallelPlan.from_json(text) == plan
    assert plan_tensor_parallel(gm, 2).to_json() == text
    assert plan.node_layout["layers_0_attn_q_proj"] == "shard(2)"
    assert plan.node_layout["transpose"] == "shard(1)"
    assert plan.node_layout["layers_0_attn_out_proj"] == "partial"
    assert plan.node_layout["layers_0_ln_1"] == "replicated"
    assert plan.param_shard["layers_0.attn.q_proj.weight".replace("layers_0", "layers.0")] == {"dim": 0, "parts": 1}
    assert plan.param_shard["layers.0.attn.out_proj.weight"] == {"dim": 1, "parts": 1}
    assert plan.param_shard["layers.0.attn.out_proj.bias"] == {"dim": None, "parts": 1}
    assert plan.param_shard["word_emb.weight"] == plan.param_shard["mlm_decoder.weight"] == {"dim": 0, "parts": 1}
    assert "replicated pos_emb" in plan.summary()


def test_max_tensor_parallel() -> None:
    assert max_tensor_parallel(zoo_graph("gpt3-tiny")[0], 16) == 4  # 4 heads
    assert max_tensor_parallel(zoo_graph("gpt3-tiny", n_head=8)[0], 16) == 8
    assert max_tensor_parallel(zoo_graph("gpt3-tiny", n_head=8)[0], 6) == 4
    assert max_tensor_parallel(nano_graph("sdpa")[0], 16) == 4


def test_tp_cost_matches_the_ring_formula() -> None:
    gm, _ = zoo_graph("gpt3-tiny")
    spec = get_device_spec("h100")
    plan = plan_tensor_parallel(gm, 4)
    cost = tp_cost(plan, gm, spec)
    act = 2 * 8 * 64 * 4  # one (B, T, d) fp32 activation
    bandwidth = spec.link_bandwidth * spec.link_efficiency  # what NCCL achieves on NVLink
    ar = 2 * spec.link_latency + 2 * 3 / 4 * act / bandwidth  # reduce-scatter + all-gather
    gather = spec.link_latency + 3 / 4 * (2 * 8 * 512 * 4) / bandwidth
    assert cost.comm_forward == pytest.approx(5 * ar + gather)
    assert cost.comm_backward == pytest.approx(5 * ar)
    assert tp_cost(plan, gm, spec, training=False).comm_backward == 0.0
    fc = next(n for n in gm.graph.nodes if n.name == "h_0_mlp_fc")
    assert cost.node_scale["h_0_mlp_fc"] == 0.25 and cost.node_scale["h_0_ln_1"] == 1.0
    assert cost.flops_per_rank < cost.flops_total
    sharded = sum(n.meta["flops"] + n.meta["bwd_flops"] for n in gm.graph.nodes if cost.node_scale[n.name] < 1)
    assert cost.flops_total - cost.flops_per_rank == pytest.approx(sharded * 3 / 4)
    assert fc.meta["flops"] > 0
    full = sum(p.numel() * 4 for p in gm.parameters())
    ln_and_biases = sum(p.numel() * 4 for n, p in gm.named_parameters() if plan.param_shard[n]["dim"] is None)
    assert cost.param_bytes_per_rank == pytest.approx(ln_and_biases + (full - ln_and_biases) / 4)
    one = plan_tensor_parallel(gm, 1)
    assert one.sharded_nodes() == [] and one.collectives == [] and tp_cost(one, gm, spec).comm == 0.0


# ----------------------------------------------------------------------------------------------- parameters
def test_shard_math_roundtrip() -> None:
    t = torch.arange(192 * 2).view(192, 2)
    shards = [shard_tensor(t, 0, 3, r, 4) for r in range(4)]
    assert shards[1][:16, 0].tolist() == list(range(32, 64, 2))  # rows 16:32 of the q block
    assert torch.equal(unshard_tensor(shards, 0, 3), t)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 6), st.integers(0, 3), st.integers(1, 3), st.integers(0, 1))
def test_shard_math_roundtrip_with_a_tail_kept_whole(tp: int, head: int, whole: int, width: int, dim: int) -> None:
    """Each rank holds its 1/tp of the first rows and the last `whole` rows themselves; unsharding gives the tensor."""
    rows = head * tp + whole
    t = torch.arange(rows * width).view(rows, width) if dim == 0 else torch.arange(rows * width).view(width, rows)
    shards = [shard_tensor(t, dim, 1, r, tp, whole=whole) for r in range(tp)]
    for r, s in enumerate(shards):
        assert s.shape[dim] == head + whole
        assert torch.equal(s.narrow(dim, 0, head), t.narrow(dim, r * head, head))
        assert torch.equal(s.narrow(dim, head, whole), t.narrow(dim, rows - whole, whole))
    assert torch.equal(unshard_tensor(shards, dim, 1, whole=whole), t)


class MultiQueryAttention(nn.Module):
    """One fused q | k | v Linear holding `n_head` q heads and one k and one v head (PaLM / Falcon-7B style),
    cut by fx getitem slices: q = qkv[:, :, :-2], k = qkv[:, :, -2:-1], v = qkv[:, :, -1:] of its (B, T, nh + 2, hd)
    view, or (`split=True`, Falcon from transformers 5.25) by `qkv.split([nh, 1, 1], dim=2)`; k and v broadcast over
    the q heads."""

    def __init__(self, d: int, n_head: int, split: bool = False):
        super().__init__()
        self.n_head, self.hd, self.split = n_head, d // n_head, split
        self.qkv = nn.Linear(d, d + 2 * self.hd)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, self.n_head + 2, self.hd)
        if self.split:
            pieces = qkv.split([self.n_head, 1, 1], dim=2)
        else:
            pieces = (qkv[:, :, :-2], qkv[:, :, -2:-1], qkv[:, :, -1:])
        q, k, v = (t.transpose(1, 2) for t in pieces)
        y = F.scaled_dot_product_attention(q, k.expand(-1, self.n_head, -1, -1), v.expand(-1, self.n_head, -1, -1))
        return x + self.out(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("split", [False, True], ids=["slices", "split"])
@pytest.mark.parametrize("tp", [2, 4])
def test_multi_query_fused_linear_keeps_k_and_v_whole_in_an_fx_graph(tp: int, split: bool) -> None:
    """The fx twin of the HF multi-query tests (test_tp_hf.py): an nn.Linear seed re-seeded with its k and v rows kept
    whole, the view's size made local as (6 - 2) / tp + 2, the getitem slices' negative bounds left as they are, the
    split's sizes [4, 1, 1] made [4 / tp, 1, 1] (at tp 4 the view's 6 heads do not divide: the split after it says
    where the tail kept whole starts)."""
    torch.manual_seed(0)
    model = nn.Sequential(MultiQueryAttention(32, 4, split), MultiQueryAttention(32, 4, split))
    gm, inputs = prepare(model, (torch.randn(2, 5, 32),))
    plan = plan_tensor_parallel(gm, tp)
    assert plan.param_shard["0.qkv.weight"] == plan.param_shard["0.qkv.bias"] == {"dim": 0, "parts": 1, "whole": 16}
    assert plan.param_shard["1.out.weight"] == {"dim": 1, "parts": 1} and not plan.fallbacks
    check_tensor_parallel_plan(gm, plan)
    check_tensor_parallel(gm, plan, inputs)
    rank = tensor_parallel_rank(gm, plan, 1, ThreadGroup(tp).comm(1))
    assert rank.get_submodule("0.qkv").weight.shape == (32 // tp + 16, 32)


class PackedQKV(nn.Module):
    """q | k | v packed as (B, T, 3, nh, hd), v read by a negative position: blocks, not a tail kept whole (no reader
    takes a head slice)."""

    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head, self.hd = n_head, d // n_head
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, self.hd)
        q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, -1]))
        return x + self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


def test_a_packed_qkv_read_by_a_negative_position_is_cut_into_blocks() -> None:
    torch.manual_seed(0)
    gm, inputs = prepare(PackedQKV(32, 4), (torch.randn(2, 5, 32),))
    plan = plan_tensor_parallel(gm, 2)
    assert plan.param_shard["qkv.weight"] == {"dim": 0, "parts": 3} and not plan.fallbacks
    check_tensor_parallel(gm, plan, inputs)


def test_meta_model_rank_holds_only_local_shapes_and_loads_from_a_source() -> None:
    from partitioner.runtime.materialize import StateDictSource

    torch.manual_seed(0)
    real = zoo.get("gpt3-tiny")
    with torch.device("meta"):
        meta = zoo.get("gpt3-tiny")
    gm, _ = prepare(meta, zoo.example_inputs("gpt3-tiny", batch=2, seq=8, device="meta"))
    plan = plan_tensor_parallel(gm, 4)
    comm = ThreadGroup(4).comm(2)
    rank = tensor_parallel_rank(gm, plan, 2, comm)
    fc = rank.get_submodule("h.0.mlp.fc")
    assert fc.weight.is_meta and tuple(fc.weight.shape) == (64, 64) and fc.out_features == 64
    loaded = tensor_parallel_rank(gm, plan, 2, comm, source=StateDictSource(real.state_dict()))
    slices = local_param_slices(plan, gm, 2)
    full = real.state_dict()["h.0.attn.q_proj.weight"]
    assert torch.equal(loaded.get_submodule("h.0.attn.q_proj").weight, full[slices["h.0.attn.q_proj.weight"][0]])
    assert loaded.get_submodule("wte").weight is loaded.get_submodule("lm_head").weight  # tied stays tied


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("model", ["nano", "gpt3-tiny"])
def test_rank_tensors_merge_back_into_the_full_state_dict(model: str, tp: int) -> None:
    """What ``full_state_dict`` does under tp: every rank's parameters (by original name) -> the full tensors."""
    torch.manual_seed(0)
    if model == "nano":
        gm, _ = nano_graph("sdpa")  # fused c_attn: q, k, v parts interleave
    else:
        gm, _ = prepare(zoo.get(model), zoo.example_inputs(model, batch=2, seq=8))
    plan = plan_tensor_parallel(gm, tp)
    threads = ThreadGroup(tp)
    shards = [dict(tensor_parallel_rank(gm, plan, r, threads.comm(r)).named_parameters(remove_duplicate=False))
              for r in range(tp)]  # fmt: skip
    full = dict(gm.named_parameters(remove_duplicate=False))
    assert any(spec["parts"] == 3 for spec in plan.param_shard.values()) == (model == "nano")
    merged = merge_shards(plan, shards)
    assert set(merged) == set(full)
    for name, t in full.items():
        assert torch.equal(merged[name], t), name
        assert torch.equal(shard_of(plan, name, t, tp - 1), shards[tp - 1][name]), name
    with pytest.raises(ValueError, match=f"all {tp} ranks"):
        merge_shards(plan, shards[:-1])


# ----------------------------------------------------------------------------------------------- pipeline stages
@pytest.mark.timeout(120)
def test_rewrite_before_the_pipeline_split() -> None:
    gm, inputs = zoo_graph("gpt3-tiny")
    plan = plan_tensor_parallel(gm, 2)
    names = [n.name for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    stage_of = {n: (0 if i < len(names) // 2 else 1) for i, n in enumerate(names)}
    expected = gm(*inputs)[0]
    group = ThreadGroup(2)

    def run(r: int) -> torch.Tensor:
        rank_gm = tensor_parallel_rank(gm, plan, r, group.comm(r))
        stages = split_stages(rank_gm, stage_of_rank_nodes(rank_gm, stage_of), 2)
        values = tuple(inputs)
        for s in stages:
            values = s.module(*values)
        return values[0]

    for out in _run_threads([lambda r=r: run(r) for r in range(2)], group):
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------- property test
@st.composite
def mlp_stacks(draw: st.DrawFn) -> tuple[list[tuple[str, int]], int]:
    """Random stacks of Linear / activation / LayerNorm / residual layers over widths from {4, 6, 8, 12, 16}."""
    layers = [("linear", draw(st.sampled_from([4, 8, 16])))] + draw(
        st.lists(
            st.tuples(st.sampled_from(["linear", "gelu", "ln", "residual_mlp"]), st.sampled_from([4, 6, 8, 12, 16])),
            min_size=0,
            max_size=5,
        )
    )
    return layers, draw(st.sampled_from([2, 4]))


class Stack(nn.Module):
    def __init__(self, layers: list[tuple[str, int]], d_in: int = 8):
        super().__init__()
        self.kinds = [k for k, _ in layers]
        mods, d = [], d_in
        for kind, width in layers:
            if kind == "linear":
                mods.append(nn.Linear(d, width))
                d = width
            elif kind == "ln":
                mods.append(nn.LayerNorm(d))
            elif kind == "residual_mlp":
                mods.append(nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d)))
            else:
                mods.append(nn.GELU())
        self.layers = nn.ModuleList(mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for kind, m in zip(self.kinds, self.layers):
            x = x + m(x) if kind == "residual_mlp" else m(x)
        return x


@pytest.mark.timeout(300)
@settings(max_examples=25)
@given(mlp_stacks())
def test_random_stacks_shard_or_fall_back_and_stay_equal(case: tuple[list[tuple[str, int]], int]) -> None:
    layers, tp = case
    torch.manual_seed(0)
    gm, inputs = prepare(Stack(layers), (torch.randn(3, 8),))
    plan = plan_tensor_parallel(gm, tp)
    for name, rule in plan.module_rules.items():  # every sharded size divides evenly
        mod = gm.get_submodule(next(n for n in gm.graph.nodes if n.name == name).target)
        assert (mod.out_features if rule == "column" else mod.in_features) % tp == 0
    check_tensor_parallel(gm, plan, inputs)


# ----------------------------------------------------------------------------------------------- shape arithmetic
class ShapeArithmeticBlock(nn.Module):
    """A pre-LN block (d 64, 4 heads, fused qkv) whose sizes come from its tensors, in one of the issue's styles:

    scale:     q * q.shape[-1] ** -0.5 (head dim, replicated) and h * h.shape[-1] ** -0.5 (MLP width, sharded: the
               size read is made global, so the scale is the unsharded model's)
    flat_view: the MLP on h.view(h.shape[0] * h.shape[1], -1), then back with x.size(0), x.size(1)
    double:    h * (h.shape[-1] * 2) on the sharded MLP width (then / 512: the scale is 1 only with global sizes)
    """

    def __init__(self, style: str, d: int = 64, n_head: int = 4):
        super().__init__()
        self.style, self.n_head = style, n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if self.style == "scale":
            q = q * q.shape[-1] ** -0.5
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.out(y)
        h = self.ln_2(x)
        if self.style == "flat_view":
            h = h.view(h.shape[0] * h.shape[1], -1)  # (B * T, d)
        h = F.gelu(self.fc(h))  # (…, 4d) sharded on the last dim
        if self.style == "scale":
            h = h * h.shape[-1] ** -0.5
        elif self.style == "double":
            h = h * (h.shape[-1] * 2) / 512  # 512 only when the size read is global (/ 512 keeps fp32 checks tight)
        h = self.proj(h)
        if self.style == "flat_view":
            h = h.view(x.size(0), x.size(1), -1)
        return x + h


class MiniViT(nn.Module):
    """torchvision's vit_b_16 forward, shrunk (16x16 images, 4x4 patches, d 64, 4 heads): sizes from x.shape,
    torch._assert on them, reshape(n, hidden, n_h * n_w), a class token expanded to x.shape[0], nn.MultiheadAttention
    (no TP rule: stays replicated) and MLP blocks as nn.Sequential (column/row pairs)."""

    def __init__(self, image_size: int = 16, patch_size: int = 4, d: int = 64, n_head: int = 4, layers: int = 2):
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, d
        self.conv_proj = nn.Conv2d(3, d, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embedding = nn.Parameter(torch.randn(1, (image_size // patch_size) ** 2 + 1, d) * 0.02)
        self.ln_1 = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.attn = nn.ModuleList([nn.MultiheadAttention(d, n_head, batch_first=True) for _ in range(layers)])
        self.ln_2 = nn.ModuleList([nn.LayerNorm(d) for _ in range(layers)])
        self.mlp = nn.ModuleList(
            [nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(0.0), nn.Linear(2 * d, d)) for _ in range(layers)]
        )
        self.ln, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        p = self.patch_size
        torch._assert(h == self.image_size, f"Wrong image height! Expected {self.image_size} but got {h}!")
        torch._assert(w == self.image_size, f"Wrong image width! Expected {self.image_size} but got {w}!")
        n_h, n_w = h // p, w // p
        x = self.conv_proj(x).reshape(n, self.hidden_dim, n_h * n_w).permute(0, 2, 1)  # (n, 16, d)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embedding  # (n, 17, d)
        for ln_1, attn, ln_2, mlp in zip(self.ln_1, self.attn, self.ln_2, self.mlp):
            torch._assert(x.dim() == 3, f"Expected (batch_size, seq_length, hidden_dim) got {x.shape}")
            y = ln_1(x)
            x = x + attn(y, y, y, need_weights=False)[0]
            x = x + mlp(ln_2(x))
        return self.head(self.ln(x)[:, 0])


def shape_model(style: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    if style == "vit":
        return MiniViT(), torch.randn(2, 3, 16, 16)
    return ShapeArithmeticBlock(style), torch.randn(2, 5, 64)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("style", ["scale", "flat_view", "double", "vit"])
def test_shape_arithmetic_compiles_and_shards(style: str) -> None:
    """Issue #14: the default search crashed ("has no tensor metadata") on int/float arithmetic on sizes."""
    model, x = shape_model(style)
    expected = model(x)
    cm = partitioner.compile(model, devices=2, example_inputs=(x,), device_type="cpu")  # the default search
    torch.testing.assert_close(cm(x), expected)
    cm = partitioner.compile(model, devices=2, example_inputs=(x,), device_type="cpu", tensor_parallel=2)
    plan = cm.tensor_parallel_plan
    assert cm.plan.tensor_degree == 2 and not plan.fallbacks, plan.fallbacks
    if style == "vit":  # the MLPs shard; MultiheadAttention has no rule and stays whole
        assert plan.module_rules["mlp_0_0"] == "column" and plan.module_rules["mlp_0_3"] == "row"
    else:  # attention and MLP shard, sizes and all
        assert plan.module_rules == {"qkv": "column", "out": "row", "fc": "column", "proj": "row"}
        assert plan.param_shard["qkv.weight"] == {"dim": 0, "parts": 3}
    torch.testing.assert_close(cm(x), expected)
    cm.verify_tensor_parallel(x)  # every rank's outputs and gradients against the unsharded model


def test_sizes_read_from_a_shard_enter_arithmetic_as_global_values() -> None:
    gm, _ = prepare(ShapeArithmeticBlock("scale"), (torch.randn(2, 5, 64),))
    plan = plan_tensor_parallel(gm, 2)
    assert plan.global_sizes == ["getitem_7"]  # gelu.shape[-1], the sharded MLP width; q.shape[-1] is not sharded
    code = tensor_parallel_rank(gm, plan, 0, ThreadGroup(2).comm(0)).code
    assert "pow_1 = getitem_6 ** -0.5" in code  # head dim 16 on every rank
    assert "tp_global_size_getitem_7 = getitem_7 * 2" in code  # 128 locally -> 256
    assert "pow_2 = tp_global_size_getitem_7 ** -0.5" in code  # the unsharded model's scale
    assert "tp_local_size_reshape = getitem_2 // 2" in code  # reshape(B, T, C): C = 64 -> 32 per rank


def test_sizes_used_whole_or_data_read_from_a_shard_fall_back_with_reasons() -> None:
    class WholeSizes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.proj1 = nn.Linear(64, 128), nn.Linear(128, 64)
            self.fc2, self.proj2 = nn.Linear(64, 128), nn.Linear(128, 64)
            self.fc3, self.proj3 = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc1(x)  # (B, T, 128) shard(2)
            h = h.view(h.shape[:-1] + (4, 32)).relu().flatten(2)  # one computed tuple of sizes: cannot be made local
            x = x + self.proj1(h)
            g = self.fc2(x)
            x = x + self.proj2(g * g.stride(1))  # a stride of the shard is the rank's own (64, not 128)
            return x + self.proj3(self.fc3(x).relu())  # this pair shards

    torch.manual_seed(0)
    model, x = WholeSizes(), torch.randn(2, 5, 64)
    gm, inputs = prepare(model, (x,))
    plan = plan_tensor_parallel(gm, 2)
    reasons = {f["node"]: f["reason"] for f in plan.fallbacks}
    assert "view sizes come as one computed tuple add" in reasons["fc1"]
    assert "stride computes a Python value from the sharded tensor fc2" in reasons["fc2"]
    assert plan.module_rules == {"fc3": "column", "proj3": "row"}
    check_tensor_parallel(gm, plan, inputs)
    # forced tp (strict) keeps these fallbacks (they are not divisibility), and they reach plan.fallbacks
    cm = partitioner.compile(model, devices=2, example_inputs=(x,), device_type="cpu", tensor_parallel=2)
    assert {f["what"] for f in cm.plan.fallbacks if f["path"] == "replicated"} >= {"fc1", "fc2"}
    torch.testing.assert_close(cm(x), model(x))
    cm.verify_tensor_parallel(x)


def test_a_rule_failing_without_sharded_inputs_is_recorded_and_refused_when_forced(monkeypatch) -> None:
    """The propagation's safety net: a rule that fails on a node with no sharded input (nothing to blame) leaves it
    replicated, which it is on every rank, with the reason; strict mode (forced tensor_parallel) names it instead."""

    def broken(st: object, node: fx.Node) -> None:
        raise tensor_rules._Conflict("this rule cannot analyse cumsum")

    monkeypatch.setattr(tensor_rules, "_FUNCTION_RULES", [({"cumsum"}, broken), *tensor_rules._FUNCTION_RULES])

    class CumsumMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(F.gelu(self.fc(x.cumsum(-1))))

    torch.manual_seed(0)
    model, x = CumsumMLP(), torch.randn(2, 5, 64)
    gm, inputs = prepare(model, (x,))
    plan = plan_tensor_parallel(gm, 2)
    assert plan.fallbacks == [{"node": "cumsum", "reason": "no sharding analysis: this rule cannot analyse cumsum"}]
    assert plan.module_rules == {"fc": "column", "proj": "row"}
    check_tensor_parallel(gm, plan, inputs)
    assert max_tensor_parallel(gm, 8) == 8
    with pytest.raises(ValueError, match=r"tensor parallel tp=2 \(strict\): cumsum: this rule cannot analyse cumsum"):
        plan_tensor_parallel(gm, 2, strict=True)
    with pytest.raises(ValueError, match=r"\(strict\): cumsum: this rule cannot analyse"):
        partitioner.compile(model, devices=2, example_inputs=(x,), device_type="cpu", tensor_parallel=2)
    cm = partitioner.compile(model, devices=2, example_inputs=(x,), device_type="h100")  # the search does not crash
    torch.testing.assert_close(cm(x), model(x))


def test_forced_tensor_parallelism_that_shards_nothing_is_refused() -> None:
    class NormedProjection(nn.Module):  # its only Linear feeds a LayerNorm over the Linear's (sharded) output
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.ln = nn.Linear(8, 16), nn.LayerNorm(16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.ln(self.lin(x))

    torch.manual_seed(0)
    model, x = NormedProjection(), torch.randn(3, 8)
    gm, _ = prepare(model, (x,))
    assert plan_tensor_parallel(gm, 2).sharded_nodes() == []  # unforced: a replicated plan, with the reason
    why = r"nothing in this graph can be sharded \(lin: its shard reaches ln: LayerNorm normalizes over the sharded"
    with pytest.raises(ValueError, match=rf"tensor parallel tp=2 \(strict\): {why}"):
        partitioner.compile(model, devices=2, example_inputs=(x,), device_type="cpu", tensor_parallel=2)


@pytest.mark.timeout(120)
def test_size_arithmetic_in_an_export_graph_does_not_crash_the_search() -> None:
    """HF GPT-2 (transformers 5) is captured by torch.export: `sym_size` products crashed the TP analysis."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=32, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    call = {"input_ids": torch.randint(0, 96, (2, 8)), "use_cache": False}
    cm = partitioner.compile(model, devices=2, example_kwargs=call, device_type="cpu")
    torch.testing.assert_close(cm(**call).logits, model(**call).logits)


class RandomAttention(nn.Module):
    def __init__(self, d: int, n_head: int, qkv: str, view: str, scale: str, merge: str):
        super().__init__()
        self.n_head, self.how = n_head, (qkv, view, scale, merge)
        self.ln, self.qkv, self.out = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qkv, view, scale, merge = self.how
        h = self.ln(x)
        fused = self.qkv(h)  # (B, T, 3d)
        q, k, v = fused.chunk(3, dim=-1) if qkv == "chunk" else fused.split(h.size(-1), dim=-1)
        if view == "sizes":  # t.shape[-1] is read from the shard: global, then // n_head, then divided by tp
            q, k, v = (t.view(t.size(0), t.shape[1], self.n_head, t.shape[-1] // self.n_head) for t in (q, k, v))
        else:
            q, k, v = (t.view(x.shape[0], x.shape[1], self.n_head, -1) for t in (q, k, v))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hd)
        if scale == "shape":
            q = q * q.shape[-1] ** -0.5
        elif scale == "size":
            q = q / q.size(-1)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # (B, T, nh, hd)
        if merge == "product":  # nh (sharded) x hd: a product of a global and a replicated size
            y = y.reshape(y.size(0), y.size(1), y.shape[2] * y.shape[3])
        else:
            y = y.reshape(y.shape[0], y.shape[1], -1)
        return x + self.out(y)


class RandomMLP(nn.Module):
    def __init__(self, d: int, ratio: int, flat: bool, scale: bool):
        super().__init__()
        self.flat, self.scale = flat, scale
        self.ln, self.fc, self.proj = nn.LayerNorm(d), nn.Linear(d, ratio * d), nn.Linear(ratio * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        if self.flat:
            h = h.view(h.shape[0] * h.shape[1], -1)
        h = F.gelu(self.fc(h))
        if self.scale:
            h = h * h.shape[-1] ** -0.5
        h = self.proj(h)
        if self.flat:
            h = h.view(x.size(0), x.size(1), -1)
        return x + h


@st.composite
def shape_arithmetic_blocks(draw: st.DrawFn) -> tuple[list[tuple], int, int | None]:
    """Random stacks of attention and MLP blocks (d 64) mixing sizes read from tensors, and a forced tp or None."""
    attention = st.tuples(
        st.just("attn"),
        st.sampled_from(["chunk", "split"]),
        st.sampled_from(["minus_one", "sizes"]),
        st.sampled_from(["none", "shape", "size"]),
        st.sampled_from(["minus_one", "product"]),
    )
    mlp = st.tuples(st.just("mlp"), st.sampled_from([2, 4]), st.booleans(), st.booleans())
    blocks = draw(st.lists(st.one_of(attention, mlp), min_size=1, max_size=3))
    return blocks, draw(st.sampled_from([2, 4])), draw(st.sampled_from([None, 2]))


@pytest.mark.timeout(300)
@given(shape_arithmetic_blocks())  # examples: the tests/conftest.py profile (ci: 50, deterministic)
def test_random_shape_arithmetic_blocks_compile_and_verify(case: tuple[list[tuple], int, int | None]) -> None:
    blocks, n_head, tp = case
    torch.manual_seed(0)
    model = nn.Sequential(
        *[RandomAttention(64, n_head, *b[1:]) if b[0] == "attn" else RandomMLP(64, *b[1:]) for b in blocks]
    )
    x = torch.randn(2, 3, 64)
    cm = partitioner.compile(model, devices=2, example_inputs=(x,), device_type="h100", tensor_parallel=tp)
    torch.testing.assert_close(cm(x), model(x))
    if tp is not None:  # every size here can be made local: nothing falls back
        assert cm.plan.tensor_degree == tp and not cm.tensor_parallel_plan.fallbacks, cm.tensor_parallel_plan.fallbacks
    if cm.plan.tensor_degree > 1:
        cm.verify_tensor_parallel(x)


@pytest.mark.parametrize("tp", [3, 5])
def test_seeds_tp_cannot_split_are_left_out_up_front_with_the_same_layout(monkeypatch, tp: int) -> None:
    # A degree dividing neither dim of a projection's weight (gpt3-tiny: d 64, d_ff 256) replicates it whatever role
    # propagation would give it; such seeds are left out before propagating (plan.tensor._indivisible_seeds: one
    # restart per layer otherwise). The layout must be what the propagation alone reaches, with the reason named.
    gm, _ = zoo_graph("gpt3-tiny", n_ctx=32)  # no table of 64 rows: 64 is no vocabulary (which would be padded)
    fast = plan_tensor_parallel(gm, tp)
    monkeypatch.setattr(tensor_plan_module, "_indivisible_seeds", lambda *a: {})
    slow = plan_tensor_parallel(gm, tp)
    assert fast.param_shard == slow.param_shard and fast.node_layout == slow.node_layout
    assert fast.collectives == slow.collectives
    left_out = {f["node"] for f in fast.fallbacks if f"tp={tp} divides neither dim" in f["reason"]}
    assert left_out and left_out <= {f["node"] for f in slow.fallbacks}


class HandWrittenMLP(nn.Module):
    """Projections written as matmuls with parameters: `x @ W.T` (W (out, in), as FalconLinear) and `h @ V`
    (V (in, out))."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.randn(hidden, d) / d**0.5)
        self.w_out = nn.Parameter(torch.randn(hidden, d) / hidden**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(x @ self.w_in.T) @ self.w_out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("capture_with", ["fx", "export"])
@pytest.mark.parametrize("tp", [2, 4])
def test_projections_written_as_matmuls_are_column_then_row_parallel(capture_with: str, tp: int) -> None:
    torch.manual_seed(0)
    model, x = HandWrittenMLP(), torch.randn(2, 8, 16)
    if capture_with == "fx":
        gm, inputs = prepare(model, (x,))
    else:
        cg = capture(torch.export.export(model, (x,)).module(), (x,))
        gm, inputs = cg.graph_module, cg.flatten_inputs((x,), {})
        annotate(gm, inputs, training=True)
    plan = plan_tensor_parallel(gm, tp, strict=True)
    shards = {k.rsplit(".", 1)[-1].replace("_", ""): v["dim"] for k, v in plan.param_shard.items()}
    assert shards == {"win": 0, "wout": 0}, plan.param_shard  # w_in by its output rows, w_out by its input rows
    assert sorted(plan.module_rules.values()) == ["column", "row"]
    check_tensor_parallel(gm, plan, inputs)


class HeadsNormedAttention(nn.Module):
    """Attention whose q and k are RMS-normalized over all heads before the split into heads (OLMo 2's qk-norm),
    written out as mean (or sum) of squares; `reduce` picks the statistic, `norm_reads` > 1 reads q's norm weight
    from a second node too."""

    def __init__(self, d: int, n_head: int, reduce: str = "mean", norm_reads: int = 1):
        super().__init__()
        self.n_head, self.hd, self.reduce, self.norm_reads = n_head, d // n_head, reduce, norm_reads
        self.q, self.k, self.v, self.out = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.rand(d) + 0.5)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        sq = x.pow(2)
        stat = sq.mean(-1, keepdim=True) if self.reduce == "mean" else sq.sum(-1, keepdim=True) / x.shape[-1]
        return w * (x * torch.rsqrt(stat + 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k = self._norm(self.q(x), self.q_norm), self._norm(self.k(x), self.k_norm)
        if self.norm_reads > 1:
            q = q + self.q_norm.sum() * 0  # a second reader of the whole weight
        q, k, v = (t.view(B, T, self.n_head, self.hd).transpose(1, 2) for t in (q, k, self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(B, T, C))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("tp", [2, 4])
def test_a_norm_over_all_heads_is_distributed_over_the_ranks(tp: int, reduce: str) -> None:
    """q and k RMS-normalized over all heads: each rank reduces its heads' squares, a partial all-reduced (a mean's
    sum divided by tp), and holds its slice of the norm's weight; the ranks equal the model (forward and gradients,
    the norm weights' included), with and without sequence parallelism, and the merged shards are the weights."""
    torch.manual_seed(0)
    model = nn.Sequential(HeadsNormedAttention(32, 4, reduce), HeadsNormedAttention(32, 4, reduce))
    gm, inputs = prepare(model, (torch.randn(2, 4, 32),))
    plan = plan_tensor_parallel(gm, tp)
    assert not plan.fallbacks, plan.fallbacks
    for layer in ("0", "1"):
        assert plan.param_shard[f"{layer}.q_norm"] == plan.param_shard[f"{layer}.k_norm"] == {"dim": 0, "parts": 1}
        assert plan.param_shard[f"{layer}.q.weight"] == {"dim": 0, "parts": 1}
    assert sorted(plan.module_rules.values()).count(f"reduce_{reduce}") == 4
    check_tensor_parallel_plan(gm, plan)
    report = check_tensor_parallel(gm, plan, inputs)
    assert {"0.q_norm", "1.k_norm"} <= set(report.sharded_params)
    check_tensor_parallel(gm, plan_tensor_parallel(gm, tp, sequence_parallel=True), inputs)
    full = dict(gm.named_parameters())
    merged = merge_shards(plan, [{k: shard_of(plan, k, v, r) for k, v in full.items()} for r in range(tp)])
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    # per layer: the attention's forward all-reduce and one per normalized projection (its statistic: B x T values)
    counts = count_collectives(tensor_parallel_rank(gm, plan, 0, ThreadGroup(tp).comm(0)))
    assert counts["all_reduce_forward"] == 2 * (1 + 2)


def test_a_norm_weight_read_elsewhere_too_is_not_sharded() -> None:
    """A norm weight with a second reader (of the whole weight) stays replicated: the projection it scales falls back,
    named (and with it the attention, which needs q, k and v sharded alike), and the ranks still equal the model. A
    max over the sharded dim is no partial sum either."""
    torch.manual_seed(0)
    gm, inputs = prepare(HeadsNormedAttention(32, 4, norm_reads=2), (torch.randn(2, 4, 32),))
    plan = plan_tensor_parallel(gm, 2)
    assert plan.param_shard["q_norm"]["dim"] is None and plan.param_shard["q.weight"]["dim"] is None
    assert any("q_norm" in f["reason"] for f in plan.fallbacks), plan.fallbacks
    assert plan.param_shard["out.weight"]["dim"] is None
    check_tensor_parallel(gm, plan, inputs)

    class MaxOverFeatures(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.proj(h / h.amax(-1, keepdim=True))

    gm, inputs = prepare(MaxOverFeatures(), (torch.randn(2, 3, 16),))
    plan = plan_tensor_parallel(gm, 2)
    assert plan.param_shard["fc.weight"]["dim"] is None
    assert any("amax over the sharded dim" in f["reason"] for f in plan.fallbacks), plan.fallbacks


def test_a_forced_degree_leaves_a_single_output_gate_replicated() -> None:
    """A gate with one output (Qwen2-MoE's shared_expert_gate, Linear(h, 1)) is no head or hidden size: a forced tp
    (strict) keeps it replicated, named, and shards the MLP it gates, rather than refusing the degree."""

    class GatedMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.proj, self.gate = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.sigmoid(self.gate(x)) * self.proj(F.gelu(self.fc(x)))

    torch.manual_seed(0)
    gm, inputs = prepare(GatedMLP(), (torch.randn(2, 3, 16),))
    for tp in (2, 4):
        plan = plan_tensor_parallel(gm, tp, strict=True)
        assert plan.module_rules["fc"] == "column" and plan.module_rules["proj"] == "row"
        assert [f["node"] for f in plan.fallbacks] == ["gate"]
        assert f"out_features=1 is fewer than tp={tp}" in plan.fallbacks[0]["reason"]
        check_tensor_parallel(gm, plan, inputs)


class ParallelBlock(nn.Module):
    """Two MLPs reading x in parallel, their outputs summed, scaled by a replicated gate that needs a gradient and
    viewed before the residual (Falcon's and GPT-J's parallel attention and MLP, a mixture of experts' weighting)."""

    def __init__(self, d: int, bias: bool):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d)
        self.proj1, self.proj2 = nn.Linear(2 * d, d, bias=bias), nn.Linear(2 * d, d, bias=bias)
        self.gate = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj1(F.gelu(self.fc1(x))) + self.proj2(F.gelu(self.fc2(x)))
        y = (y * torch.sigmoid(self.gate(x))).reshape(-1, x.shape[-1])
        return x + y.view(x.shape)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tp", [2, 4])
def test_partial_sums_are_all_reduced_once_where_their_linear_readers_end(tp: int, bias: bool) -> None:
    """Row-parallel outputs without a bias, summed, scaled and viewed, stay partial sums: one all-reduce per block,
    after the last op linear in them (before the residual add), not one per projection; the gate's gradient, partial
    on each rank, is all-reduced (f). With biases (added once, after an all-reduce) each projection is reduced alone.
    The ranks equal the model, forward and gradients, with and without sequence parallelism."""
    torch.manual_seed(0)
    gm, inputs = prepare(nn.Sequential(ParallelBlock(16, bias), ParallelBlock(16, bias)), (torch.randn(2, 4, 16),))
    plan = plan_tensor_parallel(gm, tp)
    assert {plan.module_rules[f"_{b}_proj{i}"] for b in (0, 1) for i in (1, 2)} == {"row"}
    forward = [c for c in plan.collectives if c["kind"] == "all_reduce" and c["phase"] == "forward"]
    assert len(forward) == (4 if bias else 2), forward
    check_tensor_parallel(gm, plan, inputs)
    check_tensor_parallel(gm, plan_tensor_parallel(gm, tp, sequence_parallel=True), inputs)
    counts = count_collectives(tensor_parallel_rank(gm, plan, 0, ThreadGroup(tp).comm(0)))
    assert counts["all_reduce_forward"] == len(forward)


def test_products_of_partial_sums_are_all_reduced_first() -> None:
    """A partial sum squared, or times another partial sum, is no linear op of it: each is all-reduced before the
    product (the ranks equal the model)."""

    class Products(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.ModuleList(nn.Linear(8, 16) for _ in range(3))
            self.proj = nn.ModuleList(nn.Linear(16, 8, bias=False) for _ in range(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b, c = (proj(F.gelu(fc(x))) for fc, proj in zip(self.fc, self.proj, strict=True))
            return x + a * a + b * c

    torch.manual_seed(0)
    gm, inputs = prepare(Products(), (torch.randn(2, 3, 8),))
    plan = plan_tensor_parallel(gm, 2)
    forward = {c["after"] for c in plan.collectives if c["kind"] == "all_reduce" and c["phase"] == "forward"}
    assert {plan.module_rules[n] for n in forward} == {"row"} and len(forward) == 3, forward
    check_tensor_parallel(gm, plan, inputs)


def test_a_layer_called_twice_sums_its_split_gradients_once_under_sequence_parallelism() -> None:
    """ALBERT shares one layer across its depth. Under sequence parallelism the row bias's gradient holds each rank's
    tokens of both calls and is summed over the ranks once per step, not once per call (which made it tp times too
    large in the in-process runtime: ALBERT's attention bias 2x at tp 2, 4x at tp 4). The norm runs on the whole
    (replicated) input in its first call and on split tokens in its second: only the second call's share is summed,
    in the graph (summing the whole step's gradient counted the first call tp times)."""

    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc, self.proj = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

        def block(self, x: torch.Tensor) -> torch.Tensor:
            return x + self.proj(F.gelu(self.fc(self.norm(x))))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(self.block(x))

    torch.manual_seed(0)
    gm, inputs = prepare(Shared(), (torch.randn(2, 4, 16),))
    for tp in (2, 4):
        plan = plan_tensor_parallel(gm, tp, sequence_parallel=True)
        steps = [p for c in plan.collectives if c["phase"] == "step" for p in c["params"]]
        assert steps == ["proj.bias", "proj.bias"] and plan.step_summed_params() == ["proj.bias"]
        in_graph = [p for c in plan.collectives if c["phase"] == "backward" for p in c.get("params", ())]
        assert in_graph == ["norm.weight", "norm.bias"]
        check_tensor_parallel(gm, plan, inputs)
