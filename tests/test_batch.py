"""The batch dim is proven, not assumed (partitioner.plan.batch): a step splits the batch only where samples stay
independent through the graph; where they meet, compile names the node, and `batch_dim=` says where the batch is.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import partitioner
from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.plan.batch import REDUCED, UNKNOWN, Rows, batch_flow


def _flow(model: nn.Module, *args: torch.Tensor, dims: dict | None = None, **kwargs):
    cap = capture(model, args, kwargs)
    inputs = cap.flatten_inputs(args, kwargs)
    annotate(cap.graph_module, inputs)
    return batch_flow(cap.graph_module, inputs, cap.input_names, dims or {n: 0 for n in cap.input_names})


class SeqFirstAttention(nn.Module):
    """nn.MultiheadAttention's default layout: input (seq, batch, d). Issue #14: split along dim 0 (the sequence),
    the loss was 1.0224 against 1.0062 on the whole batch, without a warning."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.att = nn.MultiheadAttention(d, 2)
        self.out = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0])


class Centered(nn.Module):
    def __init__(self, d: int = 8):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h - h.mean(0))  # every row depends on the whole batch


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).square().mean()


def test_sequence_first_model_is_not_split_along_the_sequence() -> None:
    x = torch.randn(6, 4, 16)  # (seq, batch, d)
    with pytest.raises(ValueError, match=r"node 'att' .*samples meet.*batch_dim="):
        partitioner.compile(SeqFirstAttention(), devices=2, pipeline=2, microbatches=2, example_inputs=x,
                            device_type="cpu")  # fmt: skip
    # Left to the search: one microbatch, no data parallelism, the reason in the plan; the step is the whole batch's.
    torch.manual_seed(0)
    model = SeqFirstAttention()
    reference = copy.deepcopy(model)
    cm = partitioner.compile(model, devices=2, pipeline=2, example_inputs=x, device_type="cpu")
    assert cm.plan.microbatches == 1 and cm.plan.data_degree == 1
    assert any(f["path"] == "batch not split" and f["what"] == "att" for f in cm.plan.fallbacks)
    y = torch.randn(6, 4, 4)
    loss = cm.step(x, y, _mse)
    want = _mse(reference(x), y)
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_batch_dim_names_where_the_batch_is() -> None:
    """With batch_dim=1 the same model splits along its real batch and trains as the mean of microbatch losses."""
    torch.manual_seed(0)
    model = SeqFirstAttention()
    reference = copy.deepcopy(model)
    x, y = torch.randn(6, 4, 16), torch.randn(6, 4, 4)
    cm = partitioner.compile(model, devices=2, pipeline=2, microbatches=2, example_inputs=x, device_type="cpu",
                             batch_dim=1)  # fmt: skip
    assert cm.plan.batch_dims == {"x": 1, "targets": 1}
    assert not [f for f in cm.plan.fallbacks if f["path"].startswith("batch")]
    loss = cm.step(x, y, _mse)
    want = sum(_mse(reference(xi), yi) for xi, yi in zip(x.chunk(2, dim=1), y.chunk(2, dim=1))) / 2
    want.backward()
    torch.testing.assert_close(loss, want.detach())
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_mixing_by_a_reduction_is_refused_naming_the_node() -> None:
    with pytest.raises(ValueError, match=r"node 'sub' combines a reduction over the batch with per-sample values"):
        partitioner.compile(Centered(), devices=2, microbatches=2, example_inputs=torch.randn(8, 8), device_type="cpu")


def test_saved_plan_that_splits_an_unsplittable_batch_is_refused() -> None:
    x = torch.randn(8, 8)
    cm = partitioner.compile(Centered(), devices=2, pipeline=2, example_inputs=x, device_type="cpu")
    assert cm.plan.microbatches == 1  # training: the batch stays whole
    edited = json.loads(cm.plan.to_json())
    edited["microbatches"] = 2  # a plan made elsewhere (or edited) that splits it
    with pytest.raises(ValueError, match="the plan splits the batch into 2 chunks, but the batch cannot be split"):
        partitioner.compile(Centered(), devices=2, example_inputs=x, device_type="cpu", plan=json.dumps(edited))


def test_batch_norm_in_training_splits_with_a_note() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    cm = partitioner.compile(model, devices=2, pipeline=2, microbatches=2, example_inputs=torch.randn(4, 3, 8, 8),
                             device_type="cpu")  # fmt: skip
    (note,) = [f for f in cm.plan.fallbacks if f["path"] == "batch"]
    assert note["what"] == "_1" and "own statistics" in note["reason"]  # fx names Sequential's child 1 "_1"
    assert "own statistics" in cm.plan.summary()


def test_bad_batch_dim_is_refused() -> None:
    with pytest.raises(ValueError, match="batch_dim 3 of input 'x' is out of range"):
        partitioner.compile(Centered(), devices=2, example_inputs=torch.randn(8, 8), device_type="cpu", batch_dim=3)
    with pytest.raises(ValueError, match=r"batch_dim names \['y'\]"):
        partitioner.compile(Centered(), devices=2, example_inputs=torch.randn(8, 8), device_type="cpu",
                            batch_dim={"y": 0})  # fmt: skip


class Op(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.fn = fn
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.lin(x))


CASES = {
    "linear": (lambda h: h, Rows(0)),
    "flatten": (lambda h: h.flatten(0, 1), Rows(0)),
    "flatten-behind": (lambda h: h.transpose(0, 1).reshape(-1, 4), Rows(0, outer=5)),
    "transpose": (lambda h: h.transpose(0, 2), Rows(2)),
    "softmax-other": (lambda h: h.softmax(-1), Rows(0)),
    "sum-other": (lambda h: h.sum(1), Rows(0)),
    "mean-batch": (lambda h: h.mean(), REDUCED),
    "bmm": (lambda h: h @ h.transpose(1, 2), Rows(0)),
    "conv-as-linear": (lambda h: F.layer_norm(h, (4,)), Rows(0)),
    "index-other": (lambda h: h[:, 1:3], Rows(0)),
    "gather-other": (lambda h: h.gather(2, h.argmax(-1, keepdim=True)), Rows(0)),
    "cat-other": (lambda h: torch.cat([h, h], 1), Rows(0)),
    "max-pool": (lambda h: F.max_pool2d(h.unsqueeze(1), 2), Rows(0)),
    "avg-pool": (lambda h: F.avg_pool1d(h, 2), Rows(0)),
    "adaptive-pool": (lambda h: F.adaptive_avg_pool2d(h.unsqueeze(1), (2, 2)), Rows(0)),
    "upsample": (lambda h: F.interpolate(h.unsqueeze(1), scale_factor=2.0), Rows(0)),
}
MIXING = {
    "softmax-batch": lambda h: h.softmax(0),
    "cumsum-batch": lambda h: h.cumsum(0),
    "select-row": lambda h: h[0] + h,
    "slice-rows": lambda h: h[1:],
    "cat-batch": lambda h: torch.cat([h, h], 0),
    "contract-batch": lambda h: torch.einsum("bsd,btd->st", h, h),
    "layer-norm-over-batch": lambda h: F.layer_norm(h.transpose(0, 2), (h.shape[0],)),
    "flip": lambda h: h.flip(0),
    "centre": lambda h: h - h.mean(0, keepdim=True),
    "pool-over-batch": lambda h: F.max_pool1d(h.permute(1, 2, 0), 3),
}


@pytest.mark.parametrize("name", CASES)
def test_rules_follow_the_batch(name: str) -> None:
    fn, want = CASES[name]
    flow = _flow(Op(fn), torch.randn(3, 5, 4))
    assert not flow.mixing, flow.mixing
    assert want is REDUCED or not flow.notes, flow.notes  # followed, not assumed (a mean over the batch is noted)
    assert flow.outputs == [want]


@pytest.mark.parametrize("name", MIXING)
def test_rules_find_mixing(name: str) -> None:
    flow = _flow(Op(MIXING[name]), torch.randn(3, 5, 4))
    assert flow.mixing and not flow.splittable


class Recurrent(nn.Module):
    def __init__(self, cell: nn.Module) -> None:
        super().__init__()
        self.cell = cell

    def forward(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        out = self.cell(x, h) if isinstance(self.cell, nn.GRUCell) else self.cell(x, (h, h))[0]
        return out


def test_recurrent_cells_are_followed_without_notes() -> None:
    """nn.GRUCell / LSTMCell split their gates with aten.unsafe_split / unsafe_chunk, which have the rules of
    split / chunk: along another dim the rows stay apart, proven (no "samples assumed independent" note)."""
    for cell in (nn.GRUCell(4, 6), nn.LSTMCell(4, 6)):
        flow = _flow(Recurrent(cell), torch.randn(3, 4), torch.randn(3, 6))
        assert flow.splittable and not flow.notes, flow.notes


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert"])
def test_huggingface_models_are_proven_splittable(name: str) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=100, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    model = {
        "gpt2": lambda: transformers.GPT2LMHeadModel(
            transformers.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=2, n_positions=32)
        ),
        "llama": lambda: transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**common, hidden_size=64, num_key_value_heads=1, max_position_embeddings=32)
        ),
        "bert": lambda: transformers.BertModel(transformers.BertConfig(**common, hidden_size=64)),
    }[name]()
    ids = torch.randint(0, 100, (4, 8))
    extra = {} if name == "bert" else {"use_cache": False}
    flow = _flow(model, ids, attention_mask=torch.ones(4, 8, dtype=torch.long), **extra)
    assert flow.splittable and not flow.notes, (flow.mixing, flow.notes)
    assert all(isinstance(s, Rows) and s.dim == 0 for s in flow.outputs if s is not None)


# -- soundness over random programs ------------------------------------------------------------------------------------


def _sort_dispatch(h: torch.Tensor, lin: nn.Linear, undo: str) -> torch.Tensor:
    """A mixture of experts' dispatch in small: each token's rows sorted by an expert id it picks, a row-wise step by
    its own expert (a row of a weight table), then undone (`undo`): gathered back by the sort's inverse, added back at
    its indices, or (mixing, each caught) kept in the sort's order, inverted by a wrong inverse (a flipped or a zeroed
    arange), regrouped in pairs."""
    b, t, d = h.shape
    flat = h.reshape(b * t, d)
    keys = (flat[:, 0] > 0).long()
    sorted_keys, order = keys.sort()
    rows = torch.tanh(lin(flat[order])) * lin.weight[sorted_keys]  # each row with its own key's weight row
    if undo == "added back":
        return torch.zeros_like(flat).index_add(0, order, rows).reshape(b, t, d)
    if undo == "kept":
        return rows.reshape(b, t, d)
    if undo == "argsorted twice":  # the input gathered by argsort(order), the sort's inverse, then by it again
        rows = torch.tanh(lin(flat[order.argsort()]))
    inverse = torch.empty_like(order)
    iota = torch.arange(order.shape[0])
    if undo == "zeroed iota":
        iota.zero_()  # written in place: no longer an arange
    inverse[order] = iota.flip(0) if undo == "wrong inverse" else iota
    if undo == "pairs":
        rows = rows.reshape(-1, 2 * d).flip(-1).reshape(-1, d)
    return rows[inverse].reshape(b, t, d)


SORT_PIECES = {
    f"sort {undo}": undo
    for undo in ("undone", "added back", "kept", "wrong inverse", "zeroed iota", "pairs", "argsorted twice")
}

PIECES: dict[str, Callable[[torch.Tensor, nn.Linear], torch.Tensor]] = {
    **{name: (lambda h, lin, undo=undo: _sort_dispatch(h, lin, undo)) for name, undo in SORT_PIECES.items()},
    "linear": lambda h, lin: lin(h),
    "tanh": lambda h, lin: torch.tanh(h),
    "softmax-last": lambda h, lin: h.softmax(-1),
    "softmax-first": lambda h, lin: h.softmax(0),
    "transpose01": lambda h, lin: h.transpose(0, 1),
    "transpose12": lambda h, lin: h.transpose(1, 2),
    "reshape-merge": lambda h, lin: h.reshape(h.shape[0] * h.shape[1], 1, h.shape[2]).reshape(h.shape),
    "mean0": lambda h, lin: h - h.mean(0, keepdim=True),
    "mean1": lambda h, lin: h - h.mean(1, keepdim=True),
    "bmm": lambda h, lin: torch.tanh(h @ h.transpose(1, 2)) @ h / h.shape[1],  # bounded: no overflow when stacked
    "cumsum0": lambda h, lin: h.cumsum(0),
    "cumsum1": lambda h, lin: h.cumsum(1),
    "roll0": lambda h, lin: h.roll(1, 0),
    "layernorm": lambda h, lin: F.layer_norm(h, (h.shape[-1],)),
    "gather": lambda h, lin: h + h.gather(2, h.argmax(-1, keepdim=True)),
}


class Program(nn.Module):
    def __init__(self, pieces: list[str]):
        super().__init__()
        self.pieces = pieces
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for p in self.pieces:
            h = PIECES[p](h, self.lin)
        return h


@settings(max_examples=max(60, settings().max_examples // 4))  # ci: 60, dev: 500
@given(st.lists(st.sampled_from(sorted(PIECES)), min_size=1, max_size=5))
def test_splittable_verdicts_are_sound(pieces: list[str]) -> None:
    """Whenever the analysis proves the batch splittable, running two halves equals running the whole batch."""
    torch.manual_seed(0)
    model = Program(pieces)
    x = torch.randn(4, 4, 4)  # dims of equal size: the analysis cannot tell them apart by shape
    flow = _flow(model, x)
    (out_state,) = flow.outputs
    if not flow.splittable or flow.notes or out_state in (UNKNOWN, REDUCED) or out_state.outer != 1:
        event("mixing found" if not flow.splittable else "not proven either way")
        return
    event("proven splittable: checked on two halves")
    with torch.no_grad():
        whole = model(x)
        if not torch.isfinite(whole).all():
            return
        halves = torch.cat([model(x[:2]), model(x[2:])], dim=out_state.dim)
    torch.testing.assert_close(halves, whole)


@pytest.mark.parametrize("name", sorted(SORT_PIECES))
def test_a_sort_over_the_batch_is_followed_when_undone(name: str) -> None:
    """Mixture-of-experts dispatch (plan.batch.SortOf): rows sorted over the batch, stepped row-wise, then gathered
    back by the sort's inverse or added back at its indices are proven splittable, with no note, and the halves of a
    batch equal the whole; kept in the sort's order, inverted by anything but an arange written at the sort's
    indices, or regrouped, they are mixing, named at the node."""
    torch.manual_seed(0)
    model = Program([name])
    x = torch.randn(4, 4, 4)
    flow = _flow(model, x)
    if SORT_PIECES[name] in ("undone", "added back"):
        assert flow.splittable and not flow.notes, (flow.mixing, flow.notes)
        assert flow.outputs == [Rows(0)]
        with torch.no_grad():
            torch.testing.assert_close(torch.cat([model(x[:2]), model(x[2:])]), model(x))
    else:
        assert not flow.splittable
        assert "sort" in flow.mixing[0][1], flow.mixing


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_huggingface_mixtures_of_experts_are_proven_splittable(family: str) -> None:
    """HF's experts (transformers 5: tokens sorted by expert, grouped_mm over the sorted keys' offsets, an inverse
    permutation back) are followed through: splittable, outputs in the batch's order."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    common = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  use_cache=False)  # fmt: skip
    model = {
        "mixtral": lambda: transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=128, num_local_experts=4, num_experts_per_tok=2)),
        "qwen2_moe": lambda: transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(
            **common, intermediate_size=128, moe_intermediate_size=32, shared_expert_intermediate_size=64,
            num_experts=4, num_experts_per_tok=2)),
    }[family]()  # fmt: skip
    flow = _flow(model, torch.randint(0, 100, (4, 8)), dims={"input_ids": 0})
    assert flow.splittable, flow.mixing
    assert all(isinstance(s, Rows) and (s.dim, s.key) == (0, None) for s in flow.outputs if s is not None)


def _both_flows(model: nn.Module, *args: torch.Tensor) -> tuple:
    cap = capture(model, args, {})
    inputs = cap.flatten_inputs(args, {})
    annotate(cap.graph_module, inputs)
    dims = {n: 0 for n in cap.input_names}
    return tuple(batch_flow(cap.graph_module, inputs, cap.input_names, dims, reuse=r) for r in (False, True))


@settings(max_examples=40)
@given(st.lists(st.sampled_from(sorted(PIECES)), min_size=2, max_size=6))
def test_followed_once_calls_give_every_finding_and_state(pieces: list[str]) -> None:
    """A call repeating an earlier one's on inputs of the same states is not run again (plan.batch._Interpreter): the
    findings (under each node's own name) and output states are those of following every call."""
    full, reused = _both_flows(Program(pieces + pieces), torch.randn(4, 4, 4))
    assert (reused.mixing, reused.notes, reused.outputs) == (full.mixing, full.notes, full.outputs)


@pytest.mark.parametrize("model", ["gpt3-tiny", "batch-norms", "seq-first"])
def test_followed_once_calls_in_models(model: str) -> None:
    """Repeated layers, batch norm's notes at every norm, and mixing at a sequence-first attention: as in full."""
    import zoo

    if model == "seq-first":
        net, args = SeqFirstAttention(), (torch.randn(6, 4, 16),)
    elif model == "batch-norms":
        block = lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())  # noqa: E731
        net, args = nn.Sequential(block(), block(), block()), (torch.randn(4, 4, 8, 8),)
    else:
        net, inputs = zoo.get(model), zoo.example_inputs(model, batch=4)
        args = tuple(inputs) if isinstance(inputs, (list, tuple)) else (inputs,)
    full, reused = _both_flows(net, *args)
    assert (reused.mixing, reused.notes, reused.outputs) == (full.mixing, full.notes, full.outputs)
    assert full.notes or full.mixing or model == "gpt3-tiny"


def test_a_mixture_of_experts_grouped_products_count_their_flops() -> None:
    """FlopCounterMode counts no grouped matrix product (transformers' grouped_mm_fallback): annotate prices each as
    rows x k x n multiply-adds, twice that backward, so the planner sees the experts' compute."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, use_cache=False)  # fmt: skip
    ids = torch.randint(0, 100, (4, 8))
    cap = capture(transformers.MixtralForCausalLM(config), (), {"input_ids": ids})
    annotate(cap.graph_module, cap.flatten_inputs((), {"input_ids": ids}), training=True)
    grouped = [n for n in cap.graph_module.graph.nodes if "grouped_mm" in str(n.target)]
    assert len(grouped) == 2  # the experts' up and down products
    rows = 4 * 8 * 2  # tokens x experts per token
    expected = [2 * rows * 64 * 256, 2 * rows * 128 * 64]
    assert [n.meta["flops"] for n in grouped] == expected
    assert [n.meta["bwd_flops"] for n in grouped] == [2 * f for f in expected]
