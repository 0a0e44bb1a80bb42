"""validate: what compile() and a training step accept, each refusal naming the option or input and the fix.

Nothing here computes: these checks run before any work, so bad input never reaches a pass as a crash deep
inside it (or, worse, as a silently wrong split of a batch).
"""

from __future__ import annotations

import math
import numbers
import re
from typing import Any

import torch
from torch.utils import _pytree as pytree

__all__ = ["as_call", "check_batch_split", "memory_bytes", "positive_int"]

_UNITS = {
    "": 1, "b": 1,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1 (NumPy and other integral types welcome; bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def memory_bytes(value: Any) -> float:
    """memory_limit as bytes: a positive finite number, or a string with a unit ("80GB", "80 GiB", "512MiB")."""
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?\d+)?)\s*([kmgt]i?b|b)?\s*", value.lower())
        if m is None:
            raise ValueError(
                f'memory_limit={value!r} is not a size: pass bytes (80e9) or a number with a unit ("80GB", "80GiB")'
            )
        value = float(m.group(1)) * _UNITS[m.group(2) or ""]
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"memory_limit must be a positive number of bytes per device, got {value!r}")
    return float(value)


def as_call(inputs: Any, name: str = "example_inputs") -> tuple:
    """Positional inputs as a tuple: a bare tensor is one argument, as in `model(x)`."""
    if inputs is None:
        return ()
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs)
    raise ValueError(
        f"{name} must be a tensor or a tuple of positional arguments (as the model is called), got "
        f"{type(inputs).__name__}; pass keyword arguments as a dict separately"
    )


def check_batch_split(
    named: dict[str, torch.Tensor],
    targets: Any,
    *,
    microbatches: int,
    data_degree: int,
    batch_dims: dict[str, int | None] | None = None,
    target_dim: int = 0,
) -> int:
    """The batch size of a step, after checking that it splits into microbatches x data degree equal chunks.

    Every tensor input is split along its batch dim (`batch_dims[name]`, default 0; None: not split) and every
    target tensor along `target_dim`, as torch's pipeline schedules do, so all of them must have the same number
    of rows there, a positive multiple of the chunk count: an uneven split weights samples differently from the
    whole batch, and an empty chunk gives NaN losses.
    """
    batch_dims = batch_dims or {}
    chunks = microbatches * data_degree
    rows: dict[str, int] = {}
    leaves = [t for t in pytree.tree_leaves(targets) if isinstance(t, torch.Tensor)]
    located = [(name, t, batch_dims.get(name, 0)) for name, t in named.items()]
    located += [(f"targets[{i}]", t, target_dim) for i, t in enumerate(leaves)]
    for name, t, dim in located:
        if dim is None:
            continue
        if not -t.dim() <= dim < t.dim():
            raise ValueError(
                f"{'input ' if not name.startswith('targets') else ''}{name!r} has {t.dim()} dims, so it has no batch "
                f"dim {dim}: a step splits it there into {chunks} chunks; pass per-sample values, or set batch_dim "
                f"(None for an input that is not per sample)"
            )
        rows[name] = int(t.shape[dim])
    if len(set(rows.values())) > 1:
        listed = ", ".join(f"{k}: {v}" for k, v in rows.items())
        raise ValueError(
            f"a step splits every tensor input and target along its batch dim, so all must have the batch's rows; "
            f"got {listed}: broadcast the odd ones to the batch (e.g. .expand), or mark an input that is not per "
            f"sample with batch_dim={{name: None}}"
        )
    batch = next(iter(rows.values()), 0)
    what = f"{microbatches} microbatches x data degree {data_degree}"
    if batch == 0:
        raise ValueError(f"the batch is empty (0 rows): a step needs at least {chunks} rows ({what})")
    if batch % chunks:
        lower, upper = batch // chunks * chunks, (batch // chunks + 1) * chunks
        fits = f"{lower} or {upper}" if lower else f"{upper}"
        raise ValueError(
            f"batch {batch} does not split into {chunks} equal chunks ({what}): pass a multiple of {chunks} "
            f"rows (e.g. {fits}), or compile with microbatches dividing the batch per replica"
        )
    return batch
