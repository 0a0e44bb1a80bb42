"""Gated activations (partitioner.gated, passes.fuse_gated): `act(gate) * up` run as one autograd op that saves
gate and up only. Bit-identical outputs and gradients, one activation width less kept per pair, priced by annotate
as the runtime runs it, on fx and torch.export graphs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import partitioner
import zoo
from bench.activation_memory import kept_bytes
from partitioner.annotate import annotate
from partitioner.capture import capture
from partitioner.gated import ACTIVATIONS, _activate, gated_activation, gated_pair
from partitioner.passes.fuse_gated import fuse_gated_activations

FORMS = [("silu", "none"), ("gelu", "none"), ("gelu", "tanh"), ("relu", "none"), ("sigmoid", "none"), ("tanh", "none")]


def _kept(fn, *args) -> list[torch.Size]:
    """Shapes of the tensors autograd keeps for backward while `fn(*args)` runs."""
    kept: list[torch.Size] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*args)
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("gate_first", [True, False])
@pytest.mark.parametrize("act, approximate", FORMS)
def test_the_fused_op_is_bit_identical_to_the_pair_and_saves_its_two_inputs(
    act: str, approximate: str, gate_first: bool, dtype: torch.dtype
) -> None:
    g0 = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    u0 = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(1)).to(dtype)
    w = torch.randn(3, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype)

    def pair(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        s = _activate(g, act, approximate)
        return s * u if gate_first else u * s

    results = []
    for fn in (pair, lambda g, u: gated_activation(g, u, act, approximate, gate_first)):
        g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
        out = fn(g, u)
        (out * w).sum().backward()
        results.append((out, g.grad, u.grad))
    for want, got in zip(results[0], results[1]):
        assert torch.equal(got, want)
    g, u = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    assert len(_kept(gated_activation, g, u, act, approximate, gate_first)) == 2
    assert len(_kept(pair, g, u)) == 3  # gate (or the activation's output), the activation's output, up


def test_the_op_falls_back_to_the_pair_where_the_fusion_would_not_be_it() -> None:
    g = torch.randn(4, 8, requires_grad=True)
    u = torch.randn(8, requires_grad=True)  # broadcast: the pair's backward sums up's gradient over the rows
    out = gated_activation(g, u)
    out.sum().backward()
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    (F.silu(g2) * u2).sum().backward()
    assert torch.equal(g.grad, g2.grad) and torch.equal(u.grad, u2.grad)
    with torch.no_grad():
        assert torch.equal(gated_activation(g, g), F.silu(g) * g)
    with pytest.raises(ValueError, match="unknown activation 'swish'.*silu"):
        gated_activation(g, g, "swish")
    assert set(ACTIVATIONS) == {"silu", "gelu", "relu", "sigmoid", "tanh"}


def test_double_backward_through_the_fused_op_is_refused() -> None:
    g = torch.randn(6, requires_grad=True)
    u = torch.randn(6, requires_grad=True)
    (grad,) = torch.autograd.grad(gated_activation(g, u).sum(), g, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        grad.sum().backward()


class _Patterns(nn.Module):
    """Gated products and look-alikes: what gated_pair matches and what it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)
        self.silu, self.gelu = nn.SiLU(), nn.GELU(approximate="tanh")
        self.inplace = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.gate(x), self.up(x)
        a = self.silu(g) * u  # module, gate first: fused
        b = u * self.gelu(g)  # up first, gelu's tanh form: fused
        c = torch.mul(F.relu(g), u)  # torch.mul: fused
        s = torch.sigmoid(g)
        d = s * u + s  # the activation used twice: kept (its output must be kept anyway)
        e = F.silu(g) * 2.0  # a product with a number: nothing to gain
        f = self.inplace(g.clone()) * u  # in place: not matched
        h = torch.tanh(g).mul(u)  # the method: fused
        return self.down(a + b + c + d + e + f + h)


def test_the_matcher_takes_gated_products_only_and_the_pass_keeps_the_graph_exact() -> None:
    torch.manual_seed(0)
    gm = fx.symbolic_trace(_Patterns())
    matched = {n.name: (p.act, p.approximate, p.gate_first) for n in gm.graph.nodes if (p := gated_pair(n, gm))}
    assert matched == {"mul": ("silu", "none", True), "mul_1": ("gelu", "tanh", False), "mul_2": ("relu", "none", True),
                       "mul_6": ("tanh", "none", True)}  # fmt: skip
    fused = fuse_gated_activations(gm)
    calls = [n for n in fused.graph.nodes if n.target is gated_activation]
    assert sorted(n.name for n in calls) == sorted(matched)
    assert {n.name for n in gm.graph.nodes} - {n.name for n in fused.graph.nodes} == {"silu", "gelu", "relu", "tanh"}
    assert not hasattr(fused, "silu") and fused.gate is gm.gate  # the same parameters, the unused module dropped
    x = torch.randn(5, 8)
    want, got = gm(x), fused(x)
    assert torch.equal(got, want)
    want.pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in gm.named_parameters()}
    for p in gm.parameters():
        p.grad = None
    got.pow(2).sum().backward()
    for k, p in fused.named_parameters():
        assert torch.equal(p.grad, grads[k]), k
    plain = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.GELU()))
    assert fuse_gated_activations(plain) is plain


def _saved_bytes(gm: nn.Module, *inputs: torch.Tensor) -> int:
    """Bytes of the activation storages autograd keeps (each storage once, the parameters left out)."""
    return kept_bytes(gm, inputs, list(gm.parameters()))


def _check_graph(gm: fx.GraphModule, inputs: list[torch.Tensor], layers: int) -> None:
    """Every layer's SwiGLU fused, priced without the activation's output, and kept that much smaller at run time;
    outputs and gradients bit-identical."""
    annotate(gm, inputs, training=True)
    gated = [n for n in gm.graph.nodes if "gated_activation" in n.meta]
    assert len(gated) == layers
    activations = {n.meta["gated_activation"]: n for n in gated}
    width = 0
    for name, product in activations.items():
        act = next(n for n in gm.graph.nodes if n.name == name)
        assert name not in product.meta["saves"]  # up is saved by the product, the gate by the activation
        assert len(product.meta["saves"]) == 1 and act.meta["saves"]
        width += act.meta["out_bytes"]
    fused = fuse_gated_activations(gm)
    assert sum(n.target is gated_activation for n in fused.graph.nodes) == layers
    assert _saved_bytes(gm, *inputs) - _saved_bytes(fused, *inputs) == width
    outs = []
    for module in (gm, fused):
        module.zero_grad()
        out = module(*inputs)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().pow(2).mean().backward()
        outs.append((out.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}))
    assert torch.equal(outs[0][0], outs[1][0])
    assert outs[0][1].keys() == outs[1][1].keys() and outs[0][1]
    for k, g in outs[0][1].items():
        assert torch.equal(outs[1][1][k], g), k


def test_zoo_llama_fx_graph_fuses_every_layer_s_swiglu() -> None:
    torch.manual_seed(0)
    model = zoo.get("llama-tiny")
    x = zoo.example_inputs("llama-tiny", batch=2, seq=16)
    cg = capture(model, x)
    assert cg.method == "fx"
    _check_graph(cg.graph_module, cg.flatten_inputs(x, {}), len(model.layers))


def test_hf_llama_export_graph_fuses_every_layer_s_swiglu() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    call = {"input_ids": torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))}
    cg = capture(model, (), call)
    assert cg.method == "export"
    _check_graph(cg.graph_module, cg.flatten_inputs((), call), 2)


def test_a_compiled_llama_runs_its_swiglu_fused_and_trains_as_the_model() -> None:
    torch.manual_seed(0)
    model = zoo.get("llama-tiny")
    x = zoo.example_inputs("llama-tiny", batch=4, seq=16)
    y = zoo.example_targets("llama-tiny", batch=4, seq=16)
    reference = copy.deepcopy(model)
    cm = partitioner.compile(model, 2, x, pipeline=2, microbatches=2)
    assert sum(n.target is gated_activation for st in cm.stages for n in st.module.graph.nodes) == len(model.layers)

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, 1), target.flatten())

    loss = cm.step(x, y, loss_fn)
    halves = [loss_fn(reference(xs), ys) for xs, ys in zip(x[0].chunk(2), y.chunk(2))]
    (sum(halves) / 2).backward()
    torch.testing.assert_close(loss, sum(h.detach() for h in halves) / 2)
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, msg=lambda m, k=name: f"{k}: {m}")
