"""split: one fx.GraphModule per pipeline stage from a node -> stage map.

Preserves: running the stages in order, each fed the previous stage's outputs, returns exactly the
flat outputs of the input graph (the same nodes, in the same order, on the same parameters).

Interface of stage s (the pipeline contract):
- inputs: the values produced on a stage < s and consumed on a stage >= s, in topological order
  (stage 0: the model's placeholders);
- outputs: the values produced on a stage <= s and consumed on a stage > s, same order, so the
  outputs of stage s are the inputs of stage s+1 one for one: a value needed two stages later is
  forwarded through the stage between (pipeline stages only talk to their neighbours);
- the last stage returns the model's flat outputs.
In-place writes keep their order: an assignment that breaks one (plan.ordering) raises OrderViolation.
Each stage module holds only the parameters and submodules its own nodes use (`get_attr` is copied
into every stage that reads the attribute: a tied weight lives on each stage that uses it).
Example: a -> b -> c with stages [0, 1, 1] and c = a + b gives stage 0: (x) -> (a), stage 1: (a) -> (c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx

from partitioner.plan.ordering import mutation_order

__all__ = ["StageModule", "split_stages"]


@dataclass
class StageModule:
    index: int
    module: fx.GraphModule
    input_names: list[str]  # names of the values received, in order
    output_names: list[str]  # names of the values sent (last stage: the model's flat outputs)


def split_stages(gm: fx.GraphModule, stage_of: dict[str, int], num_stages: int) -> list[StageModule]:
    """Build the stage modules; `stage_of` maps every non-get_attr, non-output node name to a stage."""
    nodes = list(gm.graph.nodes)
    output = next(n for n in reversed(nodes) if n.op == "output")
    order = {n: i for i, n in enumerate(nodes)}
    planned = [n for n in nodes if n.op not in ("get_attr", "output")]
    missing = [n.name for n in planned if n.name not in stage_of]
    if missing:
        raise ValueError(f"nodes without a stage: {missing[:5]}{'...' if len(missing) > 5 else ''}")

    # Phase 1: producer stage and last consumer stage of every value.
    def consumer_stage(user: fx.Node) -> int:
        return num_stages - 1 if user.op == "output" else stage_of[user.name]

    produced = {n: stage_of[n.name] for n in planned}
    last_use = {}
    for n in planned:
        stages = [consumer_stage(u) for u in n.users if u.op != "get_attr"]
        last_use[n] = max(stages, default=produced[n])
        if stages and min(stages) < produced[n]:
            raise ValueError(f"node {n.name} on stage {produced[n]} is used by an earlier stage {min(stages)}")

    # In-place writes keep their order (plan.ordering); the planner guarantees it, a hand-edited plan may not.
    writes = mutation_order(planned)
    if writes:
        writes.check([produced[n] for n in planned], [last_use[n] for n in planned])

    def live_across(s: int) -> list[fx.Node]:
        """Values crossing boundary s | s+1, in topological order."""
        return sorted((n for n in planned if produced[n] <= s < last_use[n]), key=order.__getitem__)

    placeholders = [n for n in planned if n.op == "placeholder"]
    if any(produced[p] != 0 for p in placeholders):
        raise ValueError("model inputs must be placed on stage 0")

    # Phase 2: one graph per stage; get_attr nodes are re-created where read.
    stages = []
    incoming = placeholders
    for s in range(num_stages):
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for value in incoming:
            env[value] = graph.placeholder(value.name)
            env[value].meta = dict(value.meta)

        def lookup(x: fx.Node, graph: fx.Graph = graph, env: dict = env) -> fx.Node:
            if x not in env:
                if x.op != "get_attr":
                    raise ValueError(f"value {x.name} is not available on this stage")
                env[x] = graph.get_attr(x.target)
                env[x].meta = dict(x.meta)
            return env[x]

        for n in planned:
            if produced[n] != s or n.op == "placeholder":
                continue
            env[n] = graph.node_copy(n, lookup)
        outgoing = live_across(s) if s < num_stages - 1 else list(output.all_input_nodes)
        if s == num_stages - 1:
            flat = output.args[0]
            graph.output(tuple(lookup(x) for x in flat))
        else:
            graph.output(tuple(lookup(x) for x in outgoing))
        module = fx.GraphModule(gm, graph, class_name=f"Stage{s}")
        out_names = [x.name for x in (output.args[0] if s == num_stages - 1 else outgoing)]
        stages.append(StageModule(s, module, [v.name for v in incoming], out_names))
        incoming = outgoing
    return stages
