"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019) encoders with their masked-LM heads.

One plain implementation serves both (the architectures are the same; RoBERTa changes sizes, LayerNorm eps,
the vocabulary, a single token type and how position ids are computed):
embeddings (word + position + token type, LayerNorm), `n_layer` post-LayerNorm blocks
(x = LN(x + attn(x)); x = LN(x + mlp(x)), exact-erf GELU), the pooler (dense + tanh on the first token) and
the MLM head (dense d -> d, GELU, LayerNorm, decoder tied to the word embedding plus a decoder bias).

Invariants:
- `mlm_decoder.weight is word_emb.weight` (one Parameter); the parameter count equals `param_count(cfg)`, and
  `param_count(cfg, mlm_head=False)` equals the published encoder + pooler counts (HF BertModel / RobertaModel:
  bert-base 109,482,240, bert-large 335,141,888, roberta-base 124,645,632, roberta-large 355,359,744).
- The pooler's parameters exist (they are in the published counts) but forward returns only MLM logits, so
  the pooler takes no part in forward and its parameters get no gradient (`.grad is None` after backward).
- RoBERTa positions (`roberta_positions=True`) follow fairseq/HF: pos = cumsum(not_pad) * not_pad + pad_token_id,
  so real tokens get positions pad+1 .. pad+T and pad tokens get pad (a zero, untrained row); that is why
  max_positions is 514 = 512 + 2.
- The attention mask (B, T) of 1/0 (or bool) becomes an additive (B, 1, 1, T) bias of 0 / -10000 (the original
  BERT constant; finite, so a fully padded row gives a uniform softmax instead of NaN, and safe in fp16).
- Builds on meta; traces with `torch.fx.symbolic_trace` and `torch.export.export`; no in-place ops on
  activations, no data-dependent shapes.
- Module names: `word_emb`, `pos_emb`, `type_emb`, `ln_emb`,
  `layers.{i}.{attn.{q_proj, k_proj, v_proj, out_proj}, ln_1, mlp.{fc, proj}, ln_2}`, `pooler`,
  `mlm_dense`, `mlm_ln`, `mlm_decoder`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from zoo.common import init_transformer_weights, preset_config
from zoo.registry import ModelEntry, register

__all__ = ["BertConfig", "Bert", "PRESETS", "param_count", "mlm_loss", "example_inputs", "example_targets"]


@dataclass(kw_only=True)
class BertConfig:
    """Sizes of one BERT / RoBERTa model; the defaults are BERT-base (uncased)."""

    n_layer: int = 12
    d_model: int = 768
    n_head: int = 12
    d_ff: int = 3072
    vocab_size: int = 30522  # BERT uncased WordPiece; RoBERTa's byte BPE has 50265
    max_positions: int = 512  # learned position rows (RoBERTa: 514, see roberta_positions)
    type_vocab_size: int = 2  # segment A / B (RoBERTa: 1)
    layer_norm_eps: float = 1e-12  # RoBERTa: 1e-5
    pad_token_id: int = 0  # word (and RoBERTa position) embedding padding row; RoBERTa: 1
    dropout: float = 0.0  # hidden and attention dropout; 0 for benchmarks (published: 0.1)
    roberta_positions: bool = False  # positions from the non-pad mask via cumsum, offset by pad_token_id

    def __post_init__(self) -> None:
        for name in ("n_layer", "d_model", "n_head", "d_ff", "vocab_size", "max_positions", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"BertConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head != 0:
            raise ValueError(
                f"BertConfig: d_model={self.d_model} is not divisible by n_head={self.n_head} "
                f"(d_model / n_head = {self.d_model / self.n_head:.3f})"
            )
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"BertConfig.pad_token_id={self.pad_token_id} not in [0, vocab_size={self.vocab_size})")
        if self.roberta_positions and self.max_positions <= self.pad_token_id + 1:
            raise ValueError(
                f"BertConfig: max_positions={self.max_positions} leaves no position for real tokens "
                f"(RoBERTa positions start at pad_token_id + 1 = {self.pad_token_id + 1})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"BertConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def max_seq(self) -> int:
        """Longest input: max_positions, less the pad_token_id + 1 rows RoBERTa positions skip."""
        return self.max_positions - (self.pad_token_id + 1 if self.roberta_positions else 0)


_ROBERTA = dict(vocab_size=50265, max_positions=514, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1,
                roberta_positions=True)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base": dict(n_layer=12, d_model=768, n_head=12, d_ff=3072),
    "bert-large": dict(n_layer=24, d_model=1024, n_head=16, d_ff=4096),
    # For tests: d 64, d_ff 256, 4 heads, vocab 512 all divide by tensor-parallel 2 and 4.
    "bert-tiny": dict(n_layer=2, d_model=64, n_head=4, d_ff=256, vocab_size=512, max_positions=64),
    "roberta-base": dict(n_layer=12, d_model=768, n_head=12, d_ff=3072, **_ROBERTA),
    "roberta-large": dict(n_layer=24, d_model=1024, n_head=16, d_ff=4096, **_ROBERTA),
    # 66 positions = 64 tokens + the 2 rows RoBERTa positions skip (as 514 = 512 + 2).
    "roberta-tiny": dict(_ROBERTA, n_layer=2, d_model=64, n_head=4, d_ff=256, vocab_size=512, max_positions=66),
}
_FAMILY = {"bert-base": "bert", "bert-large": "bert", "bert-tiny": "bert"}  # the rest are "roberta"


def param_count(cfg: BertConfig, mlm_head: bool = True) -> int:
    """Closed-form parameter count (tied decoder weight counted once).

    embeddings (V + P + types)·d + 2d; per layer q,k,v,out 4(d² + d) + ln_1 2d + fc d·f + f + proj f·d + d + ln_2 2d
    = 4d² + 2d·f + 9d + f; pooler d² + d; MLM head dense d² + d + LN 2d + decoder bias V.
    """
    d, f, L = cfg.d_model, cfg.d_ff, cfg.n_layer
    embeddings = (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * d + 2 * d
    encoder = L * (4 * d * d + 2 * d * f + 9 * d + f) + d * d + d
    head = d * d + 3 * d + cfg.vocab_size
    return embeddings + encoder + (head if mlm_head else 0)


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention with an additive (B, 1, 1, T) mask."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.k_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.v_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.out_proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.size()
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        v = self.v_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # (B, nh, T, hd)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)  # (B, T, d)
        return self.drop(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.act = nn.GELU()  # exact erf GELU, as BERT and RoBERTa
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))  # (B, T, d) -> (B, T, f) -> (B, T, d)


class Layer(nn.Module):
    """Post-LN block: x = ln_1(x + attn(x)); x = ln_2(x + mlp(x))."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)
        self.ln_2 = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln_1(x + self.attn(x, mask))
        x = self.ln_2(x + self.mlp(x))
        return x


class Bert(nn.Module):
    """forward(input_ids (B, T) long, token_type_ids (B, T) long, attention_mask (B, T) 1/0 long or bool)
    -> MLM logits (B, T, vocab_size), T <= cfg.max_seq."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        pos_pad = cfg.pad_token_id if cfg.roberta_positions else None
        self.word_emb = nn.Embedding(cfg.vocab_size, cfg.d_model, padding_idx=cfg.pad_token_id)
        self.pos_emb = nn.Embedding(cfg.max_positions, cfg.d_model, padding_idx=pos_pad)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        self.ln_emb = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.n_layer)])
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)  # tanh(pooler(x[:, 0])); see `pool`
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_act = nn.GELU()
        self.mlm_ln = nn.LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps)
        self.mlm_decoder = nn.Linear(cfg.d_model, cfg.vocab_size)  # its bias is the MLM output bias
        self.mlm_decoder.weight = self.word_emb.weight  # tied: the same Parameter object

        # BERT init: N(0, 0.02), zero biases, LN ones/zeros; then the padding rows zero (after the decoder's init,
        # which re-initializes the shared word embedding).
        self.apply(init_transformer_weights)
        with torch.no_grad():
            for emb in (self.word_emb, self.pos_emb):
                if emb.padding_idx is not None:
                    emb.weight[emb.padding_idx].zero_()

    def encode(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The encoder's last hidden state (B, T, d)."""
        B, T = input_ids.size()
        if self.cfg.roberta_positions:
            not_pad = input_ids.ne(self.cfg.pad_token_id).long()  # (B, T)
            pos = torch.cumsum(not_pad, dim=1) * not_pad + self.cfg.pad_token_id  # (B, T)
        else:
            pos = torch.arange(T, dtype=torch.long, device=input_ids.device)  # (T,)
        x = self.word_emb(input_ids) + self.pos_emb(pos) + self.type_emb(token_type_ids)  # (B, T, d)
        x = self.drop(self.ln_emb(x))
        # (B, T) 1 = attend, 0 = padding -> additive (B, 1, 1, T) bias broadcast over heads and queries
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        for layer in self.layers:
            x = layer(x, mask)
        return x

    def pool(self, hidden: torch.Tensor) -> torch.Tensor:
        """The pooler output (B, d) = tanh(dense(hidden[:, 0])), for sentence-level heads (not in forward)."""
        return torch.tanh(self.pooler(hidden[:, 0]))

    def forward(
        self, input_ids: torch.Tensor, token_type_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        x = self.encode(input_ids, token_type_ids, attention_mask)  # (B, T, d)
        x = self.mlm_ln(self.mlm_act(self.mlm_dense(x)))  # (B, T, d)
        return self.mlm_decoder(x)  # (B, T, V)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked-LM cross-entropy: logits (B, T, V), labels (B, T) with -100 where not masked -> scalar."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _config(name: str, overrides: dict[str, Any]) -> BertConfig:
    return preset_config(BertConfig, PRESETS, name, overrides)


def _mlm_batch(cfg: BertConfig, batch: int, device: torch.device, seq: int | None) -> tuple[torch.Tensor, ...]:
    """Deterministic (input_ids, token_type_ids, attention_mask, labels), each (batch, seq) long.

    Even rows are full length, odd rows end in seq // 4 padding tokens. Segment B (type 1, when there are two
    types) is the second half of each row's real tokens. k = max(1, 0.15 * seq) real, non-first positions per
    row are masked: their input id becomes vocab_size - 1 (a stand-in [MASK] id; RoBERTa's <mask> is 50264,
    BERT's [MASK] is 103, which makes no difference to cost) and their label is the original id; all other
    labels are -100.
    """
    seq = min(cfg.max_seq, 128) if seq is None else seq
    if not 1 <= seq <= cfg.max_seq:
        raise ValueError(f"seq={seq} must be in [1, {cfg.max_seq}] (max_positions={cfg.max_positions})")
    if device.type == "meta":
        return tuple(torch.empty(batch, seq, dtype=torch.long, device=device) for _ in range(4))
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(cfg.pad_token_id + 1, cfg.vocab_size, (batch, seq), generator=g)  # never the pad id
    length = seq - (torch.arange(batch) % 2) * (seq // 4)  # (B,)
    pos = torch.arange(seq)[None, :]  # (1, T)
    valid = pos < length[:, None]  # (B, T)
    ids = torch.where(valid, ids, cfg.pad_token_id)
    types = (pos >= (length[:, None] // 2)) & valid & (cfg.type_vocab_size > 1)
    # pick k masked positions per row among real tokens after the first
    k = max(1, int(0.15 * seq))
    score = torch.rand(batch, seq, generator=g).masked_fill(~valid | (pos == 0), 2.0)
    masked = torch.zeros(batch, seq, dtype=torch.bool).scatter(1, score.argsort(dim=1)[:, :k], True) & valid
    labels = torch.where(masked, ids, -100)
    ids = torch.where(masked, cfg.vocab_size - 1, ids)
    out = (ids, types.long(), valid.long(), labels)
    return tuple(t.to(device) for t in out)


def example_inputs(
    cfg: BertConfig, batch: int, device: torch.device, seq: int | None = None
) -> tuple[torch.Tensor, ...]:
    """(input_ids, token_type_ids, attention_mask), each (batch, seq) long; seq defaults to min(max_seq, 128)."""
    return _mlm_batch(cfg, batch, device, seq)[:3]


def example_targets(cfg: BertConfig, batch: int, device: torch.device, seq: int | None = None) -> torch.Tensor:
    """MLM labels (batch, seq) long, -100 where not masked, matching `example_inputs` with the same arguments."""
    return _mlm_batch(cfg, batch, device, seq)[3]


def _register(name: str) -> None:
    cfg = _config(name, {})
    family = _FAMILY.get(name, "roberta")
    register(
        ModelEntry(
            name=name,
            family=family,
            build=lambda **kw: Bert(_config(name, kw)),
            # Keyword overrides other than `seq` are config fields, as for `build`.
            example_inputs=lambda batch, device, seq=None, **kw: example_inputs(_config(name, kw), batch, device, seq),
            example_targets=lambda batch, device, seq=None, **kw: example_targets(
                _config(name, kw), batch, device, seq
            ),
            loss=mlm_loss,
            description=(
                f"{'RoBERTa' if family == 'roberta' else 'BERT'} MLM {cfg.n_layer} layers, d_model {cfg.d_model}, "
                f"{cfg.n_head} heads, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, {cfg.max_positions} positions: "
                f"{param_count(cfg):,} parameters ({param_count(cfg, mlm_head=False):,} encoder + pooler)"
            ),
            config=dataclasses.asdict(cfg),
        )
    )


for _name in PRESETS:
    _register(_name)
