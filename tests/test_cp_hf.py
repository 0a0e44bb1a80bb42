"""Context parallelism on HuggingFace models captured by torch.export (ATen graphs): rotary embeddings from global
positions, GQA's expanded k / v, HF's own causal and padding masks, T5's relative position bias and cross
attention, BLOOM's ALiBi, the shifted-label loss inside the graph. Every cp rank runs in one process
(runtime.cp_local): outputs equal the model's on every rank, the ranks' gradients sum to the model's."""

from __future__ import annotations

import pytest

from partitioner.plan.context import plan_context_parallel
from partitioner.runtime.cp_local import check_context_parallel

transformers = pytest.importorskip("transformers")
from tests.test_tp_hf import hf_graph  # noqa: E402  (after the importorskip)

# Families whose every op but attention runs on the rank's tokens. The others read a few small values whole
# (fallbacks, correct but gathered): BERT / RoBERTa / BLOOM / Llama with a padding mask build positions or masks by a
# cumsum or an index over the sequence, and the pooler reads token 0.
CLEAN = ["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "t5"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", CLEAN + ["bloom", "bert", "roberta"])
def test_ranks_equal_the_model(family: str) -> None:
    gm, inputs = hf_graph(family)
    layout = plan_context_parallel(gm, 2)
    if family in CLEAN and family != "llama":  # llama's example has a padding mask (an index over the sequence)
        assert not layout.fallbacks, layout.fallbacks
    check_context_parallel(gm, layout, inputs)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_causal_lm_loss_in_the_graph_matches_at_four_ranks(family: str) -> None:
    """labels= inside the graph: HF pads and shifts the labels (read whole: a few ids), then cross_entropy over the
    rank's tokens, its mean over every rank's valid tokens."""
    gm, inputs = hf_graph(family, labels=True)
    layout = plan_context_parallel(gm, 4)
    assert layout.cross_entropy and set(layout.fallbacks) <= {"pad", "index"}, layout.fallbacks
    check_context_parallel(gm, layout, inputs, loss_fn=lambda out: out[0])


@pytest.mark.timeout(300)
@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_grouped_query_attention_gathers_kv_heads_not_their_repeats(family: str) -> None:
    """repeat_kv (expand + reshape to every query head) runs after the gather, on the gathered kv heads: the bytes
    gathered are kv_heads / heads of what SDPA reads (2 of 4 heads here)."""
    gm, inputs = hf_graph(family)
    layout = plan_context_parallel(gm, 2)
    nodes = {n.name: n for n in gm.graph.nodes}
    sdpa = [n for n in gm.graph.nodes if n.name in layout.attention]
    read = sum(nodes[a.name].meta["out_bytes"] for n in sdpa for a in n.args[1:3])
    gathered = sum(nodes[v].meta["out_bytes"] for v in layout.gather if nodes[v].meta["val"].dim() == 5)
    assert gathered * 2 == read
    check_context_parallel(gm, layout, inputs)
