"""zoo.llama: the architecture is HF transformers' LlamaForCausalLM (same logits from the same weights), and the
planner's passes run it exactly: tensor parallelism with the kv heads sharded (tp 2) or kept whole and sliced per
rank (tp 4 > 2 kv heads, Megatron's rule, on an fx graph), context parallelism, a pipeline."""

from __future__ import annotations

import pytest
import torch

import partitioner
import zoo
from zoo.llama import Llama, LlamaConfig, rotary_angles


def _tiny() -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return zoo.get("llama-tiny"), zoo.example_inputs("llama-tiny", batch=4, seq=16)


def test_logits_equal_hf_llama_with_its_weights() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = LlamaConfig(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=96, vocab_size=128, n_ctx=32,
                      rope_theta=500000.0, norm_eps=1e-6)  # fmt: skip
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=128, max_position_embeddings=32, rms_norm_eps=1e-6, rope_theta=500000.0, use_cache=False,
        tie_word_embeddings=False, attn_implementation="eager",
    )).eval()  # fmt: skip
    ours = Llama(cfg).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=True)
    idx = torch.randint(0, 128, (2, 20))
    torch.testing.assert_close(ours(idx), hf(idx).logits)


def test_rotary_angles_turn_pair_i_of_position_p_by_p_over_theta_to_the_2i_over_hd() -> None:
    cfg = LlamaConfig(n_layer=1, d_model=16, n_head=2, d_ff=8, vocab_size=8, n_ctx=8, rope_theta=100.0)
    cos, sin = rotary_angles(cfg, 5, torch.device("cpu"))
    assert cos.shape == (5, 8) and cos.dtype == torch.float32
    angle = 3 / 100.0 ** (2 * 1 / 8)  # position 3, pair 1 of head dim 8
    assert float(torch.atan2(sin[3, 1], cos[3, 1])) == pytest.approx(angle)
    torch.testing.assert_close(cos[:, :4], cos[:, 4:])  # laid out twice (rotate_half)


def test_config_errors_name_the_sizes() -> None:
    with pytest.raises(ValueError, match="n_head=4 is not a multiple of n_kv_head=3"):
        LlamaConfig(d_model=64, n_head=4, n_kv_head=3)
    with pytest.raises(ValueError, match="heads of an even size"):
        LlamaConfig(d_model=12, n_head=4)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_every_projection_and_equals_the_model(tp: int) -> None:
    """4 query heads over 2 kv heads (SDPA's enable_gqa): at tp 2 each rank holds one kv head; at tp 4 two ranks share
    each kv head, read from the replicated k / v (repeated, then sliced)."""
    model, x = _tiny()
    cm = partitioner.compile(model, tp, x, tensor_parallel=tp, pipeline=1)
    report = cm.verify_tensor_parallel(*x)  # forward and gradients against the unsharded model (raises if not)
    layer = "layers.0.self_attn"
    sharded = set(report.sharded_params)
    assert {f"{layer}.q_proj.weight", f"{layer}.o_proj.weight", "layers.0.mlp.down_proj.weight"} <= sharded
    assert "lm_head.weight" in sharded
    kv = {f"{layer}.k_proj.weight", f"{layer}.v_proj.weight"}
    if tp == 2:  # 2 kv heads: one per rank
        assert kv <= sharded
    else:  # 4 ranks, 2 kv heads: k / v kept whole, attention reads each rank's slice (Megatron's rule)
        assert not kv & sharded
        reasons = {f["what"]: f["reason"] for f in cm.plan.fallbacks}
        assert "attention reads each rank's slice" in reasons["layers_0_self_attn_k_proj"]


def test_context_parallel_and_pipeline_equal_the_model() -> None:
    model, x = _tiny()
    cm = partitioner.compile(model, 2, x, pipeline=2)
    torch.testing.assert_close(cm(*x), model(*x))
    cm.verify_context_parallel(2, *x)  # outputs on every rank, gradients summed over ranks (raises if not)


def test_the_summary_gives_reasons_only_for_stages_the_plan_recomputes() -> None:
    # Four stages of llama-tiny: two hold no attention core, where "selective" recomputes nothing; the plan records
    # "none" there, and its reasons must not claim those stages recompute to fit memory.
    model, x = _tiny()
    plan = partitioner.compile(model, 4, x, pipeline=4).plan
    modes = [s.recompute for s in plan.stages]
    for reason in plan.reasons:
        if " recomputes (" in reason:
            stage, mode = int(reason.split()[1]), reason.split("(")[1].split(")")[0]
            assert modes[stage] == mode, (reason, modes)
    assert modes != ["none"] * 4 or not any(" recomputes (" in r for r in plan.reasons)


@pytest.mark.parametrize("tp", [2, 4])
def test_multi_query_attention_by_enable_gqa_reads_its_one_kv_head_on_every_rank(tp: int) -> None:
    torch.manual_seed(0)
    model = zoo.get("llama-tiny", n_kv_head=1)
    x = zoo.example_inputs("llama-tiny", batch=4, seq=16)
    cm = partitioner.compile(model, tp, x, tensor_parallel=tp, pipeline=1)
    report = cm.verify_tensor_parallel(*x)
    assert "layers.0.self_attn.q_proj.weight" in report.sharded_params
    assert "layers.0.self_attn.k_proj.weight" not in report.sharded_params
