"""align: pad the rows of tensor-core GEMMs whose row lengths are not aligned, and slice the padding off the result.

A bf16 / fp16 GEMM whose reduction length K or output width N is not a multiple of 16 bytes runs 3.8-6.3x slower on
an H200 than an aligned one (cost.gemm_rows, DeviceSpec.gemm_efficiency): GPT-2's 50,257-token LM head is one.
Megatron pads the vocabulary by hand; this pass does it for any product of an activation and a parameter (a weight
GEMM: its rows are the parameter's, which no tensor-parallel, sequence or context rewrite of the activations changes)
that the plan names, without touching the model: per call, the weight gets zero rows (N) or zero columns (K)
appended, the input zero columns (K only), and the product's padded columns are sliced off and the rest copied
contiguous:

    y = x @ W^T + b          ->    y = (pad(x, K') @ pad(W, N' x K')^T + pad(b, N'))[..., :N].contiguous()

Exact in arithmetic (the padded products are zeros, the padded outputs are dropped; floating point may round the
kept outputs differently, as any change of GEMM kernel does), and the gradients of x, W and b are those of the
unpadded product (the pads' backward slices them). The cost: a copy of W (and of x when K is padded) per call, and
one of the result. `gemm_pads` chooses the nodes where the cost model prices the padded product, copies included,
below the unpadded one; `pad_gemms` rewrites them (apply.py, after the tensor-parallel rewrite, on nodes that rewrite
left whole: `applicable_pads`). Invariant: the rewritten graph computes what the original did, and every original
node keeps its name (the pads, the padded product and its slice are new nodes before it; the node itself becomes the
contiguous copy), so a plan's node -> stage map and recompute regions still name it.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from partitioner.cost import NodeCost, _roofline, gemm_row_step, gemm_rows, matmul_form
from partitioner.devices import DeviceSpec
from partitioner.plan.tensor_layout import REPLICATED

__all__ = ["applicable_pads", "gemm_pads", "pad_cost", "pad_gemms", "row_pads"]

_aten = torch.ops.aten
_FORMS = ("module", "linear", "matmul", "addmm")  # cost.matmul_form's forms this rewrite handles (not baddbmm)


def _kind(n: fx.Node, root: nn.Module | None = None) -> str | None:
    """`n`'s cost.matmul_form where this pass rewrites it, else None. A Linear module only of the class itself: a
    subclass may compute something else in its forward than F.linear of its weight and bias."""
    form = matmul_form(n, root)
    if form == "module":
        module = (root if root is not None else n.graph.owning_module).get_submodule(str(n.target))
        return form if type(module) is nn.Linear else None
    return form if form in _FORMS else None


def row_pads(n: fx.Node, spec: DeviceSpec) -> tuple[int, int] | None:
    """(pad of K, pad of N) in elements that align this node's rows on `spec`, or None (aligned, not a tensor-core
    GEMM, no penalty on the device, or a kind the rewrite does not handle)."""
    step = gemm_row_step(spec, n.meta.get("dtype", "float32"))
    if step == 1 or _kind(n) is None:
        return None
    rows = gemm_rows(n)
    first, second = _operands(n)
    operands = [_val(first), _val(second)]
    if rows is None or any(v is None or v.dim() < 2 for v in operands):  # a matrix-vector product: not handled
        return None
    if _kind(n) != "module" and not _from_parameter(second):
        return None  # two activations (attention's q k^T): their rows can be a sequence that a rewrite splits
    pads = (-rows[0] % step, -rows[1] % step)
    return pads if any(pads) else None


def pad_cost(n: fx.Node, pads: tuple[int, int], spec: DeviceSpec, training: bool = True) -> NodeCost:
    """The cost of `n` padded by `pads`: the aligned product at its padded FLOPs, plus the copies the padding makes,
    each a kernel (forward: the second operand, the first when K is padded, and the result's contiguous copy;
    backward: the padded output gradient written, the operands' gradients sliced). Its fixed part is every one of
    those kernels' launch."""
    k, n_out = gemm_rows(n) or (1, 1)
    grow = (k + pads[0]) * (n_out + pads[1]) / (k * n_out)
    m = n.meta
    first, second = _operands(n)
    weight_bytes = _bytes(second)
    in_bytes = _bytes(first) if pads[0] else 0.0
    rate = spec.bytes_per_second()
    launch = spec.kernel_overhead
    # the weight's pad, the input's (K padded), the product (its launch is in _roofline), the contiguous copy
    forward_kernels = 3 + bool(pads[0])
    forward = _roofline(m["flops"] * grow, m["mem_bytes"] * grow, m["dtype"], spec)
    forward += (2 * weight_bytes + 2 * in_bytes + 2 * m["out_bytes"]) / rate + (forward_kernels - 1) * launch
    forward_fixed = min(forward_kernels * launch, forward)
    if not (training and m.get("requires_grad", False)):
        return NodeCost(forward, 0.0, forward_fixed, 0.0)
    backward = _roofline(m["bwd_flops"] * grow, m.get("bwd_bytes", m["mem_bytes"]) * grow, m["dtype"], spec)
    backward += (2 * m["out_bytes"] * grow + 2 * weight_bytes + 2 * in_bytes) / rate + 2 * launch
    return NodeCost(forward, backward, forward_fixed, min(3 * launch, backward))


# Ops that hand a parameter on unchanged in its values (a transpose, a view, an expand across a batch): a product
# reading a parameter through them is a weight GEMM, whose row lengths are the parameter's own.
_PASS_THROUGH = ("t", "transpose", "permute", "view", "reshape", "expand", "contiguous", "to", "type", "unsqueeze")


def _from_parameter(x: Any) -> bool:
    """Whether `x` is a parameter or buffer (get_attr), possibly through transposes, views and expands."""
    while isinstance(x, fx.Node):
        if x.op == "get_attr":
            return True
        target = x.target._schema.name if isinstance(x.target, torch._ops.OpOverload) else x.target
        name = str(getattr(target, "__name__", target)).removeprefix("aten::")
        if x.op not in ("call_method", "call_function") or name not in _PASS_THROUGH or not x.args:
            return False
        x = x.args[0]
    return False


def _operands(n: fx.Node) -> tuple[Any, Any]:
    """(first operand, second operand) of a matrix-product node; the second of a Linear module is its weight."""
    kind = _kind(n)
    if kind == "module":
        return n.args[0], n.graph.owning_module.get_submodule(str(n.target)).weight
    if kind == "addmm":
        return n.args[1], n.args[2]
    return n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")


def _val(x: Any) -> torch.Tensor | None:
    val = x.meta.get("val") if isinstance(x, fx.Node) else x
    return val if isinstance(val, torch.Tensor) else None


def _bytes(x: Any) -> float:
    val = _val(x)
    return float(val.numel() * val.element_size()) if val is not None else 0.0


def gemm_pads(
    gm: fx.GraphModule, spec: DeviceSpec, costs: dict[str, NodeCost], training: bool = True
) -> dict[str, NodeCost]:
    """The matrix products of an annotated graph worth padding on `spec`: node name -> its padded cost (`pad_cost`),
    for those whose rows are misaligned and whose padded price is below their unpadded one in `costs`
    (cost.node_costs). The pads themselves: `row_pads`."""
    padded: dict[str, NodeCost] = {}
    for n in gm.graph.nodes:
        if n.name not in costs or "flops" not in n.meta or n.meta["flops"] <= 0:
            continue
        pads = row_pads(n, spec)
        if pads is None:
            continue
        cost, was = pad_cost(n, pads, spec, training), costs[n.name]
        if cost.forward + cost.backward < was.forward + was.backward:
            padded[n.name] = cost
    return padded


def applicable_pads(pads: dict[str, list[int]], gm: fx.GraphModule, layout: Any = None) -> dict[str, list[int]]:
    """The pads of `pads` that apply to the graph a tensor-parallel `layout` (plan.tensor_layout.TensorParallelPlan;
    None: tensor degree 1, all of them) runs: those of nodes it leaves whole, output replicated and every parameter
    read unsharded (a sharded product's rows are its rank's shard, which this pass does not pad)."""
    if layout is None:
        return dict(pads)
    by_name = {n.name: n for n in gm.graph.nodes}
    kept = {}
    for name, pad in pads.items():
        node = by_name.get(name)
        if node is None or layout.node_layout.get(name) != REPLICATED:
            continue
        params = list(node.meta.get("params", []))
        params += [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
        if all(layout.param_shard.get(p, {}).get("dim") is None for p in params):
            kept[name] = pad
    return kept


def pad_gemms(gm: fx.GraphModule, pads: dict[str, list[int]]) -> fx.GraphModule:
    """A new GraphModule (same parameters, same node names) computing what `gm` does with the named matrix products
    padded by [pad of K, pad of N] (module docstring). `gm` is left as it was. ValueError for a named node that is
    missing or not a matrix product this pass handles."""
    if not pads:
        return gm
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # an export graph's pytree calling convention, kept
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        new = graph.node_copy(n, lambda x: env[x])
        env[n] = new
    by_name = {n.name: n for n in graph.nodes}
    for name, (pad_k, pad_n) in pads.items():
        node = by_name.get(name)
        if node is None or _kind(node, gm) is None:
            raise ValueError(f"plan pads GEMM node {name!r}, which is not a matrix product of this graph")
        _rewrite(graph, gm, node, int(pad_k), int(pad_n))
    graph.lint()
    return fx.GraphModule(gm, graph)  # one code generation, after the rewrites


def _pad(graph: fx.Graph, x: Any, widths: list[int]) -> Any:
    """x padded with zeros at the end of its trailing dims: widths [last, second-last, ...] (F.pad's order, pairs)."""
    pairs: list[int] = []
    for w in widths:
        pairs += [0, w]
    return graph.call_function(_aten.constant_pad_nd.default, (x, pairs, 0.0))


def _rewrite(graph: fx.Graph, root: nn.Module, node: fx.Node, pad_k: int, pad_n: int) -> None:
    """`node` (of `graph`, its modules in `root`) becomes the contiguous copy of its padded product's slice; the pads,
    the product and the slice are new nodes before it."""
    kind = _kind(node, root)
    n_out = int(node.meta["val"].shape[-1])
    with graph.inserting_before(node):
        if kind == "module":
            module = root.get_submodule(str(node.target))
            x = node.args[0]
            weight = graph.get_attr(f"{node.target}.weight")
            bias = graph.get_attr(f"{node.target}.bias") if module.bias is not None else None
            for attr, tensor in ((weight, module.weight), (bias, module.bias)):
                if attr is not None:
                    attr.meta["val"] = tensor  # its shape, for the pads below
            kind, args = "linear", [x, weight, bias]
        elif kind == "linear":
            args = [*node.args, *([None] * (3 - len(node.args)))]
            args[2] = node.kwargs.get("bias", args[2])
        elif kind == "addmm":
            args = [node.args[1], node.args[2], node.args[0]]  # (a, b, bias)
        else:
            args = [node.args[0], node.args[1], None]
        a, b, bias = args
        if pad_k:
            a = _pad(graph, a, [pad_k])
            b = _pad(graph, b, [pad_k] if kind == "linear" else [0, pad_k])  # W (N, K) or b (.., K, N)
        if pad_n:
            b = _pad(graph, b, [0, pad_n] if kind == "linear" else [pad_n])
            bias_val = _val(bias)
            if bias_val is not None and bias_val.dim() > 0 and bias_val.shape[-1] == n_out:  # not a broadcast one
                bias = _pad(graph, bias, [pad_n])
        if kind == "linear":
            product = graph.call_function(_aten.linear.default, (a, b, bias))
        elif kind == "addmm":
            product = graph.call_function(_aten.addmm.default, (bias, a, b))
        else:
            product = graph.call_function(_aten.matmul.default, (a, b))
        kept = graph.call_function(_aten.slice.Tensor, (product, -1, 0, n_out))
    product.name, kept.name = f"{node.name}_padded", f"{node.name}_kept"
    for new in (product, kept):
        new.meta = {k: v for k, v in node.meta.items() if k in ("nn_module_stack", "stack_trace")}
    # A contiguous copy, not the strided view: a reader may view the result in a way only a contiguous tensor allows
    node.op, node.target = "call_function", _aten.clone.default
    node.args, node.kwargs = (kept,), {"memory_format": torch.contiguous_format}
