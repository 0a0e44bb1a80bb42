"""The planning graph: an annotated fx graph reduced to arrays the planners work on, and the one
evaluator of a stage assignment that every planner, test and report uses.

Planned nodes are every node except `get_attr` (a parameter goes wherever its readers are) and the
output node (a virtual consumer at position n, always on the last stage). Placeholders come first
and are pinned to stage 0: in a pipeline only the first stage receives the model's inputs.

Every node's time has a part that shrinks with the batch and a fixed part paid per call (kernel launches,
`forward_fixed` / `backward_fixed`; the collectives' latencies a tensor-parallel rewrite adds): at m microbatches a
node costs forward + (m - 1) x forward_fixed per step (`forward_at`), and dividing the batch or the weights over
ranks (plan.search.scale_graph) divides the first part only.

Stage time model (per training step, all microbatches together), with
comm(s) = comm(bytes sent forward by s) + comm(gradient bytes sent back by s):
    time(s) = max(forward(s) + backward(s), comm(s))    where transfers overlap compute (DeviceSpec.overlaps_comm)
    time(s) = forward(s) + backward(s) + comm(s)         where they do not (gloo on CPUs)
On GPUs torch.distributed.pipelining posts transfers with batch_isend_irecv and NCCL runs them on its own
stream, so in steady state a stage is limited by the slower of its compute and its link; the latency
transfers add to the critical path is charged by the simulator (partitioner.simulate), which replays the
schedule with per-microbatch send times. On a CPU the sending process spends its own cores on each copy,
so sends add to the stage's time, and the simulator holds the sender for each send (blocking_sends).
A value crosses boundary s|s+1 when it is produced at a stage <= s and consumed at a stage > s
(values forwarded through intermediate stages cross every boundary they pass; a value consumed by
several later nodes crosses once per boundary). Each crossing value is its own message per microbatch
(torch.distributed.pipelining posts one isend per tensor), so comm(bytes, k values) over m microbatches is
m x k x latency + bytes / bandwidth. Backward sends carry the same bytes and messages as forward sends.
Memory(s) = static bytes of the parameters the stage reads (weights, grads, Adam state) +
saved activations per microbatch x microbatches in flight at stage s (given by the schedule), as kept under the
stage's activation recomputation (plan.recompute), + the largest recomputed region's activations during its backward.
Training also computes a loss on what the model returns, outside the captured graph: the nodes whose values are
returned pay what torch's cross-entropy over logits moves, at a softmax's streaming rate: log_softmax reads them
and writes the log-probabilities (2 passes forward); nll_loss's backward writes a dense gradient and log_softmax's
backward reads it and the log-probabilities and writes the logits' gradient (4 passes backward).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch.fx as fx

from partitioner.comm import all_reduce_time, p2p_time, p2p_times
from partitioner.cost import NodeCost
from partitioner.devices import DeviceSpec
from partitioner.plan.ordering import MutationOrder, mutation_order
from partitioner.plan.recompute import (
    MODES,
    ActivationModel,
    RecomputeStructure,
    find_regions,
    layers_recomputed,
    saved_entries,
)
from partitioner.simulate import SimResult, StageCost, simulate

__all__ = [
    "PlanningGraph",
    "StageMetrics",
    "build_planning_graph",
    "evaluate",
    "price",
    "stage_time",
    "static_bytes_per_param",
    "tied_sync_time",
    "to_stage_costs",
]


def _range_stages(stage_of: np.ndarray, ranges: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The lowest and highest stage of each non-empty [a, b) range (ranges sorted and disjoint)."""
    if not len(ranges):
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    bounds = np.array(ranges, dtype=np.int64).reshape(-1)  # a0 b0 a1 b1 ...: reduceat's even slices are the ranges
    padded = np.append(stage_of, 0)  # reduceat needs every index inside the array (a range may end at n)
    return np.minimum.reduceat(padded, bounds)[::2], np.maximum.reduceat(padded, bounds)[::2]


def static_bytes_per_param(
    numel: int, element_size: int, *, training: bool, is_buffer: bool = False, master_weights: bool = False
) -> int:
    """Bytes a parameter holds on its device for the whole step.

    Training with Adam: weights + grads in the parameter dtype and two moments. The moments are in the parameter's
    dtype, as torch's optimizers keep them over the model's own parameters (8 bytes per bf16 parameter), unless
    `master_weights`: then they are fp32 and a 16-bit parameter has an fp32 master copy too (Megatron's and
    DeepSpeed's mixed-precision optimizers, Rajbhandari et al.'s accounting: 16 bytes per parameter). An fp32
    parameter holds 16 bytes either way.
    """
    if not training or is_buffer:
        return numel * element_size
    moment = 4 if master_weights else element_size
    master = 4 * numel if master_weights and element_size < 4 else 0
    return 2 * numel * element_size + 2 * moment * numel + master


@dataclass
class PlanningGraph:
    """An annotated graph as arrays (module docstring). Its structure (names, succs, preds, params, the keys of saves,
    storages, regions) is fixed once built: `edges`, `param_reads` and the recompute structure are cached from it, and
    scaled copies (plan.search.scale_graph) share the last. Numbers differ between copies, never structure."""

    names: list[str]  # planned nodes, topological order
    forward: np.ndarray  # seconds per node (whole batch, one call: its fixed part once)
    backward: np.ndarray
    out_bytes: np.ndarray  # bytes of each node's output
    saved_bytes: np.ndarray  # activation bytes kept for backward (whole batch)
    is_tensor: np.ndarray  # bool: the output holds a tensor (non-tensors cannot be sent between ranks)
    succs: list[list[int]]  # consumers among planned nodes; index n = the model output
    preds: list[list[int]]
    params: list[list[str]]  # parameter/buffer names each node reads (through get_attr or its module)
    param_static: dict[str, int]  # name -> static bytes on the device (see static_bytes_per_param)
    param_bytes: dict[str, int]  # name -> bytes of the tensor itself
    tied: dict[str, list[str]]  # canonical name -> all names of one tied tensor
    num_inputs: int  # placeholders, pinned to stage 0
    spec: DeviceSpec
    training: bool
    alias_of: dict[str, str] = field(default_factory=dict)  # tied name -> canonical name
    order: MutationOrder | None = None  # constraints of in-place writes (plan.ordering); None: no writes
    # Activation recomputation (plan.recompute): what each node saves (storage name -> bytes, whole batch), the
    # storages each node's output lives in, and the regions each mode checkpoints ([a, b) node ranges).
    saves: Sequence[dict[str, float]] = field(default_factory=list)  # a list, or plan.recompute.ScaledSaves
    storages: list[list[str]] = field(default_factory=list)
    regions: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    trainable: frozenset[str] = frozenset()  # canonical names of the parameters that get a gradient
    param_element_size: int = 4  # bytes per element of the trainable parameters (the largest share's dtype)
    master_weights: bool = False  # the optimizer keeps fp32 moments and masters (static_bytes_per_param)
    # Adjacent pipeline stages sit on different nodes (set by plan.search.scale_graph from the degrees: Megatron's
    # placement puts tp, then dp inside a node, so a pipeline of tp x dp x pp > devices_per_node ranks crosses
    # nodes, and its slowest boundary paces every microbatch).
    p2p_internode: bool = False
    # What reads compute and activations only, not the training state: mode / regions -> activation model,
    # plan.pipeline's chain floors, plan.recompute_bound's items. plan.search.scale_replicas hands one dict to all its
    # copies at one dp (they differ in training state only; `_replica_caches` of their source holds it)
    _activation_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _replica_caches: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # dp -> that dict
    # Which node keeps each saved storage per set of regions (plan.recompute.RecomputeStructure): shared by the scaled
    # copies dataclasses.replace makes (same storages, other bytes); one that changes `saves`' keys passes None.
    _recompute_structure: RecomputeStructure | None = field(default=None, repr=False, compare=False)
    # plan.pipeline's segment prefix sums, by (microbatches, recompute modes, cut set): every plan of a search over one
    # scaled graph shares them
    _prefixes: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    # What is derived from the structure alone (edges, parameter reads): one dict, which dataclasses.replace hands on
    # to every scaled copy (an init field), so a search over hundreds of copies derives it once.
    _structure: dict = field(default_factory=dict, repr=False, compare=False)
    # The part of forward / backward each node pays per call whatever its batch (module docstring); None: nothing.
    forward_fixed: np.ndarray | None = None
    backward_fixed: np.ndarray | None = None
    # Seconds every rank spends once per step after its last backward on collectives outside the schedule (tensor
    # parallelism's step-phase gradient sums: plan.tensor_cost.TPCost.step_sync); plan.price adds it to each tail.
    step_sync: float = 0.0

    def __post_init__(self) -> None:
        if self.forward_fixed is None:
            self.forward_fixed = np.zeros(len(self.names))
        if self.backward_fixed is None:
            self.backward_fixed = np.zeros(len(self.names))

    @cached_property
    def n(self) -> int:
        return len(self.names)

    def forward_at(self, microbatches: int) -> np.ndarray:
        """Each node's forward seconds per step when the batch runs as `microbatches` calls (fixed part each)."""
        return self.forward + (microbatches - 1) * self.forward_fixed if microbatches > 1 else self.forward

    def backward_at(self, microbatches: int) -> np.ndarray:
        """backward as forward_at."""
        return self.backward + (microbatches - 1) * self.backward_fixed if microbatches > 1 else self.backward

    def compute_at(self, microbatches: int) -> np.ndarray:
        return self.forward_at(microbatches) + self.backward_at(microbatches)

    def recompute_at(self, model: ActivationModel, microbatches: int) -> np.ndarray:
        """`model`'s recomputed forward seconds per step at `microbatches` calls (each rerun pays its fixed part)."""
        if microbatches <= 1:
            return model.recompute
        return model.recompute + (microbatches - 1) * np.where(model.recompute > 0, self.forward_fixed, 0.0)

    def without_fixed(self) -> tuple[np.ndarray, np.ndarray]:
        """(forward, backward) less their fixed parts: what dividing the batch or the weights divides."""
        return self.forward - self.forward_fixed, self.backward - self.backward_fixed

    @cached_property
    def trainable_bytes(self) -> float:
        """Bytes of every trainable parameter (each tied tensor once)."""
        return float(sum(self.param_bytes[p] for p in self.trainable))

    @cached_property
    def largest_layer_bytes(self) -> float:
        """Bytes of the trainable parameters of the largest layer (plan.recompute's layers; the whole graph when it
        has none): what FSDP gathers at once."""
        largest = 0.0
        for a, b in self.regions.get("full") or [(0, self.n)]:
            layer = {p for ps in self.params[a:b] for p in ps if p in self.trainable}
            largest = max(largest, float(sum(self.param_bytes[p] for p in layer)))
        return largest

    def recompute_modes(self) -> tuple[str, ...]:
        """The recompute modes this graph offers ("none" always; others where it has regions for them)."""
        return ("none",) + tuple(m for m in MODES[1:] if self.regions.get(m))

    def activations(self, mode: str) -> ActivationModel:
        """Kept bytes, recomputed seconds and transient bytes per node under recompute `mode` (plan.recompute; a
        "full:k" mode is per stage: `stage_activations`)."""
        if mode not in self._activation_cache:
            if mode not in MODES:
                raise ValueError(f"recompute={mode!r}: choose one of {MODES}")
            self._activation_cache[mode] = self._model(mode, tuple(self.regions.get(mode, ())))
        return self._activation_cache[mode]

    def stage_regions(self, stage_of: np.ndarray, stage: int, mode: str) -> tuple[tuple[int, int], ...]:
        """The [a, b) regions stage `stage` checkpoints under `mode`: every region of the mode touching the stage
        (each stage recomputes its part of a layer a boundary cuts), or for "full:k" its first k whole layers."""
        k = layers_recomputed(mode)
        if k is None:
            return tuple((a, b) for a, b in self.regions.get(mode, ()) if (stage_of[a:b] == stage).any())
        layers = self.regions.get("full", ())
        lowest, highest = _range_stages(np.asarray(stage_of), layers)
        whole = [layers[r] for r in np.flatnonzero((lowest == stage) & (highest == stage))]
        if len(whole) < k:
            raise ValueError(f"recompute {mode!r}: stage {stage} holds only {len(whole)} whole layers")
        return tuple(whole[:k])

    def stage_activations(self, stage_of: np.ndarray, stage: int, mode: str) -> ActivationModel:
        """The ActivationModel to read stage `stage`'s nodes from under `mode` (a per-stage one for "full:k")."""
        if layers_recomputed(mode) is None:
            return self.activations(mode)
        regions = self.stage_regions(stage_of, stage, mode)
        if regions not in self._activation_cache:
            self._activation_cache[regions] = self._model("full", regions)
        return self._activation_cache[regions]

    def recompute_structure(self) -> RecomputeStructure:
        """The structure of this graph's saved storages (made once; scaled copies made after share it)."""
        if self._recompute_structure is None:
            index = {name: i for i, name in enumerate(self.names)}
            stored = {name for node in self.saves for name in node} | {n for ss in self.storages for n in ss}
            # A storage is named after the node that created it (`node#k` for one it saved but did not return).
            created_by = {name: index[name.split("#")[0]] for name in stored if name.split("#")[0] in index}
            self._recompute_structure = RecomputeStructure(self.saves, created_by, self.preds, self.storages)
        return self._recompute_structure

    @cached_property
    def _saved_entries(self) -> np.ndarray:
        return saved_entries(self.saves)

    def _model(self, mode: str, regions: tuple[tuple[int, int], ...]) -> ActivationModel:
        if mode == "none" or not regions:
            zeros = np.zeros(self.n)
            return ActivationModel(mode, self.saved_bytes, zeros, zeros, ())
        structure = self.recompute_structure()
        return structure.model(mode, regions, self._saved_entries, self.out_bytes, self.forward)

    @property
    def compute(self) -> np.ndarray:
        return self.forward + self.backward

    @property
    def edges(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(producer, consumer) index arrays of every edge between planned nodes, in node then `succs` order, and the
        nodes the model returns (a consumer at index n)."""
        if "edges" not in self._structure:
            n = self.n
            src = [i for i, ss in enumerate(self.succs) for j in ss if j < n]
            dst = [j for ss in self.succs for j in ss if j < n]
            returned = [i for i, ss in enumerate(self.succs) if n in ss]
            self._structure["edges"] = tuple(np.array(v, dtype=np.int64) for v in (src, dst, returned))
        return self._structure["edges"]

    @property
    def param_reads(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(node, parameter id) index arrays of every parameter read, and the parameter names the ids index."""
        if "param_reads" not in self._structure:
            ids: dict[str, int] = {}
            nodes = [i for i, ps in enumerate(self.params) for _ in ps]
            pids = [ids.setdefault(p, len(ids)) for ps in self.params for p in ps]
            self._structure["param_reads"] = (
                np.array(nodes, dtype=np.int64), np.array(pids, dtype=np.int64), list(ids)
            )  # fmt: skip
        return self._structure["param_reads"]

    @property
    def tied_reads(self) -> dict[str, np.ndarray]:
        """The nodes reading each tied tensor (its canonical name in `tied`; none for one no node reads)."""
        if "tied reads" not in self._structure:
            nodes, pids, names = self.param_reads
            index = {name: k for k, name in enumerate(names)}
            self._structure["tied reads"] = {
                canonical: nodes[pids == index[canonical]] if canonical in index else nodes[:0]
                for canonical in self.tied
            }  # fmt: skip
        return self._structure["tied reads"]

    def param_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The static bytes and the tensor bytes of every parameter, indexed by the ids of `param_reads` (cached: a
        scaled copy holds its own training state)."""
        if "param arrays" not in self._prefixes:
            names = self.param_reads[2]
            self._prefixes["param arrays"] = (
                np.array([self.param_static[p] for p in names], dtype=np.float64),
                np.array([self.param_bytes[p] for p in names], dtype=np.float64),
            )  # fmt: skip
        return self._prefixes["param arrays"]

    def stage_param_sums(self, stage_of: np.ndarray, num_stages: int) -> tuple[np.ndarray, np.ndarray]:
        """Per stage, the static bytes and the tensor bytes of the parameters its nodes read (each once per stage)."""
        nodes, pids, names = self.param_reads
        if not len(names):
            return np.zeros(num_stages), np.zeros(num_stages)
        held = np.unique(stage_of[nodes] * len(names) + pids)
        stage, pid = held // len(names), held % len(names)
        static, tensor = self.param_arrays()
        return (
            np.bincount(stage, weights=static[pid], minlength=num_stages),
            np.bincount(stage, weights=tensor[pid], minlength=num_stages),
        )

    def last_use(self) -> np.ndarray:
        """Index of each node's last consumer (n for the model output; the node itself if unused)."""
        src, dst, returned = self.edges
        last = np.arange(self.n, dtype=np.int64)
        np.maximum.at(last, src, dst)
        last[returned] = self.n
        return last

    def comm_times(self, nbytes: np.ndarray, microbatches: int, messages: np.ndarray) -> np.ndarray:
        """comm_time for arrays of (nbytes, messages) at once (comm.p2p_times)."""
        nbytes, messages = np.asarray(nbytes, dtype=np.float64), np.asarray(messages, dtype=np.float64)
        times = p2p_times(self.spec, nbytes, microbatches * np.maximum(messages, 1), internode=self.p2p_internode)
        return np.where((messages <= 0) & (nbytes <= 0), 0.0, times)

    def comm_time(self, nbytes: float, microbatches: int, messages: float = 1) -> float:
        """One direction of one boundary for a whole step: `messages` values per microbatch, nbytes in all."""
        if messages <= 0 and nbytes <= 0:
            return 0.0
        return p2p_time(self.spec, nbytes, microbatches * max(messages, 1), internode=self.p2p_internode)


def build_planning_graph(
    gm: fx.GraphModule, costs: dict[str, NodeCost], spec: DeviceSpec, *, training: bool, master_weights: bool = False
) -> PlanningGraph:
    """Reduce an annotated graph to a PlanningGraph (see module docstring for what is kept; `master_weights`:
    static_bytes_per_param's)."""
    nodes = [n for n in gm.graph.nodes if n.op not in ("get_attr", "output")]
    index = {n: i for i, n in enumerate(nodes)}
    num_inputs = sum(n.op == "placeholder" for n in nodes)
    if any(n.op == "placeholder" for n in nodes[num_inputs:]):
        raise ValueError("placeholders must precede all other nodes in the captured graph")

    # Tied tensors: one canonical name per underlying tensor.
    canonical: dict[int, str] = {}
    alias_of: dict[str, str] = {}
    tied: dict[str, list[str]] = {}
    param_static: dict[str, int] = {}
    param_bytes: dict[str, int] = {}
    named = [(k, v, False) for k, v in gm.named_parameters(remove_duplicate=False)]
    named += [(k, v, True) for k, v in gm.named_buffers(remove_duplicate=False)]
    for name, t, is_buffer in named:
        key = id(t)
        if key not in canonical:
            canonical[key] = name
            param_static[name] = static_bytes_per_param(
                t.numel(),
                t.element_size(),
                training=training and t.requires_grad,
                is_buffer=is_buffer,
                master_weights=master_weights,
            )
            param_bytes[name] = t.numel() * t.element_size()
        alias_of[name] = canonical[key]
        tied.setdefault(canonical[key], []).append(name)
    tied = {k: v for k, v in tied.items() if len(v) > 1}
    by_size: dict[int, int] = {}
    for _name, t, is_buffer in named:
        if not is_buffer and t.requires_grad:
            by_size[t.element_size()] = by_size.get(t.element_size(), 0) + t.numel()

    n = len(nodes)
    succs: list[list[int]] = [[] for _ in range(n)]
    preds: list[list[int]] = [[] for _ in range(n)]
    params: list[list[str]] = [[] for _ in range(n)]
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            # A parameter read through get_attr belongs to each reader.
            names = [alias_of.get(p, p) for p in node.meta.get("params", [str(node.target)])]
            for user in node.users:
                if user in index:
                    params[index[user]].extend(names)
            continue
        if node.op == "output":
            for inp in node.all_input_nodes:
                if inp in index:
                    succs[index[inp]].append(n)
            continue
        i = index[node]
        params[i].extend(alias_of.get(p, p) for p in node.meta.get("params", []))
        for inp in node.all_input_nodes:
            if inp in index:
                succs[index[inp]].append(i)
                preds[i].append(index[inp])
    params = [sorted(set(p) & set(param_static)) for p in params]
    # A node annotated without "saves" (an opaque leaf) saves one storage of its own.
    saves = [
        {k: float(v) for k, v in nd.meta["saves"].items()} if "saves" in nd.meta
        else ({nd.name: float(nd.meta.get("saved_bytes", 0))} if nd.meta.get("saved_bytes") else {})
        for nd in nodes
    ]  # fmt: skip
    names = [nd.name for nd in nodes]
    forward = np.array([costs[nd.name].forward for nd in nodes], dtype=np.float64)
    backward = np.array([costs[nd.name].backward for nd in nodes], dtype=np.float64)
    forward_fixed = np.array([costs[nd.name].forward_fixed for nd in nodes], dtype=np.float64)
    backward_fixed = np.array([costs[nd.name].backward_fixed for nd in nodes], dtype=np.float64)
    out_bytes = np.array([nd.meta.get("out_bytes", 0) for nd in nodes], dtype=np.float64)
    if training:  # the loss on what the model returns (module docstring)
        returned = [i for i, s in enumerate(succs) if n in s]
        rate = spec.bytes_per_second("softmax")
        forward[returned] += 2 * out_bytes[returned] / rate
        backward[returned] += 4 * out_bytes[returned] / rate

    return PlanningGraph(
        names=names,
        forward=forward,
        backward=backward,
        forward_fixed=forward_fixed,
        backward_fixed=backward_fixed,
        out_bytes=out_bytes,
        saved_bytes=np.array([nd.meta.get("saved_bytes", 0) for nd in nodes], dtype=np.float64),
        is_tensor=np.array([nd.meta.get("is_tensor", True) for nd in nodes], dtype=bool),
        succs=[sorted(set(s)) for s in succs],
        preds=[sorted(set(p)) for p in preds],
        params=params,
        param_static=param_static,
        param_bytes=param_bytes,
        tied=tied,
        num_inputs=num_inputs,
        spec=spec,
        training=training,
        alias_of=alias_of,
        order=mutation_order(nodes) or None,
        saves=saves,
        storages=[list(nd.meta.get("storages", [nd.name])) for nd in nodes],
        regions=find_regions(gm, names, params, succs) if training else {},
        trainable=frozenset(p for p in param_static if param_static[p] > param_bytes[p]),
        param_element_size=max(by_size, key=by_size.get) if by_size else 4,
        master_weights=master_weights,
    )


def stage_time(compute: float, comm: float, *, overlaps_comm: bool) -> float:
    """A stage's steady-state seconds per step from its compute and its sends (module docstring)."""
    return max(compute, comm) if overlaps_comm else compute + comm


@dataclass(frozen=True)
class StageMetrics:
    """Exact figures of one stage under an assignment (see module docstring for the model)."""

    forward: float
    backward: float
    comm: float  # send time: activations forward + gradients backward
    send_bytes: float  # activation bytes sent to the next stage per step
    recv_bytes: float
    param_bytes: float  # bytes of the parameters/buffers this stage holds
    static_bytes: float  # param_bytes with grads and optimizer state
    activation_bytes: float  # saved activations per step (all microbatches)
    peak_memory: float  # static + activations of the microbatches in flight
    num_nodes: int
    overlaps_comm: bool = True  # the device's transfers run beside compute (DeviceSpec.overlaps_comm)
    send_messages: int = 0  # values sent to the next stage per microbatch (one message each)
    recv_messages: int = 0  # values received from the previous stage per microbatch (one message each)
    recompute: str = "none"  # activation recomputation mode (plan.recompute)
    recompute_time: float = 0.0  # forward seconds re-run in the backward (included in `backward`)
    transient_bytes: float = 0.0  # bytes a recomputed region regenerates during its backward (all microbatches)

    @property
    def compute(self) -> float:
        return self.forward + self.backward

    @property
    def time(self) -> float:
        """Steady-state time of the stage: compute and transfers overlapped, or added (see module docstring)."""
        return stage_time(self.forward + self.backward, self.comm, overlaps_comm=self.overlaps_comm)


def evaluate(
    pg: PlanningGraph,
    stage_of: Sequence[int],
    num_stages: int,
    *,
    microbatches: int = 1,
    in_flight: Sequence[int] | None = None,
    recompute: Sequence[str] | None = None,
) -> list[StageMetrics]:
    """Metrics of every stage for `stage_of[i]` = stage of planned node i, recomputing activations on stage s as
    `recompute[s]` says (plan.recompute; default "none" everywhere).

    Raises ValueError for an invalid assignment: a stage out of range or empty, an input not on
    stage 0, an edge going backwards (consumer on an earlier stage than its producer), or an in-place
    write out of order (plan.ordering.OrderViolation, naming the two nodes).
    """
    stage_of = np.asarray(stage_of, dtype=np.int64)
    if len(stage_of) != pg.n:
        raise ValueError(f"assignment has {len(stage_of)} entries for {pg.n} nodes")
    if pg.n and (stage_of.min() < 0 or stage_of.max() >= num_stages):
        raise ValueError(f"stages must lie in [0, {num_stages}), got [{stage_of.min()}, {stage_of.max()}]")
    if np.any(stage_of[: pg.num_inputs] != 0):
        raise ValueError("model inputs must be on stage 0")
    src, dst, returned = pg.edges
    backwards = np.flatnonzero(stage_of[dst] < stage_of[src])
    if len(backwards):
        i, j = src[backwards[0]], dst[backwards[0]]
        raise ValueError(f"edge {pg.names[i]} -> {pg.names[j]} goes from stage {stage_of[i]} back to {stage_of[j]}")
    counts = np.bincount(stage_of, minlength=num_stages)
    if np.any(counts == 0):
        raise ValueError(f"stages {np.flatnonzero(counts == 0).tolist()} are empty")
    in_flight = list(in_flight) if in_flight is not None else [microbatches] * num_stages

    # A value crosses boundaries stage_of[i] .. last_consumer_stage - 1 (no edge goes backwards: its own stage is
    # never later than a consumer's).
    last = stage_of.copy()
    np.maximum.at(last, src, stage_of[dst])
    last[returned] = num_stages - 1
    if pg.order is not None:
        pg.order.check(stage_of, last)
    cross = np.zeros(num_stages + 1)
    np.add.at(cross, stage_of + 1, pg.out_bytes)
    np.add.at(cross, last + 1, -pg.out_bytes)
    send = np.cumsum(cross)[1:]  # send[s] = bytes crossing s|s+1
    count = np.zeros(num_stages + 1, dtype=np.int64)
    np.add.at(count, stage_of + 1, 1)
    np.add.at(count, last + 1, -1)
    sends = np.cumsum(count)[1:]  # sends[s] = values crossing s|s+1
    modes = list(recompute) if recompute is not None else ["none"] * num_stages
    if len(modes) != num_stages:
        raise ValueError(f"{len(modes)} recompute modes for {num_stages} stages")
    fwd = np.bincount(stage_of, weights=pg.forward_at(microbatches), minlength=num_stages)
    bwd = np.bincount(stage_of, weights=pg.backward_at(microbatches), minlength=num_stages)
    act, redo, transient = np.zeros(num_stages), np.zeros(num_stages), np.zeros(num_stages)
    for mode in set(modes):
        stages = [s for s in range(num_stages) if modes[s] == mode]
        # A whole-stage mode reads one model for all its stages; "full:k" one per stage (its own first k layers).
        for group in [stages] if layers_recomputed(mode) is None else [[s] for s in stages]:
            model = pg.stage_activations(stage_of, group[0], mode)
            mine = np.isin(stage_of, group)
            act += np.bincount(stage_of[mine], weights=model.kept[mine], minlength=num_stages)
            rerun = pg.recompute_at(model, microbatches)
            redo += np.bincount(stage_of[mine], weights=rerun[mine], minlength=num_stages)
            if mine.any():
                np.maximum.at(transient, stage_of[mine], model.transient[mine])
    static_of, tensor_of = pg.stage_param_sums(stage_of, num_stages)

    out = []
    for s in range(num_stages):
        send_s, k_send = (send[s], int(sends[s])) if s < num_stages - 1 else (0.0, 0)
        recv_s, k_recv = (send[s - 1], int(sends[s - 1])) if s > 0 else (0.0, 0)
        comm = pg.comm_time(send_s, microbatches, k_send)
        if pg.training:  # the gradients of what this stage received go back
            comm += pg.comm_time(recv_s, microbatches, k_recv)
        static = float(static_of[s])
        act_s = float(act[s])
        out.append(
            StageMetrics(
                forward=float(fwd[s]),
                backward=float(bwd[s] + redo[s]),
                comm=comm,
                send_bytes=float(send_s),
                recv_bytes=float(recv_s),
                param_bytes=float(tensor_of[s]),
                static_bytes=static,
                activation_bytes=act_s,
                # saved_bytes is 0 without training, so inference memory is the static bytes.
                peak_memory=float(static + (act_s * min(in_flight[s], microbatches) + transient[s]) / microbatches),
                num_nodes=int(counts[s]),
                overlaps_comm=pg.spec.overlaps_comm,
                send_messages=k_send,
                recv_messages=k_recv,
                recompute=modes[s],
                recompute_time=float(redo[s]),
                transient_bytes=float(transient[s]),
            )
        )
    return out


def to_stage_costs(pg: PlanningGraph, metrics: Sequence[StageMetrics], microbatches: int) -> list[StageCost]:
    """Per-microbatch stage costs for the simulator from per-step stage metrics.

    Compute and activations scale with the microbatch (per step / m); one activation message per
    microbatch crosses each boundary (a latency per value + bytes / m / bandwidth).
    """
    m = microbatches
    return [
        StageCost(
            forward=s.forward / m,
            backward=s.backward / m,
            send_time=pg.comm_time(s.send_bytes / m, 1, s.send_messages),
            activation_bytes=s.activation_bytes / m,
            static_bytes=s.static_bytes,
            transient_bytes=s.transient_bytes / m,
        )
        for s in metrics
    ]


def tied_sync_time(
    pg: PlanningGraph, stage_of: Sequence[int], stage_to_rank: Sequence[int], *, internode: bool = False
) -> float:
    """Seconds after the pipeline step to sum the gradients of tied tensors held on several ranks.

    The runtime all-reduces each such tensor's gradient over the ranks that hold a copy (Megatron's
    embedding group), one after another once the schedule has finished: ring all-reduce over k ranks,
    latency + 2 (k - 1) / k x bytes / bandwidth each. Copies on stages of one rank cost nothing here.
    """
    if not pg.training or not pg.tied:
        return 0.0
    rank_of = np.asarray(stage_to_rank)[np.asarray(stage_of)]  # every node's rank
    total = 0.0
    for canonical, readers in pg.tied_reads.items():
        holders = len(np.unique(rank_of[readers]))
        total += all_reduce_time(pg.spec, pg.param_bytes[canonical], holders, internode=internode)
    return total


def price(
    pg: PlanningGraph, stage_of: Sequence[int], num_stages: int, *, microbatches: int, schedule: str,
    num_ranks: int, in_flight: Sequence[int] | None = None, recompute: Sequence[str] | None = None,
) -> tuple[list[StageMetrics], SimResult]:  # fmt: skip
    """Stage metrics of an assignment and the schedule replayed with them: what every plan, baseline
    and benchmark prediction is priced by."""
    metrics = evaluate(pg, stage_of, num_stages, microbatches=microbatches, in_flight=in_flight, recompute=recompute)
    sim = simulate(
        to_stage_costs(pg, metrics, microbatches), num_microbatches=microbatches, schedule=schedule,
        num_ranks=num_ranks, blocking_sends=not pg.spec.overlaps_comm,
    )  # fmt: skip
    return metrics, sim
