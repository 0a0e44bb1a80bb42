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
7x7 = 49 tokens and a DMAGaze forward makes 32 of these calls, so each launch batches the whole minibatch: one
program per sample does both attentions of the stage on all its tokens (one launch forward, one backward).
- forward, global: q and k are projected chunk by chunk of D (each chunk a loop over C); q.k^T and the squared
  norms accumulate into the (N, N) logits; the softmax runs in registers; then per chunk of C, v is projected,
  multiplied by P and the residual added. Nothing N x N leaves the chip; x is re-read from L1/L2 per chunk.
- forward, local: the whole (C, N) tile of a sample is held at once (C <= 512). Channel pools, the R-wide MLP as
  broadcast-multiply-reduce (R = C / 16 = 4..16 is below tl.dot's minimum tile of 16), channel gate, spatial
  pools, and the KxK conv written as an (N, N) matrix gathered from sa_w (entry (m, n) is the tap at which input
  token m meets output token n; zero outside the kernel and the image), then the spatial gate.
- backward, global: recompute q, k, v and P (no N x N tensor is saved), dP = g v^T, dV = P^T g, the softmax
  backward dS = P (dP - rowsum(P dP)), dq = 2s(dS k - rowsum(dS) q), dk = 2s(dS^T q - colsum(dS) k) with
  s = 1 / (2 sigma^2), and d log_sigma = -2 sum(dS * logits); dq, dk, dv are written per token.
- backward, local: recompute the CBAM tile and run its whole chain rule in registers (the max pools send their
  gradient to the maxima, split evenly between ties exactly as torch.amax does); per-sample dW1, dW2, d sa_w (the
  conv weight gradient sums the (N, N) pool x dz products per tap) and CBAM's full dx are written.
- left to PyTorch, inside the autograd.Function: the projection-weight gradients dW = sum_b dq_b^T x_b and
  dx += dq Wq + dk Wk + dv Wv, and the sums over the batch of the per-sample partial gradients. These are GEMMs /
  reductions across programs, which cuBLAS does better (and deterministically) than per-sample programs with
  atomics; they read only (B, N, C)-sized tensors.

Dots run in fp32 with input_precision="ieee" (bf16/fp16 inputs are upcast on load): the problems are tiny
(N <= 128, C <= 256 in DMAGaze) and latency bound, so exactness costs nothing measurable. Outputs and gradients
have their inputs' dtypes. The plain-PyTorch reference (`msglam_attention_reference`) also computes in at least
fp32; it serves meta tensors, FakeTensors, FlopCounterMode, other devices, shapes over the tile limits, and
machines without Triton.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kernels._dispatch import INTERPRET, Backend, fx_leaf, tl, triton, use_triton

__all__ = ["msglam_attention", "msglam_attention_reference", "nonlocal_attention_reference", "cbam_reference"]

MAX_TOKENS = 128  # one tile holds every token of a feature map (DMAGaze: 7x7 = 49)
MAX_CHANNELS = 512  # CBAM holds every channel x token of a sample in one tile (DMAGaze: at most 256 x 49)
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _project(
    x_base, w_ptr, b_ptr, row0, C, N, OUT, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Token-major projection tile (BLOCK_N, BLOCK_O) = x^T @ W[row0:row0+BLOCK_O, :]^T + b[row0:...].

    x_base points at one sample's x (C, N); W is (OUT, C) row-major. Padded rows/columns read as zero weights,
    so padded output columns are 0; padded token rows hold the bias (callers mask them).
    """
    offs_n = tl.arange(0, BLOCK_N)
    offs_o = row0 + tl.arange(0, BLOCK_O)
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    # Step: accumulate over input channels in chunks of BLOCK_K.
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(
            x_base + offs_k[None, :] * N + offs_n[:, None],
            mask=(offs_n[:, None] < N) & (offs_k[None, :] < C),
            other=0.0,
        ).to(tl.float32)  # (BN, BK)
        wt = tl.load(
            w_ptr + offs_o[None, :] * C + offs_k[:, None],
            mask=(offs_o[None, :] < OUT) & (offs_k[:, None] < C),
            other=0.0,
        ).to(tl.float32)  # (BK, BO)
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
    bias = tl.load(b_ptr + offs_o, mask=offs_o < OUT, other=0.0).to(tl.float32)  # (BO,)
    return acc + bias[None, :]


@triton.jit
def _gaussian_logits(
    x_base,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    scale,
    C,
    N,
    D,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """logits (BLOCK_N, BLOCK_N) = -scale * ||q_i - k_j||^2 with padded keys at -inf."""
    qk = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)  # sum_d q_id k_jd
    qn = tl.zeros((BLOCK_N,), dtype=tl.float32)  # ||q_i||^2
    kn = tl.zeros((BLOCK_N,), dtype=tl.float32)  # ||k_j||^2
    # Step: per chunk of D, project q and k (N, BLOCK_D) and accumulate their dot products and norms.
    for d0 in range(0, D, BLOCK_D):
        q = _project(x_base, wq_ptr, bq_ptr, d0, C, N, D, BLOCK_N, BLOCK_D, BLOCK_K)
        k = _project(x_base, wk_ptr, bk_ptr, d0, C, N, D, BLOCK_N, BLOCK_D, BLOCK_K)
        qk = tl.dot(q, tl.trans(k), qk, input_precision="ieee")
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
def _cbam_recompute(
    x_base,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
    C,
    N,
    W,
    R,
    BLOCK_C: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
):
    """CBAM forward for one sample with every channel and token in one (BLOCK_C, BLOCK_N) tile.

    Returns the intermediates the backward needs too: x, channel-pool values, MLP pre-activations, gates, y, the
    spatial pools, the gathered conv weights and the spatial gate.
    """
    offs_c = tl.arange(0, BLOCK_C)
    offs_n = tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok, n_ok, r_ok = offs_c < C, offs_n < N, offs_r < R
    valid = c_ok[:, None] & n_ok[None, :]
    x = tl.load(x_base + offs_c[:, None] * N + offs_n[None, :], mask=valid, other=0.0).to(tl.float32)  # (BC, BN)
    # Step: channel pools over tokens (padded channels -> 0, never -inf).
    avg = tl.sum(x, axis=1) / N  # (BC,)
    mx = tl.where(c_ok, tl.max(tl.where(valid, x, float("-inf")), axis=1), 0.0)  # (BC,)
    # Step: shared MLP without biases; R = C / 16 is too narrow for tl.dot, so broadcast-multiply and reduce.
    w1 = tl.load(ca_w1_ptr + offs_r[:, None] * C + offs_c[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    w1 = w1.to(tl.float32)  # (BR, BC) = W1
    w2t = tl.load(ca_w2_ptr + offs_c[None, :] * R + offs_r[:, None], mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    w2t = w2t.to(tl.float32)  # (BR, BC) = W2^T
    h_avg = tl.sum(w1 * avg[None, :], axis=1)  # (BR,) pre-ReLU
    h_max = tl.sum(w1 * mx[None, :], axis=1)
    hidden = tl.maximum(h_avg, 0.0) + tl.maximum(h_max, 0.0)  # W2 is linear: W2 relu(a) + W2 relu(b) = W2 (sum)
    c_gate = tl.sigmoid(tl.sum(w2t * hidden[:, None], axis=0))  # (BC,)
    y = x * c_gate[:, None]  # (BC, BN)
    # Step: spatial pools over channels.
    y_mean = tl.sum(y, axis=0) / C  # (BN,)
    y_max = tl.where(n_ok, tl.max(tl.where(valid, y, float("-inf")), axis=0), 0.0)  # (BN,)
    # Step: the KSxKS conv as a gathered (N, N) matrix: z_n = sum_m k[tap(m, n)] pool_m, tap = (dy, dx) of m from n
    # (cross-correlation with zero padding KS // 2, as F.conv2d).
    m_idx = offs_n[:, None]  # input token m (rows)
    n_idx = offs_n[None, :]  # output token n (columns)
    dy = m_idx // W - n_idx // W + KS // 2
    dx = m_idx % W - n_idx % W + KS // 2
    tap_ok = (dy >= 0) & (dy < KS) & (dx >= 0) & (dx < KS) & n_ok[:, None] & n_ok[None, :]
    tap = tl.where(tap_ok, dy * KS + dx, -1)  # (BN, BN)
    k_avg = tl.load(sa_w_ptr + tap, mask=tap_ok, other=0.0).to(tl.float32)  # (BN, BN)
    k_max = tl.load(sa_w_ptr + KS * KS + tap, mask=tap_ok, other=0.0).to(tl.float32)
    s_gate = tl.sigmoid(tl.sum(k_avg * y_mean[:, None] + k_max * y_max[:, None], axis=0))  # (BN,)
    return x, avg, mx, w1, w2t, h_avg, h_max, c_gate, y, y_mean, y_max, tap, k_avg, k_max, s_gate


def _configs() -> list[triton.Config]:
    if INTERPRET:  # the interpreter: one config, no tuning
        return [triton.Config({"BLOCK_K": 32, "BLOCK_D": 32, "BLOCK_CV": 32}, num_warps=4)]
    return [
        triton.Config({"BLOCK_K": bk, "BLOCK_D": bd, "BLOCK_CV": bc}, num_warps=w, num_stages=s)
        for bk in (16, 32, 64)
        for bd in (16, 32, 64)
        for bc in (32, 64)
        for w in (4, 8)
        for s in (1, 2)
    ]


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Drop tiles wider than the problem (pure padding) but keep at least the smallest config."""
    C, D = named_args["C"], named_args["D"]
    pow2 = lambda n: 1 << max(4, (int(n) - 1).bit_length())  # noqa: E731  (tl.dot needs >= 16)
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_K"] <= pow2(C) and c.kwargs["BLOCK_D"] <= pow2(D) and c.kwargs["BLOCK_CV"] <= pow2(C)
    ]
    return kept or configs[:1]


_AUTOTUNE = dict(configs=_configs(), key=["C", "N", "W"], prune_configs_by={"early_config_prune": _prune})


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _msglam_fwd_kernel(
    x_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    wv_ptr,
    bv_ptr,
    log_sigma_ptr,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
    nl_out_ptr,
    cbam_out_ptr,
    C,
    N,
    D,
    W,
    R,
    BLOCK_N: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_CV: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs every tile dimension >= 16")
    tl.static_assert(BLOCK_N <= 128, "all tokens of a sample live in one tile")
    tl.static_assert(KS % 2 == 1, "the CBAM spatial conv is odd-sized ('same' padding)")
    pid = tl.program_id(0)  # one program per batch element
    x_base = x_ptr + pid.to(tl.int64) * C * N  # x, both outputs: (C, N) per sample
    offs_n = tl.arange(0, BLOCK_N)
    # ---- global: Gaussian non-local attention ----
    # Step: 1 / (2 sigma^2) from the learnable log sigma.
    scale = 0.5 * tl.exp(-2.0 * tl.load(log_sigma_ptr).to(tl.float32))
    # Step: attention probabilities P (BN, BN), in registers.
    p = _softmax_rows(
        _gaussian_logits(x_base, wq_ptr, bq_ptr, wk_ptr, bk_ptr, scale, C, N, D, BLOCK_N, BLOCK_D, BLOCK_K)
    )
    # Step: per chunk of output channels: v (BN, BCV), P @ v, residual, store channel-major.
    for c0 in range(0, C, BLOCK_CV):
        v = _project(x_base, wv_ptr, bv_ptr, c0, C, N, C, BLOCK_N, BLOCK_CV, BLOCK_K)
        o = tl.dot(p, v, input_precision="ieee")  # (BN, BCV)
        offs_c = c0 + tl.arange(0, BLOCK_CV)
        ptrs = offs_c[None, :] * N + offs_n[:, None]
        mask = (offs_n[:, None] < N) & (offs_c[None, :] < C)
        x_res = tl.load(x_base + ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(nl_out_ptr + pid.to(tl.int64) * C * N + ptrs, (x_res + o).to(nl_out_ptr.dtype.element_ty), mask=mask)
    # ---- local: CBAM ----
    # Step: both gates on the whole (BC, BN) tile, then store y * spatial gate.
    _, _, _, _, _, _, _, _, y, _, _, _, _, _, s_gate = _cbam_recompute(
        x_base, ca_w1_ptr, ca_w2_ptr, sa_w_ptr, C, N, W, R, BLOCK_C, BLOCK_N, BLOCK_R, KS
    )
    offs_c = tl.arange(0, BLOCK_C)
    mask = (offs_c[:, None] < C) & (offs_n[None, :] < N)
    ptrs = pid.to(tl.int64) * C * N + offs_c[:, None] * N + offs_n[None, :]
    tl.store(cbam_out_ptr + ptrs, (y * s_gate[None, :]).to(cbam_out_ptr.dtype.element_ty), mask=mask)


@triton.autotune(**_AUTOTUNE)
@triton.jit
def _msglam_bwd_kernel(
    x_ptr,
    wq_ptr,
    bq_ptr,
    wk_ptr,
    bk_ptr,
    wv_ptr,
    bv_ptr,
    log_sigma_ptr,
    ca_w1_ptr,
    ca_w2_ptr,
    sa_w_ptr,
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
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    KS: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_CV: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16, "tl.dot needs every tile dimension >= 16")
    tl.static_assert(BLOCK_N <= 128, "all tokens of a sample live in one tile")
    tl.static_assert(KS % 2 == 1, "the CBAM spatial conv is odd-sized ('same' padding)")
    pid = tl.program_id(0)  # one program per batch element
    x_base = x_ptr + pid.to(tl.int64) * C * N
    g_base = g_nl_ptr + pid.to(tl.int64) * C * N  # dL/d nonlocal_out, (C, N) like x
    dq_base = dq_ptr + pid.to(tl.int64) * N * D  # token-major outputs: dq, dk (N, D), dv (N, C)
    dk_base = dk_ptr + pid.to(tl.int64) * N * D
    dv_base = dv_ptr + pid.to(tl.int64) * N * C
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    # ---- global: Gaussian non-local attention ----
    scale = 0.5 * tl.exp(-2.0 * tl.load(log_sigma_ptr).to(tl.float32))
    # Step: recompute logits and P (BN, BN).
    logits = _gaussian_logits(x_base, wq_ptr, bq_ptr, wk_ptr, bk_ptr, scale, C, N, D, BLOCK_N, BLOCK_D, BLOCK_K)
    p = _softmax_rows(logits)
    # Step: per chunk of channels, dP += g v^T and dV = P^T g (padded g rows load as 0).
    dp = tl.zeros((BLOCK_N, BLOCK_N), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CV):
        v = _project(x_base, wv_ptr, bv_ptr, c0, C, N, C, BLOCK_N, BLOCK_CV, BLOCK_K)  # (BN, BCV)
        offs_c = c0 + tl.arange(0, BLOCK_CV)
        mask = row_ok[:, None] & (offs_c[None, :] < C)
        g = tl.load(g_base + offs_c[None, :] * N + offs_n[:, None], mask=mask, other=0.0).to(tl.float32)
        dp = tl.dot(g, tl.trans(v), dp, input_precision="ieee")
        dv = tl.dot(tl.trans(p), g, input_precision="ieee")  # (BN keys, BCV)
        tl.store(dv_base + offs_n[:, None] * C + offs_c[None, :], dv, mask=mask)
    # Step: softmax backward dS = P * (dP - rowsum(P * dP)); zero on padded rows and keys.
    ds = p * (dp - tl.sum(p * dp, axis=1)[:, None])
    # Step: d log_sigma = sum dS * dlogits/dlog_sigma = -2 sum dS * logits (padded keys: logits -inf, dS 0).
    valid = row_ok[:, None] & row_ok[None, :]
    tl.store(dls_ptr + pid, -2.0 * tl.sum(tl.sum(ds * tl.where(valid, logits, 0.0), axis=1), axis=0))
    # Step: per chunk of D, recompute q, k and form dq = 2s(dS k - rowsum(dS) q), dk = 2s(dS^T q - colsum(dS) k).
    rowsum = tl.sum(ds, axis=1)  # (BN,) ~0 in exact arithmetic
    colsum = tl.sum(ds, axis=0)  # (BN,)
    for d0 in range(0, D, BLOCK_D):
        q = _project(x_base, wq_ptr, bq_ptr, d0, C, N, D, BLOCK_N, BLOCK_D, BLOCK_K)  # (BN, BD)
        k = _project(x_base, wk_ptr, bk_ptr, d0, C, N, D, BLOCK_N, BLOCK_D, BLOCK_K)
        dq = 2.0 * scale * (tl.dot(ds, k, input_precision="ieee") - rowsum[:, None] * q)
        dk = 2.0 * scale * (tl.dot(tl.trans(ds), q, input_precision="ieee") - colsum[:, None] * k)
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (offs_d[None, :] < D)
        ptrs = offs_n[:, None] * D + offs_d[None, :]
        tl.store(dq_base + ptrs, dq, mask=mask)
        tl.store(dk_base + ptrs, dk, mask=mask)
    # ---- local: CBAM, recomputed; every reduction below is within this sample ----
    x, avg, mx, w1, w2t, h_avg, h_max, c_gate, y, y_mean, y_max, tap, k_avg, k_max, s_gate = _cbam_recompute(
        x_base, ca_w1_ptr, ca_w2_ptr, sa_w_ptr, C, N, W, R, BLOCK_C, BLOCK_N, BLOCK_R, KS
    )
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok, r_ok = offs_c < C, offs_r < R
    valid = c_ok[:, None] & row_ok[None, :]  # (BC, BN)
    tile = offs_c[:, None] * N + offs_n[None, :]
    g = tl.load(g_cb_ptr + pid.to(tl.int64) * C * N + tile, mask=valid, other=0.0).to(tl.float32)  # (BC, BN)
    # Step: out = y * s_gate -> ds_gate, and through the sigmoid to the conv output z (BN,).
    dz = tl.sum(g * y, axis=0) * s_gate * (1.0 - s_gate)
    # Step: conv backward: d pool_m = sum_n k[tap(m, n)] dz_n; d sa_w[tap] = sum over (m, n) at that tap.
    dy_mean = tl.sum(k_avg * dz[None, :], axis=1)  # (BN,) over input tokens m
    dy_max = tl.sum(k_max * dz[None, :], axis=1)
    t_avg = y_mean[:, None] * dz[None, :]  # (BN, BN) per (m, n) pair
    t_max = y_max[:, None] * dz[None, :]
    dsa_base = dsa_ptr + pid * 2 * KS * KS
    for t in range(0, KS * KS):
        at_t = tap == t
        tl.store(dsa_base + t, tl.sum(tl.sum(tl.where(at_t, t_avg, 0.0), axis=1), axis=0))
        tl.store(dsa_base + KS * KS + t, tl.sum(tl.sum(tl.where(at_t, t_max, 0.0), axis=1), axis=0))
    # Step: dy from the product and both channel pools (max: split evenly between ties, as torch.amax).
    is_max = valid & (y == y_max[None, :])
    n_max = tl.sum(is_max.to(tl.float32), axis=0)  # (BN,) >= 1 on real tokens
    dy = g * s_gate[None, :] + dy_mean[None, :] / C + tl.where(is_max, (dy_max / tl.maximum(n_max, 1.0))[None, :], 0.0)
    dy = tl.where(valid, dy, 0.0)
    # Step: y = x * c_gate -> dx (direct part) and through the sigmoid to the MLP output (BC,).
    da = tl.sum(dy * x, axis=1) * c_gate * (1.0 - c_gate)
    dx = dy * c_gate[:, None]
    # Step: MLP backward. dW2 = da (relu(h_avg) + relu(h_max))^T; dh = W2^T da gated by each branch's ReLU.
    hidden = tl.maximum(h_avg, 0.0) + tl.maximum(h_max, 0.0)  # (BR,)
    rc = r_ok[:, None] & c_ok[None, :]  # (BR, BC)
    dw2_base = dw2_ptr + pid.to(tl.int64) * C * R  # (C, R) per sample
    tl.store(dw2_base + offs_c[None, :] * R + offs_r[:, None], hidden[:, None] * da[None, :], mask=rc)
    dh = tl.sum(w2t * da[None, :], axis=1)  # (BR,)
    dh_avg = tl.where(h_avg > 0.0, dh, 0.0)
    dh_max = tl.where(h_max > 0.0, dh, 0.0)
    dw1_base = dw1_ptr + pid.to(tl.int64) * R * C  # (R, C) per sample
    dw1 = dh_avg[:, None] * avg[None, :] + dh_max[:, None] * mx[None, :]
    tl.store(dw1_base + offs_r[:, None] * C + offs_c[None, :], dw1, mask=rc)
    # Step: through the channel pools to x (avg: 1/N each; max: split evenly between ties).
    d_avg = tl.sum(w1 * dh_avg[:, None], axis=0)  # (BC,)
    d_mx = tl.sum(w1 * dh_max[:, None], axis=0)
    is_cmax = valid & (x == mx[:, None])
    c_max = tl.sum(is_cmax.to(tl.float32), axis=1)  # (BC,)
    dx += d_avg[:, None] / N + tl.where(is_cmax, (d_mx / tl.maximum(c_max, 1.0))[:, None], 0.0)
    tl.store(dx_cb_ptr + pid.to(tl.int64) * C * N + tile, dx, mask=valid)


def _block_n(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _launch_meta(x: torch.Tensor, ca_w1: torch.Tensor, sa_w: torch.Tensor) -> tuple[tuple[int, ...], dict[str, int]]:
    """Runtime sizes (C, N, D, W, R) and the problem-sized constexprs shared by both kernels."""
    B, C, H, W = x.shape
    R, K = ca_w1.shape[0], sa_w.shape[-1]
    sizes = (C, H * W, C // 2, W, R)
    blocks = dict(BLOCK_N=_block_n(H * W), BLOCK_C=triton.next_power_of_2(C), BLOCK_R=triton.next_power_of_2(R), KS=K)
    return sizes, blocks


class _MSGLAMAttention(torch.autograd.Function):
    """Both attentions of a stage in one Triton launch forward and one backward (see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, *params = (t.contiguous() for t in args)  # x (B, C, H, W); params as in msglam_attention
        ca_w1, sa_w = params[7], params[9]
        sizes, blocks = _launch_meta(x, ca_w1, sa_w)
        nl_out, cbam_out = torch.empty_like(x), torch.empty_like(x)  # (B, C, H, W) each
        grid = (x.shape[0],)  # one program per sample, all tokens (and for CBAM all channels) in one tile
        _msglam_fwd_kernel[grid](x, *params, nl_out, cbam_out, *sizes, **blocks)
        ctx.save_for_backward(x, *params)
        return nl_out, cbam_out

    @staticmethod
    @once_differentiable  # the backward is Triton: a second derivative raises instead of being silently wrong
    def backward(ctx: Any, g_nl: torch.Tensor, g_cb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x, wq, bq, wk, bk, wv, bv, log_sigma, ca_w1, ca_w2, sa_w = ctx.saved_tensors
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
        _msglam_bwd_kernel[(B,)](
            x,
            wq,
            bq,
            wk,
            bk,
            wv,
            bv,
            log_sigma,
            ca_w1,
            ca_w2,
            sa_w,
            g_nl,
            g_cb,
            dq,
            dk,
            dv,
            dls,
            dx_cb,
            dw1,
            dw2,
            dsa,
            *sizes,
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
    if x.shape[1] > MAX_CHANNELS:
        return f"CBAM holds all channels in one tile: C={x.shape[1]} > {MAX_CHANNELS} (x {tuple(x.shape)})"
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
