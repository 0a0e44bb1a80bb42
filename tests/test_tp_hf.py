"""Tensor parallelism on HuggingFace models, captured by torch.export as ATen graphs (issue #16).

The sharding rules see `aten.linear` / `aten.addmm` (GPT-2's Conv1D) / `aten.embedding` on parameters read by
get_attr, ATen views, expands (GQA's repeat_kv), rotary slices and cats, and SDPA. For each family (small configs,
no downloads, dropout 0): every projection of every attention and MLP, and the LM head, is sharded (or the test
names why not), and all tp ranks run in one process (runtime.tp_local) give the model's outputs on every rank and
its gradients for every parameter (sharded ones reassembled), fp32 at 1e-5.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.fx as fx
from torch import nn

import partitioner
from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.cost import gemm_rows, matmul_form
from partitioner.passes.tensor_parallel import count_collectives, merge_shards, shard_of, tensor_parallel_rank
from partitioner.plan.tensor import check_tensor_parallel_plan, plan_tensor_parallel
from partitioner.plan.tensor_layout import TensorParallelPlan
from partitioner.plan.tensor_ops import weight_op
from partitioner.runtime.tp_local import ThreadGroup, check_tensor_parallel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers
VOCAB = 96


def _text() -> dict[str, Any]:
    return {"input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))}


def _padded_text() -> dict[str, Any]:
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {**_text(), "attention_mask": mask}


NO_CACHE = {"use_cache": False}
FAMILIES: dict[str, Callable[[int], tuple[nn.Module, dict[str, Any]]]] = {
    "gpt2": lambda n: (T.GPT2LMHeadModel(T.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=n, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **NO_CACHE)), _text()),
    "llama": lambda n: (T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, **NO_CACHE)), _padded_text()),
    "mistral": lambda n: (T.MistralForCausalLM(T.MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, **NO_CACHE)), _text()),
    "qwen2": lambda n: (T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, **NO_CACHE)), _text()),
    "gpt_neox": lambda n: (T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        hidden_dropout=0.0, attention_dropout=0.0, **NO_CACHE)), _text()),
    "opt": lambda n: (T.OPTForCausalLM(T.OPTConfig(
        vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=n, num_attention_heads=4,
        word_embed_proj_dim=64, max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, **NO_CACHE)),
        _text()),
    "bloom": lambda n: (T.BloomForCausalLM(T.BloomConfig(
        vocab_size=VOCAB, hidden_size=64, n_layer=n, n_head=4, hidden_dropout=0.0, attention_dropout=0.0,
        **NO_CACHE)), _padded_text()),
    "bert": lambda n: (T.BertModel(T.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), _padded_text()),
    "roberta": lambda n: (T.RobertaModel(T.RobertaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), _text()),
    "t5": lambda n: (T.T5Model(T.T5Config(
        vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=n, num_heads=4, dropout_rate=0.0, **NO_CACHE)),
        {**_text(), "decoder_input_ids": torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))}),
    # Falcon writes its projections as x @ W.T (FalconLinear), its multi-query K and V fused with Q in one weight
    "falcon": lambda n: (T.FalconForCausalLM(T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n, num_attention_heads=4, multi_query=True, bias=False,
        alibi=False, parallel_attn=True, hidden_dropout=0.0, attention_dropout=0.0, **NO_CACHE)), _text()),
    # GPTBigCode (StarCoder, SantaCoder) multi-query: c_attn(x).split((embed, 2 * head_dim), dim=2)
    "gpt_bigcode": lambda n: (T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=n, n_head=4, n_positions=32, multi_query=True, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, **NO_CACHE)), _text()),
    # Falcon's new decoder architecture: grouped-query, QKV fused per kv group (q heads of a group, then its k, v)
    "falcon_gqa": lambda n: (T.FalconForCausalLM(T.FalconConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=n, num_attention_heads=4, num_kv_heads=2,
        new_decoder_architecture=True, multi_query=False, bias=False, alibi=False, hidden_dropout=0.0,
        attention_dropout=0.0, **NO_CACHE)), _text()),
    # interleaved rotary embeddings (`rotate_every_two`: stack((-x2, x1), -1) on the head dim); parallel attention
    # and MLP, GPT-J's with biases, Cohere's without (their partial sums then all-reduced once)
    "gptj": lambda n: (T.GPTJForCausalLM(T.GPTJConfig(
        vocab_size=VOCAB, n_embd=64, n_layer=n, n_head=4, rotary_dim=8, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0, **NO_CACHE)), _text()),
    "cohere": lambda n: (T.CohereForCausalLM(T.CohereConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, **NO_CACHE)), _text()),
    # MPT: an ALiBi bias per head, computed from constants for the input's length, read as each rank's heads
    "mpt": lambda n: (T.MptForCausalLM(T.MptConfig(
        vocab_size=VOCAB, d_model=64, n_layers=n, n_heads=4, max_seq_len=32, **NO_CACHE)), _text()),
    # Gemma 3: per-head qk-norm cast back with `type_as` on the sharded q (a dtype argument, the same on every rank)
    "gemma3": lambda n: (T.Gemma3ForCausalLM(T.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=4, **NO_CACHE)), _text()),
    # OLMo 2: RMSNorm of q and k over all heads (its qk-norm): distributed over the ranks' heads
    "olmo2": lambda n: (T.Olmo2ForCausalLM(T.Olmo2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0, **NO_CACHE)), _text()),
    "vit": lambda n: (T.ViTModel(T.ViTConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4, image_size=32,
        patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)),
        {"pixel_values": torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))}),
}  # fmt: skip

# Mixtures of experts (transformers 5: experts as 3-D parameters, grouped products over the tokens sorted by expert)
MOE_FAMILIES: dict[str, Callable[[int], tuple[nn.Module, dict[str, Any]]]] = {
    "mixtral": lambda n: (T.MixtralForCausalLM(T.MixtralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=n, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, **NO_CACHE)), _text()),
    # multi-head latent attention (low-rank q and kv, each RMS-normalized between its two projections) and experts
    "deepseek_v3": lambda n: (T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=n,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, n_group=1, topk_group=1, **NO_CACHE)), _text()),
    "qwen2_moe": lambda n: (T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, **NO_CACHE)), _text()),
}  # fmt: skip


def hf_graph(family: str, layers: int = 1, labels: bool = False) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """The annotated export graph of a small seeded HF model and its inputs: a copy of each test's own (export takes
    seconds per model, and several tests read the same one)."""
    gm, inputs = _hf_graph(family, layers, labels, VOCAB)  # VOCAB: a test may set another
    return copy.deepcopy(gm), list(inputs)


@functools.cache
def _hf_graph(family: str, layers: int, labels: bool, vocab: int) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    torch.manual_seed(0)
    model, call = {**FAMILIES, **MOE_FAMILIES}[family](layers)
    if labels:  # the loss inside the graph: HF shifts the labels and calls cross_entropy
        call = {**call, "labels": call["input_ids"]}
    model.eval()
    cg = capture(model, (), call)
    assert cg.method == "export"
    inputs = cg.flatten_inputs((), call)
    annotate(cg.graph_module, inputs, training=True)
    return cg.graph_module, inputs


# (family, tp) where some projections stay replicated, each named (test below): grouped-query QKV fused per group when
# tp does not divide the groups
PARTLY_SHARDED = {("falcon_gqa", 4)}


def linear_weights(gm: fx.GraphModule) -> set[str]:
    """The parameters read as the weight of a linear-like op (aten.linear / addmm / mm)."""
    ops = [weight_op(gm, n) for n in gm.graph.nodes]
    return {op.param for op in ops if op is not None and op.kind != "embedding"}


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    "family, tp",
    [(f, 2) for f in FAMILIES if (f, 2) not in PARTLY_SHARDED]
    + [("gpt2", 4), ("gpt_neox", 4), ("bert", 4), ("bloom", 4), ("falcon", 4), ("gpt_bigcode", 4)],
)
def test_every_projection_is_sharded_and_the_ranks_equal_the_model(family: str, tp: int) -> None:
    gm, inputs = hf_graph(family)
    plan = plan_tensor_parallel(gm, tp)
    weights = linear_weights(gm)
    replicated = sorted(w for w in weights if plan.param_shard[w]["dim"] is None)
    assert weights and not replicated, (replicated, plan.fallbacks)
    report = check_tensor_parallel(gm, plan, inputs)
    assert set(report.sharded_params) >= weights


@pytest.mark.timeout(300)
def test_a_tied_lm_head_and_its_embedding_share_one_vocab_shard() -> None:
    """GPT-2 ties wte to lm_head; export reads the tied weight under one name (lm_head.weight) for both."""
    gm, inputs = hf_graph("gpt2")
    plan = plan_tensor_parallel(gm, 2)
    assert plan.param_shard["lm_head.weight"] == plan.param_shard["transformer.wte.weight"] == {"dim": 0, "parts": 1}
    assert "vocab_embedding" in plan.module_rules.values()
    check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(300)
def test_gpt2_conv1d_fused_qkv_is_sharded_as_three_blocks() -> None:
    """c_attn is addmm(b, x, W) with W (in, 3C): its columns (dim 1) are cut as q|k|v blocks, one per split piece."""
    gm, _ = hf_graph("gpt2")
    plan = plan_tensor_parallel(gm, 2)
    assert plan.param_shard["transformer.h.0.attn.c_attn.weight"] == {"dim": 1, "parts": 3}
    assert plan.param_shard["transformer.h.0.attn.c_attn.bias"] == {"dim": 0, "parts": 3}
    assert plan.param_shard["transformer.h.0.attn.c_proj.weight"] == {"dim": 0, "parts": 1}  # rows of (in, out)
    assert plan.param_shard["transformer.h.0.attn.c_proj.bias"] == {"dim": None, "parts": 1}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_megatron_collective_counts_per_layer(family: str) -> None:
    """A second layer adds Megatron's 2 all-reduces forward (attention out, MLP down) and 2 backward (f in front
    of q/k/v and of the MLP's first projections): counted on the rank graphs of 1 and 2 layers."""
    counts = []
    for layers in (1, 2):
        gm, _ = hf_graph(family, layers)
        plan = plan_tensor_parallel(gm, 2)
        counts.append(count_collectives(tensor_parallel_rank(gm, plan, 0, ThreadGroup(2).comm(0))))
    added = {k: counts[1][k] - counts[0].get(k, 0) for k in counts[1]}
    assert added == {"all_reduce_forward": 2, "all_reduce_backward": 2, "all_gather_forward": 0,
                     "vocab_cross_entropy": 0}  # fmt: skip


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_kv_heads_that_tp_does_not_divide_stay_whole_and_each_rank_reads_its_slice(family: str) -> None:
    """2 kv heads at tp=4 (Megatron's rule for tp > kv heads): k/v projections replicated with the reason named,
    q / o / MLP sharded; after repeat_kv each rank reads its q heads' slice of k and v (a scatter: no forward
    communication, the slices' gradients all-gathered backward)."""
    gm, inputs = hf_graph(family)
    plan = plan_tensor_parallel(gm, 4)
    shard = {p: s["dim"] for p, s in plan.param_shard.items()}
    layer = "model.layers.0"
    assert shard[f"{layer}.self_attn.q_proj.weight"] == 0 and shard[f"{layer}.self_attn.o_proj.weight"] == 1
    assert shard[f"{layer}.mlp.up_proj.weight"] == 0
    assert shard[f"{layer}.self_attn.k_proj.weight"] is None and shard[f"{layer}.self_attn.v_proj.weight"] is None
    whole = [f for f in plan.fallbacks if f["reason"].startswith("kept whole, attention reads each rank's slice")]
    assert len(whole) == 2 and all("=2 is not divisible by tp=4" in f["reason"] for f in whole)  # k and v
    scatters = [c for c in plan.collectives if c["kind"] == "scatter"]
    assert len(scatters) == 2 and all(c["dim"] == 1 for c in scatters)  # k and v, on the head dim
    check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(300)
def test_t5_relative_position_bias_is_read_per_head() -> None:
    """T5 adds a per-head position bias (B, heads, T, T) to the attention mask: each rank reads its heads' slice."""
    gm, inputs = hf_graph("t5")
    plan = plan_tensor_parallel(gm, 2)
    assert any(c["kind"] == "scatter" for c in plan.collectives)
    check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family, reduce_scatters", [("llama", 2), ("gpt2", 1)])
def test_sequence_parallelism_on_export_graphs(family: str, reduce_scatters: int) -> None:
    """Megatron-SP on ATen graphs: reduce-scatters replace the all-reduces, norms run on 1/tp of the tokens (their
    weights' gradients summed), and the ranks still equal the model; a saved layout type-checks against the graph.
    Llama: attention out and MLP down. GPT-2's Conv1D multiplies flattened (B*T, C) rows, whose split is not the
    stream's sequence split: its row outputs keep their all-reduce; the vocab-parallel embedding's is split."""
    gm, inputs = hf_graph(family)
    plan = plan_tensor_parallel(gm, 2, sequence_parallel=True)
    kinds = [c["kind"] for c in plan.collectives if c["phase"] == "forward"]
    assert kinds.count("reduce_scatter") == reduce_scatters
    assert any(v.startswith("seq") for v in plan.node_layout.values())
    check_tensor_parallel_plan(gm, plan)
    check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(300)
def test_forced_tensor_parallelism_on_an_hf_model_shards_and_verifies() -> None:
    torch.manual_seed(0)
    model, call = FAMILIES["gpt2"](2)
    cm = partitioner.compile(model, devices=2, example_kwargs=call, device_type="cpu", tensor_parallel=2)
    assert cm.plan.tensor_degree == 2
    sharded = {p for p, s in cm.tensor_parallel_plan.param_shard.items() if s["dim"] is not None}
    assert {"transformer.h.1.mlp.c_fc.weight", "transformer.h.1.attn.c_attn.weight", "lm_head.weight"} <= sharded
    torch.testing.assert_close(cm(**call).logits, model(**call).logits)
    report = cm.verify_tensor_parallel(**call)
    assert report.sharded_params


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loss_in_the_graph_uses_vocab_parallel_cross_entropy(family: str) -> None:
    """With labels, HF computes the loss in the graph (ATen cross_entropy_loss on the flattened logits): the LM
    head stays column-parallel and the loss is Megatron's vocab-parallel cross-entropy (3 small all-reduces)."""
    gm, inputs = hf_graph(family, labels=True)
    plan = plan_tensor_parallel(gm, 2)
    assert plan.param_shard["lm_head.weight"]["dim"] == 0
    assert "vocab_cross_entropy" in plan.module_rules.values()
    check_tensor_parallel(gm, plan, inputs, loss_fn=lambda out: out[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("labels", [False, True])
def test_a_vocabulary_tp_does_not_divide_is_padded(tp: int, labels: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """GPT-2 with 97 tokens (prime): its tied wte / lm_head get -97 % tp padding rows (Megatron pads the same way);
    the padding never wins the softmax (vocab-parallel cross-entropy masks it), gets no gradient, and is dropped
    from the gathered logits and from merged checkpoints."""
    monkeypatch.setitem(globals(), "VOCAB", 97)
    gm, inputs = hf_graph("gpt2", labels=labels)
    plan = plan_tensor_parallel(gm, tp, strict=True)
    pad = -97 % tp
    assert plan.param_shard["lm_head.weight"] == plan.param_shard["transformer.wte.weight"]
    assert plan.param_shard["lm_head.weight"] == {"dim": 0, "parts": 1, "pad": pad}
    check_tensor_parallel_plan(gm, plan)
    check_tensor_parallel(gm, plan, inputs, loss_fn=(lambda out: out[0]) if labels else None)
    full = dict(gm.named_parameters())
    shards = [{k: shard_of(plan, k, v, r) for k, v in full.items()} for r in range(tp)]
    assert shards[-1]["transformer.wte.weight"].shape[0] == (97 + pad) // tp  # tied: one tensor, two names
    merged = merge_shards(plan, shards)
    assert all(torch.equal(merged[k], v) for k, v in full.items())


@pytest.mark.timeout(300)
def test_forcing_tp_past_the_kv_heads_keeps_them_whole_but_past_the_q_heads_is_refused() -> None:
    """strict (a forced degree): Llama's 2 kv heads at tp=4 fall back as Megatron does (k/v whole, sliced per rank);
    its 4 q heads at tp=8 cannot be, and the error names the view."""
    gm, inputs = hf_graph("llama")
    plan = plan_tensor_parallel(gm, 4, strict=True)
    assert plan.param_shard["model.layers.0.self_attn.q_proj.weight"]["dim"] == 0
    assert plan.param_shard["model.layers.0.self_attn.k_proj.weight"]["dim"] is None
    check_tensor_parallel(gm, plan, inputs)
    with pytest.raises(ValueError, match=r"tp=8 \(strict\): .*view dim 2=4 is not divisible by tp=8"):
        plan_tensor_parallel(gm, 8, strict=True)


@pytest.mark.timeout(300)
def test_bloom_alibi_is_read_per_head_of_every_batch_row() -> None:
    """BLOOM computes attention on (batch x heads) flattened: q / k / v are sharded as `batch` blocks of heads, and
    its ALiBi bias (batch x heads, 1, T), added by baddbmm, is read as each rank's heads of every block."""
    gm, inputs = hf_graph("bloom")
    plan = plan_tensor_parallel(gm, 2)
    scatters = [c for c in plan.collectives if c["kind"] == "scatter"]
    assert scatters and all(c["parts"] == 2 and c["dim"] == 0 for c in scatters)  # 2 batch rows
    check_tensor_parallel_plan(gm, plan)
    check_tensor_parallel(gm, plan, inputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family, tp", sorted(PARTLY_SHARDED))
def test_projections_written_as_matmuls_are_found_and_each_replicated_one_is_named(family: str, tp: int) -> None:
    """Falcon's `x @ W.T` projections are weight ops like F.linear (tensor_ops.weight_op): its MLP is column then row
    parallel (its output added in place to the attention's, which stays whole, is all-reduced first); a grouped QKV
    fused per group that tp cannot split by whole groups (fewer groups than ranks), and so the attention's dense
    projection, stay replicated with a fallback naming each weight (not yet sharded: issue #16); the ranks equal the
    model."""
    gm, inputs = hf_graph(family)
    plan = plan_tensor_parallel(gm, tp)
    weights = linear_weights(gm)
    assert len(weights) == 5  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h, and the LM head
    replicated = {w for w in weights if plan.param_shard[w]["dim"] is None}
    named = {w for w in replicated if any(w in f["reason"] for f in plan.fallbacks)}
    assert named == replicated, (replicated, plan.fallbacks)
    assert not {w for w in replicated if ".mlp." in w}, plan.fallbacks
    check_tensor_parallel(gm, plan, inputs)


def _transformers_before(version: tuple[int, int]) -> bool:
    import transformers

    major, minor = (int(v) for v in transformers.__version__.split(".")[:2])
    return (major, minor) < version


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family, qkv, tp", [("falcon", "self_attention.query_key_value", 2),
                                             ("falcon", "self_attention.query_key_value", 4),
                                             ("gpt_bigcode", "attn.c_attn", 2)])  # fmt: skip
def test_multi_query_fused_qkv_shards_the_q_heads_and_keeps_k_and_v_whole(family: str, qkv: str, tp: int) -> None:
    """A multi-query q | k | v in one weight (4 q heads, then one k and one v head of 16): each rank holds its q heads'
    rows and the k, v rows whole (`"whole": 32`, Megatron's rule for kv heads tp does not split, applied inside the
    fused weight); Falcon's view (B, T, 4 + 2, 16) becomes (B, T, 4 / tp + 2, 16), GPTBigCode's split sizes
    (64, 32) become (64 / tp, 32). The ranks equal the model, with and without
    sequence parallelism, and the merged shards are the model's weights."""
    gm, inputs = hf_graph(family)
    name = next(p for p, _ in gm.named_parameters() if p.endswith(f"{qkv}.weight"))
    spec = {"dim": 0, "parts": 1, "whole": 32}
    plan = plan_tensor_parallel(gm, tp)
    assert plan.param_shard[name] == spec and not plan.fallbacks or all("wpe" in f["reason"] for f in plan.fallbacks)
    assert set(plan.local_shares.values()) == {(64 / tp + 32) / 96}
    check_tensor_parallel_plan(gm, TensorParallelPlan.from_json(plan.to_json()))
    check_tensor_parallel(gm, plan, inputs)
    full = dict(gm.named_parameters())
    shards = [{k: shard_of(plan, k, v, r) for k, v in full.items()} for r in range(tp)]
    assert shards[1][name].shape[0] == 64 // tp + 32
    torch.testing.assert_close(shards[1][name][64 // tp :], full[name][64:], rtol=0, atol=0)  # k, v whole
    merged = merge_shards(plan, shards)
    assert all(torch.equal(merged[k], v) for k, v in full.items())
    counts = []
    for layers in (1, 2):
        g, _ = hf_graph(family, layers)
        counts.append(
            count_collectives(tensor_parallel_rank(g, plan_tensor_parallel(g, tp), 0, ThreadGroup(tp).comm(0)))
        )
    # Falcon's attention and MLP run in parallel, their row-parallel outputs summed before one all-reduce (no bias:
    # the partial sums add up, tensor_rules._partial_through); GPTBigCode's are Megatron's two
    assert counts[1]["all_reduce_forward"] - counts[0]["all_reduce_forward"] == (1 if family == "falcon" else 2)
    # Falcon: one f for its attention and MLP (they read one layer norm in parallel); before transformers 5.25 one more
    # each for k and v, which its attention broadcast over the heads (`torch.broadcast_to`), from 5.25 none: it splits
    # q | k | v and expands k and v with Llama's repeat_kv, read as each rank's slice (scattered forward,
    # all-gathered backward, not all-reduced). GPTBigCode: Megatron's two, its k and v read so too.
    if family == "falcon":
        expected = 3 if _transformers_before((5, 25)) else 1
    else:
        expected = 2
    assert counts[1]["all_reduce_backward"] - counts[0]["all_reduce_backward"] == expected
    if family == "falcon":
        sp = plan_tensor_parallel(gm, tp, sequence_parallel=True)
        assert sp.param_shard[name] == spec
        check_tensor_parallel(gm, sp, inputs)


@pytest.mark.timeout(300)
def test_a_saved_layout_that_keeps_another_tail_whole_is_refused() -> None:
    gm, _ = hf_graph("falcon")
    plan = plan_tensor_parallel(gm, 2)
    name = "transformer.h.0.self_attention.query_key_value.weight"
    edited = TensorParallelPlan.from_json(plan.to_json())
    edited.param_shard[name] = {"dim": 0, "parts": 1, "whole": 16}
    with pytest.raises(ValueError, match=r"view dim 2's 6 - 1 kept whole=5 is not divisible by tp=2"):
        check_tensor_parallel_plan(gm, edited)


def _expert_widths(gm: fx.GraphModule) -> set[int]:
    return {p.shape[2] for k, p in gm.named_parameters() if k.endswith("experts.down_proj")}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", sorted(set(MOE_FAMILIES) - {"deepseek_v3"}))
def test_experts_are_sharded_like_a_megatron_mlp(family: str) -> None:
    """Expert tensor parallelism: each expert's fused gate | up matrix column-parallel (its two blocks cut alike, as
    `chunk(2)` reads them), its down matrix row-parallel, the grouped product's partial sum all-reduced right after;
    the routers (softmax over the experts) and Qwen2-MoE's single-output shared-expert gate stay replicated.
    The ranks equal the model, forward and gradients, with and without sequence parallelism, at tp 2 and 4 (forced)."""
    gm, inputs = hf_graph(family)
    for tp in (2, 4):
        plan = plan_tensor_parallel(gm, tp, strict=True)
        experts = {k: v for k, v in plan.param_shard.items() if ".experts." in k}
        assert experts and all(
            v == ({"dim": 1, "parts": 2} if k.endswith("gate_up_proj") else {"dim": 2, "parts": 1})
            for k, v in experts.items()
        ), experts
        grouped = [n for n in gm.graph.nodes if weight_op(gm, n) is not None and weight_op(gm, n).kind == "grouped"]
        assert {plan.module_rules[n.name] for n in grouped} == {"column", "row"}
        # priced as GEMMs of their own rows (alignment): (K, N) = (hidden, 2 x expert width), (expert width, hidden)
        widths = {(gemm_rows(n), matmul_form(n)) for n in grouped}
        assert {w for w, form in widths if form == "grouped"} == {(64, 2 * n) for n in _expert_widths(gm)} | {
            (n, 64) for n in _expert_widths(gm)
        }
        replicated = {k for k in linear_weights(gm) if plan.param_shard[k]["dim"] is None}
        kept = ("mlp.gate.weight", "shared_expert_gate.weight") + (("k_proj.weight", "v_proj.weight") if tp > 2 else ())
        assert all(k.endswith(kept) for k in replicated), replicated  # 2 kv heads: whole above tp 2 (Megatron)
        check_tensor_parallel(gm, plan, inputs)
    check_tensor_parallel(gm, plan_tensor_parallel(gm, 2, sequence_parallel=True), inputs)
    full = dict(gm.named_parameters())
    merged = merge_shards(plan, [{k: shard_of(plan, k, v, r) for k, v in full.items()} for r in range(4)])
    assert all(torch.equal(merged[k], v) for k, v in full.items())


@pytest.mark.timeout(300)
def test_latent_attention_keeps_its_low_rank_projections_whole() -> None:
    """DeepSeek-V3's multi-head latent attention: q and kv go through low-rank latents RMS-normalized between two
    projections. Sharding the first (with its norm distributed) would make the second row-parallel and leave the heads
    whole; the first stays replicated, named, q's second projection is column-parallel on the heads, o_proj
    row-parallel, the experts split. Its key is made by `new_empty` and in-place copies into slices, then read as each
    rank's heads: that slice is taken where the attention reads it, after the copies (it was taken before them, from
    memory `new_empty` had not initialized). The ranks equal the model, forward and gradients."""
    gm, inputs = hf_graph("deepseek_v3")
    plan = plan_tensor_parallel(gm, 2)
    shard = {k.removeprefix("model.layers.0."): v["dim"] for k, v in plan.param_shard.items()}
    assert shard["self_attn.q_a_proj.weight"] is None and shard["self_attn.kv_a_proj_with_mqa.weight"] is None
    assert (shard["self_attn.q_b_proj.weight"], shard["self_attn.o_proj.weight"]) == (0, 1)
    assert (shard["mlp.experts.gate_up_proj"], shard["mlp.experts.down_proj"]) == (1, 2)
    reasons = " ".join(f["reason"] for f in plan.fallbacks)
    assert "q_a_proj" in reasons and "normalized over the sharded dim" in reasons
    check_tensor_parallel(gm, plan, inputs)
