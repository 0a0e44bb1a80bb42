"""Vector-quantisation lookup: nearest code by squared L2 (or a Gumbel-max sample), without an N x K matrix.

For z (M, D) and a codebook C (K, D), ``d[m, k] = |z_m|^2 - 2 z_m . c_k + |c_k|^2``. The forward kernel
(FlashAssign-style) keeps a tile of z in registers, streams code tiles, and keeps a running arg-best per row,
so only one (BLOCK_M, BLOCK_K) tile of d exists at a time:

- eval (``sample=False``): index = argmin_k d[m, k];
- train (``sample=True``): index = argmax_k (-d[m, k] / tau + g[m, k]), g ~ Gumbel(0, 1) from Philox with a
  seed drawn from the torch generator: a hard sample from softmax(-d / tau) (Gumbel-max trick). One Philox call
  gives four uniforms, one for each of four consecutive codes: code k of row m takes output k % 4 of the call at
  the int64 counter (m << 32) + k // 4, whatever the tiles (see :func:`_gumbel`).

quantized = C[index] and distance = |z - C[index]|^2 are then a gather and a row-wise reduction.

Gradients (following the MetaSlot authors, see :func:`vq_lookup`): quantized = C[index] sends its gradient
to the chosen codebook rows only; distance is differentiable in z and C. The optional straight-through
estimator (``straight_through=True``) adds the gradient of the soft probabilities p = softmax(scores) as
if quantized were ``(onehot - p.detach() + p) @ C``; its backward kernels rebuild p tile by tile from the
per-row online-softmax statistics saved by the forward (row max and sum of exp), again without N x K:

    g_k = dq . c_k,  s = sum_k p_k g_k,  dscore_k = p_k (g_k - s),  dd_k = -dscore_k / tau
    dz  = sum_k dd_k (2 z - 2 c_k)                      (kernel over row tiles, two passes over codes)
    dC_k += sum_m p_mk dq_m + dd_mk (2 c_k - 2 z_m)     (kernel over code tiles, one pass over rows)

Offsets: the row and code indices, and the feature index where a caller's stride multiplies it, are int64 before
they multiply a stride or a row length: M * D or K * D pass 2^31 on large inputs, and a strided view's feature
stride can be as large as its tensor. These are computed once per program (or once per code tile); ptxas gives the
kernels about the same registers as with int32. The exception is the dC kernel's loop over row tiles, where int64
rows cost spills: its row offsets stay int32 unless the launcher finds that a row index times a row stride can
reach 2^31 (``WIDE_ROWS``, see :func:`_wide_rows`). int32 also stays for the code indices themselves (K < 2^31),
for masks (tiles start at multiples of their power-of-two size, so index + tile < 2^31 when the bound is), and for
the feature column (< 512) of the contiguous (M, D) / (K, D) outputs the launchers allocate. Widening is explicit,
never through loop bounds: Triton's interpreter runs loops over Python ints, so a loop variable's type differs
between the interpreter and compiled code (tests/test_kernels_offsets.py runs these kernels' index math there).

File layout: autotune spaces, forward kernel, straight-through backward kernels, launchers + autograd.Function,
reference, public function.
"""

from __future__ import annotations

import torch

from kernels._dispatch import INTERPRET, Backend, fx_leaf, tl, triton, use_triton
from kernels._triton_common import _mm

__all__ = ["gumbel_noise_like_kernel", "vq_lookup", "vq_lookup_reference"]

_MAX_DIM = 512  # the feature dim is held whole in registers
_INT32_MAX = 2**31 - 1
_MAX_CODES = _INT32_MAX  # code indices are int32 in the kernels (written out as int64)
_M_BUCKET_MAX = 2**15  # autotune key: rows in powers of two up to this, one bucket beyond (see _m_bucket)
_SMEM_BYTES = 160 * 1024  # pruning: shared memory for pipelined tiles (H100 / H200 have 227 KiB per block)
_REGS_PER_THREAD = 160  # pruning: 32-bit registers a thread may spend on resident tiles before spilling


# ----------------------------------------------------------------------------------------------------------
# Autotune spaces: (BLOCK_M, BLOCK_K) tiles. One small config under the interpreter (also exercises tails).
# ----------------------------------------------------------------------------------------------------------


def _configs(second: str) -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, second: 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, second: bk}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bk in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]


def _m_bucket(m: int) -> int:
    """The autotune key's stand-in for the row count M: the next power of two, capped at 2^15.

    M changes with the batch size, and keying on M itself re-tuned every kernel for every new batch size. The best
    config depends on M in two ways only. (1) Pruning drops tiles wider than the next power of two of M, which
    matters below 128 rows (the widest BLOCK_M); powers of two keep exactly those cut-offs, so the pruning is a
    function of the key. (2) Occupancy: the row-tiled kernels launch cdiv(M, BLOCK_M) programs, and until every
    config has a couple of waves on the device (2^15 rows = 256 programs of the widest tile, ~2 per SM of an H100)
    a smaller M favours a smaller BLOCK_M; past that the work per row is the same and the ranking no longer moves.
    (The code-tiled straight-through kernel only loops over M: (1) is all that matters there.) So a kernel tunes
    at most 12 times over all M, and once for all M >= 2^15.
    """
    return min(triton.next_power_of_2(max(1, m)), _M_BUCKET_MAX)


def _prune(configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep configs whose tiles are not far larger than the problem, whose pipelined tiles fit shared memory
    and whose resident tiles fit their warps' registers; the smallest config survives if none does.

    Depends on the rows only through _m_bucket(M), which is in the autotune key (a tuned config is reused for
    every M in its bucket, so the pruning that chose it must not depend on more)."""
    args = {**named_args, **kwargs}
    m_cap = max(16, _m_bucket(int(args["M"])))
    k_cap = max(16, triton.next_power_of_2(int(args["K"])))
    block_d = int(args["BLOCK_D"])
    elem = args["Z"].element_size() if hasattr(args.get("Z"), "element_size") else 4

    def fits(c: triton.Config) -> bool:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_K", c.kwargs.get("BLOCK_K2"))
        smem = max(bm, bk) * block_d * elem * max(1, c.num_stages)  # the streamed tile (bytes)
        regs = 2 * min(bm, bk) * block_d + 3 * bm * bk  # resident row/code tiles + score-sized tiles (fp32)
        return bm <= m_cap and bk <= k_cap and smem <= _SMEM_BYTES and regs <= _REGS_PER_THREAD * 32 * c.num_warps

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages, -c.num_warps))]


@triton.jit
def _gumbel(seed, offs_m, k0, BLOCK_K: tl.constexpr):
    """Standard Gumbel noise (BLOCK_M, BLOCK_K) for rows offs_m and codes k0 .. k0 + BLOCK_K - 1.

    One Philox call (tl.rand4x) per four codes, all four outputs used: code k of row m takes output k % 4 of the
    call at counter (m << 32) + k // 4 (row in the high word, group of four codes in the low word), so the noise of
    (m, k) depends on neither the tiling nor K, and no counter wraps. k0 is a multiple of 4 (of BLOCK_K >= 16).
    Uniforms are clamped away from 0 and 1.
    """
    groups = k0 // 4 + tl.arange(0, BLOCK_K // 4)  # (BLOCK_K // 4,)
    counters = (offs_m.to(tl.int64)[:, None] << 32) + groups[None, :]
    u0, u1, u2, u3 = tl.rand4x(seed, counters)  # each (BLOCK_M, BLOCK_K // 4)
    # Interleave to (BLOCK_M, BLOCK_K) with column 4 g + j = u_j[:, g]: (u0, u2) and (u1, u3) give columns 4 g + 2 i
    # and 4 g + 2 i + 1 for i = 0, 1, interleaving those two gives 4 g + j
    u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
    u = tl.minimum(tl.maximum(u, 1e-20), 1.0 - 1e-7)
    return -tl.log(-tl.log(u))


@triton.jit
def _scores(z, zz, C, k0, offs_d, offs_m, K, D, stride_ck, stride_cd, seed, inv_tau,
            SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """Code tile k0 .. k0 + BLOCK_K - 1: (codes in fp32 (BLOCK_K, BLOCK_D), dist (BLOCK_M, BLOCK_K), score (BLOCK_M,
    BLOCK_K)).

    z (BLOCK_M, BLOCK_D) is in the dtype the dot runs in (the inputs' in the forward: bf16 products are exact in
    the fp32 accumulator; fp32 in the backward); zz = |z|^2 in fp32; offs_m the rows. score = -dist / tau
    (+ Gumbel noise when SAMPLE); -inf on codes past K.
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    # int64: K * stride_ck (a large codebook) or D * stride_cd (a transposed one) may pass 2^31
    c = tl.load(C + offs_k.to(tl.int64)[:, None] * stride_ck + offs_d.to(tl.int64)[None, :] * stride_cd,
                mask=k_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    cf = c.to(tl.float32)
    cc = tl.sum(cf * cf, axis=1)
    dist = zz[:, None] - 2.0 * _mm(z, tl.trans(c.to(z.dtype)), DOT_PRECISION) + cc[None, :]
    score = -dist * inv_tau
    if SAMPLE:
        score += _gumbel(seed, offs_m, k0, BLOCK_K)
    score = tl.where(k_ok[None, :], score, float("-inf"))
    return cf, dist, score


@triton.jit
def _gumbel_table_kernel(OUT, M, K, seed, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT (M, K) fp32 contiguous = the Gumbel noise the kernels draw for (row, code): for tests and the reference.
    Grid (cdiv(M, BLOCK_M),); each program loops over code tiles."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * K may pass 2^31
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(OUT + offs_m[:, None] * K + offs_k[None, :], _gumbel(seed, offs_m, k0, BLOCK_K),
                 mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Forward kernel: grid (cdiv(M, BLOCK_M),). Running arg-best over code tiles; optionally the online-softmax
# statistics of the scores (row max, row sum of exp) for the straight-through backward.
# ----------------------------------------------------------------------------------------------------------


# Autotune keys: M only through its bucket (_m_bucket); the dtypes are added by the autotuner itself.
_FWD_KEY = ["M_BUCKET", "K", "D", "SAMPLE", "STATS", "DOT_PRECISION"]
_BWD_KEY = ["M_BUCKET", "K", "D", "SAMPLE", "DOT_PRECISION"]


@triton.autotune(configs=_configs("BLOCK_K"), key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _vq_fwd_kernel(
    Z, C, IDX, ROW_MAX, ROW_SUM,
    stride_zm, stride_zd, stride_ck, stride_cd,
    M, K, D, M_BUCKET, seed, inv_tau,
    SAMPLE: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_K >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride_zm may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < M

    # Row tile of z (BLOCK_M, BLOCK_D) in its dtype and its squared norms in fp32 (BLOCK_M,)
    z = tl.load(Z + offs_m[:, None] * stride_zm + offs_d.to(tl.int64)[None, :] * stride_zd,
                mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)  # fmt: skip
    zz = tl.sum(z.to(tl.float32) * z.to(tl.float32), axis=1)

    # Stream code tiles, keeping the best score and its code per row (strict > keeps the first on ties)
    best = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_M,), dtype=tl.int32)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        _, _, score = _scores(z, zz, C, k0, offs_d, offs_m, K, D, stride_ck, stride_cd, seed, inv_tau,
                              SAMPLE, DOT_PRECISION, BLOCK_K)  # fmt: skip
        tile_best = tl.max(score, axis=1)
        tile_idx = tl.argmax(score, axis=1).to(tl.int32) + k0
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_idx, best_idx)
        # Online softmax statistics in log2 units: run_sum = sum_k 2^((score_k - run_max) * log2e)
        if STATS:
            new_max = tl.maximum(run_max, tile_best)
            run_sum = run_sum * tl.exp2((run_max - new_max) * 1.4426950408889634) + tl.sum(
                tl.exp2((score - new_max[:, None]) * 1.4426950408889634), axis=1
            )
            run_max = new_max

    tl.store(IDX + offs_m, best_idx.to(tl.int64), mask=m_ok)
    if STATS:
        tl.store(ROW_MAX + offs_m, run_max, mask=m_ok)
        tl.store(ROW_SUM + offs_m, run_sum, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------
# Straight-through backward, part 1: grid (cdiv(M, BLOCK_M),). Pass 1 over code tiles: s = sum_k p_k g_k.
# Pass 2: dd = -p (g - s) / tau, dz = 2 z sum_k dd_k - 2 dd @ C. Writes dz (M, D) and s (M,) for part 2.
# ----------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs("BLOCK_K"), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _vq_st_bwd_dz_kernel(
    Z, C, DQ, ROW_MAX, ROW_SUM, DZ, S_OUT,
    stride_zm, stride_zd, stride_ck, stride_cd, stride_qm, stride_qd,
    M, K, D, M_BUCKET, seed, inv_tau,
    SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_K >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride_zm, M * D may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    offs_d64 = offs_d.to(tl.int64)  # times the callers' feature strides
    m_ok = offs_m < M
    md_mask = m_ok[:, None] & (offs_d[None, :] < D)

    # Row tiles of z and of the incoming gradient dq (BLOCK_M, BLOCK_D); softmax statistics (BLOCK_M,)
    z = tl.load(Z + offs_m[:, None] * stride_zm + offs_d64[None, :] * stride_zd, mask=md_mask, other=0.0)
    z = z.to(tl.float32)
    zz = tl.sum(z * z, axis=1)
    dq = tl.load(DQ + offs_m[:, None] * stride_qm + offs_d64[None, :] * stride_qd, mask=md_mask, other=0.0)
    dq = dq.to(tl.float32)
    row_max = tl.load(ROW_MAX + offs_m, mask=m_ok, other=0.0)
    row_sum = tl.load(ROW_SUM + offs_m, mask=m_ok, other=1.0)

    # Pass 1: s = sum_k p_k (dq . c_k)
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cf, _, score = _scores(z, zz, C, k0, offs_d, offs_m, K, D, stride_ck, stride_cd, seed, inv_tau,
                               SAMPLE, DOT_PRECISION, BLOCK_K)  # fmt: skip
        p = tl.exp2((score - row_max[:, None]) * 1.4426950408889634) / row_sum[:, None]
        g = _mm(dq, tl.trans(cf), DOT_PRECISION)
        s += tl.sum(p * g, axis=1)

    # Pass 2: dz = sum_k dd_k (2 z - 2 c_k) with dd = -p (g - s) / tau
    dz = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dd_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cf, _, score = _scores(z, zz, C, k0, offs_d, offs_m, K, D, stride_ck, stride_cd, seed, inv_tau,
                               SAMPLE, DOT_PRECISION, BLOCK_K)  # fmt: skip
        p = tl.exp2((score - row_max[:, None]) * 1.4426950408889634) / row_sum[:, None]
        g = _mm(dq, tl.trans(cf), DOT_PRECISION)
        dd = -p * (g - s[:, None]) * inv_tau
        dd_sum += tl.sum(dd, axis=1)
        dz -= 2.0 * _mm(dd, cf, DOT_PRECISION)
    dz += 2.0 * z * dd_sum[:, None]

    tl.store(DZ + offs_m[:, None] * D + offs_d[None, :], dz, mask=md_mask)  # contiguous (M, D): column < 512
    tl.store(S_OUT + offs_m, s, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------
# Straight-through backward, part 2: grid (cdiv(K, BLOCK_K2),). One pass over row tiles:
# dC_k = sum_m p_mk dq_m + dd_mk (2 c_k - 2 z_m)  (the soft part; the gather part is an index_add outside).
# ----------------------------------------------------------------------------------------------------------


@triton.autotune(configs=_configs("BLOCK_K2"), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _vq_st_bwd_dc_kernel(
    Z, C, DQ, ROW_MAX, ROW_SUM, S_IN, DC,
    stride_zm, stride_zd, stride_ck, stride_cd, stride_qm, stride_qd,
    M, K, D, M_BUCKET, seed, inv_tau,
    SAMPLE: tl.constexpr, WIDE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_K2 >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid = tl.program_id(0)
    k0 = pid * BLOCK_K2  # int32: an aligned power-of-two tile start below K < 2^31, so k0 + BLOCK_K2 - 1 < 2^31
    offs_k = (k0 + tl.arange(0, BLOCK_K2)).to(tl.int64)  # int64: K * stride_ck, K * D may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    offs_d64 = offs_d.to(tl.int64)  # times the callers' feature strides
    rows = tl.arange(0, BLOCK_M)
    if WIDE_ROWS:  # a row index times a row stride may pass 2^31 (see _wide_rows)
        rows = rows.to(tl.int64)
    kd_mask = (offs_k[:, None] < K) & (offs_d[None, :] < D)

    # This program's codes (BLOCK_K2, BLOCK_D) and their accumulators
    c = tl.load(C + offs_k[:, None] * stride_ck + offs_d64[None, :] * stride_cd, mask=kd_mask, other=0.0)
    cf = c.to(tl.float32)
    dc = tl.zeros((BLOCK_K2, BLOCK_D), dtype=tl.float32)
    dd_sum = tl.zeros((BLOCK_K2,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + rows
        m_ok = offs_m < M
        md_mask = m_ok[:, None] & (offs_d[None, :] < D)
        # Row tile: z, dq (BLOCK_M, BLOCK_D), statistics and s (BLOCK_M,); padded rows contribute 0
        z = tl.load(Z + offs_m[:, None] * stride_zm + offs_d64[None, :] * stride_zd, mask=md_mask, other=0.0)
        z = z.to(tl.float32)
        zz = tl.sum(z * z, axis=1)
        dq = tl.load(DQ + offs_m[:, None] * stride_qm + offs_d64[None, :] * stride_qd, mask=md_mask, other=0.0)
        dq = dq.to(tl.float32)
        row_max = tl.load(ROW_MAX + offs_m, mask=m_ok, other=0.0)
        row_sum = tl.load(ROW_SUM + offs_m, mask=m_ok, other=1.0)
        s = tl.load(S_IN + offs_m, mask=m_ok, other=0.0)
        # Recompute p and dd for (rows, codes): (BLOCK_M, BLOCK_K2)
        _, _, score = _scores(z, zz, C, k0, offs_d, offs_m, K, D, stride_ck, stride_cd, seed, inv_tau,
                              SAMPLE, DOT_PRECISION, BLOCK_K2)  # fmt: skip
        p = tl.exp2((score - row_max[:, None]) * 1.4426950408889634) / row_sum[:, None]
        p = tl.where(m_ok[:, None], p, 0.0)
        g = _mm(dq, tl.trans(cf), DOT_PRECISION)
        dd = -p * (g - s[:, None]) * inv_tau
        # Accumulate p^T dq - 2 dd^T z (BLOCK_K2, BLOCK_D) and sum_m dd (BLOCK_K2,)
        dc += _mm(tl.trans(p), dq, DOT_PRECISION)
        dc -= 2.0 * _mm(tl.trans(dd), z, DOT_PRECISION)
        dd_sum += tl.sum(dd, axis=0)
    dc += 2.0 * cf * dd_sum[:, None]
    tl.store(DC + offs_k[:, None] * D + offs_d[None, :], dc, mask=kd_mask)  # contiguous (K, D): column < 512


# ----------------------------------------------------------------------------------------------------------
# Launchers and autograd.Function: check shapes, allocate, build the grids.
# ----------------------------------------------------------------------------------------------------------


def _check_shapes(z: torch.Tensor, codebook: torch.Tensor, tau: float) -> None:
    """Raise ValueError naming the shapes unless z (..., D), codebook (K, D) with K >= 1, and tau > 0."""
    if codebook.dim() != 2 or z.dim() < 1 or z.shape[-1] != codebook.shape[1] or codebook.shape[0] == 0:
        raise ValueError(
            f"vq_lookup expects z (..., D) and codebook (K, D) with K >= 1; got z {tuple(z.shape)}, "
            f"codebook {tuple(codebook.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")


def _kernel_objection(z: torch.Tensor, codebook: torch.Tensor) -> str | None:
    """Why the Triton kernels do not handle these (valid) inputs, or None."""
    floats = (torch.float32, torch.float16, torch.bfloat16)
    if z.dtype not in floats or codebook.dtype != z.dtype:
        return f"dtypes z {z.dtype}, codebook {codebook.dtype}: the kernel needs both fp32, fp16 or bf16"
    if z.shape[-1] > _MAX_DIM:
        return f"D={z.shape[-1]} exceeds the kernel's whole-row tile (max {_MAX_DIM})"
    if z.numel() == 0:
        return "empty input"
    if codebook.shape[0] > _MAX_CODES:
        return f"K={codebook.shape[0]} codes exceed the kernel's int32 code indices (max {_MAX_CODES})"
    return None


def _wide_rows(m: int, *row_strides: int) -> bool:
    """Whether a row index below m times one of the row strides can pass the int32 range (the dC kernel then
    computes its row offsets in int64)."""
    return (m - 1) * max(abs(s) for s in row_strides) > _INT32_MAX


def _dot_precision() -> str:
    """fp32 dots use TF32 only where torch's matmul would; "interp" = upcast operands (interpreter)."""
    if INTERPRET:
        return "interp"
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _seed(generator: torch.Generator | None) -> int:
    """A Philox seed drawn from ``generator`` (or torch's default CPU generator): torch.manual_seed reproduces it."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (), generator=generator, device=device))


def _vq_fwd(
    z2: torch.Tensor, codebook: torch.Tensor, sample: bool, tau: float, seed: int, stats: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward on z2 (M, D): (indices (M,) int64, row_max (M,), row_sum (M,)) - stats if asked."""
    m, d = z2.shape
    k = codebook.shape[0]
    idx = torch.empty(m, device=z2.device, dtype=torch.int64)
    row_max = torch.empty(m, device=z2.device, dtype=torch.float32) if stats else idx
    row_sum = torch.empty(m, device=z2.device, dtype=torch.float32) if stats else idx
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
    _vq_fwd_kernel[grid](
        z2, codebook, idx, row_max, row_sum, *z2.stride(), *codebook.stride(),
        M=m, K=k, D=d, M_BUCKET=_m_bucket(m), seed=seed, inv_tau=1.0 / tau,
        SAMPLE=sample, STATS=stats, DOT_PRECISION=_dot_precision(), BLOCK_D=max(16, triton.next_power_of_2(d)),
    )  # fmt: skip
    return idx, (row_max if stats else None), (row_sum if stats else None)


class _SoftStraightThrough(torch.autograd.Function):
    """Forward value 0 (M, D); backward = the gradient of p @ C with p = softmax(scores), by Triton kernels.

    Added to C[index] it gives quantized = C[index] + p @ C - (p @ C).detach(), i.e. (onehot - p.detach() + p) @ C
    with the forward value exactly C[index].
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        z2: torch.Tensor,
        codebook: torch.Tensor,
        row_max: torch.Tensor,
        row_sum: torch.Tensor,
        sample: bool,
        tau: float,
        seed: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(z2, codebook, row_max, row_sum)
        ctx.args = (sample, tau, seed)
        return torch.zeros(z2.shape, device=z2.device, dtype=codebook.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: torch.autograd.function.FunctionCtx, dq: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        z2, codebook, row_max, row_sum = ctx.saved_tensors
        sample, tau, seed = ctx.args
        m, d = z2.shape
        k = codebook.shape[0]
        dz = torch.empty((m, d), device=z2.device, dtype=torch.float32)
        s = torch.empty(m, device=z2.device, dtype=torch.float32)
        dc = torch.empty((k, d), device=z2.device, dtype=torch.float32)
        common = dict(
            M=m, K=k, D=d, M_BUCKET=_m_bucket(m), seed=seed, inv_tau=1.0 / tau, SAMPLE=sample,
            DOT_PRECISION=_dot_precision(), BLOCK_D=max(16, triton.next_power_of_2(d)),
        )  # fmt: skip
        strides = (*z2.stride(), *codebook.stride(), *dq.stride())
        _vq_st_bwd_dz_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            z2, codebook, dq, row_max, row_sum, dz, s, *strides, **common
        )
        wide_rows = _wide_rows(m, z2.stride(0), dq.stride(0))
        _vq_st_bwd_dc_kernel[lambda meta: (triton.cdiv(k, meta["BLOCK_K2"]),)](
            z2, codebook, dq, row_max, row_sum, s, dc, *strides, WIDE_ROWS=wide_rows, **common
        )
        return dz.to(z2.dtype), dc.to(codebook.dtype), None, None, None, None, None


def gumbel_noise_like_kernel(m: int, k: int, seed: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (m, k) fp32 Gumbel noise the Triton kernels add for ``seed``: entry (row, code) comes from output
    code % 4 of the Philox call at counter (row << 32) + code // 4.

    Lets the reference reproduce a Triton sample exactly (``vq_lookup_reference(..., gumbel=...)``); needs a
    device Triton runs on.
    """
    out = torch.empty((m, k), device=device, dtype=torch.float32)
    _gumbel_table_kernel[(triton.cdiv(m, 32),)](out, m, k, seed, BLOCK_M=32, BLOCK_K=64)
    return out


def _gather_and_distance(
    z: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """quantized = codebook[idx] (..., D) and distance = |z - quantized|^2 (...) computed in fp32."""
    quantized = codebook[idx]
    diff = z.float() - quantized.float()
    return quantized, (diff * diff).sum(dim=-1).to(z.dtype)


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (materialises the (M, K) distance matrix; runs anywhere, incl. meta tensors).
# ----------------------------------------------------------------------------------------------------------


def vq_lookup_reference(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    sample: bool = False,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    straight_through: bool = False,
    gumbel: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`vq_lookup` (same arguments and gradients; its own Gumbel noise stream).

    ``gumbel``: optional pre-drawn (M, K) noise used instead of drawing from ``generator`` when sampling, e.g.
    :func:`gumbel_noise_like_kernel` to reproduce the Triton kernel's sample.
    """
    _check_shapes(z, codebook, tau)
    z2 = z.reshape(-1, z.shape[-1]).float()  # (M, D)
    cb = codebook.float()  # (K, D)
    dist = (z2 * z2).sum(-1, keepdim=True) - 2.0 * z2 @ cb.t() + (cb * cb).sum(-1)  # (M, K)
    scores = -dist / tau
    if sample and gumbel is not None:
        scores = scores + gumbel.to(scores.device, scores.dtype)
    elif sample:
        exp_noise = torch.empty_like(scores).exponential_(generator=generator)
        scores = scores - exp_noise.clamp_min(torch.finfo(scores.dtype).tiny).log()  # + Gumbel(0, 1)
    idx = scores.argmax(dim=-1)  # (M,): argmin of dist when not sampling
    quantized, distance = _gather_and_distance(z, codebook, idx.view(z.shape[:-1]))
    if straight_through:
        soft = (scores.softmax(dim=-1) @ cb).to(codebook.dtype).view(quantized.shape)  # p @ C
        quantized = quantized + (soft - soft.detach())
    return idx.view(z.shape[:-1]), quantized, distance


# ----------------------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------------------


@fx_leaf
def vq_lookup(
    z: torch.Tensor,
    codebook: torch.Tensor,
    *,
    sample: bool = False,
    tau: float = 1.0,
    generator: torch.Generator | None = None,
    straight_through: bool = False,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest codebook entry by squared L2 (``sample=False``) or a hard Gumbel-max sample (``sample=True``).

    Args:
        z: (..., D) vectors to quantise.
        codebook: (K, D) codes.
        sample: MetaSlot's training mode: index ~ Categorical(softmax(-d / tau)), drawn as
            argmax(-d / tau + Gumbel noise). The Triton kernel draws the noise with Philox from a seed taken
            from ``generator`` (default: torch's default CPU generator), so ``torch.manual_seed`` reproduces
            it. The reference draws its own noise with ``generator``: both follow the same distribution, not
            the same stream. tau -> 0 recovers the argmin. (MetaSlot calls
            ``F.gumbel_softmax(-d, tau, hard=True)``, whose hard sample ignores tau; it only ever uses tau=1,
            where the two agree.)
        tau: temperature (> 0) of the scores -d / tau.
        generator: torch.Generator for the sample's seed / noise.
        straight_through: add the straight-through gradient of the soft probabilities p = softmax(scores)
            (including the Gumbel noise when sampling): quantized behaves as (onehot - p.detach() + p) @ codebook
            in backward, so gradient reaches codebook rows through p and z through the distances. Off by
            default, because MetaSlot does not use it (below).
        backend: "auto" | "triton" | "reference", see ``kernels/_dispatch.py``.

    Returns:
        ``(indices, quantized, distances)``: indices (...) int64; quantized (..., D) = codebook[indices] in the
        codebook's dtype; distances (...) = |z - codebook[indices]|^2 in z's dtype (accumulated in fp32).

    Gradients (default, ``straight_through=False``), following the MetaSlot authors' code
    (``object_centric_bench/model/metaslot.py``: ``Codebook.forward`` takes ``zidx = zsoft.argmax(-1)`` and
    returns ``quant = templat.weight[zidx]``, the Gumbel-softmax ``zsoft`` itself is discarded; ``match``
    detaches the encoding, and ``MetaSlot.forward`` passes ``q_d.detach()`` anyway), in both train and eval:

    - quantized -> codebook: the gather's gradient, dL/dquantized summed into the chosen rows;
    - quantized -> z: none (indices are not differentiable);
    - distances -> z and codebook: the exact gradient of |z - c_idx|^2 (for commitment-style losses).

    The Triton forward never builds the (M, K) distance matrix; with ``straight_through`` its backward
    rebuilds the soft probabilities tile by tile from saved per-row softmax statistics.
    Raises ValueError naming the shapes when z and codebook do not fit together.
    """
    _check_shapes(z, codebook, tau)
    if not use_triton(z, codebook, backend=backend, extra_reason=_kernel_objection(z, codebook)):
        return vq_lookup_reference(
            z, codebook, sample=sample, tau=tau, generator=generator, straight_through=straight_through
        )
    z2 = z.reshape(-1, z.shape[-1])  # (M, D)
    seed = _seed(generator) if sample else 0
    idx, row_max, row_sum = _vq_fwd(z2, codebook, sample, tau, seed, stats=straight_through)
    idx = idx.view(z.shape[:-1])
    quantized, distance = _gather_and_distance(z, codebook, idx)
    if straight_through:
        soft = _SoftStraightThrough.apply(z2, codebook, row_max, row_sum, sample, float(tau), seed)
        quantized = quantized + soft.view(quantized.shape)
    return idx, quantized, distance
