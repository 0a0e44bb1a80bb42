"""Training HuggingFace models (captured by torch.export) with the plan's microbatches, in one process.

`cm.step` splits the batch into plan.microbatches x plan.data_degree chunks; export's graph must take a
chunk of any size (its batch dim is symbolic). Each step must equal single-process training of the plain
model on the same chunks: the same mean loss and the same `.grad` on every parameter. Models are tiny
configs (like tests/test_models_zoo_of_patterns.py `_hf_cases`) in train mode with dropout 0, so both runs
are deterministic; one case keeps dropout on and seeds both runs alike. A model whose batch dim export
cannot make dynamic gets a recorded fallback and a clear error. HF cases are skipped without transformers.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import partitioner

VOCAB = 100


def _hf(name: str) -> Any:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return getattr(transformers, name)


def _ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _text(batch: int, seq: int, seed: int) -> dict[str, Any]:
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1::3, seq - 2 :] = 0  # padding in every third sequence
    return {"input_ids": _ids(batch, seq, seed), "attention_mask": mask}


def _lm_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def _hidden_loss(out: Any, targets: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.last_hidden_state.mean(-1), targets)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    call: Callable[[int, int], tuple[dict[str, Any], torch.Tensor]]  # (batch, seq) -> (kwargs, targets)
    loss: Callable[[Any, torch.Tensor], torch.Tensor]


def _gpt2(**dropout: float) -> nn.Module:
    config = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=32)
    config.update(dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0) | dropout)
    return _hf("GPT2LMHeadModel")(_hf("GPT2Config")(**config))


def _llama() -> nn.Module:
    config = _hf("LlamaConfig")(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        attention_dropout=0.0,
    )
    return _hf("LlamaForCausalLM")(config)


def _bert() -> nn.Module:
    config = _hf("BertConfig")(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return _hf("BertModel")(config)


def _t5() -> nn.Module:
    config = _hf("T5Config")(
        vocab_size=VOCAB, d_model=64, d_kv=32, d_ff=128, num_layers=2, num_heads=2, dropout_rate=0.0
    )
    return _hf("T5ForConditionalGeneration")(config)


def _falcon() -> nn.Module:
    """Falcon-7B's layout in small: multi-query (one k and v head fused with the q heads in one weight), parallel
    attention and MLP, rotary embeddings. Not in CASES (the distributed tp test trains it)."""
    config = _hf("FalconConfig")(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, multi_query=True, bias=False,
        alibi=False, parallel_attn=True, hidden_dropout=0.0, attention_dropout=0.0,
    )  # fmt: skip
    return _hf("FalconForCausalLM")(config)


def _mixtral() -> nn.Module:
    """A mixture of experts (transformers 5: tokens sorted by expert, grouped matrix products, the sort undone)."""
    config = _hf("MixtralConfig")(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=32,
    )  # fmt: skip
    return _hf("MixtralForCausalLM")(config)


def _causal(batch: int, seq: int) -> tuple[dict[str, Any], torch.Tensor]:
    call = {**_text(batch, seq, seed=batch + seq), "use_cache": False}
    return call, _ids(batch, seq, seed=1)


def _encoder(batch: int, seq: int) -> tuple[dict[str, Any], torch.Tensor]:
    return _text(batch, seq, seed=batch + seq), torch.randn(batch, seq, generator=torch.Generator().manual_seed(2))


def _seq2seq(batch: int, seq: int) -> tuple[dict[str, Any], torch.Tensor]:
    decoder = _ids(batch, seq - 3, seed=3)
    call = {**_text(batch, seq, seed=batch + seq), "decoder_input_ids": decoder, "use_cache": False}
    return call, decoder.roll(-1, 1)  # the next token


CASES = [
    Case("gpt2", _gpt2, _causal, _lm_loss),
    Case("llama", _llama, _causal, _lm_loss),
    Case("bert", _bert, _encoder, _hidden_loss),
    Case("t5", _t5, _seq2seq, _lm_loss),
]
# trained by the distributed tests only
MORE_CASES = [Case("falcon", _falcon, _causal, _lm_loss), Case("mixtral", _mixtral, _causal, _lm_loss)]


def reference_step(
    model: nn.Module,
    kwargs: dict[str, Any],
    targets: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    chunks: int,
    seed: int | None = None,
) -> torch.Tensor:
    """Single-process training on the same chunks: mean of the chunk losses, its gradient in `.grad`."""
    split = {k: torch.tensor_split(v, chunks) if torch.is_tensor(v) else [v] * chunks for k, v in kwargs.items()}
    if seed is not None:
        torch.manual_seed(seed)
    losses = []
    for i, target in enumerate(torch.tensor_split(targets, chunks)):
        loss = loss_fn(model(**{k: v[i] for k, v in split.items()}), target)
        (loss / chunks).backward()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


def check_step(
    cm: partitioner.CompiledModel,
    reference: nn.Module,
    kwargs: dict[str, Any],
    targets: torch.Tensor,
    loss_fn: Callable[[Any, torch.Tensor], torch.Tensor],
    seed: int | None = None,
) -> None:
    """One cm.step against reference_step: same loss, same gradient on every parameter (fresh grads)."""
    cm.zero_grad()
    reference.zero_grad()
    chunks = cm.plan.microbatches * cm.plan.data_degree
    if seed is not None:
        torch.manual_seed(seed)
    loss = cm.step((), targets, loss_fn, kwargs=kwargs)
    expected = reference_step(reference, kwargs, targets, loss_fn, chunks, seed)
    torch.testing.assert_close(loss, expected)
    grads = dict(reference.named_parameters())
    for name, p in cm.model.named_parameters():
        if grads[name].grad is None:
            assert p.grad is None or not p.grad.any(), f"{name} has a gradient the reference has not"
        else:
            torch.testing.assert_close(p.grad, grads[name].grad, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("pipeline", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_step_equals_single_process_training(case: Case, pipeline: int) -> None:
    torch.manual_seed(0)
    model = case.build()
    reference = copy.deepcopy(model)
    kwargs, targets = case.call(12, 8)
    # 2-row chunks at pipeline 2, one-row chunks at 4 (the search on the cpu cost model may prefer fewer: its
    # sends' latency is paid per microbatch)
    chunks = 6 if pipeline == 2 else 12
    cm = partitioner.compile(model, devices=pipeline, pipeline=pipeline, microbatches=chunks, example_kwargs=kwargs,
                             device_type="cpu")  # fmt: skip
    assert cm.plan.capture == "export" and cm.plan.num_stages == pipeline
    assert not [f for f in cm.plan.fallbacks if f["path"] in ("static shapes", "batch > 1")]
    assert cm.plan.microbatches * cm.plan.data_degree == chunks
    check_step(cm, reference, kwargs, targets, case.loss)


def test_a_mixture_of_experts_trains_with_microbatches_and_data_parallelism() -> None:
    """Mixtral's expert dispatch sorts the tokens of the whole batch by expert (plan.batch follows the sort and its
    inverse): split into 2 replicas x 2 microbatches over 2 stages, a step equals single-process training."""
    torch.manual_seed(0)
    model = _mixtral()
    reference = copy.deepcopy(model)
    kwargs, targets = _causal(8, 8)
    cm = partitioner.compile(model, devices=4, pipeline=2, microbatches=2, example_kwargs=kwargs, device_type="cpu")
    assert (cm.plan.data_degree, cm.plan.microbatches, cm.plan.num_stages) == (2, 2, 2)
    assert not [f for f in cm.plan.fallbacks if f["path"].startswith("batch")], cm.plan.fallbacks
    check_step(cm, reference, kwargs, targets, _lm_loss)


def test_a_mixture_of_experts_trains_with_its_experts_tensor_parallel() -> None:
    """Mixtral at pp2 x tp2 with 2 microbatches: each expert's gate | up columns and down rows split over the tp ranks
    (the grouped products' partial sums all-reduced), the routers replicated; a step equals single-process training."""
    torch.manual_seed(0)
    model = _mixtral()
    reference = copy.deepcopy(model)
    kwargs, targets = _causal(8, 8)
    cm = partitioner.compile(model, devices=4, pipeline=2, tensor_parallel=2, microbatches=2, example_kwargs=kwargs,
                             device_type="cpu")  # fmt: skip
    assert (cm.plan.num_stages, cm.plan.microbatches) == (2, 2)
    layout = cm.tensor_parallel_plan
    assert layout.param_shard["model.layers.1.mlp.experts.gate_up_proj"] == {"dim": 1, "parts": 2}
    assert layout.param_shard["model.layers.1.mlp.experts.down_proj"] == {"dim": 2, "parts": 1}
    check_step(cm, reference, kwargs, targets, _lm_loss)


def test_steps_take_other_batch_sizes_and_sequence_lengths() -> None:
    torch.manual_seed(0)
    model = _gpt2()
    reference = copy.deepcopy(model)
    kwargs, targets = _causal(8, 8)
    cm = partitioner.compile(model, devices=2, pipeline=2, example_kwargs=kwargs, device_type="cpu")
    for batch, seq in [(8, 8), (24, 8), (16, 5), (8, 12)]:  # 1 to 3 rows per chunk, shorter and longer sequences
        kwargs, targets = _causal(batch, seq)
        check_step(cm, reference, kwargs, targets, _lm_loss)


def test_dropout_in_train_mode_with_the_same_seed() -> None:
    torch.manual_seed(0)
    model = _gpt2(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    reference = copy.deepcopy(model)
    kwargs, targets = _causal(8, 8)
    cm = partitioner.compile(model, devices=2, pipeline=2, example_kwargs=kwargs, device_type="cpu")
    check_step(cm, reference, kwargs, targets, _lm_loss, seed=5)


def test_input_ids_alone_take_one_row_microbatches() -> None:
    """The issue's repro: without an attention mask HF branches on `batch != 1` (position ids expanded to the
    batch); the export that assumes 2+ rows hold for 1 is taken because its graph matches the model on one row."""
    torch.manual_seed(0)
    model = _gpt2()
    reference = copy.deepcopy(model)
    ids = _ids(8, 8, seed=0)
    cm = partitioner.compile(
        model, devices=2, pipeline=2, microbatches=8, example_inputs=(ids,), example_kwargs={"use_cache": False},
        device_type="cpu",
    )  # fmt: skip
    assert cm.plan.microbatches * cm.plan.data_degree == 8  # one row each
    assert [f["path"] for f in cm.plan.fallbacks] == ["torch.export"]
    check_step(cm, reference, {"input_ids": ids, "use_cache": False}, ids, _lm_loss)


@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_on_meta_input_ids_alone_take_one_row_microbatches_as_with_weights(build: Callable[[], nn.Module]) -> None:
    """The same models on meta, where no run can check one row: the export assuming 2+ rows hold for 1 makes the ATen
    calls of the model's own one-row export (capture.one_row), so it is taken there too, as with weights (where a
    run on one row checks it), and a step may cut one-row microbatches."""
    from partitioner.capture import capture

    torch.manual_seed(0)
    model = build()
    with torch.device("meta"):
        on_meta = build()
    ids = _ids(8, 8, seed=0)
    kwargs = {"use_cache": False}
    checked = capture(model, (ids,), kwargs)
    planned = capture(on_meta, (ids.to("meta"),), kwargs)
    assert [f.path for f in planned.fallbacks] == [f.path for f in checked.fallbacks] == ["torch.export"]
    assert planned.input_shapes["input_ids"][0].min == 1
    cm = partitioner.compile(on_meta, devices=2, pipeline=2, microbatches=8, example_inputs=(ids.to("meta"),),
                             example_kwargs=kwargs, device_type="cpu")  # fmt: skip
    assert cm.plan.microbatches * cm.plan.data_degree == 8  # one row each


# ---------------------------------------------------------------------------------------------------
# a batch dim export cannot make dynamic


class PinnedBatch(nn.Module):
    """Adds a (8, d) table to every row: the batch is pinned to 8. A branch on a size keeps it on the export path."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d)
        self.register_buffer("table", torch.randn(8, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.a.in_features:  # fx cannot branch on a traced size; export reads it
            raise ValueError("wrong feature size")
        return self.b(torch.relu(self.a(x) + self.table))


def test_pinned_batch_falls_back_to_static_shapes_with_a_clear_error() -> None:
    """Export cannot keep the batch symbolic: the plan says why, the batch is not split (one microbatch, no data
    parallelism), asking for a split is refused, and a step on another batch size says what to do."""
    torch.manual_seed(0)
    model = PinnedBatch()
    reference = copy.deepcopy(model)
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    cm = partitioner.compile(model, devices=2, pipeline=2, example_inputs=(x,), device_type="cpu")
    (static,) = [f for f in cm.plan.fallbacks if f["path"] == "static shapes"]
    assert "dim 0 of 'x' to 8" in static["reason"]
    assert (cm.plan.microbatches, cm.plan.data_degree) == (1, 1)
    torch.testing.assert_close(cm(x), model(x))  # the example's shape runs
    loss = cm.step((x,), y, F.mse_loss)
    expected = F.mse_loss(reference(x), y)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach())
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)

    with pytest.raises(ValueError, match="specialized to the example's batch size"):
        partitioner.compile(model, devices=2, pipeline=2, microbatches=2, example_inputs=(x,), device_type="cpu")
    with pytest.raises(ValueError) as info:
        cm.step((torch.randn(16, 4),), torch.randn(16, 4), F.mse_loss)
    message = str(info.value)
    for part in ("'x'", "dim 0", "16", "batch dim could not be made dynamic", "dim 0 of 'x' to 8", "microbatches=1"):
        assert part in message, part
