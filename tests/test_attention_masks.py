"""Attention masks computed from sizes alone run as SDPA's causal flag or as no mask (capture.attention_masks).

HF models build their causal mask inside forward; captured by torch.export, every attention reads it as an explicit
mask (the memory-efficient kernel over all T^2 pairs on a GPU). Where the mask depends on sizes alone and equals the
causal triangle (or lets everything through) at the example's sizes, attention runs with is_causal=True (or no
mask) and a check op guards every other shape. The rewritten graph equals the model at the example's shape and at
others; a mask that depends on an input (padding) or a parameter (T5's bias) stays; a shape where the mask differs
raises instead of computing something else.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch

from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.checks import CHECK_ATTENTION_MASK, mask_kind, register_mask
from partitioner.cost import attention_shape
from partitioner.plan.context import plan_context_parallel
from partitioner.plan.tensor import plan_tensor_parallel
from partitioner.plan.tensor_ops import _SDPA, key_in
from partitioner.runtime.cp_local import check_context_parallel
from partitioner.runtime.tp_local import check_tensor_parallel

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
T = transformers
VOCAB = 96


def _decoder(kind: str, **extra: object) -> torch.nn.Module:
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, use_cache=False)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common, **extra))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(intermediate_size=128, num_key_value_heads=2, **common, **extra))
    if kind == "gpt2":
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                              resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
        return T.GPT2LMHeadModel(config)
    if kind == "roberta":
        return T.RobertaModel(T.RobertaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                              hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))  # fmt: skip
    raise ValueError(kind)


def _ids(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _attentions(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and key_in(n, _SDPA)]


def _first(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind, expected", [("llama", "causal"), ("gpt2", "causal"), ("roberta", "none")])
def test_a_mask_from_sizes_alone_becomes_the_causal_flag_and_the_graph_equals_the_model(
    kind: str, expected: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = _decoder(kind).eval()
    with caplog.at_level(logging.INFO, logger="partitioner"):
        captured = capture(model, (_ids(2, 8),))
    assert f"were {expected} at the example's sizes" in caplog.text
    gm = captured.graph_module
    attentions = _attentions(gm)
    assert attentions and all(len(a.args) == 3 and "attn_mask" not in a.kwargs for a in attentions)
    assert all(a.kwargs["is_causal"] == (expected == "causal") for a in attentions)
    assert [n.args[2] for n in gm.graph.nodes if n.target is CHECK_ATTENTION_MASK] == [expected]
    if expected == "causal":  # priced as causal flash attention, unmasked
        assert all(attention_shape(a)[2:] == (True, False) for a in attentions)
    with torch.no_grad():
        for batch, seq in ((2, 8), (3, 13), (1, 1)):
            ids = _ids(batch, seq, seed=seq)
            torch.testing.assert_close(gm(ids)[0], _first(model(ids)))


@pytest.mark.timeout(120)
def test_masks_that_read_an_input_stay_masks() -> None:
    """A padding mask (from the attention_mask input) is data: the attentions keep their explicit mask."""
    model = _decoder("llama").eval()
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    gm = capture(model, (), {"input_ids": _ids(2, 8), "attention_mask": mask}).graph_module
    assert all(a.args[3] is not None for a in _attentions(gm))
    assert not any(n.target is CHECK_ATTENTION_MASK for n in gm.graph.nodes)


@pytest.mark.timeout(120)
def test_a_sliding_window_the_example_fits_in_is_checked_at_other_lengths() -> None:
    """Mistral's window of 8: causal at 8 tokens (rewritten), not at 12, where the check raises; a capture at 12
    tokens keeps the mask and equals the model."""
    model = _decoder("mistral", sliding_window=8).eval()
    gm = capture(model, (_ids(2, 8),)).graph_module
    assert all(a.kwargs.get("is_causal") for a in _attentions(gm))
    with torch.no_grad():
        torch.testing.assert_close(gm(_ids(2, 6))[0], model(_ids(2, 6)).logits)
        with pytest.raises(ValueError, match=r"mask shape \(2, 1, 12, 12\).*compile the model with an example"):
            gm(_ids(2, 12))
        long = capture(model, (_ids(2, 12),)).graph_module
        assert all(a.args[3] is not None for a in _attentions(long))
        torch.testing.assert_close(long(_ids(2, 12))[0], model(_ids(2, 12)).logits)


def test_mask_kinds() -> None:
    lower = torch.ones(5, 5, dtype=torch.bool).tril()
    assert mask_kind(lower) == "causal"
    assert mask_kind(lower.expand(3, 2, 5, 5)) == "causal"
    assert mask_kind(torch.ones(4, 6, dtype=torch.bool).tril()) == "causal"  # upper-left, as SDPA's is_causal
    assert mask_kind(torch.ones(2, 1, 5, 5, dtype=torch.bool)) == "none"
    assert mask_kind(lower & torch.ones(5, 5, dtype=torch.bool).triu(-2)) is None  # a sliding window of 3
    assert mask_kind(~lower) is None
    for dtype in (torch.float32, torch.bfloat16):
        blocked = torch.full((5, 5), float("-inf"), dtype=dtype)
        assert mask_kind(blocked.triu(1)) == "causal"
        assert mask_kind(torch.full((5, 5), torch.finfo(dtype).min, dtype=dtype).triu(1)) == "causal"
        assert mask_kind(torch.zeros(5, 5, dtype=dtype)) == "none"
        assert mask_kind(blocked.triu(1) + torch.arange(5, dtype=dtype)) is None  # a bias (ALiBi): not a mask
    assert mask_kind(torch.ones(5, 5, dtype=torch.long)) is None


_LIKE = torch.zeros(1)  # the check's tensor of the run: on the CPU, so it checks


def test_the_check_recomputes_the_mask_from_the_sizes_and_raises_where_it_differs() -> None:
    """Each rewrite (its id) recomputes its mask once per distinct sizes, from the function capture recorded."""

    def window(width: int) -> Callable[[int], torch.Tensor]:
        return lambda t: torch.ones(t, t, dtype=torch.bool).tril() & torch.ones(t, t, dtype=torch.bool).triu(1 - width)

    register_mask("t1:attn", window(4))
    CHECK_ATTENTION_MASK(_LIKE, [4], "causal", "t1:attn")
    CHECK_ATTENTION_MASK(_LIKE, [1], "causal", "t1:attn")  # one key: all-true is causal
    with pytest.raises(ValueError, match=r"attention mask of attn was 'causal'.*mask shape \(6, 6\)"):
        CHECK_ATTENTION_MASK(_LIKE, [6], "causal", "t1:attn")
    register_mask("t2:attn", lambda t: torch.ones(t, t, dtype=torch.bool))
    CHECK_ATTENTION_MASK(_LIKE, [5], "none", "t2:attn")
    with pytest.raises(ValueError, match="it is none"):
        CHECK_ATTENTION_MASK(_LIKE, [5], "causal", "t2:attn")
    with pytest.raises(RuntimeError, match="compile the model in this process"):
        CHECK_ATTENTION_MASK(_LIKE, [5], "causal", "t3:attn")


def test_the_rewritten_graph_no_longer_computes_the_mask() -> None:
    """The mask's (b, 1, T, T) ops leave the graph: only its size reads stay, for the check."""
    model = _decoder("llama").eval()
    gm = capture(model, (_ids(2, 8),)).graph_module
    (check,) = [n for n in gm.graph.nodes if n.target is CHECK_ATTENTION_MASK]
    assert all(n.target is torch.ops.aten.sym_size.int for n in check.args[1])
    square = [n for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() == 4
              and n.meta["val"].shape[-1] == n.meta["val"].shape[-2] and n.meta["val"].dtype == torch.bool]  # fmt: skip
    assert not square


@pytest.mark.timeout(300)
def test_tensor_sequence_and_context_parallel_ranks_run_the_rewritten_graph() -> None:
    """HF Llama without a padding mask: tp2 with sequence parallelism and cp2 (causal attention in the balanced
    order, lower-right per run) equal the model; the check reads the whole mask on every rank."""

    model = _decoder("llama").eval()
    call = {"input_ids": _ids(2, 16)}
    captured = capture(model, (), call)
    gm, inputs = captured.graph_module, captured.flatten_inputs((), call)
    annotate(gm, inputs, training=True)
    assert any(n.target is CHECK_ATTENTION_MASK for n in gm.graph.nodes)
    check_tensor_parallel(gm, plan_tensor_parallel(gm, 2, sequence_parallel=True), inputs)
    layout = plan_context_parallel(gm, 2)
    assert set(layout.attention.values()) == {"causal"} and layout.balance and not layout.fallbacks
    check_context_parallel(gm, layout, inputs)


class _SizedMaskAttention(torch.nn.Module):
    """Self-attention under a mask built from the sequence length alone, by `rule`; the size branch keeps torch.fx
    from tracing it (capture takes the export path, where masks are rewritten)."""

    def __init__(self, rule: str, window: int = 3):
        super().__init__()
        self.rule, self.window = rule, window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        if t > 4096:  # a branch on a size: fx refuses it, export guards on it
            raise ValueError("too long")
        i = torch.arange(t, device=x.device)
        lower = i[:, None] >= i[None, :]
        mask = {
            "causal": lower,
            "window": lower & (i[:, None] - i[None, :] < self.window),
            "full": torch.ones(t, t, dtype=torch.bool, device=x.device),
            "upper": i[:, None] <= i[None, :],
            "additive": torch.zeros(t, t, device=x.device).masked_fill(~lower, float("-inf")),
        }[self.rule]
        q = x.view(b, t, 2, d // 2).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(q, q * 0.5, q + 1.0, attn_mask=mask)
        return out.transpose(1, 2).reshape(b, t, d)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("rule", ["causal", "window", "full", "upper", "additive"])
def test_every_length_gives_the_models_output_or_a_clear_error(rule: str) -> None:
    """The invariant: captured at one length, the graph computes what the model does at every length, or raises
    naming the mask shape; it raises only where the mask is not what the rewrite assumed."""
    model = _SizedMaskAttention(rule)
    expected_kind = {"causal": "causal", "additive": "causal", "full": "none", "window": "causal", "upper": None}
    for example_len in (3, 6):  # the window of 3: causal at 3 tokens, not at 6
        captured = capture(model, (torch.randn(2, example_len, 8),))
        assert captured.method == "export"
        gm = captured.graph_module
        checks = [n.args[2] for n in gm.graph.nodes if n.target is CHECK_ATTENTION_MASK]
        kind = expected_kind[rule] if not (rule == "window" and example_len > 3) else None
        assert checks == ([kind] if kind else [])
        for t in range(1, 10):
            x = torch.randn(2, t, 8, generator=torch.Generator().manual_seed(t))
            mask_differs = kind == "causal" and rule == "window" and t > 3
            if mask_differs:
                with pytest.raises(ValueError, match="compile the model with an example of this shape"):
                    gm(x)
            else:
                torch.testing.assert_close(gm(x)[0], model(x))
