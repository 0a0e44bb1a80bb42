"""fuse_gated: run each gated activation `act(gate) * up` of a graph as `gated.gated_activation`, which saves only
gate and up for backward (partitioner.gated: one MLP width per token and layer fewer than the eager pair).

    s = silu(gate);  y = s * up          ->    y = gated_activation(gate, up, "silu", "none", True)

Invariants: the outputs and gradients are bit-identical to the unfused graph's (the same kernels forward, autograd's
own backward kernels); the product keeps its node name and meta, the activation node (used only by the product) is
removed; nothing else changes. It runs last in apply.py, on each stage's graph after the recompute regions are
outlined (a region's body is recomputed whole: nothing of it is saved), so plan names are all resolved by then.
annotate prices exactly the nodes `gated.gated_pair` matches on the captured graph; a pair that a stage boundary
separates is not fused here (the activation is a sent value), which the plan's cut costs make rare.
"""

from __future__ import annotations

import torch.fx as fx

from partitioner.gated import gated_activation, gated_pair

__all__ = ["fuse_gated_activations"]


def fuse_gated_activations(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule (same parameters, same node names but the fused activations') with every gated activation
    of `gm`'s graph (`gated.gated_pair`) run as `gated_activation`; `gm` itself when it has none. `gm` is left as
    it was."""
    pairs = [(n, pair) for n in gm.graph.nodes if (pair := gated_pair(n, gm)) is not None]
    if not pairs:
        return gm
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen  # an export graph's pytree calling convention, kept
    env: dict[fx.Node, fx.Node] = {}
    for n in gm.graph.nodes:
        env[n] = graph.node_copy(n, lambda x: env[x])
    for n, pair in pairs:
        mul, activation = env[n], env[pair.activation]
        up = env[pair.up] if isinstance(pair.up, fx.Node) else pair.up
        mul.target, mul.op = gated_activation, "call_function"
        mul.args, mul.kwargs = (env[pair.gate], up, pair.act, pair.approximate, pair.gate_first), {}
        graph.erase_node(activation)
    graph.lint()
    return fx.GraphModule(gm, graph)
