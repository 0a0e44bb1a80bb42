"""kernels/msglam.py: the fused Triton MS-GLAM attention (Gaussian non-local + CBAM) against the plain-PyTorch
reference in fp64, forward and the gradients of all 11 inputs (sigma included). Runs under TRITON_INTERPRET=1 on
the CPU (tests/conftest.py sets it), so the shapes are tiny."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from partitioner.kernels._dispatch import tl, triton
from partitioner.kernels.msglam import (
    _dot_terms,
    cbam_reference,
    msglam_attention,
    msglam_attention_reference,
    nonlocal_attention_reference,
)

NAMES = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "log_sigma", "ca_w1", "ca_w2", "sa_w")
# Max error relative to the fp64 reference's largest magnitude. fp32 is off by summation order (the kernel accumulates
# in fp32, its dots are exact FMA). bf16 / fp16: outputs and grads are rounded to the dtype (half an ulp: 2e-3 / 2.4e-4
# relative at the top of a binade) and the tensor-core dots take P, v, dS, q, k rounded once (the logits and dP
# hi + lo split, see kernels/msglam.py); measured at SHAPES: bf16 <= 8.5e-3 (d bq), fp16 <= 5.3e-4. The bounds leave
# ~2x above that, and one rounding more of the logits (d log_sigma 1.1e-1 in bf16, 4.3e-3 in fp16) fails them.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _inputs(
    B: int, C: int, H: int, W: int, dtype: torch.dtype, seed: int = 0, log_sigma: float = 1.0
) -> list[torch.Tensor]:
    """Arguments of msglam_attention in NAMES order, leaf tensors requiring grad. sigma = e^1 keeps the softmax
    neither one-hot nor uniform for unit-variance features and 1/sqrt(C)-scaled projections."""
    g = torch.Generator().manual_seed(seed)
    D, R = C // 2, max(1, C // 16)
    rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=g) * s  # noqa: E731
    ts = [
        rnd(B, C, H, W),
        rnd(D, C, s=C**-0.5),
        rnd(D, s=0.1),
        rnd(D, C, s=C**-0.5),
        rnd(D, s=0.1),
        rnd(C, C, s=C**-0.5),
        rnd(C, s=0.1),
        torch.tensor(log_sigma),
        rnd(R, C, s=C**-0.5),
        rnd(C, R, s=R**-0.5),
        rnd(1, 2, 7, 7, s=0.2),
    ]
    return [t.to(dtype).requires_grad_() for t in ts]


def _close(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got.double() - want.double()).abs().max().item()
    scale = max(want.double().abs().max().item(), 1e-3)
    assert err <= tol * scale, f"{name}: max error {err:.3e} > {tol:.0e} x max |ref| {scale:.3e}"


# odd maps (3x5, 5x3, 7x7 = DMAGaze), one token, maps wider than the 7x7 conv (9x11: 99 tokens, a 128 tile), C = 48
# (D = 24 and R = 3: no power of two). The interpreter's config (BLOCK_CV = 32) gives C = 48 / 64 two non-local
# programs per sample (the last half padded at 48); CBAM's channel chunks (2048 // BLOCK_N) are split at 7x7 with
# C = 48 / 64 and at 9x11; fp32 at 7x7 and 9x11 contracts tokens 16 at a time through the scratch.
SHAPES = [(1, 32, 3, 5), (2, 64, 7, 7), (3, 32, 7, 7), (2, 32, 1, 1), (1, 64, 5, 3), (1, 32, 9, 11), (2, 48, 7, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    args = _inputs(*shape, dtype=dtype)
    ref_args = [a.detach().double().requires_grad_() for a in args]  # the reference in fp64 on the same values
    nl, cb = msglam_attention(*args, backend="triton")
    assert nl.dtype == cb.dtype == dtype and nl.shape == cb.shape == shape
    assert type(nl.grad_fn).__name__ == "_MSGLAMAttentionBackward"  # the Triton autograd.Function ran
    nl_ref, cb_ref = msglam_attention_reference(*ref_args)
    _close("nonlocal_out", nl, nl_ref, TOL[dtype])
    _close("cbam_out", cb, cb_ref, TOL[dtype])
    # random upstream gradients for both outputs, representable in dtype (autograd hands the kernel dtype grads)
    g = torch.Generator().manual_seed(1)
    g_nl, g_cb = (torch.randn(shape, generator=g).to(dtype).double() for _ in range(2))
    grads = torch.autograd.grad((nl.double() * g_nl).sum() + (cb.double() * g_cb).sum(), args)
    grads_ref = torch.autograd.grad((nl_ref * g_nl).sum() + (cb_ref * g_cb).sum(), ref_args)
    for name, got, want, a in zip(NAMES, grads, grads_ref, args, strict=True):
        assert got.dtype == a.dtype, f"d{name} dtype {got.dtype} != {a.dtype}"
        _close(f"d{name}", got, want, TOL[dtype])


@pytest.mark.parametrize("log_sigma", [-1.0, 3.0], ids=["peaked", "flat"])
def test_sigma_extremes(log_sigma: float) -> None:
    """Near one-hot (small sigma) and near uniform (large sigma) attention, forward and gradients, against fp64.

    With sigma = 1/e the logits are ~ -50 and d log_sigma = -2 sum(dS * logits) cancels large terms: fp32 (kernel
    and fp32 reference alike) lands ~1e-4 relative from fp64 there, hence the looser bound.
    """
    args = _inputs(2, 32, 7, 7, torch.float32, seed=2, log_sigma=log_sigma)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    out = msglam_attention(*args, backend="triton")[0]
    ref = nonlocal_attention_reference(*ref_args[:8])
    _close("nonlocal_out", out, ref, 1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    got = torch.autograd.grad((out * g).sum(), args[:8])
    want = torch.autograd.grad((ref * g).sum(), ref_args[:8])
    for name, a, b in zip(NAMES, got, want, strict=False):
        _close(f"d{name}", a, b, 3e-4 if name == "log_sigma" else 1e-4)


@pytest.mark.parametrize("shape", [(2, 32, 3, 5), (2, 64, 7, 7)], ids=["one_chunk", "two_chunks"])
@pytest.mark.parametrize("case", ["constant_tokens", "zeros"])
def test_max_pool_ties_split_like_torch_amax(case: str, shape: tuple[int, int, int, int]) -> None:
    """Both CBAM max pools hit ties: tokens constant per channel (channel pool: N-way ties) and an all-zero map
    (spatial pool: C-way ties too). The kernel splits the gradient evenly between the maxima, as torch.amax; at 7x7
    with C = 64 the channels come in two chunks of 32, whose maxima and tie counts the kernel merges."""
    args = _inputs(*shape, torch.float32, seed=4)
    x = args[0].detach()
    x = x[:, :, :1, :1].expand_as(x).contiguous() if case == "constant_tokens" else torch.zeros_like(x)
    args[0] = x.requires_grad_()
    ref_args = [a.detach().double().requires_grad_() for a in args]
    cb = msglam_attention(*args, backend="triton")[1]
    cb_ref = cbam_reference(ref_args[0], *ref_args[8:])
    _close("cbam_out", cb, cb_ref, 1e-5)
    g = torch.randn(cb.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    got = torch.autograd.grad((cb * g).sum(), [args[0], *args[8:]])
    want = torch.autograd.grad((cb_ref * g).sum(), [ref_args[0], *ref_args[8:]])
    for name, a, b in zip(("x", "ca_w1", "ca_w2", "sa_w"), got, want, strict=True):
        _close(f"d{name}", a, b, 1e-4)


def test_autotune_pruning() -> None:
    """On a GPU the 18 configs are pruned to tiles no wider than the problem and, by dtype and direction, to those
    that compile for sm_90 without spills (bench/kernels_sm90.py checks them); never to nothing."""
    from triton import Config

    from partitioner.kernels.msglam import _prune, _prune_bwd

    configs = [
        Config({"BLOCK_K": k, "BLOCK_CV": c}, num_warps=w) for k in (16, 32, 64) for c in (32, 64, 128) for w in (4, 8)
    ]

    def kept(C: int, dtype: torch.dtype, prune: Any = _prune) -> set[tuple[int, int, int]]:
        named = {"C": C, "D": C // 2, "x_ptr": torch.empty(0, dtype=dtype)}
        return {(c.kwargs["BLOCK_K"], c.kwargs["BLOCK_CV"], c.num_warps) for c in prune(configs, named)}

    # DMAGaze's C = 256. 16-bit: BLOCK_K 32 or 64, the backward and BLOCK_K = 64 at 8 warps; fp32: one BLOCK_K,
    # 8 warps, BLOCK_CV <= 64.
    for dtype in (torch.bfloat16, torch.float16):
        assert kept(256, dtype) == {(32, c, w) for c in (32, 64, 128) for w in (4, 8)} | {
            (64, c, 8) for c in (32, 64, 128)
        }
        assert kept(256, dtype, _prune_bwd) == {(k, c, 8) for k in (32, 64) for c in (32, 64, 128)}
    assert kept(256, torch.float32) == kept(256, torch.float32, _prune_bwd) == {(32, 32, 8), (32, 64, 8)}
    # C = 32 (D = 16): no BLOCK_CV over 32, no BLOCK_K over 32
    assert kept(32, torch.bfloat16) == {(32, 32, 4), (32, 32, 8)}
    assert kept(32, torch.float32, _prune_bwd) == {(32, 32, 8)}
    assert _prune(configs[:1], {"C": 256, "D": 128, "x_ptr": torch.empty(0)}) == configs[:1]  # never nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_both_token_contraction_paths(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """P @ v, P^T g, dS k, dS^T q contract over tokens in one dot (16-bit on a GPU) or 16 tokens at a time through
    the per-program scratch (fp32): each dtype is run down the path it does not take by default, at 7x7 (64 tokens:
    four chunks) with two non-local programs per sample."""
    import partitioner.kernels.msglam as km

    forced = (lambda dt, n: n) if dtype == torch.float32 else (lambda dt, n: min(16, n))
    monkeypatch.setattr(km, "_block_t", forced)
    args = _inputs(2, 64, 7, 7, dtype, seed=7)
    ref_args = [a.detach().double().requires_grad_() for a in args]
    nl = msglam_attention(*args, backend="triton")[0]
    ref = nonlocal_attention_reference(*ref_args[:8])
    _close("nonlocal_out", nl, ref, TOL[dtype])
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(8)).to(dtype).double()
    got = torch.autograd.grad((nl.double() * g).sum(), args[:8])
    want = torch.autograd.grad((ref * g).sum(), ref_args[:8])
    for name, a, b in zip(NAMES, got, want, strict=False):
        _close(f"d{name}", a, b, TOL[dtype])


@triton.jit
def _split_dot_kernel(a_ptr, b_ptr, one_ptr, split_ptr):  # noqa: ANN001  (Triton pointers)
    i = tl.arange(0, 32)
    a = tl.load(a_ptr + i[:, None] * 32 + i[None, :])
    b = tl.load(b_ptr + i[:, None] * 32 + i[None, :])
    out = i[:, None] * 32 + i[None, :]
    tl.store(one_ptr + out, _dot_terms(a, b, None, tl.bfloat16, 1, 1))
    tl.store(split_ptr + out, _dot_terms(a, b, None, tl.bfloat16, 2, 2))


def test_hi_lo_split_dot_precision() -> None:
    """_dot_terms: fp32 operands rounded once to bf16 give ~2^-9 relative error per product; split hi + lo (three
    dots, lo x lo dropped) ~2^-16, which is what the logits rely on."""
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(32, 32, generator=g), torch.randn(32, 32, generator=g)
    one, split = torch.empty(32, 32), torch.empty(32, 32)
    _split_dot_kernel[(1,)](a, b, one, split)
    want = a.double() @ b.double()
    scale = (a.double().abs() @ b.double().abs()).max().item()  # the products' magnitude, not the cancelled sum
    err_one = (one.double() - want).abs().max().item() / scale
    err_split = (split.double() - want).abs().max().item() / scale
    assert 2**-14 < err_one < 2**-7, err_one
    assert err_split < 2**-14, err_split


def test_torch_autograd_gradcheck_of_the_reference() -> None:
    """The reference's own gradients (what the kernel is compared with) are right, sigma included (fp64)."""
    args = [a.detach().double().requires_grad_() for a in _inputs(1, 4, 2, 3, torch.float32)[:8]]
    assert torch.autograd.gradcheck(nonlocal_attention_reference, args)


def test_reference_matches_naive_pairwise_formula() -> None:
    """softmax over -||q_i - k_j||^2 / 2 sigma^2 written the slow way (explicit differences), plus the residual."""
    x, wq, bq, wk, bk, wv, bv, ls = [a.detach() for a in _inputs(2, 8, 3, 3, torch.float32)[:8]]
    xt = x.flatten(2).transpose(1, 2)  # (B, N, C)
    q, k, v = xt @ wq.T + bq, xt @ wk.T + bk, xt @ wv.T + bv
    d2 = ((q[:, :, None, :] - k[:, None, :, :]) ** 2).sum(-1)  # (B, N, N)
    attn = torch.softmax(-d2 / (2 * torch.exp(ls) ** 2), dim=-1)
    want = x + (attn @ v).transpose(1, 2).reshape(x.shape)
    torch.testing.assert_close(nonlocal_attention_reference(x, wq, bq, wk, bk, wv, bv, ls), want)


def test_cbam_reference_channel_then_spatial() -> None:
    x, *_, ca_w1, ca_w2, sa_w = [a.detach() for a in _inputs(1, 32, 4, 4, torch.float32)]
    gate_c = torch.sigmoid(
        torch.relu(x.mean((2, 3)) @ ca_w1.T) @ ca_w2.T + torch.relu(x.amax((2, 3)) @ ca_w1.T) @ ca_w2.T
    )
    y = x * gate_c[:, :, None, None]
    pooled = torch.cat([y.mean(1, keepdim=True), y.amax(1, keepdim=True)], 1)
    want = y * torch.sigmoid(torch.nn.functional.conv2d(pooled, sa_w, padding=3))
    torch.testing.assert_close(cbam_reference(x, ca_w1, ca_w2, sa_w), want)


def test_wrong_shapes_raise_value_error_naming_them() -> None:
    args = _inputs(2, 32, 3, 3, torch.float32)
    bad = list(args)
    bad[1] = torch.zeros(17, 32)  # wq should be (16, 32)
    with pytest.raises(ValueError, match=r"x \(2, 32, 3, 3\) .*wq \(17, 32\) \(expected \(16, 32\)\)"):
        msglam_attention(*bad)
    bad = list(args)
    bad[7] = torch.zeros(1)  # log_sigma must be a scalar
    with pytest.raises(ValueError, match=r"log_sigma \(1,\)"):
        msglam_attention(*bad)
    with pytest.raises(ValueError, match=r"x must be \(B, C, H, W\), got shape \(32, 3, 3\)"):
        msglam_attention(args[0][0], *args[1:])
    odd = _inputs(1, 32, 3, 3, torch.float32)
    odd[0] = torch.zeros(1, 31, 3, 3)
    with pytest.raises(ValueError, match=r"even.*\(1, 31, 3, 3\)"):
        msglam_attention(*odd)
    bad = list(args)
    bad[10] = torch.zeros(1, 2, 6, 6)  # even spatial kernel
    with pytest.raises(ValueError, match=r"sa_w \(1, 2, 6, 6\)"):
        msglam_attention(*bad)


def test_dispatch() -> None:
    # meta tensors (and FlopCounterMode) take the reference; "triton" refuses with the reason
    meta = [a.detach().to("meta") for a in _inputs(2, 64, 7, 7, torch.float32)]
    nl, cb = msglam_attention(*meta)
    assert nl.is_meta and nl.shape == cb.shape == (2, 64, 7, 7)
    with pytest.raises(RuntimeError, match="meta"):
        msglam_attention(*meta, backend="triton")
    cpu = [a.detach() for a in _inputs(2, 32, 7, 7, torch.float32)]
    with FlopCounterMode(display=False) as counter:
        msglam_attention(*cpu)
    assert counter.get_total_flops() > 0
    # more tokens than one tile: "auto" falls back, "triton" says why
    big = [a.detach() for a in _inputs(1, 32, 12, 12, torch.float32)]
    torch.testing.assert_close(msglam_attention(*big)[0], nonlocal_attention_reference(*big[:8]))
    with pytest.raises(RuntimeError, match="H\\*W=144 > 128"):
        msglam_attention(*big, backend="triton")
    # channels are chunked (CBAM) or split between programs (non-local): no channel limit; C = 544 runs
    wide = _inputs(1, 544, 2, 2, torch.float32)
    nl, cb = msglam_attention(*wide, backend="triton")
    _close("nonlocal_out", nl, nonlocal_attention_reference(*wide[:8]), TOL[torch.float32])
    _close("cbam_out", cb, cbam_reference(wide[0], *wide[8:]), TOL[torch.float32])
    with pytest.raises(ValueError, match="backend"):
        msglam_attention(*cpu, backend="cuda")


_COMPILE_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import partitioner.kernels.msglam as km

    # DMAGaze's widest stage (C = 256, 7x7 tokens) and the largest tiles the launcher allows (C 512, 128 tokens);
    # bf16 inputs (tokens contracted at once) and fp32 (16 at a time through the scratch)
    fp32 = "qkv_ptr scratch_ptr dq_ptr dk_ptr dv_ptr dls_ptr dx_cb_ptr dw1_ptr dw2_ptr dsa_ptr".split()
    for blocks in (dict(BLOCK_N=64, BLOCK_CB=32, BLOCK_R=16), dict(BLOCK_N=128, BLOCK_CB=16, BLOCK_R=32)):
        for dtype, block_t, block_k, warps in (("bf16", blocks["BLOCK_N"], 32, 4), ("fp32", 16, 16, 8)):
            consts = dict(blocks, BLOCK_T=block_t, KS=7, BLOCK_K=block_k, BLOCK_CV=64)
            for kernel in (km._msglam_fwd_kernel, km._msglam_bwd_kernel):
                fn = kernel.fn  # under the Autotuner
                sig = {n: "constexpr" if n in consts else "i32" if n in "C N D W R".split() else
                       "*fp32" if n in fp32 else f"*{dtype}" for n in fn.arg_names}
                constexprs = {(fn.arg_names.index(n),): v for n, v in consts.items()}
                src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
                info = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
                assert info.metadata.shared <= 227 * 1024, (fn.__name__, blocks, dtype, info.metadata.shared)
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm90(tmp_path: pathlib.Path) -> None:
    """The interpreter accepts programs the compiler rejects: compile both kernels for an H100 (sm_90) with
    Triton's bundled ptxas, no GPU needed (minutes on 2 cores; Triton 3.9's ASTSource API)."""
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", _COMPILE_SM90], env=env, check=True, timeout=600)
