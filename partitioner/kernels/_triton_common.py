"""Triton helpers shared by the kernel files (decorated here once, imported by each kernel)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from partitioner.kernels._dispatch import INTERPRET, tl, triton

__all__ = ["_mm", "fewest_spills", "prune_spills"]


@triton.jit
def _mm(a, b, DOT_PRECISION: tl.constexpr):
    """a @ b accumulated in fp32. Triton 3.9's interpreter computes bf16 / fp16 tl.dot wrongly, so under
    TRITON_INTERPRET=1 (DOT_PRECISION == "interp") the operands are upcast to fp32 first."""
    if DOT_PRECISION == "interp":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        out = tl.dot(a, b, input_precision=DOT_PRECISION)
    return out


def fewest_spills(configs: Sequence[Any], spills: Callable[[Any], int]) -> list[Any]:
    """The configs whose compile spills no register (`spills(config)`: bytes ptxas spills per thread), in their order;
    where every one spills, those spilling least (a kernel must keep a config to launch)."""
    counted = [(spills(c), c) for c in configs]
    least = min((n for n, _ in counted), default=0)
    return [c for n, c in counted if n == least]


def prune_spills(autotuner: Any) -> Any:
    """Decorator over ``@triton.autotune``: its ``early_config_prune`` (the tile-shape model of each kernel: shared
    memory from the tiles and stages, registers from budgets measured at the benchmark shapes) is followed, on a
    CUDA device, by the compile itself: each kept config is compiled for the arguments of the call (Triton's
    ``warmup``, cached for the autotuner's own runs) and those whose kernels spill registers are dropped, where a
    config that does not spill is left (`fewest_spills`). The models hold at the shapes they were measured at; the
    compile is what ptxas does at any shape, on the device it runs on (bench/kernels_sm90.py reports the same counts
    ahead of time for sm_90). Without CUDA (the interpreter, or the sm_90 harness on a CPU machine) only the model
    prunes."""
    inner = getattr(autotuner, "early_config_prune", None)
    if INTERPRET or inner is None:
        return autotuner

    def prune(configs: list, named_args: dict, **kwargs: Any) -> list:
        kept = inner(configs, named_args, **kwargs)
        if len(kept) < 2 or not torch.cuda.is_available():
            return kept
        return fewest_spills(kept, lambda config: _compiled_spills(autotuner.fn, named_args, kwargs, config))

    prune.inner = inner  # type: ignore[attr-defined]  # the model alone (tests, the ahead-of-time harness)
    autotuner.early_config_prune = prune
    return autotuner


def _compiled_spills(fn: Any, named_args: dict, kwargs: dict, config: Any) -> int:
    """Bytes per thread ptxas spills compiling `fn` with `config` for this call's arguments (Triton's CompiledKernel
    reports its register use and spills once its handles are loaded on the device)."""
    # Older Triton (3.6) hands the autotuner the launch's own `grid` and `warmup` among the kernel's keywords.
    call = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
    compiled = fn.warmup(grid=(1,), **named_args, **call, **config.all_kwargs())
    compiled._init_handles()
    return int(compiled.n_spills)
