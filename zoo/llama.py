"""Llama 2 and Llama 3 (Touvron et al. 2023, "Llama 2"; Llama Team 2024, "The Llama 3 Herd of Models"): the
published sizes, written plainly.

A decoder-only transformer: token embeddings, `n_layer` pre-RMSNorm blocks (causal self-attention with rotary
position embeddings and grouped-query attention: `n_kv_head` key/value heads, each read by `n_head / n_kv_head`
query heads; a SwiGLU MLP `down(silu(gate(x)) * up(x))` of width `d_ff`), a final RMSNorm and an untied LM head.
No biases. The layout and names are HF transformers' `LlamaForCausalLM` without its `model.` prefix, so its
state dict loads with that prefix stripped (tests/test_zoo_llama.py checks the logits against HF's).

Not modelled: Llama 3.1's long-context rotary frequency scaling (rope_scaling "llama3"): it changes the rotation
frequencies, no shape and no cost. Llama 3's presets use its pre-training base frequency (rope_theta 500,000).

Invariants:
- `sum(p.numel() for p in model.parameters()) == param_count(cfg)` (tests/test_zoo.py checks every preset).
- Builds under `with torch.device("meta"):` without touching data (llama3-405b on meta needs no weight memory).
- Traceable by `torch.fx.symbolic_trace` and `torch.export.export`: no control flow on tensor values, no in-place
  ops on activations, no data-dependent shapes. Rotary angles are computed from `arange(T)` in float32 in the
  forward (as HF's `position_ids` path), so they stay exact whatever dtype the model is cast to.
- Grouped-query attention is SDPA's `enable_gqa` (kv head j serves query heads j r .. j r + r - 1, r = n_head /
  n_kv_head), as flash attention runs it: k and v are never copied to every query head (HF's eager `repeat_kv`
  gives the same values). Tensor parallelism shards the kv heads where tp divides `n_kv_head`; above it each rank
  reads the kv head its query heads share (plan.tensor_rules).
- Module names: `embed_tokens`, `layers.{i}.{input_layernorm, self_attn.{q_proj, k_proj, v_proj, o_proj},
  post_attention_layernorm, mlp.{gate_proj, up_proj, down_proj}}`, `norm`, `lm_head`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.common import causal_lm_inputs, causal_lm_targets, init_transformer_weights, preset_config
from zoo.gpt3 import lm_loss
from zoo.registry import ModelEntry, register

__all__ = ["LlamaConfig", "Llama", "PRESETS", "param_count", "example_inputs", "example_targets"]


@dataclass(kw_only=True)
class LlamaConfig:
    """Sizes of one Llama model; the defaults are Llama 2 7B."""

    n_layer: int = 32
    d_model: int = 4096
    n_head: int = 32
    n_kv_head: int | None = None  # None: one kv head per query head (multi-head attention, Llama 2 7B / 13B)
    d_ff: int = 11008
    vocab_size: int = 32000
    n_ctx: int = 4096  # the longest sequence the preset was trained on (rotary: no position table)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        for name in ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "n_ctx"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0 or (self.d_model // self.n_head) % 2 != 0:
            raise ValueError(
                f"LlamaConfig: d_model={self.d_model} must split into n_head={self.n_head} heads of an even size "
                f"(rotary embeddings rotate pairs of channels)"
            )
        if self.n_head % self.n_kv_head != 0:
            raise ValueError(
                f"LlamaConfig: n_head={self.n_head} is not a multiple of n_kv_head={self.n_kv_head} (each kv head "
                f"serves the same number of query heads)"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


# Published configurations (the models' released config.json files; Llama 2 paper Table 1; Llama 3 paper Table 3).
PRESETS: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(n_layer=32, d_model=4096, n_head=32, d_ff=11008),
    "llama2-13b": dict(n_layer=40, d_model=5120, n_head=40, d_ff=13824),
    "llama2-70b": dict(n_layer=80, d_model=8192, n_head=64, n_kv_head=8, d_ff=28672),
    **{
        name: dict(sizes, n_kv_head=8, vocab_size=128256, n_ctx=8192, rope_theta=500000.0)
        for name, sizes in {
            "llama3-8b": dict(n_layer=32, d_model=4096, n_head=32, d_ff=14336),
            "llama3-70b": dict(n_layer=80, d_model=8192, n_head=64, d_ff=28672),
            "llama3-405b": dict(n_layer=126, d_model=16384, n_head=128, d_ff=53248),
        }.items()
    },
    # For tests: 4 query heads over 2 kv heads (grouped), every width divisible by tensor-parallel 2 and 4.
    "llama-tiny": dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, d_ff=128, vocab_size=512, n_ctx=64),
}


def param_count(cfg: LlamaConfig) -> int:
    """Closed-form parameter count: per block q and o d·d each, k and v d·(n_kv·hd) each, gate / up / down d·f
    each, two norms d; plus the embedding and the untied LM head V·d each and the final norm d."""
    d, f, kv = cfg.d_model, cfg.d_ff, cfg.n_kv_head * cfg.head_dim
    block = 2 * d * d + 2 * d * kv + 3 * d * f + 2 * d
    return cfg.n_layer * block + 2 * cfg.vocab_size * d + d


def rotary_angles(cfg: LlamaConfig, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles of positions 0..T-1, (T, head_dim) in float32: channel pair i of
    position p turns by p / theta^(2i / hd), the angles laid out twice (HF's `rotate_half` convention)."""
    hd = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    pos = torch.arange(T, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # (T, hd / 2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """x (B, h, T, 2 half) rotated: x cos + rotate_half(x) sin, rotate_half(x) = (-x[half:], x[:half]). `half` is a
    Python int (the config's), so traced graphs slice by constants."""
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Causal grouped-query self-attention with rotary embeddings on q and k."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        half = self.head_dim // 2
        q, k = _rotate(q, cos, sin, half), _rotate(k, cos, sin, half)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """forward(idx: LongTensor (B, T)) -> logits (B, T, vocab_size), T <= n_ctx."""

    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(init_transformer_weights)  # N(0, 0.02) as HF's Llama initializes; norms at one

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(idx)  # (B, T, d)
        cos, sin = rotary_angles(self.cfg, idx.size(1), idx.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin)
        return self.lm_head(self.norm(x))  # (B, T, V)


def _config(name: str, overrides: dict[str, Any]) -> LlamaConfig:
    return preset_config(LlamaConfig, PRESETS, name, overrides)


# The token batches of every causal LM in the zoo (zoo.common): seq defaults to min(n_ctx, 128).
example_inputs = causal_lm_inputs
example_targets = causal_lm_targets


def _register(name: str) -> None:
    cfg = _config(name, {})
    register(
        ModelEntry(
            name=name,
            family="llama",
            build=lambda **kw: Llama(_config(name, kw)),
            example_inputs=lambda batch, device, seq=None, **kw: example_inputs(_config(name, kw), batch, device, seq),
            example_targets=lambda batch, device, seq=None, **kw: example_targets(
                _config(name, kw), batch, device, seq
            ),
            loss=lm_loss,
            description=(
                f"Llama {cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads x {cfg.head_dim} over "
                f"{cfg.n_kv_head} kv heads, SwiGLU d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, ctx {cfg.n_ctx}: "
                f"{param_count(cfg):,} parameters"
            ),
            config=dataclasses.asdict(cfg),
        )
    )


for _name in PRESETS:
    _register(_name)
