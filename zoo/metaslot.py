"""MetaSlot (Liu et al. 2025, arXiv 2505.20772, "MetaSlot: Break Through the Fixed Number of Slots in
Object-Centric Learning") on a DINOSAUR pipeline: frozen DINOv2 ViT-S/14 features -> MLP projection ->
MetaSlot aggregator (slot attention, vector-quantised prototypes, de-duplication) -> broadcast MLP decoder that
reconstructs the encoder features.

Per forward (B images, S slots, N = (image_size / 14)² tokens, D slot dims, E encoder dims):
  features = encoder(images).detach()                      (B, N, E)   frozen target
  inputs   = project(features)                             (B, N, D)   LN -> Linear -> GELU -> Linear
  init     = mean + exp(logstd) · ε  (training) / mean     (B, S, D)
  stage 1: T steps of slot attention from init.detach(), the normalised inputs getting N(0, 1) · σ_i,
           σ_i = noise_scale · (1 - i / (T - 1)) (0.5, 0.25, 0 for T = 3) before the k/v projections (training)
  quantise: codes = nearest codebook row (hard Gumbel-softmax over -distance in training), slots = codebook[codes]
  de-dup: keep the first slot of each code in an image (`dedup_slot_mask`), zero and mask the rest; taken
           with probability `dedup_prob` in training (0.02, × 1.001 per training forward, capped at 1), always
           in eval
  stage 2: T more noisy steps with that mask; before the last one the initializer's gradient is passed
           straight through: slots + (init - init.detach()) (value unchanged, d/d init = identity)
  restart (training only): the kept final slots enter a ring buffer; codes unused for `restart_timeout_steps`
           forwards are pulled towards the buffered slots farthest from the active codes
  decoder: every slot + learned positions -> MLP -> E features + 1 alpha logit per token; alpha softmax over the
           kept slots; recon = Σ_slots alpha · features                              (B, N, E), masks (B, S, N)
  loss = MSE(recon, features)

Invariants:
- Eval mode is deterministic (no noise, argmin codes, de-dup always taken) and `torch.fx.symbolic_trace` of the
  eval model computes what eager does, with `slot_attention` and `vq_lookup` as leaf calls (no Python branch
  depends on a tensor value; eval reads no buffer and mutates no state).
  A trace taken in training mode bakes in `self.training` (it always runs the training path) but keeps the
  randomness and the state updates: the noise and Gumbel draws are graph nodes, and the de-dup coin with its
  schedule step (`dedup_coin`: a tensor coin applied with `|`, no Python branch) and the dead-code restart are
  leaf calls (a buffer mutated directly in forward would run once at trace time and be missing from the graph).
- The encoder's parameters have requires_grad False and its output is detached: after backward their `.grad`
  is None. The codebook is trained only through the rows selected as stage-2 starting slots.
- `param_count(cfg)` equals `sum(p.numel() for p in model.parameters())`; builds on the meta device.
- Training state lives in buffers (saved in state_dict): `aggregator.dedup_prob`, `aggregator.code_timer`,
  `aggregator.slot_buffer`, `aggregator.buffer_ptr`.

Relation to the authors' code (github.com/lhj-lhj/MetaSlot: object_centric_bench/model/metaslot.py at commit
c602fa4; dinosaur.py, initq.py and basic.py at 38bfcd7; configs/dinosaur_r-coco.py) - followed:
- stage 1 starts from `query.detach()`; the last stage-2 step uses `q_d + query - query.detach()`;
- step = LN -> bias-free q projection, inverted attention (softmax over slots, renormalised over tokens with
  eps 1e-5), GRUCell(updates, slots), then y + MLP(LN(y)) with a GELU MLP D -> 4D -> D;
- noise: one N(0, 1) draw per step added to the normalised inputs and shared by k and v, scale
  0.5 · (1 - i / max(T - 1, ·));
- the codebook (512 × 256, uniform ±1/K init) is matched on the detached slots; the slot becomes the selected
  row (their `Codebook.select(zidx)`), so the soft Gumbel probabilities carry no gradient; duplicates are set to
  zero and masked (their `from_slots_get_initial_slots`); without de-dup the slots are still replaced by codes;
- restart (their `VQ.update_codebook` + `Codebook.replace`, called from the training forward): the kept final
  slots are re-quantised with a Gumbel sample and written into a ring buffer of capacity 4 · batch · S (672 for
  COCO; N(0, 1) rows until filled); only the codes of kept slots count as used; a per-code timer counts down from
  ceil(4096 · K / capacity) forwards, is reset when the code is used and starts at 1 (so all codes unused in the
  first training forward are restarted at once); dead codes become 0.2 · old + 0.8 · (buffered slot + 0.01 ·
  |slot| · ε), choosing the buffered slots with the largest mean distance to the active codes;
- initializer `NormalSeparat` (xavier-uniform mean, logstd = log D^-0.5, mean only in eval), zero biases in the
  projection and aggregator linears and GRU (their `reset_parameters`), pre-LN projection MLP 384 -> 768 -> 256,
  decoder positions trunc_normal(std 1), decoder alpha softmax over slots; outputs `attn` = the last stage-2
  step's attention before renormalisation (their `a`) and `masks` = the decoder alpha (their `attent2`); the
  loss is MSE(recon, detached features) (their `loss_fn.recon`); encoder = timm `vit_small_patch14_dinov2`'s
  layer list with the final norm (`norm_out=True`), class token dropped.
Deviations (this project's spec wins):
- no noise in eval (theirs adds it in eval too); de-dup always in eval and the schedule only advances in
  training (theirs draws and multiplies in every forward, eval included); the n-th training forward (0-based)
  uses probability 0.02 · 1.001^n (theirs multiplies before drawing: 0.02 · 1.001^(n+1));
- the decoder masks the de-duplicated slots (alpha -inf); their DINOSAUR calls the decoder without the mask;
- decoder MLP uses ReLU (DINOSAUR's paper); their `MLP` uses GELU;
- images enter at 224 px (theirs resizes 256 px by 0.875 = 224 before the ViT), encoder is randomly initialised;
- the restart's k-means bookkeeping (`replace_centroid`, computed but unused by the replacement policy they
  ship) is omitted; the timer is a buffer (theirs a plain attribute); topk of the farthest buffered slots is
  sorted (theirs `sorted=False`); only the last C kept slots are written when a batch has more than C.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from partitioner.kernels.slot_attention import slot_attention
from partitioner.kernels.vq import vq_lookup
from zoo.common import preset_config
from zoo.registry import ModelEntry, register
from zoo.vit import ViTEncoder, vit_param_count

__all__ = [
    "MetaSlotConfig",
    "MetaSlot",
    "MetaSlotOutput",
    "MetaSlotAggregator",
    "BroadcastMLPDecoder",
    "SlotInitializer",
    "PRESETS",
    "dedup_slot_mask",
    "dedup_coin",
    "restart_dead_codes",
    "reconstruction_loss",
    "param_count",
    "build",
    "example_inputs",
]

_BACKENDS = ("auto", "triton", "reference")


@dataclass(kw_only=True)
class MetaSlotConfig:
    """Sizes and schedules of one MetaSlot model; the defaults are the COCO preset (7 slots)."""

    # Encoder: DINOv2 ViT-S/14, frozen.
    image_size: int = 224  # 224 / 14 = 16 x 16 tokens
    patch_size: int = 14
    enc_dim: int = 384
    enc_depth: int = 12
    enc_heads: int = 6
    enc_mlp_dim: int = 1536
    enc_layerscale: float = 1e-5  # DINOv2's LayerScale init
    # Projection: LN(enc_dim) -> Linear(enc_dim, proj_hidden) -> GELU -> Linear(proj_hidden, slot_dim).
    proj_hidden: int = 768
    # Slots and aggregator.
    num_slots: int = 7  # COCO 7, VOC 6, ClevrTex 11 (the authors' configs)
    slot_dim: int = 256
    slot_ffn_dim: int = 1024
    num_iters: int = 3  # slot-attention steps per stage (two stages)
    noise_scale: float = 0.5  # std of the input noise at step 0, linearly to 0 at the last step (training)
    attn_eps: float = 1e-5  # renormalisation over tokens: a / (Σ_tokens a + eps)
    codebook_size: int = 512
    gumbel_tau: float = 1.0  # the authors' hard F.gumbel_softmax sample does not depend on tau; equal at 1
    dedup_prob_init: float = 0.02  # probability of taking the de-dup path in the first training forward
    dedup_prob_growth: float = 1.001  # multiplied in after every training forward, capped at 1
    # Dead-code restart (training only).
    buffer_capacity: int = 672  # ring buffer of recent kept slots: 4 x batch 32 x 7 slots in the COCO config
    restart_timeout: int = 4096  # in slots seen; converted to forwards by `restart_timeout_steps`
    restart_rate: float = 0.8  # dead code <- (1 - rate) * code + rate * replacement
    restart_noise: float = 0.01  # replacement += noise * |replacement| * N(0, 1)
    # Decoder: broadcast MLP, dec_layers hidden layers of dec_hidden with ReLU, enc_dim + 1 outputs.
    dec_hidden: int = 2048
    dec_layers: int = 3
    kernel_backend: str = "auto"  # passed to slot_attention and vq_lookup: "auto", "triton" or "reference"

    def __post_init__(self) -> None:
        for name in (
            "image_size", "patch_size", "enc_dim", "enc_depth", "enc_heads", "enc_mlp_dim", "proj_hidden",
            "num_slots", "slot_dim", "slot_ffn_dim", "num_iters", "codebook_size", "buffer_capacity",
            "restart_timeout", "dec_hidden", "dec_layers",
        ):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"MetaSlotConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size != 0:
            raise ValueError(
                f"MetaSlotConfig: image_size={self.image_size} is not a multiple of patch_size={self.patch_size} "
                f"(image_size / patch_size = {self.image_size / self.patch_size:.3f})"
            )
        if self.enc_dim % self.enc_heads != 0:
            raise ValueError(
                f"MetaSlotConfig: enc_dim={self.enc_dim} is not divisible by enc_heads={self.enc_heads} "
                f"(enc_dim / enc_heads = {self.enc_dim / self.enc_heads:.3f})"
            )
        if not 0.0 < self.dedup_prob_init <= 1.0:
            raise ValueError(f"MetaSlotConfig.dedup_prob_init must be in (0, 1], got {self.dedup_prob_init}")
        if self.dedup_prob_growth < 1.0:
            raise ValueError(f"MetaSlotConfig.dedup_prob_growth must be >= 1, got {self.dedup_prob_growth}")
        for name in ("noise_scale", "attn_eps", "restart_noise"):
            if getattr(self, name) < 0:
                raise ValueError(f"MetaSlotConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.gumbel_tau <= 0:
            raise ValueError(f"MetaSlotConfig.gumbel_tau must be > 0, got {self.gumbel_tau}")
        if not 0.0 <= self.restart_rate <= 1.0:
            raise ValueError(f"MetaSlotConfig.restart_rate must be in [0, 1], got {self.restart_rate}")
        if self.kernel_backend not in _BACKENDS:
            raise ValueError(f"MetaSlotConfig.kernel_backend must be one of {_BACKENDS}, got {self.kernel_backend!r}")

    @property
    def n_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def restart_timeout_steps(self) -> int:
        """Training forwards a code may go unused before it is restarted: ceil(timeout · K / capacity)."""
        return math.ceil(self.restart_timeout * self.codebook_size / self.buffer_capacity)


# Published presets: the authors' DINOSAUR + MetaSlot configs (batch 32, buffer 4 x 32 x S), and a tiny one.
PRESETS: dict[str, dict[str, Any]] = {
    "metaslot-coco": dict(num_slots=7, buffer_capacity=672),
    "metaslot-voc": dict(num_slots=6, buffer_capacity=768),
    "metaslot-clevrtex": dict(num_slots=11, buffer_capacity=1408),
    # For tests: 56 px -> 4 x 4 tokens; every width small enough for a 2-core CPU.
    "metaslot-tiny": dict(
        image_size=56,
        enc_dim=32,
        enc_depth=2,
        enc_heads=2,
        enc_mlp_dim=64,
        proj_hidden=64,
        num_slots=4,
        slot_dim=32,
        slot_ffn_dim=64,
        codebook_size=16,
        buffer_capacity=32,
        dec_hidden=64,
    ),
}


def param_count(cfg: MetaSlotConfig) -> int:
    """Closed-form parameter count (frozen encoder included).

    encoder `vit_param_count`; projection 2E + E·H + H + H·D + D; initializer 2·S·D; aggregator 3 LNs 6D,
    q/k/v 3D², GRUCell 6D² + 6D, FFN 2·D·F + F + D, codebook K·D; decoder positions N·D, first layer D·M + M,
    (L - 1) hidden layers M² + M, output M·(E + 1) + E + 1.
    """
    E, H, D, F_, S, K = cfg.enc_dim, cfg.proj_hidden, cfg.slot_dim, cfg.slot_ffn_dim, cfg.num_slots, cfg.codebook_size
    M, L, N = cfg.dec_hidden, cfg.dec_layers, cfg.n_tokens
    encoder = vit_param_count(
        image_size=cfg.image_size, patch_size=cfg.patch_size, dim=E, depth=cfg.enc_depth, mlp_dim=cfg.enc_mlp_dim
    )
    project = 2 * E + E * H + H + H * D + D
    initializer = 2 * S * D
    aggregator = 6 * D + 3 * D * D + (6 * D * D + 6 * D) + (2 * D * F_ + F_ + D) + K * D
    decoder = N * D + (D * M + M) + (L - 1) * (M * M + M) + M * (E + 1) + E + 1
    return encoder + project + initializer + aggregator + decoder


class MetaSlotOutput(NamedTuple):
    """What `MetaSlot.forward` returns (a NamedTuple: a pytree and an fx-traceable output)."""

    recon: torch.Tensor  # (B, N, E) reconstructed encoder features
    features: torch.Tensor  # (B, N, E) frozen encoder features, detached: the reconstruction target
    masks: torch.Tensor  # (B, S, N) decoder alpha, softmax over slots (0 for masked slots)
    attn: torch.Tensor  # (B, S, N) last slot-attention step's attention, softmax over slots
    slots: torch.Tensor  # (B, S, D) final slots (masked slots keep a value but take part in nothing)
    slot_mask: torch.Tensor  # (B, S) bool, True = kept (the first slot of its code)
    codes: torch.Tensor  # (B, S) int64 codebook index each slot was quantised to after stage 1


def dedup_slot_mask(codes: torch.Tensor) -> torch.Tensor:
    """(B, S) integer codes -> (B, S) bool, True where no earlier slot of the same image has the same code.

    Tensor ops only (traceable): slot i is a duplicate if any j < i has codes[b, j] == codes[b, i]; slot 0 is
    always kept, so every image keeps at least one slot.
    """
    same = codes.unsqueeze(-1) == codes.unsqueeze(-2)  # (B, S, S): [b, i, j] slots i and j share a code
    earlier = torch.ones_like(same[0]).tril(diagonal=-1)  # (S, S): [i, j] = j < i
    return ~(same & earlier).any(dim=-1)  # (B, S)


@torch.no_grad()
def restart_dead_codes(
    codebook: torch.Tensor,
    timer: torch.Tensor,
    slot_buffer: torch.Tensor,
    buffer_ptr: torch.Tensor,
    slots: torch.Tensor,
    codes: torch.Tensor,
    slot_mask: torch.Tensor,
    *,
    timeout_steps: int,
    rate: float,
    noise: float,
) -> torch.Tensor:
    """Dead-code restart, in place on codebook (K, D), timer (K,) int64, slot_buffer (C, D), buffer_ptr ().

    slots (B, S, D) and codes (B, S) are the final slots and their codebook indices, slot_mask (B, S) the kept
    ones. Phases: write the kept slots into the ring buffer at buffer_ptr; count every timer down by one and
    reset the codes in use to `timeout_steps`; codes whose timer reached 0 are dead: each is moved to
    (1 - rate) · code + rate · r with r a buffered slot (the ones with the largest mean distance to the active
    codes first, cycled if there are more dead codes than buffer rows) plus noise · |r| · N(0, 1), and its timer
    is set to `timeout_steps`. Returns the indices of the restarted codes (n_dead,).
    Eager code with data-dependent shapes: an fx leaf (`torch.fx.wrap`), called only in training. On meta or
    fake tensors (shape propagation, FLOP counting) there is no data and no state to update: it does nothing.
    """
    if any(t.is_meta or is_fake(t) for t in (codebook, slots)):
        return codes.new_empty((0,))
    # Ring buffer: the last C kept slots survive when a batch holds more than C.
    kept = slots[slot_mask]  # (M, D)
    capacity = slot_buffer.shape[0]
    n_new = kept.shape[0]
    pos = (buffer_ptr + torch.arange(n_new, device=kept.device)) % capacity  # (M,)
    slot_buffer[pos[-capacity:]] = kept[-capacity:].to(slot_buffer.dtype)
    buffer_ptr.copy_((buffer_ptr + n_new) % capacity)
    # Timers: used codes reset, the rest count down.
    active = codes[slot_mask].unique()  # (A,)
    timer.sub_(1).clamp_(min=0)
    timer[active] = timeout_steps
    dead = (timer == 0).nonzero().squeeze(1)  # (n_dead,)
    n_dead = dead.shape[0]
    if n_dead == 0:
        return dead
    # Replacements: buffered slots least similar (mean L2) to the active codes, cycled to n_dead rows.
    score = torch.cdist(slot_buffer, codebook[active].to(slot_buffer.dtype)).mean(dim=1)  # (C,)
    order = score.topk(min(n_dead, capacity)).indices  # (min(n_dead, C),)
    repl = slot_buffer[order.repeat(math.ceil(n_dead / order.shape[0]))[:n_dead]]  # (n_dead, D)
    repl = repl + noise * repl.norm(dim=-1, keepdim=True) * torch.randn_like(repl)
    # In place under no_grad: no autograd graph saved the codebook itself (vq_lookup gathers rows by index).
    codebook[dead] = (1.0 - rate) * codebook[dead] + rate * repl.to(codebook.dtype)
    timer[dead] = timeout_steps
    return dead


torch.fx.wrap("restart_dead_codes")


def dedup_coin(slot_mask: torch.Tensor, prob: torch.Tensor, *, growth: float) -> torch.Tensor:
    """Training's de-dup decision: slot_mask (B, S) with probability prob (a 0-d buffer), else all True; then
    prob <- min(prob · growth, 1) in place, so the n-th call (0-based) uses prob_0 · growth^n.

    One coin per forward (the whole batch), drawn from torch's RNG. An fx leaf: a buffer mutated inside an
    fx-traced forward would run once at trace time and be missing from the graph.
    """
    skip = torch.rand((), device=slot_mask.device) >= prob  # () bool: True = do not de-duplicate
    prob.mul_(growth).clamp_(max=1.0)
    return slot_mask | skip


torch.fx.wrap("dedup_coin")


class SlotInitializer(nn.Module):
    """Per-slot learned Gaussians: mean + exp(logstd) · N(0, 1) in training, the mean in eval -> (B, S, D)."""

    def __init__(self, num_slots: int, dim: int) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.empty(1, num_slots, dim))
        self.logstd = nn.Parameter(torch.full((1, num_slots, dim), math.log(dim**-0.5)))
        nn.init.xavier_uniform_(self.mean[0])

    def forward(self, like: torch.Tensor) -> torch.Tensor:
        slots = self.mean.expand(like.shape[0], -1, -1)  # (B, S, D), B from like's first dim
        if self.training:
            slots = slots + torch.randn_like(slots) * self.logstd.exp()
        return slots


class MetaSlotAggregator(nn.Module):
    """forward(inputs (B, N, D), init (B, S, D)) -> (slots (B, S, D), attn (B, S, N), slot_mask (B, S), codes (B, S)).

    Two stages of `num_iters` slot-attention steps around the quantise + de-dup step (module docstring).
    """

    def __init__(self, cfg: MetaSlotConfig) -> None:
        super().__init__()
        D, K = cfg.slot_dim, cfg.codebook_size
        self.cfg = cfg
        self.norm_kv = nn.LayerNorm(D)
        self.proj_k = nn.Linear(D, D, bias=False)
        self.proj_v = nn.Linear(D, D, bias=False)
        self.norm_q = nn.LayerNorm(D)
        self.proj_q = nn.Linear(D, D, bias=False)
        self.gru = nn.GRUCell(D, D)
        self.norm_ffn = nn.LayerNorm(D)
        self.ffn = nn.Sequential(nn.Linear(D, cfg.slot_ffn_dim), nn.GELU(), nn.Linear(cfg.slot_ffn_dim, D))
        self.codebook = nn.Parameter(torch.empty(K, D).uniform_(-1.0 / K, 1.0 / K))  # (K, D)
        self.register_buffer("dedup_prob", torch.tensor(cfg.dedup_prob_init, dtype=torch.float32))
        self.register_buffer("code_timer", torch.ones(K, dtype=torch.long))
        self.register_buffer("slot_buffer", torch.randn(cfg.buffer_capacity, D))  # (C, D), random until filled
        self.register_buffer("buffer_ptr", torch.zeros((), dtype=torch.long))
        nn.init.zeros_(self.gru.bias_ih)
        nn.init.zeros_(self.gru.bias_hh)
        for m in self.ffn:
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def _keys_values(self, x: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v (B, N, D) from the normalised inputs x (B, N, D), with step i's noise in training."""
        T = self.cfg.num_iters
        sigma = self.cfg.noise_scale * (1.0 - i / max(T - 1, 1))
        if self.training and sigma > 0:
            x = x + torch.randn_like(x) * sigma
        return self.proj_k(x), self.proj_v(x)

    def _step(
        self, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mask: torch.Tensor | None, want_attn: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self.proj_q(self.norm_q(slots))  # (B, S, D)
        out = slot_attention(
            q, k, v, slot_mask, self.cfg.attn_eps, return_attn=want_attn, backend=self.cfg.kernel_backend
        )  # updates (B, S, D), attn (B, S, N) or None
        h = self.gru(out[0].flatten(0, 1), slots.flatten(0, 1)).view_as(slots)  # (B, S, D)
        return h + self.ffn(self.norm_ffn(h)), out[1]

    def forward(
        self, inputs: torch.Tensor, init: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, T = self.cfg, self.cfg.num_iters
        x = self.norm_kv(inputs)  # (B, N, D)
        kv = None if self.training else self._keys_values(x, 0)  # eval: no noise, the same k/v at every step

        # Stage 1: aggregate from the detached initial slots.
        slots = init.detach()  # (B, S, D)
        for i in range(T):
            k, v = kv if kv is not None else self._keys_values(x, i)
            slots, _ = self._step(slots, k, v, None, False)

        # Quantise: each slot becomes its code vector codebook[codes]; gradient reaches only the selected rows
        # (vq_lookup's default, the authors' `Codebook.select`), none reaches stage 1.
        vq = vq_lookup(
            slots.detach(), self.codebook, sample=self.training, tau=cfg.gumbel_tau, backend=cfg.kernel_backend
        )
        codes, slots = vq[0], vq[1]  # (B, S) int64, (B, S, D)

        # De-duplicate: keep the first slot of each code. Training takes this path with probability dedup_prob
        # (a tensor coin, no Python branch) and then advances the schedule; eval always takes it.
        slot_mask = dedup_slot_mask(codes)  # (B, S) bool
        if self.training:
            slot_mask = dedup_coin(slot_mask, self.dedup_prob, growth=cfg.dedup_prob_growth)
        slots = slots * slot_mask.unsqueeze(-1).to(slots.dtype)  # duplicates zeroed, as in the authors' code

        # Stage 2: masked steps; the last one passes the initializer's gradient straight through.
        attn = None
        for i in range(T):
            k, v = kv if kv is not None else self._keys_values(x, i)
            if i == T - 1:
                slots = slots + (init - init.detach())
            slots, attn = self._step(slots, k, v, slot_mask, i == T - 1)

        # Dead-code restart from the re-quantised kept slots (training only).
        if self.training:
            final_codes = vq_lookup(
                slots.detach(), self.codebook.detach(), sample=True, tau=cfg.gumbel_tau, backend=cfg.kernel_backend
            )[0]  # (B, S)
            restart_dead_codes(
                self.codebook, self.code_timer, self.slot_buffer, self.buffer_ptr, slots.detach(), final_codes,
                slot_mask, timeout_steps=cfg.restart_timeout_steps, rate=cfg.restart_rate, noise=cfg.restart_noise,
            )  # fmt: skip
        return slots, attn, slot_mask, codes


class BroadcastMLPDecoder(nn.Module):
    """DINOSAUR's decoder: forward(slots (B, S, D), slot_mask (B, S)) -> (recon (B, N, E), masks (B, S, N)).

    Each slot is broadcast to the N token positions, learned positions added, an MLP predicts E features and an
    alpha logit per token; alpha is a softmax over the kept slots and mixes the per-slot features.
    """

    def __init__(self, cfg: MetaSlotConfig) -> None:
        super().__init__()
        D, M = cfg.slot_dim, cfg.dec_hidden
        self.pos = nn.Parameter(torch.empty(1, cfg.n_tokens, D))  # (1, N, D)
        nn.init.trunc_normal_(self.pos)
        layers: list[nn.Module] = []
        for i in range(cfg.dec_layers):
            layers += [nn.Linear(D if i == 0 else M, M), nn.ReLU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(M, cfg.enc_dim + 1))

    def forward(self, slots: torch.Tensor, slot_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = slots.unsqueeze(2) + self.pos.unsqueeze(1)  # (B, S, N, D)
        out = self.mlp(x)  # (B, S, N, E + 1)
        feats, logit = out[..., :-1], out[..., -1]  # (B, S, N, E), (B, S, N)
        logit = logit.masked_fill(~slot_mask.unsqueeze(-1), float("-inf"))
        alpha = logit.softmax(dim=1)  # (B, S, N): over slots
        return (feats * alpha.unsqueeze(-1)).sum(dim=1), alpha  # (B, N, E), (B, S, N)


class MetaSlot(nn.Module):
    """forward(images (B, 3, image_size, image_size)) -> MetaSlotOutput (shapes in its field comments).

    Module names: `encoder` (frozen ViTEncoder), `project`, `initializer`, `aggregator`, `decoder`.
    """

    def __init__(self, cfg: MetaSlotConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(
            image_size=cfg.image_size, patch_size=cfg.patch_size, dim=cfg.enc_dim, depth=cfg.enc_depth,
            n_head=cfg.enc_heads, mlp_dim=cfg.enc_mlp_dim, layerscale_init=cfg.enc_layerscale,
        )  # fmt: skip
        self.encoder.requires_grad_(False)
        self.project = nn.Sequential(
            nn.LayerNorm(cfg.enc_dim),
            nn.Linear(cfg.enc_dim, cfg.proj_hidden),
            nn.GELU(),
            nn.Linear(cfg.proj_hidden, cfg.slot_dim),
        )
        for m in self.project:
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.initializer = SlotInitializer(cfg.num_slots, cfg.slot_dim)
        self.aggregator = MetaSlotAggregator(cfg)
        self.decoder = BroadcastMLPDecoder(cfg)

    def forward(self, images: torch.Tensor) -> MetaSlotOutput:
        features = self.encoder(images).detach()  # (B, N, E): frozen, the reconstruction target
        inputs = self.project(features)  # (B, N, D)
        init = self.initializer(inputs)  # (B, S, D)
        slots, attn, slot_mask, codes = self.aggregator(inputs, init)
        recon, masks = self.decoder(slots, slot_mask)  # (B, N, E), (B, S, N)
        return MetaSlotOutput(
            recon=recon, features=features, masks=masks, attn=attn, slots=slots, slot_mask=slot_mask, codes=codes
        )


def reconstruction_loss(output: MetaSlotOutput, targets: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between output.recon and the features it reconstructs -> scalar.

    The target travels in the output (`output.features`, the frozen encoder's detached features), so `targets`
    is None (the registry entry defines no example targets); a (B, N, E) tensor, if given, replaces it.
    """
    target = output.features if targets is None else targets
    if target.shape != output.recon.shape:
        raise ValueError(f"targets shape {tuple(target.shape)} != recon shape {tuple(output.recon.shape)}")
    return F.mse_loss(output.recon, target.detach())


def _config(name: str, overrides: dict[str, Any]) -> MetaSlotConfig:
    return preset_config(MetaSlotConfig, PRESETS, name, overrides)


def build(name: str, **overrides: Any) -> MetaSlot:
    """Preset `name` with config fields replaced by `overrides`, on the current default device."""
    return MetaSlot(_config(name, overrides))


def example_inputs(
    name: str, batch: int = 2, device: torch.device | str = "cpu", *, seed: int = 0, **overrides: Any
) -> tuple[torch.Tensor]:
    """(images (batch, 3, image_size, image_size),) for preset `name` (+ overrides), N(0, 1) from `seed`.

    On the meta device an empty tensor of that shape.
    """
    cfg = _config(name, overrides)
    shape = (batch, 3, cfg.image_size, cfg.image_size)
    device = torch.device(device)
    if device.type == "meta":
        return (torch.empty(shape, device=device),)
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g).to(device),)


_DATASETS = {"metaslot-coco": "COCO", "metaslot-voc": "VOC", "metaslot-clevrtex": "ClevrTex"}


def _register(name: str) -> None:
    cfg = _config(name, {})
    what = f"{_DATASETS[name]} config" if name in _DATASETS else "tiny sizes for tests"
    register(
        ModelEntry(
            name=name,
            family="metaslot",
            build=lambda **overrides: build(name, **overrides),
            # Keyword overrides other than `seed` are config fields, as for `build` (image_size sets the shape).
            example_inputs=lambda batch=2, device="cpu", **kw: example_inputs(name, batch, device, **kw),
            example_targets=None,  # the target is the encoder features, returned in the output
            loss=reconstruction_loss,
            description=(
                f"MetaSlot + DINOSAUR ({what}): ViT {cfg.image_size}px/{cfg.patch_size} d{cfg.enc_dim} x "
                f"{cfg.enc_depth} (frozen), {cfg.num_slots} slots of {cfg.slot_dim}, codebook {cfg.codebook_size}, "
                f"decoder {cfg.dec_layers} x {cfg.dec_hidden}: {param_count(cfg):,} parameters"
            ),
            config=dataclasses.asdict(cfg),
        )
    )


for _name in PRESETS:
    _register(_name)
