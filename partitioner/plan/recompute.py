"""plan.recompute: activation recomputation as a plan choice, priced in memory and time.

Three modes, chosen per pipeline stage by the planner (plan.pipeline) and run by the runtime with
torch.utils.checkpoint (partitioner.passes.recompute):

    "none"       every activation autograd saves is kept until its backward
    "selective"  the attention core of every layer is recomputed (Korthikanti et al. 2022, "Reducing Activation
                 Recomputation in Large Transformer Models"): the run of nodes from a layer's first to its last
                 FLOP-bearing node that reads no parameter (QK^T ... softmax, dropout ... attention x V, or one
                 fused SDPA call)
    "full"       every layer is recomputed: only each layer's inputs are kept (Megatron's full recompute with
                 one layer per checkpoint)
    "full:k"     the stage's first k whole layers are recomputed as under "full", the others keep everything
                 (Megatron's --recompute-method block --recompute-num-layers k): what a stage needing a little
                 less memory than "none" pays, instead of every layer. The search's choice, never a forced mode.

A *region* is a run of consecutive planned nodes checkpointed as one. Layers are found from module paths: the
nodes whose module path shares a prefix ending in a list index (`h.3`, `model.layers.3`, `encoder.layer.3`),
in consecutive runs; nodes outside every layer (embeddings, the head) are never recomputed.

What a region costs, for a storage saved for backward (annotate's `saves`: storage name -> bytes):
- kept: a storage is kept if a node outside every region saves it, or if a region needs it as an input (it was
  created outside the region and a region node reads it; torch.utils.checkpoint holds a region's inputs). It is
  counted once, on its first keeper in graph order (the per-node arrays below sum like annotate's saved_bytes).
- dropped: storages a region's nodes save that the region itself creates: recomputed in the backward.
- time: the forward of every region node runs again, in the backward of its microbatch.
- transient: while a region's backward runs, its dropped storages exist again for that one microbatch: a stage
  peaks at its kept activations of the microbatches in flight plus its largest region's dropped bytes.

Invariant: under "none" the kept bytes per node equal annotate's saved_bytes, so nothing changes for a plan that
recomputes nothing. The closed forms of Korthikanti et al. (per layer: sbh(34 + 5as/h) without recompute, 2sbh
kept with full recompute) hold for a layer written as Megatron writes it (tests/test_recompute_model.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch.fx as fx

__all__ = [
    "MODES",
    "ActivationModel",
    "RecomputeStructure",
    "ScaledSaves",
    "activation_model",
    "find_regions",
    "layer_path",
    "layers_recomputed",
    "module_path",
    "partial_mode",
    "saved_entries",
]

MODES = ("none", "selective", "full")  # in order of memory kept (most first) and time (least first)


def partial_mode(layers: int) -> str:
    """The mode recomputing a stage's first `layers` whole layers in full (module docstring)."""
    return f"full:{layers}"


def layers_recomputed(mode: str) -> int | None:
    """k of a "full:k" mode; None for the whole-stage modes. ValueError for anything else."""
    if mode in MODES:
        return None
    base, _, k = mode.partition(":")
    if base != "full" or not k.isdigit() or int(k) < 1:
        raise ValueError(f"recompute mode {mode!r}: one of {MODES}, or 'full:k' (the first k layers of a stage)")
    return int(k)


def layer_path(path: str) -> str | None:
    """The layer a module path belongs to: its prefix up to and including the first list index (`h.3.attn.q` ->
    `h.3`, `model.layers[3].mlp` -> `model.layers[3]`); None outside every list (`wte`, `lm_head`)."""
    parts = re.split(r"[.\[\]]+", path.strip(".[]"))
    for k, part in enumerate(parts):
        if part.isdigit() and k > 0:
            return ".".join(parts[: k + 1])
    return None


_EXPORT_NO_MODULE = "_empty_nn_module_stack_from_metadata_hook"


def module_path(node: fx.Node) -> str:
    """The innermost module a node runs in: its call_module target, else the last entry of its module stack (fx
    keys it by path; export by an id, with the path as the first element of the value)."""
    if node.op == "call_module":
        return str(node.target)
    # Export's metadata hook stands this key in for "no module" on the nodes it adds (torch._export.passes).
    stack = {k: v for k, v in (node.meta.get("nn_module_stack") or {}).items() if k != _EXPORT_NO_MODULE}
    if not stack:
        return ""
    key, value = next(reversed(stack.items()))
    path = value[0] if isinstance(value, tuple) and value and isinstance(value[0], str) else key
    return str(path)


def _runs(labels: Sequence[str | None]) -> list[tuple[int, int]]:
    """[a, b) ranges of consecutive equal, non-None labels."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            if labels[start] is not None:
                out.append((start, i))
            start = i
    return out


def find_regions(
    gm: fx.GraphModule, names: Sequence[str], params: Sequence[Sequence[str]], succs: Sequence[Sequence[int]]
) -> dict[str, list]:
    """mode -> the [a, b) ranges of planned-node indices it checkpoints ("none": no ranges).

    `names` are the planned nodes in graph order, `params[i]` the parameters node i reads and `succs[i]` its
    consumers (plan.graph). A layer's attention core is the range from its first to its last FLOP-bearing node
    that reads no parameter, widened backwards over the FLOP-free, parameter-free nodes that feed only it (views
    and copies of q, k, v, an empty output buffer): recomputing those is free, and keeping them would hold copies
    of what the projections' outputs already are. Layers without such a node get no selective region.
    """
    by_name = {n.name: n for n in gm.graph.nodes}
    labels = [layer_path(module_path(by_name[name])) if by_name[name].op != "placeholder" else None for name in names]
    layers = [(a, b) for a, b in _runs(labels) if b - a > 1]
    cores = []
    for a, b in layers:
        core = [i for i in range(a, b) if by_name[names[i]].meta.get("flops", 0) > 0 and not params[i]]
        if not core:
            continue
        lo, hi = core[0], core[-1] + 1
        while lo - 1 > a and not params[lo - 1] and not by_name[names[lo - 1]].meta.get("flops", 0):
            if not all(lo - 1 < j < hi for j in succs[lo - 1]):
                break
            lo -= 1
        cores.append((lo, hi))
    return {"none": [], "selective": cores, "full": layers}


@dataclass(frozen=True)
class ActivationModel:
    """Per planned node, under one mode (whole annotated batch, as the planning graph's arrays):

    kept[i]       activation bytes node i keeps for backward (each storage once, on its first keeper)
    recompute[i]  seconds of forward that node i runs again in the backward (0 outside regions)
    transient[i]  bytes the region holding node i regenerates during its backward (0 outside regions)
    """

    mode: str
    kept: np.ndarray
    recompute: np.ndarray
    transient: np.ndarray
    regions: tuple[tuple[int, int], ...]


def activation_model(
    mode: str,
    regions: Sequence[tuple[int, int]],
    saves: Sequence[dict[str, float]],
    created_by: dict[str, int],
    preds: Sequence[Sequence[int]],
    storages: Sequence[Sequence[str]],
    out_bytes: np.ndarray,
    forward: np.ndarray,
) -> ActivationModel:
    """The ActivationModel of `mode` with `regions` (module docstring for the rules).

    saves[i]: storage name -> bytes node i saves; created_by: storage name -> index of the node that created it
    (absent for parameters and for storages made outside the planned nodes); preds[i]: planned inputs of node i;
    storages[i]: the storages node i's output lives in; out_bytes[i]: its bytes (the size of a region input no
    node saves); forward[i]: node i's forward seconds.
    """
    return RecomputeStructure(saves, created_by, preds, storages).model(
        mode, regions, saved_entries(saves), out_bytes, forward
    )


def saved_entries(saves: Sequence[dict[str, float]]) -> np.ndarray:
    """The bytes of every (node, storage) entry of `saves`, flattened in node then insertion order: the numbers a
    RecomputeStructure built from saves with the same keys applies to."""
    if isinstance(saves, ScaledSaves):
        return saves.entries()
    return np.fromiter((b for node in saves for b in node.values()), dtype=np.float64)


class ScaledSaves(Sequence[dict[str, float]]):
    """`saves` (per node: storage name -> bytes) with every byte count divided by `divisor`, each node's dict made
    when read. What a data-parallel replica's planning graph saves (plan.search.scale_replicas): the search makes
    hundreds of such copies of a graph of thousands of nodes, and reads the bytes of almost none of them one by
    one; the numbers it does read (`saved_entries`) are the base's flattened entries / divisor, the same divisions
    as dividing dict by dict, so the figures are equal to the last bit. `entries`: the base's saved_entries, when
    the caller has them (cached on the graph they come from)."""

    def __init__(self, base: Sequence[dict[str, float]], divisor: float, entries: np.ndarray | None = None) -> None:
        self.base = list(base)  # a ScaledSaves base is read (divided) here: one division per value, as a dict copy
        self.divisor = divisor
        self._base_entries = entries

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):  # noqa: ANN001, ANN204 - Sequence's index or slice
        if isinstance(i, slice):
            return [{k: v / self.divisor for k, v in node.items()} for node in self.base[i]]
        return {k: v / self.divisor for k, v in self.base[i].items()}

    def entries(self) -> np.ndarray:
        """saved_entries of the scaled saves."""
        base = self._base_entries if self._base_entries is not None else saved_entries(self.base)
        return base / self.divisor


def _first_kept(sids: np.ndarray, keepers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(storage ids, keepers) of candidate keeps in walk order -> each storage once, in the order of its first
    candidate, with its earliest keeper: what a dict updated keep by keep (insert, or lower the keeper) holds."""
    if sids.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    order = np.argsort(sids, kind="stable")
    bounds = np.flatnonzero(np.diff(sids[order], prepend=-1))
    earliest = np.minimum.reduceat(keepers[order], bounds)
    by_first = np.argsort(order[bounds], kind="stable")  # a storage's first candidate: the first of its sorted run
    return sids[order[bounds]][by_first], earliest[by_first]


class _RegionLayout(NamedTuple):
    """RecomputeStructure's answer for one set of regions, in the order its walk adds the figures."""

    region_of: np.ndarray  # per node: its region's index, -1 outside every region
    keeper: np.ndarray  # per kept storage (first-kept order): the node holding it
    kept: np.ndarray  # ... and its storage id
    input_storage: np.ndarray  # region inputs no node saves: storage id
    input_node: np.ndarray  # ... and the node whose output sizes it
    drop_region: np.ndarray  # per dropped storage: the region recomputing it
    drop_entry: np.ndarray  # ... and the saved entry giving its bytes


class RecomputeStructure:
    """Which node keeps, and which region drops, each saved storage under a set of regions: everything of an
    ActivationModel but the numbers, which come from the saved bytes, output bytes and forward seconds.

    Scaled copies of a planning graph (plan.search.scale_graph: tensor / context / data parallelism) save the same
    storages in the same order with other bytes, so one structure per set of regions serves them all; the numbers
    are then a few vector operations (`model`) instead of a walk over every saved storage. The sums run in the order
    the walk adds them, so the figures are the walk's to the last bit.
    """

    def __init__(
        self,
        saves: Sequence[dict[str, float]],
        created_by: dict[str, int],
        preds: Sequence[Sequence[int]],
        storages: Sequence[Sequence[str]],
    ) -> None:
        self.n = len(saves)
        self._preds, self._storages = preds, storages
        self._sid: dict[str, int] = {}
        entry_node, entry_sid = [], []
        for i, node in enumerate(saves):
            for name in node:
                entry_node.append(i)
                entry_sid.append(self._sid.setdefault(name, len(self._sid)))
        self.saved_storages = len(self._sid)  # ids below this are saved by some node
        self.entry_node = np.array(entry_node, dtype=np.int64)
        self.entry_sid = np.array(entry_sid, dtype=np.int64)
        self._created_by = np.full(self.saved_storages, -1, dtype=np.int64)
        for name, sid in self._sid.items():
            self._created_by[sid] = created_by.get(name, -1)
        self._created_by_name = created_by
        self._cache: dict[tuple[tuple[int, int], ...], _RegionLayout] = {}
        # The entries grouped by storage id (every id below saved_storages has one): each storage's largest entry
        order = np.argsort(self.entry_sid, kind="stable")
        self._by_storage = (order, np.flatnonzero(np.diff(self.entry_sid[order], prepend=-1)))
        self._reads = self._input_reads()  # (after the saved ids: created-only storages get the next ones)

    @property
    def entries(self) -> int:
        return len(self.entry_node)

    def _largest_entry(self, entry_bytes: np.ndarray) -> np.ndarray:
        """Each saved storage's bytes: the largest of its entries (one per node saving it)."""
        order, starts = self._by_storage
        if order.size == 0:
            return np.zeros(self.saved_storages)
        return np.maximum.reduceat(np.asarray(entry_bytes, dtype=np.float64)[order], starts)

    def _layout(self, regions: tuple[tuple[int, int], ...]) -> _RegionLayout:
        """Who keeps and who drops what under `regions` (cached per set of regions).

        The walk it stands for, in its order: every node's saved entries (outside every region: the node keeps the
        storage; in a region, one the region does not create: the region's first node keeps it, as the checkpoint
        holds its inputs; one it creates: dropped, once per region), then every region node's inputs from outside
        the region (the storages of each, kept by the region's first node; one no node saves is sized by that
        input's output). A storage is kept by its earliest keeper and counted in the order the walk first keeps
        it; both walks are a few vector operations over the entries and the (node, input, storage) reads."""
        if regions in self._cache:
            return self._cache[regions]
        n = self.n
        region_of = np.full(n, -1, dtype=np.int64)
        for r, (a, b) in enumerate(regions):
            region_of[a:b] = r
        starts = np.array([a for a, _ in regions] + [0], dtype=np.int64)  # index -1: outside every region
        ends = np.array([b for _, b in regions] + [0], dtype=np.int64)
        # Entries: kept where outside, or made outside their region; dropped where their region makes them
        r_entry = region_of[self.entry_node]
        created = self._created_by[self.entry_sid]
        inside = r_entry >= 0
        made_here = inside & (starts[r_entry] <= created) & (created < ends[r_entry])
        keep1 = ~made_here
        keeper1 = np.where(inside, starts[r_entry], self.entry_node)[keep1]
        # Reads of region nodes from outside their region: each storage kept by the region's first node
        read_node, read_pred, read_sid = self._reads
        r_read = region_of[read_node]
        outside = (r_read >= 0) & ~((starts[r_read] <= read_pred) & (read_pred < ends[r_read]))
        sids = np.concatenate([self.entry_sid[keep1], read_sid[outside]])
        keepers = np.concatenate([keeper1, starts[r_read[outside]]])
        kept, keeper = _first_kept(sids, keepers)
        unsaved = read_sid[outside] >= self.saved_storages  # sized by the first input that outputs it
        input_storage, first = np.unique(read_sid[outside][unsaved], return_index=True)
        # Dropped: the first entry of each (region, storage) the region makes, in entry order
        drop = np.flatnonzero(made_here)
        key = r_entry[drop] * (len(self._sid) + 1) + self.entry_sid[drop]
        _, once = np.unique(key, return_index=True)
        drop = drop[np.sort(once)]
        layout = _RegionLayout(
            region_of=region_of,
            keeper=keeper,
            kept=kept,
            input_storage=input_storage,
            input_node=read_pred[outside][unsaved][first],
            drop_region=r_entry[drop],
            drop_entry=drop,
        )
        self._cache[regions] = layout
        return layout

    def _input_reads(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(node, input, storage id) of every storage each node's inputs live in, in node, input, storage order: the
        walk's second part. A storage no node saves but a node creates gets an id of its own here (ids from
        saved_storages up); one neither saved nor created (a parameter's, a model input's) is left out."""
        nodes, preds, sids = [], [], []
        for i in range(self.n):
            for p in self._preds[i]:
                for name in self._storages[p]:
                    sid = self._sid.get(name)
                    if sid is None:
                        if name not in self._created_by_name:
                            continue
                        sid = self._sid[name] = len(self._sid)
                    nodes.append(i)
                    preds.append(p)
                    sids.append(sid)
        return tuple(np.array(v, dtype=np.int64) for v in (nodes, preds, sids))

    def model(
        self,
        mode: str,
        regions: Sequence[tuple[int, int]],
        entry_bytes: np.ndarray,
        out_bytes: np.ndarray,
        forward: np.ndarray,
    ) -> ActivationModel:
        """The ActivationModel of `mode` with `regions`, for a graph whose saved bytes are `entry_bytes`
        (saved_entries of saves with this structure's keys), output bytes and forward seconds the given arrays."""
        if len(entry_bytes) != self.entries:
            raise ValueError(f"{len(entry_bytes)} saved entries for a structure of {self.entries}")
        regions = tuple((int(a), int(b)) for a, b in regions)
        lay = self._layout(regions)
        size = np.zeros(len(self._sid))
        size[: self.saved_storages] = self._largest_entry(entry_bytes)
        size[lay.input_storage] = out_bytes[lay.input_node]
        # np.bincount adds its weights in input order, as np.add.at does: the same sums, many times faster
        kept = np.bincount(lay.keeper, weights=size[lay.kept], minlength=self.n).astype(np.float64, copy=False)
        dropped = np.bincount(lay.drop_region, weights=entry_bytes[lay.drop_entry], minlength=len(regions))
        inside = lay.region_of >= 0
        recompute = np.where(inside, forward, 0.0)
        transient = np.where(inside, dropped[lay.region_of] if len(regions) else 0.0, 0.0)
        return ActivationModel(mode, kept, recompute, transient, regions)
