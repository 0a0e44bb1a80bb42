"""plan.context_cost: what a context-parallel layout costs one cp rank (compute, collectives, activation memory).

From a ContextLayout (plan.context) and the annotated graph, per node:

    compute     split nodes (their output, a reduction or a cross entropy over the rank's tokens): / cp;
                causal attention: the busiest rank's share of the causal work, 1 / cp with the balanced order,
                (2 cp - 1) / cp^2 with contiguous chunks (the last rank's queries see every key), at the whole
                sequence's causal rate; the runtime runs exactly that work (passes.context_parallel.CPAttention: one
                lower-right causal call per run of the rank's positions over its key prefix);
                nodes on replicated values (positions, masks, fallbacks that read a value whole): whole
    collectives each gathered value: an all-gather of its whole bytes forward and a reduce-scatter of its gradient
                backward ((cp - 1) / cp x bytes / bw each, comm.all_gather_time); each all-reduced reduction: a ring
                all-reduce of its bytes both ways. Over NVLink while tp x cp fits a node, else the inter-node links
    memory      a storage created by a split node: / cp, unless the value is read whole by a consumer that saves
                it (attention's k and v: each rank keeps every token's, as Llama 3's all-gather attention does;
                a matmul's own copy of its gathered operand adds that operand's bytes beyond its 1 / cp share);
                what crosses a stage boundary: / cp for split values
    parameters  replicated over the cp ranks; their gradients are summed over dp x cp (priced with data parallelism)

`scale_graph` (plan.search) applies a ContextParallelModel to a planning graph together with tp and dp.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.fx as fx
import torch.utils._pytree as pytree

from partitioner.comm import all_gather_time, all_reduce_time
from partitioner.devices import DeviceSpec
from partitioner.plan.context import ContextLayout

__all__ = ["ContextParallelModel", "context_parallel_model"]


@dataclass(frozen=True)
class ContextParallelModel:
    """What the search needs from a cp layout at one degree (module docstring). Seconds and bytes are per annotated
    batch, like the planning graph's."""

    cp: int
    node_scale: dict[str, float]  # node -> factor on its compute time
    # node -> [(kind, bytes)] of the collectives after it, each run forward and backward: "gather" (all-gather
    # forward, reduce-scatter backward) or "all_reduce"; bytes of the whole (unsharded by tp) value, per batch
    collectives: dict[str, list[tuple[str, float]]]
    split_values: set[str]  # nodes whose outputs hold the rank's tokens only (crossing and saved bytes / cp)
    whole_saves: set[str] = field(default_factory=set)  # storages a consumer saves gathered, whole
    # node -> bytes its saved copies of gathered operands hold beyond their split share (saved as "node#whole")
    extra_saves: dict[str, float] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)  # node -> why it reads a split value whole

    def comm_by_node(
        self, spec: DeviceSpec, *, tp: int = 1, sharded: frozenset[str] | set[str] = frozenset(), training: bool = True,
        latency: bool = False,
    ) -> dict[str, tuple[float, float]]:  # fmt: skip
        """node -> (forward, backward) seconds of its collectives on `spec`: a value tensor parallelism shards
        (`sharded`, at degree `tp`) moves 1/tp of its bytes; the cp group leaves the node once tp x cp exceeds it.
        `latency`: only what does not shrink with the batch (each collective's latency, paid per microbatch)."""
        internode = tp * self.cp > spec.devices_per_node
        out: dict[str, tuple[float, float]] = {}
        for name, calls in self.collectives.items():
            f = 0.0
            for kind, nbytes in calls:
                nbytes = 0.0 if latency else nbytes / (tp if name in sharded else 1)
                time = all_gather_time if kind == "gather" else all_reduce_time
                f += time(spec, nbytes, self.cp, internode=internode)
            out[name] = (f, f if training else 0.0)
        return out

    def divisor(self, storage: str) -> int:
        """What a storage (`node` or `node#k`) is divided by on one cp rank."""
        if storage in self.whole_saves:
            return 1
        return self.cp if storage.split("#")[0] in self.split_values else 1


def causal_share(cp: int, balance: bool) -> float:
    """The busiest rank's share of causal attention's work: 1/cp balanced; contiguous, the last chunk's queries
    attend to all cp chunks' keys: (2 cp - 1) / cp^2 of the T^2 / 2 total."""
    return 1.0 / cp if balance else (2 * cp - 1) / cp**2


def context_parallel_model(gm: fx.GraphModule, layout: ContextLayout) -> ContextParallelModel:
    """What `layout` costs one cp rank (module docstring); its collectives are timed by `comm_by_node` for a device
    and a tensor degree (tp ranks innermost, then cp: Megatron's placement)."""
    cp = layout.degree
    nodes = {n.name: n for n in gm.graph.nodes}
    split_values = {name for name, s in layout.split.items() if s is not None}
    scale: dict[str, float] = {}
    for name in split_values | set(layout.reduce) | layout.cross_entropy:
        scale[name] = 1.0 / cp
    for name, mode in layout.attention.items():
        scale[name] = causal_share(cp, layout.balance) if mode == "causal" else 1.0 / cp
    collectives: dict[str, list[tuple[str, float]]] = {}
    whole_saves: set[str] = set()
    extra: dict[str, float] = {}
    gathered = dict(layout.gather)
    for i in layout.outputs:  # the graph's split outputs are gathered whole: priced on the node they come from
        out = _output_node(gm, i)
        if out is not None:
            gathered.setdefault(out.name, [])
    for value in gathered:
        collectives.setdefault(value, []).append(("gather", float(nodes[value].meta.get("out_bytes", 0))))
    for value, consumers in (layout.whole_reads or layout.gather).items():  # what each consumer saves whole
        storages = nodes[value].meta.get("storages", [])
        for c in consumers:
            saves = nodes[c].meta.get("saves", {})
            if any(st in saves for st in storages):  # it saves the value itself (SDPA's k and v): whole
                whole_saves.update(storages)
            elif any(k.startswith(f"{c}#") for k in saves):  # a copy of its own (matmul's k^T): by the bytes
                extra[c] = extra.get(c, 0.0) + nodes[value].meta.get("out_bytes", 0) * (1 - 1 / cp)
                whole_saves.add(f"{c}#whole")
    for name in list(layout.reduce) + sorted(layout.cross_entropy):
        collectives.setdefault(name, []).append(("all_reduce", float(nodes[name].meta.get("out_bytes", 0))))
    return ContextParallelModel(cp, scale, collectives, split_values, whole_saves, extra, dict(layout.fallbacks))


def _output_node(gm: fx.GraphModule, index: int) -> fx.Node | None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    flat, _ = pytree.tree_flatten(out.args[0])
    value = flat[index] if index < len(flat) else None
    return value if isinstance(value, fx.Node) else None
