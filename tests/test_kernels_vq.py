"""kernels.vq: the Triton lookup (interpreter on CPU) against the plain-PyTorch reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from partitioner.kernels._dispatch import INTERPRET
from partitioner.kernels.vq import _seed, gumbel_noise_like_kernel, vq_lookup, vq_lookup_reference

pytestmark = pytest.mark.skipif(not INTERPRET, reason="CPU Triton needs TRITON_INTERPRET=1 (tests/conftest.py)")

# (z shape, K): leading dims of any rank, rows and codes not multiples of the 16-wide interpreter tiles,
# K not a power of two, D below the 16-wide minimum tile, D = 256 as in MetaSlot.
SHAPES = [
    ((1, 16), 1),
    ((5, 7, 24), 37),
    ((33, 16), 16),
    ((2, 3, 4, 40), 100),
    ((19, 5), 3),
    ((20, 256), 48),
]
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def _inputs(z_shape: tuple[int, ...], k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(z_shape, generator=gen).to(dtype)
    codebook = torch.randn(k, z_shape[-1], generator=gen).to(dtype)
    return z, codebook


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    scale = expected.abs().max().item() + 1e-6
    torch.testing.assert_close(actual.float(), expected.float(), atol=TOL[dtype] * scale, rtol=TOL[dtype], msg=what)


def _assert_same_gradients(
    z: torch.Tensor, codebook: torch.Tensor, outs: tuple, refs: tuple, dtype: torch.dtype
) -> None:
    """The gradients into z and the codebook of quantized and distances (random cotangents) equal the reference's."""
    (_, quant, dist), (_, quant_ref, dist_ref) = outs, refs
    gq, gd = torch.randn_like(quant), torch.randn_like(dist)
    grads = torch.autograd.grad((quant * gq).sum() + (dist * gd).sum(), (z, codebook))
    grads_ref = torch.autograd.grad((quant_ref * gq).sum() + (dist_ref * gd).sum(), (z, codebook))
    for name, g, g_ref in zip(("dz", "dcodebook"), grads, grads_ref):
        _assert_close(g, g_ref, dtype, name)


def _assert_nearest(idx: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor) -> None:
    """idx picks a nearest code (exact ties aside, the same one the reference picks)."""
    d = torch.cdist(z.reshape(-1, z.shape[-1]).double(), codebook.double()) ** 2  # (M, K)
    chosen = d.gather(1, idx.reshape(-1, 1)).squeeze(1)
    torch.testing.assert_close(chosen, d.min(dim=1).values, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(("z_shape", "k"), SHAPES, ids=lambda x: "x".join(map(str, x)) if isinstance(x, tuple) else x)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("straight_through", [False, True], ids=["gather", "st"])
def test_eval_matches_reference(z_shape: tuple[int, ...], k: int, dtype: torch.dtype, straight_through: bool) -> None:
    z, codebook = _inputs(z_shape, k, dtype)
    z.requires_grad_()
    codebook.requires_grad_()
    idx, quant, dist = vq_lookup(z, codebook, straight_through=straight_through, backend="triton")
    idx_ref, quant_ref, dist_ref = vq_lookup_reference(z, codebook, straight_through=straight_through)
    assert idx.shape == z_shape[:-1] and idx.dtype == torch.int64
    assert quant.shape == z_shape and quant.dtype == dtype and dist.shape == z_shape[:-1] and dist.dtype == dtype
    _assert_nearest(idx, z.float(), codebook.float())
    assert (idx == idx_ref).float().mean() > 0.95  # bf16 rounding may flip near-ties only
    same = idx == idx_ref
    torch.testing.assert_close(quant[same], codebook[idx_ref][same])
    _assert_close(dist[same], dist_ref[same], dtype, "distances")

    # Gradients: the gather (+ soft straight-through) into quantized, the exact one into distances
    if bool(same.all()):
        _assert_same_gradients(z, codebook, (idx, quant, dist), (idx_ref, quant_ref, dist_ref), dtype)


def test_default_gradients_follow_metaslot() -> None:
    """quantized = codebook[idx]: gradient only into the chosen rows, none into z (MetaSlot's Codebook)."""
    z, codebook = _inputs((6, 8), 5, torch.float32)
    z.requires_grad_()
    codebook.requires_grad_()
    idx, quant, _ = vq_lookup(z, codebook, backend="triton")
    gz, gc = torch.autograd.grad(quant.sum(), (z, codebook), allow_unused=True)
    assert gz is None
    counts = torch.bincount(idx, minlength=5).float()
    torch.testing.assert_close(gc, counts[:, None].expand(5, 8))


@pytest.mark.parametrize("straight_through", [False, True], ids=["gather", "st"])
def test_sample_matches_reference_with_the_kernels_noise(straight_through: bool) -> None:
    """Same Gumbel stream -> same sample and same (soft) gradients as the reference."""
    z, codebook = _inputs((3, 11, 24), 37, torch.float32)
    z.requires_grad_()
    codebook.requires_grad_()
    tau = 0.7
    idx, quant, dist = vq_lookup(
        z, codebook, sample=True, tau=tau, straight_through=straight_through,
        generator=torch.Generator().manual_seed(7), backend="triton",
    )  # fmt: skip
    noise = gumbel_noise_like_kernel(33, 37, _seed(torch.Generator().manual_seed(7)))
    idx_ref, quant_ref, dist_ref = vq_lookup_reference(
        z, codebook, sample=True, tau=tau, straight_through=straight_through, gumbel=noise
    )
    assert torch.equal(idx, idx_ref)
    _assert_same_gradients(z, codebook, (idx, quant, dist), (idx_ref, quant_ref, dist_ref), torch.float32)


@pytest.mark.parametrize("sample", [False, True], ids=["eval", "sample"])
def test_straight_through_feature_chunks_match_reference(monkeypatch: pytest.MonkeyPatch, sample: bool) -> None:
    """The fp32 FMA path of the straight-through kernels (score dots summed over feature chunks, BLOCK_DC <
    BLOCK_D; on a GPU for fp32 without TF32) forced here: D = 40 in 64-wide rows, chunks of 16 with a ragged last."""
    import partitioner.kernels.vq as vq

    monkeypatch.setattr(vq, "_feature_chunk", lambda dtype, block_d: 16)
    z, codebook = _inputs((3, 11, 40), 37, torch.float32)
    z.requires_grad_()
    codebook.requires_grad_()
    kwargs = dict(sample=sample, tau=0.7, straight_through=True)
    gen = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    idx, quant, dist = vq_lookup(z, codebook, generator=gen(), backend="triton", **kwargs)
    noise = gumbel_noise_like_kernel(33, 37, _seed(gen())) if sample else None
    idx_ref, quant_ref, dist_ref = vq_lookup_reference(z, codebook, gumbel=noise, **kwargs)
    assert torch.equal(idx, idx_ref)
    _assert_same_gradients(z, codebook, (idx, quant, dist), (idx_ref, quant_ref, dist_ref), torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_straight_through_two_byte_operands_within_their_rounding(dtype: torch.dtype) -> None:
    """bf16 / fp16 inputs: the backward's last dots take dd (and p) rounded to the input dtype, as flash-attention
    rounds dS. Checked against float64 with the bound that rounding allows, elementwise: each product of a rounded
    factor is off by at most the unit roundoff u (2^-8 bf16, 2^-11 fp16) of its size, so a sum is off by at most
    u * (the sum of its terms' absolute values); the bound takes 2u (for the fp32 scores' ~1e-5 relative error in
    p and the fp32 sums), plus u of the result for its rounding to the output dtype."""
    import partitioner.kernels.vq as vq

    u = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    gen = torch.Generator().manual_seed(1)
    m, k, d, tau = 40, 48, 64, 0.5
    # Small vectors: the soft assignment is spread over many codes, not one-hot
    z2 = (0.2 * torch.randn(m, d, generator=gen)).to(dtype)
    codebook = (0.2 * torch.randn(k, d, generator=gen)).to(dtype)
    dq = torch.randn(m, d, generator=gen).to(dtype)
    _, row_max, row_sum = vq._vq_fwd(z2, codebook, False, tau, 0, stats=True)
    ctx = type("Ctx", (), {})()
    ctx.saved_tensors, ctx.args = (z2, codebook, row_max, row_sum), (False, tau, 0)
    dz, dc = vq._SoftStraightThrough.backward(ctx, dq)[:2]
    assert dz.dtype == dc.dtype == dtype

    zd, cd, qd = z2.double(), codebook.double(), dq.double()
    p = (-((zd[:, None, :] - cd[None, :, :]) ** 2).sum(-1) / tau).softmax(-1)  # (M, K)
    g = qd @ cd.t()
    dd = p * ((p * g).sum(1, keepdim=True) - g) / tau  # d loss / d dist
    dz_exact = -2.0 * dd @ cd + 2.0 * zd * dd.sum(1, keepdim=True)
    dc_exact = p.t() @ qd - 2.0 * dd.t() @ zd + 2.0 * cd * dd.sum(0)[:, None]
    dz_bound = 2 * u * (2.0 * dd.abs() @ cd.abs() + 2.0 * zd.abs() * dd.sum(1, keepdim=True).abs())
    dc_bound = 2 * u * (p.t() @ qd.abs() + 2.0 * dd.abs().t() @ zd.abs() + 2.0 * cd.abs() * dd.abs().sum(0)[:, None])
    for name, got, exact, bound in (("dz", dz, dz_exact, dz_bound), ("dc", dc, dc_exact, dc_bound)):
        excess = (got.double() - exact).abs() - (bound + u * exact.abs() + 1e-6)
        assert excess.max() <= 0, f"{name}: over its bound by {excess.max().item():.3g}"
    # and the rounding is visible: not the fp32 result to fp32 accuracy (else this test checks nothing)
    assert (dz.double() - dz_exact).abs().max() > 1e-4 * dz_exact.abs().max()


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sample_is_seeded(backend: str) -> None:
    z, codebook = _inputs((64, 8), 12, torch.float32)
    torch.manual_seed(3)
    a = vq_lookup(z, codebook, sample=True, tau=4.0, backend=backend)[0]
    torch.manual_seed(3)
    b = vq_lookup(z, codebook, sample=True, tau=4.0, backend=backend)[0]
    c = vq_lookup(z, codebook, sample=True, tau=4.0, generator=torch.Generator().manual_seed(3), backend=backend)[0]
    d = vq_lookup(z, codebook, sample=True, tau=4.0, generator=torch.Generator().manual_seed(3), backend=backend)[0]
    assert torch.equal(a, b) and torch.equal(c, d)
    assert not torch.equal(b, vq_lookup(z, codebook, sample=True, tau=4.0, backend=backend)[0])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sample_frequencies_follow_softmax(backend: str) -> None:
    """One vector repeated 4000 times: code frequencies match softmax(-d / tau) within 5 standard errors."""
    n, tau = 4000, 0.5
    z = torch.tensor([[0.0, 0.0]]).expand(n, 2).contiguous()
    codebook = torch.tensor([[0.3, 0.0], [0.0, 0.5], [-0.6, 0.2], [0.9, 0.9], [0.25, -0.35]])
    probs = torch.softmax(-(codebook**2).sum(1) / tau, dim=0)
    idx = vq_lookup(z, codebook, sample=True, tau=tau, generator=torch.Generator().manual_seed(0), backend=backend)[0]
    freq = torch.bincount(idx, minlength=5).double() / n
    stderr = (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() < 5 * stderr).all(), (freq, probs)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_small_tau_recovers_argmin(backend: str) -> None:
    z, codebook = _inputs((50, 12), 23, torch.float32)
    hard = vq_lookup(z, codebook, backend=backend)[0]
    sampled = vq_lookup(z, codebook, sample=True, tau=1e-4, backend=backend)[0]
    assert torch.equal(hard, sampled)


@settings(max_examples=12)
@given(
    m=st.integers(1, 40),
    d=st.integers(1, 40),
    k=st.integers(1, 50),
    straight_through=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_hypothesis_small_shapes(m: int, d: int, k: int, straight_through: bool, seed: int) -> None:
    z, codebook = _inputs((m, d), k, torch.float32, seed)
    z.requires_grad_()
    codebook.requires_grad_()
    idx, quant, dist = vq_lookup(z, codebook, straight_through=straight_through, backend="triton")
    idx_ref, quant_ref, dist_ref = vq_lookup_reference(z, codebook, straight_through=straight_through)
    _assert_nearest(idx, z, codebook)
    if torch.equal(idx, idx_ref):
        gq = torch.randn_like(quant)
        grads = torch.autograd.grad((quant * gq).sum() + dist.sum(), (z, codebook))
        grads_ref = torch.autograd.grad((quant_ref * gq).sum() + dist_ref.sum(), (z, codebook))
        for g, g_ref in zip(grads, grads_ref):
            _assert_close(g, g_ref, torch.float32, "grad")


def test_meta_tensors_and_flop_counter() -> None:
    z = torch.empty(64, 11, 256, device="meta")
    codebook = torch.empty(512, 256, device="meta")
    for backend in ("auto", "reference"):
        with FlopCounterMode(display=False) as counter:
            idx, quant, dist = vq_lookup(z, codebook, sample=True, backend=backend)
        assert idx.shape == (64, 11) and quant.shape == (64, 11, 256) and dist.shape == (64, 11)
        assert idx.device.type == "meta"
        assert counter.get_total_flops() == 2 * 64 * 11 * 512 * 256  # the distance matmul


def test_triton_backend_on_unsupported_input_errors_clearly() -> None:
    z, codebook = torch.empty(4, 8, device="meta"), torch.empty(3, 8, device="meta")
    with pytest.raises(RuntimeError, match="backend='triton' cannot run here: device type 'meta'"):
        vq_lookup(z, codebook, backend="triton")
    z64, c64 = torch.randn(4, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        vq_lookup(z64, c64, backend="triton")
    assert vq_lookup(z64, c64)[2].dtype == torch.float64  # auto falls back to the reference


@pytest.mark.parametrize(
    ("z_shape", "c_shape"),
    [((4, 8), (3, 7)), ((4, 8), (8,)), ((4, 8), (0, 8)), ((4, 8), (2, 3, 8))],
)
def test_wrong_shapes_raise_value_error_naming_them(z_shape: tuple[int, ...], c_shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(f"z {z_shape}, codebook {c_shape}")):
        vq_lookup(torch.randn(z_shape), torch.randn(c_shape))


def test_bad_tau_raises() -> None:
    with pytest.raises(ValueError, match="tau must be > 0"):
        vq_lookup(torch.randn(4, 8), torch.randn(3, 8), sample=True, tau=0.0)


def test_autotune_pruning_keeps_a_fitting_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU autotune spaces (only used on CUDA) pruned for MetaSlot sizes: non-empty and within the problem."""
    import partitioner.kernels.vq as vq

    monkeypatch.setattr(vq, "INTERPRET", False)
    spaces = [(vq._fwd_configs(), vq._prune_fwd, "BLOCK_K"), (vq._bwd_configs("BLOCK_K"), vq._prune_dz, "BLOCK_K")]
    spaces.append((vq._bwd_configs("BLOCK_K2"), vq._prune_dc, "BLOCK_K2"))
    for configs, prune, second in spaces:
        assert len(configs) > 1
        for dtype in (torch.float32, torch.bfloat16):
            kept = prune(configs, {"Z": torch.empty(1, dtype=dtype)}, M=704, K=512, BLOCK_D=256)
            assert 0 < len(kept) < len(configs)
            kept = prune(configs, {"Z": torch.empty(1, dtype=dtype)}, M=20, K=40, BLOCK_D=256)
            assert all(c.kwargs["BLOCK_M"] <= 32 and c.kwargs[second] <= 64 for c in kept)
        assert len(prune(configs, {}, M=10**6, K=10**6, BLOCK_D=8192)) == 1


# ----------------------------------------------------------------------------------------------------------
# The sampler's Philox stream (one call per four codes) and its distribution
# ----------------------------------------------------------------------------------------------------------


def _philox4x32_10(seed: int, c0: np.ndarray, c1: np.ndarray) -> tuple[np.ndarray, ...]:
    """Philox4x32-10 as triton.language.random runs it for 32-bit counter words: counter (c0, c1, 0, 0), key (seed
    low word, seed high word). Written from the algorithm (Salmon et al. 2011) with Triton's constants."""
    mul_a, mul_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    c0, c1 = c0.astype(np.uint32), c1.astype(np.uint32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF
    for _ in range(10):
        prod_b, prod_a = mul_b * c2.astype(np.uint64), mul_a * c0.astype(np.uint64)
        c0, c1, c2, c3 = (
            (prod_b >> np.uint64(32)).astype(np.uint32) ^ c1 ^ np.uint32(k0),
            prod_b.astype(np.uint32),
            (prod_a >> np.uint64(32)).astype(np.uint32) ^ c3 ^ np.uint32(k1),
            prod_a.astype(np.uint32),
        )
        k0, k1 = (k0 + 0x9E3779B9) & 0xFFFFFFFF, (k1 + 0xBB67AE85) & 0xFFFFFFFF
    return c0, c1, c2, c3


def test_gumbel_stream_is_one_philox_call_per_four_codes() -> None:
    """The noise of (row m, code k) is output k % 4 of the Philox call at counter (m << 32) + k // 4, turned into a
    uniform and then Gumbel noise as the kernel does. Checked against numpy's Philox over rows and codes that cross
    the table kernel's tiles (32 x 64) and a group of four cut short by K."""
    m, k, seed = 40, 70, 123456789
    table = gumbel_noise_like_kernel(m, k, seed)
    rows, codes = np.meshgrid(np.arange(m), np.arange(k), indexing="ij")
    outputs = np.stack(_philox4x32_10(seed, codes // 4, rows))  # (4, m, k)
    bits = np.take_along_axis(outputs, (codes % 4)[None], axis=0)[0].view(np.int32)
    u = np.where(bits < 0, ~bits, bits).astype(np.float32) * np.float32(4.6566127342e-10)
    u = np.minimum(np.maximum(u, np.float32(1e-20)), np.float32(1.0 - 1e-7))
    expected = -np.log(-np.log(u))
    torch.testing.assert_close(table, torch.from_numpy(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sample_passes_chi_square_against_softmax(backend: str) -> None:
    """2000 draws for one vector over 21 codes (two code tiles, the last group of four cut short) with
    probabilities softmax(-d / tau) between 1.3% and 10%: Pearson's chi-square against them (20 degrees of freedom)
    must not reject at the 0.1% level. Deterministic (fixed seed). A sampler that gave the four codes of one
    Philox call the same or correlated noise would favour the nearest code of each group and fail."""
    n, k, tau = 2000, 21, 0.5
    angle = torch.arange(k) * (2 * torch.pi / k)
    radius = (0.25 * (torch.arange(k) % 5)).sqrt()
    codebook = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    z = torch.zeros(n, 2)
    probs = torch.softmax(-(codebook**2).sum(1).double() / tau, dim=0)
    assert probs.min() * n > 20  # expected counts large enough for the chi-square approximation
    idx = vq_lookup(z, codebook, sample=True, tau=tau, generator=torch.Generator().manual_seed(11), backend=backend)[0]
    counts = torch.bincount(idx, minlength=k).double()
    chi2 = ((counts - n * probs) ** 2 / (n * probs)).sum()
    p_value = torch.special.gammaincc(torch.tensor((k - 1) / 2, dtype=torch.float64), chi2 / 2)
    assert p_value > 1e-3, (float(chi2), float(p_value), counts.tolist())


# ----------------------------------------------------------------------------------------------------------
# Autotune key: M only through its power-of-two bucket
# ----------------------------------------------------------------------------------------------------------


def _tuning_keys(monkeypatch: pytest.MonkeyPatch, m: int, k: int, dtype: torch.dtype, tf32: bool = False) -> list:
    """The autotune keys (as triton's Autotuner.run builds them) of the three VQ kernels for a launch at (m, k)."""
    import partitioner.kernels.vq as vq

    keys = []

    class Recorder:
        def __init__(self, tuner: object) -> None:
            self.tuner = tuner

        def __getitem__(self, grid: object) -> object:
            def launch(*args: object, **kwargs: object) -> None:
                named = {**dict(zip(self.tuner.arg_names, args)), **kwargs}
                dtypes = [str(a.dtype) for a in named.values() if hasattr(a, "dtype")]
                keys.append((*(named[name] for name in self.tuner.keys), *dtypes))

            return launch

    names = ("_vq_fwd_kernel", "_vq_st_bwd_dz_kernel", "_vq_st_bwd_dc_kernel")
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    with monkeypatch.context() as patch:
        for name in names:
            patch.setattr(vq, name, Recorder(getattr(vq, name)))
        patch.setattr(vq, "INTERPRET", False)  # the GPU's dot precision, which follows torch's TF32 setting
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            z2 = torch.empty(m, 256, device="meta", dtype=dtype)
            codebook = torch.empty(k, 256, device="meta", dtype=dtype)
            _, row_max, row_sum = vq._vq_fwd(z2, codebook, False, 1.0, 0, stats=True)
            ctx = type("Ctx", (), {})()
            ctx.saved_tensors, ctx.args = (z2, codebook, row_max, row_sum), (False, 1.0, 0)
            vq._SoftStraightThrough.backward(ctx, torch.empty_like(z2))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32  # a property: monkeypatch cannot restore it
    assert len(keys) == 3
    return keys


def test_autotune_key_buckets_the_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch sizes within one power of two, or past 2^15 rows, share a tuning; K, dtype and TF32 do not."""
    import partitioner.kernels.vq as vq

    for name in ("_vq_fwd_kernel", "_vq_st_bwd_dz_kernel", "_vq_st_bwd_dc_kernel"):
        assert "M" not in getattr(vq, name).keys and "M_BUCKET" in getattr(vq, name).keys
    key = lambda m, k=512, dtype=torch.bfloat16, tf32=False: _tuning_keys(monkeypatch, m, k, dtype, tf32)  # noqa: E731
    assert key(704) == key(640) == key(1024)  # MetaSlot's 64 x 11 slots and smaller last batches
    assert key(65536) == key(40000) == key(10**6)
    assert key(704) != key(1025) and key(20) != key(40) and key(32768) != key(16384)
    assert key(704) != key(704, k=1024) and key(704) != key(704, dtype=torch.float16)
    assert key(704, dtype=torch.float32) != key(704, dtype=torch.float32, tf32=True)


def test_autotune_pruning_depends_on_rows_only_through_the_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tuned config is reused for every M of its bucket, so the configs pruning keeps must be the same there."""
    import partitioner.kernels.vq as vq

    monkeypatch.setattr(vq, "INTERPRET", False)
    configs = vq._fwd_configs()
    z = torch.empty(1, dtype=torch.bfloat16)  # fp32 FMA dots keep only 32-row tiles at BLOCK_D = 256: no cut-off
    labels = lambda m: {str(c) for c in vq._prune_fwd(configs, {"Z": z}, M=m, K=512, BLOCK_D=256)}  # noqa: E731
    for m in (1, 9, 16, 17, 20, 31, 33, 64, 65, 100, 128, 129, 704, 5000, 2**15, 2**15 + 1, 10**6):
        assert labels(m) == labels(vq._m_bucket(m)), m
    assert labels(20) != labels(704)  # small M does prune wide row tiles
