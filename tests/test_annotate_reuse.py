"""partitioner.annotate_reuse: a node whose call repeats an earlier one's is annotated from its record, and every
figure of node.meta is what a full run gives."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree

import zoo
from partitioner.annotate import annotate
from partitioner.capture import capture

_FIELDS = ("flops", "bwd_flops", "out_bytes", "mem_bytes", "bwd_bytes", "saved_bytes", "saves", "params", "is_tensor",
           "requires_grad", "dtype", "storages", "reads", "writes")  # fmt: skip


def _figures(gm: torch.fx.GraphModule) -> dict[str, dict]:
    out = {}
    for n in gm.graph.nodes:
        figures: dict[str, Any] = {k: n.meta[k] for k in _FIELDS if k in n.meta}
        figures["val"] = pytree.tree_map(
            lambda t: (tuple(t.shape), t.stride(), t.storage_offset(), t.dtype, t.requires_grad)
            if isinstance(t, torch.Tensor) else t, n.meta.get("val"),
        )  # fmt: skip
        out[n.name] = figures
    return out


def _assert_same_annotation(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> int:
    """Annotate one captured graph in full, then again with reuse: the same figures; how many nodes reused."""
    captured = capture(model, args, kwargs or {})
    inputs = captured.flatten_inputs(args, kwargs or {})
    gm = annotate(captured.graph_module, inputs, training=True, reuse=False)
    full = _figures(gm)
    assert gm.meta["annotate_reused"] == 0
    gm = annotate(captured.graph_module, inputs, training=True, reuse=True)
    reused = _figures(gm)
    assert full.keys() == reused.keys()
    for name, figures in full.items():
        assert reused[name] == figures, name
    return gm.meta["annotate_reused"]


@pytest.mark.parametrize("model", ["gpt3-tiny", "bert-tiny", "metaslot-tiny", "ncf-tiny", "llama-tiny"])
def test_reused_annotations_equal_a_full_run(model: str) -> None:
    """Every node's figures, storage names and saved storages (which recompute and the memory model read), and
    its output's shapes, strides and requires_grad, as a full run gives them; a transformer's layers reuse."""
    torch.manual_seed(0)
    inputs = zoo.example_inputs(model, batch=4)
    count = _assert_same_annotation(zoo.get(model), tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,))
    if model.startswith(("gpt3", "bert", "llama")):
        assert count > 0


def test_reused_annotations_of_an_export_graph_equal_a_full_run() -> None:
    """An ATen graph (HF Llama by torch.export: views, rotary tables, GQA's repeat, SDPA) reuses its layers' calls
    and gives a full run's figures."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    count = _assert_same_annotation(transformers.LlamaForCausalLM(config), (torch.randint(0, 64, (2, 8)),),
                                    {"use_cache": False})  # fmt: skip
    assert count > 0
