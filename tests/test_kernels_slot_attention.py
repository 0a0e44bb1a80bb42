"""kernels.slot_attention: the Triton kernels (interpreter on CPU) against the plain-PyTorch reference."""

from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from partitioner.kernels._dispatch import INTERPRET, use_triton
from partitioner.kernels.slot_attention import slot_attention, slot_attention_reference

torch.fx.wrap("slot_attention")  # traced as a leaf, as the MetaSlot model does

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1 (tests/conftest.py)")

# (B, S, N, D, Dv): odd sizes, token tails shorter than a tile (BLOCK_N = 16 and 32-token splits under the
# interpreter), several splits, S above 16 (slot tile 32), D and Dv below the 16-wide minimum tile.
SHAPES = [
    (1, 1, 1, 16, 16),
    (2, 7, 50, 24, 20),
    (3, 11, 33, 16, 40),
    (1, 6, 16, 32, 32),
    (2, 3, 100, 8, 5),
    (1, 17, 37, 20, 12),
]
# Errors are measured relative to the largest reference magnitude: (fp32, bf16) inputs.
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, masked: bool, seed: int = 0) -> tuple[torch.Tensor, ...]:
    b, s, n, d, dv = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, s, d, generator=gen) * 2  # sharper softmaxes than unit logits
    k = torch.randn(b, n, d, generator=gen)
    v = torch.randn(b, n, dv, generator=gen)
    mask = None
    if masked:
        mask = torch.rand(b, s, generator=gen) > 0.4
        mask[:, 0] = True  # at least one active slot per row
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype], msg=what)


def _fp32_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    du: torch.Tensor,
    da: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, ...]]:
    """Reference forward and (dq, dk, dv) in fp32 from the same (possibly bf16) inputs."""
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    u, a = slot_attention_reference(q32, k32, v32, mask)
    loss = (u * du.float()).sum() + (0 if da is None else (a * da.float()).sum())
    return u, a, torch.autograd.grad(loss, (q32, k32, v32))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("masked", [False, True], ids=["all", "masked"])
@pytest.mark.parametrize("return_attn", [False, True], ids=["upd", "attn"])
def test_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, masked: bool, return_attn: bool) -> None:
    q, k, v, mask = _inputs(shape, dtype, masked)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    u, a = slot_attention(q, k, v, mask, return_attn=return_attn, backend="triton")
    assert u.shape == (shape[0], shape[1], shape[4]) and u.dtype == dtype
    assert (a is not None) == return_attn

    du = torch.randn_like(u)
    da = torch.randn_like(a) if return_attn else None
    u_ref, a_ref, grads_ref = _fp32_reference(q, k, v, mask, du, da)
    _assert_close(u, u_ref, dtype, "updates")
    if return_attn:
        _assert_close(a, a_ref, dtype, "attn")
        if mask is not None:
            assert (a.float()[~mask] == 0).all(), "inactive slots take no attention"

    loss = (u * du).sum() + (0 if da is None else (a * da).sum())
    for name, g, g_ref in zip("qkv", torch.autograd.grad(loss, (q, k, v)), grads_ref):
        assert g.dtype == dtype
        _assert_close(g, g_ref, dtype, f"d{name}")


def test_metaslot_shape_and_noncontiguous() -> None:
    """MetaSlot-like sizes (D = 256, several splits) with transposed (non-contiguous) k and v."""
    b, s, n, d = 1, 7, 96, 256
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, s, d, generator=gen).requires_grad_()
    k = torch.randn(b, d, n, generator=gen).transpose(1, 2).requires_grad_()
    v = torch.randn(b, d, n, generator=gen).transpose(1, 2).requires_grad_()
    u, a = slot_attention(q, k, v, None, 1e-8, return_attn=True, backend="triton")
    u_ref, a_ref = slot_attention_reference(q, k, v, None, 1e-8)
    _assert_close(u, u_ref, torch.float32, "updates")
    _assert_close(a, a_ref, torch.float32, "attn")
    du = torch.randn_like(u)
    grads = torch.autograd.grad((u * du).sum(), (q, k, v))
    grads_ref = torch.autograd.grad((u_ref * du).sum(), (q, k, v))
    for g, g_ref in zip(grads, grads_ref):
        _assert_close(g, g_ref, torch.float32, "grad")


@pytest.mark.parametrize("chunk", [16, 64])
@pytest.mark.parametrize("shape", [(1, 5, 40, 130, 20), (2, 3, 50, 24, 72)], ids=["wide-d", "wide-dv"])
def test_backward_feature_chunks(monkeypatch: pytest.MonkeyPatch, shape: tuple[int, ...], chunk: int) -> None:
    """The backward writes dk and dv BLOCK_C = min(chunk, BLOCK_D, BLOCK_DV) features at a time: several chunks,
    a chunk cut by D or Dv and chunks wholly past it, for q / k (wide-d) and v (wide-dv), masked, with attn."""
    sa = importlib.import_module("partitioner.kernels.slot_attention")  # the package exports a function so named

    monkeypatch.setattr(sa, "_DK_CHUNK", chunk)
    q, k, v, mask = _inputs(shape, torch.float32, True, seed=3)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    u, a = slot_attention(q, k, v, mask, return_attn=True, backend="triton")
    du, da = torch.randn_like(u), torch.randn_like(a)
    _, _, grads_ref = _fp32_reference(q, k, v, mask, du, da)
    for name, g, g_ref in zip("qkv", torch.autograd.grad((u * du).sum() + (a * da).sum(), (q, k, v)), grads_ref):
        _assert_close(g, g_ref, torch.float32, f"d{name}")


@settings(max_examples=12)
@given(
    b=st.integers(1, 3),
    s=st.integers(1, 12),
    n=st.integers(1, 70),
    d=st.integers(1, 40),
    dv=st.integers(1, 40),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_small_shapes(b: int, s: int, n: int, d: int, dv: int, masked: bool, seed: int) -> None:
    q, k, v, mask = _inputs((b, s, n, d, dv), torch.float32, masked, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    u, a = slot_attention(q, k, v, mask, return_attn=True, backend="triton")
    du = torch.randn_like(u)
    u_ref, a_ref, grads_ref = _fp32_reference(q, k, v, mask, du, None)
    _assert_close(u, u_ref, torch.float32, "updates")
    _assert_close(a, a_ref, torch.float32, "attn")
    for g, g_ref in zip(torch.autograd.grad((u * du).sum(), (q, k, v)), grads_ref):
        _assert_close(g, g_ref, torch.float32, "grad")


def test_auto_dispatch_runs_triton_on_cpu_under_interpreter() -> None:
    q, k, v, mask = _inputs((2, 5, 20, 16, 16), torch.float32, True)
    assert use_triton(q, k, v, mask, backend="auto")
    u_auto, _ = slot_attention(q, k, v, mask)
    u_ref, _ = slot_attention(q, k, v, mask, backend="reference")
    _assert_close(u_auto, u_ref, torch.float32, "auto vs reference")


def test_meta_tensors_and_flop_counter() -> None:
    """The partitioner's annotate pass: meta tensors under FlopCounterMode take the reference and are counted."""
    q = torch.empty(4, 7, 256, device="meta")
    k = torch.empty(4, 1024, 256, device="meta")
    v = torch.empty(4, 1024, 256, device="meta")
    mask = torch.ones(4, 7, dtype=torch.bool, device="meta")
    for backend in ("auto", "reference"):
        with FlopCounterMode(display=False) as counter:
            u, a = slot_attention(q, k, v, mask, return_attn=True, backend=backend)
        assert u.shape == (4, 7, 256) and u.device.type == "meta" and a.shape == (4, 7, 1024)
        assert counter.get_total_flops() == 2 * (2 * 4 * 7 * 1024 * 256)  # two bmm's: logits and updates


def test_flop_counter_on_cpu_tensors_sees_reference_ops() -> None:
    q, k, v, _ = _inputs((1, 3, 20, 16, 16), torch.float32, False)
    with FlopCounterMode(display=False) as counter:
        slot_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 3 * 20 * 16)


class _Step(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        updates, _ = slot_attention(q, k, v)
        return updates + 1


def test_fx_wrap_records_a_leaf_call() -> None:
    gm = torch.fx.symbolic_trace(_Step())
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert slot_attention in targets
    q, k, v, _ = _inputs((2, 4, 18, 16, 8), torch.float32, False)
    torch.testing.assert_close(gm(q, k, v), _Step()(q, k, v))


def test_triton_backend_on_unsupported_input_errors_clearly() -> None:
    q = torch.empty(2, 3, 16, device="meta")
    k = torch.empty(2, 5, 16, device="meta")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: device type 'meta'"):
        slot_attention(q, k, k, backend="triton")
    q64, k64 = torch.randn(2, 3, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        slot_attention(q64, k64, k64, backend="triton")
    u, _ = slot_attention(q64, k64, k64)  # auto falls back to the reference for float64
    assert u.dtype == torch.float64
    with pytest.raises(ValueError, match="backend must be one of"):
        slot_attention(q64, k64, k64, backend="cuda")  # type: ignore[arg-type]
    empty = torch.randn(0, 3, 16)
    with pytest.raises(RuntimeError, match="empty batch"):
        slot_attention(empty, torch.randn(0, 5, 16), torch.randn(0, 5, 16), backend="triton")
    assert slot_attention(empty, torch.randn(0, 5, 16), torch.randn(0, 5, 8))[0].shape == (0, 3, 8)


@pytest.mark.parametrize(
    ("q_shape", "k_shape", "v_shape", "mask_shape"),
    [
        ((2, 3, 16), (2, 5, 8), (2, 5, 4), None),  # D mismatch
        ((2, 3, 16), (3, 5, 16), (3, 5, 4), None),  # B mismatch
        ((2, 3, 16), (2, 5, 16), (2, 6, 4), None),  # N mismatch
        ((3, 16), (2, 5, 16), (2, 5, 4), None),  # q not 3-D
        ((2, 3, 16), (2, 5, 16), (2, 5, 4), (2, 4)),  # mask shape
    ],
)
def test_wrong_shapes_raise_value_error_naming_them(
    q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...], mask_shape: tuple[int, ...] | None
) -> None:
    q, k, v = torch.randn(q_shape), torch.randn(k_shape), torch.randn(v_shape)
    mask = None if mask_shape is None else torch.ones(mask_shape, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"q \(.*k \(.*v \("):
        slot_attention(q, k, v, mask)


def test_row_without_active_slot_is_rejected() -> None:
    q, k, v, _ = _inputs((2, 4, 10, 16, 16), torch.float32, False)
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(ValueError, match=r"no active slot in batch rows \[1\]"):
        slot_attention(q, k, v, mask)


def test_autotune_pruning_keeps_a_fitting_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU autotune space (only used on CUDA) pruned for MetaSlot sizes: non-empty, within the split, and by
    the limits the sm_90 compiles showed (tests/test_kernels_slot_attention_limits.py checks the models)."""
    sa = importlib.import_module("partitioner.kernels.slot_attention")  # the package exports a function so named

    monkeypatch.setattr(sa, "INTERPRET", False)
    configs = sa._configs()
    assert len(configs) > 1
    meta = dict(BLOCK_S=16, BLOCK_D=256, BLOCK_DV=256)
    for kernel in ("fwd", "bwd"):
        for dtype, precision in ((torch.float32, "ieee"), (torch.float32, "tf32"), (torch.bfloat16, "ieee")):
            args = {"K": torch.empty(1, dtype=dtype)}
            kept = sa._prune(kernel, configs, args, n_per_split=128, DOT_PRECISION=precision, **meta)
            assert 0 < len(kept) < len(configs) and all(c.kwargs["BLOCK_N"] <= 128 for c in kept)
            kept = sa._prune(kernel, configs, args, n_per_split=20, DOT_PRECISION=precision, **meta)
            assert {c.kwargs["BLOCK_N"] for c in kept} <= {16, 32}
    # The backward's fp32 FMA dots spilled at every num_stages=1 config: none is kept
    kept = sa._prune("bwd", configs, {"K": torch.empty(1)}, n_per_split=256, DOT_PRECISION="ieee", **meta)
    assert kept and all(c.num_stages >= 2 for c in kept)
    # TF32 changes what is kept (and the key has DOT_PRECISION, so each setting is tuned on its own)
    tf32 = sa._prune("bwd", configs, {"K": torch.empty(1)}, n_per_split=256, DOT_PRECISION="tf32", **meta)
    assert set(map(str, tf32)) != set(map(str, kept))
    assert (
        "DOT_PRECISION" in sa._slot_attention_fwd_kernel.keys and "DOT_PRECISION" in sa._slot_attention_bwd_kernel.keys
    )
    # Nothing fits (huge tiles): the smallest config still runs
    huge = dict(n_per_split=128, BLOCK_S=128, BLOCK_D=4096, BLOCK_DV=4096)
    assert len(sa._prune("fwd", configs, {}, **huge)) == len(sa._prune("bwd", configs, {}, **huge)) == 1


# ----------------------------------------------------------------------------------------------------------
# partitioner/kernels/_dispatch.py rules (shared with the other kernels)
# ----------------------------------------------------------------------------------------------------------


def test_dispatch_rules() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    cpu = torch.randn(2, 3)
    meta = torch.empty(2, 3, device="meta")
    assert use_triton(cpu, None, backend="auto")  # CPU under TRITON_INTERPRET=1; None arguments are skipped
    assert not use_triton(cpu, backend="reference")
    assert not use_triton(meta, backend="auto")
    assert not use_triton(cpu, meta, backend="auto")  # mixed devices
    assert not use_triton(cpu, backend="auto", extra_reason="kernel objects")
    with pytest.raises(RuntimeError, match="kernel objects"):
        use_triton(cpu, backend="triton", extra_reason="kernel objects")
    with pytest.raises(RuntimeError, match="different devices"):
        use_triton(cpu, meta, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        use_triton(cpu, backend="Triton")
    with FlopCounterMode(display=False):
        assert not use_triton(cpu, backend="auto")  # a dispatch mode would not see a Triton launch
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(cpu)
        assert not use_triton(fake, backend="auto")
        q, k = mode.from_tensor(torch.randn(2, 3, 16)), mode.from_tensor(torch.randn(2, 5, 16))
        u, _ = slot_attention(q, k, k)
        assert u.shape == (2, 3, 16)
    assert torch.func.vmap(lambda t: torch.tensor(use_triton(t, backend="auto")))(cpu).sum() == 0


@pytest.mark.slow
def test_torch_compile_traces_the_reference() -> None:
    """Inside torch.compile, "auto" takes the reference, so a whole model compiles with fullgraph=True."""
    q, k, v, mask = _inputs((2, 5, 20, 16, 16), torch.float32, True)
    compiled = torch.compile(lambda q, k, v, m: slot_attention(q, k, v, m)[0], fullgraph=True)
    _assert_close(compiled(q, k, v, mask), slot_attention_reference(q, k, v, mask)[0], torch.float32, "compiled")
