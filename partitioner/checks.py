"""checks: ops a rewritten graph runs to keep a rewrite exact at shapes it was not planned at.

`partitioner::check_attention_mask` (capture.attention_masks): an attention mask computed from sizes alone, found
causal (or all-true) at the example's sizes, so its attentions run as is_causal=True (or unmasked); at the first call
of each mask shape it raises if the mask is not what the rewrite assumed. A torch custom op, so that FakeTensor
annotation, export graphs and every rule table see one opaque op without output; fx keeps it (a side effect).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

__all__ = ["CHECK_ATTENTION_MASK", "check_attention_mask", "mask_kind"]

_CHECKED: set[tuple[Any, ...]] = set()  # (rewrite id, kind, shape, device, dtype) found as the rewrite assumed


def mask_kind(mask: torch.Tensor) -> str | None:
    """What an attention mask lets through: "none" when every entry does, "causal" when exactly the lower triangle of
    its last two dims does (key j <= query i: SDPA's is_causal), else None. Boolean masks let True through; additive
    float masks let 0 through and block -inf or the dtype's minimum (any other value: None)."""
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        allowed = mask == 0
        blocked = torch.isneginf(mask) | (mask == torch.finfo(mask.dtype).min)
        if not bool((allowed | blocked).all()):
            return None
    else:
        return None
    if bool(allowed.all()):
        return "none"
    if mask.dim() < 2:
        return None
    rows, cols = mask.shape[-2:]
    lower = torch.ones(rows, cols, dtype=torch.bool, device=mask.device).tril()
    return "causal" if torch.equal(allowed, lower.expand_as(allowed)) else None


@torch.library.custom_op("partitioner::check_attention_mask", mutates_args=())
def check_attention_mask(mask: torch.Tensor, kind: str, where: str) -> None:
    """Raise unless `mask` is `kind` (mask_kind), once per mask shape, device and dtype per rewrite `where`
    ("<id>:<attention names>"): the mask is computed from sizes alone, so one look per shape covers every call."""
    key = (where, kind, tuple(mask.shape), str(mask.device), mask.dtype)
    if key in _CHECKED or mask.device.type == "meta":
        return
    found = mask_kind(mask)
    single_key = mask.dim() >= 2 and mask.shape[-1] == 1  # one key: the causal triangle lets everything through
    if found != kind and not (kind == "causal" and found == "none" and single_key):
        names = where.split(":", 1)[1]
        raise ValueError(
            f"the attention mask of {names} was {kind!r} at the sizes the model was captured with, so the captured "
            f"graph runs that attention as {'is_causal=True' if kind == 'causal' else 'unmasked'}; at mask shape "
            f"{tuple(mask.shape)} it is {found or 'neither causal nor all-true'} (a sliding window the example's "
            f"sequence fitted in, say): compile the model with an example of this shape"
        )
    _CHECKED.add(key)


@check_attention_mask.register_fake
def _check_attention_mask_fake(mask: torch.Tensor, kind: str, where: str) -> None:
    return None


CHECK_ATTENTION_MASK = torch.ops.partitioner.check_attention_mask.default  # the OpOverload graphs call
fx.node.has_side_effect(CHECK_ATTENTION_MASK)
