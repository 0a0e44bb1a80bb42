"""Triton or reference: the one rule every kernel in `partitioner/kernels/` uses to pick its implementation.

Every public kernel function takes ``backend: Literal["auto", "triton", "reference"] = "auto"`` and asks
``use_triton(*tensors, backend=backend)``:

- ``"reference"``: always the plain-PyTorch reference.
- ``"triton"``: always the Triton kernel; raises ``RuntimeError`` naming the reason when it cannot run
  (see :func:`triton_unsupported_reason`).
- ``"auto"``: Triton when it can run, else the reference. Triton can run when all of:

  1. ``triton`` imports (it is Linux-only in pyproject; ``import partitioner.kernels`` works without it);
  2. every tensor is a plain dense tensor: not a subclass (FakeTensor, DTensor, ...), not a functorch
     wrapper (vmap / grad), not sparse;
  3. no dispatch mode is active (FlopCounterMode, FakeTensorMode, ...: a Triton launch is invisible to
     them, so the reference runs and they see its ops) and we are not inside ``torch.compile`` tracing;
  4. either all tensors are on one CUDA device, or all are CPU tensors and ``TRITON_INTERPRET=1`` was set
     when ``partitioner.kernels`` was imported (Triton picks interpreter or compiler when a kernel is decorated, at
     import; tests/conftest.py sets it first). Meta tensors and other devices therefore get the reference.

Every public kernel is an fx leaf (:func:`fx_leaf`): torch.fx records each call as one ``call_function`` node,
whatever the caller's import style (``from partitioner.kernels import f`` or ``kernels.f(...)``) and with no
``torch.fx.wrap`` in the caller's module, so a traced model keeps the fused kernel. ``"auto"`` then keeps such graphs
runnable anywhere: the partitioner's meta-tensor FlopCounterMode pass runs the reference (rules 3 and 4), whose ops it
counts. (torch.export traces into the function instead: on its fake tensors it records the reference's ops.)
Kernel-specific limits (dtype, head dimension) are the kernel's own business: it passes them to
:func:`use_triton` as ``extra_reason`` so that ``"auto"`` falls back and ``"triton"`` raises with the reason.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch

__all__ = [
    "Backend",
    "HAS_TRITON",
    "INTERPRET",
    "fx_leaf",
    "tl",
    "triton",
    "triton_unsupported_reason",
    "use_triton",
]

Backend = Literal["auto", "triton", "reference"]
F = TypeVar("F", bound=Callable[..., Any])
_BACKENDS = ("auto", "triton", "reference")


class _TritonMissing(types.SimpleNamespace):
    """Stands in for ``triton`` and ``triton.language`` where Triton is not installed, so that kernel modules
    still import (their decorators become no-ops; :func:`use_triton` never lets a launch happen)."""

    constexpr = Any  # only ever used as an annotation

    @staticmethod
    def jit(fn: Any = None, **_: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    @staticmethod
    def autotune(*_: Any, **__: Any) -> Any:
        return lambda f: f

    @staticmethod
    def heuristics(*_: Any, **__: Any) -> Any:
        return lambda f: f

    @staticmethod
    def Config(*args: Any, **kwargs: Any) -> Any:  # noqa: N802 (mirrors triton.Config)
        return (args, kwargs)

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(0, (n - 1).bit_length())


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent (macOS, Windows)
    triton = _TritonMissing()
    tl = _TritonMissing()
    HAS_TRITON = False

# Triton decides interpreter vs compiler when a kernel is decorated; kernel modules import this module
# before decorating, so this is the mode their kernels were built in.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _dispatch_mode_active() -> bool:
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())


def triton_unsupported_reason(*tensors: torch.Tensor | None) -> str | None:
    """Why the Triton path cannot run on these tensors (rules 1-4 of the module docstring), or None if it can.

    ``None`` entries are skipped (optional arguments).
    """
    if not HAS_TRITON:
        return "triton is not installed"
    if _is_compiling():
        return "inside torch.compile tracing (the reference is traced instead)"
    if _dispatch_mode_active():
        return "a TorchDispatchMode (e.g. FlopCounterMode, FakeTensorMode) is active"
    present = [t for t in tensors if t is not None]
    devices = set()
    for t in present:
        if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter:
            return f"tensor subclass {type(t).__name__} is not supported"
        if torch._C._functorch.is_functorch_wrapped_tensor(t):
            return "functorch-wrapped tensor (vmap / grad transform) is not supported"
        if t.layout != torch.strided:
            return f"layout {t.layout} is not supported"
        devices.add(t.device)
    if not devices:
        return "no tensor arguments"
    if len(devices) > 1:
        return f"tensors are on different devices {sorted(str(d) for d in devices)}"
    (device,) = devices
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if INTERPRET else "CPU tensors need TRITON_INTERPRET=1 set before `partitioner.kernels` is imported"
    return f"device type {device.type!r} is not supported (CUDA, or CPU under TRITON_INTERPRET=1)"


def use_triton(*tensors: torch.Tensor | None, backend: str, extra_reason: str | None = None) -> bool:
    """True if the Triton kernel should run on ``tensors`` for ``backend`` (rules in the module docstring).

    ``extra_reason`` is the calling kernel's own objection (unsupported dtype, size, ...) or None.
    Raises ValueError for an unknown backend, RuntimeError when ``backend="triton"`` cannot be honoured.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    reason = triton_unsupported_reason(*tensors) or extra_reason
    if reason is None:
        return True
    if backend == "triton":
        raise RuntimeError(f"backend='triton' cannot run here: {reason}")
    return False


def fx_leaf(fn: F) -> F:
    """`fn`, recorded by torch.fx as one call_function node when a traced value (an fx Proxy) is among its
    arguments, and run as itself otherwise.

    It is what ``torch.fx.wrap("name")`` does, but for every caller: fx.wrap patches one name in one module's
    globals, so a model that forgot it, or called ``kernels.slot_attention(...)`` through the package, was traced
    into the kernel (which fails on proxies) and captured another way without the kernel. The node's target is the
    returned function itself, so the graph runs the kernel (or its reference, by ``backend``) when it runs.
    """

    @functools.wraps(fn)
    def leaf(*args: Any, **kwargs: Any) -> Any:
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.fx.Proxy):
                return a.tracer.create_proxy("call_function", leaf, args, kwargs)
        return fn(*args, **kwargs)

    return leaf  # type: ignore[return-value]
