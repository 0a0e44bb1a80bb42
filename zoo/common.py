"""Pieces shared by the zoo's families: weight init, preset configs with overrides, causal-LM token batches."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["causal_lm_inputs", "causal_lm_targets", "causal_lm_tokens", "init_transformer_weights", "preset_config"]

C = TypeVar("C")


def preset_config(cls: type[C], presets: dict[str, dict[str, Any]], name: str, overrides: dict[str, Any]) -> C:
    """`cls` built from preset `name` with `overrides` replacing its fields; a ValueError names unknown fields."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    bad = sorted(set(overrides) - set(valid))
    if bad:
        raise ValueError(f"unknown config field(s) {bad} for {name!r}; valid fields: {', '.join(valid)}")
    return cls(**{**presets[name], **overrides})


def causal_lm_tokens(vocab_size: int, n_ctx: int, batch: int, device: torch.device, seq: int | None) -> torch.Tensor:
    """Deterministic (batch, seq + 1) token ids of a causal LM (seq defaults to min(n_ctx, 128)): inputs are
    [:, :-1], next-token targets [:, 1:]. On meta, an empty tensor of that shape."""
    seq = min(n_ctx, 128) if seq is None else seq
    if not 1 <= seq <= n_ctx:
        raise ValueError(f"seq={seq} must be in [1, n_ctx={n_ctx}]")
    if device.type == "meta":
        return torch.empty(batch, seq + 1, dtype=torch.long, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randint(0, vocab_size, (batch, seq + 1), generator=g, device="cpu").to(device)


def init_transformer_weights(m: nn.Module) -> None:
    """GPT-2/BERT initialization: N(0, 0.02) for Linear and Embedding weights, zero biases, LayerNorm 1/0.

    Works on the meta device (the init ops are no-ops there), so big presets build without memory.
    """
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Embedding):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def causal_lm_inputs(cfg: Any, batch: int, device: torch.device, seq: int | None = None) -> tuple[torch.Tensor]:
    """(idx,) with idx (batch, seq) long for a causal LM config with `vocab_size` and `n_ctx` (gpt3, llama); seq
    defaults to min(n_ctx, 128)."""
    return (causal_lm_tokens(cfg.vocab_size, cfg.n_ctx, batch, device, seq)[:, :-1].contiguous(),)


def causal_lm_targets(cfg: Any, batch: int, device: torch.device, seq: int | None = None) -> torch.Tensor:
    """Next-token targets (batch, seq) long matching `causal_lm_inputs` with the same arguments."""
    return causal_lm_tokens(cfg.vocab_size, cfg.n_ctx, batch, device, seq)[:, 1:].contiguous()
