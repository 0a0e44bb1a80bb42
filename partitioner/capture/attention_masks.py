"""capture.attention_masks: attention masks an export graph computes from sizes alone run as SDPA's own causal flag
(or as no mask) where they equal it.

HF transformers models build their causal mask inside forward (arange comparisons; in transformers 5 also a
packed-sequence test on the positions), so torch.export captures `scaled_dot_product_attention(q, k, v, mask)` with a
boolean (b, 1, T, T) mask. A GPU runs such a call with the memory-efficient kernel over every (query, key) pair: twice
a causal kernel's work at a lower rate, and the mask crosses every pipeline stage boundary. Where a mask

- reads no input's values, no parameter and no buffer (only sizes, `sym_size`, and constants) and nothing random,
- has the attention's query and key lengths as its last two dims (the same symbolic sizes, so at every shape),
- and, evaluated at the example's sizes (batch 1), lets through exactly the lower triangle (key j <= query i) or
  everything,

the attentions reading it run with `is_causal=True` (or without a mask), the mask's computation leaves the graph,
and one `partitioner::check_attention_mask` node keeps that exact at every other size: it holds the sizes the mask
was computed from, and at the first call with each distinct sizes it recomputes the mask from them on the CPU (the
function capture recorded, partitioner.checks.register_mask) and raises, naming the attention and the shape, if it is
not what the rewrite assumed (a sliding window the example's sequence fits in, say). Boolean masks and additive
float masks (0, and -inf or the dtype's minimum) are recognized.

Invariant: the rewritten graph computes what the captured one does at every shape it runs, or raises.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import sympy
import torch
import torch.fx as fx

from partitioner.checks import CHECK_ATTENTION_MASK, mask_kind, register_mask
from partitioner.plan.tensor_ops import _SDPA, key_in
from partitioner.plan.tensor_ops import node_arg as _arg
from partitioner.progress import logger

__all__ = ["use_causal_attention"]

_LIMIT = 1 << 28  # elements of a mask evaluated at plan time (batch 1): 256 Mi, a 16,384-token square


def use_causal_attention(gm: fx.GraphModule, example: dict[str, torch.Tensor]) -> dict[str, str]:
    """Rewrite the attentions of an export graph whose masks qualify (module docstring); `example`: placeholder name
    -> the example tensor (its sizes bind the graph's symbols; its values are never read). Returns attention node ->
    what it runs now ("causal" or "none"). Leaves the graph as it is where nothing qualifies."""
    sizes = _example_sizes(gm, example)
    by_mask: dict[fx.Node, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or not key_in(n, _SDPA):
            continue
        mask, causal = _arg(n, 3, "attn_mask"), _arg(n, 5, "is_causal", False)
        if isinstance(mask, fx.Node) and not causal and _lengths_match(n, mask):
            by_mask.setdefault(mask, []).append(n)
    done: dict[str, str] = {}
    for mask, attentions in by_mask.items():
        computed = _ancestors(mask)
        if not _from_sizes_alone(computed):
            continue
        mask_of_sizes, size_nodes = _mask_of_sizes(computed)
        kind = _evaluated_kind(mask_of_sizes, size_nodes, mask, sizes)
        if kind is None:
            continue
        where = f"{uuid.uuid4().hex}:{', '.join(a.name for a in attentions)}"
        register_mask(where, mask_of_sizes)
        with gm.graph.inserting_before(attentions[0]):
            check = gm.graph.call_function(CHECK_ATTENTION_MASK, (attentions[0].args[0], list(size_nodes), kind, where))
        check.meta["val"] = None
        for a in attentions:
            q, k, v = a.args[0], _arg(a, 1, "key"), _arg(a, 2, "value")
            kwargs = {"dropout_p": _arg(a, 4, "dropout_p", 0.0), "is_causal": kind == "causal"}
            for i, name in ((6, "scale"), (7, "enable_gqa")):
                if (value := _arg(a, i, name)) is not None:
                    kwargs[name] = value
            a.args, a.kwargs = (q, k, v), kwargs
            done[a.name] = kind
        _erase_unread(gm, computed)
    if done:
        gm.graph.lint()
        gm.recompile()
        kinds = sorted(set(done.values()))
        logger.info(
            "%d attention call(s) run %s: their masks are computed from sizes alone and were %s at the example's "
            "sizes (checked again at each new mask shape)", len(done), " / ".join(
                "is_causal=True" if k == "causal" else "unmasked" for k in kinds), " / ".join(kinds),
        )  # fmt: skip
    return done


def _shape(n: Any) -> tuple | None:
    val = n.meta.get("val") if isinstance(n, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same_size(a: Any, b: Any) -> bool:
    """Equal at every shape: equal ints, or SymInts of one symbolic expression."""
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return a.node.expr == b.node.expr
    return isinstance(a, int) and isinstance(b, int) and a == b


def _lengths_match(attention: fx.Node, mask: fx.Node) -> bool:
    """The mask's last two dims are the attention's query and key lengths, at every shape."""
    q, k, m = _shape(attention.args[0]), _shape(_arg(attention, 1, "key")), _shape(mask)
    if q is None or k is None or m is None or len(m) < 2:
        return False
    return _same_size(m[-2], q[-2]) and _same_size(m[-1], k[-2])


def _from_sizes_alone(computed: list[fx.Node]) -> bool:
    """Whether a mask's computation (`_ancestors`) reads sizes and constants alone: no placeholder's values, no
    attribute (parameter, buffer), no random op."""
    for n in computed:
        if n.op != "call_function":
            return False
        if isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags:
            return False
    return True


def _example_sizes(gm: fx.GraphModule, example: dict[str, torch.Tensor]) -> dict[sympy.Symbol, int]:
    """The graph's size symbols bound to the example's sizes, the batch (dim 0 of each input) to 1."""
    sizes: dict[sympy.Symbol, int] = {}
    for p in gm.graph.nodes:
        if p.op != "placeholder" or p.name not in example:
            continue
        shape = _shape(p)
        if shape is None:
            continue
        for d, (s, real) in enumerate(zip(shape, example[p.name].shape, strict=False)):
            if isinstance(s, torch.SymInt) and isinstance(s.node.expr, sympy.Symbol):
                sizes.setdefault(s.node.expr, 1 if d == 0 else int(real))
    return sizes


def _concrete(value: Any, sizes: dict[sympy.Symbol, int]) -> Any:
    """An example value with the graph's symbols bound (ints pass through); None where a symbol is unbound."""
    if isinstance(value, torch.SymInt):
        expr = value.node.expr
        expr = expr.xreplace(sizes) if isinstance(expr, sympy.Basic) else expr
        return int(expr) if isinstance(expr, int) or expr.is_number else None
    return value


def _ancestors(mask: fx.Node) -> list[fx.Node]:
    """`mask` and the nodes it is computed from, up to the size reads (`sym_size`, included; the tensors they read
    are not), in graph order: the mask last."""
    needed: set[fx.Node] = set()
    stack = [mask]
    while stack:
        n = stack.pop()
        if n not in needed:
            needed.add(n)
            if n.target is not torch.ops.aten.sym_size.int:
                stack.extend(n.all_input_nodes)
    return [n for n in mask.graph.nodes if n in needed]


def _mask_of_sizes(computed: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A mask (the last of its computation, `_ancestors`) as a function of the sizes it reads: a GraphModule whose
    inputs are the values of the returned size nodes (in graph order) and whose ops run on the CPU."""
    graph, env, size_nodes = fx.Graph(), {}, []
    for n in computed:
        if n.target is torch.ops.aten.sym_size.int:
            env[n] = graph.placeholder(f"size_{len(size_nodes)}")
            size_nodes.append(n)
            continue
        new = graph.node_copy(n, env.__getitem__)
        if "device" in new.kwargs:
            new.kwargs = {**new.kwargs, "device": torch.device("cpu")}
        env[n] = new
    graph.output(env[computed[-1]])
    return fx.GraphModule(torch.nn.Module(), graph, "MaskOfSizes"), size_nodes


def _erase_unread(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase the nodes (graph order) no node reads any more, last first, with export's dtype asserts on them: a
    rewritten mask's computation."""
    for n in reversed(nodes):
        for user in list(n.users):
            if user.target is torch.ops.aten._assert_tensor_metadata.default:
                gm.graph.erase_node(user)
        if not n.users and not n.is_impure():
            gm.graph.erase_node(n)


def _evaluated_kind(
    mask_of_sizes: fx.GraphModule, size_nodes: list[fx.Node], mask: fx.Node, sizes: dict[sympy.Symbol, int]
) -> str | None:
    """mask_kind of the mask computed on the CPU at the example's sizes (batch 1); None where it cannot be (a symbol
    without an example size, a mask above _LIMIT elements, an op that fails there)."""
    shape = [_concrete(s, sizes) for s in _shape(mask) or ()]
    values = [_concrete(n.meta.get("val"), sizes) for n in size_nodes]
    if any(s is None for s in shape + values) or math.prod(shape) > _LIMIT:
        return None
    try:
        value = mask_of_sizes(*values)  # fx's code drops each intermediate after its last reader
    except Exception:  # an op that does not run on the CPU at these sizes: leave the mask as it is
        return None
    return mask_kind(value) if isinstance(value, torch.Tensor) else None
