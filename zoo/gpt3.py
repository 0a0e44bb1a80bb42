"""GPT-3 (Brown et al. 2020, "Language Models are Few-Shot Learners"), all eight sizes of Table 2.1.

A decoder-only transformer written plainly (nanoGPT style): learned token + position embeddings, `n_layer`
pre-LayerNorm blocks (causal self-attention, GELU MLP of width `d_ff`), a final LayerNorm and an LM head
tied to the token embedding. GPT-3 uses GPT-2's architecture; its alternating dense / locally banded sparse
attention is not modelled (it changes no parameter and no shape), every layer is dense causal attention.

Invariants:
- `lm_head.weight is wte.weight` (one Parameter), so `sum(p.numel() for p in model.parameters())` equals
  `param_count(cfg)` = 12·L·d² + 13·L·d + (V + n_ctx)·d + 2·d for d_ff = 4d (`test_zoo.py` checks every preset).
- Builds under `with torch.device("meta"):` without touching data (gpt3-175b on meta needs no weight memory).
- Traceable by `torch.fx.symbolic_trace` and `torch.export.export`: no control flow on tensor values, no
  in-place ops on activations, no data-dependent shapes.
- Module names: `wte`, `wpe`, `h.{i}.{ln_1, attn.{q_proj, k_proj, v_proj, out_proj}, ln_2, mlp.{fc, proj}}`,
  `ln_f`, `lm_head`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.common import causal_lm_inputs, causal_lm_targets, init_transformer_weights, preset_config
from zoo.registry import ModelEntry, register

__all__ = ["GPTConfig", "GPT", "PRESETS", "param_count", "lm_loss", "example_inputs", "example_targets"]


@dataclass(kw_only=True)
class GPTConfig:
    """Sizes of one GPT-3 model; the defaults are GPT-3 Small (125M)."""

    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_ff: int | None = None  # MLP width; None means 4 * d_model (every GPT-3 size)
    vocab_size: int = 50257  # GPT-2 BPE
    n_ctx: int = 2048  # learned positions; the context of every GPT-3 size
    dropout: float = 0.0  # residual / attention / embedding dropout; 0 for benchmarks
    layer_norm_eps: float = 1e-5
    # "sdpa": one fused scaled_dot_product_attention call (flash / memory-efficient kernels on GPUs). "math": the
    # attention core written out as Megatron-LM (2021) runs it: Q K^T scaled, causal mask, softmax, dropout, times
    # V, the s x s probabilities materialized (what its published runs measured).
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "n_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"GPTConfig: d_model={self.d_model} is not divisible by n_head={self.n_head} "
                f"(d_model / n_head = {self.d_model / self.n_head:.3f})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in ("sdpa", "math"):
            raise ValueError(f"GPTConfig.attention must be 'sdpa' or 'math', got {self.attention!r}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# Table 2.1 of the GPT-3 paper (n_params, n_layers, d_model, n_heads x d_head); context 2048 for all.
# The names are the paper's rounded labels; exact counts are in `param_count` and the report.
PRESETS: dict[str, dict[str, Any]] = {
    "gpt3-125m": dict(n_layer=12, d_model=768, n_head=12),  # GPT-3 Small, 12 x 64
    "gpt3-350m": dict(n_layer=24, d_model=1024, n_head=16),  # Medium, 16 x 64
    "gpt3-760m": dict(n_layer=24, d_model=1536, n_head=16),  # Large, 16 x 96
    # XL: the paper prints 24 heads x d_head 128, but 24 * 128 = 3072 != 2048 and 2048 / 24 is not an
    # integer; 16 heads x 128 = 2048 is the consistent reading (as in common reimplementations).
    "gpt3-1.3b": dict(n_layer=24, d_model=2048, n_head=16),
    "gpt3-2.7b": dict(n_layer=32, d_model=2560, n_head=32),  # 32 x 80
    "gpt3-6.7b": dict(n_layer=32, d_model=4096, n_head=32),  # 32 x 128
    # The paper prints d_model 5140, which 40 heads do not divide; 5120 = 40 x 128 matches its d_head.
    "gpt3-13b": dict(n_layer=40, d_model=5120, n_head=40),
    "gpt3-175b": dict(n_layer=96, d_model=12288, n_head=96),  # 96 x 128
    # For tests: every dimension (d 64, d_ff 256, 4 heads, vocab 512) divides by tensor-parallel 2 and 4.
    "gpt3-tiny": dict(n_layer=2, d_model=64, n_head=4, vocab_size=512, n_ctx=64),
}


def param_count(cfg: GPTConfig) -> int:
    """Closed-form parameter count (tied LM head counted once).

    Per block: ln_1 2d + q,k,v,out 4(d² + d) + ln_2 2d + fc d·f + f + proj f·d + d; plus wte V·d, wpe n_ctx·d
    and ln_f 2d. With f = 4d this is 12·L·d² + 13·L·d + (V + n_ctx)·d + 2d.
    """
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layer
    block = 4 * d * d + 2 * d * f + 9 * d + f
    return L * block + (cfg.vocab_size + cfg.n_ctx) * d + 2 * d


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections (column-parallel friendly)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.attention = cfg.attention
        self.attn_drop = nn.Dropout(cfg.dropout)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        if self.attention == "math":
            y = self._math_attention(q, k, v)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, d)
        return self.resid_drop(self.out_proj(y))

    def _math_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """softmax(mask(Q K^T / sqrt(hd))) V with the probabilities materialized, as Megatron-LM's CoreAttention
        (the scale applied to Q, which is cheaper than to the s x s scores and equal)."""
        T = q.size(2)
        scores = torch.matmul(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(-2, -1))  # (B, nh, T, T)
        pos = torch.arange(T, device=q.device)
        causal = pos[:, None] >= pos[None, :]  # (T, T)
        probs = self.attn_drop(torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1))
        return torch.matmul(probs, v)  # (B, nh, T, hd)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.act = nn.GELU(approximate="tanh")  # GPT-2's gelu
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))  # (B, T, d) -> (B, T, f) -> (B, T, d)


class Block(nn.Module):
    """Pre-LN block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    """forward(idx: LongTensor (B, T)) -> logits (B, T, vocab_size), T <= n_ctx."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.n_ctx, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: the same Parameter object

        # GPT-2 init: N(0, 0.02), zero biases, LN ones/zeros; residual output projections scaled by 1/sqrt(2L).
        self.apply(init_transformer_weights)
        for name, p in self.named_parameters():
            if name.endswith("attn.out_proj.weight") or name.endswith("mlp.proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.size()
        pos = torch.arange(T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, d)
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return self.lm_head(x)  # (B, T, V)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V), targets (B, T) -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _config(name: str, overrides: dict[str, Any]) -> GPTConfig:
    return preset_config(GPTConfig, PRESETS, name, overrides)


# The token batches of every causal LM in the zoo (zoo.common): seq defaults to min(n_ctx, 128).
example_inputs = causal_lm_inputs
example_targets = causal_lm_targets


def _register(name: str) -> None:
    cfg = _config(name, {})
    register(
        ModelEntry(
            name=name,
            family="gpt3",
            build=lambda **kw: GPT(_config(name, kw)),
            # Keyword overrides other than `seq` are config fields, as for `build`.
            example_inputs=lambda batch, device, seq=None, **kw: example_inputs(_config(name, kw), batch, device, seq),
            example_targets=lambda batch, device, seq=None, **kw: example_targets(
                _config(name, kw), batch, device, seq
            ),
            loss=lm_loss,
            description=(
                f"GPT-3 {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads x {cfg.head_dim}, "
                f"d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, ctx {cfg.n_ctx}: {param_count(cfg):,} parameters"
            ),
            config=dataclasses.asdict(cfg),
        )
    )


for _name in PRESETS:
    _register(_name)
