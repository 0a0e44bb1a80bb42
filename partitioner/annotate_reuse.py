"""annotate_reuse: a node whose call repeats an earlier node's exactly is annotated from that node's record.

A transformer repeats one block per layer: of gpt3-175b's 2,605 nodes (96 layers) 28 are run and 2,577 repeat an
earlier call, on meta tensors of the same shapes. Annotating every one costs a meta execution under FlopCounterMode
and autograd's saved-tensor hooks (about 0.6 ms a node, 1.8 s of gpt3-175b's compile); a repeat costs only making
its outputs.

Two calls are the same (`signature`) when they run the same target (the function, the method name, or for
`call_module` a torch.nn module of the same class with the same plain attributes and parameter / buffer shapes,
dtypes and requires_grad) on the same arguments: every tensor the same shape, stride, storage offset, storage size,
dtype and requires_grad, a parameter where the other's is one, and the same pattern of tensors sharing a storage;
every other argument equal in type and value. Anything else (an unhashable argument, a module outside torch.nn) has
no signature and is annotated in full. A call's outputs are taken to depend on its target and arguments alone, as
in the graphs capture makes (opaque module-level leaves, which may not be, are never reused).

What a call records (`Record`), and only when its outputs are fresh storages or views of its inputs and it wrote
nothing: its outputs as recipes (a view of input k: size, stride, offset; a fresh storage: its size, dtype and the
views of it), the figures that depend on the call alone (FLOPs, bytes, dtype, requires_grad), and what autograd saved
as (input k / output j / a storage of its own named `node#suffix`) with bytes, in the order it saved them. A repeat
makes its outputs from the recipes (meta tensors, nothing allocated) and names every storage as a full run would:
fresh outputs after the node, views after what they view, saved storages after their first saver
(partitioner.annotate), so every figure of node.meta equals a full run's (tests/test_annotate_reuse.py).
Measured on gpt3-175b (2,605 nodes, 2 cores): annotate 1.8 s in full, 0.3 s with reuse.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from partitioner.meta import storage_key

__all__ = ["Outputs", "Record", "outputs_of", "record", "signature"]

_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _plain(value: Any) -> bool:
    return isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(_plain(v) for v in value))


def _module_key(mod: torch.nn.Module) -> tuple | None:
    """What a torch.nn module's call depends on besides its arguments: its class, plain attributes (training, eps,
    p, batch_first, ...) and tensors' shapes; None for modules from elsewhere (their calls are never reused)."""
    if not type(mod).__module__.startswith("torch.nn."):
        return None
    attributes = tuple(sorted((k, type(v), v) for k, v in vars(mod).items() if not k.startswith("_") and _plain(v)))
    tensors = tuple(
        (name, tuple(t.shape), t.dtype, t.requires_grad)
        for name, t in [*mod.named_parameters(recurse=False), *mod.named_buffers(recurse=False)]
    )
    return (type(mod), attributes, tensors, tuple(type(m) for m in mod.children()))


def signature(n: fx.Node, root: torch.nn.Module, args: tuple, kwargs: dict, params: set[int]) -> tuple | None:
    """The key two calls share when one may be annotated from the other's record (module docstring), or None.
    `params`: storage keys of the parameters and buffers."""
    if n.op == "call_module":
        target: Any = _module_key(root.get_submodule(n.target))
        if target is None:
            return None
    elif n.op in ("call_function", "call_method"):
        target = n.target
    else:
        return None
    leaves, spec = pytree.tree_flatten((args, kwargs))
    groups: dict[int, int] = {}
    items: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key = storage_key(leaf)
            items.append((
                tuple(leaf.shape), leaf.stride(), leaf.storage_offset(), leaf.untyped_storage().nbytes(), leaf.dtype,
                leaf.requires_grad, key in params, groups.setdefault(key, len(groups)),
            ))  # fmt: skip
        elif _plain(leaf):
            items.append((type(leaf), leaf))
        else:
            return None
    key = (n.op, target, spec, tuple(items))
    try:
        hash(key)
    except TypeError:  # an unhashable target or value
        return None
    return key


@dataclass(frozen=True)
class Outputs:
    """How to make a call's output again (module docstring): `leaves`, each a non-tensor value, a view of input k
    (size, stride, offset) or a view of a fresh storage (its group, bytes, dtype, the view, requires_grad), rebuilt
    into `spec`."""

    spec: pytree.TreeSpec
    leaves: tuple[tuple, ...]

    def make(self, inputs: list[torch.Tensor]) -> Any:
        """The call's output for this call's `inputs`: views of them, and fresh meta storages, as recorded."""
        fresh: dict[int, torch.Tensor] = {}
        leaves = []
        for how in self.leaves:
            if how[0] == "value":
                leaves.append(how[1])
            elif how[0] == "input":
                _, k, size, stride, offset = how
                leaves.append(inputs[k].as_strided(size, stride, offset))
            else:
                _, group, nbytes, dtype, size, stride, offset, requires_grad = how
                if group not in fresh:
                    base = torch.empty(nbytes // dtype.itemsize, dtype=dtype, device="meta")
                    # Not a leaf, as a computed output is not: later in-place ops on a leaf that requires grad fail
                    fresh[group] = base.requires_grad_().clone() if requires_grad else base
                leaves.append(fresh[group].as_strided(size, stride, offset))
        return pytree.tree_unflatten(leaves, self.spec)


def outputs_of(inputs: list[torch.Tensor], result: Any, fresh: Callable[[int], bool]) -> Outputs | None:
    """The recipe of `result` from the call's tensor `inputs`, or None when it cannot be made from them alone (an
    output is a storage that existed before the call but is no input's: `fresh(storage key)` says it is new)."""
    in_keys = [storage_key(t) for t in inputs]
    leaves, spec = pytree.tree_flatten(result)
    recipes: list[tuple] = []
    groups: dict[int, tuple[int, bool]] = {}  # fresh storage key -> (group, requires_grad of its first view)
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor):
            if not _plain(leaf):
                return None
            recipes.append(("value", leaf))
            continue
        key = storage_key(leaf)
        view = (tuple(leaf.shape), leaf.stride(), leaf.storage_offset())
        if key in in_keys:
            k = in_keys.index(key)
            if leaf.requires_grad != inputs[k].requires_grad:
                return None
            recipes.append(("input", k, *view))
        elif fresh(key):
            storage = leaf.untyped_storage().nbytes()
            if storage % leaf.dtype.itemsize or (leaf.requires_grad and not leaf.dtype.is_floating_point):
                return None
            group, requires_grad = groups.setdefault(key, (len(groups), leaf.requires_grad))
            if requires_grad != leaf.requires_grad:
                return None
            recipes.append(("fresh", group, storage, leaf.dtype, *view, leaf.requires_grad))
        else:
            return None
    return Outputs(spec, tuple(recipes))


@dataclass(frozen=True)
class Record:
    """What annotate keeps of a call (module docstring): how to make its `outputs`, the figures of node.meta that
    depend on the call alone (`meta`), and what autograd saved, in order: ("input", k, bytes), ("output", j, bytes)
    or ("own", suffix, bytes)."""

    outputs: Outputs
    meta: dict[str, Any]
    saves: tuple[tuple[str, Any, int], ...]


def record(
    n: fx.Node,
    inputs: list[torch.Tensor],
    result: Any,
    packed: dict[int, tuple[str, int]],
    names: dict[int, str],
    meta: dict[str, Any],
) -> Record | None:
    """The Record of node n's call (its tensor `inputs`, `result`, what autograd saved: `packed`, storage key ->
    (name, bytes); `names`: storage key -> name, after the call: a storage the call made carries n's name), or None
    when it cannot be remade (outputs_of) or saved a storage that is neither an input, an output nor its own."""
    outputs = outputs_of(inputs, result, lambda key: names.get(key) == n.name)
    if outputs is None:
        return None
    in_keys = [storage_key(t) for t in inputs]
    out_keys = [storage_key(t) for t in pytree.tree_leaves(result) if isinstance(t, torch.Tensor)]
    saves = []
    for key, (name, nbytes) in packed.items():
        if key in in_keys:
            saves.append(("input", in_keys.index(key), nbytes))
        elif key in out_keys:
            saves.append(("output", out_keys.index(key), nbytes))
        elif name.startswith(f"{n.name}#"):
            saves.append(("own", name[len(n.name) + 1 :], nbytes))
        else:
            return None
    return Record(outputs, dict(meta), tuple(saves))
