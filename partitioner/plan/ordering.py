"""Mutation order: which stage assignments keep every in-place write where the model has it.

The planning graph's data edges say which value a node reads, not when: `r = h.repeat(1, 16)` followed by
`h.mul_(2)` has no edge between the two, yet `repeat` must read h before the write. From what annotate
recorded per node (`node.meta["storages"]`, `["reads"]`, `["writes"]`: storages named after what first
held them), this pass derives two kinds of constraint, both over the planned nodes (every node but
get_attr and output, in graph order: the index space of plan.graph.PlanningGraph and passes.split):

1. Order edges `first -> then`: stage(first) <= stage(then). For every storage that is written, each access
   keeps its side of each write: a read before a write (write-after-read), a write before a later read
   (read-after-write, also through another view of the storage), and two writes (write-after-write).
   Stages run one after another and a stage runs its nodes in graph order, so with these edges every
   read sees the writes it sees in the model, in one process where stages share tensors.
   A parameter or buffer written in place lives on one device and persists across calls, so every node
   that reads it directly (not through a value another node computed) or writes it shares one stage:
   order edges both ways (`first` after `then` in graph order says "same stage" to a contiguous split).
2. One copy per writing stage (`SharedStorage`): a value crossing to another device arrives as a copy of
   its own. Where a stage writes a storage, at most one value aliasing that storage may arrive from
   earlier stages; two (a tensor and its view) would be two copies, and the write would reach only one.
   With one, every alias on the stage derives from it, and what the stage sends on carries its writes.
Worked example (issue #14): `h = A(x); r = h.repeat(1, 16); h.mul_(2); z = C(h + o)` gives the edges
repeat -> mul_ (write after read) and mul_ -> add (read after write), so `repeat` can no longer land on a
stage after `mul_`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.fx as fx

__all__ = ["MutationOrder", "OrderEdge", "OrderViolation", "SharedStorage", "mutation_order"]


class OrderViolation(ValueError):
    """A stage assignment breaks a mutation's order; the message names the two nodes and the fix."""


@dataclass(frozen=True)
class OrderEdge:
    first: int  # planned node that must be on the same or an earlier stage ...
    then: int  # ... than this one
    reason: str  # why, in words naming the storage and the nodes


@dataclass(frozen=True)
class SharedStorage:
    """A storage written in place by activations (not a parameter or buffer) and the values aliasing it."""

    storage: str
    values: tuple[int, ...]  # planned nodes whose output lives in the storage (views, in-place results)
    writers: tuple[int, ...]  # planned nodes that write it, in graph order


@dataclass(frozen=True)
class MutationOrder:
    names: list[str]  # planned nodes, graph order
    edges: list[OrderEdge] = field(default_factory=list)
    shared: list[SharedStorage] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.edges or self.shared)

    # -- checking an assignment -------------------------------------------------------------------------------------
    def violations(self, stage_of: Sequence[int], last_stage: Sequence[int]) -> list[str]:
        """Every broken constraint, in words. `last_stage[i]`: the latest stage reading planned node i."""
        out = []
        for e in self.edges:
            a, b = int(stage_of[e.first]), int(stage_of[e.then])
            if a > b:
                first, then = self.names[e.first], self.names[e.then]
                out.append(
                    f"node {then!r} is on stage {b} and node {first!r} on stage {a}, but {e.reason}: "
                    f"put {first!r} on stage {b} or earlier, or {then!r} on stage {a} or later"
                )
        for sh in self.shared:
            for t in sorted({int(stage_of[w]) for w in sh.writers}):
                arriving = [v for v in sh.values if stage_of[v] < t <= last_stage[v]]
                if len(arriving) > 1:
                    writer = next(self.names[w] for w in sh.writers if stage_of[w] == t)
                    a, b = (self.names[v] for v in arriving[:2])
                    out.append(
                        f"nodes {a!r} and {b!r} alias one storage (the output of {sh.storage!r}) and both reach "
                        f"stage {t}, where "
                        f"{writer!r} writes it in place: on another device they arrive as two copies and the write "
                        f"reaches only one; put {b!r} on stage {t} (or compute both on stage {t})"
                    )
        return out

    def check(self, stage_of: Sequence[int], last_stage: Sequence[int]) -> None:
        """Raise OrderViolation naming the first broken constraint (see violations)."""
        broken = self.violations(stage_of, last_stage)
        if broken:
            more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
            raise OrderViolation(f"the plan breaks the order of an in-place write: {broken[0]}{more}")

    # -- what a contiguous split of the graph order may do ----------------------------------------------------------
    def allowed_cuts(self) -> np.ndarray:
        """allowed[b]: a stage boundary may sit between positions b-1 and b (b in [0, n]).

        An edge whose `first` comes after `then` in graph order pins both to one stage: no boundary between.
        """
        n = len(self.names)
        blocked = np.zeros(n + 2, dtype=np.int64)
        for e in self.edges:
            if e.first > e.then:
                blocked[e.then + 1] += 1
                blocked[e.first + 1] -= 1
        return np.cumsum(blocked)[: n + 1] == 0

    def segment_limits(self, last_use: Sequence[int]) -> np.ndarray:
        """limit[a]: a stage starting at position a must end at or before it (exclusive end), for constraint 2.

        `last_use[v]`: position of v's last consumer (n for the model output). Where two values of a written
        storage cross the cut at a, the stage starting there must end before the storage's next writer.
        """
        n = len(self.names)
        limit = np.full(n + 1, n, dtype=np.int64)
        for sh in self.shared:
            crossing = np.zeros(n + 2, dtype=np.int64)
            for v in sh.values:
                if last_use[v] > v:
                    crossing[v + 1] += 1
                    crossing[last_use[v] + 1] -= 1
            cuts = np.flatnonzero(np.cumsum(crossing)[: n + 1] > 1)
            writers = np.asarray(sh.writers, dtype=np.int64)
            nxt = np.searchsorted(writers, cuts, side="left")
            has = nxt < len(writers)
            np.minimum.at(limit, cuts[has], writers[nxt[has]])
        return limit

    def reasons_between(self, lo: int, hi: int) -> list[str]:
        """Reasons of the edges that keep positions lo..hi on one stage (for error messages)."""
        return [e.reason for e in self.edges if e.first > e.then and e.then < hi and e.first >= lo]


def mutation_order(planned: Sequence[fx.Node]) -> MutationOrder:
    """The constraints of the module docstring for the planned nodes of an annotated graph (graph order).

    Nodes without annotate's "reads"/"writes" (inserted after annotation) are taken to touch no storage.
    """
    names = [n.name for n in planned]
    written = {s for n in planned for s in n.meta.get("writes", ())}
    accesses: dict[str, list[int]] = {s: [] for s in written}  # nodes reading or writing it, graph order
    values: dict[str, list[int]] = {s: [] for s in written}  # nodes whose output lives in it
    for i, n in enumerate(planned):
        for s in written.intersection(n.meta.get("reads", ())).union(written.intersection(n.meta.get("writes", ()))):
            accesses[s].append(i)
        for s in written.intersection(n.meta.get("storages", ())):
            values[s].append(i)

    edges: list[OrderEdge] = []
    seen: set[tuple[int, int]] = set()

    def add(first: int, then: int, reason: str) -> None:
        if first == then or (first, then) in seen:
            return
        if first < then and planned[first] in planned[then].all_input_nodes:
            return  # a data edge says it already
        seen.add((first, then))
        edges.append(OrderEdge(first, then, reason))

    node_names = set(names)

    def label(storage: str) -> str:
        return f"the output of {storage!r}" if storage in node_names else f"{storage!r}"

    shared: list[SharedStorage] = []
    for storage in sorted(written, key=lambda s: (accesses[s][0], s)):  # by name on ties: the same reasons every run
        what = label(storage)
        writers = [i for i in accesses[storage] if storage in planned[i].meta.get("writes", ())]
        writes = set(writers)
        last_write: int | None = None
        reads_since: list[int] = []
        for i in accesses[storage]:
            if i in writes:
                for r in reads_since:
                    add(r, i, f"{names[r]!r} reads {what} before {names[i]!r} writes it in place")
                if last_write is not None:
                    add(last_write, i, f"{names[last_write]!r} and {names[i]!r} write {what} in place, in this order")
                last_write, reads_since = i, []
            else:
                if last_write is not None:
                    add(last_write, i, f"{names[i]!r} reads {what} after {names[last_write]!r} writes it in place")
                reads_since.append(i)
        if storage in node_names:  # an activation or input, named after the node that made it
            shared.append(SharedStorage(storage, tuple(values[storage]), tuple(writers)))
            continue
        # A parameter or buffer: persistent, on one device.
        home = sorted({i for i in accesses[storage] if _reads_directly(planned[i], storage)} | set(writers))
        why = (
            f"{storage!r} is a parameter or buffer written in place (by {names[writers[-1]]!r}): it lives on one "
            f"device, so every node that reads it directly or writes it shares a stage"
        )
        for a, b in zip(home, home[1:]):
            add(a, b, why)
        if len(home) > 1:
            add(home[-1], home[0], why)
    return MutationOrder(names, edges, shared)


def _reads_directly(node: fx.Node, storage: str) -> bool:
    """The node reads `storage` through get_attr or its module's state, not through a value another node made."""
    if storage not in node.meta.get("reads", ()):
        return False
    return not any(storage in a.meta.get("storages", ()) for a in node.all_input_nodes if a.op != "get_attr")
