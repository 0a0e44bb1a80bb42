"""MS-GLAM attention: the fused global (Gaussian non-local) + local (CBAM) attention of one DMAGaze stage.

`msglam_attention(x, wq, bq, wk, bk, wv, bv, log_sigma, ca_w1, ca_w2, sa_w, *, backend="auto")`
returns `(nonlocal_out, cbam_out)`, both shaped like x (B, C, H, W). With N = H*W tokens, D = C // 2:

    global (Gaussian non-local, learnable sigma = exp(log_sigma)):
        q = Wq x + bq  (N, D)      k = Wk x + bk  (N, D)      v = Wv x + bv  (N, C)
        logits_ij = -||q_i - k_j||^2 / (2 sigma^2)
        nonlocal_out = x + softmax_j(logits) @ v
    local (CBAM, channel gate then spatial gate, as in the CBAM paper and the DMAGaze code):
        gate_c = sigmoid(W2 relu(W1 avgpool(x)) + W2 relu(W1 maxpool(x)))      W1 (R, C), W2 (C, R), no biases
        y = x * gate_c
        gate_s = sigmoid(conv_KxK([mean_c(y), max_c(y)]))                       sa_w (1, 2, K, K), no bias
        cbam_out = y * gate_s

Softmax over the logits, not over the similarities. The DMAGaze code computes the similarity
exp(-||q-k||^2 / 2 sigma^2) and then applies softmax to it, i.e. softmax(exp(logits)); the similarities lie in
(0, 1], so that softmax is within a factor e of uniform whatever sigma is and the attention can barely select.
"Gaussian similarity, normalised" is the kernel-smoother softmax(logits) = exp(logits) / sum exp(logits), which
is what we compute. The DMAGaze code also reshapes the (B, N, C) attention output with `.view(B, C, H, W)`
(no transpose), which scrambles channels and tokens; we transpose. sigma is parametrised as log(sigma) so it
stays positive (the code's sigma = 1.0 init is log_sigma = 0).

Kernels (Triton; `backend="triton"`, or `"auto"` where kernels._dispatch.use_triton allows). Feature maps are
7x7 = 49 tokens and a DMAGaze forward makes 32 of these calls, so each launch batches the whole minibatch. The
projections q, k, v = W x + b of all samples are one batched GEMM in PyTorch (cuBLAS, fp32: (B, 2C, N) channel-major,
saved for the backward). Then one launch forward and one backward, each on a grid (B, 1 + C / BLOCK_CV): program
(b, 0) runs sample b's CBAM, programs (b, 1..) its non-local attention, each owning BLOCK_CV channels; at DMAGaze's
B = 64, C = 256 that is 192-576 programs for the H100's 132 SMs, and no program holds a whole (C, N) tile.
- forward, global: the (N, N) logits from q, k chunk by chunk of D (norms and dot products), the softmax in
  registers, P @ v for the program's channels and the residual. Each program recomputes P (N^2 D multiply-adds
  against its N^2 BLOCK_CV of P @ v); nothing N x N leaves the chip.
- forward, local: three passes over channel chunks of BLOCK_CB = 2048 / BLOCK_N channels (x re-read from L1/L2):
  the channel pools feeding the R-wide MLP (broadcast-multiply-reduce: R = C / 16 = 4..16 is below tl.dot's
  minimum tile of 16); the channel gate and the spatial pools over channels; the gated output. The KxK conv is an
  (N, N) matrix gathered from sa_w (entry (m, n) is the tap at which input token m meets output token n; zero
  outside the kernel and the image).
- backward, global: each program recomputes P and dP = g v^T over all C (no N x N tensor is saved), the softmax
  backward dS = P (dP - rowsum(P dP)), and writes its channels of dV = P^T g and of dq = 2s(dS k - rowsum(dS) q),
  dk = 2s(dS^T q - colsum(dS) k) (s = 1 / (2 sigma^2)); program 0 of a sample d log_sigma = -2 sum(dS * logits).
- backward, local: CBAM's chain rule recomputed chunk by chunk (five passes; the max pools send their gradient to
  the maxima, split evenly between ties exactly as torch.amax does, tie counts merged across chunks); per-sample
  dW1, dW2, d sa_w (the conv weight gradient sums the (N, N) pool x dz products per tap) and CBAM's full dx.
- left to PyTorch, inside the autograd.Function: the projections, the projection-weight gradients
  dW = sum_b dq_b^T x_b and dx += dq Wq + dk Wk + dv Wv, and the sums over the batch of the per-sample partial
  gradients. These are GEMMs / reductions across programs, which cuBLAS does better (and deterministically) than
  per-sample programs with atomics; they read only (B, N, C)-sized tensors.

Precision. q, k, v are fp32 (projected in fp32 from the inputs, like the reference); CBAM, softmax, norms and
accumulations are fp32. bf16 / fp16 inputs: every dot runs on tensor cores (wgmma on sm_90) with fp32
accumulation, its operands in the input dtype: P, v, dS, q, k and g rounded once (8 / 11 mantissa bits, as flash
attention rounds P and dS), except where cancellation amplifies that: the logits' q.k^T (both operands split
hi + lo: three dots, ~16 bits; one rounding moves d log_sigma by ~10% in bf16) and dP = g v^T (v split: two dots;
g is exact). Measured against an fp64 reference: outputs and gradients within 1e-2 (bf16) / 1e-3 (fp16) of the
largest magnitude, about the outputs' own rounding (tests/test_kernels_msglam.py). fp32 inputs: exact FMA dots
(input_precision="ieee" whatever torch's TF32 setting: the problems are tiny and latency bound); an FMA dot holds
a thread's rows and columns of the whole contraction in registers, so fp32 contracts channels 16 at a time and
tokens 16 at a time through a per-program (N, N) scratch in global memory (L1/L2-resident). Outputs and
gradients have their inputs' dtypes. The plain-PyTorch reference (`msglam_attention_reference`) computes in at
least fp32; it serves meta tensors, FakeTensors, FlopCounterMode, other devices, shapes over the tile limits, and
machines without Triton.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from partitioner.kernels._dispatch import INTERPRET, Backend, fx_leaf, tl, triton, use_triton
from partitioner.kernels._triton_common import prune_spills

__all__ = ["msglam_attention", "msglam_attention_reference", "nonlocal_attention_reference", "cbam_reference"]

MAX_TOKENS = 128  # one tile holds every token of a feature map (DMAGaze: 7x7 = 49)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


# Triton 3.9's interpreter multiplies bf16 tiles as their uint16 bit patterns (its create_dot hands the raw storage
# to np.matmul). Under it, 16-bit dot operands are upcast to fp32 first: the same products of the same 16-bit values,
# accumulated in fp32, which is what the tensor cores compute (up to summation order). Compiled, dots take the
# operands as they are.
_UPCAST_DOTS = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc=None):
    """tl.dot with fp32 accumulation; "ieee" only matters for fp32 operands (FMA, exact): 16-bit ones run on tensor
    cores."""
    if _UPCAST_DOTS:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=tl.float32)


@triton.jit
def _dot_terms(a, b, acc, DT: tl.constexpr, A_TERMS: tl.constexpr, B_TERMS: tl.constexpr):
    """a @ b + acc on DT's tensor cores (fp32 accumulation); for DT = fp32 one exact FMA dot.

    Each operand is rounded to DT (1 term) or split into hi + lo, both in DT (2 terms: ~16 mantissa bits against
    8 for bf16 / 11 for fp16); the lo x lo product is dropped. An operand already in DT takes 1 term.
    """
    if DT == tl.float32:
        return _dot(a, b, acc)
    a_hi = a.to(DT)
    b_hi = b.to(DT)
    acc = _dot(a_hi, b_hi, acc)
    if B_TERMS == 2:
        acc = _dot(a_hi, (b - b_hi.to(tl.float32)).to(DT), acc)
    if A_TERMS == 2:
        acc = _dot((a - a_hi.to(tl.float32)).to(DT), b_hi, acc)
    return acc


@triton.jit
def _load_tokens(base, t0, c0, C, N, BLOCK_T: tl.constexpr, BLOCK: tl.constexpr):
    """Token-major tile (BLOCK_T, BLOCK) of tokens t0.. and channels c0.. of a channel-major (C, N) slab, in the
    slab's dtype. Padded tokens and channels read as 0."""
    offs_t = t0 + tl.arange(0, BLOCK_T)
    offs_c = c0 + tl.arange(0, BLOCK)
    mask = (offs_t[:, None] < N) & (offs_c[None, :] < C)
    return tl.load(base + offs_c[None, :] * N + offs_t[:, None], mask=mask, other=0.0)


@triton.jit
def _token_dot(
    a,
    scratch,
    b_base,
    c0,
    C,
    N,
    acc,
    DT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """acc + a @ b: a (BLOCK_N, BLOCK_N) fp32 in registers contracts over tokens with b = channels c0.. of the
    channel-major (C, N) slab at b_base, token-major (BLOCK_N, BLOCK); a is rounded to DT, b is in DT.

    BLOCK_T = BLOCK_N: one dot. BLOCK_T < BLOCK_N (the fp32 path): an FMA dot keeps, per thread, its rows of a and
    columns of b over the whole contraction, which spills at 64 tokens; so a goes through this program's
    (BLOCK_N, BLOCK_N) fp32 scratch in global memory (L1/L2-resident) and the contraction runs BLOCK_T tokens at a
    time. The barriers order the scratch's reuse between calls and its store before the loads (bar.sync makes a
    block's global writes visible to the whole block).
    """
    if BLOCK_T >= BLOCK_N:
        return _dot_terms(a, _load_tokens(b_base, 0, c0, C, N, BLOCK_N, BLOCK), acc, DT, 1, 1)
    offs = tl.arange(0, BLOCK_N)
    tl.debug_barrier()  # every thread is done reading the scratch's previous contents
    tl.store(scratch + offs[:, None] * BLOCK_N + offs[None, :], a)
    tl.debug_barrier()
    for t0 in range(0, N, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        a_t = tl.load(scratch + offs[:, None] * BLOCK_N + offs_t[None, :])  # (BN, BT)
        acc = _dot_terms(a_t, _load_tokens(b_base, t0, c0, C, N, BLOCK_T, BLOCK), acc, DT, 1, 1)
    return acc


@triton.jit
def _gaussian_logits(qkv_base, scale, N, D, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DT: tl.constexpr):
    """logits (BLOCK_N, BLOCK_N) fp32 = -scale * ||q_i - k_j||^2, padded keys at -inf.

    q, k (fp32) are the first 2D channels of the sample's (2C, N) projection slab. The norms are fp32; q.k^T runs in
    BLOCK_K-wide chunks of D on DT's tensor cores with both operands split hi + lo (~16 mantissa bits): one
    rounding of q and k to bf16 moves the logits (~ -20 at sigma = e) by ~1e-2 and d log_sigma = -2 sum dS * logits
    by ~10% (it cancels: sum_j dS_ij = 0); the split brings that to ~1e-3. fp32: exact FMA dots.
    """
    qk = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)  # sum_d q_id k_jd
    qn = tl.zeros((BLOCK_N,), dtype=tl.float32)  # ||q_i||^2
    kn = tl.zeros((BLOCK_N,), dtype=tl.float32)  # ||k_j||^2
    # Step: per chunk of D, the dot products and the norms (padded tokens and channels are 0).
    for d0 in range(0, D, BLOCK_K):
        q = _load_tokens(qkv_base, 0, d0, D, N, BLOCK_N, BLOCK_K)  # (BN, BK)
        k = _load_tokens(qkv_base + D * N, 0, d0, D, N, BLOCK_N, BLOCK_K)
        qk = _dot_terms(q, tl.trans(k), qk, DT, 2, 2)
        qn += tl.sum(q * q, axis=1)
        kn += tl.sum(k * k, axis=1)
    # Step: squared distances -> logits; keys past N never receive attention.
    d2 = qn[:, None] + kn[None, :] - 2.0 * qk
    key_ok = tl.arange(0, BLOCK_N) < N
    return tl.where(key_ok[None, :], -scale * d2, float("-inf"))


@triton.jit
def _softmax_rows(logits):
    m = tl.max(logits, axis=1)  # (BN,)
    p = tl.exp(logits - m[:, None])
    return p / tl.sum(p, axis=1)[:, None]


@triton.jit
def _cbam_hidden(x_base, ca_w1_ptr, C, N, R, BLOCK_CB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """CBAM's MLP pre-activations W1 avgpool(x), W1 maxpool(x) (BLOCK_R,) each, channel chunk by channel chunk."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    h_avg = tl.zeros((BLOCK_R,), dtype=tl.float32)
    h_max = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CB):
        offs_c = c0 + tl.arange(0, BLOCK_CB)
        c_ok = offs_c < C
        valid = c_ok[:, None] & (offs_n[None, :] < N)
        x = tl.load(x_base + offs_c[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
        avg = tl.sum(x, axis=1) / N  # (BCB,) padded channels -> 0, never -inf
        mx = tl.where(c_ok, tl.max(tl.where(valid, x, float("-inf")), axis=1), 0.0)
        # R = C / 16 is too narrow for tl.dot: broadcast-multiply and reduce.
        w1 = tl.load(
            ca_w1_ptr + offs_r[:, None] * C + offs_c[None, :], mask=(offs_r[:, None] < R) & c_ok[None, :], other=0.0
        )
        w1 = w1.to(tl.float32)  # (BR, BCB)
        h_avg += tl.sum(w1 * avg[None, :], axis=1)
        h_max += tl.sum(w1 * mx[None, :], axis=1)
    return h_avg, h_max


@triton.jit
def _cbam_chunk(
    x_base, ca_w2_ptr, hidden, c0, C, N, R, BLOCK_CB: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr
):
    """One channel chunk of CBAM's channel-gated map: (x, c_gate, y = x * c_gate, valid) for channels c0..

    x, y (BLOCK_CB, BLOCK_N) fp32, c_gate (BLOCK_CB,). `hidden` = relu(h_avg) + relu(h_max): W2 is linear, so
    W2 relu(a) + W2 relu(b) = W2 hidden. Every pass recomputes a chunk with this one function, so y is bitwise
    the same in every pass and the max-pool tie tests (y == max) agree between them.
    """
    offs_c = c0 + tl.arange(0, BLOCK_CB)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    valid = c_ok[:, None] & (offs_n[None, :] < N)
    x = tl.load(x_base + offs_c[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
    w2t = tl.load(
        ca_w2_ptr + offs_c[None, :] * R + offs_r[:, None], mask=(offs_r[:, None] < R) & c_ok[None, :], other=0.0
    )
    c_gate = tl.sigmoid(tl.sum(w2t.to(tl.float32) * hidden[:, None], axis=0))  # (BCB,)
    return x, c_gate, x * c_gate[:, None], valid


@triton.jit
def _cbam_spatial_pools(
    x_base,
    g_base,
    ca_w2_ptr,
    hidden,
    C,
    N,
    R,
    BLOCK_CB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    WITH_GRAD: tl.constexpr,
):
    """Per token: mean_c y, max_c y, how many channels attain the max, and (WITH_GRAD) sum_c g * y.

    The max and its tie count are merged chunk by chunk: a chunk's ties count only where its maximum is the
    running one. Padded tokens get mean 0, max 0 (never -inf).
    """
    offs_n = tl.arange(0, BLOCK_N)
    y_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    gy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    y_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    n_max = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CB):
        x_c, c_gate, y, valid = _cbam_chunk(x_base, ca_w2_ptr, hidden, c0, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R)
        y_sum += tl.sum(y, axis=0)
        cm = tl.max(tl.where(valid, y, float("-inf")), axis=0)  # (BN,)
        cnt = tl.sum((valid & (y == cm[None, :])).to(tl.float32), axis=0)
        new = tl.maximum(y_max, cm)
        n_max = tl.where(y_max == new, n_max, 0.0) + tl.where(cm == new, cnt, 0.0)
        y_max = new
        if WITH_GRAD:
            offs_c = c0 + tl.arange(0, BLOCK_CB)
            g = tl.load(g_base + offs_c[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
            gy += tl.sum(g * y, axis=0)
    n_ok = offs_n < N
    return y_sum / C, tl.where(n_ok, y_max, 0.0), n_max, gy


@triton.jit
def _cbam_conv_taps(sa_w_ptr, N, W, BLOCK_N: tl.constexpr, KS: tl.constexpr):
    """The KSxKS 'same' conv (cross-correlation, zero padding KS // 2, as F.conv2d) as gathered (N, N) matrices.

    Entry (m, n): the tap at which input token m meets output token n (-1 where it does not), and the avg- and
    max-channel weights there (0 outside the kernel and the image).
    """
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    m_idx = offs_n[:, None]  # input token m (rows)
    n_idx = offs_n[None, :]  # output token n (columns)
    dy = m_idx // W - n_idx // W + KS // 2
    dx = m_idx % W - n_idx % W + KS // 2
    tap_ok = (dy >= 0) & (dy < KS) & (dx >= 0) & (dx < KS) & n_ok[:, None] & n_ok[None, :]
    tap = tl.where(tap_ok, dy * KS + dx, -1)  # (BN, BN)
    k_avg = tl.load(sa_w_ptr + tap, mask=tap_ok, other=0.0).to(tl.float32)
    k_max = tl.load(sa_w_ptr + KS * KS + tap, mask=tap_ok, other=0.0).to(tl.float32)
    return tap, k_avg, k_max


@triton.jit
def _cbam_fwd(
    x_base,
    out_base,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
    C,
    N,
    W,
    R,
    BLOCK_CB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
):
    """CBAM of one sample in three passes over channel chunks: MLP inputs, spatial pools, gated output."""
    offs_n = tl.arange(0, BLOCK_N)
    h_avg, h_max = _cbam_hidden(x_base, ca_w1_ptr, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R)
    hidden = tl.maximum(h_avg, 0.0) + tl.maximum(h_max, 0.0)
    y_mean, y_max, n_max, gy = _cbam_spatial_pools(
        x_base, x_base, ca_w2_ptr, hidden, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R, False
    )
    tap, k_avg, k_max = _cbam_conv_taps(sa_w_ptr, N, W, BLOCK_N, KS)
    s_gate = tl.sigmoid(tl.sum(k_avg * y_mean[:, None] + k_max * y_max[:, None], axis=0))  # (BN,)
    for c0 in range(0, C, BLOCK_CB):
        x_c, c_gate, y, valid = _cbam_chunk(x_base, ca_w2_ptr, hidden, c0, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R)
        offs_c = c0 + tl.arange(0, BLOCK_CB)
        ptrs = out_base + offs_c[:, None] * N + offs_n[None, :]
        tl.store(ptrs, (y * s_gate[None, :]).to(out_base.dtype.element_ty), mask=valid)


@triton.jit
def _cbam_bwd(
    x_base,
    g_base,
    dx_base,
    dw1_base,
    dw2_base,
    dsa_base,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
    C,
    N,
    W,
    R,
    BLOCK_CB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
):
    """CBAM's chain rule for one sample, recomputed chunk by chunk: per-sample dW1, dW2, d sa_w and the whole dx.

    The max pools send their gradient to the maxima, split evenly between ties exactly as torch.amax does.
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_ok = offs_r < R
    # Step: forward statistics: MLP pre-activations, spatial pools (with tie counts) and sum_c g * y.
    h_avg, h_max = _cbam_hidden(x_base, ca_w1_ptr, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R)
    hidden = tl.maximum(h_avg, 0.0) + tl.maximum(h_max, 0.0)  # (BR,)
    y_mean, y_max, n_max, gy = _cbam_spatial_pools(
        x_base, g_base, ca_w2_ptr, hidden, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R, True
    )
    tap, k_avg, k_max = _cbam_conv_taps(sa_w_ptr, N, W, BLOCK_N, KS)
    s_gate = tl.sigmoid(tl.sum(k_avg * y_mean[:, None] + k_max * y_max[:, None], axis=0))  # (BN,)
    # Step: out = y * s_gate -> through the sigmoid to the conv output z (BN,); padded tokens have g = 0.
    dz = gy * s_gate * (1.0 - s_gate)
    # Step: conv backward: d pool_m = sum_n k[tap(m, n)] dz_n; d sa_w[tap] sums pool_m dz_n over its (m, n).
    dy_mean = tl.sum(k_avg * dz[None, :], axis=1)  # (BN,) over input tokens m
    dy_max = tl.sum(k_max * dz[None, :], axis=1)
    dy_tie = dy_max / tl.maximum(n_max, 1.0)  # split evenly between the channels that attain the max
    for t in range(0, KS * KS):
        at_t = tap == t
        tl.store(dsa_base + t, tl.sum(tl.sum(tl.where(at_t, y_mean[:, None] * dz[None, :], 0.0), axis=1), axis=0))
        t_max = tl.where(at_t, y_max[:, None] * dz[None, :], 0.0)
        tl.store(dsa_base + KS * KS + t, tl.sum(tl.sum(t_max, axis=1), axis=0))
    # Step: per channel chunk, dy -> the channel gate's logit da -> dW2 and dh = W2^T da (summed over chunks).
    dh = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CB):
        offs_c = c0 + tl.arange(0, BLOCK_CB)
        x, c_gate, y, valid = _cbam_chunk(x_base, ca_w2_ptr, hidden, c0, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R)
        g = tl.load(g_base + offs_c[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
        is_max = valid & (y == y_max[None, :])
        dy = g * s_gate[None, :] + dy_mean[None, :] / C + tl.where(is_max, dy_tie[None, :], 0.0)
        da = tl.sum(tl.where(valid, dy, 0.0) * x, axis=1) * c_gate * (1.0 - c_gate)  # (BCB,)
        rc = r_ok[:, None] & (offs_c[None, :] < C)  # (BR, BCB)
        tl.store(dw2_base + offs_c[None, :] * R + offs_r[:, None], hidden[:, None] * da[None, :], mask=rc)
        w2t = tl.load(ca_w2_ptr + offs_c[None, :] * R + offs_r[:, None], mask=rc, other=0.0).to(tl.float32)
        dh += tl.sum(w2t * da[None, :], axis=1)
    # Step: through each branch's ReLU; then per chunk dW1 and dx = dy * c_gate + the channel pools' share.
    dh_avg = tl.where(h_avg > 0.0, dh, 0.0)
    dh_max = tl.where(h_max > 0.0, dh, 0.0)
    for c0 in range(0, C, BLOCK_CB):
        offs_c = c0 + tl.arange(0, BLOCK_CB)
        x, c_gate, y, valid = _cbam_chunk(x_base, ca_w2_ptr, hidden, c0, C, N, R, BLOCK_CB, BLOCK_N, BLOCK_R)
        g = tl.load(g_base + offs_c[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)
        is_max = valid & (y == y_max[None, :])
        dy = g * s_gate[None, :] + dy_mean[None, :] / C + tl.where(is_max, dy_tie[None, :], 0.0)
        avg = tl.sum(x, axis=1) / N  # (BCB,)
        mx = tl.max(tl.where(valid, x, float("-inf")), axis=1)
        rc = r_ok[:, None] & (offs_c[None, :] < C)
        dw1 = dh_avg[:, None] * avg[None, :] + dh_max[:, None] * tl.where(offs_c < C, mx, 0.0)[None, :]
        tl.store(dw1_base + offs_r[:, None] * C + offs_c[None, :], dw1, mask=rc)
        w1 = tl.load(ca_w1_ptr + offs_r[:, None] * C + offs_c[None, :], mask=rc, other=0.0).to(tl.float32)
        d_avg = tl.sum(w1 * dh_avg[:, None], axis=0)  # (BCB,)
        d_mx = tl.sum(w1 * dh_max[:, None], axis=0)
        is_cmax = valid & (x == mx[:, None])
        c_max = tl.sum(is_cmax.to(tl.float32), axis=1)  # (BCB,) >= 1 on real channels
        dx = dy * c_gate[:, None] + d_avg[:, None] / N
        dx += tl.where(is_cmax, (d_mx / tl.maximum(c_max, 1.0))[:, None], 0.0)
        tl.store(dx_base + offs_c[:, None] * N + offs_n[None, :], dx, mask=valid)


# The autotune space: BLOCK_K (the channel chunk of the logits and dP contractions) x BLOCK_CV (the channels of v /
# the non-local output one program owns; the backward's program also owns BLOCK_CV / 2 of D's dq, dk) x warps; one
# pipeline stage: the loops run D / BLOCK_K, C / BLOCK_K <= 16 short trips with nothing worth overlapping. 18 configs,
# of which _prune keeps 2-9 per kernel and dtype.
_BLOCK_K = (16, 32, 64)
_BLOCK_CV = (32, 64, 128)
_WARPS = (4, 8)
FMA_BLOCK_T = 16  # fp32 (FMA dots): tokens per step of the token contractions, through the scratch (_token_dot)


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter: one config, no tuning
        return [triton.Config({"BLOCK_K": 16, "BLOCK_CV": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_K": bk, "BLOCK_CV": bc}, num_warps=w, num_stages=1)
        for bk in _BLOCK_K
        for bc in _BLOCK_CV
        for w in _WARPS
    ]


def _prune(
    configs: list[triton.Config], named_args: dict[str, Any], backward: bool = False, **kwargs: Any
) -> list[triton.Config]:
    """The configs that can win and compile for an H100 (sm_90) without spilling; at least the first one.

    The register rules come from compiling all 18 configs at DMAGaze's shape (C = 256, 7x7 tokens: BLOCK_N = 64)
    with bench/kernels_sm90.py, which checks every kept config again:
    - no tile wider than the problem (BLOCK_K <= D, BLOCK_CV <= C, rounded up to a power of two): pure padding;
    - bf16 / fp16: BLOCK_K = 16 compiles but only doubles the loop trips of 32 (one wgmma K step each), so 32 or
      64. The backward holds logits, P and dP, three (64, 64) fp32 tiles, besides the hi / lo dot operands: at 4
      warps it reaches 246-255 registers and mostly spills (8-320 bytes), at 8 warps 152-244 and none; the forward
      spills at BLOCK_K = 64 with 4 warps (255 registers, 24-64 bytes) and fits otherwise (115-241);
    - fp32 (FMA dots): 8 warps; BLOCK_CV = 128 spills in the forward at 8 warps (ptxas caps it at 128 registers,
      24-52 bytes) and the backward at 4, so BLOCK_CV <= 64; BLOCK_K = 32 (FMA throughput does not depend on it;
      99-176 registers against 80-246 over the others).
    Shared memory is never the limit: one step's dot operands (at most 4 tiles of BLOCK_N x max(BLOCK_N, BLOCK_K,
    BLOCK_CV) 16-bit values, one stage) and the layout-conversion scratch measure 6-40 KiB of the 227 KiB.
    """
    C, D = named_args["C"], named_args["D"]
    fp32 = named_args["x_ptr"].dtype == torch.float32
    pow2 = lambda n: 1 << max(5, (int(n) - 1).bit_length())  # noqa: E731  (the smallest tiles are 32 wide)

    def keep(c: triton.Config) -> bool:
        bk, bc, w = c.kwargs["BLOCK_K"], c.kwargs["BLOCK_CV"], c.num_warps
        if bk > pow2(D) or bc > pow2(C):
            return False
        if fp32:
            return bk == 32 and bc <= 64 and w == 8
        return bk in (32, 64) and (w == 8 or (bk == 32 and not backward))

    return [c for c in configs if keep(c)] or configs[:1]


def _prune_bwd(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    return _prune(configs, named_args, backward=True, **kwargs)


_AUTOTUNE = dict(configs=_configs(), key=["C", "N", "W"], prune_configs_by={"early_config_prune": _prune})
_AUTOTUNE_BWD = dict(_AUTOTUNE, prune_configs_by={"early_config_prune": _prune_bwd})


@prune_spills
@triton.autotune(**_AUTOTUNE)
@triton.jit
def _msglam_fwd_kernel(
    x_ptr,
    qkv_ptr,
    log_sigma_ptr,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
    scratch_ptr,
    nl_out_ptr,
    cbam_out_ptr,
    C,
    N,
    D,
    W,
    R,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_CB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CV: tl.constexpr,
):
    """Grid (B, 1 + cdiv(C, BLOCK_CV)): program (b, 0) runs sample b's CBAM, program (b, 1 + j) the non-local
    output's channels j * BLOCK_CV.. Each non-local program recomputes the sample's P from q, k (N^2 D
    multiply-adds, three dots of them at 16 bits) instead of waiting for another program's."""
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs every tile dimension >= 16")
    tl.static_assert(BLOCK_N <= 128, "all tokens of a sample live in one tile")
    tl.static_assert(KS % 2 == 1, "the CBAM spatial conv is odd-sized ('same' padding)")
    pid = tl.program_id(0)  # sample
    part = tl.program_id(1)  # 0: CBAM; 1 + j: non-local channel chunk j
    x_base = x_ptr + pid.to(tl.int64) * C * N  # x, both outputs: (C, N) per sample
    if part == 0:
        _cbam_fwd(
            x_base,
            cbam_out_ptr + pid.to(tl.int64) * C * N,
            ca_w1_ptr,
            ca_w2_ptr,
            sa_w_ptr,
            C,
            N,
            W,
            R,
            BLOCK_CB,
            BLOCK_N,
            BLOCK_R,
            KS,
        )
    else:
        DT: tl.constexpr = nl_out_ptr.dtype.element_ty  # the dots' operand dtype: the input's
        j = part - 1
        qkv_base = qkv_ptr + pid.to(tl.int64) * 2 * C * N  # (q; k; v) fp32 channel-major: (D + D + C, N) per sample
        scratch = scratch_ptr + (pid.to(tl.int64) * (tl.num_programs(1) - 1) + j) * BLOCK_N * BLOCK_N
        # Step: 1 / (2 sigma^2) from the learnable log sigma; attention probabilities P (BN, BN) in registers.
        scale = 0.5 * tl.exp(-2.0 * tl.load(log_sigma_ptr).to(tl.float32))
        p = _softmax_rows(_gaussian_logits(qkv_base, scale, N, D, BLOCK_N, BLOCK_K, DT))
        # Step: P @ v for this program's channels (P, v rounded to DT: tensor cores), the residual, channel-major.
        c0 = j * BLOCK_CV
        o = tl.zeros((BLOCK_N, BLOCK_CV), dtype=tl.float32)
        o = _token_dot(p, scratch, qkv_base + 2 * D * N, c0, C, N, o, DT, BLOCK_N, BLOCK_T, BLOCK_CV)
        offs_n = tl.arange(0, BLOCK_N)
        offs_c = c0 + tl.arange(0, BLOCK_CV)
        ptrs = offs_c[None, :] * N + offs_n[:, None]
        mask = (offs_n[:, None] < N) & (offs_c[None, :] < C)
        x_res = tl.load(x_base + ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(nl_out_ptr + pid.to(tl.int64) * C * N + ptrs, (x_res + o).to(DT), mask=mask)


@prune_spills
@triton.autotune(**_AUTOTUNE_BWD)
@triton.jit
def _msglam_bwd_kernel(
    x_ptr,
    qkv_ptr,
    log_sigma_ptr,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
    scratch_ptr,
    g_nl_ptr,
    g_cb_ptr,
    dq_ptr,
    dk_ptr,
    dv_ptr,
    dls_ptr,
    dx_cb_ptr,
    dw1_ptr,
    dw2_ptr,
    dsa_ptr,
    C,
    N,
    D,
    W,
    R,
    BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_CB: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_CV: tl.constexpr,
):
    """Grid (B, 1 + cdiv(C, BLOCK_CV)): program (b, 0) runs sample b's CBAM backward; program (b, 1 + j)
    recomputes P and dS (dP sums over all C) and writes dv's channels j * BLOCK_CV.., dq's and dk's channels
    j * BLOCK_CV / 2.. (cdiv(D, BLOCK_CV / 2) = cdiv(C, BLOCK_CV) chunks: every channel has one owner), and, for
    j = 0, d log_sigma."""
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs every tile dimension >= 16")
    tl.static_assert(BLOCK_N <= 128, "all tokens of a sample live in one tile")
    tl.static_assert(BLOCK_CV >= 32, "dq, dk chunks are BLOCK_CV / 2 >= 16 wide")
    tl.static_assert(KS % 2 == 1, "the CBAM spatial conv is odd-sized ('same' padding)")
    pid = tl.program_id(0)  # sample
    part = tl.program_id(1)  # 0: CBAM; 1 + j: non-local chunk j
    x_base = x_ptr + pid.to(tl.int64) * C * N
    if part == 0:
        _cbam_bwd(
            x_base,
            g_cb_ptr + pid.to(tl.int64) * C * N,
            dx_cb_ptr + pid.to(tl.int64) * C * N,
            dw1_ptr + pid.to(tl.int64) * R * C,  # (R, C) per sample
            dw2_ptr + pid.to(tl.int64) * C * R,  # (C, R) per sample
            dsa_ptr + pid * 2 * KS * KS,
            ca_w1_ptr,
            ca_w2_ptr,
            sa_w_ptr,
            C,
            N,
            W,
            R,
            BLOCK_CB,
            BLOCK_N,
            BLOCK_R,
            KS,
        )
    else:
        DT: tl.constexpr = g_nl_ptr.dtype.element_ty  # the dots' operand dtype: the input's
        j = part - 1
        qkv_base = qkv_ptr + pid.to(tl.int64) * 2 * C * N  # (q; k; v) fp32 channel-major
        v_base = qkv_base + 2 * D * N
        g_base = g_nl_ptr + pid.to(tl.int64) * C * N  # dL/d nonlocal_out, (C, N) like x
        scratch = scratch_ptr + (pid.to(tl.int64) * (tl.num_programs(1) - 1) + j) * BLOCK_N * BLOCK_N
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = offs_n < N
        scale = 0.5 * tl.exp(-2.0 * tl.load(log_sigma_ptr).to(tl.float32))
        # Step: recompute logits and P (BN, BN).
        logits = _gaussian_logits(qkv_base, scale, N, D, BLOCK_N, BLOCK_K, DT)
        p = _softmax_rows(logits)
        # Step: dP = g v^T over all channels, v split hi + lo (g is exact in DT): the softmax backward and
        # d log_sigma cancel, a once-rounded v moves d log_sigma by ~1%. Padded g rows load as 0: dP's are 0.
        dp = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_K):
            g = _load_tokens(g_base, 0, c0, C, N, BLOCK_N, BLOCK_K)  # (BN, BK)
            v = _load_tokens(v_base, 0, c0, C, N, BLOCK_N, BLOCK_K)
            dp = _dot_terms(g, tl.trans(v), dp, DT, 1, 2)
        # Step: this program's dV = P^T g (BN keys, BCV), fp32 for the projection GEMMs that follow.
        c0 = j * BLOCK_CV
        offs_c = c0 + tl.arange(0, BLOCK_CV)
        dv = tl.zeros((BLOCK_N, BLOCK_CV), dtype=tl.float32)
        dv = _token_dot(tl.trans(p), scratch, g_base, c0, C, N, dv, DT, BLOCK_N, BLOCK_T, BLOCK_CV)
        dv_ptrs = dv_ptr + pid.to(tl.int64) * N * C + offs_n[:, None] * C + offs_c[None, :]  # token-major (N, C)
        tl.store(dv_ptrs, dv, mask=row_ok[:, None] & (offs_c[None, :] < C))
        # Step: softmax backward dS = P * (dP - rowsum(P * dP)); zero on padded rows (dP 0) and keys (P 0).
        ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
        # Step: d log_sigma = sum dS * dlogits/dlog_sigma = -2 sum dS * logits (padded keys: logits -inf, dS 0).
        valid = row_ok[:, None] & row_ok[None, :]
        dls = -2.0 * tl.sum(tl.sum(ds * tl.where(valid, logits, 0.0), axis=1), axis=0)
        tl.store(dls_ptr + pid, dls, mask=j == 0)
        # Step: this program's D chunk: dq = 2s(dS k - rowsum(dS) q), dk = 2s(dS^T q - colsum(dS) k); dS and k, q
        # rounded to DT for the dots (as flash kernels round P and dS), the rest fp32.
        BLOCK_DQ: tl.constexpr = BLOCK_CV // 2
        d0 = j * BLOCK_DQ
        dq = tl.zeros((BLOCK_N, BLOCK_DQ), dtype=tl.float32)
        dq = _token_dot(ds, scratch, qkv_base + D * N, d0, D, N, dq, DT, BLOCK_N, BLOCK_T, BLOCK_DQ)
        dk = tl.zeros((BLOCK_N, BLOCK_DQ), dtype=tl.float32)
        dk = _token_dot(tl.trans(ds), scratch, qkv_base, d0, D, N, dk, DT, BLOCK_N, BLOCK_T, BLOCK_DQ)
        q = _load_tokens(qkv_base, 0, d0, D, N, BLOCK_N, BLOCK_DQ)  # (BN, BDQ) fp32
        k = _load_tokens(qkv_base + D * N, 0, d0, D, N, BLOCK_N, BLOCK_DQ)
        dq = 2.0 * scale * (dq - tl.sum(ds, axis=1)[:, None] * q)  # rowsum(dS) ~0 in exact arithmetic
        dk = 2.0 * scale * (dk - tl.sum(ds, axis=0)[:, None] * k)
        offs_d = d0 + tl.arange(0, BLOCK_DQ)
        mask = row_ok[:, None] & (offs_d[None, :] < D)
        ptrs = pid.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :]  # token-major (N, D)
        tl.store(dq_ptr + ptrs, dq, mask=mask)
        tl.store(dk_ptr + ptrs, dk, mask=mask)


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _launch_meta(x: torch.Tensor, ca_w1: torch.Tensor, sa_w: torch.Tensor) -> tuple[tuple[int, ...], dict[str, int]]:
    """Runtime sizes (C, N, D, W, R) and the problem-sized constexprs shared by both kernels.

    CBAM's channel chunk BLOCK_CB holds 2048 (channel, token) pairs: 32 x 64 tokens at DMAGaze's 7x7 maps, 16
    fp32 registers per tile per thread at 4 warps.
    """
    B, C, H, W = x.shape
    R, K = ca_w1.shape[0], sa_w.shape[-1]
    sizes = (C, H * W, C // 2, W, R)
    block_n = _block_n(H * W)
    block_t = _block_t(x.dtype, block_n)
    block_cb = min(triton.next_power_of_2(C), max(16, 2048 // block_n))
    blocks = dict(BLOCK_N=block_n, BLOCK_T=block_t, BLOCK_CB=block_cb, BLOCK_R=triton.next_power_of_2(R), KS=K)
    return sizes, blocks


def _block_t(dtype: torch.dtype, block_n: int) -> int:
    """Tokens per step of the token contractions (P @ v, P^T g, dS k, dS^T q): all at once on tensor cores; through
    the scratch FMA_BLOCK_T at a time for fp32 (see _token_dot)."""
    return min(FMA_BLOCK_T, block_n) if dtype == torch.float32 else block_n


def _scratch(x: torch.Tensor, blocks: dict[str, int]) -> torch.Tensor:
    """Each non-local program's (BLOCK_N, BLOCK_N) fp32 scratch where _token_dot chunks the contraction (for at most
    cdiv(C, min BLOCK_CV) programs per sample), else one unused element."""
    B, C = x.shape[:2]
    n = blocks["BLOCK_N"]
    size = B * triton.cdiv(C, min(_BLOCK_CV)) * n * n if blocks["BLOCK_T"] < n else 1
    return torch.empty(size, device=x.device, dtype=torch.float32)


def _grid(B: int, C: int) -> Any:
    """(B, 1 + cdiv(C, BLOCK_CV)): one CBAM program and C / BLOCK_CV non-local programs per sample."""
    return lambda meta: (B, 1 + triton.cdiv(C, meta["BLOCK_CV"]))


def _project(x: torch.Tensor, wq: torch.Tensor, bq: torch.Tensor, wk: torch.Tensor, bk: torch.Tensor,
             wv: torch.Tensor, bv: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(q; k; v) = [Wq; Wk; Wv] x + b per sample: (B, 2C, N) channel-major fp32 (one batched GEMM, in fp32 like the
    reference: q and k must be exact for the logits)."""
    B, C, H, W = x.shape
    w = torch.cat([wq, wk, wv]).float()  # (2C, C)
    b = torch.cat([bq, bk, bv]).float()
    return torch.baddbmm(b[None, :, None], w.expand(B, -1, -1), x.reshape(B, C, H * W).float())


class _MSGLAMAttention(torch.autograd.Function):
    """The projections as one GEMM, then both attentions in one Triton launch forward and one backward."""

    @staticmethod
    def forward(ctx: Any, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, *params = (t.contiguous() for t in args)  # x (B, C, H, W); params as in msglam_attention
        wq, bq, wk, bk, wv, bv, log_sigma, ca_w1, ca_w2, sa_w = params
        sizes, blocks = _launch_meta(x, ca_w1, sa_w)
        qkv = _project(x, wq, bq, wk, bk, wv, bv)  # (B, 2C, N)
        nl_out, cbam_out = torch.empty_like(x), torch.empty_like(x)  # (B, C, H, W) each
        grid = _grid(x.shape[0], x.shape[1])
        scratch = _scratch(x, blocks)
        _msglam_fwd_kernel[grid](x, qkv, log_sigma, ca_w1, ca_w2, sa_w, scratch, nl_out, cbam_out, *sizes, **blocks)
        ctx.save_for_backward(x, qkv, *params)
        return nl_out, cbam_out

    @staticmethod
    @once_differentiable  # the backward is Triton: a second derivative raises instead of being silently wrong
    def backward(ctx: Any, g_nl: torch.Tensor, g_cb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, qkv, wq, bq, wk, bk, wv, bv, log_sigma, ca_w1, ca_w2, sa_w = ctx.saved_tensors
        B, C, H, W = x.shape
        sizes, blocks = _launch_meta(x, ca_w1, sa_w)
        _, N, D, _, R = sizes
        g_nl, g_cb = g_nl.contiguous(), g_cb.contiguous()
        f32 = dict(device=x.device, dtype=torch.float32)
        dq, dk, dv = torch.empty(B, N, D, **f32), torch.empty(B, N, D, **f32), torch.empty(B, N, C, **f32)
        dls, dx_cb = torch.empty(B, **f32), torch.empty(B, C, H, W, **f32)
        dw1, dw2, dsa = torch.empty(B, R, C, **f32), torch.empty(B, C, R, **f32), torch.empty(B, *sa_w.shape[1:], **f32)
        # Triton: recompute both attentions; non-local -> per-token dq, dk, dv and per-sample d log_sigma;
        # CBAM -> its full dx and per-sample weight gradients.
        _msglam_bwd_kernel[_grid(B, C)](
            *(x, qkv, log_sigma, ca_w1, ca_w2, sa_w, _scratch(x, blocks), g_nl, g_cb, dq, dk, dv, dls, dx_cb),
            *(dw1, dw2, dsa, *sizes),
            **blocks,
        )
        # PyTorch: GEMMs reducing over the batch (projection weight grads, dx through the projections) and the
        # per-sample partial sums (see the module docstring).
        xt = x.reshape(B, C, N).transpose(1, 2).float().flatten(0, 1)  # (B*N, C)
        dq2, dk2, dv2 = dq.flatten(0, 1), dk.flatten(0, 1), dv.flatten(0, 1)  # (B*N, D), (B*N, D), (B*N, C)
        dxt = dq2 @ wq.float() + dk2 @ wk.float() + dv2 @ wv.float()  # (B*N, C)
        dx = g_nl.float() + dx_cb + dxt.view(B, N, C).transpose(1, 2).reshape(B, C, H, W)
        grads = (
            (dx, x),
            (dq2.T @ xt, wq),
            (dq2.sum(0), bq),  # dWq (D, C), dbq (D,)
            (dk2.T @ xt, wk),
            (dk2.sum(0), bk),
            (dv2.T @ xt, wv),
            (dv2.sum(0), bv),  # dWv (C, C), dbv (C,)
            (dls.sum().reshape(()), log_sigma),
            (dw1.sum(0), ca_w1),
            (dw2.sum(0), ca_w2),
            (dsa.sum(0, keepdim=True), sa_w),
        )
        return tuple(gr.to(t.dtype) for gr, t in grads)


# ----------------------------------------------------------------------------------------------------------------
# Public function, shape checks and the plain-PyTorch reference
# ----------------------------------------------------------------------------------------------------------------


def _check_shapes(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    log_sigma: torch.Tensor,
    ca_w1: torch.Tensor,
    ca_w2: torch.Tensor,
    sa_w: torch.Tensor,
) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if C % 2:
        raise ValueError(f"x's channel count must be even (q, k have C/2 channels), got x {tuple(x.shape)}")
    D, R = C // 2, ca_w1.shape[0] if ca_w1.dim() == 2 else -1
    k = sa_w.shape[-1] if sa_w.dim() == 4 else -1
    expected = {
        "wq": (wq, (D, C)),
        "bq": (bq, (D,)),
        "wk": (wk, (D, C)),
        "bk": (bk, (D,)),
        "wv": (wv, (C, C)),
        "bv": (bv, (C,)),
        "log_sigma": (log_sigma, ()),
        "ca_w1": (ca_w1, (R, C)),
        "ca_w2": (ca_w2, (C, R)),
        "sa_w": (sa_w, (1, 2, k, k)),
    }
    bad = [
        f"{name} {tuple(t.shape)} (expected {want})" for name, (t, want) in expected.items() if tuple(t.shape) != want
    ]
    if R < 1 or k < 1 or k % 2 == 0:
        bad.append(f"ca_w1 {tuple(ca_w1.shape)} must be (R>=1, C), sa_w {tuple(sa_w.shape)} (1, 2, K, K) with K odd")
    if bad:
        raise ValueError(f"msglam_attention: for x {tuple(x.shape)} (C={C}, D={D}) got " + "; ".join(bad))


def nonlocal_attention_reference(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    log_sigma: torch.Tensor,
) -> torch.Tensor:
    """x + softmax_j(-||q_i - k_j||^2 / 2 sigma^2) v, in plain PyTorch (x (B, C, H, W) -> same shape).

    Computed in at least fp32 (bf16/fp16 inputs upcast, result cast back to x's dtype), like the kernel.
    """
    dtype, ct = x.dtype, torch.promote_types(x.dtype, torch.float32)
    x, wq, bq, wk, bk, wv, bv, log_sigma = (t.to(ct) for t in (x, wq, bq, wk, bk, wv, bv, log_sigma))
    B, C, H, W = x.shape
    xt = x.reshape(B, C, H * W).transpose(1, 2)  # (B, N, C)
    q = xt @ wq.T + bq  # (B, N, D)
    k = xt @ wk.T + bk  # (B, N, D)
    v = xt @ wv.T + bv  # (B, N, C)
    # ||q_i - k_j||^2 = ||q_i||^2 + ||k_j||^2 - 2 q_i.k_j  (matmul form: counted by FlopCounterMode)
    d2 = q.pow(2).sum(-1, keepdim=True) + k.pow(2).sum(-1).unsqueeze(1) - 2.0 * (q @ k.transpose(1, 2))  # (B, N, N)
    logits = -d2 * (0.5 * torch.exp(-2.0 * log_sigma))
    attn = torch.softmax(logits, dim=-1)
    return (x + (attn @ v).transpose(1, 2).reshape(B, C, H, W)).to(dtype)


def cbam_reference(x: torch.Tensor, ca_w1: torch.Tensor, ca_w2: torch.Tensor, sa_w: torch.Tensor) -> torch.Tensor:
    """CBAM: channel gate (avg/max pool -> shared MLP -> sigmoid), then spatial gate (KxK conv on mean/max).

    Computed in at least fp32 (result in x's dtype): in bf16 the rounded gates move which channel is the max, and
    so where the max pools' gradients go.
    """
    dtype, ct = x.dtype, torch.promote_types(x.dtype, torch.float32)
    x, ca_w1, ca_w2, sa_w = (t.to(ct) for t in (x, ca_w1, ca_w2, sa_w))
    avg, mx = x.mean(dim=(2, 3)), x.amax(dim=(2, 3))  # (B, C)
    mlp = lambda t: F.relu(t @ ca_w1.T) @ ca_w2.T  # noqa: E731  (B, C) -> (B, R) -> (B, C)
    y = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]  # (B, C, H, W)
    pooled = torch.cat([y.mean(dim=1, keepdim=True), y.amax(dim=1, keepdim=True)], dim=1)  # (B, 2, H, W)
    return (y * torch.sigmoid(F.conv2d(pooled, sa_w, padding=sa_w.shape[-1] // 2))).to(dtype)


def msglam_attention_reference(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    log_sigma: torch.Tensor,
    ca_w1: torch.Tensor,
    ca_w2: torch.Tensor,
    sa_w: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole op in plain PyTorch: (nonlocal_out, cbam_out)."""
    return nonlocal_attention_reference(x, wq, bq, wk, bk, wv, bv, log_sigma), cbam_reference(x, ca_w1, ca_w2, sa_w)


def _kernel_objection(x: torch.Tensor, *params: torch.Tensor) -> str | None:
    """The Triton kernel's own limits (beyond kernels._dispatch's device rules), or None."""
    tokens = x.shape[2] * x.shape[3]
    if tokens > MAX_TOKENS:
        return f"the kernel holds all tokens in one tile: H*W={tokens} > {MAX_TOKENS} (x {tuple(x.shape)})"
    if x.shape[0] == 0:
        return "empty batch"
    bad = sorted({str(t.dtype) for t in (x, *params) if t.dtype not in _DTYPES})
    return f"dtypes {bad} are not supported (float32, bfloat16, float16)" if bad else None


@fx_leaf
def msglam_attention(
    x: torch.Tensor,
    wq: torch.Tensor,
    bq: torch.Tensor,
    wk: torch.Tensor,
    bk: torch.Tensor,
    wv: torch.Tensor,
    bv: torch.Tensor,
    log_sigma: torch.Tensor,
    ca_w1: torch.Tensor,
    ca_w2: torch.Tensor,
    sa_w: torch.Tensor,
    *,
    backend: Backend = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MS-GLAM stage's attention: returns (nonlocal_out, cbam_out), each (B, C, H, W) in x's dtype.

    Args:
        x: (B, C, H, W) feature map, C even; H*W <= 128 for the Triton kernel.
        wq, bq, wk, bk: (C/2, C), (C/2,) query / key 1x1 projections. wv, bv: (C, C), (C,) value projection.
        log_sigma: () log of the Gaussian width sigma.
        ca_w1, ca_w2: (R, C), (C, R) CBAM channel MLP (no biases). sa_w: (1, 2, K, K) CBAM spatial conv, K odd.
        backend: "auto" (the Triton non-local kernel where kernels._dispatch.use_triton allows and the shape
            fits, else the reference), "triton" (raises RuntimeError where it cannot run) or "reference".
    Raises:
        ValueError naming every mis-shaped argument and x's shape.
    """
    _check_shapes(x, wq, bq, wk, bk, wv, bv, log_sigma, ca_w1, ca_w2, sa_w)
    args = (x, wq, bq, wk, bk, wv, bv, log_sigma, ca_w1, ca_w2, sa_w)
    if use_triton(*args, backend=backend, extra_reason=_kernel_objection(*args)):
        return _MSGLAMAttention.apply(*args)
    return msglam_attention_reference(*args)
