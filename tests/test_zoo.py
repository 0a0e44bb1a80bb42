"""Model zoo: parameter counts against closed forms and published figures, builds on meta, tiny presets run,
train, trace (torch.fx) and export (torch.export) to the same numbers as eager."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.utils._pytree as pytree

import zoo
from zoo import bert, gpt3, llama, ncf

TINY = ["gpt3-tiny", "bert-tiny", "roberta-tiny", "ncf-tiny", "llama-tiny"]
MINE = zoo.names("gpt3") + zoo.names("bert") + zoo.names("roberta") + zoo.names("ncf") + zoo.names("llama")


def gpt3_closed_form(L: int, d: int, V: int = 50257, ctx: int = 2048) -> int:
    # per block 12d² + 13d (q,k,v,out 4d² + 4d; fc + proj 8d² + 5d; two LNs 4d); embeddings (V + ctx)d; ln_f 2d
    return 12 * L * d * d + 13 * L * d + (V + ctx) * d + 2 * d


def bert_closed_form(L: int, d: int, f: int, V: int, P: int, types: int, mlm_head: bool = True) -> int:
    embeddings = (V + P + types) * d + 2 * d  # word + position + type embeddings, LayerNorm
    layer = (4 * d * d + 4 * d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d  # q,k,v,out; ln_1; fc; proj; ln_2
    pooler = d * d + d
    head = (d * d + d) + 2 * d + V  # transform dense, its LayerNorm, decoder bias (decoder weight is tied)
    return embeddings + L * layer + pooler + (head if mlm_head else 0)


# name -> (closed form, published figure, relative tolerance vs the published figure, source)
COUNTS: dict[str, tuple[int, float, float, str]] = {
    "gpt3-125m": (gpt3_closed_form(12, 768), 125e6, 0.01, "GPT-3 Table 2.1"),
    # The paper's labels are rounded to two digits: its "350M", "2.7B" and "13.0B" models have 355.9M,
    # 2.652B and 12.85B parameters by its own architecture table (13B: with d_model 5120, not the misprinted
    # 5140), 1.1-1.8% off the label, so those three are checked to 2%; the closed form is checked exactly.
    "gpt3-350m": (gpt3_closed_form(24, 1024), 350e6, 0.02, "GPT-3 Table 2.1 (rounded label)"),
    "gpt3-760m": (gpt3_closed_form(24, 1536), 760e6, 0.01, "GPT-3 Table 2.1"),
    "gpt3-1.3b": (gpt3_closed_form(24, 2048), 1.316e9, 0.01, "1.316e9 (the paper label 1.3B is 1.2% off)"),
    "gpt3-2.7b": (gpt3_closed_form(32, 2560), 2.7e9, 0.02, "GPT-3 Table 2.1 (rounded label)"),
    "gpt3-6.7b": (gpt3_closed_form(32, 4096), 6.7e9, 0.01, "GPT-3 Table 2.1"),
    "gpt3-13b": (gpt3_closed_form(40, 5120), 13.0e9, 0.02, "GPT-3 Table 2.1 (rounded label)"),
    "gpt3-175b": (gpt3_closed_form(96, 12288), 1.746e11, 0.01, "1.746e11 (paper: 175.0B)"),
    # BERT / RoBERTa: published = HF BertModel / RobertaModel with pooler; the MLM head adds d² + 3d + V.
    "bert-base": (bert_closed_form(12, 768, 3072, 30522, 512, 2), 109_482_240, 0.01, "BertModel base"),
    "bert-large": (bert_closed_form(24, 1024, 4096, 30522, 512, 2), 335_141_888, 0.01, "BertModel large"),
    "roberta-base": (bert_closed_form(12, 768, 3072, 50265, 514, 1), 124_645_632, 0.01, "RobertaModel base"),
    "roberta-large": (bert_closed_form(24, 1024, 4096, 50265, 514, 1), 355_359_744, 0.01, "RobertaModel large"),
    # NCF: (138,493 + 26,744)(64 + 128) embeddings + MLP 256->256->128->64 + output 128->1
    "ncf": (
        (138_493 + 26_744) * (64 + 128) + (256 * 256 + 256) + (256 * 128 + 128) + (128 * 64 + 64) + 129,
        31_832_577,
        0.0,
        "MLPerf NCF",
    ),
}
# The encoder + pooler parts equal the published HF counts exactly.


def llama_closed_form(L: int, d: int, f: int, kv: int, V: int, hd: int = 128) -> int:
    # per block q, o d² each; k, v d·kv·hd each; gate, up, down d·f each; two RMSNorms d; embedding + head 2Vd; norm d
    return L * (2 * d * d + 2 * d * kv * hd + 3 * d * f + 2 * d) + 2 * V * d + d


# Llama: the HF model cards' parameter counts (released checkpoints, rounded as the cards print them).
COUNTS.update({
    "llama2-7b": (llama_closed_form(32, 4096, 11008, 32, 32000), 6.74e9, 0.001, "Llama-2-7b-hf: 6.74B"),
    "llama2-13b": (llama_closed_form(40, 5120, 13824, 40, 32000), 13.0e9, 0.002, "Llama-2-13b-hf: 13B"),
    "llama2-70b": (llama_closed_form(80, 8192, 28672, 8, 32000), 69.0e9, 0.001, "Llama-2-70b-hf: 69B"),
    "llama3-8b": (llama_closed_form(32, 4096, 14336, 8, 128256), 8.03e9, 0.001, "Meta-Llama-3-8B: 8.03B"),
    "llama3-70b": (llama_closed_form(80, 8192, 28672, 8, 128256), 70.6e9, 0.001, "Meta-Llama-3-70B: 70.6B"),
    "llama3-405b": (llama_closed_form(126, 16384, 53248, 8, 128256), 406e9, 0.001, "Llama-3.1-405B: 406B"),
})  # fmt: skip
ENCODER_COUNTS = {"bert-base": 109_482_240, "bert-large": 335_141_888, "roberta-base": 124_645_632,
                  "roberta-large": 355_359_744}  # fmt: skip


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied Parameter once


def meta_build(name: str, **overrides) -> torch.nn.Module:
    with torch.device("meta"):
        return zoo.get(name, **overrides)


# ---- parameter counts --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COUNTS))
def test_param_count_published(name: str) -> None:
    closed, published, rtol, source = COUNTS[name]
    model = meta_build(name)
    count = n_params(model)
    print(f"{name}: {count:,}")
    assert count == closed, f"{name}: {count:,} parameters, closed form {closed:,}"
    assert abs(count - published) <= rtol * published, f"{name}: {count:,} vs {published:,.0f} ({source})"
    assert all(p.device.type == "meta" for p in model.parameters())
    if name in ENCODER_COUNTS:
        assert bert.param_count(model.cfg, mlm_head=False) == ENCODER_COUNTS[name]
        d, V = model.cfg.d_model, model.cfg.vocab_size
        assert count - ENCODER_COUNTS[name] == d * d + 3 * d + V


def test_exact_published_totals() -> None:
    # The figures quoted for these models, exactly (also the module-level closed forms agree).
    assert COUNTS["gpt3-1.3b"][0] == 1_315_723_264
    assert COUNTS["gpt3-175b"][0] == 174_604_259_328
    assert COUNTS["ncf"][0] == 31_832_577
    assert COUNTS["bert-base"][0] == 109_482_240 + 768 * 768 + 3 * 768 + 30522
    assert COUNTS["llama2-7b"][0] == 6_738_415_616
    assert COUNTS["llama3-8b"][0] == 8_030_261_248
    assert COUNTS["llama3-405b"][0] == 405_853_388_800


@pytest.mark.parametrize("name", MINE)
def test_module_param_count_matches_model(name: str) -> None:
    model = meta_build(name)
    module = {"gpt3": gpt3, "bert": bert, "roberta": bert, "ncf": ncf, "llama": llama}[zoo.entry(name).family]
    assert n_params(model) == module.param_count(model.cfg)
    assert f"{n_params(model):,}" in zoo.entry(name).description


def test_overrides_change_the_count() -> None:
    model = meta_build("gpt3-1.3b", n_layer=4)
    assert len(model.h) == 4 and n_params(model) == gpt3_closed_form(4, 2048)
    # d_ff follows an overridden d_model (4d) unless it is given itself
    assert meta_build("gpt3-tiny", d_model=128).h[0].mlp.fc.out_features == 512
    assert meta_build("gpt3-tiny", d_model=128, d_ff=200).h[0].mlp.fc.out_features == 200
    assert n_params(meta_build("ncf", n_users=10, n_items=20)) == 30 * 192 + 65792 + 32896 + 8256 + 129


# ---- registry behaviour -------------------------------------------------------------------------------------


def test_registered_names() -> None:
    expected = ["gpt3-125m", "gpt3-350m", "gpt3-760m", "gpt3-1.3b", "gpt3-2.7b", "gpt3-6.7b", "gpt3-13b",
                "gpt3-175b", "gpt3-tiny", "bert-base", "bert-large", "bert-tiny", "roberta-base", "roberta-large",
                "roberta-tiny", "ncf", "ncf-tiny", "llama2-7b", "llama2-13b", "llama2-70b", "llama3-8b", "llama3-70b",
                "llama3-405b", "llama-tiny"]  # fmt: skip
    assert MINE == expected
    assert set(expected) <= set(zoo.names())


@pytest.mark.parametrize("name", zoo.names())
def test_every_name_builds_on_meta(name: str) -> None:
    model = meta_build(name)
    assert isinstance(model, torch.nn.Module)
    assert n_params(model) > 0
    assert all(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("name", zoo.names())
def test_example_inputs_meta_and_cpu(name: str) -> None:
    on_meta = zoo.example_inputs(name, batch=3, device="meta")
    on_cpu = zoo.example_inputs(name, batch=3, device="cpu")
    assert isinstance(on_meta, tuple) and len(on_meta) == len(on_cpu) > 0
    tensors = [(m, c) for m, c in zip(on_meta, on_cpu, strict=True) if isinstance(c, torch.Tensor)]
    assert tensors
    for m, c in tensors:
        assert m.device.type == "meta" and c.device.type == "cpu"
        assert m.shape == c.shape and m.dtype == c.dtype
        assert name not in MINE or c.shape[0] == 3  # batch-first in our families
    # deterministic contents
    for a, b in zip(on_cpu, zoo.example_inputs(name, batch=3, device="cpu"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if zoo.entry(name).example_targets is not None:
        # targets may be a pytree (DMAGaze: gaze angles and the face image)
        t_meta = pytree.tree_leaves(zoo.example_targets(name, batch=3, device="meta"))
        t_cpu = pytree.tree_leaves(zoo.example_targets(name, batch=3, device="cpu"))
        assert t_meta and len(t_meta) == len(t_cpu)
        for a, b in zip(t_meta, t_cpu, strict=True):
            assert a.device.type == "meta" and a.shape == b.shape and a.dtype == b.dtype


@pytest.mark.parametrize("name", MINE)
def test_meta_forward_and_loss(name: str) -> None:
    model = meta_build(name)
    inputs = zoo.example_inputs(name, batch=2, device="meta")
    out = model(*inputs)
    family = zoo.entry(name).family
    if family == "ncf":
        assert out.shape == (2,)
    else:
        seq = min(128, model.cfg.n_ctx if family in ("gpt3", "llama") else model.cfg.max_seq)
        assert out.shape == (2, seq, model.cfg.vocab_size)
    loss = zoo.loss_fn(name)(out, zoo.example_targets(name, batch=2, device="meta"))
    assert loss.device.type == "meta" and loss.shape == ()


def test_example_inputs_seq_and_config_overrides() -> None:
    assert zoo.example_inputs("gpt3-1.3b", batch=2)[0].shape == (2, 128)
    assert zoo.example_inputs("gpt3-tiny", batch=2, seq=16)[0].shape == (2, 16)
    assert zoo.example_inputs("bert-base", batch=1)[0].shape == (1, 128)
    assert zoo.example_inputs("roberta-tiny", batch=1)[0].shape == (1, 64)  # 66 positions - 2
    assert int(zoo.example_inputs("gpt3-tiny", batch=2, vocab_size=16)[0].max()) < 16
    with pytest.raises(ValueError, match=r"seq=65 must be in \[1, n_ctx=64\]"):
        zoo.example_inputs("gpt3-tiny", seq=65)
    with pytest.raises(ValueError, match=r"seq=65 must be in \[1, 64\]"):
        zoo.example_inputs("roberta-tiny", seq=65)


def test_bad_override_is_a_clear_error() -> None:
    for name in ("gpt3-1.3b", "bert-base", "ncf"):
        with pytest.raises(ValueError, match=r"bad_field.*valid fields: .*") as info:
            zoo.get(name, bad_field=1)
        assert name in str(info.value)
    with pytest.raises(ValueError, match="n_layer, d_model, n_head, d_ff"):
        zoo.get("gpt3-tiny", bad_field=1)


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(ValueError, match=r"unknown zoo model 'gpt3-1\.3'.*Did you mean .*gpt3-1\.3b"):
        zoo.get("gpt3-1.3")
    with pytest.raises(ValueError, match=r"Did you mean .*roberta-base"):
        zoo.get("roberta-bas")


def test_config_validation_carries_the_numbers() -> None:
    with pytest.raises(ValueError, match="d_model=64 is not divisible by n_head=3"):
        zoo.get("gpt3-tiny", n_head=3)
    with pytest.raises(ValueError, match="d_model=100 is not divisible by n_head=8"):
        zoo.get("bert-tiny", d_model=100, n_head=8)
    with pytest.raises(ValueError, match=r"mlp_layers\[0\]=63 must be even"):
        zoo.get("ncf-tiny", mlp_layers=(63, 16))
    with pytest.raises(ValueError, match="dropout must be in"):
        gpt3.GPTConfig(dropout=1.5)


# ---- tiny presets: run, train, trace, export --------------------------------------------------------------


def tiny(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.get(name).eval()


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_backward(name: str) -> None:
    model = tiny(name)
    inputs = zoo.example_inputs(name, batch=2)
    out = model(*inputs)
    if name == "ncf-tiny":
        assert out.shape == (2,)
    else:
        assert out.shape == (2, inputs[0].shape[1], model.cfg.vocab_size)
    loss = zoo.loss_fn(name)(out, zoo.example_targets(name, batch=2))
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    # the pooler exists for the published counts but takes no part in the MLM forward
    assert no_grad == (["pooler.weight", "pooler.bias"] if "bert" in name else [])
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.isfinite(p.grad).all(), n
    assert sum(float(p.grad.abs().sum()) for p in model.parameters() if p.grad is not None) > 0


@pytest.mark.parametrize("name", TINY)
def test_tiny_trace_and_export_match_eager(name: str) -> None:
    model = tiny(name)
    inputs = zoo.example_inputs(name, batch=2, seq=16) if name != "ncf-tiny" else zoo.example_inputs(name, batch=4)
    expected = model(*inputs)
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(*inputs), expected)
    ep = torch.export.export(model, inputs)
    torch.testing.assert_close(ep.module()(*inputs), expected)
    # per-layer module names survive tracing: blocks live in an nn.ModuleList
    layer0 = {"gpt3-tiny": "h.0.attn.q_proj", "bert-tiny": "layers.0.attn.q_proj", "roberta-tiny": "layers.0.mlp.fc",
              "ncf-tiny": "mlp.0", "llama-tiny": "layers.0.self_attn.k_proj"}[name]  # fmt: skip
    assert layer0 in dict(gm.named_modules())
    # no in-place ops on activations in the traced graph
    targets = [str(n.target) for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert not [t for t in targets if t.endswith("_") and not t.startswith("_")], targets


@pytest.mark.parametrize("name", TINY)
def test_init_is_deterministic_under_manual_seed(name: str) -> None:
    a, b = tiny(name).state_dict(), tiny(name).state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    torch.manual_seed(1)
    c = zoo.get(name).state_dict()
    assert any(not torch.equal(a[k], c[k]) for k in a)


@torch.no_grad()
def test_weights_are_tied_and_initialized() -> None:
    g = tiny("gpt3-tiny")
    assert g.lm_head.weight is g.wte.weight
    assert abs(float(g.wte.weight.detach().std()) - 0.02) < 0.002
    assert float(g.h[0].attn.q_proj.bias.abs().sum()) == 0.0 and torch.equal(g.ln_f.weight, torch.ones(64))
    for name in ("bert-tiny", "roberta-tiny"):
        m = tiny(name)
        assert m.mlm_decoder.weight is m.word_emb.weight
        assert float(m.word_emb.weight[m.cfg.pad_token_id].abs().sum()) == 0.0  # padding row zero
    assert float(tiny("roberta-tiny").pos_emb.weight[1].abs().sum()) == 0.0


def test_gpt_is_causal() -> None:
    model = tiny("gpt3-tiny")
    (idx,) = zoo.example_inputs("gpt3-tiny", batch=1, seq=16)
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % model.cfg.vocab_size
    torch.testing.assert_close(model(idx)[:, :10], model(changed)[:, :10])
    assert not torch.allclose(model(idx)[:, 10:], model(changed)[:, 10:])


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny"])
def test_padding_does_not_change_real_tokens(name: str) -> None:
    # Row 1 of the example batch ends in 4 pad tokens: its real tokens give the logits they give unpadded.
    model = tiny(name)
    ids, types, mask = zoo.example_inputs(name, batch=2, seq=16)
    assert mask[1].tolist() == [1] * 12 + [0] * 4 and (ids[1, 12:] == model.cfg.pad_token_id).all()
    padded = model(ids, types, mask)[1, :12]
    alone = model(ids[1:, :12], types[1:, :12], mask[1:, :12])[0]
    torch.testing.assert_close(padded, alone)
    # and the mask matters: attending to the pads changes them
    assert not torch.allclose(model(ids, types, torch.ones_like(mask))[1, :12], padded)


def test_roberta_positions_skip_padding() -> None:
    # RoBERTa positions count only real tokens (cumsum of the non-pad mask), so left padding changes nothing.
    model = tiny("roberta-tiny")
    ids, types, mask = (t[:1, :12] for t in zoo.example_inputs("roberta-tiny", batch=1, seq=12))
    pad = torch.full((1, 4), model.cfg.pad_token_id)
    left = model(torch.cat([pad, ids], 1), torch.cat([pad * 0, types], 1), torch.cat([pad * 0, mask], 1))
    torch.testing.assert_close(left[:, 4:], model(ids, types, mask))


def test_mlm_targets() -> None:
    for name in ("bert-tiny", "roberta-tiny"):
        cfg = zoo.get(name).cfg
        ids, types, mask = zoo.example_inputs(name, batch=4, seq=40)
        labels = zoo.example_targets(name, batch=4, seq=40)
        chosen = labels != -100
        assert chosen.sum(dim=1).tolist() == [6] * 4  # int(0.15 * 40) per row
        assert not (chosen & (mask == 0)).any() and not chosen[:, 0].any()
        assert (ids[chosen] == cfg.vocab_size - 1).all()
        assert types.max() == cfg.type_vocab_size - 1


def reference_attention(attn: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # softmax(q k^T / sqrt(hd) + bias) v, written out per head; x (B, T, d), bias broadcast to (B, nh, T, T)
    B, T, d = x.shape
    nh = attn.n_head
    q, k, v = (lin(x).reshape(B, T, nh, d // nh).permute(0, 2, 1, 3) for lin in (attn.q_proj, attn.k_proj, attn.v_proj))
    w = torch.softmax(q @ k.transpose(-1, -2) / (d // nh) ** 0.5 + bias, dim=-1)
    return attn.out_proj((w @ v).permute(0, 2, 1, 3).reshape(B, T, d))


def test_gpt_matches_reference() -> None:
    # pre-LN blocks, tanh GELU, final LN, head = token embedding transposed
    model = tiny("gpt3-tiny")
    (idx,) = zoo.example_inputs("gpt3-tiny", batch=2, seq=12)
    T = idx.shape[1]
    causal = torch.full((T, T), float("-inf")).triu(1)
    x = model.wte.weight[idx] + model.wpe.weight[:T]
    for blk in model.h:
        x = x + reference_attention(blk.attn, blk.ln_1(x), causal)
        h = blk.ln_2(x) @ blk.mlp.fc.weight.T + blk.mlp.fc.bias
        x = x + torch.nn.functional.gelu(h, approximate="tanh") @ blk.mlp.proj.weight.T + blk.mlp.proj.bias
    torch.testing.assert_close(model(idx), model.ln_f(x) @ model.wte.weight.T)


@pytest.mark.parametrize("name", ["bert-tiny", "roberta-tiny"])
def test_bert_matches_reference(name: str) -> None:
    # post-LN blocks, erf GELU, MLM head dense + GELU + LN, decoder = word embedding transposed + bias
    model = tiny(name)
    ids, types, mask = zoo.example_inputs(name, batch=2, seq=12)
    pad = model.cfg.pad_token_id
    if name == "roberta-tiny":
        pos = torch.stack([torch.tensor([pad + 1 + i if t != pad else pad for i, t in enumerate(row)]) for row in ids])
    else:
        pos = torch.arange(12).expand(2, 12)
    gelu = torch.nn.functional.gelu
    x = model.ln_emb(model.word_emb.weight[ids] + model.pos_emb.weight[pos] + model.type_emb.weight[types])
    bias = torch.where(mask.bool(), 0.0, -10000.0)[:, None, None, :]
    for layer in model.layers:
        x = layer.ln_1(x + reference_attention(layer.attn, x, bias))
        x = layer.ln_2(x + layer.mlp.proj(gelu(layer.mlp.fc(x))))
    expected = model.mlm_ln(gelu(model.mlm_dense(x))) @ model.word_emb.weight.T + model.mlm_decoder.bias
    torch.testing.assert_close(model(ids, types, mask), expected)


def test_ncf_is_neumf() -> None:
    model = tiny("ncf-tiny")
    user, item = zoo.example_inputs("ncf-tiny", batch=5)
    x = torch.cat([model.mlp_user(user), model.mlp_item(item)], dim=-1)
    for linear in model.mlp:
        x = torch.relu(linear(x))
    gmf = model.mf_user(user) * model.mf_item(item)
    expected = (torch.cat([gmf, x], dim=-1) @ model.out.weight.T + model.out.bias)[:, 0]
    torch.testing.assert_close(model(user, item), expected)
    labels = zoo.example_targets("ncf-tiny", batch=5)
    assert labels.dtype == torch.float32 and set(labels.tolist()) <= {0.0, 1.0}


# ---- memory ------------------------------------------------------------------------------------------------


def test_gpt3_175b_meta_build_stays_under_1gib() -> None:
    script = textwrap.dedent(
        """
        import resource, torch
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, after importing torch
        import zoo
        with torch.device("meta"):
            model = zoo.get("gpt3-175b")
        n = sum(p.numel() for p in model.parameters())
        print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, n)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    base_kib, peak_kib, n = map(int, out.stdout.split())
    assert n == gpt3_closed_form(96, 12288)
    assert peak_kib - base_kib < 1024 * 1024, (
        f"meta build of gpt3-175b grew RSS by {(peak_kib - base_kib) / 1024:.0f} MiB"
    )
