"""Tensor parallelism: sharding propagation (plan.tensor), the rewrite (passes.tensor_parallel) and the in-process
check (runtime.tp_local), on the zoo's GPT-3 / BERT / RoBERTa tiny and on nanoGPT-style attention (fused c_attn +
split, `C // self.n_head` views, `-1` views, explicit softmax attention, loss inside the graph).

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
def test_vocab_that_tp_does_not_divide_falls_back_even_when_strict() -> None:
    gm, inputs = zoo_graph("gpt3-tiny", vocab_size=510)
    plan = plan_tensor_parallel(gm, 4, strict=True)
    reasons = {f["node"]: f["reason"] for f in plan.fallbacks}
    assert "num_embeddings=510 is not divisible by tp=4" in reasons["wte"]
    assert plan.param_shard["wte.weight"]["dim"] is None and plan.module_rules["h_0_attn_q_proj"] == "column"
    assert not any(c["kind"] == "all_gather" for c in plan.collectives)
    check_tensor_parallel(gm, plan, inputs)


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
    ar = spec.link_latency + 2 * 3 / 4 * act / spec.link_bandwidth
    gather = spec.link_latency + 3 / 4 * (2 * 8 * 512 * 4) / spec.link_bandwidth
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
