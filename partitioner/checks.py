"""checks: ops a rewritten graph runs to keep a rewrite exact at shapes it was not planned at.

`partitioner::check_attention_mask` (capture.attention_masks): an attention mask computed from sizes alone, found
causal (or all-true) at the example's sizes, so its attentions run as is_causal=True (or unmasked) and the graph no
longer computes it; at the first call with each distinct sizes the check recomputes the mask from them on the CPU
and raises if it is not what the rewrite assumed. A torch custom op, so that FakeTensor annotation, export graphs and
every rule table see one opaque op without output; fx keeps it (a side effect).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

__all__ = ["CHECK_ATTENTION_MASK", "check_attention_mask", "mask_kind", "register_mask"]

_CHECKED: set[tuple[Any, ...]] = set()  # (rewrite id, kind, sizes) found as the rewrite assumed


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


_MASKS: dict[str, Callable[..., torch.Tensor]] = {}  # rewrite id -> the mask as a function of the graph's sizes


def register_mask(where: str, mask_of_sizes: Callable[..., torch.Tensor]) -> None:
    """Record how rewrite `where` computes its mask from sizes (capture.attention_masks), for its check."""
    _MASKS[where] = mask_of_sizes


@torch.library.custom_op("partitioner::check_attention_mask", mutates_args=())
def check_attention_mask(like: torch.Tensor, sizes: list[int], kind: str, where: str) -> None:
    """Raise unless the mask rewrite `where` ("<id>:<attention names>") replaced is `kind` (mask_kind) at these sizes:
    the mask is recomputed on the CPU from the sizes it is a function of (register_mask), once per distinct sizes, so
    the graph itself no longer computes it. `like`: a tensor of the run (an attention's query), so that a run on meta
    tensors (annotation) dispatches to no check at all."""
    key = (where, kind, tuple(sizes))
    if key in _CHECKED or like.device.type == "meta":
        return
    names = where.split(":", 1)[1]
    if where not in _MASKS:
        raise RuntimeError(
            f"the attention mask check of {names} runs in a process that did not capture the model (its mask function "
            f"is recorded at capture): compile the model in this process"
        )
    mask = _MASKS[where](*sizes)
    found = mask_kind(mask)
    single_key = mask.dim() >= 2 and mask.shape[-1] == 1  # one key: the causal triangle lets everything through
    if found != kind and not (kind == "causal" and found == "none" and single_key):
        raise ValueError(
            f"the attention mask of {names} was {kind!r} at the sizes the model was captured with, so the captured "
            f"graph runs that attention as {'is_causal=True' if kind == 'causal' else 'unmasked'}; at mask shape "
            f"{tuple(mask.shape)} it is {found or 'neither causal nor all-true'} (a sliding window the example's "
            f"sequence fitted in, say): compile the model with an example of this shape"
        )
    _CHECKED.add(key)


@check_attention_mask.register_fake
def _check_attention_mask_fake(like: torch.Tensor, sizes: list[int], kind: str, where: str) -> None:
    return None


CHECK_ATTENTION_MASK = torch.ops.partitioner.check_attention_mask.default  # the OpOverload graphs call
fx.node.has_side_effect(CHECK_ATTENTION_MASK)
