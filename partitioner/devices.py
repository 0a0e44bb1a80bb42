"""Device specifications: what the cost model knows about an accelerator and the links between them.

A `DeviceSpec` is plain data. Presets are datasheet figures (dense, no sparsity) with stated sources;
`efficiency` factors turn peaks into what tuned kernels reach, so the roofline predicts achievable,
not theoretical, time. `measure_cpu()` builds a spec for this machine from two short measurements,
which is what profile-mode fidelity checks compare against.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import torch

__all__ = ["DeviceSpec", "PRESETS", "get_device_spec", "measure_cpu", "measure_link"]

GB = 1e9
GiB = 2**30
TFLOPS = 1e12


@dataclass(frozen=True, kw_only=True)
class DeviceSpec:
    """One accelerator and its links.

    peak_flops maps a dtype name ("float32", "bfloat16", ...) to dense peak FLOP/s of the matrix
    units for that dtype. Link bandwidths are per direction, bytes/s; latency is per message.

    overlaps_comm says whether point-to-point transfers run beside compute. On GPUs they do: NCCL
    moves the bytes with its own kernels on its own stream, so a stage costs max(compute, transfers).
    On a CPU with gloo they do not: the sending process copies the bytes into the socket with the
    same cores its compute needs, and torch's 1F1B loop waits for each send, so a stage costs
    compute + transfers and every send holds its rank (plan.graph, simulate).
    """

    name: str
    peak_flops: dict[str, float]
    memory_bandwidth: float  # bytes/s of device memory (HBM)
    memory_bytes: float  # device memory as the driver reports it (torch.cuda.mem_get_info()'s total)
    link_bandwidth: float  # bytes/s per direction to a peer in the same node (NVLink)
    link_latency: float  # seconds per point-to-point message
    internode_bandwidth: float  # bytes/s per direction to a peer in another node (InfiniBand)
    devices_per_node: int = 8
    compute_efficiency: float = 0.75  # fraction of peak FLOP/s that large GEMMs reach
    # Tensor-core GEMMs run their fast kernels only when every operand's rows start on this many bytes (the reduction
    # dim K and the output's columns N are row lengths: NVIDIA's "Matrix Multiplication Background" guide asks for
    # multiples of 16 bytes; Hopper's TMA copies need 16-byte-aligned strides). Otherwise cuBLAS falls back to
    # kernels that reach `partly_aligned_gemm_efficiency` of the aligned rate where every row is at least 4-byte
    # aligned (wider loads), `misaligned_gemm_efficiency` where one is only 2-byte aligned (an odd count of 16-bit
    # elements); 1.0: no penalty (the CPU presets).
    gemm_alignment: int = 16
    misaligned_gemm_efficiency: float = 1.0
    partly_aligned_gemm_efficiency: float = 1.0
    # Memory-bound kernels that stream below the copy rate: class ("norm", "softmax", "activation": cost.stream_class)
    # -> fraction of memory_bandwidth their kernels reach (replacing memory_efficiency for those nodes).
    stream_efficiency: dict[str, float] = field(default_factory=dict)
    # Fused (flash) attention in bf16 / fp16 without a mask: "d{head dim} {causal|full} {fwd|fwd+bwd}" -> TFLOP/s of
    # useful work at each of `attention_lengths` (tokens per sequence), as measured: forward 4 b h s^2 d FLOPs (half
    # when causal), forward + backward 3.5x that (the backward's five products, q k^T recomputed).
    # cost.attention_rate interpolates; empty: attention is priced at the GEMM rate.
    attention_lengths: list[int] = field(default_factory=list)
    attention_tflops: dict[str, list[float]] = field(default_factory=dict)
    memory_efficiency: float = 0.85  # fraction of peak bandwidth that streaming kernels reach
    # Fraction of a link's per-direction bandwidth that NCCL moves: nccl-tests all_reduce_perf reports a bus
    # bandwidth of about 230 GB/s on a DGX A100's NVLink (300 GB/s per direction) and about 360 GB/s on a DGX H100's
    # (450 GB/s), both near 0.78-0.8 of peak; InfiniBand NICs reach a similar share of their line rate.
    link_efficiency: float = 0.8
    kernel_overhead: float = 5e-6  # seconds of launch / fixed cost per kernel
    overlaps_comm: bool = True  # transfers run beside compute (NCCL); False: they take the sender's time (gloo)
    # Fraction of the ideal saving, min(compute, collective), that a collective launched beside the matmuls it
    # overlaps realizes: both are kernels on the same SMs, caches and HBM. Agrawal et al. 2024 ("Optimizing ML
    # Concurrent Computation and Communication with GPU DMA Engines", arXiv 2412.14335) measured GEMMs beside
    # collectives on MI300X reaching 21% of the ideal speedup on average (42% with stream priorities and a CU split).
    # Korthikanti et al.'s Megatron-LM runs, which overlap sequence parallelism's backward gathers so, agree: priced
    # as fully hidden their SP steps come out 3-11% faster than measured (docs/design.md, "Sequence parallelism").
    # Used for tensor parallelism's overlapped backward collectives (plan.search.scale_ranks), which move NVLink's
    # bandwidth through many SMs and HBM. The data-parallel collectives (mostly InfiniBand, a ninth of that rate) are
    # still priced fully hidden where compute covers them (plan.sharding): not re-examined against this figure.
    overlap_efficiency: float = 0.21
    source: str = ""
    extra: dict[str, float] = field(default_factory=dict)
    # Of memory_bytes, what no tensor can use: the CUDA context, cuBLAS workspaces and NCCL's own state live outside
    # torch's allocator. A plan's default memory limit is the difference (`usable_memory`).
    runtime_reserve: float = 0.0
    # What each NCCL communicator a rank holds takes besides (outside torch's allocator too): a plan prices it per
    # layout, by the process groups its ranks join (plan.communicators), inside the memory limit.
    communicator_memory: float = 0.0

    def __post_init__(self) -> None:
        for attr in ("memory_bandwidth", "memory_bytes", "link_bandwidth", "internode_bandwidth"):
            if getattr(self, attr) <= 0:
                raise ValueError(f"DeviceSpec {self.name!r}: {attr} must be positive, got {getattr(self, attr)}")
        for attr in ("runtime_reserve", "communicator_memory"):
            if not 0 <= getattr(self, attr) < self.memory_bytes:
                raise ValueError(
                    f"DeviceSpec {self.name!r}: {attr} must lie in [0, memory_bytes), got {getattr(self, attr)}"
                )
        if not self.peak_flops or min(self.peak_flops.values()) <= 0:
            raise ValueError(f"DeviceSpec {self.name!r}: peak_flops needs positive entries, got {self.peak_flops}")
        efficiencies = (self.compute_efficiency, self.memory_efficiency, self.link_efficiency,
                        self.misaligned_gemm_efficiency, self.partly_aligned_gemm_efficiency)  # fmt: skip
        if not all(0 < e <= 1 for e in efficiencies):
            raise ValueError(f"DeviceSpec {self.name!r}: efficiencies must lie in (0, 1]")

    @property
    def usable_memory(self) -> float:
        """Bytes per device a plan's tensors may take (memory_bytes less runtime_reserve): the default memory limit."""
        return self.memory_bytes - self.runtime_reserve

    def flops_per_second(self, dtype: torch.dtype | str) -> float:
        """Achievable FLOP/s for matrix work in `dtype` (unknown dtypes use the float32 figure)."""
        key = str(dtype).removeprefix("torch.")
        peak = self.peak_flops.get(key, self.peak_flops.get("float32", max(self.peak_flops.values())))
        return peak * self.compute_efficiency

    def gemm_efficiency(self, row_elements: tuple[int, ...], element_size: int) -> float:
        """The fraction of `flops_per_second` a tensor-core GEMM reaches given its operands' row lengths (K and N, in
        elements of `element_size` bytes): 1.0 when all are multiples of `gemm_alignment` bytes; else
        `partly_aligned_gemm_efficiency` when all are multiples of 4 bytes (BERT's 30,522-token decoder in bf16),
        `misaligned_gemm_efficiency` otherwise (GPT-2's 50,257-token LM head, which Megatron pads)."""
        row_bytes = [r * element_size for r in row_elements]
        if all(b % self.gemm_alignment == 0 for b in row_bytes):
            return 1.0
        return (
            self.partly_aligned_gemm_efficiency
            if all(b % 4 == 0 for b in row_bytes)
            else self.misaligned_gemm_efficiency
        )

    def bytes_per_second(self, stream: str = "") -> float:
        """Achievable device-memory bandwidth; of a kernel of `stream` class where stream_efficiency names it."""
        return self.memory_bandwidth * self.stream_efficiency.get(stream, self.memory_efficiency)

    def to_dict(self) -> dict:
        """The spec as plain JSON data (what `Plan.device_type` holds); `from_dict` reads it back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DeviceSpec:
        """The spec `to_dict` wrote (e.g. a saved plan's `device_type`; one saved before a field existed gets its
        default)."""
        return cls(**data)


# What torch reports as a device's total memory (its OutOfMemoryError reads "GPU 0 has a total capacity of ..."):
# 79.1-79.25 GiB on the 80 GB A100 SXM4 and H100 SXM5 (by driver; the low end of public error logs), 139.8 GiB on the
# 141 GB H200 (measured: `torch.cuda.mem_get_info()`, bench/results/runtime-reserve-NVIDIA_H200-20261204-1759.md).
_80GB_REPORTED = 79.1 * GiB
_H200_REPORTED = 139.8 * GiB
# Taken before any tensor: the CUDA context, cuBLAS workspaces and NCCL's communicators. Measured on an H200 (torch
# 2.11, CUDA 13.0, NCCL 2.28.9; bench/runtime_reserve.py, the same file as above): the context 0.51 GiB, cuBLAS
# +0.22, flash attention +0.02, a first NCCL communicator +0.54 (one rank), each further one +0.38 whatever
# NCCL_BUFFSIZE (0.50 with NCCL_CUMEM_ENABLE=0; bench/results/gpu-tests-NVIDIA_H200-20261204.md). So the reserve is
# what any process holds, the first communicator's excess over the others included (0.51 + 0.22 + 0.02 + 0.16), and
# each communicator is 0.38 GiB more, priced per layout (plan.communicators: 1.29 GiB in all for a rank of one
# process group, 2.43 for one of four). A communicator with peers adds buffers per channel and peer that one GPU
# cannot show, so both are lower bounds; assumed alike on the A100 and H100 with the same software. The allocator's
# fragmentation comes on top and is not modelled (expandable_segments keeps it small).
_GPU_RUNTIME_RESERVE = 0.91 * GiB
_NCCL_COMMUNICATOR = 0.38 * GiB


def _hopper(name: str, hbm_bandwidth: float, memory_bytes: float, source: str) -> DeviceSpec:
    # H100 SXM5 and H200 share the GH100 compute die: dense bf16/fp16 989.4 TFLOP/s, tf32 494.7,
    # fp32 (non-tensor-core; what torch uses for fp32 matmul unless TF32 is enabled) 66.9.
    return DeviceSpec(
        name=name,
        peak_flops={
            "bfloat16": 989.4 * TFLOPS,
            "float16": 989.4 * TFLOPS,
            "tfloat32": 494.7 * TFLOPS,
            "float32": 66.9 * TFLOPS,
            "float8_e4m3fn": 1978.9 * TFLOPS,
        },
        memory_bandwidth=hbm_bandwidth,
        memory_bytes=memory_bytes,
        runtime_reserve=_GPU_RUNTIME_RESERVE,
        communicator_memory=_NCCL_COMMUNICATOR,
        link_bandwidth=450 * GB,  # NVLink 4: 900 GB/s bidirectional
        link_latency=10e-6,
        internode_bandwidth=50 * GB,  # one 400 Gb/s NDR InfiniBand NIC per GPU
        # Measured on an H200 (bench/results/device-rates-NVIDIA_H200-20261130-1915.json, torch 2.11 / CUDA 13.0
        # cuBLAS, bf16): the median of the 261 aligned GEMMs of >= 1e11 FLOPs (a GPT layer's forward, input- and
        # weight-gradient GEMMs at hidden 1024-12288, tp 1-8) ran at 0.69 of the dense peak (0.59-0.80); of the random
        # shapes of >= 5e9 FLOPs with a row length not a multiple of 16 bytes, the 40 with a row of an odd element
        # count ran 6.3x slower than that rate + the launch (median): 0.16; the 13 with rows 4- or 8-byte aligned
        # 3.8x: 0.27. The H100 shares the die, the SXM clocks and the libraries.
        compute_efficiency=0.69,
        misaligned_gemm_efficiency=0.16,
        partly_aligned_gemm_efficiency=0.27,
        # The same file, 2^28 bf16 elements (rows of 1024), bytes read + written once over the HBM datasheet rate:
        # add 0.91, copy 0.87 (memory_efficiency 0.85 holds), gelu 0.65, softmax 0.56, layer_norm 0.37. There a
        # one-element add took 4.2 us of GPU time per kernel in a tight loop (9.1 us of host time per launch from
        # Python), and the GEMM rate + kernel_overhead (5 us) fits the 480 GEMMs' times with a median error of 4.8%.
        stream_efficiency={"activation": 0.65, "softmax": 0.56, "norm": 0.37},
        # The same file: F.scaled_dot_product_attention (flash), 16 heads, 16384 / s sequences of s tokens each.
        attention_lengths=[512, 1024, 2048, 4096, 8192, 16384],
        attention_tflops={
            "d64 causal fwd": [240.7, 313.9, 371.1, 408.9, 435.3, 452.1],
            "d64 causal fwd+bwd": [172.8, 258.9, 329.5, 382.2, 417.3, 451.2],
            "d64 full fwd": [367.9, 419.9, 457.8, 478.0, 485.9, 490.1],
            "d64 full fwd+bwd": [295.1, 371.9, 426.5, 455.5, 459.7, 454.1],
            "d128 causal fwd": [333.9, 430.7, 510.1, 564.4, 601.2, 620.5],
            "d128 causal fwd+bwd": [239.6, 345.7, 436.9, 505.1, 550.4, 556.0],
            "d128 full fwd": [519.1, 598.0, 643.3, 665.7, 674.3, 683.5],
            "d128 full fwd+bwd": [381.3, 480.1, 543.5, 578.8, 602.6, 552.4],
        },
        source=source,
    )


PRESETS: dict[str, DeviceSpec] = {
    "h100": _hopper("h100", 3.35e12, _80GB_REPORTED, "NVIDIA H100 SXM5 80GB datasheet"),
    "h200": _hopper("h200", 4.8e12, _H200_REPORTED, "NVIDIA H200 SXM 141GB datasheet"),
    "a100": DeviceSpec(
        name="a100",
        peak_flops={
            "bfloat16": 312 * TFLOPS,
            "float16": 312 * TFLOPS,
            "tfloat32": 156 * TFLOPS,
            "float32": 19.5 * TFLOPS,
        },
        memory_bandwidth=2.039e12,
        memory_bytes=_80GB_REPORTED,
        runtime_reserve=_GPU_RUNTIME_RESERVE,
        communicator_memory=_NCCL_COMMUNICATOR,
        link_bandwidth=300 * GB,  # NVLink 3: 600 GB/s bidirectional
        link_latency=10e-6,
        internode_bandwidth=25 * GB,  # one 200 Gb/s HDR NIC per GPU
        # Not measured on an A100: Ampere's fast kernels need the same 16-byte rows (cp.async's 16-byte copies), and
        # the penalties measured on the H200 are assumed for its fallback kernels.
        misaligned_gemm_efficiency=0.16,
        partly_aligned_gemm_efficiency=0.27,
        source="NVIDIA A100 SXM4 80GB datasheet",
    ),
    # A small 2-core x86 server (AVX2 FMA) with processes talking over loopback gloo. The link figures
    # are measure_link() on the 2-core dev box (2026-11-25: 63-104 us + 3.1-3.4 GB/s over five runs).
    # For fidelity checks on a real machine use measure_cpu(link=True).
    "cpu": DeviceSpec(
        name="cpu",
        peak_flops={"float32": 100e9, "bfloat16": 25e9, "float16": 25e9},
        memory_bandwidth=15 * GB,
        memory_bytes=16 * GiB,
        link_bandwidth=3.2 * GB,
        link_latency=75e-6,
        internode_bandwidth=3.2 * GB,  # every rank is a process on this one host: loopback, as link_bandwidth
        devices_per_node=1,
        compute_efficiency=1.0,
        memory_efficiency=1.0,
        link_efficiency=1.0,  # measured figures are already achieved rates
        kernel_overhead=10e-6,
        overlaps_comm=False,
        source="nominal 2-core CPU; see measure_cpu()",
    ),
}


def get_device_spec(device: str | DeviceSpec) -> DeviceSpec:
    """A preset by name ("h100", "h200", "a100", "cpu"), or the spec itself."""
    if isinstance(device, DeviceSpec):
        return device
    try:
        return PRESETS[device.lower()]
    except KeyError:
        raise ValueError(
            f"unknown device type {device!r}; choose one of {sorted(PRESETS)} or pass a DeviceSpec"
        ) from None


def measure_cpu(*, matmul_size: int = 512, copy_mib: int = 64, repeats: int = 5, link: bool = False) -> DeviceSpec:
    """A DeviceSpec for this machine's CPU from a float32 GEMM and a memory copy (best of `repeats`).

    Takes well under a second. Efficiencies are 1.0: the measured figures already are achieved rates.
    With `link=True` the link latency and bandwidth come from `measure_link()` (two gloo processes on
    this machine, a few seconds) instead of the preset's figures.
    """
    a = torch.randn(matmul_size, matmul_size)
    b = torch.randn(matmul_size, matmul_size)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    flops = 2 * matmul_size**3 / best

    src = torch.empty(copy_mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    bandwidth = 2 * src.numel() * 4 / best  # read + write

    base = PRESETS["cpu"]
    source = f"measured: {matmul_size}^3 fp32 GEMM and a {copy_mib} MiB copy"
    links = {}
    if link:
        latency, link_bandwidth = measure_link()
        links = dict(link_latency=latency, link_bandwidth=link_bandwidth)
        source += f", gloo ping-pong {latency * 1e6:.0f} us + {link_bandwidth / GB:.2f} GB/s"
    return dataclasses.replace(
        base,
        name="cpu-measured",
        peak_flops={"float32": flops, "bfloat16": flops / 4, "float16": flops / 4},
        memory_bandwidth=bandwidth,
        source=source,
        **links,
    )


_PING_SIZES = (4 * 2**10, 4 * 2**20)  # bytes: latency-bound and bandwidth-bound messages


def measure_link(*, repeats: int = 20, timeout: float = 120.0) -> tuple[float, float]:
    """(latency seconds, bandwidth bytes/s) of one point-to-point message between two gloo processes here.

    Two ranks (partitioner.launch.spawn, one thread each) ping-pong a small and a large tensor through
    ``batch_isend_irecv``, as the pipeline stages send; the one-way time is half the fastest round trip (the
    fastest: other processes on the machine only ever slow a round trip down, and with a few repeats a median
    can put the small message above the large one). The line through the two (bytes, time) points gives
    bandwidth (slope) and latency (intercept), which includes Python's and gloo's per-message cost: what a
    stage pays per send. A measurement whose large message is not slower than its small one is taken again
    with more repeats, then refused.
    """
    import tempfile

    from partitioner.launch import spawn

    (s_bytes, l_bytes) = _PING_SIZES
    for attempt in (repeats, 4 * repeats):
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/link.pt"
            results = spawn("partitioner.devices:_ping_pong", 2, {"repeats": attempt, "out": out}, timeout=timeout,
                            env={"OMP_NUM_THREADS": "1"})  # fmt: skip
            failed = [r for r in results if r.returncode]
            if failed:
                raise RuntimeError(f"measure_link: rank {failed[0].rank} failed:\n{failed[0].stderr[-2000:]}")
            small, large = torch.load(out)
        if large > small:
            bandwidth = (l_bytes - s_bytes) / (large - small)
            return max(small - s_bytes / bandwidth, 0.0), bandwidth
    raise RuntimeError(
        f"measure_link: a {l_bytes} B message took {large:.3g} s and a {s_bytes} B one {small:.3g} s: the machine is "
        f"too busy to time its link; measure again when it is idle"
    )


def _ping_pong(repeats: int, out: str) -> None:
    """Rank side of `measure_link`: median one-way seconds per message size; rank 0 saves them to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    one_way = []
    for nbytes in _PING_SIZES:
        buf = torch.zeros(nbytes // 4)
        times = []
        for i in range(repeats + 3):  # 3 warm-ups
            dist.barrier()
            t0 = time.perf_counter()
            for sender in (0, 1):
                op = dist.isend if rank == sender else dist.irecv
                for work in dist.batch_isend_irecv([dist.P2POp(op, buf, peer)]):
                    work.wait()
            if i >= 3:
                times.append((time.perf_counter() - t0) / 2)
        one_way.append(min(times))
    if rank == 0:
        torch.save(one_way, out)
