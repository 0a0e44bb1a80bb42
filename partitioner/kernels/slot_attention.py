"""Slot Attention aggregation step (Locatello et al. 2020, as used by MetaSlot, arXiv 2505.20772), fused.

One step turns slot queries and token keys/values into per-slot updates::

    logits  = (q * D**-0.5) @ k^T                       (B, S, N), inactive slots -> -inf
    attn    = softmax(logits, dim=S)                    slots compete for each token ("inverted" attention)
    renorm  = attn / (attn.sum(dim=N) + eps)            weighted mean over the tokens a slot won
    updates = renorm @ v                                (B, S, Dv)

The Triton forward makes one pass over token tiles per (batch row, token split): a (S, BLOCK_N) tile of
logits is computed, soft-maxed over the slot axis (the whole slot column is in the tile), and folded into
two running sums, ``sum_n attn * v`` (S, Dv) and ``sum_n attn`` (S,). Dividing the first by the second plus
eps at the end is exactly the renormalisation, so no more than one tile of the B x S x N matrix exists
(unless ``return_attn`` asks for it). The backward recomputes the tile and needs no second pass either:
with den = sum_n attn + eps and r = attn / den, the renormalisation's gradient term is
``sum_n d(renorm) * attn / den**2 = (dU . U) / den`` per slot, known from the forward outputs.

Offsets: the batch row, and the slot and feature indices multiplied by a caller's stride, are int64 before the
multiplication: B * N * D passes 2^31 on large inputs, and a strided view's slot or feature stride can be as large
as its tensor (these are computed once per program; ptxas gives the kernels the same registers as with int32).
Token offsets inside a batch row, computed per token tile, stay int32 unless the launcher finds that a token
index times a token stride can reach 2^31 (``WIDE_TOKENS``, see :func:`_wide_tokens`): int64 there costs
registers and spills in the backward. int32 also stays for the masks (indices below S, D, Dv, N < 2^31; tiles
start at multiples of their power-of-two size, so index + tile < 2^31 too) and for the in-program part of the
partial buffers the launcher allocates contiguous (slot * Dv + feature < 128 * 512). Widening is explicit, never
through loop bounds: Triton's interpreter runs loops over Python ints, so a loop variable's type differs between
the interpreter and compiled code (tests/test_kernels_offsets.py runs these kernels' index math in the interpreter).

Precision per input dtype (the tl.dot calls, see ``_dot_precision``): bf16 / fp16 dots take their operands in
the input dtype (q pre-scaled, the attention tile, and in the backward d logits and attn / den are rounded to it)
and accumulate in fp32 on tensor cores (mma.sync / wgmma on sm_90); the softmax, the running sums, dq and the
partial buffers are fp32. fp32 dots are exact fp32 (``input_precision="ieee"``, FMA loops on CUDA cores) unless
``torch.backends.cuda.matmul.allow_tf32`` is set, then TF32 on tensor cores (10-bit mantissa operands, fp32
accumulation), as torch's own matmuls in the reference; the autotune key has DOT_PRECISION, so each setting is
tuned on its own. The backward computes dk and dv in feature chunks (``BLOCK_C``) so that no whole (BLOCK_N,
feature) fp32 tile is live; autotune configs are pruned by shared-memory and register models checked against
sm_90 compiles (``_prune``).

File layout: autotune space and its pruning, forward kernel, backward kernel, launcher + autograd.Function,
reference, public function.
"""

from __future__ import annotations

import functools

import torch

from partitioner.kernels._dispatch import INTERPRET, Backend, fx_leaf, tl, triton, use_triton
from partitioner.kernels._triton_common import _mm, prune_spills

__all__ = ["slot_attention", "slot_attention_reference"]

_LOG2E = 1.4426950408889634
_MAX_SLOTS = 128  # the whole slot column must fit one tile
_MAX_DIM = 512  # q/k and v feature dims held whole in registers
_INT32_MAX = 2**31 - 1
_DK_CHUNK = 64  # features of dk / dv the backward computes and stores at a time
_SMEM_LIMIT = 232448  # H100 / H200: 227 KiB of shared memory per block


# ----------------------------------------------------------------------------------------------------------
# Autotune space. Only BLOCK_N (tokens per tile) and the launch shape are tuned; BLOCK_S / BLOCK_D / BLOCK_DV
# are the padded problem sizes. Under the interpreter there is a single small config (timing is meaningless
# there, and a small BLOCK_N exercises the multi-tile and tail paths in the tests).
# ----------------------------------------------------------------------------------------------------------


def _configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bn in (16, 32, 64, 128)
        for w in (4, 8)
        for s in (1, 2, 3)
    ]


# Pruning by the H100's limits, with models checked against sm_90 compiles of all 24 configs of each kernel at
# the benchmark shapes (bench/kernels_sm90.py, Triton 3.9, ptxas 13.4; B=64, S=7 / 11, N=1024 / 256, D = Dv =
# 256, i.e. BLOCK_S=16, BLOCK_D = BLOCK_DV = 256, BLOCK_C=64) for bf16, fp16, fp32 and fp32 with TF32: 192
# compiles. "fma": fp32 inputs with ieee dots (no TF32), which Triton lowers to FMA loops on CUDA cores, with
# their own register use. Register budget in words per thread (_reg_words), per kernel and dot path, between
# the largest count that compiled without spills and the smallest that spilled:
#   fwd, tensor cores: clean up to 224 (bf16 BLOCK_N=128 w4: 233 registers), spills at 368 (TF32
#       BLOCK_N=128 w4, s1 and s2) -> 232.
#   fwd, fma: clean up to 102 (BLOCK_N=16 w4: 198 registers at s1), spills from 108 (BLOCK_N=64 w8) -> 104.
#   bwd, tensor cores: clean up to 192 (bf16 BLOCK_N=64 w4: 222 registers; TF32 BLOCK_N=32 w4: 224), spills
#       from 240 (TF32 BLOCK_N=128 w8) -> 200.
#   bwd, fma: clean up to 96 (BLOCK_N=32 w8, s2 and s3), spills at 144 with 8 warps (BLOCK_N=64 w8) though not
#       with 4 (BLOCK_N=16 w4 s2 / s3, pruned with it) -> 96; and every num_stages=1 config spilled (0.4-90 KB
#       per thread), so the backward's FMA configs need s >= 2.
# The budgets hold at the benchmark shapes only. At two others (B=8, N=512 and S=24, D=128, Dv=64 / S=7, D = Dv =
# 64: 223 kept configs x dtypes compiled) the smem bound held everywhere, but 18 of the 50 kept fp32 FMA configs
# spilled (0.01-14 KB per thread, at word counts that were clean here) and 7 of the 173 tensor-core ones did
# (8-860 B; the TF32 backward at S=24 from 160 words): a model of other shapes needs compiles at them.
_REG_WORDS = {("fwd", False): 232, ("fwd", True): 104, ("bwd", False): 200, ("bwd", True): 96}


def _reg_words(bwd: bool, bn: int, warps: int, bs: int, bd: int, bdv: int, elem: int, block_c: int) -> float:
    """32-bit words per thread of the tiles a program keeps in registers: the loop-invariant slot tiles (forward:
    q and the fp32 accumulator; backward: log2-scaled q, dU and the fp32 dq accumulator), one (BLOCK_N, feature)
    k or v tile in the input dtype, logits-sized fp32 tiles (3 in the forward, 4 in the backward) and, in the
    backward, one (BLOCK_N, BLOCK_C) fp32 chunk of dk / dv."""
    word = elem / 4
    tile = bn * max(bd, bdv) * word
    if bwd:
        resident = bs * (bd + bdv) * word + bs * bd
        tile += bn * block_c + 4 * bs * bn
    else:
        resident = bs * bd * word + bs * bdv
        tile += 3 * bs * bn
    return (resident + tile) / (32 * warps)


def _smem_bytes(
    bwd: bool, bn: int, stages: int, bs: int, bd: int, bdv: int, elem: int, block_c: int, tf32: bool
) -> int:
    """Upper bound of the shared memory Triton 3.9 gives one program (the compiled kernel's `metadata.shared`).

    The dot operands live in shared memory: the loop-invariant slot tiles (q; in the backward also dU), and per
    token tile the k and v tiles (and in the backward the q and dU column chunks the dk / dv dots re-load). With
    num_stages = s >= 2 the software pipeliner keeps s - 1 copies of every load in the loop in flight; with s = 1
    each tile passes through shared memory once. Layout conversions add scratch: the forward's attention operand
    (BLOCK_S, BLOCK_N) in the input dtype; the backward's (BLOCK_N, BLOCK_C) fp32 dk / dv chunk on its way to the
    store and two (BLOCK_S, BLOCK_N) fp32 tiles; with TF32 and s >= 2 one more k and v tile (the compiles need
    10-72 KiB more there than without TF32).
    Of the 192 compiles above none needs more: the forward's bound is exact, the backward's is above by up to
    40 KiB (s = 1: 96 KiB, its k and v tiles are not both live; more with TF32, whose extra term is generous),
    so the backward may drop a config within a few KiB of the limit (fp32 BLOCK_N=32 w8 s3: 226 KiB).
    Other shapes are not measured: tests/test_kernels_slot_attention_limits.py compiles some to check."""
    kv = bn * (bd + bdv) * elem  # one k and one v tile
    if not bwd:
        resident, per_stage, scratch = bs * bd * elem, kv, bs * bn * elem
        once = bn * max(bd, bdv) * elem  # s = 1: k, then v, through the same buffer
    else:
        resident, per_stage = bs * (bd + bdv) * elem, kv + bs * (bd + bdv) * elem
        scratch = bn * (block_c + 2 * bs) * 4 + (kv if tf32 and stages >= 2 else 0)
        once = kv
    return resident + (per_stage * (stages - 1) if stages >= 2 else once) + scratch


def _prune(kernel: str, configs: list, named_args: dict, **kwargs: object) -> list:
    """Keep the configs of `kernel` ("fwd" / "bwd") whose token tile fits a split, whose shared memory
    (:func:`_smem_bytes`) fits an H100's 227 KiB and whose register tiles (:func:`_reg_words`) fit the budget
    that compiled without spills (`_REG_WORDS`); the smallest config survives if none does."""
    args = {**named_args, **kwargs}
    bwd = kernel == "bwd"
    tokens = max(16, triton.next_power_of_2(int(args["n_per_split"])))
    bs, bd, bdv = int(args["BLOCK_S"]), int(args["BLOCK_D"]), int(args["BLOCK_DV"])
    block_c = int(args.get("BLOCK_C", min(_DK_CHUNK, bd, bdv)))
    elem = args["K"].element_size() if hasattr(args.get("K"), "element_size") else 4
    precision = args.get("DOT_PRECISION", "ieee")
    fma = elem == 4 and precision == "ieee"
    tf32 = elem == 4 and precision == "tf32"

    def fits(c: triton.Config) -> bool:
        bn, warps, stages = c.kwargs["BLOCK_N"], c.num_warps, c.num_stages
        smem = _smem_bytes(bwd, bn, stages, bs, bd, bdv, elem, block_c, tf32)
        words = _reg_words(bwd, bn, warps, bs, bd, bdv, elem, block_c)
        return (
            bn <= tokens
            and smem <= _SMEM_LIMIT
            and words <= _REG_WORDS[kernel, fma]
            and not (bwd and fma and stages < 2)
        )

    kept = [c for c in configs if fits(c)]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_N"], c.num_stages, -c.num_warps))]


def _autotune(kernel: str) -> dict:
    """triton.autotune arguments of `kernel` ("fwd" / "bwd"). The key holds what changes the best config or the
    compiled kernel: the sizes, the launch constexprs, and DOT_PRECISION (TF32 or not changes the dots' lowering,
    their registers and shared memory)."""
    return dict(
        configs=_configs(),
        key=["S", "N", "D", "DV", "n_per_split", "HAS_MASK", "STORE_ATTN", "DOT_PRECISION"],
        prune_configs_by={"early_config_prune": functools.partial(_prune, kernel)},
    )


# ----------------------------------------------------------------------------------------------------------
# Forward kernel: grid (B, P); program (b, p) owns tokens [p * n_per_split, (p + 1) * n_per_split) of row b
# and writes partial sums ACC[b, p] = sum_n attn * v (S, Dv) and ASUM[b, p] = sum_n attn (S,), both fp32.
# ----------------------------------------------------------------------------------------------------------


@prune_spills
@triton.autotune(**_autotune("fwd"))
@triton.jit
def _slot_attention_fwd_kernel(
    Q, K, V, MASK, ACC, ASUM, ATTN,
    stride_qb, stride_qs, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_mb, stride_ms,
    stride_ab, stride_as, stride_an,
    S, N, D, DV, n_per_split, P, qk_scale_log2,
    HAS_MASK: tl.constexpr, STORE_ATTN: tl.constexpr, WIDE_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    tl.static_assert(BLOCK_S >= 16, "tl.dot needs at least 16 rows: pad the slot axis")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 tokens per tile")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_DV >= 16, "tl.dot needs feature tiles of at least 16")
    pid_b = tl.program_id(0).to(tl.int64)  # int64: B * stride_kb (B * N * D) may pass 2^31
    pid_p = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Slot and feature indices times the callers' strides: int64
    s64, d64, dv64 = offs_s.to(tl.int64), offs_d.to(tl.int64), offs_dv.to(tl.int64)

    # Slot queries, pre-scaled by D^-0.5 * log2(e) so the softmax can use exp2: (BLOCK_S, BLOCK_D)
    q_ptrs = Q + pid_b * stride_qb + s64[:, None] * stride_qs + d64[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=(offs_s[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    q = (q.to(tl.float32) * qk_scale_log2).to(q.dtype)

    # Active slots: in range and (if given) slot_mask True: (BLOCK_S,)
    slot_ok = offs_s < S
    if HAS_MASK:
        m = tl.load(MASK + pid_b * stride_mb + s64 * stride_ms, mask=offs_s < S, other=0)
        slot_ok = slot_ok & (m != 0)

    # Running sums over this program's tokens: sum_n attn * v (BLOCK_S, BLOCK_DV) and sum_n attn (BLOCK_S,)
    acc = tl.zeros((BLOCK_S, BLOCK_DV), dtype=tl.float32)
    asum = tl.zeros((BLOCK_S,), dtype=tl.float32)
    n_start = pid_p * n_per_split  # < N: int32
    n_end = tl.minimum(n_start.to(tl.int64) + n_per_split, N).to(tl.int32)  # the sum may pass 2^31, the min not
    tokens = tl.arange(0, BLOCK_N)
    if WIDE_TOKENS:  # a token index times a token stride may pass 2^31 (see _wide_tokens)
        tokens = tokens.to(tl.int64)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tokens
        tok_ok = offs_n < n_end
        # Key tile (BLOCK_N, BLOCK_D) -> logits in log2 units (BLOCK_S, BLOCK_N), inactive slots -inf
        k = tl.load(
            K + pid_b * stride_kb + offs_n[:, None] * stride_kn + d64[None, :] * stride_kd,
            mask=tok_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        logits = _mm(q, tl.trans(k), DOT_PRECISION)
        logits = tl.where(slot_ok[:, None], logits, float("-inf"))
        # Softmax over the slot axis (axis 0: the whole column is in the tile); padded tokens get 0
        col_max = tl.max(logits, axis=0)
        p = tl.exp2(logits - col_max[None, :])
        attn = p / tl.sum(p, axis=0)[None, :]
        attn = tl.where(tok_ok[None, :], attn, 0.0)
        # Fold into the running sums with the value tile (BLOCK_N, BLOCK_DV)
        v = tl.load(
            V + pid_b * stride_vb + offs_n[:, None] * stride_vn + dv64[None, :] * stride_vd,
            mask=tok_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        acc += _mm(attn.to(v.dtype), v, DOT_PRECISION)
        asum += tl.sum(attn, axis=1)
        # Optionally keep the pre-renormalisation attention (B, S, N)
        if STORE_ATTN:
            a_ptrs = ATTN + pid_b * stride_ab + s64[:, None] * stride_as + offs_n[None, :] * stride_an
            tl.store(a_ptrs, attn.to(ATTN.dtype.element_ty), mask=(offs_s[:, None] < S) & tok_ok[None, :])

    # Partial results of this split, contiguous fp32: ACC (B, P, S, DV), ASUM (B, P, S); row * S * DV is int64
    row = pid_b * P + pid_p
    acc_ptrs = ACC + row * S * DV + offs_s[:, None] * DV + offs_dv[None, :]
    tl.store(acc_ptrs, acc, mask=(offs_s[:, None] < S) & (offs_dv[None, :] < DV))
    tl.store(ASUM + row * S + offs_s, asum, mask=offs_s < S)


# ----------------------------------------------------------------------------------------------------------
# Backward kernel: same grid. Recomputes attn tile by tile; with den = sum_n attn + eps, r = attn / den,
# c = (dU . U) / den per slot:
#   d attn = (dU v^T) / den - c (+ d attn from the returned attention)
#   d logits = attn * (d attn - sum_s attn * d attn)          softmax over slots, local to a token column
#   dq = scale * sum_n dlogits k      dk = scale * dlogits^T q      dv = r^T dU
# dk and dv rows belong to one program, which writes them BLOCK_C features at a time; dq is a per-split partial
# DQ[b, p] (fp32) summed by the launcher.
# ----------------------------------------------------------------------------------------------------------


@prune_spills
@triton.autotune(**_autotune("bwd"))
@triton.jit
def _slot_attention_bwd_kernel(
    Q, K, V, MASK, DEN, U, DU, DATTN, DQ, DK, DV_OUT,
    stride_qb, stride_qs, stride_qd,
    stride_kb, stride_kn, stride_kd,
    stride_vb, stride_vn, stride_vd,
    stride_mb, stride_ms,
    stride_ub, stride_us, stride_ud,
    stride_dub, stride_dus, stride_dud,
    stride_ab, stride_as, stride_an,
    stride_dkb, stride_dkn, stride_dkd,
    stride_dvb, stride_dvn, stride_dvd,
    S, N, D, DV, n_per_split, P, qk_scale_log2, scale,
    HAS_MASK: tl.constexpr, STORE_ATTN: tl.constexpr, WIDE_TOKENS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_C: tl.constexpr,
):  # fmt: skip
    # STORE_ATTN here means "the returned attention has a gradient DATTN" (same autotune key as the forward)
    tl.static_assert(BLOCK_S >= 16, "tl.dot needs at least 16 rows: pad the slot axis")
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs at least 16 tokens per tile")
    tl.static_assert(BLOCK_D >= 16 and BLOCK_DV >= 16, "tl.dot needs feature tiles of at least 16")
    pid_b = tl.program_id(0).to(tl.int64)  # int64: B * stride_kb (B * N * D) may pass 2^31
    pid_p = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Slot and feature indices times the callers' strides: int64
    s64, d64, dv64 = offs_s.to(tl.int64), offs_d.to(tl.int64), offs_dv.to(tl.int64)
    s_in = offs_s < S
    sd_mask = s_in[:, None] & (offs_d[None, :] < D)
    sdv_mask = s_in[:, None] & (offs_dv[None, :] < DV)

    # log2-scaled queries (BLOCK_S, BLOCK_D) for the logits, active slots (BLOCK_S,). The raw q and dU are not
    # held: the dk / dv chunks below re-load the column chunks they need (L1 / L2 hits, BLOCK_S rows).
    q_log2 = tl.load(Q + pid_b * stride_qb + s64[:, None] * stride_qs + d64[None, :] * stride_qd,
                     mask=sd_mask, other=0.0)  # fmt: skip
    q_log2 = (q_log2.to(tl.float32) * qk_scale_log2).to(q_log2.dtype)
    slot_ok = s_in
    if HAS_MASK:
        m = tl.load(MASK + pid_b * stride_mb + s64 * stride_ms, mask=s_in, other=0)
        slot_ok = slot_ok & (m != 0)

    # Per-slot constants: den (BLOCK_S,), dU (BLOCK_S, BLOCK_DV) as a dot operand, c = (dU . U) / den (BLOCK_S,)
    den = tl.load(DEN + pid_b * S + offs_s, mask=s_in, other=1.0)
    du_ptrs = DU + pid_b * stride_dub + s64[:, None] * stride_dus
    du = tl.load(du_ptrs + dv64[None, :] * stride_dud, mask=sdv_mask, other=0.0).to(tl.float32)
    u = tl.load(U + pid_b * stride_ub + s64[:, None] * stride_us + dv64[None, :] * stride_ud,
                mask=sdv_mask, other=0.0).to(tl.float32)  # fmt: skip
    c = tl.sum(du * u, axis=1) / den
    du_op = du.to(q_log2.dtype)

    dq = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    n_start = pid_p * n_per_split  # < N: int32
    n_end = tl.minimum(n_start.to(tl.int64) + n_per_split, N).to(tl.int32)  # the sum may pass 2^31, the min not
    tokens = tl.arange(0, BLOCK_N)
    if WIDE_TOKENS:  # a token index times a token stride may pass 2^31 (see _wide_tokens)
        tokens = tokens.to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tokens
        tok_ok = offs_n < n_end
        # Recompute attn (BLOCK_S, BLOCK_N) exactly as the forward did
        k = tl.load(
            K + pid_b * stride_kb + offs_n[:, None] * stride_kn + d64[None, :] * stride_kd,
            mask=tok_ok[:, None] & (offs_d[None, :] < D),
            other=0.0,
        )
        logits = _mm(q_log2, tl.trans(k), DOT_PRECISION)
        logits = tl.where(slot_ok[:, None], logits, float("-inf"))
        p = tl.exp2(logits - tl.max(logits, axis=0)[None, :])
        attn = p / tl.sum(p, axis=0)[None, :]
        attn = tl.where(tok_ok[None, :], attn, 0.0)
        # d attn (BLOCK_S, BLOCK_N) through the renormalised product, plus the returned attention's gradient
        v = tl.load(
            V + pid_b * stride_vb + offs_n[:, None] * stride_vn + dv64[None, :] * stride_vd,
            mask=tok_ok[:, None] & (offs_dv[None, :] < DV),
            other=0.0,
        )
        d_attn = _mm(du_op, tl.trans(v), DOT_PRECISION) / den[:, None] - c[:, None]
        if STORE_ATTN:
            da_ptrs = DATTN + pid_b * stride_ab + s64[:, None] * stride_as + offs_n[None, :] * stride_an
            d_attn += tl.load(da_ptrs, mask=s_in[:, None] & tok_ok[None, :], other=0.0).to(tl.float32)
        # Softmax backward over the slot axis; zero on inactive slots and padded tokens (attn is 0 there)
        d_logits = attn * (d_attn - tl.sum(attn * d_attn, axis=0)[None, :])
        d_logits = tl.where(slot_ok[:, None] & tok_ok[None, :], d_logits, 0.0)
        # dq partial (BLOCK_S, BLOCK_D), fp32 accumulation of input-dtype operands
        dq += _mm(d_logits.to(k.dtype), k, DOT_PRECISION)
        # dk = scale * dlogits^T q (BLOCK_N, BLOCK_D) and dv = r^T dU (BLOCK_N, BLOCK_DV) are final: computed and
        # stored BLOCK_C features at a time, so that one (BLOCK_N, BLOCK_C) fp32 tile is live instead of two
        # (BLOCK_N, 256) ones (the backward spilled at BLOCK_N >= 64 with whole tiles)
        ds_t = tl.trans(d_logits.to(k.dtype))  # (BLOCK_N, BLOCK_S)
        r_t = tl.trans((attn / den[:, None]).to(v.dtype))
        dk_rows = DK + pid_b * stride_dkb + offs_n[:, None] * stride_dkn
        for c0 in tl.static_range(0, BLOCK_D, BLOCK_C):
            c64 = (c0 + offs_c).to(tl.int64)
            c_ok = (c0 + offs_c) < D
            q_c = tl.load(Q + pid_b * stride_qb + s64[:, None] * stride_qs + c64[None, :] * stride_qd,
                          mask=s_in[:, None] & c_ok[None, :], other=0.0)  # fmt: skip
            dk = _mm(ds_t, q_c, DOT_PRECISION) * scale
            tl.store(dk_rows + c64[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
                     mask=tok_ok[:, None] & c_ok[None, :])  # fmt: skip
        dv_rows = DV_OUT + pid_b * stride_dvb + offs_n[:, None] * stride_dvn
        for c0 in tl.static_range(0, BLOCK_DV, BLOCK_C):
            c64 = (c0 + offs_c).to(tl.int64)
            c_ok = (c0 + offs_c) < DV
            du_c = tl.load(du_ptrs + c64[None, :] * stride_dud, mask=s_in[:, None] & c_ok[None, :], other=0.0)
            dv = _mm(r_t, du_c.to(v.dtype), DOT_PRECISION)
            tl.store(dv_rows + c64[None, :] * stride_dvd, dv.to(DV_OUT.dtype.element_ty),
                     mask=tok_ok[:, None] & c_ok[None, :])  # fmt: skip

    # This split's dq partial, contiguous fp32 (B, P, S, D); row * S * D is int64
    row = pid_b * P + pid_p
    tl.store(DQ + row * S * D + offs_s[:, None] * D + offs_d[None, :], dq * scale, mask=sd_mask)


# ----------------------------------------------------------------------------------------------------------
# Launcher and autograd.Function: check shapes, allocate, build the grid.
# ----------------------------------------------------------------------------------------------------------


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mask: torch.Tensor | None) -> None:
    """Raise ValueError naming the shapes unless q (B, S, D), k (B, N, D), v (B, N, Dv), slot_mask (B, S)."""
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}" + (
        "" if slot_mask is None else f", slot_mask {tuple(slot_mask.shape)}"
    )
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError(f"slot_attention expects q (B, S, D), k (B, N, D), v (B, N, Dv); got {shapes}")
    (b, s, d), (bk, n, dk), (bv, nv, _) = q.shape, k.shape, v.shape
    if not (b == bk == bv and d == dk and n == nv):
        raise ValueError(f"slot_attention shape mismatch (need equal B, q/k D and k/v N): {shapes}")
    if s == 0 or n == 0 or d == 0:
        raise ValueError(f"slot_attention needs at least one slot, token and feature: {shapes}")
    if slot_mask is not None:
        if tuple(slot_mask.shape) != (b, s):
            raise ValueError(f"slot_mask must be (B, S) = ({b}, {s}): {shapes}")
        if slot_mask.dtype != torch.bool:
            raise ValueError(f"slot_mask must be a bool tensor (True = active), got {slot_mask.dtype}")


def _kernel_objection(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the Triton kernel does not handle these (supported) inputs, or None."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype}: the kernel needs one of fp32 / fp16 / bf16"
    if q.shape[0] == 0:
        return "empty batch"
    if q.shape[1] > _MAX_SLOTS or q.shape[2] > _MAX_DIM or v.shape[2] > _MAX_DIM:
        return f"S={q.shape[1]} (max {_MAX_SLOTS}), D={q.shape[2]}, Dv={v.shape[2]} (max {_MAX_DIM}) exceed tiles"
    return None


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots follow torch's own matmul setting, so the kernel matches the reference's precision."""
    if INTERPRET:
        return "interp"
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(b: int, n: int, device: torch.device) -> tuple[int, int]:
    """(P, n_per_split): split the tokens so that B * P programs fill the device (2 per SM on CUDA)."""
    if device.type == "cuda":
        target = 2 * _sm_count(device)
        p = max(1, min(triton.cdiv(n, 128), triton.cdiv(target, b)))
        per = triton.cdiv(triton.cdiv(n, p), 128) * 128
    else:  # interpreter: small splits so that tests cover the multi-split reduction
        per = 32
    return triton.cdiv(n, per), per


def _wide_tokens(n: int, *token_strides: int) -> bool:
    """Whether a token index below n times one of the token strides can pass the int32 range (then the kernels
    compute token offsets in int64). The products are per batch row: the batch offset is int64 anyway."""
    return (n - 1) * max(abs(s) for s in token_strides) > _INT32_MAX


def _common_args(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mask: torch.Tensor | None, *token_strides: int
) -> dict:
    """The launch arguments the forward and the backward share; token_strides: those of their other tensors with a
    token axis (the attention, its gradient, dk, dv)."""
    b, s, d = q.shape
    n, dv = v.shape[1], v.shape[2]
    p, per = _splits(b, n, q.device)
    return dict(
        S=s, N=n, D=d, DV=dv, n_per_split=per, P=p,
        qk_scale_log2=d**-0.5 * _LOG2E,
        HAS_MASK=slot_mask is not None,
        WIDE_TOKENS=_wide_tokens(n, k.stride(1), v.stride(1), *token_strides),
        DOT_PRECISION=_dot_precision(q.dtype),
        BLOCK_S=max(16, triton.next_power_of_2(s)),
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        BLOCK_DV=max(16, triton.next_power_of_2(dv)),
    )  # fmt: skip


def _mask_arg(q: torch.Tensor, slot_mask: torch.Tensor | None) -> tuple[torch.Tensor, int, int]:
    if slot_mask is None:
        return q, 0, 0  # never read (HAS_MASK=False)
    m = slot_mask.view(torch.uint8) if slot_mask.dtype == torch.bool else slot_mask
    return m, m.stride(0), m.stride(1)


def _slot_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mask: torch.Tensor | None, eps: float, return_attn: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the forward: (updates (B, S, Dv) in v's dtype, den (B, S) fp32, attn (B, S, N) or None)."""
    b, s, _ = q.shape
    n, dv = v.shape[1], v.shape[2]
    meta = _common_args(q, k, v, slot_mask, 1)  # attn: contiguous (B, S, N)
    p = meta["P"]
    acc = torch.empty((b, p, s, dv), device=q.device, dtype=torch.float32)
    asum = torch.empty((b, p, s), device=q.device, dtype=torch.float32)
    attn = torch.empty((b, s, n), device=q.device, dtype=q.dtype) if return_attn else None
    a_arg = attn if attn is not None else acc
    a_strides = attn.stride() if attn is not None else (0, 0, 0)
    mask, smb, sms = _mask_arg(q, slot_mask)
    _slot_attention_fwd_kernel[(b, p)](
        q, k, v, mask, acc, asum, a_arg,
        *q.stride(), *k.stride(), *v.stride(), smb, sms, *a_strides,
        STORE_ATTN=return_attn, **meta,
    )  # fmt: skip
    # Combine the splits and renormalise: updates = sum_n attn v / (sum_n attn + eps)
    den = asum.sum(dim=1) + eps  # (B, S)
    updates = (acc.sum(dim=1) / den[..., None]).to(v.dtype)
    return updates, den, attn


def _slot_attention_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mask: torch.Tensor | None,
    den: torch.Tensor,
    updates: torch.Tensor,
    d_updates: torch.Tensor,
    d_attn: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: (dq, dk, dv) in the inputs' dtypes."""
    b, s, d = q.shape
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    meta = _common_args(q, k, v, slot_mask, dk.stride(1), dv.stride(1), *([] if d_attn is None else [d_attn.stride(2)]))
    p = meta["P"]
    dq_part = torch.empty((b, p, s, d), device=q.device, dtype=torch.float32)
    da_arg = d_attn if d_attn is not None else d_updates
    da_strides = d_attn.stride() if d_attn is not None else (0, 0, 0)
    mask, smb, sms = _mask_arg(q, slot_mask)
    _slot_attention_bwd_kernel[(b, p)](
        q, k, v, mask, den, updates, d_updates, da_arg, dq_part, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), smb, sms,
        *updates.stride(), *d_updates.stride(), *da_strides, *dk.stride(), *dv.stride(),
        scale=d**-0.5, STORE_ATTN=d_attn is not None, BLOCK_C=min(_DK_CHUNK, meta["BLOCK_D"], meta["BLOCK_DV"]), **meta,
    )  # fmt: skip
    return dq_part.sum(dim=1).to(q.dtype), dk, dv


class _SlotAttentionFn(torch.autograd.Function):
    """Triton forward / backward; the backward recomputes attention from q, k, v and the saved den."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mask: torch.Tensor | None,
        eps: float,
        return_attn: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        updates, den, attn = _slot_attention_fwd(q, k, v, slot_mask, eps, return_attn)
        ctx.save_for_backward(q, k, v, slot_mask, den, updates)
        ctx.return_attn = return_attn
        if attn is None:
            attn = q.new_empty(0)
            ctx.mark_non_differentiable(attn)
        return updates, attn

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: torch.autograd.function.FunctionCtx, d_updates: torch.Tensor, d_attn: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        q, k, v, slot_mask, den, updates = ctx.saved_tensors
        if not ctx.return_attn:
            d_attn = None
        dq, dk, dv = _slot_attention_bwd(q, k, v, slot_mask, den, updates, d_updates.contiguous(), d_attn)
        return dq, dk, dv, None, None, None


# ----------------------------------------------------------------------------------------------------------
# Plain-PyTorch reference (the semantics; runs on any device, on meta tensors and under FlopCounterMode).
# ----------------------------------------------------------------------------------------------------------


def slot_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mask: torch.Tensor | None = None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager reference of :func:`slot_attention`: returns (updates (B, S, Dv), attn (B, S, N))."""
    scale = q.shape[-1] ** -0.5
    logits = torch.einsum("bsd,bnd->bsn", q * scale, k)  # (B, S, N)
    if slot_mask is not None:
        logits = logits.masked_fill(~slot_mask[:, :, None], float("-inf"))
    attn = logits.softmax(dim=1)  # over slots
    renorm = attn / (attn.sum(dim=2, keepdim=True) + eps)  # over tokens
    updates = torch.einsum("bsn,bnv->bsv", renorm, v)  # (B, S, Dv)
    return updates, attn


# ----------------------------------------------------------------------------------------------------------
# Public function.
# ----------------------------------------------------------------------------------------------------------


@fx_leaf
def slot_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mask: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    return_attn: bool = False,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One Slot Attention aggregation step (softmax over slots, renormalised over tokens), fused.

    Args:
        q: (B, S, D) slot queries, already projected (and layer-normed) by the caller.
        k: (B, N, D) token keys.
        v: (B, N, Dv) token values.
        slot_mask: optional (B, S) bool, True = active slot. Inactive slots get logit -inf: they take no
            attention and their update is 0. Every batch row needs at least one active slot, else the softmax
            over slots is 0/0 and the row's outputs are NaN (as in the authors' code). This is checked when
            the mask is a CPU tensor (free); on CUDA it is not checked (it would synchronise).
        eps: added to each slot's token sum before renormalising (MetaSlot / Slot Attention use 1e-5 / 1e-8).
        return_attn: also return the attention.
        backend: "auto" | "triton" | "reference", see ``partitioner/kernels/_dispatch.py``.

    Returns:
        ``(updates, attn)``: updates (B, S, Dv) = renorm @ v in v's dtype; attn is None unless
        ``return_attn``, then (B, S, N): the softmax over slots BEFORE the renormalisation over tokens, zero on
        inactive slots. That is what MetaSlot's ``inverted_scaled_dot_product_attention`` returns as attention
        (``a0 = logit.softmax(1)``; the renormalised ``a`` only feeds the update), and what its callers turn
        into object masks. Gradients flow to q, k and v, also through ``attn`` if it is used.

    The Triton path never materialises more than one (S, BLOCK_N) tile of the attention (unless returned);
    its backward recomputes it. Raises ValueError naming the shapes when they do not fit together.
    """
    _check_shapes(q, k, v, slot_mask)
    if (
        slot_mask is not None
        and slot_mask.device.type == "cpu"
        and type(slot_mask) is torch.Tensor
        and not torch.compiler.is_compiling()
    ):
        if not bool(slot_mask.any(dim=1).all()):
            empty = (~slot_mask.any(dim=1)).nonzero().flatten().tolist()
            raise ValueError(f"slot_mask has no active slot in batch rows {empty}; at least one is required")
    if not use_triton(q, k, v, slot_mask, backend=backend, extra_reason=_kernel_objection(q, k, v)):
        updates, attn = slot_attention_reference(q, k, v, slot_mask, eps)
        return updates, (attn if return_attn else None)
    updates, attn = _SlotAttentionFn.apply(q, k, v, slot_mask, float(eps), return_attn)
    return updates, (attn if return_attn else None)
