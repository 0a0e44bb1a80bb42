"""Triton fused kernels with plain-PyTorch references, usable from any model.

Each function runs its Triton kernel where Triton can run (CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1 was set before import) and its reference otherwise (meta/fake tensors, under
FlopCounterMode, or without triton); `backend="reference"|"triton"` forces a path. See each
function's docstring for shapes, gradients and limits.
"""

from partitioner.kernels.msglam import msglam_attention, msglam_attention_reference
from partitioner.kernels.slot_attention import slot_attention, slot_attention_reference
from partitioner.kernels.vq import vq_lookup, vq_lookup_reference

__all__ = [
    "msglam_attention",
    "msglam_attention_reference",
    "slot_attention",
    "slot_attention_reference",
    "vq_lookup",
    "vq_lookup_reference",
]
