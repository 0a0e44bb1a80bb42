"""Ahead-of-time sm_90 (H100) compile report for every autotune config of the Triton kernels in `kernels/`.

Usage (any Linux machine with triton; no GPU, no CUDA driver)::

    python bench/kernels_sm90.py                            # all kernels, configs; bf16, fp16, fp32 -> bench/results/
    python bench/kernels_sm90.py --kept-only --dtypes bf16 fp16 fp32 fp32-tf32 --jobs 8
    python bench/kernels_sm90.py --kernel vq_st_bwd_dz --dtypes bf16
    python bench/kernels_sm90.py --kernel slot_attention_fwd --config "BLOCK_N=16 w4 s1" --out /tmp/sm90
    python bench/kernels_sm90.py --kept-only --resume bench/results/kernels-sm90-<date>-kept.json  # finish it

For each (kernel, autotune config, dtype) it reports the registers per thread, the bytes ptxas spills (stores /
loads) and the thread's stack frame, the shared memory per block, whether that fits an H100 (at most 227 KiB =
232448 bytes of dynamic shared memory per block, 255 registers per thread, 65536 registers per block), and which
instructions the kernel's tl.dot calls became: wgmma (Hopper warpgroup MMA), mma (mma.sync, Ampere-style tensor
cores) or FMA loops (no tensor cores), with their operand types and, for fp32 operands, the input precision the
kernel passed (ieee or tf32). `kept` says whether the kernel's own `early_config_prune` keeps the config at the
benchmark shapes, i.e. whether autotuning would ever run it. Results: bench/results/kernels-sm90-<date>[-...].md /
.json, named by what ran (`-kept`, the dtypes unless all three, the kernel families or `-partial`, `-configs`);
they are rewritten after every row, with `complete: false` until the run ends.

`--resume JSON [JSON ...]` finishes or extends earlier results: a (kernel, config, dtype) row that one of them
already has (the first that has it) is taken as it is instead of compiled again, the rest are compiled, and the
report has both. The earlier results must come from the same triton, ptxas, torch, target and FP fusion, and
their launches (shapes, launch constexprs, which configs the pruning keeps) must be what the kernels give now;
earlier rows outside this run's selection are left out. The report lists the runs its rows come from (date,
command, machine, seconds, rows; `runs` in the JSON, each row's `run` is its number there, this run last) and
their seconds in all. The results of a run are written under the name this run gets, which may be the very file
it resumes (read first; every write replaces the file whole).

How it compiles without a GPU or driver, step by step:

1. The arguments are those the launchers pass at the shapes of bench/kernels.py. Each benchmark case's inputs are
   built on the meta device (shapes, strides, dtypes; no memory) and its launcher functions (kernels/*.py, fwd and
   bwd) run on them with every autotuned kernel replaced by a recorder of (args, kwargs). Slot attention splits
   tokens by the device's SM count only on CUDA, so there `_splits` is asked for its CUDA answer and `_sm_count`
   answers 132 (an H100 SXM's or H200's SMs).
2. Each kernel's `prune_configs_by` runs on those arguments exactly as `Autotuner.run` calls it (`kept`).
3. Triton's own launch-time binder (`create_function_from_signature` and `JITFunction._pack_args`, given a backend
   made for the target rather than the active driver's) turns the arguments plus a config into the signature,
   constexprs and divisibility attributes a launch would compile with; tensors are `triton.runtime.jit.MockTensor`
   (16-byte aligned pointers, as from torch's allocator).
4. `triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs Triton's NVIDIA pipeline (TTIR, TTGIR,
   LLVM IR, PTX for sm_90a, cubin by the ptxas Triton bundles for sm_90, ptxas-blackwell); nothing on that path
   queries a driver. Registers and spills are ptxas's own `-v` report of that very compile
   (`knobs.nvidia.dump_ptxas_log`, captured), shared memory is the compiled kernel's `metadata.shared` (plus any
   static shared memory ptxas reports). A private, fresh Triton cache and `always_compile` make every row a real
   compile of the run that reports it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib
import io
import json
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

# The harness compiles: kernels must be decorated as JIT functions, not for Triton's CPU interpreter.
os.environ["TRITON_INTERPRET"] = "0"

import torch

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is sys.path[0]; there bench/kernels.py would shadow any top-level `kernels` (Hugging Face's,
# which transformers imports), so it goes and the repository root takes its place.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import MockTensor, create_function_from_signature  # noqa: E402

from bench.kernels import CASES  # noqa: E402

# Triton 3.9 warns once that FP fusion is on by default; it is what a launch gets, and the header records it.
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")

__all__ = ["KERNELS", "Launch", "compile_config", "launches", "main", "sweep", "write_results"]

RESULTS = ROOT / "bench" / "results"
TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: compute capability 9.0, compiled for sm_90a
H100_SMEM_BYTES = 232448  # 227 KiB of dynamic shared memory per block (opt-in maximum)
H100_MAX_REGS = 255  # registers per thread
H100_BLOCK_REGS = 65536  # registers per block (the SM's register file)
H100_SMS = 132  # H100 SXM5 / H200
# Autotuned kernel -> (module, global the launcher calls it through); in the order they are compiled, quickest
# first (a compile takes ~1 s for slot attention, ~3 s for vq_fwd, 10-20 s for MS-GLAM, minutes for VQ's backward).
KERNELS: dict[str, tuple[str, str]] = {
    "slot_attention_fwd": ("partitioner.kernels.slot_attention", "_slot_attention_fwd_kernel"),
    "slot_attention_bwd": ("partitioner.kernels.slot_attention", "_slot_attention_bwd_kernel"),
    "vq_fwd": ("partitioner.kernels.vq", "_vq_fwd_kernel"),
    "msglam_fwd": ("partitioner.kernels.msglam", "_msglam_fwd_kernel"),
    "msglam_bwd": ("partitioner.kernels.msglam", "_msglam_bwd_kernel"),
    "vq_st_bwd_dz": ("partitioner.kernels.vq", "_vq_st_bwd_dz_kernel"),
    "vq_st_bwd_dc": ("partitioner.kernels.vq", "_vq_st_bwd_dc_kernel"),
}
# Input dtypes; "fp32-tf32" is fp32 with torch.backends.cuda.matmul.allow_tf32 = True, which slot attention and VQ
# follow (their launchers pass DOT_PRECISION="tf32" then, "ieee" by default); MS-GLAM always passes "ieee".
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp32-tf32": torch.float32}
FAMILIES = ("slot_attention", "vq", "msglam")  # --kernel vq: every kernel whose name starts with vq_


@dataclass
class Launch:
    """One kernel compiled one way: its arguments as the launcher passes them at one or more benchmark shapes.

    `kept` holds, per config label, the shapes whose autotune pruning keeps that config.
    """

    kernel: str
    dtype: str
    shapes: list[str]
    args: tuple
    kwargs: dict[str, Any]
    constexprs: dict[str, Any]  # the launcher's tl.constexpr arguments (the config's are added per config)
    kept: dict[str, list[str]] = field(default_factory=dict)

    @property
    def autotuner(self) -> Any:
        module, name = KERNELS[self.kernel.split("[")[0]]
        return getattr(importlib.import_module(module), name)


def config_label(config: triton.Config) -> str:
    """'BLOCK_N=64 w8 s2': the config's constexprs, num_warps and num_stages."""
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"w{config.num_warps}", f"s{config.num_stages}"])


# ----------------------------------------------------------------------------------------------------------
# Recording the launchers' calls (meta tensors: shapes, strides and dtypes, no memory, no device)
# ----------------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for an autotuned kernel: `kernel[grid](*args, **kwargs)` appends (label, args, kwargs)."""

    def __init__(self, label: str, sink: list[tuple[str, tuple, dict]]) -> None:
        self.label, self.sink = label, sink

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self.sink.append((self.label, args, kwargs))


class _Ctx:
    """The autograd ctx the launchers' Functions use: saved tensors and attributes."""

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        self.saved_tensors = tensors


def _drive_slot(x: dict[str, Any]) -> None:
    sa = importlib.import_module("partitioner.kernels.slot_attention")
    q, k, v, mask = x["q"], x["k"], x["v"], x["slot_mask"]
    updates, den, _ = sa._slot_attention_fwd(q, k, v, mask, 1e-5, False)
    sa._slot_attention_bwd(q, k, v, mask, den, updates, torch.empty_like(updates), None)


def _drive_vq(x: dict[str, Any], straight_through: bool = False) -> None:
    vq = importlib.import_module("partitioner.kernels.vq")
    z2, codebook = x["z"].reshape(-1, x["z"].shape[-1]), x["codebook"]
    _, row_max, row_sum = vq._vq_fwd(z2, codebook, False, 1.0, 0, stats=straight_through)
    if straight_through:
        ctx = _Ctx()
        ctx.saved_tensors, ctx.args = (z2, codebook, row_max, row_sum), (False, 1.0, 0)
        vq._SoftStraightThrough.backward(ctx, torch.empty_like(z2))


def _drive_msglam(x: dict[str, Any]) -> None:
    ms = importlib.import_module("partitioner.kernels.msglam")
    names = ("x", "wq", "bq", "wk", "bk", "wv", "bv", "log_sigma", "ca_w1", "ca_w2", "sa_w")
    ctx = _Ctx()
    nl_out, cbam_out = ms._MSGLAMAttention.forward(ctx, *(x[n] for n in names))
    ms._MSGLAMAttention.backward(ctx, torch.empty_like(nl_out), torch.empty_like(cbam_out))


# bench/kernels.py CASES key -> the launcher calls one benchmark call makes (sample=False, tau=1, eps=1e-5 there).
_DRIVERS: dict[str, Callable[[dict[str, Any]], None]] = {
    "slot_attention": _drive_slot,
    "vq": _drive_vq,
    "vq_st": lambda x: _drive_vq(x, straight_through=True),
    "msglam": _drive_msglam,
}


def _record(dtype_name: str) -> list[tuple[str, str, tuple, dict]]:
    """(kernel, shape, args, kwargs) of every autotuned-kernel call the benchmark cases make, fwd and bwd."""
    sink: list[tuple[str, tuple, dict]] = []
    calls = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    with contextlib.ExitStack() as stack:
        torch.backends.cuda.matmul.allow_tf32 = dtype_name == "fp32-tf32"
        stack.callback(setattr, torch.backends.cuda.matmul, "allow_tf32", tf32)
        for label, (module, name) in KERNELS.items():
            stack.enter_context(mock.patch.object(importlib.import_module(module), name, _Recorder(label, sink)))
        sa = importlib.import_module("partitioner.kernels.slot_attention")
        splits = sa._splits  # the token split a CUDA device gets, with an H100's SM count
        stack.enter_context(mock.patch.object(sa, "_sm_count", lambda device: H100_SMS))
        stack.enter_context(mock.patch.object(sa, "_splits", lambda b, n, device: splits(b, n, torch.device("cuda"))))
        for family, cases in CASES.items():
            for case in cases:
                start = len(sink)
                _DRIVERS[family](case.make(torch.device("meta"), DTYPES[dtype_name]))
                calls += [(label, f"{case.name} {case.shape}", args, kw) for label, args, kw in sink[start:]]
    return calls


def _mock(value: Any) -> Any:
    """Tensors -> MockTensor (dtype only, 16-byte aligned pointer), everything else as is."""
    return MockTensor(value.dtype) if isinstance(value, torch.Tensor) else value


def _bind(autotuner: Any, args: tuple, kwargs: dict[str, Any], config: triton.Config) -> tuple[dict, dict, dict, Any]:
    """(signature, constexprs, attrs, options) of one launch with `config`, as JITFunction.run derives them."""
    backend = make_backend(TARGET)
    jit = autotuner.fn
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kw = {**kwargs, **config.all_kwargs(), "debug": jit.debug or triton.knobs.runtime.debug}
    kw["instrumentation_mode"] = triton.knobs.compilation.instrumentation_mode
    kw["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts
    bound, specialization, opts = binder(*args, **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, specialization, opts)
    return signature, constexprs, attrs, options


def launches(kernels: list[str], dtypes: list[str]) -> list[Launch]:
    """The distinct compiles of `kernels` at the benchmark shapes, per dtype, with each config's pruning verdict.

    Calls that compile alike (same signature, constexprs and attributes) are merged; a kernel compiled more than
    one way is labelled by the launch constexprs that differ, e.g. ``vq_fwd[STATS=True]``.
    """
    out: list[Launch] = []
    fp32_keys: set[tuple[str, str]] = set()
    for dtype_name in dtypes:
        groups: dict[tuple[str, str], Launch] = {}
        for label, shape, args, kwargs in _record(dtype_name):
            if label not in kernels:
                continue
            autotuner = getattr(importlib.import_module(KERNELS[label][0]), KERNELS[label][1])
            autotuner.nargs = dict(zip(autotuner.arg_names, args))  # what Autotuner.run sets before pruning
            kept = autotuner.prune_configs(kwargs)  # on the meta tensors: the pruning reads their element sizes
            autotuner.nargs = None
            args = tuple(_mock(a) for a in args)
            kwargs = {k: _mock(v) for k, v in kwargs.items()}
            signature, constexprs, attrs, _ = _bind(autotuner, args, kwargs, autotuner.configs[0])
            key = (label, repr((signature, sorted(constexprs.items()), sorted(attrs.items()))))
            if dtype_name == "fp32":
                fp32_keys.add(key)
            elif dtype_name == "fp32-tf32" and key in fp32_keys:
                continue  # compiles exactly as fp32 (the kernel ignores torch's TF32 setting): not repeated
            bound = {**dict(zip(autotuner.arg_names, args)), **kwargs}
            consts = {p.name: bound[p.name] for p in autotuner.fn.params if p.is_constexpr and p.name in bound}
            launch = groups.setdefault(key, Launch(label, dtype_name, [], args, kwargs, consts))
            launch.shapes.append(shape)
            for config in kept:
                launch.kept.setdefault(config_label(config), []).append(shape)
        out += _label_variants(list(groups.values()))
    return sorted(out, key=lambda launch: list(KERNELS).index(launch.kernel.split("[")[0]))  # by kernel, then dtype


def _label_variants(group: list[Launch]) -> list[Launch]:
    """Suffix kernels compiled several ways with the constexprs that tell them apart."""
    by_kernel: dict[str, list[Launch]] = defaultdict(list)
    for launch in group:
        by_kernel[launch.kernel].append(launch)
    for same in by_kernel.values():
        if len(same) > 1:
            differ = sorted(k for k in same[0].constexprs if len({repr(s.constexprs.get(k)) for s in same}) > 1)
            for launch in same:
                launch.kernel += "[" + ",".join(f"{k}={launch.constexprs[k]}" for k in differ) + "]"
    return group


# ----------------------------------------------------------------------------------------------------------
# Compiling one config and reading what ptxas and the IR say
# ----------------------------------------------------------------------------------------------------------

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
# A TTGIR dot: op, operand A's element type, and (tt.dot) its result's layout; inputPrecision when it is printed.
_PRECISIONS = {str(v.value): name.lower() for name, v in ir.INPUT_PRECISION.__members__.items()}  # "0" -> "tf32"
_TTGIR_DOT = re.compile(r"= (tt\.dot|ttng\.warp_group_dot) .*?: (?:tensor|!ttg\.memdesc)<[\dx]+x(\w+)")


@contextlib.contextmanager
def _compile_env() -> Iterator[None]:
    """A private, fresh Triton cache, every compile run through ptxas, and ptxas's `-v` log printed."""
    with tempfile.TemporaryDirectory(prefix="kernels-sm90-") as cache, contextlib.ExitStack() as stack:
        stack.enter_context(triton.knobs.cache.scope())
        stack.enter_context(triton.knobs.compilation.scope())
        stack.enter_context(triton.knobs.nvidia.scope())
        triton.knobs.cache.dir = cache
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        yield


def _dots(ttgir: str) -> list[str]:
    """One entry per tl.dot in the TTGIR: 'wgmma bf16', 'mma f16', 'fma f32/ieee', ..."""
    found = []
    for line in ttgir.splitlines():
        m = _TTGIR_DOT.search(line)
        if not m:
            continue
        op, elem = m.groups()
        result = line.rsplit("->", 1)[-1]
        kind = "wgmma" if op == "ttng.warp_group_dot" else ("mma" if "#mma" in result else "fma")
        precision = re.search(r"inputPrecision = (\w+)", line)  # tt.dot prints a name, warp_group_dot a number
        prec = _PRECISIONS.get(precision.group(1), precision.group(1)) if precision else "ieee"  # omitted: default
        found.append(f"{kind} {elem}" + (f"/{prec}" if elem == "f32" else ""))
    return found


def compile_config(launch: Launch, config: triton.Config) -> dict[str, Any]:
    """Compile `launch` with `config` for sm_90a; one result row (an `error` field instead if it did not compile)."""
    label = config_label(config)
    row: dict[str, Any] = {"kernel": launch.kernel, "config": label, "dtype": launch.dtype}
    row["kept"] = len(launch.kept.get(label, [])) == len(launch.shapes)
    row["kept_at"] = launch.kept.get(label, [])
    row["shapes"] = launch.shapes
    autotuner = launch.autotuner
    log = io.StringIO()
    start = time.perf_counter()
    try:
        signature, constexprs, attrs, options = _bind(autotuner, launch.args, launch.kwargs, config)
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")
            compiled = triton.compile(
                ASTSource(autotuner.fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__
            )
    except Exception as e:  # a config that does not compile is a finding, reported with its reason
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
        row["compile_s"] = round(time.perf_counter() - start, 2)
        return row
    row["compile_s"] = round(time.perf_counter() - start, 2)
    text = log.getvalue()
    regs, spills = _PTXAS_REGS.search(text), _PTXAS_SPILLS.search(text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas -v report for {launch.kernel} {label} {launch.dtype}:\n{text[-2000:]}")
    static_smem = sum(int(s) for s in _PTXAS_SMEM.findall(text))
    ptx = compiled.asm["ptx"]
    shutil.rmtree(Path(next(iter(compiled.metadata_group.values()))).parent)  # read: free the disk (MBs each)
    threads = compiled.metadata.num_warps * 32
    row.update(
        regs=int(regs.group(1)),
        stack_bytes=int(spills.group(1)),
        spill_stores=int(spills.group(2)),
        spill_loads=int(spills.group(3)),
        smem_bytes=compiled.metadata.shared + static_smem,
        num_warps=compiled.metadata.num_warps,
        wgmma=ptx.count("wgmma.mma_async"),
        mma=len(re.findall(r"\bmma\.sync\.aligned", ptx)),
        dots=_dots(compiled.asm["ttgir"]),
    )
    row["fits"] = (
        row["smem_bytes"] <= H100_SMEM_BYTES
        and row["regs"] <= H100_MAX_REGS
        and row["regs"] * threads <= H100_BLOCK_REGS
    )
    return row


def _tasks(launch_list: list[Launch], kept_only: bool, only: set[str] | None) -> list[tuple[Launch, triton.Config]]:
    """(launch, config) pairs to compile: the kept configs first (the ones autotuning would time), then the rest."""
    pairs = [
        (launch, config)
        for launch in launch_list
        for config in launch.autotuner.configs
        if not (kept_only and config_label(config) not in launch.kept)
        and not (only and config_label(config) not in only)
    ]
    return sorted(pairs, key=lambda p: config_label(p[1]) not in p[0].kept)


_WORKER_ENV = contextlib.ExitStack()


def _start_worker() -> None:
    """Process-pool initializer: the worker's own private cache and ptxas log for its whole life."""
    _WORKER_ENV.enter_context(_compile_env())


def sweep(
    launch_list: list[Launch],
    kept_only: bool = False,
    only: set[str] | None = None,
    jobs: int = 1,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    earlier: dict[tuple[str, str, str], dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Compile every config of every launch (or the kept ones, or those named in `only`) in `jobs` processes.

    `earlier` holds rows of earlier runs by (kernel, config, dtype): those configs are not compiled, their rows
    are returned as they are. Returns one row per config in launch and config order; `on_row` sees each compiled
    row as it is done.
    """
    index = {id(launch): i for i, launch in enumerate(launch_list)}
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    tasks = []
    for launch, config in _tasks(launch_list, kept_only, only):
        row = (earlier or {}).get((launch.kernel, config_label(config), launch.dtype))
        if row is None:
            tasks.append((launch, config))
        else:
            rows[(index[id(launch)], config_label(config))] = row

    def done(launch: Launch, config: triton.Config, row: dict[str, Any]) -> None:
        rows[(index[id(launch)], config_label(config))] = row
        if on_row is not None:
            on_row(row)

    if jobs <= 1:
        with _compile_env():
            for launch, config in tasks:
                done(launch, config, compile_config(launch, config))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_start_worker) as pool:
            futures = {pool.submit(compile_config, launch, config): (launch, config) for launch, config in tasks}
            for future in as_completed(futures):
                done(*futures[future], future.result())
    order = {
        (i, config_label(c)): n for i, launch in enumerate(launch_list) for n, c in enumerate(launch.autotuner.configs)
    }
    return [rows[k] for k in sorted(rows, key=lambda k: (k[0], order[k]))]


# ----------------------------------------------------------------------------------------------------------
# Output: the table on stdout, Markdown and JSON under bench/results/
# ----------------------------------------------------------------------------------------------------------


def tensor_cores(row: dict[str, Any]) -> str:
    """'wgmma' / 'mma' / 'wgmma+mma' when the PTX has tensor-core instructions, else 'none'."""
    kinds = [k for k in ("wgmma", "mma") if row.get(k)]
    return "+".join(kinds) or "none"


def _cells(row: dict[str, Any]) -> list[str]:
    kept = "yes" if row["kept"] else ("some" if row["kept_at"] else "no")
    if "error" in row:
        return [row["kernel"], row["config"], row["dtype"], kept, "-", "-", "-", "-", "NO: " + row["error"], "-", "-"]
    dots = ", ".join(f"{n}x {d}" for d, n in sorted(_count(row["dots"]).items()))
    return [
        row["kernel"], row["config"], row["dtype"], kept, str(row["regs"]),
        f"{row['spill_stores']}/{row['spill_loads']}", str(row["stack_bytes"]), f"{row['smem_bytes'] / 1024:.1f}",
        "yes" if row["fits"] else "NO", tensor_cores(row), dots,
    ]  # fmt: skip


_HEADER = ["kernel", "config", "dtype", "kept", "regs", "spill st/ld B", "stack B", "smem KiB", "fits", "tensor cores",
           "dots (TTGIR)"]  # fmt: skip


def _count(items: list[str]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[item] += 1
    return counts


def _line(row: dict[str, Any]) -> str:
    widths = (26, 32, 5, 4, 4, 13, 6, 8, 4, 10, 0)
    return " ".join(f"{c:{w}s}" if w else c for c, w in zip(_cells(row), widths)) + f"  ({row['compile_s']:.1f} s)"


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kernel, dtype): configs compiled / kept, how many spill or overflow shared memory, tensor-core use."""
    out = []
    by: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by[(row["kernel"], row["dtype"])].append(row)
    for (kernel, dtype), group in by.items():
        ok = [r for r in group if "error" not in r]
        kept = [r for r in ok if r["kept"]]

        def stats(rs: list[dict]) -> str:
            if not rs:
                return "-"
            spill = [r for r in rs if r["spill_stores"] or r["spill_loads"]]
            over = [r for r in rs if r["smem_bytes"] > H100_SMEM_BYTES]
            worst = max(rs, key=lambda r: r["spill_stores"])
            return (
                f"regs {min(r['regs'] for r in rs)}-{max(r['regs'] for r in rs)}; {len(spill)} spill"
                + (
                    f" (max {worst['spill_stores']} B st / {worst['spill_loads']} B ld: {worst['config']})"
                    if spill
                    else ""
                )
                + f"; smem {min(r['smem_bytes'] for r in rs) / 1024:.1f}-{max(r['smem_bytes'] for r in rs) / 1024:.1f}"
                f" KiB, {len(over)} over 227 KiB"
            )

        out.append({
            "kernel": kernel, "dtype": dtype, "configs": len(group), "compiled": len(ok), "kept": len(kept),
            "all": stats(ok), "kept_stats": stats(kept),
            "tensor_cores": ", ".join(sorted({tensor_cores(r) for r in ok})) or "-",
            "dots": ", ".join(sorted({d for r in ok for d in r["dots"]})),
        })  # fmt: skip
    return out


def _markdown(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Kernels compiled ahead of time for sm_90 (H100): {header['date']}", ""]
    if not header["complete"]:
        lines += ["**Incomplete: the run was still going (or was stopped) when this was written.**", ""]
    tools = (
        f"triton {header['triton']}, ptxas {header['ptxas']}, torch {header['torch']}; target {header['target']};"
        f" FP fusion {'on' if header['fp_fusion'] else 'off'}"
    )
    runs = header["runs"]
    if len(runs) == 1:
        lines += [
            f"{tools}; command `{header['command']}`; {header['seconds']:.0f} s on {header['machine']} (compile"
            " times in the JSON are wall-clock). No GPU or driver: see bench/kernels_sm90.py for how.",
            "",
        ]
    else:
        lines += [
            f"{tools}. No GPU or driver: see bench/kernels_sm90.py for how. The {len(rows)} rows come from"
            f" {len(runs)} runs (`--resume`), {header['seconds']:.0f} s in all; compile times in the JSON are"
            " wall-clock, each row's `run` there is its run's number:",
            "",
        ]
        lines += [
            f"- run {n}: {run['date']}, `{run['command']}`, {run['seconds']:.0f} s on {run['machine']}"
            f"{'' if run['complete'] else ' (stopped before its end)'}: {run['rows']} rows"
            for n, run in enumerate(runs, 1)
        ]
        lines += [""]
    lines += [
        f"H100 limits: shared memory {H100_SMEM_BYTES} B (227 KiB) per block, {H100_MAX_REGS} registers per thread,"
        f" {H100_BLOCK_REGS} per block (`fits` checks all three). `kept`: the config survives the kernel's"
        " `early_config_prune` at its benchmark shapes (yes / some / no). Spills and stack: ptxas -v, bytes per"
        " thread. `tensor cores`: wgmma / mma.sync instructions in the PTX; `dots`: each tl.dot's lowering in TTGIR"
        " (fma = no tensor cores) with operand type and, for f32, input precision.",
        "",
        "Launches (bench/kernels.py shapes; the launcher's constexprs):",
        "",
    ]
    # kernel -> constexprs -> dtypes
    by_kernel: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    shapes: dict[str, list[str]] = {}
    for (kernel, dtype), launch in header["launches"].items():
        by_kernel[kernel][repr(launch["constexprs"])].append(dtype)
        shapes[kernel] = launch["shapes"]
    for kernel, consts in by_kernel.items():
        per_dtype = "; ".join(f"{', '.join(dtypes)}: `{c}`" for c, dtypes in consts.items())
        lines.append(f"- {kernel} at {', '.join(shapes[kernel])}: {per_dtype}")
    summary = summarize(rows)
    # With rows from several runs, the summary says which runs each kernel and dtype's rows come from.
    from_runs: dict[tuple[str, str], set[int]] = defaultdict(set)
    for row in rows:
        from_runs[(row["kernel"], row["dtype"])].add(row["run"])
    several = len(runs) > 1
    lines += [
        "",
        "## Summary per kernel and dtype",
        "",
        "| kernel | dtype | compiled | kept | all configs | kept configs |" + (" runs |" if several else ""),
        "|---|---|---:|---:|---|---|" + ("---|" if several else ""),
    ]
    for s in summary:
        runs_cell = f" {', '.join(map(str, sorted(from_runs[(s['kernel'], s['dtype'])])))} |" if several else ""
        lines.append(
            f"| {s['kernel']} | {s['dtype']} | {s['compiled']}/{s['configs']} | {s['kept']} | {s['all']} | "
            f"{s['kept_stats']} |{runs_cell}"
        )
    lines += ["", "| kernel | dtype | tensor cores | dots |", "|---|---|---|---|"]
    lines += [f"| {s['kernel']} | {s['dtype']} | {s['tensor_cores']} | {s['dots']} |" for s in summary]
    lines += ["", "## Every config", "", "| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _number_runs(header: dict[str, Any], rows: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """The runs the rows come from, numbered from 1 (earlier runs without a row here left out, this run last with
    its `seconds` so far), and copies of the rows whose `run` is that number."""
    counts = Counter(row.get("run") for row in rows)  # an index into header["earlier"]; None: this run
    earlier = [i for i in range(len(header.get("earlier", []))) if counts[i]]
    number = {i: n for n, i in enumerate([*earlier, None], 1)}
    this = {k: header[k] for k in _RUN_FIELDS}
    runs = [{**header["earlier"][i], "rows": counts[i]} for i in earlier] + [{**this, "rows": counts[None]}]
    return runs, [{**row, "run": number[row.get("run")]} for row in rows]


def _replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a run may be rewriting the very results it resumed)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(header: dict[str, Any], rows: list[dict[str, Any]], out_dir: Path, stem: str) -> Path:
    """Write <stem>.md and <stem>.json under out_dir; returns the Markdown path.

    `header` describes this run (`seconds`: this run's) and holds in `earlier` the runs of rows taken from earlier
    results (a row's `run` is an index there; rows without `run` are this run's). The files list the runs and give
    their seconds in all.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    runs, rows = _number_runs(header, rows)
    header = {k: v for k, v in header.items() if k != "earlier"}
    header.update(seconds=sum(run["seconds"] for run in runs), runs=runs)
    md = out_dir / f"{stem}.md"
    _replace(md, _markdown(header, rows))
    launches_json = {f"{k} ({d})": v for (k, d), v in header["launches"].items()}
    payload = {**header, "launches": launches_json, "summary": summarize(rows), "rows": rows}
    _replace(out_dir / f"{stem}.json", json.dumps(payload, indent=1))
    return md


# What every row of one report shares; --resume takes rows only from results that match this run in all of it.
_SAME = ("triton", "ptxas", "torch", "target", "fp_fusion")
# What the report says of each run its rows come from (besides how many rows).
_RUN_FIELDS = ("date", "command", "machine", "seconds", "complete")


def _load_earlier(
    paths: list[Path], header: dict[str, Any], launch_list: list[Launch]
) -> tuple[list[dict[str, Any]], dict[tuple[str, str, str], dict[str, Any]]]:
    """The runs of earlier results and their rows by (kernel, config, dtype), each row's `run` an index into those
    runs; where several have a row, the first path's. Rows of kernels and dtypes not in `launch_list` are left out.

    Raises ValueError where a file does not match `header` in `_SAME`, or where a row was compiled for other
    launches (shapes, launch constexprs, shapes that keep the config) than `launch_list` has now.
    """
    runs: list[dict[str, Any]] = []
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    now = {(launch.kernel, launch.dtype): launch for launch in launch_list}
    for path in paths:
        data = json.loads(path.read_text())
        differ = [f"{k} {data.get(k)!r}, not {header[k]!r}" for k in _SAME if data.get(k) != header[k]]
        if differ:
            raise ValueError(f"{path} was compiled with {'; '.join(differ)}")
        # Results written before runs were recorded are one run's, and their rows have no `run`.
        file_runs = data.get("runs") or [{k: data[k] for k in _RUN_FIELDS}]
        index = []
        for run in file_runs:
            run = {k: run[k] for k in _RUN_FIELDS}
            if run not in runs:
                runs.append(run)
            index.append(runs.index(run))
        for row in data["rows"]:
            key, launch = (row["kernel"], row["config"], row["dtype"]), now.get((row["kernel"], row["dtype"]))
            if launch is None or key in rows:
                continue
            then = data["launches"][f"{row['kernel']} ({row['dtype']})"]
            if [then["shapes"], then["constexprs"], row["kept_at"]] != json.loads(
                json.dumps([launch.shapes, launch.constexprs, launch.kept.get(row["config"], [])])
            ):
                raise ValueError(f"{path}: {' '.join(key)} was compiled for other launches than the kernels make now")
            rows[key] = {**row, "run": index[row.get("run", 1) - 1]}
    return runs, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=[*KERNELS, *FAMILIES],
                        help="kernels, or families (slot_attention, vq, msglam)")  # fmt: skip
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPES),
                        help="fp32-tf32: fp32 with torch.backends.cuda.matmul.allow_tf32 = True")  # fmt: skip
    parser.add_argument("--kept-only", action="store_true", help="only the configs autotune pruning keeps")
    parser.add_argument("--config", action="append", help="only this config label, e.g. 'BLOCK_N=16 w4 s1'")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument("--resume", nargs="+", type=Path, default=[], metavar="JSON",
                        help="earlier results: take the rows they have instead of compiling them again")  # fmt: skip
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    kernels = [k for k in KERNELS if k in args.kernel or any(k.startswith(f + "_") for f in args.kernel)]

    start, now = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    launch_list = launches(kernels, args.dtypes)
    header = {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "triton": triton.__version__,
        "ptxas": get_ptxas(TARGET.arch).version,
        "torch": torch.__version__,
        "target": f"cuda sm_{TARGET.arch}a (GPUTarget('cuda', {TARGET.arch}, {TARGET.warp_size}))",
        "fp_fusion": triton.knobs.language.fp_fusion_enabled(None),
        "command": " ".join(["python bench/kernels_sm90.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": f"{os.cpu_count()} CPUs, {args.jobs} compile process{'es' if args.jobs > 1 else ''}",
        "launches": {
            (launch.kernel, launch.dtype): {"shapes": launch.shapes, "constexprs": launch.constexprs}
            for launch in launch_list
        },
        "complete": False,
    }
    try:
        header["earlier"], earlier = _load_earlier(args.resume, header, launch_list)
    except ValueError as e:
        parser.error(f"--resume: {e}")
    # Named by what ran: kernels-sm90-<date>[-kept][-<dtypes unless all three>][-<families> or -partial][-configs]
    stem = f"kernels-sm90-{now:%Y%m%d}" + ("-kept" if args.kept_only else "")
    stem += "" if {"bf16", "fp16", "fp32"} <= set(args.dtypes) else "-" + "-".join(args.dtypes)
    families = [f for f in FAMILIES if any(k.startswith(f + "_") for k in kernels)]
    whole = [k for k in KERNELS if any(k.startswith(f + "_") for f in families)] == kernels
    stem += "" if kernels == list(KERNELS) else "-" + "-".join(families) if whole else "-partial"
    stem += "-configs" if args.config else ""
    only = set(args.config or [])
    wanted = {(launch.kernel, config_label(c), launch.dtype) for launch, c in _tasks(launch_list, args.kept_only, only)}
    done = [row for key, row in earlier.items() if key in wanted]  # the rows this run takes, then those it compiles
    if args.resume:
        print(f"{len(done)} rows from {', '.join(map(str, args.resume))}; compiling {len(wanted) - len(done)}")

    def on_row(row: dict[str, Any]) -> None:  # print it, and keep the files current (a long run leaves its rows)
        print(_line(row), flush=True)
        done.append(row)
        write_results({**header, "seconds": time.perf_counter() - start}, done, args.out, stem)

    rows = sweep(launch_list, args.kept_only, only, args.jobs, on_row, earlier)
    md = write_results({**header, "seconds": time.perf_counter() - start, "complete": True}, rows, args.out, stem)
    print()
    for s in summarize(rows):
        print(f"{s['kernel']:28s} {s['dtype']:9s} {s['compiled']}/{s['configs']} compiled, {s['kept']} kept; "
              f"{s['all']}; tensor cores: {s['tensor_cores']}")  # fmt: skip
    print(f"\nwritten: {md} and {md.with_suffix('.json')} ({time.perf_counter() - start:.0f} s)")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
