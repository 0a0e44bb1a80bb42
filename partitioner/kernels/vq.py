"""Vector-quantisation lookup: nearest code by squared L2 (or a Gumbel-max sample), without an N x K matrix.

For z (M, D) and a codebook C (K, D), ``d[m, k] = |z_m|^2 - 2 z_m . c_k + |c_k|^2``. The forward kernel
(FlashAssign-style) keeps a tile of z on chip, streams code tiles, and keeps a running arg-best per row,
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
    dz  = sum_k dd_k (2 z - 2 c_k) = -2 dd @ C          (kernel over row tiles, two passes over codes)
    dC_k += sum_m p_mk dq_m + dd_mk (2 c_k - 2 z_m)     (kernel over code tiles, one pass over rows, computed
                                                         transposed: codes x rows, as flash-attention's dK / dV)

(sum_k dd_k = 0, p summing to 1: see _vq_st_bwd_dz_kernel for how the kernel keeps that exact to rounding.)

Precision, per input dtype (every dot accumulates in fp32; scores, softmax statistics, p, s and dd are fp32):

- bf16 / fp16: every dot runs on tensor cores (wgmma on sm_90 where a tile has 64 rows, else mma) with operands in
  the input dtype. z . c and dq . c are exact products of the inputs. The straight-through backward's last dots
  take p and -2 dd rounded to the input dtype (as flash-attention's backward rounds P and dS): each term of
  dz = -2 dd @ C and of dC is off by at most the dtype's unit roundoff (2^-8 bf16, 2^-11 fp16) of its size
  (tests/test_kernels_vq.py checks that bound against float64). fp16 dd must stay below 65504 in magnitude
  (|dd| <= |g - s| / tau). Outputs: dz and dC in fp32, then rounded to the input dtype.
- fp32 with TF32 allowed (``torch.backends.cuda.matmul.allow_tf32``, as torch's matmul): every dot on tensor cores
  in TF32 (10-bit mantissa operands), as torch's own fp32 matmul would then.
- fp32 otherwise: ieee fp32 dots, i.e. FMA loops on CUDA cores (exact fp32 products). In the backward, whose
  score dots share an operand, they go over the features in chunks of 32 (``BLOCK_DC``, see _nt_dots) so that no
  thread holds a whole 256-wide row of both operands.

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

Autotuning: configs are pruned by what an H100 holds: shared memory computed from the tiles and stages as Triton's
pipeliner allocates it, registers from the sm_90 compiles of bench/kernels_sm90.py (see _pruner).

File layout: autotune spaces and pruning, forward kernel, straight-through backward kernels, launchers +
autograd.Function, reference, public function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from partitioner.kernels._dispatch import INTERPRET, Backend, fx_leaf, tl, triton, use_triton
from partitioner.kernels._triton_common import _mm, prune_spills

__all__ = ["gumbel_noise_like_kernel", "vq_lookup", "vq_lookup_reference"]

_MAX_DIM = 512  # the feature dim is held whole in registers
_INT32_MAX = 2**31 - 1
_MAX_CODES = _INT32_MAX  # code indices are int32 in the kernels (written out as int64)
_M_BUCKET_MAX = 2**15  # autotune key: rows in powers of two up to this, one bucket beyond (see _m_bucket)


# ----------------------------------------------------------------------------------------------------------
# Autotune spaces: (BLOCK_M, BLOCK_K) tiles. One small config under the interpreter (also exercises tails).
# ----------------------------------------------------------------------------------------------------------


def _fwd_configs() -> list:
    """The forward's space: row tiles of 32 to 256 (wide tiles re-read the codebook less often; 32 for small M)
    by code tiles of 32 to 128; one warpgroup (4 warps) per 64 rows up to 128 rows, 8 warps from 128 rows."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128, 256)
        for bk in (32, 64, 128)
        for w in ((4,) if bm <= 64 else (4, 8) if bm == 128 else (8,))
        for s in (2, 3)
    ]


def _bwd_configs(second: str) -> list:
    """The straight-through kernels' space; `second` names the code tile (BLOCK_K or BLOCK_K2). Code tiles of 16
    to 64: each holds (BLOCK_M, code tile) fp32 score tiles beside a (rows or codes, BLOCK_D) fp32 accumulator."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, second: 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, second: bk}, num_warps=w, num_stages=s)
        for bm in (32, 64, 128)
        for bk in (16, 32, 64)
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


# ----------------------------------------------------------------------------------------------------------
# Autotune pruning by the H100's limits. Shared memory: computed from the tiles, element sizes and stages the way
# Triton 3.9's pipeliner allocates it (an upper bound; tests/test_kernels_vq_limits.py checks it against what
# bench/kernels_sm90.py compiles). Registers: ptxas decides them, and how it does is not a function of the tile
# sizes alone (at 8 warps it often holds a kernel to 128 registers and spills a few bytes rather than use more),
# so a coarse model of the live fp32 tiles drops what cannot fit at any width, and at the benchmarks' row width
# (BLOCK_D = 256) the configs the compile spilled are dropped by name (_SPILLED, from bench/kernels_sm90.py).
# ----------------------------------------------------------------------------------------------------------

_SMEM_LIMIT = 232448  # bytes of shared memory per block on an H100 / H200 (227 KiB, the opt-in maximum)
# Registers per thread the resident fp32 tiles may take in the coarse model: tensor-core paths (the accumulators
# live in the MMA layouts), and fp32 FMA dots (their operands pass through registers too).
_TILE_WORDS = {"tc": 192, "fma": 96}


def _tc_buffers(stages: int, elem: int, wgmma: bool) -> int:
    """Buffers the pipeliner allocates for a tile streamed into a tensor-core dot: num_stages for wgmma (Hopper's
    MMA reads its operands from shared memory while the next loads land) and for fp32 (TF32) operands,
    num_stages - 1 for mma.sync with 2-byte operands (measured on the harness's compiles)."""
    return stages if wgmma or elem == 4 else stages - 1


def _smem_fwd(bm: int, bk: int, stages: int, block_d: int, elem: int) -> int:
    """Forward: z (BLOCK_M, BLOCK_D) resident, num_stages - 1 code tiles (BLOCK_K, BLOCK_D) in flight, and a
    (BLOCK_M, BLOCK_K) fp32 tile of scratch (layout conversions and cross-warp reductions of the scores)."""
    return bm * block_d * elem + (stages - 1) * bk * block_d * elem + bm * bk * 4


def _smem_dz(bm: int, bk: int, stages: int, block_d: int, elem: int, chunk: int) -> int:
    """Straight-through part 1: the larger of its loops and its epilogue (buffers are reused between them).

    Tensor-core path: z and dq (BLOCK_M, BLOCK_D) resident, code tiles and their norms streamed, -2 dd
    (BLOCK_M, BLOCK_K) staged for the last dot. fp32 FMA path (chunk < BLOCK_D): pass 1 streams feature chunks of
    z, dq and c, pass 2 stages a whole code tile and dd. Epilogue: dz (BLOCK_M, BLOCK_D) fp32 re-laid out for the
    store."""
    if chunk < block_d:
        loop = max(stages * (2 * bm + bk) * chunk * 4, bk * block_d * 4 + bm * bk * 4)
    else:
        bufs = _tc_buffers(stages, elem, wgmma=bm >= 64)
        loop = 2 * bm * block_d * elem + bufs * bk * block_d * elem + stages * bk * 4 + bm * bk * 4
    return max(loop, bm * block_d * 4)


def _smem_dc(bm: int, bk: int, stages: int, block_d: int, elem: int, chunk: int) -> int:
    """Straight-through part 2: the larger of its loop and its epilogue.

    Tensor-core path: the program's codes (BLOCK_K2, BLOCK_D) resident, row tiles of z and dq (BLOCK_M, BLOCK_D)
    and four (BLOCK_M,) row statistics streamed, p^T / dd^T (BLOCK_K2, BLOCK_M) staged for the last dots, and for
    TF32 a second copy of z and dq (32-bit operands cannot be read transposed from shared memory). fp32 FMA path:
    feature chunks in flight, then z and dq whole. Epilogue: dc (BLOCK_K2, BLOCK_D) fp32 re-laid out."""
    if chunk < block_d:
        loop = max(stages * (2 * bm + bk) * chunk * 4, 2 * bm * block_d * 4 + bk * bm * 4 + 16 * bm)
    else:
        bufs = _tc_buffers(stages, elem, wgmma=bk >= 64)
        loop = bk * block_d * elem + bufs * (2 * bm * block_d * elem + 16 * bm) + bk * bm * 4
        loop += 2 * bm * block_d * 4 if elem == 4 else 0
    return max(loop, bk * block_d * 4)


def _tile_words(kernel: str, bm: int, bk: int, warps: int, block_d: int) -> float:
    """32-bit registers per thread for the fp32 tiles live in the loop: the (rows or codes, BLOCK_D) accumulator
    and four (BLOCK_M, code tile) score-sized tiles (scores, g, p, dd)."""
    acc = (bm if kernel == "dz" else bk) * block_d
    return (acc + 4 * bm * bk) / (32 * warps)


# Every config ptxas spilled at BLOCK_D = 256 (bench/kernels_sm90.py, triton 3.9.0, ptxas 13.4, sm_90a; some the model
# above drops too), by kernel and input ("2byte": bf16 or fp16, either spilled; "tf32": fp32 with TF32 dots), as
# (BLOCK_M, code tile, num_warps, num_stages). Regenerate when Triton or ptxas changes (see the limits test).
_SPILLED: dict[tuple[str, str], frozenset[tuple[int, int, int, int]]] = {
    ("dc", "2byte"): frozenset(
        {
            (32, 32, 8, 3),
            (32, 64, 4, 2),
            (32, 64, 4, 3),
            (32, 64, 8, 2),
            (32, 64, 8, 3),
            (64, 64, 8, 2),
            (128, 16, 4, 2),
            (128, 32, 4, 2),
        }
    ),
    ("dc", "fp32"): frozenset(
        {
            (32, 32, 4, 2),
            (32, 32, 4, 3),
            (32, 32, 8, 2),
            (32, 32, 8, 3),
            (32, 64, 8, 2),
            (32, 64, 8, 3),
            (64, 16, 4, 2),
            (64, 16, 4, 3),
            (64, 32, 8, 2),
            (64, 32, 8, 3),
        }
    ),
    ("dc", "tf32"): frozenset({(32, 32, 4, 2), (32, 32, 4, 3), (32, 64, 8, 2), (64, 16, 4, 2)}),
    ("dz", "2byte"): frozenset(
        {
            (32, 32, 8, 2),
            (32, 64, 8, 2),
            (64, 32, 4, 3),
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (64, 64, 8, 2),
            (64, 64, 8, 3),
            (128, 16, 4, 2),
            (128, 16, 4, 3),
            (128, 32, 4, 2),
            (128, 32, 4, 3),
            (128, 64, 4, 2),
            (128, 64, 4, 3),
            (128, 64, 8, 2),
            (128, 64, 8, 3),
        }
    ),
    ("dz", "fp32"): frozenset(
        {
            (32, 16, 4, 2),
            (32, 16, 4, 3),
            (32, 16, 8, 3),
            (32, 32, 4, 2),
            (32, 32, 4, 3),
            (32, 32, 8, 2),
            (32, 32, 8, 3),
            (32, 64, 4, 2),
            (32, 64, 4, 3),
            (64, 16, 4, 2),
            (64, 16, 4, 3),
            (64, 16, 8, 2),
            (64, 16, 8, 3),
            (64, 32, 4, 2),
            (64, 32, 4, 3),
            (64, 32, 8, 2),
            (64, 32, 8, 3),
        }
    ),
    ("dz", "tf32"): frozenset(
        {
            (32, 32, 4, 2),
            (32, 32, 4, 3),
            (32, 32, 8, 2),
            (32, 32, 8, 3),
            (32, 64, 4, 2),
            (64, 16, 4, 2),
            (64, 16, 4, 3),
            (64, 16, 8, 2),
            (64, 16, 8, 3),
            (64, 32, 4, 2),
            (64, 32, 8, 2),
        }
    ),
    ("fwd", "fp32"): frozenset(
        {
            (32, 64, 4, 2),
            (32, 64, 4, 3),
            (32, 128, 4, 2),
            (64, 32, 4, 2),
            (64, 32, 4, 3),
            (64, 64, 4, 2),
            (64, 64, 4, 3),
            (128, 32, 4, 2),
            (128, 32, 4, 3),
            (128, 32, 8, 2),
            (128, 32, 8, 3),
            (128, 64, 8, 2),
        }
    ),
    ("fwd", "tf32"): frozenset({(32, 128, 4, 2), (64, 128, 4, 2), (128, 64, 4, 2)}),
}


def _input_kind(elem: int, precision: str) -> str:
    """_SPILLED's input key: "2byte" (bf16 / fp16), "tf32" (fp32 with TF32 dots) or "fp32" (ieee, FMA loops)."""
    return {2: "2byte", 4: "tf32" if precision == "tf32" else "fp32"}[elem]


def _pruner(kernel: str) -> Callable[..., list]:
    """The early_config_prune of `kernel` ("fwd", "dz" or "dc")."""

    def prune(configs: list, named_args: dict, **kwargs: object) -> list:
        """Keep configs whose tiles are not far larger than the problem and that fit the H100: shared memory
        (_smem_*), registers (_tile_words, _SPILLED); the smallest config survives if none does.

        Depends on the rows only through _m_bucket(M), which is in the autotune key (a tuned config is reused
        for every M in its bucket, so the pruning that chose it must not depend on more)."""
        args = {**named_args, **kwargs}
        m_cap = max(16, _m_bucket(int(args["M"])))
        k_cap = max(16, triton.next_power_of_2(int(args["K"])))
        block_d = int(args["BLOCK_D"])
        elem = args["Z"].element_size() if hasattr(args.get("Z"), "element_size") else 4
        precision = str(args.get("DOT_PRECISION", "ieee"))
        chunk = int(args.get("BLOCK_DC", block_d))
        kind = _input_kind(elem, precision)
        spilled = _SPILLED.get((kernel, kind), frozenset()) if block_d == 256 else frozenset()

        def fits(c: triton.Config) -> bool:
            bm, bk = c.kwargs["BLOCK_M"], c.kwargs.get("BLOCK_K", c.kwargs.get("BLOCK_K2"))
            st, w = c.num_stages, c.num_warps
            if kernel == "fwd":
                smem = _smem_fwd(bm, bk, st, block_d, elem)
                words = (bm * bk * 3) / (32 * w)  # dist / score tiles; the accumulators are (BLOCK_M,) vectors
            else:
                smem = (_smem_dz if kernel == "dz" else _smem_dc)(bm, bk, st, block_d, elem, chunk)
                words = _tile_words(kernel, bm, bk, w, block_d)
            fits_regs = words <= _TILE_WORDS["fma" if kind == "fp32" else "tc"] and (bm, bk, w, st) not in spilled
            return bm <= m_cap and bk <= k_cap and smem <= _SMEM_LIMIT and fits_regs

        kept = [c for c in configs if fits(c)]
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.num_stages, -c.num_warps))]

    return prune


_prune_fwd = _pruner("fwd")
_prune_dz = _pruner("dz")
_prune_dc = _pruner("dc")


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


@prune_spills
@triton.autotune(configs=_fwd_configs(), key=_FWD_KEY, prune_configs_by={"early_config_prune": _prune_fwd})
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


# Straight-through backward. Both kernels rebuild p tile by tile from the forward's per-row statistics:
#   p_mk = exp(score_mk - row_max_m) / (row_sum_m * r_m),  score = -(|z_m|^2 - 2 z_m . c_k + |c_k|^2) / tau (+ g_mk),
# with |c_k|^2 precomputed by the launcher (CC, fp32), and r_m = sum_k exp(...) / row_sum_m the correction part 1
# finds (see there). No (BLOCK_M, BLOCK_D) tile is upcast to fp32 inside a loop.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _mm_acc(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with acc fp32 (the dot accumulates into it: no temporary tile). See _mm for "interp"."""
    if DOT_PRECISION == "interp":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def _soft_tile(z, dq, z_rows, q_rows, m_ok, C, CC, k0, offs_d, offs_m, zz, row_max, row_norm,
               K, D, stride_zd, stride_qd, stride_ck, stride_cd, seed, inv_tau, SAMPLE: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_DC: tl.constexpr):  # fmt: skip
    """Code tile k0 .. k0 + BLOCK_K - 1 for rows offs_m: (codes c (BLOCK_K, BLOCK_D) in the input dtype, p, g),
    p and g = dq . c_k both (BLOCK_M, BLOCK_K) fp32, p = 0 on codes past K.

    z, dq (BLOCK_M, BLOCK_D) stay in the input dtype: both dots run on tensor cores for bf16 / fp16 (products of
    2-byte floats are exact in the fp32 accumulator). The rows' zz = |z|^2, row_max and row_norm (the forward's
    row sum, times part 1's correction) are (BLOCK_M,) fp32; the score is the forward's (and the reference's)
    -(|z|^2 - 2 z . c + |c|^2) / tau, so that its fp32 rounding, ~1e-7 of |z|^2 + |c|^2, is the one theirs has.
    BLOCK_DC < BLOCK_D (fp32 FMA dots): z . c and dq . c are summed over feature chunks of BLOCK_DC, reloaded
    from z_rows / q_rows (pointers to the rows, (BLOCK_M, 1)) and C (see _nt_dots).
    """
    offs_k = k0 + tl.arange(0, BLOCK_K)
    k_ok = offs_k < K
    # int64: K * stride_ck (a large codebook) or D * stride_cd (a transposed one) may pass 2^31
    c_rows = C + offs_k.to(tl.int64)[:, None] * stride_ck
    c = tl.load(c_rows + offs_d.to(tl.int64)[None, :] * stride_cd, mask=k_ok[:, None] & (offs_d[None, :] < D),
                other=0.0)  # fmt: skip
    cc = tl.load(CC + offs_k, mask=k_ok, other=0.0)
    zc, g = _nt_dots(z, dq, c, z_rows, q_rows, c_rows, m_ok, k_ok, D, stride_zd, stride_qd, stride_cd,
                     DOT_PRECISION, BLOCK_D, BLOCK_DC, False)  # fmt: skip
    if BLOCK_DC < BLOCK_D:  # the chunked dots did not use c (its load above is dead): loaded after them, the
        # tile is not live across their loop
        c = tl.load(c_rows + offs_d.to(tl.int64)[None, :] * stride_cd, mask=k_ok[:, None] & (offs_d[None, :] < D),
                    other=0.0)  # fmt: skip
    score = -(zz[:, None] - 2.0 * zc + cc[None, :]) * inv_tau
    if SAMPLE:
        score += _gumbel(seed, offs_m, k0, BLOCK_K)
    p = tl.exp2((score - row_max[:, None]) * 1.4426950408889634) / row_norm[:, None]
    p = tl.where(k_ok[None, :], p, 0.0)
    return c, p, g


@triton.jit
def _nt_dots(z, dq, c, z_rows, q_rows, c_rows, m_ok, k_ok, D, stride_zd, stride_qd, stride_cd,
             DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
             CODES_FIRST: tl.constexpr):  # fmt: skip
    """(z c^T, dq c^T), each (rows, codes) fp32, or transposed (c z^T, c dq^T) when CODES_FIRST.

    BLOCK_DC == BLOCK_D: one dot each on the tiles z, dq (rows, BLOCK_D) and c (codes, BLOCK_D). BLOCK_DC < BLOCK_D
    (fp32 inputs with ieee dots): the features in chunks of BLOCK_DC, each loaded from z_rows, q_rows (rows, 1) and
    c_rows (codes, 1) (pointers to the rows, L1 / L2 hits): an FMA dot holds each thread's rows and columns of
    its operands whole along the reduced dimension, and with the shared operand live across two dots a whole
    256-wide feature dimension spilled.
    """
    if BLOCK_DC == BLOCK_D:
        if CODES_FIRST:
            zc = _mm(c, tl.trans(z), DOT_PRECISION)
            g = _mm(c, tl.trans(dq), DOT_PRECISION)
        else:
            zc = _mm(z, tl.trans(c), DOT_PRECISION)
            g = _mm(dq, tl.trans(c), DOT_PRECISION)
    else:
        if CODES_FIRST:
            zc = tl.zeros((c_rows.shape[0], z_rows.shape[0]), dtype=tl.float32)
        else:
            zc = tl.zeros((z_rows.shape[0], c_rows.shape[0]), dtype=tl.float32)
        g = tl.zeros_like(zc)
        for d0 in range(0, BLOCK_D, BLOCK_DC):
            offs = d0 + tl.arange(0, BLOCK_DC)
            d_ok = offs[None, :] < D
            offs64 = offs.to(tl.int64)[None, :]
            zt = tl.load(z_rows + offs64 * stride_zd, mask=m_ok[:, None] & d_ok, other=0.0)
            qt = tl.load(q_rows + offs64 * stride_qd, mask=m_ok[:, None] & d_ok, other=0.0)
            ct = tl.load(c_rows + offs64 * stride_cd, mask=k_ok[:, None] & d_ok, other=0.0)
            if CODES_FIRST:
                zc = _mm_acc(ct, tl.trans(zt), zc, DOT_PRECISION)
                g = _mm_acc(ct, tl.trans(qt), g, DOT_PRECISION)
            else:
                zc = _mm_acc(zt, tl.trans(ct), zc, DOT_PRECISION)
                g = _mm_acc(qt, tl.trans(ct), g, DOT_PRECISION)
    return zc, g


# ----------------------------------------------------------------------------------------------------------
# Straight-through backward, part 1: grid (cdiv(M, BLOCK_M),). Pass 1 over code tiles: s = sum_k p_k g_k.
# Pass 2: dd = p (s - g) / tau, dz = -2 dd @ C. Writes dz (M, D); s, |z|^2 and row_sum * r (M,)
# for part 2. Live across the loops: z, dq (input dtype) and dz (fp32), each (BLOCK_M, BLOCK_D).
# ----------------------------------------------------------------------------------------------------------


@prune_spills
@triton.autotune(configs=_bwd_configs("BLOCK_K"), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_dz})
@triton.jit
def _vq_st_bwd_dz_kernel(
    Z, C, DQ, ROW_MAX, ROW_SUM, CC, DZ, S_OUT, ZZ_OUT, NORM_OUT,
    stride_zm, stride_zd, stride_ck, stride_cd, stride_qm, stride_qd,
    M, K, D, M_BUCKET, seed, inv_tau,
    SAMPLE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_M >= 16 and BLOCK_K >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    pid = tl.program_id(0)
    offs_m = pid.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * stride_zm, M * D may pass 2^31
    offs_d = tl.arange(0, BLOCK_D)
    offs_d64 = offs_d.to(tl.int64)  # times the callers' feature strides
    m_ok = offs_m < M
    md_mask = m_ok[:, None] & (offs_d[None, :] < D)

    # Row tiles of z and of the incoming gradient dq (BLOCK_M, BLOCK_D), in the input dtype; padded rows are 0
    z_rows = Z + offs_m[:, None] * stride_zm
    q_rows = DQ + offs_m[:, None] * stride_qm
    z = tl.load(z_rows + offs_d64[None, :] * stride_zd, mask=md_mask, other=0.0)
    dq = tl.load(q_rows + offs_d64[None, :] * stride_qd, mask=md_mask, other=0.0)
    zz = tl.sum(z.to(tl.float32) * z.to(tl.float32), axis=1)
    row_max = tl.load(ROW_MAX + offs_m, mask=m_ok, other=0.0)
    row_sum = tl.load(ROW_SUM + offs_m, mask=m_ok, other=1.0)

    # Pass 1: s = sum_k p_k (dq . c_k) / sum_k p_k. The forward summed exp(score) with its own dot and tiles, so
    # sum_k p_k is 1 only to ~1e-6; s - g_k cancels for the likely codes (p_k ~ 1), where that error would come
    # back amplified in dz. So p is renormalised by its own sum r: row_sum * r is the norm from here on.
    s = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        _, p, g = _soft_tile(z, dq, z_rows, q_rows, m_ok, C, CC, k0, offs_d, offs_m, zz, row_max, row_sum, K, D,
                             stride_zd, stride_qd, stride_ck, stride_cd, seed, inv_tau, SAMPLE, DOT_PRECISION,
                             BLOCK_K, BLOCK_D, BLOCK_DC)  # fmt: skip
        s += tl.sum(p * g, axis=1)
        r += tl.sum(p, axis=1)
    r = tl.where(m_ok, r, 1.0)  # padded rows: p underflows to 0 there
    s = s / r
    row_norm = row_sum * r

    # Pass 2: dz = sum_k dd_k (2 z - 2 c_k) = -2 dd @ C, since sum_k dd_k = (s sum_k p_k - sum_k p_k g_k) / tau
    # is 0 (to rounding: p sums to 1 and s = sum_k p_k g_k with the very p of this kernel; the reference's autograd
    # sums the same rounding noise). Dropping the 2 z sum_k dd_k term keeps z out of registers and dz's epilogue
    # free of (BLOCK_M, BLOCK_D) layout conversions. -2 dd goes into the dot in the codes' dtype (bf16 / fp16:
    # rounded to 8 / 11 bits, as flash-attention's backward rounds dS), accumulated in fp32 into dz itself.
    dz = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c, p, g = _soft_tile(z, dq, z_rows, q_rows, m_ok, C, CC, k0, offs_d, offs_m, zz, row_max, row_norm, K, D,
                             stride_zd, stride_qd, stride_ck, stride_cd, seed, inv_tau, SAMPLE, DOT_PRECISION,
                             BLOCK_K, BLOCK_D, BLOCK_DC)  # fmt: skip
        dd = p * (s[:, None] - g) * inv_tau
        dz = _mm_acc((-2.0 * dd).to(c.dtype), c, dz, DOT_PRECISION)

    tl.store(DZ + offs_m[:, None] * D + offs_d[None, :], dz, mask=md_mask)  # contiguous (M, D): column < 512
    tl.store(S_OUT + offs_m, s, mask=m_ok)
    tl.store(ZZ_OUT + offs_m, zz, mask=m_ok)
    tl.store(NORM_OUT + offs_m, row_norm, mask=m_ok)


# ----------------------------------------------------------------------------------------------------------
# Straight-through backward, part 2: grid (cdiv(K, BLOCK_K2),). One pass over row tiles:
# dC_k = sum_m p_mk dq_m + dd_mk (2 c_k - 2 z_m)  (the soft part; the gather part is an index_add outside).
# Computed transposed, codes x rows (as flash-attention's dK / dV): p^T and dd^T (BLOCK_K2, BLOCK_M) come out of
# c @ z^T and c @ dq^T and feed p^T @ dq and dd^T @ z directly. Live across the loop: c (input dtype) and dc
# (fp32), each (BLOCK_K2, BLOCK_D); z and dq (BLOCK_M, BLOCK_D) stream through shared memory.
# ----------------------------------------------------------------------------------------------------------


@prune_spills
@triton.autotune(configs=_bwd_configs("BLOCK_K2"), key=_BWD_KEY, prune_configs_by={"early_config_prune": _prune_dc})
@triton.jit
def _vq_st_bwd_dc_kernel(
    Z, C, DQ, ROW_MAX, ZZ_IN, NORM_IN, S_IN, CC, DC,
    stride_zm, stride_zd, stride_ck, stride_cd, stride_qm, stride_qd,
    M, K, D, M_BUCKET, seed, inv_tau,
    SAMPLE: tl.constexpr, WIDE_ROWS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K2: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
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
    k_ok = offs_k < K
    kd_mask = k_ok[:, None] & (offs_d[None, :] < D)

    # This program's codes (BLOCK_K2, BLOCK_D) in the input dtype, their squared norms, and the accumulators
    c_rows = C + offs_k[:, None] * stride_ck
    c = tl.load(c_rows + offs_d64[None, :] * stride_cd, mask=kd_mask, other=0.0)
    cc = tl.load(CC + offs_k, mask=k_ok, other=0.0)
    dc = tl.zeros((BLOCK_K2, BLOCK_D), dtype=tl.float32)
    dd_sum = tl.zeros((BLOCK_K2,), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + rows
        m_ok = offs_m < M
        md_mask = m_ok[:, None] & (offs_d[None, :] < D)
        # Row tile: z, dq (BLOCK_M, BLOCK_D) in the input dtype; part 1's row statistics (BLOCK_M,)
        z_rows = Z + offs_m[:, None] * stride_zm
        q_rows = DQ + offs_m[:, None] * stride_qm
        zz = tl.load(ZZ_IN + offs_m, mask=m_ok, other=0.0)
        row_max = tl.load(ROW_MAX + offs_m, mask=m_ok, other=0.0)
        row_norm = tl.load(NORM_IN + offs_m, mask=m_ok, other=1.0)
        s = tl.load(S_IN + offs_m, mask=m_ok, other=0.0)
        # c z^T and c dq^T (BLOCK_K2, BLOCK_M); z and dq whole are loaded after chunked dots (not live across them)
        if BLOCK_DC == BLOCK_D:
            z = tl.load(z_rows + offs_d64[None, :] * stride_zd, mask=md_mask, other=0.0)
            dq = tl.load(q_rows + offs_d64[None, :] * stride_qd, mask=md_mask, other=0.0)
            zc, g = _nt_dots(z, dq, c, z_rows, q_rows, c_rows, m_ok, k_ok, D, stride_zd, stride_qd, stride_cd,
                             DOT_PRECISION, BLOCK_D, BLOCK_DC, True)  # fmt: skip
        else:
            zc, g = _nt_dots(None, None, None, z_rows, q_rows, c_rows, m_ok, k_ok, D, stride_zd, stride_qd,
                             stride_cd, DOT_PRECISION, BLOCK_D, BLOCK_DC, True)  # fmt: skip
            z = tl.load(z_rows + offs_d64[None, :] * stride_zd, mask=md_mask, other=0.0)
            dq = tl.load(q_rows + offs_d64[None, :] * stride_qd, mask=md_mask, other=0.0)
        # p^T and dd^T (BLOCK_K2, BLOCK_M), as part 1 computes p and dd; padded rows give p = 0
        score = -(zz[None, :] - 2.0 * zc + cc[:, None]) * inv_tau
        if SAMPLE:
            score += tl.trans(_gumbel(seed, offs_m, k0, BLOCK_K2))
        p = tl.exp2((score - row_max[None, :]) * 1.4426950408889634) / row_norm[None, :]
        p = tl.where(m_ok[None, :], p, 0.0)
        dd = p * (s[None, :] - g) * inv_tau
        dd_sum += tl.sum(dd, axis=1)
        # dc += p^T dq - 2 dd^T z: operands in the input dtype (p, dd rounded as in part 1), fp32 accumulation
        dc = _mm_acc(p.to(dq.dtype), dq, dc, DOT_PRECISION)
        dc = _mm_acc((-2.0 * dd).to(z.dtype), z, dc, DOT_PRECISION)
    # c again from memory (L2) rather than live in registers across the loop beside dc
    c = tl.load(c_rows + offs_d64[None, :] * stride_cd, mask=kd_mask, other=0.0)
    dc += 2.0 * c.to(tl.float32) * dd_sum[:, None]
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


def _feature_chunk(dtype: torch.dtype, block_d: int) -> int:
    """BLOCK_DC of the straight-through kernels: the whole row, except fp32 inputs with ieee dots (FMA loops), whose
    score dots go over the features in chunks of 32 (see _nt_dots)."""
    return min(block_d, 32) if dtype == torch.float32 and _dot_precision() == "ieee" else block_d


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
        zz = torch.empty(m, device=z2.device, dtype=torch.float32)
        norm = torch.empty(m, device=z2.device, dtype=torch.float32)
        dc = torch.empty((k, d), device=z2.device, dtype=torch.float32)
        cc = codebook.float().square().sum(1)  # |c_k|^2 (K,) fp32
        block_d = max(16, triton.next_power_of_2(d))
        common = dict(
            M=m, K=k, D=d, M_BUCKET=_m_bucket(m), seed=seed, inv_tau=1.0 / tau, SAMPLE=sample,
            DOT_PRECISION=_dot_precision(), BLOCK_D=block_d, BLOCK_DC=_feature_chunk(z2.dtype, block_d),
        )  # fmt: skip
        strides = (*z2.stride(), *codebook.stride(), *dq.stride())
        _vq_st_bwd_dz_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)](
            z2, codebook, dq, row_max, row_sum, cc, dz, s, zz, norm, *strides, **common
        )
        wide_rows = _wide_rows(m, z2.stride(0), dq.stride(0))
        _vq_st_bwd_dc_kernel[lambda meta: (triton.cdiv(k, meta["BLOCK_K2"]),)](
            z2, codebook, dq, row_max, zz, norm, s, cc, dc, *strides, WIDE_ROWS=wide_rows, **common
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
        backend: "auto" | "triton" | "reference", see ``partitioner/kernels/_dispatch.py``.

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
