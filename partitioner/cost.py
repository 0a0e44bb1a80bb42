"""cost: price every annotated node on a DeviceSpec (roofline), or measure it on this machine.

Roofline: time = max(FLOPs / achievable FLOP/s for the node's dtype, bytes / achievable bandwidth)
+ a fixed per-kernel overhead; views and Python-level nodes (sizes, getitem on tuples) cost nothing. A tensor-core
GEMM whose rows are not aligned to 16 bytes reaches only a fraction of the achievable FLOP/s (`gemm_rows`,
DeviceSpec.gemm_efficiency: 3.8-6.3x slower on an H200), and normalizations, softmaxes and transcendental activations
stream at their own measured fraction of the bandwidth (`stream_class`, DeviceSpec.stream_efficiency).
The overhead is paid per call, whatever the batch: a node run as m microbatches pays it m times, and a rank with
1 / k of the batch (or of the weights) pays all of it. `NodeCost` keeps it apart (`forward_fixed`) so that the
planner charges it per microbatch and scales only the rest (plan.graph.PlanningGraph.forward_at).
Backward uses `bwd_flops` and `bwd_bytes` (annotate: the outputs' gradient, what the node saved, the inputs'
gradients; graphs annotated without it move the forward's bytes); nodes whose output needs no gradient have no
backward.

Profile mode (`profile_node_times`) runs the graph with real tensors on this machine and times each
node's forward, and its backward alone (the node re-run on inputs that require grad, autograd.grad
timed), best of a few repeats. Nodes timed one by one miss what a real training step adds around them:
autograd recording in the forward, the engine's scheduling and the gradient accumulation into `.grad`
in the backward (~10% on a small GPT on one CPU thread). With `calibrate` (the default), the graph is
also run whole, forward with grad then backward, and every node's forward (backward) time is scaled by
whole / sum-of-nodes, so the per-node times keep their measured proportions and sum to what a step
costs. It exists so the analytic model can be checked against reality, and to price plans for the
machine at hand (`compile(..., cost="profile")`; bench reports the error).
"""

from __future__ import annotations

import math
import operator
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from partitioner.annotate import is_attention
from partitioner.devices import DeviceSpec
from partitioner.plan.tensor_ops import GROUPED_MM

__all__ = [
    "NodeCost",
    "attention_rate",
    "attention_shape",
    "gemm_row_step",
    "gemm_rows",
    "matmul_form",
    "node_costs",
    "stream_class",
    "tensor_core_dtype",
    "profile_forward_times",
    "profile_node_times",
]

_FREE_OPS = ("placeholder", "get_attr", "output")


@dataclass(frozen=True)
class NodeCost:
    forward: float  # seconds, for the annotated batch (forward_fixed included)
    backward: float  # seconds; 0 when not training or nothing upstream needs a gradient
    forward_fixed: float = 0.0  # the part of `forward` paid once per call whatever the batch (kernel launch)
    backward_fixed: float = 0.0


def _roofline(
    flops: float, nbytes: float, dtype: str, spec: DeviceSpec, gemm_efficiency: float = 1.0, stream: str = ""
) -> float:
    if flops <= 0 and nbytes <= 0:
        return 0.0
    return _kernel_time(flops / (spec.flops_per_second(dtype) * gemm_efficiency), nbytes, spec, stream)


def _kernel_time(compute: float, nbytes: float, spec: DeviceSpec, stream: str = "") -> float:
    """A kernel of `compute` seconds of arithmetic moving `nbytes`: whichever bound is slower, plus its launch."""
    return max(compute, nbytes / spec.bytes_per_second(stream)) + spec.kernel_overhead


# Transcendental activations, matched at the end of a name ("gelu", "NewGELUActivation", "aten::silu_"); ELU only
# whole, since "relu" ends the same way and streams at the copy rate.
_ACTIVATIONS = ("gelu", "silu", "swish", "tanh", "sigmoid", "mish", "softplus", "erf", "exp")


def stream_class(n: fx.Node) -> str:
    """ "norm", "softmax", "activation" (a transcendental elementwise op) or "" for a node's memory-bound kernel:
    the classes whose kernels stream below the plain copy rate (DeviceSpec.stream_efficiency). Read from the
    module's class (call_module) or the function / method / ATen op's name."""
    if n.op == "call_module" and n.graph.owning_module is not None:
        name = type(n.graph.owning_module.get_submodule(str(n.target))).__name__.lower()
    elif n.op in ("call_function", "call_method"):
        target = n.target._schema.name if isinstance(n.target, torch._ops.OpOverload) else n.target
        name = str(getattr(target, "__name__", target)).lower().removeprefix("aten::").strip("_")
    else:
        return ""
    if "softmax" in name:
        return "softmax"
    if re.search(r"norm([123]d)?$", name) or "_norm" in name:
        return "norm"
    base = name.removesuffix("_").removesuffix("activation")
    return "activation" if base == "elu" or base.endswith(_ACTIVATIONS) else ""


_MATMUL_FUNCTIONS = {F.linear, torch.matmul, torch.mm, torch.bmm, operator.matmul}
_MATMUL_ATEN = {"linear": "linear", "mm": "matmul", "bmm": "matmul", "matmul": "matmul", "addmm": "addmm",
                "baddbmm": "baddbmm"}  # fmt: skip
_MATMUL_METHODS = {"matmul", "mm", "bmm"}
# The tensor-core dtypes whose GEMMs need aligned rows; float32 runs on CUDA cores (TF32 off, torch's default).
_TENSOR_CORE_DTYPES = {"bfloat16", "float16", "float8_e4m3fn", "float8_e5m2"}


def _shape(arg: Any) -> tuple[int, ...] | None:
    val = arg.meta.get("val") if isinstance(arg, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) and val.dim() > 0 else None


def matmul_form(n: fx.Node, root: torch.nn.Module | None = None) -> str | None:
    """How a matrix-product node reads its operands, or None for any other node: "module" (an nn.Linear, `root`
    holding it: default the graph's owning module), "linear" (x, W (N, K), bias), "matmul" (a (.., K), b (.., K, N):
    matmul / mm / bmm as functions, methods or ATen ops), "addmm" / "baddbmm" (bias, a, b), "grouped" (a (rows, K),
    b (groups, K, N): a mixture of experts' grouped product, tensor_ops.GROUPED_MM)."""
    root = root if root is not None else n.graph.owning_module
    if n.op == "call_module":
        return "module" if root is not None and isinstance(root.get_submodule(str(n.target)), torch.nn.Linear) else None
    if n.op == "call_method":
        return "matmul" if n.target in _MATMUL_METHODS else None
    if n.op != "call_function":
        return None
    if isinstance(n.target, torch._ops.OpOverload):
        if n.target._schema.name in GROUPED_MM:
            return "grouped"
        return _MATMUL_ATEN.get(n.target._schema.name.removeprefix("aten::"))
    if n.target in _MATMUL_FUNCTIONS:
        return "linear" if n.target is F.linear else "matmul"
    return {torch.addmm: "addmm", torch.baddbmm: "baddbmm"}.get(n.target)


def gemm_rows(n: fx.Node) -> tuple[int, int] | None:
    """(K, N) of a matrix-product node (`matmul_form`): the length of its first operand's rows (the reduction dim)
    and of its output's rows. Every operand of the forward GEMM and of both backward GEMMs (dX = dY W, dW = dY^T X)
    has rows of one of these two lengths, whatever the batch. None for any other node."""
    form = matmul_form(n)
    if form == "module":
        module = n.graph.owning_module.get_submodule(str(n.target))
        return module.in_features, module.out_features
    if form is None or (form in ("addmm", "baddbmm") and len(n.args) < 2):
        return None
    a, out = _shape(n.args[1] if form in ("addmm", "baddbmm") else n.args[0]), _shape(n)
    return (a[-1], out[-1]) if a is not None and out is not None else None


def tensor_core_dtype(dtype: str) -> bool:
    """Whether GEMMs in `dtype` (a torch dtype's name) run on tensor cores, where row alignment matters."""
    return dtype in _TENSOR_CORE_DTYPES


def _element_size(dtype: str) -> int:
    return getattr(torch, dtype).itemsize


def gemm_row_step(spec: DeviceSpec, dtype: str) -> int:
    """The multiple, in elements, that a GEMM's row lengths must be for `spec`'s fast kernels in `dtype` (a torch
    dtype's name); 1 where misaligned rows cost nothing (the CPU presets, fp32 on CUDA cores)."""
    if spec.misaligned_gemm_efficiency >= 1.0 or not tensor_core_dtype(dtype):
        return 1
    return max(spec.gemm_alignment // _element_size(dtype), 1)


def _gemm_efficiency(n: fx.Node, spec: DeviceSpec) -> float:
    """The fraction of the achievable GEMM rate this node reaches on `spec`: below 1 for a tensor-core GEMM whose
    rows are not aligned (DeviceSpec.gemm_efficiency), else 1."""
    dtype = n.meta.get("dtype", "float32")
    if gemm_row_step(spec, dtype) == 1:
        return 1.0
    rows = gemm_rows(n)
    return spec.gemm_efficiency(rows, _element_size(dtype)) if rows else 1.0


# F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, ...): positions of the two read
_MASK_ARG, _CAUSAL_ARG = 3, 5


def attention_shape(n: fx.Node) -> tuple[int, int, bool, bool] | None:
    """(head dim, key length, causal, masked) of a fused attention node (SDPA), whose time the device's measured
    flash rates give (attention_rate); None for any other node."""
    if not is_attention(n):
        return None

    def arg(i: int, name: str, default: Any) -> Any:
        return n.kwargs[name] if name in n.kwargs else n.args[i] if len(n.args) > i else default

    q, k = _shape(n.args[0]), _shape(n.args[1] if len(n.args) > 1 else n.kwargs.get("key"))
    if q is None or k is None:
        return None
    return q[-1], k[-2], bool(arg(_CAUSAL_ARG, "is_causal", False)), arg(_MASK_ARG, "attn_mask", None) is not None


def attention_rate(spec: DeviceSpec, head_dim: int, length: int, causal: bool, mode: str) -> float | None:
    """Useful FLOP/s of fused attention on `spec` ("fwd" or "fwd+bwd"), from its measured table
    (DeviceSpec.attention_tflops): linear in log2(length) between the measured lengths and in the head dim between
    the measured ones, held at the ends. None without a table."""
    kind = "causal" if causal else "full"
    dims = sorted(int(key.split()[0][1:]) for key in spec.attention_tflops if key.endswith(f"{kind} {mode}"))
    if not dims or not spec.attention_lengths:
        return None
    log_lengths = np.log2(spec.attention_lengths)
    by_dim = [np.interp(math.log2(max(length, 1)), log_lengths, spec.attention_tflops[f"d{d} {kind} {mode}"])
              for d in dims]  # fmt: skip
    return float(np.interp(head_dim, dims, by_dim)) * 1e12  # np.interp holds the end values outside the points


def _attention_times(n: fx.Node, spec: DeviceSpec) -> tuple[float, float] | None:
    """(forward, backward) compute seconds of a fused attention node from the device's measured rates, on its useful
    FLOPs (a causal mask skips half the scores), or None where no rate applies (then the GEMM rate prices it). An
    explicit mask (BERT's padding mask) runs the memory-efficient kernel, whose rates were not measured: it gets the
    unmasked rate of its shape (bert-large's attention kernels measured 235 TFLOP/s where flash at that shape runs
    295: the estimate is ~1.25x fast, the GEMM rate it replaces ~2.9x)."""
    shape = attention_shape(n) if spec.attention_tflops and tensor_core_dtype(n.meta.get("dtype", "")) else None
    if shape is None:
        return None
    head_dim, length, causal, _masked = shape
    forward_rate = attention_rate(spec, head_dim, length, causal, "fwd")
    both_rate = attention_rate(spec, head_dim, length, causal, "fwd+bwd")
    if not forward_rate or not both_rate:
        return None
    useful = n.meta["flops"] * ((length + 1) / (2 * length) if causal else 1.0)  # FlopCounterMode counts all s^2
    forward = useful / forward_rate
    return forward, max(3.5 * useful / both_rate - forward, 0.0)


def node_costs(
    gm: fx.GraphModule,
    spec: DeviceSpec,
    *,
    training: bool = True,
    measured: dict[str, float] | dict[str, tuple[float, float]] | None = None,
) -> dict[str, NodeCost]:
    """Forward/backward seconds of every node of an annotated graph, keyed by node name.

    `measured` replaces analytic times by measured ones: node name -> forward seconds (from
    profile_forward_times; the backward keeps the analytic backward/forward ratio) or -> (forward,
    backward) seconds (from profile_node_times).
    """
    costs: dict[str, NodeCost] = {}
    for n in gm.graph.nodes:
        if "flops" not in n.meta:
            raise ValueError(f"node {n.name} is not annotated: run partitioner.annotate.annotate first")
        if n.op in _FREE_OPS:
            costs[n.name] = NodeCost(0.0, 0.0)
            continue
        m = n.meta
        gemm = _gemm_efficiency(n, spec) if m["flops"] > 0 else 1.0
        stream = stream_class(n) if spec.stream_efficiency else ""
        attention = _attention_times(n, spec) if m["flops"] > 0 else None
        if attention is not None:  # measured flash rates, not the GEMM rate
            fwd = _kernel_time(attention[0], m["mem_bytes"], spec)
        else:
            fwd = _roofline(m["flops"], m["mem_bytes"], m["dtype"], spec, gemm, stream)
        bwd = 0.0
        if training and m.get("requires_grad", False):
            bwd_bytes = m.get("bwd_bytes", m["mem_bytes"])
            if attention is not None:
                bwd = _kernel_time(attention[1], bwd_bytes, spec)
            else:
                bwd = _roofline(m["bwd_flops"], bwd_bytes, m["dtype"], spec, gemm, stream)
        if measured is not None and n.name in measured:
            value = measured[n.name]
            if isinstance(value, tuple):
                fwd, bwd = value[0], (value[1] if training and m.get("requires_grad", False) else 0.0)
            else:
                ratio = bwd / fwd if fwd > 0 else 0.0
                fwd, bwd = value, value * ratio
        # A measured time holds its call's overhead too; one shorter than the overhead is all overhead.
        fixed_fwd = min(spec.kernel_overhead, fwd) if fwd > 0 else 0.0
        fixed_bwd = min(spec.kernel_overhead, bwd) if bwd > 0 else 0.0
        costs[n.name] = NodeCost(fwd, bwd, fixed_fwd, fixed_bwd)
    return costs


class _TimingInterpreter(fx.Interpreter):
    """Times every node's forward and, with `backward`, the backward of that node alone: the node is
    run again on detached copies of its floating inputs that require grad, and autograd.grad of its
    floating outputs (ones as output gradients) is timed, w.r.t. those inputs and its module's params."""

    def __init__(
        self, gm: fx.GraphModule, times: dict[str, tuple[float, float]], backward: bool, clock: Callable[[], float]
    ):
        super().__init__(gm)
        self.times = times
        self.backward = backward
        self.clock = clock

    def run_node(self, n: fx.Node) -> Any:
        t0 = self.clock()
        result = super().run_node(n)
        fwd = self.clock() - t0
        bwd = self._time_backward(n) if self.backward and n.op.startswith("call") else 0.0
        old = self.times.get(n.name, (float("inf"), float("inf")))
        self.times[n.name] = (min(old[0], fwd), min(old[1], bwd))
        return result

    def _time_backward(self, n: fx.Node) -> float:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        leaves: list[torch.Tensor] = []

        def leaf(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                x = x.detach().requires_grad_(True)
                leaves.append(x)
            return x

        args, kwargs = pytree.tree_map(leaf, (args, kwargs))
        params = list(self.module.get_submodule(n.target).parameters()) if n.op == "call_module" else []
        wrt = leaves + [p for p in params if p.requires_grad]
        with torch.enable_grad():
            out = getattr(self, n.op)(n.target, args, kwargs)
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        if not outs or not wrt:
            return 0.0
        grads = [torch.ones_like(t) for t in outs]
        t0 = self.clock()
        torch.autograd.grad(outs, wrt, grads, allow_unused=True)
        return self.clock() - t0


def profile_node_times(
    gm: fx.GraphModule,
    inputs: list[Any],
    *,
    repeats: int = 3,
    threads: int | None = None,
    backward: bool = True,
    calibrate: bool = True,
) -> dict[str, tuple[float, float]]:
    """Measured (forward, backward) seconds per node (best of `repeats` after a warm-up), on real tensors.

    The graph must hold real (not meta) weights. Python-level nodes measure their interpreter
    overhead, which is what they cost here too. `threads` pins torch's intra-op thread count while
    measuring (1 makes per-node timings robust to other processes: multi-threaded ops otherwise
    stall at their barriers whenever a core is taken). `calibrate`: scale to the whole graph's
    measured forward and backward (module docstring). The model is left as found: buffers (e.g.
    BatchNorm statistics), gradients and the RNG state are restored.
    """
    for p in gm.parameters():
        if p.is_meta:
            raise ValueError("profile mode needs real weights; the model is on the meta device")
    times: dict[str, tuple[float, float]] = {}
    clock = _clock(any(t.is_cuda for t in [*gm.parameters(), *pytree.tree_leaves(inputs)] if torch.is_tensor(t)))
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    buffers = {name: b.detach().clone() for name, b in gm.named_buffers()}
    grads = {p: p.grad for p in gm.parameters()}
    try:
        with torch.random.fork_rng(devices=[]):
            with torch.no_grad():
                _TimingInterpreter(gm, {}, backward, clock).run(*inputs)  # warm-up (allocator, lazy init)
                for _ in range(repeats):
                    _TimingInterpreter(gm, times, backward, clock).run(*inputs)
            if calibrate:
                whole_fwd, whole_bwd = _time_whole_graph(gm, inputs, repeats, backward, clock)
                fwd_sum = sum(f for f, _ in times.values())
                bwd_sum = sum(b for _, b in times.values())
                fs = whole_fwd / fwd_sum if fwd_sum > 0 else 1.0
                bs = whole_bwd / bwd_sum if bwd_sum > 0 and whole_bwd > 0 else 1.0
                times = {name: (f * fs, b * bs) for name, (f, b) in times.items()}
    finally:
        torch.set_num_threads(previous)
        with torch.no_grad():
            for name, b in gm.named_buffers():
                b.copy_(buffers[name])
        for p, g in grads.items():
            p.grad = g
    return times


def _clock(cuda: bool) -> Callable[[], float]:
    """perf_counter, after waiting for the GPU's queued work when the graph runs there (kernels are asynchronous:
    without the wait a node would measure its launch, not its run)."""
    if not cuda:
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return now


def _time_whole_graph(
    gm: fx.GraphModule, inputs: list[Any], repeats: int, backward: bool, clock: Callable[[], float] = time.perf_counter
) -> tuple[float, float]:
    """Median seconds of the whole graph's forward (grad recorded when `backward`) and backward over `repeats` runs.

    The median, not the best: the calibrated total stands for a typical step (per-node proportions come from
    best-of timings, which are robust to interference). The backward seeds every floating output that requires
    grad with ones and accumulates into `.grad` as a training step does (the caller restores the gradients).
    """
    fwds, bwds = [], []
    for i in range(repeats + 1):  # the first run warms the autograd path up
        with torch.set_grad_enabled(backward):
            t0 = clock()
            out = gm(*inputs)
            fwd = clock() - t0
        outs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.requires_grad]
        bwd = 0.0
        if backward and outs:
            t0 = clock()
            torch.autograd.backward(outs, [torch.ones_like(t) for t in outs])
            bwd = clock() - t0
        del out, outs
        if i > 0:
            fwds.append(fwd)
            bwds.append(bwd)
    return statistics.median(fwds), statistics.median(bwds)


def profile_forward_times(
    gm: fx.GraphModule, inputs: list[Any], *, repeats: int = 3, threads: int | None = None, calibrate: bool = True
) -> dict[str, float]:
    """Measured forward seconds per node (profile_node_times without the backward runs)."""
    times = profile_node_times(gm, inputs, repeats=repeats, threads=threads, backward=False, calibrate=calibrate)
    return {name: fwd for name, (fwd, _) in times.items()}
