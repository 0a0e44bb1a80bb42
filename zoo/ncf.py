"""NCF / NeuMF (He et al. 2017, "Neural Collaborative Filtering") as in the MLPerf recommendation benchmark.

Two towers over (user, item) ids, joined at the output:
- GMF: user and item embeddings of `mf_dim`, multiplied elementwise.
- MLP: user and item embeddings of mlp_layers[0] / 2 each, concatenated to mlp_layers[0], then
  Linear + ReLU for each following width in `mlp_layers`.
- Output: Linear(mf_dim + mlp_layers[-1], 1) on concat(GMF, MLP), one logit per pair.

Presets: `ncf` is MLPerf's MovieLens-20M model (138,493 users, 26,744 items, mf_dim 64, mlp_layers
[256, 256, 128, 64]), exactly 31,832,577 parameters; `ncf-tiny` for tests.

Invariants: parameter count equals `param_count(cfg)`; builds on meta; traces with `torch.fx.symbolic_trace` and
`torch.export.export`. Module names: `mf_user`, `mf_item`, `mlp_user`, `mlp_item`, `mlp.{i}` (Linears),
`out`. Init: N(0, 0.02) weights, zero biases (the zoo's one init; MLPerf's reference uses N(0, 0.01) embeddings
and Glorot / LeCun uniform linears, which changes no shape or cost).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.common import preset_config
from zoo.registry import ModelEntry, register

__all__ = ["NCFConfig", "NeuMF", "PRESETS", "param_count", "bce_loss", "example_inputs", "example_targets"]


@dataclass(kw_only=True)
class NCFConfig:
    """Sizes of one NeuMF model; the defaults are MLPerf's MovieLens-20M model."""

    n_users: int = 138_493
    n_items: int = 26_744
    mf_dim: int = 64  # GMF factors
    mlp_layers: tuple[int, ...] = (256, 256, 128, 64)  # [0] is the concatenated user + item MLP embedding

    def __post_init__(self) -> None:
        self.mlp_layers = tuple(self.mlp_layers)
        for name in ("n_users", "n_items", "mf_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"NCFConfig.{name} must be >= 1, got {getattr(self, name)}")
        if len(self.mlp_layers) < 1 or any(w < 1 for w in self.mlp_layers):
            raise ValueError(f"NCFConfig.mlp_layers must be non-empty positive widths, got {self.mlp_layers}")
        if self.mlp_layers[0] % 2 != 0:
            raise ValueError(
                f"NCFConfig.mlp_layers[0]={self.mlp_layers[0]} must be even: it is the user and the item MLP "
                f"embeddings ({self.mlp_layers[0]} / 2 each) concatenated"
            )


PRESETS: dict[str, dict[str, Any]] = {
    "ncf": dict(n_users=138_493, n_items=26_744, mf_dim=64, mlp_layers=(256, 256, 128, 64)),  # MLPerf ML-20M
    # For tests: every width divides by tensor-parallel 2 and 4 (but the 1-wide output).
    "ncf-tiny": dict(n_users=512, n_items=256, mf_dim=16, mlp_layers=(64, 64, 32, 16)),
}


def param_count(cfg: NCFConfig) -> int:
    """(users + items)·(mf_dim + w0 / 2) + Σ (w_i·w_{i+1} + w_{i+1}) + (mf_dim + w_last + 1)."""
    w = cfg.mlp_layers
    embeddings = (cfg.n_users + cfg.n_items) * (cfg.mf_dim + w[0] // 2)
    mlp = sum(a * b + b for a, b in zip(w[:-1], w[1:], strict=True))
    return embeddings + mlp + cfg.mf_dim + w[-1] + 1


class NeuMF(nn.Module):
    """forward(user: LongTensor (B,), item: LongTensor (B,)) -> logits (B,)."""

    def __init__(self, cfg: NCFConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.mlp_layers
        self.mf_user = nn.Embedding(cfg.n_users, cfg.mf_dim)
        self.mf_item = nn.Embedding(cfg.n_items, cfg.mf_dim)
        self.mlp_user = nn.Embedding(cfg.n_users, w[0] // 2)
        self.mlp_item = nn.Embedding(cfg.n_items, w[0] // 2)
        self.mlp = nn.ModuleList([nn.Linear(a, b) for a, b in zip(w[:-1], w[1:], strict=True)])
        self.out = nn.Linear(cfg.mf_dim + w[-1], 1)
        self.apply(_init_weights)

    def forward(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        gmf = self.mf_user(user) * self.mf_item(item)  # (B, mf_dim)
        x = torch.cat([self.mlp_user(user), self.mlp_item(item)], dim=-1)  # (B, w0)
        for linear in self.mlp:
            x = F.relu(linear(x))  # (B, w_i)
        return self.out(torch.cat([gmf, x], dim=-1)).squeeze(-1)  # (B, mf_dim + w_last) -> (B,)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, mean=0.0, std=0.02)
    if isinstance(m, nn.Linear):
        nn.init.zeros_(m.bias)


def bce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy on logits: logits (B,), labels (B,) float in {0, 1} -> scalar."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def _config(name: str, overrides: dict[str, Any]) -> NCFConfig:
    return preset_config(NCFConfig, PRESETS, name, overrides)


def _batch(cfg: NCFConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deterministic (user (B,) long, item (B,) long, label (B,) float 0/1)."""
    if device.type == "meta":
        long = torch.empty(batch, dtype=torch.long, device=device)
        return long, torch.empty_like(long), torch.empty(batch, device=device)
    g = torch.Generator(device="cpu").manual_seed(0)
    user = torch.randint(0, cfg.n_users, (batch,), generator=g)
    item = torch.randint(0, cfg.n_items, (batch,), generator=g)
    label = torch.randint(0, 2, (batch,), generator=g).float()
    return user.to(device), item.to(device), label.to(device)


def example_inputs(cfg: NCFConfig, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(user, item), each (batch,) long."""
    return _batch(cfg, batch, device)[:2]


def example_targets(cfg: NCFConfig, batch: int, device: torch.device) -> torch.Tensor:
    """Labels (batch,) float in {0, 1} matching `example_inputs` with the same arguments."""
    return _batch(cfg, batch, device)[2]


def _register(name: str) -> None:
    cfg = _config(name, {})
    register(
        ModelEntry(
            name=name,
            family="ncf",
            build=lambda **kw: NeuMF(_config(name, kw)),
            # Keyword overrides are config fields, as for `build`.
            example_inputs=lambda batch, device, **kw: example_inputs(_config(name, kw), batch, device),
            example_targets=lambda batch, device, **kw: example_targets(_config(name, kw), batch, device),
            loss=bce_loss,
            description=(
                f"NeuMF {cfg.n_users:,} users, {cfg.n_items:,} items, GMF {cfg.mf_dim}, MLP {list(cfg.mlp_layers)}: "
                f"{param_count(cfg):,} parameters"
            ),
            config=dataclasses.asdict(cfg),
        )
    )


for _name in PRESETS:
    _register(_name)
